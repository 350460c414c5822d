//! A minimal NATS client for the benchmark baselines: CONNECT, SUB, PUB,
//! MSG, PING/PONG over TCP or TLS (nats-server 2.9 sends INFO in plain text
//! and upgrades to TLS after it). Enough for request/reply, pub/sub and
//! JetStream's API, publish acks and consumer acks (all plain subjects);
//! not a general client.
//!
//! The server is `nats-server` on the PATH, or `$SWB_NATS_SERVER`.

use anyhow::{bail, Context, Result};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// The reading half: messages as they come.
pub(crate) struct NatsRx {
    rd: BufReader<ReadHalf<Box<dyn Io>>>,
    line: String,
    /// PONGs owed to the server (answered by the writer side).
    pub(crate) pings: usize,
}

/// The writing half.
pub(crate) struct NatsTx {
    wr: WriteHalf<Box<dyn Io>>,
    buf: Vec<u8>,
}

/// One received message.
pub(crate) struct Msg {
    pub(crate) reply: Option<String>,
    pub(crate) payload: Vec<u8>,
}

/// Connects and subscribes to `subject`; returns once the server answered
/// a PING sent after the SUB, so the subscription is in effect.
pub(crate) async fn subscribed(
    addr: std::net::SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    subject: &str,
) -> Result<(NatsTx, NatsRx)> {
    let (mut tx, mut rx) = connect(addr, tls).await?;
    tx.sub(subject, 1);
    tx.ping();
    tx.flush().await?;
    rx.until_pong().await?;
    Ok((tx, rx))
}

/// Connects (with `tls`, upgrading after INFO) and says CONNECT.
pub(crate) async fn connect(
    addr: std::net::SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(NatsTx, NatsRx)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    // INFO arrives in plain text, byte by byte so nothing past it is lost.
    let mut tcp = tcp;
    let mut info = Vec::new();
    loop {
        let b = tcp.read_u8().await?;
        info.push(b);
        if info.ends_with(b"\r\n") {
            break;
        }
        if info.len() > 64 * 1024 {
            bail!("INFO too long");
        }
    }
    if !info.starts_with(b"INFO ") {
        bail!("not a NATS server");
    }
    let io: Box<dyn Io> = match tls {
        None => Box::new(tcp),
        Some(cfg) => {
            let c = tokio_rustls::TlsConnector::from(cfg);
            let name = rustls::pki_types::ServerName::try_from("localhost")?.to_owned();
            Box::new(c.connect(name, tcp).await.context("NATS TLS handshake")?)
        }
    };
    let (r, w) = tokio::io::split(io);
    let mut tx = NatsTx {
        wr: w,
        buf: Vec::new(),
    };
    let mut rx = NatsRx {
        rd: BufReader::new(r),
        line: String::new(),
        pings: 0,
    };
    tx.raw(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false}\r\nPING\r\n");
    tx.flush().await?;
    loop {
        rx.line.clear();
        if rx.rd.read_line(&mut rx.line).await? == 0 {
            bail!("NATS closed during CONNECT");
        }
        if rx.line.starts_with("PONG") {
            break;
        }
        if rx.line.starts_with("-ERR") {
            bail!("NATS: {}", rx.line.trim());
        }
    }
    Ok((tx, rx))
}

impl NatsTx {
    fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    /// Queues SUB.
    pub(crate) fn sub(&mut self, subject: &str, sid: u32) {
        self.raw(format!("SUB {subject} {sid}\r\n").as_bytes());
    }

    /// Queues PUB.
    pub(crate) fn publish(&mut self, subject: &str, reply: Option<&str>, payload: &[u8]) {
        let head = match reply {
            Some(r) => format!("PUB {subject} {r} {}\r\n", payload.len()),
            None => format!("PUB {subject} {}\r\n", payload.len()),
        };
        self.raw(head.as_bytes());
        self.raw(payload);
        self.raw(b"\r\n");
    }

    /// Queues a PING (answered by PONG once everything before it was processed).
    pub(crate) fn ping(&mut self) {
        self.raw(b"PING\r\n");
    }

    /// Queues a PONG.
    pub(crate) fn pong(&mut self) {
        self.raw(b"PONG\r\n");
    }

    /// Writes what is queued.
    pub(crate) async fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.wr.write_all(&self.buf).await?;
            self.buf.clear();
        }
        self.wr.flush().await?;
        Ok(())
    }
}

impl NatsRx {
    /// Whether more of the server's output is already read (a consumer
    /// flushes its acks when it has caught up).
    pub(crate) fn has_buffered(&self) -> bool {
        !self.rd.buffer().is_empty()
    }

