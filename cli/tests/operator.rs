//! The operator's kit with real `swbd` processes: the relay's config file
//! (flags win, unknown keys refused), metrics endpoints of relay and daemon
//! linted by `promtool`, JSON logs, systemd readiness and reload
//! notifications, `swbd ping` on one relay and across a mesh, shell
//! completions, man pages, and the service units (`systemd-analyze verify`).

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::process::{Output, Stdio};
use swb_tests::{
    line_with, mesh3, name_homed_on, need_program, promtool_check, sample, scrape,
    send_and_collect, HashServer, NotifySocket, TestDaemon, TestRelay, WAIT,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const SWBD: &str = env!("CARGO_BIN_EXE_swbd");

fn swbd() -> Command {
    let mut c = Command::new(SWBD);
    c.env_remove("SWB_API_KEY")
        .env_remove("SWB_CONTROL")
        .env_remove("NOTIFY_SOCKET")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

async fn output(cmd: &mut Command) -> Result<Output> {
    Ok(tokio::time::timeout(WAIT, cmd.output())
        .await
        .context("swbd did not finish")??)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn signal(pid: u32, sig: &str) -> Result<()> {
    let out =
        output(Command::new(need_program("kill", "procps")?).args([sig, &pid.to_string()])).await?;
    ensure!(out.status.success(), "kill {sig}: {}", text(&out.stderr));
    Ok(())
}

/// The `http://ADDR/metrics` address in a line.
fn metrics_addr(line: &str) -> Result<std::net::SocketAddr> {
    let rest = line
        .split("http://")
        .nth(1)
        .context("no http:// in the metrics line")?;
    let addr = rest.split('/').next().context("no address")?;
    Ok(addr.parse()?)
}

#[tokio::test]
async fn relay_from_a_config_file_serves_metrics_logs_json_and_tells_systemd() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let notify = NotifySocket::bind(dir.path())?;
    // Relative paths in the file are relative to the file.
    std::fs::write(
        dir.path().join("relay.toml"),
        r#"
dev = true
data_dir = "state"
keys = "keys.toml"
listen = "127.0.0.1:0"
metrics = "127.0.0.1:0"
id = "from-file"
message_ttl = "1h"
"#,
    )?;
    let mut child = swbd()
        .args(["--log-format", "json", "relay", "--config"])
        .arg(dir.path().join("relay.toml"))
        .args(["--id", "from-flag"])
        .env("NOTIFY_SOCKET", &notify.path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id().context("pid")?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut err = BufReader::new(child.stderr.take().context("stderr")?).lines();
    // The flag wins over the file.
    line_with(&mut out, "relay id from-flag").await?;
    let m = metrics_addr(&line_with(&mut out, "metrics on http://").await?)?;
    let ready = notify.until("READY=1").await?;
    ensure!(
        ready.contains("STATUS=relay from-flag listening on"),
        "{ready}"
    );
    ensure!(
        dir.path().join("state/fingerprint").exists(),
        "data_dir from the file, relative to it"
    );

    let metrics = scrape(m).await?;
    promtool_check(&metrics).await?;
    ensure!(
        sample(&metrics, "swb_relay_sessions_attached") == Some(0.0),
        "{metrics}"
    );

    // Logs are JSON objects, one a line.
    let first = tokio::time::timeout(WAIT, err.next_line())
        .await??
        .context("no log line")?;
    let v: serde_json::Value =
        serde_json::from_str(&first).with_context(|| format!("log line is not JSON: {first}"))?;
    ensure!(v["level"].is_string() && v["fields"].is_object(), "{v}");

    // Reload (SIGHUP) and stop (SIGTERM) are reported too.
    signal(pid, "-HUP").await?;
    notify.until("RELOADING=1").await?;
    notify.until("READY=1").await?;
    signal(pid, "-TERM").await?;
    notify.until("STOPPING=1").await?;
    let status = tokio::time::timeout(WAIT, child.wait()).await??;
    ensure!(status.success(), "relay exited with {status}");
    Ok(())
}

#[tokio::test]
async fn relay_config_file_refuses_unknown_keys_naming_key_and_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        "dev = true\nlisten = \"127.0.0.1:0\"\nlisen = \"x\"\n",
    )?;
    let out = output(swbd().args(["relay", "--config"]).arg(&path)).await?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let e = text(&out.stderr);
    ensure!(e.contains("lisen") && e.contains("line 3"), "{e}");
    // A value of the wrong kind is named too.
    std::fs::write(&path, "max_handshakes = \"many\"\n")?;
    let out = output(swbd().args(["relay", "--config"]).arg(&path)).await?;
    let e = text(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && e.contains("max_handshakes") && e.contains("line 1"),
        "{e}"
    );
    Ok(())
}

#[tokio::test]
async fn daemon_is_ready_once_it_reached_its_relay_and_reloads_exposures_on_sighup() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let hs = HashServer::start().await?;
    let dir = tempfile::tempdir()?;
    let notify = NotifySocket::bind(dir.path())?;
    std::fs::write(dir.path().join("api-key"), &key)?;
    let config = dir.path().join("swbd.toml");
    let write_config = |expose: &str| {
        std::fs::write(
            &config,
            format!(
                "relay = [\"{}\"]\nrelay_fingerprint = \"{}\"\nname = \"london\"\napi_key_file = \"{}\"\n\
                 socks = \"off\"\nmetrics = \"127.0.0.1:0\"\nexpose = [{expose}]\n",
                relay.addr(),
                relay.fingerprint(),
                dir.path().join("api-key").display()
            ),
        )
    };
    write_config(&format!("\"9000={}\"", hs.addr))?;
    let mut child = swbd()
        .args(["--log-format", "json", "up", "--config"])
        .arg(&config)
        .arg("--control")
        .arg(dir.path().join("control.sock"))
        .env("NOTIFY_SOCKET", &notify.path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id().context("pid")?;
    let mut err = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let m = metrics_addr(&line_with(&mut err, "metrics on http://").await?)?;
    let ready = notify.until("READY=1").await?;
    ensure!(
        ready.contains("STATUS=connected to relay test-relay as london"),
        "{ready}"
    );
    // Ready means attached: the relay has it already.
    ensure!(
        relay
            .handle()
            .peers("acme")
            .iter()
            .any(|p| p.name == "london"),
        "READY before the relay registered the daemon"
    );
    let metrics = scrape(m).await?;
    promtool_check(&metrics).await?;
    ensure!(
        sample(&metrics, "swb_daemon_connected") == Some(1.0),
        "{metrics}"
    );

    // 9001 is not exposed yet; after editing the file and SIGHUP it is,
    // without a reconnect.
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;
    match laptop.open_stream("london", 9001).await {
        Err(swb_daemon::ControlError::Remote { code, .. }) => assert_eq!(code, "port_not_exposed"),
        other => anyhow::bail!("expected port_not_exposed, got {:?}", other.err()),
    }
    let sessions = relay.handle().stats().sessions;
    write_config(&format!("\"9000={0}\", \"9001={0}\"", hs.addr))?;
    signal(pid, "-HUP").await?;
    notify.until("RELOADING=1").await?;
    notify.until("READY=1").await?;
    let s = laptop.open_stream("london", 9001).await?;
    let (sent, back) = send_and_collect(s, 3, 1 << 16).await?;
    assert_eq!(sent, back);
    assert_eq!(relay.handle().stats().sessions, sessions, "no reconnect");

    signal(pid, "-TERM").await?;
    notify.until("STOPPING=1").await?;
    let status = tokio::time::timeout(WAIT, child.wait()).await??;
    ensure!(status.success(), "daemon exited with {status}");
    Ok(())
}

async fn ping_out(control: &Path, args: &[&str]) -> Result<Output> {
    output(
        swbd()
            .arg("--control")
            .arg(control)
            .arg("ping")
            .args(args)
            .args(["--interval", "0"]),
    )
    .await
}

#[tokio::test]
async fn ping_prints_round_trips_and_the_path_on_one_relay_and_across_a_mesh() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "alpha").await?;
    let _b = TestDaemon::start(&relay, &key, "beta").await?;
    let ctl = a.handle.control_path().to_path_buf();

    let out = ping_out(&ctl, &["beta.switchboard", "--count", "3"]).await?;
    ensure!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    for l in &lines[..3] {
        ensure!(
            l.starts_with("pong from beta via test-relay: ") && l.ends_with(" ms"),
            "{l}"
        );
    }
    ensure!(
        lines[3].starts_with("3 sent, 3 answered; round trip min/median/max "),
        "{stdout}"
    );

    let out = ping_out(&ctl, &["beta", "--count", "2", "--json"]).await?;
    ensure!(out.status.success(), "{}", text(&out.stderr));
    let json: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(json.len(), 2);
    assert_eq!(json[1]["seq"], 2);
    assert_eq!(json[1]["via"], serde_json::json!(["test-relay"]));
    ensure!(
        json[1]["rtt_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{json:?}"
    );

    // Offline (or of another namespace: the same answer): one line, exit 1.
    let out = ping_out(&ctl, &["nobody"]).await?;
    assert_eq!(out.status.code(), Some(1));
    let e = text(&out.stderr);
    ensure!(
        e.starts_with("swbd: error: cannot ping nobody: ") && e.lines().count() == 1,
        "{e}"
    );
    ensure!(text(&out.stdout).is_empty(), "nothing on stdout");

    // Across a mesh hop the path names both relays.
    let (relays, api) = mesh3('q').await?;
    let ids = ["r1", "r2", "r3"];
    let x = TestDaemon::start(&relays[0], &api, &name_homed_on(&ids, "acme", "r2")).await?;
    let y_name = name_homed_on(&ids, "acme", "r3");
    let _y = TestDaemon::start(&relays[0], &api, &y_name).await?;
    let out = ping_out(x.handle.control_path(), &[&y_name, "--count", "1"]).await?;
    ensure!(out.status.success(), "{}", text(&out.stderr));
    ensure!(
        text(&out.stdout).starts_with(&format!("pong from {y_name} via r2 -> r3: ")),
        "{}",
        text(&out.stdout)
    );
    Ok(())
}

