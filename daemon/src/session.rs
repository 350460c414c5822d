//! The daemon's session with its relay as a sans-IO state machine: what to
//! write when a connection starts (unanswered sends again, with the same
//! ids; pending acknowledgements), what each frame from the relay means,
//! and where to go when the relay goes away (the next relay on the ring
//! from the last relay map) or says to (a redirect). No sockets and no
//! clock: the connection actor feeds it, unit tests drive it directly.

use crate::inbox::{Identity, Inbox, Pushed};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use swb_wire::{
    Ack, Code, Deliver, Frame, MessageId, Refusal, RelayMapPages, RelayRecord, Send, MAX_ACK_IDS,
};
use tokio::sync::oneshot;

/// Result of a send as the relay answered it: `Ok(online)` or the refusal.
pub(crate) type SendResult = Result<bool, Refusal>;

/// Redirects followed in a row before backing off (relays that disagree
/// about the mesh would otherwise bounce a daemon between them).
pub(crate) const MAX_REDIRECTS: u32 = 4;

/// Commands from the control server and the Rust API.
#[derive(Debug)]
pub(crate) enum Cmd {
    Send {
        to: Arc<str>,
        id: MessageId,
        body: Bytes,
        reply: oneshot::Sender<SendResult>,
        /// Already written by its caller (see [`crate::outbound`]).
        written: Option<Written>,
    },
    /// Sends answered together: one reply when the relay has answered
    /// every one. Their request numbers follow one another from
    /// `written.req` (or from the actor's next ones).
    SendBatch {
        items: Vec<BatchItem>,
        reply: oneshot::Sender<Vec<SendResult>>,
        /// Already written by its caller (see [`crate::outbound`]).
        written: Option<Written>,
    },
    /// Messages the application acknowledged: the connection actor marks
    /// them in the inbox (only its thread touches the inbox's sets) and
    /// tells the relay.
    Ack(Vec<Identity>),
    /// Messages the application acknowledged and whose acknowledgement its
    /// caller wrote itself (see [`crate::outbound`]): the actor only marks
    /// them in the inbox. One lost with its connection is sent again when
    /// the relay delivers the message again (the inbox knows it as acked).
    AckWritten(Vec<Identity>),
    /// The TUN address index of a peer (the name responder).
    TunResolve {
        name: String,
        reply: oneshot::Sender<Option<u32>>,
    },
}

/// One send of a [`Cmd::SendBatch`].
#[derive(Debug)]
pub(crate) struct BatchItem {
    /// A batch's sends to one peer share its name.
    pub(crate) to: Arc<str>,
    pub(crate) id: MessageId,
    pub(crate) body: Bytes,
}

/// A send its caller wrote itself: with which request number (the first
/// of a batch's), on which connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    pub(crate) req: u64,
    pub(crate) link: u64,
}

struct PendingSend {
    to: Arc<str>,
    id: MessageId,
    body: Bytes,
    reply: Reply,
}

/// Who waits for a send's answer.
enum Reply {
    One(oneshot::Sender<SendResult>),
    /// The batch filed under this first request number; the send's place
    /// in it is how far its own number is past that.
    Batch(u64),
}

/// A batch some of whose sends are unanswered.
struct Batch {
    results: Vec<Option<SendResult>>,
    left: usize,
    reply: oneshot::Sender<Vec<SendResult>>,
}

/// The frame of a send.
fn send_frame(req: u64, id: MessageId, to: &str, body: &Bytes) -> Frame {
    Frame::Send(Send {
        req,
        id,
        to: to.to_owned(),
        body: body.clone(),
    })
}

/// One delivered message into the inbox. Returns its id if the relay must
/// hear the acknowledgement again (the application took it before).
fn deliver(d: Deliver, inbox: &mut Inbox, fx: &mut Effects) -> Option<MessageId> {
    let id = d.id;
    match inbox.push(d) {
        Pushed::New => fx.received += 1,
        Pushed::Duplicate => tracing::debug!(%id, "duplicate delivery dropped"),
        Pushed::Reack => return Some(id),
    }
    None
}