    /// Waits for the server's PONG: everything sent before our PING (a SUB)
    /// is in effect. Only for use before any message can arrive.
    pub(crate) async fn until_pong(&mut self) -> Result<()> {
        loop {
            self.line.clear();
            if self.rd.read_line(&mut self.line).await? == 0 {
                bail!("NATS closed the connection");
            }
            match self.line.trim_end() {
                "PONG" => return Ok(()),
                "PING" => self.pings += 1,
                l if l.starts_with("-ERR") => bail!("NATS: {l}"),
                _ => {}
            }
        }
    }

    /// The next message (PINGs are counted in `pings` for the writer).
    pub(crate) async fn next(&mut self) -> Result<Msg> {
        loop {
            self.line.clear();
            if self.rd.read_line(&mut self.line).await? == 0 {
                bail!("NATS closed the connection");
            }
            let l = self.line.trim_end();
            if l == "PING" {
                self.pings += 1;
                continue;
            }
            if l.starts_with("+OK") || l == "PONG" || l.starts_with("INFO") {
                continue;
            }
            if l.starts_with("-ERR") {
                bail!("NATS: {l}");
            }
            let parts: Vec<&str> = l.split_whitespace().collect();
            if parts.first() != Some(&"MSG") {
                bail!("unexpected NATS line {l:?}");
            }
            let (reply, len) = match parts.len() {
                4 => (None, parts[3]),
                5 => (Some(parts[3].to_string()), parts[4]),
                _ => bail!("bad MSG line {l:?}"),
            };
            let len: usize = len.parse()?;
            let mut payload = vec![0u8; len + 2];
            self.rd.read_exact(&mut payload).await?;
            payload.truncate(len);
            return Ok(Msg { reply, payload });
        }
    }
}

/// A running `nats-server` on a random loopback port.
pub(crate) struct NatsServer {
    pub(crate) addr: std::net::SocketAddr,
    child: tokio::process::Child,
    /// Drains the server's log so it never blocks on it; ends with this.
    drain: tokio::task::JoinHandle<()>,
}

impl NatsServer {
    /// The server's process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        self.drain.abort();
    }
}

/// The nats-server program: `$SWB_NATS_SERVER`, else `nats-server`.
pub(crate) fn server_bin() -> String {
    std::env::var("SWB_NATS_SERVER")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "nats-server".into())
}

/// The server's version (`nats-server --version`: `nats-server: v2.9.10`).
pub(crate) async fn server_version() -> Result<(u32, u32, u32)> {
    let out = tokio::process::Command::new(server_bin())
        .arg("--version")
        .output()
        .await
        .context("cannot run nats-server (apt-get install nats-server)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v'))
        .with_context(|| format!("no version in {text:?}"))?;
    let mut n = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    Ok((
        n.next().unwrap_or(0),
        n.next().unwrap_or(0),
        n.next().unwrap_or(0),
    ))
}

/// Starts nats-server (with TLS from these PEM files, if given).
pub(crate) async fn start_server(
    tls: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<NatsServer> {
    spawn_server(tls, None).await
}

/// Starts nats-server with JetStream storing in `store` (file storage),
/// TLS from these PEM files. `sync_always`: `sync_interval: always` (an
/// fsync per write; nats-server 2.10 or later), else JetStream's default
/// (written to the OS, synced every two minutes).
pub(crate) async fn start_jetstream(
    store: &std::path::Path,
    tls: (&std::path::Path, &std::path::Path),
    sync_always: bool,
) -> Result<NatsServer> {
    std::fs::create_dir_all(store)?;
    let conf = store.join("nats.conf");
    let mut text = format!(
        "jetstream {{\n  store_dir: {:?}\n",
        store.display().to_string()
    );
    if sync_always {
        text.push_str("  sync_interval: always\n");
    }
    text.push_str("}\n");
    std::fs::write(&conf, text)?;
    spawn_server(Some(tls), Some(&conf)).await
}

async fn spawn_server(
    tls: Option<(&std::path::Path, &std::path::Path)>,
    conf: Option<&std::path::Path>,
) -> Result<NatsServer> {
    let mut cmd = tokio::process::Command::new(server_bin());
    if let Some(c) = conf {
        cmd.arg("-c").arg(c);
    }
    cmd.args(["-a", "127.0.0.1", "-p", "-1"]);
    if let Some((cert, key)) = tls {
        cmd.arg("--tls")
            .arg("--tlscert")
            .arg(cert)
            .arg("--tlskey")
            .arg(key);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run nats-server (apt-get install nats-server)")?;
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let addr = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut last = String::new();
        while let Some(l) = lines.next_line().await? {
            if let Some(rest) = l.split("Listening for client connections on ").nth(1) {
                return Ok(rest.trim().parse::<std::net::SocketAddr>()?);
            }
            last = l;
        }
        bail!("nats-server exited: {last}")
    })
    .await
    .context("nats-server did not start")??;
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(NatsServer { addr, child, drain })
}
