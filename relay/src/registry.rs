//! The relay's local registry: which peers are attached, and their mailboxes.
//!
//! Every `(namespace, name)` that is attached or has mail owns a slot. A
//! namespace is a wall: nothing here is ever looked up across namespaces, so
//! sending to a name of another namespace is exactly sending to a name nobody
//! holds in one's own (accepted, queued, `online: false`).
//!
//! A message stays in its mailbox until the recipient's application
//! acknowledges it, or its TTL expires (counted and logged). Sessions read
//! mailboxes with a cursor, so a new session of the same name starts from the
//! beginning and everything unacknowledged is delivered again.

use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use swb_wire::{Code, Deliver, MessageId, Refusal};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bounds on held mail. Defaults are documented in the README.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxLimits {
    /// Messages one mailbox holds at most (default 1000).
    pub messages: usize,
    /// Body bytes one mailbox holds at most (default 4 MiB).
    pub bytes: usize,
    /// How long an unacknowledged message is kept (default 24 h).
    pub ttl: Duration,
    /// Body bytes all mailboxes of one namespace hold at most (default 256 MiB).
    pub namespace_bytes: usize,
    /// Non-empty mailboxes one namespace has at most (default 10 000).
    pub namespace_mailboxes: usize,
}

impl Default for MailboxLimits {
    fn default() -> Self {
        Self {
            messages: 1000,
            bytes: 4 * 1024 * 1024,
            ttl: Duration::from_secs(24 * 3600),
            namespace_bytes: 256 * 1024 * 1024,
            namespace_mailboxes: 10_000,
        }
    }
}

/// The handle of an attached session, shared between the registry and the
/// session's actor.
#[derive(Debug)]
pub(crate) struct SessionCtl {
    pub(crate) id: u64,
    pub(crate) key_id: String,
    pub(crate) remote: SocketAddr,
    pub(crate) since: SystemTime,
    /// Wakes the session to flush its mailbox.
    pub(crate) notify: Notify,
    /// Ends the session; `end` says why.
    pub(crate) cancel: CancellationToken,
    end: Mutex<Option<Refusal>>,
}

impl SessionCtl {
    pub(crate) fn new(
        id: u64,
        key_id: String,
        remote: SocketAddr,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            id,
            key_id,
            remote,
            since: SystemTime::now(),
            notify: Notify::new(),
            cancel,
            end: Mutex::new(None),
        }
    }

    /// Ends the session with a goodbye; the first reason wins.
    pub(crate) fn end_with(&self, r: Refusal) {
        if let Ok(mut e) = self.end.lock() {
            e.get_or_insert(r);
        }
        self.cancel.cancel();
    }

    pub(crate) fn end_reason(&self) -> Option<Refusal> {
        self.end.lock().ok().and_then(|mut e| e.take())
    }
}

#[derive(Debug)]
struct Stored {
    id: MessageId,
    from: Arc<str>,
    body: Bytes,
    sent_at_ms: u64,
    expires_at: Instant,
}

#[derive(Debug, Default)]
struct Mailbox {
    next_seq: u64,
    msgs: BTreeMap<u64, Stored>,
    by_id: HashMap<MessageId, u64>,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Slot {
    session: Option<Arc<SessionCtl>>,
    mailbox: Mailbox,
}

#[derive(Debug, Default)]
struct NsUsage {
    bytes: usize,
    mailboxes: usize,
}

/// Result of [`Registry::enqueue`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Enqueued {
    /// In the mailbox (or already there: a retried send).
    Accepted { online: bool },
    /// Not accepted; nothing was stored.
    Refused(Refusal),
}

/// A batch of mail for one session.
pub(crate) struct Batch {
    pub(crate) frames: Vec<Deliver>,
    pub(crate) cursor: u64,
    pub(crate) more: bool,
}

type Key = (Arc<str>, Arc<str>);

/// All slots of this relay.
#[derive(Debug)]
pub(crate) struct Registry {
    slots: HashMap<Key, Slot>,
    usage: HashMap<Arc<str>, NsUsage>,
    limits: MailboxLimits,
    next_session: u64,
}

