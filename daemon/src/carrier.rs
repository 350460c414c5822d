//! The daemon's end of the TCP carrier (see [`swb_quic::carrier`]): on a
//! network that drops UDP, the QUIC packets to a relay travel inside a TLS
//! connection to the relay's HTTPS port instead — the same QUIC connection,
//! its streams and datagrams unchanged.
//!
//! [`ClientSocket`] is the endpoint's socket: UDP plus one carrier per relay
//! address, chosen per packet by [`Paths`]. With `--transport auto` (the
//! default) a relay is tried over UDP first; when UDP has not answered
//! within [`HEAD_START`] (or, once it worked, for [`FALLBACK`]) a carrier
//! is opened and packets move to it. While on the carrier, a copy of a
//! packet goes over UDP now and then ([`PROBE_MIN`], doubling to
//! [`PROBE_MAX`]); when UDP answers, packets move back. To quinn the relay
//! keeps one address; to the relay each move is a QUIC path migration.
//!
//! The carrier honours `HTTPS_PROXY` / `https_proxy` (an `http://` proxy,
//! `CONNECT`, optional `user:password@`) and `NO_PROXY`.

use bytes::Bytes;
use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use swb_quic::carrier::{self, Inbound};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, info};

/// How long UDP has to answer a relay before a carrier is opened.
pub const HEAD_START: Duration = Duration::from_millis(300);
/// How long UDP that worked may go unanswered before packets move to a
/// carrier (the keep-alive draws an answer every 2 s).
pub const FALLBACK: Duration = Duration::from_secs(3);
/// First gap between UDP probes while on a carrier; doubles while UDP
/// stays silent, up to [`PROBE_MAX`].
pub const PROBE_MIN: Duration = Duration::from_secs(1);
/// Longest gap between UDP probes: back on UDP within this of its return.
/// (A probe that reaches the relay when its answers cannot come back costs
/// a short stall while the relay's path check fails: hence the backoff.)
pub const PROBE_MAX: Duration = Duration::from_secs(8);
/// How long a handshake that moved to the carrier may take there before
/// the daemon starts it over on the carrier — unless UDP answered since it
/// began (then it is only slow, and goes on).
pub const HANDSHAKE_GRACE: Duration = Duration::from_secs(1);
/// A carrier that reads nothing this long is closed (the relay closes
/// idle ones after a minute too; the keep-alive keeps a used one busy).
const CARRIER_IDLE: Duration = Duration::from_secs(60);
/// Pause before a failed carrier is tried again.
const CARRIER_RETRY: Duration = Duration::from_secs(1);
/// How long a session gone silent on UDP waits for the carrier before it
/// asks another relay (see [`Paths::hold_probe`]).
pub const CARRIER_GRACE: Duration = Duration::from_secs(5);
/// Time a carrier has to connect (TCP, proxy, TLS, upgrade).
const CARRIER_SETUP: Duration = Duration::from_secs(10);
/// Largest HTTP head read from a proxy or the relay.
const MAX_HEAD: usize = 8 * 1024;

/// Which way QUIC packets travel to relays (`--transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// UDP only.
    Udp,
    /// The TCP carrier only.
    Tcp,
    /// UDP, with the carrier when UDP does not answer.
    #[default]
    Auto,
}

impl Transport {
    /// `udp`, `tcp` or `auto`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "udp" => Some(Self::Udp),
            "tcp" => Some(Self::Tcp),
            "auto" => Some(Self::Auto),
            _ => None,
        }
    }

    /// The name `parse` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Auto => "auto",
        }
    }
}

/// How a carrier to one relay address verifies it.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) server_name: String,
}

/// One relay address's carrier state.
#[derive(Default)]
struct PathState {
    target: Option<Target>,
    /// The carrier, while it is up.
    tx: Option<carrier::Outbound>,
    connecting: bool,
    last_attempt: Option<Instant>,
    /// Last UDP packet from this relay.
    udp_heard: Option<Instant>,
    /// First UDP packet sent since UDP last answered.
    udp_unanswered: Option<Instant>,
    /// Packets go over the carrier now.
    on_tcp: bool,
    /// Since when.
    switched_at: Option<Instant>,
    /// Take the carrier as soon as it is up (the session went silent).
    want_tcp: bool,
    /// The last packets sent over UDP while it went unanswered: sent again
    /// over the carrier when packets move to it, so the relay hears the
    /// newest at once instead of after QUIC's next (backed-off) probe.
    recent: std::collections::VecDeque<Bytes>,
    next_probe: Option<Instant>,
    probe_gap: Duration,
    /// Handshakes in flight that began on the carrier: they finish there
    /// (see [`Paths::handshake`]).
    carrier_handshakes: usize,
}

