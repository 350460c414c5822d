//! Test harness for whole-system loopback tests: in-process relays and
//! daemons on `127.0.0.1:0`. Every test starts relays through
//! [`TestRelay`] and daemons through [`TestDaemon`]; waits are on events
//! (state changes, answers), never on sleeps.

use anyhow::{bail, ensure, Context, Result};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use swb_daemon::control::{InMessage, Sent};
use swb_daemon::{
    ApiKey, Client, ConnState, ControlError, Daemon, DaemonConfig, DaemonHandle, Trust,
};
use swb_relay::keys::{self, KeysFile};
use swb_relay::{Identity, KeySource, MailboxLimits, Relay, RelayConfig, RelayHandle};
use swb_wire::{Frame, FrameReader, Hello, Preamble, PROTOCOL_VERSION};
use tempfile::TempDir;

/// Upper bound for any single wait in tests: generous, so a slow CI machine
/// does not flake, and a hang still fails instead of blocking forever.
pub const WAIT: Duration = Duration::from_secs(20);

/// How often [`eventually`] looks again.
const RECHECK: Duration = Duration::from_millis(10);

/// Looks at the system until `check` finds what it waits for (`Some`),
/// re-checking every 10 ms, for at most `within`; then fails naming `what`.
/// For conditions that no event announces (another relay's view, a
/// counter); an `Err` from `check` ends the wait at once.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(RECHECK).await;
    }
}

/// Installs a log subscriber once (`RUST_LOG` controls it).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Options for [`TestRelay`].
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Mailbox limits.
    pub limits: MailboxLimits,
    /// Keys file poll interval.
    pub keys_poll: Duration,
    /// TLS identity; an ephemeral self-signed one when `None`.
    pub identity: Option<Identity>,
    /// HTTPS endpoint limits.
    pub http: swb_relay::HttpLimits,
    /// Data streams per peer.
    pub max_streams_per_peer: usize,
    /// Relay id (default `test-relay`).
    pub relay_id: Option<String>,
    /// Mesh membership.
    pub mesh: Option<swb_relay::mesh::MeshConfig>,
    /// Connections in their handshake at once.
    pub max_handshakes: usize,
    /// Handshakes in flight above which unproven addresses get a Retry.
    pub retry_above: usize,
    /// New connections per source address.
    pub connections_per_ip: Option<swb_relay::limits::Rate>,
    /// Sends per API key.
    pub key_send_rate: Option<swb_relay::limits::Rate>,
    /// HTTP requests per API key.
    pub key_http_rate: Option<swb_relay::limits::Rate>,
    /// Serve metrics on `127.0.0.1:0`.
    pub metrics: bool,
    /// OCSP stapling.
    pub ocsp: swb_relay::OcspConfig,
    /// The IPv4 range of TUN addresses.
    pub tun_range: (std::net::Ipv4Addr, u8),
    /// QUIC endpoints sharing the UDP port.
    pub shards: usize,
    /// Least time between two field publications of one peer.
    pub status_interval: Duration,
    /// The relay's state dir (mail log); default `state/` in its temp dir.
    pub state_dir: Option<std::path::PathBuf>,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            limits: MailboxLimits::default(),
            keys_poll: Duration::from_millis(50),
            identity: None,
            http: swb_relay::HttpLimits::default(),
            max_streams_per_peer: 256,
            relay_id: None,
            mesh: None,
            max_handshakes: swb_relay::MAX_HANDSHAKES,
            retry_above: 64,
            connections_per_ip: Some(swb_relay::limits::Rate::new(50.0, 500.0)),
            key_send_rate: Some(swb_relay::limits::Rate::new(50_000.0, 100_000.0)),
            key_http_rate: Some(swb_relay::limits::Rate::new(1000.0, 2000.0)),
            metrics: false,
            ocsp: swb_relay::OcspConfig::default(),
            tun_range: (std::net::Ipv4Addr::new(100, 64, 0, 0), 10),
            shards: 1,
            status_interval: swb_relay::MIN_PUBLISH_INTERVAL,
            state_dir: None,
        }
    }
}

/// A loopback address for a relay *process* that a test kills and starts
/// again on the same address: a random port below the kernel's ephemeral
/// range, free for UDP and TCP when chosen. While the relay is down no
/// socket bound to port 0 and no outgoing connection can take it (they get
/// ephemeral ports), as one could take a port the kernel gave out. Another
/// test may still pick it first: start the relay with [`is_addr_in_use`]
/// in mind and pick again.
pub fn restartable_addr() -> Result<SocketAddr> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    ensure!(low > 2048, "the ephemeral port range starts at {low}");
    for _ in 0..1000 {
        let port = fastrand::u16(low / 2..low);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::UdpSocket::bind(addr).is_ok() && std::net::TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no free port below {low} for UDP and TCP")
}

/// Whether `e` (with its causes and any log it quotes) says an address was
/// in use: a relay started on [`restartable_addr`] lost the port to another
/// test.
pub fn is_addr_in_use(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    text.contains("os error 98") || text.contains("Address already in use")
}

