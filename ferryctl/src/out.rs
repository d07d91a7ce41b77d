//! Writing what `ferryctl` shows, without the panics of `print!`: a reader that goes away
//! (`ferryctl top --watch | head -2`) ends the command quietly, with the status a shell gives a
//! program that a closed pipe ended, and a closed standard error loses only the message.

use std::io::{self, Write};

/// The exit status when standard output was closed by its reader: 128 + SIGPIPE, what a shell
/// reports for any Unix tool a closed pipe ends, so `set -o pipefail` sees ferryctl as it sees
/// `cat`.
pub const EXIT_STDOUT_CLOSED: u8 = 141;

/// Standard output was closed by its reader: nobody is left to tell, so nothing is printed.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub struct StdoutClosed;

/// Writes `text` to standard output and flushes it (so that a closed pipe is seen now, not at
/// exit). A closed pipe is [`StdoutClosed`]; any other failure says that it was writing.
pub fn stdout(text: &str) -> anyhow::Result<()> {
    write_to(&mut io::stdout().lock(), text)
}

/// Writes `text` to standard error, ignoring a failure: there is nowhere left to report it.
pub fn stderr(text: &str) {
    let mut stderr = io::stderr().lock();
    let _ = stderr.write_all(text.as_bytes()).and_then(|()| stderr.flush());
}

/// Writes `text` to `writer` and flushes it, as [`stdout`] does.
fn write_to(writer: &mut impl Write, text: &str) -> anyhow::Result<()> {
    match writer.write_all(text.as_bytes()).and_then(|()| writer.flush()) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(error) => Err(anyhow::anyhow!("writing to standard output: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that went away after `room` bytes.
    struct ClosedAfter {
        room: usize,
    }

    impl Write for ClosedAfter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_is_stdout_closed_and_other_failures_say_what_was_written() {
        let error = write_to(&mut ClosedAfter { room: 3 }, "catalog  2\n").expect_err("the reader is gone");
        assert!(error.is::<StdoutClosed>(), "{error}");
        write_to(&mut ClosedAfter { room: 100 }, "catalog  2\n").expect("room enough");

        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::StorageFull))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let error = write_to(&mut Full, "x").expect_err("no space");
        assert!(!error.is::<StdoutClosed>() && error.to_string().starts_with("writing to standard output: "), "{error}");
    }
}
