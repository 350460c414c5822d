//! Status and presence: every peer's last published status (a small
//! key/value map) and whether it is attached, kept at its home relay.
//!
//! Each `(namespace, name)` has one `watch` channel: every local watcher
//! (QUIC status stream or HTTP event stream) subscribes to it, so a change
//! is published once however many watch it. The channel holds the peer's
//! last few published values ([`Recent`]: at most [`RECENT_CHANGES`], and
//! [`RECENT_BYTES`] of status beyond the newest), so a watcher that wakes
//! after several changes gets each of them, in one write; one further
//! behind finds the oldest it missed gone and gets what is left marked
//! `lagged` (memory stays bounded per peer however slowly it reads). Field changes
//! are published at most every `status_interval` per peer (default
//! [`MIN_PUBLISH_INTERVAL`]); a burst coalesces into the newest value.
//! Presence changes publish at once. A published value is encoded for the
//! wire once, however many watchers write it (see [`Snapshot::wire`]).
//!
//! A name nobody ever held reads as version 0, offline, no fields — and so
//! does a name of another namespace, because nothing here is looked up
//! across namespaces. Watching a name creates its channel, so a watcher may
//! wait for a peer that has not attached yet.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use swb_wire::{Refusal, SetStatus, StatusUpdate};
use tokio::sync::watch;
use tokio::time::Instant;

/// Least time between two field publications of one peer, by default
/// (`RelayConfig::status_interval`).
pub const MIN_PUBLISH_INTERVAL: Duration = Duration::from_millis(50);

/// One peer's status as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Peer name.
    pub name: Arc<str>,
    /// Grows with every change (relay-wide counter); 0: never held.
    pub version: u64,
    /// Version of the previously published snapshot of this peer.
    pub prev_version: u64,
    /// Attached now.
    pub online: bool,
    /// When `online` last changed (None: never).
    pub since: Option<SystemTime>,
    /// When the fields last changed (None: never).
    pub updated: Option<SystemTime>,
    /// The status.
    pub fields: Arc<BTreeMap<String, String>>,
    /// Its `StatusUpdate` frame, encoded once for every watcher.
    pub(crate) wire: WireOnce,
}

/// A snapshot's encoded `StatusUpdate` frames (without and with `lagged`),
/// made by the first watcher that writes one and shared by the rest: a
/// change watched by many costs one encoding, not one per watcher. A clone
/// starts empty (a clone is made to be changed); equality ignores it.
#[derive(Default)]
pub(crate) struct WireOnce([std::sync::OnceLock<bytes::Bytes>; 2]);

impl Clone for WireOnce {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for WireOnce {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for WireOnce {}

impl std::fmt::Debug for WireOnce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WireOnce")
    }
}

fn ms(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rfc3339(t: Option<SystemTime>) -> serde_json::Value {
    match t {
        Some(t) => serde_json::Value::String(rfc3339_millis(t)),
        None => serde_json::Value::Null,
    }
}

/// The last instant RFC 3339 can write (9999-12-31T23:59:59.999Z).
const RFC3339_MAX_MS: u64 = 253_402_300_799_999;

/// RFC 3339 with milliseconds, for any time: one past year 9999 (which a
/// hostile or broken peer can send) is written as the last instant
/// RFC 3339 has, never a panic.
pub(crate) fn rfc3339_millis(t: SystemTime) -> String {
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let t = UNIX_EPOCH + std::time::Duration::from_millis(ms.min(RFC3339_MAX_MS));
    humantime::format_rfc3339_millis(t).to_string()
}

/// [`rfc3339_millis`] of milliseconds since the Unix epoch.
pub(crate) fn rfc3339_of_ms(ms: u64) -> String {
    rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(ms.min(RFC3339_MAX_MS)))
}

impl Snapshot {
    fn unknown(name: &str) -> Self {
        Self {
            name: Arc::from(name),
            version: 0,
            prev_version: 0,
            online: false,
            since: None,
            updated: None,
            fields: Arc::new(BTreeMap::new()),
            wire: WireOnce::default(),
        }
    }

