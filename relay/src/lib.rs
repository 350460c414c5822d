//! The Switchboard relay: a QUIC endpoint (ALPN `swb/1`) that authenticates
//! daemons by API key, registers them by `(namespace, name)`, holds their
//! mailboxes and delivers messages end to end; an HTTPS + JSON door for
//! scripts; and links to other relays of a mesh.
//!
//! # Layers
//!
//! ```text
//!                    endpoint (QUIC handshake budget, ALPN)
//!                      │                         │ swb-mesh/1
//!   front doors ───────┴── session · streams · status_streams · http
//!        │  parse, limit, authenticate
//!        ▼
//!     router ── decides: homed here, or on another relay
//!        │                                   │
//!        ▼                                   ▼
//!   local services                         mesh ── auth · membership · links ·
//!   (mailboxes, status board,               │      calls_in/out · mirror · handoff
//!    streams to attached peers)  ◄──────────┘  (what other relays send us)
//!
//!   leaves, used by all: placement (ring, live set), keys, tls, metrics
//! ```
//!
//! Imports follow the arrows only: a door never names the mesh, the mesh
//! never names a door or the router, local services name neither (a test
//! reads the sources to hold this). This crate root and `endpoint` compose
//! them.
//!
//! # Tasks
//!
//! One cancellation tree per relay: a root token with two children — the
//! doors' (cancelled first at shutdown) and the mesh's (cancelled after the
//! mail handoff). Every task the relay starts is tracked by one
//! [`TaskTracker`]; [`RelayHandle::join`] returns once all of them ended.
//!
//! # Contract
//!
//! [`Relay::spawn`] binds and returns a [`RelayHandle`]; every task the relay
//! starts is owned by it and ends on [`RelayHandle::shutdown`] (sessions get a
//! `Goodbye{shutting_down}` first) or when the handle is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

pub mod carrier;
mod config;
mod doors;
mod endpoint;
/// Entry points for the fuzz targets (`fuzz/`).
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod gate;
pub mod keys;
pub mod limits;
pub mod mesh;
mod metrics;
mod ocsp;
mod offload;
mod placement;
mod router;
mod services;
mod shards;
pub mod tls;

pub use config::{HttpListen, RelayConfig};
pub use doors::http::{openapi, HttpLimits, MAX_REQUEST_BODY};
pub use doors::session::DELIVERY_WINDOW;
pub use gate::InitialLimits;
pub use keys::{KeySource, KeyStore, KeysFile};
pub use ocsp::{OcspConfig, OcspMode, StapleError};
pub use placement::LiveSet;
pub use services::registry::{MailboxLimits, Peer, Via, MESSAGE_OVERHEAD};

/// What the largest message counts against a mailbox's byte limit (its
/// body, the longest sender name, [`MESSAGE_OVERHEAD`]): a mailbox must
/// allow at least this much.
pub const LARGEST_HELD: usize = swb_wire::MAX_MESSAGE_BODY + 63 + MESSAGE_OVERHEAD;
pub use services::status::{
    Snapshot, MIN_PUBLISH_INTERVAL, RECENT_BYTES, RECENT_CHANGES, RECENT_FOR,
};
pub use services::store::{Durability, Recovered, StoreError};
/// The measurement behind the mail store (feature `store-compare`).
#[cfg(feature = "store-compare")]
pub use services::store_compare;
pub use services::watch::{BadName, StatusWatcher};
pub use swb_quic::{
    udp_socket, MESH_RECEIVE_WINDOW, PREAUTH_RECEIVE_WINDOW, SESSION_RECEIVE_WINDOW,
    STREAM_RECEIVE_WINDOW, UDP_BUFFER,
};
pub use tls::Identity;

pub use endpoint::INITIAL_STREAMS;
pub use shards::MAX_SHARDS;

use mesh::Mesh;
use router::Router;
use services::Services;

/// Default [`RelayConfig::max_handshakes`].
pub const MAX_HANDSHAKES: usize = 1024;
/// How long a stopping relay works on handing its held mail to the relays
/// that take over its names; what is left is saved locally.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the endpoint may take to tell peers it closed.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Mesh connections waiting for the mesh to take them.
const MESH_INCOMING_QUEUE: usize = 64;

