//! Status on the daemon side: this peer's own status (kept here and
//! republished after every reconnect, so a relay restart loses nothing),
//! and reading / watching other peers' status through status streams.

use crate::streams::{connection, read_header, write_frame, StreamError};
use crate::Shared;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Time the relay has to answer a status stream.
const STATUS_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// How long republishing after a reconnect waits for the connection.
const REPUBLISH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
use std::time::{Duration, UNIX_EPOCH};
use swb_wire::{Code, Frame, SetStatus, StatusUpdate, StatusWatch, StreamReply};

/// This peer's status as the daemon keeps it.
#[derive(Debug, Default)]
pub(crate) struct OwnStatus {
    fields: BTreeMap<String, String>,
    /// Whether `set-status` was ever used (only then is it published).
    touched: bool,
    /// The publisher stream on the current connection, once opened.
    publisher: Option<Publisher>,
}

/// A waiter for the relay's answer to one change on the publisher stream.
type Answer = tokio::sync::oneshot::Sender<Result<StatusUpdate, StreamError>>;

/// One status stream a connection's changes all go on, written in the
/// order they were made (under the [`OwnStatus`] lock) and answered in
/// order, so `set-status` calls need not wait for each other's round trip
/// and the relay still applies them in order.
#[derive(Debug)]
struct Publisher {
    /// `stable_id` of the connection it is on.
    conn: usize,
    send: quinn::SendStream,
    /// Waiters, in the order of the changes written.
    answers: tokio::sync::mpsc::UnboundedSender<Answer>,
}

/// Hands the answers on a publisher stream to their waiters, in order;
/// ends when the stream fails, the connection closes or the publisher is
/// dropped (waiters left then see their sender gone).
async fn answer_waiters(
    conn: quinn::Connection,
    recv: quinn::RecvStream,
    mut waiters: tokio::sync::mpsc::UnboundedReceiver<Answer>,
) {
    // Buffered: the relay answers a run of changes at once.
    let mut recv = swb_quic::FrameStream::new(recv, swb_wire::MAX_STREAM_HEADER);
    loop {
        let w = tokio::select! {
            _ = conn.closed() => return,
            w = waiters.recv() => match w {
                Some(w) => w,
                None => return,
            },
        };
        let answer = tokio::select! {
            _ = conn.closed() => return,
            a = tokio::time::timeout(STATUS_ANSWER_TIMEOUT, recv.next()) => a.map(|r| r.map_err(lost)),
        };
        let (r, go_on) = match answer {
            Ok(Ok(Some(Frame::StatusUpdate(u)))) => (Ok(u), true),
            // Refused (namespace full, store failed): that change only.
            Ok(Ok(Some(Frame::StreamReply(StreamReply { refusal: Some(r) })))) => {
                (Err(r.into()), true)
            }
            Ok(Ok(_)) => (Err(lost("the status stream ended")), false),
            Ok(Err(e)) => (Err(e), false),
            Err(_) => (
                Err(StreamError {
                    code: Code::TIMEOUT.as_str().into(),
                    message: "the relay did not answer in time".into(),
                }),
                false,
            ),
        };
        let _ = w.send(r);
        if !go_on {
            return;
        }
    }
}

/// A peer's status as the CLI shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    /// Peer name.
    pub name: String,
    /// Grows with every change; 0: a name nobody holds.
    pub version: u64,
    /// Attached now.
    pub online: bool,
    /// When presence last changed (RFC 3339).
    pub since: Option<String>,
    /// When the status last changed (RFC 3339).
    pub updated: Option<String>,
    /// The status.
    pub status: BTreeMap<String, String>,
    /// This watcher missed updates; this is the newest value.
    #[serde(default)]
    pub lagged: bool,
    /// The peer's TUN addresses (`swbd peers`, when this daemon runs TUN
    /// and the peer has them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tun: Option<crate::control::TunAddrs>,
}

fn time(ms: u64) -> Option<String> {
    // A relay's times are input: one past year 9999 is written as the last
    // instant RFC 3339 has (formatting it would panic).
    const RFC3339_MAX_MS: u64 = 253_402_300_799_999;
    (ms > 0).then(|| {
        let ms = ms.min(RFC3339_MAX_MS);
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    })
}

impl From<StatusUpdate> for StatusView {
    fn from(u: StatusUpdate) -> Self {
        let (since, updated) = (time(u.since_ms), time(u.updated_ms));
        Self::with_times(u, since, updated)
    }
}

impl StatusView {
    /// `u` with its two instants already written (RFC 3339).
    fn with_times(u: StatusUpdate, since: Option<String>, updated: Option<String>) -> Self {
        Self {
            name: u.name,
            version: u.version,
            online: u.online,
            since,
            updated,
            status: u.fields,
            lagged: u.lagged,
            tun: None,
        }
    }
}

