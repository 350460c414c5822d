//! `swbd demo`: the first-run experience. A dev relay and peers in this
//! process, on free loopback ports, with temporary directories; messages
//! both ways, mail for a peer that attaches later, a burst; timings; then
//! the commands to do the same with separate processes. Exit 0 only if
//! every step worked.

use crate::Output;
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use std::future::Future;
use std::time::{Duration, Instant};
use swb_daemon::{ApiKey, Client, Daemon, DaemonConfig, DaemonHandle, Exposure, Trust};
use swb_relay::keys::{self, KeysFile};
use swb_relay::{Identity, KeySource, Relay, RelayConfig};

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Messages in the burst step.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    burst: u32,
}

/// Longest any single step may take before the demo gives up.
const STEP_LIMIT: Duration = Duration::from_secs(20);

struct Steps {
    started: Instant,
    json: bool,
}

impl Steps {
    async fn run<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T>>,
    ) -> Result<(T, Duration)> {
        let t = Instant::now();
        let r = tokio::time::timeout(STEP_LIMIT, f)
            .await
            .map_err(|_| anyhow::anyhow!("{what}: no result within {STEP_LIMIT:?}"))?
            .with_context(|| format!("demo step failed: {what}"))?;
        let took = t.elapsed();
        if !self.json {
            outln!("  ok  {what:<66} {:>9}", fmt_dur(took));
        }
        Ok((r, took))
    }
}

