//! The relay's local registry: which peers are attached, and their mailboxes.
//!
//! Every `(namespace, name)` that is attached or has mail owns a slot. A
//! namespace is a wall: nothing here is ever looked up across namespaces, so
//! sending to a name of another namespace is exactly sending to a name nobody
//! holds in one's own (accepted, queued, `online: false`).
//!
//! A message stays in its mailbox until the recipient's application
//! acknowledges it, or its TTL expires (counted and logged). Handing a
//! message out *leases* it: to the QUIC session it was delivered on (until
//! that session ends), or to an HTTP poll (until the visibility timeout
//! passes). An unacknowledged message whose lease ends is handed out again,
//! so a crashed daemon or a dropped HTTP response loses nothing; message ids
//! let receivers drop the duplicates this can cause.

use bytes::Bytes;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use swb_wire::{Code, Deliveries, DeliveriesBuilder, MessageId, Refusal};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::status::StatusBoard;

/// What a held message counts against mailbox and namespace byte limits:
/// its body, its sender's name and a fixed overhead for its bookkeeping,
/// so empty bodies cannot fill a relay's memory under a byte limit.
pub const MESSAGE_OVERHEAD: usize = 64;

pub(crate) fn held_cost(from: &str, body: &[u8]) -> usize {
    body.len() + from.len() + MESSAGE_OVERHEAD
}

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
    /// How long a message received over HTTP stays leased before it is
    /// handed out again unless acknowledged; also how long an HTTP poller
    /// counts as attached after its last poll (default 30 s).
    pub visibility: Duration,
}

impl Default for MailboxLimits {
    fn default() -> Self {
        Self {
            messages: 1000,
            bytes: 4 * 1024 * 1024,
            ttl: Duration::from_secs(24 * 3600),
            namespace_bytes: 256 * 1024 * 1024,
            namespace_mailboxes: 10_000,
            visibility: Duration::from_secs(30),
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
    /// Whether new mail woke the session and it has not looked at its
    /// mailbox since: further mail need not wake it again (`Notify` takes a
    /// lock per wake). Set under the stripe's lock; the session clears it
    /// just before it takes that lock to look ([`Self::will_look`]).
    woken: AtomicBool,
    /// Ends the session; `end` says why.
    pub(crate) cancel: CancellationToken,
    end: Mutex<Option<Refusal>>,
    /// The daemon's connection: the relay opens streams to it here.
    pub(crate) conn: quinn::Connection,
    /// Data streams open on this connection (as caller or target).
    pub(crate) streams: std::sync::atomic::AtomicUsize,
    /// The daemon's instance (`Hello::instance`).
    pub(crate) instance: u64,
}

impl SessionCtl {
    pub(crate) fn new(
        id: u64,
        key_id: String,
        remote: SocketAddr,
        cancel: CancellationToken,
        conn: quinn::Connection,
        instance: u64,
    ) -> Self {
        Self {
            id,
            key_id,
            remote,
            since: SystemTime::now(),
            notify: Notify::new(),
            woken: AtomicBool::new(false),
            cancel,
            end: Mutex::new(None),
            conn,
            streams: std::sync::atomic::AtomicUsize::new(0),
            instance,
        }
    }

    /// Wakes the session for new mail unless a wake is outstanding.
    fn wake_for_mail(&self) {
        // A plain load and store: under the stripe's lock only the session's
        // own clearing can race with this, and either order ends with the
        // mail seen (below).
        if !self.woken.load(Ordering::Relaxed) {
            self.woken.store(true, Ordering::Relaxed);
            self.notify.notify_one();
        }
    }

    /// The session is about to look at its mailbox (under the stripe's
    /// lock): mail that comes after must wake it again. Mail that found the
    /// flag still set is in the mailbox before the session takes the lock
    /// (it was put there under that lock), so it is seen by this look.
    pub(crate) fn will_look(&self) {
        self.woken.store(false, Ordering::Relaxed);
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

/// Who holds a handed-out message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    /// Not handed out (or its holder is gone).
    Free,
    /// Delivered on this QUIC session; free again once it is not the
    /// registered session of the name any more.
    Session(u64),
    /// Taken by an HTTP poll; free again at this instant.
    Http(Instant),
}

#[derive(Debug)]
struct Stored {
    id: MessageId,
    from: Arc<str>,
    body: Bytes,
    sent_at_ms: u64,
    expires_at: Instant,
    lease: Lease,
    /// When it was accepted, until it is first handed out (metrics).
    waiting_since: Option<Instant>,
}

#[derive(Debug, Default)]
struct Mailbox {
    next_seq: u64,
    msgs: super::seqmap::SeqMap<Stored>,
    /// Ids are chosen by senders: a keyed hash, fast (16 bytes per
    /// message).
    by_id: HashMap<MessageId, u64, ahash::RandomState>,
    bytes: usize,
    /// Messages with an HTTP lease (so the lease sweep skips the rest).
    http_leased: usize,
    /// Lowest sequence number that became deliverable again behind the
    /// session's cursor (an HTTP lease ran out).
    rewind: Option<u64>,
}

/// A name receiving over HTTP: attached while a poll is open or was open
/// within the visibility timeout.
#[derive(Debug, Default)]
struct HttpPresence {
    open_polls: usize,
    last_poll: Option<Instant>,
    since: Option<SystemTime>,
    /// Wakes HTTP long polls of this name.
    notify: Arc<Notify>,
}

/// A name's entry. The mailbox and the HTTP state are made when first
/// needed (the first message, the first poll) and kept with the slot, so
/// a peer that only attached costs a small entry in the slot table (56
/// bytes with its key, where they inline made it 216, plus a `Notify`).
#[derive(Debug, Default)]
struct Slot {
    session: Option<Arc<SessionCtl>>,
    mailbox: Option<Box<Mailbox>>,
    http: Option<Box<HttpPresence>>,
}

impl Slot {
    fn http_active(&self, now: Instant, visibility: Duration) -> bool {
        self.http
            .as_ref()
            .is_some_and(|h| h.open_polls > 0 || h.last_poll.is_some_and(|t| now < t + visibility))
    }

    fn holds_mail(&self) -> bool {
        self.mailbox.as_ref().is_some_and(|m| !m.msgs.is_empty())
    }

    fn online(&self, now: Instant, visibility: Duration) -> bool {
        self.session.is_some() || self.http_active(now, visibility)
    }

    fn is_idle(&self, now: Instant, visibility: Duration) -> bool {
        self.session.is_none() && !self.holds_mail() && !self.http_active(now, visibility)
    }

    fn wake(&self) {
        if let Some(s) = &self.session {
            s.wake_for_mail();
        }
        // Only an open HTTP poll waits on it (and it is counted before it
        // waits, under its stripe's lock).
        if let Some(h) = self.http.as_ref().filter(|h| h.open_polls > 0) {
            h.notify.notify_waiters();
        }
    }
}

/// A message handed to an HTTP poll.
#[derive(Debug, Clone)]
pub(crate) struct Taken {
    pub(crate) id: MessageId,
    pub(crate) from: String,
    pub(crate) body: Bytes,
    pub(crate) sent_at_ms: u64,
}

/// How a peer is attached, for `GET /v1/peers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A daemon's QUIC connection.
    Quic,
    /// HTTP long polls.
    Http,
}

impl Via {
    /// `quic` or `http`.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Quic => "quic",
            Via::Http => "http",
        }
    }
}

/// A name attached now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer name.
    pub name: String,
    /// Attached since.
    pub since: SystemTime,
    /// How.
    pub via: Via,
}

/// What one namespace holds in all stripes: counted before a message is
/// stored (and given back if it is refused after all), so the stripes
/// together never hold more than the namespace's limits.
#[derive(Debug, Default)]
struct NsUsage {
    bytes: AtomicUsize,
    mailboxes: AtomicUsize,
}

