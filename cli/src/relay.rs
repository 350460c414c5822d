//! `swbd relay`: run a relay in the foreground until SIGINT/SIGTERM.
//! SIGHUP re-reads the keys file (it is also re-read when it changes).

use anyhow::{bail, Context, Result};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use swb_relay::keys::KeysFile;
use swb_relay::{HttpListen, Identity, KeySource, MailboxLimits, Relay, RelayConfig};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

/// The startup banner: a relay whose stdout is gone (closed pipe) serves on
/// and logs to stderr, so a failed banner line is not an error.
macro_rules! banner {
    ($($arg:tt)*) => {{
        let _ = crate::stdout_line(format_args!($($arg)*));
    }};
}

/// Default `--listen`.
const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 7443);

/// `swbd relay` flags. Every flag can also come from `--config FILE`
/// (same names with `_` for `-`; repeatable flags are lists); a flag given
/// on the command line wins over the file. Defaults apply after both.
#[derive(Debug, Default, Args)]
pub(crate) struct RelayArgs {
    /// Read settings from this TOML file (keys named as the flags, with `_`
    /// for `-`; `dev_name`, `mesh_peer` and `advertise` are lists). Unknown
    /// keys are refused. Flags override the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Development mode: create (then reuse) a self-signed certificate in
    /// --data-dir and print its fingerprint for `swbd up --relay-fingerprint`.
    #[arg(long)]
    dev: bool,
    /// Where the relay keeps its state: the durable mail store (`mail/`),
    /// and in dev mode its certificate, key and `fingerprint` file.
    /// Without it, mail lives in memory only.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// How durable accepted mail is before the sender hears `accepted`:
    /// `sync` (fsync'd: survives a power loss; concurrent sends share one
    /// flush), `process` (written to the OS: survives a killed relay), or
    /// `memory` (tests and benchmarks). [default: sync with --data-dir,
    /// memory without]
    #[arg(long, value_name = "LEVEL", value_parser = parse_durability)]
    durability: Option<swb_relay::Durability>,
    /// API keys file (`swbd keys create` writes it). Default: <data-dir>/keys.toml.
    #[arg(long, value_name = "FILE")]
    keys: Option<PathBuf>,
    /// Address to listen on: QUIC on this UDP port, HTTPS on the same TCP
    /// port. [default: 0.0.0.0:7443]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// TCP address of the HTTPS + JSON endpoint instead of --listen's, or `off`.
    #[arg(long, value_name = "ADDR|off", value_parser = parse_http_listen)]
    http_listen: Option<HttpListen>,
    /// Serve Prometheus metrics over plain HTTP at http://ADDR/metrics
    /// (keep it on a private address). Off unless given.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Certificate chain (PEM) for production; requires --key.
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Extra DNS names or addresses the dev certificate is valid for
    /// (besides localhost, 127.0.0.1 and ::1). Used only when the
    /// certificate is first created.
    #[arg(long = "dev-name", value_name = "NAME")]
    dev_names: Vec<String>,
    /// This relay's id: unique in a mesh (the ring places peers by it);
    /// shown to daemons and in logs. [default: relay]
    #[arg(long = "id", alias = "relay-id", value_name = "ID")]
    relay_id: Option<String>,
    /// Another relay of the mesh to dial (`host:port`); repeat. The rest of
    /// the mesh is learned from them. Needs --mesh-key-file.
    #[arg(long = "mesh-peer", value_name = "HOST:PORT")]
    mesh_peers: Vec<String>,
    /// The mesh's shared secret (at least 32 characters): relays prove it to
    /// each other. Makes this relay part of a mesh.
    #[arg(long, value_name = "FILE")]
    mesh_key_file: Option<PathBuf>,
    /// Address other relays and daemons reach this relay at (default: the
    /// --listen address); repeat for several.
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Vec<String>,
    /// Live relays up to which every relay links to every other; past it,
    /// each links to its row and column of a √N grid (~2√N links) and
    /// traffic between relays without a link takes two hops. [default: 1000]
    #[arg(long, value_name = "N")]
    full_mesh_max: Option<usize>,
    /// Messages one peer's mailbox holds at most; more is refused with
    /// `mailbox_full`. [default: 1000]
    #[arg(long, value_name = "N")]
    mailbox_messages: Option<usize>,
    /// Body bytes one peer's mailbox holds at most. [default: 4194304]
    #[arg(long, value_name = "BYTES")]
    mailbox_bytes: Option<usize>,
    /// How long an undelivered message is kept before it expires. [default: 24h]
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    message_ttl: Option<std::time::Duration>,
    /// Least time between two published status changes of one peer;
    /// changes in between coalesce into the newest (watchers get that).
    /// `0`: publish every change at once. [default: 50ms]
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    status_interval: Option<std::time::Duration>,
    /// Body bytes all mailboxes of one namespace hold at most. [default: 268435456]
    #[arg(long, value_name = "BYTES")]
    namespace_bytes: Option<usize>,
    /// Connections in their handshake at once; more are refused at once and
    /// retry after their backoff (keeps a reconnect storm finishing). [default: 1024]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_handshakes: Option<u64>,
    /// Threads (at nice +10) that compute TLS handshakes, away from the
    /// workers carrying established sessions; 0: on the workers. [default: 1]
    #[arg(long, value_name = "N")]
    handshake_threads: Option<usize>,
    /// QUIC endpoints sharing the UDP port (SO_REUSEPORT), each with its own
    /// packet-processing task; connections stay with their shard when
    /// clients move. 1 to 64. [default: 1]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=swb_relay::MAX_SHARDS as u64))]
    shards: Option<u64>,
    /// Handshakes in flight above which a connection from an unproven
    /// address first gets a QUIC Retry (spoofed sources cannot hold
    /// handshake slots); 0: always. [default: 64]
    #[arg(long, value_name = "N")]
    retry_above: Option<u64>,
    /// New connections per second from one source address (bursts of ten
    /// times that); more are refused at once. 0: no limit. [default: 50]
    #[arg(long, value_name = "N")]
    connections_per_ip: Option<u64>,
    /// Messages one API key may send per second, all its daemons and HTTP
    /// together (bursts of twice that); more are refused with
    /// `rate_limited`. 0: no limit. [default: 50000]
    #[arg(long, value_name = "N")]
    key_send_rate: Option<u64>,
    /// HTTP requests one API key may make per second (bursts of twice
    /// that); more get `429 rate_limited`. 0: no limit. [default: 1000]
    #[arg(long, value_name = "N")]
    key_http_rate: Option<u64>,
    /// OCSP stapling: `auto` staples when the certificate (with its issuer
    /// in the --cert file) names a responder; `always` also refuses to
    /// serve a revoked certificate; `must` serves only with a current good
    /// staple; `never`. [default: auto]
    #[arg(long, value_name = "MODE")]
    ocsp: Option<swb_relay::OcspMode>,
    /// The IPv4 range TUN addresses come from (every namespace gets all of
    /// it); the same on every relay of a mesh. [default: 100.64.0.0/10]
    #[arg(long, value_name = "CIDR", value_parser = parse_tun_range)]
    tun_range: Option<(std::net::Ipv4Addr, u8)>,
    /// The OCSP responder (http://…) to ask instead of the one the
    /// certificate names.
    #[arg(long, value_name = "URL")]
    ocsp_responder: Option<String>,
}