/// Refusal codes that retrying cannot fix: the daemon stops.
pub(crate) fn is_fatal(code: Code) -> bool {
    matches!(
        code,
        Code::UNAUTHORIZED
            | Code::KEY_REVOKED
            | Code::BAD_NAME
            | Code::UNSUPPORTED_VERSION
            | Code::REPLACED
            | Code::NAME_NOT_ALLOWED
    )
}

/// Why a session ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// The relay refused in a way retrying cannot fix.
    Fatal(Refusal),
    /// The connection is gone; reconnect (the reason, for the log).
    Lost(String),
    /// Our home moved to another relay: go there.
    Redirect(RelayRecord),
    /// This daemon attached again on another connection (a probe's, or a
    /// reconnect the relay read late): this one ends, the daemon goes on.
    Moved(Refusal),
}

/// What handling frames changed, for the actor to report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Effects {
    /// New messages in the inbox.
    pub(crate) received: usize,
    /// Sends the relay accepted.
    pub(crate) accepted: usize,
    /// Sends the relay refused.
    pub(crate) refused: usize,
    /// The relay map changed (complete).
    pub(crate) map_changed: bool,
}

/// Request numbers, one counter for the actor and for the callers that
/// write their own sends (a number is never given twice).
#[derive(Debug, Default)]
pub(crate) struct Reqs(AtomicU64);

impl Reqs {
    /// The next request number (the first is 1).
    pub(crate) fn next(&self) -> u64 {
        self.take(1)
    }

    /// `n` request numbers in a row; the first of them.
    pub(crate) fn take(&self, n: usize) -> u64 {
        self.0.fetch_add(n as u64, Ordering::Relaxed) + 1
    }
}

/// The session state that outlives connections.
#[derive(Default)]
pub(crate) struct SessionCore {
    /// Unanswered sends by request number. Answers come in about the order
    /// of sending but a hash table costs less per send than a B-tree; the
    /// rare resend on a new connection sorts them.
    pending: HashMap<u64, PendingSend, ahash::RandomState>,
    /// Batches with sends in `pending`, by their first request number.
    batches: HashMap<u64, Batch, ahash::RandomState>,
    /// Request numbers, shared with the callers that write their own sends.
    reqs: Arc<Reqs>,
    pending_acks: Vec<MessageId>,
    /// Live relays, as the last relay told us.
    map: Vec<RelayRecord>,
    pages: RelayMapPages,
    /// Redirects followed in a row.
    redirects: u32,
    /// Name lookups waiting for the relay, by request number.
    resolving: BTreeMap<u64, (String, oneshot::Sender<Option<u32>>)>,
}

impl SessionCore {
    /// A core taking request numbers from `reqs`.
    pub(crate) fn new(reqs: Arc<Reqs>) -> Self {
        Self {
            reqs,
            ..Self::default()
        }
    }

    /// A command from the control side, taken while connection `current`
    /// is served (if any); the frames to write now go to `out`. Sends their
    /// caller wrote on `current` need none.
    pub(crate) fn absorb(&mut self, cmd: Cmd, current: Option<u64>, out: &mut Vec<Frame>) {
        match cmd {
            Cmd::Send {
                to,
                id,
                body,
                reply,
                written,
            } => {
                let req = match written {
                    Some(w) => w.req,
                    None => self.reqs.next(),
                };
                let p = PendingSend {
                    to,
                    id,
                    body,
                    reply: Reply::One(reply),
                };
                let on_wire = matches!(written, Some(w) if Some(w.link) == current);
                self.file(req, p, on_wire, out);
            }
            Cmd::SendBatch {
                items,
                reply,
                written,
            } => {
                if items.is_empty() {
                    let _ = reply.send(Vec::new());
                    return;
                }
                let first = match written {
                    Some(w) => w.req,
                    None => self.reqs.take(items.len()),
                };
                let on_wire = matches!(written, Some(w) if Some(w.link) == current);
                self.batches.insert(
                    first,
                    Batch {
                        results: vec![None; items.len()],
                        left: items.len(),
                        reply,
                    },
                );
                for (req, BatchItem { to, id, body }) in (first..).zip(items) {
                    let reply = Reply::Batch(first);
                    let p = PendingSend {
                        to,
                        id,
                        body,
                        reply,
                    };
                    self.file(req, p, on_wire, out);
                }
            }
            Cmd::Ack(acked) => {
                self.pending_acks.extend(acked.iter().map(|a| a.id));
            }
            // On the wire already; the inbox was told (`mark_acked`).
            Cmd::AckWritten(_) => {}
            Cmd::TunResolve { name, reply } => {
                let req = self.reqs.next();
                out.push(Frame::TunResolve(swb_wire::TunResolve {
                    req,
                    name: name.clone(),
                }));
                self.resolving.insert(req, (name, reply));
            }
        }
    }

