//! `durable`: messages stored durably before the sender hears `accepted`,
//! at each durability level, against NATS JetStream (file storage, TLS) in
//! the same run. Both sides: one sender keeping `window` sends (publishes)
//! unanswered, one receiver (push consumer) acknowledging every message,
//! 128 B bodies; a fresh relay data dir and a fresh JetStream store per run.
//!
//! - `sync` against `sync_interval: always` (an fsync before the answer on
//!   both sides; nats-server 2.10 or later, `$SWB_NATS_SERVER` may name one);
//! - `process` against JetStream's default (written to the OS before the
//!   answer, synced every two minutes);
//! - `memory` against a JetStream stream with memory storage.
//!
//! Figures: deliveries/s (until the receiver has every message), and one
//! message at a time, the time until the sender's answer (`accept`) and
//! until the receiver has it (`delivery`), p50 and p99.

use super::{
    bench_daemon, bench_relay_config, cpu_us_per, median, pct, proc_cpu_ticks, record, Hist,
};
use crate::nats::{self, NatsRx, NatsTx};
use crate::Output;
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use std::sync::Arc;
use std::time::{Duration, Instant};
use swb_relay::{Durability, Identity, Relay};

#[derive(Debug, Args)]
pub(crate) struct DurableArgs {
    /// Messages per rate measurement.
    #[arg(long, default_value_t = 50_000)]
    pub(crate) messages: usize,
    /// Sends (publishes) each sender keeps unanswered.
    #[arg(long, default_value_t = 256)]
    pub(crate) window: usize,
    /// One-at-a-time messages for the latency figures.
    #[arg(long, default_value_t = 2_000)]
    pub(crate) samples: usize,
    /// Runs per level, each measuring both contenders; medians (and the
    /// min–max of the rates) are reported.
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: usize,
}

/// One contender's figures in one run.
#[derive(Debug, Clone, Copy)]
struct Figures {
    per_sec: f64,
    /// CPU time per message of the rate run (µs), all the contender's
    /// processes: the relay, daemons and clients (one process), or
    /// nats-server and the bench's NATS clients.
    cpu_us: f64,
    accept_p50: f64,
    accept_p99: f64,
    delivery_p50: f64,
    delivery_p99: f64,
}

const BODY: usize = 128;
const SUBJECT: &str = "bench.durable";
const DELIVER: &str = "deliver.durable";
const ACKS: &str = "_INBOX.durable.acks";

