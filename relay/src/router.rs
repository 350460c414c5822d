//! The router: every front door hands what it parsed and authenticated to
//! the router, which decides whether the peer it concerns is homed here
//! (local services) or on another relay (a typed mesh call). Doors never
//! see the mesh; the mesh never sees a door.

use crate::keys::Keys;
use crate::mesh::{unavailable, CallError, Mesh};
use crate::placement::Placement;
use crate::services::splice::Opened;
use crate::services::status::Snapshot;
use crate::services::Services;
use crate::RelayConfig;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use swb_wire::{Code, Deliver, MeshForward, MessageId, Refusal, RelayRecord, SetStatus};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

/// Where the peer a request concerns is homed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// Here: local services.
    Local,
    /// On this other relay: one mesh hop.
    Remote(Arc<RelayRecord>),
}

/// The router of one relay.
pub(crate) struct Router {
    config: Arc<RelayConfig>,
    services: Arc<Services>,
    placement: Arc<Placement>,
    keys: Arc<Keys>,
    mesh: Option<Arc<Mesh>>,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("relay", &self.placement.me().id)
            .finish()
    }
}

impl Router {
    pub(crate) fn new(
        config: Arc<RelayConfig>,
        services: Arc<Services>,
        placement: Arc<Placement>,
        keys: Arc<Keys>,
        mesh: Option<Arc<Mesh>>,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            config,
            services,
            placement,
            keys,
            mesh,
            tasks,
        }
    }

    pub(crate) fn config(&self) -> &RelayConfig {
        &self.config
    }

    pub(crate) fn services(&self) -> &Arc<Services> {
        &self.services
    }

    pub(crate) fn placement(&self) -> &Placement {
        &self.placement
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The owner of every task a door starts.
    pub(crate) fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Where `(ns, name)` is homed.
    /// The TUN address index of `name` of `ns`, assigned if new, from the
    /// namespace's allocator (here or one mesh hop away).
    pub(crate) async fn tun_assign(
        &self,
        ns: &str,
        name: &str,
        want: Option<u32>,
    ) -> Result<u32, Refusal> {
        use crate::services::tun::TUN_KEY;
        match (self.route(ns, TUN_KEY), &self.mesh) {
            (Route::Remote(home), Some(mesh)) => {
                match mesh
                    .tun_call(&home.id, ns, name, swb_wire::MeshOp::TunAssign { want })
                    .await
                {
                    Ok(swb_wire::MeshAnswer::TunIndex(Some(i))) => Ok(i),
                    Ok(swb_wire::MeshAnswer::Refused(r)) => Err(r),
                    Ok(other) => Err(unavailable(
                        name,
                        &home.id,
                        &CallError::Unexpected(format!("{other:?}")),
                    )),
                    Err(e) => Err(unavailable(name, &home.id, &e)),
                }
            }
            _ => self.services.tun.allocate(ns, name, want),
        }
    }

    /// The relay that hands out `ns`'s TUN addresses: another one's id, or
    /// `None` for this relay.
    pub(crate) fn tun_allocator(&self, ns: &str) -> Option<String> {
        match self.route(ns, crate::services::tun::TUN_KEY) {
            Route::Remote(home) => Some(home.id.clone()),
            Route::Local => None,
        }
    }

    /// The TUN address index `name` of `ns` has, if any.
    pub(crate) async fn tun_index(&self, ns: &str, name: &str) -> Option<u32> {
        use crate::services::tun::TUN_KEY;
        match (self.route(ns, TUN_KEY), &self.mesh) {
            (Route::Remote(home), Some(mesh)) => {
                match mesh
                    .tun_call(&home.id, ns, name, swb_wire::MeshOp::TunIndex)
                    .await
                {
                    Ok(swb_wire::MeshAnswer::TunIndex(i)) => i,
                    _ => None,
                }
            }
            _ => self.services.tun.index_of(ns, name),
        }
    }

    /// The peer of `ns` that has TUN index `i`, if any.
    pub(crate) async fn tun_name(&self, ns: &str, i: u32) -> Option<String> {
        use crate::services::tun::TUN_KEY;
        match (self.route(ns, TUN_KEY), &self.mesh) {
            (Route::Remote(home), Some(mesh)) => {
                // The call names a peer (checked as a peer name at the
                // other end); this one asks by index, so any valid name.
                match mesh
                    .tun_call(&home.id, ns, "tun", swb_wire::MeshOp::TunWho { index: i })
                    .await
                {
                    Ok(swb_wire::MeshAnswer::TunName(n)) => n,
                    _ => None,
                }
            }
            _ => self.services.tun.name_of(ns, i),
        }
    }

    /// Sends a TUN packet (a mesh datagram) to relay `home`; `Err` with
    /// the largest datagram the link takes when it is too big, `Err(None)`
    /// when there is no link.
    pub(crate) fn mesh_datagram(&self, home: &str, d: Bytes) -> Result<(), Option<usize>> {
        match &self.mesh {
            Some(m) => m.send_datagram(home, d),
            None => Err(None),
        }
    }

    pub(crate) fn route(&self, ns: &str, name: &str) -> Route {
        match self.placement.home_elsewhere(ns, name) {
            Some(home) => Route::Remote(home),
            None => Route::Local,
        }
    }

    /// [`Self::route`] by the live set a session saw, if it is still the
    /// newest (see [`crate::placement::Seen`]).
    pub(crate) fn route_seen(
        &self,
        seen: &crate::placement::Seen,
        rx: &tokio::sync::watch::Receiver<Arc<crate::placement::LiveSet>>,
        ns: &str,
        name: &str,
    ) -> Route {
        let home = match seen.current(rx) {
            Some(live) => self.placement.home_elsewhere_in(live, ns, name),
            None => self.placement.home_elsewhere(ns, name),
        };
        match home {
            Some(home) => Route::Remote(home),
            None => Route::Local,
        }
    }

    /// Re-reads the keys file if it changed (at most once per `gap`); on a
    /// new key set, ends the sessions of keys that are gone. Whether a new
    /// set was installed.
    pub(crate) fn refresh_keys(&self, gap: Duration) -> bool {
        let installed = match self.keys.refresh(gap) {
            Some(store) => {
                self.end_revoked(&store);
                true
            }
            None => false,
        };
        self.note_keys_file();
        installed
    }

    /// Re-reads the keys now (SIGHUP); the number of keys. A file that
    /// cannot be used is an error and changes nothing.
    pub(crate) fn reload_keys(&self) -> Result<usize, crate::keys::KeysError> {
        let r = self.keys.reload();
        self.note_keys_file();
        let store = r?;
        self.end_revoked(&store);
        Ok(store.len())
    }

    fn note_keys_file(&self) {
        self.services
            .metrics
            .keys_file_ok
            .set(i64::from(self.keys.file_ok()));
    }

    fn end_revoked(&self, store: &crate::keys::KeyStore) {
        let closed = self.services.end_revoked(store);
        if closed > 0 {
            info!(sessions = closed, "closed sessions of revoked keys");
        }
    }

    /// Hands a message to `home`, the recipient's relay: whether the
    /// recipient is attached there.
    pub(crate) async fn forward(&self, home: &str, f: MeshForward) -> Result<bool, Refusal> {
        self.forward_batch(home, vec![f])
            .await
            .pop()
            .unwrap_or_else(|| {
                Err(Refusal::new(
                    Code::INTERNAL,
                    "a forward call gave no answer",
                ))
            })
    }

    /// Hands messages to `home`, their recipients' relay, on one call, in
    /// order: for each, whether its recipient is attached there.
    pub(crate) async fn forward_batch(
        &self,
        home: &str,
        fs: Vec<MeshForward>,
    ) -> Vec<Result<bool, Refusal>> {
        let metrics = &self.services.metrics;
        metrics.forward_calls.inc();
        let r = match &self.mesh {
            Some(m) => m.forward_batch(home, fs).await,
            None => fs
                .iter()
                .map(|_| Err(Refusal::new(Code::INTERNAL, "this relay is not in a mesh")))
                .collect(),
        };
        for one in &r {
            match one {
                Ok(_) => metrics.forwarded.inc(),
                Err(refusal) => metrics.refused(refusal.code),
            }
        }
        r
    }

    /// Sends a message: into a local mailbox or across one mesh hop.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send(
        &self,
        ns: &str,
        from: &str,
        to: &str,
        id: MessageId,
        body: Bytes,
        sent_at_ms: u64,
    ) -> Result<bool, Refusal> {
        match self.route(ns, to) {
            Route::Local => {
                self.services
                    .enqueue_durable(ns, from, to, id, body, sent_at_ms)
                    .await
            }
            Route::Remote(home) => {
                let f = MeshForward {
                    namespace: ns.to_string(),
                    from: from.to_string(),
                    to: to.to_string(),
                    id,
                    body,
                    sent_at_ms,
                    hops: 0,
                };
                self.forward(&home.id, f).await
            }
        }
    }

    /// Opens a stream to `port` of `to` for `from`.
    pub(crate) async fn open_stream(
        &self,
        ns: &str,
        from: &str,
        to: &str,
        port: u16,
    ) -> Result<Opened, Refusal> {
        match (self.route(ns, to), &self.mesh) {
            (Route::Remote(home), Some(m)) => m
                .open_stream(&home.id, ns, from, to, port)
                .await
                .map_err(|e| match e {
                    CallError::Timeout => Refusal::new(
                        Code::TIMEOUT,
                        format!("{to}'s home relay did not answer in time"),
                    ),
                    e => Refusal::new(
                        Code::PEER_OFFLINE,
                        format!(
                            "{to}'s home relay ({}) is unreachable right now ({e})",
                            home.id
                        ),
                    ),
                }),
            _ => self.services.open_local(ns, from, to, port).await,
        }
    }

    /// Receives mail of `name` as an HTTP poll does, wherever it is held.
    pub(crate) async fn receive(
        &self,
        ns: &str,
        name: &str,
        wait: Duration,
        max: usize,
        cancel: &CancellationToken,
    ) -> Result<Vec<Deliver>, Refusal> {
        match (self.route(ns, name), &self.mesh) {
            (Route::Remote(home), Some(m)) => tokio::select! {
                _ = cancel.cancelled() => Ok(Vec::new()),
                r = m.receive(&home.id, ns, name, wait, max) => match r {
                    Ok(r) => r,
                    Err(e) => Err(unavailable(name, &home.id, &e)),
                },
            },
            _ => Ok(self
                .services
                .receive(ns, name, wait, max, cancel)
                .await
                .into_iter()
                .map(|t| Deliver {
                    id: t.id,
                    from: t.from,
                    body: t.body,
                    sent_at_ms: t.sent_at_ms,
                })
                .collect()),
        }
    }

    /// Acknowledges mail of `name`; how many ids were held.
    pub(crate) async fn ack(
        &self,
        ns: &str,
        name: &str,
        ids: Vec<MessageId>,
    ) -> Result<usize, Refusal> {
        match (self.route(ns, name), &self.mesh) {
            (Route::Remote(home), Some(m)) => match m.ack(&home.id, ns, name, ids).await {
                Ok(r) => r,
                Err(e) => Err(unavailable(name, &home.id, &e)),
            },
            _ => Ok(self.services.ack(ns, name, &ids)),
        }
    }

    /// Changes the status of `name`, wherever it is homed.
    pub(crate) async fn set_status(
        &self,
        ns: &str,
        name: &str,
        change: SetStatus,
    ) -> Result<Arc<Snapshot>, Refusal> {
        match (self.route(ns, name), &self.mesh) {
            (Route::Remote(home), Some(m)) => {
                match m.set_status(&home.id, ns, name, change).await {
                    Ok(r) => r.map(|u| Arc::new(Snapshot::from_update(&u))),
                    Err(e) => Err(unavailable(name, &home.id, &e)),
                }
            }
            _ => self.services.set_status_durable(ns, name, &change).await,
        }
    }

    /// Every known peer of `ns`: this relay's, and every other live
    /// relay's (each peer's newest value wins).
    pub(crate) async fn peers(&self, ns: &str) -> Vec<Arc<Snapshot>> {
        let mut all: BTreeMap<String, Arc<Snapshot>> = self
            .services
            .registry()
            .board()
            .known(ns)
            .into_iter()
            .map(|s| (s.name.to_string(), s))
            .collect();
        if let Some(m) = &self.mesh {
            m.known_elsewhere(ns, &mut all).await;
        }
        all.into_values().collect()
    }

    /// Before watching `names` in `ns` here: brings the board's copies of
    /// peers homed elsewhere up to date (and keeps them so, if `lasting`).
    pub(crate) async fn prepare_watch(&self, ns: &str, names: &[String], lasting: bool) {
        if let Some(m) = &self.mesh {
            m.prepare_watch(ns, names, lasting).await;
        }
    }
}