/// `swbd relay --config FILE`: the flags as TOML.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RelayFile {
    #[serde(default)]
    dev: bool,
    data_dir: Option<PathBuf>,
    durability: Option<String>,
    keys: Option<PathBuf>,
    listen: Option<SocketAddr>,
    http_listen: Option<String>,
    metrics: Option<SocketAddr>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default)]
    dev_name: Vec<String>,
    id: Option<String>,
    #[serde(default)]
    mesh_peer: Vec<String>,
    mesh_key_file: Option<PathBuf>,
    #[serde(default)]
    advertise: Vec<String>,
    full_mesh_max: Option<usize>,
    mailbox_messages: Option<usize>,
    mailbox_bytes: Option<usize>,
    message_ttl: Option<String>,
    status_interval: Option<String>,
    namespace_bytes: Option<usize>,
    max_handshakes: Option<u64>,
    handshake_threads: Option<usize>,
    shards: Option<u64>,
    retry_above: Option<u64>,
    connections_per_ip: Option<u64>,
    key_send_rate: Option<u64>,
    key_http_rate: Option<u64>,
    ocsp: Option<String>,
    ocsp_responder: Option<String>,
    tun_range: Option<String>,
}

impl RelayFile {
    /// Parses a config file's text; errors name the key and the line.
    pub(crate) fn parse(text: &str, path: &std::path::Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))
    }
}

