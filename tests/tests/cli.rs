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

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn a_ttl_check_is_renewed_with_ferryctl_check() {
    let control_plane = ControlPlane::start().await;
    let register = ["register", "--service", "jobs", "--id", "job-1", "--address", "127.0.0.1", "--port", "9"];
    let output = control_plane.ferryctl(&[&register[..], &["--check", "ttl:1h"]].concat()).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    // Register says how to renew it, with the check's real id.
    assert!(text(&output.stdout).contains("renew it with: ferryctl check pass job-1:ttl\n"), "{}", text(&output.stdout));

    let output = control_plane.ferryctl(&["check", "pass", "job-1:ttl", "--note", "all jobs done"]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "check job-1:ttl is passing: all jobs done\n");
    let output = control_plane.ferryctl(&["instances", "jobs"]).await;
    let table = text(&output.stdout);
    let row = table.lines().find(|l| l.starts_with("job-1 ")).unwrap_or_else(|| panic!("{table}"));
    assert_eq!(row.split_whitespace().nth(2), Some("passing"), "{table}");
    let check = table.lines().find(|l| l.starts_with("job-1:ttl ")).unwrap_or_else(|| panic!("{table}"));
    assert!(check.contains("passing") && check.contains("all jobs done"), "{table}");

    let output = control_plane.ferryctl(&["check", "fail", "job-1:ttl"]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).starts_with("check job-1:ttl is critical"), "{}", text(&output.stdout));

    // A check that does not exist: the error names it.
    let output = control_plane.ferryctl(&["check", "pass", "job-2:ttl"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).starts_with("error: check \"job-2:ttl\": "), "{}", text(&output.stderr));
    // The instance's id where its check's was meant: the check is named.
    let output = control_plane.ferryctl(&["check", "pass", "job-1"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains(r#""job-1" is an instance: its TTL check is job-1:ttl"#), "{}", text(&output.stderr));
}

#[tokio::test]
async fn token_create_names_its_row_on_stderr_and_empty_yaml_says_so_on_stderr() {
    let control_plane = ControlPlane::start().await;
    let output = control_plane.ferryctl(&["token", "create", "--kind", "read", "--ttl", "1h"]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let secret = text(&output.stdout);
    let secret = secret.trim_end();
    assert_eq!(text(&output.stdout).lines().count(), 1, "the secret alone on stdout");
    let said = text(&output.stderr);
    assert!(said.starts_with("created token ") && said.contains("(kind read, expires "), "{said}");
    assert!(!said.contains(secret), "never the secret on stderr: {said}");
    let id = said.split_whitespace().nth(2).expect("the id").to_owned();
    let listed = text(&control_plane.ferryctl(&["token", "list"]).await.stdout);
    let row = listed.lines().find(|l| l.starts_with(&format!("{id} "))).unwrap_or_else(|| panic!("{id} in:\n{listed}"));
    assert!(row.contains("read"), "{row}");

    // No authorization policy: empty YAML, said on stderr; JSON an empty list; exit 0 both.
    let output = control_plane.ferryctl(&["-o", "yaml", "get", "authorization"]).await;
    assert_eq!(
        (output.status.code(), text(&output.stdout), text(&output.stderr)),
        (Some(0), String::new(), "no resources\n".into())
    );
    let output = control_plane.ferryctl(&["-o", "json", "get", "authorization"]).await;
    assert_eq!((output.status.code(), text(&output.stdout)), (Some(0), "[]\n".into()));

    // No token at all: the error says both ways to give one.
    let output = tokio::process::Command::new(binary("ferryctl"))
        .envs(control_plane.ferryctl_env().into_iter().filter(|(name, _)| *name != "FERRY_TOKEN"))
        .env_remove("FERRY_TOKEN")
        .arg("services")
        .output()
        .await
        .expect("ferryctl runs");
    assert_eq!(output.status.code(), Some(1));
    let error = text(&output.stderr);
    assert!(error.contains("not authenticated") && error.contains("pass --token or set FERRY_TOKEN"), "{error}");
}

#[tokio::test]
async fn a_usage_error_does_not_list_the_flags_the_environment_set() {
    let output = tokio::process::Command::new(binary("ferryctl"))
        .env("FERRY_TOKEN", "secret")
        .env("FERRY_CA_FILE", "/nonexistent/ca.pem")
        .args(["token", "create", "--service", "catalog"])
        .output()
        .await
        .expect("ferryctl runs");
    assert_eq!(output.status.code(), Some(64));
    let error = text(&output.stderr);
    let usage = error.lines().find(|l| l.starts_with("Usage: ")).unwrap_or_else(|| panic!("{error}"));
    assert_eq!(usage, "Usage: ferryctl token create --kind <KIND> --service <SERVICE>", "{error}");
    assert!(error.contains("--kind <KIND>"), "{error}");
}
