//! Authorization policies, compiled and evaluated: who may call a service.
//!
//! A policy is enforced by the destination's inbound sidecars on the caller's verified mesh
//! identity, never on a header. The rules are read in one pass: a matching `deny` wins over any
//! matching `allow`; when no rule matches, the policy's default decides. Without a policy every
//! caller is allowed. The same evaluation answers `ferryctl explain --from` and the control
//! plane's apply notes, so what they say is what the sidecars do.

use std::fmt;

use crate::{
    matching::{Matcher, RequestInfo},
    v1,
};

/// Matches any authenticated mesh identity in a rule's `from`.
pub const ANY_CALLER: &str = "*";

/// What a rule or a default does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    /// The action a policy's field names; empty is `empty`.
    pub fn parse(text: &str, empty: Action) -> Option<Action> {
        match text {
            "" => Some(empty),
            "allow" => Some(Action::Allow),
            "deny" => Some(Action::Deny),
            _ => None,
        }
    }

    /// `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// What is being authorized: an HTTP request (gRPC included), or an opaque TCP connection,
/// about which nothing is known but the caller.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    Http(RequestInfo<'a>),
    Tcp,
}

/// Who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    /// A mesh identity verified by mTLS: the service it was issued for.
    Service(&'a str),
    /// No verified identity: a plaintext connection accepted by a permissive listener.
    Unauthenticated,
}

impl fmt::Display for Caller<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Service(service) => f.write_str(service),
            Caller::Unauthenticated => f.write_str("an unauthenticated caller"),
        }
    }
}

/// A compiled policy.
#[derive(Debug)]
pub struct Authorization {
    pub service: String,
    pub version: u64,
    pub default: Action,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    label: String,
    /// `None` matches any authenticated caller ("*").
    from: Option<Vec<String>>,
    matcher: Matcher,
    action: Action,
}

/// The outcome of an evaluation, with what made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The rule that decided (`rules[1] (frontend-reads)`), or `None` for the default.
    pub rule: Option<String>,
    /// The policy's version; 0 without a policy.
    pub version: u64,
}

impl Decision {
    /// The decision when the service has no policy: every caller is allowed.
    pub fn no_policy() -> Self {
        Self { action: Action::Allow, rule: None, version: 0 }
    }

    /// Whether the request may go on.
    pub fn allowed(&self) -> bool {
        self.action == Action::Allow
    }

    /// What decided, in words: `rules[0] (reads)` or `the default (deny)`.
    pub fn because(&self) -> String {
        match &self.rule {
            Some(rule) => rule.clone(),
            None if self.version == 0 => "no authorization policy (every caller is allowed)".to_owned(),
            None => format!("the default ({})", self.action.as_str()),
        }
    }
}

impl Rule {
    fn names(&self, caller: Caller<'_>) -> bool {
        match (caller, &self.from) {
            (Caller::Unauthenticated, _) => false,
            (Caller::Service(_), None) => true,
            (Caller::Service(service), Some(from)) => from.iter().any(|f| f == service),
        }
    }

    fn matches(&self, caller: Caller<'_>, request: &Request<'_>) -> bool {
        self.names(caller)
            && match request {
                Request::Http(info) => self.matcher.matches(info),
                Request::Tcp => self.matcher.is_empty(),
            }
    }
}

