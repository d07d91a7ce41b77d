//! Ferry's wire protocol, `ferry.v1`: the generated gRPC and protobuf code, its proto3 JSON
//! mapping, and the validation that the control plane, `ferryctl` and the sidecar all share.
//!
//! The `.proto` files under `proto/ferry/v1/` are the single definition of every API message;
//! their JSON form (HTTP API, `-o json`) is the proto3 JSON mapping with the proto field names.

#![forbid(unsafe_code)]

pub mod authz;
pub mod json;
pub mod matching;
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
