//! Hand-written encoders and decoders for the four frames on every
//! message's path: [`Send`] and [`Ack`] (daemon → relay), [`Deliveries`] and
//! [`SendsAccepted`] (relay → daemon); the two on every message's path
//! across the mesh: [`MeshForward`] (sender's relay → home relay) and its
//! answer [`SendAccepted`]; and a decoder for the frame every
//! watcher reads once per status change, [`StatusUpdate`] (a relay encodes
//! each change once for all its watchers, so its encoder stays postcard's).
//!
//! The encoders write exactly the bytes postcard writes for these types
//! (the property test `hot_encoders_write_what_postcard_writes`), in one
//! pass over the value where postcard takes two (its size, then its bytes)
//! and without zero-filling the space first.
//!
//! They read exactly postcard's encoding of the same types — varints of up
//! to ten bytes with postcard's check of the last one, a length before every
//! string, byte string and sequence, a message id as 16 raw bytes, a bool as
//! 0 or 1 — and fail with postcard's own reasons or the same named limits,
//! so a frame decodes to the same value, or fails, whichever decoder reads
//! it (the property tests `hot_decoders_agree_with_postcard` and
//! `hot_decoders_agree_at_the_edges`). What they add: no serde visitor per
//! byte of an id, and every count is checked against its limit, and against
//! the bytes left to hold it, before anything is allocated for it (serde's
//! `Vec` reserves up to 1 MiB from a claimed count, so a ten-byte frame
//! could have the relay allocate a megabyte before the limit was checked).

use crate::{
    check_len, Accepted, Ack, Delivered, Deliveries, DeliveryRun, MeshForward, MessageId, Send,
    SendAccepted, SendsAccepted, StatusUpdate, MAX_ACK_IDS, MAX_DELIVERIES, MAX_SENDS_ACCEPTED,
};
use crate::{varint_len, DecodeError, EncodeError, FrameType, HEADER_LEN, MAX_FRAME_LEN};
use bytes::{BufMut, Bytes, BytesMut};
use postcard::Error as Pe;

/// A cursor over a frame body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    #[inline]
    fn byte(&mut self) -> Result<u8, Pe> {
        let (&b, rest) = self.0.split_first().ok_or(Pe::DeserializeUnexpectedEnd)?;
        self.0 = rest;
        Ok(b)
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], Pe> {
        if n > self.0.len() {
            return Err(Pe::DeserializeUnexpectedEnd);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    /// postcard's `u64` varint: seven bits a byte, least significant first,
    /// at most ten bytes, the tenth holding only the top bit.
    #[inline]
    fn u64(&mut self) -> Result<u64, Pe> {
        let mut out = 0u64;
        for i in 0..10 {
            let v = self.byte()?;
            out |= u64::from(v & 0x7f) << (7 * i);
            if v & 0x80 == 0 {
                if i == 9 && v > 1 {
                    return Err(Pe::DeserializeBadVarint);
                }
                return Ok(out);
            }
        }
        Err(Pe::DeserializeBadVarint)
    }

    /// A length or count (postcard's `usize`, a `u64` varint on 64-bit).
    #[inline]
    fn len(&mut self) -> Result<usize, Pe> {
        usize::try_from(self.u64()?).map_err(|_| Pe::DeserializeBadVarint)
    }

    #[inline]
    fn bool(&mut self) -> Result<bool, Pe> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Pe::DeserializeBadBool),
        }
    }

    #[inline]
    fn id(&mut self) -> Result<MessageId, Pe> {
        let b = self.take(16)?;
        let mut id = [0u8; 16];
        id.copy_from_slice(b);
        Ok(MessageId(id))
    }

    #[inline]
    fn string(&mut self) -> Result<String, Pe> {
        let n = self.len()?;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| Pe::DeserializeBadUtf8)
    }

    #[inline]
    fn bytes(&mut self) -> Result<Bytes, Pe> {
        let n = self.len()?;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }
}