/// Packets kept per relay for a move to the carrier.
const RECENT: usize = 4;
/// How long UDP goes unanswered before sent packets are kept for a move.
const KEEP_AFTER: Duration = Duration::from_millis(100);
/// How often pending moves are checked (between sends, which QUIC backs
/// off while nothing answers).
const TICK: Duration = Duration::from_millis(100);

enum Choice {
    Udp,
    /// UDP, and keep a copy (UDP is going unanswered).
    UdpKeep,
    Tcp(carrier::Outbound),
    /// Over UDP only, as a probe: the relay gets it on no other path, so
    /// if UDP is back it is the newest packet there and the relay moves the
    /// connection to UDP (a copy over the carrier too might arrive first
    /// and make the UDP one a duplicate it ignores).
    Probe,
    Drop,
}

/// A transmit this small is taken as the probe: an acknowledgement or a
/// keep-alive (a short header, a few frames, the AEAD tag), whose loss
/// while UDP is still blocked costs nearly nothing — never a TUN packet or
/// stream data, which are larger.
const PROBE_SMALL: usize = 64;

/// Carrier state of every relay address, shared by the endpoints' sockets.
pub(crate) struct Paths {
    transport: Transport,
    /// Bumped whenever packets to some relay move to the carrier or back.
    moves: tokio::sync::watch::Sender<u64>,
    /// Carrier tasks: tracked with the daemon's, ended when it stops.
    tasks: tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
    inbound: Inbound,
    state: Mutex<HashMap<SocketAddr, PathState>>,
    proxy: Option<Proxy>,
    no_proxy: Vec<String>,
}

