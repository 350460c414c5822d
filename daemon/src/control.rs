//! The local control socket: how `swbd send/recv/status` talk to a running
//! daemon. A Unix socket (mode 0600), one JSON object per line each way:
//! the CLI writes a [`Request`], the daemon answers with one [`Reply`].
//! A connection may switch to the compact encoding ([`crate::compact`],
//! [`Client::compact`]): binary frames for `send`, `recv` and `ack`.
//!
//! A client may pipeline: write many requests before reading the replies,
//! which come in request order. The daemon hands each `send` to the relay
//! as it reads it (up to [`MAX_PIPELINED_SENDS`] waiting for the relay per
//! connection); any other request is answered after the sends before it.
//! Sends read together (each already whole in the read buffer, with the
//! same timeout) go over as one batch of up to 64, as
//! [`crate::Sender::submit_batch`] hands them; each keeps its own answer.
//!
//! `recv` leases messages to the asking connection; they are acknowledged
//! to the relay only when the same connection sends `ack` for them. If the
//! connection closes first, the messages go back to the inbox (nothing is
//! lost when `swbd recv` is killed between receiving and printing).

pub use crate::status::StatusView;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Largest request line the daemon reads (a 64 KiB body in base64 plus JSON).
pub const MAX_REQUEST_LINE: usize = 128 * 1024;
/// Most `send` requests of one control connection waiting for the relay's
/// answer; the daemon reads no further request from that connection until
/// the oldest is answered.
pub const MAX_PIPELINED_SENDS: usize = 4096;

/// A request from the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Connection state.
    Status,
    /// Send a message. Waits up to `timeout_ms` for the relay's answer
    /// (and for a connection, if the daemon is reconnecting).
    Send {
        /// Recipient name.
        to: String,
        /// Body, base64 (standard alphabet).
        body_b64: String,
        /// How long to wait for an answer.
        timeout_ms: u64,
    },
    /// Take up to `max` messages, waiting up to `wait_ms` for the first.
    Recv {
        /// Wait time for the first message.
        wait_ms: u64,
        /// Most messages to return.
        max: usize,
    },
    /// Acknowledge messages taken with `recv` on this connection.
    Ack {
        /// Message ids (hex).
        ids: Vec<String>,
    },
    /// Merge `set` into this peer's status, remove `clear`.
    SetStatus {
        /// Keys to set.
        #[serde(default)]
        set: std::collections::BTreeMap<String, String>,
        /// Keys to remove.
        #[serde(default)]
        clear: Vec<String>,
        /// How long to wait for a relay connection to publish on.
        timeout_ms: u64,
    },
    /// Current status of these peers.
    GetStatus {
        /// Peer names.
        names: Vec<String>,
        /// How long to wait for a relay connection.
        timeout_ms: u64,
    },
    /// Current status of these peers, then every change, one `update`
    /// reply per line, until either side closes.
    Watch {
        /// Peer names.
        names: Vec<String>,
        /// How long to wait for a relay connection.
        timeout_ms: u64,
    },
    /// Every known peer of the namespace with presence and status.
    Peers {
        /// How long to wait for a relay connection.
        timeout_ms: u64,
    },
    /// Open a byte stream to `port` of peer `to`. After a `connected`
    /// reply, the control connection carries the stream's bytes both ways:
    /// raw (a reset then looks like a clean end), or with `framed`, in the
    /// frames of [`crate::framing`] that end with `end` or `reset`.
    Connect {
        /// Peer name.
        to: String,
        /// Port the peer exposes.
        port: u16,
        /// How long to wait for a relay connection, if the daemon has none.
        timeout_ms: u64,
        /// Frame the stream so that how it ended comes through.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        framed: bool,
    },
    /// Switch this connection to the compact encoding
    /// ([`crate::compact`]): answered with `{"reply":"compact","version":1}`
    /// after the answers to everything asked before it; from then on both
    /// directions carry compact frames.
    Compact {
        /// The compact version the client speaks (this daemon: 1).
        version: u32,
    },
    /// One round trip to peer `to` through the relays, answered by its
    /// daemon. Consecutive pings to the same peer on one connection share
    /// a ping stream.
    Ping {
        /// Peer name.
        to: String,
        /// How long to wait for the stream setup and for the answer, each.
        timeout_ms: u64,
    },
}

