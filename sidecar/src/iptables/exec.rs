//! Running `iptables-save` and `iptables-restore` for one address family, with errors that
//! name the command and show what it printed.
//!
//! The -save and -restore commands are the ones beside the `iptables` command chosen (for
//! `/usr/sbin/iptables-legacy`, `/usr/sbin/iptables-legacy-save`), so selecting a command
//! selects its backend, legacy or nft, for reading and writing alike.

use std::{
    ffi::OsString,
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use super::rules::Family;

/// The commands that read and write one family's nat table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub family: Family,
    /// `iptables` or `ip6tables` (or a variant such as `iptables-nft`), as given.
    pub command: PathBuf,
    pub save: PathBuf,
    pub restore: PathBuf,
    /// The flag that chose `command`, for errors.
    pub flag: &'static str,
}

/// A command that could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{command}: not found; install iptables, or name the command with {flag}")]
    NotFound { command: String, flag: &'static str },
    #[error("{command}: could not run it: {error}")]
    Spawn { command: String, error: io::Error },
    #[error(
        "{command}: not permitted; run `ferry-sidecar iptables` as root (or with CAP_NET_ADMIN) in the app's network namespace. It said: {stderr}"
    )]
    NotPermitted { command: String, stderr: String },
    #[error("{command} failed ({status}): {stderr}")]
    Failed { command: String, status: ExitStatus, stderr: String },
}

impl Backend {
    /// The backend of `command`, with the -save and -restore beside it.
    pub fn new(family: Family, command: PathBuf, flag: &'static str) -> Self {
        let save = beside(&command, "-save");
        let restore = beside(&command, "-restore");
        Self { family, command, save, restore, flag }
    }

    /// The nat table as `iptables-save -t nat` prints it.
    pub fn save_nat(&self) -> Result<String, CommandError> {
        let output = self.run(&self.save, &["-t".into(), "nat".into()], None)?;
        Ok(output)
    }

    /// The arguments of `iptables-restore`: keep what is not in the script, and wait up to
    /// `wait_seconds` for the xtables lock that another iptables command may hold (0: fail at
    /// once when it is held).
    pub fn restore_args(wait_seconds: u32) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--noflush".into()];
        if wait_seconds > 0 {
            args.extend(["-w".into(), wait_seconds.to_string().into()]);
        }
        args
    }

    /// The restore command line, for a dry run to print.
    pub fn restore_command_line(&self, wait_seconds: u32) -> String {
        let mut line = self.restore.display().to_string();
        for arg in Self::restore_args(wait_seconds) {
            line.push(' ');
            line.push_str(&arg.to_string_lossy());
        }
        line
    }

    /// Applies `script` with `iptables-restore --noflush`, all of it or nothing.
    pub fn restore(&self, script: &str, wait_seconds: u32) -> Result<(), CommandError> {
        match self.run(&self.restore, &Self::restore_args(wait_seconds), Some(script)) {
            Ok(_) => Ok(()),
            Err(CommandError::Failed { command, status, stderr }) => {
                Err(CommandError::Failed { command, status, stderr: with_failed_line(&stderr, script) })
            }
            Err(error) => Err(error),
        }
    }

    /// Runs `program args`, feeding it `stdin`, and returns what it printed.
    fn run(&self, program: &Path, args: &[OsString], stdin: Option<&str>) -> Result<String, CommandError> {
        let command = {
            let mut line = program.display().to_string();
            for arg in args {
                line.push(' ');
                line.push_str(&arg.to_string_lossy());
            }
            line
        };
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| match error.kind() {
                io::ErrorKind::NotFound => CommandError::NotFound { command: program.display().to_string(), flag: self.flag },
                _ => CommandError::Spawn { command: command.clone(), error },
            })?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A command that fails early closes its stdin; its exit status and stderr say why
            // better than the broken pipe would.
            let _ = pipe.write_all(text.as_bytes());
        }
        let output = child.wait_with_output().map_err(|error| CommandError::Spawn { command: command.clone(), error })?;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        if stderr.contains("Permission denied") || stderr.contains("must be root") || stderr.contains("Operation not permitted") {
            return Err(CommandError::NotPermitted { command, stderr });
        }
        Err(CommandError::Failed { command, status: output.status, stderr })
    }
}

/// `command` with `suffix` on its file name, in the same directory: `iptables-nft` gives
/// `iptables-nft-save`, found on PATH as `iptables-nft` is.
fn beside(command: &Path, suffix: &str) -> PathBuf {
    let mut name = command.file_name().map(OsString::from).unwrap_or_else(|| command.as_os_str().to_owned());
    name.push(suffix);
    command.with_file_name(name)
}

/// iptables-restore's error with the line of the script it names (`line 5 failed`), so the
/// reader sees the rule the kernel refused.
fn with_failed_line(stderr: &str, script: &str) -> String {
    let number = stderr
        .split("line ")
        .skip(1)
        .find_map(|rest| rest.split_once(" failed").and_then(|(n, _)| n.trim().parse::<usize>().ok()));
    match number.and_then(|n| script.lines().nth(n.checked_sub(1)?)) {
        Some(line) => format!("{stderr} (line {}: {line})", number.unwrap_or_default()),
        None => stderr.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_restore_are_the_ones_beside_the_command() {
        let legacy = Backend::new(Family::V4, "/usr/sbin/iptables-legacy".into(), "--iptables-command");
        assert_eq!(legacy.save, Path::new("/usr/sbin/iptables-legacy-save"));
        assert_eq!(legacy.restore, Path::new("/usr/sbin/iptables-legacy-restore"));
        let on_path = Backend::new(Family::V6, "ip6tables".into(), "--ip6tables-command");
        assert_eq!(
            (on_path.save.as_path(), on_path.restore.as_path()),
            (Path::new("ip6tables-save"), Path::new("ip6tables-restore"))
        );
    }

    #[test]
    fn the_restore_command_waits_for_the_lock_unless_told_not_to() {
        let backend = Backend::new(Family::V4, "iptables".into(), "--iptables-command");
        assert_eq!(backend.restore_command_line(10), "iptables-restore --noflush -w 10");
        assert_eq!(backend.restore_command_line(0), "iptables-restore --noflush");
    }

    #[test]
    fn a_refused_line_is_quoted_from_the_script() {
        let script = "*nat\n:FERRY_OUTPUT - [0:0]\n-A FERRY_OUTPUT -m owner --uid-owner x -j RETURN\nCOMMIT\n";
        let stderr = "iptables-restore v1.8.9 (nf_tables): line 3 failed: Invalid argument";
        assert_eq!(
            with_failed_line(stderr, script),
            "iptables-restore v1.8.9 (nf_tables): line 3 failed: Invalid argument (line 3: -A FERRY_OUTPUT -m owner --uid-owner x -j RETURN)"
        );
        assert_eq!(with_failed_line("something else", script), "something else");
    }

    #[test]
    fn a_missing_command_names_the_flag_that_chooses_it() {
        let backend = Backend::new(Family::V4, "/nonexistent/iptables".into(), "--iptables-command");
        let error = backend.save_nat().expect_err("no such command").to_string();
        assert_eq!(error, "/nonexistent/iptables-save: not found; install iptables, or name the command with --iptables-command");
    }
}
