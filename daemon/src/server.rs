//! The control socket server. See [`crate::control`] for the protocol.

use crate::api;
use crate::api::{Accepted, ApiError, Leased, PendingBatch, PendingSend, MAX_WAIT};
use crate::compact::{self, CompactRequest};
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
use swb_wire::{Deliver, MessageId};
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
                    conns.spawn(shared.tasks.track_future(handle(s, shared.clone(), cancel.child_token())));
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

/// How a control connection's requests and answers are encoded: JSON lines
/// (the default), or compact frames once the client asked for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Json,
    Compact,
}

/// An answer before it is encoded: on a compact connection the answers to
/// `send`, `recv` and `ack` are binary frames, everything else is JSON.
#[derive(Debug)]
enum Out {
    Reply(Box<Reply>),
    Sent(Accepted),
    Acked(usize),
}

impl Codec {
    /// Appends the answer to a `recv`: `msgs`, encoded.
    fn push_messages(self, out: &mut Vec<u8>, msgs: &[Deliver]) {
        if self == Codec::Compact {
            compact::put_messages(out, msgs);
            return;
        }
        let r = Reply::Messages {
            messages: msgs
                .iter()
                .map(|d| InMessage {
                    id: d.id.to_string(),
                    from: d.from.clone(),
                    body_b64: base64::engine::general_purpose::STANDARD.encode(&d.body),
                    sent_at_ms: d.sent_at_ms,
                })
                .collect(),
        };
        if serde_json::to_writer(&mut *out, &r).is_ok() {
            out.push(b'\n');
        }
    }

    /// Appends `o`, encoded.
    fn push(self, out: &mut Vec<u8>, o: &Out) {
        if self == Codec::Compact {
            match o {
                Out::Reply(r) => compact::put_json(out, r),
                Out::Sent(a) => compact::put_sent(out, a),
                Out::Acked(n) => compact::put_acked(out, *n),
            }
            return;
        }
        let owned;
        let r: &Reply = match o {
            Out::Reply(r) => r,
            Out::Sent(a) => {
                owned = Reply::Sent {
                    id: a.id.to_string(),
                    online: a.online,
                };
                &owned
            }
            Out::Acked(n) => {
                owned = Reply::Acked { acked: *n };
                &owned
            }
        };
        if serde_json::to_writer(&mut *out, r).is_ok() {
            out.push(b'\n');
        }
    }

    /// Whether the next request is wholly read: `line` holds what was read
    /// of it so far, `buffered` what the socket reader holds after that.
    fn whole(self, line: &[u8], buffered: &[u8]) -> bool {
        match self {
            Codec::Json => buffered.contains(&b'\n'),
            Codec::Compact => compact::header(line, buffered)
                .is_some_and(|(_, len)| line.len() + buffered.len() >= compact::HEADER + len),
        }
    }
}

/// How reading the next request went.
enum Read {
    /// The client finished writing, between requests.
    End,
    /// A whole request is in the line buffer.
    Request,
    /// The request is larger than [`MAX_REQUEST_LINE`].
    TooLarge,
    /// The connection ended inside a compact frame.
    Truncated,
    /// The socket failed.
    Failed,
}

/// Reads the next request into `line`. Cancel-safe: what was read stays in
/// `line`, and the next call goes on from there.
async fn read_request(
    codec: Codec,
    rd: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    line: &mut Vec<u8>,
) -> Read {
    if codec == Codec::Json {
        let room = (MAX_REQUEST_LINE + 1).saturating_sub(line.len()) as u64;
        let mut limited = (&mut *rd).take(room);
        return match limited.read_until(b'\n', line).await {
            Err(_) => Read::Failed,
            Ok(0) if line.is_empty() => Read::End,
            Ok(_) if line.len() > MAX_REQUEST_LINE => Read::TooLarge,
            // Also end of input inside a line: taken as the last request.
            Ok(_) => Read::Request,
        };
    }
    loop {
        // The length is checked before the payload is read.
        let want = match compact::header(line, &[]) {
            Some((_, len)) if len > MAX_REQUEST_LINE => return Read::TooLarge,
            Some((_, len)) if line.len() == compact::HEADER + len => return Read::Request,
            Some((_, len)) => compact::HEADER + len,
            None => compact::HEADER,
        };
        let avail = match rd.fill_buf().await {
            Ok(a) => a,
            Err(_) => return Read::Failed,
        };
        if avail.is_empty() {
            return if line.is_empty() {
                Read::End
            } else {
                Read::Truncated
            };
        }
        let k = (want - line.len()).min(avail.len());
        line.extend_from_slice(&avail[..k]);
        rd.consume(k);
    }
}

