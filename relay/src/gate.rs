//! The gate in front of quinn: QUIC Initials that carry no token (first
//! contact from an address that has not answered a Retry) are counted per
//! source address and in total, and those over the limits are dropped
//! before quinn derives keys and decrypts them — a few hash lookups instead
//! of HKDF, AES-GCM and a Retry packet each. Everything else (packets of
//! established connections, Initials answering a Retry with its token)
//! passes untouched. A client whose Initial was dropped sends it again
//! (QUIC's loss recovery), so a flood slows strangers' first contact but
//! never touches the sessions already up.

use crate::limits::{Limiter, Rate};
use prometheus::IntCounter;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// Limits of the gate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InitialLimits {
    /// Tokenless Initials per source address (`None`: no limit).
    pub per_ip: Option<Rate>,
    /// Tokenless Initials in total (`None`: no limit).
    pub total: Option<Rate>,
}

impl Default for InitialLimits {
    fn default() -> Self {
        Self {
            per_ip: Some(Rate::new(500.0, 1000.0)),
            total: Some(Rate::new(20_000.0, 40_000.0)),
        }
    }
}

struct Tables {
    per_ip: Option<Limiter<IpAddr>>,
    total: Option<Limiter<()>>,
}

/// A UDP socket that drops tokenless Initials over the limits.
pub(crate) struct Gate {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    /// Shared by the gates of a relay's shards: the limits are the relay's.
    tables: Arc<Mutex<Tables>>,
    /// Initials dropped (metrics).
    pub(crate) dropped: IntCounter,
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

/// Whether `d` is a QUIC v1 Initial without a token (RFC 9000 §17.2.2).
/// Anything it cannot parse is not one (quinn judges it).
pub(crate) fn tokenless_initial(d: &[u8]) -> bool {
    let Some(&b0) = d.first() else { return false };
    // Long header, fixed bit, type Initial (0b00).
    if b0 & 0xf0 != 0xc0 {
        return false;
    }
    if d.get(1..5) != Some(&[0, 0, 0, 1][..]) {
        return false;
    }
    let mut i = 5;
    for _ in 0..2 {
        let Some(&len) = d.get(i) else { return false };
        i += 1 + len as usize;
    }
    // Token length: a variable-length integer; zero is one byte 0x00.
    d.get(i) == Some(&0)
}

impl Gate {
    pub(crate) fn new(
        inner: Arc<dyn quinn::AsyncUdpSocket>,
        limits: InitialLimits,
    ) -> Result<Self, prometheus::Error> {
        Ok(Self {
            inner,
            tables: Arc::new(Mutex::new(Tables {
                per_ip: limits.per_ip.map(|r| Limiter::new(r, 65_536)),
                total: limits.total.map(|r| Limiter::new(r, 1)),
            })),
            dropped: IntCounter::new(
                "swb_relay_initials_dropped_total",
                "QUIC Initials without a token dropped before the handshake for being over the per-address or total rate.",
            )?,
        })
    }

    /// The gate of another shard's socket, under the same limits and
    /// counting into the same metric.
    pub(crate) fn share(&self, inner: Arc<dyn quinn::AsyncUdpSocket>) -> Self {
        Self {
            inner,
            tables: self.tables.clone(),
            dropped: self.dropped.clone(),
        }
    }

    fn admit(&self, t: &mut Tables, from: IpAddr, now: tokio::time::Instant) -> bool {
        if let Some(l) = t.per_ip.as_mut() {
            if l.take(&from, now).is_err() {
                return false;
            }
        }
        if let Some(l) = t.total.as_mut() {
            if l.take(&(), now).is_err() {
                return false;
            }
        }
        true
    }
}

/// Keeps the first `n` received entries that `keep` (given the entry and
/// its bytes: its datagrams, `stride` apart) admits, moved to the front in
/// order, their bytes with them: what is returned is only what quinn
/// should see (it is not asked to skip anything). Their number.
fn compact(
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [quinn::udp::RecvMeta],
    n: usize,
    mut keep: impl FnMut(&quinn::udp::RecvMeta, &[u8]) -> bool,
) -> usize {
    let n = n.min(meta.len()).min(bufs.len());
    let mut kept = 0;
    for j in 0..n {
        let len = meta[j].len.min(bufs[j].len());
        if !keep(&meta[j], &bufs[j][..len]) {
            continue;
        }
        if kept != j {
            let (to, from) = bufs.split_at_mut(j);
            let room = to[kept].len();
            to[kept][..len.min(room)].copy_from_slice(&from[0][..len.min(room)]);
            meta[kept] = meta[j];
        }
        kept += 1;
    }
    kept
}

impl quinn::AsyncUdpSocket for Gate {
    swb_quic::pass_through_socket!(inner);

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut tables = None;
        let now = tokio::time::Instant::now();
        poll_kept(
            cx,
            bufs,
            meta,
            |cx, bufs, meta| self.inner.poll_recv(cx, bufs, meta),
            |m, entry| {
                // One entry holds datagrams of one source (GRO); an
                // Initial arrives alone or first, padded to the full size
                // (its header is at the entry's start either way).
                if !tokenless_initial(entry) {
                    return true;
                }
                let t = tables
                    .get_or_insert_with(|| self.tables.lock().unwrap_or_else(|p| p.into_inner()));
                let ok = self.admit(t, m.addr.ip(), now);
                if !ok {
                    self.dropped.inc();
                }
                ok
            },
        )
    }

