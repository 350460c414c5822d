//! The control socket server. See [`crate::control`] for the protocol.

use crate::api;
use crate::api::{Accepted, ApiError, Leased, PendingSend, MAX_WAIT};
use crate::control::{
    InMessage, Reply, Request, StatusInfo, MAX_PIPELINED_SENDS, MAX_REQUEST_LINE,
};
use crate::{ConnState, DaemonError, Shared};
use base64::Engine;
use bytes::Bytes;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use swb_wire::MessageId;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Pause after a failed accept (EMFILE and friends) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

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
        check_dir(dir).map_err(fail)?;
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

/// Refuses a socket directory someone else could use to put their own
/// socket in our place: it must belong to us (or root), and be writable by
/// nobody else unless it has the sticky bit (like /tmp, where others cannot
/// replace what we create).
fn check_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir).map_err(|e| format!("cannot inspect its directory: {e}"))?;
    let me = crate::control::current_uid();
    if m.uid() != me && m.uid() != 0 {
        return Err(format!(
            "its directory {} belongs to uid {}, not to you (uid {me}): another user could replace the socket; remove the directory or pick another --control path",
            dir.display(),
            m.uid()
        ));
    }
    let others_write = m.mode() & 0o022 != 0;
    let sticky = m.mode() & 0o1000 != 0;
    if others_write && !sticky {
        return Err(format!(
            "its directory {} is writable by other users (mode {:o}) without the sticky bit: another user could replace the socket; chmod go-w it or pick another --control path",
            dir.display(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
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
                    conns.spawn(shared.tasks.track_future(handle(s, shared.clone(), cancel.clone())));
                }
                Err(e) => {
                    debug!("control accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = conns.join_next() => {}
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    let _ = std::fs::remove_file(&shared.config.control_path);
}

/// A request whose reply is not written yet: replies go out in request order.
enum Queued {
    Ready(Box<Reply>),
    Send(PendingSend),
}

fn sent_reply(r: Result<Accepted, ApiError>) -> Reply {
    match r {
        Ok(a) => Reply::Sent {
            id: a.id.to_string(),
            online: a.online,
        },
        Err(e) => e.into(),
    }
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Self {
        Reply::Error {
            code: e.code,
            message: e.message,
        }
    }
}

impl Queued {
    /// The reply if it is known without waiting.
    fn try_ready(&mut self) -> Option<Reply> {
        match self {
            Queued::Ready(r) => Some((**r).clone()),
            Queued::Send(p) => p.try_answer().map(sent_reply),
        }
    }

    async fn wait(&mut self) -> Reply {
        match self {
            Queued::Ready(r) => (**r).clone(),
            Queued::Send(p) => sent_reply(p.answer().await),
        }
    }
}

/// One control connection: reads requests, answers in request order.
/// `send` requests are pipelined — a client may write many before reading
/// the answers, and the daemon hands each to the relay as it reads it —
/// every other request waits until the sends before it are answered.
async fn handle(stream: UnixStream, shared: Arc<Shared>, cancel: CancellationToken) {
    let (r, mut w) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 * 1024, r);
    let mut leased = Leased::default();
    // The ping stream of this connection's last `ping`, for the next one.
    let mut pinger: Option<crate::Pinger> = None;
    let mut line = Vec::new();
    let mut queue: VecDeque<Queued> = VecDeque::new();
    let mut out: Vec<u8> = Vec::new();
    'conn: loop {
        // Answers that are known go out before we wait for anything.
        while let Some(r) = queue.front_mut().and_then(Queued::try_ready) {
            queue.pop_front();
            push_reply(&mut out, &r);
        }
        // Answers wait in `out` only while a whole request is already
        // buffered: never block on the socket with answers unsent (a client
        // that waits for them before writing the rest of a line would
        // otherwise wait forever).
        let whole_line = rd.buffer().contains(&b'\n');
        if !out.is_empty() && (!whole_line || queue.len() >= MAX_PIPELINED_SENDS) {
            if w.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        let room = (MAX_REQUEST_LINE + 1).saturating_sub(line.len()) as u64;
        let mut limited = (&mut rd).take(room);
        let n = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = async {
                match queue.front_mut() {
                    Some(q) => q.wait().await,
                    None => std::future::pending().await,
                }
            }, if !queue.is_empty() => {
                queue.pop_front();
                push_reply(&mut out, &r);
                continue;
            }
            n = limited.read_until(b'\n', &mut line), if queue.len() < MAX_PIPELINED_SENDS => n,
        };
        match n {
            Ok(0) if line.is_empty() => {
                // The client finished writing: answer what it asked, then end.
                if drain(&mut queue, &mut out, &cancel).await {
                    let _ = w.write_all(&out).await;
                }
                break;
            }
            Err(_) => break,
            Ok(_) if line.len() <= MAX_REQUEST_LINE && line.last() != Some(&b'\n') => {
                // End of input inside a line: take it as the last request.
            }
            Ok(_) => {}
        }
        if line.len() > MAX_REQUEST_LINE {
            let r = err(
                "request_too_large",
                format!("request exceeds {MAX_REQUEST_LINE} bytes"),
            );
            queue.push_back(Queued::Ready(Box::new(r)));
            if drain(&mut queue, &mut out, &cancel).await {
                let _ = w.write_all(&out).await;
            }
            break;
        }
        let req = serde_json::from_slice::<Request>(&line);
        line.clear();
        let req = match req {
            Err(e) => {
                queue.push_back(Queued::Ready(Box::new(err(
                    "bad_request",
                    format!("cannot parse request: {e}"),
                ))));
                continue;
            }
            Ok(Request::Send {
                to,
                body_b64,
                timeout_ms,
            }) => {
                let timeout = Duration::from_millis(timeout_ms).min(MAX_WAIT);
                let q = tokio::select! {
                    _ = cancel.cancelled() => break,
                    q = start_send(&shared, to, body_b64, timeout) => q,
                };
                queue.push_back(q);
                continue;
            }
            Ok(req) => req,
        };
        // Every other request answers after the sends before it.
        if !drain(&mut queue, &mut out, &cancel).await {
            break;
        }
        // It may wait (a long poll): what is answered goes out first.
        if !out.is_empty() {
            if w.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        match req {
            Request::Connect {
                to,
                port,
                timeout_ms,
                framed,
            } => {
                let wait = Duration::from_millis(timeout_ms).min(MAX_WAIT);
                match crate::streams::open(&shared, &to, port, wait).await {
                    Err(e) => push_reply(&mut out, &err(&e.code, e.message)),
                    Ok((send, recv)) => {
                        let ok = Reply::Connected {
                            to: to.clone(),
                            port,
                        };
                        push_reply(&mut out, &ok);
                        if w.write_all(&out).await.is_err() {
                            break 'conn;
                        }
                        // The control connection is the stream now.
                        let _open = crate::metrics::Open::new(&shared.metrics.streams_open);
                        let (mut rd, mut w) = (rd, w);
                        let s = if framed {
                            crate::splice::splice_framed(&mut rd, &mut w, send, recv, &to).await
                        } else {
                            crate::splice::splice(
                                &mut rd,
                                &mut w,
                                send,
                                recv,
                                crate::splice::Side::Caller,
                            )
                            .await
                        };
                        crate::streams::log_end(&to, port, &s);
                        leased.give_back(&shared);
                        return;
                    }
                }
            }
            Request::Watch { names, timeout_ms } => {
                let wait = Duration::from_millis(timeout_ms).min(MAX_WAIT);
                match crate::status::StatusWatcher::open(&shared, names, wait).await {
                    Err(e) => push_reply(&mut out, &err(&e.code, e.message)),
                    Ok(watcher) => {
                        push_reply(&mut out, &Reply::Watching {});
                        if w.write_all(&out).await.is_err() {
                            break 'conn;
                        }
                        watch_forward(rd, w, watcher).await;
                        leased.give_back(&shared);
                        return;
                    }
                }
            }
            Request::Ping { to, timeout_ms } => {
                let wait = Duration::from_millis(timeout_ms).min(MAX_WAIT);
                let r = tokio::select! {
                    _ = cancel.cancelled() => break 'conn,
                    r = ping(&shared, &mut pinger, &to, wait) => r,
                };
                push_reply(&mut out, &r);
            }
            req => {
                let r = answer(&shared, req, &mut leased, &cancel).await;
                push_reply(&mut out, &r);
            }
        }
    }
    // Whatever this connection took and did not acknowledge goes back.
    leased.give_back(&shared);
}

/// One ping, on this connection's ping stream to `to` if it has one.
async fn ping(
    shared: &Shared,
    pinger: &mut Option<crate::Pinger>,
    to: &str,
    wait: Duration,
) -> Reply {
    let same = match (pinger.as_ref(), swb_wire::normalize_name(to)) {
        (Some(p), Ok(n)) => p.peer() == n,
        _ => false,
    };
    if !same {
        *pinger = match crate::Pinger::open(shared, to, wait).await {
            Ok(p) => Some(p),
            Err(e) => return err(&e.code, e.message),
        };
    }
    let Some(p) = pinger.as_mut() else {
        return err("internal", "no ping stream");
    };
    match p.ping(wait).await {
        Ok(pong) => Reply::Pong {
            to: pong.to,
            rtt_us: pong.rtt.as_micros() as u64,
            via: pong.via,
        },
        Err(e) => {
            // The next ping opens a new stream.
            *pinger = None;
            err(&e.code, e.message)
        }
    }
}

/// Waits for every queued answer, in order, into `out`; false if the
/// daemon stops first.
async fn drain(
    queue: &mut VecDeque<Queued>,
    out: &mut Vec<u8>,
    cancel: &CancellationToken,
) -> bool {
    while let Some(q) = queue.front_mut() {
        let r = tokio::select! {
            _ = cancel.cancelled() => return false,
            r = q.wait() => r,
        };
        queue.pop_front();
        push_reply(out, &r);
    }
    true
}

fn push_reply(out: &mut Vec<u8>, r: &Reply) {
    if serde_json::to_writer(&mut *out, r).is_ok() {
        out.push(b'\n');
    }
}

/// Copies status updates to the CLI until the relay ends the watch or the
/// CLI goes away (then the watch stream is finished, which ends it there).
async fn watch_forward(
    mut rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut w: tokio::net::unix::OwnedWriteHalf,
    mut watcher: crate::status::StatusWatcher,
) {
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            f = watcher.next() => match f {
                Ok(Some(v)) => {
                    if write_reply(&mut w, &Reply::Update(v)).await.is_err() {
                        break;
                    }
                }
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
    drop(watcher);
}

async fn write_reply(w: &mut tokio::net::unix::OwnedWriteHalf, r: &Reply) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await
}

async fn answer(
    shared: &Arc<Shared>,
    req: Request,
    leased: &mut Leased,
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
            start_send(shared, to, body_b64, timeout).await.wait().await
        }
        Request::Recv { wait_ms, max } => {
            match leased
                .take(shared, max, Duration::from_millis(wait_ms), cancel)
                .await
            {
                Ok(got) => Reply::Messages {
                    messages: got
                        .iter()
                        .map(|d| InMessage {
                            id: d.id.to_string(),
                            from: d.from.clone(),
                            body_b64: base64::engine::general_purpose::STANDARD.encode(&d.body),
                            sent_at_ms: d.sent_at_ms,
                        })
                        .collect(),
                },
                Err(e) => e.into(),
            }
        }
        Request::Connect { .. } | Request::Watch { .. } | Request::Ping { .. } => {
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
                Ok(mut statuses) => {
                    crate::tun::annotate(shared, &mut statuses).await;
                    Reply::Statuses { statuses }
                }
                Err(e) => err(&e.code, e.message),
            }
        }
        Request::Ack { ids } => {
            let mut parsed = Vec::with_capacity(ids.len());
            for s in &ids {
                let Some(id) = MessageId::parse_hex(s) else {
                    return err("bad_request", format!("{s:?} is not a message id"));
                };
                parsed.push(id);
            }
            match leased.ack(shared, &parsed).await {
                Ok(acked) => Reply::Acked { acked },
                Err(e) => e.into(),
            }
        }
    }
}

