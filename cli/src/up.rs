//! `swbd up`: run the daemon in the foreground until SIGINT/SIGTERM, or
//! until the relay refuses it for good (bad or revoked key, name taken over).
//! SIGHUP re-reads `--config` and applies its `expose` list without a
//! reconnect (ports given as flags win). Under systemd (`Type=notify`) it
//! reports ready once it first reached its relay, and its state as status.

use crate::Output;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use swb_daemon::{
    ApiKey, ConnState, Daemon, DaemonConfig, DaemonError, Exposure, SocksConfig, Trust,
};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    /// Read settings from this TOML file (keys as the long flags, with `_`
    /// for `-`; `relay` and `expose` are lists). Flags override the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Relay address `HOST[:PORT]` (port 7443 if omitted). Repeat to give
    /// fallbacks, tried in order.
    #[arg(long = "relay", value_name = "HOST:PORT")]
    relays: Vec<String>,
    /// Accept exactly the relay certificate with this SHA-256 fingerprint
    /// (`sha256:HEX`, as `swbd relay --dev` prints). For dev relays.
    #[arg(long, value_name = "sha256:HEX", conflicts_with = "ca")]
    relay_fingerprint: Option<String>,
    /// Verify the relay's certificate chain against the CA certificates in
    /// this PEM file instead of the system roots.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// TLS name to verify the relay as, when it differs from the --relay host.
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// The relay's stapled OCSP response: `check` refuses a certificate it
    /// says is revoked (and a Must-Staple one without a good staple);
    /// `require` accepts only a current good staple; `off`. [default: check]
    #[arg(long, value_name = "POLICY")]
    ocsp: Option<swb_daemon::OcspPolicy>,
    /// This peer's name in the namespace: a DNS label (letters, digits, '-').
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Read the API key from this file instead of the SWB_API_KEY variable.
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Accept streams from peers for this port: `22` forwards to
    /// 127.0.0.1:22, `8080=HOST:PORT` elsewhere. Repeat for more ports; all
    /// other ports are refused.
    #[arg(long, value_name = "PORT[=HOST:PORT]", value_parser = parse_exposure)]
    expose: Vec<Exposure>,
    /// Local SOCKS5 listener for reaching peers as NAME.switchboard:PORT
    /// (default 127.0.0.1:1080), or `off`.
    #[arg(long, value_name = "ADDR|off")]
    socks: Option<String>,
    /// Require this SOCKS username; the password comes from the
    /// SWB_SOCKS_PASSWORD variable.
    #[arg(long, value_name = "USER")]
    socks_user: Option<String>,
    /// Serve Prometheus metrics over plain HTTP at http://ADDR/metrics
    /// (keep it on a private address). Off unless given.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// How long a stream to an exposed port waits for its service to
    /// accept (a busy service's listen backlog); like a direct TCP client.
    /// [default: 127s]
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    connect_timeout: Option<std::time::Duration>,
    /// How often the daemon makes sure its relay is there when nothing else
    /// is sent (a QUIC PING; it also keeps NAT mappings open). Shorter finds
    /// a dead relay sooner and costs the relay more packets. [default: 2s]
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    keepalive: Option<std::time::Duration>,
    /// After this much silence from the relay, move to a new UDP socket and
    /// ask the next relay on the ring whether it is home now (a crashed
    /// relay's peers re-home in about this time). More than --keepalive,
    /// less than the 12 s idle timeout. [default: 3s]
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    silence_probe: Option<std::time::Duration>,
    /// How QUIC packets reach the relay: `udp`; `tcp` (inside TLS to the
    /// relay's HTTPS port, through HTTPS_PROXY if set); or `auto`: UDP, and
    /// the TCP carrier when UDP does not answer within 300 ms, back to UDP
    /// when it does — the same connection throughout. [default: auto]
    #[arg(long, value_name = "udp|tcp|auto", value_parser = parse_transport)]
    transport: Option<swb_daemon::Transport>,
    /// TUN mode: a virtual interface with this peer's address in its
    /// namespace (IPv4 from 100.64.0.0/10, IPv6 from a ULA /64), so any IP
    /// program reaches other TUN peers. Needs root or CAP_NET_ADMIN. Peers
    /// reach only the --expose ports and ping, unless --tun-allow-all.
    #[arg(long)]
    tun: bool,
    /// The TUN interface's name. [default: swb0]
    #[arg(long, value_name = "NAME", requires = "tun")]
    tun_name: Option<String>,
    /// With --tun, let peers reach every port of this machine over the
    /// interface, not just the exposed ones.
    #[arg(long, requires = "tun")]
    tun_allow_all: bool,
}