/// Fills what the flags left open from `--config`, resolving relative
/// paths in the file against the file's directory.
fn merge_file(a: &mut RelayArgs) -> Result<()> {
    let Some(path) = a.config.clone() else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read --config {}", path.display()))?;
    let f = RelayFile::parse(&text, &path)?;
    let base = path.parent().unwrap_or(std::path::Path::new("."));
    let rel = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
    let bad = |key: &str, e: String| anyhow::anyhow!("--config {}: {key}: {e}", path.display());
    a.dev |= f.dev;
    a.data_dir = a.data_dir.take().or(f.data_dir.map(rel));
    if a.durability.is_none() {
        a.durability = f
            .durability
            .as_deref()
            .map(parse_durability)
            .transpose()
            .map_err(|e| bad("durability", e))?;
    }
    a.keys = a.keys.take().or(f.keys.map(rel));
    a.listen = a.listen.or(f.listen);
    if a.http_listen.is_none() {
        a.http_listen = f
            .http_listen
            .as_deref()
            .map(parse_http_listen)
            .transpose()
            .map_err(|e| bad("http_listen", e))?;
    }
    a.metrics = a.metrics.or(f.metrics);
    a.cert = a.cert.take().or(f.cert.map(rel));
    a.key = a.key.take().or(f.key.map(rel));
    if a.dev_names.is_empty() {
        a.dev_names = f.dev_name;
    }
    a.relay_id = a.relay_id.take().or(f.id);
    if a.mesh_peers.is_empty() {
        a.mesh_peers = f.mesh_peer;
    }
    a.mesh_key_file = a.mesh_key_file.take().or(f.mesh_key_file.map(rel));
    if a.advertise.is_empty() {
        a.advertise = f.advertise;
    }
    a.full_mesh_max = a.full_mesh_max.or(f.full_mesh_max);
    a.mailbox_messages = a.mailbox_messages.or(f.mailbox_messages);
    a.mailbox_bytes = a.mailbox_bytes.or(f.mailbox_bytes);
    if a.message_ttl.is_none() {
        a.message_ttl = f
            .message_ttl
            .as_deref()
            .map(crate::parse_duration)
            .transpose()
            .map_err(|e| bad("message_ttl", e))?;
    }
    if a.status_interval.is_none() {
        a.status_interval = f
            .status_interval
            .as_deref()
            .map(crate::parse_duration)
            .transpose()
            .map_err(|e| bad("status_interval", e))?;
    }
    a.namespace_bytes = a.namespace_bytes.or(f.namespace_bytes);
    if a.max_handshakes.is_none() {
        if f.max_handshakes == Some(0) {
            return Err(bad("max_handshakes", "must be at least 1".into()));
        }
        a.max_handshakes = f.max_handshakes;
    }
    a.handshake_threads = a.handshake_threads.or(f.handshake_threads);
    if a.shards.is_none() {
        if let Some(n) = f.shards {
            if n == 0 || n > swb_relay::MAX_SHARDS as u64 {
                return Err(bad(
                    "shards",
                    format!("must be 1 to {}", swb_relay::MAX_SHARDS),
                ));
            }
            a.shards = Some(n);
        }
    }
    a.retry_above = a.retry_above.or(f.retry_above);
    a.connections_per_ip = a.connections_per_ip.or(f.connections_per_ip);
    a.key_send_rate = a.key_send_rate.or(f.key_send_rate);
    a.key_http_rate = a.key_http_rate.or(f.key_http_rate);
    if a.ocsp.is_none() {
        if let Some(m) = &f.ocsp {
            a.ocsp = Some(m.parse().map_err(|e| bad("ocsp", e))?);
        }
    }
    a.ocsp_responder = a.ocsp_responder.take().or(f.ocsp_responder);
    if a.tun_range.is_none() {
        a.tun_range = f
            .tun_range
            .as_deref()
            .map(parse_tun_range)
            .transpose()
            .map_err(|e| bad("tun_range", e))?;
    }
    Ok(())
}