fn fmt_dur(d: Duration) -> String {
    if d < Duration::from_millis(10) {
        format!("{:.2} ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }
}

async fn start_daemon(
    relay: &str,
    fp: &str,
    key: &str,
    name: &str,
    dir: &std::path::Path,
    expose: Vec<Exposure>,
) -> Result<DaemonHandle> {
    let mut cfg = DaemonConfig::new(
        relay,
        Trust::Fingerprint(fp.to_string()),
        name,
        ApiKey::new(key),
        dir.join(format!("{name}.sock")),
    );
    cfg.expose = expose;
    let d = Daemon::spawn(cfg).await?;
    d.connected()
        .await
        .map_err(|e| anyhow::anyhow!("{name} could not connect: {e}"))?;
    Ok(d)
}

async fn recv_one(d: &DaemonHandle) -> Result<(String, Vec<u8>)> {
    let mut c = Client::connect(d.control_path()).await?;
    let msgs = c.recv(STEP_LIMIT, 1).await?;
    let Some(m) = msgs.into_iter().next() else {
        bail!("nothing arrived");
    };
    c.ack(vec![m.id.clone()]).await?;
    Ok((m.from.clone(), m.body()))
}

pub(crate) async fn run(a: DemoArgs, out: &Output) -> Result<()> {
    let steps = Steps {
        started: Instant::now(),
        json: out.json,
    };
    let dir = tempfile::Builder::new()
        .prefix("swbd-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    if !out.json {
        outln!("Switchboard demo: a dev relay and peers in this process, on loopback.\n");
    }

    let ((relay, key), relay_t) = steps
        .run("start a dev relay (self-signed TLS, one API key)", async {
            let identity = Identity::dev_in_dir(&dir.path().join("relay"), &[])?;
            let new = keys::generate("demo", "swbd demo")?;
            let file = KeysFile {
                keys: vec![new.entry],
            };
            let cfg = RelayConfig::new("127.0.0.1:0".parse()?, identity, KeySource::Static(file));
            Ok((Relay::spawn(cfg).await?, new.key))
        })
        .await?;
    let addr = relay.local_addr().to_string();
    // What london exposes on port 8080: an echo server on loopback.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let echo_addr = echo.local_addr()?;
    // Its connections live in a JoinSet owned by the task: aborting the
    // task at the end ends them too.
    let echo_task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((s, _)) = echo.accept().await {
            conns.spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    let fp = relay.fingerprint().to_string();

    let ((london, laptop), attach_t) = steps
        .run(
            "attach peers london and laptop (QUIC + TLS + Hello)",
            async {
                let (a, b) = tokio::join!(
                    start_daemon(
                        &addr,
                        &fp,
                        &key,
                        "london",
                        dir.path(),
                        vec![Exposure {
                            port: 8080,
                            target: echo_addr.to_string(),
                        }]
                    ),
                    start_daemon(&addr, &fp, &key, "laptop", dir.path(), Vec::new()),
                );
                Ok((a?, b?))
            },
        )
        .await?;

    let (_, one_way_t) = steps
        .run(
            "laptop -> london 'deploy done' (send, receive, acknowledge)",
            async {
                let mut c = Client::connect(laptop.control_path()).await?;
                let sent = c.send("london", b"deploy done", STEP_LIMIT).await?;
                ensure!(sent.online, "london should be attached");
                let (from, body) = recv_one(&london).await?;
                ensure!(
                    from == "laptop" && body == b"deploy done",
                    "london got {from:?} {body:?}"
                );
                Ok(())
            },
        )
        .await?;

    let (_, back_t) = steps
        .run("london -> laptop 'thanks'", async {
            let mut c = Client::connect(london.control_path()).await?;
            c.send("laptop", b"thanks", STEP_LIMIT).await?;
            let (from, body) = recv_one(&laptop).await?;
            ensure!(
                from == "london" && body == b"thanks",
                "laptop got {from:?} {body:?}"
            );
            Ok(())
        })
        .await?;

    let (paris, offline_t) = steps
        .run(
            "laptop -> paris while paris is offline; paris attaches, gets it",
            async {
                let mut c = Client::connect(laptop.control_path()).await?;
                let sent = c.send("paris", b"welcome back", STEP_LIMIT).await?;
                ensure!(!sent.online, "paris should not be attached yet");
                let paris = start_daemon(&addr, &fp, &key, "paris", dir.path(), Vec::new()).await?;
                let (from, body) = recv_one(&paris).await?;
                ensure!(
                    from == "laptop" && body == b"welcome back",
                    "paris got {from:?} {body:?}"
                );
                Ok(paris)
            },
        )
        .await?;

    let n = a.burst as usize;
    let (_, burst_t) = steps
        .run(
            &format!("burst: {n} messages laptop -> london, in order"),
            async {
                let mut tx = Client::connect(laptop.control_path()).await?;
                let send = async {
                    for i in 0..n {
                        tx.send("london", format!("m{i}").as_bytes(), STEP_LIMIT)
                            .await?;
                    }
                    anyhow::Ok(())
                };
                let recv = async {
                    let mut rx = Client::connect(london.control_path()).await?;
                    let mut next = 0usize;
                    while next < n {
                        let msgs = rx.recv(STEP_LIMIT, n - next).await?;
                        ensure!(!msgs.is_empty(), "burst stalled after {next} messages");
                        for m in &msgs {
                            let want = format!("m{next}");
                            ensure!(
                                m.body() == want.as_bytes(),
                                "out of order: got {:?}, want {want}",
                                String::from_utf8_lossy(&m.body())
                            );
                            next += 1;
                        }
                        rx.ack(msgs.into_iter().map(|m| m.id).collect()).await?;
                    }
                    anyhow::Ok(())
                };
                let (s, r) = tokio::join!(send, recv);
                s?;
                r
            },
        )
        .await?;

    const STREAM_BYTES: usize = 16 << 20;
    let (_, stream_t) = steps
        .run(
            "laptop -> london:8080 stream (as swbd connect does), 16 MiB echoed",
            async {
                let c = Client::connect(laptop.control_path()).await?;
                let s = c
                    .connect_stream("london.switchboard", 8080, STEP_LIMIT)
                    .await?;
                let (mut r, mut w) = tokio::io::split(s);
                let data: Vec<u8> = (0..STREAM_BYTES).map(|i| (i % 251) as u8).collect();
                let write = async {
                    tokio::io::AsyncWriteExt::write_all(&mut w, &data).await?;
                    tokio::io::AsyncWriteExt::shutdown(&mut w).await?;
                    anyhow::Ok(())
                };
                let read = async {
                    let mut back = Vec::with_capacity(STREAM_BYTES);
                    tokio::io::AsyncReadExt::read_to_end(&mut r, &mut back).await?;
                    anyhow::Ok(back)
                };
                let (w, back) = tokio::join!(write, read);
                w?;
                ensure!(back? == data, "the echo differs from what was sent");
                Ok(())
            },
        )
        .await?;
    let (refusal, _) = steps
        .run(
            "laptop -> london:22 is refused: london does not expose it",
            async {
                let c = Client::connect(laptop.control_path()).await?;
                match c.connect_stream("london", 22, STEP_LIMIT).await {
                    Ok(_) => bail!("port 22 should be refused"),
                    Err(swb_daemon::ControlError::Remote { code, message }) => {
                        ensure!(
                            code == "port_not_exposed",
                            "unexpected refusal {code}: {message}"
                        );
                        Ok(message)
                    }
                    Err(e) => Err(e.into()),
                }
            },
        )
        .await?;

    let (pong, _) = steps
        .run(
            "laptop pings london through the relay (answered by london's daemon)",
            async {
                let mut c = Client::connect(laptop.control_path()).await?;
                Ok(c.ping("london", STEP_LIMIT).await?)
            },
        )
        .await?;

    let (stats, _) = steps
        .run(
            "the relay holds no mail: everything was acknowledged",
            async {
                // Acknowledgements travel daemon -> relay after `recv` returns;
                // give them the step's time limit to land.
                loop {
                    let s = relay.stats();
                    if s.held == 0 && s.acked == s.accepted {
                        return Ok(s);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            },
        )
        .await?;

    for d in [london, laptop, paris] {
        d.shutdown();
        d.join().await?;
    }
    relay.shutdown();
    relay.join().await;
    echo_task.abort();

    let total = steps.started.elapsed();
    let per_msg = burst_t / n as u32;
    let rate = n as f64 / burst_t.as_secs_f64();
    if out.json {
        outln!(
            "{}",
            serde_json::json!({
                "ok": true,
                "relay_start_ms": relay_t.as_secs_f64() * 1e3,
                "attach_ms": attach_t.as_secs_f64() * 1e3,
                "message_ms": one_way_t.as_secs_f64() * 1e3,
                "reply_ms": back_t.as_secs_f64() * 1e3,
                "offline_ms": offline_t.as_secs_f64() * 1e3,
                "burst_messages": n,
                "burst_ms": burst_t.as_secs_f64() * 1e3,
                "burst_msgs_per_sec": rate,
                "stream_bytes": STREAM_BYTES,
                "stream_ms": stream_t.as_secs_f64() * 1e3,
                "stream_mb_per_sec": (2 * STREAM_BYTES) as f64 / stream_t.as_secs_f64() / 1e6,
                "ping_ms": pong.rtt.as_secs_f64() * 1e3,
                "ping_via": pong.via,
                "accepted": stats.accepted,
                "acked": stats.acked,
                "total_ms": total.as_secs_f64() * 1e3,
            })
        );
        return Ok(());
    }
    outln!(
        "\nAll steps worked in {}. {} messages accepted and acknowledged end to end;",
        fmt_dur(total),
        stats.accepted
    );
    outln!(
        "the burst ran at {rate:.0} messages/s ({} per message, each one send -> relay accepted -> delivered -> acknowledged).",
        fmt_dur(per_msg)
    );
    outln!(
        "a 16 MiB stream went to london's port 8080 and back at {:.0} MB/s each way; port 22 was refused: \"{refusal}\".\n\
         a ping from laptop to london via {} took {:.3} ms.",
        STREAM_BYTES as f64 / stream_t.as_secs_f64() / 1e6,
        pong.via.join(" -> "),
        pong.rtt.as_secs_f64() * 1e3
    );
    outln!(
        "\nThe same with separate processes (each in its own terminal):\n\n\
         \x20 swbd keys create --keys keys.toml --namespace acme        # prints the key\n\
         \x20 swbd relay --dev --data-dir ./relay --keys keys.toml --listen 127.0.0.1:7443\n\
         \x20 export SWB_API_KEY=<the key>\n\
         \x20 swbd up --relay 127.0.0.1:7443 --relay-fingerprint $(cat relay/fingerprint) --name london --control /tmp/london.sock --expose 22 --socks off\n\
         \x20 swbd up --relay 127.0.0.1:7443 --relay-fingerprint $(cat relay/fingerprint) --name laptop --control /tmp/laptop.sock\n\
         \x20 swbd --control /tmp/laptop.sock send london 'deploy done'\n\
         \x20 swbd --control /tmp/london.sock recv --wait 10\n\
         \x20 swbd --control /tmp/london.sock status\n\
         \x20 swbd --control /tmp/laptop.sock ping london\n\
         \x20 ssh -o ProxyCommand=\"swbd --control /tmp/laptop.sock connect %h %p\" user@london.switchboard\n\
         \x20 curl --socks5-hostname 127.0.0.1:1080 http://london.switchboard:8080/   # with --expose 8080 on london\n\n\
         (From a checkout, `cargo run --release --` stands for `swbd`; or `cargo install --path cli`.)"
    );
    Ok(())
}
