//! What the relay and the daemon both do on a QUIC connection: read and
//! write [`swb_wire`] frames on quinn streams, and bind the UDP socket QUIC
//! runs on. One copy for both ends (the daemon must not depend on the relay).

pub mod carrier;

use bytes::{Bytes, BytesMut};
use std::net::SocketAddr;
use swb_wire::{decode, Decoded, Frame, HEADER_LEN, MAX_STREAM_HEADER};

/// UDP socket buffer size asked for (send and receive). The Linux default
/// (~208 KiB) drops packets under bursts, and each dropped datagram halves
/// QUIC's congestion window. Capped by `net.core.rmem_max`/`wmem_max`.
pub const UDP_BUFFER: usize = 4 << 20;

/// What a connection may have in flight to the relay, across all its
/// streams, before it authenticated (an API key's `Hello`, or the mesh
/// key's proof): enough for a `Hello`, so a stranger pins at most this much
/// of the relay's memory per handshake slot.
pub const PREAUTH_RECEIVE_WINDOW: u32 = 64 * 1024;
/// The same once a daemon's session is registered: all its streams
/// together (data streams to peers, status, pings).
pub const SESSION_RECEIVE_WINDOW: u32 = 8 << 20;
/// The same for a proven mesh link, which carries many sessions' streams.
pub const MESH_RECEIVE_WINDOW: u32 = 64 << 20;
/// Unread QUIC datagrams (TUN packets) a daemon's connection buffers at
/// most; more are dropped as IP allows (oldest first, in quinn). A burst
/// the interface writer has not yet taken must fit: at 128 KiB a bulk TCP
/// flow lost about one packet in seven here.
pub const DATAGRAM_BUFFER: usize = 1024 * 1024;
/// The same at the relay, per connection.
pub const RELAY_DATAGRAM_BUFFER: usize = 512 * 1024;
/// What one stream may have in flight (within its connection's window).
pub const STREAM_RECEIVE_WINDOW: u32 = 1250 * 1000;

/// The TLS provider of every connection the relay and the daemon make or
/// take (QUIC, the mesh, the TCP carrier): rustls' ring provider with TLS
/// 1.3's AES-128-GCM-SHA256 put first, ahead of its default
/// AES-256-GCM-SHA384. The handshake's key schedule and transcript then
/// run on SHA-256, which most current x86-64 and ARMv8 CPUs do in hardware
/// (ring computes SHA-384 in software on x86-64: a tenth of a relay's CPU
/// while accepting connections), and
/// every packet takes 10 AES rounds instead of 14. It is the suite TLS 1.3
/// requires of every implementation and the one QUIC's Initial packets use
/// anyway; ChaCha20-Poly1305 and AES-256 stay offered after it.
pub fn tls_provider() -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        _ => 1,
    });
    p
}

/// The wait a busy relay's refusal asks for ([`swb_wire::busy`]), if `e`
/// is one: a `CONNECTION_REFUSED` close whose reason carries the hint.
pub fn busy_hint(e: &quinn::ConnectionError) -> Option<std::time::Duration> {
    match e {
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            swb_wire::busy::retry_in(&c.reason)
        }
        _ => None,
    }
}

/// Binds a UDP socket with [`UDP_BUFFER`] buffers (best effort: a smaller
/// buffer still works).
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let sock = std::net::UdpSocket::bind(addr)?;
    let s = socket2::SockRef::from(&sock);
    let _ = s.set_recv_buffer_size(UDP_BUFFER);
    let _ = s.set_send_buffer_size(UDP_BUFFER);
    Ok(sock)
}

/// Like [`udp_socket`], with `SO_REUSEPORT` set before binding, so several
/// sockets of one process share `addr` (the relay's shards: the kernel
/// spreads datagrams over them by source address and port).
#[cfg(unix)]
pub fn udp_socket_shared(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        // As std binds: an IPv6 wildcard takes IPv4 too where the system allows.
        let _ = s.set_only_v6(false);
    }
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    let _ = s.set_recv_buffer_size(UDP_BUFFER);
    let _ = s.set_send_buffer_size(UDP_BUFFER);
    Ok(s.into())
}