/// Errors starting a relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Binding a socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// OCSP stapling cannot serve the certificate.
    #[error(transparent)]
    Ocsp(#[from] ocsp::StapleError),
    /// The keys file could not be loaded.
    #[error(transparent)]
    Keys(#[from] keys::KeysError),
    /// The configuration is not usable.
    #[error("{0}")]
    Config(String),
    /// Saved state could not be read.
    #[error("relay state {path}: {source}")]
    State {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// A snapshot of the relay's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Sessions welcomed.
    pub sessions: u64,
    /// Hellos refused (bad key, revoked, bad name, version).
    pub refused_hello: u64,
    /// Connections refused because `max_handshakes` were in progress.
    pub refused_busy: u64,
    /// Messages accepted into a mailbox.
    pub accepted: u64,
    /// Sends refused.
    pub refused_send: u64,
    /// Messages delivered on sessions (redeliveries included).
    pub delivered: u64,
    /// Messages acknowledged and forgotten.
    pub acked: u64,
    /// Messages dropped because their TTL expired.
    pub expired: u64,
    /// Messages held now.
    pub held: u64,
    /// Sessions attached now.
    pub attached: u64,
    /// Data streams spliced.
    pub streams_opened: u64,
    /// Data streams refused (by the relay or the target).
    pub streams_refused: u64,
    /// Mesh links refused for a missing or wrong mesh-key proof.
    pub mesh_refused: u64,
    /// Calls that carried sends made here (by peers attached here or over
    /// HTTP) to their recipients' home relays, one message or many each.
    pub mesh_forward_calls: u64,
    /// Connections sent a QUIC Retry (address validation while busy).
    pub handshakes_retried: u64,
    /// Connections refused for their source address's rate.
    pub refused_rate: u64,
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Opens the mail store in `<state_dir>/mail` (memory without a state
/// dir), puts back what it holds, and takes over mail an earlier version
/// saved in one file at a graceful stop.
fn open_store(
    config: &RelayConfig,
) -> Result<(services::store::Store, services::store::Recovered), RelayError> {
    use services::store::{Durability, Store};
    let durability = match (&config.state_dir, config.durability) {
        (None, _) | (_, Some(Durability::Memory)) => Durability::Memory,
        (Some(_), d) => d.unwrap_or(Durability::Sync),
    };
    let Some(dir) = config
        .state_dir
        .as_ref()
        .filter(|_| durability != Durability::Memory)
    else {
        let hint = if config.state_dir.is_some() {
            "--durability memory was asked for; sync or process keep it"
        } else {
            "give --data-dir for a durable mail store"
        };
        warn!(
            "mail durability: memory — held mail is lost if this relay stops or crashes ({hint})"
        );
        return Ok((Store::memory(), Default::default()));
    };
    let mail = dir.join("mail");
    let opened = Store::open(&mail, durability).map_err(|source| RelayError::State {
        path: mail.display().to_string(),
        source,
    })?;
    info!(durability = durability.as_str(), dir = %mail.display(), "mail store open");
    Ok(opened)
}

/// The relay entry point.
#[derive(Debug)]
pub struct Relay;

/// A running relay. Dropping it shuts the relay down.
#[derive(Debug)]
pub struct RelayHandle {
    local_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    fingerprint: String,
    /// Root of the cancellation tree (dropping the handle cancels it).
    root: CancellationToken,
    /// The doors' token: [`RelayHandle::shutdown`] cancels it.
    doors: CancellationToken,
    router: Arc<Router>,
    mesh: Option<Arc<Mesh>>,
    carriers: Arc<carrier::Carriers>,
    /// One QUIC endpoint per shard.
    endpoints: Vec<quinn::Endpoint>,
    shards: Arc<shards::ShardTable>,
    tasks: TaskTracker,
    task: Option<JoinHandle<()>>,
}

async fn bind_tcp(addr: SocketAddr) -> Result<tokio::net::TcpListener, RelayError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RelayError::Bind { addr, source })
}

fn local(l: &tokio::net::TcpListener, addr: SocketAddr) -> Result<SocketAddr, RelayError> {
    l.local_addr()
        .map_err(|source| RelayError::Bind { addr, source })
}

impl Relay {
    /// Binds the endpoint and starts serving. Must run inside a tokio runtime.
    pub async fn spawn(config: RelayConfig) -> Result<RelayHandle, RelayError> {
        if config.relay_id.is_empty() || config.relay_id.len() > swb_wire::MAX_RELAY_ID_LEN {
            return Err(RelayError::Config(format!(
                "the relay id must have 1 to {} bytes",
                swb_wire::MAX_RELAY_ID_LEN
            )));
        }
        swb_tunnel::AddressPlan::new(config.tun_range.0, config.tun_range.1, "")
            .map_err(|e| RelayError::Config(format!("--tun-range: {e}")))?;
        let keys = Arc::new(keys::Keys::load(config.keys.clone())?);
        let stapler =
            ocsp::Stapler::start(&config.identity, &config.ocsp, config.state_dir.as_deref())
                .await?;
        let certs = stapler
            .clone()
            .map(|s| s as Arc<dyn rustls::server::ResolvesServerCert>);
        let carriers = Arc::new(carrier::Carriers::default());
        let endpoint::Bound {
            endpoints,
            initials_dropped,
            shards,
        } = endpoint::bind(&config, certs.clone(), carriers.clone())?;
        // The first shard's endpoint dials the mesh.
        let endpoint = endpoints[0].clone();
        let local_addr = endpoint.local_addr().map_err(|source| RelayError::Bind {
            addr: config.listen,
            source,
        })?;
        let http_listener = match config.http_listen {
            HttpListen::Off => None,
            HttpListen::At(addr) => Some(bind_tcp(addr).await?),
            HttpListen::SameAsQuic => {
                let same = SocketAddr::new(config.listen.ip(), local_addr.port());
                match tokio::net::TcpListener::bind(same).await {
                    Ok(l) => Some(l),
                    Err(_) if config.listen.port() == 0 => {
                        Some(bind_tcp(SocketAddr::new(config.listen.ip(), 0)).await?)
                    }
                    Err(source) => return Err(RelayError::Bind { addr: same, source }),
                }
            }
        };
        let http_addr = match &http_listener {
            Some(l) => Some(local(l, config.listen)?),
            None => None,
        };
        let metrics_listener = match config.metrics_listen {
            None => None,
            Some(addr) => Some(bind_tcp(addr).await?),
        };
        let metrics_addr = match &metrics_listener {
            Some(l) => Some(local(l, config.listen)?),
            None => None,
        };
        let http_tls = Arc::new(
            config
                .identity
                .server_config_with(&[b"h2", b"http/1.1"], certs)?,
        );
        let fingerprint = config.identity.fingerprint();
        let me = swb_wire::RelayRecord {
            id: config.relay_id.clone(),
            addrs: match &config.mesh {
                // `--listen 127.0.0.1:0` advertises the port it was given.
                Some(m) if !m.advertise.is_empty() => m
                    .advertise
                    .iter()
                    .map(|a| match a.parse::<SocketAddr>() {
                        Ok(sa) if sa.port() == 0 => {
                            SocketAddr::new(sa.ip(), local_addr.port()).to_string()
                        }
                        _ => a.clone(),
                    })
                    .collect(),
                _ => vec![local_addr.to_string()],
            },
            fingerprint: fingerprint.clone(),
            incarnation: wall_ms(),
        };
        let config = Arc::new(config);
        let metrics = Arc::new(metrics::Metrics::new());
        metrics
            .registry
            .register(Box::new(initials_dropped))
            .map_err(|e| RelayError::Config(e.to_string()))?;
        metrics
            .registry
            .register(Box::new(shards.forwarded.clone()))
            .map_err(|e| RelayError::Config(e.to_string()))?;
        if let Some(s) = &stapler {
            for g in [&s.gauge, &s.expires_gauge] {
                metrics
                    .registry
                    .register(Box::new(g.clone()))
                    .map_err(|e| RelayError::Config(e.to_string()))?;
            }
        }
        let (store, recovered) = open_store(&config)?;
        let services = Arc::new(Services::new(config.clone(), metrics, store));
        let (restored, lost) = services.restore(recovered);
        if restored + lost > 0 {
            info!(
                messages = restored,
                not_restored = lost,
                "held mail recovered from the store"
            );
        }
        if let Some(dir) = &config.state_dir {
            let saved = services::persist::take(dir).map_err(|source| RelayError::State {
                path: services::persist::path(dir).display().to_string(),
                source,
            })?;
            if !saved.is_empty() {
                let (ok, lost) = services.import(saved);
                info!(
                    messages = ok,
                    not_restored = lost,
                    "held mail of an earlier version's graceful stop taken into the store"
                );
            }
        }
        let placement = Arc::new(placement::Placement::new(me));
        let tasks = TaskTracker::new();
        let root = CancellationToken::new();
        let doors = root.child_token();
        let mesh_stop = root.child_token();
        let mesh = config.mesh.as_ref().map(|m| {
            Mesh::new(
                m,
                services.clone(),
                placement.clone(),
                tasks.clone(),
                mesh_stop.clone(),
            )
        });
        let router = Arc::new(Router::new(
            config.clone(),
            services.clone(),
            placement,
            keys,
            mesh.clone(),
            tasks.clone(),
        ));
        let span = tracing::info_span!("relay", relay = %config.relay_id);
        if let Some(s) = stapler {
            tasks.spawn(s.run(root.child_token()).instrument(span.clone()));
        }
        let http_task = http_listener.map(|l| {
            tasks.spawn(
                doors::http::serve(l, http_tls, router.clone(), carriers.clone(), doors.clone())
                    .instrument(span.clone()),
            )
        });
        let metrics_task = metrics_listener.map(|l| {
            let s = services.clone();
            let m = mesh.clone();
            let c = carriers.clone();
            let render: swb_metrics::Render =
                Arc::new(move || render_metrics(&s, m.as_deref(), &c));
            tasks.spawn(swb_metrics::serve(l, render, doors.clone()).instrument(span.clone()))
        });
        let (mesh_tx, mesh_task) = match &mesh {
            Some(m) => {
                let (tx, rx) = tokio::sync::mpsc::channel(MESH_INCOMING_QUEUE);
                let t = tasks.spawn(
                    mesh::dialer(m.clone(), endpoint.clone(), rx, mesh_stop.clone())
                        .instrument(span.clone()),
                );
                (Some(tx), Some(t))
            }
            None => (None, None),
        };
        let main = Main {
            endpoints: endpoints.clone(),
            carriers: carriers.clone(),
            router: router.clone(),
            mesh: mesh.clone(),
            mesh_tx,
            doors: doors.clone(),
            mesh_stop,
            helpers: [http_task, mesh_task, metrics_task],
        };
        let task = tasks.spawn(main.run().instrument(span));
        info!(%local_addr, ?http_addr, relay = %config.relay_id, "relay listening");
        Ok(RelayHandle {
            local_addr,
            http_addr,
            metrics_addr,
            fingerprint,
            root,
            doors,
            router,
            mesh,
            carriers,
            endpoints,
            shards,
            tasks,
            task: Some(task),
        })
    }
}

impl RelayHandle {
    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections each shard's endpoint holds now (one entry per shard).
    pub fn shard_connections(&self) -> Vec<usize> {
        self.endpoints
            .iter()
            .map(|e| e.open_connections())
            .collect()
    }

    /// QUIC packets a shard received (over UDP, or from a TCP carrier) for
    /// another shard's connection and handed over (clients that moved;
    /// `swb_relay_shard_forwarded_total`).
    pub fn shard_forwarded(&self) -> u64 {
        self.shards.forwarded.get()
    }

    /// The bound TCP address of the HTTPS endpoint, if it runs.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The bound TCP address of the metrics endpoint, if it runs.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The relays this relay has mesh links to now.
    pub fn mesh_links(&self) -> Vec<String> {
        self.mesh.as_ref().map_or_else(Vec::new, |m| m.linked_ids())
    }

    /// Reaches relay `to` over the mesh the way a call would now; the path
    /// taken (the relay passed through, if any, then `to`) or why not.
    pub async fn mesh_probe(&self, to: &str) -> Result<Vec<String>, String> {
        match &self.mesh {
            Some(m) => m.probe(to).await.map_err(|e| e.to_string()),
            None => Err("not in a mesh".into()),
        }
    }

    /// Makes one forward call to relay `home` with these messages, as a
    /// session's sends to peers homed there go: one answer per message,
    /// in order. For tests of the mesh's forward calls.
    #[doc(hidden)]
    pub async fn mesh_forward_call(
        &self,
        home: &str,
        fs: Vec<swb_wire::MeshForward>,
    ) -> Vec<Result<bool, swb_wire::Refusal>> {
        self.router.forward_batch(home, fs).await
    }

    /// From now on answers only the first message of each forward call
    /// and ends it, as relays did before calls carried many messages. For
    /// tests of the callers' fallback to a call per message.
    #[doc(hidden)]
    pub fn mesh_answer_one_forward_per_call(&self) {
        if let Some(m) = &self.mesh {
            m.answer_one_forward_per_call();
        }
    }

    /// From now on ignores peers' announcements that they are leaving the
    /// mesh, as a relay that has not read them yet does. For tests of the
    /// mail handoff's race with the announcement.
    #[doc(hidden)]
    pub fn mesh_ignore_leaving(&self) {
        if let Some(m) = &self.mesh {
            m.ignore_leaving();
        }
    }

    /// Announces that this relay is leaving the mesh, as a graceful stop
    /// does first, without stopping. For tests of what a leaving relay
    /// takes.
    #[doc(hidden)]
    pub fn mesh_announce_leaving(&self) {
        if let Some(m) = &self.mesh {
            m.announce_leaving();
        }
    }

    /// Makes `f` land in this relay's mailbox after the first handoff
    /// pass of its graceful stop, as a forward that passed the leaving
    /// check just before the announcement and was stored while the pass
    /// ran. For tests of the passes after the first.
    #[doc(hidden)]
    pub fn mesh_land_after_first_leave_pass(&self, f: swb_wire::MeshForward) {
        if let Some(m) = &self.mesh {
            m.land_after_first_leave_pass(f);
        }
    }

    /// How durable accepted mail is at this relay.
    pub fn durability(&self) -> Durability {
        self.router.services().durability()
    }

    /// `sha256:<hex>` of the relay's certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Starts a graceful shutdown: sessions get a goodbye, held mail moves
    /// to its new homes in a mesh, then the endpoint closes.
    pub fn shutdown(&self) {
        self.doors.cancel();
    }

    /// Waits until every task of the relay has ended.
    pub async fn join(mut self) {
        // The main task closes the endpoints; these handles must not keep
        // them (and the port) open past it.
        self.endpoints.clear();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.root.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Tasks of this relay still running (sessions, streams, links, …);
    /// 0 after [`RelayHandle::join`].
    pub fn tasks_alive(&self) -> usize {
        self.tasks.len()
    }

    /// A handle on the relay's tasks, to check after `join` that none
    /// outlived it.
    pub fn task_tracker(&self) -> TaskTracker {
        self.tasks.clone()
    }

    /// Re-reads the keys file now (what SIGHUP does). Returns the key count.
    pub fn reload_keys(&self) -> Result<usize, keys::KeysError> {
        self.router.reload_keys()
    }

    /// Peers attached to this relay in `namespace` (over QUIC, or polling
    /// over HTTP), sorted by name.
    pub fn peers(&self, namespace: &str) -> Vec<Peer> {
        self.router
            .services()
            .registry()
            .peers(namespace, tokio::time::Instant::now())
    }

    /// Changes a peer's status as `set-status` does (for embedding and tests).
    pub fn set_status(
        &self,
        namespace: &str,
        name: &str,
        set: Vec<(String, String)>,
        clear: Vec<String>,
    ) -> Result<Arc<Snapshot>, swb_wire::Refusal> {
        let change = swb_wire::SetStatus {
            set,
            clear,
            replace: false,
        };
        self.router
            .services()
            .set_status(namespace, name, &change)
            .map(|(snap, _)| snap)
    }

    /// Watches peers' status as a watch stream does (for embedding and tests).
    pub fn watch_status(&self, namespace: &str, names: &[&str]) -> Result<StatusWatcher, BadName> {
        let raw: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let names = services::watch::names(&raw)?;
        Ok(self.router.services().watcher(namespace, &names))
    }

    /// Ids of the relays this relay can reach now (itself included), sorted.
    pub fn live_relays(&self) -> Vec<String> {
        self.router.placement().live_ids()
    }

    /// Waits until the live set satisfies `pred` (or the relay stops).
    pub async fn wait_live(&self, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        let mut rx = self.router.placement().live();
        let found = match rx.wait_for(|l| pred(l.ring.ids())).await {
            Ok(l) => Some(l.ring.ids().to_vec()),
            Err(_) => None,
        };
        found.unwrap_or_else(|| self.live_relays())
    }

    /// Current counters (the same numbers `--metrics` serves).
    pub fn stats(&self) -> RelayStats {
        let services = self.router.services();
        let m = &services.metrics;
        let reg = services.registry();
        let busy = m.handshakes.with_label_values(&["refused", "busy"]).get();
        let rate = m.handshakes.with_label_values(&["refused", "rate"]).get();
        RelayStats {
            sessions: m.sessions.get(),
            refused_hello: m.handshakes_with("refused").saturating_sub(busy + rate),
            refused_busy: busy,
            refused_rate: rate,
            handshakes_retried: m.handshakes_with("retry"),
            accepted: m.accepted.get() + m.forwarded.get(),
            refused_send: m.refused_total(),
            delivered: m.delivered.get(),
            acked: m.acked.get(),
            expired: m.expired.get(),
            streams_opened: m.streams_opened.get(),
            streams_refused: m.streams_refused.get(),
            mesh_refused: m.mesh_refused.get(),
            mesh_forward_calls: m.forward_calls.get(),
            held: reg.held().0 as u64,
            attached: reg.sessions().len() as u64,
        }
    }

    /// The relay's metrics in the Prometheus text format (what
    /// `GET /metrics` on the metrics address answers).
    pub fn metrics_text(&self) -> String {
        render_metrics(self.router.services(), self.mesh.as_deref(), &self.carriers)
    }
}

/// Sets the gauges that are read from state, then encodes every metric.
fn render_metrics(
    services: &Services,
    mesh: Option<&Mesh>,
    carriers: &carrier::Carriers,
) -> String {
    let m = &services.metrics;
    {
        let reg = services.registry();
        m.attached.set(reg.sessions().len() as i64);
        let (msgs, bytes) = reg.held();
        m.held_messages.set(msgs as i64);
        m.held_bytes.set(bytes as i64);
        let published = reg.board().published;
        m.status_publications
            .inc_by(published.saturating_sub(m.status_publications.get()));
    }
    m.mesh_links.set(mesh.map_or(0, Mesh::links_up) as i64);
    m.carriers_open.set(carriers.open() as i64);
    swb_metrics::encode(&m.registry)
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.root.cancel();
    }
}

/// The relay's main task and what it owns.
struct Main {
    /// One per shard.
    endpoints: Vec<quinn::Endpoint>,
    carriers: Arc<carrier::Carriers>,
    router: Arc<Router>,
    mesh: Option<Arc<Mesh>>,
    mesh_tx: Option<tokio::sync::mpsc::Sender<endpoint::MeshIncoming>>,
    doors: CancellationToken,
    mesh_stop: CancellationToken,
    // The HTTPS door, the mesh dialer and the metrics endpoint.
    helpers: [Option<JoinHandle<()>>; 3],
}

impl Main {
    /// Accepts connections and owns every connection task; also polls the
    /// keys file, publishes status, sweeps leases and expired mail, and
    /// moves held mail whose home moved. Then the shutdown sequence.
    async fn run(self) {
        let Main {
            endpoints,
            carriers,
            router,
            mesh,
            mesh_tx,
            doors,
            mesh_stop,
            helpers,
        } = self;
        let config = router.config();
        let services = router.services().clone();
        let tasks = router.tasks().clone();
        let handshakes = Arc::new(tokio::sync::Semaphore::new(config.max_handshakes.max(1)));
        let taken_over = services.metrics.handshakes_taken_over.clone();
        let offload = match offload::Offload::new(config.handshake_threads, taken_over.clone()) {
            Ok(o) => Arc::new(o),
            Err(e) => {
                warn!("cannot start handshake threads ({e}); handshakes run on the workers");
                Arc::new(offload::Offload::inline(taken_over))
            }
        };
        let mut sessions = tokio::task::JoinSet::new();
        let lease_every =
            (config.limits.visibility / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut lease_tick = tokio::time::interval(lease_every);
        // Coalesced status changes go out when their interval has passed
        // (with no interval nothing waits: an idle tick).
        let mut status_tick = tokio::time::interval(if config.status_interval.is_zero() {
            Duration::from_secs(1)
        } else {
            (config.status_interval / 2).max(Duration::from_millis(1))
        });
        // Mail whose home moved to another relay (one joined) goes there. A
        // change that arrives while a handoff runs starts another after it.
        let mut live = router.placement().live();
        let mut handoffs = tokio::task::JoinSet::new();
        let mut handoff_again = false;
        let mut retry_hint = crate::limits::RetryHint::new(tokio::time::Instant::now());
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut keys_tick = tokio::time::interval(config.keys_poll);
        keys_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sweep_every =
            (config.limits.ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(30));
        let mut sweep_tick = tokio::time::interval(sweep_every);
        sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut conn_seq = 0u64;
        // At most 64 Ki addresses remembered (the table stays bounded).
        let mut per_ip = config
            .connections_per_ip
            .map(|r| limits::Limiter::<std::net::IpAddr>::new(r, 65_536));
        let start_handoff = |handoffs: &mut tokio::task::JoinSet<()>, m: &Arc<Mesh>| {
            let ring = router.placement().live_now().ring.clone();
            let m = m.clone();
            handoffs.spawn(
                tasks.track_future(
                    async move {
                        let (moved, kept) = mesh::handoff(&m, &ring).await;
                        if moved + kept > 0 {
                            info!(
                                moved,
                                kept, "held mail moved to the relays that are now its home"
                            );
                        }
                    }
                    .in_current_span(),
                ),
            );
        };
        loop {
            // Ranked: shutdown first, then new connections, then housekeeping.
            tokio::select! {
                biased;
                _ = doors.cancelled() => break,
                Ok(()) = live.changed(), if mesh.is_some() => {
                    live.borrow_and_update();
                    match (&mesh, handoffs.is_empty()) {
                        (Some(m), true) => start_handoff(&mut handoffs, m),
                        _ => handoff_again = true,
                    }
                }
                Some(_) = handoffs.join_next(), if !handoffs.is_empty() => {
                    if std::mem::take(&mut handoff_again) {
                        if let Some(m) = &mesh {
                            start_handoff(&mut handoffs, m);
                        }
                    }
                }
                incoming = accept_any(&endpoints) => {
                    let Some(incoming) = incoming else { break };
                    // Busy: an address must prove it receives our packets
                    // (a Retry round trip) before it gets a handshake slot.
                    let in_flight = config.max_handshakes - handshakes.available_permits();
                    if in_flight >= config.retry_above
                        && !incoming.remote_address_validated()
                        && incoming.may_retry()
                    {
                        services.metrics.handshake("retry", "address_validation");
                        if let Err(e) = incoming.retry() {
                            e.into_incoming().ignore();
                        }
                        continue;
                    }
                    if let Some(l) = per_ip.as_mut() {
                        let ip = carriers.client_ip(incoming.remote_address());
                        if let Err(wait) = l.take(&ip, tokio::time::Instant::now()) {
                            // The refusal says when the address has a
                            // connection again (`swb_wire::busy`).
                            services.metrics.handshake("refused", "rate");
                            incoming.refuse_with_reason(swb_wire::busy::reason(wait));
                            continue;
                        }
                    }
                    let now = tokio::time::Instant::now();
                    let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                        // Too many handshakes at once: the client retries
                        // when the hint says (`swb_wire::busy`).
                        services.metrics.handshake("refused", "busy");
                        incoming.refuse_with_reason(swb_wire::busy::reason(retry_hint.refused(now)));
                        continue;
                    };
                    retry_hint.admitted(now);
                    conn_seq += 1;
                    let span = tracing::debug_span!("conn", conn = conn_seq, remote = %incoming.remote_address());
                    sessions.spawn(tasks.track_future(
                        endpoint::connection(router.clone(), mesh_tx.clone(), Box::new(incoming), offload.clone(), permit, doors.child_token())
                            .instrument(span),
                    ));
                }
                Some(done) = sessions.join_next() => {
                    if let Err(e) = done {
                        if e.is_panic() {
                            tracing::error!("session task panicked: {e}");
                        }
                    }
                }
                _ = keys_tick.tick() => {
                    router.refresh_keys(Duration::ZERO);
                }
                _ = status_tick.tick() => {
                    let mut board = services.registry().board();
                    if board.has_dirty() {
                        board.flush(tokio::time::Instant::now());
                    }
                }
                _ = lease_tick.tick() => {
                    let n = services.registry().sweep_leases(tokio::time::Instant::now());
                    if n > 0 {
                        tracing::debug!(messages = n, "http leases ran out; mail handed out again");
                    }
                }
                _ = sweep_tick.tick() => {
                    let n = services.expire();
                    if n > 0 {
                        services.metrics.expired.inc_by(n as u64);
                        info!(messages = n, "expired undelivered messages (TTL {:?})", config.limits.ttl);
                    }
                }
            }
        }
        // Leaving a mesh: peers stop routing here, held mail goes to the
        // relays that take over its names, then the links close.
        handoffs.abort_all();
        while handoffs.join_next().await.is_some() {}
        drop(mesh_tx);
        if let Some(m) = &mesh {
            match tokio::time::timeout(HANDOFF_TIMEOUT, m.leave()).await {
                Ok((moved, kept)) if moved + kept > 0 => {
                    info!(moved, kept, "held mail handed to the relays that take over")
                }
                Ok(_) => {}
                Err(_) => warn!(
                    "mail handoff did not finish in {HANDOFF_TIMEOUT:?}; the rest is saved locally"
                ),
            }
        }
        mesh_stop.cancel();
        if let Some(m) = &mesh {
            m.stop_mirrors();
        }
        // Drain: sessions saw the cancellation (their tokens are children) and
        // say goodbye; give them a grace period, then stop the rest.
        for e in &endpoints {
            e.set_server_config(None);
        }
        let grace = config.shutdown_grace;
        if tokio::time::timeout(grace, async {
            while sessions.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            warn!(
                left = sessions.len(),
                "sessions did not end within {grace:?}; aborting them"
            );
            sessions.abort_all();
            while sessions.join_next().await.is_some() {}
        }
        for t in helpers.into_iter().flatten() {
            let _ = t.await;
        }
        // Everything accepted is in the store already; make the last
        // removals durable too.
        services.flush_store().await;
        for e in &endpoints {
            e.close(swb_wire::close::NORMAL.into(), b"relay shutting down");
        }
        let _ = tokio::time::timeout(
            CLOSE_LINGER,
            futures_util::future::join_all(endpoints.iter().map(|e| e.wait_idle())),
        )
        .await;
        info!("relay stopped");
    }
}

/// The next connection any shard's endpoint accepts; `None` once one of
/// them is closed (they close together, at shutdown).
async fn accept_any(endpoints: &[quinn::Endpoint]) -> Option<quinn::Incoming> {
    match endpoints {
        [one] => one.accept().await,
        many => {
            let accepts = many.iter().map(|e| Box::pin(e.accept()));
            futures_util::future::select_all(accepts).await.0
        }
    }
}