/// Decodes the whole of `b` with `read`, as `crate::body` does with postcard.
fn whole<'a, T>(
    ty: FrameType,
    b: &'a [u8],
    read: impl FnOnce(&mut Reader<'a>) -> Result<T, Error>,
) -> Result<T, DecodeError> {
    let mut r = Reader(b);
    let v = read(&mut r).map_err(|e| match e {
        Error::Postcard(e) => DecodeError::Malformed {
            ty,
            reason: e.to_string(),
        },
        Error::Limit(e) => e,
    })?;
    if !r.0.is_empty() {
        return Err(DecodeError::Malformed {
            ty,
            reason: format!("{} trailing bytes", r.0.len()),
        });
    }
    Ok(v)
}

/// Why a hot frame did not decode: postcard's reason, or a named limit.
enum Error {
    Postcard(Pe),
    Limit(DecodeError),
}

impl From<Pe> for Error {
    fn from(e: Pe) -> Self {
        Self::Postcard(e)
    }
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        Self::Limit(e)
    }
}

pub(crate) fn send(b: &[u8]) -> Result<Send, DecodeError> {
    whole(FrameType::Send, b, |r| {
        Ok(Send {
            req: r.u64()?,
            id: r.id()?,
            to: r.string()?,
            body: r.bytes()?,
        })
    })
}

/// `n` items, each read by `item` and at least `min` bytes long: a count
/// the body cannot hold fails before anything is reserved for it.
fn list<'a, T>(
    r: &mut Reader<'a>,
    n: usize,
    min: usize,
    mut item: impl FnMut(&mut Reader<'a>) -> Result<T, Error>,
) -> Result<Vec<T>, Error> {
    if n.saturating_mul(min) > r.0.len() {
        return Err(Pe::DeserializeUnexpectedEnd.into());
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(item(r)?);
    }
    Ok(v)
}

pub(crate) fn send_accepted(b: &[u8]) -> Result<SendAccepted, DecodeError> {
    whole(FrameType::SendAccepted, b, |r| {
        Ok(SendAccepted {
            req: r.u64()?,
            id: r.id()?,
            online: r.bool()?,
        })
    })
}

pub(crate) fn mesh_forward(b: &[u8]) -> Result<MeshForward, DecodeError> {
    whole(FrameType::MeshForward, b, |r| {
        Ok(MeshForward {
            namespace: r.string()?,
            from: r.string()?,
            to: r.string()?,
            id: r.id()?,
            body: r.bytes()?,
            sent_at_ms: r.u64()?,
            hops: r.byte()?,
        })
    })
}

pub(crate) fn ack(b: &[u8]) -> Result<Ack, DecodeError> {
    whole(FrameType::Ack, b, |r| {
        let n = r.len()?;
        check_len("ack.ids", n, MAX_ACK_IDS)?;
        let ids = list(r, n, 16, |r| Ok(r.id()?))?;
        Ok(Ack { ids })
    })
}

pub(crate) fn sends_accepted(b: &[u8]) -> Result<SendsAccepted, DecodeError> {
    whole(FrameType::SendsAccepted, b, |r| {
        let n = r.len()?;
        check_len("sends_accepted.accepted", n, MAX_SENDS_ACCEPTED)?;
        // At least a one-byte request number and a bool.
        let accepted = list(r, n, 2, |r| {
            Ok(Accepted {
                req: r.u64()?,
                online: r.bool()?,
            })
        })?;
        Ok(SendsAccepted { accepted })
    })
}

