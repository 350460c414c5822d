//! The scenarios of `swbd-bench`. `stream`: goodput of one stream, measured in one run on
//! loopback (a) directly between two quinn endpoints with the relay's TLS
//! settings, and (b) through a relay between two daemons — what
//! `swbd connect` uses: Unix socket → daemon → QUIC → relay → QUIC →
//! daemon → TCP. Prints both and the ratio b/a. A benchmark, not a test:
//! it asserts nothing about speed.

use crate::Output;
use anyhow::{ensure, Context, Result};
use clap::{Args, Subcommand};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use swb_daemon::control::{Reply, Request};
use swb_daemon::{ApiKey, Client, Daemon, DaemonConfig, Exposure, Trust};
use swb_relay::keys::{self, KeysFile};
use swb_relay::{HttpListen, Identity, KeySource, Relay, RelayConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod carrier;
mod cores;
mod durable;
mod fanout;
mod flood;
mod floor;
mod grid;
mod shards;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Single-stream goodput: direct quinn vs. through a relay.
    Stream(StreamArgs),
    /// Placement: balance, movement on join/leave, and lookup time of the
    /// home-relay ring at 10, 100 and 1000 relays.
    Ring(RingArgs),
    /// The diameter-2 mesh graph (grid) at 1000 and 10 000 relays,
    /// simulated: links per relay, hops, a join's churn, relays down.
    Grid(grid::GridArgs),
    /// The TCP carrier (QUIC inside TLS to the relay's HTTPS port) vs UDP:
    /// single-stream goodput and message latency through one relay, in one
    /// run; with `rathole` on PATH, its TLS transport as a TCP anchor.
    Carrier(carrier::CarrierArgs),
    /// Status as multicast: one publisher's changes to many watchers (one
    /// relay, and across a mesh hop) vs. NATS+TLS pub/sub 1 -> N.
    Fanout(fanout::FanoutArgs),
    /// Messages between peers on the same relay vs. one mesh hop vs. two
    /// (nine relays linked as a 3×3 grid): rate one send at a time,
    /// pipelined rate, and latency, in one run.
    Mesh(MeshArgs),
    /// Connections per second the relay accepts (handshake, auth,
    /// registration) vs. bare quinn, and a reconnect storm.
    Accept(AcceptArgs),
    /// Memory and keep-alive CPU per idle client: relay vs. bare quinn.
    Idle(IdleArgs),
    /// Request -> reply latency through a relay vs. nats-server (plain and TLS).
    Latency(LatencyArgs),
    /// Messages per second, 1 -> 1 and 1 -> 100, vs. nats-server pub/sub.
    Rate(RateArgs),
    /// Durable messages (stored before `accepted`) at the sync and process
    /// levels vs. NATS JetStream with file storage: rate and latency.
    Durable(durable::DurableArgs),
    /// Established peers' request -> reply latency while the relay is
    /// flooded with full handshakes and with Initials that never complete,
    /// handshakes on the handshake thread vs on the runtime's workers.
    Flood(flood::FloodArgs),
    /// Relay throughput with 1 and 2 shards (QUIC endpoints on one UDP
    /// port): messages between several pairs of daemons through a relay in
    /// its own process, runs alternating, in one run.
    Shards(shards::ShardsArgs),
    /// Every scenario in sequence, then one summary table.
    All(AllArgs),
    /// (internal) A bare quinn server process, the baseline of `idle`.
    #[command(hide = true)]
    BareServer(BareServerArgs),
    /// (internal) A relay process for `idle`, configured as `swbd relay --dev`.
    #[command(hide = true)]
    RelayProcess(RelayProcessArgs),
    /// (internal) The flood generator of `flood`.
    #[command(hide = true)]
    FloodGen(flood::FloodGenArgs),
    /// (internal) The floor's quinn forwarder in a process of its own, for
    /// `latency`.
    #[command(hide = true)]
    FloorProcess,
}

#[derive(Debug, Args)]
pub(crate) struct MeshArgs {
    /// Messages per rate run.
    #[arg(long, default_value_t = 5000)]
    messages: usize,
    /// Round trips for the latency figures.
    #[arg(long, default_value_t = 500)]
    samples: usize,
    /// Messages per pipelined run (up to 1024 sends unanswered, through
    /// the Rust API).
    #[arg(long, default_value_t = 100_000)]
    pipelined: usize,
    /// Pipelined runs of each path, taken in turns; medians are reported.
    /// Also the handoff runs of each kind.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Messages a gracefully stopping relay holds and hands to their new
    /// home in the handoff runs (0: none).
    #[arg(long, default_value_t = 20_000)]
    handoff: usize,
}

#[derive(Debug, Args)]
pub(crate) struct RingArgs {
    /// Sampled names per relay for the balance and movement figures.
    #[arg(long, default_value_t = 10_000)]
    keys_per_relay: usize,
    /// Runs of each home-lookup figure (computed and cached take turns);
    /// the median is reported with the min–max.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    runs: u32,
    /// Lookups timed per run of the home-lookup figures.
    #[arg(long, default_value_t = 200_000)]
    lookups: usize,
    /// The largest working set of recipients the home-lookup figures
    /// take (1 000, then ten times as many up to this).
    #[arg(long, default_value_t = 1_000_000)]
    max_recipients: usize,
}

#[derive(Debug, Args)]
pub(crate) struct StreamArgs {
    /// Bytes per run.
    #[arg(long, default_value_t = 256 << 20)]
    bytes: u64,
    /// Runs per path; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    runs: u32,
    /// Runs of each path first, not counted: the first bulk transfer over
    /// the daemons' connections (idle until then) runs well below the rest.
    #[arg(long, default_value_t = 1)]
    warmup: u32,
}

