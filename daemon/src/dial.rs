//! Dialing a relay: UDP endpoints (one per address family, reused across
//! reconnects), TLS trust (the configured one, or pinned per relay from the
//! relay map in dev meshes), QUIC, the preamble and `Hello`, and what the
//! relay answers: `Welcome`, `Redirect` or `Refused`.

use crate::session::is_fatal;
use crate::tls::VerifyNote;
use crate::{DaemonConfig, DaemonError};
use bytes::BytesMut;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use swb_wire::{
    Code, Frame, FrameReader, Hello, Preamble, Refusal, RelayRecord, Welcome, PROTOCOL_VERSION,
};
use tokio::io::AsyncReadExt;

/// Streams the relay may open to us at once: peers connecting to exposed
/// ports (and pings).
const INBOUND_STREAMS: u32 = 1024;
/// Ack-eliciting packets the relay may receive from this daemon before it
/// must acknowledge (QUIC ACK frequency extension; quinn's default without
/// it: 1, so every second one), as the relay asks of daemons. Otherwise
/// its acknowledgement rides its next packet — the answer to a send, as a
/// rule — or waits its ACK delay (25 ms); out-of-order packets are still
/// acknowledged at once. One message at a time the relay sent a packet with
/// only an acknowledgement for each message, before the answer (`strace`
/// of `swbd-bench latency`: 331, 36 and 42 bytes per message to a daemon,
/// then 331 and 52).
const RELAY_ACK_THRESHOLD: u32 = 8;
/// Room kept free in the read buffer before each read.
const READ_ROOM: usize = 4096;
/// How much the read buffer grows when it is short of room.
const READ_GROW: usize = 16 * 1024;

/// Why an attempt to reach a relay did not end registered.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// Try again later (the reason, for the log and `swbd status`).
    Retry(String),
    /// The relay had too many handshakes at once and asked for a retry
    /// within this long (`swb_wire::busy`).
    Busy(String, std::time::Duration),
    /// This relay is not our home: go to that one.
    Redirect(RelayRecord),
    /// Stop the daemon.
    Fatal(DaemonError),
}

/// Why the control stream to the relay failed, in words for the log and
/// `swbd status`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    /// The connection or the stream ended.
    #[error("{0}")]
    Lost(String),
    /// The relay sent something that is not a frame.
    #[error("relay sent bad data: {0}")]
    BadData(#[from] swb_wire::DecodeError),
    /// A frame could not be encoded.
    #[error("cannot encode a frame: {0}")]
    Encode(#[from] swb_wire::EncodeError),
}

/// An established control stream to a relay.
pub(crate) struct Link {
    pub(crate) conn: quinn::Connection,
    /// Taken by the connection actor when it serves the link.
    send: Option<quinn::SendStream>,
    recv: quinn::RecvStream,
    pub(crate) reader: FrameReader,
    pub(crate) addr: SocketAddr,
}

impl Link {
    /// One read into the frame buffer. Cancel-safe.
    pub(crate) async fn read_some(&mut self) -> Result<(), LinkError> {
        let buf = self.reader.buf();
        if buf.capacity() - buf.len() < READ_ROOM {
            buf.reserve(READ_GROW);
        }
        match self.recv.read_buf(buf).await {
            Ok(0) => Err(self.lost("the relay closed the control stream")),
            Ok(_) => Ok(()),
            Err(e) => Err(self.lost(&e.to_string())),
        }
    }

    /// Why the connection ended (the connection's own reason if it has
    /// one, else `fallback`).
    pub(crate) fn lost(&self, fallback: &str) -> LinkError {
        LinkError::Lost(match self.conn.close_reason() {
            Some(quinn::ConnectionError::TimedOut) => {
                "the relay stopped answering (idle timeout)".into()
            }
            Some(e) => e.to_string(),
            None => fallback.to_string(),
        })
    }

    async fn next_frame(&mut self) -> Result<Frame, LinkError> {
        loop {
            match self.reader.next_frame()? {
                Some(f) => return Ok(f),
                None => self.read_some().await?,
            }
        }
    }

    /// The control stream's write side (once).
    pub(crate) fn take_send(&mut self) -> Option<quinn::SendStream> {
        self.send.take()
    }
}

/// Whether a connection error is a TLS failure (a TLS alert travels as a
/// QUIC CRYPTO_ERROR, transport codes 0x100–0x1ff).
fn is_tls_failure(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::TransportError(t) => (0x100..0x200).contains(&u64::from(t.code)),
        _ => false,
    }
}

