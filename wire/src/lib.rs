//! The Switchboard wire protocol: every frame that crosses a socket, its
//! encoding, and the limits that bound it. Pure: bytes in, frames out; no
//! sockets, no clock, no tokio.
//!
//! # Layout
//!
//! A connection's control stream (the first bidirectional QUIC stream the
//! daemon opens) starts, in each direction, with a [`Preamble`]:
//!
//! ```text
//! +---+---+---+---+---+---+
//! | S | W | B | D | ver   |     magic (4 bytes) + protocol version (u16, big endian)
//! +---+---+---+---+---+---+
//! ```
//!
//! and then carries frames:
//!
//! ```text
//! +------+---------------+-----------------------+
//! | type | length (u32)  | body (length bytes)   |   type: u8, see [`FrameType`]
//! +------+---------------+-----------------------+   length: big endian, <= MAX_FRAME_LEN
//! ```
//!
//! The body is the [postcard](https://docs.rs/postcard) encoding of the
//! frame's struct. The length is always explicit, so a receiver never infers
//! a size, can check it against [`MAX_FRAME_LEN`] before allocating, and can
//! skip frame types it does not know (a newer peer may send them).
//!
//! # Versions
//!
//! - 1: Hello/Welcome/Refused, Send/SendAccepted/SendRefused, Deliver/Ack,
//!   Ping/Pong, Goodbye.
//! - 2: `SendsAccepted` answers a run of sends in one frame; a relay sends
//!   it for sends it accepts at once (a daemon of version 1 would skip it
//!   as unknown and wait for answers that never come, hence the bump).
//!   `Hello` carries the daemon's `instance`: the same instance attaching
//!   again moves its session (the old connection ends with `moved`), only
//!   another one replaces it (`replaced`). `Deliveries` carries many
//!   messages in one frame, grouped in runs by sender (the relay sends it
//!   instead of one `Deliver` per message).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::fmt;

mod hot;
#[cfg(feature = "fuzzing")]
pub use hot::agrees_with_postcard as fuzz_hot_frames;
mod name;
pub use name::{normalize_name, normalized, NameError, DNS_SUFFIX};

/// The four bytes that open every control stream, in both directions.
pub const MAGIC: [u8; 4] = *b"SWBD";
/// The protocol version this crate speaks. See the changelog in the crate docs.
pub const PROTOCOL_VERSION: u16 = 2;
/// Length of the [`Preamble`] on the wire.
pub const PREAMBLE_LEN: usize = 6;
/// Length of a frame header: type (1) + length (4).
pub const HEADER_LEN: usize = 5;
/// Largest message body a peer may send (64 KiB).
pub const MAX_MESSAGE_BODY: usize = 64 * 1024;
/// Largest peer name, in bytes: a DNS label.
pub const MAX_NAME_LEN: usize = 63;

/// Longest relay id, in bytes (relays refuse to start with a longer one).
pub const MAX_RELAY_ID_LEN: usize = 63;
/// Most addresses one relay record lists.
pub const MAX_RELAY_ADDRS: usize = 4;
/// Longest address in a relay record: `host:port` with a DNS name of up to
/// 253 bytes.
pub const MAX_RELAY_ADDR_LEN: usize = 260;
/// Longest certificate fingerprint in a relay record (`sha256:` + 64 hex
/// digits is 71).
pub const MAX_FINGERPRINT_LEN: usize = 80;
/// Largest encoded [`RelayRecord`] within the limits above (postcard: a
/// length prefix of 1 or 2 bytes before each string and list).
pub const MAX_RELAY_RECORD_LEN: usize = (1 + MAX_RELAY_ID_LEN)
    + 1
    + MAX_RELAY_ADDRS * (2 + MAX_RELAY_ADDR_LEN)
    + (1 + MAX_FINGERPRINT_LEN)
    + 10;
/// Records in one page of a relay map: as many of the largest records as fit
/// in one frame. A larger map travels as several [`RelayMap`] frames, every
/// one but the last with `more` set.
pub const RELAY_MAP_PAGE: usize = (MAX_FRAME_LEN - 16) / MAX_RELAY_RECORD_LEN;
const _: () = assert!(RELAY_MAP_PAGE >= 1, "a relay record must fit one frame");
/// Largest API key accepted in a `Hello`.
pub const MAX_KEY_LEN: usize = 256;
/// Largest human-readable reason carried in a refusal.
pub const MAX_REASON_LEN: usize = 1024;
/// Largest number of ids in one `Ack` frame.
pub const MAX_ACK_IDS: usize = 1024;
/// Most answers in one [`SendsAccepted`] frame.
pub const MAX_SENDS_ACCEPTED: usize = 4096;
/// Most runs and messages, counted together, in one [`Deliveries`] frame.
pub const MAX_DELIVERIES: usize = 4096;
/// Largest frame body. Room for a maximal message plus its envelope, and a
/// little more so that a body slightly over [`MAX_MESSAGE_BODY`] still
/// decodes and can be refused with a specific code instead of a protocol error.
pub const MAX_FRAME_LEN: usize = MAX_MESSAGE_BODY + 16 * 1024;
/// Largest first frame of a data stream (`StreamOpen`, `StreamIncoming`,
/// `StreamReply`): read with an exact-length read, so no payload byte is
/// consumed with it.
pub const MAX_STREAM_HEADER: usize = 32 * 1024;
/// Largest status: the sum of key and value lengths.
pub const MAX_STATUS_BYTES: usize = 4096;
/// Most keys in a status.
pub const MAX_STATUS_KEYS: usize = 32;
/// Longest status key.
pub const MAX_STATUS_KEY_LEN: usize = 64;
/// Most peers one watch may name.
pub const MAX_WATCH_NAMES: usize = 256;
/// ALPN protocol id of a relay-to-relay (mesh) connection.
pub const MESH_ALPN: &[u8] = b"swb-mesh/1";
/// Most relays a relay map lists (in pages of [`RELAY_MAP_PAGE`]): room
/// for the 10 000-relay meshes of the diameter-2 grid.
pub const MAX_RELAYS: usize = 16_384;

/// Application close codes of a QUIC connection (client and mesh alike).
pub mod close {
    /// A normal end: shutdown, goodbye said, nothing wrong.
    pub const NORMAL: u32 = 0;
    /// Refused: authentication, a refusal frame sent before, a redirect,
    /// a duplicate or unproven mesh link.
    pub const REFUSED: u32 = 1;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 2;
}

/// The hint a busy relay puts in the reason of its QUIC `CONNECTION_REFUSED`
/// (too many handshakes at once): how long the client should wait before it
/// tries again, chosen so that the clients it refuses come back spread over
/// the time the relay needs for them. Clients without it back off as usual.
pub mod busy {
    use std::time::Duration;

    /// The longest wait a hint may ask for; longer hints are read as this
    /// (a forged refusal cannot park a client for longer).
    pub const MAX_RETRY_IN: Duration = Duration::from_secs(30);

    const PREFIX: &str = "busy; retry in ";
    const SUFFIX: &str = " ms";

    /// The reason phrase asking for a retry after `wait`.
    pub fn reason(wait: Duration) -> String {
        let ms = wait.min(MAX_RETRY_IN).as_millis();
        format!("{PREFIX}{ms}{SUFFIX}")
    }

    /// The wait a refusal's reason phrase asks for, if it carries a hint
    /// (at most [`MAX_RETRY_IN`]).
    pub fn retry_in(reason: &[u8]) -> Option<Duration> {
        let text = std::str::from_utf8(reason).ok()?;
        let digits = text.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
        if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let ms: u64 = digits.parse().ok()?;
        Some(Duration::from_millis(ms).min(MAX_RETRY_IN))
    }
}

/// Application error codes of a reset or stopped QUIC stream.
pub mod reset {
    /// Reset by a relay (setup failed, or the other side went away).
    pub const RELAY: u32 = 1;
    /// Reset by a daemon (generic).
    pub const DAEMON: u32 = 2;
    /// Reset by the target daemon: the service behind the exposed port
    /// failed or reset its connection.
    pub const TARGET: u32 = 3;
    /// Reset by the caller's daemon: the caller's program went away
    /// without closing its side (killed, or reset its connection).
    pub const CALLER: u32 = 4;
}
/// ALPN protocol id of a client (daemon) connection.
pub const ALPN: &[u8] = b"swb/1";

