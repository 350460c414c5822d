//! Byte streams between peers: integrity, concurrency, half-close,
//! refusals, and the SOCKS5 listener's reply codes.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use swb_daemon::{ControlError, Exposure, SocksConfig};
use swb_tests::{send_and_collect, HashServer, RelayOptions, TestDaemon, TestRelay, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn expose(port: u16, target: SocketAddr) -> Exposure {
    Exposure {
        port,
        target: target.to_string(),
    }
}

/// A peer `london` exposing port 9000 → a hash server, and a peer `laptop`.
async fn pair(relay: &TestRelay, key: &str) -> Result<(TestDaemon, TestDaemon, HashServer)> {
    let hs = HashServer::start().await?;
    let addr = hs.addr;
    let london = TestDaemon::start_with(relay, key, "london", |c| {
        c.expose = vec![expose(9000, addr)]
    })
    .await?;
    let laptop = TestDaemon::start(relay, key, "laptop").await?;
    Ok((london, laptop, hs))
}

fn code_of(r: Result<swb_daemon::control::PeerStream, ControlError>) -> (String, String) {
    match r {
        Err(ControlError::Remote { code, message }) => (code, message),
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got a stream"),
    }
}

#[tokio::test]
async fn one_gibibyte_arrives_intact() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let (_london, laptop, _hs) = pair(&relay, &key).await?;
    let s = laptop.open_stream("london.switchboard", 9000).await?;
    let len = 1u64 << 30;
    let t = Instant::now();
    let (sent, back) = tokio::time::timeout(Duration::from_secs(600), send_and_collect(s, 1, len))
        .await
        .context("1 GiB did not get through in 10 minutes")??;
    assert_eq!(
        back, sent,
        "SHA-256 of what arrived differs from what was sent"
    );
    eprintln!(
        "1 GiB through the relay in {:.1?} (debug build)",
        t.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn two_hundred_concurrent_streams_each_intact() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let (_london, laptop, _hs) = pair(&relay, &key).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let s = laptop.open_stream("london", 9000).await?;
        tasks.spawn(async move { send_and_collect(s, 1000 + i, 64 * 1024 + i * 997).await });
    }
    let mut n = 0;
    while let Some(r) = tokio::time::timeout(WAIT * 3, tasks.join_next()).await? {
        let (sent, back) = r??;
        assert_eq!(back, sent);
        n += 1;
    }
    assert_eq!(n, 200);
    relay
        .wait_stats("all 200 spliced", |s| s.streams_opened >= 200)
        .await?;
    Ok(())
}

#[tokio::test]
async fn half_close_still_receives_the_full_reply() -> Result<()> {
    // A server that answers only after the client's EOF, with 4 MiB.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let reply = swb_tests::pattern(7, 4 << 20);
    let want = reply.clone();
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await?;
        let mut req = Vec::new();
        s.read_to_end(&mut req).await?;
        s.write_all(&reply).await?;
        s.shutdown().await?;
        anyhow::Ok(req)
    });
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let _london = TestDaemon::start_with(&relay, &key, "london", |c| {
        c.expose = vec![expose(80, addr)]
    })
    .await?;
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;
    let mut s = laptop.open_stream("london", 80).await?;
    s.write_all(b"request, then EOF").await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await??;
    assert_eq!(got.len(), want.len());
    assert!(got == want, "reply corrupted");
    assert_eq!(server.await??, b"request, then EOF");
    Ok(())
}

#[tokio::test]
async fn refusals_say_what_went_wrong() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let (_london, laptop, _hs) = pair(&relay, &key).await?;

    let (code, msg) = code_of(laptop.open_stream("london", 22).await);
    assert_eq!(code, "port_not_exposed");
    assert!(msg.contains("port 22") && msg.contains("9000"), "{msg}");

    let (code, msg) = code_of(laptop.open_stream("paris", 22).await);
    assert_eq!(code, "peer_offline");
    assert!(msg.contains("paris"), "{msg}");

    let (code, _) = code_of(laptop.open_stream("Not_A_Name", 22).await);
    assert_eq!(code, "bad_name");

    // Exposed, but nothing listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let _rome = TestDaemon::start_with(&relay, &key, "rome", |c| {
        c.expose = vec![expose(5000, dead)]
    })
    .await?;
    let (code, msg) = code_of(laptop.open_stream("rome", 5000).await);
    assert_eq!(code, "connection_refused");
    assert!(msg.contains(&dead.to_string()), "{msg}");
    Ok(())
}

