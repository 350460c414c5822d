//! Hostile until authenticated: a connection that has not proven a key
//! (an API key's `Hello`, or the mesh key) gets a small flow-control
//! budget, so strangers holding every handshake slot still pin little of
//! the relay's memory, and real daemons still attach.

use anyhow::{Context as _, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use swb_tests::{TestDaemon, TestRelay, WAIT};

/// Connects with `alpn`, never authenticates, and pushes as much as the
/// relay lets it into every stream but the first (which the relay reads
/// for the `Hello`); the bytes it got the relay to take.
async fn bytes_a_stranger_pushes(relay: &TestRelay, alpn: &[u8]) -> Result<u64> {
    let mut cfg = swb_tests::raw_client_config_alpn(relay, alpn)?;
    let mut t = quinn::TransportConfig::default();
    // Our own send buffer small, so what `write` accepted is (nearly) what
    // the relay's flow control let through.
    t.send_window(16 * 1024);
    cfg.transport_config(Arc::new(t));
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ep.set_default_client_config(cfg);
    let conn = ep.connect(relay.addr(), "localhost")?.await?;
    let written = Arc::new(AtomicU64::new(0));
    let mut writers = tokio::task::JoinSet::new();
    let (_first, _r) = conn.open_bi().await?;
    // Every stream the relay allows before a session raises the limit.
    for _ in 1..swb_relay::INITIAL_STREAMS {
        let (mut s, r) = conn.open_bi().await?;
        let written = written.clone();
        writers.spawn(async move {
            let _keep = r;
            let chunk = vec![0u8; 16 * 1024];
            while let Ok(n) = s.write(&chunk).await {
                written.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
    }
    // Until flow control stops every writer (the relay would have taken
    // megabytes in this time without it).
    let _ = tokio::time::timeout(Duration::from_secs(2), writers.join_all()).await;
    let n = written.load(Ordering::Relaxed);
    conn.close(0u32.into(), b"");
    Ok(n)
}

#[tokio::test]
async fn a_stranger_pins_little_memory_before_its_hello_and_daemons_still_attach() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let n = bytes_a_stranger_pushes(&relay, swb_wire::ALPN).await?;
    eprintln!("a stranger without a Hello got the relay to take {n} bytes");
    let budget = u64::from(swb_relay::PREAUTH_RECEIVE_WINDOW) + 32 * 1024;
    assert!(
        n <= budget,
        "{n} bytes taken before authentication (budget {budget})"
    );
    TestDaemon::start(&relay, &key, "real").await?;
    Ok(())
}

#[tokio::test]
async fn a_stranger_on_the_mesh_door_pins_little_memory_before_its_proof() -> Result<()> {
    let relay = swb_tests::mesh_relay("r1", &swb_tests::mesh_key('p'), &[]).await?;
    let n = bytes_a_stranger_pushes(&relay, swb_wire::MESH_ALPN).await?;
    eprintln!("a stranger without the mesh key got the relay to take {n} bytes");
    let budget = u64::from(swb_relay::PREAUTH_RECEIVE_WINDOW) + 32 * 1024;
    assert!(
        n <= budget,
        "{n} bytes taken before the mesh proof (budget {budget})"
    );
    Ok(())
}

/// A QUIC client at `src` (a 127.x address) whose packets reach the relay
/// and whose answers never come back: a handshake that never completes,
/// as from a spoofed source. Ends with the returned guard.
async fn half_open(
    relay: &TestRelay,
    src: std::net::IpAddr,
) -> Result<tokio::task::JoinHandle<()>> {
    // The client talks to `front`; what it sends leaves from `out` (at
    // `src`) to the relay; whatever the relay answers to `out` is dropped.
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let out = tokio::net::UdpSocket::bind((src, 0)).await?;
    let front_addr = front.local_addr()?;
    let relay_addr = relay.addr();
    let cfg = swb_tests::raw_client_config_alpn(relay, swb_wire::ALPN)?;
    let task = tokio::spawn(async move {
        let mut ep = match quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")) {
            Ok(ep) => ep,
            Err(_) => return,
        };
        ep.set_default_client_config(cfg);
        let Ok(connecting) = ep.connect(front_addr, "localhost") else {
            return;
        };
        let forward = async {
            let mut buf = vec![0u8; 2048];
            while let Ok(n) = front.recv(&mut buf).await {
                let _ = out.send_to(&buf[..n], relay_addr).await;
            }
        };
        tokio::select! {
            _ = connecting => {}
            _ = forward => {}
        }
    });
    Ok(task)
}

#[tokio::test]
async fn half_open_handshakes_from_many_addresses_do_not_lock_daemons_out() -> Result<()> {
    // Few slots, so a handful of half-open handshakes would hold them all
    // for the Hello timeout without address validation.
    let relay = TestRelay::spawn_with(swb_tests::RelayOptions {
        max_handshakes: 16,
        retry_above: 4,
        ..swb_tests::RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    let mut strangers = Vec::new();
    for i in 0..64u8 {
        strangers.push(half_open(&relay, std::net::IpAddr::from([127, 0, 1, i + 1])).await?);
    }
    // The relay answers them with Retries they never see; a daemon that
    // does see its Retry attaches (the Retry costs it a round trip).
    swb_tests::eventually("the strangers seen", WAIT, || async {
        let s = relay.handle().stats();
        Ok((s.handshakes_retried + s.refused_busy >= 32).then_some(()))
    })
    .await?;
    // Without validation the strangers would hold every slot until the
    // Hello timeout (10 s) and the daemon would get in only then.
    let t = std::time::Instant::now();
    tokio::time::timeout(
        Duration::from_secs(5),
        TestDaemon::start(&relay, &key, "real"),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the daemon was locked out by half-open handshakes"))??;
    eprintln!(
        "a daemon attached in {:?} beside 64 half-open handshakes",
        t.elapsed()
    );
    for s in strangers {
        s.abort();
    }
    Ok(())
}

#[tokio::test]
async fn one_address_opening_connections_too_fast_is_refused_and_others_are_not() -> Result<()> {
    let relay = TestRelay::spawn_with(swb_tests::RelayOptions {
        connections_per_ip: Some(swb_relay::limits::Rate::new(0.5, 3.0)),
        ..swb_tests::RelayOptions::default()
    })
    .await?;
    let cfg = swb_tests::raw_client_config_alpn(&relay, swb_wire::ALPN)?;
    let connect = |src: [u8; 4]| {
        let cfg = cfg.clone();
        let to = relay.addr();
        async move {
            let mut ep = quinn::Endpoint::client((std::net::IpAddr::from(src), 0).into())?;
            ep.set_default_client_config(cfg);
            anyhow::Ok(tokio::time::timeout(WAIT, ep.connect(to, "localhost")?).await?)
        }
    };
    let mut ok = 0;
    let mut refused = 0;
    for _ in 0..5 {
        match connect([127, 0, 2, 1]).await? {
            Ok(_) => ok += 1,
            Err(e @ quinn::ConnectionError::ConnectionClosed(_)) => {
                // Refused with when to come back: a token comes every 2 s.
                let wait = swb_quic::busy_hint(&e).with_context(|| format!("no hint: {e}"))?;
                assert!(
                    wait > Duration::ZERO && wait <= Duration::from_secs(2),
                    "hinted wait {wait:?}"
                );
                refused += 1
            }
            Err(e) => anyhow::bail!("unexpected: {e}"),
        }
    }
    assert_eq!((ok, refused), (3, 2), "a burst of 3, then refused");
    assert!(
        connect([127, 0, 2, 2]).await?.is_ok(),
        "another address is not limited"
    );
    Ok(())
}

#[tokio::test]
async fn a_key_past_its_send_rate_is_refused_and_other_keys_are_not() -> Result<()> {
    let relay = TestRelay::spawn_with(swb_tests::RelayOptions {
        key_send_rate: Some(swb_relay::limits::Rate::new(0.01, 5.0)),
        key_http_rate: Some(swb_relay::limits::Rate::new(0.01, 3.0)),
        ..swb_tests::RelayOptions::default()
    })
    .await?;
    let busy = relay.create_key("acme")?;
    let calm = relay.create_key("acme")?;
    let d = TestDaemon::start(&relay, &busy, "busy").await?;
    for i in 0..5 {
        d.send("calm", format!("m{i}").as_bytes()).await?;
    }
    match d.send("calm", b"one too many").await {
        Err(swb_daemon::ControlError::Remote { code, message }) => {
            assert_eq!(code, "rate_limited", "{message}");
        }
        other => anyhow::bail!("expected rate_limited, got {other:?}"),
    }
    // Another key of the namespace is not slowed by it.
    let c = TestDaemon::start(&relay, &calm, "calm").await?;
    c.send("busy", b"fine").await?;
    // HTTP requests have their own rate per key, with Retry-After.
    let http = relay.http(Some(&calm))?;
    for _ in 0..3 {
        assert_eq!(http.get("/v1/peers").await?.status, 200);
    }
    let r = http.get("/v1/peers").await?;
    assert_eq!((r.status, r.code()), (429, "rate_limited"), "{}", r.json);
    Ok(())
}

/// A send the relay refuses for its name still took from the key's send
/// rate: a client that skips the daemon's own check cannot send without
/// limit by naming nobody.
#[tokio::test]
async fn sends_to_bad_names_count_against_the_key_send_rate() -> Result<()> {
    let relay = TestRelay::spawn_with(swb_tests::RelayOptions {
        key_send_rate: Some(swb_relay::limits::Rate::new(0.01, 3.0)),
        ..swb_tests::RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    let (mut raw, f) = swb_tests::RawClient::hello(&relay, &key, "raw").await?;
    anyhow::ensure!(
        matches!(f, swb_wire::Frame::Welcome(_)),
        "expected welcome, got {f:?}"
    );
    let send = |req: u64, to: &str| {
        swb_wire::Frame::Send(swb_wire::Send {
            req,
            id: swb_wire::MessageId([req as u8; 16]),
            to: to.into(),
            body: bytes::Bytes::from_static(b"x"),
        })
    };
    async fn answer(raw: &mut swb_tests::RawClient) -> Result<(u64, swb_wire::Code)> {
        match raw.read_frame().await? {
            swb_wire::Frame::SendRefused(r) => Ok((r.req, r.refusal.code)),
            other => anyhow::bail!("expected a refusal, got {other:?}"),
        }
    }
    // The burst of 3, spent on names nobody can have.
    for req in 1..=3 {
        raw.write_frame(&send(req, "bad name!")).await?;
        assert_eq!(answer(&mut raw).await?, (req, swb_wire::Code::BAD_NAME));
    }
    // So a good one is over the rate.
    raw.write_frame(&send(4, "away")).await?;
    assert_eq!(answer(&mut raw).await?, (4, swb_wire::Code::RATE_LIMITED));
    Ok(())
}

/// `n` QUIC Initials (first contact, no token) from real quinn clients,
/// recorded at a socket of ours instead of sent to a relay.
async fn record_initials(relay: &TestRelay, n: usize) -> Result<Vec<Vec<u8>>> {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ep.set_default_client_config(swb_tests::raw_client_config_alpn(relay, swb_wire::ALPN)?);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 2048];
    while out.len() < n {
        let pending: Vec<_> = (0..32)
            .map(|_| ep.connect(sink_addr, "localhost"))
            .collect::<Result<_, _>>()?;
        while let Ok(Ok((len, _))) =
            tokio::time::timeout(Duration::from_millis(100), sink.recv_from(&mut buf)).await
        {
            out.push(buf[..len].to_vec());
        }
        drop(pending);
    }
    out.truncate(n);
    Ok(out)
}

#[tokio::test]
async fn an_initial_flood_from_one_address_is_dropped_before_any_handshake() -> Result<()> {
    let relay = TestRelay::spawn_with(swb_tests::RelayOptions {
        metrics: true,
        ..swb_tests::RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    let initials = record_initials(&relay, 3000).await?;
    let flood = tokio::net::UdpSocket::bind("127.0.2.1:0").await?;
    for p in &initials {
        flood.send_to(p, relay.addr()).await?;
    }
    // 3000 at once from one address: 1000 (the burst) pass the gate, the
    // rest are dropped before quinn decrypts them.
    let metrics = relay.handle().metrics_addr().expect("metrics on");
    let dropped = swb_tests::eventually("Initials dropped", WAIT, || async {
        let text = swb_tests::scrape(metrics).await?;
        let n: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("swb_relay_initials_dropped_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Ok((n >= 1500).then_some(n))
    })
    .await?;
    eprintln!("{dropped} of 3000 Initials from one address dropped at the gate");
    // Another address is not affected.
    tokio::time::timeout(
        Duration::from_secs(5),
        TestDaemon::start(&relay, &key, "real"),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the daemon was locked out by the flood"))??;
    Ok(())
}

/// `swb_relay_tun_packets_total{result="not_joined"}` of `relay`.
fn not_joined(relay: &TestRelay) -> u64 {
    let series = "swb_relay_tun_packets_total{result=\"not_joined\"}";
    swb_tests::metric(&relay.handle().metrics_text(), series).unwrap_or(0)
}

#[tokio::test]
async fn a_strangers_datagrams_on_either_door_are_discarded_not_held() -> Result<()> {
    let client_door = TestRelay::spawn().await?;
    let mesh_door = swb_tests::mesh_relay("r1", &swb_tests::mesh_key('d'), &[]).await?;
    for (relay, alpn) in [
        (&client_door, swb_wire::ALPN),
        (&mesh_door, swb_wire::MESH_ALPN),
    ] {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        ep.set_default_client_config(swb_tests::raw_client_config_alpn(relay, alpn)?);
        let conn = ep.connect(relay.addr(), "localhost")?.await?;
        // No Hello, no proof: 100 datagrams the relay must not keep.
        for _ in 0..100 {
            conn.send_datagram(vec![0x45u8; 1100].into())?;
        }
        swb_tests::eventually("the datagrams read and counted", WAIT, || async {
            Ok((not_joined(relay) >= 90).then_some(()))
        })
        .await?;
        conn.close(0u32.into(), b"");
    }
    Ok(())
}