impl std::fmt::Debug for Paths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paths")
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl Paths {
    pub(crate) fn new(
        transport: Transport,
        tasks: tokio_util::task::TaskTracker,
        stop: tokio_util::sync::CancellationToken,
    ) -> Arc<Self> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let proxy = env("HTTPS_PROXY")
            .or_else(|| env("https_proxy"))
            .and_then(|p| Proxy::parse(&p));
        let no_proxy = env("NO_PROXY")
            .or_else(|| env("no_proxy"))
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default();
        let paths = Arc::new(Self {
            transport,
            moves: tokio::sync::watch::Sender::new(0),
            tasks,
            stop,
            inbound: Inbound::default(),
            state: Mutex::new(HashMap::new()),
            proxy,
            no_proxy,
        });
        if transport == Transport::Auto {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(paths.tasks.track_future(paths.clone().tick()));
            }
        }
        paths
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, PathState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How a carrier to `addr` would verify the relay (before dialing it).
    pub(crate) fn prepare(&self, addr: SocketAddr, target: Target) {
        self.state().entry(addr).or_default().target = Some(target);
    }

    /// A handshake to `addr` begins now. One that begins on the carrier
    /// stays on it until the returned guard is dropped: the relay answers
    /// a handshake only where it began (QUIC migrates only established
    /// connections, and a Retry token is good only from the address it
    /// went to), so a UDP packet heard meanwhile — a late answer to an
    /// attempt given up, or to an established connection's probe — must
    /// not move it.
    pub(crate) fn handshake(self: &Arc<Self>, addr: SocketAddr) -> Handshake {
        let mut all = self.state();
        let st = all.entry(addr).or_default();
        let on_carrier = self.transport == Transport::Auto && st.on_tcp;
        if on_carrier {
            st.carrier_handshakes += 1;
        }
        Handshake {
            paths: self.clone(),
            addr,
            on_carrier,
            began: Instant::now(),
        }
    }

    /// Resolves when packets to `addr` move to the carrier (never, unless
    /// they do after this call).
    pub(crate) async fn moved_to_tcp(&self, addr: SocketAddr) {
        let mut rx = self.moves.subscribe();
        while rx.changed().await.is_ok() {
            if self.state().get(&addr).is_some_and(|s| s.on_tcp) {
                return;
            }
        }
        std::future::pending::<()>().await;
    }

    /// Keeps `conn`'s path MTU in step with how its packets to `addr`
    /// travel: discovered up to [`carrier::CARRIER_MTU`] while they take the
    /// carrier (a stream carries large packets: fewer to encrypt, frame and
    /// acknowledge), the UDP link's bound while they take UDP
    /// ([`carrier::path_mtu_bound`]; falling back at once when they return
    /// to it). To quinn the relay's address is the
    /// same either way, so it cannot tell by itself. Ends when the
    /// connection closes or the daemon stops.
    pub(crate) fn follow(self: &Arc<Self>, conn: quinn::Connection, addr: SocketAddr) {
        if self.transport == Transport::Udp {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (paths, stop) = (self.clone(), self.stop.clone());
        // Subscribed before the first look: no move is missed.
        let mut moves = self.moves.subscribe();
        let run = async move {
            let mut on_tcp = false;
            loop {
                let now_tcp = paths.carrier(addr) == "tcp";
                if now_tcp != on_tcp {
                    on_tcp = now_tcp;
                    if on_tcp {
                        conn.set_path_mtu_upper_bound(Some(carrier::CARRIER_MTU));
                    } else {
                        // What the carrier took says nothing about UDP
                        // (a loopback or jumbo-frame link may take as
                        // much, or not): discovery starts over from
                        // QUIC's minimum, within the link's bound.
                        conn.restart_path_mtu_discovery(carrier::path_mtu_bound(addr));
                    }
                    debug!(relay = %addr, on_tcp, "path MTU bound follows the carrier");
                }
                tokio::select! {
                    r = moves.changed() => if r.is_err() { return },
                    _ = conn.closed() => return,
                }
            }
        };
        rt.spawn(self.tasks.track_future(async move {
            tokio::select! {
                _ = run => {}
                _ = stop.cancelled() => {}
            }
        }));
    }

    /// `udp` or `tcp`: how packets to `addr` travel now.
    pub(crate) fn carrier(&self, addr: SocketAddr) -> &'static str {
        let on_tcp = self.state().get(&addr).is_some_and(|s| s.on_tcp);
        if on_tcp || self.transport == Transport::Tcp {
            "tcp"
        } else {
            "udp"
        }
    }

    /// How the packet of `size` bytes to `dest` travels; `long_header`: a
    /// handshake's packet (QUIC long header), never a probe — the relay
    /// takes a handshake only on the path it began on.
    fn choose(
        self: &Arc<Self>,
        dest: SocketAddr,
        now: Instant,
        size: usize,
        long_header: bool,
    ) -> Choice {
        if self.transport == Transport::Udp {
            return Choice::Udp;
        }
        let mut all = self.state();
        let st = all.entry(dest).or_default();
        if self.transport == Transport::Tcp {
            st.on_tcp = true;
            return match &st.tx {
                Some(tx) => Choice::Tcp(tx.clone()),
                None => {
                    self.start(dest, st, now);
                    Choice::Drop
                }
            };
        }
        let since = *st.udp_unanswered.get_or_insert(now);
        if !st.on_tcp {
            if !self.due(dest, st, now) {
                return if now.saturating_duration_since(since) >= KEEP_AFTER {
                    Choice::UdpKeep
                } else {
                    Choice::Udp
                };
            }
            if st.tx.is_none() {
                // Keep trying UDP until the carrier is up.
                return Choice::UdpKeep;
            }
        }
        match st.tx.clone() {
            None => {
                st.on_tcp = false;
                self.start(dest, st, now);
                Choice::Udp
            }
            Some(tx) => match st.next_probe {
                // Due: a small packet, or any once overdue by a gap.
                Some(t)
                    if now >= t
                        && !long_header
                        && (size <= PROBE_SMALL
                            || now.saturating_duration_since(t) >= st.probe_gap) =>
                {
                    st.probe_gap = (st.probe_gap * 2).min(PROBE_MAX);
                    st.next_probe = Some(now + st.probe_gap);
                    Choice::Probe
                }
                _ => Choice::Tcp(tx),
            },
        }
    }

    /// Whether packets to `dest` (on UDP now) should move to the carrier:
    /// UDP unanswered past its limit, or the session went silent. Opens the
    /// carrier if it is not up; moves (sending the kept packets over it)
    /// if it is.
    fn due(self: &Arc<Self>, dest: SocketAddr, st: &mut PathState, now: Instant) -> bool {
        let limit = if st.udp_heard.is_some() {
            FALLBACK
        } else {
            HEAD_START
        };
        let late = st
            .udp_unanswered
            .is_some_and(|t| now.saturating_duration_since(t) >= limit);
        if !late && !st.want_tcp {
            return false;
        }
        match st.tx.clone() {
            None => self.start(dest, st, now),
            Some(tx) => {
                st.on_tcp = true;
                st.want_tcp = false;
                st.switched_at = Some(now);
                st.probe_gap = PROBE_MIN;
                st.next_probe = Some(now + PROBE_MIN);
                for p in st.recent.drain(..) {
                    tx.try_send(p);
                }
                self.moves.send_modify(|n| *n += 1);
                info!(relay = %dest, "UDP is not answering: packets take the TCP carrier");
            }
        }
        true
    }

    /// Keeps a copy of packets sent over UDP (framed) while UDP goes
    /// unanswered.
    fn keep(&self, dest: SocketAddr, framed: Bytes) {
        let mut all = self.state();
        let Some(st) = all.get_mut(&dest) else { return };
        if st.recent.len() == RECENT {
            st.recent.pop_front();
        }
        st.recent.push_back(framed);
    }

    /// Moves that came due between sends (QUIC backs off its sends while
    /// nothing answers): every [`TICK`] until the daemon stops.
    async fn tick(self: Arc<Self>) {
        let mut t = tokio::time::interval(TICK);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = t.tick() => {}
            }
            let now = Instant::now();
            let mut all = self.state();
            for (dest, st) in all.iter_mut() {
                if !st.on_tcp {
                    self.due(*dest, st, now);
                }
            }
        }
    }

    /// The session to `addr` went silent: whether to hold off asking
    /// another relay because the carrier is being tried — opening it now
    /// if it was not (and taking it once up), for up to [`CARRIER_GRACE`]
    /// after the switch.
    pub(crate) fn hold_probe(self: &Arc<Self>, addr: SocketAddr, now: Instant) -> bool {
        if self.transport == Transport::Udp {
            return false;
        }
        let mut all = self.state();
        let st = all.entry(addr).or_default();
        if st.connecting {
            return true;
        }
        if st.on_tcp {
            return st
                .switched_at
                .is_some_and(|t| now.saturating_duration_since(t) < CARRIER_GRACE);
        }
        if st.want_tcp
            && st
                .last_attempt
                .is_some_and(|t| now.saturating_duration_since(t) < CARRIER_GRACE)
        {
            // Asked already; the carrier failed or is not used yet.
            return st.tx.is_some();
        }
        st.want_tcp = true;
        self.due(addr, st, now);
        st.connecting || st.on_tcp
    }

    /// UDP packets arrived from `from`.
    fn heard_udp(&self, from: impl Iterator<Item = SocketAddr>, now: Instant) {
        if self.transport == Transport::Udp {
            return;
        }
        let mut all = self.state();
        for a in from {
            let Some(st) = all.get_mut(&a) else { continue };
            st.udp_heard = Some(now);
            st.udp_unanswered = None;
            st.recent.clear();
            st.want_tcp = false;
            if st.on_tcp && self.transport == Transport::Auto {
                if st.carrier_handshakes > 0 {
                    debug!(relay = %a, "UDP answers; a handshake that began on the carrier finishes there");
                    continue;
                }
                st.on_tcp = false;
                self.moves.send_modify(|n| *n += 1);
                info!(relay = %a, "UDP answers again: packets take UDP");
            }
        }
    }

    /// Opens a carrier to `dest` unless one is being opened or failed
    /// within [`CARRIER_RETRY`].
    fn start(self: &Arc<Self>, dest: SocketAddr, st: &mut PathState, now: Instant) {
        if st.connecting
            || st
                .last_attempt
                .is_some_and(|t| now.saturating_duration_since(t) < CARRIER_RETRY)
        {
            return;
        }
        let Some(target) = st.target.clone() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.stop.is_cancelled() {
            return;
        }
        st.connecting = true;
        st.last_attempt = Some(now);
        let paths = self.clone();
        let stop = self.stop.clone();
        let run = async move {
            let proxy = paths
                .proxy
                .as_ref()
                .filter(|_| !no_proxy(&paths.no_proxy, dest));
            let setup = tokio::time::timeout(CARRIER_SETUP, open(dest, &target, proxy)).await;
            let stream = match setup {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(relay = %dest, "TCP carrier failed: {e}");
                    paths.finish(dest, None);
                    return;
                }
                Err(_) => {
                    debug!(relay = %dest, "TCP carrier timed out");
                    paths.finish(dest, None);
                    return;
                }
            };
            let (tx, mut rx) = carrier::outbound();
            paths.finish(dest, Some(tx.clone()));
            debug!(relay = %dest, via_proxy = proxy.is_some(), "TCP carrier up");
            let end =
                carrier::pump(stream, &mut rx, paths.inbound.sender(), dest, CARRIER_IDLE).await;
            debug!(relay = %dest, ?end, "TCP carrier ended");
            let mut all = paths.state();
            if let Some(st) = all.get_mut(&dest) {
                if st.tx.as_ref().is_some_and(|t| t.same_channel(&tx)) {
                    st.tx = None;
                }
            }
            debug!(relay = %dest, "TCP carrier down");
        };
        rt.spawn(self.tasks.track_future(async move {
            tokio::select! {
                _ = run => {}
                _ = stop.cancelled() => {}
            }
        }));
    }

    fn finish(self: &Arc<Self>, dest: SocketAddr, tx: Option<carrier::Outbound>) {
        let mut all = self.state();
        let st = all.entry(dest).or_default();
        st.connecting = false;
        if tx.is_some() {
            st.tx = tx;
            // Moves now if it was waiting for the carrier.
            if !st.on_tcp && self.transport == Transport::Auto {
                self.due(dest, st, Instant::now());
            }
        }
    }
}

