//! Consul tags in Ferry metadata.
//!
//! A service's tags are kept in the metadata label [`TAGS_KEY`] as a JSON list
//! (`["primary","version=v2"]`), in order, so they read back exactly as registered; labels are
//! at most 256 characters, which bounds the tags of one instance. A tag of the form `KEY=VALUE`
//! whose key is a valid label key also becomes the label `KEY: VALUE`, so routes and policies
//! can select on it (`version=v2` → `version: v2`). An instance registered through Ferry's own
//! API has no tag list: it shows its labels as `KEY=VALUE` tags.

use std::collections::BTreeMap;

use ferry_proto::validate::{self, FieldError};

/// The metadata label that holds an instance's Consul tags.
pub const TAGS_KEY: &str = "consul.tags";
/// The longest a label value may be, and so the tag list.
const MAX_LABEL_VALUE: usize = 256;

/// The tag list as the label [`TAGS_KEY`] keeps it.
pub fn encode_tags(tags: &[String]) -> Result<String, FieldError> {
    let encoded = serde_json::to_string(tags).map_err(|e| FieldError::new("Tags", e.to_string()))?;
    if encoded.len() > MAX_LABEL_VALUE {
        return Err(FieldError::new(
            "Tags",
            format!(
                "take {} characters as the JSON list Ferry keeps in the label {TAGS_KEY}; at most {MAX_LABEL_VALUE} fit",
                encoded.len()
            ),
        ));
    }
    Ok(encoded)
}

/// The labels that `KEY=VALUE` tags stand for; other tags stand for none.
pub fn tag_labels(tags: &[String]) -> impl Iterator<Item = (String, String)> + '_ {
    tags.iter().filter_map(|tag| {
        let (key, value) = tag.split_once('=')?;
        let label = BTreeMap::from([(key.to_owned(), value.to_owned())]);
        (key != TAGS_KEY && validate::metadata("tag", &label).is_ok()).then(|| (key.to_owned(), value.to_owned()))
    })
}

/// An instance's tags: the list it was registered with, or its labels as `KEY=VALUE`.
pub fn tags(metadata: &BTreeMap<String, String>) -> Vec<String> {
    match metadata.get(TAGS_KEY).and_then(|list| serde_json::from_str::<Vec<String>>(list).ok()) {
        Some(tags) => tags,
        None => metadata.iter().filter(|(k, _)| *k != TAGS_KEY).map(|(k, v)| format!("{k}={v}")).collect(),
    }
}

/// An instance's Consul `Meta`: its labels, but the tag list.
pub fn meta(metadata: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    metadata.iter().filter(|(k, _)| *k != TAGS_KEY).map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn tags_round_trip_through_the_label_in_order() {
        let registered = strings(&["primary", "version=v2", "a,b"]);
        let metadata = BTreeMap::from([
            (TAGS_KEY.to_owned(), encode_tags(&registered).expect("valid in this test")),
            ("version".into(), "v2".into()),
        ]);
        assert_eq!(tags(&metadata), registered);
        assert_eq!(meta(&metadata), BTreeMap::from([("version".to_owned(), "v2".to_owned())]));
    }

    #[test]
    fn key_value_tags_become_labels_when_the_key_is_a_valid_label_key() {
        let labels: Vec<_> =
            tag_labels(&strings(&["version=v2", "plain", "bad key=x", "=x", "consul.tags=x", "zone=eu=1"])).collect();
        assert_eq!(labels, [("version".to_owned(), "v2".to_owned()), ("zone".to_owned(), "eu=1".to_owned())]);
    }

    #[test]
    fn an_instance_without_a_tag_list_shows_its_labels_as_tags() {
        let metadata = BTreeMap::from([("version".to_owned(), "v1".to_owned()), ("zone".to_owned(), "a".to_owned())]);
        assert_eq!(tags(&metadata), strings(&["version=v1", "zone=a"]));
    }

    #[test]
    fn a_tag_list_too_long_for_a_label_is_refused_by_name() {
        let many: Vec<String> = (0..40).map(|i| format!("tag-number-{i}")).collect();
        let error = encode_tags(&many).expect_err("refused");
        assert_eq!(error.field, "Tags");
        assert!(error.reason.contains("at most 256"), "{error}");
    }
}
