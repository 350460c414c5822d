//! The control socket's compact encoding: length-prefixed binary frames for
//! programs that want speed, negotiated per connection. JSON lines stay the
//! default; a client switches by sending the JSON request
//! `{"op":"compact","version":1}`. The daemon answers with the JSON line
//! `{"reply":"compact","version":1}` (after the answers to everything asked
//! before), and from then on both directions carry frames, in the same
//! header shape as framed streams ([`crate::framing`]):
//!
//! ```text
//! | kind u8 | len u32 BE | payload (len bytes) |
//!
//! client → daemon
//! kind 0 json   payload: one JSON request other than send, recv, ack
//!               (status, set_status, get_status, peers, watch, connect, ping)
//! kind 1 send   timeout_ms u32 BE | to_len u8 | to (UTF-8) | body (the rest)
//! kind 2 recv   wait_ms u32 BE | max u32 BE
//! kind 3 ack    ids, 16 bytes each (the rest)
//!
//! daemon → client, one per request, in request order
//! kind 0 json     payload: one JSON reply — every error, and the answer
//!                 to a json request (a `watch`'s updates follow as more
//!                 json frames; after `connected` the connection is the
//!                 stream, as with JSON lines)
//! kind 1 sent     id (16 bytes) | online u8
//! kind 2 messages per message: id (16) | sent_at_ms u64 BE | from_len u8 |
//!                 from | body_len u32 BE | body
//! kind 3 acked    count u32 BE
//! ```
//!
//! Ids are the 16 raw bytes of a message id (the hex of JSON replies is
//! the same bytes). A request frame larger than
//! [`crate::control::MAX_REQUEST_LINE`] is refused (`request_too_large`)
//! before it is read, and the connection is closed, as with an over-long
//! JSON line. Any other malformed frame is answered with a `bad_request`
//! error and the connection goes on.

use crate::api::{Accepted, Message};
use crate::control::Reply;
use bytes::{Buf, BufMut, Bytes};
use std::time::Duration;
use swb_wire::{Deliver, MessageId};

/// The compact version this daemon speaks.
pub const VERSION: u32 = 1;
/// Frame header: kind + length.
pub const HEADER: usize = 5;
/// A JSON request or reply.
pub const KIND_JSON: u8 = 0;
/// `send` / `sent`.
pub const KIND_SEND: u8 = 1;
/// `recv` / `messages`.
pub const KIND_RECV: u8 = 2;
/// `ack` / `acked`.
pub const KIND_ACK: u8 = 3;
/// Largest reply frame a client reads: a full `recv` batch of the largest
/// messages.
pub const MAX_REPLY_FRAME: usize =
    crate::api::MAX_RECV_BATCH * (swb_wire::MAX_MESSAGE_BODY + 16 + 8 + 1 + 255 + 4);

/// A request read from a compact frame.
#[derive(Debug, PartialEq, Eq)]
pub enum CompactRequest {
    /// Any JSON request (checked by the caller).
    Json(crate::control::Request),
    /// A send.
    Send {
        /// Recipient.
        to: String,
        /// Body.
        body: Bytes,
        /// How long to wait for the relay.
        timeout: Duration,
    },
    /// Take messages.
    Recv {
        /// Wait for the first.
        wait: Duration,
        /// Most to take.
        max: usize,
    },
    /// Acknowledge messages.
    Ack(Vec<MessageId>),
}

/// Why a compact frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadFrame(pub String);

fn bad(s: impl Into<String>) -> BadFrame {
    BadFrame(s.into())
}

/// The header of the frame starting at the front of `first ++ second`, if
/// all five bytes are there: (kind, payload length).
pub fn header(first: &[u8], second: &[u8]) -> Option<(u8, usize)> {
    let mut h = [0u8; HEADER];
    let mut n = 0;
    for b in first.iter().chain(second).take(HEADER) {
        h[n] = *b;
        n += 1;
    }
    (n == HEADER).then(|| (h[0], u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize))
}

/// Starts a frame of `kind` in `out`; returns where its length goes.
fn open(out: &mut Vec<u8>, kind: u8) -> usize {
    out.push(kind);
    let at = out.len();
    out.put_u32(0);
    at
}

