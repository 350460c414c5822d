//! The connection actor: connects, registers, serves the control stream,
//! reconnects. Owns the pending sends and acks so they survive reconnects.

use crate::inbox::Pushed;
use crate::tls::VerifyNote;
use crate::{ConnState, DaemonError, Shared};
use bytes::{Bytes, BytesMut};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use swb_wire::{
    Ack, Code, Frame, FrameReader, Hello, MessageId, Preamble, Refusal, PROTOCOL_VERSION,
};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::{debug, info, warn};

/// Result of a send as the relay answered it: `Ok(online)` or the refusal.
pub(crate) type SendResult = Result<bool, Refusal>;

/// Most commands taken from the queue for one write to the relay.
const CMD_BATCH: usize = 256;

/// Commands from the control server.
#[derive(Debug)]
pub(crate) enum Cmd {
    Send {
        to: String,
        id: MessageId,
        body: Bytes,
        reply: oneshot::Sender<SendResult>,
    },
    Ack(Vec<MessageId>),
}

struct PendingSend {
    to: String,
    id: MessageId,
    body: Bytes,
    reply: oneshot::Sender<SendResult>,
}

/// Refusal codes that retrying cannot fix: the daemon stops.
fn is_fatal(code: Code) -> bool {
    matches!(
        code,
        Code::UNAUTHORIZED
            | Code::KEY_REVOKED
            | Code::BAD_NAME
            | Code::UNSUPPORTED_VERSION
            | Code::REPLACED
    )
}

/// Capped exponential backoff with jitter: attempt n waits a random time in
/// `[d/2, d]` where `d = min(max, min * 2^n)`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn delay(&self, attempt: u32, rand01: f64) -> Duration {
        let exp = self.min.saturating_mul(1u32 << attempt.min(20));
        let d = exp.min(self.max);
        d.mul_f64(0.5 + 0.5 * rand01.clamp(0.0, 1.0))
    }
}

enum ConnectError {
    /// Try again later.
    Retry(String),
    /// This relay is not our home: go to that one.
    Redirect(swb_wire::RelayRecord),
    /// Stop the daemon.
    Fatal(DaemonError),
}

enum End {
    Shutdown,
    Fatal(DaemonError),
    Lost(String),
    /// Our home moved to another relay.
    Redirect(swb_wire::RelayRecord),
}

struct Link {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    reader: FrameReader,
    addr: SocketAddr,
}

impl Link {
    async fn read_some(&mut self) -> Result<(), String> {
        let buf = self.reader.buf();
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        match self.recv.read_buf(buf).await {
            Ok(0) => Err(self.close_reason("the relay closed the control stream")),
            Ok(_) => Ok(()),
            Err(e) => Err(self.close_reason(&e.to_string())),
        }
    }

    fn close_reason(&self, fallback: &str) -> String {
        match self.conn.close_reason() {
            Some(quinn::ConnectionError::TimedOut) => {
                "the relay stopped answering (idle timeout)".into()
            }
            Some(e) => e.to_string(),
            None => fallback.to_string(),
        }
    }

    async fn next_frame(&mut self) -> Result<Frame, String> {
        loop {
            match self.reader.next_frame() {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => self.read_some().await?,
                Err(e) => return Err(format!("relay sent bad data: {e}")),
            }
        }
    }

    async fn write(&mut self, frames: &[Frame]) -> Result<(), String> {
        let mut b = BytesMut::new();
        for f in frames {
            f.encode(&mut b).map_err(|e| e.to_string())?;
        }
        self.send.write_all(&b).await.map_err(|e| e.to_string())
    }
}

struct Actor {
    shared: Arc<Shared>,
    cmd_rx: mpsc::Receiver<Cmd>,
    pending: BTreeMap<u64, PendingSend>,
    next_req: u64,
    pending_acks: Vec<MessageId>,
    endpoints: (Option<quinn::Endpoint>, Option<quinn::Endpoint>),
    client_cfg: quinn::ClientConfig,
    note: VerifyNote,
    /// Live relays, as the last relay told us.
    map: Vec<swb_wire::RelayRecord>,
    /// The relay to try next (a redirect, or the next one on the ring).
    next: Option<swb_wire::RelayRecord>,
    /// Redirects followed in a row (to stop a ping-pong while relays disagree).
    redirects: u32,
    /// Client configs pinned to relays' own certificates (dev meshes).
    pinned: std::collections::HashMap<String, quinn::ClientConfig>,
}

use swb_quic::udp_socket;