    /// Files send `req` as unanswered; its frame goes to `out` unless its
    /// caller wrote it on the connection served (`on_wire`).
    fn file(&mut self, req: u64, p: PendingSend, on_wire: bool, out: &mut Vec<Frame>) {
        if !on_wire {
            out.push(send_frame(req, p.id, &p.to, &p.body));
        }
        self.pending.insert(req, p);
    }

    /// The relay's answer to request `req`, to whoever waits for it.
    fn answer(&mut self, req: u64, result: SendResult) {
        let Some(p) = self.pending.remove(&req) else {
            return;
        };
        match p.reply {
            Reply::One(reply) => {
                let _ = reply.send(result);
            }
            Reply::Batch(batch) => {
                let Some(b) = self.batches.get_mut(&batch) else {
                    return;
                };
                let index = usize::try_from(req - batch).unwrap_or(usize::MAX);
                if let Some(slot) = b.results.get_mut(index) {
                    if slot.replace(result).is_none() {
                        b.left -= 1;
                    }
                }
                if b.left == 0 {
                    if let Some(b) = self.batches.remove(&batch) {
                        let _ = b.reply.send(b.results.into_iter().flatten().collect());
                    }
                }
            }
        }
    }

    /// Acknowledgements waiting to be written, as frames.
    pub(crate) fn take_acks(&mut self) -> Vec<Frame> {
        let acks = std::mem::take(&mut self.pending_acks);
        acks.chunks(swb_wire::MAX_ACK_IDS)
            .map(|c| Frame::Ack(Ack { ids: c.to_vec() }))
            .collect()
    }

    /// What a new connection starts with: every send still unanswered (with
    /// its id, so the relay recognises a retry; sends nobody waits for any
    /// more are dropped) and the pending acknowledgements.
    pub(crate) fn on_connected(&mut self) -> Vec<Frame> {
        self.redirects = 0;
        self.batches.retain(|_, b| !b.reply.is_closed());
        let batches = &self.batches;
        self.pending.retain(|_, p| match &p.reply {
            Reply::One(reply) => !reply.is_closed(),
            Reply::Batch(batch) => batches.contains_key(batch),
        });
        // In the order they were first sent.
        let mut unanswered: Vec<(&u64, &PendingSend)> = self.pending.iter().collect();
        unanswered.sort_unstable_by_key(|(req, _)| **req);
        let mut out: Vec<Frame> = unanswered
            .into_iter()
            .map(|(req, p)| send_frame(*req, p.id, &p.to, &p.body))
            .collect();
        out.extend(self.take_acks());
        self.resolving.retain(|_, (_, r)| !r.is_closed());
        out.extend(self.resolving.iter().map(|(req, (name, _))| {
            Frame::TunResolve(swb_wire::TunResolve {
                req: *req,
                name: name.clone(),
            })
        }));
        out
    }

    /// A redirect was followed; whether to back off now (too many in a row).
    pub(crate) fn redirected(&mut self) -> bool {
        self.redirects += 1;
        self.redirects > MAX_REDIRECTS
    }

    /// Redirects followed in a row.
    pub(crate) fn redirects(&self) -> u32 {
        self.redirects
    }

    /// Sends waiting for the relay's answer.
    pub(crate) fn pending_sends(&self) -> usize {
        self.pending.len()
    }

    /// Relays in the last relay map.
    pub(crate) fn relay_count(&self) -> usize {
        self.map.len()
    }