/// A frame could not be read or written on a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameIoError {
    /// The stream failed (reset, connection lost, …).
    #[error("{0}")]
    Stream(String),
    /// The header announced more than the reader allows.
    #[error("frame of {len} bytes exceeds {max}")]
    TooLarge {
        /// Announced body length.
        len: usize,
        /// Allowed.
        max: usize,
    },
    /// The body did not decode, or the frame could not be encoded.
    #[error("{0}")]
    Codec(String),
    /// A stream's first frame is of a type this version does not know.
    #[error("unknown stream header type")]
    UnknownHeader,
    /// The stream ended before its first frame.
    #[error("the stream ended before its first frame")]
    Ended,
}

impl From<FrameIoError> for String {
    fn from(e: FrameIoError) -> Self {
        e.to_string()
    }
}

fn stream(e: impl std::fmt::Display) -> FrameIoError {
    FrameIoError::Stream(e.to_string())
}

/// Reads one frame of at most `max` body bytes, consuming nothing beyond
/// it. `None` at a clean end of the stream; `Some(None)` for a frame type
/// this version does not know (already consumed).
async fn read_raw(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<Option<Frame>>, FrameIoError> {
    let mut head = [0u8; HEADER_LEN];
    match recv.read(&mut head[..1]).await.map_err(stream)? {
        None | Some(0) => return Ok(None),
        Some(_) => {}
    }
    recv.read_exact(&mut head[1..]).await.map_err(stream)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    // No frame may exceed the wire's limit, whatever the caller allows:
    // refuse before allocating.
    let max = max.min(swb_wire::MAX_FRAME_LEN);
    if len > max {
        return Err(FrameIoError::TooLarge { len, max });
    }
    let mut buf = BytesMut::zeroed(HEADER_LEN + len);
    buf[..HEADER_LEN].copy_from_slice(&head);
    recv.read_exact(&mut buf[HEADER_LEN..])
        .await
        .map_err(stream)?;
    match decode(&buf).map_err(|e| FrameIoError::Codec(e.to_string()))? {
        Decoded::Frame { frame, .. } => Ok(Some(Some(frame))),
        _ => Ok(Some(None)),
    }
}

/// Reads the first frame of a stream (at most [`MAX_STREAM_HEADER`] bytes),
/// consuming nothing beyond it: payload may follow, so an unknown type is an
/// error here rather than skipped.
pub async fn read_header(recv: &mut quinn::RecvStream) -> Result<Frame, FrameIoError> {
    match read_raw(recv, MAX_STREAM_HEADER).await? {
        Some(Some(f)) => Ok(f),
        Some(None) => Err(FrameIoError::UnknownHeader),
        None => Err(FrameIoError::Ended),
    }
}

/// Reads the next frame (body at most `max` bytes, and never more than
/// [`swb_wire::MAX_FRAME_LEN`]) of a stream that carries only frames,
/// skipping unknown types; `None` at a clean end.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<Frame>, FrameIoError> {
    loop {
        match read_raw(recv, max).await? {
            Some(Some(f)) => return Ok(Some(f)),
            Some(None) => continue,
            None => return Ok(None),
        }
    }
}

/// Reads the frames of a stream that carries nothing else, taking what
/// QUIC has buffered in one read instead of a header and a body at a
/// time: a run of small frames in one packet (a watch stream's status
/// changes) costs one read. Unknown frame types are skipped.
#[derive(Debug)]
pub struct FrameStream {
    recv: quinn::RecvStream,
    reader: swb_wire::FrameReader,
}

impl FrameStream {
    /// Reads `recv`; no frame body may exceed `max` (nor
    /// [`swb_wire::MAX_FRAME_LEN`]), refused from its header.
    pub fn new(recv: quinn::RecvStream, max: usize) -> Self {
        Self {
            recv,
            reader: swb_wire::FrameReader::with_limit(max),
        }
    }