pub(crate) fn deliveries(b: &[u8]) -> Result<Deliveries, DecodeError> {
    whole(FrameType::Deliveries, b, |r| {
        // Runs and messages together, as `decode` counts them.
        let n_runs = r.len()?;
        let mut items = n_runs;
        check_len("deliveries.messages", items, MAX_DELIVERIES)?;
        // A run is at least an empty name and a count of no messages.
        let runs = list(r, n_runs, 2, |r| {
            let from = r.string()?;
            let n = r.len()?;
            items = items.saturating_add(n);
            check_len("deliveries.messages", items, MAX_DELIVERIES)?;
            // A message is at least its id, an empty body and a time of 0.
            let msgs = list(r, n, 18, |r| {
                Ok(Delivered {
                    id: r.id()?,
                    body: r.bytes()?,
                    sent_at_ms: r.u64()?,
                })
            })?;
            Ok(DeliveryRun { from, msgs })
        })?;
        Ok(Deliveries { runs })
    })
}

pub(crate) fn status_update(b: &[u8]) -> Result<StatusUpdate, DecodeError> {
    whole(FrameType::StatusUpdate, b, |r| {
        let name = r.string()?;
        let version = r.u64()?;
        let online = r.bool()?;
        let since_ms = r.u64()?;
        let updated_ms = r.u64()?;
        // A map as serde reads one: a count, then that many key and value
        // pairs, each inserted (a key twice: the last value wins). Nothing
        // is reserved for the count; a pair is at least two bytes, so a
        // count the body cannot hold ends at the body's end.
        let n = r.len()?;
        let mut fields = std::collections::BTreeMap::new();
        for _ in 0..n {
            let k = r.string()?;
            let v = r.string()?;
            fields.insert(k, v);
        }
        let lagged = r.bool()?;
        Ok(StatusUpdate {
            name,
            version,
            online,
            since_ms,
            updated_ms,
            fields,
            lagged,
        })
    })
}

#[inline]
fn put_varint(dst: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        dst.put_u8((v & 0x7f) as u8 | 0x80);
        v >>= 7;
    }
    dst.put_u8(v as u8);
}

#[inline]
fn put_len(dst: &mut BytesMut, n: usize) {
    put_varint(dst, n as u64);
}

/// Bytes a length-prefixed string or byte string of `n` bytes takes.
#[inline]
fn prefixed_len(n: usize) -> usize {
    varint_len(n as u64) + n
}

/// Appends a frame of type `ty` whose body is the `len` bytes `write`
/// appends; nothing is left of it in `dst` if `len` is over the limit (or,
/// a bug, `write` wrote another number of bytes).
#[inline]
fn put_frame(
    dst: &mut BytesMut,
    ty: FrameType,
    len: usize,
    write: impl FnOnce(&mut BytesMut),
) -> Result<(), EncodeError> {
    if len > MAX_FRAME_LEN {
        return Err(EncodeError::TooLarge { len });
    }
    dst.reserve(HEADER_LEN + len);
    let header = dst.len();
    dst.put_u8(ty as u8);
    dst.put_u32(len as u32);
    write(dst);
    let wrote = dst.len() - header - HEADER_LEN;
    if wrote != len {
        dst.truncate(header);
        return Err(EncodeError::Postcard(format!(
            "size mismatch: computed {len}, wrote {wrote}"
        )));
    }
    Ok(())
}

pub(crate) fn send_len(req: u64, to: &str, body: &[u8]) -> usize {
    varint_len(req) + 16 + prefixed_len(to.len()) + prefixed_len(body.len())
}

pub(crate) fn put_send(
    dst: &mut BytesMut,
    req: u64,
    id: MessageId,
    to: &str,
    body: &[u8],
) -> Result<(), EncodeError> {
    put_frame(dst, FrameType::Send, send_len(req, to, body), |dst| {
        put_varint(dst, req);
        dst.put_slice(&id.0);
        put_len(dst, to.len());
        dst.put_slice(to.as_bytes());
        put_len(dst, body.len());
        dst.put_slice(body);
    })
}

pub(crate) fn send_accepted_len(a: &SendAccepted) -> usize {
    varint_len(a.req) + 16 + 1
}

pub(crate) fn put_send_accepted(dst: &mut BytesMut, a: &SendAccepted) -> Result<(), EncodeError> {
    put_frame(dst, FrameType::SendAccepted, send_accepted_len(a), |dst| {
        put_varint(dst, a.req);
        dst.put_slice(&a.id.0);
        dst.put_u8(u8::from(a.online));
    })
}