impl Authorization {
    /// Compiles a policy (already validated) applied at `version`.
    pub fn compile(policy: &v1::AuthorizationPolicy, version: u64) -> Result<Self, String> {
        let default = Action::parse(&policy.default, Action::Deny).ok_or_else(|| format!("default: {:?}", policy.default))?;
        let mut rules = Vec::with_capacity(policy.rules.len());
        for (i, rule) in policy.rules.iter().enumerate() {
            let action =
                Action::parse(&rule.action, Action::Allow).ok_or_else(|| format!("rules[{i}].action: {:?}", rule.action))?;
            let from = if rule.from.iter().any(|f| f == ANY_CALLER) { None } else { Some(rule.from.clone()) };
            let label = if rule.name.is_empty() { format!("rules[{i}]") } else { format!("rules[{i}] ({})", rule.name) };
            let matcher = Matcher::compile(rule.r#match.as_ref()).map_err(|e| format!("rules[{i}].match: {e}"))?;
            rules.push(Rule { label, from, matcher, action });
        }
        Ok(Self { service: policy.service.clone(), version, default, rules })
    }

    /// Decides whether `caller` may make `request`.
    pub fn evaluate(&self, caller: Caller<'_>, request: &Request<'_>) -> Decision {
        let decided = |rule: &Rule| Decision { action: rule.action, rule: Some(rule.label.clone()), version: self.version };
        if let Some(deny) = self.rules.iter().find(|r| r.action == Action::Deny && r.matches(caller, request)) {
            return decided(deny);
        }
        if let Some(allow) = self.rules.iter().find(|r| r.action == Action::Allow && r.matches(caller, request)) {
            return decided(allow);
        }
        Decision { action: self.default, rule: None, version: self.version }
    }

    /// Whether some request of `caller` could be allowed: false when no allow rule names it (and
    /// the default denies), or a deny rule refuses every request it makes.
    pub fn could_allow(&self, caller: &str) -> bool {
        let caller = Caller::Service(caller);
        let refused_outright = self.rules.iter().any(|r| r.action == Action::Deny && r.matcher.is_empty() && r.names(caller));
        let allowed_somewhere =
            self.default == Action::Allow || self.rules.iter().any(|r| r.action == Action::Allow && r.names(caller));
        allowed_somewhere && !refused_outright
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, Method};

    use super::*;
    use crate::json;

    fn policy(yaml: &str) -> Authorization {
        let resource = json::resources_from_yaml(yaml).expect("valid").remove(0);
        let Some(v1::resource::Kind::Authorization(policy)) = resource.kind else { panic!("an authorization policy") };
        Authorization::compile(&policy, 3).expect("compiles")
    }

    fn decide(policy: &Authorization, caller: Caller<'_>, method: &Method, path: &str) -> Decision {
        let headers = HeaderMap::new();
        let info = RequestInfo { method, path, query: None, headers: &headers, host: None };
        policy.evaluate(caller, &Request::Http(info))
    }

    #[test]
    fn deny_wins_then_allow_then_the_default() {
        let policy = policy(
            r#"
kind: AuthorizationPolicy
service: catalog
default: deny
rules:
  - name: reads
    from: [frontend]
    match: { method: GET, path_prefix: /items }
  - name: no-admin
    from: ["*"]
    match: { path_prefix: /items/admin }
    action: deny
  - from: [ops]
"#,
        );
        let get = Method::GET;
        let allowed = decide(&policy, Caller::Service("frontend"), &get, "/items/1");
        assert!(allowed.allowed());
        assert_eq!(allowed.because(), "rules[0] (reads)");
        let denied = decide(&policy, Caller::Service("frontend"), &get, "/items/admin/x");
        assert!(!denied.allowed(), "a matching deny wins over the matching allow");
        assert_eq!(denied.because(), "rules[1] (no-admin)");
        let default = decide(&policy, Caller::Service("frontend"), &Method::POST, "/items/1");
        assert!(!default.allowed());
        assert_eq!(default.because(), "the default (deny)");
        assert!(decide(&policy, Caller::Service("ops"), &Method::DELETE, "/x").allowed());
        assert!(!decide(&policy, Caller::Unauthenticated, &get, "/items/1").allowed(), "* needs an identity");
        assert_eq!(default.version, 3);
    }

    #[test]
    fn tcp_connections_meet_only_rules_without_a_match() {
        let policy = policy(
            "kind: AuthorizationPolicy\nservice: db\nrules:\n  - from: [api]\n  - from: [\"*\"]\n    match: { method: GET }\n",
        );
        assert!(policy.evaluate(Caller::Service("api"), &Request::Tcp).allowed());
        assert!(!policy.evaluate(Caller::Service("web"), &Request::Tcp).allowed(), "the HTTP rule cannot match TCP");
        assert_eq!(policy.default, Action::Deny, "an unset default denies");
    }

    #[test]
    fn tells_which_callers_could_never_be_allowed() {
        let policy = policy(
            "kind: AuthorizationPolicy\nservice: catalog\nrules:\n  - from: [frontend]\n    match: { method: GET }\n  - from: [batch]\n    action: deny\n",
        );
        assert!(policy.could_allow("frontend"));
        assert!(!policy.could_allow("client"), "named by no allow rule");
        assert!(!policy.could_allow("batch"));
        let open = self::policy(
            "kind: AuthorizationPolicy\nservice: catalog\ndefault: allow\nrules:\n  - from: [batch]\n    action: deny\n",
        );
        assert!(open.could_allow("client") && !open.could_allow("batch"));
    }
}
