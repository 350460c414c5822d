//! Byte streams: exposed ports (inbound) and `connect` / SOCKS (outbound).
//!
//! Outbound: open a QUIC stream on the relay connection, send
//! `StreamOpen{to, port}`, wait for `StreamReply`; only then bytes flow.
//! Inbound: the relay opens a stream with `StreamIncoming{from, port}`; we
//! check the port is exposed, connect to its local target, answer, splice.
//! Splicing copies both ways with half-close (EOF → FIN → shutdown(write))
//! and maps resets to errors, so nothing is cut silently.

use crate::{ConnState, Shared};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use swb_wire::{Code, Frame, Refusal, StreamOpen, StreamReply, MAX_STREAM_HEADER};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};

/// Application error code of a stream reset by a daemon.
const RESET_DAEMON: u32 = swb_wire::reset::DAEMON;
/// Time the relay has to send an incoming stream's header.
const INCOMING_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time an exposed port's target has to accept our connection:
/// as long as a direct TCP client would wait (Linux retries a SYN six
/// times, about 127 s), so a busy service is reached, not refused.
pub const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(127);
/// Time the relay (and the peer behind it) has to answer a stream request,
/// beyond the wait for a relay connection: longer than the relay's own wait
/// for the target (130 s), so its answer arrives first.
const STREAM_ANSWER_TIMEOUT: Duration = Duration::from_secs(135);
/// The least wait for a relay connection when opening a stream.
const MIN_CONNECTION_WAIT: Duration = Duration::from_secs(1);

/// A port this daemon accepts streams for, and where it forwards them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposure {
    /// The port callers name.
    pub port: u16,
    /// Local `host:port` the stream is connected to.
    pub target: String,
}

/// An exposure that is not `PORT` or `PORT=HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not PORT or PORT=HOST:PORT (e.g. 22, 8080=127.0.0.1:3000)")]
pub struct BadExposure(pub String);

impl FromStr for Exposure {
    type Err = BadExposure;

    /// `22` (to `127.0.0.1:22`) or `8080=HOST:PORT`.
    fn from_str(s: &str) -> Result<Self, BadExposure> {
        let bad = || BadExposure(s.to_string());
        let (port, target) = match s.split_once('=') {
            Some((p, t)) => (p.trim(), Some(t.trim())),
            None => (s.trim(), None),
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        let target = match target {
            None => format!("127.0.0.1:{port}"),
            Some(t) => {
                let (host, p) = t.rsplit_once(':').ok_or_else(bad)?;
                let p: u16 = p.parse().map_err(|_| bad())?;
                if host.is_empty() || p == 0 {
                    return Err(bad());
                }
                t.to_string()
            }
        };
        Ok(Self { port, target })
    }
}

impl fmt::Display for Exposure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.port, self.target)
    }
}

/// Why a stream could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StreamError {
    /// Stable code (`peer_offline`, `port_not_exposed`, `not_connected`, …).
    pub code: String,
    /// What happened and what to do.
    pub message: String,
}

impl StreamError {
    pub(crate) fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl From<Refusal> for StreamError {
    fn from(r: Refusal) -> Self {
        Self {
            code: r.code.as_str().into(),
            message: r.message,
        }
    }
}

pub(crate) use swb_quic::{read_header, write_frame};

/// Reads the next frame of a stream that carries only frames, skipping
/// unknown types; `None` at a clean end.
pub(crate) async fn read_frame(
    recv: &mut quinn::RecvStream,
) -> Result<Option<Frame>, swb_quic::FrameIoError> {
    swb_quic::read_frame(recv, MAX_STREAM_HEADER).await
}

/// The current relay connection, waiting up to `wait` for one.
pub(crate) async fn connection(
    shared: &Shared,
    wait: Duration,
) -> Result<quinn::Connection, StreamError> {
    let mut rx = shared.watch_state();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(c) = shared
            .conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(c);
        }
        let why = match &*rx.borrow_and_update() {
            ConnState::Stopped { error } => {
                return Err(StreamError::new(
                    "stopped",
                    format!(
                        "the daemon stopped: {}",
                        error.as_deref().unwrap_or("asked to")
                    ),
                ))
            }
            ConnState::Connecting { last_error, .. } => last_error.clone(),
            ConnState::Connected { .. } => None,
        };
        tokio::select! {
            r = rx.changed() => if r.is_err() {
                return Err(StreamError::new("stopped", "the daemon is stopping"));
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(StreamError::new(
                    "not_connected",
                    format!(
                        "the daemon is not connected to its relay{}; check `swbd status`",
                        why.map(|w| format!(" ({w})")).unwrap_or_default()
                    ),
                ));
            }
        }
    }
}

/// Opens a stream to `port` of peer `to`. Returns once the target accepted.
pub(crate) async fn open(
    shared: &Shared,
    to: &str,
    port: u16,
    wait: Duration,
) -> Result<(quinn::SendStream, quinn::RecvStream), StreamError> {
    let to = swb_wire::normalize_name(to)
        .map_err(|e| StreamError::new(Code::BAD_NAME.as_str(), format!("{e}: {to:?}")))?;
    let conn = connection(shared, wait).await?;
    let lost =
        |e: String| StreamError::new("relay_error", format!("the relay connection failed: {e}"));
    let setup = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
        write_frame(
            &mut send,
            &Frame::StreamOpen(StreamOpen {
                to: to.clone(),
                port,
            }),
        )
        .await
        .map_err(|e| lost(e.into()))?;
        match read_header(&mut recv).await.map_err(|e| lost(e.into()))? {
            Frame::StreamReply(StreamReply { refusal: None }) => Ok((send, recv)),
            Frame::StreamReply(StreamReply { refusal: Some(r) }) => Err(StreamError::from(r)),
            other => Err(lost(format!("unexpected {:?}", other.frame_type()))),
        }
    };
    let r = tokio::time::timeout(wait.max(MIN_CONNECTION_WAIT) + STREAM_ANSWER_TIMEOUT, setup)
        .await
        .map_err(|_| {
            StreamError::new(
                Code::TIMEOUT.as_str(),
                format!("no answer from {to} in time"),
            )
        })?;
    let result = if r.is_ok() { "accepted" } else { "refused" };
    shared
        .metrics
        .streams
        .with_label_values(&["out", result])
        .inc();
    r
}

