//! The IPv6 addresses of the network namespace, as the kernel lists them in
//! `/proc/net/if_inet6`, so that `install --ipv6 auto` knows whether skipping IPv6 rules would
//! leave a way around the sidecar.
//!
//! Each line of that file is one address: 32 hex digits, then the interface index, prefix
//! length, scope and flags in hex, then the interface name
//! (`fd000000000000000000000000000002 04 40 00 80     eth0`). The file is read through
//! `/proc/net`, which shows the namespace of the process reading it.

use std::{
    fmt, fs, io,
    net::Ipv6Addr,
    path::{Path, PathBuf},
};

/// Where the kernel lists the IPv6 addresses of the reader's network namespace.
pub const IF_INET6: &str = "/proc/net/if_inet6";

/// The scope the kernel gives a loopback address (`::1`).
const SCOPE_HOST: u8 = 0x10;

/// The scope the kernel gives a link-local address (`fe80::/10`).
const SCOPE_LINK: u8 = 0x20;

/// One IPv6 address of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Address {
    pub ip: Ipv6Addr,
    pub prefix_len: u8,
    /// The kernel's scope of the address: 0x00 global, 0x10 host, 0x20 link, 0x40 site.
    pub scope: u8,
    pub interface: String,
}

/// Whether the namespace has IPv6 addresses that connections can arrive at from beyond its own
/// links, which IPv6 rules must then cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipv6Exposure {
    /// Loopback and link-local addresses at most (or no IPv6 in the kernel at all).
    None,
    /// These addresses, none of them loopback or link-local.
    Addresses(Vec<Ipv6Address>),
    /// The list could not be read, so there may be some.
    Unknown { path: PathBuf, why: String },
}

impl Ipv6Address {
    /// Whether the address is reached only from the host itself (loopback) or from its own link
    /// (link-local). Judged by the address as well as the kernel's scope, so that a scope value
    /// this code does not know counts as reachable.
    pub fn is_loopback_or_link_local(&self) -> bool {
        matches!(self.scope, SCOPE_HOST | SCOPE_LINK) || self.ip.is_loopback() || self.ip.is_unicast_link_local()
    }
}

impl fmt::Display for Ipv6Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} on {}", self.ip, self.prefix_len, self.interface)
    }
}

impl Ipv6Exposure {
    /// Reads `path` (normally [`IF_INET6`]). A missing file means the kernel has no IPv6.
    pub fn read(path: &Path) -> Self {
        match fs::read_to_string(path) {
            Ok(text) => Self::of(&text).unwrap_or_else(|why| Self::Unknown { path: path.to_owned(), why }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Self::None,
            Err(error) => Self::Unknown { path: path.to_owned(), why: error.to_string() },
        }
    }

    /// The exposure the content of `/proc/net/if_inet6` shows; an error names a line that is
    /// not an address, since what it hides could be one.
    pub fn of(if_inet6: &str) -> Result<Self, String> {
        let exposed: Vec<Ipv6Address> = parse(if_inet6)?.into_iter().filter(|a| !a.is_loopback_or_link_local()).collect();
        Ok(if exposed.is_empty() { Self::None } else { Self::Addresses(exposed) })
    }
}

impl fmt::Display for Ipv6Exposure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("the namespace has no IPv6 address besides loopback and link-local ones"),
            Self::Addresses(addresses) => {
                f.write_str("the namespace has IPv6 addresses (")?;
                for (index, address) in addresses.iter().enumerate() {
                    if index > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{address}")?;
                }
                f.write_str(")")
            }
            Self::Unknown { path, why } => {
                write!(f, "whether the namespace has IPv6 addresses is unknown ({}: {why})", path.display())
            }
        }
    }
}

/// Every address `/proc/net/if_inet6` lists, in its order.
pub fn parse(if_inet6: &str) -> Result<Vec<Ipv6Address>, String> {
    if_inet6.lines().filter(|line| !line.trim().is_empty()).map(parse_line).collect()
}

fn parse_line(line: &str) -> Result<Ipv6Address, String> {
    let bad = || format!("not an address line: {line:?}");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [address, _ifindex, prefix_len, scope, _flags, interface] = fields[..] else { return Err(bad()) };
    if address.len() != 32 {
        return Err(bad());
    }
    let ip = u128::from_str_radix(address, 16).map(Ipv6Addr::from).map_err(|_| bad())?;
    let prefix_len = u8::from_str_radix(prefix_len, 16).map_err(|_| bad())?;
    let scope = u8::from_str_radix(scope, 16).map_err(|_| bad())?;
    Ok(Ipv6Address { ip, prefix_len, scope, interface: interface.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod's namespace: loopback, a link-local and a global address on eth0, and a
    /// deprecated site-local one.
    const POD: &str = "\
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
fd000000000000000000000000000002 04 40 00 82     eth0
00000000000000000000000000000001 01 80 10 80       lo
fec00000000000000000000000000005 05 40 40 80     net1
";

    #[test]
    fn every_line_is_an_address_with_its_prefix_scope_and_interface() {
        let addresses = parse(POD).expect("parses");
        assert_eq!(addresses.len(), 4);
        assert_eq!(
            addresses[1],
            Ipv6Address { ip: "fd00::2".parse().expect("ip"), prefix_len: 64, scope: 0, interface: "eth0".into() }
        );
        assert_eq!(addresses[0].to_string(), "fe80::fc:ff:fe00:1/64 on eth0");
        assert_eq!((addresses[2].ip, addresses[2].prefix_len, addresses[2].scope), (Ipv6Addr::LOCALHOST, 128, 0x10));
    }

    #[test]
    fn loopback_and_link_local_addresses_expose_nothing_and_any_other_does() {
        assert_eq!(
            Ipv6Exposure::of(POD).expect("parses").to_string(),
            "the namespace has IPv6 addresses (fd00::2/64 on eth0, fec0::5/64 on net1)"
        );
        let link_only = "\
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
";
        assert_eq!(Ipv6Exposure::of(link_only), Ok(Ipv6Exposure::None));
        assert_eq!(Ipv6Exposure::of(""), Ok(Ipv6Exposure::None), "IPv6 disabled on every interface");
    }

    #[test]
    fn an_address_counts_by_what_it_is_even_when_its_scope_is_unfamiliar() {
        let link_local_odd_scope = "fe800000000000000000000000000001 02 40 05 80 eth0\n";
        assert_eq!(Ipv6Exposure::of(link_local_odd_scope), Ok(Ipv6Exposure::None));
        let global_odd_scope = "20010db8000000000000000000000001 02 40 05 80 eth0\n";
        assert!(matches!(Ipv6Exposure::of(global_odd_scope), Ok(Ipv6Exposure::Addresses(a)) if a.len() == 1));
    }

    #[test]
    fn a_line_that_is_not_an_address_makes_the_exposure_unknown() {
        let error = Ipv6Exposure::of("fd00::2 04 40 00 80 eth0\n").expect_err("not hex");
        assert_eq!(error, "not an address line: \"fd00::2 04 40 00 80 eth0\"");
        assert!(parse("fd000000000000000000000000000002 04 40 00 80\n").is_err(), "no interface name");

        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("if_inet6");
        fs::write(&path, "garbage\n").expect("writes");
        assert!(matches!(Ipv6Exposure::read(&path), Ipv6Exposure::Unknown { .. }));
        assert!(matches!(Ipv6Exposure::read(dir.path()), Ipv6Exposure::Unknown { .. }), "a directory cannot be read");
        assert_eq!(Ipv6Exposure::read(&dir.path().join("missing")), Ipv6Exposure::None, "no file: no IPv6 in the kernel");
    }
}
