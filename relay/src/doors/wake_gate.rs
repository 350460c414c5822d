//! A gate between a loop's `select!` and its rarely-woken waits: each wait
//! is polled when it is new or after one of them woke, not at every turn.
//!
//! A `select!` polls every branch it reaches at every turn, whichever one
//! woke the task. Polling a wait that is already armed does nothing but
//! register the same waker again — and for quinn's waits (a new stream, a
//! datagram) that takes the connection's lock, which its driver, on
//! another thread, takes for every packet; for a cancellation token it
//! takes two locks, for the mesh's live set the lock of a waiter list all
//! sessions share. The gate gives its waits one waker of its own, which
//! marks them woken and wakes the task; a turn in which none woke costs a
//! few atomic operations per wait.
//!
//! The waits share that waker (one allocation per gate, whatever the
//! number of waits: memory per idle client), so a wake of any of them has
//! each polled once more. They are meant for waits that rarely fire.

use futures_util::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// See the module's documentation. Its waits are numbered `0..8`; a wait
/// made anew in place of one that completed is [`armed`](WakeGate::arm).
pub(crate) struct WakeGate {
    flag: Arc<Flag>,
    /// The waker the waits register: made once, so a wait sees the same
    /// waker at every poll.
    waker: Waker,
    /// The waits to poll when next reached (a bit each). Touched only by
    /// the task that polls; atomic so the loop's future stays `Send`.
    due: AtomicU8,
}

struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl WakeGate {
    /// A gate whose waits are each polled when first reached.
    pub(crate) fn new() -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(flag.clone());
        Self {
            flag,
            waker,
            due: AtomicU8::new(u8::MAX),
        }
    }

    /// Wait `i` is polled when next reached (a wait made anew).
    pub(crate) fn arm(&self, i: u8) {
        self.due.fetch_or(1 << i, Ordering::Relaxed);
    }

    /// Polls wait `i` if it is due — new, or one of the gate's waits woke
    /// since it was last polled; else `Pending`, with the task's waker
    /// registered.
    pub(crate) fn poll<F: Future + ?Sized>(
        &self,
        cx: &mut Context<'_>,
        i: u8,
        wait: Pin<&mut F>,
    ) -> Poll<F::Output> {
        // The task's waker first, then the flag: a wake in between is seen
        // here or wakes the task again.
        self.flag.task.register(cx.waker());
        if self.flag.woken.swap(false, Ordering::AcqRel) {
            // Which one is not known: each is due once. A wait not reached
            // at this turn stays due until it is.
            self.due.store(u8::MAX, Ordering::Relaxed);
        }
        let bit = 1 << i;
        if self.due.fetch_and(!bit, Ordering::Relaxed) & bit == 0 {
            return Poll::Pending;
        }
        wait.poll(&mut Context::from_waker(&self.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A wait that counts its polls and is ready once fired.
    #[derive(Default)]
    struct Wait {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: std::sync::Mutex<Option<Waker>>,
    }

    impl Wait {
        fn fire(&self) {
            self.ready.store(true, Ordering::SeqCst);
            if let Some(w) = self.waker.lock().unwrap().take() {
                w.wake();
            }
        }
        fn polls(&self) -> usize {
            self.polls.load(Ordering::SeqCst)
        }
    }

    struct WaitRef<'a>(&'a Wait);

    impl Future for WaitRef<'_> {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.polls.fetch_add(1, Ordering::SeqCst);
            if self.0.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.0.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// The task's waker: counts its wakes.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task() -> (Arc<Task>, Waker) {
        let t = Arc::new(Task::default());
        let w = Waker::from(t.clone());
        (t, w)
    }

    #[test]
    fn waits_are_polled_first_then_only_once_one_woke() {
        let gate = WakeGate::new();
        let (a, b) = (Wait::default(), Wait::default());
        let mut fa = std::pin::pin!(WaitRef(&a));
        let mut fb = std::pin::pin!(WaitRef(&b));
        let (task, waker) = task();
        let mut cx = Context::from_waker(&waker);

        for _ in 0..5 {
            assert!(gate.poll(&mut cx, 0, fa.as_mut()).is_pending());
            assert!(gate.poll(&mut cx, 1, fb.as_mut()).is_pending());
        }
        assert_eq!((a.polls(), b.polls()), (1, 1), "polled when new only");
        assert_eq!(task.0.load(Ordering::SeqCst), 0);

        b.fire();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "a wake wakes the task");
        assert!(gate.poll(&mut cx, 0, fa.as_mut()).is_pending());
        assert!(gate.poll(&mut cx, 1, fb.as_mut()).is_ready());
        assert_eq!((a.polls(), b.polls()), (2, 2), "each polled once more");
    }

    #[test]
    fn a_wait_not_reached_after_a_wake_stays_due() {
        let gate = WakeGate::new();
        let (a, b) = (Wait::default(), Wait::default());
        let mut fa = std::pin::pin!(WaitRef(&a));
        let mut fb = std::pin::pin!(WaitRef(&b));
        let (_task, waker) = task();
        let mut cx = Context::from_waker(&waker);
        assert!(gate.poll(&mut cx, 0, fa.as_mut()).is_pending());
        assert!(gate.poll(&mut cx, 1, fb.as_mut()).is_pending());

        // `b` fires, but this turn ends at `a` (another branch was ready
        // in between): `b` is polled at a later turn.
        b.fire();
        assert!(gate.poll(&mut cx, 0, fa.as_mut()).is_pending());
        assert!(gate.poll(&mut cx, 0, fa.as_mut()).is_pending());
        assert_eq!(a.polls(), 2, "`a` due once, not at every turn");
        assert!(gate.poll(&mut cx, 1, fb.as_mut()).is_ready());
    }

    #[test]
    fn a_wait_made_anew_is_polled_once_armed() {
        let gate = WakeGate::new();
        let (_task, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let first = Wait::default();
        first.fire();
        assert!(gate
            .poll(&mut cx, 0, std::pin::pin!(WaitRef(&first)))
            .is_ready());

        let second = Wait::default();
        second.ready.store(true, Ordering::SeqCst);
        let mut fut = std::pin::pin!(WaitRef(&second));
        assert!(
            gate.poll(&mut cx, 0, fut.as_mut()).is_pending(),
            "not woken, not armed: not polled"
        );
        assert_eq!(second.polls(), 0);
        gate.arm(0);
        assert!(gate.poll(&mut cx, 0, fut.as_mut()).is_ready());
        assert_eq!(second.polls(), 1);
    }

    #[tokio::test]
    async fn a_wake_from_another_thread_reaches_the_task() {
        let gate = WakeGate::new();
        let wait = Arc::new(Wait::default());
        let waiter = wait.clone();
        let mut fut = std::pin::pin!(WaitRef(&waiter));
        // Polled once (it is new), and pending, before the thread fires it.
        let first = std::future::poll_fn(|cx| Poll::Ready(gate.poll(cx, 0, fut.as_mut()))).await;
        assert!(first.is_pending());
        let firing = std::thread::spawn({
            let wait = wait.clone();
            move || wait.fire()
        });
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            std::future::poll_fn(|cx| gate.poll(cx, 0, fut.as_mut())),
        )
        .await
        .expect("the gate passed the wake on");
        firing.join().unwrap();
    }
}
