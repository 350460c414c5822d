//! The endpoint → connection event queue.
//!
//! Every connection had a tokio unbounded channel for the events its
//! endpoint hands it (datagrams, rebinds, close): about 800 bytes per
//! connection (the channel's cache-padded state and its first block), held
//! for the connection's life even when idle. One sender (the endpoint) and
//! one receiver (the connection) need much less: a mutex around a queue and
//! the receiver's waker, ~80 bytes.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use crate::ConnectionEvent;

/// A drained queue larger than this gives its buffer back.
const KEEP_CAPACITY: usize = 16;

#[derive(Debug, Default)]
struct State {
    events: VecDeque<Box<ConnectionEvent>>,
    waker: Option<Waker>,
    /// The sender is gone: the receiver reads `None` once the queue is empty.
    sender_gone: bool,
    /// The receiver is gone: sends are dropped.
    receiver_gone: bool,
}

/// A queue of one sender and one receiver.
pub(crate) fn queue() -> (EventSender, EventReceiver) {
    let shared = Arc::new(Mutex::new(State::default()));
    (EventSender(shared.clone()), EventReceiver(shared))
}

/// The endpoint's end.
#[derive(Debug)]
pub(crate) struct EventSender(Arc<Mutex<State>>);

impl EventSender {
    /// Queues `event` and wakes the receiver; the event is dropped if the
    /// receiver is gone.
    pub(crate) fn send(&self, event: Box<ConnectionEvent>) {
        let waker = {
            let mut s = self.0.lock().unwrap();
            if s.receiver_gone {
                return;
            }
            s.events.push_back(event);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        let waker = {
            let mut s = self.0.lock().unwrap();
            s.sender_gone = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The connection's end.
#[derive(Debug)]
pub(crate) struct EventReceiver(Arc<Mutex<State>>);

impl EventReceiver {
    /// The next event; `None` once the sender is gone and nothing is left.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Box<ConnectionEvent>>> {
        let mut s = self.0.lock().unwrap();
        if let Some(e) = s.events.pop_front() {
            if s.events.is_empty() && s.events.capacity() > KEEP_CAPACITY {
                s.events = VecDeque::new();
            }
            return Poll::Ready(Some(e));
        }
        if s.sender_gone {
            return Poll::Ready(None);
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        let events = {
            let mut s = self.0.lock().unwrap();
            s.receiver_gone = true;
            s.waker = None;
            std::mem::take(&mut s.events)
        };
        drop(events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn close(code: u32) -> Box<ConnectionEvent> {
        Box::new(ConnectionEvent::Close {
            error_code: code.into(),
            reason: bytes::Bytes::new(),
        })
    }

    fn code(e: Box<ConnectionEvent>) -> u64 {
        match *e {
            ConnectionEvent::Close { error_code, .. } => error_code.into_inner(),
            _ => panic!("not a close"),
        }
    }

    #[test]
    fn events_arrive_in_order_wake_the_receiver_and_end_with_the_sender() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let (tx, mut rx) = queue();
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.send(close(1));
        tx.send(close(2));
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken once by the first send");
        for want in [1, 2] {
            match rx.poll_recv(&mut cx) {
                Poll::Ready(Some(e)) => assert_eq!(code(e), want),
                other => panic!("expected event {want}, got {other:?}"),
            }
        }
        assert!(rx.poll_recv(&mut cx).is_pending());
        // A burst gives its buffer back once drained.
        for i in 0..100 {
            tx.send(close(i));
        }
        for _ in 0..100 {
            assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(Some(_))));
        }
        assert!(rx.0.lock().unwrap().events.capacity() <= KEEP_CAPACITY);
        tx.send(close(7));
        drop(tx);
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "the sender's drop wakes too");
        match rx.poll_recv(&mut cx) {
            Poll::Ready(Some(e)) => assert_eq!(code(e), 7),
            other => panic!("expected the last event, got {other:?}"),
        }
        assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(None)));
    }

    #[test]
    fn sends_after_the_receiver_is_gone_are_dropped() {
        let (tx, rx) = queue();
        tx.send(close(1));
        drop(rx);
        tx.send(close(2));
        assert!(tx.0.lock().unwrap().events.is_empty());
    }
}