/// Logs how a stream ended: at debug when both directions ended cleanly,
/// at info with the causes otherwise.
pub(crate) fn log_end(peer: &str, port: u16, s: &crate::splice::Spliced) {
    if s.clean() {
        debug!(%peer, port, up = s.up, down = s.down, "stream ended cleanly");
    } else {
        info!(%peer, port, up = s.up, down = s.down, up_end = ?s.up_end, down_end = ?s.down_end, "stream was cut");
    }
}

/// Accepts the streams the relay opens to us (peers connecting to our
/// exposed ports) until `stop`; owns their tasks.
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    stop: CancellationToken,
) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    tasks.spawn(shared.tasks.track_future(incoming(shared.clone(), send, recv).in_current_span()));
                }
                Err(_) => break,
            },
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

async fn answer(
    send: &mut quinn::SendStream,
    refusal: Option<Refusal>,
) -> Result<(), swb_quic::FrameIoError> {
    write_frame(send, &Frame::StreamReply(StreamReply { refusal })).await
}

async fn incoming(shared: Arc<Shared>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let req = match tokio::time::timeout(INCOMING_HEADER_TIMEOUT, read_header(&mut recv)).await {
        Ok(Ok(Frame::StreamIncoming(i))) => i,
        _ => {
            let _ = send.reset(quinn::VarInt::from_u32(RESET_DAEMON));
            return;
        }
    };
    if req.port == swb_wire::PING_PORT {
        // The built-in echo service: answered by this daemon itself.
        if answer(&mut send, None).await.is_ok() {
            crate::ping::echo(&shared, &req.from, send, recv).await;
        }
        return;
    }
    let me = &shared.config.name;
    let exposures = shared.exposures();
    let Some(exp) = exposures.iter().find(|e| e.port == req.port).cloned() else {
        let exposed: Vec<String> = exposures.iter().map(|e| e.port.to_string()).collect();
        let msg = if exposed.is_empty() {
            format!(
                "{me} does not expose port {} (it exposes no ports; start it with --expose {})",
                req.port, req.port
            )
        } else {
            format!(
                "{me} does not expose port {} (it exposes {})",
                req.port,
                exposed.join(", ")
            )
        };
        debug!(from = %req.from, port = req.port, "refused: not exposed");
        shared
            .metrics
            .streams
            .with_label_values(&["in", "refused"])
            .inc();
        let _ = answer(&mut send, Some(Refusal::new(Code::PORT_NOT_EXPOSED, msg))).await;
        let _ = send.finish();
        return;
    };
    let tcp = match tokio::time::timeout(
        shared.config.target_connect_timeout,
        tokio::net::TcpStream::connect(exp.target.as_str()),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let msg = format!(
                "{me} exposes port {} but nothing accepts connections on {} there ({e})",
                req.port, exp.target
            );
            shared
                .metrics
                .streams
                .with_label_values(&["in", "refused"])
                .inc();
            let _ = answer(&mut send, Some(Refusal::new(Code::CONNECTION_REFUSED, msg))).await;
            let _ = send.finish();
            return;
        }
        Err(_) => {
            let msg = format!(
                "{me} exposes port {} but {} did not accept within {:?}",
                req.port, exp.target, shared.config.target_connect_timeout
            );
            shared
                .metrics
                .streams
                .with_label_values(&["in", "refused"])
                .inc();
            let _ = answer(&mut send, Some(Refusal::new(Code::CONNECTION_REFUSED, msg))).await;
            let _ = send.finish();
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if answer(&mut send, None).await.is_err() {
        return;
    }
    info!(from = %req.from, port = req.port, target = %exp.target, "stream accepted");
    shared
        .metrics
        .streams
        .with_label_values(&["in", "accepted"])
        .inc();
    let _open = crate::metrics::Open::new(&shared.metrics.streams_open);
    let (mut rd, mut wr) = tcp.into_split();
    let s = crate::splice::splice(&mut rd, &mut wr, send, recv, crate::splice::Side::Target).await;
    // The service must see a cut stream as cut (RST), not as a FIN.
    crate::splice::close_tcp(rd, wr, !s.clean());
    log_end(&req.from, req.port, &s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposure_forms() {
        let e: Exposure = "22".parse().unwrap();
        assert_eq!((e.port, e.target.as_str()), (22, "127.0.0.1:22"));
        let e: Exposure = "8080=localhost:3000".parse().unwrap();
        assert_eq!((e.port, e.target.as_str()), (8080, "localhost:3000"));
        let e: Exposure = "443=[::1]:8443".parse().unwrap();
        assert_eq!(e.target, "[::1]:8443");
        for bad in [
            "",
            "0",
            "70000",
            "ssh",
            "22=",
            "22=host",
            "22=:80",
            "22=host:0",
            "22=host:x",
        ] {
            assert!(
                bad.parse::<Exposure>().is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
