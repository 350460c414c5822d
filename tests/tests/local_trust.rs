//! Local trust: another user of the machine cannot sit between a program
//! and its daemon, and SOCKS is not opened to the network without a
//! password. Tests that need root (to act as another user) print a notice
//! and pass on a developer machine, and fail in CI (`SWB_REQUIRE_NETNS=1`).

use anyhow::{bail, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use swb_daemon::{ControlError, Daemon, SocksConfig};
use swb_tests::{TestRelay, WAIT};

/// The user the tests act as when they need someone else (nobody).
const OTHER_UID: u32 = 65534;

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// Whether a root-only test can run; an error in CI when it cannot.
fn need_root(test: &str) -> Result<bool> {
    if is_root() {
        return Ok(true);
    }
    if std::env::var_os("SWB_REQUIRE_NETNS").is_some() {
        bail!("{test} needs root (CI runs the tests as root)");
    }
    eprintln!("NOTICE: {test} skipped: it needs root to act as another user");
    Ok(false)
}

async fn spawn_err(relay: &TestRelay, key: &str, control: &Path) -> Result<String> {
    match Daemon::spawn(relay.daemon_config(key, "local", control.to_path_buf())).await {
        Ok(d) => {
            d.shutdown();
            bail!(
                "the daemon started with its socket in {}",
                control.display()
            )
        }
        Err(e) => Ok(e.to_string()),
    }
}

#[tokio::test]
async fn a_control_directory_others_can_write_is_refused_unless_sticky() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let dir = tempfile::tempdir()?;
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared)?;
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777))?;
    let e = spawn_err(&relay, &key, &shared.join("control.sock")).await?;
    assert!(e.contains("writable by other users"), "{e}");
    // With the sticky bit (like /tmp) nobody else can replace our socket.
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777))?;
    let d = Daemon::spawn(relay.daemon_config(&key, "local", shared.join("control.sock"))).await?;
    tokio::time::timeout(WAIT, d.connected()).await??;
    d.shutdown();
    Ok(())
}

#[tokio::test]
async fn a_control_directory_of_another_user_is_refused() -> Result<()> {
    if !need_root("a_control_directory_of_another_user_is_refused")? {
        return Ok(());
    }
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let dir = tempfile::tempdir()?;
    // What another user would leave at the default place: their own dir.
    let theirs = dir.path().join("swbd-dir");
    std::fs::create_dir(&theirs)?;
    std::os::unix::fs::chown(&theirs, Some(OTHER_UID), Some(OTHER_UID))?;
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700))?;
    let e = spawn_err(&relay, &key, &theirs.join("control.sock")).await?;
    assert!(e.contains(&format!("belongs to uid {OTHER_UID}")), "{e}");
    Ok(())
}

#[tokio::test]
async fn a_socket_served_by_another_user_is_not_talked_to() -> Result<()> {
    if !need_root("a_socket_served_by_another_user_is_not_talked_to")? {
        return Ok(());
    }
    let ncat = swb_tests::need_program("ncat", "ncat")?;
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    let sock = dir.path().join("control.sock");
    // Another user listens where a daemon's socket would be.
    let mut impostor = tokio::process::Command::new("setpriv")
        .args([
            "--reuid",
            &OTHER_UID.to_string(),
            "--regid",
            &OTHER_UID.to_string(),
            "--clear-groups",
        ])
        .arg(ncat)
        .arg("-lkU")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("setpriv (util-linux)")?;
    swb_tests::eventually("the impostor's socket", WAIT, || async {
        Ok(sock.exists().then_some(()))
    })
    .await?;
    match swb_daemon::Client::connect(&sock).await {
        Err(ControlError::Untrusted { uid, .. }) => assert_eq!(uid, OTHER_UID),
        Err(e) => bail!("refused for the wrong reason: {e}"),
        Ok(_) => bail!("talked to another user's socket"),
    }
    impostor.start_kill()?;
    impostor.wait().await?;
    Ok(())
}

#[tokio::test]
async fn socks_off_loopback_needs_a_password() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let dir = tempfile::tempdir()?;
    let mut c = relay.daemon_config(&key, "local", dir.path().join("control.sock"));
    c.socks = Some(SocksConfig {
        listen: "0.0.0.0:0".parse()?,
        auth: None,
        required: true,
    });
    let e = match Daemon::spawn(c).await {
        Ok(d) => {
            d.shutdown();
            bail!("SOCKS opened on every interface without a password")
        }
        Err(e) => e.to_string(),
    };
    assert!(e.contains("give it a username and password"), "{e}");
    Ok(())
}
