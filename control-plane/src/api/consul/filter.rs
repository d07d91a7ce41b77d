//! The `?filter=` expressions Ferry understands: a subset of Consul's filtering language,
//! equality and membership on one service instance's fields, joined by `and`.
//!
//! ```text
//! ServiceMeta.version == "v2" and "primary" in ServiceTags
//! Service.Meta.team != "ops"          (the health endpoints' spelling)
//! Meta.version == v2                  (the agent endpoints' spelling; bare words are values too)
//! ServiceTags contains "primary"      ServiceTags is empty      ServiceTags is not empty
//! ```
//!
//! Anything else (`or`, `not`, parentheses, `matches`) is refused with the list of what is
//! supported, rather than read wrongly.

use std::collections::BTreeMap;

/// What the filter language supports, for refusals.
pub const SUPPORTED: &str = "Ferry supports SELECTOR == \"VALUE\", SELECTOR != \"VALUE\", \"VALUE\" in SELECTOR, \
     \"VALUE\" not in SELECTOR, SELECTOR contains \"VALUE\", SELECTOR is empty, SELECTOR is not empty, joined by `and`; \
     selectors: ServiceName, ServiceID, ServiceAddress, ServicePort, ServiceTags, ServiceMeta.KEY, Node, Address, \
     Datacenter, NodeMeta.KEY (also spelled Service.Service, Service.ID, Service.Tags, Service.Meta.KEY, Node.Node, \
     and Service, ID, Tags, Meta.KEY)";

/// A parsed filter: every clause must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    clauses: Vec<Clause>,
}

/// A field of an instance a filter can name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Name,
    Id,
    Address,
    Port,
    Tags,
    Meta(String),
    Node,
    NodeAddress,
    Datacenter,
    NodeMeta(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Clause {
    Equals(Field, String, bool),
    In(String, Field, bool),
    Empty(Field, bool),
}

/// The values of one instance that a filter reads.
pub struct Subject<'a> {
    pub name: &'a str,
    pub id: &'a str,
    pub address: &'a str,
    pub port: u16,
    pub tags: &'a [String],
    pub meta: &'a BTreeMap<String, String>,
    pub node: &'a str,
    pub node_address: &'a str,
    pub datacenter: &'a str,
    pub node_meta: &'a BTreeMap<String, String>,
}

/// A value a field holds.
enum Value<'a> {
    One(Option<String>),
    Many(&'a [String]),
}

impl Filter {
    /// Parses a filter expression; the error says what is supported.
    pub fn parse(expression: &str) -> Result<Self, String> {
        let tokens = tokenize(expression)?;
        let mut clauses = Vec::new();
        for clause in tokens.split(|t| *t == Token::Word("and".into())) {
            clauses.push(parse_clause(clause).map_err(|why| format!("filter: {why}. {SUPPORTED}"))?);
        }
        Ok(Self { clauses })
    }

    /// Whether `subject` passes every clause.
    pub fn accepts(&self, subject: &Subject<'_>) -> bool {
        self.clauses.iter().all(|clause| match clause {
            Clause::Equals(field, value, equal) => match subject.value(field) {
                Value::One(one) => (one.as_deref() == Some(value.as_str())) == *equal,
                Value::Many(_) => !*equal,
            },
            Clause::In(value, field, inside) => {
                let found = match subject.value(field) {
                    Value::Many(items) => items.iter().any(|item| item == value),
                    Value::One(one) => one.is_some_and(|one| one.contains(value.as_str())),
                };
                found == *inside
            }
            Clause::Empty(field, empty) => {
                let is_empty = match subject.value(field) {
                    Value::Many(items) => items.is_empty(),
                    Value::One(one) => one.is_none_or(|one| one.is_empty()),
                };
                is_empty == *empty
            }
        })
    }
}

impl Subject<'_> {
    fn value(&self, field: &Field) -> Value<'_> {
        let one = |s: &str| Value::One(Some(s.to_owned()));
        match field {
            Field::Name => one(self.name),
            Field::Id => one(self.id),
            Field::Address => one(self.address),
            Field::Port => Value::One(Some(self.port.to_string())),
            Field::Tags => Value::Many(self.tags),
            Field::Meta(key) => Value::One(self.meta.get(key).cloned()),
            Field::Node => one(self.node),
            Field::NodeAddress => one(self.node_address),
            Field::Datacenter => one(self.datacenter),
            Field::NodeMeta(key) => Value::One(self.node_meta.get(key).cloned()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// A selector, an operator word or a bare value.
    Word(String),
    /// A quoted value.
    Quoted(String),
    Op(&'static str),
}

fn tokenize(expression: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = expression.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '"' | '`' => {
                chars.next();
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some(end) if end == c => break,
                        Some('\\') if c == '"' => value.extend(chars.next()),
                        Some(ch) => value.push(ch),
                        None => return Err(format!("filter: an unterminated {c}quoted{c} value. {SUPPORTED}")),
                    }
                }
                tokens.push(Token::Quoted(value));
            }
            '=' | '!' => {
                chars.next();
                if chars.next() != Some('=') {
                    return Err(format!("filter: only == and != compare. {SUPPORTED}"));
                }
                tokens.push(Token::Op(if c == '=' { "==" } else { "!=" }));
            }
            '(' | ')' | '|' | '&' | '<' | '>' => {
                return Err(format!("filter: {c:?} is not supported. {SUPPORTED}"));
            }
            _ => {
                let mut word = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_whitespace() || matches!(ch, '"' | '`' | '=' | '!' | '(' | ')') {
                        break;
                    }
                    word.push(ch);
                    chars.next();
                }
                tokens.push(Token::Word(word));
            }
        }
    }
    if tokens.is_empty() {
        return Err(format!("filter: empty. {SUPPORTED}"));
    }
    Ok(tokens)
}