/// A handshake in flight to one relay address (see [`Paths::handshake`]).
pub(crate) struct Handshake {
    paths: Arc<Paths>,
    addr: SocketAddr,
    on_carrier: bool,
    began: Instant,
}

impl Handshake {
    /// Whether it began on the carrier (and stays there).
    pub(crate) fn on_carrier(&self) -> bool {
        self.on_carrier
    }

    /// Whether any UDP packet came from the relay since it began: UDP is
    /// not blocked, so a handshake that moved to the carrier is only slow
    /// (a relay busy with a reconnect storm), not lost.
    pub(crate) fn udp_heard(&self) -> bool {
        self.paths
            .state()
            .get(&self.addr)
            .and_then(|s| s.udp_heard)
            .is_some_and(|t| t >= self.began)
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        if !self.on_carrier {
            return;
        }
        if let Some(st) = self.paths.state().get_mut(&self.addr) {
            st.carrier_handshakes = st.carrier_handshakes.saturating_sub(1);
        }
    }
}

/// Whether `NO_PROXY` exempts `dest`.
fn no_proxy(list: &[String], dest: SocketAddr) -> bool {
    let ip = dest.ip().to_string();
    list.iter().any(|e| e == "*" || *e == ip)
}

/// An `http://` proxy from `HTTPS_PROXY`.
#[derive(Debug, Clone)]
struct Proxy {
    host_port: String,
    /// `Proxy-Authorization: Basic …` value, from `user:password@`.
    auth: Option<String>,
}

