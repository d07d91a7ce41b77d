//! `ferryctl` as a shell uses it: its output piped into a reader that goes away, TTL checks
//! renewed from the command line, tokens told apart, and usage errors that do not blame flags
//! the environment already set.

use std::{
    io::{BufRead, BufReader},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use ferry_tests::{ControlPlane, PATIENCE, binary};

/// Runs `ferryctl ARGS` against `control_plane` with its standard output a pipe that is closed
/// after `lines` lines were read, and returns how it ended and what it said on stderr.
async fn with_stdout_closed_after(control_plane: &ControlPlane, args: &[&str], lines: usize) -> (ExitStatus, String) {
    let mut command = Command::new(binary("ferryctl"));
    command.envs(control_plane.ferryctl_env()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("ferryctl starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut reader = BufReader::new(stdout);
        for _ in 0..lines {
            let mut line = String::new();
            reader.read_line(&mut line).expect("reads a line");
            assert!(!line.is_empty(), "ferryctl ended before its line was read");
        }
        // The reader goes away, as `head` does.
        drop(reader);
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waits") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ferryctl {args:?} kept running after its reader went away", args = command.get_args());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr is piped"), &mut stderr).expect("reads stderr");
        (status, stderr)
    })
    .await
    .expect("joins")
}

#[tokio::test]
async fn a_reader_that_goes_away_ends_ferryctl_quietly() {
    let control_plane = ControlPlane::start().await;
    // `ferryctl top --watch | head -1`: the next reprint finds the pipe closed.
    let (status, stderr) = with_stdout_closed_after(&control_plane, &["top", "--watch"], 1).await;
    assert!(matches!(status.code(), Some(0 | 141)), "{status:?}\n{stderr}");
    assert_eq!(stderr, "", "nothing said: nobody is left to read it");
    // A one-shot command whose reader is gone before it writes.
    let (status, stderr) = with_stdout_closed_after(&control_plane, &["services"], 0).await;
    assert!(matches!(status.code(), Some(0 | 141)), "{status:?}\n{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{stderr}");
}