fn parse_clause(tokens: &[Token]) -> Result<Clause, String> {
    use Token::{Op, Quoted, Word};
    let word = |t: &Token, w: &str| matches!(t, Word(x) if x == w);
    match tokens {
        [selector, Op(op), value] => Ok(Clause::Equals(field(selector)?, value_of(value)?, *op == "==")),
        [value, w, selector] if word(w, "in") => Ok(Clause::In(value_of(value)?, field(selector)?, true)),
        [value, n, w, selector] if word(n, "not") && word(w, "in") => Ok(Clause::In(value_of(value)?, field(selector)?, false)),
        [selector, w, value] if word(w, "contains") => Ok(Clause::In(value_of(value)?, field(selector)?, true)),
        [selector, n, w, value] if word(n, "not") && word(w, "contains") => {
            Ok(Clause::In(value_of(value)?, field(selector)?, false))
        }
        [selector, w, e] if word(w, "is") && word(e, "empty") => Ok(Clause::Empty(field(selector)?, true)),
        [selector, w, n, e] if word(w, "is") && word(n, "not") && word(e, "empty") => Ok(Clause::Empty(field(selector)?, false)),
        _ => {
            let text: Vec<String> = tokens
                .iter()
                .map(|t| match t {
                    Word(w) => w.clone(),
                    Quoted(q) => format!("{q:?}"),
                    Op(op) => (*op).to_owned(),
                })
                .collect();
            Err(format!("cannot read {:?}", text.join(" ")))
        }
    }
}

fn value_of(token: &Token) -> Result<String, String> {
    match token {
        Token::Quoted(value) | Token::Word(value) => Ok(value.clone()),
        Token::Op(op) => Err(format!("{op} where a value belongs")),
    }
}

fn field(token: &Token) -> Result<Field, String> {
    let Token::Word(selector) = token else { return Err(format!("{token:?} where a selector belongs")) };
    let meta = |prefix: &str| selector.strip_prefix(prefix).filter(|k| !k.is_empty()).map(str::to_owned);
    if let Some(key) = meta("ServiceMeta.").or_else(|| meta("Service.Meta.")).or_else(|| meta("Meta.")) {
        return Ok(Field::Meta(key));
    }
    if let Some(key) = meta("NodeMeta.").or_else(|| meta("Node.Meta.")) {
        return Ok(Field::NodeMeta(key));
    }
    Ok(match selector.as_str() {
        "ServiceName" | "Service.Service" | "Service" => Field::Name,
        "ServiceID" | "Service.ID" | "ID" => Field::Id,
        "ServiceAddress" | "Service.Address" | "Address" => Field::Address,
        "ServicePort" | "Service.Port" | "Port" => Field::Port,
        "ServiceTags" | "Service.Tags" | "Tags" => Field::Tags,
        "Node" | "Node.Node" => Field::Node,
        "Node.Address" => Field::NodeAddress,
        "Datacenter" | "Node.Datacenter" => Field::Datacenter,
        other => return Err(format!("unknown selector {other:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject<'a>(tags: &'a [String], meta: &'a BTreeMap<String, String>, empty: &'a BTreeMap<String, String>) -> Subject<'a> {
        Subject {
            name: "web",
            id: "web-1",
            address: "10.0.0.5",
            port: 8080,
            tags,
            meta,
            node: "ferry",
            node_address: "127.0.0.1",
            datacenter: "dc1",
            node_meta: empty,
        }
    }

    fn passes(expression: &str) -> bool {
        let tags = vec!["primary".to_owned(), "version=v2".to_owned()];
        let meta = BTreeMap::from([("version".to_owned(), "v2".to_owned())]);
        let empty = BTreeMap::new();
        Filter::parse(expression).expect("valid in this test").accepts(&subject(&tags, &meta, &empty))
    }

    #[test]
    fn equality_and_membership_on_service_fields_meta_and_tags() {
        assert!(passes(r#"ServiceMeta.version == "v2""#));
        assert!(!passes(r#"ServiceMeta.version == "v1""#));
        assert!(passes(r#"ServiceMeta.version != "v1""#));
        assert!(passes(r#"ServiceMeta.missing != "v1""#));
        assert!(!passes(r#""v2" in ServiceTags"#), "tags match whole");
        assert!(passes(r#""version=v2" in ServiceTags"#));
        assert!(passes(r#""canary" not in ServiceTags"#));
        assert!(passes(r#"Service.Tags contains "primary""#));
        assert!(passes(r#"Meta.version == v2 and ServicePort == 8080 and ServiceName == `web`"#));
        assert!(!passes(r#"ServiceMeta.version == "v2" and Node != "ferry""#));
        assert!(passes("ServiceTags is not empty and NodeMeta.rack is empty"));
        assert!(passes(r#"Service.Meta.version == "v2" and Node.Datacenter == "dc1""#));
    }

    #[test]
    fn unsupported_syntax_is_refused_with_what_is_supported() {
        for bad in [
            r#"ServiceMeta.version == "v2" or ServiceName == "x""#,
            r#"(ServiceName == "web")"#,
            r#"ServiceName matches "w.*""#,
            r#"not ServiceName == "web""#,
            r#"Bogus == "x""#,
            r#"ServiceName = "web""#,
            r#"ServiceName == "web"#,
            "",
        ] {
            let error = Filter::parse(bad).expect_err(bad);
            assert!(error.starts_with("filter: ") && error.contains("Ferry supports"), "{bad}: {error}");
        }
    }
}
