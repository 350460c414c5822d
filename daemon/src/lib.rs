//! The Switchboard client daemon (`swbd up`): keeps one QUIC connection to
//! its relay and serves a local control socket for the CLI.
//!
//! # Flow
//!
//! ```text
//! Daemon::spawn ─► main task ─┬─ connection actor (conn.rs): connect → Hello → Welcome → serve;
//! │                           │    reconnects with capped exponential backoff + jitter;
//! │                           │    stops for good on refusals that retrying cannot fix
//! │                           │    (bad key, revoked key, bad name, replaced by another daemon)
//! │                           ├─ per connection: stream acceptor (streams.rs) for exposed ports
//! │                           ├─ SOCKS5 listener (socks.rs): NAME.switchboard:PORT → stream
//! │                           └─ control server (server.rs): Unix socket, JSON lines; `connect`
//! │                                turns a control connection into a byte stream to a peer
//! DaemonHandle { control_path(), state(), shutdown(), join() }
//! ```
//!
//! # Delivery contract
//!
//! A message delivered by the relay sits in the daemon's inbox until a CLI
//! takes it with `recv` and acknowledges it; only then does the daemon send
//! `Ack` to the relay. A daemon crash or reconnect therefore redelivers
//! instead of losing; ids seen or recently acknowledged are dropped as
//! duplicates. Sends carry a daemon-chosen id and are retried on the next
//! connection until the relay answered, so a reconnect never duplicates them.

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod api;
pub mod carrier;
pub mod compact;
mod conn;
pub mod control;
mod dial;
pub mod framing;
mod inbox;
mod metrics;
mod outbound;
pub mod ping;
mod server;
mod session;
pub mod socks;
mod splice;
pub mod status;
pub mod streams;
pub mod tls;
pub mod tun;

pub use api::{
    Accepted, ApiError, Message, PendingBatch, PendingSend, Receiver, Sender, MAX_SEND_BATCH,
};
pub use carrier::Transport;
pub use control::{default_control_path, Client, ControlError};
pub use ping::{Pinger, Pong};
pub use socks::SocksConfig;
pub use streams::{BadExposure, Exposure, StreamError};
pub use swb_wire::{Refusal, Welcome};
pub use tls::{OcspPolicy, Trust};
pub use tun::TunSettings;

/// An API key. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key (surrounding whitespace removed).
    pub fn new(k: impl Into<String>) -> Self {
        Self(k.into().trim().to_string())
    }
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Everything a daemon needs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Relay addresses (`host:port`; port 7443 if omitted), tried in order.
    pub relays: Vec<String>,
    /// TLS server name to verify instead of the host of the relay address.
    pub server_name: Option<String>,
    /// How the relay's certificate is verified.
    pub trust: Trust,
    /// What is asked of the relay's stapled OCSP response.
    pub ocsp: OcspPolicy,
    /// Peer name to register.
    pub name: String,
    /// API key.
    pub api_key: ApiKey,
    /// Where the control socket is created.
    pub control_path: PathBuf,
    /// QUIC keep-alive interval.
    pub keepalive: Duration,
    /// The connection is considered dead after this much silence.
    pub idle_timeout: Duration,
    /// After this much silence from the relay (more than `keepalive`: a
    /// keep-alive went unanswered), the daemon moves to a fresh UDP socket
    /// (the connection migrates) and asks the next relay on the ring, on a
    /// second connection, whether it is home now — so a crashed relay's
    /// peers re-home in seconds instead of after `idle_timeout`, while a
    /// relay that is only slow, or a network that is down for everyone,
    /// keeps the connection and its streams.
    pub silence_probe: Duration,
    /// Time allowed for each step of a connection attempt: the QUIC
    /// handshake, then the relay's answer to Hello.
    pub connect_timeout: Duration,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Ports peers may open streams to, and where they lead.
    pub expose: Vec<Exposure>,
    /// How long a stream to an exposed port waits for its service to
    /// accept the connection (default [`streams::TARGET_CONNECT_TIMEOUT`]).
    pub target_connect_timeout: Duration,
    /// The local SOCKS5 listener, if any.
    pub socks: Option<SocksConfig>,
    /// TUN mode (`--tun`), if asked for.
    pub tun: Option<tun::TunSettings>,
    /// Where to serve Prometheus metrics (plain HTTP, `GET /metrics`);
    /// `None`: not served ([`DaemonHandle::metrics_text`] still works).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How QUIC packets reach relays: UDP, the TCP carrier (TLS to the
    /// relay's HTTPS port), or UDP with the carrier when UDP does not
    /// answer (the default).
    pub transport: Transport,
}