/// A relay on `127.0.0.1:0` with its own keys file in a temp dir.
pub struct TestRelay {
    handle: Option<RelayHandle>,
    addr: SocketAddr,
    identity: Identity,
    opts: RelayOptions,
    dir: TempDir,
}

impl TestRelay {
    /// A relay with default options.
    pub async fn spawn() -> Result<Self> {
        Self::spawn_with(RelayOptions::default()).await
    }

    /// A relay with these options.
    pub async fn spawn_with(opts: RelayOptions) -> Result<Self> {
        init_logs();
        let dir = tempfile::tempdir()?;
        let identity = match &opts.identity {
            Some(i) => i.clone(),
            None => Identity::ephemeral()?,
        };
        let handle = Self::start(&dir, &identity, &opts, "127.0.0.1:0".parse()?).await?;
        Ok(Self {
            addr: handle.local_addr(),
            handle: Some(handle),
            identity,
            opts,
            dir,
        })
    }

    async fn start(
        dir: &TempDir,
        identity: &Identity,
        opts: &RelayOptions,
        listen: SocketAddr,
    ) -> Result<RelayHandle> {
        let mut cfg = RelayConfig::new(
            listen,
            identity.clone(),
            KeySource::File(dir.path().join("keys.toml")),
        );
        cfg.limits = opts.limits.clone();
        cfg.keys_poll = opts.keys_poll;
        cfg.relay_id = opts.relay_id.clone().unwrap_or_else(|| "test-relay".into());
        cfg.mesh = opts.mesh.clone();
        cfg.shutdown_grace = Duration::from_secs(2);
        cfg.http = opts.http.clone();
        cfg.max_streams_per_peer = opts.max_streams_per_peer;
        cfg.max_handshakes = opts.max_handshakes;
        cfg.retry_above = opts.retry_above;
        cfg.connections_per_ip = opts.connections_per_ip;
        cfg.key_send_rate = opts.key_send_rate;
        cfg.key_http_rate = opts.key_http_rate;
        cfg.state_dir = Some(
            opts.state_dir
                .clone()
                .unwrap_or_else(|| dir.path().join("state")),
        );
        cfg.ocsp = opts.ocsp.clone();
        cfg.tun_range = opts.tun_range;
        cfg.shards = opts.shards;
        cfg.status_interval = opts.status_interval;
        if opts.metrics {
            cfg.metrics_listen = Some("127.0.0.1:0".parse()?);
        }
        Ok(Relay::spawn(cfg).await?)
    }

    /// The relay's directory (keys file, `state/`).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The relay's UDP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The relay's HTTPS address (TCP).
    pub fn http_addr(&self) -> SocketAddr {
        self.handle()
            .http_addr()
            .expect("the test relay serves HTTPS")
    }

    /// An HTTPS client for this relay that authenticates with `key`
    /// (`None`: no Authorization header).
    pub fn http(&self, key: Option<&str>) -> Result<HttpClient> {
        HttpClient::new(self.http_addr(), &self.fingerprint(), key)
    }

    /// `sha256:<hex>` of the relay certificate.
    pub fn fingerprint(&self) -> String {
        self.identity.fingerprint()
    }

    /// The running relay.
    pub fn handle(&self) -> &RelayHandle {
        self.handle.as_ref().expect("relay is running")
    }

    /// Waits until the relay's counters satisfy `pred` (they change as
    /// frames are processed; this re-checks them until [`WAIT`] runs out).
    pub async fn wait_stats(
        &self,
        what: &str,
        pred: impl Fn(&swb_relay::RelayStats) -> bool,
    ) -> Result<swb_relay::RelayStats> {
        let r = eventually(&format!("relay stats: {what}"), WAIT, || {
            let s = self.handle().stats();
            let found = pred(&s).then_some(s);
            async move { Ok(found) }
        })
        .await;
        r.with_context(|| format!("last {:?}", self.handle().stats()))
    }

    /// Path of the relay's keys file.
    pub fn keys_path(&self) -> PathBuf {
        self.dir.path().join("keys.toml")
    }

    /// Creates a key for `namespace` in the keys file and loads it now.
    pub fn create_key(&self, namespace: &str) -> Result<String> {
        let path = self.keys_path();
        let mut file = KeysFile::load(&path)?;
        let k = keys::generate(namespace, "test")?;
        file.keys.push(k.entry);
        file.save(&path)?;
        self.handle().reload_keys()?;
        Ok(k.key)
    }

    /// Creates a key for `namespace` limited to `names` (patterns, comma
    /// separated) and loads it now.
    pub fn create_scoped_key(&self, namespace: &str, names: &str) -> Result<String> {
        let path = self.keys_path();
        let mut file = KeysFile::load(&path)?;
        let mut k = keys::generate(namespace, "test")?;
        k.entry.names = keys::parse_name_patterns(names)?;
        file.keys.push(k.entry);
        file.save(&path)?;
        self.handle().reload_keys()?;
        Ok(k.key)
    }