    /// What it weighs against [`RECENT_BYTES`]: its name, keys and values.
    fn weight(&self) -> usize {
        self.name.len()
            + self
                .fields
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// From the wire form (a value another relay published).
    pub fn from_update(u: &StatusUpdate) -> Self {
        let t = |ms: u64| (ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ms));
        Self {
            name: Arc::from(u.name.as_str()),
            version: u.version,
            prev_version: 0,
            online: u.online,
            since: t(u.since_ms),
            updated: t(u.updated_ms),
            fields: Arc::new(u.fields.clone()),
            wire: WireOnce::default(),
        }
    }

    /// The wire form.
    pub fn to_update(&self, lagged: bool) -> StatusUpdate {
        StatusUpdate {
            name: self.name.to_string(),
            version: self.version,
            online: self.online,
            since_ms: ms(self.since),
            updated_ms: ms(self.updated),
            fields: (*self.fields).clone(),
            lagged,
        }
    }

    /// The `StatusUpdate` frame of [`Self::to_update`], encoded (once per
    /// snapshot and `lagged`; later calls share the bytes).
    pub fn wire(&self, lagged: bool) -> Result<bytes::Bytes, swb_wire::EncodeError> {
        self.wire_ref(lagged).cloned()
    }

    /// [`Self::wire`] without taking a share of the bytes: a watch stream
    /// copies them into its own write, so the count of a change's shared
    /// bytes is not written by every watcher's task, on every core.
    pub fn wire_ref(&self, lagged: bool) -> Result<&bytes::Bytes, swb_wire::EncodeError> {
        let cell = &self.wire.0[usize::from(lagged)];
        if let Some(b) = cell.get() {
            return Ok(b);
        }
        let mut b = bytes::BytesMut::new();
        swb_wire::Frame::StatusUpdate(self.to_update(lagged)).encode(&mut b)?;
        Ok(cell.get_or_init(|| b.freeze()))
    }

    /// The JSON form of the HTTP API.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": &*self.name,
            "version": self.version,
            "online": self.online,
            "since": rfc3339(self.since),
            "updated": rfc3339(self.updated),
            "status": &*self.fields,
        })
    }
}

/// Published values a watched peer's channel keeps besides the newest.
/// Measured with `swbd-bench fanout` (2026-12-06, one CPU): 32 let a
/// publisher with more than 32 changes in flight outrun its watchers, who
/// then skip changes (40–67 % with 128 in flight) and write smaller batches.
pub const RECENT_CHANGES: usize = 128;

/// How long a published value is kept for watchers that have not taken it
/// yet, besides the newest: a peer that published a burst and went quiet
/// keeps only its newest value once this has passed (trimmed at its next
/// publication, or at the board's walk of every entry, once a minute).
pub const RECENT_FOR: Duration = Duration::from_secs(1);

/// Status bytes (keys, values and names) a watched peer's channel keeps
/// besides the newest value's: with large statuses fewer than
/// [`RECENT_CHANGES`] are kept (one of the largest, 4096 bytes). Each
/// kept value also holds its snapshot, map and encoded frame, about
/// 0.85 KiB for a one-key status (README, *Limits*), for at most
/// [`RECENT_FOR`] after a later publication.
pub const RECENT_BYTES: usize = 4 * 1024;

/// A watched peer's last published values, oldest first, the newest last
/// (never empty), shared by the peer's channel and every watcher of it. A
/// publication appends one in place (dropping the oldest past the bounds)
/// and then notifies the channel; a watcher takes the values newer than
/// what it had. Each value is kept with when it was published (for
/// [`RECENT_FOR`]).
///
/// Appending in place costs the same however many are kept. Before, each
/// publication made a new list of them all (a reference count written
/// per kept value, then again when the old list went): with
/// [`RECENT_CHANGES`] of 128, about 3 % of all samples in
/// a one-CPU profile of `swbd-bench fanout`.
#[derive(Debug, Clone)]
pub(crate) struct Recent(Arc<std::sync::Mutex<Kept>>);

#[derive(Debug)]
struct Kept {
    values: std::collections::VecDeque<(Instant, Arc<Snapshot>)>,
    /// What the values before the newest weigh together
    /// ([`Snapshot::weight`]).
    older_bytes: usize,
}