/// Frame type numbers. Never reuse a number; retire it with a comment instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Daemon → relay: first frame of a session.
    Hello = 1,
    /// Relay → daemon: the session is registered.
    Welcome = 2,
    /// Relay → daemon: the session is refused; the relay closes afterwards.
    Refused = 3,
    /// Daemon → relay: send a message.
    Send = 4,
    /// Relay → daemon: a `Send` was accepted.
    SendAccepted = 5,
    /// Relay → daemon: a `Send` was refused.
    SendRefused = 6,
    /// Relay → daemon: a message for this peer.
    Deliver = 7,
    /// Daemon → relay: the application took these messages; forget them.
    Ack = 8,
    /// Either direction: please answer with `Pong`.
    Ping = 9,
    /// Either direction: answer to `Ping`.
    Pong = 10,
    /// Relay → daemon: the session ends (replaced, moved, revoked, shutdown).
    Goodbye = 11,
    /// Daemon → relay, first frame of a data stream: connect me to a port of a peer.
    StreamOpen = 12,
    /// Relay → daemon, first frame of a data stream: a peer wants this port.
    StreamIncoming = 13,
    /// Answer to `StreamOpen` / `StreamIncoming`, before any payload byte.
    StreamReply = 14,
    /// Daemon → relay, first frame of a stream: send these peers' status,
    /// then (unless `once`) every change.
    StatusWatch = 15,
    /// Relay → daemon on a status stream: one peer's status and presence.
    StatusUpdate = 16,
    /// Daemon → relay, first frame of a stream: change my status.
    SetStatus = 17,
    /// Daemon → relay, first frame of a stream: every known peer's status.
    PeersQuery = 18,
    /// Relay → relay, first frame of a mesh link: who I am, with proof of
    /// the mesh key bound to this TLS session.
    MeshHello = 19,
    /// Relay → relay: answer to `MeshHello`, with the members it knows.
    MeshWelcome = 20,
    /// Relay → relay on the mesh control stream: members I know.
    MeshMembers = 21,
    /// Relay → daemon, instead of `Welcome`: your home is another relay.
    Redirect = 22,
    /// Relay → daemon, after `Welcome` and when it changes: the live relays.
    RelayMap = 23,
    /// Relay → relay, first frame of a mesh stream: put this message in a
    /// mailbox you hold; answered with `SendAccepted` or `SendRefused`.
    /// More may follow on the same stream (up to
    /// [`MAX_FORWARDS_PER_CALL`]), each answered in turn.
    MeshForward = 24,
    /// Relay → relay, first frame of a mesh stream: connect it to a port of
    /// a peer attached to you; answered with `StreamReply`, then payload.
    MeshStreamOpen = 25,
    /// Relay → relay on the mesh control stream: I am stopping; take me
    /// out of the live set (the link stays up while I hand off mail).
    MeshLeaving = 26,
    /// Relay → relay, first frame of a mesh stream: status of peers homed
    /// at the receiving relay (all known ones if `names` is empty), and
    /// with `watch` every change after.
    MeshStatusQuery = 27,
    // 28 was `MeshHttp` (an HTTP API operation as JSON); retired for
    // `MeshCall`, never to be reused.
    /// Target daemon → caller on a ping stream (port [`PING_PORT`]), right
    /// after the accepting `StreamReply`: the relay the target is attached
    /// to, for the path `swbd ping` prints. Then `Ping` → `Pong` echoes.
    PingInfo = 29,
    /// Relay → relay, first frame of a mesh stream: an operation on a peer
    /// homed at the receiver (receive, acknowledge, set status) for a door
    /// of the sender; answered with [`MeshAnswer`] frames.
    MeshCall = 30,
    /// Relay → relay: the answer to a `MeshCall` (a receive answers with a
    /// `Message` per message, then `Received`).
    MeshAnswer = 31,
    /// Daemon → relay on the control stream: this peer runs a TUN
    /// interface; assign its virtual addresses. IP packets then travel as
    /// QUIC datagrams, one packet each.
    TunJoin = 32,
    /// Relay → daemon: the answer to `TunJoin`.
    TunAnswer = 33,
    /// Daemon → relay: the TUN address index of a peer of my namespace
    /// (for `NAME.switchboard` on the interface).
    TunResolve = 34,
    /// Relay → daemon: the answer to `TunResolve`.
    TunResolved = 35,
    /// Relay → relay, before a mesh stream's first frame: pass this stream
    /// on to relay `to` (a two-hop path, past `--full-mesh-max` relays or
    /// around a broken link); the bytes after it are the call's, spliced
    /// through unchanged.
    MeshVia = 36,
    /// Relay → relay on the mesh control stream, after a whole
    /// `MeshMembers` map: what changed in the relays I hear since.
    MeshMembersDelta = 37,
    /// Relay → daemon: several `Send`s were accepted (one frame for the
    /// sends a relay read and accepted together).
    SendsAccepted = 38,
    /// Relay → daemon: messages for this peer, many in one frame.
    Deliveries = 39,
}

impl FrameType {
    /// Maps a wire byte to a known frame type.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Refused,
            4 => Self::Send,
            5 => Self::SendAccepted,
            6 => Self::SendRefused,
            7 => Self::Deliver,
            8 => Self::Ack,
            9 => Self::Ping,
            10 => Self::Pong,
            11 => Self::Goodbye,
            12 => Self::StreamOpen,
            13 => Self::StreamIncoming,
            14 => Self::StreamReply,
            15 => Self::StatusWatch,
            16 => Self::StatusUpdate,
            17 => Self::SetStatus,
            18 => Self::PeersQuery,
            19 => Self::MeshHello,
            20 => Self::MeshWelcome,
            21 => Self::MeshMembers,
            22 => Self::Redirect,
            23 => Self::RelayMap,
            24 => Self::MeshForward,
            25 => Self::MeshStreamOpen,
            26 => Self::MeshLeaving,
            27 => Self::MeshStatusQuery,
            29 => Self::PingInfo,
            32 => Self::TunJoin,
            33 => Self::TunAnswer,
            34 => Self::TunResolve,
            35 => Self::TunResolved,
            36 => Self::MeshVia,
            37 => Self::MeshMembersDelta,
            38 => Self::SendsAccepted,
            39 => Self::Deliveries,
            30 => Self::MeshCall,
            31 => Self::MeshAnswer,
            _ => return None,
        })
    }
}

/// A stable refusal code. Unknown codes from a newer peer are kept as numbers.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Code(pub u16);

macro_rules! codes {
    ($($name:ident = $n:expr, $s:expr;)*) => {
        impl Code {
            $(
                #[doc = concat!("`", $s, "`")]
                pub const $name: Code = Code($n);
            )*
            /// The stable snake_case name of this code, as printed and used in JSON.
            pub fn as_str(self) -> &'static str {
                match self.0 {
                    $($n => $s,)*
                    _ => "unknown",
                }
            }
            /// Parses a stable name back into a code.
            pub fn from_name(s: &str) -> Option<Code> {
                match s {
                    $($s => Some(Code($n)),)*
                    _ => None,
                }
            }
        }
    };
}

