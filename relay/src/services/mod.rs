//! Local services: what this relay holds for peers homed here — mailboxes
//! (with HTTP leases and the durable copy at shutdown), the status board
//! and its watches, and streams to attached peers. They know nothing of the
//! mesh or of the doors: doors reach them through the router, mesh calls
//! from other relays reach them through the mesh's inbound side.

pub(crate) mod persist;
pub(crate) mod registry;
pub(crate) mod splice;
pub(crate) mod status;
pub(crate) mod watch;

use crate::metrics::Metrics;
use crate::RelayConfig;
use registry::{Enqueued, Registry, Taken};
use status::Snapshot;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use swb_wire::{Code, MessageId, Refusal, SetStatus, MAX_MESSAGE_BODY};
use tokio_util::sync::CancellationToken;

/// The local services of one relay.
pub(crate) struct Services {
    pub(crate) config: Arc<RelayConfig>,
    registry: Mutex<Registry>,
    pub(crate) metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Services")
    }
}

impl Services {
    pub(crate) fn new(config: Arc<RelayConfig>, metrics: Arc<Metrics>) -> Self {
        let mut r = Registry::new(config.limits.clone(), config.status_retention);
        r.delivery_wait = Some(metrics.delivery_seconds.clone());
        Self {
            config,
            registry: Mutex::new(r),
            metrics,
        }
    }

    /// The registry (sessions, mailboxes, status board).
    pub(crate) fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding the lock would be a bug; keep serving.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a message into the mailbox of `to` (homed here); whether `to`
    /// is attached. Counted in the metrics either way.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn enqueue(
        &self,
        ns: &str,
        from: &str,
        to: &str,
        id: MessageId,
        body: bytes::Bytes,
        sent_at_ms: u64,
    ) -> Result<bool, Refusal> {
        let r = if body.len() > MAX_MESSAGE_BODY {
            Enqueued::Refused(Refusal::new(
                Code::BODY_TOO_LARGE,
                format!(
                    "the message body has {} bytes; the limit is {MAX_MESSAGE_BODY}. Send large data over a stream instead",
                    body.len()
                ),
            ))
        } else {
            self.registry().enqueue(
                ns,
                from,
                to,
                id,
                body,
                sent_at_ms,
                tokio::time::Instant::now(),
            )
        };
        match r {
            Enqueued::Accepted { online } => {
                self.metrics.accepted.inc();
                Ok(online)
            }
            Enqueued::Refused(r) => {
                self.metrics.refused(r.code);
                Err(r)
            }
        }
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
        let notify = self
            .registry()
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
            let got = self
                .registry()
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
        let n = self.registry().ack(ns, name, ids);
        self.metrics.acked.inc_by(n as u64);
        n
    }

    /// Changes the status of `name` (homed here).
    pub(crate) fn set_status(
        &self,
        ns: &str,
        name: &str,
        change: &SetStatus,
    ) -> Result<Arc<Snapshot>, Refusal> {
        self.registry()
            .status
            .set_fields(ns, name, change, tokio::time::Instant::now())
    }

    /// Ends the sessions whose key is not active in `store` (revoked or
    /// gone); how many.
    pub(crate) fn end_revoked(&self, store: &crate::keys::KeyStore) -> usize {
        let mut closed = 0;
        for s in self.registry().sessions() {
            if !store.is_active(&s.key_id) {
                s.end_with(Refusal::new(
                    Code::KEY_REVOKED,
                    "the API key of this daemon was revoked; ask the relay's operator for a new key",
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
        self.services
            .registry()
            .http_poll_end(self.ns, self.name, tokio::time::Instant::now());
    }
}