    /// The owned packets of the layers below (what the TCP carriers read)
    /// pass the same gate as UDP entries.
    fn poll_recv_owned(
        &self,
        cx: &mut Context,
        out: &mut Vec<(std::net::SocketAddr, bytes::BytesMut)>,
        max: usize,
    ) -> Poll<()> {
        let mut tables = None;
        let now = tokio::time::Instant::now();
        swb_quic::carrier::poll_owned_kept(
            cx,
            out,
            max,
            |cx, out, max| self.inner.poll_recv_owned(cx, out, max),
            |(addr, p)| {
                if !tokenless_initial(&p) {
                    return Some((addr, p));
                }
                let t = tables
                    .get_or_insert_with(|| self.tables.lock().unwrap_or_else(|p| p.into_inner()));
                if self.admit(t, addr.ip(), now) {
                    Some((addr, p))
                } else {
                    self.dropped.inc();
                    None
                }
            },
        )
    }
}

/// Reads entries with `recv` and returns those `keep` admits ([`compact`]).
/// A batch with none left is read past, up to 16 in a row; then the
/// endpoint driver yields (woken again at once) instead of spinning on a
/// flood with nothing counted as work.
pub(crate) fn poll_kept<'a>(
    cx: &mut Context,
    bufs: &mut [IoSliceMut<'a>],
    meta: &mut [quinn::udp::RecvMeta],
    mut recv: impl FnMut(
        &mut Context,
        &mut [IoSliceMut<'a>],
        &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>>,
    mut keep: impl FnMut(&quinn::udp::RecvMeta, &[u8]) -> bool,
) -> Poll<io::Result<usize>> {
    const ALL_DROPPED: usize = 16;
    for _ in 0..ALL_DROPPED {
        let n = match recv(cx, bufs, meta) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        let kept = compact(bufs, meta, n, &mut keep);
        if kept > 0 {
            return Poll::Ready(Ok(kept));
        }
    }
    cx.waker().wake_by_ref();
    Poll::Pending
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_entries_are_taken_out_and_the_rest_moved_up_with_their_bytes() {
        let mut store = [[0u8; 8]; 4];
        for (i, b) in store.iter_mut().enumerate() {
            b.fill(i as u8 + 1);
        }
        let [a, b, c, d] = &mut store;
        let mut bufs = [
            IoSliceMut::new(a),
            IoSliceMut::new(b),
            IoSliceMut::new(c),
            IoSliceMut::new(d),
        ];
        let base = quinn::udp::RecvMeta {
            addr: "127.0.0.1:1".parse().expect("addr"),
            len: 8,
            stride: 8,
            ecn: None,
            dst_ip: None,
        };
        let mut meta = [base; 4];
        for (i, m) in meta.iter_mut().enumerate() {
            m.addr.set_port(i as u16 + 1);
        }
        // Drop the 1st and 3rd: the 2nd and 4th come first, bytes and all.
        let kept = compact(&mut bufs, &mut meta, 4, |m, _| m.addr.port() % 2 == 0);
        assert_eq!(kept, 2);
        assert_eq!((meta[0].addr.port(), meta[1].addr.port()), (2, 4));
        assert_eq!((&bufs[0][..], &bufs[1][..]), (&[2u8; 8][..], &[4u8; 8][..]));
        // Only the first `n` count; all kept: nothing moves.
        assert_eq!(compact(&mut bufs, &mut meta, 1, |_, _| true), 1);
        assert_eq!(compact(&mut bufs, &mut meta, 4, |_, _| false), 0);
    }

    #[test]
    fn recognises_tokenless_initials_only() {
        // flags, version 1, DCID len 8 + DCID, SCID len 0, token len 0, ...
        let mut init = vec![
            0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x41, 0x00,
        ];
        assert!(tokenless_initial(&init));
        init[16 - 1] = 0; // still SCID 0
        init[16] = 0x41;
        // With a token (length 5).
        let with_token = vec![
            0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 5, 9, 9, 9, 9, 9,
        ];
        assert!(!tokenless_initial(&with_token));
        // Handshake packet (type 0b10), short header, version negotiation.
        assert!(!tokenless_initial(&[0xe3, 0, 0, 0, 1, 0, 0, 0]));
        assert!(!tokenless_initial(&[0x43, 1, 2, 3]));
        assert!(!tokenless_initial(&[0xc3, 0, 0, 0, 0, 0, 0, 0]));
        // Truncated.
        assert!(!tokenless_initial(&[0xc3, 0, 0, 0, 1, 20, 1]));
        assert!(!tokenless_initial(&[]));
    }
}
