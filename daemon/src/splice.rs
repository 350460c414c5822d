//! Copying bytes between a local socket and a QUIC stream, with how each
//! direction ended kept and passed on truthfully: a clean end (EOF, FIN)
//! becomes a clean end on the other side; a failure or reset becomes a
//! reset (a QUIC reset with a code that says whose side failed, a TCP RST
//! on a local TCP socket, a `reset` trailer on a framed control stream) —
//! never a clean end. Nobody can take a cut stream for a whole one.

use bytes::BytesMut;
use quinn::VarInt;
use swb_wire::reset;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Buffer per direction when copying to and from a local socket.
pub(crate) const COPY_BUF: usize = 256 * 1024;

/// Which end of a stream this daemon is, for the reset codes it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The caller (`swbd connect`, SOCKS): its local socket is the client.
    Caller,
    /// The target: its local socket is the exposed service.
    Target,
}

impl Side {
    /// The reset code for a failure of this side's local socket.
    fn local_failure(self) -> u32 {
        match self {
            Side::Caller => reset::CALLER,
            Side::Target => reset::TARGET,
        }
    }
}

/// How one direction of a spliced stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DirEnd {
    /// EOF / FIN, passed on as such.
    Clean,
    /// The far side reset (QUIC reset or stop with this code).
    Reset(u64),
    /// The local socket failed (passed on as a reset).
    Local(std::io::ErrorKind),
    /// The relay connection went away.
    Lost(String),
}

impl DirEnd {
    pub(crate) fn is_clean(&self) -> bool {
        matches!(self, DirEnd::Clean)
    }
}

/// What a splice did.
#[derive(Debug, Clone)]
pub(crate) struct Spliced {
    /// Bytes local → stream.
    pub(crate) up: u64,
    /// Bytes stream → local.
    pub(crate) down: u64,
    /// How local → stream ended.
    pub(crate) up_end: DirEnd,
    /// How stream → local ended.
    pub(crate) down_end: DirEnd,
}

impl Spliced {
    /// Both directions ended cleanly.
    pub(crate) fn clean(&self) -> bool {
        self.up_end.is_clean() && self.down_end.is_clean()
    }
}

/// Words for a reset code, from the side that received it.
pub(crate) fn reset_cause(code: u64, peer: &str) -> String {
    match u32::try_from(code) {
        Ok(reset::RELAY) => "reset by the relay (the other side's connection went away)".into(),
        Ok(reset::DAEMON) => format!("reset by {peer}'s daemon"),
        Ok(reset::TARGET) => format!(
            "reset by {peer}'s target (the service behind the port failed or reset the connection)"
        ),
        Ok(reset::CALLER) => format!("reset by {peer} (the caller went away without closing)"),
        _ => format!("reset by {peer} (code {code})"),
    }
}

/// How a QUIC read failure ended a direction.
fn read_end(e: quinn::ReadError) -> DirEnd {
    match e {
        quinn::ReadError::Reset(code) => DirEnd::Reset(code.into_inner()),
        quinn::ReadError::ConnectionLost(c) => DirEnd::Lost(c.to_string()),
        other => DirEnd::Lost(other.to_string()),
    }
}

/// How a QUIC write failure ended a direction.
fn write_end(e: quinn::WriteError) -> DirEnd {
    match e {
        quinn::WriteError::Stopped(code) => DirEnd::Reset(code.into_inner()),
        quinn::WriteError::ConnectionLost(c) => DirEnd::Lost(c.to_string()),
        other => DirEnd::Lost(other.to_string()),
    }
}