/// What dials relays for one daemon. A clone shares the UDP endpoints (a
/// probe dials on the same socket as the session it may replace).
#[derive(Clone)]
pub(crate) struct Dialer {
    config: DaemonConfig,
    client_cfg: quinn::ClientConfig,
    note: VerifyNote,
    endpoints: (Option<quinn::Endpoint>, Option<quinn::Endpoint>),
    /// Client configs pinned to relays' own certificates (dev meshes).
    pinned: HashMap<String, quinn::ClientConfig>,
    /// UDP or the TCP carrier, per relay address.
    paths: Arc<crate::carrier::Paths>,
    /// TLS for TCP carriers, by the fingerprint pinned (`None`: the
    /// configured trust).
    carrier_tls: HashMap<Option<String>, Arc<rustls::ClientConfig>>,
    /// This daemon's instance (`Hello::instance`), the same on every
    /// connection it makes, probes included.
    instance: u64,
}

/// A random instance number for a daemon's `Hello`s.
fn new_instance() -> Result<u64, DaemonError> {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| DaemonError::Config("no randomness for the daemon's instance".into()))?;
    Ok(u64::from_le_bytes(b))
}

/// The QUIC client configuration on top of `tls`.
pub(crate) fn quic_client_config(
    config: &DaemonConfig,
    tls: rustls::ClientConfig,
) -> Result<quinn::ClientConfig, DaemonError> {
    let qcfg = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| DaemonError::Config(format!("TLS configuration: {e}")))?;
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(qcfg));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(config.keepalive));
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(config.idle_timeout).ok());
    transport.max_concurrent_bidi_streams(INBOUND_STREAMS.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // TUN packets ride datagrams (only after a `TunJoin`).
    transport.datagram_receive_buffer_size(Some(swb_quic::DATAGRAM_BUFFER));
    // Packets as large as the link toward the relay takes (1452 on Ethernet).
    transport.path_mtu_upper_bound(Some(swb_quic::carrier::path_mtu_hook()));
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(RELAY_ACK_THRESHOLD.into());
    transport.ack_frequency_config(Some(ack));
    client_cfg.transport_config(Arc::new(transport));
    Ok(client_cfg)
}

impl Dialer {
    pub(crate) fn new(
        config: DaemonConfig,
        tls: rustls::ClientConfig,
        note: VerifyNote,
        paths: Arc<crate::carrier::Paths>,
    ) -> Result<Self, DaemonError> {
        let client_cfg = quic_client_config(&config, tls)?;
        Ok(Self {
            config,
            client_cfg,
            note,
            endpoints: (None, None),
            pinned: HashMap::new(),
            paths,
            carrier_tls: HashMap::new(),
            instance: new_instance()?,
        })
    }

    /// TLS for a TCP carrier to `target` (HTTP/1.1 over the relay's HTTPS
    /// port), verified as the QUIC connection is.
    fn carrier_tls_for(
        &mut self,
        target: Option<&RelayRecord>,
    ) -> Result<Arc<rustls::ClientConfig>, ConnectError> {
        let pinned = match (target, &self.config.trust) {
            (Some(r), crate::Trust::Fingerprint(_)) => Some(r.fingerprint.clone()),
            _ => None,
        };
        if let Some(c) = self.carrier_tls.get(&pinned) {
            return Ok(c.clone());
        }
        let trust = match &pinned {
            Some(f) => crate::Trust::Fingerprint(f.clone()),
            None => self.config.trust.clone(),
        };
        let tls =
            crate::tls::client_config(&trust, self.config.ocsp, b"http/1.1", self.note.clone())
                .map_err(|e| ConnectError::Retry(format!("TLS for the TCP carrier: {e}")))?;
        let tls = Arc::new(tls);
        self.carrier_tls.insert(pinned, tls.clone());
        Ok(tls)
    }

