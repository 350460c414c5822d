//! QUIC packets over a byte stream, for networks that drop UDP: the same
//! QUIC connection, its packets carried inside a TLS-over-TCP connection to
//! the relay's HTTPS port (an HTTP/1.1 upgrade to [`PROTOCOL`] at [`PATH`]),
//! each packet prefixed with its length (2 bytes, big-endian).
//!
//! Both ends put the carried packets into the same quinn endpoint as the
//! UDP ones, through an [`quinn::AsyncUdpSocket`] that also reads and
//! writes a [`Inbound`] queue: to quinn a carrier is just another path, so
//! moving between UDP and TCP is QUIC path migration, not a reconnect.
//!
//! Why not the `qmux` crate (IETF "QUIC on Streams"): it replaces QUIC's
//! packet layer with streams of frames, so a connection could not move
//! between UDP and TCP; carrying the packets themselves (as iroh's relay
//! does) keeps one connection on both.

use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The HTTP path of the carrier upgrade.
pub const PATH: &str = "/v1/quic";
/// The `Upgrade:` protocol token.
pub const PROTOCOL: &str = "swb-quic/1";
/// The MTU discovery bound of a path over a carrier: QUIC packets up to
/// this size (UDP paths go as far as their first link takes, see
/// [`path_mtu_bound`]). A stream carries any size,
/// and a large packet is one encryption, one header and one frame where
/// Ethernet-size ones are eleven; TLS records hold 16 KiB.
pub const CARRIER_MTU: u16 = 16_000;
/// Largest packet a carrier takes: [`CARRIER_MTU`] with room to spare.
pub const MAX_PACKET: usize = 16 * 1024;
/// Transmits (each up to quinn's GSO batch, framed) queued toward one
/// carrier connection before new ones are dropped (QUIC's loss recovery
/// resends them).
pub const QUEUE: usize = 32;
/// Bytes queued toward one carrier connection at most, whatever the
/// transmits' sizes; past it new transmits are dropped like past [`QUEUE`].
/// 1 MiB took the carrier from ~530 to ~650 MB/s here against a quarter of
/// it (the bound before; the cause assumed, transmits dropped while the
/// writer encrypts the previous batch, was not measured). A relay also
/// bounds all its carriers together ([`outbound_sharing`]).
pub const QUEUE_BYTES: usize = 1024 * 1024;
/// Read buffer of a carrier connection: room kept for one large read.
const READ_ROOM: usize = 64 * 1024;
/// Packets from all carriers queued for the endpoint before new ones are
/// dropped.
pub const INBOUND_QUEUE: usize = 1024;

/// An endpoint configuration that takes packets up to [`CARRIER_MTU`]
/// (the `max_udp_payload_size` it tells peers): what lets a carrier path,
/// or a UDP path over a link with a large MTU, grow past Ethernet's bound.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    // In quinn's range (1200..=65527): cannot fail.
    let _ = c.max_udp_payload_size(CARRIER_MTU);
    c
}

/// The path MTU hook of every transport configuration here (relay, daemon,
/// mesh links): see [`path_mtu_bound`].
pub fn path_mtu_hook() -> quinn::PathMtuUpperBound {
    std::sync::Arc::new(path_mtu_bound)
}

/// Headers below a QUIC packet on the largest IP path: IPv6 (40) and UDP
/// (8). An Ethernet link's 1500 less these is quinn's own bound, 1452.
const IP_UDP_OVERHEAD: u32 = 48;
/// Smallest UDP payload QUIC works over, where a path's MTU discovery
/// starts.
pub const QUIC_MIN_MTU: u16 = 1200;