    /// Sets the name patterns of a key in the file only (empty: every
    /// name); the relay notices by itself.
    pub fn rescope_key_in_file(&self, key: &str, names: &str) -> Result<()> {
        let path = self.keys_path();
        let mut file = KeysFile::load(&path)?;
        let id = keys::key_id(key).context("key shape")?;
        let e = file
            .keys
            .iter_mut()
            .find(|k| k.id == id)
            .context("no such key")?;
        e.names = if names.is_empty() {
            Vec::new()
        } else {
            keys::parse_name_patterns(names)?
        };
        file.save(&path)?;
        Ok(())
    }

    /// Marks a key revoked in the file only; the relay notices by itself.
    pub fn revoke_key_in_file(&self, key: &str) -> Result<()> {
        let path = self.keys_path();
        let mut file = KeysFile::load(&path)?;
        file.revoke(key)?;
        file.save(&path)?;
        Ok(())
    }

    /// Stops the relay and starts a new one on the same address with the
    /// same certificate and keys file.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        let h = Self::start(&self.dir, &self.identity, &self.opts, self.addr).await?;
        self.handle = Some(h);
        Ok(())
    }

    /// Ends the relay at once: no goodbye to the mesh, no mail handoff
    /// (its connections close as the process would on a crash's exit).
    pub fn kill(&mut self) {
        drop(self.handle.take());
    }

    /// Stops the relay and waits for it to end.
    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
            h.join().await;
        }
    }

    /// Daemon config for this relay, with fast test timings.
    pub fn daemon_config(&self, key: &str, name: &str, control: PathBuf) -> DaemonConfig {
        let mut c = DaemonConfig::new(
            self.addr.to_string(),
            Trust::Fingerprint(self.fingerprint()),
            name,
            ApiKey::new(key),
            control,
        );
        c.keepalive = Duration::from_millis(500);
        c.idle_timeout = Duration::from_secs(3);
        c.backoff_min = Duration::from_millis(20);
        c.backoff_max = Duration::from_millis(300);
        c.connect_timeout = Duration::from_secs(5);
        c
    }
}

/// A daemon in this process with its control socket in a temp dir.
pub struct TestDaemon {
    /// The daemon.
    pub handle: DaemonHandle,
    _dir: TempDir,
}

impl TestDaemon {
    /// Starts a daemon and waits until the relay welcomed it.
    pub async fn start(relay: &TestRelay, key: &str, name: &str) -> Result<Self> {
        let d = Self::spawn(relay.daemon_config(key, name, PathBuf::new())).await?;
        tokio::time::timeout(WAIT, d.handle.connected())
            .await
            .context("daemon did not connect in time")?
            .map_err(|e| anyhow::anyhow!("daemon stopped: {e}"))?;
        Ok(d)
    }

    /// Starts a daemon with a config adjusted by `f` (exposures, SOCKS…) and
    /// waits until the relay welcomed it.
    pub async fn start_with(
        relay: &TestRelay,
        key: &str,
        name: &str,
        f: impl FnOnce(&mut DaemonConfig),
    ) -> Result<Self> {
        let mut cfg = relay.daemon_config(key, name, PathBuf::new());
        f(&mut cfg);
        let d = Self::spawn(cfg).await?;
        tokio::time::timeout(WAIT, d.handle.connected())
            .await
            .context("daemon did not connect in time")?
            .map_err(|e| anyhow::anyhow!("daemon stopped: {e}"))?;
        Ok(d)
    }

    /// Opens a byte stream to `port` of `to` through this daemon (what
    /// `swbd connect` does).
    pub async fn open_stream(
        &self,
        to: &str,
        port: u16,
    ) -> Result<swb_daemon::control::PeerStream, ControlError> {
        let c = Client::connect(self.handle.control_path()).await?;
        c.connect_stream(to, port, Duration::from_secs(5)).await
    }