    /// One frame from the relay: frames to answer with go to `out`.
    pub(crate) fn on_frame(
        &mut self,
        f: Frame,
        inbox: &mut Inbox,
        out: &mut Vec<Frame>,
        fx: &mut Effects,
    ) -> Result<(), End> {
        match f {
            Frame::SendAccepted(a) => {
                fx.accepted += 1;
                self.answer(a.req, Ok(a.online));
            }
            Frame::SendsAccepted(b) => {
                fx.accepted += b.accepted.len();
                for a in b.accepted {
                    self.answer(a.req, Ok(a.online));
                }
            }
            Frame::SendRefused(r) => {
                fx.refused += 1;
                self.answer(r.req, Err(r.refusal));
            }
            Frame::Deliver(d) => {
                if let Some(id) = deliver(d, inbox, fx) {
                    out.push(Frame::Ack(Ack { ids: vec![id] }));
                }
            }
            Frame::Deliveries(b) => {
                let mut reack = Vec::new();
                for d in b.into_delivers() {
                    reack.extend(deliver(d, inbox, fx));
                }
                for ids in reack.chunks(MAX_ACK_IDS) {
                    out.push(Frame::Ack(Ack { ids: ids.to_vec() }));
                }
            }
            Frame::Ping(p) => out.push(Frame::Pong(p)),
            Frame::Pong(_) => {}
            Frame::TunResolved(r) => {
                if let Some((_, reply)) = self.resolving.remove(&r.req) {
                    let _ = reply.send(r.index);
                }
            }
            Frame::RelayMap(page) => {
                if let Some(map) = self.pages.add(page) {
                    self.map = map;
                    fx.map_changed = true;
                }
            }
            Frame::Redirect(r) if !r.addrs.is_empty() => return Err(End::Redirect(r)),
            Frame::Goodbye(r) if r.code == Code::MOVED => return Err(End::Moved(r)),
            Frame::Goodbye(r) => {
                return Err(if is_fatal(r.code) {
                    End::Fatal(r)
                } else {
                    End::Lost(r.to_string())
                });
            }
            other => {
                return Err(End::Lost(format!(
                    "relay sent an unexpected {:?} frame",
                    other.frame_type()
                )))
            }
        }
        Ok(())
    }

    /// The relay that takes over `name` of `namespace` after relay `lost`
    /// is gone: the next live one on the ring of the last relay map.
    pub(crate) fn successor(&self, namespace: &str, name: &str, lost: &str) -> Option<RelayRecord> {
        if self.map.len() < 2 {
            return None;
        }
        let ring = swb_ring::Ring::new(self.map.iter().map(|r| r.id.clone()));
        let next = ring
            .ranked(namespace, name)
            .into_iter()
            .find(|id| *id != lost)?;
        self.map.iter().find(|r| r.id == next).cloned()
    }

    /// The incarnation (start time) of relay `id` in the last relay map.
    pub(crate) fn incarnation(&self, id: &str) -> Option<u64> {
        self.map.iter().find(|r| r.id == id).map(|r| r.incarnation)
    }

