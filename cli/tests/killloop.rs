//! Nothing accepted is lost to a crash: relays (real `swbd relay`
//! processes, durability `sync`) are SIGKILLed at random moments while
//! senders pipeline messages and record every id the relay answered
//! `accepted`; after each kill the relay starts again on the same address.
//! At the end the receiver has every accepted id, in per-sender order
//! (duplicates only under the same id).

use anyhow::{bail, ensure, Context, Result};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use swb_daemon::control::{ControlError, Reply, Request};
use swb_daemon::{ApiKey, DaemonConfig, Trust};
use swb_tests::{eventually, line_with, TestDaemon};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const SWBD: &str = env!("CARGO_BIN_EXE_swbd");
const LONG: Duration = Duration::from_secs(120);

/// A relay process that can be killed and started again on its address.
struct RelayProc {
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
    addr: SocketAddr,
    fingerprint: String,
}

async fn spawn_relay(args: &[String], log: &Path) -> Result<(Child, SocketAddr, String)> {
    spawn_relay_logged(args, log).await.with_context(|| {
        // The log lives in a temporary directory: say its end here.
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("swbd {}\n--- end of its log ---\n{tail}", args.join(" "))
    })
}

async fn spawn_relay_logged(args: &[String], log: &Path) -> Result<(Child, SocketAddr, String)> {
    // Each run's log appended to one file beside its data, for diagnosis.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut child = Command::new(SWBD)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("SWB_TEST_RELAY_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let listening = line_with(&mut out, "relay listening on ").await?;
    let addr: SocketAddr = listening
        .split_whitespace()
        .nth(3)
        .context("address")?
        .parse()?;
    let fp = line_with(&mut out, "fingerprint sha256:").await?;
    let fingerprint = fp.trim_start_matches("fingerprint ").trim().to_string();
    // Keep reading stdout so the relay never blocks on it.
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    Ok((child, addr, fingerprint))
}

impl RelayProc {
    async fn start(dir: &Path, keys: &Path, extra: &[&str]) -> Result<Self> {
        let mut args: Vec<String> = ["relay", "--data-dir"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(dir.display().to_string());
        if !extra.contains(&"--cert") {
            args.push("--dev".into());
        }
        args.extend(["--keys".into(), keys.display().to_string()]);
        args.extend(["--mailbox-messages".into(), "100000".into()]);
        args.extend(["--mailbox-bytes".into(), "67108864".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = dir.with_extension("log");
        // Not on a port the kernel gave out: while the relay is down,
        // another test's socket could take that and the restart would fail.
        let mut tries = 0;
        let (child, addr, fingerprint) = loop {
            let mut with_port = args.clone();
            with_port.extend([
                "--listen".into(),
                swb_tests::restartable_addr()?.to_string(),
            ]);
            match spawn_relay(&with_port, &log).await {
                Err(e) if swb_tests::is_addr_in_use(&e) && tries < 5 => tries += 1,
                r => break r?,
            }
        };
        Ok(Self {
            child: Some(child),
            args,
            log,
            addr,
            fingerprint,
        })
    }

    /// SIGKILL, then start again on the same address.
    async fn crash_and_restart(&mut self) -> Result<()> {
        self.kill().await?;
        let mut args = self.args.clone();
        args.extend(["--listen".into(), self.addr.to_string()]);
        let (child, addr, _) = spawn_relay(&args, &self.log).await?;
        ensure!(addr == self.addr, "restarted on {addr}, not {}", self.addr);
        self.child = Some(child);
        Ok(())
    }

    /// Sends `sig` to the relay process (SIGSTOP, SIGCONT).
    fn signal(&self, sig: rustix::process::Signal) -> Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .context("relay not running")?;
        let pid = rustix::process::Pid::from_raw(i32::try_from(pid)?).context("pid")?;
        rustix::process::kill_process(pid, sig)?;
        Ok(())
    }

    async fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.start_kill()?; // SIGKILL
            tokio::time::timeout(LONG, c.wait()).await??;
        }
        Ok(())
    }
}

fn daemon_config(relays: &[&RelayProc], key: &str, name: &str) -> DaemonConfig {
    let mut c = DaemonConfig::new(
        relays[0].addr.to_string(),
        Trust::Fingerprint(relays[0].fingerprint.clone()),
        name,
        ApiKey::new(key),
        PathBuf::new(),
    );
    c.relays = relays.iter().map(|r| r.addr.to_string()).collect();
    c.keepalive = Duration::from_millis(300);
    c.idle_timeout = Duration::from_secs(2);
    c.backoff_min = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(200);
    c.connect_timeout = Duration::from_secs(3);
    c
}

