//! The admin API's JSON: the data types of the data path, rendered at the edge.

use humantime::format_duration;
use serde_json::{Map, Value, json};

use crate::outbound::{
    balance::BalancerState,
    route::BackendRef,
    router::{
        Explanation,
        explain::{BreakerState, BudgetState},
    },
};

/// What each balancer of a destination holds, by backend.
pub fn balancers(balancers: &[(BackendRef, BalancerState)]) -> Value {
    let map: Map<String, Value> = balancers.iter().map(|(backend, state)| (backend.to_string(), balancer(state))).collect();
    Value::Object(map)
}

fn balancer(state: &BalancerState) -> Value {
    match state {
        BalancerState::Pending => json!({ "pending": true }),
        BalancerState::Known { algorithm, endpoints, panic_requests } => json!({
            "load_balancer": algorithm,
            "endpoints": endpoints.iter().map(|e| json!({
                "id": &*e.id,
                "zone": e.zone,
                "weight": e.weight,
                "in_flight": e.in_flight,
                "latency_ms": (e.latency.as_secs_f64() * 1e4).round() / 10.0,
                "ejected": e.ejected,
                "slow_start_share": e.slow_start_share,
            })).collect::<Vec<_>>(),
            "panic_requests": panic_requests,
        }),
    }
}

fn breaker(state: &BreakerState) -> Value {
    json!({
        "service": &*state.service,
        "max_concurrent": state.max_concurrent,
        "max_pending": state.max_pending,
        "in_flight": state.in_flight,
        "pending": state.pending,
    })
}

fn budget(state: &BudgetState) -> Value {
    json!({
        "ratio": state.settings.ratio,
        "min_per_second": state.settings.min_per_second,
        "window": format_duration(state.settings.window).to_string(),
        "requests_in_window": state.requests_in_window,
        "retries_in_window": state.retries_in_window,
    })
}

/// What the router would do with a request.
pub fn explanation(e: &Explanation) -> Value {
    let backends: Vec<Value> = e
        .backends
        .iter()
        .map(|b| {
            json!({
                "backend": b.backend.to_string(),
                "service": &*b.backend.service,
                "subset": b.backend.subset.as_deref(),
                "weight": b.weight,
                "share_percent": b.share_percent,
                "routable_endpoints": b.routable_endpoints,
                "circuit_breaker": b.circuit_breaker.as_ref().map(breaker),
            })
        })
        .collect();
    json!({
        "service": &*e.service,
        "route_version": e.route_version,
        "held_route": e.held_route,
        "rule": e.rule.as_ref().map(|(index, name, label)| json!({ "index": index, "name": name, "label": &**label })),
        "backends": backends,
        "timeout": e.timeout.map(|t| format_duration(t).to_string()),
        "retries": e.retries.as_ref().map(|r| json!({
            "attempts": r.retries.attempts,
            "per_try_timeout": r.retries.per_try_timeout.map(|t| format_duration(t).to_string()),
            "on": r.retries.describe(),
            "default": r.default,
        })),
        "retry_budget": budget(&e.retry_budget),
        "circuit_breaker": breaker(&e.circuit_breaker),
        "fault": e.fault.as_ref().map(|fault| json!({
            "delay": fault.delay.map(|(p, d)| json!({ "percent": p, "duration": format_duration(d).to_string() })),
            "abort": fault.abort.map(|(p, s)| json!({ "percent": p, "status": s })),
        })),
        "mirror": e.mirror.as_ref().map(|(b, p)| json!({ "backend": b.to_string(), "percent": p })),
        "rewrite_path_prefix": e.rewrite_path_prefix.as_ref().map(|(from, to)| json!({ "from": from, "to": to })),
        "no_rule_matches": e.no_rule_matches,
        "passed_over": e.passed_over.iter().map(|(rule, why)| json!({ "rule": rule.as_ref(), "why": why })).collect::<Vec<_>>(),
        "service_exists": e.service_exists,
        "gateway": e.gateway,
        "host": e.host,
    })
}
