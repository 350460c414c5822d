//! `swbd ping`: round trips to a peer through the relays, answered by the
//! peer's daemon itself (like `tailscale ping`).
//!
//! A ping is a stream to port [`PING_PORT`] of the peer: the relays route
//! and splice it like any stream (so it proves the same path ssh would
//! take), the target daemon answers `StreamReply`, then [`PingInfo`] with
//! the relay it is attached to, then a `Pong` for every `Ping`. The caller
//! measures from writing a `Ping` to reading its `Pong`. A stream stays open
//! for the next ping (the control connection keeps it), so only the first
//! pays for the setup.

use crate::streams::{read_frame, write_frame, StreamError};
use crate::{ConnState, Shared};
use std::time::Duration;
use swb_wire::{Code, Frame, Ping, PingInfo, PING_PORT};
use tracing::debug;

/// How long the echo service waits for the next ping before it closes.
pub const ECHO_IDLE: Duration = Duration::from_secs(30);
/// The least wait for the target's `PingInfo`.
const MIN_ANSWER_WAIT: Duration = Duration::from_secs(1);
/// Pings one echo stream answers at most.
pub const ECHO_MAX_PINGS: u32 = 10_000;

/// One answered ping.
#[derive(Debug, Clone, PartialEq)]
pub struct Pong {
    /// The peer pinged.
    pub to: String,
    /// Round trip, measured by this daemon.
    pub rtt: Duration,
    /// Relays on the way, in order (`["r1"]` on one relay, `["r2", "r3"]`
    /// across a mesh hop).
    pub via: Vec<String>,
}

/// An open ping stream to one peer.
#[derive(Debug)]
pub struct Pinger {
    to: String,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    via: Vec<String>,
    nonce: u64,
}

fn my_relay(shared: &Shared) -> String {
    match &*shared.state() {
        ConnState::Connected { welcome, .. } => welcome.relay_id.clone(),
        _ => String::new(),
    }
}

impl Pinger {
    /// Opens a ping stream to `to` (waiting up to `wait` for the relay
    /// connection and the answer).
    pub(crate) async fn open(
        shared: &Shared,
        to: &str,
        wait: Duration,
    ) -> Result<Self, StreamError> {
        let to = swb_wire::normalize_name(to)
            .map_err(|e| StreamError::new(Code::BAD_NAME.as_str(), format!("{e}: {to:?}")))?;
        let (send, mut recv) = crate::streams::open(shared, &to, PING_PORT, wait)
            .await
            .map_err(|e| {
                if e.code == Code::PORT_NOT_EXPOSED.as_str() {
                    StreamError::new(
                        "ping_unsupported",
                        format!("{to}'s daemon does not answer pings (an older swbd); upgrade it"),
                    )
                } else {
                    e
                }
            })?;
        let info = tokio::time::timeout(wait.max(MIN_ANSWER_WAIT), read_frame(&mut recv))
            .await
            .map_err(|_| timeout(&to))?
            .map_err(|e| lost(&to, &e.to_string()))?;
        let theirs = match info {
            Some(Frame::PingInfo(PingInfo { relay })) => relay,
            other => {
                return Err(lost(
                    &to,
                    &format!("expected PingInfo, got {:?}", other.map(|f| f.frame_type())),
                ))
            }
        };
        let mut via = vec![my_relay(shared)];
        if theirs != via[0] {
            via.push(theirs);
        }
        Ok(Self {
            to,
            send,
            recv,
            via,
            nonce: fastrand::u64(..),
        })
    }

    /// The peer this pinger pings.
    pub fn peer(&self) -> &str {
        &self.to
    }

    /// One round trip, within `wait`.
    pub async fn ping(&mut self, wait: Duration) -> Result<Pong, StreamError> {
        self.nonce = self.nonce.wrapping_add(1);
        let nonce = self.nonce;
        let started = tokio::time::Instant::now();
        let round = async {
            write_frame(&mut self.send, &Frame::Ping(Ping { nonce }))
                .await
                .map_err(|e| lost(&self.to, &String::from(e)))?;
            loop {
                match read_frame(&mut self.recv).await {
                    Ok(Some(Frame::Pong(p))) if p.nonce == nonce => return Ok(()),
                    // An answer to a ping that timed out before.
                    Ok(Some(Frame::Pong(_))) => continue,
                    Ok(Some(f)) => {
                        return Err(lost(&self.to, &format!("unexpected {:?}", f.frame_type())))
                    }
                    Ok(None) => return Err(lost(&self.to, "the peer closed the ping stream")),
                    Err(e) => return Err(lost(&self.to, &e.to_string())),
                }
            }
        };
        tokio::time::timeout(wait, round)
            .await
            .map_err(|_| timeout(&self.to))??;
        Ok(Pong {
            to: self.to.clone(),
            rtt: started.elapsed(),
            via: self.via.clone(),
        })
    }
}

fn timeout(to: &str) -> StreamError {
    StreamError::new(
        Code::TIMEOUT.as_str(),
        format!("no answer from {to} in time"),
    )
}

fn lost(to: &str, why: &str) -> StreamError {
    StreamError::new(
        "relay_error",
        format!("the ping stream to {to} broke: {why}"),
    )
}

/// Serves one ping stream opened to us: `PingInfo`, then a `Pong` per
/// `Ping`, until the caller finishes, goes quiet for [`ECHO_IDLE`], or has
/// sent [`ECHO_MAX_PINGS`].
pub(crate) async fn echo(
    shared: &Shared,
    from: &str,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let info = Frame::PingInfo(PingInfo {
        relay: my_relay(shared),
    });
    if write_frame(&mut send, &info).await.is_err() {
        return;
    }
    for _ in 0..ECHO_MAX_PINGS {
        match tokio::time::timeout(ECHO_IDLE, read_frame(&mut recv)).await {
            Ok(Ok(Some(Frame::Ping(p)))) => {
                if write_frame(&mut send, &Frame::Pong(p)).await.is_err() {
                    return;
                }
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(f))) => {
                debug!(%from, "ping stream: unexpected {:?}", f.frame_type());
                break;
            }
            Ok(Err(e)) => {
                debug!(%from, "ping stream: {e}");
                return;
            }
            Err(_) => break,
        }
    }
    let _ = send.finish();
}
