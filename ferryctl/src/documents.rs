//! The resources of `ferryctl apply -f`: multi-document YAML (JSON is YAML too), where a
//! document that is a list of resources, such as what `ferryctl get -o json` prints, counts as
//! those resources, in order. Each resource is named by where it stands (`documents[1]`, or
//! `documents[0][2]` inside a list), in the errors of this side and of the server.

use ferry_proto::{json, v1, validate, validate::FieldError};
use serde::Deserialize;
use serde_json::Value;

/// The resources of `text`, each with where it stands, checked with the server's rules.
pub fn resources(text: &str) -> Result<Vec<(String, v1::Resource)>, FieldError> {
    json::refuse_costly_yaml(text)?;
    let mut resources = Vec::new();
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let at = format!("documents[{i}]");
        let value = Value::deserialize(document).map_err(|e| FieldError::new(&at, format!("not valid YAML: {e}")))?;
        match value {
            Value::Null => {}
            Value::Array(items) => {
                for (j, item) in items.into_iter().enumerate() {
                    let at = format!("{at}[{j}]");
                    resources.push((at.clone(), resource(&at, item)?));
                }
            }
            value => resources.push((at.clone(), resource(&at, value)?)),
        }
    }
    Ok(resources)
}

fn resource(at: &str, value: Value) -> Result<v1::Resource, FieldError> {
    let resource = json::resource_from_value(value).map_err(|e| e.within(at))?;
    validate::resource(&resource).map_err(|e| e.within(at))?;
    Ok(resource)
}

/// The server's `items[N].resource.FIELD: ...` as the user wrote it: `documents[...].FIELD`,
/// where `places[N]` is where item N stands. Any other text is left as it is.
pub fn name_place(text: &str, places: &[String]) -> String {
    let Some(rest) = text.strip_prefix("items[") else { return text.to_owned() };
    let Some((index, rest)) = rest.split_once(']') else { return text.to_owned() };
    let Some(place) = index.parse::<usize>().ok().and_then(|i| places.get(i)) else { return text.to_owned() };
    let rest = rest.strip_prefix(".resource").unwrap_or(rest);
    format!("{place}{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = r#"{"kind": "Route", "service": "catalog", "rules": [{"backends": [{"service": "catalog"}]}]}"#;

    #[test]
    fn a_list_of_resources_counts_as_those_resources_in_order() {
        let policy = r#"{"kind": "AuthorizationPolicy", "service": "catalog", "default": "deny", "rules": []}"#;
        let text = format!("[{ROUTE}, {policy}]\n---\n{ROUTE}\n");
        let places: Vec<String> = resources(&text).expect("valid").into_iter().map(|(at, _)| at).collect();
        assert_eq!(places, ["documents[0][0]", "documents[0][1]", "documents[1]"]);
        assert_eq!(resources("[]\n").expect("valid").len(), 0);
    }

    #[test]
    fn errors_name_the_place_inside_the_list() {
        let bad =
            r#"{"kind": "Route", "service": "catalog", "rules": [{"backends": [{"service": "catalog", "weight": 20000}]}]}"#;
        let error = resources(&format!("[{ROUTE}, {bad}]")).expect_err("weight too high").to_string();
        assert!(error.starts_with("documents[0][1].rules[0].backends[0].weight: "), "{error}");
        let error = resources(&format!("[{ROUTE}, 7]")).expect_err("not a resource").to_string();
        assert!(error.starts_with("documents[0][1]"), "{error}");
        let places = vec!["documents[0][0]".to_owned(), "documents[0][1]".to_owned()];
        assert_eq!(name_place("items[1].resource.rules[0]: no", &places), "documents[0][1].rules[0]: no");
        assert_eq!(name_place("something else", &places), "something else");
    }
}