codes! {
    PROTOCOL = 1, "protocol_error";
    UNSUPPORTED_VERSION = 2, "unsupported_version";
    UNAUTHORIZED = 3, "unauthorized";
    KEY_REVOKED = 4, "key_revoked";
    BAD_NAME = 5, "bad_name";
    BODY_TOO_LARGE = 6, "body_too_large";
    MAILBOX_FULL = 7, "mailbox_full";
    NAMESPACE_FULL = 8, "namespace_full";
    REPLACED = 9, "replaced";
    SHUTTING_DOWN = 10, "shutting_down";
    TIMEOUT = 11, "timeout";
    INTERNAL = 12, "internal";
    PEER_OFFLINE = 13, "peer_offline";
    PORT_NOT_EXPOSED = 14, "port_not_exposed";
    CONNECTION_REFUSED = 15, "connection_refused";
    TOO_MANY_STREAMS = 16, "too_many_streams";
    STATUS_TOO_LARGE = 17, "status_too_large";
    BAD_STATUS = 18, "bad_status";
    RELAY_UNAVAILABLE = 19, "relay_unavailable";
    BUSY = 20, "busy";
    ID_CONFLICT = 21, "id_conflict";
    NAME_NOT_ALLOWED = 22, "name_not_allowed";
    RATE_LIMITED = 23, "rate_limited";
    TUN_UNAVAILABLE = 24, "tun_unavailable";
    MOVED = 25, "moved";
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.as_str(), self.0)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message id: 16 random bytes chosen by the sender's daemon, so a send
/// retried after a reconnect is recognised instead of duplicated.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// Parses the 32-hex-digit form printed by `Display`.
    pub fn parse_hex(s: &str) -> Option<Self> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

impl MessageId {
    /// The 32 lowercase hex digits of the id, without allocating.
    pub fn to_hex(&self) -> [u8; 32] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[(b >> 4) as usize];
            out[2 * i + 1] = DIGITS[(b & 0xf) as usize];
        }
        out
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.to_hex();
        // Hex digits are ASCII.
        f.write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Magic and version that open a control stream in each direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    /// The protocol version of the sender.
    pub version: u16,
}

impl Preamble {
    /// Writes the 6 preamble bytes.
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_slice(&MAGIC);
        dst.put_u16(self.version);
    }

    /// Reads a preamble from the start of `src`. `Ok(None)` means more bytes
    /// are needed; on success the preamble bytes are consumed.
    pub fn decode(src: &mut BytesMut) -> Result<Option<Self>, DecodeError> {
        if src.len() < PREAMBLE_LEN {
            // Reject a wrong magic as early as we can see it.
            if !MAGIC.starts_with(&src[..src.len().min(4)]) {
                return Err(DecodeError::BadMagic);
            }
            return Ok(None);
        }
        if src[..4] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        src.advance(4);
        let version = src.get_u16();
        Ok(Some(Self { version }))
    }
}

/// Daemon → relay, first frame: who I am.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version of the daemon.
    pub version: u16,
    /// The API key. Never logged: `Debug` masks it.
    pub key: String,
    /// The requested peer name (normalised by the relay).
    pub name: String,
    /// Free-form client identification, e.g. `swbd/0.1.0`.
    pub agent: String,
    /// Random per daemon process, the same on all its connections: a new
    /// connection of the same instance moves the session (the old one ends
    /// with [`Code::MOVED`]); another instance replaces it
    /// ([`Code::REPLACED`]). Never logged: `Debug` masks it.
    pub instance: u64,
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("key", &"<redacted>")
            .field("name", &self.name)
            .field("agent", &self.agent)
            .field("instance", &"<redacted>")
            .finish()
    }
}

/// Limits the relay enforces for this session, told to the daemon so it can
/// refuse early with the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest message body in bytes.
    pub max_message_body: u32,
    /// Messages a mailbox holds at most.
    pub mailbox_messages: u32,
    /// Bytes of bodies a mailbox holds at most.
    pub mailbox_bytes: u64,
    /// Seconds an undelivered message is kept.
    pub message_ttl_secs: u64,
}

/// Relay → daemon: the session is registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The namespace of the key.
    pub namespace: String,
    /// The peer name as registered (case-folded).
    pub name: String,
    /// The relay's id.
    pub relay_id: String,
    /// The session number on this relay, for logs.
    pub session: u64,
    /// Relay clock at registration, milliseconds since the Unix epoch.
    pub server_time_ms: u64,
    /// Limits in force.
    pub limits: Limits,
}

/// A refusal or goodbye: stable code plus a sentence that says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Stable code.
    pub code: Code,
    /// Human sentence, at most [`MAX_REASON_LEN`] bytes.
    pub message: String,
}

impl Refusal {
    /// Builds a refusal, truncating the message to [`MAX_REASON_LEN`].
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_REASON_LEN {
            let mut end = MAX_REASON_LEN;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Self { code, message }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Daemon → relay: send `body` to peer `to` of the same namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Send {
    /// Request number chosen by the daemon, echoed in the answer.
    pub req: u64,
    /// Message id chosen by the daemon (retries reuse it).
    pub id: MessageId,
    /// Recipient name.
    pub to: String,
    /// Message body, at most [`MAX_MESSAGE_BODY`] bytes.
    pub body: Bytes,
}

/// Relay → daemon: the message is in the recipient's mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendAccepted {
    /// Echo of `Send::req`.
    pub req: u64,
    /// Echo of `Send::id`.
    pub id: MessageId,
    /// Whether the recipient was attached when the message was accepted.
    /// A name of another namespace looks exactly like a name nobody holds.
    pub online: bool,
}

/// One send of a [`SendsAccepted`] frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// Echo of `Send::req`.
    pub req: u64,
    /// Whether the recipient was attached when the message was accepted.
    pub online: bool,
}

/// Relay → daemon: these sends are in their recipients' mailboxes, each as
/// a [`SendAccepted`] would say (without echoing the ids: the request
/// number names the send).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendsAccepted {
    /// At most [`MAX_SENDS_ACCEPTED`].
    pub accepted: Vec<Accepted>,
}

/// Relay → daemon: the message was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRefused {
    /// Echo of `Send::req`.
    pub req: u64,
    /// Why.
    pub refusal: Refusal,
}

/// Relay → daemon: a message for this peer. Delivered again after a
/// reconnect until acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deliver {
    /// Message id (drop duplicates by it).
    pub id: MessageId,
    /// Sender's name.
    pub from: String,
    /// Body.
    pub body: Bytes,
    /// When the relay accepted it, milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
}

/// One message of a [`DeliveryRun`]: a [`Deliver`] without the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// Message id (drop duplicates by it).
    pub id: MessageId,
    /// Body.
    pub body: Bytes,
    /// When the relay accepted it, milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
}

/// Consecutive messages of one [`Deliveries`] frame from the same sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRun {
    /// Sender's name.
    pub from: String,
    /// The messages, in mailbox order.
    pub msgs: Vec<Delivered>,
}

/// Relay → daemon: messages for this peer in mailbox order, each as a
/// [`Deliver`] would carry it; runs from the same sender share its name.
/// At most [`MAX_DELIVERIES`] runs and messages together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deliveries {
    /// The runs, in mailbox order.
    pub runs: Vec<DeliveryRun>,
}

impl Deliveries {
    /// Messages in the frame.
    pub fn len(&self) -> usize {
        self.runs.iter().map(|r| r.msgs.len()).sum()
    }

    /// Whether the frame holds no message.
    pub fn is_empty(&self) -> bool {
        self.runs.iter().all(|r| r.msgs.is_empty())
    }

    /// The messages as [`Deliver`]s, in order.
    pub fn into_delivers(self) -> impl Iterator<Item = Deliver> {
        self.runs.into_iter().flat_map(|r| {
            let from = r.from;
            r.msgs.into_iter().map(move |m| Deliver {
                id: m.id,
                from: from.clone(),
                body: m.body,
                sent_at_ms: m.sent_at_ms,
            })
        })
    }
}

/// Appends a [`Frame::Send`] of these parts to `dst`: the same bytes as
/// encoding the frame, without copying the recipient's name or the body
/// into one first (a sender's per-message path).
pub fn encode_send(
    dst: &mut BytesMut,
    req: u64,
    id: MessageId,
    to: &str,
    body: &Bytes,
) -> Result<(), EncodeError> {
    hot::put_send(dst, req, id, to, body)
}