pub(crate) fn mesh_forward_len(f: &MeshForward) -> usize {
    prefixed_len(f.namespace.len())
        + prefixed_len(f.from.len())
        + prefixed_len(f.to.len())
        + 16
        + prefixed_len(f.body.len())
        + varint_len(f.sent_at_ms)
        + 1
}

pub(crate) fn put_mesh_forward(dst: &mut BytesMut, f: &MeshForward) -> Result<(), EncodeError> {
    put_frame(dst, FrameType::MeshForward, mesh_forward_len(f), |dst| {
        for s in [&f.namespace, &f.from, &f.to] {
            put_len(dst, s.len());
            dst.put_slice(s.as_bytes());
        }
        dst.put_slice(&f.id.0);
        put_len(dst, f.body.len());
        dst.put_slice(&f.body);
        put_varint(dst, f.sent_at_ms);
        dst.put_u8(f.hops);
    })
}

pub(crate) fn ack_len(a: &Ack) -> usize {
    varint_len(a.ids.len() as u64) + 16 * a.ids.len()
}

pub(crate) fn put_ack(dst: &mut BytesMut, a: &Ack) -> Result<(), EncodeError> {
    put_frame(dst, FrameType::Ack, ack_len(a), |dst| {
        put_len(dst, a.ids.len());
        for id in &a.ids {
            dst.put_slice(&id.0);
        }
    })
}

pub(crate) fn sends_accepted_len(a: &SendsAccepted) -> usize {
    varint_len(a.accepted.len() as u64)
        + a.accepted
            .iter()
            .map(|x| varint_len(x.req) + 1)
            .sum::<usize>()
}

pub(crate) fn put_sends_accepted(dst: &mut BytesMut, a: &SendsAccepted) -> Result<(), EncodeError> {
    put_frame(
        dst,
        FrameType::SendsAccepted,
        sends_accepted_len(a),
        |dst| {
            put_len(dst, a.accepted.len());
            for x in &a.accepted {
                put_varint(dst, x.req);
                dst.put_u8(u8::from(x.online));
            }
        },
    )
}

pub(crate) fn deliveries_len(d: &Deliveries) -> usize {
    varint_len(d.runs.len() as u64)
        + d.runs
            .iter()
            .map(|r| {
                prefixed_len(r.from.len())
                    + varint_len(r.msgs.len() as u64)
                    + r.msgs
                        .iter()
                        .map(|m| 16 + prefixed_len(m.body.len()) + varint_len(m.sent_at_ms))
                        .sum::<usize>()
            })
            .sum::<usize>()
}

pub(crate) fn put_deliveries(dst: &mut BytesMut, d: &Deliveries) -> Result<(), EncodeError> {
    put_frame(dst, FrameType::Deliveries, deliveries_len(d), |dst| {
        put_len(dst, d.runs.len());
        for r in &d.runs {
            put_len(dst, r.from.len());
            dst.put_slice(r.from.as_bytes());
            put_len(dst, r.msgs.len());
            for m in &r.msgs {
                dst.put_slice(&m.id.0);
                put_len(dst, m.body.len());
                dst.put_slice(&m.body);
                put_varint(dst, m.sent_at_ms);
            }
        }
    })
}

