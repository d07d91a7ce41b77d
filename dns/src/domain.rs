//! [`AliasDomain`]: a domain under which the names of `ferry.` are answered too, such as
//! Consul's `consul.`, so that apps and resolvers configured for Consul find Ferry's services
//! unchanged.

use std::{fmt, str::FromStr};

use hickory_proto::rr::Name;

use crate::name::{self, ZONE_LABEL};

/// What `--dns-domain` takes to mean no alias at all.
const NONE: &str = "none";

/// A domain answered like `ferry.` (see the crate docs), its name lowercase and fully qualified.
///
/// Its labels are letters, digits and inner '-'; it is neither `ferry.` nor under it, and it
/// leaves room for the longest name the server builds under it (an IPv6 `HEX.addr.`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AliasDomain(Name);

/// A `--dns-domain` value that cannot be an alias domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} cannot be a DNS alias domain: {reason}")]
pub struct InvalidAliasDomain {
    value: String,
    reason: &'static str,
}

impl AliasDomain {
    /// `consul.`: Consul's names for the mesh's services, the default alias.
    pub fn consul() -> Self {
        "consul".parse().expect("`consul` is a valid alias domain")
    }

    /// The aliases a server has when none are configured: [`AliasDomain::consul`].
    pub fn defaults() -> Vec<Self> {
        vec![Self::consul()]
    }

    /// Parses one value of a `--dns-domain` flag: a domain such as `consul` or `dc1.consul.`,
    /// or `none` (or an empty value), which stands for no alias.
    pub fn parse_flag(value: &str) -> Result<Option<Self>, InvalidAliasDomain> {
        let trimmed = value.trim();
        if trimmed.is_empty() || trimmed.eq_ignore_ascii_case(NONE) {
            return Ok(None);
        }
        trimmed.parse().map(Some)
    }

    /// The domain's name.
    pub fn name(&self) -> &Name {
        &self.0
    }
}

impl FromStr for AliasDomain {
    type Err = InvalidAliasDomain;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| InvalidAliasDomain { value: value.to_owned(), reason };
        let ascii = value.strip_suffix('.').unwrap_or(value);
        if ascii.is_empty() {
            return Err(invalid("the root holds every name; give a domain such as `consul`"));
        }
        let labels: Vec<String> = ascii.split('.').map(str::to_ascii_lowercase).collect();
        if !labels.iter().all(|label| name::is_service_label(label.as_bytes())) {
            return Err(invalid("each label must be 1 to 63 letters, digits and inner '-'"));
        }
        if labels.last().is_some_and(|label| label.as_bytes() == ZONE_LABEL) {
            return Err(invalid("`ferry.` and the names under it are always Ferry's own zone"));
        }
        let domain = Name::from_labels(labels.iter().map(String::as_bytes)).map_err(|_| invalid("the name is too long"))?;
        // The longest names the server writes under the domain: its SOA's mailbox and the SRV
        // target of an IPv6 instance.
        let fits = name::addr_name(std::net::Ipv6Addr::UNSPECIFIED.into(), &domain).is_some()
            && domain.prepend_label("hostmaster").is_ok();
        if !fits {
            return Err(invalid("the name leaves no room for the names under it (HEX.addr.DOMAIN)"));
        }
        Ok(Self(domain))
    }
}

impl fmt::Display for AliasDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alias(value: &str) -> String {
        AliasDomain::from_str(value).map(|domain| domain.to_string()).unwrap_or_else(|error| panic!("{error}"))
    }

    #[test]
    fn domains_are_lowercase_and_fully_qualified() {
        assert_eq!(alias("consul"), "consul.");
        assert_eq!(alias("Consul."), "consul.");
        assert_eq!(alias("dc1.CONSUL"), "dc1.consul.");
        assert_eq!(AliasDomain::consul().to_string(), "consul.");
        assert_eq!(AliasDomain::defaults(), [AliasDomain::consul()]);
    }

    #[test]
    fn none_and_empty_values_stand_for_no_alias() {
        assert_eq!(AliasDomain::parse_flag("none"), Ok(None));
        assert_eq!(AliasDomain::parse_flag("NONE"), Ok(None));
        assert_eq!(AliasDomain::parse_flag(""), Ok(None));
        assert_eq!(AliasDomain::parse_flag(" consul "), Ok(Some(AliasDomain::consul())));
    }

    #[test]
    fn the_root_ferry_and_bad_labels_are_refused() {
        for value in [".", "ferry", "Ferry.", "x.ferry", "con_sul", "-consul", "a..b", "con sul", "consul..", "*.consul"] {
            assert!(AliasDomain::from_str(value).is_err(), "{value}");
        }
        // 234 bytes: a valid name, but an IPv6 SRV target under it would pass 255.
        let long = [&"a".repeat(63)[..], &"a".repeat(63), &"a".repeat(63), &"a".repeat(40)].join(".");
        let error = AliasDomain::from_str(&long).expect_err("too long").to_string();
        assert!(error.contains("no room"), "{error}");
        assert!(AliasDomain::from_str(&vec!["a".repeat(63); 3].join(".")).is_ok());
        let error = AliasDomain::from_str("ferry").expect_err("refused").to_string();
        assert!(error.contains("\"ferry\"") && error.contains("always Ferry's own zone"), "{error}");
    }
}
