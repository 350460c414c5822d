//! Relay shards (`shards` in the config, `--shards`): one quinn endpoint
//! per shard, each with its own UDP socket on the same address
//! (`SO_REUSEPORT`) and its own driver task, so receiving and demultiplexing
//! packets is not one task's work for the whole relay.
//!
//! The kernel spreads datagrams over the sockets by source address and
//! port, which keeps a connection on one socket only until its client
//! moves (a NAT rebinding, a new network, the TCP carrier). So every
//! connection ID a shard issues starts with the shard's number
//! ([`ShardCids`]), and each shard's socket ([`ShardSocket`]) hands a packet
//! whose destination ID names another shard to that shard's queue: the
//! connection lives in one endpoint and migration still works. A
//! connection starts where its first Initial lands (the client chose that
//! packet's destination ID, so it names no shard); the IDs it then uses
//! are that shard's, and packets from the same address keep arriving
//! there.
//!
//! Everything above the endpoints — registry, mailboxes, status, mesh — is
//! shared by the shards as it is by the sessions of one endpoint.

use bytes::BytesMut;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use swb_quic::carrier::Inbound;
use tokio::sync::mpsc;

/// Most shards a relay runs (a connection ID's first byte names one).
pub const MAX_SHARDS: usize = 64;
/// Length of the connection IDs the relay issues (quinn's default).
pub(crate) const CID_LEN: usize = 8;

/// The shards' hand-over queues, shared by their sockets.
#[derive(Debug)]
pub(crate) struct ShardTable {
    inbound: Vec<Inbound>,
    senders: Vec<mpsc::Sender<(SocketAddr, BytesMut)>>,
    /// Packets handed from the shard that received them to the one whose
    /// connection they belong to.
    pub(crate) forwarded: prometheus::IntCounter,
}

impl ShardTable {
    pub(crate) fn new(shards: usize) -> Result<Arc<Self>, prometheus::Error> {
        let inbound: Vec<Inbound> = (0..shards).map(|_| Inbound::default()).collect();
        let senders = inbound.iter().map(Inbound::sender).collect();
        Ok(Arc::new(Self {
            inbound,
            senders,
            forwarded: prometheus::IntCounter::new(
                "swb_relay_shard_forwarded_total",
                "QUIC packets a relay shard received (over UDP, or from a TCP carrier) for a connection of another shard (a client that moved) and handed over.",
            )?,
        }))
    }

    pub(crate) fn len(&self) -> usize {
        self.inbound.len()
    }
}

/// The shard a packet belongs to, from its destination connection ID:
/// short headers always carry one of ours; long headers (Initial, 0-RTT,
/// Handshake) are routed when their ID has our length. `None`: leave it
/// where it arrived (no ID, or one a client chose for its first Initial).
pub(crate) fn shard_of(d: &[u8], shards: usize) -> Option<usize> {
    let b0 = *d.first()?;
    let first = if b0 & 0x80 == 0 {
        *d.get(1)?
    } else {
        let len = usize::from(*d.get(5)?);
        if len != CID_LEN {
            return None;
        }
        *d.get(6)?
    };
    Some(usize::from(first) % shards.max(1))
}

/// Issues connection IDs that start with the shard's number and go on
/// with bytes from the system's CSPRNG (as quinn's own generator does: an
/// observer must not predict or link a connection's IDs; the shard byte is
/// all they share).
#[derive(Debug)]
pub(crate) struct ShardCids {
    pub(crate) shard: u8,
}

impl quinn::ConnectionIdGenerator for ShardCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        use ring::rand::SecureRandom as _;
        let mut id = [0u8; CID_LEN];
        id[0] = self.shard;
        if ring::rand::SystemRandom::new().fill(&mut id[1..]).is_err() {
            // The system's generator failed (it does not, short of a
            // broken kernel): fall back to a non-cryptographic one rather
            // than refuse the connection.
            for b in &mut id[1..] {
                *b = fastrand::u8(..);
            }
        }
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// One shard's socket: what its UDP socket (and, on shard 0, the TCP
/// carriers) received, less what belongs to other shards, plus what other
/// shards handed over.
pub(crate) struct ShardSocket {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    shard: usize,
    table: Arc<ShardTable>,
    /// Which source to read first next time (so neither starves).
    handed_first: AtomicBool,
}

impl std::fmt::Debug for ShardSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSocket")
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