impl NsUsage {
    /// Counts `n` more against `limit`; the count before if that would go
    /// over it (then nothing was counted).
    fn reserve(counter: &AtomicUsize, n: usize, limit: usize) -> Result<(), usize> {
        let before = counter.fetch_add(n, Ordering::Relaxed);
        if before + n > limit {
            counter.fetch_sub(n, Ordering::Relaxed);
            return Err(before);
        }
        Ok(())
    }
}

/// Namespace usage shared by the stripes. A namespace's entry stays once
/// made: namespaces are the operator's (one per API key's namespace), not
/// chosen by peers, so the table is bounded by the keys file.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    by_ns: Mutex<Map<Arc<str>, Arc<NsUsage>>>,
}

/// The usage entry of `ns`, from the stripe's own table (`cache`), which
/// copies the shared one's handle on its first use of the namespace. Takes
/// the two fields, not the stripe, so the stripe's slots stay borrowable.
fn ns_usage<'a>(
    cache: &'a mut Map<Arc<str>, Arc<NsUsage>>,
    shared: &Usage,
    ns: &str,
) -> &'a NsUsage {
    if !cache.contains_key(ns) {
        let u = lock(&shared.by_ns)
            .entry(Arc::from(ns))
            .or_default()
            .clone();
        cache.insert(Arc::from(ns), u);
    }
    &cache[ns]
}

/// Why a saved message was not put back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotRestored {
    /// Its TTL ran out while the relay was down.
    #[error("expired while the relay was down")]
    Expired,
    /// The mailbox refused it (limits changed).
    #[error("{0}")]
    Refused(Refusal),
}

/// Result of [`Registry::enqueue`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Enqueued {
    /// In the mailbox: `new`, or already there (a retried send).
    Accepted { online: bool, new: bool },
    /// Not accepted; nothing was stored.
    Refused(Refusal),
}

/// Most messages the relay puts in one `Deliveries` frame: a receiver
/// takes none of a frame's messages before the whole frame is read, so
/// frames stay short enough that the first are taken (and acknowledged,
/// making room in the mailbox) while the rest are on their way.
pub(crate) const DELIVERIES_PER_FRAME: usize = 64;

/// A batch of mail for one session, as `Deliveries` frames.
pub(crate) struct Batch {
    pub(crate) frames: Vec<Deliveries>,
    /// Messages in `frames`.
    pub(crate) count: usize,
    pub(crate) cursor: u64,
    pub(crate) more: bool,
}

#[cfg(test)]
impl Batch {
    /// The messages' ids, in order.
    pub(crate) fn ids(&self) -> Vec<MessageId> {
        self.frames
            .iter()
            .flat_map(|f| f.runs.iter().flat_map(|r| r.msgs.iter().map(|m| m.id)))
            .collect()
    }
}

type Key = (Arc<str>, Arc<str>);

/// A sender's name as the caller holds it: borrowed, or already shared (a
/// session's own name), which held messages then share instead of each
/// copying it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum NameRef<'a> {
    Str(&'a str),
    Shared(&'a Arc<str>),
}

impl<'a> From<&'a str> for NameRef<'a> {
    fn from(s: &'a str) -> Self {
        NameRef::Str(s)
    }
}

impl<'a> From<&'a String> for NameRef<'a> {
    fn from(s: &'a String) -> Self {
        NameRef::Str(s)
    }
}

impl<'a> From<&'a Arc<str>> for NameRef<'a> {
    fn from(s: &'a Arc<str>) -> Self {
        NameRef::Shared(s)
    }
}

impl std::ops::Deref for NameRef<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            NameRef::Str(s) => s,
            NameRef::Shared(s) => s,
        }
    }
}

/// A slot's key seen through borrowed parts, so that looking a slot up by
/// `(&str, &str)` allocates nothing. Hashes and compares as [`Key`] does
/// (a tuple hashes its fields in order; `Arc<str>` hashes as `str`).
trait KeyParts {
    fn parts(&self) -> (&str, &str);
}

impl KeyParts for Key {
    fn parts(&self) -> (&str, &str) {
        (&self.0, &self.1)
    }
}