    /// The endpoint's socket over `sock`: UDP plus the TCP carriers.
    fn socket(&self, sock: std::net::UdpSocket) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let udp = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, sock)?;
        Ok(Arc::new(crate::carrier::ClientSocket::new(
            udp,
            self.paths.clone(),
        )))
    }

    fn endpoint_for(&mut self, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
        let existing = if addr.is_ipv4() {
            &self.endpoints.0
        } else {
            &self.endpoints.1
        };
        if let Some(ep) = existing {
            return Ok(ep.clone());
        }
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let ep = swb_quic::udp_socket(bind).and_then(|sock| {
            quinn::Endpoint::new_with_abstract_socket(
                swb_quic::carrier::endpoint_config(),
                None,
                self.socket(sock)?,
                Arc::new(quinn::TokioRuntime),
            )
        })?;
        if addr.is_ipv4() {
            self.endpoints.0 = Some(ep.clone());
        } else {
            self.endpoints.1 = Some(ep.clone());
        }
        Ok(ep)
    }

    /// Moves the endpoint that reaches `addr` to a fresh UDP socket (a new
    /// local port, and the source address the current route picks): its
    /// connections migrate — each probes the new path with a new
    /// connection ID, as after a NAT rebinding. The new local address.
    pub(crate) fn rebind(&mut self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let ep = self.endpoint_for(addr)?;
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        ep.rebind_abstract(self.socket(swb_quic::udp_socket(bind)?)?)?;
        ep.local_addr()
    }

    /// The endpoints in use, to close when the daemon stops.
    pub(crate) fn take_endpoints(&mut self) -> Vec<quinn::Endpoint> {
        [self.endpoints.0.take(), self.endpoints.1.take()]
            .into_iter()
            .flatten()
            .collect()
    }

    /// The QUIC client config for `target`: with fingerprint trust, pinned
    /// to the certificate the relay map lists for it (the map came over a
    /// connection we already verified); otherwise the configured trust.
    fn client_cfg_for(
        &mut self,
        target: Option<&RelayRecord>,
    ) -> Result<quinn::ClientConfig, ConnectError> {
        let Some(r) = target else {
            return Ok(self.client_cfg.clone());
        };
        if !matches!(self.config.trust, crate::Trust::Fingerprint(_)) {
            return Ok(self.client_cfg.clone());
        }
        if let Some(c) = self.pinned.get(&r.fingerprint) {
            return Ok(c.clone());
        }
        let tls = crate::tls::client_config(
            &crate::Trust::Fingerprint(r.fingerprint.clone()),
            self.config.ocsp,
            swb_wire::ALPN,
            self.note.clone(),
        )
        .map_err(|e| ConnectError::Retry(format!("relay {}: {e}", r.id)))?;
        let c = quic_client_config(&self.config, tls)
            .map_err(|e| ConnectError::Retry(e.to_string()))?;
        self.pinned.insert(r.fingerprint.clone(), c.clone());
        Ok(c)
    }

    /// Connects to `relay` (an address; `target` is its record when it came
    /// from a relay map or a redirect) and registers: the handshake within
    /// the connect timeout, then the welcome within another.
    pub(crate) async fn connect(
        &mut self,
        relay: &str,
        target: Option<&RelayRecord>,
    ) -> Result<(Link, Welcome), ConnectError> {
        let timeout = self.config.connect_timeout;
        self.connect_within(relay, target, timeout).await
    }

    /// [`Dialer::connect`] with `timeout` for each step.
    pub(crate) async fn connect_within(
        &mut self,
        relay: &str,
        target: Option<&RelayRecord>,
        timeout: std::time::Duration,
    ) -> Result<(Link, Welcome), ConnectError> {
        let cfg = self.client_cfg_for(target)?;
        let carrier_tls = match self.config.transport {
            crate::Transport::Udp => None,
            _ => Some(self.carrier_tls_for(target)?),
        };
        // Each step gets the whole timeout: a relay that finished the
        // handshake is alive, only slow (a reconnect storm), and starting
        // over would throw its work away and come back as more of it.
        let (conn, addr) = match tokio::time::timeout(
            timeout,
            self.handshake(relay, cfg, carrier_tls, target.is_some()),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => return Err(ConnectError::Retry(format!("no answer within {timeout:?}"))),
        };
        match tokio::time::timeout(timeout, self.hello(conn, addr)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Retry(format!(
                "the relay took the connection but sent no welcome within {timeout:?}"
            ))),
        }
    }

    /// The QUIC handshake with `relay`, on UDP or the TCP carrier.
    async fn handshake(
        &mut self,
        relay: &str,
        client_cfg: quinn::ClientConfig,
        carrier_tls: Option<Arc<rustls::ClientConfig>>,
        redirected: bool,
    ) -> Result<(quinn::Connection, SocketAddr), ConnectError> {
        let (host, port) = split_host_port(relay);
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| ConnectError::Retry(format!("cannot resolve {host}: {e}")))?
            .next()
            .ok_or_else(|| ConnectError::Retry(format!("{host} has no address")))?;
        let ep = self
            .endpoint_for(addr)
            .map_err(|e| ConnectError::Retry(format!("cannot open a UDP socket: {e}")))?;
        let server_name = self.config.server_name.clone().unwrap_or(host);
        if let Some(tls) = carrier_tls {
            self.paths.prepare(
                addr,
                crate::carrier::Target {
                    tls,
                    server_name: server_name.clone(),
                },
            );
        }
        let connecting = ep
            .connect_with(client_cfg, addr, &server_name)
            .map_err(|e| {
                let why = format!("cannot connect to {relay}: {e}");
                // A relay's advertised address is the mesh's to get right,
                // not a mistake in this daemon's configuration: try others.
                if redirected {
                    ConnectError::Retry(why)
                } else {
                    ConnectError::Fatal(DaemonError::Config(why))
                }
            })?;
        // A handshake that began on UDP and moved to the TCP carrier may
        // never finish there (the relay saw the UDP Initial but its answers
        // were dropped: it takes only that path until the handshake is
        // done): after a grace with nothing heard over UDP, start over on
        // the carrier. Once UDP has answered, it is only slow (a relay busy
        // with a reconnect storm): starting over would throw away the
        // relay's work and come back as more of it. One that began on the
        // carrier stays there (`handshake`).
        let handshake = self.paths.handshake(addr);
        let connecting = async {
            tokio::pin!(connecting);
            if handshake.on_carrier() {
                return Some(connecting.await);
            }
            let moved = self.paths.moved_to_tcp(addr);
            tokio::select! {
                r = &mut connecting => Some(r),
                _ = moved => tokio::select! {
                    r = &mut connecting => Some(r),
                    _ = tokio::time::sleep(crate::carrier::HANDSHAKE_GRACE) => {
                        if handshake.udp_heard() {
                            Some(connecting.await)
                        } else {
                            None
                        }
                    }
                },
            }
        };
        let Some(connected) = connecting.await else {
            return Err(ConnectError::Retry(
                "the handshake moved to the TCP carrier and did not finish there: starting over on it".into(),
            ));
        };
        let conn = match connected {
            Ok(c) => c,
            Err(e) => {
                if let Some(why) = self.note.take() {
                    return Err(ConnectError::Fatal(DaemonError::Untrusted(why)));
                }
                if is_tls_failure(&e) {
                    return Err(ConnectError::Fatal(DaemonError::Untrusted(format!(
                        "TLS with {relay} failed: {e}; check --ca / --relay-fingerprint / --server-name"
                    ))));
                }
                if let Some(wait) = swb_quic::busy_hint(&e) {
                    return Err(ConnectError::Busy(e.to_string(), wait));
                }
                return Err(ConnectError::Retry(e.to_string()));
            }
        };
        self.paths.follow(conn.clone(), addr);
        Ok((conn, addr))
    }

    /// `Hello` on a new connection, and the relay's answer.
    async fn hello(
        &mut self,
        conn: quinn::Connection,
        addr: SocketAddr,
    ) -> Result<(Link, Welcome), ConnectError> {
        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| ConnectError::Retry(e.to_string()))?;
        let mut first = BytesMut::new();
        Preamble {
            version: PROTOCOL_VERSION,
        }
        .encode(&mut first);
        Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            key: self.config.api_key.expose().to_string(),
            name: self.config.name.clone(),
            agent: concat!("swbd/", env!("CARGO_PKG_VERSION")).into(),
            instance: self.instance,
        })
        .encode(&mut first)
        .map_err(|e| {
            ConnectError::Fatal(DaemonError::Config(format!("cannot encode Hello: {e}")))
        })?;
        send.write_all(&first)
            .await
            .map_err(|e| ConnectError::Retry(e.to_string()))?;
        let mut link = Link {
            conn,
            send: Some(send),
            recv,
            reader: FrameReader::new(),
            addr,
        };
        loop {
            match link.reader.preamble() {
                Ok(Some(p)) if p.version == PROTOCOL_VERSION => break,
                Ok(Some(p)) => {
                    return Err(ConnectError::Fatal(DaemonError::Refused(Refusal::new(
                        Code::UNSUPPORTED_VERSION,
                        format!("the relay speaks protocol version {}, this daemon {PROTOCOL_VERSION}; upgrade the older side", p.version),
                    ))))
                }
                Ok(None) => link
                    .read_some()
                    .await
                    .map_err(|e| ConnectError::Retry(e.to_string()))?,
                Err(e) => return Err(ConnectError::Retry(format!("{addr} is not a Switchboard relay: {e}"))),
            }
        }
        match link
            .next_frame()
            .await
            .map_err(|e| ConnectError::Retry(e.to_string()))?
        {
            Frame::Welcome(w) => Ok((link, w)),
            Frame::Redirect(r) => {
                link.conn
                    .close(swb_wire::close::NORMAL.into(), b"redirected");
                if r.addrs.is_empty() {
                    return Err(ConnectError::Retry(format!(
                        "redirected to relay {} without an address",
                        r.id
                    )));
                }
                Err(ConnectError::Redirect(r))
            }
            Frame::Refused(r) => {
                link.conn.close(swb_wire::close::NORMAL.into(), b"refused");
                if is_fatal(r.code) {
                    Err(ConnectError::Fatal(DaemonError::Refused(r)))
                } else {
                    Err(ConnectError::Retry(r.to_string()))
                }
            }
            other => Err(ConnectError::Retry(format!(
                "relay answered Hello with {:?}",
                other.frame_type()
            ))),
        }
    }
}