pub(crate) async fn durable_bench(a: DurableArgs, out: &Output) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let identity = Identity::dev_in_dir(&tmp.path().join("tls"), &[])?;
    let (cert, key) = (
        tmp.path().join("tls").join("relay.crt"),
        tmp.path().join("tls").join("relay.key"),
    );
    let tls = Arc::new(swb_daemon::Trust::Fingerprint(identity.fingerprint()).rustls_config(&[])?);
    let version = nats::server_version().await?;
    let sync_ok = version >= (2, 10, 0);
    let levels = [
        ("sync", Durability::Sync, "sync_interval: always"),
        (
            "process",
            Durability::Process,
            "default (synced every 2 min)",
        ),
        ("memory", Durability::Memory, "memory storage"),
    ];
    let runs = a.runs.max(1);
    for (label, level, js_label) in levels {
        let js_runs = level != Durability::Sync || sync_ok;
        let (mut ours, mut js) = (Vec::new(), Vec::new());
        for run in 0..runs {
            // Contenders take turns within each run: a slow spell of the
            // machine falls on both.
            let dir = tmp.path().join(format!("{label}-{run}"));
            ours.push(ours_once(&identity, &dir.join("relay"), level, &a).await?);
            if js_runs {
                let store = dir.join("jetstream");
                let server =
                    nats::start_jetstream(&store, (&cert, &key), level == Durability::Sync).await?;
                let storage = if level == Durability::Memory {
                    "memory"
                } else {
                    "file"
                };
                let pid = server.pid().context("nats-server is not running")?;
                js.push(js_once(server.addr, pid, tls.clone(), storage, &a).await?);
                drop(server);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        let o = summarize(&ours);
        let j = (!js.is_empty()).then(|| summarize(&js));
        if let Some(j) = &j {
            let what = |f: &str| format!("{f} at {label} (vs JetStream {js_label})");
            record(
                "durable",
                &what("deliveries/s"),
                o.0.per_sec,
                j.0.per_sec,
                true,
                1.0,
            );
            record(
                "durable",
                &what("accept p50 ms"),
                o.0.accept_p50,
                j.0.accept_p50,
                false,
                1.0,
            );
            record(
                "durable",
                &what("accept p99 ms"),
                o.0.accept_p99,
                j.0.accept_p99,
                false,
                1.0,
            );
            record(
                "durable",
                &what("delivery p50 ms"),
                o.0.delivery_p50,
                j.0.delivery_p50,
                false,
                1.0,
            );
            record(
                "durable",
                &what("delivery p99 ms"),
                o.0.delivery_p99,
                j.0.delivery_p99,
                false,
                1.0,
            );
        }
        print(out, label, js_label, version, runs, &o, j.as_ref());
    }
    Ok(())
}

/// The medians of the runs' figures, and the min–max of their rates.
fn summarize(runs: &[Figures]) -> (Figures, (f64, f64)) {
    let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
    let rates: Vec<f64> = runs.iter().map(|f| f.per_sec).collect();
    let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = rates.iter().copied().fold(0.0, f64::max);
    (
        Figures {
            per_sec: m(|f| f.per_sec),
            cpu_us: m(|f| f.cpu_us),
            accept_p50: m(|f| f.accept_p50),
            accept_p99: m(|f| f.accept_p99),
            delivery_p50: m(|f| f.delivery_p50),
            delivery_p99: m(|f| f.delivery_p99),
        },
        (lo, hi),
    )
}

fn print(
    out: &Output,
    label: &str,
    js_label: &str,
    version: (u32, u32, u32),
    runs: usize,
    o: &(Figures, (f64, f64)),
    j: Option<&(Figures, (f64, f64))>,
) {
    let v = format!("{}.{}.{}", version.0, version.1, version.2);
    if out.json {
        let fig = |f: &(Figures, (f64, f64))| {
            serde_json::json!({"per_sec": f.0.per_sec, "per_sec_min": f.1 .0, "per_sec_max": f.1 .1,
                "cpu_us_per_msg": f.0.cpu_us,
                "accept_p50_ms": f.0.accept_p50, "accept_p99_ms": f.0.accept_p99,
                "delivery_p50_ms": f.0.delivery_p50, "delivery_p99_ms": f.0.delivery_p99})
        };
        println!(
            "{}",
            serde_json::json!({"bench": "durable", "level": label, "runs": runs, "size": BODY,
                "nats_server": v, "ours": fig(o), "jetstream": j.map(fig), "jetstream_setting": js_label})
        );
        return;
    }
    println!("durable at {label}: medians of {runs} runs, {BODY} B, one sender, one receiver acking each message");
    let line = |who: &str, f: &(Figures, (f64, f64))| {
        println!(
            "  {who:<38} {:>8.0}/s ({:.0}–{:.0})  CPU {:>5.2} µs/msg   accept p50 {:>6.2} ms p99 {:>6.2} ms   delivery p50 {:>6.2} ms p99 {:>6.2} ms",
            f.0.per_sec, f.1 .0, f.1 .1, f.0.cpu_us, f.0.accept_p50, f.0.accept_p99, f.0.delivery_p50, f.0.delivery_p99
        );
    };
    line(&format!("switchboard, Rust API, {label}"), o);
    match j {
        Some(j) => {
            line(&format!("JetStream {v}, {js_label}"), j);
            println!(
                "  ratios: deliveries/s {:.2} (goal >= 1.0); accept p50 {:.2} p99 {:.2}; delivery p50 {:.2} p99 {:.2} (goals <= 1.0)",
                o.0.per_sec / j.0.per_sec,
                o.0.accept_p50 / j.0.accept_p50,
                o.0.accept_p99 / j.0.accept_p99,
                o.0.delivery_p50 / j.0.delivery_p50,
                o.0.delivery_p99 / j.0.delivery_p99,
            );
        }
        None => println!(
            "  JetStream {js_label}: not measured — nats-server {v} has no sync_interval: always (2.10 or later does; point SWB_NATS_SERVER at one)"
        ),
    }
}

/// A relay storing mail in `data` at `level`, two daemons, one run.
async fn ours_once(
    identity: &Identity,
    data: &std::path::Path,
    level: Durability,
    a: &DurableArgs,
) -> Result<Figures> {
    let (mut rc, key) = bench_relay_config(identity.clone())?;
    rc.state_dir = Some(data.to_path_buf());
    rc.durability = Some(level);
    rc.limits.messages = 65_536;
    rc.limits.bytes = 64 * 1024 * 1024;
    let relay = Relay::spawn(rc).await?;
    let sockets = data.join("sockets");
    std::fs::create_dir_all(&sockets)?;
    let tx = bench_daemon(&relay, &key, "sender", &sockets, Vec::new()).await?;
    let rx = bench_daemon(&relay, &key, "receiver", &sockets, Vec::new()).await?;
    let sender = tx.sender();
    let mut receiver = rx.receiver();
    let body = bytes::Bytes::from(vec![0x42u8; BODY]);
    let wait = Duration::from_secs(30);

    // Rate: `window` sends unanswered; the receiver acknowledges what it takes.
    let n = a.messages;
    let me = std::process::id();
    let cpu0 = proc_cpu_ticks(me)?;
    let t = Instant::now();
    let send = async {
        let mut waiting = std::collections::VecDeque::with_capacity(a.window);
        for _ in 0..n {
            if waiting.len() >= a.window.max(1) {
                let mut p: swb_daemon::PendingSend = waiting.pop_front().context("window")?;
                p.answer().await?;
            }
            waiting.push_back(sender.submit("receiver", body.clone(), wait).await?);
        }
        for mut p in waiting {
            p.answer().await?;
        }
        anyhow::Ok(())
    };
    let recv = async {
        let mut got = 0;
        while got < n {
            let msgs = receiver.recv(1000, wait).await?;
            ensure!(!msgs.is_empty(), "deliveries stalled after {got}");
            got += msgs.len();
            receiver
                .ack(&msgs.iter().map(|m| m.id).collect::<Vec<_>>())
                .await?;
        }
        anyhow::Ok(())
    };
    tokio::try_join!(send, recv)?;
    let per_sec = n as f64 / t.elapsed().as_secs_f64();
    let cpu_us = cpu_us_per(proc_cpu_ticks(me)?.saturating_sub(cpu0), n);

    // Latency: one message at a time.
    let (mut accept, mut delivery) = (Vec::new(), Vec::new());
    for _ in 0..a.samples {
        let t0 = Instant::now();
        let send = async {
            let mut p = sender.submit("receiver", body.clone(), wait).await?;
            p.answer().await?;
            anyhow::Ok(t0.elapsed())
        };
        let recv = async {
            loop {
                let msgs = receiver.recv(1, wait).await?;
                if let Some(m) = msgs.first() {
                    let took = t0.elapsed();
                    receiver.ack(&[m.id]).await?;
                    return anyhow::Ok(took);
                }
            }
        };
        let (s, r) = tokio::try_join!(send, recv)?;
        accept.push(s);
        delivery.push(r);
    }
    tx.shutdown();
    rx.shutdown();
    relay.shutdown();
    relay.join().await;
    figures((per_sec, cpu_us), &accept, &delivery)
}

fn figures(
    (per_sec, cpu_us): (f64, f64),
    accept: &[Duration],
    delivery: &[Duration],
) -> Result<Figures> {
    let (ha, hd) = (Hist::of(accept)?, Hist::of(delivery)?);
    Ok(Figures {
        per_sec,
        cpu_us,
        accept_p50: pct(&ha, 0.5),
        accept_p99: pct(&ha, 0.99),
        delivery_p50: pct(&hd, 0.5),
        delivery_p99: pct(&hd, 0.99),
    })
}

/// Sends a JetStream API request on `tx` (replies come to `ACKS`, which
/// `rx` subscribes to) and fails on an error answer.
async fn js_api(tx: &mut NatsTx, rx: &mut NatsRx, subject: &str, body: &str) -> Result<()> {
    tx.publish(subject, Some(ACKS), body.as_bytes());
    tx.flush().await?;
    let m = tokio::time::timeout(Duration::from_secs(10), rx.next())
        .await
        .with_context(|| format!("no answer to {subject}"))??;
    let text = String::from_utf8_lossy(&m.payload);
    if text.contains("\"error\"") {
        bail!("{subject}: {text}");
    }
    Ok(())
}

/// A publish acknowledgement that is not an error.
fn check_puback(payload: &[u8]) -> Result<()> {
    if payload.windows(7).any(|w| w == b"\"error\"") {
        bail!("publish refused: {}", String::from_utf8_lossy(payload));
    }
    Ok(())
}

/// A workqueue stream (acknowledged messages are deleted, as a mailbox
/// does) in `storage` (`file` or `memory`) with one push consumer
/// acknowledging explicitly; one run.
async fn js_once(
    addr: std::net::SocketAddr,
    server_pid: u32,
    tls: Arc<rustls::ClientConfig>,
    storage: &str,
    a: &DurableArgs,
) -> Result<Figures> {
    let (mut ptx, mut prx) = nats::subscribed(addr, Some(tls.clone()), ACKS).await?;
    let stream = format!(
        r#"{{"name":"DURABLE","subjects":["{SUBJECT}"],"storage":"{storage}","retention":"workqueue","num_replicas":1}}"#
    );
    js_api(&mut ptx, &mut prx, "$JS.API.STREAM.CREATE.DURABLE", &stream).await?;
    let (mut ctx, mut crx) = nats::subscribed(addr, Some(tls), DELIVER).await?;
    let consumer = format!(
        r#"{{"stream_name":"DURABLE","config":{{"deliver_subject":"{DELIVER}","ack_policy":"explicit","max_ack_pending":65536,"deliver_policy":"all"}}}}"#
    );
    js_api(
        &mut ptx,
        &mut prx,
        "$JS.API.CONSUMER.CREATE.DURABLE",
        &consumer,
    )
    .await?;
    let body = vec![0x42u8; BODY];

    // Rate.
    let n = a.messages;
    let room = Arc::new(tokio::sync::Semaphore::new(a.window.max(1)));
    let me = std::process::id();
    let cpu = || anyhow::Ok(proc_cpu_ticks(me)? + proc_cpu_ticks(server_pid)?);
    let cpu0 = cpu()?;
    let t = Instant::now();
    let publish = {
        let room = room.clone();
        let (ptx, body) = (&mut ptx, &body);
        async move {
            for _ in 0..n {
                match room.try_acquire() {
                    Ok(p) => p.forget(),
                    Err(_) => {
                        ptx.flush().await?;
                        room.acquire().await?.forget();
                    }
                }
                ptx.publish(SUBJECT, Some(ACKS), body);
            }
            ptx.flush().await?;
            anyhow::Ok(())
        }
    };
    let acks = async {
        for _ in 0..n {
            check_puback(&prx.next().await?.payload)?;
            room.add_permits(1);
        }
        anyhow::Ok(())
    };
    let consume = async {
        for _ in 0..n {
            let m = crx.next().await?;
            let reply = m
                .reply
                .context("a JetStream delivery without an ack subject")?;
            ctx.publish(&reply, None, b"");
            if !crx.has_buffered() {
                ctx.flush().await?;
            }
        }
        ctx.flush().await?;
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(300), async {
        tokio::try_join!(publish, acks, consume)
    })
    .await
    .context("JetStream rate run stalled")??;
    let per_sec = n as f64 / t.elapsed().as_secs_f64();
    let cpu_us = cpu_us_per(cpu()?.saturating_sub(cpu0), n);

    // Latency: one message at a time.
    let (mut accept, mut delivery) = (Vec::new(), Vec::new());
    for _ in 0..a.samples {
        let t0 = Instant::now();
        ptx.publish(SUBJECT, Some(ACKS), &body);
        ptx.flush().await?;
        let ack = async {
            check_puback(&prx.next().await?.payload)?;
            anyhow::Ok(t0.elapsed())
        };
        let got = async {
            let m = crx.next().await?;
            let took = t0.elapsed();
            let reply = m
                .reply
                .context("a JetStream delivery without an ack subject")?;
            ctx.publish(&reply, None, b"");
            ctx.flush().await?;
            anyhow::Ok(took)
        };
        let (s, r) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::try_join!(ack, got)
        })
        .await
        .context("JetStream latency sample stalled")??;
        accept.push(s);
        delivery.push(r);
    }
    figures((per_sec, cpu_us), &accept, &delivery)
}
