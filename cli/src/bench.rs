//! `swbd bench stream`: goodput of one stream, measured in one run on
//! loopback (a) directly between two quinn endpoints with the relay's TLS
//! settings, and (b) through a relay between two daemons — what
//! `swbd connect` uses: Unix socket → daemon → QUIC → relay → QUIC →
//! daemon → TCP. Prints both and the ratio b/a. A benchmark, not a test:
//! it asserts nothing about speed.

use crate::Output;
use anyhow::{ensure, Context, Result};
use clap::{Args, Subcommand};
use std::sync::Arc;
use std::time::{Duration, Instant};
use swb_daemon::{ApiKey, Client, Daemon, DaemonConfig, Exposure, Trust};
use swb_relay::keys::{self, KeysFile};
use swb_relay::{HttpListen, Identity, KeySource, Relay, RelayConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Single-stream goodput: direct quinn vs. through a relay.
    Stream(StreamArgs),
    /// Placement: balance, movement on join/leave, and lookup time of the
    /// home-relay ring at 10, 100 and 1000 relays.
    Ring(RingArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RingArgs {
    /// Sampled names per relay for the balance and movement figures.
    #[arg(long, default_value_t = 10_000)]
    keys_per_relay: usize,
}

#[derive(Debug, Args)]
pub(crate) struct StreamArgs {
    /// Bytes per run.
    #[arg(long, default_value_t = 256 << 20)]
    bytes: u64,
    /// Runs per path; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    runs: u32,
}

pub(crate) async fn run(cmd: BenchCommand, out: &Output) -> Result<()> {
    match cmd {
        BenchCommand::Stream(a) => stream(a, out).await,
        BenchCommand::Ring(a) => ring(a, out),
    }
}

fn ring(a: RingArgs, out: &Output) -> Result<()> {
    use swb_ring::{key_hash, Ring};
    if !out.json {
        println!("home-relay placement (rendezvous hashing); goals: max share <= 1.05 x mean, moved <= 1.1/(N+1), lookup <= 1 us at N=1000");
        println!(
            "{:>6} {:>10} {:>14} {:>18} {:>18} {:>12}",
            "relays", "samples", "max/mean", "join moved*(N+1)", "leave moved*(N)", "lookup"
        );
    }
    for n in [10usize, 100, 1000] {
        let r = Ring::new((0..n).map(|i| format!("relay-{i:04}")));
        let samples = a.keys_per_relay * n;
        let keys: Vec<u64> = (0..samples)
            .map(|i| key_hash("bench", &format!("peer-{i}")))
            .collect();
        // Balance.
        let mut counts = std::collections::HashMap::<&str, usize>::new();
        for k in &keys {
            *counts.entry(r.home_of_hash(*k).unwrap_or("")).or_default() += 1;
        }
        let mean = samples as f64 / n as f64;
        let max = counts.values().copied().max().unwrap_or(0) as f64 / mean;
        // Movement when one relay joins, and when one leaves.
        let joined = r.with("newcomer");
        let moved_join = keys
            .iter()
            .filter(|k| r.home_of_hash(**k) != joined.home_of_hash(**k))
            .count();
        let left = r.without("relay-0000");
        let moved_leave = keys
            .iter()
            .filter(|k| r.home_of_hash(**k) != left.home_of_hash(**k))
            .count();
        let join_ratio = moved_join as f64 / samples as f64 * (n + 1) as f64;
        let leave_ratio = moved_leave as f64 / samples as f64 * n as f64;
        // Lookup time over precomputed key hashes.
        let t = Instant::now();
        let mut acc = 0usize;
        let lookups = keys.len().min(2_000_000);
        for k in &keys[..lookups] {
            acc = acc.wrapping_add(r.home_of_hash(*k).map_or(0, str::len));
        }
        let ns = t.elapsed().as_nanos() as f64 / lookups as f64;
        std::hint::black_box(acc);
        if out.json {
            println!(
                "{}",
                serde_json::json!({"bench": "ring", "relays": n, "samples": samples, "max_over_mean": max,
                    "join_moved_times_n_plus_1": join_ratio, "leave_moved_times_n": leave_ratio, "lookup_ns": ns})
            );
        } else {
            println!(
                "{n:>6} {samples:>10} {max:>14.3} {join_ratio:>18.3} {leave_ratio:>18.3} {:>9.0} ns",
                ns
            );
        }
    }
    if !out.json {
        println!("(max/mean includes sampling noise of about 3/sqrt(samples per relay); raise --keys-per-relay to shrink it)");
    }
    Ok(())
}

const CHUNK: usize = 256 * 1024;

/// Writes `n` bytes and half-closes; reads the peer's 8-byte count.
async fn push<W, R>(mut w: W, mut r: R, n: u64) -> Result<u64>
where
    W: tokio::io::AsyncWrite + Unpin,
    R: tokio::io::AsyncRead + Unpin,
{
    let buf = vec![0x5au8; CHUNK];
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        w.write_all(&buf[..k]).await?;
        left -= k as u64;
    }
    w.shutdown().await?;
    let mut count = [0u8; 8];
    r.read_exact(&mut count).await?;
    Ok(u64::from_be_bytes(count))
}

/// Reads to EOF, then answers with the byte count.
async fn drain<R, W>(mut r: R, mut w: W) -> Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    w.write_all(&n.to_be_bytes()).await?;
    w.shutdown().await?;
    Ok(())
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// (a) Two quinn endpoints, the relay's TLS (1.3, ring, same certificate
/// type) and default transport settings.
async fn direct_once(identity: &Identity, bytes: u64) -> Result<Duration> {
    let tls = identity.server_config(&[b"bench"])?;
    let server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));
    // Same socket settings as relay and daemon.
    let server = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_cfg),
        swb_relay::udp_socket("127.0.0.1:0".parse()?)?,
        Arc::new(quinn::TokioRuntime),
    )?;
    let addr = server.local_addr()?;
    let ctls = Trust::Fingerprint(identity.fingerprint()).rustls_config(&[b"bench"])?;
    let client_cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(ctls)?,
    ));
    let mut client = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        swb_relay::udp_socket("127.0.0.1:0".parse()?)?,
        Arc::new(quinn::TokioRuntime),
    )?;
    client.set_default_client_config(client_cfg);
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let (send, recv) = conn.accept_bi().await?;
        drain(recv, send).await?;
        conn.closed().await;
        anyhow::Ok(())
    });
    let conn = client.connect(addr, "localhost")?.await?;
    let (send, recv) = conn.open_bi().await?;
    let t = Instant::now();
    let got = push(send, recv, bytes).await?;
    let took = t.elapsed();
    ensure!(
        got == bytes,
        "direct: server counted {got} of {bytes} bytes"
    );
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(5), srv).await;
    client.wait_idle().await;
    Ok(took)
}