/// A request, decoded from either encoding: `send`, `recv` and `ack` in
/// their binary form, everything else (also `compact`) as JSON.
type Op = CompactRequest;

/// Decodes one request read whole into `line`.
fn parse(codec: Codec, line: &[u8]) -> Result<Op, Box<Reply>> {
    let req = match codec {
        Codec::Json => serde_json::from_slice::<Request>(line)
            .map_err(|e| Box::new(err("bad_request", format!("cannot parse request: {e}"))))?,
        Codec::Compact => {
            let (kind, _) = compact::header(line, &[]).unwrap_or_default();
            let payload = line.get(compact::HEADER..).unwrap_or_default();
            match compact::request(kind, payload).map_err(|e| Box::new(err("bad_request", e.0)))? {
                CompactRequest::Json(
                    Request::Send { .. } | Request::Recv { .. } | Request::Ack { .. },
                ) => {
                    return Err(Box::new(err(
                        "bad_request",
                        "on a compact connection send, recv and ack have their own frames (kinds 1, 2 and 3), not JSON",
                    )))
                }
                CompactRequest::Json(Request::Compact { .. }) => {
                    return Err(Box::new(err(
                        "bad_request",
                        "this connection is compact already",
                    )))
                }
                CompactRequest::Json(req) => req,
                binary => return Ok(binary),
            }
        }
    };
    Ok(match req {
        Request::Send {
            to,
            body_b64,
            timeout_ms,
        } => {
            let Ok(body) = base64::engine::general_purpose::STANDARD.decode(body_b64.as_bytes())
            else {
                return Err(Box::new(err("bad_request", "body_b64 is not valid base64")));
            };
            Op::Send {
                to,
                body: Bytes::from(body),
                timeout: Duration::from_millis(timeout_ms),
            }
        }
        Request::Recv { wait_ms, max } => Op::Recv {
            wait: Duration::from_millis(wait_ms),
            max,
        },
        Request::Ack { ids } => {
            let mut parsed = Vec::with_capacity(ids.len());
            for s in &ids {
                let Some(id) = MessageId::parse_hex(s) else {
                    return Err(Box::new(err(
                        "bad_request",
                        format!("{s:?} is not a message id"),
                    )));
                };
                parsed.push(id);
            }
            Op::Ack(parsed)
        }
        req => Op::Json(req),
    })
}

/// A request whose answer is not written yet: answers go out in request
/// order.
enum Queued {
    Ready(Box<Reply>),
    Send(PendingSend),
    /// Sends read together and handed over as one batch (see
    /// [`SEND_BATCH`]); their answers, in order, once the relay has
    /// answered every one.
    Batch(PendingBatch, VecDeque<Out>),
}

/// Sends read together from one control connection (each a whole request
/// in the read buffer, with the same timeout) are handed to the relay
/// connection as one batch of up to this many: one registration, one
/// write and one answer for them all.
const SEND_BATCH: usize = 64;

fn reply_out(r: Reply) -> Out {
    Out::Reply(Box::new(r))
}

fn sent_out(r: Result<Accepted, ApiError>) -> Out {
    match r {
        Ok(a) => Out::Sent(a),
        Err(e) => reply_out(e.into()),
    }
}

