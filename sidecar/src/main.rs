//! `ferry-sidecar`: see [`ferry_sidecar::main_with_args`].

/// The allocator: mimalloc keeps per-thread free lists, so the per-request allocations of the
/// proxy path neither contend nor fragment the way they do with the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ferry_sidecar::main_with_args(std::env::args_os())
}
