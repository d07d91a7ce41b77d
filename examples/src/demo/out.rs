//! What the demo writes on standard output, which may be a pipe that closes early
//! (`ferry-demo | head`): a write that fails marks the output closed, the demo then stops as on
//! Ctrl-C (every child stopped), and nothing panics.

use std::{
    fmt::Arguments,
    io::Write,
    sync::atomic::{AtomicBool, Ordering},
};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `text` and flushes it, so that a frame is seen whole, its last line included.
pub fn write(text: Arguments<'_>) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if stdout.write_fmt(text).and_then(|()| stdout.flush()).is_err() {
        CLOSED.store(true, Ordering::Relaxed);
    }
}

/// Whether a write failed: nobody reads the output any more.
pub fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// `println!` that never panics: see [`write`].
#[macro_export]
macro_rules! say {
    () => { $crate::demo::out::write(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::demo::out::write(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` that never panics and flushes: see [`write`].
#[macro_export]
macro_rules! show {
    ($($arg:tt)*) => { $crate::demo::out::write(format_args!($($arg)*)) };
}