/// `swbd up --config FILE`: the same settings as the flags.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UpFile {
    #[serde(default)]
    relay: Vec<String>,
    relay_fingerprint: Option<String>,
    ca: Option<PathBuf>,
    server_name: Option<String>,
    ocsp: Option<String>,
    name: Option<String>,
    api_key_file: Option<PathBuf>,
    control: Option<PathBuf>,
    #[serde(default)]
    expose: Vec<String>,
    socks: Option<String>,
    socks_user: Option<String>,
    metrics: Option<std::net::SocketAddr>,
    connect_timeout: Option<String>,
    keepalive: Option<String>,
    silence_probe: Option<String>,
    transport: Option<String>,
    #[serde(default)]
    tun: bool,
    tun_name: Option<String>,
    #[serde(default)]
    tun_allow_all: bool,
}

/// Fills what the flags left open from `--config`; returns the control
/// path the file names, if any.
fn merge_file(a: &mut UpArgs) -> Result<Option<PathBuf>> {
    let Some(path) = a.config.clone() else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read --config {}", path.display()))?;
    let f: UpFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("--config {} is not valid: {e}", path.display()))?;
    if a.relays.is_empty() {
        a.relays = f.relay;
    }
    if a.relay_fingerprint.is_none() && a.ca.is_none() {
        a.relay_fingerprint = f.relay_fingerprint;
        a.ca = f.ca;
    }
    a.server_name = a.server_name.take().or(f.server_name);
    if a.ocsp.is_none() {
        if let Some(p) = &f.ocsp {
            a.ocsp = Some(
                p.parse()
                    .map_err(|e| anyhow::anyhow!("--config {}: ocsp: {e}", path.display()))?,
            );
        }
    }
    a.name = a.name.take().or(f.name);
    a.api_key_file = a.api_key_file.take().or(f.api_key_file);
    if a.expose.is_empty() {
        a.expose = f
            .expose
            .iter()
            .map(|e| e.parse::<Exposure>())
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("--config {}: expose: {e}", path.display()))?;
    }
    a.socks = a.socks.take().or(f.socks);
    a.socks_user = a.socks_user.take().or(f.socks_user);
    a.metrics = a.metrics.or(f.metrics);
    if a.connect_timeout.is_none() {
        a.connect_timeout = f
            .connect_timeout
            .as_deref()
            .map(crate::parse_duration)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--config {}: connect_timeout: {e}", path.display()))?;
    }
    let duration = |v: &Option<String>, key: &str| {
        v.as_deref()
            .map(crate::parse_duration)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--config {}: {key}: {e}", path.display()))
    };
    if a.keepalive.is_none() {
        a.keepalive = duration(&f.keepalive, "keepalive")?;
    }
    if a.silence_probe.is_none() {
        a.silence_probe = duration(&f.silence_probe, "silence_probe")?;
    }
    if a.transport.is_none() {
        a.transport = f
            .transport
            .as_deref()
            .map(parse_transport)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--config {}: transport: {e}", path.display()))?;
    }
    a.tun |= f.tun;
    a.tun_name = a.tun_name.take().or(f.tun_name);
    a.tun_allow_all |= f.tun_allow_all;
    if a.relay_fingerprint.is_some() && a.ca.is_some() {
        bail!("give either relay_fingerprint or ca, not both");
    }
    Ok(f.control)
}

