//! What a relay is told at start: addresses, identity, keys, limits,
//! timeouts and mesh membership.

use crate::doors::http::HttpLimits;
use crate::keys::KeySource;
use crate::services::registry::MailboxLimits;
use crate::tls::Identity;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Threads (at nice +10) that do the CPU-heavy part of TLS handshakes,
    /// away from the workers that carry established sessions; 0 does it
    /// on the workers.
    pub handshake_threads: usize,
    /// QUIC endpoints, each with its own UDP socket on `listen`
    /// (`SO_REUSEPORT`) and its own packet-processing task; connections
    /// stay with their shard when clients move (see `docs/performance.md`,
    /// *Relay shards*). 1 to [`crate::MAX_SHARDS`]; default 1.
    pub shards: usize,
    /// QUIC Initials without a token (first contact) per source address
    /// and in total; more are dropped before the handshake starts.
    pub initials: crate::InitialLimits,
    /// Handshakes in flight above which a new connection from an address
    /// it has not proven (QUIC address validation) is sent a QUIC Retry
    /// first, so spoofed sources cannot hold handshake slots (default 64;
    /// 0: every connection).
    pub retry_above: usize,
    /// New connections per source address (default 50 per second, bursts
    /// of 500 — a NAT full of daemons reconnecting at once); more are
    /// refused at once and retry after their backoff. `None`: no limit.
    pub connections_per_ip: Option<crate::limits::Rate>,
    /// Messages one API key may send per second, all its sessions and HTTP
    /// together (default 50 000, bursts of 100 000); more are refused with
    /// `rate_limited`. `None`: no limit.
    pub key_send_rate: Option<crate::limits::Rate>,
    /// HTTP requests one API key may make per second (default 1000, bursts
    /// of 2000); more are answered `429 rate_limited`. `None`: no limit.
    pub key_http_rate: Option<crate::limits::Rate>,
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
    /// Time the target has to answer a stream request (default 130 s: a
    /// target daemon waits for a slow service as long as the kernel's own
    /// connect timeout, about 127 s, before it answers).
    pub stream_answer_timeout: Duration,
    /// How long an offline peer's status is kept (default 24 h).
    pub status_retention: Duration,
    /// Least time between two published status changes of one peer
    /// (default 50 ms, [`crate::MIN_PUBLISH_INTERVAL`]):
    /// changes in between coalesce into the newest. Zero publishes every
    /// change at once; presence changes always publish at once.
    pub status_interval: Duration,
    /// Where the relay keeps its state: the mail store (`mail/`), and in
    /// dev mode its certificate. `None`: mail in memory only.
    pub state_dir: Option<PathBuf>,
    /// How durable accepted mail is before the sender hears `accepted`
    /// (`None`: `sync` with a state dir, `memory` without one).
    pub durability: Option<crate::Durability>,
    /// Membership of a relay mesh, if any.
    pub mesh: Option<crate::mesh::MeshConfig>,
    /// Where to serve Prometheus metrics (plain HTTP, `GET /metrics`);
    /// `None`: not served ([`RelayHandle::metrics_text`] still works).
    pub metrics_listen: Option<SocketAddr>,
    /// OCSP stapling (mode `auto` by default).
    pub ocsp: crate::OcspConfig,
    /// The IPv4 range TUN addresses come from (every namespace has all of
    /// it; default `100.64.0.0/10`). Every relay of a mesh must have the
    /// same.
    pub tun_range: (std::net::Ipv4Addr, u8),
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
            max_handshakes: crate::MAX_HANDSHAKES,
            handshake_threads: 1,
            shards: 1,
            initials: crate::InitialLimits::default(),
            retry_above: 64,
            connections_per_ip: Some(crate::limits::Rate::new(50.0, 500.0)),
            key_send_rate: Some(crate::limits::Rate::new(50_000.0, 100_000.0)),
            key_http_rate: Some(crate::limits::Rate::new(1000.0, 2000.0)),
            shutdown_grace: Duration::from_secs(3),
            http_listen: HttpListen::SameAsQuic,
            http: HttpLimits::default(),
            max_streams_per_peer: 256,
            stream_setup_timeout: Duration::from_secs(10),
            stream_answer_timeout: Duration::from_secs(130),
            status_retention: Duration::from_secs(24 * 3600),
            status_interval: crate::MIN_PUBLISH_INTERVAL,
            state_dir: None,
            durability: None,
            mesh: None,
            metrics_listen: None,
            ocsp: crate::OcspConfig::default(),
            tun_range: swb_tunnel::addr::DEFAULT_V4_NET,
        }
    }
}
