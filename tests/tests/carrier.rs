//! The TCP carrier: QUIC packets inside TLS to the relay's HTTPS port, for
//! networks that drop UDP. A daemon forced onto it does everything a UDP
//! one does; one on `auto` moves to it when UDP stops answering and back
//! when UDP returns, without a reconnect — a stream open all along keeps
//! going.

use anyhow::{Context, Result};
use std::time::Duration;
use swb_daemon::Transport;
use swb_tests::{eventually, HashServer, TestDaemon, TestRelay, WAIT};

async fn carrier_of(d: &TestDaemon) -> Result<Option<String>> {
    Ok(d.client().await?.status().await?.carrier)
}

async fn path_mtu_of(d: &TestDaemon) -> Result<u16> {
    d.client()
        .await?
        .status()
        .await?
        .path_mtu
        .context("no path MTU while connected")
}

/// What MTU discovery finds on a UDP path over Ethernet (quinn's bound);
/// on loopback a UDP path takes the carrier's size too.
const UDP_MTU_BOUND: u16 = 1452;

#[tokio::test]
async fn a_handshake_whose_udp_answers_are_dropped_finishes_on_the_carrier() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let (cut, fwd) = swb_tests::cuttable(&relay).await?;
    // The relay hears the UDP Initial, its answers never come back.
    cut.cut_answers();
    let mut cfg = relay.daemon_config(&key, "oneway", std::path::PathBuf::new());
    cfg.relays = vec![cut.addr.to_string()];
    let t = std::time::Instant::now();
    let d = TestDaemon::spawn(cfg).await?;
    tokio::time::timeout(WAIT, d.handle.connected())
        .await
        .context("connect")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let took = t.elapsed();
    eprintln!("one-way UDP block: attached over the carrier after {took:?}");
    assert_eq!(carrier_of(&d).await?.as_deref(), Some("tcp"));
    // Without starting over, the relay drops the carried handshake until
    // its own handshake state for the UDP path expires (about 3 s here).
    assert!(
        took < Duration::from_millis(2500),
        "started over on the carrier at once: {took:?}"
    );
    fwd.abort();
    Ok(())
}

#[tokio::test]
async fn a_daemon_on_the_tcp_carrier_sends_receives_and_streams() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    anyhow::ensure!(
        relay.http_addr().port() == relay.addr().port(),
        "HTTPS on the QUIC port"
    );
    let key = relay.create_key("acme")?;
    let hs = HashServer::start().await?;
    let addr = hs.addr;
    let tcp = TestDaemon::start_with(&relay, &key, "overtcp", |c| {
        c.transport = Transport::Tcp;
        c.expose = vec![swb_daemon::Exposure {
            port: 9000,
            target: addr.to_string(),
        }];
    })
    .await?;
    let udp = TestDaemon::start_with(&relay, &key, "overudp", |c| {
        c.transport = Transport::Udp;
        c.expose = vec![swb_daemon::Exposure {
            port: 9000,
            target: addr.to_string(),
        }];
    })
    .await?;
    assert_eq!(carrier_of(&tcp).await?.as_deref(), Some("tcp"));
    assert_eq!(carrier_of(&udp).await?.as_deref(), Some("udp"));
    tcp.send("overudp", b"from the carrier").await?;
    assert_eq!(udp.recv_n(1).await?[0].body(), b"from the carrier");
    udp.send("overtcp", b"to the carrier").await?;
    assert_eq!(tcp.recv_n(1).await?[0].body(), b"to the carrier");
    let s = tcp.open_stream("overudp", 9000).await?;
    let (sent, back) = swb_tests::send_and_collect(s, 19, 16 << 20).await?;
    assert_eq!(sent, back, "16 MiB over the carrier, checksum");
    // Packets larger than any UDP path takes, on the carrier only.
    eventually("the carrier's path MTU past UDP's", WAIT, || async {
        Ok((path_mtu_of(&tcp).await? > UDP_MTU_BOUND).then_some(()))
    })
    .await?;
    eprintln!("path MTU over the carrier: {}", path_mtu_of(&tcp).await?);
    // A UDP path grows as far as its first link takes: on loopback (MTU
    // 65 536) to the endpoint's bound, past Ethernet's.
    eventually(
        "the UDP path's MTU past Ethernet's on loopback",
        WAIT,
        || async { Ok((path_mtu_of(&udp).await? > UDP_MTU_BOUND).then_some(())) },
    )
    .await?;
    let udp_mtu = path_mtu_of(&udp).await?;
    eprintln!("path MTU over UDP on loopback: {udp_mtu}");
    assert!(udp_mtu <= swb_quic::carrier::CARRIER_MTU);
    // The relay's end of the carrier path grows too: 8 MiB from the UDP
    // peer reach the carrier's daemon in packets larger than UDP's on
    // average — with the relay held at UDP's bound the average stays
    // below it.
    let before = tcp.traffic().await?;
    let s = udp.open_stream("overtcp", 9000).await?;
    let (sent, back) = swb_tests::send_and_collect(s, 23, 8 << 20).await?;
    assert_eq!(sent, back, "8 MiB more over the carrier, checksum");
    let after = tcp.traffic().await?;
    let packets = after.received_packets - before.received_packets;
    let bytes = after.received_bytes - before.received_bytes;
    let mean = bytes / packets.max(1);
    eprintln!(
        "from the relay over the carrier: {packets} packets, {bytes} bytes, {mean} on average"
    );
    assert!(
        bytes >= 8 << 20 && mean > u64::from(UDP_MTU_BOUND),
        "the relay sends {mean}-byte packets on average over the carrier"
    );
    let open = swb_tests::metric(
        &relay.handle().metrics_text(),
        "swb_relay_tcp_carriers_open",
    )
    .context("carriers gauge")?;
    assert_eq!(open, 1);
    Ok(())
}