/// Appends a frame of type `ty` whose body of `len` bytes `write` puts in
/// the slice it is given (returning how many it wrote); nothing is left of
/// it in `dst` if that fails.
fn put_frame(
    dst: &mut BytesMut,
    ty: FrameType,
    len: usize,
    write: impl FnOnce(&mut [u8]) -> Result<usize, postcard::Error>,
) -> Result<(), EncodeError> {
    if len > MAX_FRAME_LEN {
        return Err(EncodeError::TooLarge { len });
    }
    dst.reserve(HEADER_LEN + len);
    dst.put_u8(ty as u8);
    dst.put_u32(len as u32);
    let start = dst.len();
    dst.resize(start + len, 0);
    match write(&mut dst[start..]) {
        Ok(n) if n == len => Ok(()),
        Ok(n) => {
            dst.truncate(start - HEADER_LEN);
            Err(EncodeError::Postcard(format!(
                "size mismatch: computed {len}, wrote {n}"
            )))
        }
        Err(e) => {
            dst.truncate(start - HEADER_LEN);
            Err(EncodeError::Postcard(e.to_string()))
        }
    }
}

/// Bytes a postcard varint of `v` takes.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Builds [`Deliveries`] frames from messages in order: each frame within
/// [`MAX_FRAME_LEN`] and [`MAX_DELIVERIES`] (and, if asked, a smaller
/// number of messages), consecutive messages of one sender in one run.
#[derive(Debug)]
pub struct DeliveriesBuilder {
    frame: Deliveries,
    /// Encoded body bytes of `frame`, counting its run count at its most.
    bytes: usize,
    /// Runs and messages in `frame`.
    items: usize,
    /// Messages a frame holds at most.
    max_messages: usize,
}

impl Default for DeliveriesBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl DeliveriesBuilder {
    /// An empty builder of frames as large as the protocol allows.
    pub fn new() -> Self {
        Self::with_max_messages(MAX_DELIVERIES)
    }

    /// An empty builder of frames of at most `max_messages` messages (at
    /// least one; frames stay within the protocol's limits whatever it is).
    pub fn with_max_messages(max_messages: usize) -> Self {
        Self {
            frame: Deliveries::default(),
            bytes: 0,
            items: 0,
            max_messages: max_messages.max(1),
        }
    }

    /// Adds a message from `from`. Returns the frame built so far if this
    /// message does not fit in it (the message starts the next frame).
    pub fn push(
        &mut self,
        from: &str,
        id: MessageId,
        body: Bytes,
        sent_at_ms: u64,
    ) -> Option<Deliveries> {
        let msg_len = 16 + varint_len(body.len() as u64) + body.len() + varint_len(sent_at_ms);
        let same_run = self.frame.runs.last().is_some_and(|r| r.from == from);
        // A new run: its name, and its message count at its most (3 bytes
        // hold MAX_DELIVERIES).
        let run_len = if same_run {
            0
        } else {
            varint_len(from.len() as u64) + from.len() + 3
        };
        let items = if same_run { 1 } else { 2 };
        let mut full = None;
        if !self.frame.runs.is_empty()
            && (self.bytes + run_len + msg_len > MAX_FRAME_LEN
                || self.items + items > MAX_DELIVERIES
                || self.items - self.frame.runs.len() >= self.max_messages)
        {
            full = self.finish();
        }
        if self.frame.runs.is_empty() {
            // The run count at its most.
            self.bytes = 3;
        }
        let m = Delivered {
            id,
            body,
            sent_at_ms,
        };
        match self.frame.runs.last_mut() {
            Some(r) if r.from == from => {
                r.msgs.push(m);
                self.bytes += msg_len;
                self.items += 1;
            }
            _ => {
                self.frame.runs.push(DeliveryRun {
                    from: from.to_owned(),
                    msgs: vec![m],
                });
                self.bytes += varint_len(from.len() as u64) + from.len() + 3 + msg_len;
                self.items += 2;
            }
        }
        full
    }

    /// The frame built so far, if it holds a message; the builder is empty
    /// afterwards.
    pub fn finish(&mut self) -> Option<Deliveries> {
        self.bytes = 0;
        self.items = 0;
        let f = std::mem::take(&mut self.frame);
        (!f.runs.is_empty()).then_some(f)
    }
}

/// Daemon → relay: these messages were taken by the application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// At most [`MAX_ACK_IDS`] ids.
    pub ids: Vec<MessageId>,
}

/// Daemon → relay: open a byte stream to `port` of peer `to` (same
/// namespace). Payload flows only after a [`StreamReply`] without refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOpen {
    /// Target peer name.
    pub to: String,
    /// Port on the target, as the caller names it (the target maps it).
    pub port: u16,
}

/// Relay → target daemon: peer `from` asks for `port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamIncoming {
    /// Caller's peer name.
    pub from: String,
    /// Requested port.
    pub port: u16,
}

/// The answer to a stream request: `None` means accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamReply {
    /// Why not, if refused.
    pub refusal: Option<Refusal>,
}

/// Daemon → relay: watch these peers (same namespace). The relay answers
/// with a [`StreamReply`], then one [`StatusUpdate`] per peer (the current
/// value), then, unless `once`, an update per change until the stream ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusWatch {
    /// Peer names, at most [`MAX_WATCH_NAMES`].
    pub names: Vec<String>,
    /// Only the current values, then FIN.
    pub once: bool,
}

/// One peer's status and presence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusUpdate {
    /// Peer name.
    pub name: String,
    /// Grows with every change; 0 for a name nobody ever held.
    pub version: u64,
    /// Attached now.
    pub online: bool,
    /// When `online` last changed, ms since the Unix epoch (0: never).
    pub since_ms: u64,
    /// When the status fields last changed, ms since the Unix epoch (0: never).
    pub updated_ms: u64,
    /// The status, sorted by key. On the wire a count, then each key and
    /// its value: the bytes a `Vec<(String, String)>` encodes to, which is
    /// what this field was before it was a map (`status_update_fields_
    /// encode_as_a_list_of_pairs`). A watcher decodes it straight into
    /// the map it hands on, with no list in between.
    pub fields: std::collections::BTreeMap<String, String>,
    /// This watcher missed updates of this peer (it fell behind); this is
    /// the newest value.
    pub lagged: bool,
}

/// Daemon → relay: merge `set` into my status and remove `clear`; with
/// `replace`, `set` becomes the whole status. Answered with a
/// [`StreamReply`] and, if accepted, the resulting [`StatusUpdate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetStatus {
    /// Keys to set.
    pub set: Vec<(String, String)>,
    /// Keys to remove.
    pub clear: Vec<String>,
    /// Replace the whole status.
    pub replace: bool,
}

/// Checks a status change against the named limits and key syntax.
/// `current` is the status it applies to; returns the result.
pub fn apply_status(
    current: &std::collections::BTreeMap<String, String>,
    change: &SetStatus,
) -> Result<std::collections::BTreeMap<String, String>, Refusal> {
    let bad = |m: String| Refusal::new(Code::BAD_STATUS, m);
    for k in change.set.iter().map(|(k, _)| k).chain(&change.clear) {
        let ok = !k.is_empty()
            && k.len() <= MAX_STATUS_KEY_LEN
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
        if !ok {
            return Err(bad(format!(
                "status key {k:?}: use 1-{MAX_STATUS_KEY_LEN} letters, digits, '_', '-', '.', ':'"
            )));
        }
    }
    let mut next = if change.replace {
        std::collections::BTreeMap::new()
    } else {
        current.clone()
    };
    for k in &change.clear {
        next.remove(k);
    }
    for (k, v) in &change.set {
        next.insert(k.clone(), v.clone());
    }
    let bytes: usize = next.iter().map(|(k, v)| k.len() + v.len()).sum();
    if next.len() > MAX_STATUS_KEYS || bytes > MAX_STATUS_BYTES {
        return Err(Refusal::new(
            Code::STATUS_TOO_LARGE,
            format!(
                "the status would have {} keys and {bytes} bytes; the limits are {MAX_STATUS_KEYS} keys and {MAX_STATUS_BYTES} bytes",
                next.len()
            ),
        ));
    }
    Ok(next)
}

/// A relay as others reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RelayRecord {
    /// Relay id (unique in the mesh; the ring places peers by it).
    pub id: String,
    /// Addresses (`host:port`) daemons and relays connect to.
    pub addrs: Vec<String>,
    /// `sha256:<hex>` of its certificate.
    pub fingerprint: String,
    /// When this relay process started (ms since the Unix epoch): a newer
    /// record of the same relay supersedes an older one, so records gossiped
    /// from before a restart cannot undo it.
    pub incarnation: u64,
}