    /// Starts a daemon from a config (its control path is replaced by one in
    /// a fresh temp dir) without waiting for anything.
    pub async fn spawn(mut cfg: DaemonConfig) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        cfg.control_path = dir.path().join("control.sock");
        let handle = Daemon::spawn(cfg).await?;
        Ok(Self { handle, _dir: dir })
    }

    /// A new control client.
    pub async fn client(&self) -> Result<Client> {
        Ok(Client::connect(self.handle.control_path()).await?)
    }

    /// Sends one message through the control socket.
    pub async fn send(&self, to: &str, body: &[u8]) -> Result<Sent, ControlError> {
        let mut c = Client::connect(self.handle.control_path()).await?;
        c.send(to, body, Duration::from_secs(10)).await
    }

    /// Receives (waiting up to [`WAIT`] for the first) and acknowledges.
    pub async fn recv(&self, max: usize) -> Result<Vec<InMessage>> {
        let mut c = self.client().await?;
        let msgs = c.recv(WAIT, max).await?;
        c.ack(msgs.iter().map(|m| m.id.clone()).collect()).await?;
        Ok(msgs)
    }

    /// The packets and bytes of its connection to the relay so far, as
    /// `swbd status` reports them.
    pub async fn traffic(&self) -> Result<swb_daemon::control::Traffic> {
        self.client()
            .await?
            .status()
            .await?
            .traffic
            .context("no traffic figures while connected")
    }

    /// Receives and acknowledges until exactly `n` messages arrived; fails
    /// if they do not within [`WAIT`] or if more arrive.
    pub async fn recv_n(&self, n: usize) -> Result<Vec<InMessage>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut got = Vec::new();
        while got.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                bail!("received {} of {n} messages within {WAIT:?}", got.len());
            }
            let mut c = self.client().await?;
            let msgs = c.recv(left, n - got.len()).await?;
            c.ack(msgs.iter().map(|m| m.id.clone()).collect()).await?;
            got.extend(msgs);
        }
        Ok(got)
    }

    /// Waits until the daemon's state satisfies `pred`.
    pub async fn wait_state(&self, pred: impl Fn(&ConnState) -> bool) -> Result<ConnState> {
        let mut rx = self.handle.state();
        let s = tokio::time::timeout(WAIT, rx.wait_for(|s| pred(s)))
            .await
            .context("timed out waiting for daemon state")??
            .clone();
        Ok(s)
    }

    /// Waits for the daemon to end and returns its result.
    pub async fn join(self) -> Result<Result<(), swb_daemon::DaemonError>> {
        tokio::time::timeout(WAIT, self.handle.join())
            .await
            .context("daemon did not stop in time")
    }
}

/// A raw client `name` at `relay` that joined TUN mode: it and the
/// addresses it was given.
pub async fn tun_join(
    relay: &TestRelay,
    key: &str,
    name: &str,
) -> Result<(RawClient, swb_wire::TunAssigned)> {
    let (mut c, f) = RawClient::hello(relay, key, name).await?;
    if !matches!(f, Frame::Welcome(_)) {
        bail!("{name}: {f:?}");
    }
    c.write_frame(&Frame::TunJoin(swb_wire::TunJoin { want: None }))
        .await?;
    match c.read_frame().await? {
        Frame::TunAnswer(swb_wire::TunAnswer::Assigned(a)) => Ok((c, a)),
        f => bail!("{name}: {f:?}"),
    }
}

/// The IPv4 address of a TUN assignment.
pub fn tun_v4(a: &swb_wire::TunAssigned) -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::from(
        u32::from_be_bytes(a.v4_net) | a.index,
    ))
}

/// A minimal client speaking the wire protocol directly, to test the relay's
/// own checks (which the daemon would otherwise pre-empt).
pub struct RawClient {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    reader: FrameReader,
    ep: quinn::Endpoint,
}

/// A rustls client config that pins `fingerprint` (test-only, via the daemon's verifier path is private; so
/// we trust the relay's certificate directly as a root).
fn raw_client_config(relay: &TestRelay) -> Result<quinn::ClientConfig> {
    raw_client_config_alpn(relay, swb_wire::ALPN)
}

/// A client config pinning `relay`'s certificate and offering `alpn`.
pub fn raw_client_config_alpn(relay: &TestRelay, alpn: &[u8]) -> Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    // The ephemeral certificate is self-signed: trusting it as a root is pinning it.
    roots.add(relay.identity.chain[0].clone())?;
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let q = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(q)))
}

impl RawClient {
    /// Opens a QUIC connection and the control stream; sends `raw` first.
    pub async fn open(relay: &TestRelay, raw: &[u8]) -> Result<Self> {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        ep.set_default_client_config(raw_client_config(relay)?);
        let conn = ep.connect(relay.addr(), "localhost")?.await?;
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(raw).await?;
        Ok(Self {
            conn,
            send,
            recv,
            reader: FrameReader::new(),
            ep,
        })
    }

    /// Connects and sends preamble + Hello; returns the client and the
    /// relay's first frame (Welcome or Refused).
    pub async fn hello(relay: &TestRelay, key: &str, name: &str) -> Result<(Self, Frame)> {
        Self::hello_as(relay, key, name, fastrand::u64(..)).await
    }