/// `swbd ARGS` with stdout a pipe whose reader has already gone, as after
/// `| head -1` read what it wanted: every write fails with `EPIPE`.
async fn closed_stdout(control: &Path, args: &[&str]) -> Result<Output> {
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    // Not `output()`: tokio's pipes stdout over the one given.
    let child = swbd()
        .arg("--control")
        .arg(control)
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()?;
    Ok(tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .context("swbd did not finish")??)
}

#[tokio::test]
async fn commands_end_quietly_when_their_reader_closes_and_recv_then_acknowledges_nothing(
) -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "alpha").await?;
    let b = TestDaemon::start(&relay, &key, "beta").await?;
    let ctl = a.handle.control_path().to_path_buf();
    let keys = relay.keys_path();
    let keys = keys.to_str().context("keys path")?;
    b.client()
        .await?
        .set_status(
            [("role".to_string(), "db".to_string())].into(),
            vec![],
            WAIT,
        )
        .await?;

    // What a reader that stops early sees: exit 0, nothing on stderr — not
    // the panic and backtrace of `println!` on a closed pipe.
    for args in [
        &["status"][..],
        &["--json", "status"],
        &["peers"],
        &["--json", "peers"],
        &["get-status", "beta"],
        &["ping", "beta", "--count", "2", "--interval", "0"],
        &["keys", "list", "--keys", keys],
        &["completions", "bash"],
    ] {
        let out = closed_stdout(&ctl, args).await?;
        let e = text(&out.stderr);
        ensure!(
            out.status.success() && e.is_empty(),
            "swbd {args:?} with a closed stdout: {} and stderr {e:?}",
            out.status
        );
    }

    // `recv` acknowledges only what reached stdout: with nowhere to print,
    // it says so and exits 1, and the message is received again.
    b.send("alpha", b"kept").await?;
    let out = closed_stdout(&ctl, &["recv", "--wait", "10s"]).await?;
    let e = text(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && e.contains("the messages were not acknowledged"),
        "{}: {e}",
        out.status
    );
    let got = a.recv_n(1).await?;
    assert_eq!(got[0].body(), b"kept");
    Ok(())
}

