//! Ferry's wire protocol, `ferry.v1`: the generated gRPC and protobuf code, its proto3 JSON
//! mapping, and the validation that the control plane, `ferryctl` and the sidecar all share.
//!
//! The `.proto` files under `proto/ferry/v1/` are the single definition of every API message;
//! their JSON form (HTTP API, `-o json`) is the proto3 JSON mapping with the proto field names.

#![forbid(unsafe_code)]

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