    /// [`RawClient::hello`] as daemon instance `instance`.
    pub async fn hello_as(
        relay: &TestRelay,
        key: &str,
        name: &str,
        instance: u64,
    ) -> Result<(Self, Frame)> {
        let mut b = BytesMut::new();
        Preamble {
            version: PROTOCOL_VERSION,
        }
        .encode(&mut b);
        Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            key: key.into(),
            name: name.into(),
            agent: "raw-test".into(),
            instance,
        })
        .encode(&mut b)?;
        let mut c = Self::open(relay, &b).await?;
        c.read_preamble().await?;
        let f = c.read_frame().await?;
        Ok((c, f))
    }

    /// Moves the client to a fresh UDP socket on `127.0.0.1:0`, as a NAT
    /// rebinding or a new network would: the same connection, from a new
    /// source port.
    pub fn rebind(&self) -> Result<()> {
        self.ep.rebind(std::net::UdpSocket::bind("127.0.0.1:0")?)?;
        Ok(())
    }

    /// Reads the relay's preamble.
    pub async fn read_preamble(&mut self) -> Result<Preamble> {
        loop {
            if let Some(p) = self.reader.preamble()? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<()> {
        use tokio::io::AsyncReadExt;
        let buf = self.reader.buf();
        buf.reserve(16 * 1024);
        let n = tokio::time::timeout(WAIT, self.recv.read_buf(buf)).await??;
        if n == 0 {
            bail!("stream ended");
        }
        Ok(())
    }

    /// Reads the next frame, skipping relay maps (informational; see
    /// [`RawClient::read_any_frame`]).
    pub async fn read_frame(&mut self) -> Result<Frame> {
        loop {
            match self.read_any_frame().await? {
                Frame::RelayMap(_) => continue,
                f => return Ok(f),
            }
        }
    }

    /// Reads the next frame, whatever it is.
    pub async fn read_any_frame(&mut self) -> Result<Frame> {
        loop {
            if let Some(f) = self.reader.next_frame()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Writes one frame.
    pub async fn write_frame(&mut self, f: &Frame) -> Result<()> {
        let b = f.to_bytes()?;
        self.send.write_all(&b).await?;
        Ok(())
    }

    /// Writes frames in one write, as a daemon writes what it has queued.
    pub async fn write_frames(&mut self, fs: &[Frame]) -> Result<()> {
        let mut b = BytesMut::new();
        for f in fs {
            f.encode(&mut b)?;
        }
        self.send.write_all(&b).await?;
        Ok(())
    }
}

/// One HTTP answer: status, headers and the body parsed as JSON.
#[derive(Debug)]
pub struct HttpReply {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: hyper::HeaderMap,
    /// The body as JSON (`Null` if it is not JSON).
    pub json: serde_json::Value,
}

impl HttpReply {
    /// `error.code` of an error answer, or "".
    pub fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or("")
    }
}

/// A minimal HTTPS client over hyper + rustls that pins the relay's
/// certificate: one connection per request, HTTP/1.1 or HTTP/2.
#[derive(Clone)]
pub struct HttpClient {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    key: Option<String>,
    /// Use HTTP/2 (negotiated by ALPN) instead of HTTP/1.1.
    pub http2: bool,
}

impl HttpClient {
    /// A client for the relay at `addr` with certificate `fingerprint`.
    pub fn new(addr: SocketAddr, fingerprint: &str, key: Option<&str>) -> Result<Self> {
        let tls =
            Trust::Fingerprint(fingerprint.to_string()).rustls_config(&[b"h2", b"http/1.1"])?;
        Ok(Self {
            addr,
            tls: Arc::new(tls),
            key: key.map(String::from),
            http2: false,
        })
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<HttpReply> {
        self.request("GET", path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Result<HttpReply> {
        self.request("POST", path, Some(serde_json::to_vec(body)?))
            .await
    }

    /// Any request with a raw body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<HttpReply> {
        use http_body_util::BodyExt;
        let mut tls = (*self.tls).clone();
        tls.alpn_protocols = if self.http2 {
            vec![b"h2".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let name = rustls::pki_types::ServerName::from(self.addr.ip());
        let stream = connector.connect(name, tcp).await?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.addr))
            .header("content-type", "application/json");
        if !self.http2 {
            req = req.header("host", self.addr.to_string());
        }
        if let Some(k) = &self.key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let req = req.body(http_body_util::Full::new(bytes::Bytes::from(
            body.unwrap_or_default(),
        )))?;
        let resp = if self.http2 {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await?;
            let driver = tokio::spawn(conn);
            let r = send.send_request(req).await;
            drop(send);
            let r = r?;
            let (parts, body) = r.into_parts();
            let bytes = body.collect().await?.to_bytes();
            driver.abort();
            (parts, bytes)
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
            let driver = tokio::spawn(conn);
            let r = send.send_request(req).await?;
            let (parts, body) = r.into_parts();
            let bytes = body.collect().await?.to_bytes();
            driver.abort();
            (parts, bytes)
        };
        let (parts, bytes) = resp;
        Ok(HttpReply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            json: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        })
    }
}

/// A TCP server on `127.0.0.1:0` that reads each connection to EOF, then
/// answers with the SHA-256 of what it read (32 bytes) and closes: a
/// half-close and integrity check in one.
pub struct HashServer {
    /// Its address.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HashServer {
    /// Starts the server.
    pub async fn start() -> Result<Self> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    a = l.accept() => {
                        let Ok((mut s, _)) = a else { continue };
                        conns.spawn(async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                match s.read(&mut buf).await {
                                    Ok(0) => break,
                                    Ok(n) => ctx.update(&buf[..n]),
                                    Err(_) => return,
                                }
                            }
                            let _ = s.write_all(ctx.finish().as_ref()).await;
                            let _ = s.shutdown().await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for HashServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of `series` (a metric's name with its labels, as exposed:
/// `swb_relay_tun_packets_total{result="not_joined"}`) in Prometheus text
/// from a relay's or daemon's `metrics_text()`; `None` if it is not there.
pub fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(series)?.strip_prefix(' ')?;
        v.trim().parse().ok()
    })
}

/// Deterministic pseudo-random bytes for integrity tests.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// Sends `len` pseudo-random bytes (seeded) into `stream`, half-closes, and
/// returns (SHA-256 of what was sent, what came back).
pub async fn send_and_collect<S>(stream: S, seed: u64, len: u64) -> Result<(Vec<u8>, Vec<u8>)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            ctx.update(&buf[..n]);
            wr.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        wr.shutdown().await?;
        anyhow::Ok(ctx.finish().as_ref().to_vec())
    };
    let reader = async {
        let mut back = Vec::new();
        rd.read_to_end(&mut back).await?;
        anyhow::Ok(back)
    };
    let (sent, back) = tokio::join!(writer, reader);
    Ok((sent?, back?))
}

/// A tiny HTTP/1.x server on `127.0.0.1:0` answering every request with
/// `body` (for SOCKS clients such as curl and proxychains).
pub struct TinyHttp {
    /// Its address.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TinyHttp {
    /// Starts the server.
    pub async fn start(body: &'static str) -> Result<Self> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    a = l.accept() => {
                        let Ok((mut s, _)) = a else { continue };
                        conns.spawn(async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut req = Vec::new();
                            let mut buf = [0u8; 4096];
                            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                                match s.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => req.extend_from_slice(&buf[..n]),
                                }
                                if req.len() > 64 * 1024 {
                                    return;
                                }
                            }
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = s.write_all(resp.as_bytes()).await;
                            let _ = s.shutdown().await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for TinyHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// UDP to `relay` through a forwarder that can be cut, and TCP on the
/// same port number forwarded to the relay's HTTPS port (where a daemon
/// dialing the forwarder opens its TCP carrier).
pub async fn cuttable(relay: &TestRelay) -> Result<(UdpCut, tokio::task::JoinHandle<()>)> {
    let cut = UdpCut::start(relay.addr()).await?;
    let tcp = tokio::net::TcpListener::bind(cut.addr).await?;
    let https = relay.http_addr();
    let fwd = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut a, _)) = tcp.accept().await {
            conns.spawn(async move {
                if let Ok(mut b) = tokio::net::TcpStream::connect(https).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    });
    Ok((cut, fwd))
}

/// A UDP forwarder between one client and a relay that can be cut: after
/// [`UdpCut::cut`] every datagram is dropped both ways, as when a machine
/// loses power or its network. Daemons connect to [`UdpCut::addr`].
pub struct UdpCut {
    /// Where clients send.
    pub addr: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    /// Only the relay's answers are dropped.
    cut_back: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpCut {
    /// Starts forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Result<Self> {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        back.connect(target).await?;
        let addr = front.local_addr()?;
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = cut.clone();
        let cut_back = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let back_flag = cut_back.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut a = vec![0u8; 65536];
            let mut b = vec![0u8; 65536];
            loop {
                tokio::select! {
                    r = front.recv_from(&mut a) => {
                        let Ok((n, from)) = r else { continue };
                        client = Some(from);
                        if !flag.load(std::sync::atomic::Ordering::Relaxed) {
                            let _ = back.send(&a[..n]).await;
                        }
                    }
                    r = back.recv(&mut b) => {
                        let Ok(n) = r else { continue };
                        let dropped = flag.load(std::sync::atomic::Ordering::Relaxed)
                            || back_flag.load(std::sync::atomic::Ordering::Relaxed);
                        if let (Some(c), false) = (client, dropped) {
                            let _ = front.send_to(&b[..n], c).await;
                        }
                    }
                }
            }
        });
        Ok(Self {
            addr,
            cut,
            cut_back,
            task,
        })
    }

    /// Drops everything from now on.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Forwards again (both ways).
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::Relaxed);
        self.cut_back
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Drops only what the relay sends back (a one-way block).
    pub fn cut_answers(&self) {
        self.cut_back
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for UdpCut {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A mesh key made of one repeated character (different characters, different meshes).
pub fn mesh_key(c: char) -> swb_relay::mesh::MeshKey {
    swb_relay::mesh::MeshKey::new(&c.to_string().repeat(40)).expect("a 40-character key")
}

/// A relay with id `id` in the mesh of key `k`, dialing `peers` first.
pub async fn mesh_relay(
    id: &str,
    k: &swb_relay::mesh::MeshKey,
    peers: &[&TestRelay],
) -> Result<TestRelay> {
    mesh_relay_max(id, k, peers, swb_relay::mesh::FULL_MESH_MAX).await
}

/// [`mesh_relay`] with `--full-mesh-max full_mesh_max`.
pub async fn mesh_relay_max(
    id: &str,
    k: &swb_relay::mesh::MeshKey,
    peers: &[&TestRelay],
    full_mesh_max: usize,
) -> Result<TestRelay> {
    TestRelay::spawn_with(RelayOptions {
        relay_id: Some(id.into()),
        mesh: Some(swb_relay::mesh::MeshConfig {
            key: k.clone(),
            peers: peers.iter().map(|r| r.addr().to_string()).collect(),
            advertise: Vec::new(),
            full_mesh_max,
        }),
        ..RelayOptions::default()
    })
    .await
}

/// Waits until `r`'s live set is exactly `want`; returns how long it took.
pub async fn converge(r: &TestRelay, want: &[&str]) -> Result<Duration> {
    let t = std::time::Instant::now();
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    tokio::time::timeout(WAIT, r.handle().wait_live(|l| l == want.as_slice()))
        .await
        .with_context(|| {
            format!(
                "live set never became {want:?}; it is {:?}",
                r.handle().live_relays()
            )
        })?;
    Ok(t.elapsed())
}

/// Three converged relays `r1`, `r2`, `r3` (mesh key of `c`) sharing one
/// keys file content, and an API key of namespace `acme`.
pub async fn mesh3(c: char) -> Result<(Vec<TestRelay>, String)> {
    let k = mesh_key(c);
    let r1 = mesh_relay("r1", &k, &[]).await?;
    let r2 = mesh_relay("r2", &k, &[&r1]).await?;
    let r3 = mesh_relay("r3", &k, &[&r1]).await?;
    for r in [&r1, &r2, &r3] {
        converge(r, &["r1", "r2", "r3"]).await?;
    }
    let api = r1.create_key("acme")?;
    for r in [&r2, &r3] {
        std::fs::copy(r1.keys_path(), r.keys_path())?;
        r.handle().reload_keys()?;
    }
    Ok((vec![r1, r2, r3], api))
}

/// A name of namespace `ns` whose home among relays `ids` is `want`.
pub fn name_homed_on(ids: &[&str], ns: &str, want: &str) -> String {
    let ring = swb_ring::Ring::new(ids.iter().copied());
    (0..10_000)
        .map(|i| format!("peer{i}"))
        .find(|n| ring.home(ns, n) == Some(want))
        .expect("some name lands on every relay")
}

/// `GET /metrics` over plain HTTP/1.1; the body, after checking the status
/// line and the content type of the Prometheus text format.
pub async fn scrape(addr: SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await?;
    let mut raw = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut raw))
        .await
        .context("metrics endpoint did not answer")??;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .context("no end of headers in the metrics answer")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "metrics answer: {head}");
    anyhow::ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "metrics content type: {head}"
    );
    Ok(body.to_string())
}