/// Relay → relay: first frame of a mesh link.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshHello {
    /// Protocol version.
    pub version: u16,
    /// The dialing relay.
    pub relay: RelayRecord,
    /// HMAC-SHA256 under the mesh key of this TLS session's exported keying
    /// material: proves the key without revealing it, and cannot be replayed
    /// on another connection.
    pub proof: Vec<u8>,
}

impl fmt::Debug for MeshHello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshHello")
            .field("version", &self.version)
            .field("relay", &self.relay)
            .field("proof", &"<redacted>")
            .finish()
    }
}

/// Relay → relay: the answer to `MeshHello`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshWelcome {
    /// The answering relay.
    pub relay: RelayRecord,
    /// Its proof (with the other role label).
    pub proof: Vec<u8>,
    /// Relays it knows.
    pub members: Vec<RelayRecord>,
}

impl fmt::Debug for MeshWelcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshWelcome")
            .field("relay", &self.relay)
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

/// The live relays, as a relay tells its daemons and other relays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayMap {
    /// Live relays (at most [`RELAY_MAP_PAGE`] in one frame).
    pub relays: Vec<RelayRecord>,
    /// More pages of the same map follow; the map is whole at the page
    /// without it.
    pub more: bool,
}

impl RelayMap {
    /// Splits a whole map into pages that each fit one frame.
    pub fn pages(relays: &[RelayRecord]) -> Vec<RelayMap> {
        let mut out: Vec<RelayMap> = relays
            .chunks(RELAY_MAP_PAGE)
            .map(|c| RelayMap {
                relays: c.to_vec(),
                more: true,
            })
            .collect();
        match out.last_mut() {
            Some(last) => last.more = false,
            None => out.push(RelayMap {
                relays: Vec::new(),
                more: false,
            }),
        }
        out
    }
}

/// Puts the pages of a relay map back together.
#[derive(Debug, Default)]
pub struct RelayMapPages {
    relays: Vec<RelayRecord>,
}

impl RelayMapPages {
    /// Adds a page; the whole map once its last page arrived. A map that
    /// would exceed [`MAX_RELAYS`] is cut there.
    pub fn add(&mut self, page: RelayMap) -> Option<Vec<RelayRecord>> {
        let room = MAX_RELAYS.saturating_sub(self.relays.len());
        self.relays.extend(page.relays.into_iter().take(room));
        if page.more {
            None
        } else {
            Some(std::mem::take(&mut self.relays))
        }
    }
}

/// Relay → relay: a message for a peer homed at the receiving relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshForward {
    /// Namespace of sender and recipient.
    pub namespace: String,
    /// Sender name.
    pub from: String,
    /// Recipient name.
    pub to: String,
    /// Message id chosen by the sender's daemon.
    pub id: MessageId,
    /// Body, at most [`MAX_MESSAGE_BODY`] bytes.
    pub body: Bytes,
    /// When the sender's relay accepted it, ms since the Unix epoch.
    pub sent_at_ms: u64,
    /// Relays it was forwarded on by, beyond the first (a relay that is
    /// not the recipient's home, as it sees the ring, passes it on once).
    pub hops: u8,
}

/// Most times a forwarded message is passed on by a relay that is not its
/// home (relays that briefly disagree about the ring); past that it is
/// held where it is and moves when the ring agrees again.
pub const MAX_FORWARD_HOPS: u8 = 1;

/// Most messages one forward call carries: `MeshForward` frames one after
/// another on the call's stream, answered in order, one `SendAccepted` or
/// `SendRefused` each. The receiving relay answers the rest of a longer
/// call with a refusal and stops reading.
pub const MAX_FORWARDS_PER_CALL: usize = 512;

/// Body bytes at which a relay's forward call stops taking more messages
/// (a call holds at least one, however large).
pub const FORWARD_CALL_BYTES: usize = 1024 * 1024;

/// Relay → relay: a stream from `from` to `port` of `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshStreamOpen {
    /// Namespace of both peers.
    pub namespace: String,
    /// Caller.
    pub from: String,
    /// Target, attached to the receiving relay.
    pub to: String,
    /// Port on the target.
    pub port: u16,
}

/// Relay → relay: a status query or watch for peers homed at the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshStatusQuery {
    /// Namespace.
    pub namespace: String,
    /// Peers; empty: every peer the receiver knows.
    pub names: Vec<String>,
    /// Keep sending changes.
    pub watch: bool,
}

/// Relay → relay: pass the rest of this mesh stream on to relay `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshVia {
    /// The relay the stream is for (at most [`MAX_RELAY_ID_LEN`] bytes).
    pub to: String,
    /// How many more relays may pass it on when the receiver has no link
    /// to `to` either (0: the receiver must be linked to `to`).
    pub ttl: u8,
}

/// Relay → relay: the relays the sender hears, changed since its last
/// `MeshMembers` or `MeshMembersDelta` on this link (the control stream
/// is ordered and reliable, so changes need no versions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshMembersDelta {
    /// Relays it hears now and did not, or whose record changed.
    pub add: Vec<RelayRecord>,
    /// Relays it no longer hears.
    pub remove: Vec<String>,
}

impl MeshMembersDelta {
    /// Whether it fits one frame at the largest records and ids (else the
    /// sender sends the whole map again).
    pub fn fits(add: usize, remove: usize) -> bool {
        add.saturating_mul(MAX_RELAY_RECORD_LEN)
            .saturating_add(remove.saturating_mul(MAX_RELAY_ID_LEN + 2))
            <= MAX_FRAME_LEN - 16
    }
}

/// Most relays that may pass a mesh stream on beyond the first: a
/// two-hop path plus one detour around a relay or link that is down.
pub const MAX_VIA_TTL: u8 = 1;

/// Relay → relay: an operation on peer `name` of `namespace`, homed at the
/// receiving relay, on behalf of a door of the sending relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshCall {
    /// The peer's namespace.
    pub namespace: String,
    /// The peer.
    pub name: String,
    /// What to do.
    pub op: MeshOp,
}

/// The operations of a [`MeshCall`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeshOp {
    /// Take up to `max` messages of the peer's mailbox as an HTTP poll does
    /// (leased until acknowledged), waiting up to `wait_ms` for the first.
    Receive {
        /// Longest wait for the first message.
        wait_ms: u64,
        /// Most messages.
        max: u32,
    },
    /// Acknowledge messages (forget them).
    Ack {
        /// Message ids, at most [`MAX_ACK_IDS`].
        ids: Vec<MessageId>,
    },
    /// Change the peer's status.
    SetStatus(SetStatus),
    /// At the namespace's TUN allocator (`name` is the peer): its address
    /// index, assigned if it has none (`want` as in [`TunJoin`]).
    TunAssign {
        /// The index the peer had before, if any.
        want: Option<u32>,
    },
    /// At the namespace's TUN allocator: the index of peer `name`, if any.
    TunIndex,
    /// At the namespace's TUN allocator: the peer that has index `index`.
    TunWho {
        /// The address index.
        index: u32,
    },
}

/// The answers to a [`MeshCall`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeshAnswer {
    /// One received message (a receive sends one frame per message).
    Message(Deliver),
    /// The end of a receive's messages.
    Received,
    /// How many of the acknowledged ids were held.
    Acked(u32),
    /// The status after a change.
    Status(StatusUpdate),
    /// The operation was refused.
    Refused(Refusal),
    /// A TUN address index (`None`: the peer has none).
    TunIndex(Option<u32>),
    /// The peer that has a TUN index (`None`: nobody).
    TunName(Option<String>),
}

/// Port 0 of every peer is its daemon's built-in echo service (`swbd
/// ping`): a stream to it is answered by the daemon itself with
/// [`PingInfo`], then a `Pong` for every `Ping`. It is never an exposure
/// (exposures are ports 1–65535).
pub const PING_PORT: u16 = 0;

/// See [`FrameType::PingInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingInfo {
    /// Id of the relay the answering daemon is attached to.
    pub relay: String,
}

/// See [`FrameType::TunJoin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunJoin {
    /// The address index this peer had before (a relay that lost its
    /// table gives it back if it is free), if any.
    pub want: Option<u32>,
}

