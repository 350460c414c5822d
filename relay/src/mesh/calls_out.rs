//! Typed calls to another relay, each on its own stream of the link:
//! forward a message (`MeshForward`), open a stream (`MeshStreamOpen`),
//! receive / acknowledge / set status for a peer homed there (`MeshCall`),
//! and status queries (`MeshStatusQuery`). Every call is bounded in time.

use super::links::read_frame;
use super::{LinkUse, Mesh};
use crate::services::splice::{read_header, write_frame, Opened};
use crate::services::status::Snapshot;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use swb_wire::{
    Code, Deliver, Frame, MeshAnswer, MeshCall, MeshForward, MeshOp, MeshStatusQuery,
    MeshStreamOpen, MeshVia, Refusal, StatusUpdate, StreamReply, MAX_VIA_TTL,
};
use tracing::debug;

/// Time a call may take beyond any wait it asks for.
pub(crate) const MESH_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a status query to another relay may take.
pub(crate) const STATUS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a call to another relay failed (its refusals are answers, not errors).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// No link to that relay is up.
    #[error("no mesh link")]
    NoLink,
    /// The link or the call's stream failed.
    #[error("{0}")]
    Io(#[from] swb_quic::FrameIoError),
    /// Opening the call's stream failed.
    #[error("the link failed: {0}")]
    Conn(#[from] quinn::ConnectionError),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// An answer this call does not expect.
    #[error("unexpected answer {0}")]
    Unexpected(String),
}

/// The refusal of a message for `to` whose home relay `home` could not be
/// reached: the sender may retry it.
pub(crate) fn unavailable(to: &str, home: &str, e: &CallError) -> Refusal {
    Refusal::new(
        Code::RELAY_UNAVAILABLE,
        format!("the home relay of {to} ({home}) is unreachable right now ({e}); retry"),
    )
}

/// First byte of a TUN datagram another relay is to pass on (a plain
/// one starts with its namespace's length, at most `MAX_NAME_LEN`).
const VIA_DATAGRAM: u8 = 0xff;

/// A TUN datagram for relay `to`, to be passed on by the receiver.
fn encode_via(to: &str, inner: &[u8]) -> Option<bytes::Bytes> {
    let n = u8::try_from(to.len()).ok()?;
    let mut b = Vec::with_capacity(2 + to.len() + inner.len());
    b.extend_from_slice(&[VIA_DATAGRAM, n]);
    b.extend_from_slice(to.as_bytes());
    b.extend_from_slice(inner);
    Some(b.into())
}

/// The relay a via datagram is for and where its inner datagram starts;
/// `None` for a plain one (or a via header that does not parse).
pub(crate) fn decode_via(b: &[u8]) -> Option<(&str, usize)> {
    if *b.first()? != VIA_DATAGRAM {
        return None;
    }
    let n = usize::from(*b.get(1)?);
    let to = std::str::from_utf8(b.get(2..2 + n)?).ok()?;
    Some((to, 2 + n))
}

impl Mesh {
    /// Opens a stream for a call to relay `home` — on its link, or through
    /// a neighbour that hears it — and writes the call's first frame.
    async fn open_call(
        &self,
        home: &str,
        first: &Frame,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, LinkUse), CallError> {
        let (conn, using, via) = self.path_to(home).ok_or(CallError::NoLink)?;
        let (mut s, r) = conn.open_bi().await?;
        if let Some(to) = via {
            let via = MeshVia {
                to,
                ttl: MAX_VIA_TTL,
            };
            write_frame(&mut s, &Frame::MeshVia(via)).await?;
        }
        write_frame(&mut s, first).await?;
        Ok((s, r, using))
    }

    /// Opens the next hop of a stream another relay passes through here
    /// for relay `to`: its link, or (while `ttl` allows) a neighbour that
    /// hears it other than `from`.
    pub(crate) async fn open_via(
        &self,
        to: &str,
        ttl: u8,
        from: &str,
    ) -> Option<(quinn::SendStream, quinn::RecvStream, LinkUse)> {
        let now = tokio::time::Instant::now();
        let next = {
            let m = self.membership();
            if m.is_live(to, now) {
                None
            } else if ttl > 0 {
                m.via(to, now).filter(|v| v != from)
            } else {
                None
            }
        };
        let (conn, using) = match &next {
            Some(v) => self.conn_to(v)?,
            None => self.conn_to(to)?,
        };
        let (mut s, r) = conn.open_bi().await.ok()?;
        if next.is_some() {
            let via = MeshVia {
                to: to.to_string(),
                ttl: ttl - 1,
            };
            write_frame(&mut s, &Frame::MeshVia(via)).await.ok()?;
        }
        Some((s, r, using))
    }

    /// A TUN datagram another relay passes through here for relay `to`:
    /// on the link to it (packets take at most two hops).
    pub(crate) fn pass_datagram(&self, to: &str, d: bytes::Bytes) {
        let sent = self
            .conn_to(to)
            .is_some_and(|(c, _)| c.send_datagram(d).is_ok());
        if sent {
            self.services.metrics.mesh_via_passed.inc();
        } else {
            self.services.metrics.mesh_via_no_path.inc();
        }
    }

    /// Forwards a message to `home`, the relay holding the recipient's
    /// mailbox: whether the recipient is attached there, or its refusal.
    pub(crate) async fn forward(
        &self,
        home: &str,
        f: MeshForward,
    ) -> Result<Result<bool, Refusal>, CallError> {
        let rpc = async {
            let (mut s, mut r, _using) = self.open_call(home, &Frame::MeshForward(f)).await?;
            let _ = s.finish();
            match read_frame(&mut r).await? {
                Some(Frame::SendAccepted(a)) => Ok(Ok(a.online)),
                Some(Frame::SendRefused(r)) => Ok(Err(r.refusal)),
                other => Err(CallError::Unexpected(format!(
                    "{:?}",
                    other.map(|f| f.frame_type())
                ))),
            }
        };
        tokio::time::timeout(MESH_CALL_TIMEOUT, rpc)
            .await
            .map_err(|_| CallError::Timeout)?
    }

    /// Forwards `fs` to relay `home` on one stream, in order; the home
    /// relay answers each in turn. One answer per message, in the same
    /// order. A relay that answers only the first — an older version, one
    /// message a call — is sent the rest one call each. Messages the call
    /// leaves unanswered (no link, a failed stream, no answer in time, a
    /// call that ended early) are refused as [`unavailable`]: the sender
    /// retries them, and a message the home relay took already is taken
    /// again as a retry (by its id).
    pub(crate) async fn forward_batch(
        &self,
        home: &str,
        fs: Vec<MeshForward>,
    ) -> Vec<Result<bool, Refusal>> {
        let n = fs.len();
        let frames: Vec<Frame> = fs.into_iter().map(Frame::MeshForward).collect();
        let mut answers = Vec::with_capacity(n);
        let rpc = async {
            let first = frames
                .first()
                .ok_or(CallError::Unexpected("no message".into()))?;
            let (mut s, r, _using) = self.open_call(home, first).await?;
            // A relay that takes one message a call stops reading after
            // it: its answer is read all the same.
            let _ = swb_quic::write_frames(&mut s, &frames[1..]).await;
            let _ = s.finish();
            let mut r = swb_quic::FrameStream::new(r, swb_wire::MAX_FRAME_LEN);
            while answers.len() < n {
                match r.next().await? {
                    Some(Frame::SendAccepted(a)) => answers.push(Ok(a.online)),
                    Some(Frame::SendRefused(r)) => answers.push(Err(r.refusal)),
                    None if !answers.is_empty() => break,
                    other => {
                        return Err(CallError::Unexpected(format!(
                            "{:?}",
                            other.map(|f| f.frame_type())
                        )))
                    }
                }
            }
            Ok(())
        };
        let ended = match tokio::time::timeout(MESH_CALL_TIMEOUT, rpc).await {
            Ok(r) => r.err(),
            Err(_) => Some(CallError::Timeout),
        };
        let mut rest = frames
            .into_iter()
            .skip(answers.len())
            .filter_map(|f| match f {
                Frame::MeshForward(f) => Some(f),
                _ => None,
            });
        // Only the first answered, the stream ended cleanly: a relay that
        // takes one message a call. The rest go one call each.
        let mut ended = ended;
        if ended.is_none() && answers.len() == 1 {
            for f in rest.by_ref() {
                let to = f.to.clone();
                match self.forward(home, f).await {
                    Ok(r) => answers.push(r),
                    Err(e) => {
                        answers.push(Err(unavailable(&to, home, &e)));
                        ended = Some(e);
                        break;
                    }
                }
            }
        }
        if answers.len() < n {
            let e = ended.unwrap_or_else(|| {
                CallError::Unexpected(format!("the call ended after {} answers", answers.len()))
            });
            answers.extend(rest.map(|f| Err(unavailable(&f.to, home, &e))));
        }
        answers
    }

    /// Opens a stream to `port` of `to`, homed on relay `home`.
    pub(crate) async fn open_stream(
        &self,
        home: &str,
        ns: &str,
        from: &str,
        to: &str,
        port: u16,
    ) -> Result<Opened, CallError> {
        let open = Frame::MeshStreamOpen(MeshStreamOpen {
            namespace: ns.to_string(),
            from: from.to_string(),
            to: to.to_string(),
            port,
        });
        let setup = async {
            let (s, mut r, using) = self.open_call(home, &open).await?;
            match read_header(&mut r).await? {
                Frame::StreamReply(reply) => Ok(Opened {
                    send: s,
                    recv: r,
                    reply,
                    _slot: None,
                    _hold: Some(Box::new(using)),
                }),
                other => Err(CallError::Unexpected(format!("{:?}", other.frame_type()))),
            }
        };
        tokio::time::timeout(self.services.config.stream_answer_timeout, setup)
            .await
            .map_err(|_| CallError::Timeout)?
    }

    async fn call(
        &self,
        home: &str,
        call: MeshCall,
    ) -> Result<(quinn::RecvStream, quinn::SendStream, LinkUse), CallError> {
        let (mut s, r, using) = self.open_call(home, &Frame::MeshCall(call)).await?;
        let _ = s.finish();
        Ok((r, s, using))
    }

    /// A TUN operation at `home`, the namespace's allocator.
    pub(crate) async fn tun_call(
        &self,
        home: &str,
        ns: &str,
        name: &str,
        op: MeshOp,
    ) -> Result<MeshAnswer, CallError> {
        let call = MeshCall {
            namespace: ns.to_string(),
            name: name.to_string(),
            op,
        };
        self.single(home, call).await
    }

    /// A TUN packet for a peer attached to `home`, as a datagram on the
    /// link (or through a neighbour, behind a via header): `Err(Some(max))`
    /// with the largest inner datagram that fits when too big, `Err(None)`
    /// without a path.
    pub(crate) fn send_datagram(&self, home: &str, d: bytes::Bytes) -> Result<(), Option<usize>> {
        let (conn, _, via) = self.path_to(home).ok_or(None)?;
        let (d, header) = match via {
            Some(to) => {
                let v = encode_via(&to, &d).ok_or(None)?;
                (v, 2 + to.len())
            }
            None => (d, 0),
        };
        match conn.send_datagram(d) {
            Ok(()) => Ok(()),
            Err(quinn::SendDatagramError::TooLarge) => {
                Err(conn.max_datagram_size().map(|m| m.saturating_sub(header)))
            }
            Err(_) => Err(None),
        }
    }

    /// Receives mail of `name` held at `home` (an HTTP poll's receive).
    pub(crate) async fn receive(
        &self,
        home: &str,
        ns: &str,
        name: &str,
        wait: Duration,
        max: usize,
    ) -> Result<Result<Vec<Deliver>, Refusal>, CallError> {
        let call = MeshCall {
            namespace: ns.to_string(),
            name: name.to_string(),
            op: MeshOp::Receive {
                wait_ms: wait.as_millis().min(u64::MAX as u128) as u64,
                max: max.min(u32::MAX as usize) as u32,
            },
        };
        let rpc = async {
            let (mut r, _s, _using) = self.call(home, call).await?;
            let mut got = Vec::new();
            loop {
                match read_frame(&mut r).await? {
                    Some(Frame::MeshAnswer(MeshAnswer::Message(d))) if got.len() < max => {
                        got.push(d)
                    }
                    Some(Frame::MeshAnswer(MeshAnswer::Received)) => return Ok(Ok(got)),
                    Some(Frame::MeshAnswer(MeshAnswer::Refused(r))) => return Ok(Err(r)),
                    other => {
                        return Err(CallError::Unexpected(format!(
                            "{:?}",
                            other.map(|f| f.frame_type())
                        )))
                    }
                }
            }
        };
        tokio::time::timeout(wait + MESH_CALL_TIMEOUT, rpc)
            .await
            .map_err(|_| CallError::Timeout)?
    }

    async fn single(&self, home: &str, call: MeshCall) -> Result<MeshAnswer, CallError> {
        let rpc = async {
            let (mut r, _s, _using) = self.call(home, call).await?;
            match read_frame(&mut r).await? {
                Some(Frame::MeshAnswer(a)) => Ok(a),
                other => Err(CallError::Unexpected(format!(
                    "{:?}",
                    other.map(|f| f.frame_type())
                ))),
            }
        };
        tokio::time::timeout(MESH_CALL_TIMEOUT, rpc)
            .await
            .map_err(|_| CallError::Timeout)?
    }

    /// Acknowledges mail of `name` held at `home`; how many ids were held.
    pub(crate) async fn ack(
        &self,
        home: &str,
        ns: &str,
        name: &str,
        ids: Vec<swb_wire::MessageId>,
    ) -> Result<Result<usize, Refusal>, CallError> {
        let call = MeshCall {
            namespace: ns.to_string(),
            name: name.to_string(),
            op: MeshOp::Ack { ids },
        };
        match self.single(home, call).await? {
            MeshAnswer::Acked(n) => Ok(Ok(n as usize)),
            MeshAnswer::Refused(r) => Ok(Err(r)),
            other => Err(CallError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Changes the status of `name`, homed at `home`.
    pub(crate) async fn set_status(
        &self,
        home: &str,
        ns: &str,
        name: &str,
        change: swb_wire::SetStatus,
    ) -> Result<Result<StatusUpdate, Refusal>, CallError> {
        let call = MeshCall {
            namespace: ns.to_string(),
            name: name.to_string(),
            op: MeshOp::SetStatus(change),
        };
        match self.single(home, call).await? {
            MeshAnswer::Status(u) => Ok(Ok(u)),
            MeshAnswer::Refused(r) => Ok(Err(r)),
            other => Err(CallError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Opens a status query to relay `home`.
    pub(crate) async fn status_query(
        &self,
        home: &str,
        q: MeshStatusQuery,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, LinkUse), CallError> {
        let (s, mut r, using) = self.open_call(home, &Frame::MeshStatusQuery(q)).await?;
        match read_frame(&mut r).await? {
            Some(Frame::StreamReply(StreamReply { refusal: None })) => Ok((s, r, using)),
            other => Err(CallError::Unexpected(format!(
                "{:?}",
                other.map(|f| f.frame_type())
            ))),
        }
    }

    /// Every known peer of `ns` on the other live relays (each peer's
    /// newest value wins), added to `all`.
    pub(crate) async fn known_elsewhere(
        &self,
        ns: &str,
        all: &mut BTreeMap<String, Arc<Snapshot>>,
    ) {
        let others: Vec<String> = self
            .placement
            .live_ids()
            .into_iter()
            .filter(|id| *id != self.me.id)
            .collect();
        // Every relay at once: the answer takes the slowest relay's time
        // (at most STATUS_FETCH_TIMEOUT), not the sum of them all.
        let fetches = others.into_iter().map(|id| async move {
            let q = MeshStatusQuery {
                namespace: ns.to_string(),
                names: Vec::new(),
                watch: false,
            };
            let fetch = async {
                let (_s, mut r, _using) = self.status_query(&id, q).await?;
                let mut out = Vec::new();
                while let Some(f) = read_frame(&mut r).await? {
                    if let Frame::StatusUpdate(u) = f {
                        out.push(u);
                    }
                }
                Ok::<_, CallError>(out)
            };
            let r = tokio::time::timeout(STATUS_FETCH_TIMEOUT, fetch).await;
            (id, r)
        });
        for (id, r) in futures_util::future::join_all(fetches).await {
            match r {
                Ok(Ok(updates)) => {
                    for u in updates {
                        let snap = Arc::new(Snapshot::from_update(&u));
                        let newer = all.get(&u.name).is_none_or(|s| s.version < snap.version);
                        if newer {
                            all.insert(u.name.clone(), snap);
                        }
                    }
                }
                Ok(Err(e)) => debug!(relay = %id, "peers query failed: {e}"),
                Err(_) => debug!(relay = %id, "peers query timed out"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn via_datagrams_round_trip_and_plain_ones_are_not_taken_for_them() {
        let b = encode_via("relay-7", b"inner").expect("encodes");
        let (to, at) = decode_via(&b).expect("decodes");
        assert_eq!((to, &b[at..]), ("relay-7", &b"inner"[..]));
        let plain = crate::services::tun::encode_mesh("acme", 7, b"packet").expect("encodes");
        assert!(decode_via(&plain).is_none());
        assert!(decode_via(&[]).is_none());
        assert!(decode_via(&[VIA_DATAGRAM, 9, b'a']).is_none(), "short");
        assert!(decode_via(&[VIA_DATAGRAM, 1, 0xff]).is_none(), "not UTF-8");
        assert!(encode_via(&"r".repeat(300), b"").is_none());
    }
}