#[tokio::test]
async fn completions_for_three_shells_and_man_pages_come_from_the_cli() -> Result<()> {
    for (shell, marker) in [
        ("bash", "complete -F _swbd"),
        ("zsh", "#compdef swbd"),
        ("fish", "complete -c swbd"),
    ] {
        let out = output(swbd().args(["completions", shell])).await?;
        ensure!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let s = text(&out.stdout);
        ensure!(s.contains(marker), "{shell} completions lack {marker:?}");
        ensure!(
            s.contains("ping") && s.contains("relay"),
            "{shell}: subcommands missing"
        );
    }
    // The bash script parses.
    let dir = tempfile::tempdir()?;
    let bash = output(swbd().args(["completions", "bash"])).await?;
    std::fs::write(dir.path().join("swbd.bash"), &bash.stdout)?;
    let check = output(
        Command::new("bash")
            .arg("-n")
            .arg(dir.path().join("swbd.bash")),
    )
    .await?;
    ensure!(check.status.success(), "bash -n: {}", text(&check.stderr));

    let man = dir.path().join("man");
    let out = output(swbd().arg("man").arg(&man)).await?;
    ensure!(out.status.success(), "{}", text(&out.stderr));
    for page in [
        "swbd.1",
        "swbd-relay.1",
        "swbd-up.1",
        "swbd-ping.1",
        "swbd-keys-create.1",
    ] {
        let t = std::fs::read_to_string(man.join(page)).with_context(|| page.to_string())?;
        ensure!(
            t.starts_with(".ie") || t.contains(".TH"),
            "{page} is not a man page"
        );
    }
    ensure!(
        !man.join("swbd-man.1").exists(),
        "the hidden man command has no page"
    );
    Ok(())
}

