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
    /// Messages between peers on the same relay vs. on two relays of a mesh
    /// (one mesh hop): rate and latency, in one run.
    Mesh(MeshArgs),
}

#[derive(Debug, Args)]
pub(crate) struct MeshArgs {
    /// Messages per rate run.
    #[arg(long, default_value_t = 5000)]
    messages: usize,
    /// Round trips for the latency figures.
    #[arg(long, default_value_t = 500)]
    samples: usize,
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
        BenchCommand::Mesh(a) => mesh(a, out).await,
    }
}

/// Sends `n` messages from `from` to `to` (each waiting for the relay's
/// acceptance, as `swbd send` does) while `to` receives; returns msgs/s.
async fn rate(
    from: &DaemonHandleRef<'_>,
    to: &DaemonHandleRef<'_>,
    to_name: &str,
    n: usize,
) -> Result<f64> {
    let mut tx = Client::connect(from.0.control_path()).await?;
    let t = Instant::now();
    let send = async {
        for i in 0..n {
            tx.send(to_name, format!("m{i}").as_bytes(), Duration::from_secs(10))
                .await?;
        }
        anyhow::Ok(())
    };
    let recv = async {
        let mut rx = Client::connect(to.0.control_path()).await?;
        let mut got = 0;
        while got < n {
            let msgs = rx.recv(Duration::from_secs(10), n - got).await?;
            ensure!(!msgs.is_empty(), "stalled after {got}");
            got += msgs.len();
            rx.ack(msgs.into_iter().map(|m| m.id).collect()).await?;
        }
        anyhow::Ok(())
    };
    let (s, r) = tokio::join!(send, recv);
    s?;
    r?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// One message at a time: send → received at the other end; latencies.
async fn latency(
    from: &DaemonHandleRef<'_>,
    to: &DaemonHandleRef<'_>,
    to_name: &str,
    n: usize,
) -> Result<Vec<Duration>> {
    let mut tx = Client::connect(from.0.control_path()).await?;
    let mut rx = Client::connect(to.0.control_path()).await?;
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let recv = rx.recv(Duration::from_secs(10), 1);
        let body = format!("l{i}");
        let send = tx.send(to_name, body.as_bytes(), Duration::from_secs(10));
        let (r, s) = tokio::join!(recv, send);
        s?;
        let msgs = r?;
        v.push(t.elapsed());
        ensure!(msgs.len() == 1, "lost a message");
        rx.ack(msgs.into_iter().map(|m| m.id).collect()).await?;
    }
    v.sort();
    Ok(v)
}

struct DaemonHandleRef<'a>(&'a swb_daemon::DaemonHandle);

async fn mesh(a: MeshArgs, out: &Output) -> Result<()> {
    use swb_relay::mesh::{MeshConfig, MeshKey};
    let key = MeshKey::new(&"bench-mesh-key-".repeat(4))?;
    let new = keys::generate("bench", "bench")?;
    let file = KeysFile {
        keys: vec![new.entry],
    };
    let mut relays = Vec::new();
    for id in ["r1", "r2"] {
        let mut rc = RelayConfig::new(
            "127.0.0.1:0".parse()?,
            Identity::ephemeral()?,
            KeySource::Static(file.clone()),
        );
        rc.relay_id = id.into();
        rc.http_listen = HttpListen::Off;
        rc.mesh = Some(MeshConfig {
            key: key.clone(),
            peers: relays
                .iter()
                .map(|r: &swb_relay::RelayHandle| r.local_addr().to_string())
                .collect(),
            advertise: Vec::new(),
        });
        relays.push(Relay::spawn(rc).await?);
    }
    for r in &relays {
        tokio::time::timeout(Duration::from_secs(10), r.wait_live(|l| l.len() == 2))
            .await
            .context("the two relays did not link")?;
    }
    let ring = swb_ring::Ring::new(["r1", "r2"]);
    let pick = |home: &str, skip: &str| {
        (0..10_000)
            .map(|i| format!("p{i}"))
            .find(|n| ring.home("bench", n) == Some(home) && n != skip)
            .unwrap_or_default()
    };
    let a_name = pick("r1", "");
    let b_name = pick("r1", &a_name);
    let c_name = pick("r2", "");
    let dir = tempfile::tempdir()?;
    let mut ds = Vec::new();
    for n in [&a_name, &b_name, &c_name] {
        let r0 = &relays[0];
        let c = DaemonConfig::new(
            r0.local_addr().to_string(),
            Trust::Fingerprint(r0.fingerprint().to_string()),
            n.as_str(),
            ApiKey::new(new.key.clone()),
            dir.path().join(format!("{n}.sock")),
        );
        let d = Daemon::spawn(c).await?;
        d.connected().await.map_err(anyhow::Error::msg)?;
        ds.push(d);
    }
    let (a_d, b_d, c_d) = (
        DaemonHandleRef(&ds[0]),
        DaemonHandleRef(&ds[1]),
        DaemonHandleRef(&ds[2]),
    );
    // Warm up both paths.
    rate(&a_d, &b_d, &b_name, 200).await?;
    rate(&a_d, &c_d, &c_name, 200).await?;
    let same = rate(&a_d, &b_d, &b_name, a.messages).await?;
    let cross = rate(&a_d, &c_d, &c_name, a.messages).await?;
    let l_same = latency(&a_d, &b_d, &b_name, a.samples).await?;
    let l_cross = latency(&a_d, &c_d, &c_name, a.samples).await?;
    let p = |v: &[Duration], q: f64| v[((v.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e3;
    if out.json {
        println!(
            "{}",
            serde_json::json!({"bench": "mesh", "messages": a.messages,
                "same_relay_msgs_per_sec": same, "one_hop_msgs_per_sec": cross, "rate_ratio": cross / same,
                "same_relay_p50_ms": p(&l_same, 0.5), "one_hop_p50_ms": p(&l_cross, 0.5),
                "same_relay_p99_ms": p(&l_same, 0.99), "one_hop_p99_ms": p(&l_cross, 0.99),
                "p50_ratio": p(&l_cross, 0.5) / p(&l_same, 0.5)})
        );
    } else {
        println!("messages: peers on one relay vs. on two relays of a mesh (one hop); each send waits for acceptance");
        println!("  rate      same relay {same:>8.0} msg/s   one hop {cross:>8.0} msg/s   ratio {:.2} (goal >= 0.45)", cross / same);
        println!(
            "  latency   same relay p50 {:.3} ms p99 {:.3} ms   one hop p50 {:.3} ms p99 {:.3} ms   p50 ratio {:.2} (goal <= 2)",
            p(&l_same, 0.5), p(&l_same, 0.99), p(&l_cross, 0.5), p(&l_cross, 0.99), p(&l_cross, 0.5) / p(&l_same, 0.5)
        );
    }
    for d in ds {
        d.shutdown();
        let _ = d.join().await;
    }
    for r in relays {
        r.shutdown();
        r.join().await;
    }
    Ok(())
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