fn key(ns: &str, name: &str) -> Key {
    (Arc::from(ns), Arc::from(name))
}

impl Registry {
    pub(crate) fn new(limits: MailboxLimits) -> Self {
        Self {
            slots: HashMap::new(),
            usage: HashMap::new(),
            limits,
            next_session: 1,
        }
    }

    pub(crate) fn limits(&self) -> &MailboxLimits {
        &self.limits
    }

    pub(crate) fn next_session_id(&mut self) -> u64 {
        let id = self.next_session;
        self.next_session += 1;
        id
    }

    /// Registers a session; returns the one it replaces, if any.
    pub(crate) fn attach(
        &mut self,
        ns: &str,
        name: &str,
        ctl: Arc<SessionCtl>,
    ) -> Option<Arc<SessionCtl>> {
        let slot = self.slots.entry(key(ns, name)).or_default();
        slot.session.replace(ctl)
    }

    /// Removes a session if it is still the registered one.
    pub(crate) fn detach(&mut self, ns: &str, name: &str, session: u64) {
        let k = key(ns, name);
        if let Some(slot) = self.slots.get_mut(&k) {
            if slot.session.as_ref().is_some_and(|s| s.id == session) {
                slot.session = None;
            }
            if slot.session.is_none() && slot.mailbox.msgs.is_empty() {
                self.slots.remove(&k);
            }
        }
    }

