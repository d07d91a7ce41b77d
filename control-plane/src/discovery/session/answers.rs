//! How a session matches its sidecar's ACKs and NACKs to the pushes in flight, records them in
//! the sidecar's progress, and works out what a NACK sends again.

use std::{collections::HashSet, sync::Arc};

use ferry_proto::v1;
use tokio::time::Instant;

use super::Session;
use crate::discovery::progress::{Held, Part};

/// Pushes kept for matching ACKs; older ones are forgotten.
const MAX_IN_FLIGHT: usize = 64;

/// A push not answered yet.
pub(super) struct InFlight {
    pub(super) nonce: String,
    pub(super) sent_at: Instant,
    /// (service, what the push gave, whether it carried everything)
    pub(super) carried: Vec<(Arc<str>, Held, bool)>,
    /// The trust bundle version it carried, if any.
    pub(super) bundle: Option<u64>,
    /// The authorization version it carried, if any.
    pub(super) authorization: Option<u64>,
    /// The address table version it carried, and whether whole.
    pub(super) addresses: Option<(u64, bool)>,
}

impl Session {
    /// Keeps `push` to match its answer; the oldest is forgotten past [`MAX_IN_FLIGHT`].
    pub(super) fn remember(&mut self, push: InFlight) {
        self.in_flight.push_back(push);
        while self.in_flight.len() > MAX_IN_FLIGHT {
            self.in_flight.pop_front();
        }
    }

    fn take_in_flight(&mut self, nonce: &str) -> Option<InFlight> {
        let position = self.in_flight.iter().position(|p| p.nonce == nonce)?;
        // Answers come in order: anything older was answered already or lost with its answer.
        self.in_flight.drain(..position);
        self.in_flight.pop_front()
    }

    pub(super) fn acked(&mut self, nonce: &str) {
        let Some(push) = self.take_in_flight(nonce) else {
            tracing::debug!(node = %self.record.node_id, nonce, "ACK for an unknown push");
            return;
        };
        self.metrics.acks.inc();
        self.metrics.ack_latency.observe(push.sent_at.elapsed().as_secs_f64());
        if let Some(version) = push.bundle {
            self.record.progress.part_acked(Part::TrustBundle, version);
        }
        if let Some(version) = push.authorization {
            self.record.progress.part_acked(Part::Authorization, version);
        }
        for (service, held, _) in push.carried {
            if let Some(subscription) = self.subscriptions.get_mut(&service) {
                subscription.needs_full = false;
                self.record.progress.acked(&service, held);
            }
        }
    }

    pub(super) fn nacked(&mut self, mut nack: v1::Nack) {
        self.metrics.nacks.inc();
        truncate(&mut nack.error, self.config.max_nack_bytes);
        nack.services.truncate(MAX_IN_FLIGHT);
        tracing::warn!(node = %self.record.node_id, nonce = %nack.nonce, error = %nack.error, "sidecar rejected a push");
        let push = self.take_in_flight(&nack.nonce);
        let versions = push.iter().flat_map(|p| p.carried.iter().map(|(s, held, _)| (s.to_string(), held.version))).collect();
        let at_fault: HashSet<String> = nack.services.iter().cloned().collect();
        let progress = &self.record.progress;
        progress.nacked(v1::NackStatus {
            nonce: nack.nonce,
            error: nack.error,
            at: Some(crate::registry::timestamp(std::time::SystemTime::now())),
            versions,
        });
        // The bundle and the authorization policy go again; one the sidecar found fault with
        // (a NACK naming no service) only once changed.
        let whole = at_fault.is_empty();
        if let Some(push) = &push {
            if push.bundle.is_some() {
                self.bundle_held = None;
            }
            // The sidecar keeps the table it had, which the next push does not build on: it
            // carries the whole table, unless that is what the sidecar found fault with.
            if let (Some((version, full)), Some(feed)) = (push.addresses, self.addresses.as_mut()) {
                feed.held = None;
                if full && whole {
                    feed.rejected = Some(version);
                }
            }
            if let Some(version) = push.authorization {
                self.authorization_held = progress.part(Part::Authorization).acked;
                if whole {
                    progress.part_rejected(Part::Authorization, version);
                }
            }
        }
        let Some(push) = push else {
            // Too old to know what it carried: resend everything in full.
            self.bundle_held = None;
            if let Some(feed) = self.addresses.as_mut() {
                feed.held = None;
            }
            self.authorization_held = progress.part(Part::Authorization).acked;
            for (service, subscription) in &mut self.subscriptions {
                subscription.held = progress.acknowledged(service);
                subscription.needs_full = true;
                subscription.dirty = true;
            }
            self.dirty_since.get_or_insert_with(Instant::now);
            return;
        };
        for (service, held, full) in push.carried {
            let Some(subscription) = self.subscriptions.get_mut(&service) else { continue };
            // A push is applied whole: the sidecar kept what it had acknowledged, and the
            // resources that were fine are sent again.
            subscription.held = progress.acknowledged(&service);
            subscription.dirty = true;
            if at_fault.is_empty() || at_fault.contains(&*service) {
                progress.rejected(&service, held);
                if full {
                    subscription.rejected_snapshot = Some(held.version);
                } else {
                    subscription.needs_full = true;
                }
            }
        }
        self.dirty_since.get_or_insert_with(Instant::now);
    }
}

/// Cuts `text` to at most `max` bytes, on a character boundary, marked when cut.
fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max.saturating_sub('…'.len_utf8());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}
