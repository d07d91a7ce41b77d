//! Process plumbing shared by Ferry's long-running binaries, so each `main` reads the same:
//! parse the config (a bad value exits 64, `EX_USAGE`, naming the flag, before anything binds),
//! log to stderr, run on a multi-threaded runtime until the work ends, map the result to an exit
//! code. Also the shutdown signal they all wait for.

#![forbid(unsafe_code)]

use std::{ffi::OsString, io::IsTerminal, net::SocketAddr, process::ExitCode};

use clap::Parser;

pub mod backoff;
pub mod rng;
pub mod short;
pub mod suggest;

/// Locks `mutex`, whether or not a panic elsewhere poisoned it: every critical section in Ferry
/// leaves its data consistent at each step, and one failed request must not stop the others.
/// The one lock idiom of the workspace.
pub fn lock<T: ?Sized>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The exit status of a bad command line or config (`EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;

/// A configuration error found after parsing (when flags must be read together); [`main`]
/// exits with [`EXIT_USAGE`] for it. The message names the flag.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Parses `args` into `C`, or says why not and returns the exit code: 0 for `--help` and
/// `--version`, [`EXIT_USAGE`] for anything invalid.
pub fn parse<C, I, T>(args: I) -> Result<C, ExitCode>
where
    C: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    C::try_parse_from(args).map_err(|error| {
        let _ = error.print();
        if error.use_stderr() { ExitCode::from(EXIT_USAGE) } else { ExitCode::SUCCESS }
    })
}

/// Runs a binary: parses `args` into `C`, logs to stderr with the filter `log(&config)` returns,
/// and runs `main(config)` to completion on a multi-threaded runtime.
pub fn main<C, I, T, F, Fut>(args: I, log: impl FnOnce(&C) -> String, main: F) -> ExitCode
where
    C: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    main_on_threads(None, args, log, main)
}

/// As [`main`], on a runtime of `threads` worker threads; `None` is tokio's default (one per
/// core, or `TOKIO_WORKER_THREADS`).
pub fn main_on_threads<C, I, T, F, Fut>(threads: Option<usize>, args: I, log: impl FnOnce(&C) -> String, main: F) -> ExitCode
where
    C: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config = match parse::<C, _, _>(args) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let mut filter = log(&config);
    if !filter.contains("hickory") {
        // hickory-server logs every DNS query at info.
        filter.push_str(",hickory_server=warn,hickory_proto=warn");
    }
    let filter = match tracing_subscriber::EnvFilter::try_new(&filter) {
        Ok(filter) => filter,
        Err(error) => {
            eprintln!("error: invalid value {filter:?} for '--log <FILTER>': {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<UsageError>() => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(error) => {
            tracing::error!("{}", error_chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Parses a listen address, `IP:PORT`, with an error that says what is expected.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("{s:?} is not IP:PORT, such as 127.0.0.1:7070 or [::]:7070 (port 0 picks a free one)"))
}

/// An error and its sources in one line, leaving out a source whose text its parent already
/// shows (many errors print their source in their own message).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        let part = source.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = source.source();
    }
    text
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let Ok(mut terminate) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        tracing::warn!("cannot listen for SIGTERM; stopping on SIGINT only");
        let _ = interrupt.await;
        return;
    };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate.recv() => {}
    }
}

/// Accepts the next connection on `listener` once one of `slots` is free, and hands it over
/// with its slot (released when the connection's task drops it), so a listener never holds
/// more connections than it has slots. `None` once `shutdown` fires. A failed accept (out of
/// file descriptors and the like) is logged and retried after 50 ms instead of spinning.
pub async fn accept_capped(
    listener: &tokio::net::TcpListener,
    slots: &std::sync::Arc<tokio::sync::Semaphore>,
    shutdown: &tokio_util::sync::CancellationToken,
    name: &'static str,
) -> Option<(tokio::sync::OwnedSemaphorePermit, tokio::net::TcpStream, SocketAddr)> {
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.ok()?,
            () = shutdown.cancelled() => return None,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return None,
        };
        match accepted {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                return Some((permit, stream, remote));
            }
            Err(error) => {
                tracing::warn!(listener = name, %error, "accept failed");
                drop(permit);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Hides(#[source] std::io::Error);

    #[test]
    fn error_chains_do_not_repeat_themselves() {
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(error_chain(&Repeats(refused())), "outer: refused");
        assert_eq!(error_chain(&Hides(refused())), "outer: refused");
    }

    #[test]
    fn listen_addresses_must_be_ip_and_port() {
        assert_eq!(parse_listen_addr("127.0.0.1:0"), Ok(SocketAddr::from(([127, 0, 0, 1], 0))));
        assert!(parse_listen_addr("localhost:7070").expect_err("a name").contains("IP:PORT"));
    }
}
