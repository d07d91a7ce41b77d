//! What one request's attempts share: the endpoints already tried, so that a retry goes to a
//! different endpoint when one exists.

use std::sync::{Arc, Mutex};

use smallvec::SmallVec;

/// The endpoints (by instance id) an outbound request was already sent to. The retry layer puts
/// one in each attempt's extensions; the balancer avoids the endpoints it lists when another
/// can take the request, and records the one it picks. Room for three (the default number of
/// attempts) is kept inline.
#[derive(Debug, Clone, Default)]
pub struct Tried(Arc<Mutex<SmallVec<[Arc<str>; 3]>>>);

impl Tried {
    /// Records that the request went to `endpoint`.
    pub fn record(&self, endpoint: Arc<str>) {
        ferry_runtime::lock(&self.0).push(endpoint);
    }

    /// Whether the request already went to `endpoint`.
    pub fn contains(&self, endpoint: &str) -> bool {
        ferry_runtime::lock(&self.0).iter().any(|e| &**e == endpoint)
    }

    /// The endpoints tried, in order.
    pub fn endpoints(&self) -> Vec<Arc<str>> {
        ferry_runtime::lock(&self.0).to_vec()
    }
}