/// Default SOCKS listener.
pub(crate) const DEFAULT_SOCKS: &str = "127.0.0.1:1080";

fn parse_exposure(s: &str) -> Result<Exposure, swb_daemon::BadExposure> {
    s.parse()
}

fn socks_config(a: &UpArgs) -> Result<Option<SocksConfig>> {
    let (addr, required) = match a.socks.as_deref() {
        Some(s) if s.eq_ignore_ascii_case("off") => {
            if a.socks_user.is_some() {
                bail!("--socks-user makes no sense with --socks off");
            }
            return Ok(None);
        }
        Some(s) => (s, true),
        None => (DEFAULT_SOCKS, false),
    };
    let listen = addr.parse().map_err(|e| {
        anyhow::anyhow!("--socks {addr:?} is not an address like 127.0.0.1:1080 (or `off`): {e}")
    })?;
    let auth = match &a.socks_user {
        None => None,
        Some(u) => {
            let pass = std::env::var("SWB_SOCKS_PASSWORD").unwrap_or_default();
            if pass.is_empty() {
                bail!("--socks-user needs the password in the SWB_SOCKS_PASSWORD variable");
            }
            if u.len() > 255 || pass.len() > 255 {
                bail!("SOCKS username and password are at most 255 bytes each");
            }
            Some((u.clone(), pass))
        }
    };
    Ok(Some(SocksConfig {
        listen,
        auth,
        required,
    }))
}

fn api_key(a: &UpArgs) -> Result<ApiKey> {
    if let Some(f) = &a.api_key_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read --api-key-file {}", f.display()))?;
        let k = text.trim();
        if k.is_empty() {
            bail!("--api-key-file {} is empty", f.display());
        }
        return Ok(ApiKey::new(k));
    }
    match std::env::var("SWB_API_KEY") {
        Ok(k) if !k.trim().is_empty() => Ok(ApiKey::new(k)),
        _ => bail!(
            "no API key: set SWB_API_KEY or pass --api-key-file FILE (a relay operator creates keys with `swbd keys create`)"
        ),
    }
}

/// The `expose` list of the config file, for a reload.
fn file_exposures(path: &std::path::Path) -> Result<Vec<Exposure>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --config {}", path.display()))?;
    let f: UpFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("--config {} is not valid: {e}", path.display()))?;
    f.expose
        .iter()
        .map(|e| e.parse::<Exposure>())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("--config {}: expose: {e}", path.display()))
}

/// One line for the service manager's status.
fn state_line(s: &ConnState) -> String {
    match s {
        ConnState::Connecting {
            relay,
            attempts,
            last_error,
        } => match last_error {
            Some(e) => format!("connecting to {relay} (attempt {}): {e}", attempts + 1),
            None => format!("connecting to {relay}"),
        },
        ConnState::Connected { welcome, .. } => format!(
            "connected to relay {} as {} (namespace {})",
            welcome.relay_id, welcome.name, welcome.namespace
        ),
        ConnState::Stopped { error } => match error {
            Some(e) => format!("stopped: {e}"),
            None => "stopped".into(),
        },
    }
}