#[tokio::test]
async fn peer_of_another_namespace_looks_like_nobody() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let acme = relay.create_key("acme")?;
    let globex = relay.create_key("globex")?;
    let hs = HashServer::start().await?;
    let laptop = TestDaemon::start(&relay, &acme, "laptop").await?;
    let before = code_of(laptop.open_stream("london", 9000).await);
    let addr = hs.addr;
    let _their_london = TestDaemon::start_with(&relay, &globex, "london", |c| {
        c.expose = vec![expose(9000, addr)]
    })
    .await?;
    let after = code_of(laptop.open_stream("london", 9000).await);
    assert_eq!(
        before, after,
        "another namespace's peer must not be observable"
    );
    assert_eq!(after.0, "peer_offline");
    Ok(())
}

#[tokio::test]
async fn too_many_streams_is_refused_and_frees_up_again() -> Result<()> {
    let relay = TestRelay::spawn_with(RelayOptions {
        max_streams_per_peer: 2,
        ..RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    let (_london, laptop, _hs) = pair(&relay, &key).await?;
    let a = laptop.open_stream("london", 9000).await?;
    let b = laptop.open_stream("london", 9000).await?;
    let (code, msg) = code_of(laptop.open_stream("london", 9000).await);
    assert_eq!(code, "too_many_streams");
    assert!(msg.contains('2'), "{msg}");
    // Closing one makes room.
    let (sent, back) = send_and_collect(a, 5, 1000).await?;
    assert_eq!(sent, back);
    let c = swb_tests::eventually("room for a stream", WAIT, || async {
        match laptop.open_stream("london", 9000).await {
            Ok(c) => Ok(Some(c)),
            Err(ControlError::Remote { code, .. }) if code == "too_many_streams" => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    drop((b, c));
    Ok(())
}

// ---- SOCKS5 ----

/// Raw SOCKS5 client: greeting (with optional user/pass), CONNECT to a
/// domain; returns the reply code and the connected socket.
async fn socks_connect(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
) -> Result<(u8, TcpStream)> {
    let mut s = TcpStream::connect(proxy).await?;
    let method = if auth.is_some() { 2 } else { 0 };
    s.write_all(&[5, 1, method]).await?;
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await?;
    if r[1] == 0xff {
        return Ok((0xff, s));
    }
    if let Some((u, p)) = auth {
        let mut m = vec![1, u.len() as u8];
        m.extend_from_slice(u.as_bytes());
        m.push(p.len() as u8);
        m.extend_from_slice(p.as_bytes());
        s.write_all(&m).await?;
        s.read_exact(&mut r).await?;
        if r[1] != 0 {
            return Ok((0xfe, s));
        }
    }
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await?;
    Ok((rep[1], s))
}

async fn socks_raw(proxy: SocketAddr, req: &[u8]) -> Result<u8> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(&[5, 1, 0]).await?;
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await?;
    s.write_all(req).await?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await?;
    Ok(rep[1])
}

fn socks_on_any_port(auth: Option<(&str, &str)>) -> SocksConfig {
    SocksConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
        required: true,
    }
}

#[tokio::test]
async fn socks_reply_codes_match_each_failure() -> Result<()> {
    let relay = TestRelay::spawn_with(RelayOptions {
        max_streams_per_peer: 1,
        ..RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    let hs = HashServer::start().await?;
    let addr = hs.addr;
    let _london = TestDaemon::start_with(&relay, &key, "london", |c| {
        c.expose = vec![expose(9000, addr)]
    })
    .await?;
    let laptop = TestDaemon::start_with(&relay, &key, "laptop", |c| {
        c.socks = Some(socks_on_any_port(None))
    })
    .await?;
    let proxy = laptop.handle.socks_addr().context("socks address")?;

    // Success, and bytes flow with half-close.
    let (code, s) = socks_connect(proxy, "LONDON.switchboard", 9000, None).await?;
    assert_eq!(code, 0);
    let (sent, back) = send_and_collect(s, 9, 100_000).await?;
    assert_eq!(sent, back);

    assert_eq!(
        socks_connect(proxy, "paris.switchboard", 9000, None)
            .await?
            .0,
        4,
        "offline: host unreachable"
    );
    assert_eq!(
        socks_connect(proxy, "london.switchboard", 22, None)
            .await?
            .0,
        5,
        "not exposed: refused"
    );
    assert_eq!(
        socks_connect(proxy, "example.com", 80, None).await?.0,
        2,
        "outside .switchboard: not allowed"
    );
    assert_eq!(
        socks_connect(proxy, "switchboard", 80, None).await?.0,
        2,
        "bare suffix: not allowed"
    );
    assert_eq!(
        socks_raw(proxy, &[5, 1, 0, 1, 10, 0, 0, 1, 0, 80]).await?,
        2,
        "an IP: not allowed"
    );
    let mut bind = vec![5, 2, 0, 3, 18];
    bind.extend_from_slice(b"london.switchboard");
    bind.extend_from_slice(&[0, 80]);
    assert_eq!(
        socks_raw(proxy, &bind).await?,
        7,
        "BIND: command not supported"
    );
    let mut udp = bind.clone();
    udp[1] = 3;
    assert_eq!(
        socks_raw(proxy, &udp).await?,
        7,
        "UDP ASSOCIATE: command not supported"
    );

    // Stream cap 1: hold one open, the next is a general failure.
    let (code, held) = socks_connect(proxy, "london.switchboard", 9000, None).await?;
    assert_eq!(code, 0);
    assert_eq!(
        socks_connect(proxy, "london.switchboard", 9000, None)
            .await?
            .0,
        1,
        "too many streams: general failure"
    );
    drop(held);

    // A client speaking something else is dropped; the listener lives on.
    let mut junk = TcpStream::connect(proxy).await?;
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
    let mut buf = [0u8; 16];
    assert_eq!(tokio::time::timeout(WAIT, junk.read(&mut buf)).await??, 0);
    assert_eq!(
        socks_connect(proxy, "paris.switchboard", 1, None).await?.0,
        4
    );
    Ok(())
}

#[tokio::test]
async fn socks_username_and_password_when_configured() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let hs = HashServer::start().await?;
    let addr = hs.addr;
    let _london = TestDaemon::start_with(&relay, &key, "london", |c| {
        c.expose = vec![expose(9000, addr)]
    })
    .await?;
    let laptop = TestDaemon::start_with(&relay, &key, "laptop", |c| {
        c.socks = Some(socks_on_any_port(Some(("alice", "s3cret"))))
    })
    .await?;
    let proxy = laptop.handle.socks_addr().context("socks address")?;
    assert_eq!(
        socks_connect(proxy, "london.switchboard", 9000, None)
            .await?
            .0,
        0xff,
        "no-auth offer refused"
    );
    assert_eq!(
        socks_connect(proxy, "london.switchboard", 9000, Some(("alice", "wrong")))
            .await?
            .0,
        0xfe,
        "bad password"
    );
    let (code, s) =
        socks_connect(proxy, "london.switchboard", 9000, Some(("alice", "s3cret"))).await?;
    assert_eq!(code, 0);
    let (sent, back) = send_and_collect(s, 3, 1000).await?;
    assert_eq!(sent, back);
    Ok(())
}

#[tokio::test]
async fn target_closing_early_ends_the_stream_cleanly() -> Result<()> {
    // The target's local server dies mid-stream: the caller sees the end,
    // not a hang.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await?;
        s.write_all(b"partial").await?;
        drop(s);
        anyhow::Ok(())
    });
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let _london =
        TestDaemon::start_with(&relay, &key, "london", |c| c.expose = vec![expose(1, addr)])
            .await?;
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;
    let mut s = laptop.open_stream("london", 1).await?;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await??;
    assert_eq!(got, b"partial");
    server.await??;
    Ok(())
}
