//! The Switchboard relay: a QUIC endpoint (ALPN `swb/1`) that authenticates
//! daemons by API key, registers them by `(namespace, name)`, holds their
//! mailboxes and delivers messages end to end.
//!
//! # Flow
//!
//! ```text
//! accept loop ──► connection task (one per daemon, owned by the loop's JoinSet)
//!                   ├─ control stream: preamble, Hello → Welcome | Refused
//!                   ├─ Send → Registry::enqueue → SendAccepted | SendRefused
//!                   ├─ Registry notifies → Deliver frames (from a cursor)
//!                   └─ Ack → Registry::ack (the only way mail is forgotten, besides TTL)
//! main loop also: keys file poll (and `reload_keys()` for SIGHUP), TTL sweep
//! ```
//!
//! # Contract
//!
//! [`Relay::spawn`] binds and returns a [`RelayHandle`]; every task the relay
//! starts is owned by it and ends on [`RelayHandle::shutdown`] (sessions get a
//! `Goodbye{shutting_down}` first) or when the handle is dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

mod http;
pub mod keys;
pub mod mesh;
mod metrics;
mod persist;
mod registry;
mod session;
mod status;
mod status_streams;
mod streams;
pub mod tls;

pub use http::{openapi, HttpLimits, MAX_REQUEST_BODY};
pub use keys::{KeyStore, KeysFile};
pub use registry::{MailboxLimits, Peer, Via};
pub use session::DELIVERY_WINDOW;
pub use status::{Snapshot, MIN_PUBLISH_INTERVAL};
pub use status_streams::StatusWatcher;
pub use tls::Identity;

use registry::Registry;

/// Where the relay's API keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A keys file, re-read when it changes and on [`RelayHandle::reload_keys`].
    File(PathBuf),
    /// A fixed set (tests, demo).
    Static(KeysFile),
}

/// Everything a relay needs. Build with [`RelayConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// UDP address to bind; port 0 picks a free one.
    pub listen: SocketAddr,
    /// TLS certificate and key.
    pub identity: Identity,
    /// API keys.
    pub keys: KeySource,
    /// This relay's id, told to daemons in `Welcome`.
    pub relay_id: String,
    /// Mailbox bounds.
    pub limits: MailboxLimits,
    /// How often the keys file is checked for changes.
    pub keys_poll: Duration,
    /// A connection silent this long is closed (daemons keep alive well within it).
    pub idle_timeout: Duration,
    /// Time a new connection has to finish TLS and send its `Hello`.
    pub hello_timeout: Duration,
    /// Most connections in their handshake (TLS, `Hello`, registration) at
    /// once; more are refused at once (QUIC CONNECTION_REFUSED) and retry
    /// after their backoff, so a reconnect storm finishes handshakes instead
    /// of letting all of them slow down past their timeouts.
    pub max_handshakes: usize,
    /// How long shutdown waits for sessions to say goodbye.
    pub shutdown_grace: Duration,
    /// Where the HTTPS + JSON endpoint listens.
    pub http_listen: HttpListen,
    /// Limits of the HTTPS endpoint.
    pub http: HttpLimits,
    /// Data streams one peer may have open at once, as caller and target
    /// together (default 256); more are refused with `too_many_streams`.
    pub max_streams_per_peer: usize,
    /// Time a stream has to send its header and the target to answer (default 10 s).
    pub stream_setup_timeout: Duration,
    /// How long an offline peer's status is kept (default 24 h).
    pub status_retention: Duration,
    /// Where held mail is saved at shutdown and loaded at start; `None`
    /// keeps it in memory only.
    pub state_dir: Option<PathBuf>,
    /// Membership of a relay mesh, if any.
    pub mesh: Option<mesh::MeshConfig>,
    /// Where to serve Prometheus metrics (plain HTTP, `GET /metrics`);
    /// `None`: not served ([`RelayHandle::metrics_text`] still works).
    pub metrics_listen: Option<SocketAddr>,
}