impl KeyParts for (&str, &str) {
    fn parts(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl std::hash::Hash for dyn KeyParts + '_ {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.parts().hash(h);
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyParts + '_ {}

impl<'a> std::borrow::Borrow<dyn KeyParts + 'a> for Key {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

/// Slot tables: names are chosen by peers, so a keyed hash (ahash's is
/// seeded per process), and a fast one — every message looks its
/// recipient up.
type Map<K, V> = HashMap<K, V, ahash::RandomState>;
type Set<K> = HashSet<K, ahash::RandomState>;

/// One stripe of the registry: the slots whose `(namespace, name)` hash
/// to it (see [`Registries`]).
#[derive(Debug)]
pub(crate) struct Registry {
    slots: Map<Key, Slot>,
    /// Status and presence of every peer, shared by the stripes. Taken
    /// while a stripe is held, never the other way round.
    board: Arc<Mutex<StatusBoard>>,
    /// Namespace usage, shared by the stripes; `usage` holds this stripe's
    /// handles to its entries.
    shared_usage: Arc<Usage>,
    usage: Map<Arc<str>, Arc<NsUsage>>,
    limits: MailboxLimits,
    /// Observes accept → first hand-out of each message, if set.
    pub(crate) delivery_wait: Option<prometheus::Histogram>,
    /// Whether changes are recorded for the store: removed messages in
    /// `removed`, the names of the message last put in `put`.
    pub(crate) track_store: bool,
    /// The names (namespace, recipient, sender) of the message the last
    /// [`Registry::enqueue`] stored, when `track_store`: the store's record
    /// shares them instead of copying each.
    put: Option<PutNames>,
    /// Messages removed since the last [`Registry::take_removed`]:
    /// (namespace, recipient, sender, id).
    removed: Vec<Removed>,
    /// Non-empty mailboxes by the expiry of their oldest message: expiry
    /// visits only mailboxes with something to expire.
    expiry: BTreeSet<(Instant, Key)>,
    /// Mailboxes that may hold HTTP leases (cleaned lazily).
    leased: Set<Key>,
    /// Names polled over HTTP recently (cleaned lazily): the only slots
    /// that go idle, and the only presence that ends, by time alone.
    http_seen: Set<Key>,
}

/// A removed message: (namespace, recipient, sender, id).
pub(crate) type Removed = (Arc<str>, Arc<str>, Arc<str>, MessageId);

/// A stored message's names: (namespace, recipient, sender).
pub(crate) type PutNames = (Arc<str>, Arc<str>, Arc<str>);

fn key(ns: &str, name: &str) -> Key {
    (Arc::from(ns), Arc::from(name))
}

impl Registry {
    pub(crate) fn new(
        limits: MailboxLimits,
        board: Arc<Mutex<StatusBoard>>,
        shared_usage: Arc<Usage>,
    ) -> Self {
        Self {
            slots: Map::default(),
            expiry: BTreeSet::new(),
            leased: Set::default(),
            http_seen: Set::default(),
            board,
            shared_usage,
            usage: Map::default(),
            limits,
            delivery_wait: None,
            track_store: false,
            put: None,
            removed: Vec::new(),
        }
    }

    pub(crate) fn limits(&self) -> &MailboxLimits {
        &self.limits
    }

    fn slot(&self, ns: &str, name: &str) -> Option<&Slot> {
        self.slots.get(&(ns, name) as &dyn KeyParts)
    }

    /// Registers a session; returns the one it replaces, if any.
    pub(crate) fn attach(
        &mut self,
        ns: &str,
        name: &str,
        ctl: Arc<SessionCtl>,
    ) -> Option<Arc<SessionCtl>> {
        let slot = self.slots.entry(key(ns, name)).or_default();
        let old = slot.session.replace(ctl);
        lock(&self.board).set_presence(ns, name, true, Instant::now());
        old
    }

    /// The session attached as `(ns, name)`, if any.
    pub(crate) fn session(&self, ns: &str, name: &str) -> Option<Arc<SessionCtl>> {
        self.slot(ns, name)?.session.clone()
    }

    /// Removes a session if it is still the registered one.
    pub(crate) fn detach(&mut self, ns: &str, name: &str, session: u64) {
        let k = key(ns, name);
        if let Some(slot) = self.slots.get_mut(&k) {
            if slot.session.as_ref().is_some_and(|s| s.id == session) {
                slot.session = None;
                // Its leases are free again: HTTP pollers of the name may
                // take the messages now.
                if let Some(h) = &slot.http {
                    h.notify.notify_waiters();
                }
            }
            let now = Instant::now();
            if !slot.online(now, self.limits.visibility) {
                lock(&self.board).set_presence(ns, name, false, now);
            }
            if slot.is_idle(now, self.limits.visibility) {
                self.slots.remove(&k);
            }
        }
    }

    /// Puts a message into `to`'s mailbox, enforcing every limit before
    /// storing anything.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn enqueue<'a>(
        &mut self,
        ns: &str,
        sender: impl Into<NameRef<'a>>,
        to: &str,
        id: MessageId,
        body: Bytes,
        sent_at_ms: u64,
        now: Instant,
    ) -> Enqueued {
        let sender = sender.into();
        let from: &str = &sender;
        // Looked up by borrowed parts: the key's shared names are cloned
        // only where one is stored (an atomic count on a line the
        // recipient's session uses too).
        let parts = (ns, to);
        let kp: &dyn KeyParts = &parts;
        let lim = &self.limits;
        // One lookup here, one to change the slot below (and one more for a
        // recipient without a slot, or with an empty mailbox).
        let found = self.slots.get_key_value(kp);
        let slot = found.map(|(_, s)| s);
        let online = slot.is_some_and(|s| s.online(now, lim.visibility));
        let held = slot.and_then(|s| s.mailbox.as_deref());
        if let Some(mb) = held {
            if let Some(m) = mb.by_id.get(&id).and_then(|seq| mb.msgs.get(*seq)) {
                // The same message again (a retried send): accepted once.
                if &*m.from == from && m.body == body {
                    return Enqueued::Accepted { online, new: false };
                }
                // Another message under a held id is never taken in its place.
                return Enqueued::Refused(Refusal::new(
                    Code::ID_CONFLICT,
                    format!("a different message with id {id} is held for {to} already; send this one under a new id"),
                ));
            }
        }
        let (mb_len, mb_bytes) = held.map_or((0, 0), |m| (m.msgs.len(), m.bytes));
        let found_key = found.map(|(k, _)| k);
        // The key, to file an empty mailbox's expiry under (cloned only then).
        let slot_key = found_key.and_then(|k| (mb_len == 0).then(|| k.clone()));
        // The names the store's record of the message shares.
        let mut put_key = if self.track_store {
            found_key.cloned()
        } else {
            None
        };
        let had_slot = found.is_some();
        let cost = held_cost(from, &body);
        if mb_len + 1 > lim.messages || mb_bytes + cost > lim.bytes {
            return Enqueued::Refused(Refusal::new(
                Code::MAILBOX_FULL,
                format!(
                    "the mailbox of {to} is full ({mb_len} messages, {mb_bytes} bytes; limits {} messages, {} bytes); retry after {to} has received its mail",
                    lim.messages, lim.bytes
                ),
            ));
        }
        // Counted against the namespace (all stripes) before anything is
        // stored; given back below if the message is not stored after all.
        let usage = ns_usage(&mut self.usage, &self.shared_usage, ns);
        let full = |ns_boxes: usize, ns_bytes: usize| {
            Enqueued::Refused(Refusal::new(
                Code::NAMESPACE_FULL,
                format!(
                    "this namespace holds too much undelivered mail ({ns_boxes} mailboxes, {ns_bytes} bytes; limits {}, {}); retry once recipients have received their mail",
                    lim.namespace_mailboxes, lim.namespace_bytes
                ),
            ))
        };
        if let Err(before) = NsUsage::reserve(&usage.bytes, cost, lim.namespace_bytes) {
            return full(usage.mailboxes.load(Ordering::Relaxed), before);
        }
        // Undoes what was counted: the bytes, and the mailbox if it was
        // counted as a new one.
        let give_back = |mailbox: bool| {
            usage.bytes.fetch_sub(cost, Ordering::Relaxed);
            if mailbox {
                usage.mailboxes.fetch_sub(1, Ordering::Relaxed);
            }
        };
        if mb_len == 0 {
            if let Err(before) = NsUsage::reserve(&usage.mailboxes, 1, lim.namespace_mailboxes) {
                give_back(false);
                return full(before, usage.bytes.load(Ordering::Relaxed));
            }
        }
        let ttl = lim.ttl;
        // The sender's name as the caller or the sender's own slot (if it
        // is in this stripe) holds it; a copy only failing both.
        let from = match sender {
            NameRef::Shared(a) => a.clone(),
            NameRef::Str(_) => match self.slots.get_key_value(&(ns, from) as &dyn KeyParts) {
                Some((f, _)) => f.1.clone(),
                None => Arc::from(from),
            },
        };
        let slot_key = if had_slot {
            slot_key
        } else {
            let k = key(ns, to);
            self.slots.insert(k.clone(), Slot::default());
            if self.track_store {
                put_key = Some(k.clone());
            }
            Some(k)
        };
        let put = put_key.map(|(ns, to)| (ns, to, from.clone()));
        let Some(slot) = self.slots.get_mut(kp) else {
            give_back(mb_len == 0);
            return Enqueued::Refused(Refusal::new(
                Code::INTERNAL,
                format!("the mailbox of {to} could not be made; retry"),
            ));
        };
        let mb = slot.mailbox.get_or_insert_with(Default::default);
        let was_empty = mb.msgs.is_empty();
        let seq = mb.next_seq;
        let stored = Stored {
            id,
            from,
            body,
            sent_at_ms,
            expires_at: now + ttl,
            lease: Lease::Free,
            waiting_since: Some(now),
        };
        // Sequence numbers only count up, so this cannot be refused.
        if mb.msgs.push(seq, stored).is_err() {
            give_back(mb_len == 0);
            return Enqueued::Refused(Refusal::new(
                Code::INTERNAL,
                format!("the mailbox of {to} is out of order; retry"),
            ));
        }
        mb.next_seq += 1;
        mb.bytes += cost;
        mb.by_id.insert(id, seq);
        slot.wake();
        if was_empty {
            if let Some(k) = slot_key {
                self.expiry.insert((now + ttl, k));
            }
        }
        self.put = put;
        Enqueued::Accepted { online, new: true }
    }

    /// Mail for `session` of `(ns, name)` from `cursor` on, at most
    /// `max_msgs` messages and `max_bytes` of bodies (always at least one
    /// message if there is one and `max_msgs` > 0).
    /// What it returns is leased to the session. Skips messages an HTTP poll
    /// holds; when such a lease runs out, the mailbox rewinds the cursor.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pending(
        &mut self,
        ns: &str,
        name: &str,
        session: u64,
        cursor: u64,
        max_bytes: usize,
        max_msgs: usize,
        now: Instant,
    ) -> Batch {
        let mut b = Batch {
            frames: Vec::new(),
            count: 0,
            cursor,
            more: false,
        };
        let Some(mb) = self
            .slots
            .get_mut(&(ns, name) as &dyn KeyParts)
            .and_then(|s| s.mailbox.as_deref_mut())
        else {
            return b;
        };
        let start = match mb.rewind.take() {
            Some(r) if r < cursor => r,
            _ => cursor,
        };
        let mut bytes = 0;
        let mut released = 0;
        let mut frames = DeliveriesBuilder::with_max_messages(DELIVERIES_PER_FRAME);
        // Waits observed here, added to the shared histogram once (on drop)
        // rather than with four atomic updates per message.
        let mut waits: Option<prometheus::local::LocalHistogram> = None;
        for (seq, m) in mb.msgs.iter_from(start) {
            let deliverable = match m.lease {
                Lease::Free => true,
                Lease::Session(s) => s != session,
                Lease::Http(until) => until <= now,
            };
            if deliverable {
                if b.count >= max_msgs || (b.count > 0 && bytes + m.body.len() > max_bytes) {
                    b.more = true;
                    break;
                }
                bytes += m.body.len();
                if matches!(m.lease, Lease::Http(_)) {
                    released += 1;
                }
                m.lease = Lease::Session(session);
                if let (Some(t), Some(h)) = (m.waiting_since.take(), &self.delivery_wait) {
                    waits
                        .get_or_insert_with(|| h.local())
                        .observe(now.saturating_duration_since(t).as_secs_f64());
                }
                b.count += 1;
                b.frames
                    .extend(frames.push(&m.from, m.id, m.body.clone(), m.sent_at_ms));
            }
            b.cursor = seq + 1;
        }
        b.frames.extend(frames.finish());
        mb.http_leased -= released;
        b
    }

    /// Starts an HTTP poll of `(ns, name)`: marks the name attached over
    /// HTTP and returns what wakes the poll. Pair with [`Self::http_poll_end`].
    pub(crate) fn http_poll_begin(&mut self, ns: &str, name: &str, now: Instant) -> Arc<Notify> {
        let visibility = self.limits.visibility;
        let k = key(ns, name);
        self.http_seen.insert(k.clone());
        let slot = self.slots.entry(k).or_default();
        let active = slot.http_active(now, visibility);
        let h = slot.http.get_or_insert_with(Default::default);
        if !active {
            h.since = Some(SystemTime::now());
        }
        h.open_polls += 1;
        h.last_poll = Some(now);
        let notify = h.notify.clone();
        lock(&self.board).set_presence(ns, name, true, now);
        notify
    }

    /// Ends an HTTP poll begun with [`Self::http_poll_begin`].
    pub(crate) fn http_poll_end(&mut self, ns: &str, name: &str, now: Instant) {
        if let Some(h) = self
            .slots
            .get_mut(&(ns, name) as &dyn KeyParts)
            .and_then(|s| s.http.as_deref_mut())
        {
            h.open_polls = h.open_polls.saturating_sub(1);
            h.last_poll = Some(now);
        }
    }

    /// Takes up to `max` messages of `(ns, name)` for an HTTP poll, leasing
    /// them for the visibility timeout.
    pub(crate) fn http_take(
        &mut self,
        ns: &str,
        name: &str,
        max: usize,
        now: Instant,
    ) -> Vec<Taken> {
        let until = now + self.limits.visibility;
        let Some(slot) = self.slots.get_mut(&(ns, name) as &dyn KeyParts) else {
            return Vec::new();
        };
        let current = slot.session.as_ref().map(|s| s.id);
        let Some(mb) = slot.mailbox.as_deref_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for m in mb.msgs.values_mut() {
            if out.len() >= max {
                break;
            }
            let free = match m.lease {
                Lease::Free => true,
                Lease::Session(s) => Some(s) != current,
                Lease::Http(t) => t <= now,
            };
            if !free {
                continue;
            }
            if !matches!(m.lease, Lease::Http(_)) {
                mb.http_leased += 1;
                if mb.http_leased == 1 {
                    self.leased.insert(key(ns, name));
                }
            }
            m.lease = Lease::Http(until);
            if let (Some(t), Some(h)) = (m.waiting_since.take(), &self.delivery_wait) {
                h.observe(now.saturating_duration_since(t).as_secs_f64());
            }
            out.push(Taken {
                id: m.id,
                from: m.from.to_string(),
                body: m.body.clone(),
                sent_at_ms: m.sent_at_ms,
            });
        }
        out
    }

    /// Frees HTTP leases that ran out (waking whoever can take the
    /// messages) and forgets idle HTTP pollers. Returns how many leases.
    pub(crate) fn sweep_leases(&mut self, now: Instant) -> usize {
        let visibility = self.limits.visibility;
        let mut freed = 0;
        // Only mailboxes that hold HTTP leases.
        let leased: Vec<Key> = self.leased.iter().cloned().collect();
        for k in leased {
            let Some(slot) = self.slots.get_mut(&k) else {
                self.leased.remove(&k);
                continue;
            };
            let Some(mb) = slot.mailbox.as_deref_mut() else {
                self.leased.remove(&k);
                continue;
            };
            let mut n = 0;
            if mb.http_leased > 0 {
                for (seq, m) in mb.msgs.iter_mut() {
                    if matches!(m.lease, Lease::Http(t) if t <= now) {
                        m.lease = Lease::Free;
                        mb.rewind = Some(mb.rewind.map_or(seq, |r| r.min(seq)));
                        n += 1;
                    }
                }
                mb.http_leased -= n;
            }
            if mb.http_leased == 0 {
                self.leased.remove(&k);
            }
            if n > 0 {
                freed += n;
                slot.wake();
            }
        }
        // Names polled over HTTP: presence ends and slots go idle by time
        // alone only there (sessions end by an event).
        let seen: Vec<Key> = self.http_seen.iter().cloned().collect();
        for k in seen {
            let (online, idle, active) = match self.slots.get(&k) {
                Some(s) => (
                    s.online(now, visibility),
                    s.is_idle(now, visibility),
                    s.http_active(now, visibility),
                ),
                None => (false, true, false),
            };
            if !online {
                lock(&self.board).set_presence(&k.0, &k.1, false, now);
            }
            if idle {
                self.slots.remove(&k);
            }
            if !active {
                self.http_seen.remove(&k);
            }
        }
        freed
    }

    fn remove_msg(
        &mut self,
        ns: &str,
        name: &str,
        pred: impl Fn(&Stored) -> bool,
        ids: &[MessageId],
    ) -> usize {
        let parts = (ns, name);
        let kp: &dyn KeyParts = &parts;
        // The slot's key, for the store's record of what went.
        let k = match self.track_store {
            true => self.slots.get_key_value(kp).map(|(k, _)| k.clone()),
            false => None,
        };
        let Some(slot) = self.slots.get_mut(kp) else {
            return 0;
        };
        let Some(mb) = slot.mailbox.as_deref_mut() else {
            return 0;
        };
        let before_len = mb.msgs.len();
        let head_before = mb.msgs.first().map(|(_, m)| m.expires_at);
        let mut freed = 0;
        let seqs: Vec<u64> = if ids.is_empty() {
            mb.msgs
                .iter()
                .filter(|(_, m)| pred(m))
                .map(|(s, _)| s)
                .collect()
        } else {
            ids.iter()
                .filter_map(|id| mb.by_id.get(id).copied())
                .collect()
        };
        for seq in &seqs {
            if let Some(m) = mb.msgs.remove(*seq) {
                if let Some(k) = &k {
                    self.removed
                        .push((k.0.clone(), k.1.clone(), m.from.clone(), m.id));
                }
                mb.by_id.remove(&m.id);
                let cost = held_cost(&m.from, &m.body);
                mb.bytes -= cost;
                freed += cost;
                if matches!(m.lease, Lease::Http(_)) {
                    mb.http_leased -= 1;
                }
            }
        }
        let removed = before_len - mb.msgs.len();
        let now_empty = mb.msgs.is_empty();
        let head_after = mb.msgs.first().map(|(_, m)| m.expires_at);
        let idle = slot.is_idle(Instant::now(), self.limits.visibility);
        if head_after != head_before {
            if let Some((k, _)) = self.slots.get_key_value(kp) {
                if let Some(t) = head_before {
                    self.expiry.remove(&(t, k.clone()));
                }
                if let Some(t) = head_after {
                    self.expiry.insert((t, k.clone()));
                }
            }
        }
        if removed > 0 {
            let u = ns_usage(&mut self.usage, &self.shared_usage, ns);
            u.bytes.fetch_sub(freed, Ordering::Relaxed);
            if now_empty {
                u.mailboxes.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if idle {
            self.slots.remove(kp);
        }
        removed
    }

    /// Messages removed since the last call (when `track_store`).
    pub(crate) fn take_removed(&mut self) -> Vec<Removed> {
        std::mem::take(&mut self.removed)
    }

    /// The names of the message the last [`Self::enqueue`] stored (when
    /// `track_store`), once.
    pub(crate) fn take_put(&mut self) -> Option<PutNames> {
        self.put.take()
    }

    /// Forgets acknowledged messages; returns how many were held.
    pub(crate) fn ack(&mut self, ns: &str, name: &str, ids: &[MessageId]) -> usize {
        if ids.is_empty() {
            return 0;
        }
        self.remove_msg(ns, name, |_| false, ids)
    }

    /// Drops expired messages, at most about `budget`; returns how many,
    /// and whether more are due (call again, after letting others take
    /// the lock). Visits only mailboxes whose oldest message expired.
    pub(crate) fn expire(&mut self, now: Instant, budget: usize) -> (usize, bool) {
        let mut n = 0;
        while let Some((t, k)) = self.expiry.first().cloned() {
            if t > now {
                return (n, false);
            }
            if n >= budget {
                return (n, true);
            }
            n += self.remove_msg(&k.0, &k.1, |m| m.expires_at <= now, &[]);
            // Whatever remained (a message restored out of order), this
            // entry is done with.
            if self.expiry.first() == Some(&(t, k.clone())) {
                self.expiry.pop_first();
                if let Some(h) = self
                    .slots
                    .get(&k)
                    .and_then(|s| s.mailbox.as_ref()?.msgs.first())
                    .map(|(_, m)| m.expires_at)
                    .filter(|h| *h > t)
                {
                    self.expiry.insert((h, k));
                }
            }
        }
        (n, false)
    }

    /// Every attached session.
    pub(crate) fn sessions(&self) -> Vec<Arc<SessionCtl>> {
        self.slots
            .values()
            .filter_map(|s| s.session.clone())
            .collect()
    }

    /// Attached sessions with the name each is attached as.
    pub(crate) fn sessions_named(&self) -> Vec<(Arc<str>, Arc<SessionCtl>)> {
        self.slots
            .iter()
            .filter_map(|(k, s)| s.session.clone().map(|c| (k.1.clone(), c)))
            .collect()
    }

    /// Names attached in `ns` (over QUIC, or polling over HTTP), sorted.
    pub(crate) fn peers(&self, ns: &str, now: Instant) -> Vec<Peer> {
        let visibility = self.limits.visibility;
        let mut v: Vec<Peer> = self
            .slots
            .iter()
            .filter(|((n, _), _)| &**n == ns)
            .filter_map(|((_, name), s)| {
                if let Some(c) = &s.session {
                    Some(Peer {
                        name: name.to_string(),
                        since: c.since,
                        via: Via::Quic,
                    })
                } else if s.http_active(now, visibility) {
                    Some(Peer {
                        name: name.to_string(),
                        since: s
                            .http
                            .as_ref()
                            .and_then(|h| h.since)
                            .unwrap_or_else(SystemTime::now),
                        via: Via::Http,
                    })
                } else {
                    None
                }
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Every held message, for saving at shutdown. `now`/`wall_now_ms`
    /// convert expiry to wall-clock time.
    pub(crate) fn export(&self, now: Instant, wall_now_ms: u64) -> Vec<super::persist::Saved> {
        let mut out = Vec::new();
        for ((ns, to), slot) in &self.slots {
            for m in slot.mailbox.iter().flat_map(|mb| mb.msgs.values()) {
                let left = m.expires_at.saturating_duration_since(now).as_millis() as u64;
                out.push(super::persist::Saved {
                    ns: ns.clone(),
                    to: to.clone(),
                    from: m.from.clone(),
                    id: m.id,
                    body: m.body.clone(),
                    sent_at_ms: m.sent_at_ms,
                    expires_at_ms: wall_now_ms + left,
                });
            }
        }
        out
    }

    /// Puts a saved message back, with its remaining lifetime.
    pub(crate) fn restore(
        &mut self,
        m: super::persist::Saved,
        now: Instant,
        wall_now_ms: u64,
    ) -> Result<(), NotRestored> {
        if m.expires_at_ms <= wall_now_ms {
            return Err(NotRestored::Expired);
        }
        let left = Duration::from_millis(m.expires_at_ms - wall_now_ms);
        let r = self.enqueue(&m.ns, &m.from, &m.to, m.id, m.body, m.sent_at_ms, now);
        // The store has this message already: no record, no names kept.
        self.put = None;
        match r {
            Enqueued::Accepted { .. } => {
                // enqueue gave it the full TTL; keep its remaining one.
                let mb = self
                    .slots
                    .get_mut(&(&*m.ns, &*m.to) as &dyn KeyParts)
                    .and_then(|s| s.mailbox.as_deref_mut());
                if let Some(mb) = mb {
                    if let Some(seq) = mb.by_id.get(&m.id).copied() {
                        if let Some(s) = mb.msgs.get_mut(seq) {
                            s.expires_at = now + left.min(self.limits.ttl);
                        }
                    }
                }
                Ok(())
            }
            Enqueued::Refused(r) => Err(NotRestored::Refused(r)),
        }
    }

    /// Number of held messages (this stripe).
    #[cfg(test)]
    pub(crate) fn held_messages(&self) -> usize {
        self.held().0
    }

    /// Held messages and their body bytes (this stripe).
    pub(crate) fn held(&self) -> (usize, usize) {
        self.slots
            .values()
            .filter_map(|s| s.mailbox.as_deref())
            .fold((0, 0), |(n, b), m| (n + m.msgs.len(), b + m.bytes))
    }
}

/// Takes a lock; a panic while it was held would be a bug, so serving goes on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stripes of the registry (a power of two). Many more than cores, so two
/// busy names rarely share one.
pub(crate) const REGISTRY_STRIPES: usize = 64;

/// The registry, striped by `(namespace, name)`: each stripe is a
/// [`Registry`] of the slots that hash to it, under its own lock. A message
/// takes only its recipient's stripe, a session's hand-out and
/// acknowledgement only its own, so sessions on different cores (and
/// endpoint shards) work in different stripes; delivery into another
/// stripe is the message put in its mailbox there and the recipient's
/// session woken. What spans stripes is shared apart: the status board
/// (its own lock, taken inside a stripe's, never around one) and each
/// namespace's usage (atomic counters, see [`NsUsage`]).
#[derive(Debug)]
pub(crate) struct Registries {
    stripes: Box<[Mutex<Registry>]>,
    /// Picks a name's stripe: names are chosen by peers, so keyed.
    pick: ahash::RandomState,
    board: Arc<Mutex<StatusBoard>>,
    next_session: AtomicU64,
}

impl Registries {
    /// `stripes` (rounded up to a power of two) stripes, each set up by `setup`.
    pub(crate) fn new(
        limits: MailboxLimits,
        status_retention: Duration,
        status_interval: Duration,
        stripes: usize,
        setup: impl Fn(&mut Registry),
    ) -> Self {
        let board = Arc::new(Mutex::new(StatusBoard::new(
            status_retention,
            status_interval,
        )));
        let usage = Arc::new(Usage::default());
        let stripes = (0..stripes.max(1).next_power_of_two())
            .map(|_| {
                let mut r = Registry::new(limits.clone(), board.clone(), usage.clone());
                setup(&mut r);
                Mutex::new(r)
            })
            .collect();
        Self {
            stripes,
            pick: ahash::RandomState::new(),
            board,
            next_session: AtomicU64::new(1),
        }
    }

    /// The stripe of `(ns, name)`, locked.
    pub(crate) fn of(&self, ns: &str, name: &str) -> MutexGuard<'_, Registry> {
        let h = self.pick.hash_one((ns, name)) as usize;
        lock(&self.stripes[h & (self.stripes.len() - 1)])
    }

    /// How many stripes.
    pub(crate) fn stripes(&self) -> usize {
        self.stripes.len()
    }

    /// Stripe `i`, locked; none past the last.
    pub(crate) fn nth(&self, i: usize) -> Option<MutexGuard<'_, Registry>> {
        self.stripes.get(i).map(lock)
    }

    /// Every stripe, each locked while the caller holds it (one at a time
    /// when the caller drops each before taking the next).
    pub(crate) fn each(&self) -> impl Iterator<Item = MutexGuard<'_, Registry>> {
        self.stripes.iter().map(lock)
    }

    /// The status board. Never take a stripe while holding it.
    pub(crate) fn board(&self) -> MutexGuard<'_, StatusBoard> {
        lock(&self.board)
    }

    /// A new session id (unique for this process).
    pub(crate) fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The session attached as `(ns, name)`, if any.
    pub(crate) fn session(&self, ns: &str, name: &str) -> Option<Arc<SessionCtl>> {
        self.of(ns, name).session(ns, name)
    }

    /// Every attached session.
    pub(crate) fn sessions(&self) -> Vec<Arc<SessionCtl>> {
        self.each().flat_map(|r| r.sessions()).collect()
    }

    /// Attached sessions with the name each is attached as.
    pub(crate) fn sessions_named(&self) -> Vec<(Arc<str>, Arc<SessionCtl>)> {
        self.each().flat_map(|r| r.sessions_named()).collect()
    }

    /// Names attached in `ns` (over QUIC, or polling over HTTP), sorted.
    pub(crate) fn peers(&self, ns: &str, now: Instant) -> Vec<Peer> {
        let mut v: Vec<Peer> = self.each().flat_map(|r| r.peers(ns, now)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Every held message (see [`Registry::export`]).
    pub(crate) fn export(&self, now: Instant, wall_now_ms: u64) -> Vec<super::persist::Saved> {
        self.each()
            .flat_map(|r| r.export(now, wall_now_ms))
            .collect()
    }

    /// Held messages and their body bytes (all namespaces).
    pub(crate) fn held(&self) -> (usize, usize) {
        self.each().fold((0, 0), |(n, b), r| {
            let (rn, rb) = r.held();
            (n + rn, b + rb)
        })
    }

    /// Frees HTTP leases that ran out, forgets idle HTTP pollers (every
    /// stripe, one at a time), and sweeps the status board. Returns how
    /// many leases.
    pub(crate) fn sweep_leases(&self, now: Instant) -> usize {
        let freed = self.each().map(|mut r| r.sweep_leases(now)).sum();
        self.board().sweep(now);
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_key_is_found_by_its_borrowed_parts() {
        let mut m: Map<Key, u32> = Map::default();
        // Pairs whose concatenations collide: the parts must hash apart.
        let pairs = [
            ("ns", "ab"),
            ("nsa", "b"),
            ("n", "sab"),
            ("", "nsab"),
            ("x", ""),
        ];
        for (i, (ns, name)) in pairs.iter().enumerate() {
            let k = key(ns, name);
            let kp: &dyn KeyParts = &(*ns, *name);
            assert_eq!(m.hasher().hash_one(&k), m.hasher().hash_one(kp));
            m.insert(k, i as u32);
        }
        for (i, (ns, name)) in pairs.iter().enumerate() {
            assert_eq!(m.get(&(*ns, *name) as &dyn KeyParts), Some(&(i as u32)));
        }
        assert_eq!(m.get(&("ns", "a") as &dyn KeyParts), None);
    }

    /// A stripe with a board and namespace usage of its own.
    fn stripe(limits: MailboxLimits) -> Registry {
        let board = StatusBoard::new(Duration::from_secs(3600), crate::MIN_PUBLISH_INTERVAL);
        Registry::new(limits, Arc::new(Mutex::new(board)), Arc::default())
    }

    fn reg(messages: usize, bytes: usize) -> Registry {
        stripe(MailboxLimits {
            messages,
            bytes,
            ttl: Duration::from_secs(10),
            namespace_bytes: 1000,
            namespace_mailboxes: 3,
            visibility: Duration::from_secs(5),
        })
    }

    fn id(n: u8) -> MessageId {
        MessageId([n; 16])
    }

    #[tokio::test]
    async fn the_store_record_of_a_message_shares_the_registrys_names() {
        let mut r = reg(10, 10_000);
        send(&mut r, "ns", "b", 1, 1);
        assert_eq!(r.take_put(), None, "nothing kept without a store");
        r.track_store = true;
        assert!(matches!(
            send(&mut r, "ns", "b", 2, 1),
            Enqueued::Accepted { new: true, .. }
        ));
        let (ns, to, from) = r.take_put().expect("the put's names");
        let (k, slot) = r
            .slots
            .get_key_value(&("ns", "b") as &dyn KeyParts)
            .expect("slot");
        assert!(
            Arc::ptr_eq(&k.0, &ns) && Arc::ptr_eq(&k.1, &to),
            "the slot's key"
        );
        let held = slot.mailbox.as_ref().expect("mailbox");
        let stored = held.msgs.values().last().expect("message");
        assert!(
            Arc::ptr_eq(&stored.from, &from),
            "the held message's sender"
        );
        assert_eq!((&*ns, &*to, &*from), ("ns", "b", "a"));
        assert_eq!(r.take_put(), None, "taken once");
        // A retried send stores nothing, so it has no record either.
        assert!(matches!(
            send(&mut r, "ns", "b", 2, 1),
            Enqueued::Accepted { new: false, .. }
        ));
        assert_eq!(r.take_put(), None);
        // A refused one neither.
        assert!(matches!(
            send(&mut r, "ns", "b", 3, 100_000),
            Enqueued::Refused(_)
        ));
        assert_eq!(r.take_put(), None);
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
        let mut r = reg(2, 10_000);
        assert_eq!(
            send(&mut r, "ns", "b", 1, 10),
            Enqueued::Accepted {
                online: false,
                new: true
            }
        );
        assert_eq!(
            send(&mut r, "ns", "b", 2, 10),
            Enqueued::Accepted {
                online: false,
                new: true
            }
        );
        let Enqueued::Refused(x) = send(&mut r, "ns", "b", 3, 10) else {
            panic!("expected refusal")
        };
        assert_eq!(x.code, Code::MAILBOX_FULL);
        // Bytes count the body, the sender's name and the overhead.
        let mut r = reg(10, held_cost("a", &[0; 90]) + held_cost("a", &[0; 10]));
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
    async fn empty_bodies_cannot_fill_a_mailbox_past_its_byte_limit() {
        // A million empty messages would be 0 body bytes; each counts its
        // overhead, so the byte limit holds them to a few.
        let mut r = reg(1_000_000, 1024);
        let mut accepted = 0;
        for n in 0..=255u8 {
            if matches!(send(&mut r, "ns", "b", n, 0), Enqueued::Accepted { .. }) {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 1024 / held_cost("a", &[]));
    }

    #[tokio::test]
    async fn retried_send_with_same_id_is_not_stored_twice() {
        let mut r = reg(10, 100);
        send(&mut r, "ns", "b", 1, 10);
        assert_eq!(
            send(&mut r, "ns", "b", 1, 10),
            Enqueued::Accepted {
                online: false,
                new: false
            }
        );
        assert_eq!(r.held_messages(), 1);
    }

    #[tokio::test]
    async fn another_message_under_a_held_id_is_refused_not_taken_in_its_place() {
        let mut r = reg(10, 100);
        send(&mut r, "ns", "b", 1, 10);
        // Another sender, same id.
        let other = r.enqueue(
            "ns",
            "z",
            "b",
            id(1),
            Bytes::from(vec![0; 10]),
            0,
            Instant::now(),
        );
        assert!(matches!(other, Enqueued::Refused(ref x) if x.code == Code::ID_CONFLICT));
        // The same sender, same id, another body.
        let changed = r.enqueue(
            "ns",
            "a",
            "b",
            id(1),
            Bytes::from(vec![1; 10]),
            0,
            Instant::now(),
        );
        assert!(matches!(changed, Enqueued::Refused(ref x) if x.code == Code::ID_CONFLICT));
        assert_eq!(r.held_messages(), 1);
        // The held one is untouched: acknowledging its id removes it.
        assert_eq!(r.ack("ns", "b", &[id(1)]), 1);
    }

    fn striped(namespace_mailboxes: usize, namespace_bytes: usize) -> Registries {
        let limits = MailboxLimits {
            messages: 10,
            bytes: 1000,
            ttl: Duration::from_secs(10),
            namespace_bytes,
            namespace_mailboxes,
            visibility: Duration::from_secs(5),
        };
        Registries::new(
            limits,
            Duration::from_secs(3600),
            crate::MIN_PUBLISH_INTERVAL,
            REGISTRY_STRIPES,
            |_| {},
        )
    }

    /// Names whose slots are in `n` different stripes.
    fn names_in_different_stripes(r: &Registries, ns: &str, n: usize) -> Vec<String> {
        let stripe = |name: &str| r.pick.hash_one((ns, name)) as usize & (r.stripes() - 1);
        let mut seen = HashSet::new();
        let names: Vec<String> = (0..)
            .map(|i| format!("p{i}"))
            .filter(|name| seen.insert(stripe(name)))
            .take(n)
            .collect();
        assert_eq!(names.len(), n);
        names
    }

    fn send_to(r: &Registries, ns: &str, to: &str, n: u8, len: usize) -> Enqueued {
        let body = Bytes::from(vec![0; len]);
        r.of(ns, to)
            .enqueue(ns, "a", to, id(n), body, 0, Instant::now())
    }

    #[tokio::test]
    async fn namespace_limits_hold_across_stripes() {
        let r = striped(3, 1000);
        let names = names_in_different_stripes(&r, "ns", 5);
        for (i, to) in names[..3].iter().enumerate() {
            assert!(matches!(
                send_to(&r, "ns", to, i as u8, 1),
                Enqueued::Accepted { .. }
            ));
        }
        // A fourth mailbox, in a fourth stripe: over the namespace's limit.
        assert!(
            matches!(send_to(&r, "ns", &names[3], 9, 1), Enqueued::Refused(ref x) if x.code == Code::NAMESPACE_FULL)
        );
        // More mail for a mailbox that holds some already is no new mailbox.
        assert!(matches!(
            send_to(&r, "ns", &names[0], 10, 1),
            Enqueued::Accepted { .. }
        ));
        // Another namespace is unaffected.
        assert!(matches!(
            send_to(&r, "other", &names[3], 9, 1),
            Enqueued::Accepted { .. }
        ));
        // Emptying a mailbox in one stripe makes room in another.
        assert_eq!(r.of("ns", &names[1]).ack("ns", &names[1], &[id(1)]), 1);
        assert!(matches!(
            send_to(&r, "ns", &names[4], 11, 1),
            Enqueued::Accepted { .. }
        ));
        assert_eq!(r.held(), (5, 5 * held_cost("a", &[0])));

        // Bytes: what all stripes hold together counts, and a refused
        // message counts nothing.
        let r = striped(100, 3 * held_cost("a", &[0; 100]));
        let names = names_in_different_stripes(&r, "ns", 4);
        for (i, to) in names[..3].iter().enumerate() {
            assert!(matches!(
                send_to(&r, "ns", to, i as u8, 100),
                Enqueued::Accepted { .. }
            ));
        }
        for _ in 0..2 {
            assert!(
                matches!(send_to(&r, "ns", &names[3], 9, 100), Enqueued::Refused(ref x) if x.code == Code::NAMESPACE_FULL)
            );
        }
        assert_eq!(r.of("ns", &names[0]).ack("ns", &names[0], &[id(0)]), 1);
        assert!(matches!(
            send_to(&r, "ns", &names[3], 9, 100),
            Enqueued::Accepted { .. }
        ));
    }

    /// Senders on several threads racing for a namespace's last room: no
    /// more is ever held than its limit, and a refused send leaves nothing
    /// counted, so afterwards the namespace fills to exactly its limit and
    /// empties back to zero. Once for mailboxes, once for bytes.
    #[test]
    fn racing_senders_never_hold_more_than_a_namespace_allows() {
        const LIMIT: usize = 40;
        const THREADS: usize = 4;
        const PER_THREAD: usize = 30;
        let cost = held_cost("a", &[0]);
        for r in [striped(LIMIT, 1 << 20), striped(1 << 20, LIMIT * cost)] {
            let name = |t: usize, i: usize| format!("t{t}-{i}");
            let accepted: usize = std::thread::scope(|s| {
                let racers: Vec<_> = (0..THREADS)
                    .map(|t| {
                        let (r, name) = (&r, &name);
                        s.spawn(move || {
                            (0..PER_THREAD)
                                .filter(|&i| {
                                    matches!(
                                        send_to(r, "ns", &name(t, i), 1, 1),
                                        Enqueued::Accepted { .. }
                                    )
                                })
                                .count()
                        })
                    })
                    .collect();
                racers
                    .into_iter()
                    .map(|h| h.join().expect("a racer panicked"))
                    .sum()
            });
            // 120 sends for 40 places: exactly 40 taken, as many as held.
            // (Every reservation is the same size and none is given back
            // during the race, so none is refused before 40 are taken.)
            assert_eq!(accepted, LIMIT);
            assert_eq!(r.held(), (LIMIT, LIMIT * cost));
            assert!(
                matches!(send_to(&r, "ns", "late", 1, 1), Enqueued::Refused(ref x) if x.code == Code::NAMESPACE_FULL)
            );
            // Emptied, the namespace takes exactly its limit again: the
            // refusals counted nothing and the acknowledgements gave all back.
            for t in 0..THREADS {
                for i in 0..PER_THREAD {
                    let to = name(t, i);
                    r.of("ns", &to).ack("ns", &to, &[id(1)]);
                }
            }
            assert_eq!(r.held(), (0, 0));
            let refill = (0..2 * LIMIT)
                .take_while(|i| {
                    matches!(
                        send_to(&r, "ns", &format!("again-{i}"), 1, 1),
                        Enqueued::Accepted { .. }
                    )
                })
                .count();
            assert_eq!(refill, LIMIT);
        }
    }

    #[tokio::test]
    async fn every_stripe_is_seen_by_what_spans_them() {
        let r = striped(100, 1 << 20);
        let names = names_in_different_stripes(&r, "ns", 8);
        let now = Instant::now();
        for (i, to) in names.iter().enumerate() {
            send_to(&r, "ns", to, i as u8, 1);
            r.of("ns", to).http_poll_begin("ns", to, now);
        }
        // Peers: all of them, in name order, one namespace only.
        let mut want: Vec<String> = names.clone();
        want.sort();
        let got: Vec<String> = r.peers("ns", now).into_iter().map(|p| p.name).collect();
        assert_eq!(got, want);
        assert!(r.peers("other", now).is_empty());
        // Presence reached the one board.
        assert!(names.iter().all(|n| r.board().get("ns", n).online));
        assert_eq!(r.export(now, 0).len(), 8);
        assert_eq!(r.held(), (8, 8 * held_cost("a", &[0])));
        // Polls end; after the visibility timeout every stripe's pollers
        // are offline and their (still full) slots stay.
        for to in &names {
            r.of("ns", to).http_poll_end("ns", to, now);
        }
        r.sweep_leases(now + Duration::from_secs(6));
        assert!(names.iter().all(|n| !r.board().get("ns", n).online));
        assert_eq!(r.held(), (8, 8 * held_cost("a", &[0])));
        // Session ids are unique across stripes.
        let ids: HashSet<u64> = (0..100).map(|_| r.next_session_id()).collect();
        assert_eq!(ids.len(), 100);
    }

    #[tokio::test]
    async fn a_held_message_shares_its_sessions_name() {
        let r = striped(100, 1 << 20);
        let sender: Arc<str> = Arc::from("a");
        let body = Bytes::from_static(b"x");
        let mut stripe = r.of("ns", "b");
        let got = stripe.enqueue("ns", &sender, "b", id(1), body.clone(), 0, Instant::now());
        assert!(matches!(got, Enqueued::Accepted { new: true, .. }));
        let held = stripe.export(Instant::now(), 0);
        assert!(Arc::ptr_eq(&held[0].from, &sender), "shared, not copied");
        // A borrowed name of a sender without a slot here is copied.
        let got = stripe.enqueue("ns", "c", "b", id(2), body, 0, Instant::now());
        assert!(matches!(got, Enqueued::Accepted { new: true, .. }));
        let held = stripe.export(Instant::now(), 0);
        assert_eq!(&*held[1].from, "c");
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
        let now = Instant::now();
        send(&mut r, "ns", "b", 1, 1);
        send(&mut r, "ns", "b", 2, 1);
        let b = r.pending("ns", "b", 7, 0, 1, usize::MAX, now);
        assert_eq!(b.count, 1);
        assert!(b.more);
        let b2 = r.pending("ns", "b", 7, b.cursor, 1000, usize::MAX, now);
        assert_eq!(b2.count, 1);
        // Session 7 has both; a new session 8 gets both again.
        assert_eq!(r.pending("ns", "b", 7, 0, 1000, usize::MAX, now).count, 0);
        assert_eq!(
            r.pending("ns", "b", 8, 0, 1000, usize::MAX, now).ids(),
            vec![id(1), id(2)]
        );
        r.ack("ns", "b", &[id(1)]);
        let b3 = r.pending("ns", "b", 9, 0, 1000, usize::MAX, now);
        assert_eq!(b3.ids(), vec![id(2)]);
    }

    #[tokio::test]
    async fn a_batch_goes_out_in_frames_of_at_most_deliveries_per_frame() {
        let mut r = stripe(MailboxLimits {
            messages: 1000,
            bytes: 1 << 20,
            ttl: Duration::from_secs(10),
            namespace_bytes: 1 << 20,
            namespace_mailboxes: 3,
            visibility: Duration::from_secs(5),
        });
        let n = 2 * DELIVERIES_PER_FRAME + 2;
        for i in 0..n {
            let m = u8::try_from(i).expect("fits");
            assert!(matches!(
                send(&mut r, "ns", "b", m, 1),
                Enqueued::Accepted { .. }
            ));
        }
        let b = r.pending("ns", "b", 1, 0, 1 << 20, usize::MAX, Instant::now());
        assert_eq!(b.count, n);
        let sizes: Vec<usize> = b.frames.iter().map(|f| f.len()).collect();
        assert_eq!(sizes, vec![DELIVERIES_PER_FRAME, DELIVERIES_PER_FRAME, 2]);
        let want: Vec<MessageId> = (0..n).map(|i| id(i as u8)).collect();
        assert_eq!(b.ids(), want, "in mailbox order");
    }

    #[tokio::test]
    async fn http_lease_hides_a_message_until_it_runs_out() {
        let mut r = reg(10, 1000);
        let t0 = Instant::now();
        send(&mut r, "ns", "b", 1, 1);
        send(&mut r, "ns", "b", 2, 1);
        let got = r.http_take("ns", "b", 1, t0);
        assert_eq!(got.iter().map(|m| m.id).collect::<Vec<_>>(), vec![id(1)]);
        // A second poll gets only the other one; then nothing.
        assert_eq!(r.http_take("ns", "b", 10, t0).len(), 1);
        assert!(r.http_take("ns", "b", 10, t0).is_empty());
        // A session attached meanwhile skips HTTP-leased mail...
        let b = r.pending("ns", "b", 3, 0, 1000, usize::MAX, t0);
        assert!(b.frames.is_empty() && b.count == 0);
        // ...until the lease runs out: the sweep frees it and rewinds.
        r.ack("ns", "b", &[id(2)]);
        let later = t0 + Duration::from_secs(6);
        assert_eq!(r.sweep_leases(later), 1);
        let b = r.pending("ns", "b", 3, b.cursor, 1000, usize::MAX, later);
        assert_eq!(b.ids(), vec![id(1)]);
        assert_eq!(r.held_messages(), 1);
    }

    #[tokio::test]
    async fn http_pollers_count_as_attached_within_the_visibility_timeout() {
        let mut r = reg(10, 1000);
        let t0 = Instant::now();
        assert_eq!(
            send(&mut r, "ns", "b", 1, 1),
            Enqueued::Accepted {
                online: false,
                new: true
            }
        );
        r.http_poll_begin("ns", "b", t0);
        assert_eq!(r.peers("ns", t0).len(), 1);
        assert_eq!(r.peers("ns", t0)[0].via, Via::Http);
        assert!(r.peers("other", t0).is_empty());
        r.http_poll_end("ns", "b", t0);
        assert_eq!(
            send(&mut r, "ns", "b", 2, 1),
            Enqueued::Accepted {
                online: true,
                new: true
            }
        );
        let later = t0 + Duration::from_secs(6);
        assert!(r.peers("ns", later).is_empty());
        r.ack("ns", "b", &[id(1), id(2)]);
        r.sweep_leases(later);
        assert!(r.slots.is_empty(), "idle slots are forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_messages_are_dropped_and_counted() {
        let mut r = reg(10, 1000);
        send(&mut r, "ns", "b", 1, 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        send(&mut r, "ns", "b", 2, 1);
        assert_eq!(r.expire(Instant::now(), 100), (0, false));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(r.expire(Instant::now(), 100), (1, false));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(r.expire(Instant::now(), 100), (1, false));
        assert_eq!(r.held_messages(), 0);
        assert!(r.slots.is_empty());
        let u = &r.usage["ns"];
        assert_eq!(u.bytes.load(Ordering::Relaxed), 0);
        assert_eq!(u.mailboxes.load(Ordering::Relaxed), 0);
        assert!(r.expiry.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn sweeps_visit_only_what_is_due() {
        let mut r = stripe(MailboxLimits {
            messages: 10,
            bytes: 1000,
            ttl: Duration::from_secs(10),
            namespace_bytes: 1_000_000,
            namespace_mailboxes: 1000,
            visibility: Duration::from_secs(5),
        });
        // Many mailboxes, messages acknowledged and not; HTTP polls.
        for i in 0..50u8 {
            send(&mut r, "ns", &format!("p{i}"), i, 1);
        }
        assert_eq!(r.expiry.len(), 50, "one entry per non-empty mailbox");
        r.ack("ns", "p0", &[id(0)]);
        assert_eq!(r.expiry.len(), 49, "an emptied mailbox leaves the index");
        let _ = r.http_poll_begin("ns", "h", Instant::now());
        r.http_poll_end("ns", "h", Instant::now());
        assert_eq!(r.http_seen.len(), 1);
        tokio::time::advance(Duration::from_secs(11)).await;
        // Expiry in batches: 49 due, 20 at a time.
        let now = Instant::now();
        assert_eq!(r.expire(now, 20), (20, true));
        assert_eq!(r.expire(now, 20), (20, true));
        assert_eq!(r.expire(now, 20), (9, false));
        assert!(r.expiry.is_empty() && r.held_messages() == 0);
        // The HTTP poller went quiet: its presence ends, its slot goes.
        r.sweep_leases(now);
        assert!(r.http_seen.is_empty() && r.slots.is_empty());
    }
}
