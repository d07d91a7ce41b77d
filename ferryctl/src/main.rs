//! `ferryctl`: see [`ferryctl::main`].

fn main() -> std::process::ExitCode {
    ferryctl::main()
}
