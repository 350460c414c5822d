//! A relay with several shards (QUIC endpoints on one UDP port, see
//! `relay/src/shards.rs`): daemons attach to all of them and reach each
//! other across shards; a client whose source port changes keeps its
//! connection although the kernel now gives its packets to another shard.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Duration;
use swb_tests::{RawClient, RelayOptions, TestDaemon, TestRelay, WAIT};
use swb_wire::{Frame, Ping};

async fn relay(shards: usize) -> Result<TestRelay> {
    TestRelay::spawn_with(RelayOptions {
        shards,
        ..RelayOptions::default()
    })
    .await
}

#[tokio::test]
async fn daemons_on_different_shards_reach_each_other() -> Result<()> {
    let relay = relay(2).await?;
    let key = relay.create_key("acme")?;
    // 24 daemons, each on its own UDP port: the kernel spreads them over
    // the two sockets (all on one would be 2 chances in 2^24).
    let mut daemons = Vec::new();
    for i in 0..24 {
        let d = TestDaemon::start(&relay, &key, &format!("d{i}")).await?;
        d.wait_state(|s| s.is_connected()).await?;
        daemons.push(d);
    }
    let per_shard = relay.handle().shard_connections();
    assert_eq!(per_shard.len(), 2);
    assert_eq!(per_shard.iter().sum::<usize>(), 24, "{per_shard:?}");
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "both shards hold daemons: {per_shard:?}"
    );
    // Each daemon writes to the next: half of these cross shards.
    for (i, d) in daemons.iter().enumerate() {
        let to = format!("d{}", (i + 1) % daemons.len());
        d.send(&to, format!("from d{i}").as_bytes()).await?;
    }
    for (i, d) in daemons.iter().enumerate() {
        let from = format!("d{}", (i + daemons.len() - 1) % daemons.len());
        let got = d.recv_n(1).await?;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].from, from);
        assert_eq!(got[0].body(), format!("from {from}").into_bytes());
    }
    Ok(())
}

#[tokio::test]
async fn a_client_that_moves_keeps_its_session_on_its_shard() -> Result<()> {
    let relay = relay(2).await?;
    let key = relay.create_key("acme")?;
    let (mut raw, first) = RawClient::hello(&relay, &key, "mover").await?;
    assert!(matches!(first, Frame::Welcome(_)), "{first:?}");
    let peer = TestDaemon::start(&relay, &key, "peer").await?;
    // Each move is a new source port; the kernel gives it to either
    // shard. Move until one lands on the shard that does not hold the
    // connection (1 chance in 2 each time; 64 moves), pinging each time.
    let mut moves = 0;
    let mut nonce = 0;
    tokio::time::timeout(WAIT, async {
        while relay.handle().shard_forwarded() == 0 {
            anyhow::ensure!(moves < 64, "no move reached the other shard");
            raw.rebind()?;
            moves += 1;
            nonce += 1;
            raw.write_frame(&Frame::Ping(Ping { nonce })).await?;
            match raw.read_frame().await? {
                Frame::Pong(p) => anyhow::ensure!(p.nonce == nonce, "pong {}", p.nonce),
                other => anyhow::bail!("expected a pong, got {other:?}"),
            }
        }
        anyhow::Ok(())
    })
    .await??;
    println!(
        "after {moves} moves the kernel gave the client's packets to the other shard; {} handed over",
        relay.handle().shard_forwarded()
    );
    // The session is the same one, and mail still reaches it.
    assert_eq!(relay.handle().shard_connections().iter().sum::<usize>(), 2);
    peer.send("mover", b"still here?").await?;
    let got = tokio::time::timeout(WAIT, async {
        loop {
            match raw.read_frame().await? {
                Frame::Deliveries(d) => {
                    let mut d: Vec<_> = d.into_delivers().collect();
                    anyhow::ensure!(d.len() == 1, "one message: {d:?}");
                    return anyhow::Ok(d.remove(0));
                }
                Frame::Pong(_) | Frame::RelayMap(_) => continue,
                other => anyhow::bail!("expected a delivery, got {other:?}"),
            }
        }
    })
    .await??;
    assert_eq!(got.from, "peer");
    assert_eq!(&got.body[..], b"still here?");
    assert!(raw.conn.close_reason().is_none());
    Ok(())
}

#[tokio::test]
async fn a_daemon_on_the_second_shard_moves_to_the_tcp_carrier_and_back() -> Result<()> {
    let relay = relay(2).await?;
    let key = relay.create_key("acme")?;
    let peer = TestDaemon::start(&relay, &key, "peer").await?;
    // A daemon reaching the relay through a UDP path that can be cut, on
    // the shard that does not receive the TCP carriers (shard 1): each
    // attempt is a new forwarder, so a new source port (1 chance in 2).
    let mut found = None;
    for attempt in 0..32 {
        let before = relay.handle().shard_connections()[1];
        let (cut, fwd) = swb_tests::cuttable(&relay).await?;
        let name = format!("mover{attempt}");
        let mut cfg = relay.daemon_config(&key, &name, PathBuf::new());
        cfg.relays = vec![cut.addr.to_string()];
        cfg.idle_timeout = Duration::from_secs(12);
        cfg.silence_probe = Duration::from_secs(5);
        let mover = TestDaemon::spawn(cfg).await?;
        mover.wait_state(|s| s.is_connected()).await?;
        if relay.handle().shard_connections()[1] > before {
            found = Some((mover, name, cut, fwd));
            break;
        }
        mover.handle.shutdown();
        fwd.abort();
    }
    let (mover, name, cut, fwd) = found.context("no attempt landed on shard 1")?;
    let forwarded = relay.handle().shard_forwarded();
    // Carried packets enter through shard 0 and are handed to shard 1.
    cut.cut();
    swb_tests::eventually("the carrier taken", WAIT, || async {
        let st = mover.client().await?.status().await?;
        Ok((st.carrier.as_deref() == Some("tcp")).then_some(()))
    })
    .await?;
    mover.send("peer", b"over the carrier").await?;
    assert_eq!(peer.recv_n(1).await?[0].body(), b"over the carrier");
    peer.send(&name, b"back over it").await?;
    assert_eq!(mover.recv_n(1).await?[0].body(), b"back over it");
    assert!(
        relay.handle().shard_forwarded() > forwarded,
        "carried packets were handed to shard 1"
    );
    cut.restore();
    swb_tests::eventually("UDP taken again", WAIT, || async {
        let st = mover.client().await?.status().await?;
        Ok((st.carrier.as_deref() == Some("udp")).then_some(()))
    })
    .await?;
    mover.send("peer", b"UDP again").await?;
    assert_eq!(peer.recv_n(1).await?[0].body(), b"UDP again");
    fwd.abort();
    Ok(())
}

#[tokio::test]
async fn a_shard_count_out_of_range_is_refused() -> Result<()> {
    for n in [0, swb_relay::MAX_SHARDS + 1] {
        let err = match relay(n).await {
            Ok(_) => anyhow::bail!("{n} shards were accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("shards must be 1 to 64"), "{err}");
    }
    Ok(())
}