fn quic_client_config(
    shared: &Shared,
    tls: rustls::ClientConfig,
) -> Result<quinn::ClientConfig, DaemonError> {
    let qcfg = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| DaemonError::Config(format!("TLS configuration: {e}")))?;
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(qcfg));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(shared.config.keepalive));
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(shared.config.idle_timeout).ok());
    // Streams the relay opens to us: peers connecting to exposed ports.
    transport.max_concurrent_bidi_streams(1024u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.datagram_receive_buffer_size(None);
    client_cfg.transport_config(Arc::new(transport));
    Ok(client_cfg)
}

/// Runs until shutdown or a fatal refusal.
pub(crate) async fn run(
    shared: Arc<Shared>,
    cmd_rx: mpsc::Receiver<Cmd>,
    tls: rustls::ClientConfig,
    note: VerifyNote,
    cancel: CancellationToken,
) -> Result<(), DaemonError> {
    let client_cfg = quic_client_config(&shared, tls)?;
    let mut actor = Actor {
        shared,
        cmd_rx,
        pending: BTreeMap::new(),
        next_req: 1,
        pending_acks: Vec::new(),
        endpoints: (None, None),
        client_cfg,
        note,
        map: Vec::new(),
        next: None,
        redirects: 0,
        pinned: std::collections::HashMap::new(),
    };
    let res = actor.run(cancel).await;
    let error = match &res {
        Ok(()) => None,
        Err(e) => Some(e.to_string()),
    };
    actor
        .shared
        .state
        .send_replace(ConnState::Stopped { error });
    for (_, p) in std::mem::take(&mut actor.pending) {
        let _ = p.reply.send(Err(Refusal::new(
            Code::SHUTTING_DOWN,
            "the daemon stopped before the relay answered; the message was not confirmed",
        )));
    }
    for ep in [actor.endpoints.0.take(), actor.endpoints.1.take()]
        .into_iter()
        .flatten()
    {
        ep.close(0u32.into(), b"daemon stopping");
        let _ = tokio::time::timeout(Duration::from_millis(500), ep.wait_idle()).await;
    }
    res
}

