//! `ferry-control-plane`: see [`ferry_control_plane::main_with_args`].

fn main() -> std::process::ExitCode {
    ferry_control_plane::main_with_args(std::env::args_os())
}
