//! "Did you mean": the existing name closest to a mistyped one.

/// The name of `names` closest to `wanted` (by Damerau-Levenshtein distance), when one is close
/// enough to be a typo of it: at most a third of its length apart, and at least 2.
pub fn closest<'a>(wanted: &str, names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (wanted.chars().count() / 3).max(2);
    names
        .into_iter()
        .filter(|name| *name != wanted)
        .map(|name| (strsim::damerau_levenshtein(wanted, name), name))
        .filter(|(distance, _)| *distance <= limit)
        .min()
        .map(|(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_name_and_strangers_find_none() {
        let names = ["catalog", "inventory", "frontend"];
        assert_eq!(closest("catalgo", names), Some("catalog"));
        assert_eq!(closest("invetnory", names), Some("inventory"));
        assert_eq!(closest("frontend", names), None, "the name itself is no suggestion");
        assert_eq!(closest("zzzzzzzz", names), None);
        assert_eq!(closest("", names), None);
    }
}