pub(crate) async fn run(mut a: UpArgs, out: &Output) -> Result<()> {
    let expose_from_flags = !a.expose.is_empty();
    let file_control = merge_file(&mut a)?;
    let control = match file_control {
        Some(c) if !out.control_given => c,
        _ => out.control.clone(),
    };
    if a.relays.is_empty() {
        bail!("no relay: pass --relay HOST:PORT (or `relay = [...]` in --config)");
    }
    let Some(name) = a.name.clone() else {
        bail!("no name: pass --name NAME (or `name = \"...\"` in --config)");
    };
    let key = api_key(&a)?;
    let trust = match (&a.relay_fingerprint, &a.ca) {
        (Some(fp), _) => Trust::Fingerprint(fp.clone()),
        (None, Some(ca)) => Trust::CaFile(ca.clone()),
        (None, None) => Trust::System,
    };
    let mut cfg = DaemonConfig::new(a.relays[0].clone(), trust, name, key, control);
    cfg.relays = a.relays.clone();
    cfg.server_name = a.server_name.clone();
    cfg.ocsp = a.ocsp.unwrap_or_default();
    cfg.expose = a.expose.clone();
    cfg.socks = socks_config(&a)?;
    cfg.metrics_listen = a.metrics;
    if let Some(t) = a.connect_timeout {
        cfg.target_connect_timeout = t;
    }
    if let Some(t) = a.keepalive {
        cfg.keepalive = t;
    }
    if a.tun {
        cfg.tun = Some(swb_daemon::TunSettings {
            name: a.tun_name.clone().unwrap_or_else(|| "swb0".into()),
            allow_all: a.tun_allow_all,
        });
    }
    if let Some(t) = a.silence_probe {
        cfg.silence_probe = t;
    }
    if let Some(t) = a.transport {
        cfg.transport = t;
    }
    if cfg.keepalive < std::time::Duration::from_millis(100)
        || cfg.silence_probe <= cfg.keepalive
        || cfg.silence_probe >= cfg.idle_timeout
    {
        bail!(
            "--keepalive ({:?}) must be at least 100ms and less than --silence-probe ({:?}), which must be less than the idle timeout ({:?})",
            cfg.keepalive,
            cfg.silence_probe,
            cfg.idle_timeout
        );
    }
    let handle = Daemon::spawn(cfg).await?;
    info!(control = %handle.control_path().display(), "control socket ready");
    if let Some(m) = handle.metrics_addr() {
        info!("metrics on http://{m}/metrics");
    }
    for e in &a.expose {
        info!(port = e.port, target = %e.target, "exposed to peers of the namespace");
    }

    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let mut state = handle.state();
    let mut ready = false;
    let report = |s: &ConnState, ready: &mut bool| {
        let line = state_line(s);
        if s.is_connected() && !*ready {
            *ready = true;
            crate::service::ready(&line);
        } else {
            crate::service::status(&line);
        }
    };
    report(&state.borrow_and_update(), &mut ready);
    let stopped = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break false,
            _ = term.recv() => break false,
            _ = hup.recv() => {
                crate::service::reloading();
                match (&a.config, expose_from_flags) {
                    (None, _) => info!("SIGHUP: no --config to re-read"),
                    (Some(_), true) => info!("SIGHUP: --expose flags win over the config file; exposures unchanged"),
                    (Some(path), false) => match file_exposures(path).and_then(|e| Ok(handle.set_exposures(e)?)) {
                        Ok(()) => {
                            let now: Vec<String> = handle.exposures().iter().map(|e| e.to_string()).collect();
                            info!(expose = %now.join(","), "SIGHUP: exposures re-read from the config file");
                        }
                        Err(e) => warn!("SIGHUP: keeping the exposures: {e:#}"),
                    },
                }
                let line = state_line(&state.borrow());
                crate::service::ready(&line);
            }
            r = state.changed() => {
                if r.is_err() || matches!(&*state.borrow(), ConnState::Stopped { .. }) {
                    break true;
                }
                report(&state.borrow_and_update(), &mut ready);
            }
        }
    };
    crate::service::stopping();
    if !stopped {
        info!("stopping");
        handle.shutdown();
    }
    match handle.join().await {
        Ok(()) => Ok(()),
        Err(e @ DaemonError::Refused(_)) => Err(anyhow::anyhow!("{e}")),
        Err(e) => Err(e.into()),
    }
}

fn parse_transport(s: &str) -> Result<swb_daemon::Transport, String> {
    swb_daemon::Transport::parse(s).ok_or_else(|| format!("{s:?}: expected udp, tcp or auto"))
}