fn new_key(keys: &Path) -> Result<String> {
    let mut file = swb_relay::keys::KeysFile::load(keys)?;
    let k = swb_relay::keys::generate("acme", "killloop")?;
    file.keys.push(k.entry);
    file.save(keys)?;
    Ok(k.key)
}

/// Accepted ids in the order their sends were made.
type Accepted = Arc<Mutex<Vec<String>>>;

/// Pipelines sends through the control socket until `stop`, recording
/// every id answered `sent`; a send that fails (relay down too long) is
/// simply not recorded. Returns how many were answered at all.
async fn pipelined_sender(
    control: PathBuf,
    to: String,
    accepted: Accepted,
    stop: tokio_util::sync::CancellationToken,
) -> Result<usize> {
    let c = swb_daemon::Client::connect(&control).await?;
    let (mut reqs, mut replies) = c.pipeline();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(256);
    let writer = async {
        let mut i = 0u64;
        while !stop.is_cancelled() {
            let body = format!("m{i}");
            reqs.push(&Request::Send {
                to: to.clone(),
                body_b64: base64_of(body.as_bytes()),
                timeout_ms: 20_000,
            })
            .await?;
            reqs.flush().await?;
            if tx.send(()).await.is_err() {
                break;
            }
            i += 1;
        }
        drop(tx);
        anyhow::Ok(())
    };
    let reader = async {
        let mut answered = 0;
        while rx.recv().await.is_some() {
            match replies.next().await {
                Ok(Reply::Sent { id, .. }) => accepted.lock().expect("lock").push(id),
                // Refused (its home relay was down): not accepted.
                Err(ControlError::Remote { .. }) => {}
                Ok(other) => bail!("unexpected reply {other:?}"),
                Err(e) => return Err(e.into()),
            }
            answered += 1;
        }
        Ok(answered)
    };
    // Either failing ends both (a reader gone must not leave the writer
    // waiting for room forever).
    let (_, answered) = tokio::try_join!(writer, reader)?;
    Ok(answered)
}