fn parse_tun_range(s: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    swb_tunnel::addr::parse_range(s).map_err(|e| e.to_string())
}

/// Checks combinations the flags and the file must agree on.
fn check(a: &RelayArgs) -> Result<()> {
    if a.dev && (a.cert.is_some() || a.key.is_some()) {
        bail!("--dev makes its own certificate: give either --dev or --cert/--key, not both");
    }
    if a.cert.is_some() != a.key.is_some() {
        bail!("--cert and --key go together: the certificate chain and its private key (PEM)");
    }
    if !a.dev && !a.dev_names.is_empty() {
        bail!("--dev-name only makes sense with --dev");
    }
    if !a.mesh_peers.is_empty() && a.mesh_key_file.is_none() {
        bail!(
            "--mesh-peer needs --mesh-key-file: relays of a mesh prove the mesh key to each other"
        );
    }
    Ok(())
}

fn parse_durability(s: &str) -> Result<swb_relay::Durability, String> {
    s.parse()
}

fn parse_http_listen(s: &str) -> Result<HttpListen, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(HttpListen::Off);
    }
    s.parse()
        .map(HttpListen::At)
        .map_err(|e| format!("{s:?} is not an address like 127.0.0.1:8443, or `off`: {e}"))
}

pub(crate) async fn run(mut a: RelayArgs) -> Result<()> {
    merge_file(&mut a)?;
    check(&a)?;
    let listen = a.listen.unwrap_or(DEFAULT_LISTEN);
    let relay_id = a.relay_id.clone().unwrap_or_else(|| "relay".to_string());
    let defaults = MailboxLimits::default();
    let mailbox_messages = a.mailbox_messages.unwrap_or(defaults.messages);
    let mailbox_bytes = a.mailbox_bytes.unwrap_or(defaults.bytes);
    let identity = if a.dev {
        let Some(dir) = &a.data_dir else {
            bail!(
                "--dev needs --data-dir DIR to keep its certificate in (it is created if missing)"
            );
        };
        Identity::dev_in_dir(dir, &a.dev_names)?
    } else {
        match (&a.cert, &a.key) {
            (Some(c), Some(k)) => Identity::from_pem_files(c, k)?,
            _ => bail!(
                "a relay needs --cert FILE --key FILE (PEM), or --dev --data-dir DIR for a self-signed development certificate"
            ),
        }
    };
    let keys_path = match (&a.keys, &a.data_dir) {
        (Some(k), _) => k.clone(),
        (None, Some(d)) => d.join("keys.toml"),
        (None, None) => bail!("--keys FILE is required (create keys with `swbd keys create --keys FILE --namespace NS`)"),
    };
    let n = KeysFile::load(&keys_path)
        .with_context(|| "cannot start the relay".to_string())?
        .keys
        .iter()
        .filter(|k| !k.revoked)
        .count();
    if n == 0 {
        warn!(
            keys = %keys_path.display(),
            "no active API keys yet; create one with `swbd keys create --keys {} --namespace NS` (the relay picks it up)",
            keys_path.display()
        );
    }
    let mut config = RelayConfig::new(listen, identity, KeySource::File(keys_path.clone()));
    config.relay_id = relay_id.clone();
    config.state_dir = a.data_dir.clone();
    config.durability = a.durability;
    if a.durability
        .is_some_and(|d| d != swb_relay::Durability::Memory)
        && a.data_dir.is_none()
    {
        bail!(
            "--durability {} needs --data-dir DIR for the mail store",
            a.durability.map_or("", |d| d.as_str())
        );
    }
    config.metrics_listen = a.metrics;
    if let Some(r) = a.tun_range {
        config.tun_range = r;
    }
    if let Some(h) = a.http_listen {
        config.http_listen = h;
    }
    if let Some(f) = &a.mesh_key_file {
        let key = swb_relay::mesh::MeshKey::from_file(f)?;
        let advertise = if a.advertise.is_empty() && !listen.ip().is_unspecified() {
            vec![listen.to_string()]
        } else {
            a.advertise.clone()
        };
        if advertise.is_empty() {
            bail!(
                "in a mesh, give --advertise HOST:PORT: other relays and daemons cannot dial {}",
                listen
            );
        }
        let full_mesh_max = a.full_mesh_max.unwrap_or(swb_relay::mesh::FULL_MESH_MAX);
        if full_mesh_max < 2 {
            bail!("--full-mesh-max must be at least 2");
        }
        config.mesh = Some(swb_relay::mesh::MeshConfig {
            key,
            peers: a.mesh_peers.clone(),
            advertise,
            full_mesh_max,
        });
    }
    if mailbox_messages == 0 || mailbox_bytes < swb_relay::LARGEST_HELD {
        bail!(
            "--mailbox-messages must be at least 1 and --mailbox-bytes at least {} (one largest message with its sender and bookkeeping)",
            swb_relay::LARGEST_HELD
        );
    }
    config.limits = MailboxLimits {
        messages: mailbox_messages,
        bytes: mailbox_bytes,
        ttl: a.message_ttl.unwrap_or(defaults.ttl),
        namespace_bytes: a
            .namespace_bytes
            .unwrap_or(defaults.namespace_bytes)
            .max(mailbox_bytes),
        ..defaults
    };
    if let Some(i) = a.status_interval {
        if i > std::time::Duration::from_secs(60) {
            bail!("--status-interval is at most 60s (watchers wait that long for a change); got {i:?}");
        }
        config.status_interval = i;
    }
    config.max_handshakes = a.max_handshakes.map_or(swb_relay::MAX_HANDSHAKES, |n| {
        usize::try_from(n).unwrap_or(usize::MAX)
    });
    if let Some(n) = a.handshake_threads {
        config.handshake_threads = n;
    }
    if let Some(n) = a.shards {
        config.shards = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(n) = a.retry_above {
        config.retry_above = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(n) = a.connections_per_ip {
        config.connections_per_ip =
            (n > 0).then(|| swb_relay::limits::Rate::new(n as f64, 10.0 * n as f64));
    }
    let per_key = |n: u64| (n > 0).then(|| swb_relay::limits::Rate::new(n as f64, 2.0 * n as f64));
    if let Some(n) = a.key_send_rate {
        config.key_send_rate = per_key(n);
    }
    if let Some(n) = a.key_http_rate {
        config.key_http_rate = per_key(n);
    }
    config.ocsp = swb_relay::OcspConfig {
        mode: a.ocsp.unwrap_or_default(),
        responder: a.ocsp_responder.clone(),
    };
    let handle = Relay::spawn(config).await?;
    let addr = handle.local_addr();
    let fp = handle.fingerprint().to_string();
    let shown = if addr.ip().is_unspecified() {
        format!("<this-host>:{}", addr.port())
    } else {
        addr.to_string()
    };
    banner!("relay listening on {addr} (udp)");
    banner!("relay id {relay_id}");
    banner!("mail durability {}", handle.durability().as_str());
    if a.mesh_key_file.is_some() {
        banner!(
            "mesh: dialing {} seed relay(s); others are learned",
            a.mesh_peers.len()
        );
    }
    if let Some(h) = handle.http_addr() {
        banner!("https listening on {h} (tcp): HTTP + JSON API, see /v1/openapi.json");
    }
    if let Some(m) = handle.metrics_addr() {
        banner!("metrics on http://{m}/metrics (Prometheus text format)");
    }
    banner!("fingerprint {fp}");
    if let Some(d) = a.data_dir.as_ref().filter(|_| a.dev) {
        banner!("(also written to {})", d.join("fingerprint").display());
    }
    banner!("keys file {} ({n} active)", keys_path.display());
    if let (Some(h), Some(d)) = (handle.http_addr(), a.data_dir.as_ref().filter(|_| a.dev)) {
        let host = if h.ip().is_unspecified() {
            "localhost".to_string()
        } else {
            h.ip().to_string()
        };
        banner!("try the HTTP API with:");
        banner!(
            "  curl --cacert {} -H \"Authorization: Bearer $SWB_API_KEY\" https://{host}:{}/v1/peers",
            d.join("relay.crt").display(),
            h.port()
        );
    }
    banner!("connect a peer with:");
    if a.dev {
        banner!("  SWB_API_KEY=... swbd up --relay {shown} --relay-fingerprint {fp} --name NAME");
    } else {
        banner!("  SWB_API_KEY=... swbd up --relay {shown} --name NAME   (add --ca FILE if the certificate is not from a public CA)");
    }

    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let serving = format!("relay {relay_id} listening on {addr}");
    crate::service::ready(&serving);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                crate::service::reloading();
                match handle.reload_keys() {
                    Ok(n) => info!(keys = n, "SIGHUP: keys file re-read"),
                    Err(e) => warn!("SIGHUP: keeping the previous keys: {e}"),
                }
                crate::service::ready(&serving);
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    crate::service::stopping();
    info!("shutting down: telling peers goodbye");
    handle.shutdown();
    handle.join().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::path::Path;

    /// `swbd relay` flags alone, for parsing in tests.
    #[derive(Debug, Parser)]
    struct Only {
        #[command(flatten)]
        a: RelayArgs,
    }

    /// The ```toml block whose first line is `first`.
    fn toml_block(text: &str, first: &str) -> String {
        let open = format!("```toml\n{first}\n");
        let start = text.find(&open).expect("the block in README") + "```toml\n".len();
        let close = text[start..].find("```").expect("end of the block");
        text[start..start + close].to_string()
    }

    #[test]
    fn the_readme_and_the_packaged_example_configs_load() {
        let readme = include_str!("../../README.md");
        let block = toml_block(readme, "# relay.toml");
        let f = RelayFile::parse(&block, Path::new("README.md")).expect("README relay.toml");
        assert!(f.listen.is_some() && f.metrics.is_some(), "{f:?}");
        let example = include_str!("../../dist/examples/relay.toml");
        RelayFile::parse(example, Path::new("relay.toml")).expect("dist/examples/relay.toml");
    }

    #[test]
    fn unknown_keys_are_refused_with_key_and_line() {
        let e = RelayFile::parse("dev = true\n\nlisen = \"x\"\n", Path::new("r.toml"))
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("lisen") && e.contains("line 3"), "{e}");
        assert!(e.contains("listen"), "the known keys are suggested: {e}");
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            "id = \"file\"\nmailbox_messages = 7\nmessage_ttl = \"2h\"\nstatus_interval = \"10ms\"\nmesh_peer = [\"a:1\"]\nkeys = \"k.toml\"\n",
        )
        .expect("write");
        let mut a = Only::parse_from([
            "relay",
            "--config",
            path.to_str().expect("utf-8"),
            "--id",
            "flag",
            "--mesh-peer",
            "b:2",
        ])
        .a;
        merge_file(&mut a).expect("merge");
        assert_eq!(a.relay_id.as_deref(), Some("flag"));
        assert_eq!(a.mailbox_messages, Some(7));
        assert_eq!(a.message_ttl, Some(std::time::Duration::from_secs(7200)));
        assert_eq!(
            a.status_interval,
            Some(std::time::Duration::from_millis(10))
        );
        assert_eq!(a.mesh_peers, vec!["b:2".to_string()]);
        assert_eq!(
            a.keys,
            Some(dir.path().join("k.toml")),
            "relative to the file"
        );
        assert_eq!(a.listen, None, "left to the default");
    }
}