/// What `decode` did for the hot frames before this module: postcard,
/// then the limits. The reference the tests and the fuzz target hold the
/// hand-written decoders to.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn by_postcard(ty: FrameType, b: &[u8]) -> Result<crate::Frame, DecodeError> {
    use crate::{body, Frame};
    Ok(match ty {
        FrameType::Send => Frame::Send(body(ty, b)?),
        FrameType::Ack => {
            let a: Ack = body(ty, b)?;
            check_len("ack.ids", a.ids.len(), MAX_ACK_IDS)?;
            Frame::Ack(a)
        }
        FrameType::SendsAccepted => {
            let a: SendsAccepted = body(ty, b)?;
            check_len(
                "sends_accepted.accepted",
                a.accepted.len(),
                MAX_SENDS_ACCEPTED,
            )?;
            Frame::SendsAccepted(a)
        }
        FrameType::Deliveries => {
            let d: Deliveries = body(ty, b)?;
            check_len(
                "deliveries.messages",
                d.runs.len() + d.len(),
                MAX_DELIVERIES,
            )?;
            Frame::Deliveries(d)
        }
        FrameType::StatusUpdate => Frame::StatusUpdate(body(ty, b)?),
        FrameType::SendAccepted => Frame::SendAccepted(body(ty, b)?),
        FrameType::MeshForward => Frame::MeshForward(body(ty, b)?),
        other => return Err(not_hot(other)),
    })
}

/// A hot frame's body read by the hand-written decoders.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn by_hand(ty: FrameType, b: &[u8]) -> Result<crate::Frame, DecodeError> {
    use crate::Frame;
    Ok(match ty {
        FrameType::Send => Frame::Send(send(b)?),
        FrameType::Ack => Frame::Ack(ack(b)?),
        FrameType::SendsAccepted => Frame::SendsAccepted(sends_accepted(b)?),
        FrameType::Deliveries => Frame::Deliveries(deliveries(b)?),
        FrameType::StatusUpdate => Frame::StatusUpdate(status_update(b)?),
        FrameType::SendAccepted => Frame::SendAccepted(send_accepted(b)?),
        FrameType::MeshForward => Frame::MeshForward(mesh_forward(b)?),
        other => return Err(not_hot(other)),
    })
}

#[cfg(any(test, feature = "fuzzing"))]
fn not_hot(ty: FrameType) -> DecodeError {
    DecodeError::Malformed {
        ty,
        reason: "not one of the hand-decoded frames".into(),
    }
}

/// For the fuzz target `wire_decode`: `data` (its first byte picks one of
/// the seven frames, the rest is the body) must decode to the same frame by
/// hand and by postcard, or be refused by both; what decodes must encode,
/// by hand, to the bytes postcard writes for it (the six with encoders).
#[cfg(feature = "fuzzing")]
pub fn agrees_with_postcard(data: &[u8]) {
    let Some((&pick, b)) = data.split_first() else {
        return;
    };
    let ty = [
        FrameType::Send,
        FrameType::Ack,
        FrameType::SendsAccepted,
        FrameType::Deliveries,
        FrameType::StatusUpdate,
        FrameType::SendAccepted,
        FrameType::MeshForward,
    ][usize::from(pick % 7)];
    match (by_hand(ty, b), by_postcard(ty, b)) {
        (Ok(hand), Ok(reference)) => {
            assert_eq!(hand, reference, "the decoders disagree on {ty:?}");
            let mut ours = BytesMut::new();
            hand.encode(&mut ours).expect("a decoded frame encodes");
            let theirs = match &hand {
                crate::Frame::Send(v) => postcard::to_stdvec(v),
                crate::Frame::Ack(v) => postcard::to_stdvec(v),
                crate::Frame::SendsAccepted(v) => postcard::to_stdvec(v),
                crate::Frame::Deliveries(v) => postcard::to_stdvec(v),
                crate::Frame::StatusUpdate(v) => postcard::to_stdvec(v),
                crate::Frame::SendAccepted(v) => postcard::to_stdvec(v),
                crate::Frame::MeshForward(v) => postcard::to_stdvec(v),
                _ => unreachable!("by_hand gives only the seven"),
            }
            .expect("postcard encodes what it decoded");
            assert_eq!(&ours[HEADER_LEN..], &theirs[..], "the encoders disagree");
        }
        (Err(_), Err(_)) => {}
        (hand, reference) => {
            panic!("{ty:?}: by hand {hand:?}, by postcard {reference:?}")
        }
    }
}