/// Where the HTTPS endpoint listens (TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpListen {
    /// The address and port QUIC got, over TCP. With port 0, if TCP cannot
    /// have the same port number, any free one.
    SameAsQuic,
    /// This address.
    At(SocketAddr),
    /// No HTTPS endpoint.
    Off,
}

impl RelayConfig {
    /// A config with defaults for everything but address, identity and keys.
    pub fn new(listen: SocketAddr, identity: Identity, keys: KeySource) -> Self {
        Self {
            listen,
            identity,
            keys,
            relay_id: "relay".into(),
            limits: MailboxLimits::default(),
            keys_poll: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(15),
            hello_timeout: Duration::from_secs(10),
            max_handshakes: MAX_HANDSHAKES,
            shutdown_grace: Duration::from_secs(3),
            http_listen: HttpListen::SameAsQuic,
            http: HttpLimits::default(),
            max_streams_per_peer: 256,
            stream_setup_timeout: Duration::from_secs(10),
            status_retention: Duration::from_secs(24 * 3600),
            state_dir: None,
            mesh: None,
            metrics_listen: None,
        }
    }
}

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
    /// Deliver frames written (redeliveries included).
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
}

pub(crate) struct Shared {
    pub(crate) config: RelayConfig,
    pub(crate) keys: RwLock<Arc<KeyStore>>,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) metrics: metrics::Metrics,
    /// Keys file contents last installed, and when the file was last read.
    keys_seen: Mutex<(Option<Vec<u8>>, Option<std::time::Instant>)>,
    /// The mesh this relay is part of.
    pub(crate) mesh: Option<Arc<mesh::Mesh>>,
    /// This relay as daemons and other relays reach it.
    pub(crate) me: swb_wire::RelayRecord,
    /// Ends mesh links: after the mail handoff at shutdown, not before.
    pub(crate) mesh_stop: CancellationToken,
    /// One permit per connection in its handshake (`max_handshakes`).
    pub(crate) handshakes: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    pub(crate) fn keys(&self) -> Arc<KeyStore> {
        match self.keys.read() {
            Ok(k) => k.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding the lock would be a bug; keep serving.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the keys file if it changed (file source only). `min_gap`
    /// rate-limits reads: a flood of bad keys costs at most one read per gap.
    /// Returns whether a new key set was installed.
    pub(crate) fn refresh_keys(&self, min_gap: Duration) -> bool {
        let KeySource::File(path) = &self.config.keys else {
            return false;
        };
        let mut seen = self.keys_seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if seen.1.is_some_and(|t| now.duration_since(t) < min_gap) {
            return false;
        }
        seen.1 = Some(now);
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                if seen.0.is_some() {
                    warn!(path = %path.display(), "cannot read keys file: {e}; keeping the keys in memory");
                    seen.0 = None;
                }
                return false;
            }
        };
        if seen.0.as_deref() == Some(&bytes[..]) {
            return false;
        }
        seen.0 = Some(bytes.clone());
        match KeysFile::parse(
            &String::from_utf8_lossy(&bytes),
            &path.display().to_string(),
        ) {
            Ok(f) => {
                let n = self.install_keys(KeyStore::new(&f));
                info!(keys = n, "keys file changed; reloaded");
                true
            }
            Err(e) => {
                warn!("{e}; keeping the previous keys");
                false
            }
        }
    }

    /// Installs a new key set and ends sessions whose key is gone or revoked.
    fn install_keys(&self, store: KeyStore) -> usize {
        let n = store.len();
        let store = Arc::new(store);
        match self.keys.write() {
            Ok(mut k) => *k = store.clone(),
            Err(p) => *p.into_inner() = store.clone(),
        }
        let mut closed = 0;
        for s in self.registry().sessions() {
            if !store.is_active(&s.key_id) {
                s.end_with(swb_wire::Refusal::new(
                    swb_wire::Code::KEY_REVOKED,
                    "the API key of this daemon was revoked; ask the relay's operator for a new key",
                ));
                closed += 1;
            }
        }
        if closed > 0 {
            info!(sessions = closed, "closed sessions of revoked keys");
        }
        n
    }
}