pub(crate) async fn run(cmd: BenchCommand, out: &Output) -> Result<()> {
    match cmd {
        BenchCommand::Stream(a) => stream(a, out).await,
        BenchCommand::Ring(a) => ring(a, out),
        BenchCommand::Grid(a) => grid::grid_bench(a, out),
        BenchCommand::Carrier(a) => carrier::carrier_bench(a, out).await,
        BenchCommand::Fanout(a) => fanout::fanout_bench(a, out).await,
        BenchCommand::Mesh(a) => mesh(a, out).await,
        BenchCommand::Accept(a) => accept(a, out).await,
        BenchCommand::Idle(a) => idle(a, out).await,
        BenchCommand::Latency(a) => latency_bench(a, out).await,
        BenchCommand::Rate(a) => rate_bench(a, out).await,
        BenchCommand::Durable(a) => durable::durable_bench(a, out).await,
        BenchCommand::Flood(a) => flood::flood_bench(a, out).await,
        BenchCommand::FloodGen(a) => flood::flood_gen_main(a).await,
        BenchCommand::Shards(a) => shards::shards_bench(a, out).await,
        BenchCommand::All(a) => all(a, out).await,
        BenchCommand::BareServer(a) => bare_server_main(a).await,
        BenchCommand::RelayProcess(a) => relay_process_main(a).await,
        BenchCommand::FloorProcess => floor::floor_process_main().await,
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

/// Pipelined sends through the Rust API (1024 unanswered): deliveries/s.
async fn pipelined(
    from: &swb_daemon::DaemonHandle,
    to: &swb_daemon::DaemonHandle,
    to_name: &str,
    n: usize,
) -> Result<f64> {
    let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let (g, d) = (got.clone(), done.clone());
    let mut reader = tokio::spawn(receive_rust(to.receiver(), move |k| {
        if g.fetch_add(k, std::sync::atomic::Ordering::Relaxed) + k >= n {
            d.notify_one();
        }
    }));
    let name: Arc<str> = Arc::from(to_name);
    let body = bytes::Bytes::from(vec![0x42u8; 128]);
    let t = Instant::now();
    let mut i = 0;
    let sent = submit_windowed(from.sender(), 1024, || {
        i += 1;
        (i <= n).then(|| (name.clone(), body.clone()))
    });
    let received = async {
        tokio::select! {
            () = done.notified() => Ok(()),
            r = &mut reader => match r {
                Ok(Err(e)) => Err(e.context("receiving")),
                _ => Err(anyhow::anyhow!("the receiver stopped")),
            },
        }
    };
    let all = async { tokio::try_join!(sent, received) };
    let r = tokio::time::timeout(Duration::from_secs(300), all).await;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    // Its receiver ends with the run (its lease, all acknowledged, goes).
    reader.abort();
    r.context("pipelined run: no end in 300 s")??;
    Ok(rate)
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

/// The per-key send rate of every relay a bench runs: on, as deployed, at
/// a rate no bench reaches — its work per send is measured, its refusals
/// never come.
pub(crate) const UNREACHED_SEND_RATE: swb_relay::limits::Rate = swb_relay::limits::Rate {
    per_sec: 1e12,
    burst: 1e12,
};

/// A relay config on a free loopback port, without the HTTP endpoint, with
/// one fresh API key (namespace `bench`); returns it and the key.
fn bench_relay_config(identity: Identity) -> Result<(RelayConfig, String)> {
    let new = keys::generate("bench", "bench")?;
    let mut rc = RelayConfig::new(
        "127.0.0.1:0".parse()?,
        identity,
        KeySource::Static(KeysFile {
            keys: vec![new.entry],
        }),
    );
    rc.http_listen = HttpListen::Off;
    // The benches open thousands of connections from a few loopback
    // addresses on purpose: they measure capacity, not the per-address
    // policy (QUIC Retry under load stays on, as deployed).
    rc.connections_per_ip = None;
    rc.initials.per_ip = None;
    rc.key_send_rate = Some(UNREACHED_SEND_RATE);
    rc.key_http_rate = None;
    Ok((rc, new.key))
}

/// A daemon in this process attached to `relay` as `name` (control socket
/// in `dir`), once the relay welcomed it.
async fn bench_daemon(
    relay: &swb_relay::RelayHandle,
    key: &str,
    name: &str,
    dir: &std::path::Path,
    expose: Vec<Exposure>,
) -> Result<swb_daemon::DaemonHandle> {
    bench_daemon_over(relay, key, name, dir, expose, swb_daemon::Transport::Auto).await
}

/// [`bench_daemon`] reaching the relay over `transport`.
async fn bench_daemon_over(
    relay: &swb_relay::RelayHandle,
    key: &str,
    name: &str,
    dir: &std::path::Path,
    expose: Vec<Exposure>,
    transport: swb_daemon::Transport,
) -> Result<swb_daemon::DaemonHandle> {
    let mut c = DaemonConfig::new(
        relay.local_addr().to_string(),
        Trust::Fingerprint(relay.fingerprint().to_string()),
        name,
        ApiKey::new(key.to_string()),
        dir.join(format!("{name}.sock")),
    );
    c.expose = expose;
    c.transport = transport;
    let d = Daemon::spawn(c).await?;
    d.connected().await.map_err(anyhow::Error::msg)?;
    Ok(d)
}

/// In-process relays of one mesh named `ids`, each seeded with the first
/// and changed by `tweak`, once every one sees them all; and an API key of
/// namespace `bench` they accept. Per-key send rates are off (the benches
/// measure capacity, not that policy).
pub(crate) async fn mesh_relays(
    ids: &[&str],
    full_mesh_max: usize,
    tweak: impl Fn(&mut RelayConfig),
) -> Result<(Vec<swb_relay::RelayHandle>, String)> {
    use swb_relay::mesh::{MeshConfig, MeshKey};
    let key = MeshKey::new(&"bench-mesh-key-".repeat(4))?;
    let new = keys::generate("bench", "bench")?;
    let file = KeysFile {
        keys: vec![new.entry],
    };
    let mut relays: Vec<swb_relay::RelayHandle> = Vec::new();
    for id in ids {
        let mut rc = RelayConfig::new(
            "127.0.0.1:0".parse()?,
            Identity::ephemeral()?,
            KeySource::Static(file.clone()),
        );
        rc.relay_id = (*id).into();
        rc.http_listen = HttpListen::Off;
        rc.key_send_rate = Some(UNREACHED_SEND_RATE);
        rc.mesh = Some(MeshConfig {
            key: key.clone(),
            peers: relays
                .first()
                .map(|r| r.local_addr().to_string())
                .into_iter()
                .collect(),
            advertise: Vec::new(),
            full_mesh_max,
        });
        tweak(&mut rc);
        relays.push(Relay::spawn(rc).await?);
    }
    for r in &relays {
        tokio::time::timeout(
            Duration::from_secs(20),
            r.wait_live(|l| l.len() == ids.len()),
        )
        .await
        .with_context(|| format!("the {} relays did not converge", ids.len()))?;
    }
    Ok((relays, new.key))
}

async fn mesh(a: MeshArgs, out: &Output) -> Result<()> {
    // Nine relays past a full-mesh threshold of four: a 3×3 grid, where
    // half the pairs have a link (one hop) and half do not (two hops).
    const IDS: [&str; 9] = ["r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9"];
    // Mailboxes as deep as `rate`'s (a NATS subscription's pending
    // limits): the pipelined runs' receivers may fall that far behind.
    let (relays, api) = mesh_relays(&IDS, 4, |rc| {
        rc.limits.messages = 65_536;
        rc.limits.bytes = 64 * 1024 * 1024;
    })
    .await?;
    let ring = swb_ring::Ring::new(IDS);
    let grid = swb_ring::Grid::new(&ring);
    // r1's grid neighbours (one hop) and the others (two hops).
    let linked: Vec<&str> = grid.links(0).into_iter().map(|i| IDS[i as usize]).collect();
    let one_hop = *linked.first().context("r1 has grid links")?;
    let two_hops = *IDS[1..]
        .iter()
        .find(|id| !linked.contains(id))
        .context("r1 has relays it is not linked to")?;
    // Until the links outside the grid are closed (unused ones go after
    // the surplus grace), r1 may still reach two_hops directly.
    tokio::time::timeout(Duration::from_secs(30), async {
        while relays[0].mesh_links().iter().any(|l| l == two_hops) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .context("r1's link outside the grid stayed up")?;
    let pick = |home: &str, skip: &str| {
        (0..10_000)
            .map(|i| format!("p{i}"))
            .find(|n| ring.home("bench", n) == Some(home) && n != skip)
            .unwrap_or_default()
    };
    let a_name = pick("r1", "");
    let b_name = pick("r1", &a_name);
    let c_name = pick(one_hop, "");
    let d_name = pick(two_hops, "");
    let dir = tempfile::tempdir()?;
    let mut ds = Vec::new();
    for n in [&a_name, &b_name, &c_name, &d_name] {
        ds.push(bench_daemon(&relays[0], &api, n, dir.path(), Vec::new()).await?);
    }
    let (a_d, b_d, c_d, d_d) = (
        DaemonHandleRef(&ds[0]),
        DaemonHandleRef(&ds[1]),
        DaemonHandleRef(&ds[2]),
        DaemonHandleRef(&ds[3]),
    );
    let path = relays[0]
        .mesh_probe(two_hops)
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(path.len() == 2, "r1 → {two_hops} is not two hops: {path:?}");
    // Warm up every path.
    rate(&a_d, &b_d, &b_name, 200).await?;
    rate(&a_d, &c_d, &c_name, 200).await?;
    rate(&a_d, &d_d, &d_name, 200).await?;
    let same = rate(&a_d, &b_d, &b_name, a.messages).await?;
    let cross = rate(&a_d, &c_d, &c_name, a.messages).await?;
    let two = rate(&a_d, &d_d, &d_name, a.messages).await?;
    // Pipelined: a sender that keeps many sends unanswered, as a program
    // streaming messages would; the paths take turns, run by run.
    let (mut ps_same, mut ps_cross, mut ps_two) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.runs.max(1) {
        ps_same.push(pipelined(&ds[0], &ds[1], &b_name, a.pipelined).await?);
        ps_cross.push(pipelined(&ds[0], &ds[2], &c_name, a.pipelined).await?);
        ps_two.push(pipelined(&ds[0], &ds[3], &d_name, a.pipelined).await?);
    }
    let (p_same, p_cross, p_two) = (
        median(ps_same.clone()),
        median(ps_cross.clone()),
        median(ps_two.clone()),
    );
    let l_same = latency(&a_d, &b_d, &b_name, a.samples).await?;
    let l_cross = latency(&a_d, &c_d, &c_name, a.samples).await?;
    let l_two = latency(&a_d, &d_d, &d_name, a.samples).await?;
    let p = |v: &[Duration], q: f64| v[((v.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e3;
    record(
        "mesh",
        "msgs/s across one mesh hop (vs same relay)",
        cross,
        same,
        true,
        0.45,
    );
    record(
        "mesh",
        "p50 ms across one mesh hop (vs same relay)",
        p(&l_cross, 0.5),
        p(&l_same, 0.5),
        false,
        2.0,
    );
    record(
        "mesh",
        "msgs/s across two mesh hops (vs same relay)",
        two,
        same,
        true,
        0.3,
    );
    record(
        "mesh",
        "pipelined deliveries/s across one mesh hop (vs same relay)",
        p_cross,
        p_same,
        true,
        0.45,
    );
    record(
        "mesh",
        "pipelined deliveries/s across two mesh hops (vs same relay)",
        p_two,
        p_same,
        true,
        0.3,
    );
    record(
        "mesh",
        "p50 ms across two mesh hops (vs same relay)",
        p(&l_two, 0.5),
        p(&l_same, 0.5),
        false,
        3.0,
    );
    if out.json {
        println!(
            "{}",
            serde_json::json!({"bench": "mesh", "messages": a.messages,
                "same_relay_msgs_per_sec": same, "one_hop_msgs_per_sec": cross, "two_hops_msgs_per_sec": two,
                "rate_ratio": cross / same, "two_hops_rate_ratio": two / same,
                "same_relay_p50_ms": p(&l_same, 0.5), "one_hop_p50_ms": p(&l_cross, 0.5), "two_hops_p50_ms": p(&l_two, 0.5),
                "same_relay_p99_ms": p(&l_same, 0.99), "one_hop_p99_ms": p(&l_cross, 0.99), "two_hops_p99_ms": p(&l_two, 0.99),
                "p50_ratio": p(&l_cross, 0.5) / p(&l_same, 0.5), "two_hops_p50_ratio": p(&l_two, 0.5) / p(&l_same, 0.5),
                "pipelined_messages": a.pipelined, "pipelined_runs": a.runs.max(1),
                "pipelined_same_relay_per_sec": p_same, "pipelined_one_hop_per_sec": p_cross, "pipelined_two_hops_per_sec": p_two,
                "pipelined_rate_ratio": p_cross / p_same, "pipelined_two_hops_rate_ratio": p_two / p_same})
        );
    } else {
        println!("messages: peers on one relay vs. one mesh hop vs. two (nine relays, full-mesh max 4: a 3x3 grid); each send waits for acceptance");
        println!("  rate      same relay {same:>8.0} msg/s   one hop {cross:>8.0} msg/s ({:.2}, goal >= 0.45)   two hops {two:>8.0} msg/s ({:.2}, goal >= 0.3)", cross / same, two / same);
        let span = |v: &[f64]| {
            let (lo, hi) = min_max(v);
            format!("{lo:.0}–{hi:.0}")
        };
        println!(
            "  pipelined (1024 unanswered, Rust API; medians of {}): same relay {p_same:>8.0}/s ({})   one hop {p_cross:>8.0}/s ({}; {:.2}, goal >= 0.45)   two hops {p_two:>8.0}/s ({}; {:.2}, goal >= 0.3)",
            ps_same.len(), span(&ps_same), span(&ps_cross), p_cross / p_same, span(&ps_two), p_two / p_same
        );
        println!(
            "  latency   same relay p50 {:.3} ms p99 {:.3} ms   one hop p50 {:.3} ms p99 {:.3} ms ({:.2}, goal <= 2)   two hops p50 {:.3} ms p99 {:.3} ms ({:.2}, goal <= 3)",
            p(&l_same, 0.5), p(&l_same, 0.99), p(&l_cross, 0.5), p(&l_cross, 0.99), p(&l_cross, 0.5) / p(&l_same, 0.5),
            p(&l_two, 0.5), p(&l_two, 0.99), p(&l_two, 0.5) / p(&l_same, 0.5)
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
    if a.handoff > 0 {
        handoff(a.handoff, a.runs.max(1), out).await?;
    }
    Ok(())
}

/// Held mail handed over by a relay stopping gracefully: three relays in
/// a full mesh, `n` messages held on one for a peer that is offline, the
/// relay stopped, and the time until the peer's new home holds them all.
/// Against the same with a new home that takes one message a call (as
/// relays did before calls carried many: the stopping relay then sends
/// the rest a call each), run by run in turns.
async fn handoff(n: usize, runs: usize, out: &Output) -> Result<()> {
    const IDS: [&str; 3] = ["h1", "h2", "h3"];
    let ring = swb_ring::Ring::new(IDS);
    // Homed on h2, taken over by h3: the sender's relay (h1) is neither.
    let name = (0..100_000)
        .map(|i| format!("away{i}"))
        .find(|n| ring.ranked("bench", n)[..2] == ["h2", "h3"])
        .context("no name homed on h2 with h3 next")?;
    let ring = &ring;
    let once = |one_a_call: bool| {
        let name = name.clone();
        async move {
            let (relays, api) = mesh_relays(&IDS, 4, |rc| {
                rc.limits.messages = 65_536;
                rc.limits.bytes = 64 * 1024 * 1024;
            })
            .await?;
            let dir = tempfile::tempdir()?;
            let sender_name = (0..100_000)
                .map(|i| format!("sender{i}"))
                .find(|s| ring.home("bench", s) == Some("h1"))
                .context("no name homed on h1")?;
            let sender =
                bench_daemon(&relays[0], &api, &sender_name, dir.path(), Vec::new()).await?;
            let to: Arc<str> = Arc::from(name.as_str());
            let body = bytes::Bytes::from(vec![0x42u8; 128]);
            let mut i = 0;
            submit_windowed(sender.sender(), 1024, || {
                i += 1;
                (i <= n).then(|| (to.clone(), body.clone()))
            })
            .await?;
            ensure!(
                relays[1].stats().held == n as u64,
                "h2 holds {} of {n}",
                relays[1].stats().held
            );
            if one_a_call {
                relays[2].mesh_answer_one_forward_per_call();
            }
            let t = Instant::now();
            let mut relays = relays.into_iter();
            let (h1, h2, h3) = (
                relays.next().context("h1")?,
                relays.next().context("h2")?,
                relays.next().context("h3")?,
            );
            h2.shutdown();
            // Polled: the figure is seconds, the step a millisecond.
            let took = tokio::time::timeout(Duration::from_secs(60), async {
                while h3.stats().held < n as u64 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                t.elapsed()
            })
            .await
            .with_context(|| format!("h3 holds {} of {n} after 60 s", h3.stats().held))?;
            h2.join().await;
            drop(sender);
            for r in [h1, h3] {
                r.shutdown();
                r.join().await;
            }
            anyhow::Ok(n as f64 / took.as_secs_f64())
        }
    };
    let (mut batched, mut single) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        batched.push(once(false).await?);
        single.push(once(true).await?);
    }
    let (b, s1) = (median(batched.clone()), median(single.clone()));
    let (b_lo, b_hi) = min_max(&batched);
    let (s_lo, s_hi) = min_max(&single);
    if out.json {
        println!(
            "{}",
            serde_json::json!({"bench": "mesh_handoff", "messages": n, "runs": runs,
                "calls_of_many_per_sec": b, "calls_of_many_min": b_lo, "calls_of_many_max": b_hi,
                "call_per_message_per_sec": s1, "call_per_message_min": s_lo, "call_per_message_max": s_hi,
                "ratio": b / s1})
        );
    } else {
        println!(
            "  handoff   {n} held messages to their new home as the relay stops (medians of {runs}): calls of many {b:>8.0}/s ({b_lo:.0}–{b_hi:.0})   a call per message {s1:>8.0}/s ({s_lo:.0}–{s_hi:.0})   ratio {:.1}",
            b / s1
        );
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
        if n == 1000 {
            record(
                "ring",
                "max share / mean at 1000 relays (vs ideal 1.0)",
                max,
                1.0,
                false,
                1.05,
            );
            record(
                "ring",
                "moved on join x (N+1) at 1000 relays (vs ideal 1.0)",
                join_ratio,
                1.0,
                false,
                1.1,
            );
            record(
                "ring",
                "lookup ns at 1000 relays (vs goal 1000 ns)",
                ns,
                1000.0,
                false,
                1.0,
            );
        }
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
    ring_lookups(&a, out);
    Ok(())
}

/// The home lookup as the relay makes it for every message it routes
/// (`Ring::home` by namespace and name): computed every time, against the
/// ring's cache of homes found, over `working` distinct recipients asked
/// in a pseudo-random order. The cache is warmed by one pass first: the
/// figure is a ring that has served a while, as a live set does between
/// changes.
fn ring_lookups(a: &RingArgs, out: &Output) {
    use swb_ring::Ring;
    if !out.json {
        println!();
        println!(
            "home lookup by name, as the relay routes a message: ns per lookup, median of {} runs (min-max); caching from {} relays",
            a.runs,
            swb_ring::CACHE_MIN_RELAYS
        );
        println!(
            "{:>6} {:>10} {:>22} {:>22} {:>10}",
            "relays", "recipients", "computed", "cached", "ratio"
        );
    }
    for n in [10usize, 32, 100, 1000, 4000] {
        let r = Ring::new((0..n).map(|i| format!("relay-{i:04}")));
        let sets = std::iter::successors(Some(1_000usize), |w| Some(w * 10));
        for working in sets.take_while(|w| *w <= a.max_recipients.max(1_000)) {
            let names: Vec<String> = (0..working).map(|i| format!("peer-{i}")).collect();
            // An LCG over the working set: every name, no pattern the
            // cache or the CPU could predict.
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let order: Vec<u32> = (0..a.lookups)
                .map(|_| {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((x >> 33) % working as u64) as u32
                })
                .collect();
            for name in &names {
                std::hint::black_box(r.home("bench", name));
            }
            let time = |cache: bool| {
                let t = Instant::now();
                let mut acc = 0usize;
                for &i in &order {
                    let name = &names[i as usize];
                    let home = if cache {
                        r.home("bench", name)
                    } else {
                        r.home_computed("bench", name)
                    };
                    acc = acc.wrapping_add(home.map_or(0, str::len));
                }
                std::hint::black_box(acc);
                t.elapsed().as_nanos() as f64 / order.len() as f64
            };
            let (mut computed, mut cached) = (Vec::new(), Vec::new());
            for _ in 0..a.runs {
                computed.push(time(false));
                cached.push(time(true));
            }
            let ratios: Vec<f64> = cached.iter().zip(&computed).map(|(c, p)| c / p).collect();
            let (c_lo, c_hi) = min_max(&computed);
            let (k_lo, k_hi) = min_max(&cached);
            let (r_lo, r_hi) = min_max(&ratios);
            let (c_med, k_med, r_med) = (
                median(computed.clone()),
                median(cached.clone()),
                median(ratios.clone()),
            );
            if n == 1000 && working == 10_000 {
                record(
                    "ring",
                    "home lookup ns, 1000 relays, 10 000 recipients, cached (vs computed)",
                    k_med,
                    c_med,
                    false,
                    0.2,
                );
            }
            if out.json {
                println!(
                    "{}",
                    serde_json::json!({"bench": "ring_lookup", "relays": n, "recipients": working,
                        "computed_ns": c_med, "computed_ns_min": c_lo, "computed_ns_max": c_hi,
                        "cached_ns": k_med, "cached_ns_min": k_lo, "cached_ns_max": k_hi,
                        "cached_over_computed": r_med, "ratio_min": r_lo, "ratio_max": r_hi})
                );
            } else {
                println!(
                    "{n:>6} {working:>10} {:>22} {:>22} {:>10}",
                    format!("{c_med:.0} ({c_lo:.0}-{c_hi:.0})"),
                    format!("{k_med:.0} ({k_lo:.0}-{k_hi:.0})"),
                    format!("{r_med:.2} ({r_lo:.2}-{r_hi:.2})"),
                );
            }
        }
    }
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

/// Smallest and largest of `v` (the spread runs report).
fn min_max(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// (a) Two quinn endpoints, the relay's TLS (1.3, ring, same certificate
/// type) and default transport settings.
async fn direct_once(identity: &Identity, bytes: u64) -> Result<Duration> {
    let tls = identity.server_config(&[b"bench"])?;
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));
    // Same path MTU bounds as relay and daemon.
    let transport = || {
        let mut t = quinn::TransportConfig::default();
        t.path_mtu_upper_bound(Some(swb_quic::carrier::path_mtu_hook()));
        Arc::new(t)
    };
    server_cfg.transport_config(transport());
    // Same socket settings as relay and daemon.
    let server = quinn::Endpoint::new(
        swb_quic::carrier::endpoint_config(),
        Some(server_cfg),
        swb_relay::udp_socket("127.0.0.1:0".parse()?)?,
        Arc::new(quinn::TokioRuntime),
    )?;
    let addr = server.local_addr()?;
    let ctls = Trust::Fingerprint(identity.fingerprint()).rustls_config(&[b"bench"])?;
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(ctls)?,
    ));
    client_cfg.transport_config(transport());
    let mut client = quinn::Endpoint::new(
        swb_quic::carrier::endpoint_config(),
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
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((s, _)) = sink.accept().await else {
                return;
            };
            let _ = s.set_nodelay(true);
            conns.spawn(async move {
                let (r, w) = s.into_split();
                let _ = drain(r, w).await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    let (rc, key) = bench_relay_config(identity.clone())?;
    let relay = Relay::spawn(rc).await?;
    let dir = tempfile::tempdir()?;
    let expose = vec![Exposure {
        port: 9,
        target: sink_addr.to_string(),
    }];
    let sinkd = bench_daemon(&relay, &key, "sink", dir.path(), expose).await?;
    let source = bench_daemon(&relay, &key, "source", dir.path(), Vec::new()).await?;

    if !out.json {
        println!(
            "single-stream goodput, {} MiB per run, {} runs per path (loopback, release build recommended)",
            a.bytes >> 20,
            a.runs
        );
    }
    let mut direct = Vec::new();
    let mut relayed = Vec::new();
    for run in 0..a.warmup + a.runs {
        let d = direct_once(&identity, a.bytes).await?;
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
        if run < a.warmup {
            if !out.json {
                println!("  warm-up run (not counted)");
            }
            continue;
        }
        let i = run - a.warmup;
        direct.push(mb_s(a.bytes, d));
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
    record(
        "stream",
        "single-stream goodput MB/s (vs direct quinn)",
        r,
        d,
        true,
        0.5,
    );
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

// ---- accept and idle: the relay as many clients see it ----

use bytes::BytesMut;
use swb_wire::{Frame, FrameReader, Hello, Preamble, PROTOCOL_VERSION};

/// One authenticated, registered client connection (what a daemon keeps).
struct Attached {
    _conn: quinn::Connection,
    _send: quinn::SendStream,
    _recv: quinn::RecvStream,
}

fn client_transport() -> Arc<quinn::TransportConfig> {
    // As a daemon: keep-alive 4 s, dead after 12 s.
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(4)));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(12)).ok());
    t.max_concurrent_bidi_streams(0u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    Arc::new(t)
}

fn client_config(fingerprint: &str) -> Result<quinn::ClientConfig> {
    let tls = Trust::Fingerprint(fingerprint.to_string()).rustls_config(&[swb_wire::ALPN])?;
    let mut c = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    c.transport_config(client_transport());
    Ok(c)
}

/// Connects; with `hello`, registers as `name` and waits for `Welcome`.
async fn attach(
    ep: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    addr: std::net::SocketAddr,
    hello: Option<(&str, &str)>,
) -> Result<Attached> {
    let conn = ep.connect_with(cfg.clone(), addr, "localhost")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    if let Some((key, name)) = hello {
        let mut b = BytesMut::new();
        Preamble {
            version: PROTOCOL_VERSION,
        }
        .encode(&mut b);
        Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            key: key.to_string(),
            name: name.to_string(),
            agent: "swbd-bench".into(),
            // Each attachment its own daemon, as far as the relay knows.
            instance: fastrand::u64(..),
        })
        .encode(&mut b)?;
        send.write_all(&b).await?;
        let mut r = FrameReader::new();
        let mut preamble = false;
        loop {
            if !preamble {
                preamble = r.preamble()?.is_some();
            }
            if preamble {
                match r.next_frame()? {
                    Some(Frame::Welcome(_)) => break,
                    Some(Frame::Refused(x)) => anyhow::bail!("refused: {x}"),
                    Some(_) => continue,
                    None => {}
                }
            }
            let buf = r.buf();
            buf.reserve(4096);
            if recv.read_buf(buf).await? == 0 {
                anyhow::bail!("closed before Welcome");
            }
        }
    } else {
        // Bare baseline: the stream must carry a byte to be seen.
        send.write_all(b"x").await?;
    }
    Ok(Attached {
        _conn: conn,
        _send: send,
        _recv: recv,
    })
}

/// Client endpoints on several loopback source addresses.
fn client_endpoints(n: usize) -> Result<Vec<quinn::Endpoint>> {
    (0..n.max(1))
        .map(|i| {
            let ip = std::net::Ipv4Addr::new(127, 0, (i / 250) as u8, (i % 250) as u8 + 2);
            let sock = swb_relay::udp_socket(std::net::SocketAddr::new(ip.into(), 0))?;
            Ok(quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                sock,
                Arc::new(quinn::TokioRuntime),
            )?)
        })
        .collect()
}

/// Attempts per client in [`open_many`]: a handshake lost in a burst of
/// hundreds (a UDP datagram dropped by a full socket buffer) must not end
/// the run; it is tried again and counted.
const ATTACH_TRIES: usize = 3;

/// Opens `n` connections, `inflight` at a time; returns them, the
/// connections per second and how many attempts failed and were retried.
async fn open_many(
    eps: &[quinn::Endpoint],
    cfg: &quinn::ClientConfig,
    addr: std::net::SocketAddr,
    key: Option<&str>,
    n: usize,
    inflight: usize,
    prefix: &str,
) -> Result<(Vec<Attached>, f64, usize)> {
    let mut out = Vec::with_capacity(n);
    let mut tries = vec![0usize; n];
    let mut retried = 0;
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let spawn = |set: &mut tokio::task::JoinSet<_>, i: usize| {
        let ep = eps[i % eps.len()].clone();
        let cfg = cfg.clone();
        let key = key.map(str::to_string);
        let name = format!("{prefix}{i}");
        set.spawn(async move {
            let r = attach(&ep, &cfg, addr, key.as_deref().map(|k| (k, name.as_str()))).await;
            (i, r)
        });
    };
    let mut next = 0usize;
    while out.len() < n {
        while set.len() < inflight && next < n {
            spawn(&mut set, next);
            tries[next] += 1;
            next += 1;
        }
        match set.join_next().await {
            Some(r) => match r? {
                (_, Ok(a)) => out.push(a),
                (i, Err(e)) if tries[i] < ATTACH_TRIES => {
                    tracing::debug!("attach {i} failed, trying again: {e:#}");
                    retried += 1;
                    tries[i] += 1;
                    spawn(&mut set, i);
                }
                (i, Err(e)) => {
                    return Err(e.context(format!("client {i}: {ATTACH_TRIES} attempts failed")))
                }
            },
            None => break,
        }
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    Ok((out, rate, retried))
}

/// The outcome of a reconnect storm.
struct Storm {
    /// Clients that got back (their connections).
    held: Vec<Attached>,
    /// Clients that were not back when the storm was given up.
    missing: usize,
    /// Connection attempts that failed (and were retried).
    failed_attempts: usize,
    /// Per client that got back: time from the storm's start, sorted.
    back: Vec<Duration>,
}

impl Storm {
    fn p(&self, q: f64) -> f64 {
        self.back
            .get(((self.back.len() as f64 - 1.0) * q).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    }
}

/// The wait a busy relay's refusal asks for (`swb_wire::busy`), if `e` is one.
fn busy_hint(e: &anyhow::Error) -> Option<Duration> {
    swb_quic::busy_hint(e.downcast_ref::<quinn::ConnectionError>()?)
}

/// A reconnect storm: `n` clients connect at the same moment, and each
/// retries a failed attempt the way a daemon does (10 s per attempt, then a
/// jittered backoff from 200 ms, doubling, at most 10 s, or a random point
/// of the wait a busy relay's refusal asks for) until `give_up`.
async fn storm(
    eps: &[quinn::Endpoint],
    cfg: &quinn::ClientConfig,
    addr: std::net::SocketAddr,
    key: Option<&str>,
    n: usize,
    prefix: &str,
    give_up: Duration,
) -> Storm {
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let ep = eps[i % eps.len()].clone();
        let cfg = cfg.clone();
        let key = key.map(str::to_string);
        let name = format!("{prefix}{i}");
        set.spawn(async move {
            let mut failed = 0usize;
            let mut delay = Duration::from_millis(200);
            loop {
                let hello = key.as_deref().map(|k| (k, name.as_str()));
                let attempt =
                    tokio::time::timeout(Duration::from_secs(10), attach(&ep, &cfg, addr, hello));
                // A busy relay's hint of when to come back, taken as the
                // daemon takes it: a random point of its window.
                let hinted = match attempt.await {
                    Ok(Ok(a)) => return (Some(a), failed, start.elapsed()),
                    Ok(Err(e)) => busy_hint(&e),
                    Err(_) => None,
                };
                failed += 1;
                if start.elapsed() > give_up {
                    return (None, failed, start.elapsed());
                }
                let wait = match hinted {
                    Some(w) => w.mul_f64(fastrand::f64()),
                    None => delay.mul_f64(0.5 + 0.5 * fastrand::f64()),
                };
                tokio::time::sleep(wait).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        });
    }
    let mut s = Storm {
        held: Vec::with_capacity(n),
        missing: 0,
        failed_attempts: 0,
        back: Vec::with_capacity(n),
    };
    while let Some(r) = set.join_next().await {
        match r {
            Ok((Some(a), failed, t)) => {
                s.held.push(a);
                s.failed_attempts += failed;
                s.back.push(t);
            }
            Ok((None, failed, _)) => {
                s.missing += 1;
                s.failed_attempts += failed;
            }
            Err(_) => s.missing += 1,
        }
    }
    s.back.sort();
    s
}

/// A bare quinn server with the relay's TLS: accepts and holds connections.
async fn bare_server(
    identity: &Identity,
    listen: std::net::SocketAddr,
) -> Result<(quinn::Endpoint, tokio::task::JoinHandle<()>)> {
    let tls = identity.server_config(&[swb_wire::ALPN])?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(15)).ok());
    sc.transport_config(Arc::new(t));
    let ep = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(sc),
        swb_relay::udp_socket(listen)?,
        Arc::new(quinn::TokioRuntime),
    )?;
    let server = ep.clone();
    let task = tokio::spawn(async move {
        let mut held = tokio::task::JoinSet::new();
        while let Some(inc) = server.accept().await {
            held.spawn(async move {
                if let Ok(c) = inc.await {
                    if let Ok((_s, _r)) = c.accept_bi().await {
                        c.closed().await;
                    }
                }
            });
        }
    });
    Ok((ep, task))
}

#[derive(Debug, Args)]
pub(crate) struct AcceptArgs {
    /// Connections per measurement.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
}

/// Handshake + auth + registration rate of the relay vs. bare quinn
/// handshakes, at 4 and 32 in flight; then a reconnect storm.
pub(crate) async fn accept(a: AcceptArgs, out: &Output) -> Result<()> {
    let identity = Identity::ephemeral()?;
    let (rc, key) = bench_relay_config(identity.clone())?;
    let relay = Relay::spawn(rc).await?;
    let (bare, bare_task) = bare_server(&identity, "127.0.0.1:0".parse()?).await?;
    let cfg = client_config(relay.fingerprint())?;
    let eps = client_endpoints(4)?;
    let mut rows = Vec::new();
    for inflight in [4usize, 32] {
        let (held, ours, ours_retried) = open_many(
            &eps,
            &cfg,
            relay.local_addr(),
            Some(&key),
            a.connections,
            inflight,
            &format!("a{inflight}-"),
        )
        .await?;
        drop(held);
        let (held, base, base_retried) = open_many(
            &eps,
            &cfg,
            bare.local_addr()?,
            None,
            a.connections,
            inflight,
            "",
        )
        .await?;
        drop(held);
        rows.push((inflight, ours, base, ours_retried + base_retried));
    }
    // Reconnect storm: every client attached, then all back at once.
    let (held, _, _) = open_many(
        &eps,
        &cfg,
        relay.local_addr(),
        Some(&key),
        a.connections,
        256,
        "storm-",
    )
    .await?;
    drop(held);
    let st = storm(
        &eps,
        &cfg,
        relay.local_addr(),
        Some(&key),
        a.connections,
        "storm-",
        Duration::from_secs(120),
    )
    .await;
    let st = Storm {
        held: Vec::new(),
        ..st
    };
    for (inflight, ours, base, _) in &rows {
        record(
            "accept",
            &format!("connections/s, {inflight} in flight (vs bare quinn)"),
            *ours,
            *base,
            true,
            0.9,
        );
    }
    if out.json {
        for (inflight, ours, base, retried) in &rows {
            println!(
                "{}",
                serde_json::json!({"bench": "accept", "in_flight": inflight, "relay_per_sec": ours, "bare_quinn_per_sec": base, "ratio": ours / base, "attempts_retried": retried})
            );
        }
        println!(
            "{}",
            serde_json::json!({"bench": "reconnect_storm", "clients": a.connections, "back": st.back.len(), "missing": st.missing,
                "failed_attempts": st.failed_attempts, "p50_ms": st.p(0.5), "p99_ms": st.p(0.99)})
        );
    } else {
        println!("accept: full handshake + Hello + registration at the relay vs. bare quinn handshakes (same TLS), {} connections", a.connections);
        for (inflight, ours, base, retried) in &rows {
            println!(
                "  {inflight:>2} in flight: relay {ours:>7.0}/s   bare quinn {base:>7.0}/s   ratio {:.2} (goal >= 0.9){}",
                ours / base,
                if *retried > 0 {
                    format!("   ({retried} failed attempts retried)")
                } else {
                    String::new()
                }
            );
        }
        println!(
            "  reconnect storm: {} clients at once -> {} back, {} missing, {} refused/failed attempts retried; back after p50 {:.0} ms, p99 {:.0} ms",
            a.connections,
            st.back.len(),
            st.missing,
            st.failed_attempts,
            st.p(0.5),
            st.p(0.99)
        );
    }
    for e in &eps {
        e.close(0u32.into(), b"done");
    }
    bare.close(0u32.into(), b"done");
    bare_task.abort();
    relay.shutdown();
    relay.join().await;
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct IdleArgs {
    /// Idle clients to hold.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// How long to measure keep-alive CPU once all are attached.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    settle: Duration,
}

/// `swbd-bench relay-process`: the relay of the idle scenario in its own
/// process, set up as `swbd relay --dev --listen 127.0.0.1:0 --http-listen
/// off` does (same library, same allocator); prints its address and
/// fingerprint the way `swbd relay` does.
#[derive(Debug, Args)]
pub(crate) struct RelayProcessArgs {
    /// Where the dev certificate is kept.
    #[arg(long)]
    data_dir: std::path::PathBuf,
    /// The keys file.
    #[arg(long)]
    keys: std::path::PathBuf,
    /// As `swbd relay --handshake-threads`.
    #[arg(long, default_value_t = 1)]
    handshake_threads: usize,
    /// As `swbd relay --shards`.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Keep the per-address limits (new connections, first-contact
    /// Initials) as deployed; off by default: `idle` attaches thousands of
    /// clients from few addresses.
    #[arg(long)]
    deployed_limits: bool,
    /// Mail in memory only (`--durability memory`) instead of the store
    /// in the data dir.
    #[arg(long)]
    memory_mail: bool,
    /// Mailboxes as deep as a NATS subscription's default pending limits
    /// (65 536 messages, 64 MiB), as `rate` has them: senders whose mail
    /// is accepted faster than receivers acknowledge it (mail in memory)
    /// are not refused `mailbox_full` at the default 1 000.
    #[arg(long)]
    deep_mailboxes: bool,
}

pub(crate) async fn relay_process_main(a: RelayProcessArgs) -> Result<()> {
    let identity = Identity::dev_in_dir(&a.data_dir, &[])?;
    let mut config = RelayConfig::new(
        "127.0.0.1:0".parse()?,
        identity,
        KeySource::File(a.keys.clone()),
    );
    config.http_listen = HttpListen::Off;
    config.state_dir = Some(a.data_dir.clone());
    // As `bench_relay_config`: capacity, not the per-address policy.
    if !a.deployed_limits {
        config.connections_per_ip = None;
        config.initials.per_ip = None;
    }
    config.key_send_rate = Some(UNREACHED_SEND_RATE);
    if a.memory_mail {
        config.durability = Some(swb_relay::Durability::Memory);
    }
    if a.deep_mailboxes {
        config.limits.messages = 65_536;
        config.limits.bytes = 64 * 1024 * 1024;
    }
    config.handshake_threads = a.handshake_threads;
    config.shards = a.shards;
    let relay = Relay::spawn(config).await?;
    println!("relay listening on {} (udp)", relay.local_addr());
    println!("fingerprint {}", relay.fingerprint());
    tokio::signal::ctrl_c().await?;
    relay.shutdown();
    relay.join().await;
    Ok(())
}

/// A relay in its own process (`relay-process`, more flags in `extra`),
/// with a fresh keys file of one key in a temp dir, and daemon configs
/// that reach it with that key.
pub(crate) struct RelayProc {
    _child: Child,
    /// The relay process (or the wrapper's, under `SWB_BENCH_WRAP`).
    pub(crate) pid: u32,
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) fingerprint: String,
    key: String,
    /// Keys file, the relay's data dir, daemons' sockets; for the caller too.
    pub(crate) dir: tempfile::TempDir,
}

impl RelayProc {
    pub(crate) async fn start(extra: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let new = keys::generate("bench", "bench")?;
        let keys_path = dir.path().join("keys.toml");
        KeysFile {
            keys: vec![new.entry],
        }
        .save(&keys_path)?;
        let data = dir.path().join("relay");
        let mut args = vec![
            "relay-process",
            "--data-dir",
            data.to_str().context("path")?,
            "--keys",
            keys_path.to_str().context("path")?,
        ];
        args.extend_from_slice(extra);
        let mut addr: Option<std::net::SocketAddr> = None;
        let (child, (addr, fingerprint), pid) = spawn_self(&args, |l| {
            if let Some(x) = l.strip_prefix("relay listening on ") {
                addr = x.split_whitespace().next().and_then(|a| a.parse().ok());
            }
            let fp = l.strip_prefix("fingerprint ")?;
            Some((addr?, fp.to_string()))
        })
        .await?;
        Ok(Self {
            _child: child,
            pid,
            addr,
            fingerprint,
            key: new.key,
            dir,
        })
    }

    /// A daemon `name` of this relay's key (control socket in the temp dir).
    pub(crate) fn daemon_config(&self, name: &str) -> DaemonConfig {
        let mut c = DaemonConfig::new(
            self.addr.to_string(),
            Trust::Fingerprint(self.fingerprint.clone()),
            name,
            ApiKey::new(self.key.clone()),
            self.dir.path().join(format!("{name}.sock")),
        );
        c.connect_timeout = Duration::from_secs(10);
        c
    }
}

/// `swbd-bench bare-server`: a bare quinn server process for the idle
/// baseline (prints its address and fingerprint).
#[derive(Debug, Args)]
pub(crate) struct BareServerArgs {}

pub(crate) async fn bare_server_main(_a: BareServerArgs) -> Result<()> {
    let identity = Identity::ephemeral()?;
    let (ep, task) = bare_server(&identity, "127.0.0.1:0".parse()?).await?;
    println!("listening {} {}", ep.local_addr()?, identity.fingerprint());
    tokio::signal::ctrl_c().await?;
    task.abort();
    Ok(())
}

fn proc_rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

pub(crate) fn proc_cpu_ticks(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    Ok(stat_ticks(&s)?.1)
}

/// The command name and CPU ticks (utime + stime) of a `/proc/…/stat`
/// line.
fn stat_ticks(s: &str) -> Result<(&str, u64)> {
    // Fields after the command name (which may contain spaces).
    let (head, rest) = s.rsplit_once(") ").context("stat")?;
    let name = head.split_once(" (").context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok((name, utime + stime))
}

/// CPU ticks (utime + stime) of each thread of `pid`: (thread id, name,
/// ticks).
pub(crate) fn thread_cpu_ticks(pid: u32) -> Result<Vec<(u32, String, u64)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let e = e?;
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread that ended between the listing and the read is skipped.
        let Ok(s) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (name, ticks) = stat_ticks(&s)?;
        out.push((tid, name.to_string(), ticks));
    }
    Ok(out)
}

struct Child {
    child: tokio::process::Child,
    /// Drains the child's stdout; ends with this.
    drain: tokio::task::JoinHandle<()>,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        self.drain.abort();
    }
}

/// Starts `swbd ARGS` and reads stdout until `pred` extracts what we need.
async fn spawn_self<T>(
    args: &[&str],
    mut pred: impl FnMut(&str) -> Option<T>,
) -> Result<(Child, T, u32)> {
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe()?;
    // `SWB_BENCH_WRAP="heaptrack -o /tmp/relay"` runs the relay child
    // (`relay-process`) under a profiler (words split on whitespace; the
    // child's own line comes last). Only the relay: a baseline under the
    // same profiler would overwrite its output. Memory figures read the
    // wrapper's process then and mean nothing.
    let wrap = match args.first() {
        Some(&"relay-process") => std::env::var("SWB_BENCH_WRAP").unwrap_or_default(),
        _ => String::new(),
    };
    let mut words = wrap.split_whitespace();
    let mut cmd = match words.next() {
        Some(w) => {
            let mut c = tokio::process::Command::new(w);
            c.args(words).arg(exe);
            c
        }
        None => tokio::process::Command::new(exe),
    };
    let mut child = cmd
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("child pid")?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(l) = lines.next_line().await? {
            if let Some(v) = pred(&l) {
                return anyhow::Ok(v);
            }
        }
        anyhow::bail!("the child ended early")
    })
    .await??;
    // Keep draining stdout so the child never blocks on it.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((Child { child, drain }, found, pid))
}

/// Holds `n` clients on `addr`: KiB per client and CPU % of the server
/// process for keep-alives, connections per second while attaching, and a
/// reconnect storm of all of them.
async fn hold(
    pid: u32,
    addr: std::net::SocketAddr,
    fingerprint: &str,
    key: Option<&str>,
    n: usize,
    settle: Duration,
) -> Result<Held> {
    let before = proc_rss_kib(pid)?;
    let cfg = client_config(fingerprint)?;
    let eps = client_endpoints(n / 5000 + 1)?;
    let (held, rate, _) = open_many(&eps, &cfg, addr, key, n, 64, "idle-").await?;
    // Let allocations settle, then measure memory and keep-alive CPU.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = proc_rss_kib(pid)?;
    let t0 = proc_cpu_ticks(pid)?;
    tokio::time::sleep(settle).await;
    let ticks = proc_cpu_ticks(pid)?.saturating_sub(t0);
    let cpu = ticks as f64 / 100.0 / settle.as_secs_f64() * 100.0;
    // Then all of them drop and come back at once (a network blip).
    drop(held);
    let s = storm(&eps, &cfg, addr, key, n, "idle-", Duration::from_secs(120)).await;
    drop(s.held);
    for e in &eps {
        e.close(0u32.into(), b"done");
    }
    Ok(Held {
        kib: (after.saturating_sub(before)) as f64 / n as f64,
        cpu,
        rate,
        storm: Storm {
            held: Vec::new(),
            ..s
        },
    })
}

/// What [`hold`] measured.
struct Held {
    /// Server RSS growth per client.
    kib: f64,
    /// Server CPU % for keep-alives.
    cpu: f64,
    /// Attach rate.
    rate: f64,
    /// All clients reconnecting at once afterwards.
    storm: Storm,
}

/// Memory and keep-alive CPU per idle, authenticated client of a relay
/// process vs. a bare quinn server process holding the same connections.
pub(crate) async fn idle(a: IdleArgs, out: &Output) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys_path = dir.path().join("keys.toml");
    let new = keys::generate("bench", "bench")?;
    KeysFile {
        keys: vec![new.entry],
    }
    .save(&keys_path)?;
    let data = dir.path().join("relay");
    let (relay, (addr, fp), relay_pid) = {
        let mut addr = None;
        spawn_self(
            &[
                "relay-process",
                "--data-dir",
                &data.display().to_string(),
                "--keys",
                &keys_path.display().to_string(),
            ],
            |l| {
                if let Some(rest) = l.strip_prefix("relay listening on ") {
                    addr = rest
                        .split_whitespace()
                        .next()
                        .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
                }
                match (l.strip_prefix("fingerprint "), addr) {
                    (Some(fp), Some(a)) => Some((a, fp.trim().to_string())),
                    _ => None,
                }
            },
        )
        .await?
    };
    let ours = hold(relay_pid, addr, &fp, Some(&new.key), a.clients, a.settle).await?;
    drop(relay);
    let (bare, (baddr, bfp), bare_pid) = spawn_self(&["bare-server"], |l| {
        let mut it = l.strip_prefix("listening ")?.split_whitespace();
        let a = it.next()?.parse::<std::net::SocketAddr>().ok()?;
        Some((a, it.next()?.to_string()))
    })
    .await?;
    let bare = {
        let h = hold(bare_pid, baddr, &bfp, None, a.clients, a.settle).await?;
        drop(bare);
        h
    };
    let per_gib = |kib: f64| {
        if kib > 0.0 {
            1024.0 * 1024.0 / kib
        } else {
            f64::INFINITY
        }
    };
    let ratio = per_gib(ours.kib) / per_gib(bare.kib);
    record(
        "idle",
        "clients per GiB (vs bare quinn)",
        per_gib(ours.kib),
        per_gib(bare.kib),
        true,
        1.5,
    );
    record(
        "idle",
        "KiB per idle client (vs goal 15)",
        ours.kib,
        15.0,
        false,
        1.0,
    );
    record(
        "accept",
        &format!("storm: clients back of {} at once (vs all)", a.clients),
        ours.storm.back.len() as f64,
        a.clients as f64,
        true,
        1.0,
    );
    record(
        "accept",
        "storm: p99 ms until back (vs bare quinn)",
        ours.storm.p(0.99),
        bare.storm.p(0.99),
        false,
        1.0,
    );
    if out.json {
        let storm = |s: &Storm| {
            serde_json::json!({"back": s.back.len(), "missing": s.missing, "failed_attempts": s.failed_attempts,
                "p50_ms": s.p(0.5), "p99_ms": s.p(0.99), "max_ms": s.p(1.0)})
        };
        println!(
            "{}",
            serde_json::json!({"bench": "idle", "clients": a.clients, "relay_kib_per_client": ours.kib,
                "bare_quinn_kib_per_client": bare.kib, "clients_per_gib_ratio": ratio,
                "relay_keepalive_cpu_percent": ours.cpu, "bare_keepalive_cpu_percent": bare.cpu,
                "attach_per_sec": ours.rate, "relay_storm": storm(&ours.storm), "bare_quinn_storm": storm(&bare.storm)})
        );
    } else {
        println!("idle: {} authenticated idle clients held by a relay process vs. a bare quinn server process", a.clients);
        println!(
            "  memory    relay {:.1} KiB/client   bare quinn {:.1} KiB/client   clients per GiB ratio {ratio:.2} (goals: <= 15 KiB, >= 1.5)",
            ours.kib, bare.kib
        );
        println!(
            "  keep-alive CPU  relay {:.1}%   bare quinn {:.1}%   (attached at {:.0}/s)",
            ours.cpu, bare.cpu, ours.rate
        );
        for (who, s) in [("relay", &ours.storm), ("bare quinn", &bare.storm)] {
            println!(
                "  reconnect storm ({who}): all {} at once -> {} back, {} missing, {} failed attempts retried; back after p50 {:.0} ms, p99 {:.0} ms, last {:.0} ms",
                a.clients,
                s.back.len(),
                s.missing,
                s.failed_attempts,
                s.p(0.5),
                s.p(0.99),
                s.p(1.0)
            );
        }
    }
    Ok(())
}

