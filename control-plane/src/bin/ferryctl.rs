//! `ferryctl`: see [`ferry_control_plane::ctl`].

fn main() -> std::process::ExitCode {
    ferry_control_plane::ctl::main()
}
