//! Ferry's demo: three small services that call each other over the mesh, and the launcher that
//! starts them with a control plane and a sidecar each.
//!
//! - `frontend` (HTTP) answers `GET /` by calling `catalog` through its sidecar, passing on
//!   `x-canary`, and reports the catalog version that answered.
//! - `catalog` (HTTP) answers `GET /items` by calling `inventory` over gRPC through its sidecar,
//!   and says its version (v1, or v2 for the canary) in `x-version`.
//! - `inventory` (gRPC) answers `ferry.demo.v1.Inventory/GetStock`.
//!
//! `examples/routes/` holds the routing scenarios `ferry-demo --scenario` applies.
//! `ferry-demo app NAME` runs one app alone, calling the others by their plain names
//! ([`standalone`]), as `examples/intercept-demo.sh` does behind intercepting sidecars.

#![forbid(unsafe_code)]

pub mod apps;
pub mod demo;
pub mod standalone;

/// Generated code of `ferry.demo.v1`.
#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod proto {
    tonic::include_proto!("ferry.demo.v1");
}
