//! The README walkthrough with separate `swbd` processes: keys, a dev
//! relay, two daemons, send / recv / status, exit codes, revocation with
//! SIGHUP, takeover, and the demo. Ports come from `--listen 127.0.0.1:0`
//! (the relay prints the one it got); waits are on output lines and exits.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;
use swb_tests::line_with;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

const WAIT: Duration = Duration::from_secs(30);
const SWBD: &str = env!("CARGO_BIN_EXE_swbd");

fn swbd() -> Command {
    let mut c = Command::new(SWBD);
    c.env_remove("SWB_API_KEY")
        .env_remove("SWB_CONTROL")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Runs `swbd ARGS` to completion.
async fn run(args: &[&str]) -> Result<Output> {
    let out = tokio::time::timeout(WAIT, swbd().args(args).output())
        .await
        .with_context(|| format!("swbd {args:?} did not finish"))??;
    Ok(out)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn run_ok(args: &[&str]) -> Result<String> {
    let out = run(args).await?;
    ensure!(
        out.status.success(),
        "swbd {args:?} failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    Ok(text(&out.stdout))
}

struct RelayProc {
    child: Child,
    addr: String,
    fingerprint: String,
    up_line: String,
}

async fn start_relay(data: &Path, keys: &Path) -> Result<RelayProc> {
    let mut child = swbd()
        .args(["relay", "--dev", "--data-dir"])
        .arg(data)
        .arg("--keys")
        .arg(keys)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let listening = line_with(&mut out, "relay listening on ").await?;
    let addr = listening
        .split_whitespace()
        .nth(3)
        .context("address in the listening line")?
        .to_string();
    let fp_line = line_with(&mut out, "fingerprint sha256:").await?;
    let fingerprint = fp_line
        .trim_start_matches("fingerprint ")
        .trim()
        .to_string();
    let up_line = line_with(&mut out, "swbd up --relay")
        .await?
        .trim()
        .to_string();
    Ok(RelayProc {
        child,
        addr,
        fingerprint,
        up_line,
    })
}

struct UpProc {
    child: Child,
    stderr: Lines<BufReader<ChildStderr>>,
    _stdout: ChildStdout,
}

async fn start_up(relay: &RelayProc, key: &str, name: &str, control: &Path) -> Result<UpProc> {
    let mut child = swbd()
        .env("SWB_API_KEY", key)
        .args([
            "up",
            "--relay",
            &relay.addr,
            "--relay-fingerprint",
            &relay.fingerprint,
            "--name",
            name,
            // Tests use no fixed ports: not the default SOCKS 127.0.0.1:1080.
            "--socks",
            "off",
            "--control",
        ])
        .arg(control)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stderr = BufReader::new(child.stderr.take().context("stderr")?).lines();
    line_with(&mut stderr, "connected to relay").await?;
    let stdout = child.stdout.take().context("stdout")?;
    Ok(UpProc {
        child,
        stderr,
        _stdout: stdout,
    })
}

/// Waits for a process to exit; returns its code and the rest of stderr.
async fn exit_of(p: &mut UpProc) -> Result<(i32, String)> {
    let mut rest = String::new();
    let status = tokio::time::timeout(WAIT, async {
        while let Some(l) = p.stderr.next_line().await? {
            rest.push_str(&l);
            rest.push('\n');
        }
        anyhow::Ok(p.child.wait().await?)
    })
    .await
    .context("daemon did not exit")??;
    Ok((status.code().unwrap_or(-1), rest))
}

fn ctl(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test]
async fn readme_walkthrough_with_separate_processes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys.toml");
    let data = dir.path().join("relay");

    // keys create: the key alone on stdout; the file holds no plain key.
    let out = run(&[
        "keys",
        "create",
        "--keys",
        &ctl(&keys),
        "--namespace",
        "acme",
    ])
    .await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let key = stdout.trim().to_string();
    assert_eq!(stdout, format!("{key}\n"), "only the key on stdout");
    assert!(key.starts_with("swbk_"), "{key}");
    assert!(
        !std::fs::read_to_string(&keys)?.contains(&key),
        "the file must not hold the key"
    );

    // The dev relay prints its fingerprint and the exact `swbd up` line, and
    // writes the fingerprint file.
    let mut relay = start_relay(&data, &keys).await?;
    assert_eq!(
        std::fs::read_to_string(data.join("fingerprint"))?.trim(),
        relay.fingerprint
    );
    assert!(
        relay.up_line.contains(&format!(
            "--relay {} --relay-fingerprint {}",
            relay.addr, relay.fingerprint
        )),
        "{}",
        relay.up_line
    );

    let london_sock = dir.path().join("london.sock");
    let laptop_sock = dir.path().join("laptop.sock");
    let mut london = start_up(&relay, &key, "london", &london_sock).await?;
    let _laptop = start_up(&relay, &key, "laptop", &laptop_sock).await?;

    // The socket is private to its user.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&london_sock)?.permissions().mode() & 0o777,
        0o600
    );

    // send exits 0 once accepted; recv prints FROM<TAB>BODY.
    run_ok(&[
        "--control",
        &ctl(&laptop_sock),
        "send",
        "london",
        "deploy done",
    ])
    .await?;
    let got = run_ok(&["--control", &ctl(&london_sock), "recv", "--wait", "10"]).await?;
    assert_eq!(got, "laptop\tdeploy done\n");
    // Acknowledged: a second recv finds nothing.
    assert_eq!(
        run_ok(&["--control", &ctl(&london_sock), "recv"]).await?,
        ""
    );

    // SWB_CONTROL works like --control; the body may come from stdin; --json.
    let mut c = swbd();
    c.env("SWB_CONTROL", &laptop_sock)
        .args(["send", "london"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn()?;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all("from stdin ✓".as_bytes()).await?;
    }
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await??;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json = run_ok(&[
        "--control",
        &ctl(&london_sock),
        "--json",
        "recv",
        "--wait",
        "10",
    ])
    .await?;
    let v: serde_json::Value = serde_json::from_str(json.trim())?;
    assert_eq!(v["from"], "laptop");
    assert_eq!(v["body"], "from stdin ✓");
    assert_eq!(v["id"].as_str().map(str::len), Some(32));

    // status: relay, name, namespace, connected since, round trip.
    let status = run_ok(&["--control", &ctl(&london_sock), "status"]).await?;
    for want in ["connected", "london", "acme", &relay.addr, "since", "rtt:"] {
        assert!(status.contains(want), "status lacks {want:?}:\n{status}");
    }
    let v: serde_json::Value = serde_json::from_str(
        run_ok(&["--control", &ctl(&london_sock), "--json", "status"])
            .await?
            .trim(),
    )?;
    assert_eq!(v["state"], "connected");
    assert!(v["rtt_ms"].as_f64().is_some());

    // Runtime errors: exit 1, one line that says what is wrong.
    let out = run(&["--control", &ctl(&laptop_sock), "send", "bad_name!", "x"]).await?;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("letters, digits and '-'"), "{err}");
    let out = run(&["--control", &ctl(&dir.path().join("nobody.sock")), "status"]).await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("swbd up"),
        "{}",
        text(&out.stderr)
    );
    // Usage errors: exit 2.
    assert_eq!(
        run(&["recv", "--wait", "soon"]).await?.status.code(),
        Some(2)
    );
    assert_eq!(run(&["frobnicate"]).await?.status.code(), Some(2));
    // `up` without a key says where a key comes from.
    let out = run(&[
        "up",
        "--relay",
        &relay.addr,
        "--name",
        "x",
        "--socks",
        "off",
        "--control",
        &ctl(&dir.path().join("x.sock")),
    ])
    .await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("SWB_API_KEY"),
        "{}",
        text(&out.stderr)
    );

    // Status: set, clear, read, list, watch.
    let l = ctl(&london_sock);
    let p = ctl(&laptop_sock);
    let out = run_ok(&["--control", &l, "set-status", "load=0.31", "build=4711"]).await?;
    assert!(
        out.contains("build=4711") && out.contains("load=0.31"),
        "{out}"
    );
    run_ok(&["--control", &l, "set-status", "--clear", "build"]).await?;
    let out = run_ok(&["--control", &p, "get-status", "london"]).await?;
    assert!(
        out.starts_with("london\tonline") && out.contains("load=0.31") && !out.contains("build"),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_str(
        run_ok(&["--control", &p, "--json", "get-status", "london"])
            .await?
            .trim(),
    )?;
    assert_eq!(v["status"]["load"], "0.31");
    let out = run_ok(&["--control", &p, "peers"]).await?;
    assert!(
        out.lines()
            .any(|l| l.starts_with("london") && l.contains("online") && l.contains("load=0.31")),
        "{out}"
    );
    let out = run(&["--control", &l, "set-status", "nonsense"]).await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("KEY=VALUE"),
        "{}",
        text(&out.stderr)
    );
    let mut watch = swbd()
        .args(["--control", &p, "--json", "watch", "london"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut wl = BufReader::new(watch.stdout.take().context("stdout")?).lines();
    let first: serde_json::Value = serde_json::from_str(&line_with(&mut wl, "london").await?)?;
    assert_eq!(first["status"]["load"], "0.31");
    run_ok(&["--control", &l, "set-status", "load=0.99"]).await?;
    let next: serde_json::Value = serde_json::from_str(&line_with(&mut wl, "0.99").await?)?;
    assert!(next["version"].as_u64() > first["version"].as_u64());
    watch.kill().await?;

    // A second daemon named london takes over; the first exits 1 and says why.
    let london2_sock = dir.path().join("london2.sock");
    let _london2 = start_up(&relay, &key, "london", &london2_sock).await?;
    let (code, err) = exit_of(&mut london).await?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("replaced"), "{err}");

    // Revocation: `swbd keys revoke` + SIGHUP closes the key's sessions, and
    // the daemon exits 1 saying the key was revoked.
    let k2 = run_ok(&[
        "keys",
        "create",
        "--keys",
        &ctl(&keys),
        "--namespace",
        "acme",
        "--label",
        "ci",
    ])
    .await?;
    let mut ci = start_up(&relay, k2.trim(), "ci", &dir.path().join("ci.sock")).await?;
    let list = run_ok(&["--json", "keys", "list", "--keys", &ctl(&keys)]).await?;
    let id = list
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["label"] == "ci")
        .and_then(|v| v["id"].as_str().map(String::from))
        .context("the ci key in keys list")?;
    run_ok(&["keys", "revoke", "--keys", &ctl(&keys), &id]).await?;
    let pid = relay.child.id().context("relay pid")?;
    let st = tokio::time::timeout(
        WAIT,
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status(),
    )
    .await??;
    assert!(st.success());
    let (code, err) = exit_of(&mut ci).await?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("key_revoked"), "{err}");
    let list = run_ok(&["keys", "list", "--keys", &ctl(&keys)]).await?;
    assert!(
        list.lines()
            .any(|l| l.contains(&id) && l.contains("revoked")),
        "{list}"
    );

    // The relay stops cleanly on SIGTERM.
    let st = tokio::time::timeout(
        WAIT,
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status(),
    )
    .await??;
    assert!(st.success());
    let st = tokio::time::timeout(WAIT, relay.child.wait()).await??;
    assert!(st.success(), "relay exit: {st}");
    Ok(())
}