/// Copies a local socket and a QUIC stream into each other until both
/// directions end. EOF becomes FIN and FIN becomes shutdown(write); a
/// reset or failure on one side resets the other (the caller then aborts
/// its local socket: see [`abort_tcp`]).
pub(crate) async fn splice<R, W>(
    local_rd: &mut R,
    local_wr: &mut W,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    side: Side,
) -> Spliced
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let up = async {
        let mut buf = BytesMut::with_capacity(COPY_BUF);
        let mut n = 0u64;
        loop {
            if buf.capacity() < COPY_BUF / 4 {
                buf.reserve(COPY_BUF);
            }
            match local_rd.read_buf(&mut buf).await {
                Ok(0) => {
                    let _ = send.finish();
                    return (n, DirEnd::Clean);
                }
                Ok(k) => {
                    // Hand the bytes to QUIC without copying them again.
                    if let Err(e) = send.write_chunk(buf.split().freeze()).await {
                        return (n, write_end(e));
                    }
                    n += k as u64;
                }
                Err(e) => {
                    let _ = send.reset(VarInt::from_u32(side.local_failure()));
                    return (n, DirEnd::Local(e.kind()));
                }
            }
        }
    };
    let down = async {
        let mut n = 0u64;
        // One read gathers every chunk available (often one per packet), so
        // the local socket sees few large writes instead of many small ones.
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(k)) => {
                    if let Err(e) = local_wr.write_all(&buf[..k]).await {
                        let _ = recv.stop(VarInt::from_u32(side.local_failure()));
                        return (n, DirEnd::Local(e.kind()));
                    }
                    n += k as u64;
                }
                Ok(None) => {
                    let end = match async {
                        local_wr.flush().await?;
                        local_wr.shutdown().await
                    }
                    .await
                    {
                        Ok(()) => DirEnd::Clean,
                        Err(e) => DirEnd::Local(e.kind()),
                    };
                    return (n, end);
                }
                // No shutdown(write) here: a FIN would tell the local side
                // that everything arrived. The caller aborts the socket.
                Err(e) => return (n, read_end(e)),
            }
        }
    };
    let ((up, up_end), (down, down_end)) = tokio::join!(up, down);
    Spliced {
        up,
        down,
        up_end,
        down_end,
    }
}

/// Closes a TCP connection with a reset (RST) rather than a FIN, so the
/// program on the other end sees that the stream was cut.
pub(crate) fn abort_tcp(wr: &tokio::net::tcp::OwnedWriteHalf) {
    let _ = wr.as_ref().set_zero_linger();
}

/// Copies a framed control connection (see [`crate::framing`]) and a QUIC
/// stream into each other: data both ways, then an `end` or a `reset` with
/// its cause to the local side; an `end` from the local side finishes the
/// QUIC stream, anything else resets it.
pub(crate) async fn splice_framed<R, W>(
    local_rd: &mut R,
    local_wr: &mut W,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: &str,
) -> Spliced
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use crate::framing::{put_frame, read_frame, StreamFrame, KIND_DATA, KIND_END, KIND_RESET};
    let caller = VarInt::from_u32(reset::CALLER);
    let up = async {
        let mut n = 0u64;
        loop {
            match read_frame(local_rd).await {
                Ok(Some(StreamFrame::Data(b))) => {
                    let k = b.len() as u64;
                    if let Err(e) = send.write_chunk(b).await {
                        return (n, write_end(e));
                    }
                    n += k;
                }
                Ok(Some(StreamFrame::End)) => {
                    let _ = send.finish();
                    return (n, DirEnd::Clean);
                }
                Ok(Some(StreamFrame::Reset(_))) => {
                    let _ = send.reset(caller);
                    return (n, DirEnd::Local(std::io::ErrorKind::ConnectionReset));
                }
                // Gone without saying `end`: the peer must not take what it
                // got for the whole stream.
                Ok(None) => {
                    let _ = send.reset(caller);
                    return (n, DirEnd::Local(std::io::ErrorKind::UnexpectedEof));
                }
                Err(e) => {
                    let _ = send.reset(caller);
                    return (n, DirEnd::Local(e.kind()));
                }
            }
        }
    };
    let down = async {
        let mut n = 0u64;
        let mut buf = vec![0u8; COPY_BUF];
        let mut out = BytesMut::new();
        loop {
            let (frame, end) = match recv.read(&mut buf).await {
                Ok(Some(k)) => {
                    out.clear();
                    put_frame(&mut out, KIND_DATA, &buf[..k]);
                    n += k as u64;
                    (true, None)
                }
                Ok(None) => {
                    out.clear();
                    put_frame(&mut out, KIND_END, &[]);
                    (false, Some(DirEnd::Clean))
                }
                Err(e) => {
                    let end = read_end(e);
                    let cause = match &end {
                        DirEnd::Reset(code) => reset_cause(*code, peer),
                        DirEnd::Lost(why) => format!("the relay connection was lost ({why})"),
                        _ => "the stream was cut".into(),
                    };
                    out.clear();
                    put_frame(&mut out, KIND_RESET, cause.as_bytes());
                    (false, Some(end))
                }
            };
            let written = async {
                local_wr.write_all(&out).await?;
                local_wr.flush().await
            }
            .await;
            if let Err(e) = written {
                let _ = recv.stop(caller);
                return (n, DirEnd::Local(e.kind()));
            }
            if !frame {
                return (n, end.unwrap_or(DirEnd::Clean));
            }
        }
    };
    let ((up, up_end), (down, down_end)) = tokio::join!(up, down);
    Spliced {
        up,
        down,
        up_end,
        down_end,
    }
}