pub use swb_quic::{udp_socket, UDP_BUFFER};

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Loads mail saved by a previous graceful stop.
fn restore_mail(shared: &Shared, dir: &std::path::Path) -> Result<(), RelayError> {
    let saved = persist::take(dir).map_err(|source| RelayError::State {
        path: persist::path(dir).display().to_string(),
        source,
    })?;
    if saved.is_empty() {
        return Ok(());
    }
    let total = saved.len();
    let (now, wall) = (tokio::time::Instant::now(), wall_ms());
    let mut reg = shared.registry();
    let mut lost = 0;
    for m in saved {
        let (ns, to, id) = (m.ns.clone(), m.to.clone(), m.id);
        if let Err(why) = reg.restore(m, now, wall) {
            lost += 1;
            warn!(%ns, %to, %id, "saved message not restored: {why}");
        }
    }
    shared.metrics.expired.inc_by(lost as u64);
    info!(
        messages = total - lost,
        not_restored = lost,
        "held mail restored from the last stop"
    );
    Ok(())
}

/// Bidirectional streams a new connection may open before its session
/// raises the limit.
pub(crate) const INITIAL_STREAMS: u32 = 8;

/// Default [`RelayConfig::max_handshakes`].
pub const MAX_HANDSHAKES: usize = 1024;

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
    cancel: CancellationToken,
    shared: Arc<SharedRef>,
    task: Option<JoinHandle<()>>,
}

/// Opaque wrapper so `RelayHandle` can derive `Debug`.
struct SharedRef(Arc<Shared>);

impl std::fmt::Debug for SharedRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

