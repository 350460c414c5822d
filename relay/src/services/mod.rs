//! Local services: what this relay holds for peers homed here — mailboxes
//! (with HTTP leases and the durable copy at shutdown), the status board
//! and its watches, and streams to attached peers. They know nothing of the
//! mesh or of the doors: doors reach them through the router, mesh calls
//! from other relays reach them through the mesh's inbound side.

pub(crate) mod persist;
pub(crate) mod registry;
pub(crate) mod seqmap;
pub(crate) mod splice;
pub(crate) mod status;
pub(crate) mod store;
#[cfg(feature = "store-compare")]
pub mod store_compare;
pub(crate) mod tun;
pub(crate) mod watch;

use crate::metrics::Metrics;
use crate::RelayConfig;
use registry::{Enqueued, Registries, Registry, Taken};
use status::Snapshot;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{Durable, MsgKey, Record, Store, StoreError, StoredStatus};
use swb_wire::{Code, MessageId, Refusal, SetStatus, MAX_MESSAGE_BODY};
use tokio_util::sync::CancellationToken;

/// Most messages expired under one hold of a registry stripe's lock.
pub(crate) const EXPIRE_BATCH: usize = 4096;

/// The local services of one relay.
pub(crate) struct Services {
    pub(crate) config: Arc<RelayConfig>,
    registry: Registries,
    pub(crate) metrics: Arc<Metrics>,
    /// Where accepted mail and set statuses are kept across crashes.
    store: Store,
    /// Cancelled when the key with this id is revoked: what HTTP long polls
    /// and event streams of the key wait on besides their own work.
    revocations: Mutex<std::collections::HashMap<String, tokio_util::sync::CancellationToken>>,
    /// Per-key send rate (all doors) and HTTP request rate.
    send_rate: Option<crate::limits::KeyRates>,
    http_rate: Option<Mutex<crate::limits::Limiter<String>>>,
    /// TUN address allocators and the peers attached with TUN.
    pub(crate) tun: tun::Tun,
}

/// API keys remembered by the per-key rate limiters.
const RATE_KEYS: usize = 65_536;

fn rate_refusal(what: &str, rate: crate::limits::Rate, wait: std::time::Duration) -> Refusal {
    Refusal::new(
        Code::RATE_LIMITED,
        format!(
            "this API key {what} more than {} per second (bursts of {}); retry in {} ms",
            rate.per_sec,
            rate.burst,
            wait.as_millis().max(1)
        ),
    )
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The refusal a sender hears when its message could not be made durable.
pub(crate) fn not_stored(e: &StoreError) -> Refusal {
    Refusal::new(
        Code::INTERNAL,
        format!("the relay could not store the message ({e}); retry with the same id"),
    )
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Services")
    }
}

impl Services {
    pub(crate) fn new(config: Arc<RelayConfig>, metrics: Arc<Metrics>, store: Store) -> Self {
        let track_store = store.durability() != store::Durability::Memory;
        let registry = Registries::new(
            config.limits.clone(),
            config.status_retention,
            config.status_interval,
            registry::REGISTRY_STRIPES,
            |r| {
                r.delivery_wait = Some(metrics.delivery_seconds.clone());
                r.track_store = track_store;
            },
        );
        Self {
            registry,
            metrics,
            store,
            revocations: Mutex::new(std::collections::HashMap::new()),
            send_rate: config
                .key_send_rate
                .map(|r| crate::limits::KeyRates::new(r, RATE_KEYS)),
            http_rate: config
                .key_http_rate
                .map(|r| Mutex::new(crate::limits::Limiter::new(r, RATE_KEYS))),
            tun: tun::Tun::new(config.state_dir.as_deref(), config.tun_range),
            config,
        }
    }

    /// Takes one send of `key_id` from its rate; the refusal if it is over.
    pub(crate) fn take_send(&self, key_id: &str, now: tokio::time::Instant) -> Result<(), Refusal> {
        self.take_send_from(self.send_rate_of(key_id).as_ref(), now)
    }

    /// The send rate of `key_id`, for a session to take from per message
    /// ([`Self::take_send_from`]); `None` if sends are not limited.
    pub(crate) fn send_rate_of(&self, key_id: &str) -> Option<crate::limits::KeyRate> {
        self.send_rate.as_ref().map(|r| r.rate_of(key_id))
    }