#[tokio::test]
async fn demo_exits_zero_and_prints_the_steps() -> Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        swbd().args(["demo", "--burst", "50"]).output(),
    )
    .await??;
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{}",
        stdout,
        text(&out.stderr)
    );
    assert!(stdout.contains("All steps worked"), "{stdout}");
    assert!(stdout.contains("swbd up --relay"), "{stdout}");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        swbd().args(["--json", "demo", "--burst", "50"]).output(),
    )
    .await??;
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim())?;
    assert_eq!(v["ok"], true);
    assert_eq!(v["burst_messages"], 50);
    Ok(())
}

#[tokio::test]
async fn relay_outside_dev_mode_needs_a_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys.toml");
    let out = run(&["relay", "--keys", &ctl(&keys), "--listen", "127.0.0.1:0"]).await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--cert"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn up_reads_its_settings_from_a_config_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys.toml");
    let key = run_ok(&[
        "keys",
        "create",
        "--keys",
        &ctl(&keys),
        "--namespace",
        "acme",
    ])
    .await?;
    let mut relay = start_relay(&dir.path().join("relay"), &keys).await?;
    let sock = dir.path().join("cfg.sock");
    let cfg = dir.path().join("swbd.toml");
    std::fs::write(
        &cfg,
        format!(
            "relay = [\"{}\"]\nrelay_fingerprint = \"{}\"\nname = \"from-file\"\ncontrol = \"{}\"\n\
             expose = [\"22\", \"8080=127.0.0.1:3000\"]\nsocks = \"off\"\n",
            relay.addr,
            relay.fingerprint,
            sock.display()
        ),
    )?;
    let mut child = swbd()
        .env("SWB_API_KEY", key.trim())
        .args(["up", "--config", &ctl(&cfg)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stderr = BufReader::new(child.stderr.take().context("stderr")?).lines();
    line_with(&mut stderr, "connected to relay").await?;
    let v: serde_json::Value = serde_json::from_str(
        run_ok(&["--control", &ctl(&sock), "--json", "status"])
            .await?
            .trim(),
    )?;
    assert_eq!(v["name"], "from-file");

    // A setting the daemon does not know is an error, not ignored.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\ncolour = \"red\"\n")?;
    let out = run(&["up", "--config", &ctl(&bad)]).await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("colour"),
        "{}",
        text(&out.stderr)
    );
    child.kill().await?;
    relay.child.kill().await?;
    Ok(())
}
