//! `swbd-bench carrier`: the TCP carrier against UDP through one relay, in
//! one run — single-stream goodput (a sink behind one daemon, a source on
//! each carrier) and message round trips (p50/p99) — and, when `rathole`
//! is on PATH (`cargo install rathole`), rathole's TLS transport through
//! its server to the same sink as a TCP relay anchor.

use super::{
    bench_daemon_over, bench_relay_config, drain, latency, mb_s, median, push, record,
    DaemonHandleRef,
};
use crate::Output;
use anyhow::{ensure, Result};
use clap::Args;
use std::time::{Duration, Instant};
use swb_daemon::{Client, Exposure, Transport};
use swb_relay::{HttpListen, Identity, Relay};

#[derive(Debug, Args)]
pub(crate) struct CarrierArgs {
    /// Bytes per goodput run.
    #[arg(long, default_value_t = 128 << 20)]
    pub(crate) bytes: u64,
    /// Goodput runs per carrier; median and min–max reported.
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: u32,
    /// Message round trips per carrier.
    #[arg(long, default_value_t = 500)]
    pub(crate) samples: usize,
    /// Runs of each contender first, not counted: the first bulk transfer
    /// over a connection that was idle runs well below the rest.
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup: u32,
}

pub(crate) async fn carrier_bench(a: CarrierArgs, out: &Output) -> Result<()> {
    let (mut rc, key) = bench_relay_config(Identity::ephemeral()?)?;
    rc.http_listen = HttpListen::SameAsQuic;
    let relay = Relay::spawn(rc).await?;
    ensure!(
        relay.http_addr().map(|h| h.port()) == Some(relay.local_addr().port()),
        "HTTPS must share the QUIC port for the carrier"
    );
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    let sink_task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((s, _)) = sink.accept().await {
            let _ = s.set_nodelay(true);
            conns.spawn(async move {
                let (r, w) = s.into_split();
                let _ = drain(r, w).await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    let dir = tempfile::tempdir()?;
    let expose = vec![Exposure {
        port: 9,
        target: sink_addr.to_string(),
    }];
    let sinkd = bench_daemon_over(&relay, &key, "sink", dir.path(), expose, Transport::Udp).await?;
    let over_udp = bench_daemon_over(
        &relay,
        &key,
        "over-udp",
        dir.path(),
        Vec::new(),
        Transport::Udp,
    )
    .await?;
    let over_tcp = bench_daemon_over(
        &relay,
        &key,
        "over-tcp",
        dir.path(),
        Vec::new(),
        Transport::Tcp,
    )
    .await?;
    if !out.json {
        println!(
            "TCP carrier vs UDP through one relay: {} MiB per goodput run, {} runs each; {} message round trips each",
            a.bytes >> 20,
            a.runs,
            a.samples
        );
    }
    let rathole = match Rathole::start(sink_addr).await {
        Ok(r) => r,
        Err(e) => {
            if !out.json {
                println!("  (no rathole anchor: {e})");
            }
            None
        }
    };
    let (mut udp, mut tcp, mut rat) = (Vec::new(), Vec::new(), Vec::new());
    // Losses QUIC saw on the source's path during a run (packets lost,
    // congestion events): what caps a run that is not CPU-bound.
    let mut losses = [(0u64, 0u64); 2];
    for run in 0..a.warmup + a.runs {
        let counted = run >= a.warmup;
        if let Some(r) = &rathole {
            let s = tokio::net::TcpStream::connect(r.service).await?;
            let _ = s.set_nodelay(true);
            let (rd, wr) = s.into_split();
            let t = Instant::now();
            let got = push(wr, rd, a.bytes).await?;
            ensure!(
                got == a.bytes,
                "rathole: sink counted {got} of {} bytes",
                a.bytes
            );
            if counted {
                rat.push(mb_s(a.bytes, t.elapsed()));
            }
        }
        for (k, (d, v)) in [(&over_udp, &mut udp), (&over_tcp, &mut tcp)]
            .into_iter()
            .enumerate()
        {
            let c = Client::connect(d.control_path()).await?;
            let mut st = Client::connect(d.control_path()).await?;
            let lost = |s: swb_daemon::control::StatusInfo| {
                s.traffic
                    .map_or((0, 0), |t| (t.lost_packets, t.congestion_events))
            };
            let before = lost(st.status().await?);
            let s = c.connect_stream("sink", 9, Duration::from_secs(5)).await?;
            let (r, w) = tokio::io::split(s);
            let t = Instant::now();
            let got = push(w, r, a.bytes).await?;
            ensure!(got == a.bytes, "sink counted {got} of {} bytes", a.bytes);
            let took = mb_s(a.bytes, t.elapsed());
            if counted {
                v.push(took);
            }
            let after = lost(st.status().await?);
            losses[k] = (after.0 - before.0, after.1 - before.1);
        }
        if !counted {
            if !out.json {
                println!("  warm-up run (not counted)");
            }
            continue;
        }
        let i = run - a.warmup;
        if !out.json {
            let anchor = rat
                .get(i as usize)
                .map(|r| format!("   rathole over TLS {r:>8.1} MB/s"))
                .unwrap_or_default();
            println!(
                "  run {}: UDP {:>8.1} MB/s   TCP carrier {:>8.1} MB/s{anchor}   (lost/congestion events: UDP {}/{}, carrier {}/{})",
                i + 1,
                udp[i as usize],
                tcp[i as usize],
                losses[0].0,
                losses[0].1,
                losses[1].0,
                losses[1].1
            );
        }
    }
    let sink_ref = DaemonHandleRef(&sinkd);
    let l_udp = latency(&DaemonHandleRef(&over_udp), &sink_ref, "sink", a.samples).await?;
    let l_tcp = latency(&DaemonHandleRef(&over_tcp), &sink_ref, "sink", a.samples).await?;
    let p = |v: &[Duration], q: f64| v[((v.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e3;
    let range = super::min_max;
    let ((ul, uh), (tl, th)) = (range(&udp), range(&tcp));
    let (u, t) = (median(udp.clone()), median(tcp.clone()));
    record(
        "carrier",
        "stream goodput MB/s over the TCP carrier (vs UDP)",
        t,
        u,
        true,
        0.7,
    );
    let anchor = (!rat.is_empty()).then(|| (median(rat.clone()), range(&rat)));
    if let Some((m, _)) = anchor {
        record(
            "carrier",
            "stream goodput MB/s over the TCP carrier (vs rathole over TLS)",
            t,
            m,
            true,
            1.0,
        );
    }
    record(
        "carrier",
        "message p50 ms over the TCP carrier (vs UDP)",
        p(&l_tcp, 0.5),
        p(&l_udp, 0.5),
        false,
        1.5,
    );
    if out.json {
        println!(
            "{}",
            serde_json::json!({"bench": "carrier", "bytes": a.bytes, "runs": a.runs,
                "udp_mb_s": u, "udp_mb_s_min": ul, "udp_mb_s_max": uh,
                "tcp_mb_s": t, "tcp_mb_s_min": tl, "tcp_mb_s_max": th, "ratio": t / u,
                "udp_p50_ms": p(&l_udp, 0.5), "udp_p99_ms": p(&l_udp, 0.99),
                "tcp_p50_ms": p(&l_tcp, 0.5), "tcp_p99_ms": p(&l_tcp, 0.99),
                "rathole_tls_mb_s": anchor.map(|a| a.0)})
        );
    } else {
        println!(
            "goodput, median (min–max): UDP {u:.1} ({ul:.1}–{uh:.1}) MB/s, TCP carrier {t:.1} ({tl:.1}–{th:.1}) MB/s, ratio {:.2} (goal >= 0.7)",
            t / u
        );
        if let Some((m, (lo, hi))) = anchor {
            println!(
                "anchor: rathole over TLS {m:.1} ({lo:.1}–{hi:.1}) MB/s; TCP carrier / rathole {:.2} (goal >= 1.0)",
                t / m
            );
        }
        println!(
            "messages: UDP p50 {:.3} ms p99 {:.3} ms, TCP carrier p50 {:.3} ms p99 {:.3} ms",
            p(&l_udp, 0.5),
            p(&l_udp, 0.99),
            p(&l_tcp, 0.5),
            p(&l_tcp, 0.99)
        );
    }
    for d in [over_tcp, over_udp, sinkd] {
        d.shutdown();
        let _ = d.join().await;
    }
    relay.shutdown();
    relay.join().await;
    sink_task.abort();
    Ok(())
}

/// A rathole server and client over its TLS transport forwarding a service
/// port to `target` (rathole's own test certificates: a CA and a server
/// certificate for `localhost`, made with openssl).
struct Rathole {
    service: std::net::SocketAddr,
    _procs: [tokio::process::Child; 2],
    _dir: tempfile::TempDir,
}

/// A port free on loopback now.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Rathole {
    /// `Ok(None)` when `rathole` is not on PATH.
    async fn start(target: std::net::SocketAddr) -> Result<Option<Self>> {
        let Some(bin) = std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("rathole"))
                .find(|f| f.is_file())
        }) else {
            anyhow::bail!("rathole is not on PATH (cargo install rathole)");
        };
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let st = std::process::Command::new("openssl")
                .current_dir(d)
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()?;
            ensure!(st.success(), "openssl {args:?} failed");
            anyhow::Ok(())
        };
        std::fs::write(d.join("ext.cnf"), "subjectAltName=DNS:localhost\n")?;
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=bench-ca",
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ])?;
        openssl(&[
            "pkcs12",
            "-export",
            "-out",
            "identity.pfx",
            "-inkey",
            "server.key",
            "-in",
            "server.crt",
            "-certfile",
            "ca.crt",
            "-passout",
            "pass:bench",
        ])?;
        let (control, service) = (free_port()?, free_port()?);
        std::fs::write(
            d.join("server.toml"),
            format!(
                "[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"bench\"\n[server.transport]\ntype = \"tls\"\n[server.transport.tls]\npkcs12 = \"identity.pfx\"\npkcs12_password = \"bench\"\n[server.services.sink]\nbind_addr = \"127.0.0.1:{service}\"\n"
            ),
        )?;
        std::fs::write(
            d.join("client.toml"),
            format!(
                "[client]\nremote_addr = \"127.0.0.1:{control}\"\ndefault_token = \"bench\"\n[client.transport]\ntype = \"tls\"\n[client.transport.tls]\ntrusted_root = \"ca.crt\"\nhostname = \"localhost\"\n[client.services.sink]\nlocal_addr = \"{target}\"\n"
            ),
        )?;
        let spawn = |args: &[&str]| {
            tokio::process::Command::new(&bin)
                .current_dir(d)
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
        };
        let server = spawn(&["--server", "server.toml"])?;
        let client = spawn(&["--client", "client.toml"])?;
        let service = std::net::SocketAddr::from(([127, 0, 0, 1], service));
        // Up once a byte goes through to the sink and its count comes back.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let tried = async {
                let s = tokio::net::TcpStream::connect(service).await?;
                let (rd, wr) = s.into_split();
                push(wr, rd, 1).await
            };
            if let Ok(Ok(1)) = tokio::time::timeout(Duration::from_secs(2), tried).await {
                break;
            }
            ensure!(Instant::now() < deadline, "rathole did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Some(Self {
            service,
            _procs: [server, client],
            _dir: dir,
        }))
    }
}