fn read_keys(source: &KeySource) -> Result<(KeyStore, Option<Vec<u8>>), keys::KeysError> {
    match source {
        KeySource::Static(f) => Ok((KeyStore::new(f), None)),
        KeySource::File(p) => {
            let bytes = match std::fs::read(p) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(source) => {
                    return Err(keys::KeysError::Io {
                        path: p.display().to_string(),
                        source,
                    })
                }
            };
            let text = String::from_utf8_lossy(&bytes);
            let file = KeysFile::parse(&text, &p.display().to_string())?;
            Ok((KeyStore::new(&file), Some(bytes)))
        }
    }
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
        let (store, keys_bytes) = read_keys(&config.keys)?;
        let tls = config
            .identity
            .server_config(&[swb_wire::ALPN, swb_wire::MESH_ALPN])?;
        let qcfg = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| tls::TlsError::Config(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(qcfg));
        let mut transport = quinn::TransportConfig::default();
        // Few streams at first: quinn keeps state per allowed stream (about
        // 80 bytes each), and an idle client needs only its control stream.
        // Sessions raise the limit as they use streams (up to a little above
        // `max_streams_per_peer`, so the refusal can be delivered), mesh
        // links at once.
        transport.max_concurrent_bidi_streams(INITIAL_STREAMS.into());
        transport.max_concurrent_uni_streams(0u32.into());
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.idle_timeout)
                .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::from_u32(15_000))),
        ));
        transport.datagram_receive_buffer_size(None);
        server.transport_config(Arc::new(transport));
        let endpoint = udp_socket(config.listen)
            .and_then(|sock| {
                quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    Some(server),
                    sock,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .map_err(|source| RelayError::Bind {
                addr: config.listen,
                source,
            })?;
        let local_addr = endpoint.local_addr().map_err(|source| RelayError::Bind {
            addr: config.listen,
            source,
        })?;
        let http_listener = match config.http_listen {
            HttpListen::Off => None,
            HttpListen::At(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| RelayError::Bind { addr, source })?,
            ),
            HttpListen::SameAsQuic => {
                let same = SocketAddr::new(config.listen.ip(), local_addr.port());
                match tokio::net::TcpListener::bind(same).await {
                    Ok(l) => Some(l),
                    Err(_) if config.listen.port() == 0 => {
                        let any = SocketAddr::new(config.listen.ip(), 0);
                        Some(
                            tokio::net::TcpListener::bind(any)
                                .await
                                .map_err(|source| RelayError::Bind { addr: any, source })?,
                        )
                    }
                    Err(source) => return Err(RelayError::Bind { addr: same, source }),
                }
            }
        };
        let http_addr = match &http_listener {
            Some(l) => Some(l.local_addr().map_err(|source| RelayError::Bind {
                addr: config.listen,
                source,
            })?),
            None => None,
        };
        let metrics_listener = match config.metrics_listen {
            None => None,
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| RelayError::Bind { addr, source })?,
            ),
        };
        let metrics_addr = match &metrics_listener {
            Some(l) => Some(l.local_addr().map_err(|source| RelayError::Bind {
                addr: config.listen,
                source,
            })?),
            None => None,
        };
        let http_tls = Arc::new(config.identity.server_config(&[b"h2", b"http/1.1"])?);
        let fingerprint = config.identity.fingerprint();
        let metrics = metrics::Metrics::new();
        let shared = Arc::new(Shared {
            registry: Mutex::new({
                let mut r = Registry::new(config.limits.clone(), config.status_retention);
                r.delivery_wait = Some(metrics.delivery_seconds.clone());
                r
            }),
            keys: RwLock::new(Arc::new(store)),
            metrics,
            keys_seen: Mutex::new((keys_bytes, Some(std::time::Instant::now()))),
            mesh_stop: CancellationToken::new(),
            handshakes: Arc::new(tokio::sync::Semaphore::new(config.max_handshakes.max(1))),
            me: swb_wire::RelayRecord {
                id: config.relay_id.clone(),
                addrs: match &config.mesh {
                    Some(m) if !m.advertise.is_empty() => m.advertise.clone(),
                    _ => vec![local_addr.to_string()],
                },
                fingerprint: config.identity.fingerprint(),
            },
            mesh: config.mesh.as_ref().map(|m| {
                let addrs = if m.advertise.is_empty() {
                    vec![local_addr.to_string()]
                } else {
                    m.advertise.clone()
                };
                mesh::Mesh::new(
                    swb_wire::RelayRecord {
                        id: config.relay_id.clone(),
                        addrs,
                        fingerprint: config.identity.fingerprint(),
                    },
                    m,
                )
            }),
            config,
        });
        if let Some(dir) = &shared.config.state_dir {
            restore_mail(&shared, dir)?;
        }
        let cancel = CancellationToken::new();
        let span = tracing::info_span!("relay", relay = %shared.config.relay_id);
        let http_task = http_listener.map(|l| {
            tokio::spawn(
                http::serve(l, http_tls, shared.clone(), cancel.clone()).instrument(span.clone()),
            )
        });
        let metrics_task = metrics_listener.map(|l| {
            let s = shared.clone();
            let render: swb_metrics::Render = Arc::new(move || render_metrics(&s));
            tokio::spawn(swb_metrics::serve(l, render, cancel.clone()).instrument(span.clone()))
        });
        let mesh_task = shared.mesh.clone().map(|m| {
            tokio::spawn(
                mesh::dialer(
                    shared.clone(),
                    m,
                    endpoint.clone(),
                    shared.mesh_stop.clone(),
                )
                .instrument(span.clone()),
            )
        });
        let task = tokio::spawn(
            run(
                endpoint,
                shared.clone(),
                cancel.clone(),
                [http_task, mesh_task, metrics_task],
            )
            .instrument(span),
        );
        info!(%local_addr, ?http_addr, relay = %shared.config.relay_id, "relay listening");
        Ok(RelayHandle {
            local_addr,
            http_addr,
            metrics_addr,
            fingerprint,
            cancel,
            shared: Arc::new(SharedRef(shared)),
            task: Some(task),
        })
    }
}