impl Kept {
    /// Drops the oldest values until those before the newest are within
    /// the bounds at `now`: at most [`RECENT_CHANGES`], [`RECENT_BYTES`]
    /// together, none published more than [`RECENT_FOR`] ago.
    fn trim(&mut self, now: Instant) {
        let before = self.values.len();
        while self.values.len() > 1 {
            let (at, oldest) = &self.values[0];
            if self.values.len() - 1 <= RECENT_CHANGES
                && self.older_bytes <= RECENT_BYTES
                && now.saturating_duration_since(*at) <= RECENT_FOR
            {
                break;
            }
            self.older_bytes -= oldest.weight();
            self.values.pop_front();
        }
        // A burst's room is given back once it is over.
        if self.values.len() < before && self.values.capacity() > 4 * self.values.len().max(4) {
            self.values.shrink_to_fit();
        }
    }
}

impl Recent {
    fn one(s: Arc<Snapshot>, at: Instant) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Kept {
            values: [(at, s)].into(),
            older_bytes: 0,
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        // Nothing here panics while holding it; if something did, the
        // values are still whole.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `s`, published at `now`, dropping the oldest past the
    /// bounds. The caller then notifies the channel.
    fn push(&self, s: Arc<Snapshot>, now: Instant) {
        let mut k = self.lock();
        if let Some((_, newest)) = k.values.back() {
            k.older_bytes += newest.weight();
        }
        k.values.push_back((now, s));
        k.trim(now);
    }

    /// Drops the values past [`RECENT_FOR`] at `now` (the newest stays).
    fn trim(&self, now: Instant) {
        self.lock().trim(now);
    }

    /// The newest value.
    #[cfg(test)]
    pub(crate) fn newest(&self) -> Arc<Snapshot> {
        // Never empty: made by `one`, grown by `push`, `trim` keeps it.
        let k = self.lock();
        k.values[k.values.len() - 1].1.clone()
    }

    /// Calls `each` with every kept value newer than `version`, oldest
    /// first; returns the newest value's version. Found from the newest
    /// back: as many steps as values taken, not as values kept.
    pub(crate) fn newer_than(&self, version: u64, mut each: impl FnMut(&Arc<Snapshot>)) -> u64 {
        let k = self.lock();
        let n = k
            .values
            .iter()
            .rev()
            .take_while(|(_, s)| s.version > version)
            .count();
        for (_, s) in k.values.range(k.values.len() - n..) {
            each(s);
        }
        k.values[k.values.len() - 1].1.version
    }

    /// All kept values, oldest first.
    #[cfg(test)]
    pub(crate) fn all(&self) -> std::vec::IntoIter<Arc<Snapshot>> {
        let v: Vec<_> = self.lock().values.iter().map(|(_, s)| s.clone()).collect();
        v.into_iter()
    }
}

type Key = (Arc<str>, Arc<str>);

struct Entry {
    /// What watchers here are told; made by the first watch (most
    /// entries are attached peers nobody here watches: memory per idle
    /// client), dropped in a sweep once nobody watches.
    tx: Option<watch::Sender<Recent>>,
    /// The value last published (what a new watch starts from).
    published: Arc<Snapshot>,
    /// Newest value, published or waiting for the publish interval.
    current: Arc<Snapshot>,
    last_publish: Option<Instant>,
    /// Offline since (for the retention TTL).
    offline_at: Option<Instant>,
    /// A copy of a peer homed on another relay (kept while watched here).
    mirror: bool,
}

impl Entry {
    /// Whether anyone here watches it.
    fn watched(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.receiver_count() > 0)
    }
}

/// Status entries one namespace may have on a relay (names with a status,
/// attached peers and watched names together).
pub(crate) const MAX_STATUS_PER_NAMESPACE: usize = 10_000;

/// All statuses of this relay.
pub(crate) struct StatusBoard {
    entries: HashMap<Key, Entry>,
    /// Entries per namespace (for [`MAX_STATUS_PER_NAMESPACE`]).
    per_ns: HashMap<Arc<str>, usize>,
    next_version: u64,
    dirty: HashSet<Key>,
    /// How long an offline peer's status is kept.
    retention: Duration,
    /// Least time between two field publications of one peer.
    interval: Duration,
    /// Changes published to watchers since start (metrics).
    pub(crate) published: u64,
    /// Offline entries by when they went offline (stale pairs are skipped):
    /// the retention sweep visits only what is due.
    offline: BTreeSet<(Instant, Key)>,
    /// Sweeps since channels nobody holds were last looked for.
    sweeps: u32,
}

