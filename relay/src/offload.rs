//! Handshake isolation: the CPU-heavy part of a QUIC handshake — rustls
//! reading the ClientHello and writing the server's first flight (key
//! exchange and the certificate signature), which quinn does inside
//! `Incoming::accept` — runs on its own threads at a lower scheduling
//! priority (nice +10), not on the runtime's workers that carry
//! established sessions. A flood of handshakes then takes the CPU the
//! sessions leave over instead of queueing in front of their packets.
//!
//! Nice +10 is relative to every process on the machine, not only to the
//! relay's workers: where other processes keep every core busy, the
//! threads may get next to nothing, and a reconnect storm would never
//! finish (each client gives up and comes back as another handshake). A
//! job that has waited [`STARVED`] for a thread is therefore taken over by
//! the worker that waits for it — at most [`TAKEOVER`] a second, so a
//! flood that outruns the threads cannot move the handshake work back in
//! front of the sessions.
//!
//! Everything else of a connection stays on the runtime: [`MainRuntime`]
//! makes quinn spawn every connection driver there whichever thread
//! accepted it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send>;
/// A queued job: whoever takes it first runs it (a handshake thread, or
/// the waiting worker once it is [`STARVED`]).
type Slot = Arc<Mutex<Option<Job>>>;

/// How long a job waits for a handshake thread before the worker waiting
/// for it may run it: well inside a client's patience (QUIC's first
/// retransmission of an Initial comes after about a second).
pub(crate) const STARVED: Duration = Duration::from_millis(250);
/// Most jobs the workers take over from starved threads: per second, and
/// at once.
pub(crate) const TAKEOVER: crate::limits::Rate = crate::limits::Rate {
    per_sec: 100.0,
    burst: 100.0,
};

/// Worker threads for handshake work. Dropping the pool ends them once the
/// jobs in their queue are done.
pub(crate) struct Offload {
    tx: Mutex<Option<mpsc::Sender<Slot>>>,
    threads: usize,
    takeover: Mutex<crate::limits::Limiter<()>>,
    /// Jobs the workers took over.
    taken_over: prometheus::IntCounter,
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
    pub(crate) fn inline(taken_over: prometheus::IntCounter) -> Self {
        Self {
            tx: Mutex::new(None),
            threads: 0,
            takeover: Mutex::new(crate::limits::Limiter::new(TAKEOVER, 1)),
            taken_over,
        }
    }

    /// `threads` workers (0: run jobs inline on the caller); the jobs the
    /// workers take over are counted in `taken_over`.
    pub(crate) fn new(threads: usize, taken_over: prometheus::IntCounter) -> std::io::Result<Self> {
        if threads == 0 {
            return Ok(Self::inline(taken_over));
        }
        let (tx, rx) = mpsc::channel::<Slot>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("swb-handshake-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let slot = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        match slot {
                            // Empty: a worker took it over.
                            Ok(slot) => {
                                if let Some(job) = take(&slot) {
                                    run_caught(job);
                                }
                            }
                            Err(_) => return, // the pool was dropped
                        }
                    }
                })?;
        }
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            threads,
            takeover: Mutex::new(crate::limits::Limiter::new(TAKEOVER, 1)),
            taken_over,
        })
    }

    /// Runs `f` on a handshake thread and returns its result (inline when
    /// the pool has no threads or is shutting down, or — within
    /// [`TAKEOVER`] — when no thread has taken it in [`STARVED`]).
    pub(crate) async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        let tx = self.tx.lock().ok().and_then(|t| t.clone());
        let Some(tx) = tx else { return Some(f()) };
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done_tx.send(f());
        });
        let slot: Slot = Arc::new(Mutex::new(Some(job)));
        if tx.send(slot.clone()).is_err() {
            if let Some(job) = take(&slot) {
                run_caught(job);
            }
        }
        tokio::select! {
            r = &mut done_rx => return r.ok(),
            _ = tokio::time::sleep(STARVED) => {}
        }
        // Still queued (a thread took none of the budget otherwise).
        let job = slot.lock().ok().and_then(|mut j| {
            let allowed = j.is_some()
                && self
                    .takeover
                    .lock()
                    .is_ok_and(|mut l| l.take(&(), tokio::time::Instant::now()).is_ok());
            if allowed {
                j.take()
            } else {
                None
            }
        });
        if let Some(job) = job {
            self.taken_over.inc();
            tracing::debug!(waited = ?STARVED, "handshake threads starved: a worker takes the job");
            run_caught(job);
        }
        // `None`: the job panicked (a bug, but one connection's, not the
        // relay's).
        done_rx.await.ok()
    }
}

/// The job in `slot`, unless someone took it.
fn take(slot: &Slot) -> Option<Job> {
    slot.lock().ok().and_then(|mut j| j.take())
}