/// A batch's answers, one for each of its `n` sends.
fn batch_outs(n: usize, r: Result<Vec<Result<Accepted, ApiError>>, ApiError>) -> VecDeque<Out> {
    match r {
        Ok(v) => v.into_iter().map(sent_out).collect(),
        Err(e) => (0..n).map(|_| reply_out(e.clone().into())).collect(),
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
    /// The requests this entry answers.
    fn len(&self) -> usize {
        match self {
            Queued::Ready(_) | Queued::Send(_) => 1,
            Queued::Batch(p, _) => p.ids().len(),
        }
    }

    /// The next answer if it is known without waiting, and whether it is
    /// this entry's last.
    fn try_next(&mut self) -> Option<(Out, bool)> {
        match self {
            Queued::Ready(r) => Some((Out::Reply(r.clone()), true)),
            Queued::Send(p) => p.try_answer().map(|r| (sent_out(r), true)),
            Queued::Batch(p, answers) => {
                if answers.is_empty() {
                    *answers = batch_outs(p.ids().len(), p.try_answer()?);
                }
                next_of(answers)
            }
        }
    }

    /// The next answer, and whether it is this entry's last.
    async fn next(&mut self) -> (Out, bool) {
        match self {
            Queued::Ready(r) => (Out::Reply(r.clone()), true),
            Queued::Send(p) => (sent_out(p.answer().await), true),
            Queued::Batch(p, answers) => {
                if answers.is_empty() {
                    *answers = batch_outs(p.ids().len(), p.answer().await);
                }
                next_of(answers).unwrap_or_else(|| {
                    let e = err("internal", "a batch of sends without answers");
                    (reply_out(e), true)
                })
            }
        }
    }
}

/// The front of a batch's answers, and whether it was the last.
fn next_of(answers: &mut VecDeque<Out>) -> Option<(Out, bool)> {
    let o = answers.pop_front()?;
    Some((o, answers.is_empty()))
}

/// The answers waiting to go out on one control connection, in request
/// order, and how many requests they answer.
#[derive(Default)]
struct Answers {
    queue: VecDeque<Queued>,
    waiting: usize,
}

impl Answers {
    fn push(&mut self, q: Queued) {
        self.waiting += q.len();
        self.queue.push_back(q);
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether another send may be read ([`MAX_PIPELINED_SENDS`]).
    fn has_room(&self) -> bool {
        self.waiting < MAX_PIPELINED_SENDS
    }

    /// The front answer, if known without waiting.
    fn try_pop(&mut self) -> Option<Out> {
        let (o, last) = self.queue.front_mut()?.try_next()?;
        self.popped(last);
        Some(o)
    }

    /// The front answer, when known (pending forever while none waits).
    /// Cancel-safe: an answer taken is returned.
    async fn pop(&mut self) -> Out {
        let Some(q) = self.queue.front_mut() else {
            return std::future::pending().await;
        };
        let (o, last) = q.next().await;
        self.popped(last);
        o
    }

    fn popped(&mut self, last: bool) {
        self.waiting -= 1;
        if last {
            self.queue.pop_front();
        }
    }
}

/// What the connection loop goes on with: a read's outcome, or a request
/// read (and parsed) already while gathering a batch of sends.
enum Next {
    Read(Read),
    Op(Result<Op, Box<Reply>>),
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
    let mut codec = Codec::Json;
    let mut line = Vec::new();
    let mut queue = Answers::default();
    let mut out: Vec<u8> = Vec::new();
    // A request read while gathering a batch of sends, to go on with.
    let mut carried: Option<Next> = None;
    'conn: loop {
        // Answers that are known go out before we wait for anything.
        while let Some(r) = queue.try_pop() {
            codec.push(&mut out, &r);
        }
        let next = match carried.take() {
            Some(next) => next,
            None => {
                // Answers wait in `out` only while a whole request is
                // already buffered: never block on the socket with answers
                // unsent (a client that waits for them before writing the
                // rest of a request would otherwise wait forever).
                let whole = codec.whole(&line, rd.buffer());
                if !out.is_empty() && (!whole || !queue.has_room()) {
                    if w.write_all(&out).await.is_err() {
                        break;
                    }
                    out.clear();
                }
                Next::Read(if whole && queue.has_room() {
                    // A whole request is buffered: reading it does not
                    // wait, so neither the front answer nor cancellation is
                    // polled for it (the next request that does wait polls
                    // both).
                    read_request(codec, &mut rd, &mut line).await
                } else {
                    let room = queue.has_room();
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => break,
                        r = queue.pop(), if !queue.is_empty() => {
                            codec.push(&mut out, &r);
                            continue;
                        }
                        r = read_request(codec, &mut rd, &mut line), if room => r,
                    }
                })
            }
        };
        let op = match next {
            Next::Op(op) => op,
            Next::Read(read) => {
                let last = match read {
                    Read::Request => None,
                    Read::Failed => break,
                    Read::End => Some(None),
                    Read::TooLarge => Some(Some(err(
                        "request_too_large",
                        format!("request exceeds {MAX_REQUEST_LINE} bytes"),
                    ))),
                    Read::Truncated => Some(Some(err(
                        "bad_request",
                        "the connection ended inside a compact frame",
                    ))),
                };
                if let Some(refusal) = last {
                    // The client finished writing (or broke the framing):
                    // answer what it asked, then end.
                    if let Some(r) = refusal {
                        queue.push(Queued::Ready(Box::new(r)));
                    }
                    if drain(&mut queue, &mut out, codec, &cancel).await {
                        let _ = w.write_all(&out).await;
                    }
                    break;
                }
                let op = parse(codec, &line);
                line.clear();
                op
            }
        };
        let op = match op {
            Err(r) => {
                queue.push(Queued::Ready(r));
                continue;
            }
            Ok(Op::Send { to, body, timeout }) => {
                // Further sends already buffered whole, with the same
                // timeout, go with this one as a batch (reading them does
                // not wait); the first other request is carried over.
                let mut sends = vec![(to, body)];
                while sends.len() < SEND_BATCH
                    && queue.waiting + sends.len() < MAX_PIPELINED_SENDS
                    && codec.whole(&line, rd.buffer())
                {
                    let read = read_request(codec, &mut rd, &mut line).await;
                    if !matches!(read, Read::Request) {
                        carried = Some(Next::Read(read));
                        break;
                    }
                    let op = parse(codec, &line);
                    line.clear();
                    match op {
                        Ok(Op::Send {
                            to,
                            body,
                            timeout: t,
                        }) if t == timeout => sends.push((to, body)),
                        op => {
                            carried = Some(Next::Op(op));
                            break;
                        }
                    }
                }
                // The sends first: they are almost always handed over at
                // once, and then the cancellation's waiter is never
                // registered (a lock, and another to remove it, per send).
                let qs = tokio::select! {
                    biased;
                    qs = start_sends(&shared, sends, timeout.min(MAX_WAIT)) => qs,
                    _ = cancel.cancelled() => break,
                };
                for q in qs {
                    queue.push(q);
                }
                continue;
            }
            Ok(op) => op,
        };
        // Every other request answers after the sends before it.
        if !drain(&mut queue, &mut out, codec, &cancel).await {
            break;
        }
        // It may wait (a long poll): what is answered goes out first.
        if !out.is_empty() {
            if w.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        match op {
            Op::Json(Request::Compact { version }) => {
                if version == 0 {
                    let r = err("bad_request", "compact versions start at 1");
                    codec.push(&mut out, &reply_out(r));
                } else {
                    // The highest version both sides speak; the answer is
                    // the last JSON line of this connection.
                    let version = version.min(compact::VERSION);
                    codec.push(&mut out, &reply_out(Reply::Compact { version }));
                    codec = Codec::Compact;
                }
            }
            Op::Json(Request::Connect {
                to,
                port,
                timeout_ms,
                framed,
            }) => {
                let wait = Duration::from_millis(timeout_ms).min(MAX_WAIT);
                match crate::streams::open(&shared, &to, port, wait).await {
                    Err(e) => codec.push(&mut out, &reply_out(err(&e.code, e.message))),
                    Ok((send, recv)) => {
                        let ok = Reply::Connected {
                            to: to.clone(),
                            port,
                        };
                        codec.push(&mut out, &reply_out(ok));
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
            Op::Json(Request::Watch { names, timeout_ms }) => {
                let wait = Duration::from_millis(timeout_ms).min(MAX_WAIT);
                match crate::status::StatusWatcher::open(&shared, names, wait).await {
                    Err(e) => codec.push(&mut out, &reply_out(err(&e.code, e.message))),
                    Ok(watcher) => {
                        codec.push(&mut out, &reply_out(Reply::Watching {}));
                        if w.write_all(&out).await.is_err() {
                            break 'conn;
                        }
                        watch_forward(rd, w, watcher, codec).await;
                        leased.give_back(&shared);
                        return;
                    }
                }
            }
            Op::Json(Request::Ping { to, timeout_ms }) => {
                let wait = Duration::from_millis(timeout_ms).min(MAX_WAIT);
                let r = tokio::select! {
                    _ = cancel.cancelled() => break 'conn,
                    r = ping(&shared, &mut pinger, &to, wait) => r,
                };
                codec.push(&mut out, &reply_out(r));
            }
            op => answer(&shared, op, &mut leased, &cancel, codec, &mut out).await,
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
    queue: &mut Answers,
    out: &mut Vec<u8>,
    codec: Codec,
    cancel: &CancellationToken,
) -> bool {
    while !queue.is_empty() {
        let r = tokio::select! {
            _ = cancel.cancelled() => return false,
            r = queue.pop() => r,
        };
        codec.push(out, &r);
    }
    true
}

/// Copies status updates to the CLI until the relay ends the watch or the
/// CLI goes away (then the watch stream is finished, which ends it there).
async fn watch_forward(
    mut rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut w: tokio::net::unix::OwnedWriteHalf,
    mut watcher: crate::status::StatusWatcher,
    codec: Codec,
) {
    let mut probe = [0u8; 64];
    let mut out = Vec::new();
    loop {
        let r = tokio::select! {
            f = watcher.next() => match f {
                Ok(Some(v)) => Reply::Update(v),
                Ok(None) => break,
                Err(e) => {
                    out.clear();
                    codec.push(&mut out, &reply_out(err(&e.code, e.message)));
                    let _ = w.write_all(&out).await;
                    break;
                }
            },
            r = rd.read(&mut probe) => {
                if !matches!(r, Ok(n) if n > 0) {
                    break;
                }
                continue;
            }
        };
        out.clear();
        codec.push(&mut out, &reply_out(r));
        if w.write_all(&out).await.is_err() {
            break;
        }
    }
    drop(watcher);
}

/// Answers `op` into `out`.
async fn answer(
    shared: &Arc<Shared>,
    op: Op,
    leased: &mut Leased,
    cancel: &CancellationToken,
    codec: Codec,
    out: &mut Vec<u8>,
) {
    let o = match op {
        // Encoded from the leased messages where they are: no copy of them.
        Op::Recv { wait, max } => match leased.take(shared, max, wait, cancel).await {
            Ok(got) => return codec.push_messages(out, got),
            Err(e) => reply_out(e.into()),
        },
        Op::Send { to, body, timeout } => {
            start_send(shared, to, body, timeout.min(MAX_WAIT))
                .await
                .next()
                .await
                .0
        }
        Op::Ack(ids) => match leased.ack(shared, &ids).await {
            Ok(acked) => Out::Acked(acked),
            Err(e) => reply_out(e.into()),
        },
        Op::Json(req) => answer_json(shared, req).await,
    };
    codec.push(out, &o);
}

/// Answers a request of the JSON kind.
async fn answer_json(shared: &Arc<Shared>, req: Request) -> Out {
    reply_out(match req {
        Request::Status => Reply::Status(Box::new(status(shared))),
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
                return reply_out(err("bad_request", "name at least one peer"));
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
        Request::Send { .. }
        | Request::Recv { .. }
        | Request::Ack { .. }
        | Request::Compact { .. }
        | Request::Connect { .. }
        | Request::Watch { .. }
        | Request::Ping { .. } => err("bad_request", "handled by the connection loop"),
    })
}

/// Hands a send to the connection actor.
async fn start_send(shared: &Arc<Shared>, to: String, body: Bytes, timeout: Duration) -> Queued {
    match api::submit(shared, &to, body, timeout).await {
        Ok(p) => Queued::Send(p),
        Err(e) => Queued::Ready(Box::new(e.into())),
    }
}

/// Hands sends read together to the connection actor: as one batch, or one
/// by one if one of them is bad (each request gets its own answer).
async fn start_sends(
    shared: &Arc<Shared>,
    mut sends: Vec<(String, Bytes)>,
    timeout: Duration,
) -> Vec<Queued> {
    if sends.len() == 1 {
        if let Some((to, body)) = sends.pop() {
            return vec![start_send(shared, to, body, timeout).await];
        }
    }
    let n = sends.len();
    // (A named function: with a closure the future is not `Send`.)
    fn pair((to, body): &(String, Bytes)) -> (&str, Bytes) {
        (to, body.clone())
    }
    match api::submit_batch(shared, sends.iter().map(pair), timeout).await {
        Ok(p) => vec![Queued::Batch(p, VecDeque::new())],
        // A bad request among them: checked before anything was handed
        // over, so each goes alone and gets its own answer.
        Err(e) if e.code == "bad_name" || e.code == "body_too_large" => {
            let mut qs = Vec::with_capacity(n);
            for (to, body) in sends {
                qs.push(start_send(shared, to, body, timeout).await);
            }
            qs
        }
        // Not connected in time, stopping: the same for every one.
        Err(e) => (0..n)
            .map(|_| Queued::Ready(Box::new(e.clone().into())))
            .collect(),
    }
}

fn status(shared: &Shared) -> StatusInfo {
    let st = shared.state().clone();
    let path = shared.conn.lock().ok().and_then(|c| {
        c.as_ref().map(|c| {
            let stats = c.stats();
            let traffic = crate::control::Traffic {
                sent_packets: stats.udp_tx.datagrams,
                sent_bytes: stats.udp_tx.bytes,
                received_packets: stats.udp_rx.datagrams,
                received_bytes: stats.udp_rx.bytes,
                lost_packets: stats.path.lost_packets,
                congestion_events: stats.path.congestion_events,
            };
            (
                c.rtt().as_secs_f64() * 1000.0,
                shared.paths.carrier(c.remote_address()),
                stats.path.current_mtu,
                traffic,
            )
        })
    });
    let mut s = StatusInfo {
        state: String::new(),
        name: shared.config.name.clone(),
        relay: String::new(),
        relay_id: None,
        namespace: None,
        connected_since: None,
        rtt_ms: None,
        carrier: None,
        path_mtu: None,
        traffic: None,
        inbox: shared.inbox().len(),
        pending_sends: shared.pending_sends.load(Ordering::Relaxed) + shared.out.registered_len(),
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
            if let Some((rtt, carrier, mtu, traffic)) = path {
                s.rtt_ms = Some(rtt);
                s.carrier = Some(carrier.to_string());
                s.path_mtu = Some(mtu);
                s.traffic = Some(traffic);
            }
        }
        ConnState::Stopped { error } => {
            s.state = "stopped".into();
            s.last_error = error;
        }
    }
    s
}