#[tokio::test]
async fn auto_moves_to_the_carrier_when_udp_stops_and_back_when_it_returns() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let (cut, fwd) = swb_tests::cuttable(&relay).await?;
    let hs = HashServer::start().await?;
    let addr = hs.addr;
    let mut cfg = relay.daemon_config(&key, "mover", std::path::PathBuf::new());
    cfg.relays = vec![cut.addr.to_string()];
    // Longer than the carrier's fallback, so the connection lives on.
    cfg.idle_timeout = Duration::from_secs(12);
    cfg.silence_probe = Duration::from_secs(5);
    let mover = TestDaemon::spawn(cfg).await?;
    tokio::time::timeout(WAIT, mover.handle.connected())
        .await
        .context("connect")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let server = TestDaemon::start_with(&relay, &key, "server", |c| {
        c.expose = vec![swb_daemon::Exposure {
            port: 9000,
            target: addr.to_string(),
        }];
    })
    .await?;
    assert_eq!(carrier_of(&mover).await?.as_deref(), Some("udp"));
    // A stream open across both moves.
    let stream = mover.open_stream("server", 9000).await?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut chunk = 0u64;
    let mut write = |n: u64| {
        let c = swb_tests::pattern(n, 64 * 1024);
        ctx.update(&c);
        c
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    wr.write_all(&write(chunk)).await?;
    chunk += 1;

    cut.cut();
    let t = std::time::Instant::now();
    eventually("the carrier taken", WAIT, || async {
        Ok((carrier_of(&mover).await?.as_deref() == Some("tcp")).then_some(()))
    })
    .await?;
    eprintln!("UDP cut: on the TCP carrier after {:?}", t.elapsed());
    mover.send("server", b"while UDP is cut").await?;
    assert_eq!(server.recv_n(1).await?[0].body(), b"while UDP is cut");
    wr.write_all(&write(chunk)).await?;
    chunk += 1;
    eventually("the carrier's path MTU past UDP's", WAIT, || async {
        Ok((path_mtu_of(&mover).await? > UDP_MTU_BOUND).then_some(()))
    })
    .await?;
    // Large packets in flight while the path grows.
    wr.write_all(&write(chunk)).await?;
    chunk += 1;

    cut.restore();
    let t = std::time::Instant::now();
    eventually("UDP taken again", WAIT, || async {
        Ok((carrier_of(&mover).await?.as_deref() == Some("udp")).then_some(()))
    })
    .await?;
    eprintln!("UDP back: on UDP again after {:?}", t.elapsed());
    // (Back on UDP, discovery starts over from QUIC's minimum within the
    // link's bound — on loopback as large as the carrier's, so the size
    // itself tells nothing here.)
    mover.send("server", b"UDP again").await?;
    assert_eq!(server.recv_n(1).await?[0].body(), b"UDP again");
    wr.write_all(&write(chunk)).await?;
    wr.shutdown().await?;
    let mut back = Vec::new();
    rd.read_to_end(&mut back).await?;
    assert_eq!(
        back,
        ctx.finish().as_ref(),
        "the stream survived both moves"
    );
    // One connection throughout: the relay never saw a second session.
    let sessions = swb_tests::metric(&relay.handle().metrics_text(), "swb_relay_sessions_total")
        .context("sessions counter")?;
    assert_eq!(sessions, 2, "mover and server, once each");
    fwd.abort();
    Ok(())
}