impl Proxy {
    fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let rest = match s.split_once("://") {
            Some(("http", r)) => r,
            Some(_) => return None,
            None => s,
        };
        let rest = rest.trim_end_matches('/');
        let (auth, hp) = match rest.rsplit_once('@') {
            Some((u, hp)) => (Some(base64(u.as_bytes())), hp),
            None => (None, rest),
        };
        if hp.is_empty() {
            return None;
        }
        let host_port = if hp
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            hp.to_string()
        } else {
            format!("{hp}:80")
        };
        Some(Self { host_port, auth })
    }
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(char::from(A[(n >> shift & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Reads an HTTP response head (to the blank line), byte by byte so
/// nothing after it is consumed; its status code.
async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<u16> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(io::Error::other("HTTP head too long"));
        }
        let mut b = [0u8; 1];
        if r.read(&mut b).await? == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        head.push(b[0]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad HTTP status line {:?}", line.trim())))
}

type Carried = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Opens a carrier: TCP (through the proxy if any), TLS verified like the
/// QUIC connection, the upgrade.
async fn open(dest: SocketAddr, target: &Target, proxy: Option<&Proxy>) -> io::Result<Carried> {
    let tcp = match proxy {
        None => tokio::net::TcpStream::connect(dest).await?,
        Some(p) => {
            let mut s = tokio::net::TcpStream::connect(&p.host_port).await?;
            let mut req = format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n");
            if let Some(a) = &p.auth {
                req.push_str(&format!("Proxy-Authorization: Basic {a}\r\n"));
            }
            req.push_str("\r\n");
            s.write_all(req.as_bytes()).await?;
            match read_head(&mut s).await? {
                200..=299 => s,
                code => return Err(io::Error::other(format!("proxy answered {code}"))),
            }
        }
    };
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(target.server_name.clone())
        .map_err(|e| io::Error::other(format!("server name: {e}")))?;
    let mut tls = tokio_rustls::TlsConnector::from(target.tls.clone())
        .connect(name, tcp)
        .await?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: {}\r\n\r\n",
        carrier::PATH,
        target.server_name,
        carrier::PROTOCOL
    );
    tls.write_all(req.as_bytes()).await?;
    match read_head(&mut tls).await? {
        101 => Ok(tls),
        code => Err(io::Error::other(format!(
            "the relay answered {code} to the upgrade"
        ))),
    }
}

/// An endpoint's socket: UDP and the carriers of [`Paths`] (their packets
/// handed to the endpoint as read, without a copy).
pub(crate) struct ClientSocket {
    udp: Arc<dyn quinn::AsyncUdpSocket>,
    paths: Arc<Paths>,
}

impl std::fmt::Debug for ClientSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSocket").finish_non_exhaustive()
    }
}

