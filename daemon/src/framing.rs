//! Framed `connect` streams on the control socket: a stream's bytes, then
//! how it ended. A plain byte stream on a Unix socket can only end with
//! EOF, which would make a reset look like a clean end; framed, every
//! stream ends with an explicit `end` (clean) or `reset` (with the cause).
//!
//! ```text
//! | kind u8 | len u32 BE | payload |
//! kind 0 data    payload: stream bytes (at most MAX_DATA)
//! kind 1 end     this direction ended cleanly (EOF / FIN); no payload
//! kind 2 reset   this direction was cut; payload: the cause (UTF-8)
//! ```
//!
//! Both directions use the same frames. A client whose connection ends
//! without an `end` frame is taken as gone: the stream to the peer is reset,
//! never finished.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A data frame.
pub const KIND_DATA: u8 = 0;
/// The clean end of a direction.
pub const KIND_END: u8 = 1;
/// A direction was cut; the payload says why.
pub const KIND_RESET: u8 = 2;
/// Frame header: kind + length.
pub const FRAME_HEADER: usize = 5;
/// Largest data payload in one frame.
pub const MAX_DATA: usize = 256 * 1024;
/// Largest reset cause.
pub const MAX_CAUSE: usize = 4096;

/// Appends a frame.
pub fn put_frame(out: &mut BytesMut, kind: u8, payload: &[u8]) {
    out.reserve(FRAME_HEADER + payload.len());
    out.put_u8(kind);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
}

/// A frame read from a framed stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFrame {
    /// Bytes of the stream.
    Data(Bytes),
    /// The clean end of this direction.
    End,
    /// This direction was cut; why.
    Reset(String),
}

/// Reads one frame from `rd`; `None` if the connection ended before a
/// frame began.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
) -> io::Result<Option<StreamFrame>> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; FRAME_HEADER];
    match rd.read(&mut head[..1]).await? {
        0 => return Ok(None),
        _ => rd.read_exact(&mut head[1..]).await?,
    };
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let max = if head[0] == KIND_DATA {
        MAX_DATA
    } else {
        MAX_CAUSE
    };
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a stream frame of {len} bytes (the limit is {max})"),
        ));
    }
    let mut payload = vec![0u8; len];
    rd.read_exact(&mut payload).await?;
    match head[0] {
        KIND_DATA => Ok(Some(StreamFrame::Data(Bytes::from(payload)))),
        KIND_END => Ok(Some(StreamFrame::End)),
        KIND_RESET => Ok(Some(StreamFrame::Reset(
            String::from_utf8_lossy(&payload).into_owned(),
        ))),
        k => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown stream frame kind {k}"),
        )),
    }
}

enum ReadState {
    /// Collecting a frame header.
    Header {
        buf: [u8; FRAME_HEADER],
        have: usize,
    },
    /// Inside a data frame: bytes left.
    Data(usize),
    /// Collecting a reset cause.
    Cause { buf: Vec<u8>, left: usize },
    /// The peer's direction ended cleanly.
    Ended,
    /// The peer's direction was cut.
    Reset(String),
}

/// A byte stream to a peer's port over a framed control connection
/// ([`crate::Client::connect_framed`]). Reading yields the peer's bytes, then
/// EOF only if its side ended cleanly; a cut stream is an error
/// (`ConnectionReset`) whose message says who cut it. Shutting down the
/// write side is a clean half-close; dropping the stream without it resets
/// the peer's side.
pub struct FramedStream<R, W> {
    rd: R,
    wr: W,
    state: ReadState,
    out: BytesMut,
    shut: bool,
    scratch: Vec<u8>,
}

impl<R, W> std::fmt::Debug for FramedStream<R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FramedStream")
    }
}

impl<R, W> FramedStream<R, W> {
    /// Wraps the halves of a control connection after `connected`.
    pub fn new(rd: R, wr: W) -> Self {
        Self {
            rd,
            wr,
            state: ReadState::Header {
                buf: [0; FRAME_HEADER],
                have: 0,
            },
            out: BytesMut::new(),
            shut: false,
            scratch: Vec::new(),
        }
    }
}

fn invalid(m: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m)
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for FramedStream<R, W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            match &mut me.state {
                ReadState::Ended => return Poll::Ready(Ok(())),
                ReadState::Reset(cause) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        cause.clone(),
                    )))
                }
                ReadState::Data(0) => {
                    me.state = ReadState::Header {
                        buf: [0; FRAME_HEADER],
                        have: 0,
                    };
                }
                ReadState::Data(left) => {
                    if dst.remaining() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    let want = (*left).min(dst.remaining()).min(MAX_DATA);
                    if me.scratch.len() < want {
                        me.scratch.resize(want, 0);
                    }
                    let mut rb = ReadBuf::new(&mut me.scratch[..want]);
                    ready!(Pin::new(&mut me.rd).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the daemon's connection ended inside a data frame",
                        )));
                    }
                    dst.put_slice(&me.scratch[..n]);
                    *left -= n;
                    return Poll::Ready(Ok(()));
                }
                ReadState::Header { buf, have } => {
                    let mut rb = ReadBuf::new(&mut buf[*have..]);
                    ready!(Pin::new(&mut me.rd).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "the daemon's connection ended before the stream did (no end and no reset)",
                        )));
                    }
                    *have += n;
                    if *have < FRAME_HEADER {
                        continue;
                    }
                    let kind = buf[0];
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                    me.state = match kind {
                        KIND_DATA if len <= MAX_DATA => ReadState::Data(len),
                        KIND_END if len == 0 => ReadState::Ended,
                        KIND_RESET if len <= MAX_CAUSE => ReadState::Cause {
                            buf: Vec::with_capacity(len),
                            left: len,
                        },
                        _ => {
                            return Poll::Ready(Err(invalid(format!(
                                "bad stream frame (kind {kind}, {len} bytes)"
                            ))))
                        }
                    };
                }
                ReadState::Cause { buf, left } => {
                    if *left == 0 {
                        let cause = String::from_utf8_lossy(buf).into_owned();
                        me.state = ReadState::Reset(cause);
                        continue;
                    }
                    let mut tmp = vec![0u8; *left];
                    let mut rb = ReadBuf::new(&mut tmp);
                    ready!(Pin::new(&mut me.rd).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        me.state = ReadState::Reset("the stream was cut".into());
                        continue;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    *left -= n;
                }
            }
        }
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> FramedStream<R, W> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.wr).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for FramedStream<R, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(me.poll_drain(cx))?;
        let n = buf.len().min(MAX_DATA);
        put_frame(&mut me.out, KIND_DATA, &buf[..n]);
        // Start sending; what is left goes with the next write or flush.
        if let Poll::Ready(Err(e)) = me.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.wr).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.shut {
            ready!(me.poll_drain(cx))?;
            put_frame(&mut me.out, KIND_END, &[]);
            me.shut = true;
        }
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.wr).poll_flush(cx)
    }
}