impl RelayHandle {
    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound TCP address of the HTTPS endpoint, if it runs.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The bound TCP address of the metrics endpoint, if it runs.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// `sha256:<hex>` of the relay's certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Starts a graceful shutdown: sessions get a goodbye, then the endpoint closes.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Waits until every task of the relay has ended.
    pub async fn join(mut self) {
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Re-reads the keys file now (what SIGHUP does). Returns the key count.
    pub fn reload_keys(&self) -> Result<usize, keys::KeysError> {
        let shared = &self.shared.0;
        let (store, bytes) = read_keys(&shared.config.keys)?;
        shared.keys_seen.lock().unwrap_or_else(|p| p.into_inner()).0 = bytes;
        Ok(shared.install_keys(store))
    }

    /// Peers attached to this relay in `namespace` (over QUIC, or polling
    /// over HTTP), sorted by name.
    pub fn peers(&self, namespace: &str) -> Vec<Peer> {
        self.shared
            .0
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
        self.shared.0.registry().status.set_fields(
            namespace,
            name,
            &change,
            tokio::time::Instant::now(),
        )
    }

    /// Watches peers' status as a watch stream does (for embedding and tests).
    pub fn watch_status(&self, namespace: &str, names: &[&str]) -> Result<StatusWatcher, String> {
        let raw: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let names = status_streams::names(&raw)?;
        Ok(StatusWatcher::new(&self.shared.0, namespace, &names))
    }

    /// Ids of the relays this relay can reach now (itself included), sorted.
    pub fn live_relays(&self) -> Vec<String> {
        match &self.shared.0.mesh {
            Some(m) => m.live().borrow().ring.ids().to_vec(),
            None => vec![self.shared.0.config.relay_id.clone()],
        }
    }

    /// Waits until the live set satisfies `pred` (or the relay stops).
    pub async fn wait_live(&self, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        let Some(m) = &self.shared.0.mesh else {
            return self.live_relays();
        };
        let mut rx = m.live();
        let r = rx.wait_for(|l| pred(l.ring.ids())).await;
        match r {
            Ok(l) => l.ring.ids().to_vec(),
            Err(_) => self.live_relays(),
        }
    }

    /// Current counters (the same numbers `--metrics` serves).
    pub fn stats(&self) -> RelayStats {
        let s = &self.shared.0;
        let m = &s.metrics;
        let reg = s.registry();
        let busy = m.handshakes.with_label_values(&["refused", "busy"]).get();
        RelayStats {
            sessions: m.sessions.get(),
            refused_hello: m.handshakes_with("refused").saturating_sub(busy),
            refused_busy: busy,
            accepted: m.accepted.get() + m.forwarded.get(),
            refused_send: m.refused_total(),
            delivered: m.delivered.get(),
            acked: m.acked.get(),
            expired: m.expired.get(),
            streams_opened: m.streams_opened.get(),
            streams_refused: m.streams_refused.get(),
            mesh_refused: m.mesh_refused.get(),
            held: reg.held_messages() as u64,
            attached: reg.sessions().len() as u64,
        }
    }

    /// The relay's metrics in the Prometheus text format (what
    /// `GET /metrics` on the metrics address answers).
    pub fn metrics_text(&self) -> String {
        render_metrics(&self.shared.0)
    }
}

/// Sets the gauges that are read from state, then encodes every metric.
fn render_metrics(shared: &Shared) -> String {
    let m = &shared.metrics;
    {
        let reg = shared.registry();
        m.attached.set(reg.sessions().len() as i64);
        let (msgs, bytes) = reg.held();
        m.held_messages.set(msgs as i64);
        m.held_bytes.set(bytes as i64);
        let published = reg.status.published;
        m.status_publications
            .inc_by(published.saturating_sub(m.status_publications.get()));
    }
    m.mesh_links
        .set(shared.mesh.as_ref().map_or(0, |mesh| mesh.links_up()) as i64);
    swb_metrics::encode(&m.registry)
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The relay's main task: accepts connections and owns every session task;
/// also polls the keys file and sweeps expired mail.
async fn run(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    // The HTTPS door, the mesh dialer and the metrics endpoint.
    helpers: [Option<JoinHandle<()>>; 3],
) {
    let mut sessions = tokio::task::JoinSet::new();
    let lease_every = (shared.config.limits.visibility / 4)
        .clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut lease_tick = tokio::time::interval(lease_every);
    let mut status_tick = tokio::time::interval(status::MIN_PUBLISH_INTERVAL / 2);
    // Mail whose home moved to another relay (one joined) goes there.
    let mut live = shared.mesh.as_ref().map(|m| m.live());
    let mut handoffs = tokio::task::JoinSet::new();
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut keys_tick = tokio::time::interval(shared.config.keys_poll);
    keys_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sweep_every =
        (shared.config.limits.ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut sweep_tick = tokio::time::interval(sweep_every);
    sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn_seq = 0u64;
    loop {
        // Ranked: shutdown first, then new connections, then housekeeping.
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(()) = async {
                match live.as_mut() {
                    Some(rx) => rx.changed().await.ok(),
                    None => std::future::pending().await,
                }
            } => {
                if handoffs.is_empty() {
                    let ring = live.as_mut().map(|rx| rx.borrow_and_update().ring.clone());
                    if let Some(ring) = ring {
                        let s = shared.clone();
                        handoffs.spawn(async move {
                            let (moved, kept) = mesh::handoff(&s, &ring).await;
                            if moved + kept > 0 {
                                info!(moved, kept, "held mail moved to the relays that are now its home");
                            }
                        }.in_current_span());
                    }
                }
            }
            Some(_) = handoffs.join_next(), if !handoffs.is_empty() => {}
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
                    // Too many handshakes at once: the client retries later.
                    shared.metrics.handshake("refused", "busy");
                    incoming.refuse();
                    continue;
                };
                conn_seq += 1;
                let span = tracing::debug_span!("conn", conn = conn_seq, remote = %incoming.remote_address());
                sessions.spawn(
                    session::run(shared.clone(), incoming, permit, cancel.child_token()).instrument(span),
                );
            }
            Some(done) = sessions.join_next() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!("session task panicked: {e}");
                    }
                }
            }
            _ = keys_tick.tick() => {
                shared.refresh_keys(Duration::ZERO);
            }
            _ = status_tick.tick() => {
                let mut reg = shared.registry();
                if reg.status.has_dirty() {
                    reg.status.flush(tokio::time::Instant::now());
                }
            }
            _ = lease_tick.tick() => {
                let n = shared.registry().sweep_leases(tokio::time::Instant::now());
                if n > 0 {
                    tracing::debug!(messages = n, "http leases ran out; mail handed out again");
                }
            }
            _ = sweep_tick.tick() => {
                let n = shared.registry().expire(tokio::time::Instant::now());
                if n > 0 {
                    shared.metrics.expired.inc_by(n as u64);
                    info!(messages = n, "expired undelivered messages (TTL {:?})", shared.config.limits.ttl);
                }
            }
        }
    }
    // Leaving a mesh: peers stop routing here, held mail goes to the relays
    // that take over its names, then the links close.
    handoffs.abort_all();
    if let Some(m) = &shared.mesh {
        m.announce_leaving();
        let ring = m.live().borrow().ring.without(&m.me.id);
        match tokio::time::timeout(Duration::from_secs(10), mesh::handoff(&shared, &ring)).await {
            Ok((moved, kept)) if moved + kept > 0 => {
                info!(moved, kept, "held mail handed to the relays that take over")
            }
            Ok(_) => {}
            Err(_) => warn!("mail handoff did not finish in 10 s; the rest is saved locally"),
        }
    }
    shared.mesh_stop.cancel();
    if let Some(m) = &shared.mesh {
        m.stop_mirrors();
    }
    // Drain: sessions saw the cancellation (their tokens are children) and
    // say goodbye; give them a grace period, then stop the rest.
    endpoint.set_server_config(None);
    let grace = shared.config.shutdown_grace;
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
    if let Some(dir) = &shared.config.state_dir {
        let saved = shared
            .registry()
            .export(tokio::time::Instant::now(), wall_ms());
        let n = saved.len();
        match persist::save(dir, saved) {
            Ok(()) if n > 0 => {
                info!(messages = n, dir = %dir.display(), "held mail saved for the next start")
            }
            Ok(()) => {}
            Err(e) => {
                tracing::error!(messages = n, dir = %dir.display(), "cannot save held mail: {e}; it is lost")
            }
        }
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"relay shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    info!("relay stopped");
}
