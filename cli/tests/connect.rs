//! `swbd connect` tells the truth about how a stream ended: exit 0 only
//! when every byte arrived and both sides closed cleanly; a cut stream is
//! a non-zero exit with its cause. A busy service is waited for like a
//! direct TCP client waits (its listen backlog full, SYNs retried); where
//! the kernel resets a connection to it (as it does to direct clients
//! here, see the test's printout), that is an error, never a silent end.

use anyhow::{Context, Result};
use std::process::Stdio;
use std::time::Duration;
use swb_daemon::Exposure;
use swb_tests::{pattern, sha256, BusyServer, TestDaemon, TestRelay};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const SWBD: &str = env!("CARGO_BIN_EXE_swbd");
/// Long enough for SYN retries against a full backlog (1 + 2 + 4 + 8 + 16 s …).
const LONG: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_connects_to_a_busy_service_are_all_right_or_errors() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let busy = BusyServer::start(8)?;
    let target = busy.addr.to_string();
    let _london = TestDaemon::start_with(&relay, &key, "london", |c| {
        c.expose = vec![Exposure { port: 9000, target }];
    })
    .await?;
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("one-mib");
    let data = pattern(50, 1 << 20);
    std::fs::write(&file, &data)?;
    let want = sha256(&data);

    let mut runs = Vec::new();
    for _ in 0..50 {
        let mut cmd = Command::new(SWBD);
        cmd.arg("--control")
            .arg(laptop.handle.control_path())
            .args(["connect", "london", "9000"])
            .stdin(std::fs::File::open(&file)?)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        runs.push(tokio::spawn(async move { cmd.output().await }));
    }
    let (mut right, mut errors, mut silent) = (0, Vec::new(), 0);
    for r in runs {
        let out = tokio::time::timeout(LONG, r)
            .await
            .context("a connect did not finish")???;
        match (out.status.success(), out.stdout == want) {
            (true, true) => right += 1,
            // Exit 0 with missing or wrong bytes: the failure this guards.
            (true, false) => silent += 1,
            (false, _) => errors.push(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }
    // The same service, 50 direct TCP clients, for comparison.
    let mut direct = Vec::new();
    for _ in 0..50 {
        let (addr, data, want) = (busy.addr, data.clone(), want.clone());
        direct.push(tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let r: std::io::Result<bool> = async {
                let mut s = tokio::net::TcpStream::connect(addr).await?;
                s.write_all(&data).await?;
                s.shutdown().await?;
                let mut got = Vec::new();
                s.read_to_end(&mut got).await?;
                Ok(got == want)
            }
            .await;
            matches!(r, Ok(true))
        }));
    }
    let mut direct_right = 0;
    for d in direct {
        if tokio::time::timeout(LONG, d).await?? {
            direct_right += 1;
        }
    }
    eprintln!(
        "through Switchboard: {right} of 50 right, {} errors, {silent} silent; direct TCP clients: {direct_right} of 50 right",
        errors.len()
    );
    assert_eq!(silent, 0, "exit 0 without every byte: {silent} times");
    for e in &errors {
        assert!(
            e.starts_with("swbd: error: the stream to port 9000 of london"),
            "an error names the stream and its cause: {e}"
        );
    }
    assert_eq!(right + errors.len(), 50);
    Ok(())
}

#[tokio::test]
async fn a_service_that_resets_mid_stream_makes_connect_exit_non_zero_with_the_cause() -> Result<()>
{
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    // Reads 100 kB of each connection, then resets it.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let target = l.local_addr()?.to_string();
    let svc = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = vec![0u8; 100_000];
            let _ = s.read_exact(&mut buf).await;
            let _ = s.set_zero_linger();
        }
    });
    let _london = TestDaemon::start_with(&relay, &key, "london", |c| {
        c.expose = vec![Exposure { port: 9000, target }];
    })
    .await?;
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;
    let mut child = Command::new(SWBD)
        .arg("--control")
        .arg(laptop.handle.control_path())
        .args(["connect", "london", "9000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    // Keep stdin open and flowing: the reset must end the command anyway.
    let feed = tokio::spawn(async move {
        let chunk = vec![3u8; 64 * 1024];
        while stdin.write_all(&chunk).await.is_ok() {}
    });
    let out = tokio::time::timeout(LONG, child.wait_with_output())
        .await
        .context("connect did not end after the reset")??;
    feed.abort();
    svc.abort();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("was cut") && err.contains("reset by london's target"),
        "{err}"
    );
    Ok(())
}