/// A received message as the CLI sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InMessage {
    /// Message id (32 hex digits).
    pub id: String,
    /// Sender name.
    pub from: String,
    /// Body, base64.
    pub body_b64: String,
    /// When the relay accepted it, milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
}

impl InMessage {
    /// Decoded body bytes.
    pub fn body(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.body_b64)
            .unwrap_or_default()
    }
}

/// The daemon's view of its connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// `connecting`, `connected` or `stopped`.
    pub state: String,
    /// Requested peer name.
    pub name: String,
    /// Relay address in use or being tried.
    pub relay: String,
    /// Relay id (when connected).
    pub relay_id: Option<String>,
    /// Namespace (when connected).
    pub namespace: Option<String>,
    /// When the current connection was established (RFC 3339).
    pub connected_since: Option<String>,
    /// Round-trip time to the relay in milliseconds (when connected).
    pub rtt_ms: Option<f64>,
    /// How QUIC packets reach the relay now (when connected): `udp`, or
    /// `tcp` (the TCP carrier, when UDP does not get through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier: Option<String>,
    /// The largest QUIC packet the path to the relay takes now, as path
    /// MTU discovery found it (when connected): up to 1452 bytes over UDP,
    /// up to 16 000 over the TCP carrier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_mtu: Option<u16>,
    /// QUIC packets and bytes to and from the relay on the current
    /// connection (when connected), whichever carrier they took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Traffic>,
    /// Messages received and not yet taken by `recv`.
    pub inbox: usize,
    /// Sends waiting for an answer.
    pub pending_sends: usize,
    /// Reconnection attempts since the last success.
    pub attempts: u32,
    /// The last connection error, if any.
    pub last_error: Option<String>,
    /// Live relays in the mesh, as the relay last told (1 outside a mesh).
    #[serde(default)]
    pub relays: usize,
    /// TUN mode: the interface and this peer's virtual addresses, once up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tun: Option<TunInfo>,
    /// Why TUN mode is off although `--tun` asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tun_error: Option<String>,
}

/// A peer's TUN addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunAddrs {
    /// IPv4.
    pub ipv4: String,
    /// IPv6.
    pub ipv6: String,
}

/// QUIC packets and bytes of the connection to the relay (its
/// UDP datagrams, or the packets carried over TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Packets sent to the relay.
    pub sent_packets: u64,
    /// Bytes of those packets.
    pub sent_bytes: u64,
    /// Packets received from the relay.
    pub received_packets: u64,
    /// Bytes of those packets.
    pub received_bytes: u64,
    /// Packets QUIC declared lost on the current path (resent as needed).
    #[serde(default)]
    pub lost_packets: u64,
    /// Losses that made QUIC shrink its congestion window on that path.
    #[serde(default)]
    pub congestion_events: u64,
}

/// This peer's TUN interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunInfo {
    /// The interface's name.
    pub interface: String,
    /// The peer's IPv4 address.
    pub ipv4: String,
    /// The peer's IPv6 address.
    pub ipv6: String,
    /// The interface MTU of the moment.
    #[serde(default)]
    pub mtu: u16,
    /// Whether the kernel took segmentation offload on it.
    #[serde(default)]
    pub offload: bool,
}