/// Writes the length of the frame opened at `at`.
fn close(out: &mut [u8], at: usize) {
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn ms(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

/// Appends a `send` request frame.
pub fn put_send(
    out: &mut Vec<u8>,
    to: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(), BadFrame> {
    let to_len = u8::try_from(to.len())
        .map_err(|_| bad(format!("a recipient name of {} bytes", to.len())))?;
    let at = open(out, KIND_SEND);
    out.put_u32(ms(timeout));
    out.put_u8(to_len);
    out.extend_from_slice(to.as_bytes());
    out.extend_from_slice(body);
    close(out, at);
    Ok(())
}

/// Appends a `recv` request frame.
pub fn put_recv(out: &mut Vec<u8>, wait: Duration, max: usize) {
    let at = open(out, KIND_RECV);
    out.put_u32(ms(wait));
    out.put_u32(max.min(u32::MAX as usize) as u32);
    close(out, at);
}

/// Appends an `ack` request frame.
pub fn put_ack(out: &mut Vec<u8>, ids: &[MessageId]) {
    let at = open(out, KIND_ACK);
    for id in ids {
        out.extend_from_slice(&id.0);
    }
    close(out, at);
}

/// Appends a JSON frame (a request or a reply).
pub fn put_json(out: &mut Vec<u8>, v: &impl serde::Serialize) {
    let at = open(out, KIND_JSON);
    if serde_json::to_writer(&mut *out, v).is_err() {
        // Our own types always serialize; never leave half a frame.
        out.truncate(at - 1);
        return;
    }
    close(out, at);
}

/// Appends a `sent` reply frame.
pub fn put_sent(out: &mut Vec<u8>, a: &Accepted) {
    let at = open(out, KIND_SEND);
    out.extend_from_slice(&a.id.0);
    out.put_u8(u8::from(a.online));
    close(out, at);
}

/// Appends a `messages` reply frame.
pub fn put_messages(out: &mut Vec<u8>, msgs: &[Deliver]) {
    let at = open(out, KIND_RECV);
    for m in msgs {
        out.extend_from_slice(&m.id.0);
        out.put_u64(m.sent_at_ms);
        // Names are at most 63 bytes (checked by the relay).
        let from = &m.from.as_bytes()[..m.from.len().min(255)];
        out.put_u8(from.len() as u8);
        out.extend_from_slice(from);
        out.put_u32(m.body.len() as u32);
        out.extend_from_slice(&m.body);
    }
    close(out, at);
}

/// Appends an `acked` reply frame.
pub fn put_acked(out: &mut Vec<u8>, n: usize) {
    let at = open(out, KIND_ACK);
    out.put_u32(n.min(u32::MAX as usize) as u32);
    close(out, at);
}

fn need(p: &[u8], n: usize, what: &str) -> Result<(), BadFrame> {
    if p.len() < n {
        return Err(bad(format!(
            "{what}: the frame ends {} bytes short",
            n - p.len()
        )));
    }
    Ok(())
}

fn ids(mut p: &[u8], what: &str) -> Result<Vec<MessageId>, BadFrame> {
    if !p.len().is_multiple_of(16) {
        return Err(bad(format!(
            "{what}: {} bytes is not a whole number of 16-byte ids",
            p.len()
        )));
    }
    let mut out = Vec::with_capacity(p.len() / 16);
    while !p.is_empty() {
        let mut id = [0u8; 16];
        p.copy_to_slice(&mut id);
        out.push(MessageId(id));
    }
    Ok(out)
}

/// Reads one request frame (`kind`, `payload`).
pub fn request(kind: u8, mut p: &[u8]) -> Result<CompactRequest, BadFrame> {
    match kind {
        KIND_JSON => serde_json::from_slice(p)
            .map(CompactRequest::Json)
            .map_err(|e| bad(format!("cannot parse the JSON request: {e}"))),
        KIND_SEND => {
            need(p, 5, "send")?;
            let timeout = Duration::from_millis(u64::from(p.get_u32()));
            let n = usize::from(p.get_u8());
            need(p, n, "send")?;
            let to = std::str::from_utf8(&p[..n])
                .map_err(|_| bad("send: the recipient name is not UTF-8"))?
                .to_string();
            Ok(CompactRequest::Send {
                to,
                body: Bytes::copy_from_slice(&p[n..]),
                timeout,
            })
        }
        KIND_RECV => {
            if p.len() != 8 {
                return Err(bad(format!(
                    "recv: the payload is {} bytes, not 8 (wait_ms u32, max u32)",
                    p.len()
                )));
            }
            let wait = Duration::from_millis(u64::from(p.get_u32()));
            let max = p.get_u32() as usize;
            Ok(CompactRequest::Recv { wait, max })
        }
        KIND_ACK => ids(p, "ack").map(CompactRequest::Ack),
        k => Err(bad(format!(
            "unknown request kind {k} (0 json, 1 send, 2 recv, 3 ack)"
        ))),
    }
}

/// An answer on a compact connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A `send` was accepted by the relay.
    Sent(Accepted),
    /// Messages a `recv` took (possibly none); acknowledge them with `ack`
    /// on the same connection.
    Messages(Vec<Message>),
    /// How many ids of an `ack` were leased here and are now acknowledged.
    Acked(usize),
    /// The answer to a JSON request (never `Reply::Error`: errors come as
    /// `Err`).
    Reply(Box<Reply>),
}

/// Reads one reply frame; `payload` is the whole frame's payload.
pub fn answer(kind: u8, payload: Bytes) -> Result<Answer, BadFrame> {
    let mut p = &payload[..];
    match kind {
        KIND_JSON => serde_json::from_slice(p)
            .map(|r| Answer::Reply(Box::new(r)))
            .map_err(|e| bad(format!("cannot parse the JSON reply: {e}"))),
        KIND_SEND => {
            if p.len() != 17 {
                return Err(bad(format!("sent: {} bytes, not 17", p.len())));
            }
            let mut id = [0u8; 16];
            p.copy_to_slice(&mut id);
            Ok(Answer::Sent(Accepted {
                id: MessageId(id),
                online: p.get_u8() != 0,
            }))
        }
        KIND_RECV => {
            // Room for as many messages as could fit (each takes at least
            // MIN_MESSAGE bytes), within reason for large bodies.
            const MIN_MESSAGE: usize = 16 + 8 + 1 + 4;
            let mut out = Vec::with_capacity((p.len() / MIN_MESSAGE).min(256));
            while !p.is_empty() {
                need(p, 16 + 8 + 1, "messages")?;
                let mut id = [0u8; 16];
                p.copy_to_slice(&mut id);
                let sent_at_ms = p.get_u64();
                let n = usize::from(p.get_u8());
                need(p, n + 4, "messages")?;
                let from = std::str::from_utf8(&p[..n])
                    .map_err(|_| bad("messages: a sender name is not UTF-8"))?
                    .to_string();
                p.advance(n);
                let len = p.get_u32() as usize;
                need(p, len, "messages")?;
                let start = payload.len() - p.len();
                p.advance(len);
                out.push(Message {
                    id: MessageId(id),
                    from,
                    body: payload.slice(start..start + len),
                    sent_at_ms,
                });
            }
            Ok(Answer::Messages(out))
        }
        KIND_ACK => {
            if p.len() != 4 {
                return Err(bad(format!("acked: {} bytes, not 4", p.len())));
            }
            Ok(Answer::Acked(p.get_u32() as usize))
        }
        k => Err(bad(format!("unknown reply kind {k}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Request;

    fn split(frame: &[u8]) -> (u8, &[u8]) {
        let (kind, len) = header(frame, &[]).expect("a header");
        assert_eq!(frame.len(), HEADER + len, "the length covers the payload");
        (kind, &frame[HEADER..])
    }

    #[test]
    fn requests_read_back_as_written() {
        let mut f = Vec::new();
        put_send(&mut f, "london", b"hello", Duration::from_millis(1500)).unwrap();
        let (k, p) = split(&f);
        assert_eq!(
            request(k, p).unwrap(),
            CompactRequest::Send {
                to: "london".into(),
                body: Bytes::from_static(b"hello"),
                timeout: Duration::from_millis(1500)
            }
        );
        let mut f = Vec::new();
        put_recv(&mut f, Duration::from_millis(30_000), 1000);
        let (k, p) = split(&f);
        assert_eq!(
            request(k, p).unwrap(),
            CompactRequest::Recv {
                wait: Duration::from_millis(30_000),
                max: 1000
            }
        );
        let ids = vec![MessageId([1; 16]), MessageId([2; 16])];
        let mut f = Vec::new();
        put_ack(&mut f, &ids);
        let (k, p) = split(&f);
        assert_eq!(request(k, p).unwrap(), CompactRequest::Ack(ids));
        let mut f = Vec::new();
        put_json(&mut f, &Request::Status);
        let (k, p) = split(&f);
        assert_eq!(
            request(k, p).unwrap(),
            CompactRequest::Json(Request::Status)
        );
    }

    #[test]
    fn replies_read_back_as_written() {
        let a = Accepted {
            id: MessageId([7; 16]),
            online: true,
        };
        let mut f = Vec::new();
        put_sent(&mut f, &a);
        let (k, p) = split(&f);
        assert_eq!(
            answer(k, Bytes::copy_from_slice(p)).unwrap(),
            Answer::Sent(a)
        );
        let msgs = vec![
            Deliver {
                id: MessageId([3; 16]),
                from: "laptop".into(),
                body: Bytes::from_static(b"one"),
                sent_at_ms: 42,
            },
            Deliver {
                id: MessageId([4; 16]),
                from: "ci".into(),
                body: Bytes::new(),
                sent_at_ms: u64::MAX,
            },
        ];
        let mut f = Vec::new();
        put_messages(&mut f, &msgs);
        let (k, p) = split(&f);
        let want: Vec<Message> = msgs.iter().map(Message::from).collect();
        assert_eq!(
            answer(k, Bytes::copy_from_slice(p)).unwrap(),
            Answer::Messages(want)
        );
        let mut f = Vec::new();
        put_acked(&mut f, 9);
        let (k, p) = split(&f);
        assert_eq!(
            answer(k, Bytes::copy_from_slice(p)).unwrap(),
            Answer::Acked(9)
        );
    }

    #[test]
    fn malformed_frames_are_refused_with_a_reason() {
        // A send whose name runs past the end of the frame.
        let e = request(KIND_SEND, &[0, 0, 0, 1, 10, b'a']).unwrap_err();
        assert!(e.0.contains("short"), "{e}");
        // A name that is not UTF-8.
        let e = request(KIND_SEND, &[0, 0, 0, 1, 1, 0xff]).unwrap_err();
        assert!(e.0.contains("UTF-8"), "{e}");
        let e = request(KIND_RECV, &[0; 7]).unwrap_err();
        assert!(e.0.contains("not 8"), "{e}");
        let e = request(KIND_ACK, &[0; 17]).unwrap_err();
        assert!(e.0.contains("16-byte"), "{e}");
        let e = request(9, &[]).unwrap_err();
        assert!(e.0.contains("unknown request kind 9"), "{e}");
        let e = request(KIND_JSON, b"{\"op\":").unwrap_err();
        assert!(e.0.contains("JSON"), "{e}");
        // A message whose body length runs past the frame.
        let mut f = Vec::new();
        put_messages(
            &mut f,
            &[Deliver {
                id: MessageId([3; 16]),
                from: "a".into(),
                body: Bytes::from_static(b"abc"),
                sent_at_ms: 1,
            }],
        );
        let (k, p) = split(&f);
        let cut = Bytes::copy_from_slice(&p[..p.len() - 1]);
        assert!(answer(k, cut).unwrap_err().0.contains("short"));
    }

    #[test]
    fn a_header_may_straddle_two_buffers() {
        let mut f = Vec::new();
        put_acked(&mut f, 1);
        assert_eq!(header(&f[..2], &f[2..4]), None);
        assert_eq!(header(&f[..2], &f[2..]), Some((KIND_ACK, 4)));
        assert_eq!(header(&[], &f), Some((KIND_ACK, 4)));
    }
}