    /// The next frame; `None` at a clean end of the stream (an end inside
    /// a frame is an error). Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Frame>, FrameIoError> {
        loop {
            match self.reader.next_frame() {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(swb_wire::DecodeError::FrameTooLarge { len, max, .. }) => {
                    return Err(FrameIoError::TooLarge {
                        len: len as usize,
                        max: max as usize,
                    })
                }
                Err(e) => return Err(FrameIoError::Codec(e.to_string())),
            }
            match self
                .recv
                .read_chunk(64 * 1024, true)
                .await
                .map_err(stream)?
            {
                Some(c) => self.reader.buf().extend_from_slice(&c.bytes),
                None if !self.reader.has_partial() => return Ok(None),
                None => {
                    return Err(FrameIoError::Stream(
                        "the stream ended inside a frame".into(),
                    ))
                }
            }
        }
    }
}

/// Frames encoded in `buf`, as the bytes to hand to quinn's
/// `write_chunk`. quinn keeps what it is given until the peer acknowledges
/// it, counting its length, not its capacity: a buffer at least half full
/// goes whole (no copy, no allocation); a mostly empty one is copied to its
/// length — what `write_all` does with every buffer — so that small writes
/// never pin large buffers.
pub fn outgoing(buf: BytesMut) -> Bytes {
    if buf.len() * 2 >= buf.capacity() {
        buf.freeze()
    } else {
        Bytes::copy_from_slice(&buf)
    }
}

/// Writes one frame to a stream.
pub async fn write_frame(send: &mut quinn::SendStream, f: &Frame) -> Result<(), FrameIoError> {
    let mut b = BytesMut::new();
    f.encode(&mut b)
        .map_err(|e| FrameIoError::Codec(e.to_string()))?;
    send.write_chunk(outgoing(b)).await.map_err(stream)
}

/// Writes frames to a stream in one write (one buffer, one hand-off to
/// QUIC, however many frames).
pub async fn write_frames<'a>(
    send: &mut quinn::SendStream,
    frames: impl IntoIterator<Item = &'a Frame>,
) -> Result<(), FrameIoError> {
    let mut b = BytesMut::new();
    for f in frames {
        f.encode(&mut b)
            .map_err(|e| FrameIoError::Codec(e.to_string()))?;
    }
    if b.is_empty() {
        return Ok(());
    }
    send.write_chunk(outgoing(b)).await.map_err(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn tls_provider_puts_aes_128_gcm_first_and_keeps_the_rest() {
        let ours: Vec<_> = tls_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(ours[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let mut default: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let mut sorted = ours.clone();
        sorted.sort_by_key(|s| u16::from(*s));
        default.sort_by_key(|s| u16::from(*s));
        assert_eq!(sorted, default, "the same suites, only reordered");
    }

    fn closed(code: quinn::TransportErrorCode, reason: &str) -> quinn::ConnectionError {
        quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: code,
            frame_type: None,
            reason: bytes::Bytes::copy_from_slice(reason.as_bytes()),
        })
    }

    #[test]
    fn outgoing_hands_over_full_buffers_and_copies_mostly_empty_ones() {
        let mut full = BytesMut::with_capacity(100);
        full.extend_from_slice(&[7; 60]);
        let at = full.as_ptr();
        let b = outgoing(full);
        assert_eq!((b.as_ptr(), &b[..]), (at, &[7u8; 60][..]), "no copy");
        let mut sparse = BytesMut::with_capacity(64 * 1024);
        sparse.extend_from_slice(b"ping");
        let at = sparse.as_ptr();
        let b = outgoing(sparse);
        assert_eq!(&b[..], b"ping");
        assert_ne!(b.as_ptr(), at, "copied: the 64 KiB buffer is not kept");
        assert!(outgoing(BytesMut::new()).is_empty());
    }

    #[test]
    fn a_busy_refusal_gives_its_wait_and_nothing_else_does() {
        let busy = swb_wire::busy::reason(Duration::from_millis(750));
        let refused = quinn::TransportErrorCode::CONNECTION_REFUSED;
        assert_eq!(
            busy_hint(&closed(refused, &busy)),
            Some(Duration::from_millis(750))
        );
        // A refusal without the hint, the hint under another code, or no
        // close at all: no wait asked for.
        assert_eq!(busy_hint(&closed(refused, "")), None);
        let other = quinn::TransportErrorCode::PROTOCOL_VIOLATION;
        assert_eq!(busy_hint(&closed(other, &busy)), None);
        assert_eq!(busy_hint(&quinn::ConnectionError::TimedOut), None);
    }
}
