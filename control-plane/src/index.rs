//! The one monotonic counter behind every version the control plane hands out: registry
//! indexes and resource versions alike, so a service's version (the largest of its endpoints',
//! route's and policy's) moves whenever any of them does, and never repeats.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

/// Hands out increasing indexes.
#[derive(Debug)]
pub struct Indexes(AtomicU64);

impl Default for Indexes {
    /// Starts from the clock (microseconds since the epoch), so that no index handed out after a
    /// restart can equal one a sidecar still holds from before it, even with a memory store.
    fn default() -> Self {
        let now = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros()).unwrap_or(0);
        Self(AtomicU64::new(now.max(1)))
    }
}

impl Indexes {
    /// The next index.
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst)
    }

    /// The index `next` would hand out now, without taking it.
    pub fn peek(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Makes sure later indexes exceed `seen` (one restored from the store).
    pub fn advance_past(&self, seen: u64) {
        self.0.fetch_max(seen.saturating_add(1), Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_only_grow_and_pass_what_was_stored() {
        let indexes = Indexes::default();
        let first = indexes.next();
        assert!(indexes.next() > first);
        indexes.advance_past(first + 1_000);
        assert!(indexes.next() > first + 1_000);
        indexes.advance_past(1);
        assert!(indexes.peek() > first + 1_000, "never backwards");
    }
}