    /// Answers every unanswered send with `refusal` (the daemon stops).
    pub(crate) fn fail_pending(&mut self, refusal: &Refusal) {
        let reqs: Vec<u64> = self.pending.keys().copied().collect();
        for req in reqs {
            self.answer(req, Err(refusal.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swb_wire::{Deliver, RelayMap, SendAccepted, SendRefused};

    fn rec(id: &str) -> RelayRecord {
        RelayRecord {
            id: id.into(),
            addrs: vec![format!("{id}:7443")],
            fingerprint: format!("sha256:{id}"),
            incarnation: 1,
        }
    }

    /// The frames absorbing `cmd` writes.
    fn absorbed(core: &mut SessionCore, cmd: Cmd, current: Option<u64>) -> Vec<Frame> {
        let mut out = Vec::new();
        core.absorb(cmd, current, &mut out);
        out
    }

    fn send(core: &mut SessionCore, to: &str, n: u8) -> (oneshot::Receiver<SendResult>, Frame) {
        let (tx, rx) = oneshot::channel();
        let cmd = Cmd::Send {
            to: to.into(),
            id: MessageId([n; 16]),
            body: Bytes::from(vec![n]),
            reply: tx,
            written: None,
        };
        let mut f = absorbed(core, cmd, Some(1));
        assert_eq!(f.len(), 1, "a send is written at once");
        (rx, f.remove(0))
    }

    fn req_of(f: &Frame) -> u64 {
        match f {
            Frame::Send(s) => s.req,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unanswered_sends_are_resent_with_their_ids_on_the_next_connection() {
        let mut core = SessionCore::default();
        let (mut a_rx, a) = send(&mut core, "london", 1);
        let (_b_rx, b) = send(&mut core, "london", 2);
        let (c_rx, _c) = send(&mut core, "paris", 3);
        drop(c_rx); // nobody waits for this one any more
        let nine = Deliver {
            id: MessageId([9; 16]),
            from: "rome".into(),
            body: Bytes::new(),
            sent_at_ms: 0,
        };
        assert!(absorbed(&mut core, Cmd::Ack(vec![Identity::of(&nine)]), Some(1)).is_empty());
        // The relay answers `a`; the connection drops before `b`.
        let mut inbox = Inbox::default();
        let (mut out, mut fx) = (Vec::new(), Effects::default());
        let accepted = Frame::SendAccepted(SendAccepted {
            req: req_of(&a),
            id: MessageId([1; 16]),
            online: true,
        });
        core.on_frame(accepted, &mut inbox, &mut out, &mut fx)
            .expect("an answer");
        assert_eq!(a_rx.try_recv(), Ok(Ok(true)));
        assert_eq!(fx.accepted, 1);
        let again = core.on_connected();
        assert_eq!(again.len(), 2, "b again, and the ack: {again:?}");
        match &again[0] {
            Frame::Send(s) => {
                assert_eq!(
                    (s.req, s.id, s.to.as_str()),
                    (req_of(&b), MessageId([2; 16]), "london")
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&again[1], Frame::Ack(a) if a.ids == vec![MessageId([9; 16])]));
        assert_eq!(core.pending_sends(), 1);
        assert!(core.take_acks().is_empty(), "acks go out once");
    }

    #[test]
    fn unanswered_sends_are_resent_in_the_order_they_were_sent() {
        let mut core = SessionCore::default();
        let waiting: Vec<_> = (0..200u8).map(|n| send(&mut core, "london", n)).collect();
        let sent: Vec<u64> = waiting.iter().map(|(_, f)| req_of(f)).collect();
        let again: Vec<u64> = core.on_connected().iter().map(req_of).collect();
        assert_eq!(again, sent);
    }

    #[test]
    fn one_frame_answers_a_run_of_sends_each_to_its_caller() {
        let mut core = SessionCore::default();
        let (mut a_rx, a) = send(&mut core, "london", 1);
        let (mut b_rx, _b) = send(&mut core, "london", 2);
        let (mut c_rx, c) = send(&mut core, "paris", 3);
        let (mut inbox, mut out, mut fx) = (Inbox::default(), Vec::new(), Effects::default());
        let answers = Frame::SendsAccepted(swb_wire::SendsAccepted {
            accepted: vec![
                swb_wire::Accepted {
                    req: req_of(&c),
                    online: false,
                },
                swb_wire::Accepted {
                    req: req_of(&a),
                    online: true,
                },
                // A request number this daemon does not wait for (an
                // answer to a send given up meanwhile) is passed over.
                swb_wire::Accepted {
                    req: 999,
                    online: true,
                },
            ],
        });
        core.on_frame(answers, &mut inbox, &mut out, &mut fx)
            .expect("answers");
        assert_eq!(a_rx.try_recv(), Ok(Ok(true)));
        assert_eq!(c_rx.try_recv(), Ok(Ok(false)));
        assert!(b_rx.try_recv().is_err(), "b is not answered yet");
        assert_eq!(core.pending_sends(), 1);
        assert!(out.is_empty());
        // Only b is written again on the next connection.
        let again = core.on_connected();
        assert_eq!(again.len(), 1, "{again:?}");
        assert!(matches!(&again[0], Frame::Send(s) if s.id == MessageId([2; 16])));
    }

    #[test]
    fn a_send_its_caller_wrote_is_remembered_and_written_again_only_on_another_connection() {
        let reqs = Arc::new(Reqs::default());
        let mut core = SessionCore::new(reqs.clone());
        let (_queued_rx, queued) = send(&mut core, "london", 1);
        // A caller wrote this one on connection 1 with the next number.
        let req = reqs.next();
        assert_ne!(req, req_of(&queued), "one counter for both paths");
        let (tx, mut rx) = oneshot::channel();
        let own = |reply| Cmd::Send {
            to: "paris".into(),
            id: MessageId([2; 16]),
            body: Bytes::from_static(b"hi"),
            reply,
            written: Some(Written { req, link: 1 }),
        };
        assert!(
            absorbed(&mut core, own(tx), Some(1)).is_empty(),
            "already on the wire"
        );
        assert_eq!(core.pending_sends(), 2);
        // Its answer reaches its caller.
        let (mut inbox, mut out, mut fx) = (Inbox::default(), Vec::new(), Effects::default());
        let accepted = Frame::SendAccepted(SendAccepted {
            req,
            id: MessageId([2; 16]),
            online: false,
        });
        core.on_frame(accepted, &mut inbox, &mut out, &mut fx)
            .expect("an answer");
        assert_eq!(rx.try_recv(), Ok(Ok(false)));
        // Taken only after connection 1 was lost (or while dialing): the
        // frame went to a dead connection and is written again, with its
        // number.
        let mut waiting = Vec::new();
        for current in [Some(2), None] {
            let (tx, rx) = oneshot::channel();
            waiting.push(rx);
            let f = absorbed(&mut core, own(tx), current);
            assert_eq!(
                f.iter().map(req_of).collect::<Vec<_>>(),
                vec![req],
                "written again"
            );
        }
        // And every unanswered one goes again on the next connection.
        let again: Vec<u64> = core.on_connected().iter().map(req_of).collect();
        assert_eq!(again, vec![req_of(&queued), req]);
    }

    fn batch(
        core: &mut SessionCore,
        n: u8,
        current: Option<u64>,
    ) -> (oneshot::Receiver<Vec<SendResult>>, Vec<Frame>) {
        let (tx, rx) = oneshot::channel();
        let items = (0..n)
            .map(|i| BatchItem {
                to: Arc::from("london"),
                id: MessageId([i; 16]),
                body: Bytes::from(vec![i]),
            })
            .collect();
        let cmd = Cmd::SendBatch {
            items,
            reply: tx,
            written: None,
        };
        (rx, absorbed(core, cmd, current))
    }

    #[test]
    fn a_batch_is_answered_once_every_send_is_and_resent_send_by_send() {
        let mut core = SessionCore::default();
        let (mut rx, frames) = batch(&mut core, 3, Some(1));
        let reqs: Vec<u64> = frames.iter().map(req_of).collect();
        assert_eq!(
            reqs,
            vec![1, 2, 3],
            "numbers in a row, in the batch's order"
        );
        let (mut inbox, mut out, mut fx) = (Inbox::default(), Vec::new(), Effects::default());
        let refused = Refusal::new(Code::MAILBOX_FULL, "full");
        let frames = [
            Frame::SendsAccepted(swb_wire::SendsAccepted {
                accepted: vec![swb_wire::Accepted {
                    req: 3,
                    online: true,
                }],
            }),
            Frame::SendRefused(SendRefused {
                req: 1,
                refusal: refused.clone(),
            }),
        ];
        for f in frames {
            core.on_frame(f, &mut inbox, &mut out, &mut fx)
                .expect("answers");
        }
        assert!(rx.try_recv().is_err(), "not before every send is answered");
        // The connection is lost: the unanswered one goes again, alone.
        let again = core.on_connected();
        assert_eq!(again.iter().map(req_of).collect::<Vec<_>>(), vec![2]);
        assert!(matches!(&again[0], Frame::Send(s) if s.id == MessageId([1; 16])));
        let accepted = Frame::SendAccepted(SendAccepted {
            req: 2,
            id: MessageId([1; 16]),
            online: false,
        });
        core.on_frame(accepted, &mut inbox, &mut out, &mut fx)
            .expect("an answer");
        assert_eq!(
            rx.try_recv(),
            Ok(vec![Err(refused), Ok(false), Ok(true)]),
            "each answer in its send's place"
        );
        assert_eq!(core.pending_sends(), 0);
        assert!(core.batches.is_empty());
    }

    #[test]
    fn a_batch_nobody_waits_for_is_dropped_and_a_stopping_daemon_answers_the_rest() {
        let mut core = SessionCore::default();
        // Taken while dialing: nothing written yet, all written on connect.
        let (gone, frames) = batch(&mut core, 2, None);
        assert_eq!(frames.len(), 2, "the actor writes what no caller wrote");
        drop(gone);
        let (mut kept, _) = batch(&mut core, 2, None);
        let again = core.on_connected();
        assert_eq!(again.iter().map(req_of).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(core.pending_sends(), 2);
        let stop = Refusal::new(Code::UNAUTHORIZED, "revoked");
        core.fail_pending(&stop);
        assert_eq!(kept.try_recv(), Ok(vec![Err(stop.clone()), Err(stop)]));
        assert!(core.batches.is_empty());
        // An empty batch is answered at once and takes no number.
        let (mut empty, frames) = batch(&mut core, 0, Some(1));
        assert!(frames.is_empty());
        assert_eq!(empty.try_recv(), Ok(vec![]));
        assert_eq!(core.reqs.next(), 5);
    }

    #[test]
    fn refusals_reach_their_sender_and_fatal_goodbyes_end_the_session() {
        let mut core = SessionCore::default();
        let (mut rx, f) = send(&mut core, "london", 1);
        let (mut inbox, mut out, mut fx) = (Inbox::default(), Vec::new(), Effects::default());
        let refusal = Refusal::new(Code::MAILBOX_FULL, "full");
        core.on_frame(
            Frame::SendRefused(SendRefused {
                req: req_of(&f),
                refusal: refusal.clone(),
            }),
            &mut inbox,
            &mut out,
            &mut fx,
        )
        .expect("an answer");
        assert_eq!(rx.try_recv(), Ok(Err(refusal)));
        let revoked = Refusal::new(Code::KEY_REVOKED, "revoked");
        assert_eq!(
            core.on_frame(
                Frame::Goodbye(revoked.clone()),
                &mut inbox,
                &mut out,
                &mut fx
            ),
            Err(End::Fatal(revoked))
        );
        let shutting = Refusal::new(Code::SHUTTING_DOWN, "bye");
        assert!(matches!(
            core.on_frame(Frame::Goodbye(shutting), &mut inbox, &mut out, &mut fx),
            Err(End::Lost(_))
        ));
        // Another daemon took the name: stop. This one attached again on
        // another connection: go on there.
        let replaced = Refusal::new(Code::REPLACED, "another daemon");
        assert_eq!(
            core.on_frame(
                Frame::Goodbye(replaced.clone()),
                &mut inbox,
                &mut out,
                &mut fx
            ),
            Err(End::Fatal(replaced))
        );
        let moved = Refusal::new(Code::MOVED, "this daemon again");
        assert_eq!(
            core.on_frame(Frame::Goodbye(moved.clone()), &mut inbox, &mut out, &mut fx),
            Err(End::Moved(moved))
        );
    }

    #[test]
    fn deliveries_land_in_the_inbox_once_and_pings_are_answered() {
        let mut core = SessionCore::default();
        let (mut inbox, mut out, mut fx) = (Inbox::default(), Vec::new(), Effects::default());
        let d = Deliver {
            id: MessageId([7; 16]),
            from: "paris".into(),
            body: Bytes::from_static(b"hi"),
            sent_at_ms: 1,
        };
        core.on_frame(Frame::Deliver(d.clone()), &mut inbox, &mut out, &mut fx)
            .expect("deliver");
        core.on_frame(Frame::Deliver(d), &mut inbox, &mut out, &mut fx)
            .expect("again");
        assert_eq!((fx.received, inbox.len()), (1, 1), "a duplicate is dropped");
        core.on_frame(
            Frame::Ping(swb_wire::Ping { nonce: 5 }),
            &mut inbox,
            &mut out,
            &mut fx,
        )
        .expect("ping");
        assert_eq!(out, vec![Frame::Pong(swb_wire::Ping { nonce: 5 })]);
    }

    #[test]
    fn a_deliveries_frame_fills_the_inbox_in_order_and_reacks_in_one_frame() {
        use swb_wire::{Delivered, Deliveries, DeliveryRun};
        let mut core = SessionCore::default();
        let (mut inbox, mut out, mut fx) = (Inbox::default(), Vec::new(), Effects::default());
        let msg = |n: u8| Delivered {
            id: MessageId([n; 16]),
            body: Bytes::from(vec![n]),
            sent_at_ms: u64::from(n),
        };
        let run = |from: &str, ns: &[u8]| DeliveryRun {
            from: from.into(),
            msgs: ns.iter().map(|&n| msg(n)).collect(),
        };
        let frame = Deliveries {
            runs: vec![run("paris", &[1, 2]), run("rome", &[3]), run("paris", &[4])],
        };
        core.on_frame(
            Frame::Deliveries(frame.clone()),
            &mut inbox,
            &mut out,
            &mut fx,
        )
        .expect("deliveries");
        assert_eq!(fx.received, 4);
        assert!(out.is_empty(), "nothing to acknowledge again yet");
        let got = inbox.take(10);
        let seen: Vec<(&str, u8, &[u8], u64)> = got
            .iter()
            .map(|d| (&d.from[..], d.id.0[0], &d.body[..], d.sent_at_ms))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("paris", 1, &[1u8][..], 1),
                ("paris", 2, &[2][..], 2),
                ("rome", 3, &[3][..], 3),
                ("paris", 4, &[4][..], 4),
            ]
        );
        // The application took them; the acknowledgement was lost and the
        // relay delivers all four again: one Ack frame says so again.
        inbox.acked(got.iter().map(Identity::of));
        core.on_frame(Frame::Deliveries(frame), &mut inbox, &mut out, &mut fx)
            .expect("again");
        assert_eq!((fx.received, inbox.len()), (4, 0));
        let ids: Vec<MessageId> = [1, 2, 3, 4].map(|n| MessageId([n; 16])).to_vec();
        assert_eq!(out, vec![Frame::Ack(Ack { ids })]);
    }

    #[test]
    fn relay_map_pages_then_redirects_and_rehoming_on_the_ring() {
        let mut core = SessionCore::default();
        let (mut inbox, mut out, mut fx) = (Inbox::default(), Vec::new(), Effects::default());
        let all: Vec<RelayRecord> = ["r1", "r2", "r3"].iter().map(|i| rec(i)).collect();
        // A map in two pages is taken only when whole.
        for (i, page) in [&all[..2], &all[2..]].into_iter().enumerate() {
            let f = Frame::RelayMap(RelayMap {
                relays: page.to_vec(),
                more: i == 0,
            });
            core.on_frame(f, &mut inbox, &mut out, &mut fx)
                .expect("map");
            assert_eq!(core.relay_count(), if i == 0 { 0 } else { 3 });
        }
        assert!(fx.map_changed);
        // Losing the home relay: the next one on the ring takes over.
        let ring = swb_ring::Ring::new(["r1", "r2", "r3"]);
        let ranked = ring.ranked("acme", "london");
        let next = core
            .successor("acme", "london", ranked[0])
            .expect("a successor");
        assert_eq!(next.id, ranked[1]);
        // Redirects: followed, but not forever.
        assert_eq!(
            core.on_frame(Frame::Redirect(rec("r2")), &mut inbox, &mut out, &mut fx),
            Err(End::Redirect(rec("r2")))
        );
        for _ in 0..MAX_REDIRECTS {
            assert!(!core.redirected());
        }
        assert!(core.redirected(), "back off after too many in a row");
        core.on_connected();
        assert_eq!(core.redirects(), 0, "a connection resets the count");
    }
}