/// The local address the routing table picks to reach `addr` now (`None`:
/// no route, e.g. every interface is down). A UDP `connect` sends nothing;
/// it only asks the kernel for a route.
pub(crate) fn local_route(addr: SocketAddr) -> Option<std::net::IpAddr> {
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = std::net::UdpSocket::bind(bind).ok()?;
    sock.connect(addr).ok()?;
    sock.local_addr().ok().map(|a| a.ip())
}

/// Splits `host:port`, `[v6]:port`, `host` (default port).
pub(crate) fn split_host_port(s: &str) -> (String, u16) {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return (sa.ip().to_string(), sa.port());
    }
    if let Some(rest) = s.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once(']') {
            let port = p
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .unwrap_or(crate::DEFAULT_RELAY_PORT);
            return (h.to_string(), port);
        }
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h.to_string(), port),
            Err(_) => (s.to_string(), crate::DEFAULT_RELAY_PORT),
        },
        _ => (s.to_string(), crate::DEFAULT_RELAY_PORT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("127.0.0.1:7443"),
            ("127.0.0.1".into(), 7443)
        );
        assert_eq!(
            split_host_port("relay.example.com"),
            ("relay.example.com".into(), 7443)
        );
        assert_eq!(
            split_host_port("relay.example.com:9"),
            ("relay.example.com".into(), 9)
        );
        assert_eq!(split_host_port("[::1]:8"), ("::1".into(), 8));
        assert_eq!(split_host_port("[::1]"), ("::1".into(), 7443));
    }
}
