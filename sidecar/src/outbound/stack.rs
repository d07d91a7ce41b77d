//! The outbound path, assembled: every layer a request meets between the app and an endpoint,
//! outermost first. Reading this file shows the whole path.
//!
//! ```text
//! Outbound (edge)     names the destination service (port, Host, or proxy URI); counts the request
//! └ deadline          --response-timeout, over everything below
//!   └ route           Router: waits for the first config; matches a rule; rewrites the request;
//!                     per rule (or the service's default with no rule):
//!     └ deadline      the rule's timeout, over all attempts
//!       └ fault       the rule's injected abort or delay
//!         └ rewrite   the rule's request headers and path prefix; its response headers
//!           └ mirror  a fire-and-forget copy to another backend
//!             └ retry tower::retry with the rule's retries, the budget, backoff, replayable body
//!               └ split     the backend of this attempt, by weight
//!                 └ breaker the backend service's concurrency limit and bounded queue
//!                   └ balance   P2C-EWMA (or the policy's picker), outlier ejection, locality
//!                     └ endpoint  the attempt's time limit, then the pooled client (mTLS to a
//!                                 peer sidecar)
//! ```
//!
//! Everything below `route` is always ready (limits are taken per request, balancers decide
//! per request, pools connect on demand), so the route calls a rule's stack as soon as the
//! request matches.

use std::{sync::Arc, time::Duration};

use tokio::sync::{Semaphore, watch};
use tower::ServiceBuilder;

use super::{
    balance::{Balance, BalanceConfig, Target},
    breaker::{Breaker, BreakerLayer},
    deadline::{Deadline, DeadlineLayer},
    endpoint::{EndpointService, PerTry, PerTryLayer},
    fault::{Fault, FaultLayer, Faults},
    mirror::{Mirror, MirrorLayer, MirrorTo},
    protection::Protection,
    retry::{Retry, RetryConfig, RetryLayer},
    rewrite::{RewriteLayer, RewriteService, Rewrites},
    router::Router,
    split::Split,
};
use crate::{catalog::ServiceState, http::client::ClientConfig};

/// One destination service's whole stack.
pub type DestinationStack = Deadline<Router>;
/// What one rule does with a request it matched.
pub type RuleStack = Deadline<Fault<RewriteService<Mirror<Retry<Split<Backend>>, Balance<Endpoint>>>>>;
/// One backend (a service, or a subset of it) of a rule.
pub type Backend = Breaker<Balance<Endpoint>>;
/// One endpoint of a balancer.
pub type Endpoint = PerTry<EndpointService>;

/// The stack of one destination service: the edge's deadline over its router.
pub fn destination(router: Router, response_timeout: Option<Duration>) -> DestinationStack {
    ServiceBuilder::new().layer(DeadlineLayer::new(response_timeout)).service(router)
}

/// How one rule (or a service's default, with no rule) treats the requests it gets.
pub struct RuleParams {
    pub timeout: Option<Duration>,
    pub faults: Faults,
    pub rewrites: Rewrites,
    pub mirror: Option<MirrorTo<Balance<Endpoint>>>,
    /// The copies in flight the mirror may add to: one bound per destination.
    pub mirrors: Arc<Semaphore>,
    pub retry: RetryConfig,
    /// Weighted, never empty.
    pub backends: Vec<(Backend, u32)>,
}

/// The stack of one rule, as the router builds it when a route comes into force.
pub fn rule(params: RuleParams) -> RuleStack {
    ServiceBuilder::new()
        .layer(DeadlineLayer::new(params.timeout))
        .layer(FaultLayer::new(params.faults))
        .layer(RewriteLayer::new(params.rewrites))
        .layer(MirrorLayer::new(params.mirror, params.mirrors))
        .layer(RetryLayer::new(params.retry))
        .service(Split::new(params.backends))
}

/// One backend: its balancer behind its service's circuit breaker.
pub fn backend(protection: &Protection, balance: Balance<Endpoint>) -> Backend {
    ServiceBuilder::new().layer(BreakerLayer::new(protection.breaker.clone())).service(balance)
}

/// The balancer over the endpoints of `service` (in `subset`, when given), following `state`.
pub fn balance(
    service: Arc<str>,
    subset: Option<Arc<str>>,
    state: watch::Receiver<ServiceState>,
    client: ClientConfig,
    config: BalanceConfig,
) -> Balance<Endpoint> {
    Balance::new(service, subset, state, move |target: Target| endpoint(&target, client.clone()), config)
}

/// One endpoint: the attempt's time limit over the endpoint's pooled client.
pub fn endpoint(target: &Target, client: ClientConfig) -> Endpoint {
    ServiceBuilder::new().layer(PerTryLayer).service(EndpointService::new(target, client))
}