impl Actor {
    async fn run(&mut self, cancel: CancellationToken) -> Result<(), DaemonError> {
        let backoff = Backoff {
            min: self.shared.config.backoff_min,
            max: self.shared.config.backoff_max,
        };
        let mut attempts = 0u32;
        let mut last_logged: Option<String> = None;
        let mut relay_idx = 0usize;
        loop {
            let target = self.next.take();
            let relay = match &target {
                Some(r) => r.addrs.first().cloned().unwrap_or_default(),
                None => {
                    self.shared.config.relays[relay_idx % self.shared.config.relays.len()].clone()
                }
            };
            let attempt = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                r = self.connect(&relay, target.as_ref()) => r,
            };
            let err = match attempt {
                Ok((link, welcome)) => {
                    self.shared.metrics.connects.inc();
                    if attempts > 0 {
                        info!(relay = %relay, attempts, "reconnected to relay");
                    } else {
                        info!(relay = %relay, addr = %link.addr, ns = %welcome.namespace, "connected to relay");
                    }
                    attempts = 0;
                    self.redirects = 0;
                    let home = (welcome.namespace.clone(), welcome.relay_id.clone());
                    *self.shared.conn.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(link.conn.clone());
                    self.shared.state.send_replace(ConnState::Connected {
                        relay: relay.clone(),
                        welcome,
                        since: SystemTime::now(),
                    });
                    let streams_stop = CancellationToken::new();
                    let streams = tokio::spawn({
                        let shared = self.shared.clone();
                        let conn = link.conn.clone();
                        let stop = streams_stop.clone();
                        async move {
                            // Republish our status on this connection while
                            // serving the streams peers open to us.
                            let republish = async {
                                tokio::select! {
                                    _ = crate::status::republish(&shared) => {}
                                    _ = stop.cancelled() => {}
                                }
                            };
                            tokio::join!(
                                crate::streams::accept_loop(shared.clone(), conn, stop.clone()),
                                republish
                            );
                        }
                        .instrument(tracing::Span::current())
                    });
                    let end = self.serve(link, &cancel).await;
                    streams_stop.cancel();
                    let _ = streams.await;
                    *self.shared.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    if matches!(end, End::Redirect(_) | End::Lost(_)) {
                        self.shared.metrics.reconnects.inc();
                    }
                    match end {
                        End::Shutdown => return Ok(()),
                        End::Fatal(e) => {
                            warn!("{e}");
                            return Err(e);
                        }
                        End::Redirect(r) => {
                            info!(home = %r.id, "the mesh changed: moving to the new home relay");
                            self.next = Some(r);
                            continue;
                        }
                        End::Lost(why) => {
                            warn!(relay = %relay, "lost connection to relay: {why}; reconnecting");
                            last_logged = Some(why.clone());
                            // Re-home: the next live relay on the ring takes over.
                            self.next = self.successor(&home.0, &home.1);
                            why
                        }
                    }
                }
                Err(ConnectError::Redirect(r)) => {
                    self.redirects += 1;
                    debug!(home = %r.id, "redirected to the home relay");
                    self.next = Some(r.clone());
                    if self.redirects <= 4 {
                        continue;
                    }
                    // Relays disagree about the mesh for now: back off.
                    attempts += 1;
                    format!(
                        "redirected {} times in a row (the mesh is changing)",
                        self.redirects
                    )
                }
                Err(ConnectError::Fatal(e)) => {
                    warn!("{e}");
                    return Err(e);
                }
                Err(ConnectError::Retry(why)) => {
                    self.shared.metrics.connect_failures.inc();
                    // Log a failure once, not per retry; a new kind of failure is news.
                    if last_logged.as_deref() != Some(why.as_str()) {
                        warn!(relay = %relay, "cannot reach relay: {why}; retrying with backoff");
                        last_logged = Some(why.clone());
                    } else {
                        debug!(relay = %relay, attempts, "still cannot reach relay: {why}");
                    }
                    attempts += 1;
                    relay_idx += 1;
                    why
                }
            };
            self.shared.state.send_replace(ConnState::Connecting {
                relay: self.shared.config.relays[relay_idx % self.shared.config.relays.len()]
                    .clone(),
                attempts,
                last_error: Some(err),
            });
            let delay = backoff.delay(attempts, fastrand::f64());
            let until = tokio::time::Instant::now() + delay;
            // Keep absorbing commands while waiting, so CLI calls don't block.
            loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep_until(until) => break,
                    cmd = self.cmd_rx.recv() => match cmd {
                        Some(c) => {
                            // Frames are written on the next connection.
                            let _ = self.absorb(c);
                        }
                        None => return Ok(()),
                    },
                }
            }
        }
    }

    fn absorb(&mut self, cmd: Cmd) -> Option<Frame> {
        match cmd {
            Cmd::Send {
                to,
                id,
                body,
                reply,
            } => {
                let req = self.next_req;
                self.next_req += 1;
                let frame = Frame::Send(swb_wire::Send {
                    req,
                    id,
                    to: to.clone(),
                    body: body.clone(),
                });
                self.pending.insert(
                    req,
                    PendingSend {
                        to,
                        id,
                        body,
                        reply,
                    },
                );
                self.shared
                    .pending_sends
                    .store(self.pending.len(), Ordering::Relaxed);
                Some(frame)
            }
            Cmd::Ack(ids) => {
                self.pending_acks.extend(ids);
                None
            }
        }
    }

    fn endpoint_for(&mut self, addr: SocketAddr) -> Result<quinn::Endpoint, String> {
        let slot = if addr.is_ipv4() {
            &mut self.endpoints.0
        } else {
            &mut self.endpoints.1
        };
        if let Some(ep) = slot {
            return Ok(ep.clone());
        }
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let ep = udp_socket(bind)
            .and_then(|sock| {
                quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    None,
                    sock,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
        *slot = Some(ep.clone());
        Ok(ep)
    }

    /// The relay that takes over `namespace`'s name after `lost`: the next
    /// live one on the ring (from the last relay map).
    fn successor(&self, namespace: &str, lost: &str) -> Option<swb_wire::RelayRecord> {
        if self.map.len() < 2 {
            return None;
        }
        let ring = swb_ring::Ring::new(self.map.iter().map(|r| r.id.clone()));
        let next = ring
            .ranked(namespace, &self.shared.config.name)
            .into_iter()
            .find(|id| *id != lost)?;
        self.map.iter().find(|r| r.id == next).cloned()
    }

    /// The QUIC client config for `target`: with fingerprint trust, pinned
    /// to the certificate the relay map lists for it (the map came over a
    /// connection we already verified); otherwise the configured trust.
    fn client_cfg_for(
        &mut self,
        target: Option<&swb_wire::RelayRecord>,
    ) -> Result<quinn::ClientConfig, ConnectError> {
        let Some(r) = target else {
            return Ok(self.client_cfg.clone());
        };
        if !matches!(self.shared.config.trust, crate::Trust::Fingerprint(_)) {
            return Ok(self.client_cfg.clone());
        }
        if let Some(c) = self.pinned.get(&r.fingerprint) {
            return Ok(c.clone());
        }
        let tls = crate::tls::client_config(
            &crate::Trust::Fingerprint(r.fingerprint.clone()),
            swb_wire::ALPN,
            self.note.clone(),
        )
        .map_err(|e| ConnectError::Retry(format!("relay {}: {e}", r.id)))?;
        let c = quic_client_config(&self.shared, tls)
            .map_err(|e| ConnectError::Retry(e.to_string()))?;
        self.pinned.insert(r.fingerprint.clone(), c.clone());
        Ok(c)
    }

    async fn connect(
        &mut self,
        relay: &str,
        target: Option<&swb_wire::RelayRecord>,
    ) -> Result<(Link, swb_wire::Welcome), ConnectError> {
        let timeout = self.shared.config.connect_timeout;
        let cfg = self.client_cfg_for(target)?;
        match tokio::time::timeout(timeout, self.connect_inner(relay, cfg)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Retry(format!("no answer within {timeout:?}"))),
        }
    }

    async fn connect_inner(
        &mut self,
        relay: &str,
        client_cfg: quinn::ClientConfig,
    ) -> Result<(Link, swb_wire::Welcome), ConnectError> {
        let (host, port) = split_host_port(relay);
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| ConnectError::Retry(format!("cannot resolve {host}: {e}")))?
            .next()
            .ok_or_else(|| ConnectError::Retry(format!("{host} has no address")))?;
        let ep = self.endpoint_for(addr).map_err(ConnectError::Retry)?;
        let server_name = self.shared.config.server_name.clone().unwrap_or(host);
        let connecting = ep
            .connect_with(client_cfg, addr, &server_name)
            .map_err(|e| {
                ConnectError::Fatal(DaemonError::Config(format!(
                    "cannot connect to {relay}: {e}"
                )))
            })?;
        let conn = match connecting.await {
            Ok(c) => c,
            Err(e) => {
                if let Some(why) = self.note.take() {
                    return Err(ConnectError::Fatal(DaemonError::Untrusted(why)));
                }
                if let quinn::ConnectionError::TransportError(t) = &e {
                    if t.code.to_string().contains("CRYPTO") || t.reason.contains("certificate") {
                        return Err(ConnectError::Fatal(DaemonError::Untrusted(format!(
                            "TLS with {relay} failed: {e}; check --ca / --relay-fingerprint / --server-name"
                        ))));
                    }
                }
                return Err(ConnectError::Retry(e.to_string()));
            }
        };
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
            key: self.shared.config.api_key.expose().to_string(),
            name: self.shared.config.name.clone(),
            agent: concat!("swbd/", env!("CARGO_PKG_VERSION")).into(),
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
            send,
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
                Ok(None) => link.read_some().await.map_err(ConnectError::Retry)?,
                Err(e) => return Err(ConnectError::Retry(format!("{addr} is not a Switchboard relay: {e}"))),
            }
        }
        match link.next_frame().await.map_err(ConnectError::Retry)? {
            Frame::Welcome(w) => Ok((link, w)),
            Frame::Redirect(r) => {
                link.conn.close(0u32.into(), b"redirected");
                if r.addrs.is_empty() {
                    return Err(ConnectError::Retry(format!(
                        "redirected to relay {} without an address",
                        r.id
                    )));
                }
                Err(ConnectError::Redirect(r))
            }
            Frame::Refused(r) => {
                link.conn.close(0u32.into(), b"refused");
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

    /// Handles every complete frame in the read buffer.
    fn drain(&mut self, link: &mut Link, out: &mut Vec<Frame>) -> Result<(), End> {
        loop {
            match link.reader.next_frame() {
                Ok(Some(f)) => {
                    if let Err(end) = self.on_frame(f, out) {
                        link.conn.close(0u32.into(), b"goodbye");
                        return Err(end);
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(End::Lost(format!("relay sent bad data: {e}"))),
            }
        }
    }

    async fn serve(&mut self, mut link: Link, cancel: &CancellationToken) -> End {
        // Resend what the previous connection left unanswered, and acks.
        let mut first: Vec<Frame> = Vec::new();
        self.pending.retain(|_, p| !p.reply.is_closed());
        self.shared
            .pending_sends
            .store(self.pending.len(), Ordering::Relaxed);
        for (req, p) in &self.pending {
            first.push(Frame::Send(swb_wire::Send {
                req: *req,
                id: p.id,
                to: p.to.clone(),
                body: p.body.clone(),
            }));
        }
        for chunk in self.pending_acks.chunks(swb_wire::MAX_ACK_IDS) {
            first.push(Frame::Ack(Ack {
                ids: chunk.to_vec(),
            }));
        }
        if let Err(e) = link.write(&first).await {
            return End::Lost(e);
        }
        self.pending_acks.clear();
        // Frames that arrived together with the Welcome (mail held while
        // this peer was away) are already buffered.
        let mut out = Vec::new();
        if let Err(end) = self.drain(&mut link, &mut out) {
            return end;
        }
        if !out.is_empty() {
            if let Err(e) = link.write(&out).await {
                return End::Lost(link.close_reason(&e));
            }
        }
        loop {
            // Ranked: shutdown, then local commands, then relay frames.
            let out: Vec<Frame> = tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    link.conn.close(0u32.into(), b"daemon stopping");
                    return End::Shutdown;
                }
                cmd = self.cmd_rx.recv() => match cmd {
                    None => return End::Shutdown,
                    Some(c) => {
                        let mut out: Vec<Frame> = self.absorb(c).into_iter().collect();
                        // Whatever else is queued goes out in the same write.
                        while out.len() < CMD_BATCH {
                            match self.cmd_rx.try_recv() {
                                Ok(c) => out.extend(self.absorb(c)),
                                Err(_) => break,
                            }
                        }
                        let acks = std::mem::take(&mut self.pending_acks);
                        for chunk in acks.chunks(swb_wire::MAX_ACK_IDS) {
                            out.push(Frame::Ack(Ack { ids: chunk.to_vec() }));
                        }
                        out
                    }
                },
                r = link.read_some() => {
                    if let Err(e) = r {
                        return End::Lost(e);
                    }
                    let mut out = Vec::new();
                    if let Err(end) = self.drain(&mut link, &mut out) {
                        return end;
                    }
                    out
                }
            };
            if !out.is_empty() {
                if let Err(e) = link.write(&out).await {
                    return End::Lost(link.close_reason(&e));
                }
            }
        }
    }

    fn on_frame(&mut self, f: Frame, out: &mut Vec<Frame>) -> Result<(), End> {
        match f {
            Frame::SendAccepted(a) => {
                self.shared
                    .metrics
                    .sends
                    .with_label_values(&["accepted"])
                    .inc();
                if let Some(p) = self.pending.remove(&a.req) {
                    let _ = p.reply.send(Ok(a.online));
                }
            }
            Frame::SendRefused(r) => {
                self.shared
                    .metrics
                    .sends
                    .with_label_values(&["refused"])
                    .inc();
                if let Some(p) = self.pending.remove(&r.req) {
                    let _ = p.reply.send(Err(r.refusal));
                }
            }
            Frame::Deliver(d) => {
                let id = d.id;
                let pushed = self.shared.inbox().push(d);
                match pushed {
                    Pushed::New => {
                        self.shared.metrics.received.inc();
                        self.shared.inbox_gen.send_modify(|g| *g += 1);
                    }
                    Pushed::Duplicate => debug!(%id, "duplicate delivery dropped"),
                    Pushed::Reack => out.push(Frame::Ack(Ack { ids: vec![id] })),
                }
            }
            Frame::Ping(p) => out.push(Frame::Pong(p)),
            Frame::Pong(_) => {}
            Frame::RelayMap(m) => {
                self.shared
                    .relay_count
                    .store(m.relays.len(), Ordering::Relaxed);
                self.map = m.relays;
            }
            Frame::Redirect(r) if !r.addrs.is_empty() => {
                return Err(End::Redirect(r));
            }
            Frame::Goodbye(r) => {
                return Err(if is_fatal(r.code) {
                    End::Fatal(DaemonError::Refused(r))
                } else {
                    End::Lost(r.to_string())
                });
            }
            other => {
                return Err(End::Lost(format!(
                    "relay sent an unexpected {:?} frame",
                    other.frame_type()
                )))
            }
        }
        self.shared
            .pending_sends
            .store(self.pending.len(), Ordering::Relaxed);
        Ok(())
    }
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
    fn backoff_grows_caps_and_jitters() {
        let b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(50));
        assert_eq!(b.delay(3, 1.0), Duration::from_millis(800));
        assert_eq!(b.delay(30, 1.0), Duration::from_secs(5));
        assert_eq!(b.delay(30, 0.0), Duration::from_millis(2500));
    }

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