/// The MTU discovery bound of a path to `remote`: [`CARRIER_MTU`] over a
/// carrier connection ([`is_virtual`]); over UDP what the first link toward
/// `remote` takes ([`route_udp_payload`]), as TCP derives its MSS from the
/// interface — 1452 on Ethernet as before (no probe sent that the link
/// itself must drop), 8952 on a jumbo-frame network, [`CARRIER_MTU`] on
/// loopback, less on a tunnel interface; `None` (quinn's 1452) when the
/// route cannot be looked up.
pub fn path_mtu_bound(remote: SocketAddr) -> Option<u16> {
    if is_virtual(&remote) {
        return Some(CARRIER_MTU);
    }
    route_udp_payload(remote)
}

/// The kernel's MTU of the route to `remote` (a connected UDP socket's
/// `IP_MTU`/`IPV6_MTU`: a route lookup, no packet sent), less the IP and
/// UDP headers, within `1200..=CARRIER_MTU`.
pub fn route_udp_payload(remote: SocketAddr) -> Option<u16> {
    let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
    let local: SocketAddr = match remote {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = std::net::UdpSocket::bind(local).ok()?;
    sock.connect(remote).ok()?;
    let mtu = match remote {
        SocketAddr::V4(_) => rustix::net::sockopt::ip_mtu(&sock),
        SocketAddr::V6(_) => rustix::net::sockopt::ipv6_mtu(&sock),
    }
    .ok()?;
    Some(udp_payload_for(mtu))
}

/// The largest QUIC packet a link of `mtu` bytes takes, within
/// `1200..=CARRIER_MTU`.
fn udp_payload_for(mtu: u32) -> u16 {
    let payload = mtu
        .saturating_sub(IP_UDP_OVERHEAD)
        .clamp(u32::from(QUIC_MIN_MTU), u32::from(CARRIER_MTU));
    u16::try_from(payload).unwrap_or(CARRIER_MTU)
}

/// Why a carrier connection ended.
#[derive(Debug, thiserror::Error)]
pub enum CarrierError {
    /// The byte stream failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// A length prefix over [`MAX_PACKET`] (or zero).
    #[error("carried packet of {0} bytes (limit {MAX_PACKET})")]
    BadLength(usize),
}

/// Reads one carried packet; `None` at a clean end of stream.
pub async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<BytesMut>, CarrierError> {
    if buf.capacity() - buf.len() < MAX_PACKET {
        buf.reserve(READ_ROOM);
    }
    while buf.len() < 2 {
        if r.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::from(io::ErrorKind::UnexpectedEof).into())
            };
        }
    }
    let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
    if len == 0 || len > MAX_PACKET {
        return Err(CarrierError::BadLength(len));
    }
    while buf.len() < 2 + len {
        if r.read_buf(buf).await? == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
    }
    buf.advance(2);
    // Its own part of the buffer: quinn decrypts it in place.
    Ok(Some(buf.split_to(len)))
}

/// Writes framed packets (see [`frame`]) as one write, and flushes: a
/// vectored write where `w` takes one (TLS then cuts full records across
/// the packets without a copy into one buffer first), else one buffer.
pub async fn write_framed<W: AsyncWrite + Unpin>(
    w: &mut W,
    framed: &[Bytes],
    scratch: &mut Vec<u8>,
) -> io::Result<()> {
    match framed {
        [one] => w.write_all(one).await?,
        _ if w.is_write_vectored() => {
            let mut slices: Vec<io::IoSlice<'_>> =
                framed.iter().map(|f| io::IoSlice::new(f)).collect();
            let mut rest = &mut slices[..];
            while !rest.is_empty() {
                let n = w.write_vectored(rest).await?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                io::IoSlice::advance_slices(&mut rest, n);
            }
        }
        _ => {
            scratch.clear();
            for f in framed {
                scratch.extend_from_slice(f);
            }
            w.write_all(scratch).await?;
        }
    }
    w.flush().await
}

/// The datagrams of a transmit: its contents cut at `segment_size` (GSO).
pub fn segments<'a>(t: &'a quinn::udp::Transmit<'a>) -> impl Iterator<Item = &'a [u8]> {
    let size = t.segment_size.unwrap_or(t.contents.len()).max(1);
    t.contents.chunks(size)
}