impl std::fmt::Debug for StatusBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusBoard")
            .field("entries", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl StatusBoard {
    pub(crate) fn new(retention: Duration, interval: Duration) -> Self {
        Self {
            interval,
            entries: HashMap::new(),
            per_ns: HashMap::new(),
            next_version: 1,
            dirty: HashSet::new(),
            retention,
            published: 0,
            offline: BTreeSet::new(),
            sweeps: 0,
        }
    }

    fn entry(&mut self, ns: &str, name: &str) -> (&mut Entry, Key) {
        let k: Key = (Arc::from(ns), Arc::from(name));
        if !self.entries.contains_key(&k) {
            *self.per_ns.entry(k.0.clone()).or_default() += 1;
        }
        let e = self.entries.entry(k.clone()).or_insert_with(|| {
            let s = Arc::new(Snapshot::unknown(name));
            Entry {
                tx: None,
                published: s.clone(),
                current: s,
                last_publish: None,
                offline_at: None,
                mirror: false,
            }
        });
        (e, k)
    }

    /// The next version: wall-clock microseconds, strictly increasing. So
    /// versions grow across relays too (a peer that moves to another relay
    /// keeps increasing versions), up to clock skew.
    fn bump(&mut self) -> u64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let v = self.next_version.max(wall);
        self.next_version = v + 1;
        v
    }

    /// Takes a value published by the peer's home relay (for watchers here
    /// of a peer homed elsewhere). Older or equal versions are ignored.
    pub(crate) fn mirror_update(&mut self, ns: &str, u: &StatusUpdate, now: Instant) {
        let (e, k) = self.entry(ns, &u.name);
        e.mirror = true;
        if u.version <= e.current.version {
            return;
        }
        let t = |ms: u64| (ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ms));
        e.current = Arc::new(Snapshot {
            name: Arc::from(u.name.as_str()),
            version: u.version,
            prev_version: 0,
            online: u.online,
            since: t(u.since_ms),
            updated: t(u.updated_ms),
            fields: Arc::new(u.fields.clone()),
            wire: WireOnce::default(),
        });
        Self::publish(e, now);
        self.published += 1;
        self.dirty.remove(&k);
    }

    /// Whether anyone here watches `(ns, name)`.
    pub(crate) fn watched(&self, ns: &str, name: &str) -> bool {
        self.entries
            .get(&(Arc::from(ns), Arc::from(name)))
            .is_some_and(Entry::watched)
    }

    fn publish(e: &mut Entry, now: Instant) {
        let mut s = (*e.current).clone();
        s.prev_version = e.published.version;
        let s = Arc::new(s);
        e.current = s.clone();
        e.published = s.clone();
        if let Some(tx) = &e.tx {
            tx.borrow().push(s, now);
            tx.send_modify(|_| {});
        }
        e.last_publish = Some(now);
    }

    /// Marks a peer attached or not; publishes at once if it changed.
    pub(crate) fn set_presence(&mut self, ns: &str, name: &str, online: bool, now: Instant) {
        if self
            .entries
            .get(&(Arc::from(ns), Arc::from(name)))
            .is_some_and(|e| e.current.online == online)
        {
            return;
        }
        let v = self.bump();
        let (e, k) = self.entry(ns, name);
        e.mirror = false;
        let mut s = (*e.current).clone();
        s.version = v;
        s.online = online;
        s.since = Some(SystemTime::now());
        e.current = Arc::new(s);
        let old = e.offline_at;
        e.offline_at = (!online).then_some(now);
        let new = e.offline_at;
        Self::publish(e, now);
        self.published += 1;
        self.dirty.remove(&k);
        self.reindex(&k, old, new);
    }

    /// Applies a status change of `(ns, name)`; returns the new snapshot.
    pub(crate) fn set_fields(
        &mut self,
        ns: &str,
        name: &str,
        change: &SetStatus,
        now: Instant,
    ) -> Result<Arc<Snapshot>, Refusal> {
        let known = self.entries.contains_key(&(Arc::from(ns), Arc::from(name)));
        if !known && self.per_ns.get(ns).copied().unwrap_or(0) >= MAX_STATUS_PER_NAMESPACE {
            return Err(Refusal::new(
                swb_wire::Code::NAMESPACE_FULL,
                format!("this namespace has {MAX_STATUS_PER_NAMESPACE} statuses on this relay (the limit); statuses of names nobody uses expire after their retention"),
            ));
        }
        let next = {
            let (e, _) = self.entry(ns, name);
            swb_wire::apply_status(&e.current.fields, change)?
        };
        let v = self.bump();
        let interval = self.interval;
        let (e, k) = self.entry(ns, name);
        e.mirror = false;
        let mut s = (*e.current).clone();
        s.version = v;
        s.fields = Arc::new(next);
        s.updated = Some(SystemTime::now());
        // A name with no peer attached (a status set over HTTP) is kept for
        // the retention after its last change, like an offline peer's.
        let old = e.offline_at;
        if !s.online {
            e.offline_at = Some(now);
        }
        let new = e.offline_at;
        e.current = Arc::new(s);
        let wait = e.last_publish.is_some_and(|t| now < t + interval);
        if !wait {
            Self::publish(e, now);
        }
        let out = e.current.clone();
        self.reindex(&k, old, new);
        if wait {
            self.dirty.insert(k);
        } else {
            self.published += 1;
            self.dirty.remove(&k);
        }
        Ok(out)
    }

    /// A subscription to `(ns, name)`: its current value and every change.
    pub(crate) fn subscribe(&mut self, ns: &str, name: &str) -> watch::Receiver<Recent> {
        let e = self.entry(ns, name).0;
        let at = e.last_publish.unwrap_or_else(Instant::now);
        e.tx.get_or_insert_with(|| watch::Sender::new(Recent::one(e.published.clone(), at)))
            .subscribe()
    }

    /// The newest value of `(ns, name)`.
    pub(crate) fn get(&self, ns: &str, name: &str) -> Arc<Snapshot> {
        match self.entries.get(&(Arc::from(ns), Arc::from(name))) {
            Some(e) => e.current.clone(),
            None => Arc::new(Snapshot::unknown(name)),
        }
    }

    /// Every name of `ns` that was ever held (and is still retained), sorted.
    pub(crate) fn known(&self, ns: &str) -> Vec<Arc<Snapshot>> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .filter(|((n, _), e)| &**n == ns && e.current.version > 0 && !e.mirror)
            .map(|(_, e)| e.current.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Whether coalesced changes wait for [`Self::flush`].
    pub(crate) fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Publishes coalesced changes whose interval has passed.
    pub(crate) fn flush(&mut self, now: Instant) {
        let interval = self.interval;
        let due: Vec<Key> = self
            .dirty
            .iter()
            .filter(|k| {
                self.entries
                    .get(*k)
                    .is_some_and(|e| e.last_publish.is_none_or(|t| now >= t + interval))
            })
            .cloned()
            .collect();
        for k in due {
            self.dirty.remove(&k);
            if let Some(e) = self.entries.get_mut(&k) {
                Self::publish(e, now);
                self.published += 1;
            }
        }
    }

    /// Forgets offline peers past retention that nobody watches (a watched
    /// one keeps its channel but loses its fields), and channels of names
    /// nobody held and nobody watches any more.
    pub(crate) fn sweep(&mut self, now: Instant) {
        let retention = self.retention;
        let mut expired = Vec::new();
        while let Some((t, k)) = self.offline.first().cloned() {
            if now < t + retention {
                break;
            }
            self.offline.pop_first();
            if self
                .entries
                .get(&k)
                .is_some_and(|e| e.offline_at == Some(t))
            {
                expired.push(k);
            }
        }
        for k in expired {
            let watched = self.entries.get(&k).is_some_and(Entry::watched);
            if watched {
                let v = self.bump();
                if let Some(e) = self.entries.get_mut(&k) {
                    let mut s = Snapshot::unknown(&k.1);
                    s.version = v;
                    s.since = e.current.since;
                    e.current = Arc::new(s);
                    e.offline_at = None;
                    Self::publish(e, now);
                    self.published += 1;
                }
            } else {
                if self.entries.remove(&k).is_some() {
                    Self::uncount(&mut self.per_ns, &k.0);
                }
                self.dirty.remove(&k);
            }
        }
        // Channels of names nobody held and nobody watches any more: a walk
        // of every entry, so only every 64th sweep (about once a minute).
        self.sweeps = self.sweeps.wrapping_add(1);
        if self.sweeps % 64 != 1 {
            return;
        }
        let per_ns = &mut self.per_ns;
        self.entries.retain(|k, e| {
            if !e.watched() {
                e.tx = None;
            }
            // Values kept for watchers behind, past their time: dropped
            // without waking anyone (nothing new to read).
            if let Some(tx) = &e.tx {
                tx.borrow().trim(now);
            }
            let keep = (e.current.version > 0 && !e.mirror) || e.watched();
            if !keep {
                Self::uncount(per_ns, &k.0);
            }
            keep
        });
    }

    fn reindex(&mut self, k: &Key, old: Option<Instant>, new: Option<Instant>) {
        if old == new {
            return;
        }
        if let Some(t) = old {
            self.offline.remove(&(t, k.clone()));
        }
        if let Some(t) = new {
            self.offline.insert((t, k.clone()));
        }
    }

    fn uncount(per_ns: &mut HashMap<Arc<str>, usize>, ns: &Arc<str>) {
        if let Some(n) = per_ns.get_mut(ns) {
            *n -= 1;
            if *n == 0 {
                per_ns.remove(ns);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_past_year_9999_are_written_not_a_panic() {
        assert_eq!(super::rfc3339_of_ms(u64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(super::rfc3339_of_ms(0), "1970-01-01T00:00:00.000Z");
        let far = std::time::UNIX_EPOCH + std::time::Duration::from_secs(400_000_000_000);
        assert_eq!(super::rfc3339_millis(far), "9999-12-31T23:59:59.999Z");
    }

    use super::*;

    fn set(k: &str, v: &str) -> SetStatus {
        SetStatus {
            set: vec![(k.into(), v.into())],
            clear: vec![],
            replace: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_coalesce_and_watchers_end_on_the_newest_value() {
        let mut b = StatusBoard::new(Duration::from_secs(60), MIN_PUBLISH_INTERVAL);
        let mut rx = b.subscribe("ns", "a");
        assert_eq!(rx.borrow_and_update().newest().version, 0);
        let t0 = Instant::now();
        for i in 0..10_000 {
            b.set_fields("ns", "a", &set("n", &i.to_string()), t0)
                .unwrap();
        }
        // The first change went out at once; the rest wait for the interval.
        assert_eq!(rx.borrow_and_update().newest().fields["n"], "0");
        b.flush(t0 + MIN_PUBLISH_INTERVAL);
        let s = rx.borrow_and_update().newest().clone();
        assert_eq!(s.fields["n"], "9999");
        assert!(
            s.prev_version < s.version - 1,
            "intermediate versions were skipped"
        );
        assert!(!rx.has_changed().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_nobody_attaches_to_expires_after_its_last_change() {
        let mut b = StatusBoard::new(Duration::from_secs(10), MIN_PUBLISH_INTERVAL);
        let t0 = Instant::now();
        // Set over HTTP under a name no daemon holds.
        b.set_fields("ns", "ghost", &set("k", "v"), t0).unwrap();
        b.set_fields("ns", "ghost", &set("k", "w"), t0 + Duration::from_secs(8))
            .unwrap();
        b.sweep(t0 + Duration::from_secs(12));
        assert_eq!(
            b.get("ns", "ghost").fields.len(),
            1,
            "kept: changed 4 s ago"
        );
        b.sweep(t0 + Duration::from_secs(19));
        assert_eq!(
            b.get("ns", "ghost").version,
            0,
            "forgotten 10 s after its last change"
        );
        assert!(b.known("ns").is_empty(), "and gone from the peer list");
    }

    #[tokio::test(start_paused = true)]
    async fn a_namespace_has_a_bounded_number_of_statuses() {
        let mut b = StatusBoard::new(Duration::from_secs(10), MIN_PUBLISH_INTERVAL);
        let t0 = Instant::now();
        for i in 0..MAX_STATUS_PER_NAMESPACE {
            b.set_fields("ns", &format!("n{i}"), &set("k", "v"), t0)
                .unwrap();
        }
        let e = b
            .set_fields("ns", "one-more", &set("k", "v"), t0)
            .expect_err("past the limit");
        assert_eq!(e.code, swb_wire::Code::NAMESPACE_FULL);
        // Existing names still change; other namespaces are not affected.
        b.set_fields("ns", "n0", &set("k", "w"), t0).unwrap();
        b.set_fields("other", "x", &set("k", "v"), t0).unwrap();
        // Once they expire there is room again.
        b.sweep(t0 + Duration::from_secs(11));
        b.set_fields(
            "ns",
            "one-more",
            &set("k", "v"),
            t0 + Duration::from_secs(11),
        )
        .unwrap();
    }

    #[test]
    fn a_change_is_encoded_once_for_every_watcher_and_a_clone_starts_afresh() {
        let mut b = StatusBoard::new(Duration::from_secs(60), Duration::ZERO);
        let now = Instant::now();
        let snap = b.set_fields("ns", "a", &set("k", "v"), now).unwrap();
        let (one, two) = (snap.wire(false).unwrap(), snap.wire(false).unwrap());
        assert_eq!(
            one.as_ptr(),
            two.as_ptr(),
            "the second watcher shares the bytes"
        );
        assert_eq!(
            snap.wire_ref(false).unwrap().as_ptr(),
            one.as_ptr(),
            "a watch stream copies from the same bytes, without a share"
        );
        for (bytes, lagged) in [(one, false), (snap.wire(true).unwrap(), true)] {
            match swb_wire::decode(&bytes).unwrap() {
                swb_wire::Decoded::Frame { frame, consumed } => {
                    assert_eq!(consumed, bytes.len());
                    assert_eq!(frame, swb_wire::Frame::StatusUpdate(snap.to_update(lagged)));
                }
                other => panic!("not a frame: {other:?}"),
            }
        }
        // The next change is a clone of this snapshot: its frame is its own.
        let next = b.set_fields("ns", "a", &set("k", "w"), now).unwrap();
        assert_ne!(next.wire(false).unwrap(), snap.wire(false).unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unwatched_status_has_no_channel_and_a_later_watch_starts_from_the_last_published_value(
    ) {
        let mut b = StatusBoard::new(Duration::from_secs(60), MIN_PUBLISH_INTERVAL);
        let t0 = Instant::now();
        b.set_presence("ns", "a", true, t0);
        let t1 = t0 + MIN_PUBLISH_INTERVAL;
        b.set_fields("ns", "a", &set("n", "1"), t1).unwrap();
        // Held back by the interval: current, not yet published.
        b.set_fields("ns", "a", &set("n", "2"), t1).unwrap();
        let key = (Arc::from("ns"), Arc::from("a"));
        assert!(b.entries[&key].tx.is_none(), "nobody watches: no channel");
        let mut rx = b.subscribe("ns", "a");
        let first = rx.borrow_and_update().newest().clone();
        assert_eq!(
            first.fields["n"], "1",
            "the published value, not the held one"
        );
        assert!(first.online);
        b.flush(t1 + MIN_PUBLISH_INTERVAL);
        let next = rx.borrow_and_update().newest().clone();
        assert_eq!(next.fields["n"], "2");
        assert_eq!(next.prev_version, first.version);
        // Once the watcher is gone, a sweep drops the channel; the status stays.
        drop(rx);
        for i in 1..=64 {
            b.sweep(t1 + MIN_PUBLISH_INTERVAL + Duration::from_millis(i));
        }
        assert!(b.entries[&key].tx.is_none());
        assert_eq!(b.get("ns", "a").fields["n"], "2");
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_interval_every_change_is_published_at_once() {
        let mut b = StatusBoard::new(Duration::from_secs(60), Duration::ZERO);
        let mut rx = b.subscribe("ns", "a");
        let t0 = Instant::now();
        for i in 0..100 {
            b.set_fields("ns", "a", &set("n", &i.to_string()), t0)
                .unwrap();
            assert_eq!(rx.borrow_and_update().newest().fields["n"], i.to_string());
        }
        assert!(!b.has_dirty());
    }

    /// The kept values' `n` fields, oldest first.
    fn kept_n(recent: &Recent) -> Vec<String> {
        recent.all().map(|s| s.fields["n"].clone()).collect()
    }

    #[test]
    fn a_watched_peer_keeps_its_last_changes_bounded_by_count_and_bytes() {
        let mut b = StatusBoard::new(Duration::from_secs(60), Duration::ZERO);
        let mut rx = b.subscribe("ns", "a");
        let now = Instant::now();
        for i in 0..300 {
            b.set_fields("ns", "a", &set("n", &i.to_string()), now)
                .unwrap();
        }
        let recent = rx.borrow_and_update().clone();
        let n = kept_n(&recent);
        let want: Vec<_> = (300 - RECENT_CHANGES - 1..300)
            .map(|i| i.to_string())
            .collect();
        assert_eq!(n, want, "the newest and the {RECENT_CHANGES} before it");
        let kept: Vec<_> = recent.all().collect();
        for w in kept.windows(2) {
            assert_eq!(w[1].prev_version, w[0].version, "consecutive publications");
        }
        // Large statuses: fewer, within the byte bound.
        let big = "x".repeat(1000);
        for _ in 0..10 {
            b.set_fields("ns", "a", &set("n", &big), now).unwrap();
        }
        let recent = rx.borrow_and_update().clone();
        let older: usize = recent
            .all()
            .take(recent.all().len() - 1)
            .map(|s| s.weight())
            .sum();
        assert!(
            older <= RECENT_BYTES,
            "{older} bytes kept besides the newest"
        );
        assert_eq!(recent.all().len(), 1 + RECENT_BYTES / 1002);
    }

    #[test]
    fn kept_values_last_only_recent_for() {
        let mut b = StatusBoard::new(Duration::from_secs(60), Duration::ZERO);
        let mut rx = b.subscribe("ns", "a");
        let t0 = Instant::now();
        for i in 0..10 {
            b.set_fields("ns", "a", &set("n", &i.to_string()), t0)
                .unwrap();
        }
        assert_eq!(
            rx.borrow_and_update().all().len(),
            11,
            "the first value and ten changes"
        );
        // A burst, then quiet: the board's walk (its first sweep walks
        // every entry) drops what is past its time, and wakes no watcher.
        b.sweep(t0 + RECENT_FOR + Duration::from_millis(1));
        assert!(!rx.has_changed().unwrap(), "trimming is not a change");
        assert_eq!(kept_n(&rx.borrow()), ["9"], "only the newest is left");
        // A publication drops the values past their time too, keeping those
        // within it.
        let t1 = t0 + Duration::from_secs(10);
        b.set_fields("ns", "a", &set("n", "10"), t1).unwrap();
        b.set_fields("ns", "a", &set("n", "11"), t1 + RECENT_FOR)
            .unwrap();
        assert_eq!(
            kept_n(&rx.borrow_and_update()),
            ["10", "11"],
            "the value published {RECENT_FOR:?} ago stays"
        );
        b.set_fields(
            "ns",
            "a",
            &set("n", "12"),
            t1 + RECENT_FOR + Duration::from_millis(1),
        )
        .unwrap();
        assert_eq!(kept_n(&rx.borrow_and_update()), ["11", "12"]);
    }

    #[tokio::test(start_paused = true)]
    async fn presence_and_retention() {
        let mut b = StatusBoard::new(Duration::from_secs(10), MIN_PUBLISH_INTERVAL);
        let t0 = Instant::now();
        b.set_presence("ns", "a", true, t0);
        b.set_fields("ns", "a", &set("k", "v"), t0).unwrap();
        assert!(b.get("ns", "a").online);
        assert_eq!(
            b.get("other", "a").version,
            0,
            "other namespaces see nothing"
        );
        b.set_presence("ns", "a", false, t0);
        b.sweep(t0 + Duration::from_secs(5));
        assert_eq!(b.get("ns", "a").fields.len(), 1, "offline keeps its status");
        b.sweep(t0 + Duration::from_secs(11));
        assert_eq!(b.get("ns", "a").version, 0, "forgotten after retention");
        assert!(b.known("ns").is_empty());
    }
}
