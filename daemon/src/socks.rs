//! The local SOCKS5 listener: `curl --socks5-hostname 127.0.0.1:1080
//! http://london.switchboard:8080/` opens a stream to port 8080 of peer
//! `london`. Protocol parsing is in `swb-socks`; this drives it over a TCP
//! socket and maps relay refusals to SOCKS reply codes.

use crate::streams::{self, StreamError};
use crate::Shared;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use swb_socks::{self as socks, Addr, Command, Parsed, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

/// Domain suffix SOCKS destinations must carry.
pub const SUFFIX: &str = ".switchboard";
/// Time a SOCKS client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// SOCKS clients served at once; more are closed.
const MAX_CLIENTS: usize = 1024;

/// SOCKS settings of a daemon.
#[derive(Clone, PartialEq, Eq)]
pub struct SocksConfig {
    /// Where to listen (loopback by default).
    pub listen: SocketAddr,
    /// Username and password clients must give (RFC 1929), if any.
    pub auth: Option<(String, String)>,
    /// Whether failing to bind stops the daemon (an explicit `--socks`), or
    /// only logs a warning (the default address, possibly taken by another
    /// daemon on the same machine).
    pub required: bool,
}

impl std::fmt::Debug for SocksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocksConfig")
            .field("listen", &self.listen)
            .field("auth", &self.auth.as_ref().map(|(u, _)| (u, "<redacted>")))
            .field("required", &self.required)
            .finish()
    }
}

/// The SOCKS reply code for a failed stream open.
pub fn reply_for(e: &StreamError) -> Reply {
    match e.code.as_str() {
        "peer_offline" | "bad_name" => Reply::HostUnreachable,
        "port_not_exposed" | "connection_refused" => Reply::ConnectionRefused,
        "not_connected" | "relay_error" | "stopped" => Reply::NetworkUnreachable,
        "timeout" => Reply::TtlExpired,
        _ => Reply::GeneralFailure,
    }
}

/// Serves SOCKS clients until `stop`; owns their tasks.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    if tasks.len() >= MAX_CLIENTS {
                        debug!(%peer, "too many SOCKS clients; closing this one");
                        continue;
                    }
                    let span = tracing::debug_span!("socks", %peer);
                    tasks.spawn(shared.tasks.track_future(client(shared.clone(), tcp).instrument(span)));
                }
                Err(e) => {
                    debug!("SOCKS accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// How long a SOCKS client's CONNECT waits for a relay connection.
const CONNECTION_WAIT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (EMFILE and friends) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Longest SOCKS handshake message we buffer.
const MAX_SOCKS_MESSAGE: usize = 1024;

/// Why a SOCKS handshake failed (logged at debug: the client's problem).
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("{0}")]
    Parse(#[from] socks::Error),
    #[error("SOCKS message longer than {MAX_SOCKS_MESSAGE} bytes")]
    TooLong,
    #[error("client closed during the SOCKS handshake")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the client offered no acceptable authentication method")]
    NoMethod,
    #[error("wrong SOCKS username or password")]
    BadCredentials,
}

/// Reads from `tcp` into `buf` until `parse` completes; consumes the message.
async fn read_msg<T>(
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<Parsed<T>, socks::Error>,
) -> Result<T, HandshakeError> {
    loop {
        match parse(buf)? {
            Parsed::Done(v, n) => {
                buf.drain(..n);
                return Ok(v);
            }
            Parsed::Incomplete => {
                if buf.len() > MAX_SOCKS_MESSAGE {
                    return Err(HandshakeError::TooLong);
                }
                let mut chunk = [0u8; 512];
                let k = tcp.read(&mut chunk).await?;
                if k == 0 {
                    return Err(HandshakeError::Closed);
                }
                buf.extend_from_slice(&chunk[..k]);
            }
        }
    }
}

/// The handshake; on success, the target and any bytes read past it.
async fn handshake(
    tcp: &mut TcpStream,
    auth: Option<&(String, String)>,
) -> Result<Option<(String, u16, Vec<u8>)>, HandshakeError> {
    let mut buf = Vec::new();
    let greeting = read_msg(tcp, &mut buf, socks::parse_greeting).await?;
    let method = socks::choose_method(&greeting, auth.is_some());
    tcp.write_all(&socks::method_reply(method)).await?;
    if method == socks::METHOD_NOT_ACCEPTABLE {
        return Err(HandshakeError::NoMethod);
    }
    if let Some((user, pass)) = auth {
        let up = read_msg(tcp, &mut buf, socks::parse_user_pass).await?;
        let ok = socks::credentials_match(&up, user.as_bytes(), pass.as_bytes());
        tcp.write_all(&socks::auth_reply(ok)).await?;
        if !ok {
            return Err(HandshakeError::BadCredentials);
        }
    }
    let req = read_msg(tcp, &mut buf, socks::parse_request).await?;
    let refuse = |code| socks::reply(code, None);
    if req.command != Command::Connect {
        let _ = tcp.write_all(&refuse(Reply::CommandNotSupported)).await;
        return Ok(None);
    }
    let (host, port) = match req.dest {
        Addr::Domain(d, p) => (String::from_utf8_lossy(&d).to_ascii_lowercase(), p),
        Addr::Ip(_) => {
            // Only NAME.switchboard is reachable; tell the client its
            // resolver should hand us the name (socks5h / --socks5-hostname).
            let _ = tcp.write_all(&refuse(Reply::NotAllowed)).await;
            return Ok(None);
        }
    };
    let host = host.trim_end_matches('.').to_string();
    let Some(name) = host
        .strip_suffix(SUFFIX)
        .filter(|n| !n.is_empty() && !n.contains('.'))
    else {
        let _ = tcp.write_all(&refuse(Reply::NotAllowed)).await;
        return Ok(None);
    };
    Ok(Some((name.to_string(), port, buf)))
}

async fn client(shared: Arc<Shared>, mut tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    shared.metrics.socks_connections.inc();
    let _client = crate::metrics::Open::new(&shared.metrics.socks_clients);
    let auth = shared.config.socks.as_ref().and_then(|s| s.auth.as_ref());
    let target = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut tcp, auth)).await {
        Ok(Ok(Some(t))) => t,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            debug!("SOCKS handshake failed: {e}");
            return;
        }
        Err(_) => {
            debug!("SOCKS handshake timed out");
            return;
        }
    };
    let (name, port, early) = target;
    match streams::open(&shared, &name, port, CONNECTION_WAIT).await {
        Err(e) => {
            debug!(%name, port, code = %e.code, "SOCKS connect refused: {}", e.message);
            let _ = tcp.write_all(&socks::reply(reply_for(&e), None)).await;
        }
        Ok((mut send, recv)) => {
            let bound = tcp.local_addr().ok();
            if tcp
                .write_all(&socks::reply(Reply::Succeeded, bound))
                .await
                .is_err()
            {
                return;
            }
            // A client that pipelined payload after its request.
            if !early.is_empty() && send.write_all(&early).await.is_err() {
                return;
            }
            let (mut rd, mut wr) = tcp.into_split();
            let _open = crate::metrics::Open::new(&shared.metrics.streams_open);
            let s =
                crate::splice::splice(&mut rd, &mut wr, send, recv, crate::splice::Side::Caller)
                    .await;
            // A cut stream reaches the SOCKS client as a reset, not a FIN.
            crate::splice::close_tcp(rd, wr, !s.clean());
            streams::log_end(&name, port, &s);
        }
    }
}
