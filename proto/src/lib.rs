//! Ferry's wire protocol, `ferry.v1`: the generated gRPC and protobuf code, its proto3 JSON
//! mapping, and the validation that the control plane, `ferryctl` and the sidecar all share.
//!
//! The `.proto` files under `proto/ferry/v1/` are the single definition of every API message;
//! their JSON form (HTTP API, `-o json`) is the proto3 JSON mapping with the proto field names.

#![forbid(unsafe_code)]

pub mod authz;
pub mod json;
pub mod matching;
#[cfg(test)]
mod properties;
pub mod validate;

/// Generated code of the `ferry.v1` package.
#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod v1 {
    tonic::include_proto!("ferry.v1");
    include!(concat!(env!("OUT_DIR"), "/ferry.v1.serde.rs"));
}

/// The encoded descriptors of every `ferry.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry_descriptor.bin"));

pub use pbjson_types as types;

/// Conversions between protobuf timestamps and [`SystemTime`](std::time::SystemTime).
pub mod time {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use crate::types::Timestamp;

    /// A protobuf timestamp for `time`.
    pub fn timestamp(time: SystemTime) -> Timestamp {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        Timestamp {
            seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
        }
    }

    /// The time a protobuf timestamp stands for (the epoch for nonsense).
    pub fn system_time(ts: Timestamp) -> SystemTime {
        let seconds = u64::try_from(ts.seconds).unwrap_or(0);
        let nanos = u32::try_from(ts.nanos).unwrap_or(0).min(999_999_999);
        UNIX_EPOCH + Duration::new(seconds, nanos)
    }
}

impl v1::check::Probe {
    /// The kind of probe, as used in check ids, tables and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Http(_) => "http",
            Self::Tcp(_) => "tcp",
            Self::Grpc(_) => "grpc",
            Self::Script(_) => "script",
            Self::Ttl(_) => "ttl",
        }
    }
}

/// The shape of the traffic figures sidecars report (`TrafficReport`), shared by the sidecar
/// that counts and the control plane that merges.
pub mod traffic {
    /// The upper bounds, in milliseconds, of the latency buckets of `TrafficFigures`: a request
    /// that took `t` ms is counted in the first bucket with `t <= bound`, or in the one extra
    /// bucket past the last bound. Changing the list changes the protocol.
    pub const LATENCY_BUCKETS_MS: [u64; 17] =
        [1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 300, 500, 1_000, 2_000, 5_000, 10_000, 30_000];

    /// How many `latency_counts` a `TrafficFigures` carries: one per bound and one past them.
    pub const LATENCY_COUNTS: usize = LATENCY_BUCKETS_MS.len() + 1;

    /// The most destinations one `TrafficReport` carries.
    pub const MAX_OUTBOUND: usize = 1024;

    /// The bucket a request of `elapsed` falls in: an index below [`LATENCY_COUNTS`].
    pub fn bucket(elapsed: std::time::Duration) -> usize {
        let micros = elapsed.as_micros();
        LATENCY_BUCKETS_MS.iter().position(|&bound| micros <= u128::from(bound) * 1000).unwrap_or(LATENCY_BUCKETS_MS.len())
    }
}