    /// Takes one send from a key's rate as [`Self::send_rate_of`] gave it
    /// (no lookup, no lock); the refusal if it is over.
    pub(crate) fn take_send_from(
        &self,
        rate: Option<&crate::limits::KeyRate>,
        now: tokio::time::Instant,
    ) -> Result<(), Refusal> {
        let (Some(r), Some(limits)) = (rate, &self.send_rate) else {
            return Ok(());
        };
        r.take(now).map_err(|wait| {
            self.metrics.refused(Code::RATE_LIMITED);
            rate_refusal("sends", limits.rate(), wait)
        })
    }

    /// Takes one HTTP request of `key_id` from its rate.
    pub(crate) fn take_http(&self, key_id: &str) -> Result<(), (Refusal, std::time::Duration)> {
        let (Some(l), Some(rate)) = (&self.http_rate, self.config.key_http_rate) else {
            return Ok(());
        };
        let r = l
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(key_id, tokio::time::Instant::now());
        r.map_err(|wait| (rate_refusal("makes HTTP requests", rate, wait), wait))
    }

    /// The token cancelled when the key `key_id` is revoked (or leaves the
    /// keys file). Check that the key is still active after taking it: a
    /// revocation just before is not seen by the token.
    pub(crate) fn revocation(&self, key_id: &str) -> tokio_util::sync::CancellationToken {
        self.revocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key_id.to_string())
            .or_default()
            .clone()
    }

    /// Why the mail store failed, once it did (it stays failed: see
    /// [`store::Settled`]).
    pub(crate) fn store_failure(&self) -> Option<String> {
        self.store.failure()
    }

    /// What the store settled (see [`store::Settled`]).
    pub(crate) fn settled(&self) -> tokio::sync::watch::Receiver<store::Settled> {
        self.store.settled()
    }

    /// How durable accepted mail is here.
    pub(crate) fn durability(&self) -> store::Durability {
        self.store.durability()
    }

    /// Appends a removal record for everything the registry removed.
    fn log_removed(&self, reg: &mut Registry) {
        let removed = reg.take_removed();
        if !removed.is_empty() {
            self.store.append_quiet(
                removed
                    .into_iter()
                    .map(|(ns, to, from, id)| Record::Del(MsgKey { ns, to, from, id }))
                    .collect(),
            );
        }
    }

    /// Puts back what the store recovered at start: messages (in accept
    /// order, with their remaining lifetime) and statuses. What no longer
    /// fits (expired meanwhile, limits changed) is removed from the store
    /// and counted. Returns (restored, not restored).
    pub(crate) fn restore(&self, rec: store::Recovered) -> (usize, usize) {
        let (now, wall) = (tokio::time::Instant::now(), wall_ms());
        let (mut ok, mut lost) = (0, 0);
        let mut dels = Vec::new();
        for m in rec.messages {
            let key = store::key_of(&m);
            let r = self.registry.of(&m.ns, &m.to).restore(m, now, wall);
            match r {
                Ok(()) => ok += 1,
                Err(why) => {
                    lost += 1;
                    tracing::warn!(ns = %key.ns, to = %key.to, id = %key.id, "stored message not restored: {why}");
                    dels.push(Record::Del(key));
                }
            }
        }
        self.store.append_quiet(dels);
        let retention = self.config.status_retention.as_millis() as u64;
        let mut board = self.registry.board();
        for s in rec.statuses {
            if s.updated_ms + retention < wall {
                continue;
            }
            let change = SetStatus {
                set: s.fields,
                clear: Vec::new(),
                replace: true,
            };
            let _ = board.set_fields(&s.ns, &s.name, &change, now);
        }
        self.metrics.expired.inc_by(lost as u64);
        (ok, lost)
    }

    /// Puts back mail that a graceful stop of an earlier version saved in
    /// one file, and stores it in the log.
    pub(crate) fn import(&self, saved: Vec<persist::Saved>) -> (usize, usize) {
        let (now, wall) = (tokio::time::Instant::now(), wall_ms());
        let (mut ok, mut lost) = (0, 0);
        let mut puts = Vec::new();
        for m in saved {
            let copy = m.clone();
            let r = self.registry.of(&m.ns, &m.to).restore(m, now, wall);
            match r {
                Ok(()) => {
                    ok += 1;
                    puts.push(Record::put(copy));
                }
                Err(why) => {
                    lost += 1;
                    tracing::warn!(ns = %copy.ns, to = %copy.to, id = %copy.id, "saved message not restored: {why}");
                }
            }
        }
        self.store.append_quiet(puts);
        self.metrics.expired.inc_by(lost as u64);
        (ok, lost)
    }

    /// Waits until everything stored so far is durable (shutdown).
    pub(crate) async fn flush_store(&self) {
        let _ = self.store.barrier().wait().await;
    }

    /// The registry (sessions, mailboxes, status board), striped by name.
    pub(crate) fn registry(&self) -> &Registries {
        &self.registry
    }

    /// Puts a message into the mailbox of `to` (homed here): whether `to`
    /// is attached, and what completes once the message is durable (the
    /// sender must hear `accepted` only then). A refusal is counted here;
    /// an acceptance by the caller (`swb_relay_messages_accepted_total`:
    /// a session adds a batch of frames' at once, not one per message on a
    /// word every session writes). A retried send (same sender, id and
    /// body) is accepted again without a second copy; its answer waits for
    /// the first copy.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn enqueue<'a>(
        &self,
        ns: &str,
        from: impl Into<registry::NameRef<'a>>,
        to: &str,
        id: MessageId,
        body: bytes::Bytes,
        sent_at_ms: u64,
        now: tokio::time::Instant,
    ) -> Result<(bool, Durable), Refusal> {
        let refusal = |r: Refusal| {
            self.metrics.refused(r.code);
            Err(r)
        };
        if body.len() > MAX_MESSAGE_BODY {
            return refusal(Refusal::new(
                Code::BODY_TOO_LARGE,
                format!(
                    "the message body has {} bytes; the limit is {MAX_MESSAGE_BODY}. Send large data over a stream instead",
                    body.len()
                ),
            ));
        }
        // The store's record, unless it keeps none (memory durability).
        let record = self.store.keeps_records().then(|| {
            let expires_at_ms = wall_ms() + self.config.limits.ttl.as_millis() as u64;
            (body.clone(), expires_at_ms)
        });
        let from = from.into();
        let mut reg = self.registry.of(ns, to);
        let r = reg.enqueue(ns, from, to, id, body, sent_at_ms, now);
        match r {
            Enqueued::Accepted { online, new } => {
                // Appended under the recipient's stripe lock: the log's
                // order is each mailbox's order, a put always before its
                // removal.
                let durable = match record {
                    Some((body, expires_at_ms)) if new => {
                        // The registry's names, shared (made here only if
                        // it kept none, which it does whenever the store
                        // keeps records).
                        let (ns, to, from) = reg
                            .take_put()
                            .unwrap_or_else(|| (Arc::from(ns), Arc::from(to), Arc::from(&*from)));
                        let saved = persist::Saved {
                            ns,
                            to,
                            from,
                            id,
                            body,
                            sent_at_ms,
                            expires_at_ms,
                        };
                        self.store.append_one(Record::put(saved))
                    }
                    _ => self.store.barrier(),
                };
                Ok((online, durable))
            }
            Enqueued::Refused(r) => {
                drop(reg);
                refusal(r)
            }
        }
    }

    /// [`Self::enqueue`], answering once the message is durable.
    pub(crate) async fn enqueue_durable(
        &self,
        ns: &str,
        from: &str,
        to: &str,
        id: MessageId,
        body: bytes::Bytes,
        sent_at_ms: u64,
    ) -> Result<bool, Refusal> {
        let now = tokio::time::Instant::now();
        let (online, durable) = self.enqueue(ns, from, to, id, body, sent_at_ms, now)?;
        self.metrics.accepted.inc();
        durable.wait().await.map_err(|e| not_stored(&e))?;
        Ok(online)
    }

    /// Receives mail of `name` as an HTTP poll does: marks the name
    /// attached over HTTP while it waits (up to `wait` for the first
    /// message), leases what it returns until acknowledged.
    pub(crate) async fn receive(
        &self,
        ns: &str,
        name: &str,
        wait: Duration,
        max: usize,
        cancel: &CancellationToken,
    ) -> Vec<Taken> {
        let notify =
            self.registry
                .of(ns, name)
                .http_poll_begin(ns, name, tokio::time::Instant::now());
        let _presence = HttpPresence {
            services: self,
            ns,
            name,
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register for wake-ups before looking, so mail that lands
            // between the look and the wait is not missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got =
                self.registry
                    .of(ns, name)
                    .http_take(ns, name, max, tokio::time::Instant::now());
            if !got.is_empty() {
                self.metrics.delivered.inc_by(got.len() as u64);
                return got;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Vec::new(),
                _ = tokio::time::sleep_until(deadline) => return Vec::new(),
                _ = &mut notified => {}
            }
        }
    }

    /// Forgets acknowledged messages of `name`; how many were held.
    pub(crate) fn ack(&self, ns: &str, name: &str, ids: &[MessageId]) -> usize {
        let mut reg = self.registry.of(ns, name);
        let n = reg.ack(ns, name, ids);
        self.log_removed(&mut reg);
        self.metrics.acked.inc_by(n as u64);
        n
    }

    /// Forgets a message its new home accepted (a handoff).
    pub(crate) fn handed_off(&self, ns: &str, to: &str, id: MessageId) {
        let mut reg = self.registry.of(ns, to);
        reg.ack(ns, to, &[id]);
        self.log_removed(&mut reg);
    }

    /// Drops expired messages; how many. Takes a stripe's lock for at
    /// most [`EXPIRE_BATCH`] messages at a time.
    pub(crate) fn expire(&self) -> usize {
        let now = tokio::time::Instant::now();
        let mut total = 0;
        for stripe in 0..self.registry.stripes() {
            loop {
                let Some(mut reg) = self.registry.nth(stripe) else {
                    return total;
                };
                let (n, more) = reg.expire(now, EXPIRE_BATCH);
                self.log_removed(&mut reg);
                drop(reg);
                total += n;
                if !more {
                    break;
                }
                std::thread::yield_now();
            }
        }
        total
    }

    /// Changes the status of `name` (homed here); the new status, and what
    /// completes once it is durable.
    pub(crate) fn set_status(
        &self,
        ns: &str,
        name: &str,
        change: &SetStatus,
    ) -> Result<(Arc<Snapshot>, Durable), Refusal> {
        let mut board = self.registry.board();
        let snap = board.set_fields(ns, name, change, tokio::time::Instant::now())?;
        let durable = self.store.append_one(Record::Status(StoredStatus {
            ns: ns.to_string(),
            name: name.to_string(),
            fields: snap
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            updated_ms: wall_ms(),
        }));
        Ok((snap, durable))
    }

    /// [`Self::set_status`], answering once the status is durable.
    pub(crate) async fn set_status_durable(
        &self,
        ns: &str,
        name: &str,
        change: &SetStatus,
    ) -> Result<Arc<Snapshot>, Refusal> {
        let (snap, durable) = self.set_status(ns, name, change)?;
        durable.wait().await.map_err(|e| {
            Refusal::new(
                Code::INTERNAL,
                format!("the relay could not store the status ({e})"),
            )
        })?;
        Ok(snap)
    }

    /// Ends the sessions whose key is not active in `store` (revoked or
    /// gone); how many.
    pub(crate) fn end_revoked(&self, store: &crate::keys::KeyStore) -> usize {
        let mut closed = 0;
        self.revocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, token| {
                let active = store.is_active(id);
                if !active {
                    token.cancel();
                }
                active
            });
        for (name, s) in self.registry().sessions_named() {
            if !store.is_active(&s.key_id) {
                s.end_with(Refusal::new(
                    Code::KEY_REVOKED,
                    "the API key of this daemon was revoked; ask the relay's operator for a new key",
                ));
                closed += 1;
            } else if !store.allows(&s.key_id, &name) {
                s.end_with(Refusal::new(
                    Code::NAME_NOT_ALLOWED,
                    format!("the API key of this daemon may no longer use the name {name}"),
                ));
                closed += 1;
            }
        }
        closed
    }
}

/// Marks a name attached over HTTP for the poll's lifetime.
struct HttpPresence<'a> {
    services: &'a Services,
    ns: &'a str,
    name: &'a str,
}

impl Drop for HttpPresence<'_> {
    fn drop(&mut self) {
        self.services.registry.of(self.ns, self.name).http_poll_end(
            self.ns,
            self.name,
            tokio::time::Instant::now(),
        );
    }
}