/// One answer from the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to `status`.
    Status(Box<StatusInfo>),
    /// Answer to `send`: the relay accepted the message.
    Sent {
        /// Message id.
        id: String,
        /// Whether the recipient was attached.
        online: bool,
    },
    /// Answer to `recv`.
    Messages {
        /// Possibly empty.
        messages: Vec<InMessage>,
    },
    /// Answer to `connect`: from now on the connection is the stream.
    Connected {
        /// Peer name.
        to: String,
        /// Port.
        port: u16,
    },
    /// Answer to `set-status`.
    StatusSet {
        /// The status as published (or as kept locally, if not published).
        status: StatusView,
        /// Whether the relay has it; if not, it is published on reconnect.
        published: bool,
    },
    /// Answer to `get-status` and `peers`.
    Statuses {
        /// One per peer.
        statuses: Vec<StatusView>,
    },
    /// Answer to `watch`: updates follow, one per line.
    Watching {},
    /// One watched peer's status.
    Update(StatusView),
    /// Answer to `ping`.
    Pong {
        /// The peer that answered.
        to: String,
        /// Round trip in microseconds, measured by the daemon.
        rtt_us: u64,
        /// Relay ids on the way, in order.
        via: Vec<String>,
    },
    /// Answer to `compact`: the connection carries compact frames from the
    /// next byte on.
    Compact {
        /// The compact version in use.
        version: u32,
    },
    /// Answer to `ack`.
    Acked {
        /// How many ids were leased to this connection and are now acknowledged.
        acked: usize,
    },
    /// Any failure.
    Error {
        /// Stable code (`mailbox_full`, `not_connected`, …).
        code: String,
        /// What to do.
        message: String,
    },
}

/// A byte stream to a peer's port, through the daemon (from
/// [`Client::connect_stream`]). Shutting down its write side is a half-close.
pub type PeerStream =
    tokio::io::Join<BufReader<tokio::net::unix::OwnedReadHalf>, tokio::net::unix::OwnedWriteHalf>;

/// A byte stream to a peer's port whose end is truthful (from
/// [`Client::connect_framed`]).
pub type FramedPeerStream = crate::framing::FramedStream<
    BufReader<tokio::net::unix::OwnedReadHalf>,
    tokio::net::unix::OwnedWriteHalf,
>;

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens on the socket.
    #[error("no daemon is running at {path} ({reason}); start one with `swbd up`, or point --control / SWB_CONTROL at its socket")]
    NotRunning {
        /// Socket path.
        path: String,
        /// OS error.
        reason: String,
    },
    /// The process serving the socket is another user's.
    #[error("the control socket {path} is served by a process of uid {uid}, not by you (uid {me}) or root; refusing to talk to it (another local user may be sitting in between)")]
    Untrusted {
        /// Socket path.
        path: String,
        /// Who serves it.
        uid: u32,
        /// Who we are.
        me: u32,
    },
    /// I/O on an established connection failed.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon answered something unexpected.
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
    /// The daemon (or the relay behind it) refused.
    #[error("{message}")]
    Remote {
        /// Stable code.
        code: String,
        /// Sentence.
        message: String,
    },
}

/// Result of a successful send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// Message id.
    pub id: String,
    /// Whether the recipient was attached.
    pub online: bool,
}

/// A connection to a daemon's control socket.
#[derive(Debug)]
pub struct Client {
    rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: tokio::net::unix::OwnedWriteHalf,
    line: String,
}

