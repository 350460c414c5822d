//! Calls from another relay, each on its own stream: each is handed to the
//! local services, as a door would hand a request from a peer.

use super::links::read_frame;
use super::Mesh;
use crate::services::splice::{splice, write_frame};
use crate::services::watch::{names, pump};
use swb_wire::{
    reset, Code, Frame, MeshAnswer, MeshCall, MeshForward, MeshOp, MeshStreamOpen, Refusal,
    SendAccepted, SendRefused, StreamReply,
};
use tracing::debug;

/// Time the other relay has to send its call's first frame.
const CALL_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves one call stream from relay `peer`.
pub(crate) async fn serve(
    mesh: &Mesh,
    peer: &str,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let first = match tokio::time::timeout(CALL_HEADER_TIMEOUT, read_frame(&mut recv)).await {
        Ok(Ok(Some(f))) => f,
        _ => {
            let _ = send.reset(reset::RELAY.into());
            return;
        }
    };
    match first {
        // Another relay's call for a third: pass the stream on, bytes
        // unchanged (the call's own first frame comes next).
        Frame::MeshVia(v) => {
            let metrics = &mesh.services.metrics;
            match mesh.open_via(&v.to, v.ttl, peer).await {
                Some((s, r, _using)) => {
                    metrics.mesh_via_passed.inc();
                    let bytes = &metrics.mesh_via_bytes;
                    tokio::join!(
                        crate::services::splice::pipe(recv, s, bytes),
                        crate::services::splice::pipe(r, send, bytes)
                    );
                }
                None => {
                    metrics.mesh_via_no_path.inc();
                    debug!(to = %v.to, from = %peer, "no path to pass a mesh stream on");
                    let _ = send.reset(reset::RELAY.into());
                    let _ = recv.stop(reset::RELAY.into());
                }
            }
        }
        Frame::MeshForward(f) => forwards_in(mesh, f, recv, &mut send).await,
        Frame::MeshStreamOpen(o) => stream_in(mesh, o, send, recv).await,
        Frame::MeshCall(c) => {
            call_in(mesh, c, &mut send).await;
            let _ = send.finish();
        }
        Frame::MeshStatusQuery(q) => {
            let ok = Frame::StreamReply(StreamReply { refusal: None });
            if write_frame(&mut send, &ok).await.is_err() {
                return;
            }
            if q.names.is_empty() {
                let known = mesh.services.registry().board().known(&q.namespace);
                for s in known {
                    if write_frame(&mut send, &Frame::StatusUpdate(s.to_update(false)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let _ = send.finish();
                return;
            }
            let Ok(names) = names(&q.names) else {
                let _ = send.finish();
                return;
            };
            let w = mesh.services.watcher(&q.namespace, &names);
            pump(w, names.len(), q.watch, &mut send, &mut recv).await;
            let _ = send.finish();
        }
        other => {
            debug!("unexpected mesh call {:?}", other.frame_type());
            let _ = send.reset(reset::RELAY.into());
        }
    }
}

/// A message another relay forwarded for a peer homed here.
/// Checks a forwarded message as a client's would be: sender name,
/// namespace, body size; a time in the future becomes now.
fn check_forward(mut f: MeshForward) -> Result<MeshForward, Refusal> {
    f.from = swb_wire::normalize_name(&f.from)
        .map_err(|e| Refusal::new(Code::BAD_NAME, format!("sender: {e}: {:?}", f.from)))?;
    crate::keys::validate_namespace(&f.namespace)
        .map_err(|e| Refusal::new(Code::PROTOCOL, e.to_string()))?;
    if f.body.len() > swb_wire::MAX_MESSAGE_BODY {
        return Err(Refusal::new(
            Code::BODY_TOO_LARGE,
            format!(
                "the message body has {} bytes; the limit is {}",
                f.body.len(),
                swb_wire::MAX_MESSAGE_BODY
            ),
        ));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    f.sent_at_ms = f.sent_at_ms.min(now);
    Ok(f)
}

/// A forward call: its first message, then (from a relay that sends
/// several on one call) the rest until the stream ends, each taken in
/// turn. Answered in order once every message taken here is durable, one
/// `SendAccepted` or `SendRefused` each (`req` its place in the call). At
/// most [`swb_wire::MAX_FORWARDS_PER_CALL`] messages, read within
/// [`CALL_HEADER_TIMEOUT`]: a message past the limit, or another frame, is
/// refused and ends the call; a stream that fails or stalls ends it with
/// the messages read so far answered.
async fn forwards_in(
    mesh: &Mesh,
    first: MeshForward,
    recv: quinn::RecvStream,
    send: &mut quinn::SendStream,
) {
    let deadline = tokio::time::Instant::now() + CALL_HEADER_TIMEOUT;
    let mut answers = vec![forward_in(mesh, first).await];
    let mut rest = swb_quic::FrameStream::new(recv, swb_wire::MAX_FRAME_LEN);
    let one = mesh
        .one_forward_per_call
        .load(std::sync::atomic::Ordering::Relaxed);
    loop {
        if one {
            break;
        }
        let f = match tokio::time::timeout_at(deadline, rest.next()).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                debug!("forward call ended after {} messages: {e}", answers.len());
                break;
            }
            Err(_) => {
                debug!("forward call stalled after {} messages", answers.len());
                break;
            }
        };
        let refused = match f {
            Frame::MeshForward(f) if answers.len() < swb_wire::MAX_FORWARDS_PER_CALL => {
                answers.push(forward_in(mesh, f).await);
                continue;
            }
            Frame::MeshForward(f) => (
                f.id,
                Refusal::new(
                    Code::PROTOCOL,
                    format!(
                        "more than {} messages in one forward call",
                        swb_wire::MAX_FORWARDS_PER_CALL
                    ),
                ),
            ),
            other => (
                swb_wire::MessageId([0; 16]),
                Refusal::new(
                    Code::PROTOCOL,
                    format!("{:?} in a forward call", other.frame_type()),
                ),
            ),
        };
        mesh.services.metrics.refused(refused.1.code);
        answers.push((refused.0, Taken::Now(Err(refused.1))));
        break;
    }
    let mut out = Vec::with_capacity(answers.len());
    for (req, (id, taken)) in (0u64..).zip(answers) {
        let r = match taken {
            Taken::Now(r) => r,
            Taken::Stored(durable, online) => durable
                .wait()
                .await
                .map(|()| online)
                .map_err(|e| crate::services::not_stored(&e)),
        };
        out.push(match r {
            Ok(online) => Frame::SendAccepted(SendAccepted { req, id, online }),
            Err(refusal) => Frame::SendRefused(SendRefused { req, refusal }),
        });
    }
    let _ = swb_quic::write_frames(send, &out).await;
    let _ = send.finish();
}

/// A forwarded message taken: its answer, or the answer once it is durable
/// here (the sender's relay, or the old home in a handoff, forgets the
/// message when it hears it).
enum Taken {
    Now(Result<bool, Refusal>),
    Stored(crate::services::store::Durable, bool),
}

/// One message another relay forwarded: its id and how it was taken.
async fn forward_in(mesh: &Mesh, f: MeshForward) -> (swb_wire::MessageId, Taken) {
    let (id, hops) = (f.id, f.hops);
    // Stopping: its mailbox is being handed over, and what landed now
    // would stay behind. The sender retries at the new home.
    if mesh.is_leaving() {
        let refusal = Refusal::new(
            Code::RELAY_UNAVAILABLE,
            format!(
                "relay {} is leaving the mesh and takes no more mail; retry",
                mesh.me.id
            ),
        );
        mesh.services.metrics.refused(refusal.code);
        return (id, Taken::Now(Err(refusal)));
    }
    let f = match check_forward(f) {
        Ok(f) => f,
        Err(refusal) => {
            mesh.services.metrics.refused(refusal.code);
            return (id, Taken::Now(Err(refusal)));
        }
    };
    let to = match swb_wire::normalize_name(&f.to) {
        Ok(to) => to,
        Err(e) => {
            let refusal = Refusal::new(Code::BAD_NAME, format!("{e}: {:?}", f.to));
            mesh.services.metrics.refused(refusal.code);
            return (id, Taken::Now(Err(refusal)));
        }
    };
    let home = mesh.placement.home_elsewhere(&f.namespace, &to);
    let taken = match home {
        // Not its home as this relay sees the ring: pass it on (once), so
        // it is not parked where its recipient will not look.
        Some(home) if hops < swb_wire::MAX_FORWARD_HOPS => {
            let home = home.id.clone();
            let f = MeshForward {
                hops: hops + 1,
                ..f
            };
            let to = f.to.clone();
            Taken::Now(match mesh.forward(&home, f).await {
                Ok(r) => r,
                Err(e) => Err(super::unavailable(&to, &home, &e)),
            })
        }
        _ => {
            let services = &mesh.services;
            let now = tokio::time::Instant::now();
            match services.enqueue(&f.namespace, &*f.from, &to, f.id, f.body, f.sent_at_ms, now) {
                Ok((online, durable)) => {
                    services.metrics.accepted.inc();
                    Taken::Stored(durable, online)
                }
                Err(refusal) => Taken::Now(Err(refusal)),
            }
        }
    };
    (id, taken)
}

/// A stream another relay opens to a peer attached here.
async fn stream_in(
    mesh: &Mesh,
    o: MeshStreamOpen,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let refuse = |r: Refusal| Frame::StreamReply(StreamReply { refusal: Some(r) });
    let to = match swb_wire::normalize_name(&o.to) {
        Ok(t) => t,
        Err(e) => {
            let r = Refusal::new(Code::BAD_NAME, format!("{e}: {:?}", o.to));
            let _ = write_frame(&mut send, &refuse(r)).await;
            let _ = send.finish();
            return;
        }
    };
    match mesh
        .services
        .open_local(&o.namespace, &o.from, &to, o.port)
        .await
    {
        Err(r) => {
            let _ = write_frame(&mut send, &refuse(r)).await;
            let _ = send.finish();
        }
        Ok(t) => {
            let accepted = t.reply.refusal.is_none();
            if write_frame(&mut send, &Frame::StreamReply(t.reply.clone()))
                .await
                .is_err()
                || !accepted
            {
                let _ = send.finish();
                return;
            }
            let _slot = t._slot;
            splice(&mesh.services, (send, recv), (t.send, t.recv)).await;
        }
    }
}

/// A receive, acknowledgement or status change for a peer homed here.
async fn call_in(mesh: &Mesh, c: MeshCall, send: &mut quinn::SendStream) {
    let answer = |a: MeshAnswer| Frame::MeshAnswer(a);
    let name = match swb_wire::normalize_name(&c.name) {
        Ok(n) => n,
        Err(e) => {
            let r = Refusal::new(Code::BAD_NAME, format!("{e}: {:?}", c.name));
            let _ = write_frame(send, &answer(MeshAnswer::Refused(r))).await;
            return;
        }
    };
    let services = &mesh.services;
    match c.op {
        MeshOp::Receive { wait_ms, max } => {
            let http = &services.config.http;
            let wait = std::time::Duration::from_millis(wait_ms).min(http.max_wait);
            let max = (max as usize).clamp(1, http.max_batch);
            let got = services
                .receive(&c.namespace, &name, wait, max, &mesh.stop)
                .await;
            for m in got {
                let d = swb_wire::Deliver {
                    id: m.id,
                    from: m.from,
                    body: m.body,
                    sent_at_ms: m.sent_at_ms,
                };
                if write_frame(send, &answer(MeshAnswer::Message(d)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = write_frame(send, &answer(MeshAnswer::Received)).await;
        }
        MeshOp::Ack { ids } => {
            let n = services.ack(&c.namespace, &name, &ids);
            let _ = write_frame(send, &answer(MeshAnswer::Acked(n as u32))).await;
        }
        MeshOp::TunAssign { want } => {
            let a = match services.tun.allocate(&c.namespace, &name, want) {
                Ok(i) => MeshAnswer::TunIndex(Some(i)),
                Err(r) => MeshAnswer::Refused(r),
            };
            let _ = write_frame(send, &answer(a)).await;
        }
        MeshOp::TunIndex => {
            let i = services.tun.index_of(&c.namespace, &name);
            let _ = write_frame(send, &answer(MeshAnswer::TunIndex(i))).await;
        }
        MeshOp::TunWho { index } => {
            let n = services.tun.name_of(&c.namespace, index);
            let _ = write_frame(send, &answer(MeshAnswer::TunName(n))).await;
        }
        MeshOp::SetStatus(change) => {
            let a = match services
                .set_status_durable(&c.namespace, &name, &change)
                .await
            {
                Ok(s) => MeshAnswer::Status(s.to_update(false)),
                Err(r) => MeshAnswer::Refused(r),
            };
            let _ = write_frame(send, &answer(a)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_forward;
    use bytes::Bytes;
    use swb_wire::{Code, MeshForward, MessageId};

    fn fwd() -> MeshForward {
        MeshForward {
            namespace: "acme".into(),
            from: "paris".into(),
            to: "london".into(),
            id: MessageId([1; 16]),
            body: Bytes::from_static(b"hi"),
            sent_at_ms: 1_000,
            hops: 0,
        }
    }

    #[test]
    fn forwarded_messages_are_checked_like_a_clients() {
        let ok = check_forward(fwd()).expect("a good forward");
        assert_eq!((ok.from.as_str(), ok.sent_at_ms), ("paris", 1_000));
        // A time in the future (past year 9999 even) becomes now.
        let far = check_forward(MeshForward {
            sent_at_ms: u64::MAX,
            ..fwd()
        })
        .expect("accepted, with its time fixed");
        assert!(far.sent_at_ms < 253_402_300_799_999, "{}", far.sent_at_ms);
        let code = |f: MeshForward| check_forward(f).err().map(|r| r.code);
        assert_eq!(
            code(MeshForward {
                from: "not a name".into(),
                ..fwd()
            }),
            Some(Code::BAD_NAME)
        );
        assert_eq!(
            code(MeshForward {
                namespace: "".into(),
                ..fwd()
            }),
            Some(Code::PROTOCOL)
        );
        assert_eq!(
            code(MeshForward {
                body: Bytes::from(vec![0; swb_wire::MAX_MESSAGE_BODY + 1]),
                ..fwd()
            }),
            Some(Code::BODY_TOO_LARGE)
        );
    }
}
