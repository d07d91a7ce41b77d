//! Short forms of versions and indexes, for people.
//!
//! Every version and index the control plane hands out comes from one counter that starts from
//! the clock in microseconds (`1796655541938275`), so that none repeats across restarts. Their
//! leading digits stay the same for weeks and tell a reader nothing; their last digits are what
//! tells two of them apart. Tables show the last six digits, marked as cut (`…938275`), or more
//! when two values shown together share them; JSON and YAML keep the whole number. Commands that
//! take a version take either form ([`VersionRef`]).

use std::{collections::BTreeSet, fmt};

/// The fewest digits a short form keeps.
pub const MIN_DIGITS: usize = 6;

/// What marks a number as cut to its last digits.
pub const MARK: char = '…';

/// How to show a set of versions shown together (one table, one screen): each cut to the same
/// number of last digits, the fewest (at least [`MIN_DIGITS`]) that keep them all apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    digits: usize,
}

impl Versions {
    /// The short forms for `values`, shown together.
    pub fn new(values: impl IntoIterator<Item = u64>) -> Self {
        let values: BTreeSet<u64> = values.into_iter().collect();
        let mut digits = MIN_DIGITS;
        // u64::MAX has 20 digits: at 20 every value is whole, and so distinct.
        while digits < 20 {
            let modulus = 10u64.pow(u32::try_from(digits).unwrap_or(19));
            let tails: BTreeSet<u64> = values.iter().map(|v| v % modulus).collect();
            if tails.len() == values.len() {
                break;
            }
            digits += 1;
        }
        Self { digits }
    }

    /// `value` as a table shows it: whole when it is short, else its last digits after [`MARK`].
    pub fn show(&self, value: u64) -> String {
        let whole = value.to_string();
        if whole.len() <= self.digits { whole } else { format!("{MARK}{}", &whole[whole.len() - self.digits..]) }
    }
}

/// One version on its own, shown short.
pub fn version(value: u64) -> String {
    Versions::new([value]).show(value)
}

/// A version as a person writes it: whole (`1796655541938275`), or its last digits as a table
/// shows them (`…938275`, or `...938275`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionRef {
    Whole(u64),
    Tail(String),
}

impl VersionRef {
    /// Reads a version written whole or as a table's short form.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (tail, digits) = match text.strip_prefix(MARK).or_else(|| text.strip_prefix("...")) {
            Some(digits) => (true, digits),
            None => (false, text),
        };
        if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{text:?} is not a version: write it whole (1796655541938275) or as tables show it (…938275)"));
        }
        if tail {
            return Ok(Self::Tail(digits.to_owned()));
        }
        digits.parse().map(Self::Whole).map_err(|_| format!("{text:?} is larger than any version"))
    }

    /// Whether `version` is the one meant, or ends with the digits given.
    pub fn matches(&self, version: u64) -> bool {
        match self {
            Self::Whole(whole) => *whole == version,
            Self::Tail(digits) => version.to_string().ends_with(digits.as_str()),
        }
    }

    /// The one of `candidates` meant: the one equal to a whole version, else the only one that
    /// ends with the digits given (a whole number typed from a table's short form counts too).
    pub fn pick(&self, candidates: impl IntoIterator<Item = u64>) -> Result<u64, Unmatched> {
        let candidates: Vec<u64> = candidates.into_iter().collect();
        if let Self::Whole(whole) = self
            && candidates.contains(whole)
        {
            return Ok(*whole);
        }
        let digits = match self {
            Self::Whole(whole) => whole.to_string(),
            Self::Tail(digits) => digits.clone(),
        };
        let matching: BTreeSet<u64> = candidates.iter().copied().filter(|v| v.to_string().ends_with(&digits)).collect();
        match matching.len() {
            1 => Ok(matching.into_iter().next().unwrap_or_default()),
            0 => Err(Unmatched::None),
            _ => Err(Unmatched::Several(matching.into_iter().collect())),
        }
    }
}

impl fmt::Display for VersionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Whole(whole) => write!(f, "{whole}"),
            Self::Tail(digits) => write!(f, "{MARK}{digits}"),
        }
    }
}

/// Why [`VersionRef::pick`] found no single version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmatched {
    None,
    /// These all end with the digits given: more are needed.
    Several(Vec<u64>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_show_the_last_six_digits_of_long_versions_and_small_ones_whole() {
        let versions = Versions::new([1_796_655_541_938_275, 1_796_655_541_938_270, 7]);
        assert_eq!(versions.show(1_796_655_541_938_275), "…938275");
        assert_eq!(versions.show(7), "7");
        assert_eq!(versions.show(123_456), "123456");
        assert_eq!(version(1_796_655_541_000_042), "…000042", "leading zeros of the tail are kept");
    }

    #[test]
    fn values_shown_together_keep_as_many_digits_as_tell_them_apart() {
        let a = 1_796_655_541_938_275;
        let b = 1_796_655_542_938_275;
        let versions = Versions::new([a, b, a]);
        assert_eq!((versions.show(a), versions.show(b)), ("…1938275".to_owned(), "…2938275".to_owned()));
        let whole = Versions::new([u64::MAX, u64::MAX - 10u64.pow(19)]);
        assert_eq!(whole.show(u64::MAX), u64::MAX.to_string());
    }

    #[test]
    fn versions_are_read_whole_or_short() {
        assert_eq!(VersionRef::parse("1796655541938275"), Ok(VersionRef::Whole(1_796_655_541_938_275)));
        assert_eq!(VersionRef::parse("…938275"), Ok(VersionRef::Tail("938275".into())));
        assert_eq!(VersionRef::parse("...938275"), Ok(VersionRef::Tail("938275".into())));
        for bad in ["", "…", "v12", "12a", "-3", "99999999999999999999999"] {
            assert!(VersionRef::parse(bad).is_err(), "{bad:?}");
        }
        assert!(VersionRef::Tail("938275".into()).matches(1_796_655_541_938_275));
        assert!(!VersionRef::Whole(938_275).matches(1_796_655_541_938_275));
    }

    #[test]
    fn pick_prefers_a_whole_match_then_a_single_tail() {
        let kept = [1_796_655_541_938_275, 1_796_655_541_938_270, 1_796_655_540_938_270];
        assert_eq!(VersionRef::parse("…938275").and_then(|r| r.pick(kept).map_err(|e| format!("{e:?}"))), Ok(kept[0]));
        assert_eq!(VersionRef::Whole(938_275).pick(kept), Ok(kept[0]), "typed from a table without the mark");
        assert_eq!(VersionRef::Whole(kept[1]).pick(kept), Ok(kept[1]));
        assert_eq!(VersionRef::Tail("938270".into()).pick(kept), Err(Unmatched::Several(vec![kept[2], kept[1]])));
        assert_eq!(VersionRef::Tail("111".into()).pick(kept), Err(Unmatched::None));
    }
}