/// The last time written, kept to write the same instant again without
/// formatting it: a watched peer's `since` stays put across its changes,
/// and changes made in the same millisecond share `updated`.
#[derive(Debug, Default)]
struct LastTime(Option<(u64, Option<String>)>);

impl LastTime {
    fn time(&mut self, ms: u64) -> Option<String> {
        match &self.0 {
            Some((last, t)) if *last == ms => t.clone(),
            _ => {
                let t = time(ms);
                self.0 = Some((ms, t.clone()));
                t
            }
        }
    }
}

fn lost(e: impl std::fmt::Display) -> StreamError {
    StreamError {
        code: "relay_error".into(),
        message: format!("the relay connection failed: {e}"),
    }
}

/// Reads the next frame, or `None` at the end of the stream.
pub(crate) async fn next_frame(recv: &mut quinn::RecvStream) -> Result<Option<Frame>, StreamError> {
    crate::streams::read_frame(recv).await.map_err(lost)
}

/// Opens a status stream with `first` and waits for the relay's answer.
pub(crate) async fn open(
    shared: &Shared,
    first: Frame,
    wait: Duration,
) -> Result<(quinn::SendStream, quinn::RecvStream), StreamError> {
    let conn = connection(shared, wait).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(lost)?;
    write_frame(&mut send, &first).await.map_err(lost)?;
    let reply = tokio::time::timeout(STATUS_ANSWER_TIMEOUT, read_header(&mut recv))
        .await
        .map_err(|_| StreamError {
            code: Code::TIMEOUT.as_str().into(),
            message: "the relay did not answer in time".into(),
        })?
        .map_err(lost)?;
    match reply {
        Frame::StreamReply(StreamReply { refusal: None }) => Ok((send, recv)),
        Frame::StreamReply(StreamReply { refusal: Some(r) }) => Err(r.into()),
        other => Err(lost(format!("unexpected {:?}", other.frame_type()))),
    }
}

/// The whole status as one change (so any answer leaves the relay with
/// exactly what the daemon holds).
fn whole(own: &OwnStatus) -> SetStatus {
    SetStatus {
        set: own
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        clear: Vec::new(),
        replace: true,
    }
}

/// Publishes the whole status on a stream of its own and waits.
async fn publish_locked(
    shared: &Shared,
    own: &OwnStatus,
    wait: Duration,
) -> Result<StatusUpdate, StreamError> {
    let (_send, mut recv) = open(shared, Frame::SetStatus(whole(own)), wait).await?;
    match next_frame(&mut recv).await? {
        Some(Frame::StatusUpdate(u)) => Ok(u),
        _ => Err(lost("no status in the answer")),
    }
}

/// What publishing on the publisher stream gave.
enum Published {
    /// The stream was opened with this change: its answer.
    Now(StatusUpdate),
    /// Written on the open stream: the answer comes here.
    Later(tokio::sync::oneshot::Receiver<Result<StatusUpdate, StreamError>>),
}

