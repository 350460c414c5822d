//! Handshake isolation: the CPU-heavy part of a QUIC handshake — rustls
//! reading the ClientHello and writing the server's first flight (key
//! exchange and the certificate signature), which quinn does inside
//! `Incoming::accept` — runs on its own threads at a lower scheduling
//! priority (nice +10), not on the runtime's workers that carry
//! established sessions. A flood of handshakes then takes the CPU the
//! sessions leave over instead of queueing in front of their packets.
//!
//! Everything else of a connection stays on the runtime: [`MainRuntime`]
//! makes quinn spawn every connection driver there whichever thread
//! accepted it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

type Job = Box<dyn FnOnce() + Send>;

/// Worker threads for handshake work. Dropping the pool ends them once the
/// jobs in their queue are done.
pub(crate) struct Offload {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    threads: usize,
}

impl fmt::Debug for Offload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Offload")
            .field("threads", &self.threads)
            .finish()
    }
}

/// Nice value of the handshake threads.
pub(crate) const HANDSHAKE_NICE: i32 = 10;

impl Offload {
    /// No threads: jobs run inline on the caller.
    pub(crate) fn inline() -> Self {
        Self {
            tx: Mutex::new(None),
            threads: 0,
        }
    }

    /// `threads` workers (0: run jobs inline on the caller).
    pub(crate) fn new(threads: usize) -> std::io::Result<Self> {
        if threads == 0 {
            return Ok(Self::inline());
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("swb-handshake-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        match job {
                            // A job that panics loses its answer (its caller
                            // sees `None`), not the thread.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return, // the pool was dropped
                        }
                    }
                })?;
        }
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            threads,
        })
    }

    /// Runs `f` on a handshake thread and returns its result (inline when
    /// the pool has no threads or is shutting down).
    pub(crate) async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        let tx = self.tx.lock().ok().and_then(|t| t.clone());
        let Some(tx) = tx else { return Some(f()) };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done_tx.send(f());
        });
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            job();
        }
        // `None`: the job panicked on its thread (a bug, but one
        // connection's, not the relay's).
        done_rx.await.ok()
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        if let Ok(mut t) = self.tx.lock() {
            t.take();
        }
    }
}

/// Lowers the calling thread's scheduling priority (Linux: a thread is a
/// task with its own nice value). Failure leaves it as it was.
fn lower_priority() {
    let tid = rustix::thread::gettid();
    let _ = rustix::process::setpriority_process(Some(tid), HANDSHAKE_NICE);
}

/// A quinn runtime that spawns onto one tokio runtime whichever thread
/// asks: connections accepted on a handshake thread are driven by the
/// runtime's workers like every other.
#[derive(Debug)]
pub(crate) struct MainRuntime(pub(crate) tokio::runtime::Handle);

impl quinn::Runtime for MainRuntime {
    fn new_timer(&self, t: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        let _g = self.0.enter();
        Box::pin(tokio::time::sleep_until(t.into()))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        sock: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let _g = self.0.enter();
        quinn::TokioRuntime.wrap_udp_socket(sock)
    }

    fn now(&self) -> Instant {
        let _g = self.0.enter();
        tokio::time::Instant::now().into_std()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_the_handshake_threads_at_lower_priority() {
        let pool = Offload::new(1).expect("pool");
        let (name, nice) = pool
            .run(|| {
                let name = std::thread::current().name().map(String::from);
                let nice = rustix::process::getpriority_process(Some(rustix::thread::gettid()));
                (name, nice)
            })
            .await
            .expect("answered");
        assert_eq!(name.as_deref(), Some("swb-handshake-0"));
        assert_eq!(nice.ok(), Some(HANDSHAKE_NICE));
        // Inline without threads.
        let inline = Offload::inline();
        let here = std::thread::current().id();
        assert_eq!(
            inline.run(move || std::thread::current().id()).await,
            Some(here)
        );
    }

    #[tokio::test]
    async fn a_job_that_panics_loses_its_answer_not_the_thread() {
        let pool = Offload::new(1).expect("pool");
        let lost: Option<()> = pool.run(|| panic!("a bug in one handshake")).await;
        assert_eq!(lost, None);
        assert_eq!(pool.run(|| 7).await, Some(7), "the thread still serves");
    }
}
