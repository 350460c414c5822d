//! The control socket server. See [`crate::control`] for the protocol.

use crate::conn::Cmd;
use crate::control::{InMessage, Reply, Request, StatusInfo, MAX_REQUEST_LINE};
use crate::{ConnState, DaemonError, Shared};
use base64::Engine;
use bytes::Bytes;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use swb_wire::{Deliver, MessageId, MAX_MESSAGE_BODY};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Longest `recv --wait` and `send --timeout` the daemon honours.
const MAX_WAIT: Duration = Duration::from_secs(3600);

fn err(code: &str, message: impl Into<String>) -> Reply {
    Reply::Error {
        code: code.into(),
        message: message.into(),
    }
}

/// Binds the socket with mode 0600: bind to a temporary name, chmod, then
/// rename into place, so the socket is never reachable with looser rights.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    let fail = |reason: String| DaemonError::Control {
        path: path.display().to_string(),
        reason,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| fail(format!("cannot create its directory: {e}")))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(fail(
                "another daemon is already serving this socket; stop it first or use another --control path".into(),
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("control"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(|e| fail(e.to_string()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail(format!("cannot set mode 0600: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| fail(e.to_string()))?;
    Ok(l)
}

/// Accepts control connections until cancelled; removes the socket at the end.
pub(crate) async fn serve(listener: UnixListener, shared: Arc<Shared>, cancel: CancellationToken) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            a = listener.accept() => match a {
                Ok((s, _)) => {
                    conns.spawn(handle(s, shared.clone(), cancel.clone()));
                }
                Err(e) => {
                    debug!("control accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next() => {}
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    let _ = std::fs::remove_file(&shared.config.control_path);
}

async fn handle(stream: UnixStream, shared: Arc<Shared>, cancel: CancellationToken) {
    let (r, mut w) = stream.into_split();
    let mut rd = BufReader::new(r);
    let mut leased: Vec<Deliver> = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut rd).take(MAX_REQUEST_LINE as u64 + 1);
        let n = tokio::select! {
            _ = cancel.cancelled() => break,
            n = limited.read_until(b'\n', &mut line) => n,
        };
        match n {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let reply = if line.len() > MAX_REQUEST_LINE {
            let r = err(
                "request_too_large",
                format!("request exceeds {MAX_REQUEST_LINE} bytes"),
            );
            let _ = write_reply(&mut w, &r).await;
            break;
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Err(e) => err("bad_request", format!("cannot parse request: {e}")),
                Ok(Request::Connect {
                    to,
                    port,
                    timeout_ms,
                }) => {
                    let wait = Duration::from_millis(timeout_ms).min(MAX_WAIT);
                    match crate::streams::open(&shared, &to, port, wait).await {
                        Err(e) => err(&e.code, e.message),
                        Ok((send, recv)) => {
                            let ok = Reply::Connected {
                                to: to.clone(),
                                port,
                            };
                            if write_reply(&mut w, &ok).await.is_err() {
                                break;
                            }
                            // The control connection is the stream now.
                            let (up, down, clean) = crate::streams::splice(rd, w, send, recv).await;
                            debug!(%to, port, up, down, clean, "connect stream ended");
                            if !leased.is_empty() {
                                shared.inbox().give_back(leased);
                                shared.inbox_gen.send_modify(|g| *g += 1);
                            }
                            return;
                        }
                    }
                }
                Ok(Request::Watch { names, timeout_ms }) => {
                    let wait = Duration::from_millis(timeout_ms).min(MAX_WAIT);
                    match watch_open(&shared, names, wait).await {
                        Err(e) => err(&e.code, e.message),
                        Ok((send, recv)) => {
                            if write_reply(&mut w, &Reply::Watching {}).await.is_err() {
                                break;
                            }
                            watch_forward(rd, w, send, recv).await;
                            if !leased.is_empty() {
                                shared.inbox().give_back(leased);
                                shared.inbox_gen.send_modify(|g| *g += 1);
                            }
                            return;
                        }
                    }
                }
                Ok(req) => answer(&shared, req, &mut leased, &cancel).await,
            }
        };
        if write_reply(&mut w, &reply).await.is_err() {
            break;
        }
    }
    // Whatever this connection took and did not acknowledge goes back.
    if !leased.is_empty() {
        shared.inbox().give_back(leased);
        shared.inbox_gen.send_modify(|g| *g += 1);
    }
}

async fn watch_open(
    shared: &Shared,
    names: Vec<String>,
    wait: Duration,
) -> Result<(quinn::SendStream, quinn::RecvStream), crate::streams::StreamError> {
    if names.is_empty() {
        return Err(crate::streams::StreamError {
            code: "bad_request".into(),
            message: "name at least one peer to watch".into(),
        });
    }
    let first = swb_wire::Frame::StatusWatch(swb_wire::StatusWatch { names, once: false });
    crate::status::open(shared, first, wait).await
}

/// Copies status updates to the CLI until the relay ends the watch or the
/// CLI goes away (then the watch stream is finished, which ends it there).
async fn watch_forward(
    mut rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut w: tokio::net::unix::OwnedWriteHalf,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            f = crate::status::next_frame(&mut recv) => match f {
                Ok(Some(swb_wire::Frame::StatusUpdate(u))) => {
                    if write_reply(&mut w, &Reply::Update(u.into())).await.is_err() {
                        break;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    let _ = write_reply(&mut w, &err(&e.code, e.message)).await;
                    break;
                }
            },
            r = rd.read(&mut probe) => {
                if !matches!(r, Ok(n) if n > 0) {
                    break;
                }
            }
        }
    }
    let _ = send.finish();
}

async fn write_reply(w: &mut tokio::net::unix::OwnedWriteHalf, r: &Reply) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await
}

async fn answer(
    shared: &Arc<Shared>,
    req: Request,
    leased: &mut Vec<Deliver>,
    cancel: &CancellationToken,
) -> Reply {
    match req {
        Request::Status => Reply::Status(status(shared)),
        Request::Send {
            to,
            body_b64,
            timeout_ms,
        } => {
            let timeout = Duration::from_millis(timeout_ms).min(MAX_WAIT);
            send(shared, to, body_b64, timeout).await
        }
        Request::Recv { wait_ms, max } => {
            let wait = Duration::from_millis(wait_ms).min(MAX_WAIT);
            let max = max.clamp(1, 10_000);
            let mut gen = shared.inbox_gen.subscribe();
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                gen.borrow_and_update();
                let got = shared.inbox().take(max);
                if !got.is_empty() {
                    let out = got
                        .iter()
                        .map(|d| InMessage {
                            id: d.id.to_string(),
                            from: d.from.clone(),
                            body_b64: base64::engine::general_purpose::STANDARD.encode(&d.body),
                            sent_at_ms: d.sent_at_ms,
                        })
                        .collect();
                    leased.extend(got);
                    return Reply::Messages { messages: out };
                }
                if let ConnState::Stopped { error } = &*shared.state.borrow() {
                    return err(
                        "stopped",
                        format!(
                            "the daemon stopped: {}",
                            error.as_deref().unwrap_or("asked to")
                        ),
                    );
                }
                tokio::select! {
                    _ = cancel.cancelled() => return err("stopped", "the daemon is stopping"),
                    _ = tokio::time::sleep_until(deadline) => return Reply::Messages { messages: vec![] },
                    r = gen.changed() => if r.is_err() { return err("stopped", "the daemon is stopping") },
                }
            }
        }
        Request::Connect { .. } | Request::Watch { .. } => {
            err("bad_request", "handled by the connection loop")
        }
        Request::SetStatus {
            set,
            clear,
            timeout_ms,
        } => {
            let wait = Duration::from_millis(timeout_ms).min(MAX_WAIT);
            match crate::status::set(shared, set, clear, wait).await {
                Ok((status, published)) => Reply::StatusSet { status, published },
                Err(e) => err(&e.code, e.message),
            }
        }
        Request::GetStatus { names, timeout_ms } => {
            let wait = Duration::from_millis(timeout_ms).min(MAX_WAIT);
            if names.is_empty() {
                return err("bad_request", "name at least one peer");
            }
            match crate::status::get(shared, names, wait).await {
                Ok(statuses) => Reply::Statuses { statuses },
                Err(e) => err(&e.code, e.message),
            }
        }
        Request::Peers { timeout_ms } => {
            let wait = Duration::from_millis(timeout_ms).min(MAX_WAIT);
            match crate::status::peers(shared, wait).await {
                Ok(statuses) => Reply::Statuses { statuses },
                Err(e) => err(&e.code, e.message),
            }
        }
        Request::Ack { ids } => {
            let mut acked = Vec::new();
            for s in &ids {
                let Some(id) = MessageId::parse_hex(s) else {
                    return err("bad_request", format!("{s:?} is not a message id"));
                };
                if let Some(pos) = leased.iter().position(|d| d.id == id) {
                    leased.swap_remove(pos);
                    acked.push(id);
                }
            }
            if !acked.is_empty() {
                shared.inbox().acked(&acked);
                if shared.cmd_tx.send(Cmd::Ack(acked.clone())).await.is_err() {
                    return err(
                        "stopped",
                        "the daemon is stopping; the relay will deliver these again",
                    );
                }
            }
            Reply::Acked { acked: acked.len() }
        }
    }
}

async fn send(shared: &Arc<Shared>, to: String, body_b64: String, timeout: Duration) -> Reply {
    let Ok(body) = base64::engine::general_purpose::STANDARD.decode(body_b64.as_bytes()) else {
        return err("bad_request", "body_b64 is not valid base64");
    };
    if body.len() > MAX_MESSAGE_BODY {
        return err(
            "body_too_large",
            format!(
                "the message body has {} bytes; the limit is {MAX_MESSAGE_BODY}. Send large data over a stream instead",
                body.len()
            ),
        );
    }
    let to = match swb_wire::normalize_name(&to) {
        Ok(n) => n,
        Err(e) => return err("bad_name", format!("{e}: {to:?}")),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut state = shared.state.subscribe();
    let ready = tokio::time::timeout_at(
        deadline,
        state.wait_for(|s| matches!(s, ConnState::Connected { .. } | ConnState::Stopped { .. })),
    )
    .await
    .map(|r| r.map(|s| s.clone()));
    match ready {
        Err(_) => {
            let why = match &*shared.state.borrow() {
                ConnState::Connecting {
                    last_error: Some(e),
                    ..
                } => format!(" (last error: {e})"),
                _ => String::new(),
            };
            return err(
                "not_connected",
                format!("the daemon could not reach its relay within {timeout:?}{why}; the message was not sent"),
            );
        }
        Ok(Err(_)) => return err("stopped", "the daemon is stopping"),
        Ok(Ok(s)) => {
            if let ConnState::Stopped { error } = &s {
                return err(
                    "stopped",
                    format!(
                        "the daemon stopped: {}",
                        error.as_deref().unwrap_or("asked to")
                    ),
                );
            }
        }
    }
    let mut raw = [0u8; 16];
    fastrand::fill(&mut raw);
    let id = MessageId(raw);
    let (tx, rx) = oneshot::channel();
    let cmd = Cmd::Send {
        to,
        id,
        body: Bytes::from(body),
        reply: tx,
    };
    if shared.cmd_tx.send(cmd).await.is_err() {
        return err("stopped", "the daemon is stopping");
    }
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(Ok(online))) => Reply::Sent {
            id: id.to_string(),
            online,
        },
        Ok(Ok(Err(r))) => err(r.code.as_str(), r.message),
        Ok(Err(_)) => err("stopped", "the daemon stopped before the relay answered"),
        Err(_) => err(
            "timeout",
            format!("the relay did not answer within {timeout:?}; the message may not have been accepted"),
        ),
    }
}

fn status(shared: &Shared) -> StatusInfo {
    let st = shared.state.borrow().clone();
    let rtt = shared
        .conn
        .lock()
        .ok()
        .and_then(|c| c.as_ref().map(|c| c.rtt().as_secs_f64() * 1000.0));
    let mut s = StatusInfo {
        state: String::new(),
        name: shared.config.name.clone(),
        relay: String::new(),
        relay_id: None,
        namespace: None,
        connected_since: None,
        rtt_ms: None,
        inbox: shared.inbox().len(),
        pending_sends: shared.pending_sends.load(Ordering::Relaxed),
        attempts: 0,
        last_error: None,
        relays: shared.relay_count.load(Ordering::Relaxed),
    };
    match st {
        ConnState::Connecting {
            relay,
            attempts,
            last_error,
        } => {
            s.state = "connecting".into();
            s.relay = relay;
            s.attempts = attempts;
            s.last_error = last_error;
        }
        ConnState::Connected {
            relay,
            welcome,
            since,
        } => {
            s.state = "connected".into();
            s.relay = relay;
            s.relay_id = Some(welcome.relay_id);
            s.namespace = Some(welcome.namespace);
            s.name = welcome.name;
            s.connected_since = Some(humantime::format_rfc3339_seconds(since).to_string());
            s.rtt_ms = rtt;
        }
        ConnState::Stopped { error } => {
            s.state = "stopped".into();
            s.last_error = error;
        }
    }
    s
}