// ---- latency: request → reply, against nats-server ----

#[derive(Debug, Args)]
pub(crate) struct LatencyArgs {
    /// Requests per measurement.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Request and reply size in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Runs, each measuring every contender in turn; medians are reported,
    /// with the spread of the per-run ratios.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// Round trips in an HdrHistogram (1 µs to 60 s, 3 significant digits).
struct Hist(hdrhistogram::Histogram<u64>);

impl Hist {
    fn of(times: &[Duration]) -> Result<Self> {
        let mut h = hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3)?;
        for t in times {
            h.saturating_record((t.as_micros() as u64).max(1));
        }
        Ok(Self(h))
    }
}

/// The `q` quantile of `h` in milliseconds.
fn pct(h: &Hist, q: f64) -> f64 {
    h.0.value_at_quantile(q) as f64 / 1000.0
}

fn seq_body(seq: u64, size: usize) -> Vec<u8> {
    let mut b = vec![0x5au8; size.max(8)];
    b[..8].copy_from_slice(&seq.to_be_bytes());
    b
}

fn seq_of(b: &[u8]) -> u64 {
    b.get(..8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(u64::MAX)
}

/// Takes messages from a daemon over one pipelined control connection (JSON
/// lines or compact), acknowledging each batch together with the next
/// `recv`.
struct Taker {
    req: Tx,
    rep: Rx,
    acked: bool,
}

impl Taker {
    const WAIT: Duration = Duration::from_secs(30);
    const MAX: usize = 1000;

    async fn new(c: Client, compact: bool) -> Result<Self> {
        let (mut req, rep) = pipe(c, compact).await?;
        req.recv(Self::WAIT, Self::MAX).await?;
        req.flush().await?;
        Ok(Self {
            req,
            rep,
            acked: false,
        })
    }

    /// The bodies of the next batch (possibly none after the long poll's
    /// 30 s).
    async fn next(&mut self) -> Result<Vec<bytes::Bytes>> {
        if std::mem::take(&mut self.acked) {
            self.rep.acked().await?;
        }
        let (ids, bodies) = self.rep.messages().await?;
        if !ids.is_empty() {
            self.req.ack(&ids).await?;
            self.acked = true;
        }
        self.req.recv(Self::WAIT, Self::MAX).await?;
        self.req.flush().await?;
        Ok(bodies)
    }
}

/// Reads the relay's answers to pipelined sends until the connection ends;
/// fails on the first refusal.
async fn expect_sent(mut rep: Rx) -> Result<()> {
    loop {
        anyhow::ensure!(rep.sent_or_status().await?, "a status answer among sends");
    }
}

/// Request → reply through a relay between two daemons: `a` asks, `b`
/// answers each request with the same bytes. `inflight` requests are
/// outstanding at any time (a new one leaves as each reply arrives), as in
/// the NATS run. Each side takes messages on one control connection and
/// sends on another, both pipelined.
#[allow(clippy::too_many_arguments)]
async fn ours_latency(
    a_ctl: &std::path::Path,
    b_ctl: std::path::PathBuf,
    a_name: &str,
    n: usize,
    size: usize,
    inflight: usize,
    compact: bool,
) -> Result<Vec<Duration>> {
    let to = a_name.to_string();
    let mut taker = Taker::new(Client::connect(&b_ctl).await?, compact).await?;
    let (mut req, rep) = pipe(Client::connect(&b_ctl).await?, compact).await?;
    let responder = tokio::spawn(async move {
        let answer = async {
            loop {
                for body in taker.next().await? {
                    req.send(&to, &body).await?;
                }
                req.flush().await?;
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        };
        tokio::try_join!(answer, expect_sent(rep)).map(|_| ())
    });
    let mut taker = Taker::new(Client::connect(a_ctl).await?, compact).await?;
    let (mut req, rep) = pipe(Client::connect(a_ctl).await?, compact).await?;
    let sent = tokio::spawn(expect_sent(rep));
    // The requester is a task of its own, as the responder is (and as both
    // ends are in the other contenders).
    let requester = tokio::spawn(async move {
        let mut sent_at: HashMap<u64, Instant> = HashMap::new();
        let mut times = Vec::with_capacity(n);
        let mut next = 0u64;
        while (next as usize) < n.min(inflight) {
            sent_at.insert(next, Instant::now());
            req.send(RESPONDER, &seq_body(next, size)).await?;
            next += 1;
        }
        req.flush().await?;
        while times.len() < n {
            let msgs = tokio::time::timeout(Duration::from_secs(30), taker.next())
                .await
                .context("no reply")??;
            for body in msgs {
                if let Some(t) = sent_at.remove(&seq_of(&body)) {
                    times.push(t.elapsed());
                }
                if (next as usize) < n {
                    sent_at.insert(next, Instant::now());
                    req.send(RESPONDER, &seq_body(next, size)).await?;
                    next += 1;
                }
            }
            req.flush().await?;
        }
        anyhow::Ok(times)
    });
    let times = requester.await;
    responder.abort();
    sent.abort();
    let mut times = times??;
    times.sort();
    Ok(times)
}

/// Awaits the relay's answers to sends submitted with the Rust API, in
/// order; fails on the first refusal.
async fn expect_accepted(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<swb_daemon::PendingSend>,
) -> Result<()> {
    while let Some(mut p) = rx.recv().await {
        p.answer().await?;
    }
    Ok(())
}

/// Where the two ends of a request → reply exchange run: each a task of
/// its own on the bench's runtime (with the in-process relay, if any), or
/// each on a runtime of its own ([`Program`]), as two programs would.
#[derive(Clone)]
struct Ends {
    requester: tokio::runtime::Handle,
    responder: tokio::runtime::Handle,
}

impl Ends {
    /// Both ends on the runtime this runs on.
    fn here() -> Self {
        let h = tokio::runtime::Handle::current();
        Self {
            requester: h.clone(),
            responder: h,
        }
    }
}

/// A program of its own for one end of an exchange: a single-threaded
/// tokio runtime on a thread of its own. What runs there is woken by its
/// own thread only, never stolen by a worker that the relay or the other
/// end left parked. (Multi-threaded runtimes per end, tokio's default of
/// one worker per core, were measured too: six workers on two cores, both
/// ours and NATS' figures were worse and noisier.)
struct Program {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Program {
    fn new(name: &str) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
                rt.shutdown_background();
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
        })
    }

    fn handle(&self) -> Result<tokio::runtime::Handle> {
        Ok(self.handle.clone())
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// [`ours_latency`] with the Rust API in the daemons' process instead of
/// the control socket; each end's loop runs where `ends` says (its daemon
/// should run there too).
async fn api_latency(
    a: &swb_daemon::DaemonHandle,
    b: &swb_daemon::DaemonHandle,
    a_name: &str,
    n: usize,
    size: usize,
    inflight: usize,
    ends: &Ends,
) -> Result<Vec<Duration>> {
    let wait = Duration::from_secs(30);
    let to = a_name.to_string();
    let (mut brx, btx) = (b.receiver(), b.sender());
    let responder = ends.responder.spawn(async move {
        let (check, answers) = tokio::sync::mpsc::unbounded_channel();
        let answer = async {
            loop {
                let msgs = brx.recv(1000, wait).await?;
                for m in &msgs {
                    check.send(btx.submit(&to, m.body.clone(), wait).await?)?;
                }
                brx.ack(&msgs.iter().map(|m| m.id).collect::<Vec<_>>())
                    .await?;
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        };
        tokio::try_join!(answer, expect_accepted(answers)).map(|_| ())
    });
    let (mut arx, atx) = (a.receiver(), a.sender());
    let requester = ends.requester.spawn(async move {
        let (check, answers) = tokio::sync::mpsc::unbounded_channel();
        let checker = tokio::spawn(expect_accepted(answers));
        let mut sent_at: HashMap<u64, Instant> = HashMap::new();
        let mut times = Vec::with_capacity(n);
        let mut next = 0u64;
        while (next as usize) < n.min(inflight) {
            sent_at.insert(next, Instant::now());
            check.send(atx.submit(RESPONDER, seq_body(next, size), wait).await?)?;
            next += 1;
        }
        while times.len() < n {
            let msgs = arx.recv(1000, wait).await?;
            anyhow::ensure!(!msgs.is_empty(), "no reply within {wait:?}");
            for m in &msgs {
                if let Some(t) = sent_at.remove(&seq_of(&m.body)) {
                    times.push(t.elapsed());
                }
                if (next as usize) < n {
                    sent_at.insert(next, Instant::now());
                    check.send(atx.submit(RESPONDER, seq_body(next, size), wait).await?)?;
                    next += 1;
                }
            }
            arx.ack(&msgs.iter().map(|m| m.id).collect::<Vec<_>>())
                .await?;
        }
        drop(check);
        checker.await??;
        anyhow::Ok(times)
    });
    let times = requester.await?;
    responder.abort();
    times
}

/// The responder's peer name in the latency benchmark.
const RESPONDER: &str = "responder";

/// One in-flight depth's measurements in `latency`.
struct LatencyRows {
    inflight: usize,
    /// The Rust API, the control socket and its compact form through the
    /// in-process relay.
    ours: Vec<Contender>,
    /// The Rust API through the relay process.
    relay_process: Contender,
    /// The Rust API with each end on its own runtime, through the relay
    /// process.
    apart: Contender,
    nats: Contender,
    /// NATS' two clients each on its own runtime.
    nats_apart: Contender,
    nats_tls: Contender,
    floor: Contender,
    /// The floor with its forwarder in a process of its own: the stack's
    /// floor for the relay-process rows.
    floor_process: Contender,
}

impl LatencyRows {
    /// Each of ours with the NATS run it is held against: ends apart
    /// against NATS' ends apart, the rest against NATS in the bench's
    /// runtime.
    fn compared(&self) -> impl Iterator<Item = (&Contender, &Contender)> + '_ {
        self.ours
            .iter()
            .chain([&self.relay_process])
            .map(move |c| (c, &self.nats))
            .chain([(&self.apart, &self.nats_apart)])
    }
}

/// Request → reply through nats-server; each end runs where `ends` says.
async fn nats_latency(
    addr: std::net::SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    n: usize,
    size: usize,
    inflight: usize,
    ends: &Ends,
) -> Result<Vec<Duration>> {
    let (ready, subscribed) = tokio::sync::oneshot::channel();
    let rtls = tls.clone();
    let responder = ends.responder.spawn(async move {
        // Connected on its own runtime: the socket belongs to its driver.
        let (mut rtx, mut rrx) = crate::nats::subscribed(addr, rtls, "req").await?;
        let _ = ready.send(());
        loop {
            let m = rrx.next().await?;
            if let Some(r) = &m.reply {
                rtx.publish(r, None, &m.payload);
            }
            for _ in 0..std::mem::take(&mut rrx.pings) {
                rtx.pong();
            }
            rtx.flush().await?;
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    });
    if subscribed.await.is_err() {
        return match responder.await {
            Ok(Err(e)) => Err(e.context("NATS responder")),
            _ => Err(anyhow::anyhow!("NATS responder ended")),
        };
    }
    let requester = ends.requester.spawn(async move {
        // The responder subscribed before; ours is in effect once
        // `subscribed` returns.
        let (mut tx, mut rx) = crate::nats::subscribed(addr, tls, "inbox").await?;
        let mut sent_at: HashMap<u64, Instant> = HashMap::new();
        let mut times = Vec::with_capacity(n);
        let mut next = 0u64;
        while (next as usize) < n.min(inflight) {
            sent_at.insert(next, Instant::now());
            tx.publish("req", Some("inbox"), &seq_body(next, size));
            next += 1;
        }
        tx.flush().await?;
        while times.len() < n {
            let m = tokio::time::timeout(Duration::from_secs(30), rx.next())
                .await
                .context("no NATS reply")??;
            if let Some(t) = sent_at.remove(&seq_of(&m.payload)) {
                times.push(t.elapsed());
            }
            if (next as usize) < n {
                sent_at.insert(next, Instant::now());
                tx.publish("req", Some("inbox"), &seq_body(next, size));
                next += 1;
            }
            for _ in 0..std::mem::take(&mut rx.pings) {
                tx.pong();
            }
            tx.flush().await?;
        }
        anyhow::Ok(times)
    });
    let times = requester.await?;
    responder.abort();
    let mut times = times?;
    times.sort();
    Ok(times)
}

/// A relay (TLS from a dev certificate) and nats-server plain and TLS with
/// the same certificate: the setting of the NATS comparisons.
struct NatsEnv {
    dir: tempfile::TempDir,
    key: String,
    relay: swb_relay::RelayHandle,
    plain: crate::nats::NatsServer,
    tls_server: crate::nats::NatsServer,
    tls: Arc<rustls::ClientConfig>,
}

async fn nats_env() -> Result<NatsEnv> {
    let dir = tempfile::tempdir()?;
    let identity = Identity::dev_in_dir(&dir.path().join("tls"), &[])?;
    let (mut rc, key) = bench_relay_config(identity.clone())?;
    // A mailbox as deep as a NATS subscription's default pending limits
    // (65 536 messages, 64 MiB): a receiver may fall that far behind before
    // its sender is refused (NATS would drop as a slow consumer).
    rc.limits.messages = 65_536;
    rc.limits.bytes = 64 * 1024 * 1024;
    let relay = Relay::spawn(rc).await?;
    let plain = crate::nats::start_server(None).await?;
    let tls_server = crate::nats::start_server(Some((
        &dir.path().join("tls").join("relay.crt"),
        &dir.path().join("tls").join("relay.key"),
    )))
    .await?;
    let tls = Arc::new(Trust::Fingerprint(identity.fingerprint()).rustls_config(&[])?);
    Ok(NatsEnv {
        dir,
        key,
        relay,
        plain,
        tls_server,
        tls,
    })
}

/// Quantiles of one measurement (ms), kept per run.
#[derive(Debug, Clone, Copy)]
struct Quantiles {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
}

impl Quantiles {
    fn of(times: &[Duration]) -> Result<Self> {
        let h = Hist::of(times)?;
        Ok(Self {
            p50: pct(&h, 0.5),
            p90: pct(&h, 0.9),
            p99: pct(&h, 0.99),
            p999: pct(&h, 0.999),
        })
    }

    /// The median over runs of each quantile.
    fn median_of(runs: &[Quantiles]) -> Self {
        let m = |f: fn(&Quantiles) -> f64| median(runs.iter().map(f).collect());
        Self {
            p50: m(|q| q.p50),
            p90: m(|q| q.p90),
            p99: m(|q| q.p99),
            p999: m(|q| q.p999),
        }
    }
}

/// One contender's measurements of one shape, a [`Quantiles`] per run.
struct Contender {
    /// Its name in the JSON output.
    key: &'static str,
    /// Its name in the tables.
    label: &'static str,
    runs: Vec<Quantiles>,
}

impl Contender {
    fn new(key: &'static str, label: &'static str) -> Self {
        Self {
            key,
            label,
            runs: Vec::new(),
        }
    }

    fn median(&self) -> Quantiles {
        Quantiles::median_of(&self.runs)
    }

    /// Per run, this contender's `q` over the baseline's in the same run:
    /// the median and the smallest and largest.
    fn ratios(&self, base: &Contender, q: fn(&Quantiles) -> f64) -> (f64, (f64, f64)) {
        let r: Vec<f64> = self
            .runs
            .iter()
            .zip(&base.runs)
            .map(|(o, b)| q(o) / q(b))
            .collect();
        (median(r.clone()), min_max(&r))
    }
}

pub(crate) async fn latency_bench(a: LatencyArgs, out: &Output) -> Result<()> {
    let env = nats_env().await?;
    let (dir, relay, plain, tls_server, tls) =
        (&env.dir, &env.relay, &env.plain, &env.tls_server, &env.tls);
    let mut ds = Vec::new();
    for n in ["requester", RESPONDER] {
        ds.push(bench_daemon(relay, &env.key, n, dir.path(), Vec::new()).await?);
    }
    let (a_ctl, b_ctl) = (
        ds[0].control_path().to_path_buf(),
        ds[1].control_path().to_path_buf(),
    );
    // The same two daemons' exchange with the relay in its own process,
    // as deployed (and as nats-server runs): every hop between a daemon
    // and the relay wakes another process's thread.
    let own = RelayProc::start(&["--memory-mail"]).await?;
    let mut pds = Vec::new();
    for n in ["requester", RESPONDER] {
        let d = swb_daemon::Daemon::spawn(own.daemon_config(n)).await?;
        d.connected().await.map_err(anyhow::Error::msg)?;
        pds.push(d);
    }
    // And with each end (its daemon and its program's loop) on a runtime
    // of its own, as two programs on two machines would be, with the relay
    // process between them; NATS' two clients alike. The rows above share
    // the bench's runtime: every wake there may go to a worker that another
    // end's work left parked.
    let programs = [
        Program::new("swb-requester")?,
        Program::new("swb-responder")?,
    ];
    let apart = Ends {
        requester: programs[0].handle()?,
        responder: programs[1].handle()?,
    };
    // A relay process of their own: the names are taken on the other one.
    let own_apart = RelayProc::start(&["--memory-mail"]).await?;
    let mut qds = Vec::new();
    for (n, h) in [
        ("requester", &apart.requester),
        (RESPONDER, &apart.responder),
    ] {
        let cfg = own_apart.daemon_config(n);
        let d = h
            .spawn(async move {
                let d = swb_daemon::Daemon::spawn(cfg).await?;
                d.connected().await.map_err(anyhow::Error::msg)?;
                anyhow::Ok(d)
            })
            .await??;
        qds.push(d);
    }
    let here = Ends::here();
    let runs = a.runs.max(1);
    let floor_identity = Identity::ephemeral()?;
    // The floor's forwarder in a process of its own, beside the relay
    // process: what the stack costs across processes.
    let (_floor_proc, (floor_addr, floor_fp), _) = spawn_self(&["floor-process"], |l| {
        let mut w = l.strip_prefix("listening ")?.split_whitespace();
        let addr: std::net::SocketAddr = w.next()?.parse().ok()?;
        Some((addr, w.next()?.to_string()))
    })
    .await?;
    let mut rows = Vec::new();
    for inflight in [1usize, 64] {
        // Ours: the control socket and its compact form through the
        // in-process relay; the Rust API through it, through the relay
        // process, and through the relay process with the ends apart.
        let mut sockets: Vec<(bool, Contender)> = [Api::Socket, Api::Compact]
            .into_iter()
            .map(|api| (api == Api::Compact, Contender::new(api.key(), api.label())))
            .collect();
        let mut rust = Contender::new(Api::Rust.key(), Api::Rust.label());
        let mut relay_process = Contender::new("rust_api_relay_process", "Rust API, relay process");
        let mut apart_ours = Contender::new("rust_api_apart", "Rust API, ends apart");
        let mut np = Contender::new("nats", "nats");
        let mut np_apart = Contender::new("nats_apart", "nats, ends apart");
        let mut nt = Contender::new("nats_tls", "nats+tls");
        let mut fl = Contender::new("quinn_forwarder_floor", "floor: quinn forwarder");
        let mut flp = Contender::new(
            "quinn_forwarder_floor_process",
            "floor: quinn forwarder, own process",
        );
        // Contenders take turns within each run, so a slow spell of the
        // machine falls on all of them; each ratio is taken within a run.
        for _ in 0..runs {
            for (compact, c) in &mut sockets {
                let times = ours_latency(
                    &a_ctl,
                    b_ctl.clone(),
                    "requester",
                    a.requests,
                    a.size,
                    inflight,
                    *compact,
                )
                .await?;
                c.runs.push(Quantiles::of(&times)?);
            }
            // Daemons on the in-process relay, on the relay process, and
            // on the relay process with their loops on runtimes of their own.
            for (pair, ends, c) in [
                (&ds, &here, &mut rust),
                (&pds, &here, &mut relay_process),
                (&qds, &apart, &mut apart_ours),
            ] {
                let times = api_latency(
                    &pair[0],
                    &pair[1],
                    "requester",
                    a.requests,
                    a.size,
                    inflight,
                    ends,
                )
                .await?;
                c.runs.push(Quantiles::of(&times)?);
            }
            let (n, size) = (a.requests, a.size);
            let times = nats_latency(plain.addr, None, n, size, inflight, &here).await?;
            np.runs.push(Quantiles::of(&times)?);
            let times = nats_latency(plain.addr, None, n, size, inflight, &apart).await?;
            np_apart.runs.push(Quantiles::of(&times)?);
            let times =
                nats_latency(tls_server.addr, Some(tls.clone()), n, size, inflight, &here).await?;
            nt.runs.push(Quantiles::of(&times)?);
            let (n, floor) = (a.requests, floor::Floor::Here(&floor_identity));
            let times = floor::floor_latency(floor, n, a.size, inflight).await?;
            fl.runs.push(Quantiles::of(&times)?);
            let floor = floor::Floor::Process(floor_addr, &floor_fp);
            let times = floor::floor_latency(floor, n, a.size, inflight).await?;
            flp.runs.push(Quantiles::of(&times)?);
        }
        let ours: Vec<Contender> = [rust]
            .into_iter()
            .chain(sockets.into_iter().map(|(_, c)| c))
            .collect();
        rows.push(LatencyRows {
            inflight,
            ours,
            relay_process,
            apart: apart_ours,
            nats: np,
            nats_apart: np_apart,
            nats_tls: nt,
            floor: fl,
            floor_process: flp,
        });
    }
    let p50 = |q: &Quantiles| q.p50;
    let p99 = |q: &Quantiles| q.p99;
    for r in &rows {
        let inflight = r.inflight;
        for (c, base) in r.compared() {
            for (q, name) in [(p50 as fn(&Quantiles) -> f64, "p50"), (p99, "p99")] {
                record(
                    "latency",
                    &format!(
                        "{name} ms, {inflight} in flight, {} (vs {})",
                        c.label,
                        base.label.replacen("nats", "NATS", 1)
                    ),
                    q(&c.median()),
                    q(&base.median()),
                    false,
                    1.0,
                );
            }
        }
    }
    let ms = |q: Quantiles| serde_json::json!({"p50": q.p50, "p90": q.p90, "p99": q.p99, "p999": q.p999});
    for r in &rows {
        let inflight = r.inflight;
        // And the relay process over the floor in its own process: what
        // ours adds to the stack, both relays crossing processes alike.
        let floors = [
            (&r.floor, &r.nats),
            (&r.floor_process, &r.nats),
            (&r.relay_process, &r.floor_process),
        ];
        let compared = r.compared().chain(floors);
        if out.json {
            let mut o = serde_json::json!({"bench": "latency", "in_flight": inflight, "size": a.size, "requests": a.requests,
                "runs": runs});
            for c in [&r.nats, &r.nats_apart, &r.nats_tls] {
                o[format!("{}_ms", c.key)] = ms(c.median());
            }
            for (c, base) in compared {
                let (k, b) = (c.key, base.key);
                let ((r50, s50), (r99, s99)) = (c.ratios(base, p50), c.ratios(base, p99));
                o[format!("{k}_ms")] = ms(c.median());
                o[format!("{k}_p50_ratio_vs_{b}")] = serde_json::json!(r50);
                o[format!("{k}_p50_ratio_vs_{b}_min_max")] = serde_json::json!([s50.0, s50.1]);
                o[format!("{k}_p99_ratio_vs_{b}")] = serde_json::json!(r99);
                o[format!("{k}_p99_ratio_vs_{b}_min_max")] = serde_json::json!([s99.0, s99.1]);
            }
            println!("{o}");
        } else {
            println!(
                "latency: {} B request -> reply, {inflight} in flight, {} requests x {runs} runs (ms, HdrHistogram; medians of the runs)",
                a.size, a.requests
            );
            let lines = r
                .ours
                .iter()
                .chain([&r.relay_process, &r.apart])
                .map(|c| (format!("switchboard, {}", c.label), c))
                .chain(
                    [
                        &r.nats,
                        &r.nats_apart,
                        &r.nats_tls,
                        &r.floor,
                        &r.floor_process,
                    ]
                    .map(|c| (c.label.to_string(), c)),
                );
            for (label, c) in lines {
                let m = c.median();
                let (lo, hi) = min_max(&c.runs.iter().map(|q| q.p50).collect::<Vec<_>>());
                println!(
                    "  {label:<38} p50 {:>7.3} ({lo:.3}–{hi:.3})  p90 {:>7.3}  p99 {:>7.3}  p99.9 {:>7.3}",
                    m.p50, m.p90, m.p99, m.p999
                );
            }
            for (c, base) in compared {
                let label = c.label;
                let ((r50, s50), (r99, s99)) = (c.ratios(base, p50), c.ratios(base, p99));
                let what = if std::ptr::eq(c, &r.floor) {
                    "the stack's floor: forwarding only"
                } else if std::ptr::eq(c, &r.floor_process) {
                    "the floor of the relay-process rows"
                } else if std::ptr::eq(base, &r.floor_process) {
                    "ours over the stack, both relays in a process of their own"
                } else {
                    "goal <= 1.0"
                };
                println!(
                    "  ratio vs {}, {label:<24} p50 {r50:.2} ({:.2}–{:.2})  p99 {r99:.2} ({:.2}–{:.2})   (per run; {what})",
                    base.label,
                    s50.0,
                    s50.1,
                    s99.0,
                    s99.1
                );
            }
        }
    }
    for d in ds.into_iter().chain(pds).chain(qds) {
        d.shutdown();
        let _ = d.join().await;
    }
    drop(programs);
    drop(own_apart);
    drop(own);
    relay.shutdown();
    let NatsEnv { relay, .. } = env;
    relay.join().await;
    Ok(())
}

// ---- rate: messages per second, against nats-server ----

#[derive(Debug, Args)]
pub(crate) struct RateArgs {
    /// Messages per measurement (1 → 1); 1 → 100 delivers the same number.
    #[arg(long, default_value_t = 500_000)]
    messages: usize,
    /// Sender control connections on our side.
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// Sends each sender connection keeps unanswered (pipelined).
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// Runs per shape, each measuring every contender; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Shapes to measure: receivers per sender (1 → 1, 1 → 100).
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    receivers: Vec<usize>,
    /// Our contenders to measure (NATS and NATS+TLS always run beside them).
    #[arg(long, value_delimiter = ',', default_value = "rust,socket,compact")]
    apis: Vec<Api>,
    /// Our relay in a process of its own, as deployed and as nats-server
    /// runs (mail in memory, mailboxes as deep): the daemons and clients
    /// stay in this one. Its CPU counts in the CPU per delivery.
    #[arg(long)]
    relay_process: bool,
}

/// The writing half of a pipelined control connection, in either encoding.
enum Tx {
    Json(swb_daemon::control::Requests),
    Compact(swb_daemon::control::CompactRequests),
}

/// The reading half of a pipelined control connection, in either encoding.
enum Rx {
    Json(swb_daemon::control::Replies),
    Compact(swb_daemon::control::CompactReplies),
}

impl Tx {
    async fn send(&mut self, to: &str, body: &[u8]) -> Result<()> {
        let wait = Duration::from_secs(30);
        match self {
            Tx::Json(r) => r.send(to, body, wait).await?,
            Tx::Compact(r) => r.send(to, body, wait).await?,
        }
        Ok(())
    }

    async fn push(&mut self, req: &Request) -> Result<()> {
        match self {
            Tx::Json(r) => r.push(req).await?,
            Tx::Compact(r) => r.push(req).await?,
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        match self {
            Tx::Json(r) => r.flush().await?,
            Tx::Compact(r) => r.flush().await?,
        }
        Ok(())
    }

    async fn recv(&mut self, wait: Duration, max: usize) -> Result<()> {
        match self {
            Tx::Json(r) => {
                let wait_ms = wait.as_millis() as u64;
                r.push(&Request::Recv { wait_ms, max }).await?
            }
            Tx::Compact(r) => r.recv(wait, max).await?,
        }
        Ok(())
    }

    async fn ack(&mut self, ids: &[swb_wire::MessageId]) -> Result<()> {
        match self {
            Tx::Json(r) => {
                let ids = ids.iter().map(|i| i.to_string()).collect();
                r.push(&Request::Ack { ids }).await?
            }
            Tx::Compact(r) => r.ack(ids).await?,
        }
        Ok(())
    }
}

/// A control connection split for pipelining, in the encoding asked for.
async fn pipe(c: Client, compact: bool) -> Result<(Tx, Rx)> {
    Ok(if compact {
        let (t, r) = c.compact().await?;
        (Tx::Compact(t), Rx::Compact(r))
    } else {
        let (t, r) = c.pipeline();
        (Tx::Json(t), Rx::Json(r))
    })
}

impl Rx {
    /// A `recv`'s answer: the ids and the bodies.
    async fn messages(&mut self) -> Result<(Vec<swb_wire::MessageId>, Vec<bytes::Bytes>)> {
        use swb_daemon::compact::Answer;
        Ok(match self {
            Rx::Json(r) => {
                let Reply::Messages { messages } = r.next().await? else {
                    anyhow::bail!("unexpected reply to recv");
                };
                let ids = messages
                    .iter()
                    .map(|m| swb_wire::MessageId::parse_hex(&m.id).context("a message id"))
                    .collect::<Result<_>>()?;
                (ids, messages.iter().map(|m| m.body().into()).collect())
            }
            Rx::Compact(r) => {
                let Answer::Messages(m) = r.next().await? else {
                    anyhow::bail!("unexpected answer to recv");
                };
                m.into_iter().map(|m| (m.id, m.body)).unzip()
            }
        })
    }

    /// An `ack`'s answer.
    async fn acked(&mut self) -> Result<()> {
        use swb_daemon::compact::Answer;
        match self {
            Rx::Json(r) => {
                let Reply::Acked { .. } = r.next().await? else {
                    anyhow::bail!("unexpected reply to ack");
                };
            }
            Rx::Compact(r) => {
                let Answer::Acked(_) = r.next().await? else {
                    anyhow::bail!("unexpected answer to ack");
                };
            }
        }
        Ok(())
    }

    /// `true` for a send's answer, `false` for a `status` (the end marker).
    async fn sent_or_status(&mut self) -> Result<bool> {
        use swb_daemon::compact::Answer;
        match self {
            Rx::Json(r) => match r.next().await? {
                Reply::Sent { .. } => Ok(true),
                Reply::Status(_) => Ok(false),
                other => anyhow::bail!("unexpected reply {other:?}"),
            },
            Rx::Compact(r) => match r.next().await? {
                Answer::Sent(_) => Ok(true),
                Answer::Reply(r) if matches!(*r, Reply::Status(_)) => Ok(false),
                other => anyhow::bail!("unexpected answer {other:?}"),
            },
        }
    }
}

/// Sends what `next` yields over one pipelined control connection (JSON
/// lines, or `compact`), at most `window` unanswered; fails on the first
/// refusal. Returns how many.
async fn send_pipelined(
    c: Client,
    compact: bool,
    window: usize,
    mut next: impl FnMut() -> Option<(Arc<str>, bytes::Bytes)>,
) -> Result<usize> {
    let (mut req, mut rep) = pipe(c, compact).await?;
    let room = Arc::new(tokio::sync::Semaphore::new(window.max(1)));
    let writer = {
        let room = room.clone();
        async move {
            let mut sent = 0usize;
            while let Some((to, body)) = next() {
                match room.try_acquire() {
                    Ok(p) => p.forget(),
                    Err(_) => {
                        req.flush().await?;
                        room.acquire().await?.forget();
                    }
                }
                req.send(&to, &body).await?;
                sent += 1;
            }
            // Replies come in request order: this one's marks the end.
            req.push(&Request::Status).await?;
            req.flush().await?;
            anyhow::Ok(sent)
        }
    };
    let reader = async move {
        while rep.sent_or_status().await? {
            room.add_permits(1);
        }
        anyhow::Ok(())
    };
    let (sent, ()) = tokio::try_join!(writer, reader)?;
    Ok(sent)
}

/// Takes messages from a daemon until cancelled; `on` learns each batch size.
async fn receive_all(c: Client, compact: bool, mut on: impl FnMut(usize)) -> Result<()> {
    let mut taker = Taker::new(c, compact).await?;
    loop {
        let k = taker.next().await?.len();
        if k > 0 {
            on(k);
        }
    }
}

/// How the benchmark talks to its daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Api {
    /// The control socket (JSON lines, pipelined): any language.
    Socket,
    /// The control socket in its compact encoding (binary frames, pipelined).
    Compact,
    /// The Rust API in the daemon's process (`DaemonHandle::sender`,
    /// `receiver`): no socket, JSON or base64.
    Rust,
    /// The Rust API's `Sender::submit_batch`, 64 messages a batch (the
    /// same window of unanswered sends); received as `rust` receives.
    Batch,
}

impl Api {
    fn tag(self) -> &'static str {
        match self {
            Api::Socket => "s",
            Api::Compact => "c",
            Api::Rust => "r",
            Api::Batch => "b",
        }
    }

    /// The issue's goal for deliveries/s against NATS over TLS: 0.6 for the
    /// Rust API (and, as before, JSON lines), 0.4 for the compact socket.
    fn rate_goal(self) -> f64 {
        match self {
            Api::Compact => 0.4,
            Api::Socket | Api::Rust | Api::Batch => 0.6,
        }
    }

    /// The JSON key prefix of this contender.
    fn key(self) -> &'static str {
        match self {
            Api::Socket => "control_socket",
            Api::Compact => "compact_socket",
            Api::Rust => "rust_api",
            Api::Batch => "rust_api_batches",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Api::Socket => "control socket",
            Api::Compact => "compact socket",
            Api::Rust => "Rust API",
            Api::Batch => "Rust API batches",
        }
    }
}

/// Deliveries per second from one sender daemon to `receivers` daemons
/// (messages spread round-robin), 128 B each.
/// Sends what `item` yields through the Rust API, keeping up to `window`
/// sends unanswered (the oldest answered first), then waits for the rest;
/// returns how many were sent.
pub(crate) async fn submit_windowed(
    tx: swb_daemon::Sender,
    window: usize,
    mut item: impl FnMut() -> Option<(Arc<str>, bytes::Bytes)>,
) -> Result<usize> {
    let mut waiting = std::collections::VecDeque::with_capacity(window);
    let mut sent = 0;
    while let Some((to, body)) = item() {
        if waiting.len() >= window.max(1) {
            let mut p: swb_daemon::PendingSend = waiting.pop_front().context("window")?;
            p.answer().await?;
        }
        waiting.push_back(tx.submit(&to, body, Duration::from_secs(30)).await?);
        sent += 1;
    }
    for mut p in waiting {
        p.answer().await?;
    }
    Ok(sent)
}

/// Messages per batch in the rate benchmark's `batch` contender.
const RATE_BATCH: usize = 64;

/// Sends what `item` yields through the Rust API in batches of `batch`,
/// keeping up to `window` sends unanswered (the oldest batch answered
/// first), then waits for the rest; returns how many were sent.
pub(crate) async fn submit_batches(
    tx: swb_daemon::Sender,
    window: usize,
    batch: usize,
    mut item: impl FnMut() -> Option<(Arc<str>, bytes::Bytes)>,
) -> Result<usize> {
    let batch = batch.clamp(1, swb_daemon::MAX_SEND_BATCH);
    let mut waiting = std::collections::VecDeque::new();
    let (mut sent, mut unanswered) = (0, 0);
    let mut msgs: Vec<(Arc<str>, bytes::Bytes)> = Vec::with_capacity(batch);
    loop {
        msgs.clear();
        msgs.extend(std::iter::from_fn(&mut item).take(batch));
        if msgs.is_empty() {
            break;
        }
        while unanswered + msgs.len() > window.max(batch) {
            unanswered -= all_accepted(waiting.pop_front().context("window")?).await?;
        }
        // (A named function: a closure here makes the future not `Send`.)
        fn pair((to, body): &(Arc<str>, bytes::Bytes)) -> (&str, bytes::Bytes) {
            (to, body.clone())
        }
        let p = tx
            .submit_batch(msgs.iter().map(pair), Duration::from_secs(30))
            .await?;
        unanswered += msgs.len();
        sent += msgs.len();
        waiting.push_back(p);
    }
    for p in waiting {
        all_accepted(p).await?;
    }
    Ok(sent)
}

/// Waits for a batch's answers: an error unless every send was accepted;
/// how many there were.
async fn all_accepted(mut p: swb_daemon::PendingBatch) -> Result<usize> {
    let answers = p.answer().await?;
    let n = answers.len();
    for a in answers {
        a?;
    }
    Ok(n)
}

/// Receives and acknowledges through the Rust API until aborted, telling
/// `count` how many each batch held.
pub(crate) async fn receive_rust(
    mut rx: swb_daemon::Receiver,
    count: impl Fn(usize),
) -> Result<()> {
    loop {
        let msgs = rx.recv(1000, Duration::from_secs(30)).await?;
        if !msgs.is_empty() {
            rx.ack(&msgs.iter().map(|m| m.id).collect::<Vec<_>>())
                .await?;
            count(msgs.len());
        }
    }
}

/// Where `rate` runs our relay.
enum RateRelay<'a> {
    /// In this process, with its key and the daemons' socket dir.
    Here(&'a swb_relay::RelayHandle, &'a str, &'a std::path::Path),
    /// In a process of its own.
    Process(&'a RelayProc),
}

impl RateRelay<'_> {
    /// A daemon of this process attached as `name`, once welcomed.
    async fn daemon(&self, name: &str) -> Result<swb_daemon::DaemonHandle> {
        match self {
            Self::Here(relay, key, dir) => bench_daemon(relay, key, name, dir, Vec::new()).await,
            Self::Process(p) => {
                let d = Daemon::spawn(p.daemon_config(name)).await?;
                d.connected().await.map_err(anyhow::Error::msg)?;
                Ok(d)
            }
        }
    }

    /// CPU ticks of every process taking part: this one, and the relay's.
    fn cpu_ticks(&self) -> Result<u64> {
        let here = proc_cpu_ticks(std::process::id())?;
        Ok(match self {
            Self::Here(..) => here,
            Self::Process(p) => here + proc_cpu_ticks(p.pid)?,
        })
    }
}

async fn ours_rate(
    relay: &RateRelay<'_>,
    receivers: usize,
    a: &RateArgs,
    api: Api,
) -> Result<Measured> {
    let (n, senders, window) = (a.messages, a.senders, a.window);
    let tag = api.tag();
    let sender = relay.daemon(&format!("sender{receivers}{tag}")).await?;
    let mut rs = Vec::new();
    for i in 0..receivers {
        rs.push(relay.daemon(&format!("r{receivers}{tag}-{i}")).await?);
    }
    let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let mut readers = tokio::task::JoinSet::new();
    for d in &rs {
        let (got, done) = (got.clone(), done.clone());
        let count = move |k: usize| {
            if got.fetch_add(k, std::sync::atomic::Ordering::Relaxed) + k >= n {
                done.notify_one();
            }
        };
        match api {
            Api::Socket => {
                let ctl = d.control_path().to_path_buf();
                readers.spawn(async move {
                    let rx = Client::connect(&ctl).await?;
                    receive_all(rx, false, count).await
                });
            }
            Api::Compact => {
                let ctl = d.control_path().to_path_buf();
                readers.spawn(async move {
                    let rx = Client::connect(&ctl).await?;
                    receive_all(rx, true, count).await
                });
            }
            Api::Rust | Api::Batch => {
                readers.spawn(receive_rust(d.receiver(), count));
            }
        }
    }
    let body = bytes::Bytes::from(vec![0x42u8; 128]);
    let cpu0 = relay.cpu_ticks()?;
    let t = Instant::now();
    let finished = done.notified();
    tokio::pin!(finished);
    finished.as_mut().enable();
    // Each sender (a control connection, or a task using the Rust API)
    // pipelines up to `window` sends, as a program would; messages spread
    // round-robin over the receivers.
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The recipients' names made once, as a program holds its peers'
    // names (formatting one per message cost ~1 % of the run).
    let names: Arc<[Arc<str>]> = (0..receivers)
        .map(|i| Arc::from(format!("r{receivers}{tag}-{i}")))
        .collect();
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..senders {
        let (next, body, names) = (next.clone(), body.clone(), names.clone());
        let item = move || {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (i < n).then(|| (names[i % receivers].clone(), body.clone()))
        };
        match api {
            Api::Socket => {
                let ctl = sender.control_path().to_path_buf();
                writers.spawn(async move {
                    let tx = Client::connect(&ctl).await?;
                    send_pipelined(tx, false, window, item).await
                });
            }
            Api::Compact => {
                let ctl = sender.control_path().to_path_buf();
                writers.spawn(async move {
                    let tx = Client::connect(&ctl).await?;
                    send_pipelined(tx, true, window, item).await
                });
            }
            Api::Rust => {
                writers.spawn(submit_windowed(sender.sender(), window, item));
            }
            Api::Batch => {
                writers.spawn(submit_batches(sender.sender(), window, RATE_BATCH, item));
            }
        }
    }
    while let Some(r) = writers.join_next().await {
        r??;
    }
    tokio::time::timeout(Duration::from_secs(60), finished)
        .await
        .context("not all delivered")?;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let cpu = cpu_us_per(relay.cpu_ticks()?.saturating_sub(cpu0), n);
    readers.abort_all();
    sender.shutdown();
    for d in rs {
        d.shutdown();
    }
    Ok(Measured { rate, cpu })
}

/// A rate measurement: deliveries per second, and the CPU time all the
/// parts spent per delivery (µs; relay, daemons and clients, or NATS's
/// server and clients). CPU is the steadier figure on a shared machine:
/// another tenant's load slows the clock but barely moves it.
#[derive(Debug, Clone, Copy)]
struct Measured {
    rate: f64,
    cpu: f64,
}

/// Medians and ranges of a contender's runs.
struct Summary {
    rate: f64,
    rate_range: (f64, f64),
    cpu: f64,
    cpu_range: (f64, f64),
}

impl Summary {
    fn of(runs: &[Measured]) -> Self {
        let rates: Vec<f64> = runs.iter().map(|m| m.rate).collect();
        let cpus: Vec<f64> = runs.iter().map(|m| m.cpu).collect();
        Self {
            rate_range: min_max(&rates),
            rate: median(rates),
            cpu_range: min_max(&cpus),
            cpu: median(cpus),
        }
    }
}

pub(crate) fn cpu_us_per(ticks: u64, n: usize) -> f64 {
    // Linux reports process CPU in clock ticks of 10 ms (USER_HZ 100).
    ticks as f64 * 10_000.0 / n.max(1) as f64
}

/// Deliveries per second from one NATS publisher to `subs` subscribers
/// (each gets every message), 128 B each, `n` deliveries in total.
async fn nats_rate(
    server: &crate::nats::NatsServer,
    tls: Option<Arc<rustls::ClientConfig>>,
    subs: usize,
    n: usize,
) -> Result<Measured> {
    let addr = server.addr;
    let pid = server.pid().context("nats-server is not running")?;
    let per_sub = (n / subs).max(1);
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..subs {
        let (mut tx, mut rx) = crate::nats::subscribed(addr, tls.clone(), "rate").await?;
        readers.spawn(async move {
            for _ in 0..per_sub {
                rx.next().await?;
                if rx.pings > 0 {
                    rx.pings = 0;
                    tx.pong();
                    tx.flush().await?;
                }
            }
            anyhow::Ok(())
        });
    }
    let (mut tx, _rx) = crate::nats::connect(addr, tls).await?;
    let body = vec![0x42u8; 128];
    let cpu0 = proc_cpu_ticks(std::process::id())? + proc_cpu_ticks(pid)?;
    let t = Instant::now();
    for i in 0..per_sub {
        tx.publish("rate", None, &body);
        if i % 256 == 255 {
            tx.flush().await?;
        }
    }
    tx.flush().await?;
    while let Some(r) = tokio::time::timeout(Duration::from_secs(60), readers.join_next())
        .await
        .context("NATS deliveries stalled")?
    {
        r??;
    }
    let rate = (per_sub * subs) as f64 / t.elapsed().as_secs_f64();
    let ticks = (proc_cpu_ticks(std::process::id())? + proc_cpu_ticks(pid)?).saturating_sub(cpu0);
    Ok(Measured {
        rate,
        cpu: cpu_us_per(ticks, per_sub * subs),
    })
}

pub(crate) async fn rate_bench(a: RateArgs, out: &Output) -> Result<()> {
    let env = nats_env().await?;
    let (dir, relay, plain, tls_server, tls) =
        (&env.dir, &env.relay, &env.plain, &env.tls_server, &env.tls);
    let floor_identity = Identity::ephemeral()?;
    let own = match a.relay_process {
        true => Some(RelayProc::start(&["--memory-mail", "--deep-mailboxes"]).await?),
        false => None,
    };
    let ours_at = match &own {
        Some(p) => RateRelay::Process(p),
        None => RateRelay::Here(relay, &env.key, dir.path()),
    };
    // Where our relay ran, in the figures' labels.
    let at = if own.is_some() { ", relay process" } else { "" };
    let mut rows = Vec::new();
    for &receivers in &a.receivers {
        // Contenders take turns within each run, so a slow spell of the
        // machine falls on all of them; the median of the runs is reported.
        let mut ours: Vec<(Api, Vec<Measured>)> = a.apis.iter().map(|&api| (api, vec![])).collect();
        let (mut np, mut nt, mut fl) = (vec![], vec![], vec![]);
        // How far apart the two CPUs were around each run (see `cores`).
        let mut apart = vec![];
        for _ in 0..a.runs.max(1) {
            let before = cores::measure().await;
            for (api, v) in &mut ours {
                v.push(ours_rate(&ours_at, receivers, &a, *api).await?);
            }
            if receivers == 1 {
                fl.push(floor::floor_rate(&floor_identity, a.messages).await?);
            }
            np.push(nats_rate(plain, None, receivers, a.messages).await?);
            nt.push(nats_rate(tls_server, Some(tls.clone()), receivers, a.messages).await?);
            apart.push((before, cores::measure().await));
        }
        let per_run = |v: &[Measured]| -> Vec<f64> { v.iter().map(|m| m.cpu).collect() };
        let cpu_runs = (
            per_run(&nt),
            ours.iter()
                .map(|(api, v)| (*api, per_run(v)))
                .collect::<Vec<_>>(),
        );
        let ours = ours
            .into_iter()
            .map(|(api, v)| (api, Summary::of(&v)))
            .collect::<Vec<_>>();
        let floor = (!fl.is_empty()).then(|| (min_max(&fl), median(fl)));
        rows.push((
            receivers,
            ours,
            Summary::of(&np),
            Summary::of(&nt),
            floor,
            apart,
            cpu_runs,
        ));
    }
    for (receivers, ours, _, nt, ..) in &rows {
        for (api, r) in ours {
            record(
                "rate",
                &format!(
                    "deliveries/s 1 -> {receivers}, {}{at} (vs NATS over TLS)",
                    api.label()
                ),
                r.rate,
                nt.rate,
                true,
                api.rate_goal(),
            );
        }
    }
    for (receivers, ours, np, nt, floor, apart, (nt_runs, our_runs)) in &rows {
        if out.json {
            let mut o = serde_json::json!({"bench": "rate", "receivers": receivers, "size": 128,
                "relay_process": a.relay_process,
                "nats_per_sec": np.rate, "nats_tls_per_sec": nt.rate,
                "nats_cpu_us_per_msg": np.cpu, "nats_tls_cpu_us_per_msg": nt.cpu,
                "nats_tls_cpu_us_per_msg_runs": nt_runs,
                "cross_core_round_trip_ns_runs": cores::json(apart)});
            for (api, v) in our_runs {
                let label = api.label().replace(' ', "_").to_lowercase();
                o[format!("ours_{label}_cpu_us_per_msg_runs")] = serde_json::json!(v);
            }
            if let Some((_, f)) = floor {
                o["quinn_forwarder_floor_per_sec"] = serde_json::json!(f);
            }
            for (api, r) in ours {
                let label = api.label().replace(' ', "_").to_lowercase();
                o[format!("ours_{label}_per_sec")] = serde_json::json!(r.rate);
                o[format!("ours_{label}_cpu_us_per_msg")] = serde_json::json!(r.cpu);
            }
            println!("{o}");
        } else {
            println!(
                "rate 1 -> {receivers:<3}: nats {:>9.0}/s   nats+tls {:>9.0}/s   (medians of {} runs{})",
                np.rate,
                nt.rate,
                a.runs.max(1),
                if a.relay_process { "; our relay in its own process" } else { "" }
            );
            println!("{}", cores::line(apart));
            println!(
                "  CPU per delivery (all processes): nats {:.2} µs ({:.2}–{:.2})   nats+tls {:.2} µs ({:.2}–{:.2}; by run {})",
                np.cpu,
                np.cpu_range.0,
                np.cpu_range.1,
                nt.cpu,
                nt.cpu_range.0,
                nt.cpu_range.1,
                by_run(nt_runs, 2)
            );
            for (api, r) in ours {
                let of_floor = floor
                    .as_ref()
                    .map(|(_, f)| format!(", {:.2} of the floor", r.rate / f))
                    .unwrap_or_default();
                let (lo, hi) = r.rate_range;
                println!(
                    "  switchboard, {:<14} {:>9.0}/s ({lo:.0}–{hi:.0})   ratio vs nats+tls {:.2} (goal >= {}){of_floor}",
                    api.label(),
                    r.rate,
                    r.rate / nt.rate,
                    api.rate_goal()
                );
                let runs = our_runs
                    .iter()
                    .find(|(a, _)| a == api)
                    .map(|(_, v)| by_run(v, 2))
                    .unwrap_or_default();
                println!(
                    "    CPU per delivery {:.2} µs ({:.2}–{:.2}; by run {runs}) = {:.1}× nats+tls",
                    r.cpu,
                    r.cpu_range.0,
                    r.cpu_range.1,
                    r.cpu / nt.cpu
                );
            }
            if let Some(((lo, hi), f)) = floor {
                println!(
                    "  floor: quinn forwarder      {f:>9.0}/s ({lo:.0}–{hi:.0})   ratio vs nats+tls {:.2} (forwarding only: no acceptance, ack or mailbox)",
                    f / nt.rate
                );
            }
        }
    }
    relay.shutdown();
    let NatsEnv { relay, .. } = env;
    relay.join().await;
    Ok(())
}

/// Per-run figures in run order with `decimals` places: `1.66, 2.96, 1.70`.
fn by_run(v: &[f64], decimals: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---- the summary of `bench all` ----

/// One line of the summary: our figure, the baseline, and the goal on the
/// ratio (higher-is-better ratios must reach it, lower-is-better stay under).
struct Row {
    scenario: String,
    what: String,
    ours: f64,
    baseline: f64,
    higher_better: bool,
    goal: f64,
}

static SUMMARY: std::sync::Mutex<Vec<Row>> = std::sync::Mutex::new(Vec::new());

fn record(scenario: &str, what: &str, ours: f64, baseline: f64, higher_better: bool, goal: f64) {
    SUMMARY.lock().unwrap_or_else(|p| p.into_inner()).push(Row {
        scenario: scenario.into(),
        what: what.into(),
        ours,
        baseline,
        higher_better,
        goal,
    });
}

#[derive(Debug, Args)]
pub(crate) struct AllArgs {
    /// Tiny sizes: proves every scenario works in seconds (CI); the figures
    /// mean nothing.
    #[arg(long)]
    smoke: bool,
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), Linux {}", kernel.trim())
}

async fn all(a: AllArgs, out: &Output) -> Result<()> {
    SUMMARY.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let s = a.smoke;
    stream(
        StreamArgs {
            bytes: if s { 1 << 20 } else { 256 << 20 },
            runs: if s { 1 } else { 3 },
            warmup: if s { 0 } else { 1 },
        },
        out,
    )
    .await?;
    ring(
        RingArgs {
            keys_per_relay: if s { 10 } else { 10_000 },
            runs: if s { 1 } else { 5 },
            lookups: if s { 1_000 } else { 200_000 },
            max_recipients: if s { 10_000 } else { 1_000_000 },
        },
        out,
    )?;
    grid::grid_bench(
        grid::GridArgs {
            relays: if s { vec![100] } else { vec![1000, 10_000] },
            pairs: if s { 1000 } else { 100_000 },
        },
        out,
    )?;
    mesh(
        MeshArgs {
            messages: if s { 50 } else { 5000 },
            samples: if s { 20 } else { 500 },
            pipelined: if s { 2000 } else { 100_000 },
            runs: if s { 1 } else { 3 },
            handoff: if s { 200 } else { 20_000 },
        },
        out,
    )
    .await?;
    carrier::carrier_bench(
        carrier::CarrierArgs {
            bytes: if s { 1 << 20 } else { 128 << 20 },
            runs: if s { 1 } else { 3 },
            samples: if s { 20 } else { 500 },
            warmup: if s { 0 } else { 1 },
        },
        out,
    )
    .await?;
    fanout::fanout_bench(
        fanout::FanoutArgs {
            watchers: if s { 3 } else { 100 },
            updates: if s { 50 } else { 20_000 },
            publishers: 128,
            runs: if s { 1 } else { 3 },
            one_at_a_time: if s { 20 } else { 2_000 },
        },
        out,
    )
    .await?;
    accept(
        AcceptArgs {
            connections: if s { 20 } else { 2000 },
        },
        out,
    )
    .await?;
    idle(
        IdleArgs {
            clients: if s { 20 } else { 10_000 },
            settle: if s {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(10)
            },
        },
        out,
    )
    .await?;
    latency_bench(
        LatencyArgs {
            requests: if s { 20 } else { 20_000 },
            size: 256,
            runs: if s { 1 } else { 3 },
        },
        out,
    )
    .await?;
    let rate = RateArgs {
        messages: if s { 200 } else { 500_000 },
        senders: 1,
        window: 1024,
        runs: if s { 1 } else { 3 },
        receivers: vec![1, 100],
        apis: vec![Api::Rust, Api::Batch, Api::Socket, Api::Compact],
        relay_process: false,
    };
    // And 1 -> 1 as deployed: the relay in a process of its own, as
    // nats-server is.
    let deployed = RateArgs {
        receivers: vec![1],
        apis: vec![Api::Rust, Api::Batch, Api::Compact],
        relay_process: true,
        ..rate
    };
    rate_bench(rate, out).await?;
    rate_bench(deployed, out).await?;
    durable::durable_bench(
        durable::DurableArgs {
            messages: if s { 200 } else { 50_000 },
            window: 256,
            samples: if s { 20 } else { 2_000 },
            runs: if s { 1 } else { 3 },
        },
        out,
    )
    .await?;
    shards::shards_bench(
        shards::ShardsArgs {
            pairs: if s { 2 } else { 8 },
            messages: if s { 100 } else { 40_000 },
            window: 256,
            runs: if s { 1 } else { 3 },
        },
        out,
    )
    .await?;
    flood::flood_bench(
        flood::FloodArgs {
            samples: if s { 20 } else { 2_000 },
            runs: if s { 1 } else { 3 },
            warmup: if s {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(5)
            },
            attacker_nice: 0,
            deployed_only: s,
        },
        out,
    )
    .await?;
    let rows = std::mem::take(&mut *SUMMARY.lock().unwrap_or_else(|p| p.into_inner()));
    let met = |r: &Row| {
        let ratio = r.ours / r.baseline;
        if r.higher_better {
            ratio >= r.goal
        } else {
            ratio <= r.goal
        }
    };
    if out.json {
        for r in &rows {
            println!(
                "{}",
                serde_json::json!({"summary": r.scenario, "what": r.what, "ours": r.ours, "baseline": r.baseline,
                    "ratio": r.ours / r.baseline, "goal": format!("{} {}", if r.higher_better { ">=" } else { "<=" }, r.goal), "met": met(r)})
            );
        }
        return Ok(());
    }
    println!();
    println!(
        "swbd-bench {} on {}{}",
        env!("CARGO_PKG_VERSION"),
        machine(),
        if s {
            " — SMOKE RUN, figures meaningless"
        } else {
            ""
        }
    );
    println!(
        "{:<9} {:<52} {:>12} {:>12} {:>7} {:>7}  met",
        "scenario", "figure", "ours", "baseline", "ratio", "goal"
    );
    for r in &rows {
        println!(
            "{:<9} {:<52} {:>12.3} {:>12.3} {:>7.2} {:>2}{:>5}  {}",
            r.scenario,
            r.what,
            r.ours,
            r.baseline,
            r.ours / r.baseline,
            if r.higher_better { ">=" } else { "<=" },
            r.goal,
            if met(r) { "yes" } else { "NO" }
        );
    }
    Ok(())
}
