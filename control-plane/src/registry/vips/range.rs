//! The range of `--vip-cidr` and how an address is picked in it: the name hashed into the range,
//! then the next free address.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

/// The range of `--vip-cidr`, and how an address is picked in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipRange {
    net: IpNet,
    /// How many addresses may be handed out: all but the network address (and, for IPv4, the
    /// broadcast address).
    usable: u128,
}

/// Why a `--vip-cidr` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidVipRange(String);

impl VipRange {
    /// The range `net`, refused when it has no address to hand out.
    pub fn new(net: IpNet) -> Result<Self, InvalidVipRange> {
        let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
        let size = if host_bits >= 128 { u128::MAX } else { 1u128 << host_bits };
        let reserved = match net {
            IpNet::V4(_) => 2,
            IpNet::V6(_) => 1,
        };
        let usable = size.saturating_sub(reserved);
        if usable == 0 {
            return Err(InvalidVipRange(format!(
                "{net} has no address to hand out (the network address{} never is): use a shorter prefix",
                if net.addr().is_ipv4() { " and the broadcast address" } else { "" }
            )));
        }
        Ok(Self { net, usable })
    }

    /// The network of the range.
    pub fn net(&self) -> IpNet {
        self.net
    }

    /// How many addresses the range can hand out.
    pub fn capacity(&self) -> u128 {
        self.usable
    }

    /// Whether `ip` is one the range hands out.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.offset(ip).is_some()
    }

    /// The position of `ip` among the addresses handed out.
    fn offset(&self, ip: IpAddr) -> Option<u128> {
        let (ip, network) = match (ip, self.net) {
            (IpAddr::V4(ip), IpNet::V4(net)) => (u128::from(u32::from(ip)), u128::from(u32::from(net.network()))),
            (IpAddr::V6(ip), IpNet::V6(net)) => (u128::from(ip), u128::from(net.network())),
            _ => return None,
        };
        let offset = ip.checked_sub(network)?.checked_sub(1)?;
        (offset < self.usable).then_some(offset)
    }

    /// The address at `offset` (below [`VipRange::capacity`]).
    fn nth(&self, offset: u128) -> IpAddr {
        match self.net {
            IpNet::V4(net) => {
                // usable < 2^32, so the sum stays within the network.
                let base = u32::from(net.network());
                IpAddr::V4(Ipv4Addr::from(base.wrapping_add(1).wrapping_add(offset as u32)))
            }
            IpNet::V6(net) => IpAddr::V6(Ipv6Addr::from(u128::from(net.network()).wrapping_add(1).wrapping_add(offset))),
        }
    }

    /// The address for `service`: where its name hashes to, or the next free one after it; none
    /// when every address is taken.
    pub fn pick(&self, service: &str, taken: impl Fn(IpAddr) -> bool, taken_count: usize) -> Option<IpAddr> {
        let start = u128::from(fnv1a(service.as_bytes())) % self.usable;
        // With `taken_count` addresses taken, one of any `taken_count + 1` is free.
        let tries = (taken_count as u128).saturating_add(1).min(self.usable);
        (0..tries).map(|i| self.nth((start + i) % self.usable)).find(|ip| !taken(*ip))
    }
}

impl Default for VipRange {
    /// `240.240.0.0/16`: in 240.0.0.0/4, reserved and never routed, so a virtual IP cannot shadow
    /// a real address.
    fn default() -> Self {
        Self::new(IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::new(240, 240, 0, 0), 16).expect("16 is a valid IPv4 prefix")))
            .expect("a /16 has addresses to hand out")
    }
}

impl fmt::Display for VipRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.net.fmt(f)
    }
}

impl std::str::FromStr for VipRange {
    type Err = InvalidVipRange;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let net: IpNet =
            s.parse().map_err(|_| InvalidVipRange(format!("{s:?} is not a CIDR such as 240.240.0.0/16 or fd00:f0::/108")))?;
        if net.trunc() != net {
            return Err(InvalidVipRange(format!("{s:?} has host bits set: did you mean {}?", net.trunc())));
        }
        Self::new(net)
    }
}

/// FNV-1a (64 bits): a hash that never changes between builds, so names keep their addresses.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