/// See [`FrameType::TunAnswer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TunAnswer {
    /// The peer's addresses: index `index` of the namespace's plan.
    Assigned(TunAssigned),
    /// No TUN for this session (the daemon keeps its session).
    Refused(Refusal),
}

/// A namespace's address plan and one peer's place in it: IPv4
/// `v4_net | index` in `v4_net/v4_prefix`, IPv6 `v6_net::index` in a /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunAssigned {
    /// The peer's index.
    pub index: u32,
    /// The namespace's IPv4 network.
    pub v4_net: [u8; 4],
    /// Its prefix length.
    pub v4_prefix: u8,
    /// The namespace's IPv6 /64 prefix.
    pub v6_net: [u8; 8],
}

/// See [`FrameType::TunResolve`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunResolve {
    /// Echoed in the answer.
    pub req: u64,
    /// The peer's name.
    pub name: String,
}

/// See [`FrameType::TunResolved`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunResolved {
    /// The request's `req`.
    pub req: u64,
    /// The peer's address index (`None`: no peer of that name has one).
    pub index: Option<u32>,
}

/// Ping / Pong payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Echoed back in the `Pong`.
    pub nonce: u64,
}

/// Every frame of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`FrameType::Hello`].
    Hello(Hello),
    /// See [`FrameType::Welcome`].
    Welcome(Welcome),
    /// See [`FrameType::Refused`].
    Refused(Refusal),
    /// See [`FrameType::Send`].
    Send(Send),
    /// See [`FrameType::SendAccepted`].
    SendAccepted(SendAccepted),
    /// See [`FrameType::SendsAccepted`].
    SendsAccepted(SendsAccepted),
    /// See [`FrameType::SendRefused`].
    SendRefused(SendRefused),
    /// See [`FrameType::Deliver`].
    Deliver(Deliver),
    /// See [`FrameType::Deliveries`].
    Deliveries(Deliveries),
    /// See [`FrameType::Ack`].
    Ack(Ack),
    /// See [`FrameType::Ping`].
    Ping(Ping),
    /// See [`FrameType::Pong`].
    Pong(Ping),
    /// See [`FrameType::Goodbye`].
    Goodbye(Refusal),
    /// See [`FrameType::StreamOpen`].
    StreamOpen(StreamOpen),
    /// See [`FrameType::StreamIncoming`].
    StreamIncoming(StreamIncoming),
    /// See [`FrameType::StreamReply`].
    StreamReply(StreamReply),
    /// See [`FrameType::StatusWatch`].
    StatusWatch(StatusWatch),
    /// See [`FrameType::StatusUpdate`].
    StatusUpdate(StatusUpdate),
    /// See [`FrameType::SetStatus`].
    SetStatus(SetStatus),
    /// See [`FrameType::PeersQuery`].
    PeersQuery,
    /// See [`FrameType::MeshHello`].
    MeshHello(MeshHello),
    /// See [`FrameType::MeshWelcome`].
    MeshWelcome(MeshWelcome),
    /// See [`FrameType::MeshMembers`].
    MeshMembers(RelayMap),
    /// See [`FrameType::Redirect`].
    Redirect(RelayRecord),
    /// See [`FrameType::RelayMap`].
    RelayMap(RelayMap),
    /// See [`FrameType::MeshForward`].
    MeshForward(MeshForward),
    /// See [`FrameType::MeshStreamOpen`].
    MeshStreamOpen(MeshStreamOpen),
    /// See [`FrameType::MeshLeaving`].
    MeshLeaving,
    /// See [`FrameType::MeshStatusQuery`].
    MeshStatusQuery(MeshStatusQuery),
    /// See [`FrameType::MeshCall`].
    MeshCall(MeshCall),
    /// See [`FrameType::MeshVia`].
    MeshVia(MeshVia),
    /// See [`FrameType::MeshMembersDelta`].
    MeshMembersDelta(MeshMembersDelta),
    /// See [`FrameType::MeshAnswer`].
    MeshAnswer(MeshAnswer),
    /// See [`FrameType::PingInfo`].
    PingInfo(PingInfo),
    /// See [`FrameType::TunJoin`].
    TunJoin(TunJoin),
    /// See [`FrameType::TunAnswer`].
    TunAnswer(TunAnswer),
    /// See [`FrameType::TunResolve`].
    TunResolve(TunResolve),
    /// See [`FrameType::TunResolved`].
    TunResolved(TunResolved),
}

/// Errors while encoding a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    /// The encoded body would exceed [`MAX_FRAME_LEN`].
    #[error("frame body of {len} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge {
        /// Encoded length.
        len: usize,
    },
    /// postcard failed (should not happen for our types).
    #[error("encoding failed: {0}")]
    Postcard(String),
}

