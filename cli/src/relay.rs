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

#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    /// Development mode: create (then reuse) a self-signed certificate in
    /// --data-dir and print its fingerprint for `swbd up --relay-fingerprint`.
    #[arg(long)]
    dev: bool,
    /// Where the relay keeps its state: held mail across restarts, and in
    /// dev mode its certificate, key and `fingerprint` file.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// API keys file (`swbd keys create` writes it). Default: <data-dir>/keys.toml.
    #[arg(long, value_name = "FILE")]
    keys: Option<PathBuf>,
    /// Address to listen on: QUIC on this UDP port, HTTPS on the same TCP port.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// TCP address of the HTTPS + JSON endpoint instead of --listen's, or `off`.
    #[arg(long, value_name = "ADDR|off", value_parser = parse_http_listen)]
    http_listen: Option<HttpListen>,
    /// Certificate chain (PEM) for production; requires --key.
    #[arg(long, value_name = "FILE", conflicts_with = "dev", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", conflicts_with = "dev", requires = "cert")]
    key: Option<PathBuf>,
    /// Extra DNS names or addresses the dev certificate is valid for
    /// (besides localhost, 127.0.0.1 and ::1). Used only when the
    /// certificate is first created.
    #[arg(long = "dev-name", value_name = "NAME", requires = "dev")]
    dev_names: Vec<String>,
    /// This relay's id: unique in a mesh (the ring places peers by it);
    /// shown to daemons and in logs.
    #[arg(
        long = "id",
        alias = "relay-id",
        value_name = "ID",
        default_value = "relay"
    )]
    relay_id: String,
    /// Another relay of the mesh to dial (`host:port`); repeat. The rest of
    /// the mesh is learned from them. Needs --mesh-key-file.
    #[arg(
        long = "mesh-peer",
        value_name = "HOST:PORT",
        requires = "mesh_key_file"
    )]
    mesh_peers: Vec<String>,
    /// The mesh's shared secret (at least 32 characters): relays prove it to
    /// each other. Makes this relay part of a mesh.
    #[arg(long, value_name = "FILE")]
    mesh_key_file: Option<PathBuf>,
    /// Address other relays and daemons reach this relay at (default: the
    /// --listen address); repeat for several.
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Vec<String>,
    /// Messages one peer's mailbox holds at most; more is refused with `mailbox_full`.
    #[arg(long, value_name = "N", default_value_t = MailboxLimits::default().messages)]
    mailbox_messages: usize,
    /// Body bytes one peer's mailbox holds at most.
    #[arg(long, value_name = "BYTES", default_value_t = MailboxLimits::default().bytes)]
    mailbox_bytes: usize,
    /// How long an undelivered message is kept before it expires.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = crate::parse_duration)]
    message_ttl: std::time::Duration,
    /// Body bytes all mailboxes of one namespace hold at most.
    #[arg(long, value_name = "BYTES", default_value_t = MailboxLimits::default().namespace_bytes)]
    namespace_bytes: usize,
    /// Connections in their handshake at once; more are refused at once and
    /// retry after their backoff (keeps a reconnect storm finishing).
    #[arg(long, value_name = "N", default_value_t = swb_relay::MAX_HANDSHAKES as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_handshakes: u64,
}

fn parse_http_listen(s: &str) -> Result<HttpListen, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(HttpListen::Off);
    }
    s.parse()
        .map(HttpListen::At)
        .map_err(|e| format!("{s:?} is not an address like 127.0.0.1:8443, or `off`: {e}"))
}

pub(crate) async fn run(a: RelayArgs) -> Result<()> {
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
    let mut config = RelayConfig::new(a.listen, identity, KeySource::File(keys_path.clone()));
    config.relay_id = a.relay_id.clone();
    config.state_dir = a.data_dir.clone();
    if let Some(h) = a.http_listen {
        config.http_listen = h;
    }
    if let Some(f) = &a.mesh_key_file {
        let key = swb_relay::mesh::MeshKey::from_file(f)?;
        let advertise = if a.advertise.is_empty() && !a.listen.ip().is_unspecified() {
            vec![a.listen.to_string()]
        } else {
            a.advertise.clone()
        };
        if advertise.is_empty() {
            bail!(
                "in a mesh, give --advertise HOST:PORT: other relays and daemons cannot dial {}",
                a.listen
            );
        }
        config.mesh = Some(swb_relay::mesh::MeshConfig {
            key,
            peers: a.mesh_peers.clone(),
            advertise,
        });
    }
    if a.mailbox_messages == 0 || a.mailbox_bytes < swb_wire::MAX_MESSAGE_BODY {
        bail!(
            "--mailbox-messages must be at least 1 and --mailbox-bytes at least {} (one largest message)",
            swb_wire::MAX_MESSAGE_BODY
        );
    }
    config.limits = MailboxLimits {
        messages: a.mailbox_messages,
        bytes: a.mailbox_bytes,
        ttl: a.message_ttl,
        namespace_bytes: a.namespace_bytes.max(a.mailbox_bytes),
        ..MailboxLimits::default()
    };
    config.max_handshakes = usize::try_from(a.max_handshakes).unwrap_or(usize::MAX);
    let handle = Relay::spawn(config).await?;
    let addr = handle.local_addr();
    let fp = handle.fingerprint().to_string();
    let shown = if addr.ip().is_unspecified() {
        format!("<this-host>:{}", addr.port())
    } else {
        addr.to_string()
    };
    println!("relay listening on {addr} (udp)");
    println!("relay id {}", a.relay_id);
    if a.mesh_key_file.is_some() {
        println!(
            "mesh: dialing {} seed relay(s); others are learned",
            a.mesh_peers.len()
        );
    }
    if let Some(h) = handle.http_addr() {
        println!("https listening on {h} (tcp): HTTP + JSON API, see /v1/openapi.json");
    }
    println!("fingerprint {fp}");
    if let Some(d) = a.data_dir.as_ref().filter(|_| a.dev) {
        println!("(also written to {})", d.join("fingerprint").display());
    }
    println!("keys file {} ({n} active)", keys_path.display());
    if let (Some(h), Some(d)) = (handle.http_addr(), a.data_dir.as_ref().filter(|_| a.dev)) {
        let host = if h.ip().is_unspecified() {
            "localhost".to_string()
        } else {
            h.ip().to_string()
        };
        println!("try the HTTP API with:");
        println!(
            "  curl --cacert {} -H \"Authorization: Bearer $SWB_API_KEY\" https://{host}:{}/v1/peers",
            d.join("relay.crt").display(),
            h.port()
        );
    }
    println!("connect a peer with:");
    if a.dev {
        println!("  SWB_API_KEY=... swbd up --relay {shown} --relay-fingerprint {fp} --name NAME");
    } else {
        println!("  SWB_API_KEY=... swbd up --relay {shown} --name NAME   (add --ca FILE if the certificate is not from a public CA)");
    }

    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    loop {
        tokio::select! {
            _ = hup.recv() => match handle.reload_keys() {
                Ok(n) => info!(keys = n, "SIGHUP: keys file re-read"),
                Err(e) => warn!("SIGHUP: keeping the previous keys: {e}"),
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    info!("shutting down: telling peers goodbye");
    handle.shutdown();
    handle.join().await;
    Ok(())
}