/// A transmit's datagrams, each with its length prefix, in one buffer.
pub fn frame(t: &quinn::udp::Transmit<'_>) -> Bytes {
    let n = segments(t).count();
    let mut b = BytesMut::with_capacity(t.contents.len() + 2 * n);
    for seg in segments(t) {
        push_framed(&mut b, seg);
    }
    b.freeze()
}

/// One packet with its length prefix.
pub fn frame_one(p: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(p.len() + 2);
    push_framed(&mut b, p);
    b.freeze()
}

fn push_framed(b: &mut BytesMut, p: &[u8]) {
    if let Ok(len) = u16::try_from(p.len()) {
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(p);
    }
}

/// The way into a carrier connection's write queue: bounded by
/// [`QUEUE`] transmits and [`QUEUE_BYTES`] bytes, checked before a
/// transmit is queued.
#[derive(Debug, Clone)]
pub struct Outbound {
    tx: mpsc::Sender<Bytes>,
    queued: Arc<AtomicUsize>,
    shared: Option<SharedQueue>,
}

/// The carrier task's end of an [`Outbound`] queue.
#[derive(Debug)]
pub struct OutboundRx {
    rx: mpsc::Receiver<Bytes>,
    queued: Arc<AtomicUsize>,
    shared: Option<SharedQueue>,
    /// Bytes taken off the channel and being written (released after).
    writing: usize,
}

/// Bytes queued toward a group of carriers together, and their bound.
#[derive(Debug, Clone)]
pub struct SharedQueue {
    queued: Arc<AtomicUsize>,
    limit: usize,
}

impl SharedQueue {
    /// A group bound of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            queued: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    /// Bytes queued in the group now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

/// Takes `n` bytes of `queued`'s room under `limit`; `false` (nothing
/// taken) when they do not fit.
fn take_room(queued: &AtomicUsize, n: usize, limit: usize) -> bool {
    if queued.fetch_add(n, Ordering::AcqRel) + n > limit {
        queued.fetch_sub(n, Ordering::AcqRel);
        return false;
    }
    true
}

/// A carrier connection's write queue.
pub fn outbound() -> (Outbound, OutboundRx) {
    outbound_in(None)
}

/// A carrier connection's write queue that also counts against `shared`
/// (a relay's bound over all its carriers, so [`QUEUE_BYTES`] times its
/// connection limit is not what a crowd of stalled carriers can pin).
pub fn outbound_sharing(shared: &SharedQueue) -> (Outbound, OutboundRx) {
    outbound_in(Some(shared.clone()))
}

fn outbound_in(shared: Option<SharedQueue>) -> (Outbound, OutboundRx) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let queued = Arc::new(AtomicUsize::new(0));
    (
        Outbound {
            tx,
            queued: queued.clone(),
            shared: shared.clone(),
        },
        OutboundRx {
            rx,
            queued,
            shared,
            writing: 0,
        },
    )
}

