//! Real programs through Switchboard streams: OpenSSH with
//! `ProxyCommand=swbd connect %h %p` (a shell command and a 64 MiB scp),
//! and SOCKS clients (curl, ncat, proxychains4) against an HTTP server a
//! peer exposes. `.ci/run` installs the Debian packages when missing.
//!
//! sshd runs in inetd mode (`sshd -i`) on connections our own listener
//! accepts on 127.0.0.1:0, so no fixed port is ever used.

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use swb_daemon::{Exposure, SocksConfig};
use swb_tests::{TestDaemon, TestRelay, TinyHttp, WAIT};
use tokio::process::Command;

const SWBD: &str = env!("CARGO_BIN_EXE_swbd");
const LONG: Duration = Duration::from_secs(180);

fn need(program: &str, package: &str) -> Result<PathBuf> {
    swb_tests::need_program(program, package)
}

async fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let out = tokio::time::timeout(LONG, cmd.kill_on_drop(true).stdin(Stdio::null()).output())
        .await
        .context("program did not finish")??;
    Ok(out)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A throwaway sshd: host key, authorized key, config; one `sshd -i` per
/// connection accepted on a loopback listener.
struct Sshd {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
    made_privsep_dir: bool,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.task.abort();
        // /run/sshd stays (as the openssh-server package's unit leaves it):
        // the namespace tests' sshd may be using it at this moment.
        let _ = self.made_privsep_dir;
    }
}

async fn start_sshd(dir: &Path) -> Result<Sshd> {
    let sshd = need("sshd", "openssh-server")?;
    need("ssh-keygen", "openssh-client")?;
    let cfg = swb_tests::sshd_setup(dir, None).await?;
    // sshd refuses to start without its privilege separation directory.
    let made_privsep_dir = if Path::new("/run/sshd").exists() {
        false
    } else {
        std::fs::create_dir_all("/run/sshd")?;
        true
    };
    let check = run(Command::new(&sshd).arg("-t").arg("-f").arg(&cfg)).await?;
    ensure!(check.status.success(), "sshd -t: {}", text(&check.stderr));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        let mut children = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                a = l.accept() => {
                    let Ok((tcp, _)) = a else { continue };
                    let Ok(std_tcp) = tcp.into_std() else { continue };
                    let _ = std_tcp.set_nonblocking(false);
                    let Ok(out) = std_tcp.try_clone() else { continue };
                    let fd_in: std::os::fd::OwnedFd = std_tcp.into();
                    let fd_out: std::os::fd::OwnedFd = out.into();
                    let child = Command::new(&sshd)
                        .arg("-i")
                        .arg("-f")
                        .arg(&cfg)
                        .stdin(Stdio::from(fd_in))
                        .stdout(Stdio::from(fd_out))
                        .stderr(Stdio::inherit())
                        .kill_on_drop(true)
                        .spawn();
                    if let Ok(mut c) = child {
                        children.spawn(async move { let _ = c.wait().await; });
                    }
                }
                Some(_) = children.join_next(), if !children.is_empty() => {}
            }
        }
    });
    Ok(Sshd {
        addr,
        task,
        made_privsep_dir,
    })
}

fn ssh_args(dir: &Path, control: &Path) -> Vec<String> {
    swb_tests::ssh_args(dir, control, SWBD)
}

fn user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into())
}

