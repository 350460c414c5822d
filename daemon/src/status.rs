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
        Self {
            name: u.name,
            version: u.version,
            online: u.online,
            since: time(u.since_ms),
            updated: time(u.updated_ms),
            status: u.fields.into_iter().collect(),
            lagged: u.lagged,
            tun: None,
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

async fn publish_locked(
    shared: &Shared,
    own: &OwnStatus,
    wait: Duration,
) -> Result<StatusUpdate, StreamError> {
    let change = SetStatus {
        set: own
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        clear: Vec::new(),
        replace: true,
    };
    let (_send, mut recv) = open(shared, Frame::SetStatus(change), wait).await?;
    match next_frame(&mut recv).await? {
        Some(Frame::StatusUpdate(u)) => Ok(u),
        _ => Err(lost("no status in the answer")),
    }
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
    let u = publish_locked(shared, &own, wait).await?;
    Ok((u.into(), true))
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
}