fn base64_of(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                out.push(T[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Receives (and acknowledges) until every id of `accepted` arrived;
/// checks that their first arrivals are in the order they were sent.
async fn receive_all(rx: &TestDaemon, accepted: &[String]) -> Result<usize> {
    let want: HashMap<&str, usize> = accepted
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut order: Vec<usize> = Vec::new();
    let mut duplicates = 0;
    let mut c = rx.client().await?;
    let deadline = tokio::time::Instant::now() + LONG;
    while order.len() < want.len() {
        if tokio::time::Instant::now() >= deadline {
            let missing = accepted.iter().filter(|id| !seen.contains(*id)).count();
            bail!(
                "{missing} of {} accepted messages never arrived",
                accepted.len()
            );
        }
        let msgs = c.recv(Duration::from_millis(200), 1000).await?;
        for m in &msgs {
            if !seen.insert(m.id.clone()) {
                duplicates += 1;
                continue;
            }
            if let Some(i) = want.get(m.id.as_str()) {
                order.push(*i);
            }
        }
        if !msgs.is_empty() {
            c.ack(msgs.iter().map(|m| m.id.clone()).collect()).await?;
        }
    }
    ensure!(
        order.windows(2).all(|w| w[0] < w[1]),
        "accepted messages arrived out of their order"
    );
    Ok(duplicates)
}

/// Random moments: a pause of 50–400 ms before each kill.
fn pause() -> Duration {
    Duration::from_millis(50 + fastrand::u64(..350))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_twenty_times_loses_no_accepted_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys.toml");
    let key = new_key(&keys)?;
    let mut relay = RelayProc::start(&dir.path().join("relay"), &keys, &[]).await?;
    let alpha = TestDaemon::spawn(daemon_config(&[&relay], &key, "alpha")).await?;
    let beta = TestDaemon::spawn(daemon_config(&[&relay], &key, "beta")).await?;
    tokio::time::timeout(LONG, alpha.handle.connected()).await??;

    let accepted: Accepted = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let sender = tokio::spawn(pipelined_sender(
        alpha.handle.control_path().to_path_buf(),
        "beta".into(),
        accepted.clone(),
        stop.clone(),
    ));
    for _ in 0..20 {
        tokio::time::sleep(pause()).await;
        relay.crash_and_restart().await?;
    }
    tokio::time::sleep(pause()).await;
    stop.cancel();
    let answered = tokio::time::timeout(LONG, sender).await???;
    let accepted = accepted.lock().expect("lock").clone();
    eprintln!(
        "{answered} sends answered, {} accepted, across 20 SIGKILLs",
        accepted.len()
    );
    ensure!(
        accepted.len() > 100,
        "the sender got through between the kills"
    );
    let dups = receive_all(&beta, &accepted).await?;
    eprintln!("every accepted message arrived, in order ({dups} duplicates by id)");
    relay.kill().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_http_senders_loses_no_accepted_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys.toml");
    let key = new_key(&keys)?;
    let data = dir.path().join("relay");
    let mut relay = RelayProc::start(&data, &keys, &[]).await?;
    let beta = TestDaemon::spawn(daemon_config(&[&relay], &key, "beta")).await?;
    let http = swb_tests::HttpClient::new(relay.addr, &relay.fingerprint, Some(&key))?;
    let accepted: Accepted = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let sender = {
        let (accepted, stop) = (accepted.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.is_cancelled() {
                let body = serde_json::json!({"from": "ci", "to": "beta", "body": format!("h{i}")});
                i += 1;
                // A refused or failed request is not accepted; move on.
                match tokio::time::timeout(Duration::from_secs(5), http.post("/v1/messages", &body))
                    .await
                {
                    Ok(Ok(r)) => {
                        if r.status == 202 {
                            let id = r.json["id"].as_str().unwrap_or_default().to_string();
                            accepted.lock().expect("lock").push(id);
                        }
                    }
                    // The relay is down (between a kill and its restart):
                    // pace the reconnects. Thousands of connects a second to
                    // a closed port in the ephemeral range will sooner or
                    // later pick that port as their own source — a TCP
                    // self-connection that holds the port, and the restart
                    // cannot bind it (seen once in CI).
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
    };
    for _ in 0..10 {
        tokio::time::sleep(pause()).await;
        relay.crash_and_restart().await?;
    }
    tokio::time::sleep(pause()).await;
    stop.cancel();
    tokio::time::timeout(LONG, sender).await??;
    let accepted = accepted.lock().expect("lock").clone();
    eprintln!("{} HTTP sends accepted across 10 SIGKILLs", accepted.len());
    ensure!(
        accepted.len() > 20,
        "the HTTP sender got through between the kills"
    );
    receive_all(&beta, &accepted).await?;
    relay.kill().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_home_relay_in_a_mesh_loses_no_accepted_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys.toml");
    let key = new_key(&keys)?;
    let mesh_key = dir.path().join("mesh.key");
    std::fs::write(&mesh_key, "m".repeat(40))?;
    let mk = mesh_key.display().to_string();
    // One certificate for all three, so the daemons trust each by one fingerprint.
    let tls = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
    let (cert, cert_key) = (dir.path().join("relay.crt"), dir.path().join("relay.key"));
    std::fs::write(&cert, tls.cert.pem())?;
    std::fs::write(&cert_key, tls.signing_key.serialize_pem())?;
    let (cert, cert_key) = (cert.display().to_string(), cert_key.display().to_string());
    let tls_args = |id: &'static str, seed: Option<&str>| {
        let mut a = vec![
            "--id",
            id,
            "--mesh-key-file",
            &mk,
            "--cert",
            &cert,
            "--key",
            &cert_key,
        ];
        if let Some(s) = seed {
            a.extend(["--mesh-peer", s]);
        }
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let ids = ["r1", "r2", "r3"];
    let ring = swb_ring::Ring::new(ids);
    // The receiver is homed on r3; the sender elsewhere.
    let rx_name = swb_tests::name_homed_on(&ids, "acme", "r3");
    let tx_name = swb_tests::name_homed_on(&ids, "acme", "r1");
    let start = |id: &'static str, seed: Option<String>| {
        let args = tls_args(id, seed.as_deref());
        let dir = dir.path().join(id);
        let keys = keys.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            RelayProc::start(&dir, &keys, &args).await
        }
    };
    let mut r1 = start("r1", None).await?;
    let seed = Some(r1.addr.to_string());
    let mut r2 = start("r2", seed.clone()).await?;
    let mut r3 = start("r3", seed).await?;
    let all = [&r1, &r2, &r3];
    let tx = TestDaemon::spawn(daemon_config(&all, &key, &tx_name)).await?;
    let rx = TestDaemon::spawn(daemon_config(&all, &key, &rx_name)).await?;
    // Both at home before the kills begin.
    for (d, home) in [(&tx, "r1"), (&rx, "r3")] {
        eventually("daemons at their home relays", LONG, || async {
            let s = d.client().await?.status().await?;
            Ok((s.relay_id.as_deref() == Some(home) && s.relays == 3).then_some(()))
        })
        .await?;
    }
    assert_eq!(ring.home("acme", &rx_name), Some("r3"));
    let accepted: Accepted = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let sender = tokio::spawn(pipelined_sender(
        tx.handle.control_path().to_path_buf(),
        rx_name.clone(),
        accepted.clone(),
        stop.clone(),
    ));
    for _ in 0..6 {
        tokio::time::sleep(pause()).await;
        r3.crash_and_restart().await?;
    }
    tokio::time::sleep(pause()).await;
    stop.cancel();
    tokio::time::timeout(LONG, sender).await???;
    let accepted = accepted.lock().expect("lock").clone();
    eprintln!(
        "{} accepted across 6 SIGKILLs of the receiver's home relay",
        accepted.len()
    );
    ensure!(
        accepted.len() > 50,
        "the sender got through between the kills"
    );
    receive_all(&rx, &accepted).await?;
    r1.kill().await?;
    r2.kill().await?;
    r3.kill().await
}

/// `swb_daemon_rebinds_total` of a daemon: its moves to a new UDP socket,
/// which a silence probe begins with.
fn rebinds(d: &TestDaemon) -> u64 {
    swb_tests::metric(&d.handle.metrics_text(), "swb_daemon_rebinds_total").unwrap_or(0)
}

/// A relay stalled (SIGSTOP) past its daemons' silence probe: every daemon
/// moves to a new UDP socket and probes the relay on a new connection;
/// once the relay runs again each is attached — on its old connection (the
/// relay answered it, the probe is dropped) or on its probe's (the relay
/// registered the name there first and, knowing the daemon's instance,
/// ended the old connection with `moved`, not `replaced`) — and gets its
/// mail; none stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stalled_past_the_silence_probe_keeps_every_daemon() -> Result<()> {
    swb_tests::init_logs();
    const N: usize = 32;
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys.toml");
    let key = new_key(&keys)?;
    let mut relay = RelayProc::start(&dir.path().join("relay"), &keys, &[]).await?;
    let mut daemons = Vec::new();
    for i in 0..N {
        let mut c = daemon_config(&[&relay], &key, &format!("s{i}"));
        // Silence, not death: the connections outlive the stall.
        c.idle_timeout = Duration::from_secs(30);
        c.silence_probe = Duration::from_secs(1);
        daemons.push(TestDaemon::spawn(c).await?);
    }
    for d in &daemons {
        tokio::time::timeout(LONG, d.handle.connected()).await??;
    }
    relay.signal(rustix::process::Signal::STOP)?;
    let probed = eventually("every daemon to probe the stalled relay", LONG, || async {
        Ok(daemons.iter().all(|d| rebinds(d) >= 1).then_some(()))
    })
    .await;
    relay.signal(rustix::process::Signal::CONT)?;
    probed?;
    // Mail around the ring: each daemon reaches the next, so every one is
    // attached again (a stopped daemon's control socket is gone).
    for (i, d) in daemons.iter().enumerate() {
        let to = format!("s{}", (i + 1) % N);
        d.send(&to, format!("after the stall {i}").as_bytes())
            .await
            .with_context(|| format!("s{i} sends to {to}"))?;
    }
    for (i, d) in daemons.iter().enumerate() {
        let got = d
            .recv_n(1)
            .await
            .with_context(|| format!("s{i} receives"))?;
        let from = (i + N - 1) % N;
        ensure!(got[0].from == format!("s{from}"), "s{i} got {:?}", got[0]);
    }
    for (i, d) in daemons.iter().enumerate() {
        let s = d.handle.state().borrow().clone();
        ensure!(
            matches!(s, swb_daemon::ConnState::Connected { .. }),
            "s{i} is not attached: {s:?}"
        );
    }
    relay.kill().await
}
