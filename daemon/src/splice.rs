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
    /// Cut because the other direction was cut (passed on as a reset).
    Aborted,
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
/// reset or failure on one side resets the other, and ends the splice (the
/// caller then aborts its local socket: see [`abort_tcp`]).
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
    let (mut up_n, mut down_n) = (0u64, 0u64);
    let (tx, rx) = (&mut send, &mut recv);
    let up = {
        let n = &mut up_n;
        let tx = &mut *tx;
        async move {
            let mut buf = BytesMut::with_capacity(COPY_BUF);
            loop {
                if buf.capacity() < COPY_BUF / 4 {
                    buf.reserve(COPY_BUF);
                }
                match local_rd.read_buf(&mut buf).await {
                    Ok(0) => {
                        let _ = tx.finish();
                        return DirEnd::Clean;
                    }
                    Ok(k) => {
                        // Hand the bytes to QUIC without copying them again.
                        if let Err(e) = tx.write_chunk(buf.split().freeze()).await {
                            return write_end(e);
                        }
                        *n += k as u64;
                    }
                    Err(e) => {
                        let _ = tx.reset(VarInt::from_u32(side.local_failure()));
                        return DirEnd::Local(e.kind());
                    }
                }
            }
        }
    };
    let down = {
        let n = &mut down_n;
        let rx = &mut *rx;
        async move {
            // One read gathers every chunk available (often one per
            // packet), so the local socket sees few large writes.
            let mut buf = vec![0u8; COPY_BUF];
            loop {
                match rx.read(&mut buf).await {
                    Ok(Some(k)) => {
                        if let Err(e) = local_wr.write_all(&buf[..k]).await {
                            let _ = rx.stop(VarInt::from_u32(side.local_failure()));
                            return DirEnd::Local(e.kind());
                        }
                        *n += k as u64;
                    }
                    Ok(None) => {
                        return match async {
                            local_wr.flush().await?;
                            local_wr.shutdown().await
                        }
                        .await
                        {
                            Ok(()) => DirEnd::Clean,
                            Err(e) => DirEnd::Local(e.kind()),
                        };
                    }
                    // No shutdown(write) here: a FIN would tell the local
                    // side that everything arrived. The caller aborts it.
                    Err(e) => return read_end(e),
                }
            }
        }
    };
    let (up_end, down_end) = both_ways_split(up, down).await;
    let up_end = up_end.unwrap_or_else(|| {
        let _ = send.reset(VarInt::from_u32(side.local_failure()));
        DirEnd::Aborted
    });
    let down_end = down_end.unwrap_or_else(|| {
        let _ = recv.stop(VarInt::from_u32(side.local_failure()));
        DirEnd::Aborted
    });
    Spliced {
        up: up_n,
        down: down_n,
        up_end,
        down_end,
    }
}

/// Runs both directions until both ended or one was cut; what did not end
/// by itself is `None` (the caller cuts it).
async fn both_ways_split<U, D>(up: U, down: D) -> (Option<DirEnd>, Option<DirEnd>)
where
    U: std::future::Future<Output = DirEnd>,
    D: std::future::Future<Output = DirEnd>,
{
    let (mut up_end, mut down_end) = (None, None);
    tokio::pin!(up, down);
    loop {
        tokio::select! {
            e = &mut up, if up_end.is_none() => up_end = Some(e),
            e = &mut down, if down_end.is_none() => down_end = Some(e),
        }
        let cut = [&up_end, &down_end]
            .iter()
            .any(|e| e.as_ref().is_some_and(|e| !e.is_clean()));
        if cut || (up_end.is_some() && down_end.is_some()) {
            return (up_end, down_end);
        }
    }
}

/// Closes a TCP connection: with a reset (RST) when the stream was cut, so
/// the program on the other end sees that; as usual otherwise. (Dropping
/// a write half alone would send a FIN first.)
pub(crate) fn close_tcp(
    rd: tokio::net::tcp::OwnedReadHalf,
    wr: tokio::net::tcp::OwnedWriteHalf,
    cut: bool,
) {
    if cut {
        let _ = wr.as_ref().set_zero_linger();
        if let Ok(tcp) = rd.reunite(wr) {
            drop(tcp);
        }
    }
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
    let (mut up_n, mut down_n) = (0u64, 0u64);
    let (tx, rx) = (&mut send, &mut recv);
    let up = {
        let n = &mut up_n;
        let tx = &mut *tx;
        async move {
            loop {
                match read_frame(local_rd).await {
                    Ok(Some(StreamFrame::Data(b))) => {
                        let k = b.len() as u64;
                        if let Err(e) = tx.write_chunk(b).await {
                            return write_end(e);
                        }
                        *n += k;
                    }
                    Ok(Some(StreamFrame::End)) => {
                        let _ = tx.finish();
                        return DirEnd::Clean;
                    }
                    Ok(Some(StreamFrame::Reset(_))) => {
                        let _ = tx.reset(caller);
                        return DirEnd::Local(std::io::ErrorKind::ConnectionReset);
                    }
                    // Gone without saying `end`: the peer must not take what
                    // it got for the whole stream.
                    Ok(None) => {
                        let _ = tx.reset(caller);
                        return DirEnd::Local(std::io::ErrorKind::UnexpectedEof);
                    }
                    Err(e) => {
                        let _ = tx.reset(caller);
                        return DirEnd::Local(e.kind());
                    }
                }
            }
        }
    };
    let down = {
        let n = &mut down_n;
        let rx = &mut *rx;
        let wr = &mut *local_wr;
        async move {
            let mut buf = vec![0u8; COPY_BUF];
            let mut out = BytesMut::new();
            loop {
                out.clear();
                let end = match rx.read(&mut buf).await {
                    Ok(Some(k)) => {
                        put_frame(&mut out, KIND_DATA, &buf[..k]);
                        *n += k as u64;
                        None
                    }
                    Ok(None) => {
                        put_frame(&mut out, KIND_END, &[]);
                        Some(DirEnd::Clean)
                    }
                    Err(e) => {
                        let end = read_end(e);
                        put_frame(&mut out, KIND_RESET, cut_cause(&end, peer).as_bytes());
                        Some(end)
                    }
                };
                let written = async {
                    wr.write_all(&out).await?;
                    wr.flush().await
                }
                .await;
                if let Err(e) = written {
                    let _ = rx.stop(caller);
                    return DirEnd::Local(e.kind());
                }
                if let Some(end) = end {
                    return end;
                }
            }
        }
    };
    let (up_end, down_end) = both_ways_split(up, down).await;
    let up_end = up_end.unwrap_or_else(|| {
        let _ = send.reset(caller);
        DirEnd::Aborted
    });
    let down_end = match down_end {
        Some(e) => e,
        None => {
            // The other direction was cut first: tell the caller how (a
            // target that resets may first be seen as a stopped write).
            let _ = recv.stop(caller);
            let mut out = BytesMut::new();
            put_frame(&mut out, KIND_RESET, cut_cause(&up_end, peer).as_bytes());
            let _ = local_wr.write_all(&out).await;
            DirEnd::Aborted
        }
    };
    Spliced {
        up: up_n,
        down: down_n,
        up_end,
        down_end,
    }
}

/// Words for how a direction was cut.
fn cut_cause(end: &DirEnd, peer: &str) -> String {
    match end {
        DirEnd::Reset(code) => reset_cause(*code, peer),
        DirEnd::Lost(why) => format!("the relay connection was lost ({why})"),
        _ => "the stream was cut".into(),
    }
}