impl ShardSocket {
    pub(crate) fn new(
        inner: Arc<dyn quinn::AsyncUdpSocket>,
        shard: usize,
        table: Arc<ShardTable>,
    ) -> Self {
        Self {
            inner,
            shard,
            table,
            handed_first: AtomicBool::new(false),
        }
    }
}

impl quinn::AsyncUdpSocket for ShardSocket {
    swb_quic::pass_through_socket!(inner);

    fn try_send(&self, t: &quinn::udp::Transmit) -> io::Result<()> {
        self.inner.try_send(t)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let shards = self.table.len();
        crate::gate::poll_kept(
            cx,
            bufs,
            meta,
            |cx, bufs, meta| self.inner.poll_recv(cx, bufs, meta),
            |m, entry| {
                let Some(to) = shard_of(entry, shards).filter(|&s| s != self.shard) else {
                    return true;
                };
                // One entry holds datagrams of one source (GRO), so of one
                // connection: all of them go.
                for seg in entry.chunks(m.stride.max(1)) {
                    // A full queue drops the packet, as a full socket would.
                    if self.table.senders[to]
                        .try_send((m.addr, BytesMut::from(seg)))
                        .is_ok()
                    {
                        self.table.forwarded.inc();
                    }
                }
                false
            },
        )
    }

    /// Packets other shards handed over (this shard's to take as they
    /// are) and the owned ones of the layer below (the carriers'), each of
    /// which another shard's connection may own; by turns, so neither
    /// starves.
    fn poll_recv_owned(
        &self,
        cx: &mut Context,
        out: &mut Vec<(SocketAddr, BytesMut)>,
        max: usize,
    ) -> Poll<()> {
        let shards = self.table.len();
        let handed = |cx: &mut Context, out: &mut Vec<(SocketAddr, BytesMut)>| {
            self.table.inbound[self.shard].poll_owned(cx, out, max)
        };
        let below = |cx: &mut Context, out: &mut Vec<(SocketAddr, BytesMut)>| {
            swb_quic::carrier::poll_owned_kept(
                cx,
                out,
                max,
                |cx, out, max| self.inner.poll_recv_owned(cx, out, max),
                |(addr, p)| {
                    let Some(to) = shard_of(&p, shards).filter(|&s| s != self.shard) else {
                        return Some((addr, p));
                    };
                    // A full queue drops the packet, as a full socket would.
                    if self.table.senders[to].try_send((addr, p)).is_ok() {
                        self.table.forwarded.inc();
                    }
                    None
                },
            )
        };
        if self.handed_first.fetch_xor(true, Ordering::Relaxed) {
            if handed(cx, out).is_ready() {
                return Poll::Ready(());
            }
            below(cx, out)
        } else {
            if below(cx, out).is_ready() {
                return Poll::Ready(());
            }
            handed(cx, out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::ConnectionIdGenerator as _;

    #[test]
    fn packets_go_to_the_shard_their_connection_id_names() {
        let mut g = ShardCids { shard: 3 };
        let cid = g.generate_cid();
        assert_eq!(cid.len(), CID_LEN);
        assert_eq!(cid[0], 3);
        assert_ne!(g.generate_cid(), cid, "the rest is random");
        // Short header: flags, then our ID.
        let mut short = vec![0x40];
        short.extend_from_slice(&cid);
        short.extend_from_slice(&[0; 20]);
        assert_eq!(shard_of(&short, 4), Some(3));
        assert_eq!(shard_of(&short, 2), Some(1), "wraps past the count");
        // Handshake (long header) to our ID.
        let mut long = vec![0xe0, 0, 0, 0, 1, CID_LEN as u8];
        long.extend_from_slice(&cid);
        long.extend_from_slice(&[8, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(shard_of(&long, 4), Some(3));
        // A first Initial with the 20-byte ID a quinn client picks stays.
        let mut initial = vec![0xc0, 0, 0, 0, 1, 20];
        initial.extend_from_slice(&[9; 20]);
        assert_eq!(shard_of(&initial, 4), None);
        // Too short to say: left where it is (quinn judges it).
        assert_eq!(shard_of(&[], 4), None);
        assert_eq!(shard_of(&[0x40], 4), None);
        assert_eq!(shard_of(&[0xc0, 0, 0, 0, 1, 8, 1], 4), Some(1));
        assert_eq!(shard_of(&[0xc0, 0, 0], 4), None);
    }
}