/// Writes the whole status on the connection's publisher stream (opening
/// it, and waiting for that first answer, if there is none yet).
async fn publish_pipelined(
    shared: &Shared,
    own: &mut OwnStatus,
    wait: Duration,
) -> Result<Published, StreamError> {
    let conn = connection(shared, wait).await?;
    if own
        .publisher
        .as_ref()
        .is_some_and(|p| p.conn != conn.stable_id() || p.answers.is_closed())
    {
        own.publisher = None;
    }
    let change = Frame::SetStatus(whole(own));
    let Some(p) = own.publisher.as_mut() else {
        let (send, mut recv) = open(shared, change, wait).await?;
        let u = match next_frame(&mut recv).await? {
            Some(Frame::StatusUpdate(u)) => u,
            _ => return Err(lost("no status in the answer")),
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        shared.tasks.spawn(answer_waiters(conn.clone(), recv, rx));
        own.publisher = Some(Publisher {
            conn: conn.stable_id(),
            send,
            answers: tx,
        });
        return Ok(Published::Now(u));
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if p.answers.send(tx).is_err() || write_frame(&mut p.send, &change).await.is_err() {
        own.publisher = None;
        return Err(lost("the status stream failed"));
    }
    Ok(Published::Later(rx))
}

/// Applies a change to this peer's status and publishes it. Returns the
/// published view, or the local one and `false` when the daemon has no
/// relay connection within `wait` (it publishes on reconnect).
pub(crate) async fn set(
    shared: &Shared,
    set: BTreeMap<String, String>,
    clear: Vec<String>,
    wait: Duration,
) -> Result<(StatusView, bool), StreamError> {
    let mut own = shared.own_status.lock().await;
    let change = SetStatus {
        set: set.into_iter().collect(),
        clear,
        replace: false,
    };
    let next = swb_wire::apply_status(&own.fields, &change)?;
    own.fields = next;
    own.touched = true;
    if connection(shared, wait).await.is_err() {
        let view = StatusView {
            name: shared.config.name.clone(),
            version: 0,
            online: false,
            since: None,
            updated: None,
            status: own.fields.clone(),
            lagged: false,
            tun: None,
        };
        return Ok((view, false));
    }
    // On the publisher stream: the next change need not wait for this
    // one's answer. If that stream fails (the connection went, or a relay
    // that answers one change per stream), the whole status goes on a
    // stream of its own, which leaves the relay with what is held here.
    let published = match publish_pipelined(shared, &mut own, wait).await {
        Ok(Published::Now(u)) => Some(u),
        Ok(Published::Later(rx)) => {
            drop(own);
            match rx.await {
                Ok(Ok(u)) => Some(u),
                Ok(Err(e)) if e.code != "relay_error" && e.code != Code::TIMEOUT.as_str() => {
                    return Err(e)
                }
                _ => None,
            }
        }
        Err(_) => {
            drop(own);
            None
        }
    };
    let u = match published {
        Some(u) => u,
        None => {
            let mut own = shared.own_status.lock().await;
            own.publisher = None;
            publish_locked(shared, &own, wait).await?
        }
    };
    Ok((u.into(), true))
}

/// A watch of peers' status (from [`crate::DaemonHandle::watch`]): their
/// current values, then every change, as the relay publishes them; a
/// watcher that reads slowly gets the newest value marked `lagged`.
/// Dropping it ends the watch at the relay.
#[derive(Debug)]
pub struct StatusWatcher {
    _send: quinn::SendStream,
    /// Buffered: the relay writes many changes at once.
    recv: swb_quic::FrameStream,
    since: LastTime,
    updated: LastTime,
}

impl StatusWatcher {
    pub(crate) async fn open(
        shared: &Shared,
        names: Vec<String>,
        wait: Duration,
    ) -> Result<Self, StreamError> {
        if names.is_empty() {
            return Err(StreamError::new(
                "bad_request",
                "name at least one peer to watch",
            ));
        }
        let first = Frame::StatusWatch(StatusWatch { names, once: false });
        let (send, recv) = open(shared, first, wait).await?;
        Ok(Self {
            _send: send,
            recv: swb_quic::FrameStream::new(recv, swb_wire::MAX_STREAM_HEADER),
            since: LastTime::default(),
            updated: LastTime::default(),
        })
    }

    /// The next value; `None` when the relay ended the watch (the
    /// connection went: watch again).
    pub async fn next(&mut self) -> Result<Option<StatusView>, StreamError> {
        loop {
            match self.recv.next().await.map_err(lost)? {
                Some(Frame::StatusUpdate(u)) => {
                    let since = self.since.time(u.since_ms);
                    let updated = self.updated.time(u.updated_ms);
                    return Ok(Some(StatusView::with_times(u, since, updated)));
                }
                Some(_) => continue,
                None => return Ok(None),
            }
        }
    }
}

/// After a (re)connect: publish this peer's status if it has one.
pub(crate) async fn republish(shared: &Shared) {
    let own = shared.own_status.lock().await;
    if !own.touched {
        return;
    }
    if let Err(e) = publish_locked(shared, &own, REPUBLISH_WAIT).await {
        tracing::warn!("could not republish this peer's status: {}", e.message);
    }
}

/// Current status of `names`.
pub(crate) async fn get(
    shared: &Shared,
    names: Vec<String>,
    wait: Duration,
) -> Result<Vec<StatusView>, StreamError> {
    let n = names.len();
    let (_send, mut recv) = open(
        shared,
        Frame::StatusWatch(StatusWatch { names, once: true }),
        wait,
    )
    .await?;
    let mut out = Vec::with_capacity(n);
    while let Some(f) = next_frame(&mut recv).await? {
        if let Frame::StatusUpdate(u) = f {
            out.push(u.into());
        }
    }
    Ok(out)
}

/// Every known peer of the namespace.
pub(crate) async fn peers(shared: &Shared, wait: Duration) -> Result<Vec<StatusView>, StreamError> {
    let (_send, mut recv) = open(shared, Frame::PeersQuery, wait).await?;
    let mut out = Vec::new();
    while let Some(f) = next_frame(&mut recv).await? {
        if let Frame::StatusUpdate(u) = f {
            out.push(u.into());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_time_past_year_9999_is_written_not_a_panic() {
        assert_eq!(
            super::time(u64::MAX).as_deref(),
            Some("9999-12-31T23:59:59.999Z")
        );
        assert_eq!(super::time(0), None);
    }

    #[test]
    fn a_kept_time_is_written_as_the_instant_asked_for() {
        let mut last = super::LastTime::default();
        for ms in [
            0,
            1_700_000_000_000,
            1_700_000_000_000,
            1_700_000_000_001,
            0,
            5,
        ] {
            assert_eq!(last.time(ms), super::time(ms), "{ms}");
        }
    }
}