#[tokio::test]
async fn openssh_through_proxycommand_runs_a_command_and_copies_64_mib() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let sshd = start_sshd(d).await?;
    // The host key, pinned for the name ssh sees: strict checking stays on.
    let host_pub = std::fs::read_to_string(d.join("host_key.pub"))?;
    let mut parts = host_pub.split_whitespace();
    let (kt, kb) = (
        parts.next().context("key type")?,
        parts.next().context("key")?,
    );
    std::fs::write(
        d.join("known_hosts"),
        format!("london.switchboard {kt} {kb}\n"),
    )?;

    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let ssh_addr = sshd.addr.to_string();
    let _london = TestDaemon::start_with(&relay, &key, "london", |c| {
        c.expose = vec![Exposure {
            port: 22,
            target: ssh_addr,
        }]
    })
    .await?;
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;
    let control = laptop.handle.control_path().to_path_buf();
    let target = format!("{}@london.switchboard", user());

    let out = run(Command::new(need("ssh", "openssh-client")?)
        .args(ssh_args(d, &control))
        .arg(&target)
        .arg("echo switchboard-ok; echo $((6*7))"))
    .await?;
    ensure!(out.status.success(), "ssh failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "switchboard-ok\n42\n");

    // scp of 64 MiB of random bytes, checked by SHA-256.
    let src = d.join("random.bin");
    std::fs::write(&src, swb_tests::pattern(64, 64 << 20))?;
    let dst = d.join("copy.bin");
    let mut scp = Command::new(need("scp", "openssh-client")?);
    scp.args(ssh_args(d, &control))
        .arg("-q")
        .arg(&src)
        .arg(format!("{target}:{}", dst.display()));
    let out = run(&mut scp).await?;
    ensure!(out.status.success(), "scp failed: {}", text(&out.stderr));
    let (a, b) = (std::fs::read(&src)?, std::fs::read(&dst)?);
    assert_eq!(b.len(), 64 << 20);
    assert_eq!(swb_tests::sha256(&a), swb_tests::sha256(&b), "copy differs");

    // ssh to a port the peer does not expose fails with our reason.
    let out = run(Command::new(need("ssh", "openssh-client")?)
        .args(ssh_args(d, &control))
        .args(["-p", "2222"])
        .arg(&target)
        .arg("true"))
    .await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not expose port 2222"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn socks_clients_curl_ncat_and_proxychains_reach_an_exposed_http_server() -> Result<()> {
    let web = TinyHttp::start("hello from london\n").await?;
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let web_addr = web.addr.to_string();
    let _london = TestDaemon::start_with(&relay, &key, "london", |c| {
        c.expose = vec![Exposure {
            port: 8080,
            target: web_addr,
        }]
    })
    .await?;
    let laptop = TestDaemon::start_with(&relay, &key, "laptop", |c| {
        c.socks = Some(SocksConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            auth: None,
            required: true,
        })
    })
    .await?;
    let proxy = laptop.handle.socks_addr().context("socks address")?;

    // curl --socks5-hostname
    let out = run(Command::new(need("curl", "curl")?)
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--socks5-hostname",
            &proxy.to_string(),
        ])
        .arg("http://london.switchboard:8080/"))
    .await?;
    ensure!(out.status.success(), "curl: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from london\n");
    // curl sees a refusal as a SOCKS error, not a hang.
    let out = run(Command::new(need("curl", "curl")?)
        .args([
            "-sS",
            "--max-time",
            "20",
            "--socks5-hostname",
            &proxy.to_string(),
        ])
        .arg("http://london.switchboard:9999/"))
    .await?;
    assert!(!out.status.success());

    // ncat --proxy-type socks5
    let mut ncat = Command::new(need("ncat", "ncat")?);
    ncat.args([
        "--proxy",
        &proxy.to_string(),
        "--proxy-type",
        "socks5",
        "--proxy-dns",
        "remote",
    ])
    .args(["london.switchboard", "8080"])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = ncat.spawn()?;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin
            .write_all(b"GET / HTTP/1.0\r\nHost: london\r\n\r\n")
            .await?;
    }
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await??;
    ensure!(out.status.success(), "ncat: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).ends_with("hello from london\n"),
        "{}",
        text(&out.stdout)
    );

    // proxychains4 with a config naming our SOCKS port.
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("proxychains.conf");
    std::fs::write(
        &conf,
        format!(
            "strict_chain\nproxy_dns\nremote_dns_subnet 224\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n\
             [ProxyList]\nsocks5 {} {}\n",
            proxy.ip(),
            proxy.port()
        ),
    )?;
    let out = run(Command::new(need("proxychains4", "proxychains4")?)
        .arg("-q")
        .arg("-f")
        .arg(&conf)
        .arg(need("curl", "curl")?)
        .args(["-sS", "--max-time", "20", "http://london.switchboard:8080/"]))
    .await?;
    ensure!(
        out.status.success(),
        "proxychains4 curl: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "hello from london\n");
    Ok(())
}

#[tokio::test]
async fn swbd_connect_half_closes_and_reports_refusals() -> Result<()> {
    let hs = swb_tests::HashServer::start().await?;
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let hs_addr = hs.addr.to_string();
    let _london = TestDaemon::start_with(&relay, &key, "london", |c| {
        c.expose = vec![Exposure {
            port: 7000,
            target: hs_addr,
        }]
    })
    .await?;
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;
    let control = laptop.handle.control_path().display().to_string();

    // stdin → stream, EOF → half-close, the server's answer → stdout, exit 0.
    let payload = swb_tests::pattern(11, 3 << 20);
    let mut c = Command::new(SWBD);
    c.args([
        "--control",
        &control,
        "connect",
        "London.Switchboard",
        "7000",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = c.spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let writer = {
        let payload = payload.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            stdin.write_all(&payload).await?;
            drop(stdin);
            anyhow::Ok(())
        })
    };
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await??;
    writer.await??;
    ensure!(out.status.success(), "swbd connect: {}", text(&out.stderr));
    assert_eq!(out.stdout, swb_tests::sha256(&payload));

    // Refusals: one line on stderr, exit 1.
    for (host, port, want) in [
        ("london", "22", "does not expose port 22"),
        ("paris.switchboard", "22", "paris is not attached"),
        ("bad_name", "22", "letters, digits"),
    ] {
        let out =
            run(Command::new(SWBD).args(["--control", &control, "connect", host, port])).await?;
        assert_eq!(out.status.code(), Some(1), "{host}");
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(want), "{host}: {err}");
    }
    Ok(())
}