impl DaemonConfig {
    /// A config with default timings.
    pub fn new(
        relay: impl Into<String>,
        trust: Trust,
        name: impl Into<String>,
        api_key: ApiKey,
        control_path: PathBuf,
    ) -> Self {
        Self {
            relays: vec![relay.into()],
            server_name: None,
            trust,
            ocsp: OcspPolicy::default(),
            name: name.into(),
            api_key,
            control_path,
            keepalive: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(12),
            silence_probe: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            expose: Vec::new(),
            target_connect_timeout: streams::TARGET_CONNECT_TIMEOUT,
            socks: None,
            tun: None,
            metrics_listen: None,
            transport: Transport::Auto,
        }
    }
}

/// Default relay port when an address has none.
pub const DEFAULT_RELAY_PORT: u16 = 7443;

/// The daemon's connection state, observable through [`DaemonHandle::state`].
#[derive(Debug, Clone, PartialEq)]
pub enum ConnState {
    /// Trying to (re)connect.
    Connecting {
        /// Relay being tried.
        relay: String,
        /// Failed attempts since the last success.
        attempts: u32,
        /// Last error.
        last_error: Option<String>,
    },
    /// Registered at a relay.
    Connected {
        /// Relay address.
        relay: String,
        /// What the relay said.
        welcome: Welcome,
        /// When.
        since: SystemTime,
    },
    /// Stopped for good; `error` says why (none: asked to stop).
    Stopped {
        /// The fatal error.
        error: Option<String>,
    },
}

impl ConnState {
    /// Whether registered at a relay.
    pub fn is_connected(&self) -> bool {
        matches!(self, ConnState::Connected { .. })
    }
}

/// The daemon stopped (the reason, if it stopped for one) before it
/// connected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the daemon stopped: {}", .0.as_deref().unwrap_or("asked to"))]
pub struct Stopped(pub Option<String>);