impl Client {
    /// Connects to the socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, ControlError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|e| ControlError::NotRunning {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        // Only a daemon of our own user (or root's) may answer: whoever
        // serves the socket sees every message and stream we hand it.
        let uid = s.peer_cred()?.uid();
        let me = current_uid();
        if uid != me && uid != 0 {
            return Err(ControlError::Untrusted {
                path: path.display().to_string(),
                uid,
                me,
            });
        }
        let (r, w) = s.into_split();
        Ok(Self {
            rd: BufReader::new(r),
            wr: w,
            line: String::new(),
        })
    }

    /// Sends one request and reads one reply; `Reply::Error` becomes `Err`.
    pub async fn call(&mut self, req: &Request) -> Result<Reply, ControlError> {
        let mut out = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
        out.push(b'\n');
        self.wr.write_all(&out).await?;
        read_reply(&mut self.rd, &mut self.line).await
    }

    /// The daemon's status.
    pub async fn status(&mut self) -> Result<StatusInfo, ControlError> {
        match self.call(&Request::Status).await? {
            Reply::Status(s) => Ok(*s),
            other => Err(ControlError::Protocol(format!("{other:?}"))),
        }
    }

    /// Sends `body` to `to`; returns once the relay accepted it.
    pub async fn send(
        &mut self,
        to: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Sent, ControlError> {
        let req = Request::Send {
            to: to.to_string(),
            body_b64: base64::engine::general_purpose::STANDARD.encode(body),
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.call(&req).await? {
            Reply::Sent { id, online } => Ok(Sent { id, online }),
            other => Err(ControlError::Protocol(format!("{other:?}"))),
        }
    }

    /// Takes up to `max` messages, waiting up to `wait` for the first. They
    /// must be acknowledged with [`Client::ack`] on this same client.
    pub async fn recv(
        &mut self,
        wait: Duration,
        max: usize,
    ) -> Result<Vec<InMessage>, ControlError> {
        let req = Request::Recv {
            wait_ms: wait.as_millis() as u64,
            max,
        };
        match self.call(&req).await? {
            Reply::Messages { messages } => Ok(messages),
            other => Err(ControlError::Protocol(format!("{other:?}"))),
        }
    }

    /// One round trip to `to` (see [`Request::Ping`]).
    pub async fn ping(&mut self, to: &str, timeout: Duration) -> Result<crate::Pong, ControlError> {
        let req = Request::Ping {
            to: to.to_string(),
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.call(&req).await? {
            Reply::Pong { to, rtt_us, via } => Ok(crate::Pong {
                to,
                rtt: Duration::from_micros(rtt_us),
                via,
            }),
            other => Err(ControlError::Protocol(format!("{other:?}"))),
        }
    }

    /// Opens a byte stream to `port` of `to` and returns the socket that
    /// carries it (EOF on our write half travels as a half-close).
    pub async fn connect_stream(
        mut self,
        to: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<PeerStream, ControlError> {
        let req = Request::Connect {
            to: to.to_string(),
            port,
            timeout_ms: timeout.as_millis() as u64,
            framed: false,
        };
        match self.call(&req).await? {
            Reply::Connected { .. } => {}
            other => return Err(ControlError::Protocol(format!("{other:?}"))),
        }
        // Bytes the peer sent right away may already sit in the reader's
        // buffer: keep the buffered reader as the read side.
        Ok(tokio::io::join(self.rd, self.wr))
    }

    /// Opens a byte stream to `port` of `to` whose end is truthful: reading
    /// gives EOF only when the peer's side ended cleanly, and an error with
    /// the cause (`reset by london's target …`) when the stream was cut;
    /// shutting down the write side is a clean half-close, dropping it
    /// without shutdown resets the peer's side.
    pub async fn connect_framed(
        mut self,
        to: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<FramedPeerStream, ControlError> {
        let req = Request::Connect {
            to: to.to_string(),
            port,
            timeout_ms: timeout.as_millis() as u64,
            framed: true,
        };
        match self.call(&req).await? {
            Reply::Connected { .. } => {}
            other => return Err(ControlError::Protocol(format!("{other:?}"))),
        }
        Ok(crate::framing::FramedStream::new(self.rd, self.wr))
    }

    /// Sets and clears keys of this peer's status.
    pub async fn set_status(
        &mut self,
        set: std::collections::BTreeMap<String, String>,
        clear: Vec<String>,
        timeout: Duration,
    ) -> Result<(StatusView, bool), ControlError> {
        let req = Request::SetStatus {
            set,
            clear,
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.call(&req).await? {
            Reply::StatusSet { status, published } => Ok((status, published)),
            other => Err(ControlError::Protocol(format!("{other:?}"))),
        }
    }

    /// Current status of `names`.
    pub async fn get_status(
        &mut self,
        names: Vec<String>,
        timeout: Duration,
    ) -> Result<Vec<StatusView>, ControlError> {
        let req = Request::GetStatus {
            names,
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.call(&req).await? {
            Reply::Statuses { statuses } => Ok(statuses),
            other => Err(ControlError::Protocol(format!("{other:?}"))),
        }
    }

    /// Every known peer.
    pub async fn peers(&mut self, timeout: Duration) -> Result<Vec<StatusView>, ControlError> {
        let req = Request::Peers {
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.call(&req).await? {
            Reply::Statuses { statuses } => Ok(statuses),
            other => Err(ControlError::Protocol(format!("{other:?}"))),
        }
    }

    /// Starts watching `names`; then call [`Client::next_update`].
    pub async fn watch(
        &mut self,
        names: Vec<String>,
        timeout: Duration,
    ) -> Result<(), ControlError> {
        let req = Request::Watch {
            names,
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.call(&req).await? {
            Reply::Watching {} => Ok(()),
            other => Err(ControlError::Protocol(format!("{other:?}"))),
        }
    }

    /// The next update of a watch; `None` when the watch ended.
    pub async fn next_update(&mut self) -> Result<Option<StatusView>, ControlError> {
        self.line.clear();
        if self.rd.read_line(&mut self.line).await? == 0 {
            return Ok(None);
        }
        match serde_json::from_str::<Reply>(&self.line) {
            Ok(Reply::Update(v)) => Ok(Some(v)),
            Ok(Reply::Error { code, message }) => Err(ControlError::Remote { code, message }),
            Ok(other) => Err(ControlError::Protocol(format!("{other:?}"))),
            Err(e) => Err(ControlError::Protocol(e.to_string())),
        }
    }

    /// Acknowledges messages taken with `recv` on this client.
    pub async fn ack(&mut self, ids: Vec<String>) -> Result<usize, ControlError> {
        match self.call(&Request::Ack { ids }).await? {
            Reply::Acked { acked } => Ok(acked),
            other => Err(ControlError::Protocol(format!("{other:?}"))),
        }
    }
}

impl Client {
    /// Splits the connection for pipelining: write many requests with
    /// [`Requests`], read their replies, in the same order, with
    /// [`Replies`]. Read while you write (another task, or `join!`): the
    /// daemon stops reading requests while its replies are not read.
    /// Messages taken with `recv` on the pipeline are acknowledged on it.
    pub fn pipeline(self) -> (Requests, Replies) {
        (
            Requests {
                wr: tokio::io::BufWriter::with_capacity(64 * 1024, self.wr),
                buf: Vec::new(),
            },
            Replies {
                rd: self.rd,
                line: self.line,
            },
        )
    }
}

impl Client {
    /// Switches the connection to the compact encoding ([`crate::compact`]:
    /// binary frames, raw bodies and ids, no JSON or base64 for `send`,
    /// `recv` and `ack`) and splits it for pipelining, like
    /// [`Client::pipeline`]: read while you write. A daemon that predates
    /// the compact encoding refuses with `bad_request`.
    pub async fn compact(mut self) -> Result<(CompactRequests, CompactReplies), ControlError> {
        let req = Request::Compact {
            version: crate::compact::VERSION,
        };
        match self.call(&req).await? {
            Reply::Compact { version } if version == crate::compact::VERSION => {}
            other => return Err(ControlError::Protocol(format!("{other:?}"))),
        }
        Ok((
            CompactRequests {
                wr: tokio::io::BufWriter::with_capacity(64 * 1024, self.wr),
                buf: Vec::new(),
            },
            CompactReplies { rd: self.rd },
        ))
    }
}

/// The writing half of a compact control connection ([`Client::compact`]).
/// Requests are buffered; [`CompactRequests::flush`] hands them to the
/// daemon.
#[derive(Debug)]
pub struct CompactRequests {
    wr: tokio::io::BufWriter<tokio::net::unix::OwnedWriteHalf>,
    buf: Vec<u8>,
}

impl CompactRequests {
    async fn write(&mut self) -> Result<(), ControlError> {
        self.wr.write_all(&self.buf).await?;
        self.buf.clear();
        Ok(())
    }

    /// Queues a send of `body` to `to`; its answer is
    /// [`crate::compact::Answer::Sent`].
    pub async fn send(
        &mut self,
        to: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<(), ControlError> {
        crate::compact::put_send(&mut self.buf, to, body, timeout)
            .map_err(|e| ControlError::Protocol(e.0))?;
        self.write().await
    }

    /// Queues a `recv` of up to `max` messages, waiting up to `wait` for the
    /// first; its answer is [`crate::compact::Answer::Messages`].
    pub async fn recv(&mut self, wait: Duration, max: usize) -> Result<(), ControlError> {
        crate::compact::put_recv(&mut self.buf, wait, max);
        self.write().await
    }

    /// Queues an acknowledgement of messages a `recv` on this connection
    /// returned; its answer is [`crate::compact::Answer::Acked`].
    pub async fn ack(&mut self, ids: &[swb_wire::MessageId]) -> Result<(), ControlError> {
        crate::compact::put_ack(&mut self.buf, ids);
        self.write().await
    }

    /// Queues any other request (`status`, `set_status`, `watch`, …) as a
    /// JSON frame; its answer is [`crate::compact::Answer::Reply`].
    pub async fn push(&mut self, req: &Request) -> Result<(), ControlError> {
        crate::compact::put_json(&mut self.buf, req);
        self.write().await
    }

    /// Writes everything queued to the daemon.
    pub async fn flush(&mut self) -> Result<(), ControlError> {
        self.wr.flush().await?;
        Ok(())
    }
}

/// The reading half of a compact control connection ([`Client::compact`]).
#[derive(Debug)]
pub struct CompactReplies {
    rd: BufReader<tokio::net::unix::OwnedReadHalf>,
}

impl CompactReplies {
    /// The next answer, in request order. `Err(ControlError::Remote)` is the
    /// refusal of one request; the connection stays usable.
    pub async fn next(&mut self) -> Result<crate::compact::Answer, ControlError> {
        use crate::compact::{Answer, HEADER, MAX_REPLY_FRAME};
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; HEADER];
        if let Err(e) = self.rd.read_exact(&mut head).await {
            return Err(match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    ControlError::Protocol("the daemon closed the connection (did it stop?)".into())
                }
                _ => e.into(),
            });
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_REPLY_FRAME {
            return Err(ControlError::Protocol(format!(
                "a reply frame of {len} bytes (the limit is {MAX_REPLY_FRAME})"
            )));
        }
        // Read into fresh, unzeroed room (the answer's bodies keep slices
        // of it, so it is not reused); zeroing a large batch first cost
        // more than reading it.
        let mut payload = bytes::BytesMut::with_capacity(len);
        while payload.len() < len {
            let want = (len - payload.len()) as u64;
            if (&mut self.rd).take(want).read_buf(&mut payload).await? == 0 {
                return Err(ControlError::Protocol(
                    "the daemon closed the connection inside a reply".into(),
                ));
            }
        }
        match crate::compact::answer(head[0], payload.freeze()) {
            Ok(Answer::Reply(r)) => match *r {
                Reply::Error { code, message } => Err(ControlError::Remote { code, message }),
                r => Ok(Answer::Reply(Box::new(r))),
            },
            Ok(a) => Ok(a),
            Err(e) => Err(ControlError::Protocol(e.0)),
        }
    }
}

/// The writing half of a pipelined control connection ([`Client::pipeline`]).
/// Requests are buffered; [`Requests::flush`] hands them to the daemon.
#[derive(Debug)]
pub struct Requests {
    wr: tokio::io::BufWriter<tokio::net::unix::OwnedWriteHalf>,
    buf: Vec<u8>,
}

impl Requests {
    /// Queues one request.
    pub async fn push(&mut self, req: &Request) -> Result<(), ControlError> {
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, req)
            .map_err(|e| ControlError::Protocol(e.to_string()))?;
        self.buf.push(b'\n');
        self.wr.write_all(&self.buf).await?;
        Ok(())
    }

    /// Queues a send of `body` to `to`.
    pub async fn send(
        &mut self,
        to: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<(), ControlError> {
        self.push(&Request::Send {
            to: to.to_string(),
            body_b64: base64::engine::general_purpose::STANDARD.encode(body),
            timeout_ms: timeout.as_millis() as u64,
        })
        .await
    }

    /// Writes everything queued to the daemon.
    pub async fn flush(&mut self) -> Result<(), ControlError> {
        self.wr.flush().await?;
        Ok(())
    }
}

/// The reading half of a pipelined control connection ([`Client::pipeline`]).
#[derive(Debug)]
pub struct Replies {
    rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    line: String,
}

impl Replies {
    /// The next reply, in request order. `Err(ControlError::Remote)` is the
    /// refusal of one request; the connection stays usable.
    pub async fn next(&mut self) -> Result<Reply, ControlError> {
        read_reply(&mut self.rd, &mut self.line).await
    }
}

/// Reads one reply line; `Reply::Error` becomes `Err(ControlError::Remote)`.
async fn read_reply(
    rd: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    line: &mut String,
) -> Result<Reply, ControlError> {
    line.clear();
    if rd.read_line(line).await? == 0 {
        return Err(ControlError::Protocol(
            "the daemon closed the connection (did it stop?)".into(),
        ));
    }
    match serde_json::from_str::<Reply>(line) {
        Ok(Reply::Error { code, message }) => Err(ControlError::Remote { code, message }),
        Ok(r) => Ok(r),
        Err(e) => Err(ControlError::Protocol(e.to_string())),
    }
}

/// The control socket path used when neither `--control` nor `SWB_CONTROL`
/// is given: `$XDG_RUNTIME_DIR/swbd/control.sock`, else
/// `/tmp/swbd-<uid>/control.sock`.
pub fn default_control_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("swbd").join("control.sock");
    }
    PathBuf::from(format!("/tmp/swbd-{}", current_uid())).join("control.sock")
}

/// This process's user id: the owner of its own /proc entry (no libc).
pub(crate) fn current_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compact::{Answer, KIND_ACK, KIND_RECV};

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test]
    async fn compact_replies_read_whole_frames_and_refuse_a_cut_one() {
        let (a, b) = UnixStream::pair().expect("socket pair");
        let (rd, _wr) = a.into_split();
        let mut replies = CompactReplies {
            rd: BufReader::new(rd),
        };
        // A batch larger than the reader's buffer, written in pieces.
        let body = vec![9u8; 20_000];
        let mut msg = vec![1u8; 16];
        msg.extend_from_slice(&7u64.to_be_bytes());
        msg.push(3);
        msg.extend_from_slice(b"bob");
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes());
        msg.extend_from_slice(&body);
        let mut out = frame(KIND_RECV, &msg);
        out.extend(frame(KIND_ACK, &5u32.to_be_bytes()));
        // Then a frame that announces 100 bytes and brings 10.
        out.extend_from_slice(&frame(KIND_ACK, &[0; 100])[..crate::compact::HEADER + 10]);
        let writer = async move {
            let mut b = b;
            for piece in out.chunks(3000) {
                b.write_all(piece).await.expect("write");
                tokio::task::yield_now().await;
            }
            // Closed here: the last frame stays cut.
        };
        let reader = async {
            match replies.next().await.expect("a batch") {
                Answer::Messages(m) => {
                    assert_eq!(m.len(), 1);
                    assert_eq!((&m[0].from[..], m[0].sent_at_ms), ("bob", 7));
                    assert_eq!(m[0].body, body);
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(replies.next().await, Ok(Answer::Acked(5))));
        };
        tokio::join!(writer, reader);
        let e = replies.next().await.expect_err("cut");
        assert!(e.to_string().contains("inside a reply"), "{e}");
    }
}