/// Where `promtool` is: `$SWB_PROMTOOL`, else on `PATH`, else where
/// `./test` unpacks it (`target/test-tools`). Fails naming the
/// package when it is missing (`./test` unpacks it from Debian's
/// `prometheus` package).
pub fn promtool() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SWB_PROMTOOL") {
        let p = PathBuf::from(p);
        anyhow::ensure!(p.exists(), "SWB_PROMTOOL={} does not exist", p.display());
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join("promtool");
        if p.exists() {
            return Ok(p);
        }
    }
    let unpacked = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-tools/usr/bin/promtool");
    if unpacked.exists() {
        return Ok(unpacked);
    }
    bail!(
        "promtool is not installed: it comes with Debian's prometheus package \
         (./test unpacks it into target/test-tools; or apt-get install prometheus, or set SWB_PROMTOOL)"
    )
}

/// Lints `text` with `promtool check metrics` (the Prometheus project's own
/// parser); any problem it reports fails.
pub async fn promtool_check(text: &str) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(promtool()?)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().context("promtool stdin")?;
    stdin.write_all(text.as_bytes()).await?;
    drop(stdin);
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .context("promtool did not finish")??;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n--- text ---\n{text}"
    );
    Ok(())
}

/// The value of the sample `series` (name with labels, exactly as
/// written) in a metrics text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The path of `program`, from Debian's `package`; fails naming the
/// package when it is missing (`./test` installs it).
pub fn need_program(program: &str, package: &str) -> Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
        let p = std::path::Path::new(dir).join(program);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{program} is not installed: apt-get install {package} (./test does this)")
}

