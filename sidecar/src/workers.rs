//! The data path's threads: one single-threaded runtime per worker, each serving its own
//! connections from accept to close.
//!
//! A proxied request wakes three tasks: the client's connection, the upstream connection that
//! carries the request, and the client's connection again with the response. On a work-stealing
//! runtime those tasks land on different threads, and every hand-off between them is a futex
//! wake and a context switch. Here a connection accepted by a listener is handed to one worker
//! (round robin), and everything it causes runs on that worker: the upstream connections it
//! uses come from the worker's own slot of each endpoint's pool (see
//! [`crate::http::client`]), so a request and its upstream exchange never leave the thread.
//!
//! The control stream, the admin API, health checks, DNS and the accept loops stay on the
//! process's main runtime.

use std::{
    cell::Cell,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::Context;
use tokio::{net::TcpStream, runtime::Handle};
use tokio_util::sync::CancellationToken;

thread_local! {
    /// The index of the worker this thread is, if it is one.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the worker running the caller, or `None` off the workers.
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// The data path's worker threads. Cheap to clone; the threads stop when [`Workers::stop`] is
/// called or the last clone is dropped.
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").field("count", &self.inner.handles.len()).finish()
    }
}

impl Workers {
    /// Starts `count` worker threads (at least one), named `ferry-worker-N`.
    pub fn start(count: usize) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .with_context(|| format!("starting worker {index}'s runtime"))?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("ferry-worker-{index}"))
                .spawn(move || {
                    CURRENT.with(|current| current.set(Some(index)));
                    runtime.block_on(stop.cancelled());
                    // Whatever still runs (a connection past the drain period) is dropped.
                    runtime.shutdown_background();
                })
                .with_context(|| format!("starting worker thread {index}"))?;
        }
        Ok(Self { inner: Arc::new(Inner { handles, next: AtomicUsize::new(0), stop }) })
    }

    /// How many workers there are.
    pub fn count(&self) -> usize {
        self.inner.handles.len()
    }

    /// The next worker in turn.
    pub fn next(&self) -> &Handle {
        let index = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.handles.len();
        &self.inner.handles[index]
    }

    /// Moves an accepted connection to the next worker's reactor: the stream returned, and the
    /// worker to serve it on.
    pub fn adopt(&self, stream: TcpStream) -> std::io::Result<(TcpStream, &Handle)> {
        let worker = self.next();
        let stream = stream.into_std()?;
        let _context = worker.enter();
        Ok((TcpStream::from_std(stream)?, worker))
    }

    /// Stops the worker threads; tasks still running on them are dropped.
    pub fn stop(&self) {
        self.inner.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_run_on_the_workers_in_turn() {
        let workers = Workers::start(2).expect("workers");
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(workers.next().spawn(async { current() }).await.expect("ran"));
        }
        assert_eq!(seen, [Some(0), Some(1), Some(0), Some(1)]);
        assert_eq!(current(), None, "the test's own thread is no worker");
        workers.stop();
    }
}