    /// Puts a message into `to`'s mailbox, enforcing every limit before
    /// storing anything.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn enqueue(
        &mut self,
        ns: &str,
        from: &str,
        to: &str,
        id: MessageId,
        body: Bytes,
        sent_at_ms: u64,
        now: Instant,
    ) -> Enqueued {
        let lim = &self.limits;
        let k = key(ns, to);
        let slot = self.slots.get(&k);
        let online = slot.is_some_and(|s| s.session.is_some());
        if let Some(s) = slot {
            if let Some(seq) = s.mailbox.by_id.get(&id) {
                if s.mailbox.msgs.get(seq).is_some_and(|m| &*m.from == from) {
                    return Enqueued::Accepted { online };
                }
            }
        }
        let (mb_len, mb_bytes) = slot.map_or((0, 0), |s| (s.mailbox.msgs.len(), s.mailbox.bytes));
        if mb_len + 1 > lim.messages || mb_bytes + body.len() > lim.bytes {
            return Enqueued::Refused(Refusal::new(
                Code::MAILBOX_FULL,
                format!(
                    "the mailbox of {to} is full ({mb_len} messages, {mb_bytes} bytes; limits {} messages, {} bytes); retry after {to} has received its mail",
                    lim.messages, lim.bytes
                ),
            ));
        }
        let usage = self.usage.get(ns);
        let (ns_bytes, ns_boxes) = usage.map_or((0, 0), |u| (u.bytes, u.mailboxes));
        if ns_bytes + body.len() > lim.namespace_bytes
            || (mb_len == 0 && ns_boxes + 1 > lim.namespace_mailboxes)
        {
            return Enqueued::Refused(Refusal::new(
                Code::NAMESPACE_FULL,
                format!(
                    "this namespace holds too much undelivered mail ({ns_boxes} mailboxes, {ns_bytes} bytes; limits {}, {}); retry once recipients have received their mail",
                    lim.namespace_mailboxes, lim.namespace_bytes
                ),
            ));
        }
        let ttl = lim.ttl;
        let slot = self.slots.entry(k.clone()).or_default();
        let mb = &mut slot.mailbox;
        let seq = mb.next_seq;
        mb.next_seq += 1;
        mb.bytes += body.len();
        mb.by_id.insert(id, seq);
        let len = body.len();
        mb.msgs.insert(
            seq,
            Stored {
                id,
                from: Arc::from(from),
                body,
                sent_at_ms,
                expires_at: now + ttl,
            },
        );
        let u = self.usage.entry(k.0.clone()).or_default();
        u.bytes += len;
        if mb_len == 0 {
            u.mailboxes += 1;
        }
        if let Some(s) = &slot.session {
            s.notify.notify_one();
        }
        Enqueued::Accepted { online }
    }

    /// Mail of `(ns, name)` from `cursor` on, at most `max_bytes` of bodies
    /// (always at least one message if there is one).
    pub(crate) fn pending(&self, ns: &str, name: &str, cursor: u64, max_bytes: usize) -> Batch {
        let mut b = Batch {
            frames: Vec::new(),
            cursor,
            more: false,
        };
        let Some(slot) = self.slots.get(&key(ns, name)) else {
            return b;
        };
        let mut bytes = 0;
        for (seq, m) in slot.mailbox.msgs.range(cursor..) {
            if !b.frames.is_empty() && bytes + m.body.len() > max_bytes {
                b.more = true;
                break;
            }
            bytes += m.body.len();
            b.frames.push(Deliver {
                id: m.id,
                from: m.from.to_string(),
                body: m.body.clone(),
                sent_at_ms: m.sent_at_ms,
            });
            b.cursor = seq + 1;
        }
        b
    }

    fn remove_msg(&mut self, k: &Key, pred: impl Fn(&Stored) -> bool, ids: &[MessageId]) -> usize {
        let Some(slot) = self.slots.get_mut(k) else {
            return 0;
        };
        let mb = &mut slot.mailbox;
        let before_len = mb.msgs.len();
        let mut freed = 0;
        let seqs: Vec<u64> = if ids.is_empty() {
            mb.msgs
                .iter()
                .filter(|(_, m)| pred(m))
                .map(|(s, _)| *s)
                .collect()
        } else {
            ids.iter()
                .filter_map(|id| mb.by_id.get(id).copied())
                .collect()
        };
        for seq in &seqs {
            if let Some(m) = mb.msgs.remove(seq) {
                mb.by_id.remove(&m.id);
                mb.bytes -= m.body.len();
                freed += m.body.len();
            }
        }
        let removed = before_len - mb.msgs.len();
        let now_empty = mb.msgs.is_empty();
        if let Some(u) = self.usage.get_mut(&k.0) {
            u.bytes -= freed;
            if removed > 0 && now_empty {
                u.mailboxes -= 1;
            }
            if u.mailboxes == 0 && u.bytes == 0 {
                self.usage.remove(&k.0);
            }
        }
        if now_empty && slot.session.is_none() {
            self.slots.remove(k);
        }
        removed
    }

    /// Forgets acknowledged messages; returns how many were held.
    pub(crate) fn ack(&mut self, ns: &str, name: &str, ids: &[MessageId]) -> usize {
        if ids.is_empty() {
            return 0;
        }
        self.remove_msg(&key(ns, name), |_| false, ids)
    }

    /// Drops expired messages everywhere; returns how many.
    pub(crate) fn expire(&mut self, now: Instant) -> usize {
        let keys: Vec<Key> = self
            .slots
            .iter()
            .filter(|(_, s)| s.mailbox.msgs.values().any(|m| m.expires_at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        keys.iter()
            .map(|k| self.remove_msg(k, |m| m.expires_at <= now, &[]))
            .sum()
    }

    /// Every attached session.
    pub(crate) fn sessions(&self) -> Vec<Arc<SessionCtl>> {
        self.slots
            .values()
            .filter_map(|s| s.session.clone())
            .collect()
    }

    /// Names attached in `ns`, with the time they attached, sorted by name.
    pub(crate) fn attached(&self, ns: &str) -> Vec<(String, SystemTime)> {
        let mut v: Vec<_> = self
            .slots
            .iter()
            .filter(|((n, _), _)| &**n == ns)
            .filter_map(|((_, name), s)| s.session.as_ref().map(|c| (name.to_string(), c.since)))
            .collect();
        v.sort();
        v
    }

    /// Number of held messages (all namespaces).
    pub(crate) fn held_messages(&self) -> usize {
        self.slots.values().map(|s| s.mailbox.msgs.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(messages: usize, bytes: usize) -> Registry {
        Registry::new(MailboxLimits {
            messages,
            bytes,
            ttl: Duration::from_secs(10),
            namespace_bytes: 1000,
            namespace_mailboxes: 3,
        })
    }

    fn id(n: u8) -> MessageId {
        MessageId([n; 16])
    }

    fn send(r: &mut Registry, ns: &str, to: &str, n: u8, len: usize) -> Enqueued {
        r.enqueue(
            ns,
            "a",
            to,
            id(n),
            Bytes::from(vec![0; len]),
            0,
            Instant::now(),
        )
    }

    #[tokio::test]
    async fn mailbox_count_and_byte_limits_refuse_before_storing() {
        let mut r = reg(2, 100);
        assert_eq!(
            send(&mut r, "ns", "b", 1, 10),
            Enqueued::Accepted { online: false }
        );
        assert_eq!(
            send(&mut r, "ns", "b", 2, 10),
            Enqueued::Accepted { online: false }
        );
        let Enqueued::Refused(x) = send(&mut r, "ns", "b", 3, 10) else {
            panic!("expected refusal")
        };
        assert_eq!(x.code, Code::MAILBOX_FULL);
        let mut r = reg(10, 100);
        assert!(matches!(
            send(&mut r, "ns", "b", 1, 90),
            Enqueued::Accepted { .. }
        ));
        assert!(
            matches!(send(&mut r, "ns", "b", 2, 11), Enqueued::Refused(ref x) if x.code == Code::MAILBOX_FULL)
        );
        assert_eq!(r.held_messages(), 1);
    }

    #[tokio::test]
    async fn retried_send_with_same_id_is_not_stored_twice() {
        let mut r = reg(10, 100);
        send(&mut r, "ns", "b", 1, 10);
        send(&mut r, "ns", "b", 1, 10);
        assert_eq!(r.held_messages(), 1);
    }

    #[tokio::test]
    async fn namespace_limits_apply_per_namespace() {
        let mut r = reg(10, 1000);
        for (i, to) in ["b", "c", "d"].iter().enumerate() {
            assert!(matches!(
                send(&mut r, "ns", to, i as u8, 1),
                Enqueued::Accepted { .. }
            ));
        }
        assert!(
            matches!(send(&mut r, "ns", "e", 9, 1), Enqueued::Refused(ref x) if x.code == Code::NAMESPACE_FULL)
        );
        // Another namespace is unaffected.
        assert!(matches!(
            send(&mut r, "other", "e", 9, 1),
            Enqueued::Accepted { .. }
        ));
        // Acknowledging frees the mailbox slot.
        assert_eq!(r.ack("ns", "b", &[id(0)]), 1);
        assert!(matches!(
            send(&mut r, "ns", "e", 9, 1),
            Enqueued::Accepted { .. }
        ));
    }

    #[tokio::test]
    async fn cursor_restarts_for_a_new_session_and_ack_removes() {
        let mut r = reg(10, 1000);
        send(&mut r, "ns", "b", 1, 1);
        send(&mut r, "ns", "b", 2, 1);
        let b = r.pending("ns", "b", 0, 1);
        assert_eq!(b.frames.len(), 1);
        assert!(b.more);
        let b2 = r.pending("ns", "b", b.cursor, 1000);
        assert_eq!(b2.frames.len(), 1);
        assert_eq!(r.pending("ns", "b", 0, 1000).frames.len(), 2);
        r.ack("ns", "b", &[id(1)]);
        let b3 = r.pending("ns", "b", 0, 1000);
        assert_eq!(
            b3.frames.iter().map(|d| d.id).collect::<Vec<_>>(),
            vec![id(2)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expired_messages_are_dropped_and_counted() {
        let mut r = reg(10, 1000);
        send(&mut r, "ns", "b", 1, 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        send(&mut r, "ns", "b", 2, 1);
        assert_eq!(r.expire(Instant::now()), 0);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(r.expire(Instant::now()), 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(r.expire(Instant::now()), 1);
        assert_eq!(r.held_messages(), 0);
        assert!(r.slots.is_empty() && r.usage.is_empty());
    }
}