#[tokio::test]
async fn service_units_pass_systemd_analyze_verify() -> Result<()> {
    let analyze = need_program("systemd-analyze", "systemd")?;
    let dir = tempfile::tempdir()?;
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd");
    let mut paths = Vec::new();
    for unit in ["swbd-relay.service", "swbd.service"] {
        // The installed binary's path, pointed at the one just built.
        let t = std::fs::read_to_string(units.join(unit))?;
        ensure!(t.contains("ExecStart=/usr/bin/swbd "), "{unit}");
        ensure!(
            t.contains("Type=notify") && t.contains("ExecReload="),
            "{unit}"
        );
        ensure!(
            t.contains("NoNewPrivileges=yes") && t.contains("ProtectSystem=strict"),
            "{unit}"
        );
        ensure!(
            t.contains("PrivateTmp=yes") && t.contains("\nCapabilityBoundingSet=\n"),
            "{unit}"
        );
        let p = dir.path().join(unit);
        std::fs::write(&p, t.replace("/usr/bin/swbd ", &format!("{SWBD} ")))?;
        paths.push(p);
    }
    // Man pages are checked by the package test, where they are installed.
    let out = output(
        Command::new(analyze)
            .args(["verify", "--man=no"])
            .args(&paths),
    )
    .await?;
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    Ok(())
}

#[tokio::test]
async fn concurrent_keys_create_lose_no_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys.toml");
    let path = keys.display().to_string();
    // Twenty at once on one file: each takes the file's lock for its
    // read-change-write, so none overwrites another's key.
    let mut runs = tokio::task::JoinSet::new();
    for i in 0..20 {
        let path = path.clone();
        runs.spawn(async move {
            output(swbd().args([
                "keys",
                "create",
                "--keys",
                &path,
                "--namespace",
                "acme",
                "--label",
                &format!("k{i}"),
            ]))
            .await
        });
    }
    let mut made = Vec::new();
    while let Some(r) = runs.join_next().await {
        let out = r??;
        ensure!(
            out.status.success(),
            "keys create failed: {}",
            text(&out.stderr)
        );
        made.push(text(&out.stdout).trim().to_string());
    }
    let file = swb_relay::keys::KeysFile::load(&keys)?;
    ensure!(
        file.keys.len() == 20,
        "{} of 20 keys in the file",
        file.keys.len()
    );
    let store = swb_relay::keys::KeyStore::new(&file);
    for k in &made {
        ensure!(store.verify(k).is_ok(), "a created key does not verify");
    }
    Ok(())
}
