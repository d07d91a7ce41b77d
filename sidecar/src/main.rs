//! `ferry-sidecar`: see [`ferry_sidecar::main_with_args`].

fn main() -> std::process::ExitCode {
    ferry_sidecar::main_with_args(std::env::args_os())
}