/// Decodes a `send` request and hands it to the connection actor.
async fn start_send(
    shared: &Arc<Shared>,
    to: String,
    body_b64: String,
    timeout: Duration,
) -> Queued {
    let Ok(body) = base64::engine::general_purpose::STANDARD.decode(body_b64.as_bytes()) else {
        return Queued::Ready(Box::new(err("bad_request", "body_b64 is not valid base64")));
    };
    match api::submit(shared, &to, Bytes::from(body), timeout).await {
        Ok(p) => Queued::Send(p),
        Err(e) => Queued::Ready(Box::new(e.into())),
    }
}

fn status(shared: &Shared) -> StatusInfo {
    let st = shared.state.borrow().clone();
    let (rtt, carrier) = shared
        .conn
        .lock()
        .ok()
        .and_then(|c| {
            c.as_ref().map(|c| {
                (
                    c.rtt().as_secs_f64() * 1000.0,
                    shared.paths.carrier(c.remote_address()),
                )
            })
        })
        .unzip();
    let mut s = StatusInfo {
        state: String::new(),
        name: shared.config.name.clone(),
        relay: String::new(),
        relay_id: None,
        namespace: None,
        connected_since: None,
        rtt_ms: None,
        carrier: None,
        inbox: shared.inbox().len(),
        pending_sends: shared.pending_sends.load(Ordering::Relaxed),
        attempts: 0,
        last_error: None,
        relays: shared.relay_count.load(Ordering::Relaxed),
        tun: shared
            .tun
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|t| crate::control::TunInfo {
                interface: t.interface().to_string(),
                ipv4: t.addrs().0.to_string(),
                ipv6: t.addrs().1.to_string(),
                mtu: t.mtu(),
                offload: t.offload(),
            }),
        tun_error: shared
            .tun_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|e| e.reason.clone()),
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
            s.carrier = carrier.map(str::to_string);
        }
        ConnState::Stopped { error } => {
            s.state = "stopped".into();
            s.last_error = error;
        }
    }
    s
}