/// Errors that stop a daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The relay refused in a way retrying cannot fix.
    #[error("the relay refused this daemon: {0}")]
    Refused(Refusal),
    /// The relay's certificate did not verify.
    #[error("{0}")]
    Untrusted(String),
    /// TLS trust configuration.
    #[error(transparent)]
    Trust(#[from] tls::TrustError),
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// The control socket could not be set up.
    #[error("control socket {path}: {reason}")]
    Control {
        /// Socket path.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

impl DaemonError {
    /// The refusal code, when the relay refused.
    pub fn code(&self) -> Option<swb_wire::Code> {
        match self {
            DaemonError::Refused(r) => Some(r.code),
            _ => None,
        }
    }
}

pub(crate) struct Shared {
    pub(crate) config: DaemonConfig,
    /// Private: changed only through [`Shared::set_state`], which keeps
    /// `connected` in step; read with [`Shared::state`] and
    /// [`Shared::watch_state`].
    state: watch::Sender<ConnState>,
    /// Whether `state` is `Connected`, read by every send: a load, where
    /// borrowing the watch takes its lock — a count each sending thread
    /// and the connection's task would write per message.
    pub(crate) connected: std::sync::atomic::AtomicBool,
    pub(crate) inbox: Mutex<inbox::Inbox>,
    /// Bumped whenever the inbox gains messages.
    pub(crate) inbox_gen: watch::Sender<u64>,
    pub(crate) conn: Mutex<Option<quinn::Connection>>,
    pub(crate) cmd_tx: mpsc::Sender<session::Cmd>,
    /// The control stream's write side (see [`outbound`]).
    pub(crate) out: outbound::Outbound,
    pub(crate) pending_sends: AtomicUsize,
    /// Relays in the last relay map.
    pub(crate) relay_count: AtomicUsize,
    /// This peer's own status (serialises publications).
    pub(crate) own_status: tokio::sync::Mutex<status::OwnStatus>,
    pub(crate) metrics: metrics::Metrics,
    /// Every task the daemon starts.
    pub(crate) tasks: tokio_util::task::TaskTracker,
    /// Exposed ports now ([`DaemonHandle::set_exposures`] changes them).
    pub(crate) expose: std::sync::RwLock<Arc<Vec<Exposure>>>,
    /// The TUN interface, once the relay assigned its addresses.
    pub(crate) tun: Mutex<Option<Arc<tun::TunState>>>,
    /// Why TUN mode is off although asked for (`swbd status`); the
    /// interface could not be made (no CAP_NET_ADMIN, …): not asked again.
    pub(crate) tun_error: Mutex<Option<tun::TunError>>,
    /// Cancelled when the daemon stops.
    pub(crate) stop: CancellationToken,
    /// UDP or the TCP carrier, per relay address.
    pub(crate) paths: Arc<carrier::Paths>,
}

impl Shared {
    pub(crate) fn exposures(&self) -> Arc<Vec<Exposure>> {
        self.expose
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Shared {
    /// The connection's state now.
    pub(crate) fn state(&self) -> watch::Ref<'_, ConnState> {
        self.state.borrow()
    }

    /// The connection's state, and its changes.
    pub(crate) fn watch_state(&self) -> watch::Receiver<ConnState> {
        self.state.subscribe()
    }

    /// The connection's state is now `s`.
    pub(crate) fn set_state(&self, s: ConnState) {
        let connected = s.is_connected();
        self.state.send_replace(s);
        self.connected
            .store(connected, std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn inbox(&self) -> std::sync::MutexGuard<'_, inbox::Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Exposures must name distinct ports other than the ping service's.
fn check_exposures(expose: &[Exposure]) -> Result<(), DaemonError> {
    if expose.iter().any(|e| e.port == swb_wire::PING_PORT) {
        return Err(DaemonError::Config(
            "cannot expose port 0: it is the built-in ping service".into(),
        ));
    }
    let mut ports: Vec<u16> = expose.iter().map(|e| e.port).collect();
    ports.sort_unstable();
    if let Some(w) = ports.windows(2).find(|w| w[0] == w[1]) {
        return Err(DaemonError::Config(format!(
            "port {} is exposed twice",
            w[0]
        )));
    }
    Ok(())
}

/// Sets the gauges read from state, then encodes every metric.
fn render_metrics(shared: &Shared) -> String {
    let m = &shared.metrics;
    let conn = shared
        .conn
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    m.connected.set(i64::from(conn.is_some()));
    m.rtt_seconds
        .set(conn.map_or(0.0, |c| c.rtt().as_secs_f64()));
    m.relays.set(
        shared
            .relay_count
            .load(std::sync::atomic::Ordering::Relaxed) as i64,
    );
    m.inbox.set(shared.inbox().len() as i64);
    swb_metrics::encode(&m.registry)
}

/// The daemon entry point.
#[derive(Debug)]
pub struct Daemon;

/// A running daemon. Dropping it stops the daemon.
pub struct DaemonHandle {
    shared: Arc<Shared>,
    control_path: PathBuf,
    socks_addr: Option<std::net::SocketAddr>,
    metrics_addr: Option<std::net::SocketAddr>,
    state: watch::Receiver<ConnState>,
    cancel: CancellationToken,
    task: Option<JoinHandle<Result<(), DaemonError>>>,
}

impl Daemon {
    /// Validates the config, binds the control socket and starts connecting.
    pub async fn spawn(mut config: DaemonConfig) -> Result<DaemonHandle, DaemonError> {
        config.name = swb_wire::normalize_name(&config.name)
            .map_err(|e| DaemonError::Config(format!("--name {:?}: {e}", config.name)))?;
        if config.relays.is_empty() {
            return Err(DaemonError::Config(
                "no relay address given (--relay HOST:PORT)".into(),
            ));
        }
        check_exposures(&config.expose)?;
        if let Some(t) = &config.tun {
            swb_tunnel::device::check_name(&t.name)
                .map_err(|e| DaemonError::Config(format!("--tun-name: {e}")))?;
        }
        if config.api_key.expose().is_empty() {
            return Err(DaemonError::Config(
                "no API key: set SWB_API_KEY or pass --api-key-file".into(),
            ));
        }
        if let Some(sc) = &config.socks {
            // Off loopback, anyone who can reach the port would reach every
            // peer's exposed ports with this daemon's key.
            if !sc.listen.ip().is_loopback() && sc.auth.is_none() {
                return Err(DaemonError::Config(format!(
                    "SOCKS on {} is reachable from other machines: give it a username and password (--socks-user USER, password in SWB_SOCKS_PASSWORD), or listen on a loopback address",
                    sc.listen
                )));
            }
        }
        let note = tls::VerifyNote::default();
        let tls = tls::client_config(&config.trust, config.ocsp, swb_wire::ALPN, note.clone())?;
        let listener = server::bind(&config.control_path)?;
        let socks_listener = match &config.socks {
            None => None,
            Some(sc) => match tokio::net::TcpListener::bind(sc.listen).await {
                Ok(l) => Some(l),
                Err(e) if !sc.required => {
                    tracing::warn!(
                        "SOCKS disabled: cannot listen on {} ({e}); another daemon may have it. Pass --socks ADDR or --socks off",
                        sc.listen
                    );
                    None
                }
                Err(e) => {
                    return Err(DaemonError::Config(format!(
                    "cannot listen for SOCKS on {}: {e}; pick another address with --socks ADDR",
                    sc.listen
                )))
                }
            },
        };
        let socks_addr = socks_listener.as_ref().and_then(|l| l.local_addr().ok());
        let metrics_listener = match config.metrics_listen {
            None => None,
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                DaemonError::Config(format!(
                    "cannot listen for metrics on {addr}: {e}; pick another address with --metrics ADDR"
                ))
            })?),
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (state, state_rx) = watch::channel(ConnState::Connecting {
            relay: config.relays[0].clone(),
            attempts: 0,
            last_error: None,
        });
        let control_path = config.control_path.clone();
        let tasks = tokio_util::task::TaskTracker::new();
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            // The state starts as `Connecting`.
            connected: std::sync::atomic::AtomicBool::new(false),
            state,
            inbox: Mutex::new(inbox::Inbox::default()),
            inbox_gen: watch::channel(0).0,
            conn: Mutex::new(None),
            cmd_tx,
            out: outbound::Outbound::default(),
            pending_sends: AtomicUsize::new(0),
            own_status: tokio::sync::Mutex::new(status::OwnStatus::default()),
            relay_count: AtomicUsize::new(0),
            metrics: metrics::Metrics::new(),
            expose: std::sync::RwLock::new(Arc::new(config.expose.clone())),
            tun: Mutex::new(None),
            tun_error: Mutex::new(None),
            paths: carrier::Paths::new(config.transport, tasks.clone(), stop.clone()),
            tasks,
            stop,
            config,
        });
        let cancel = shared.stop.clone();
        let handle_shared = shared.clone();
        let task = {
            let cancel = cancel.clone();
            let span = tracing::info_span!("daemon", peer = %shared.config.name);
            let tasks = shared.tasks.clone();
            tasks.spawn(tracing::Instrument::instrument(
                async move {
                    let server_cancel = cancel.child_token();
                    let actor = async {
                        // A token of its own: the actor polls it on every
                        // wake-up, and a token's waiters are behind a lock
                        // every task waiting on that token takes.
                        let r = conn::run(shared.clone(), cmd_rx, tls, note, cancel.child_token())
                            .await;
                        server_cancel.cancel();
                        r
                    };
                    let socks = async {
                        if let Some(l) = socks_listener {
                            socks::serve(l, shared.clone(), server_cancel.clone()).await;
                        }
                    };
                    let metrics = async {
                        if let Some(l) = metrics_listener {
                            let s = shared.clone();
                            let render: swb_metrics::Render = Arc::new(move || render_metrics(&s));
                            swb_metrics::serve(l, render, server_cancel.clone()).await;
                        }
                    };
                    let (r, (), (), ()) = tokio::join!(
                        actor,
                        server::serve(listener, shared.clone(), server_cancel.clone()),
                        socks,
                        metrics
                    );
                    r
                },
                span,
            ))
        };
        if let Some(a) = socks_addr {
            tracing::info!(%a, "SOCKS5 listening: NAME.switchboard:PORT reaches exposed ports");
        }
        Ok(DaemonHandle {
            shared: handle_shared,
            control_path,
            socks_addr,
            metrics_addr,
            state: state_rx,
            cancel,
            task: Some(task),
        })
    }
}

impl std::fmt::Debug for DaemonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonHandle")
            .field("name", &self.shared.config.name)
            .field("control_path", &self.control_path)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl DaemonHandle {
    /// Sends `body` to `to` and waits for the relay's answer; see
    /// [`Sender::send`].
    pub async fn send(
        &self,
        to: &str,
        body: impl Into<bytes::Bytes>,
        timeout: Duration,
    ) -> Result<Accepted, ApiError> {
        self.sender().send(to, body, timeout).await
    }

    /// Hands a send to the relay connection; see [`Sender::submit`].
    pub async fn submit(
        &self,
        to: &str,
        body: impl Into<bytes::Bytes>,
        timeout: Duration,
    ) -> Result<PendingSend, ApiError> {
        self.sender().submit(to, body, timeout).await
    }

    /// Hands up to [`MAX_SEND_BATCH`] sends to the relay connection
    /// together; see [`Sender::submit_batch`].
    pub async fn submit_batch<'a, B: Into<bytes::Bytes>>(
        &self,
        msgs: impl IntoIterator<Item = (&'a str, B)>,
        timeout: Duration,
    ) -> Result<PendingBatch, ApiError> {
        self.sender().submit_batch(msgs, timeout).await
    }

    /// A sender for other tasks (cheap to clone).
    pub fn sender(&self) -> Sender {
        Sender {
            shared: self.shared.clone(),
        }
    }

    /// A receiver of this peer's messages (as a control connection's
    /// `recv`/`ack`). Several may exist; each message goes to one of them.
    pub fn receiver(&self) -> Receiver {
        Receiver {
            shared: self.shared.clone(),
            leased: api::Leased::default(),
            // Its own token (see `conn::run`'s).
            cancel: self.cancel.child_token(),
        }
    }

    /// Opens a ping stream to peer `to` (see [`Pinger`]); call
    /// [`Pinger::ping`] for each round trip.
    pub async fn pinger(&self, to: &str, wait: Duration) -> Result<Pinger, StreamError> {
        Pinger::open(&self.shared, to, wait).await
    }

    /// Watches the status of `names` (as `swbd receive-status` does, without
    /// the control socket): their current values, then every change.
    pub async fn watch(
        &self,
        names: Vec<String>,
        wait: Duration,
    ) -> Result<status::StatusWatcher, StreamError> {
        status::StatusWatcher::open(&self.shared, names, wait).await
    }

    /// One round trip to peer `to` through the relays, answered by its
    /// daemon (a new ping stream each time; use [`Self::pinger`] for many).
    /// `wait` bounds the stream setup and the round trip, each.
    pub async fn ping(&self, to: &str, wait: Duration) -> Result<Pong, StreamError> {
        Pinger::open(&self.shared, to, wait).await?.ping(wait).await
    }

    /// Replaces the exposed ports (what `swbd up` does on SIGHUP with its
    /// config file). Streams already open stay open; new ones see the new
    /// set at once, without a reconnect.
    pub fn set_exposures(&self, expose: Vec<Exposure>) -> Result<(), DaemonError> {
        check_exposures(&expose)?;
        *self
            .shared
            .expose
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(expose);
        tun::exposures_changed(&self.shared);
        Ok(())
    }

    /// The ports exposed now.
    pub fn exposures(&self) -> Vec<Exposure> {
        self.shared.exposures().to_vec()
    }

    /// The control socket path.
    pub fn control_path(&self) -> &std::path::Path {
        &self.control_path
    }

    /// The bound SOCKS5 address, if the listener runs.
    pub fn socks_addr(&self) -> Option<std::net::SocketAddr> {
        self.socks_addr
    }

    /// The bound address of the metrics endpoint, if it runs.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// The daemon's metrics in the Prometheus text format (what
    /// `GET /metrics` on the metrics address answers).
    pub fn metrics_text(&self) -> String {
        render_metrics(&self.shared)
    }

    /// A receiver of connection state changes.
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.state.clone()
    }

    /// Waits until connected, or until the daemon stopped (then the error).
    pub async fn connected(&self) -> Result<Welcome, Stopped> {
        let mut rx = self.state.clone();
        let s = rx
            .wait_for(|s| matches!(s, ConnState::Connected { .. } | ConnState::Stopped { .. }))
            .await
            .map_err(|_| Stopped(None))?
            .clone();
        match s {
            ConnState::Connected { welcome, .. } => Ok(welcome),
            ConnState::Stopped { error } => Err(Stopped(error)),
            ConnState::Connecting { .. } => Err(Stopped(None)),
        }
    }

    /// Asks the daemon to stop (closes the relay connection and the socket).
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Waits for the daemon to end — every task it started — and returns
    /// the error, if it stopped for one.
    pub async fn join(mut self) -> Result<(), DaemonError> {
        let r = match self.task.take() {
            Some(t) => t
                .await
                .unwrap_or_else(|e| Err(DaemonError::Config(format!("daemon task failed: {e}")))),
            None => Ok(()),
        };
        self.cancel.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        r
    }

    /// Tasks of this daemon still running; 0 after [`DaemonHandle::join`].
    pub fn tasks_alive(&self) -> usize {
        self.shared.tasks.len()
    }

    /// A handle on the daemon's tasks, to check after `join` that none
    /// outlived it.
    pub fn task_tracker(&self) -> tokio_util::task::TaskTracker {
        self.shared.tasks.clone()
    }
}

impl Drop for DaemonHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
