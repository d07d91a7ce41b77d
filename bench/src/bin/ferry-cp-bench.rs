//! `ferry-cp-bench`: the control-plane benchmark. See [`ferry_bench::cp_bench`] and
//! `docs/benchmarks.md`.

use std::process::ExitCode;

use clap::Parser;
use ferry_bench::cp_bench::{self, Options};

fn main() -> ExitCode {
    let options = Options::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ferry-cp-bench: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cp_bench::run(options)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferry-cp-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}