impl OutboundRx {
    /// `n` bytes written out (or given up): their room comes back.
    fn release(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
        if let Some(s) = &self.shared {
            s.queued.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

impl Drop for OutboundRx {
    fn drop(&mut self) {
        // What is queued or was being written will never be: its room goes
        // back (to the group's count above all). Closed first, so a
        // sender racing this fails its send and takes its own bytes back.
        self.rx.close();
        let mut n = std::mem::take(&mut self.writing);
        while let Ok(b) = self.rx.try_recv() {
            n += b.len();
        }
        self.release(n);
    }
}

impl Outbound {
    /// Queues framed packets; `false` (dropped, as a full socket buffer
    /// would) when the queue (or its group's) is full or its carrier gone.
    pub fn try_send(&self, framed: Bytes) -> bool {
        let n = framed.len();
        if !take_room(&self.queued, n, QUEUE_BYTES) {
            return false;
        }
        if let Some(s) = &self.shared {
            if !take_room(&s.queued, n, s.limit) {
                self.queued.fetch_sub(n, Ordering::AcqRel);
                return false;
            }
        }
        if self.tx.try_send(framed).is_err() {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            if let Some(s) = &self.shared {
                s.queued.fetch_sub(n, Ordering::AcqRel);
            }
            return false;
        }
        true
    }

    /// Whether both lead into the same queue.
    pub fn same_channel(&self, other: &Self) -> bool {
        self.tx.same_channel(&other.tx)
    }
}

/// How a carrier connection ended (see [`pump`]).
#[derive(Debug)]
pub enum PumpEnd {
    /// The other end closed it.
    Closed,
    /// Nothing arrived for the idle time.
    Idle,
    /// Reading failed or a bad length arrived.
    Read(CarrierError),
    /// Writing failed, or nothing will be sent any more.
    Write,
}

/// Moves packets both ways over a carrier connection until it ends:
/// packets read go to the endpoint as from `from` (a full queue drops
/// them, as a full socket buffer would), framed transmits from `rx` are
/// written. Ends after `idle` without a packet read.
pub async fn pump<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    rx: &mut OutboundRx,
    into_endpoint: mpsc::Sender<(SocketAddr, BytesMut)>,
    from: SocketAddr,
    idle: std::time::Duration,
) -> PumpEnd {
    // A write an earlier pump on this queue was cut off in: its room back.
    let cut_off = std::mem::take(&mut rx.writing);
    rx.release(cut_off);
    let (mut rd, mut wr) = tokio::io::split(io);
    let read = async {
        let mut buf = BytesMut::new();
        loop {
            match tokio::time::timeout(idle, read_packet(&mut rd, &mut buf)).await {
                Ok(Ok(Some(p))) => {
                    let _ = into_endpoint.try_send((from, p));
                }
                Ok(Ok(None)) => return PumpEnd::Closed,
                Ok(Err(e)) => return PumpEnd::Read(e),
                Err(_) => return PumpEnd::Idle,
            }
        }
    };
    let write = async {
        let mut batch = Vec::with_capacity(32);
        let mut scratch = Vec::new();
        while rx.rx.recv_many(&mut batch, QUEUE).await > 0 {
            let bytes = batch.iter().map(Bytes::len).sum::<usize>();
            rx.writing = bytes;
            let written = write_framed(&mut wr, &batch, &mut scratch).await;
            rx.writing = 0;
            rx.release(bytes);
            if written.is_err() {
                break;
            }
            batch.clear();
        }
        PumpEnd::Write
    };
    tokio::select! {
        end = read => end,
        end = write => end,
    }
}

/// The address a relay gives carrier connection `n`: in `100::/64`, the
/// IPv6 discard prefix (RFC 6666), which no real peer has.
pub fn virtual_addr(n: u64) -> SocketAddr {
    let hi = 0x0100u128 << 112;
    SocketAddr::new(Ipv6Addr::from(hi | u128::from(n)).into(), 443)
}

/// Whether `a` is a carrier connection's address (see [`virtual_addr`]).
pub fn is_virtual(a: &SocketAddr) -> bool {
    match a {
        SocketAddr::V6(v6) => v6.ip().segments()[..4] == [0x0100, 0, 0, 0],
        SocketAddr::V4(_) => false,
    }
}

/// Packets arriving from carriers, as an endpoint's socket reads them.
#[derive(Debug)]
pub struct Inbound {
    rx: Mutex<mpsc::Receiver<(SocketAddr, BytesMut)>>,
    tx: mpsc::Sender<(SocketAddr, BytesMut)>,
}

impl Default for Inbound {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
        Self {
            rx: Mutex::new(rx),
            tx,
        }
    }
}

impl Inbound {
    /// Where carriers put the packets they read (`try_send`: a full queue
    /// drops the packet, as a full socket buffer would).
    pub fn sender(&self) -> mpsc::Sender<(SocketAddr, BytesMut)> {
        self.tx.clone()
    }

