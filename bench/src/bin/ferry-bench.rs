//! `ferry-bench`: Ferry's benchmark suite. See [`ferry_bench::suite`].
//!
//! `ferry-bench upstream` (not for direct use) serves the benchmark's upstream in a process of
//! its own and prints `listening addr=ADDR`. `ferry-bench haproxy-config HTTP1 H2C UPSTREAM`
//! prints the HAProxy config the suite runs (`bench/instructions.sh` uses it).

use std::process::ExitCode;

use clap::Parser;
use ferry_bench::suite;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("upstream") {
        return upstream();
    }
    if std::env::args().nth(1).as_deref() == Some("haproxy-config") {
        return haproxy_config();
    }
    match suite::main(suite::Options::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferry-bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn upstream() -> ExitCode {
    let served = std::net::TcpListener::bind("127.0.0.1:0").map_err(anyhow::Error::from).and_then(|listener| {
        // The same shape as Ferry's own start-up line, which the driver reads.
        eprintln!("ferry-bench-upstream listening addr={}", listener.local_addr()?);
        suite::dataplane::serve_upstream(listener)
    });
    if let Err(error) = served {
        eprintln!("ferry-bench upstream: {error:#}");
    }
    ExitCode::FAILURE
}

fn haproxy_config() -> ExitCode {
    let addresses: Result<Vec<std::net::SocketAddr>, _> = std::env::args().skip(2).map(|a| a.parse()).collect();
    match addresses.as_deref() {
        Ok([http1, h2c, upstream]) => {
            let threads = std::thread::available_parallelism().map_or(1, usize::from);
            print!("{}", suite::dataplane::haproxy_config(threads, *http1, *h2c, *upstream));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: ferry-bench haproxy-config HTTP1_ADDR H2C_ADDR UPSTREAM_ADDR");
            ExitCode::from(64)
        }
    }
}