/// Reads lines until one contains `needle`; returns it. Fails when the
/// input ends first or after [`WAIT`].
pub async fn line_with<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
    needle: &str,
) -> Result<String> {
    tokio::time::timeout(WAIT, async {
        while let Some(l) = lines.next_line().await? {
            if l.contains(needle) {
                return Ok(l);
            }
        }
        bail!("output ended before a line with {needle:?}")
    })
    .await
    .with_context(|| format!("no line with {needle:?} in time"))?
}

/// A service manager's notification socket (`$NOTIFY_SOCKET`), to see what
/// a process under systemd `Type=notify` would report.
pub struct NotifySocket {
    sock: tokio::net::UnixDatagram,
    /// Its path: pass it as `NOTIFY_SOCKET`.
    pub path: PathBuf,
}

impl NotifySocket {
    /// Binds `notify.sock` in `dir`.
    pub fn bind(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join("notify.sock");
        let sock = tokio::net::UnixDatagram::bind(&path)?;
        Ok(Self { sock, path })
    }

    /// Reads notifications until one has the line `line` (like `READY=1`);
    /// returns that whole notification.
    pub async fn until(&self, line: &str) -> Result<String> {
        let mut buf = vec![0u8; 4096];
        tokio::time::timeout(WAIT, async {
            loop {
                let n = self.sock.recv(&mut buf).await?;
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == line) {
                    return anyhow::Ok(msg);
                }
            }
        })
        .await
        .with_context(|| format!("no {line} notification in time"))?
    }
}