/// Runs `job`; one that panics loses its answer (its caller sees `None`),
/// not the thread it ran on.
fn run_caught(job: Job) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
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

    fn counter() -> prometheus::IntCounter {
        prometheus::IntCounter::new("taken_over", "jobs taken over").expect("counter")
    }

    /// Queues `job` for the pool's threads, not through `run`.
    fn queue(pool: &Offload, job: Job) {
        let tx = pool.tx.lock().expect("tx").clone().expect("threads");
        tx.send(Arc::new(Mutex::new(Some(job)))).expect("queued");
    }

    /// What `f` returns, run by one of the pool's threads (queued
    /// directly: `run` may take a job over from a slow thread).
    fn on_thread<R: Send + 'static>(pool: &Offload, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (done_tx, done) = std::sync::mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = done_tx.send(f());
        });
        queue(pool, job);
        done.recv().expect("the thread ran it")
    }

    #[tokio::test]
    async fn jobs_run_on_the_handshake_threads_at_lower_priority() {
        let pool = Offload::new(1, counter()).expect("pool");
        let (name, nice) = on_thread(&pool, || {
            let name = std::thread::current().name().map(String::from);
            let nice = rustix::process::getpriority_process(Some(rustix::thread::gettid()));
            (name, nice)
        });
        assert_eq!(name.as_deref(), Some("swb-handshake-0"));
        assert_eq!(nice.ok(), Some(HANDSHAKE_NICE));
        // Inline without threads.
        let inline = Offload::inline(counter());
        let here = std::thread::current().id();
        assert_eq!(
            inline.run(move || std::thread::current().id()).await,
            Some(here)
        );
    }

    /// Keeps the pool's only thread busy (as if other processes kept its
    /// core) until the returned sender is used. Queued directly, not
    /// through `run`: no worker can take it over.
    fn block_the_thread(pool: &Offload) -> std::sync::mpsc::Sender<()> {
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let job: Job = Box::new(move || {
            let _ = started_tx.send(());
            let _ = blocked.recv();
        });
        queue(pool, job);
        started.recv().expect("the thread started the blocking job");
        release
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_the_starved_threads_do_not_take_runs_on_the_worker() {
        let pool = Offload::new(1, counter()).expect("pool");
        let release = block_the_thread(&pool);
        // The next job waits STARVED (paused clock), then runs here.
        let here = std::thread::current().id();
        let t0 = tokio::time::Instant::now();
        let ran_on = pool.run(move || std::thread::current().id()).await;
        assert_eq!(ran_on, Some(here), "taken over by the waiting worker");
        assert!(t0.elapsed() >= STARVED, "only once starved");
        assert_eq!(pool.taken_over.get(), 1, "counted");
        // The thread skips the job taken from it and serves the next one
        // (queued directly: with the clock paused, `run` would take it
        // over before the thread could).
        release.send(()).expect("release");
        let name = on_thread(&pool, || std::thread::current().name().map(String::from));
        assert_eq!(name.as_deref(), Some("swb-handshake-0"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_workers_take_over_at_most_the_takeover_budget() {
        let pool = Arc::new(Offload::new(1, counter()).expect("pool"));
        let release = block_the_thread(&pool);
        // A burst one over the budget, all at once: the budget's worth
        // run on the worker, the last waits for the thread.
        let here = std::thread::current().id();
        let n = TAKEOVER.burst as usize + 1;
        let mut jobs = tokio::task::JoinSet::new();
        for _ in 0..n {
            let pool = pool.clone();
            jobs.spawn(async move { pool.run(move || std::thread::current().id()).await });
        }
        // Past STARVED, well before a new token (the clock is paused:
        // the runtime advances it only while every task waits).
        tokio::time::sleep(STARVED + Duration::from_millis(1)).await;
        let mut taken = 0;
        while let Some(done) = jobs.try_join_next() {
            assert_eq!(done.expect("job task"), Some(here));
            taken += 1;
        }
        assert_eq!(taken, TAKEOVER.burst as usize);
        assert_eq!(pool.taken_over.get(), TAKEOVER.burst as u64);
        assert_eq!(jobs.len(), 1, "over the budget: left to the thread");
        release.send(()).expect("release");
        let last = jobs.join_next().await.expect("one").expect("job task");
        assert!(last.is_some_and(|t| t != here), "run by the thread");
    }

    #[tokio::test]
    async fn a_job_that_panics_loses_its_answer_not_the_thread() {
        let pool = Offload::new(1, counter()).expect("pool");
        let lost: Option<()> = pool.run(|| panic!("a bug in one handshake")).await;
        assert_eq!(lost, None);
        assert_eq!(pool.run(|| 7).await, Some(7), "the thread still serves");
    }
}
