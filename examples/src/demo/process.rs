//! The demo's child processes: the control plane and the sidecars, started from this very binary
//! (`ferry-demo` runs them as `ferry-demo __control-plane ...` and `ferry-demo __sidecar ...`),
//! so one `cargo run` builds everything the demo needs.

use std::{
    collections::HashMap,
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
    sync::oneshot,
};

/// The hidden first argument that makes `ferry-demo` run a control plane.
pub const CONTROL_PLANE: &str = "__control-plane";
/// The hidden first argument that makes `ferry-demo` run a sidecar.
pub const SIDECAR: &str = "__sidecar";

/// A child process with the addresses it reported.
pub struct Process {
    pub name: String,
    pub log: PathBuf,
    /// The `key=value` pairs of its "listening" log line.
    pub bound: HashMap<String, String>,
    child: Child,
}

impl Process {
    /// Starts `ferry-demo ROLE ARGS...`, logging to `logs/NAME.log`, and waits for its
    /// "listening" line.
    pub async fn start(role: &str, name: &str, args: &[String], logs: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating ferry-demo")?;
        let log = logs.join(format!("{name}.log"));
        let mut command = Command::new(exe);
        // A shell where the user sourced the demo's env file (or ran Ferry before) exports
        // FERRY_TOKEN, FERRY_CA_FILE and more, which the children's flags would take as their
        // own (a sidecar refuses --token-file beside FERRY_TOKEN): they get only what the demo
        // passes them.
        for key in inherited_ferry_vars(std::env::vars_os().map(|(key, _)| key)) {
            command.env_remove(key);
        }
        let mut child = command
            .arg(role)
            .args(args)
            .env("FERRY_LOG", "info")
            // The child exits when this pipe closes, so no process outlives the demo.
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("{name}: no stderr"))?;
        let mut file = tokio::fs::File::create(&log).await.with_context(|| format!("creating {}", log.display()))?;
        let (listening, bound) = oneshot::channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut listening = Some(listening);
            // What says why it exited: its last error line (`... ERROR ferry_runtime: binding
            // --grpc ...`, or clap's `error: ...`), else its last line.
            let (mut last, mut last_error) = (String::new(), None);
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(" listening ")
                    && let Some(listening) = listening.take()
                {
                    let _ = listening.send(Ok(parse_pairs(&line)));
                }
                let _ = file.write_all(line.as_bytes()).await;
                let _ = file.write_all(b"\n").await;
                if line.contains(" ERROR ") || line.starts_with("error:") {
                    last_error = Some(line.clone());
                }
                if !line.trim().is_empty() {
                    last = line;
                }
            }
            if let Some(listening) = listening.take() {
                let _ = listening.send(Err(last_error.unwrap_or(last)));
            }
        });
        let bound = match tokio::time::timeout(Duration::from_secs(30), bound).await {
            Ok(Ok(Ok(bound))) => bound,
            Ok(Ok(Err(last))) if !last.is_empty() => bail!("{name} exited: {}; see {}", reason(&last), log.display()),
            _ => bail!("{name} did not start; see {}", log.display()),
        };
        Ok(Self { name: name.to_owned(), log, bound, child })
    }

    /// The address it reported under `key`.
    pub fn addr(&self, key: &str) -> anyhow::Result<SocketAddr> {
        let value = self.bound.get(key).ok_or_else(|| anyhow!("{} reported no {key} address", self.name))?;
        value.parse().with_context(|| format!("{}: {key}={value}", self.name))
    }

    /// Whether it has exited, with its status.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stops it.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The message of a log line: `binding --grpc 127.0.0.1:7070: Address already in use (os error
/// 98)` out of `2026-11-25T18:36:17Z ERROR ferry_runtime: binding --grpc ...`.
fn reason(line: &str) -> &str {
    let line = line.trim();
    match line.split_once(" ERROR ") {
        Some((_, rest)) => rest.split_once(": ").map_or(rest, |(_, message)| message),
        None => line,
    }
}

/// The `key=value` pairs of a log line.
fn parse_pairs(line: &str) -> HashMap<String, String> {
    line.split_whitespace().filter_map(|token| token.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// The names among `keys` of Ferry's environment variables (`FERRY_...`), which no child of the
/// demo inherits.
fn inherited_ferry_vars(keys: impl Iterator<Item = OsString>) -> Vec<OsString> {
    keys.filter(|key| key.as_encoded_bytes().starts_with(b"FERRY_")).collect()
}

/// In a child: exits the process when the parent's end of stdin closes.
pub fn exit_with_parent() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        loop {
            match std::io::Read::read(&mut std::io::stdin(), &mut sink) {
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(_) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_addresses_from_the_listening_line() {
        let line = "2026-11-25T16:23:02Z  INFO ferry_sidecar: listening outbound=127.0.0.1:46359 inbound=none admin=127.0.0.1:1";
        let pairs = parse_pairs(line);
        assert_eq!(pairs["outbound"], "127.0.0.1:46359");
        assert_eq!(pairs["inbound"], "none");
    }

    #[test]
    fn children_inherit_no_ferry_variable_of_the_users_shell() {
        let keys = ["FERRY_TOKEN", "FERRY_CA_FILE", "FERRY_CONTROL_PLANE", "PATH", "HOME", "MY_FERRY_THING", "FERRY_DEMO_X"];
        let removed = inherited_ferry_vars(keys.into_iter().map(OsString::from));
        assert_eq!(removed, ["FERRY_TOKEN", "FERRY_CA_FILE", "FERRY_CONTROL_PLANE", "FERRY_DEMO_X"]);
    }

    #[test]
    fn a_failed_start_says_why_without_the_log_prefix() {
        let line = "2026-11-25T18:36:17.147926Z ERROR ferry_runtime: binding --grpc 127.0.0.1:7070: Address already in use (os error 98)";
        assert_eq!(reason(line), "binding --grpc 127.0.0.1:7070: Address already in use (os error 98)");
        assert_eq!(reason("error: --grpc: invalid value\n"), "error: --grpc: invalid value");
    }
}