/// A busy service: a listen backlog of `backlog`, and one connection at a
/// time — each read to EOF, answered with the SHA-256 of what it read, and
/// closed. Like a small single-threaded server under load.
pub struct BusyServer {
    /// Its address.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl BusyServer {
    /// Starts the server on `127.0.0.1:0`.
    pub fn start(backlog: i32) -> Result<Self> {
        use socket2::{Domain, Socket, Type};
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())?;
        sock.listen(backlog)?;
        sock.set_nonblocking(true)?;
        let l = tokio::net::TcpListener::from_std(sock.into())?;
        let addr = l.local_addr()?;
        let task = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = l.accept().await {
                let mut data = Vec::new();
                if s.read_to_end(&mut data).await.is_ok() {
                    let _ = s.write_all(&sha256(&data)).await;
                    let _ = s.shutdown().await;
                }
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for BusyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An ed25519 key pair at `path` (and `path.pub`), no passphrase.
pub async fn ssh_keygen(path: &std::path::Path) -> Result<()> {
    let out = tokio::process::Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "switchboard-test",
            "-f",
        ])
        .arg(path)
        .output()
        .await
        .context("cannot run ssh-keygen (openssh-client)")?;
    if !out.status.success() {
        bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Everything a test's own sshd needs in `dir`: a host key, a client key
/// (`dir/id_ed25519`) allowed in `dir/authorized_keys`, and `dir/sshd_config`
/// (key logins only, sftp, listening on `listen:22` when given); returns
/// the config's path.
pub async fn sshd_setup(dir: &std::path::Path, listen: Option<&str>) -> Result<PathBuf> {
    ssh_keygen(&dir.join("host_key")).await?;
    ssh_keygen(&dir.join("id_ed25519")).await?;
    std::fs::copy(dir.join("id_ed25519.pub"), dir.join("authorized_keys"))?;
    let sftp = [
        "/usr/lib/openssh/sftp-server",
        "/usr/libexec/openssh/sftp-server",
        "/usr/libexec/sftp-server",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .context("sftp-server not found (openssh-server)")?;
    let listen = listen
        .map(|a| format!("ListenAddress {a}:22\n"))
        .unwrap_or_default();
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "{listen}HostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nPidFile none\nUsePAM no\n\
             StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nSubsystem sftp {sftp}\nLogLevel ERROR\n",
            d = dir.display()
        ),
    )?;
    Ok(cfg)
}

/// OpenSSH client options for a test: the key and known hosts in `dir`,
/// strict host key checking, no agent or config, and `swbd --control
/// CONTROL connect %h %p` (with the `swbd` program at `swbd`) as the
/// ProxyCommand.
pub fn ssh_args(dir: &std::path::Path, control: &std::path::Path, swbd: &str) -> Vec<String> {
    vec![
        "-F".into(),
        "/dev/null".into(),
        "-i".into(),
        dir.join("id_ed25519").display().to_string(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        format!("UserKnownHostsFile={}", dir.join("known_hosts").display()),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        format!(
            "ProxyCommand={swbd} --control {} connect %h %p",
            control.display()
        ),
    ]
}

/// A bare quinn server endpoint with a fresh self-signed certificate and a
/// client endpoint that trusts it (`localhost`), both on 127.0.0.1:0,
/// speaking `alpn`; `transport` for both, if given. For tests of the
/// vendored quinn itself.
pub fn quinn_pair(
    alpn: &[u8],
    transport: Option<Arc<quinn::TransportConfig>>,
) -> Result<(quinn::Endpoint, quinn::Endpoint)> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));
    if let Some(t) = &transport {
        server.transport_config(t.clone());
    }
    let server = quinn::Endpoint::server(server, "127.0.0.1:0".parse()?)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let mut config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    if let Some(t) = transport {
        config.transport_config(t);
    }
    client.set_default_client_config(config);
    Ok((server, client))
}
