//! Ferry's benchmark drivers, which write `docs/benchmarks.md`: [`suite`] is `ferry-bench`, the
//! data path against HAProxy and nginx; [`cp_bench`] is `ferry-cp-bench`, the control plane
//! under many sidecars. They start the real binaries through the end-to-end harness
//! (`ferry-tests`) and its clients.

#![forbid(unsafe_code)]

pub mod cp_bench;
pub mod suite;