pub(crate) async fn stream(a: StreamArgs, out: &Output) -> Result<()> {
    let identity = Identity::ephemeral()?;
    // (b) setup: relay, a sink behind peer `sink`, peer `source`.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    let sink_task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = sink.accept().await else {
                return;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (r, w) = s.into_split();
                let _ = drain(r, w).await;
            });
        }
    });
    let new = keys::generate("bench", "bench")?;
    let mut rc = RelayConfig::new(
        "127.0.0.1:0".parse()?,
        identity.clone(),
        KeySource::Static(KeysFile {
            keys: vec![new.entry],
        }),
    );
    rc.http_listen = HttpListen::Off;
    let relay = Relay::spawn(rc).await?;
    let dir = tempfile::tempdir()?;
    let daemon = |name: &str, expose: Vec<Exposure>| {
        let mut c = DaemonConfig::new(
            relay.local_addr().to_string(),
            Trust::Fingerprint(relay.fingerprint().to_string()),
            name,
            ApiKey::new(new.key.clone()),
            dir.path().join(format!("{name}.sock")),
        );
        c.expose = expose;
        c
    };
    let sinkd = Daemon::spawn(daemon(
        "sink",
        vec![Exposure {
            port: 9,
            target: sink_addr.to_string(),
        }],
    ))
    .await?;
    let source = Daemon::spawn(daemon("source", Vec::new())).await?;
    sinkd.connected().await.map_err(anyhow::Error::msg)?;
    source.connected().await.map_err(anyhow::Error::msg)?;

    if !out.json {
        println!(
            "single-stream goodput, {} MiB per run, {} runs per path (loopback, release build recommended)",
            a.bytes >> 20,
            a.runs
        );
    }
    let mut direct = Vec::new();
    let mut relayed = Vec::new();
    for i in 0..a.runs {
        let d = direct_once(&identity, a.bytes).await?;
        direct.push(mb_s(a.bytes, d));
        let c = Client::connect(source.control_path()).await?;
        let s = c.connect_stream("sink", 9, Duration::from_secs(5)).await?;
        let (r, w) = tokio::io::split(s);
        let t = Instant::now();
        let got = push(w, r, a.bytes).await?;
        let took = t.elapsed();
        ensure!(
            got == a.bytes,
            "relayed: sink counted {got} of {} bytes",
            a.bytes
        );
        relayed.push(mb_s(a.bytes, took));
        if !out.json {
            println!(
                "  run {}: direct quinn {:>8.1} MB/s   through relay {:>8.1} MB/s",
                i + 1,
                direct[i as usize],
                relayed[i as usize]
            );
        }
    }
    let (d, r) = (median(direct), median(relayed));
    if out.json {
        println!(
            "{}",
            serde_json::json!({"bench": "stream", "bytes": a.bytes, "runs": a.runs,
                "direct_mb_s": d, "relay_mb_s": r, "ratio": r / d})
        );
    } else {
        println!(
            "median: direct quinn {d:.1} MB/s, through relay {r:.1} MB/s, ratio {:.2}",
            r / d
        );
    }
    source.shutdown();
    sinkd.shutdown();
    let _ = source.join().await;
    let _ = sinkd.join().await;
    relay.shutdown();
    relay.join().await;
    sink_task.abort();
    Ok(())
}