/// Errors while decoding. Any of them ends the connection: the stream can no
/// longer be trusted to be in sync.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The stream did not start with [`MAGIC`].
    #[error("not a Switchboard stream (bad magic)")]
    BadMagic,
    /// A frame header announced more than the reader's limit
    /// ([`MAX_FRAME_LEN`] at most).
    #[error("frame of type {ty} announces {len} bytes, more than the limit of {max}")]
    FrameTooLarge {
        /// Frame type byte.
        ty: u8,
        /// Announced length.
        len: u32,
        /// The limit it was checked against.
        max: u32,
    },
    /// The body of a known frame type did not decode.
    #[error("malformed {ty:?} frame: {reason}")]
    Malformed {
        /// Frame type.
        ty: FrameType,
        /// postcard's reason.
        reason: String,
    },
    /// A field exceeds its named limit.
    #[error("{field} has {len} bytes, more than the limit of {max}")]
    FieldTooLarge {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl Frame {
    /// The frame's type number.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::Welcome(_) => FrameType::Welcome,
            Frame::Refused(_) => FrameType::Refused,
            Frame::Send(_) => FrameType::Send,
            Frame::SendAccepted(_) => FrameType::SendAccepted,
            Frame::SendsAccepted(_) => FrameType::SendsAccepted,
            Frame::SendRefused(_) => FrameType::SendRefused,
            Frame::Deliver(_) => FrameType::Deliver,
            Frame::Deliveries(_) => FrameType::Deliveries,
            Frame::Ack(_) => FrameType::Ack,
            Frame::Ping(_) => FrameType::Ping,
            Frame::Pong(_) => FrameType::Pong,
            Frame::Goodbye(_) => FrameType::Goodbye,
            Frame::StreamOpen(_) => FrameType::StreamOpen,
            Frame::StreamIncoming(_) => FrameType::StreamIncoming,
            Frame::StreamReply(_) => FrameType::StreamReply,
            Frame::StatusWatch(_) => FrameType::StatusWatch,
            Frame::StatusUpdate(_) => FrameType::StatusUpdate,
            Frame::SetStatus(_) => FrameType::SetStatus,
            Frame::PeersQuery => FrameType::PeersQuery,
            Frame::MeshHello(_) => FrameType::MeshHello,
            Frame::MeshWelcome(_) => FrameType::MeshWelcome,
            Frame::MeshMembers(_) => FrameType::MeshMembers,
            Frame::Redirect(_) => FrameType::Redirect,
            Frame::RelayMap(_) => FrameType::RelayMap,
            Frame::MeshForward(_) => FrameType::MeshForward,
            Frame::MeshStreamOpen(_) => FrameType::MeshStreamOpen,
            Frame::MeshLeaving => FrameType::MeshLeaving,
            Frame::MeshStatusQuery(_) => FrameType::MeshStatusQuery,
            Frame::MeshCall(_) => FrameType::MeshCall,
            Frame::MeshVia(_) => FrameType::MeshVia,
            Frame::MeshMembersDelta(_) => FrameType::MeshMembersDelta,
            Frame::MeshAnswer(_) => FrameType::MeshAnswer,
            Frame::PingInfo(_) => FrameType::PingInfo,
            Frame::TunJoin(_) => FrameType::TunJoin,
            Frame::TunAnswer(_) => FrameType::TunAnswer,
            Frame::TunResolve(_) => FrameType::TunResolve,
            Frame::TunResolved(_) => FrameType::TunResolved,
        }
    }

    fn body_len(&self) -> Result<usize, EncodeError> {
        fn len<T: Serialize>(v: &T) -> Result<usize, EncodeError> {
            postcard::experimental::serialized_size(v)
                .map_err(|e| EncodeError::Postcard(e.to_string()))
        }
        match self {
            Frame::Hello(v) => len(v),
            Frame::Welcome(v) => len(v),
            Frame::Refused(v) | Frame::Goodbye(v) => len(v),
            Frame::Send(v) => Ok(hot::send_len(v.req, &v.to, &v.body)),
            Frame::SendAccepted(v) => Ok(hot::send_accepted_len(v)),
            Frame::SendsAccepted(v) => Ok(hot::sends_accepted_len(v)),
            Frame::SendRefused(v) => len(v),
            Frame::Deliver(v) => len(v),
            Frame::Deliveries(v) => Ok(hot::deliveries_len(v)),
            Frame::Ack(v) => Ok(hot::ack_len(v)),
            Frame::Ping(v) | Frame::Pong(v) => len(v),
            Frame::StreamOpen(v) => len(v),
            Frame::StreamIncoming(v) => len(v),
            Frame::StreamReply(v) => len(v),
            Frame::StatusWatch(v) => len(v),
            Frame::StatusUpdate(v) => len(v),
            Frame::SetStatus(v) => len(v),
            Frame::PeersQuery => Ok(0),
            Frame::MeshHello(v) => len(v),
            Frame::MeshWelcome(v) => len(v),
            Frame::MeshMembers(v) | Frame::RelayMap(v) => len(v),
            Frame::Redirect(v) => len(v),
            Frame::MeshForward(v) => Ok(hot::mesh_forward_len(v)),
            Frame::MeshStreamOpen(v) => len(v),
            Frame::MeshLeaving => Ok(0),
            Frame::MeshStatusQuery(v) => len(v),
            Frame::MeshCall(v) => len(v),
            Frame::MeshVia(v) => len(v),
            Frame::MeshMembersDelta(v) => len(v),
            Frame::MeshAnswer(v) => len(v),
            Frame::PingInfo(v) => len(v),
            Frame::TunJoin(v) => len(v),
            Frame::TunAnswer(v) => len(v),
            Frame::TunResolve(v) => len(v),
            Frame::TunResolved(v) => len(v),
        }
    }

    /// Exact number of bytes [`Frame::encode`] writes (header included).
    pub fn encoded_len(&self) -> Result<usize, EncodeError> {
        Ok(HEADER_LEN + self.body_len()?)
    }

    /// Appends header and body to `dst`. Fails, writing nothing, if the body
    /// would exceed [`MAX_FRAME_LEN`].
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        // The frames on every message's path, by hand (module `hot`); their
        // postcard arms below are never reached.
        match self {
            Frame::Send(v) => return hot::put_send(dst, v.req, v.id, &v.to, &v.body),
            Frame::SendsAccepted(v) => return hot::put_sends_accepted(dst, v),
            Frame::Deliveries(v) => return hot::put_deliveries(dst, v),
            Frame::Ack(v) => return hot::put_ack(dst, v),
            Frame::SendAccepted(v) => return hot::put_send_accepted(dst, v),
            Frame::MeshForward(v) => return hot::put_mesh_forward(dst, v),
            _ => {}
        }
        let len = self.body_len()?;
        put_frame(dst, self.frame_type(), len, |out| match self {
            Frame::Hello(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::Welcome(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::Refused(v) | Frame::Goodbye(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::Send(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::SendAccepted(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::SendsAccepted(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::SendRefused(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::Deliver(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::Deliveries(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::Ack(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::Ping(v) | Frame::Pong(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::StreamOpen(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::StreamIncoming(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::StreamReply(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::StatusWatch(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::StatusUpdate(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::SetStatus(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::PeersQuery => Ok(0),
            Frame::MeshHello(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::MeshWelcome(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::MeshMembers(v) | Frame::RelayMap(v) => {
                postcard::to_slice(v, out).map(|s| s.len())
            }
            Frame::Redirect(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::MeshForward(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::MeshStreamOpen(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::MeshLeaving => Ok(0),
            Frame::MeshStatusQuery(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::MeshCall(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::MeshVia(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::MeshMembersDelta(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::MeshAnswer(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::PingInfo(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::TunJoin(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::TunAnswer(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::TunResolve(v) => postcard::to_slice(v, out).map(|s| s.len()),
            Frame::TunResolved(v) => postcard::to_slice(v, out).map(|s| s.len()),
        })
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut b = BytesMut::new();
        self.encode(&mut b)?;
        Ok(b.freeze())
    }
}

/// The outcome of one [`decode`] step.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A complete frame; `consumed` bytes of input were used.
    Frame {
        /// The frame.
        frame: Frame,
        /// Bytes consumed from the input.
        consumed: usize,
    },
    /// A frame of a type this version does not know; skip `consumed` bytes.
    Unknown {
        /// The type byte.
        ty: u8,
        /// Bytes to skip.
        consumed: usize,
    },
    /// Not enough input yet; at least `needed` bytes in total are required.
    Incomplete {
        /// Total bytes needed before the next attempt can make progress.
        needed: usize,
    },
}

fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), DecodeError> {
    if len > max {
        return Err(DecodeError::FieldTooLarge { field, len, max });
    }
    Ok(())
}

/// A relay record within the record limits.
fn check_record(r: &RelayRecord) -> Result<(), DecodeError> {
    check_len("relay.id", r.id.len(), MAX_RELAY_ID_LEN)?;
    check_len("relay.addrs", r.addrs.len(), MAX_RELAY_ADDRS)?;
    for a in &r.addrs {
        check_len("relay.addr", a.len(), MAX_RELAY_ADDR_LEN)?;
    }
    check_len(
        "relay.fingerprint",
        r.fingerprint.len(),
        MAX_FINGERPRINT_LEN,
    )
}

fn body<'a, T: Deserialize<'a>>(ty: FrameType, b: &'a [u8]) -> Result<T, DecodeError> {
    let (v, rest) = postcard::take_from_bytes(b).map_err(|e| DecodeError::Malformed {
        ty,
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed {
            ty,
            reason: format!("{} trailing bytes", rest.len()),
        });
    }
    Ok(v)
}

/// Decodes one frame from the start of `src` without consuming it; the
/// caller advances by `consumed`. Checks the announced length against
/// [`MAX_FRAME_LEN`] before anything is allocated.
pub fn decode(src: &[u8]) -> Result<Decoded, DecodeError> {
    if src.len() < HEADER_LEN {
        return Ok(Decoded::Incomplete { needed: HEADER_LEN });
    }
    let ty_byte = src[0];
    let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]);
    if len as usize > MAX_FRAME_LEN {
        return Err(DecodeError::FrameTooLarge {
            ty: ty_byte,
            len,
            max: MAX_FRAME_LEN as u32,
        });
    }
    let total = HEADER_LEN + len as usize;
    if src.len() < total {
        return Ok(Decoded::Incomplete { needed: total });
    }
    let b = &src[HEADER_LEN..total];
    let Some(ty) = FrameType::from_u8(ty_byte) else {
        return Ok(Decoded::Unknown {
            ty: ty_byte,
            consumed: total,
        });
    };
    let frame = match ty {
        FrameType::Hello => {
            let h: Hello = body(ty, b)?;
            check_len("hello.key", h.key.len(), MAX_KEY_LEN)?;
            check_len("hello.name", h.name.len(), MAX_NAME_LEN * 4)?;
            Frame::Hello(h)
        }
        FrameType::Welcome => Frame::Welcome(body(ty, b)?),
        FrameType::Refused => Frame::Refused(body(ty, b)?),
        FrameType::Send => Frame::Send(hot::send(b)?),
        FrameType::SendAccepted => Frame::SendAccepted(hot::send_accepted(b)?),
        FrameType::SendsAccepted => Frame::SendsAccepted(hot::sends_accepted(b)?),
        FrameType::SendRefused => Frame::SendRefused(body(ty, b)?),
        FrameType::Deliver => Frame::Deliver(body(ty, b)?),
        FrameType::Deliveries => Frame::Deliveries(hot::deliveries(b)?),
        FrameType::Ack => Frame::Ack(hot::ack(b)?),
        FrameType::Ping => Frame::Ping(body(ty, b)?),
        FrameType::Pong => Frame::Pong(body(ty, b)?),
        FrameType::Goodbye => Frame::Goodbye(body(ty, b)?),
        FrameType::StreamOpen => {
            let o: StreamOpen = body(ty, b)?;
            check_len("stream_open.to", o.to.len(), MAX_NAME_LEN * 4)?;
            Frame::StreamOpen(o)
        }
        FrameType::StreamIncoming => {
            let i: StreamIncoming = body(ty, b)?;
            check_len("stream_incoming.from", i.from.len(), MAX_NAME_LEN * 4)?;
            Frame::StreamIncoming(i)
        }
        FrameType::StreamReply => Frame::StreamReply(body(ty, b)?),
        FrameType::StatusWatch => {
            let w: StatusWatch = body(ty, b)?;
            check_len("status_watch.names", w.names.len(), MAX_WATCH_NAMES)?;
            Frame::StatusWatch(w)
        }
        FrameType::StatusUpdate => Frame::StatusUpdate(hot::status_update(b)?),
        FrameType::SetStatus => {
            let s: SetStatus = body(ty, b)?;
            check_len("set_status.set", s.set.len(), MAX_STATUS_KEYS * 4)?;
            check_len("set_status.clear", s.clear.len(), MAX_STATUS_KEYS * 4)?;
            Frame::SetStatus(s)
        }
        FrameType::PeersQuery => {
            if !b.is_empty() {
                return Err(DecodeError::Malformed {
                    ty,
                    reason: "trailing bytes".into(),
                });
            }
            Frame::PeersQuery
        }
        FrameType::MeshHello => {
            let h: MeshHello = body(ty, b)?;
            check_record(&h.relay)?;
            Frame::MeshHello(h)
        }
        FrameType::MeshWelcome => {
            let w: MeshWelcome = body(ty, b)?;
            check_record(&w.relay)?;
            check_len("mesh_welcome.members", w.members.len(), RELAY_MAP_PAGE)?;
            w.members.iter().try_for_each(check_record)?;
            Frame::MeshWelcome(w)
        }
        FrameType::MeshMembers => {
            let m: RelayMap = body(ty, b)?;
            check_len("mesh_members.relays", m.relays.len(), RELAY_MAP_PAGE)?;
            m.relays.iter().try_for_each(check_record)?;
            Frame::MeshMembers(m)
        }
        FrameType::MeshMembersDelta => {
            let d: MeshMembersDelta = body(ty, b)?;
            check_len("mesh_members_delta.add", d.add.len(), RELAY_MAP_PAGE)?;
            d.add.iter().try_for_each(check_record)?;
            for id in &d.remove {
                check_len("mesh_members_delta.remove", id.len(), MAX_RELAY_ID_LEN)?;
            }
            Frame::MeshMembersDelta(d)
        }
        FrameType::Redirect => {
            let r: RelayRecord = body(ty, b)?;
            check_record(&r)?;
            Frame::Redirect(r)
        }
        FrameType::MeshForward => Frame::MeshForward(hot::mesh_forward(b)?),
        FrameType::MeshStreamOpen => Frame::MeshStreamOpen(body(ty, b)?),
        FrameType::MeshCall => {
            let c: MeshCall = body(ty, b)?;
            check_len("mesh_call.name", c.name.len(), MAX_NAME_LEN * 4)?;
            match &c.op {
                MeshOp::Ack { ids } => check_len("mesh_call.ids", ids.len(), MAX_ACK_IDS)?,
                MeshOp::SetStatus(s) => {
                    check_len("mesh_call.set", s.set.len(), MAX_STATUS_KEYS * 4)?;
                    check_len("mesh_call.clear", s.clear.len(), MAX_STATUS_KEYS * 4)?;
                }
                MeshOp::Receive { .. }
                | MeshOp::TunAssign { .. }
                | MeshOp::TunIndex
                | MeshOp::TunWho { .. } => {}
            }
            Frame::MeshCall(c)
        }
        FrameType::MeshAnswer => Frame::MeshAnswer(body(ty, b)?),
        FrameType::TunJoin => Frame::TunJoin(body(ty, b)?),
        FrameType::TunAnswer => Frame::TunAnswer(body(ty, b)?),
        FrameType::TunResolve => {
            let r: TunResolve = body(ty, b)?;
            check_len("tun_resolve.name", r.name.len(), MAX_NAME_LEN)?;
            Frame::TunResolve(r)
        }
        FrameType::TunResolved => Frame::TunResolved(body(ty, b)?),
        FrameType::PingInfo => {
            let p: PingInfo = body(ty, b)?;
            check_len("ping_info.relay", p.relay.len(), MAX_RELAY_ID_LEN)?;
            Frame::PingInfo(p)
        }
        FrameType::MeshVia => {
            let v: MeshVia = body(ty, b)?;
            check_len("mesh_via.to", v.to.len(), MAX_RELAY_ID_LEN)?;
            if v.ttl > MAX_VIA_TTL {
                return Err(DecodeError::Malformed {
                    ty,
                    reason: format!("ttl {} over {MAX_VIA_TTL}", v.ttl),
                });
            }
            Frame::MeshVia(v)
        }
        FrameType::MeshStatusQuery => {
            let q: MeshStatusQuery = body(ty, b)?;
            check_len("mesh_status_query.names", q.names.len(), MAX_WATCH_NAMES)?;
            Frame::MeshStatusQuery(q)
        }
        FrameType::MeshLeaving => {
            if !b.is_empty() {
                return Err(DecodeError::Malformed {
                    ty,
                    reason: "trailing bytes".into(),
                });
            }
            Frame::MeshLeaving
        }
        FrameType::RelayMap => {
            let m: RelayMap = body(ty, b)?;
            check_len("relay_map.relays", m.relays.len(), RELAY_MAP_PAGE)?;
            m.relays.iter().try_for_each(check_record)?;
            Frame::RelayMap(m)
        }
    };
    Ok(Decoded::Frame {
        frame,
        consumed: total,
    })
}

/// Buffers bytes read from a stream and yields whole frames; unknown frame
/// types are skipped (and counted). The owner reads into [`FrameReader::buf`].
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    skipped: u64,
    max: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    /// An empty reader of frames up to [`MAX_FRAME_LEN`].
    pub fn new() -> Self {
        Self::with_limit(MAX_FRAME_LEN)
    }

    /// An empty reader that refuses a frame body over `max` bytes (and over
    /// [`MAX_FRAME_LEN`]) from its header, before holding any of it.
    pub fn with_limit(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            skipped: 0,
            max: max.min(MAX_FRAME_LEN),
        }
    }

    /// The buffer to read stream bytes into.
    pub fn buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Number of unknown frames skipped so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Reads the preamble once at the start of the stream.
    pub fn preamble(&mut self) -> Result<Option<Preamble>, DecodeError> {
        Preamble::decode(&mut self.buf)
    }

    /// Next complete frame, `Ok(None)` if more bytes are needed. Reserves
    /// room for the announced frame (bounded by the reader's limit).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        loop {
            if let [ty, a, b, c, d, ..] = self.buf[..] {
                let len = u32::from_be_bytes([a, b, c, d]);
                if len as usize > self.max {
                    return Err(DecodeError::FrameTooLarge {
                        ty,
                        len,
                        max: self.max as u32,
                    });
                }
            }
            match decode(&self.buf)? {
                Decoded::Frame { frame, consumed } => {
                    self.buf.advance(consumed);
                    return Ok(Some(frame));
                }
                Decoded::Unknown { consumed, .. } => {
                    self.buf.advance(consumed);
                    self.skipped += 1;
                }
                Decoded::Incomplete { needed } => {
                    self.buf.reserve(needed.saturating_sub(self.buf.len()));
                    return Ok(None);
                }
            }
        }
    }

    /// Whether bytes of an unfinished frame are buffered (an EOF now would
    /// cut a frame in half).
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests;