    /// Hands up to `max` queued packets to the endpoint as they are (see
    /// [`quinn::AsyncUdpSocket::poll_recv_owned`]: no copy into its receive
    /// buffers); `Pending`, woken by the next packet, when none is queued.
    pub fn poll_owned(
        &self,
        cx: &mut Context,
        out: &mut Vec<(SocketAddr, BytesMut)>,
        max: usize,
    ) -> Poll<()> {
        let mut rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        let start = out.len();
        while out.len() - start < max {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(x)) => out.push(x),
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        if out.len() > start {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Owned packets from `poll` (a layer's [`Inbound::poll_owned`] or the
/// socket under it), each passed through `route`, which keeps it
/// (`Some`) or takes it elsewhere (`None`: dropped or handed on). A batch
/// with none kept is read past, up to 16 in a row; then `Pending` with a
/// wake-up at once, so a flood with nothing kept cannot hold the endpoint.
pub fn poll_owned_kept(
    cx: &mut Context,
    out: &mut Vec<(SocketAddr, BytesMut)>,
    max: usize,
    mut poll: impl FnMut(&mut Context, &mut Vec<(SocketAddr, BytesMut)>, usize) -> Poll<()>,
    mut route: impl FnMut((SocketAddr, BytesMut)) -> Option<(SocketAddr, BytesMut)>,
) -> Poll<()> {
    let start = out.len();
    for _ in 0..16 {
        if poll(cx, out, max).is_pending() {
            return Poll::Pending;
        }
        let read = out.split_off(start);
        out.extend(read.into_iter().filter_map(&mut route));
        if out.len() > start {
            return Poll::Ready(());
        }
    }
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// The [`quinn::AsyncUdpSocket`] methods a socket layer passes through to
/// the socket under it (the field named): write-readiness, the local
/// address, GSO/GRO segment counts, fragmentation. Not the packets
/// (`try_send`, `poll_recv`, `poll_recv_owned`): each layer says what it
/// does with those, and the vendored trait requires all three of it.
#[macro_export]
macro_rules! pass_through_socket {
    ($inner:ident) => {
        fn create_io_poller(
            self: ::std::sync::Arc<Self>,
        ) -> ::std::pin::Pin<Box<dyn ::quinn::UdpPoller>> {
            self.$inner.clone().create_io_poller()
        }

        fn local_addr(&self) -> ::std::io::Result<::std::net::SocketAddr> {
            self.$inner.local_addr()
        }

        fn max_transmit_segments(&self) -> usize {
            self.$inner.max_transmit_segments()
        }

        fn max_receive_segments(&self) -> usize {
            self.$inner.max_receive_segments()
        }

        fn may_fragment(&self) -> bool {
            self.$inner.may_fragment()
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vectored writer that takes at most 7 bytes a call, across slices.
    #[derive(Default)]
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(7);
            self.0.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(7 - n);
                self.0.extend_from_slice(&b[..take]);
                n += take;
                if n == 7 {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_vectored_write_of_many_packets_survives_partial_writes() {
        let ps: Vec<Bytes> = (0..5u8)
            .map(|i| Bytes::from(vec![i; 3 + 5 * usize::from(i)]))
            .collect();
        let framed: Vec<Bytes> = ps.iter().map(|p| frame_one(p)).collect();
        let mut w = Trickle::default();
        write_framed(&mut w, &framed, &mut Vec::new())
            .await
            .expect("write");
        let mut r = &w.0[..];
        let mut buf = BytesMut::new();
        for p in &ps {
            let got = read_packet(&mut r, &mut buf).await.expect("read");
            assert_eq!(got.as_deref(), Some(&p[..]), "packets in order, intact");
        }
        assert!(read_packet(&mut r, &mut buf).await.expect("end").is_none());
    }

    #[tokio::test]
    async fn packets_round_trip_and_bad_lengths_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let ps = [
            Bytes::from_static(b"one"),
            Bytes::from(vec![7u8; MAX_PACKET]),
        ];
        let framed: Vec<Bytes> = ps.iter().map(|p| frame_one(p)).collect();
        write_framed(&mut a, &framed, &mut Vec::new())
            .await
            .expect("write");
        drop(a);
        let mut buf = BytesMut::new();
        for p in &ps {
            let got = read_packet(&mut b, &mut buf).await.expect("read");
            assert_eq!(got.as_deref(), Some(&p[..]));
        }
        assert!(read_packet(&mut b, &mut buf).await.expect("end").is_none());
        for bad in [[0u8, 0], (MAX_PACKET as u16 + 1).to_be_bytes()] {
            let (mut a, mut b) = tokio::io::duplex(64);
            a.write_all(&bad).await.expect("write");
            assert!(matches!(
                read_packet(&mut b, &mut BytesMut::new()).await,
                Err(CarrierError::BadLength(_))
            ));
        }
        // Cut inside a packet.
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 9, 1, 2]).await.expect("write");
        drop(a);
        assert!(read_packet(&mut b, &mut BytesMut::new()).await.is_err());
    }

    #[tokio::test]
    async fn a_carriers_queue_is_bounded_by_bytes_and_freed_as_it_is_written() {
        let (tx, mut rx) = outbound();
        // A GSO batch's worth of large packets, framed as one transmit.
        let big = Bytes::from(frame_one(&vec![1u8; MAX_PACKET]).repeat(4));
        let fit = QUEUE_BYTES / big.len();
        assert!(
            fit < QUEUE,
            "the byte bound binds first for large transmits"
        );
        for _ in 0..fit {
            assert!(tx.try_send(big.clone()));
        }
        assert!(!tx.try_send(big.clone()), "past QUEUE_BYTES: dropped");
        // Small ones are bounded by count.
        let (small_tx, _small_rx) = outbound();
        let one = frame_one(b"x");
        let sent = (0..QUEUE + 5)
            .filter(|_| small_tx.try_send(one.clone()))
            .count();
        assert_eq!(sent, QUEUE);
        // Written out, the room comes back.
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let (into, _from_carrier) = mpsc::channel(4);
        let from: SocketAddr = "[100::1]:443".parse().expect("addr");
        let pump = tokio::spawn(async move {
            pump(
                near,
                &mut rx,
                into,
                from,
                std::time::Duration::from_secs(30),
            )
            .await
        });
        let mut got = vec![0u8; fit * big.len()];
        far.read_exact(&mut got).await.expect("written");
        // The writer frees what it wrote once the write returned.
        let mut sent_again = false;
        for _ in 0..1000 {
            if tx.try_send(big.clone()) {
                sent_again = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(sent_again, "room again once written");
        pump.abort();
    }

    #[tokio::test]
    async fn carriers_sharing_a_bound_are_held_to_it_together_and_freed_when_closed() {
        let one = frame_one(&[7u8; 1000]);
        let shared = SharedQueue::new(3 * one.len());
        let (a, a_rx) = outbound_sharing(&shared);
        let (b, b_rx) = outbound_sharing(&shared);
        assert!(a.try_send(one.clone()) && a.try_send(one.clone()));
        assert!(b.try_send(one.clone()));
        // Each is far within its own bound, the group is full.
        assert!(!a.try_send(one.clone()), "past the group's bound: dropped");
        assert!(!b.try_send(one.clone()), "the other carrier too");
        assert_eq!(shared.queued(), 3 * one.len());
        // A carrier that ends gives its queued bytes back to the group.
        drop(a_rx);
        assert_eq!(shared.queued(), one.len());
        assert!(!a.try_send(one.clone()), "a closed carrier takes nothing");
        assert_eq!(
            shared.queued(),
            one.len(),
            "nor keeps the failed send's room"
        );
        assert!(b.try_send(one.clone()), "room for the others again");
        drop(b_rx);
        assert_eq!(shared.queued(), 0);
    }

    #[test]
    fn path_mtu_bounds_follow_the_carrier_and_the_first_links_mtu() {
        assert_eq!(path_mtu_bound(virtual_addr(3)), Some(CARRIER_MTU));
        // Loopback's MTU (65 536 on Linux) is past what the endpoint takes.
        for lo in ["127.0.0.1:9", "[::ffff:127.0.0.1]:9"] {
            let a: SocketAddr = lo.parse().expect("addr");
            assert_eq!(route_udp_payload(a), Some(CARRIER_MTU), "{lo}");
            assert_eq!(path_mtu_bound(a), Some(CARRIER_MTU), "{lo}");
        }
        // Ethernet gives quinn's own bound; jumbo frames, tunnels and
        // the limits on either side.
        for (mtu, payload) in [
            (1500, 1452),
            (9000, 8952),
            (1420, 1372),
            (65_536, CARRIER_MTU),
            (1000, 1200),
        ] {
            assert_eq!(udp_payload_for(mtu), payload, "link MTU {mtu}");
        }
    }

    /// A waker that counts its wake-ups.
    struct Count(AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn owned_packets_are_handed_over_filtered_and_a_flood_of_dropped_ones_yields() {
        let inbound = Inbound::default();
        let from: SocketAddr = "[100::1]:443".parse().expect("addr");
        let tx = inbound.sender();
        for i in 0..10u8 {
            tx.try_send((from, BytesMut::from(&[i; 3][..])))
                .expect("room");
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        // Even ones kept, odd ones taken elsewhere; at most 4 read a time.
        let mut out = Vec::new();
        let poll = |cx: &mut Context, out: &mut Vec<_>, max| inbound.poll_owned(cx, out, max);
        let even = |(a, p): (SocketAddr, BytesMut)| (p[0] % 2 == 0).then_some((a, p));
        assert!(poll_owned_kept(&mut cx, &mut out, 4, poll, even).is_ready());
        let firsts: Vec<u8> = out.iter().map(|(_, p)| p[0]).collect();
        assert_eq!(firsts, [0, 2], "the first four read, the even ones kept");
        // The rest, then nothing: pending, woken by the next packet.
        out.clear();
        while poll_owned_kept(&mut cx, &mut out, 4, poll, even).is_ready() {}
        let firsts: Vec<u8> = out.iter().map(|(_, p)| p[0]).collect();
        assert_eq!(firsts, [4, 6, 8]);
        tx.try_send((from, BytesMut::from(&[12u8][..])))
            .expect("room");
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "woken by a new packet");
        // A flood of which nothing is kept: read past 16 batches, then
        // pending with a wake-up at once instead of spinning.
        for i in 0..(16 * 4 + 10) {
            let _ = tx.try_send((from, BytesMut::from(&[i as u8 | 1][..])));
        }
        out.clear();
        let before = count.0.load(Ordering::Relaxed);
        let none = |_: (SocketAddr, BytesMut)| None;
        assert!(poll_owned_kept(&mut cx, &mut out, 4, poll, none).is_pending());
        assert!(out.is_empty());
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            before + 1,
            "woken to go on"
        );
    }

    #[test]
    fn virtual_addresses_are_recognised_and_real_ones_are_not() {
        assert!(is_virtual(&virtual_addr(1)));
        assert!(is_virtual(&virtual_addr(u64::MAX)));
        assert_ne!(virtual_addr(1), virtual_addr(2));
        for real in [
            "127.0.0.1:443",
            "[::1]:443",
            "[2001:db8::1]:443",
            "[fd00::1]:1",
        ] {
            assert!(!is_virtual(&real.parse().expect("addr")), "{real}");
        }
    }
}
