//! What an intercepting server reads of the host's resolver config, resolv.conf(5): the
//! `nameserver`s that names outside the mesh are forwarded to (unless configured otherwise) and
//! the `search` list under which the app's resolver spells mesh names.
//!
//! The format is lines of `keyword value...`; this reads the two keywords it needs and the same
//! way glibc does: at most [`MAX_NAMESERVERS`] nameservers, on port 53; `search` and `domain`
//! replace each other, the last line winning; lines starting with `#` or `;` are comments.
//! Everything else (`options`, `sortlist`) is left to the app's own resolver.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use hickory_proto::rr::{LowerName, Name};

/// The most nameservers glibc reads (MAXNS); later lines are ignored, as glibc ignores them.
pub(crate) const MAX_NAMESERVERS: usize = 3;
/// The port of a `nameserver` line, which has no way to name another.
const DNS_PORT: u16 = 53;

/// The parts of resolv.conf an intercepting server uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ResolvConf {
    pub(crate) nameservers: Vec<SocketAddr>,
    /// The search domains, in order; never the root.
    pub(crate) search: Vec<LowerName>,
}

impl ResolvConf {
    /// Reads and parses the file at `path`.
    pub(crate) async fn read(path: &Path) -> io::Result<Self> {
        Ok(Self::parse(&tokio::fs::read_to_string(path).await?))
    }

    /// Parses resolv.conf text. Lines it cannot use are skipped (logged at debug), as the
    /// resolver library skips them: a bad line must not cost the app its other settings.
    pub(crate) fn parse(text: &str) -> Self {
        let mut conf = Self::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") if conf.nameservers.len() < MAX_NAMESERVERS => match words.next().map(str::parse::<IpAddr>) {
                    Some(Ok(ip)) => conf.nameservers.push(SocketAddr::new(ip, DNS_PORT)),
                    // Such as a link-local IPv6 address with a `%interface` scope.
                    _ => tracing::debug!(line, "resolv.conf: nameserver not used"),
                },
                Some("search") => conf.search = words.filter_map(search_domain).collect(),
                Some("domain") => conf.search = words.next().and_then(search_domain).into_iter().collect(),
                _ => {}
            }
        }
        conf
    }
}

/// `domain` as a search domain; `None` for the root (a search domain of `.` adds nothing) or a
/// name that is not one.
fn search_domain(domain: &str) -> Option<LowerName> {
    match Name::from_ascii(domain) {
        Ok(mut name) if !name.is_root() => {
            name.set_fqdn(true);
            Some(LowerName::new(&name))
        }
        Ok(_) => None,
        Err(error) => {
            tracing::debug!(domain, %error, "resolv.conf: search domain not used");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(conf: &ResolvConf) -> Vec<String> {
        conf.search.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn reads_a_kubernetes_pod_config() {
        let conf = ResolvConf::parse(
            "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n",
        );
        assert_eq!(conf.nameservers, ["10.96.0.10:53".parse().expect("valid")]);
        assert_eq!(names(&conf), ["default.svc.cluster.local.", "svc.cluster.local.", "cluster.local."]);
    }

    #[test]
    fn the_last_search_or_domain_line_wins() {
        assert_eq!(names(&ResolvConf::parse("search a.example b.example\ndomain c.example\n")), ["c.example."]);
        assert_eq!(names(&ResolvConf::parse("domain c.example\nsearch A.example.\n")), ["a.example."]);
        assert!(ResolvConf::parse("search .\n").search.is_empty());
    }

    #[test]
    fn at_most_three_usable_nameservers() {
        let conf = ResolvConf::parse(
            "# comment\n; nameserver 10.0.0.9\nnameserver fe80::1%eth0\nnameserver ::1\nnameserver 127.0.0.53\n\
             nameserver 10.0.0.1\nnameserver 10.0.0.2\n",
        );
        let expected: Vec<SocketAddr> =
            ["[::1]:53", "127.0.0.53:53", "10.0.0.1:53"].iter().map(|a| a.parse().expect("valid")).collect();
        assert_eq!(conf.nameservers, expected);
    }

    #[test]
    fn nothing_to_use_is_empty() {
        assert_eq!(ResolvConf::parse(""), ResolvConf::default());
        assert_eq!(ResolvConf::parse("options edns0\nsortlist 10.0.0.0\nnameserver\n"), ResolvConf::default());
    }
}