impl ClientSocket {
    pub(crate) fn new(udp: Arc<dyn quinn::AsyncUdpSocket>, paths: Arc<Paths>) -> Self {
        Self { udp, paths }
    }
}

impl quinn::AsyncUdpSocket for ClientSocket {
    swb_quic::pass_through_socket!(udp);

    fn try_send(&self, t: &quinn::udp::Transmit) -> io::Result<()> {
        // A full carrier loses the packets, as a full UDP socket would.
        let to_tcp = |tx: &carrier::Outbound| {
            tx.try_send(carrier::frame(t));
        };
        let long_header = t.contents.first().is_some_and(|b| b & 0x80 != 0);
        match self
            .paths
            .choose(t.destination, Instant::now(), t.contents.len(), long_header)
        {
            Choice::Udp => self.udp.try_send(t),
            Choice::UdpKeep => {
                self.paths.keep(t.destination, carrier::frame(t));
                self.udp.try_send(t)
            }
            Choice::Tcp(tx) => {
                to_tcp(&tx);
                Ok(())
            }
            Choice::Probe => {
                let _ = self.udp.try_send(t);
                Ok(())
            }
            Choice::Drop => Ok(()),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let read = self.udp.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = read {
            let heard = meta[..n.min(meta.len())].iter().map(|m| m.addr);
            self.paths.heard_udp(heard, Instant::now());
        }
        read
    }

    /// What the carriers read, handed over as read (no copy).
    fn poll_recv_owned(
        &self,
        cx: &mut Context,
        out: &mut Vec<(SocketAddr, bytes::BytesMut)>,
        max: usize,
    ) -> Poll<()> {
        self.paths.inbound.poll_owned(cx, out, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_parse_from_the_environment_forms() {
        let p = Proxy::parse("http://proxy.example:3128/").expect("parses");
        assert_eq!((p.host_port.as_str(), p.auth), ("proxy.example:3128", None));
        let p = Proxy::parse("10.0.0.1:8080").expect("parses");
        assert_eq!(p.host_port, "10.0.0.1:8080");
        let p = Proxy::parse("http://user:pass@proxy").expect("parses");
        assert_eq!(p.host_port, "proxy:80");
        assert_eq!(p.auth.as_deref(), Some("dXNlcjpwYXNz"));
        assert!(Proxy::parse("socks5://proxy:1080").is_none());
        assert!(Proxy::parse("http://").is_none());
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
        let d: SocketAddr = "192.0.2.7:443".parse().expect("addr");
        assert!(no_proxy(&["192.0.2.7".into()], d));
        assert!(no_proxy(&["*".into()], d));
        assert!(!no_proxy(&["example.com".into()], d));
    }

    #[tokio::test]
    async fn auto_gives_udp_a_head_start_then_takes_the_carrier_and_probes_udp() {
        let paths = Paths::new(Transport::Auto, Default::default(), Default::default());
        let d: SocketAddr = "192.0.2.1:7443".parse().expect("addr");
        let t0 = Instant::now();
        let udp = |c: Choice| matches!(c, Choice::Udp | Choice::UdpKeep);
        assert!(udp(paths.choose(d, t0, 1200, false)));
        assert!(udp(paths.choose(d, t0 + HEAD_START / 2, 1200, false)));
        // Past the head start with a carrier up: the carrier.
        let (tx, _rx) = carrier::outbound();
        paths.finish(d, Some(tx));
        let t = t0 + HEAD_START;
        assert!(matches!(paths.choose(d, t, 40, false), Choice::Tcp(_)));
        assert_eq!(paths.carrier(d), "tcp");
        // A probe over UDP after PROBE_MIN: the next small packet, not a
        // large one (unless overdue by a gap); then a doubled gap.
        assert!(matches!(
            paths.choose(d, t + PROBE_MIN, 1200, false),
            Choice::Tcp(_)
        ));
        assert!(matches!(
            paths.choose(d, t + PROBE_MIN, 40, false),
            Choice::Probe
        ));
        assert!(matches!(
            paths.choose(d, t + PROBE_MIN + PROBE_MIN, 40, false),
            Choice::Tcp(_)
        ));
        assert!(matches!(
            paths.choose(d, t + PROBE_MIN * 3, 40, false),
            Choice::Probe
        ));
        // Overdue by a whole gap: a large packet probes too.
        assert!(matches!(
            paths.choose(d, t + PROBE_MIN * 3 + PROBE_MIN * 4 * 2, 1200, false),
            Choice::Probe
        ));
        // UDP answers: back on UDP, which then has FALLBACK to fail.
        let t = t + PROBE_MIN * 11;
        paths.heard_udp([d].into_iter(), t);
        assert_eq!(paths.carrier(d), "udp");
        assert!(udp(paths.choose(d, t, 1200, false)));
        assert!(matches!(
            paths.choose(d, t + FALLBACK / 2, 1200, false),
            Choice::UdpKeep
        ));
        assert!(matches!(
            paths.choose(d, t + FALLBACK, 1200, false),
            Choice::Tcp(_)
        ));
        // UDP only: never the carrier.
        let only = Paths::new(Transport::Udp, Default::default(), Default::default());
        assert!(matches!(
            only.choose(d, t + FALLBACK * 10, 1200, false),
            Choice::Udp
        ));
    }

    #[tokio::test]
    async fn a_handshake_that_began_on_the_carrier_finishes_there() {
        let paths = Paths::new(Transport::Auto, Default::default(), Default::default());
        let d: SocketAddr = "192.0.2.2:7443".parse().expect("addr");
        let t0 = Instant::now();
        let (tx, _rx) = carrier::outbound();
        paths.finish(d, Some(tx));
        paths.choose(d, t0, 1200, true);
        let t = t0 + HEAD_START;
        assert!(matches!(paths.choose(d, t, 1200, true), Choice::Tcp(_)));
        // A handshake begins on the carrier.
        let hs = paths.handshake(d);
        assert!(hs.on_carrier());
        assert!(!hs.udp_heard());
        // Its packets (long headers) never probe UDP, however overdue.
        let late = t + PROBE_MAX * 4;
        assert!(matches!(paths.choose(d, late, 1200, true), Choice::Tcp(_)));
        // A UDP packet (a late answer to an attempt given up) does not
        // move it; it is noted.
        paths.heard_udp([d].into_iter(), late);
        assert_eq!(paths.carrier(d), "tcp");
        assert!(hs.udp_heard());
        // Once it is over, UDP answers move packets back.
        drop(hs);
        let later = late + PROBE_MIN;
        assert!(matches!(paths.choose(d, later, 40, false), Choice::Probe));
        paths.heard_udp([d].into_iter(), later);
        assert_eq!(paths.carrier(d), "udp");
        // One that begins on UDP is not held there: a handshake that goes
        // unanswered moves to the carrier as before.
        let hs = paths.handshake(d);
        assert!(!hs.on_carrier());
    }
}
