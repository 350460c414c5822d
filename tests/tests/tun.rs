//! TUN packets at the relay, with raw QUIC clients on 127.0.0.1: a
//! `TunJoin` gets each peer an address of its namespace; a datagram goes
//! to the peer its destination names; one whose source is not the
//! sender's own is dropped and counted; names resolve to indexes.

use anyhow::{bail, Context, Result};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use swb_tests::{RawClient, TestRelay, WAIT};
use swb_wire::{Frame, TunAnswer, TunAssigned, TunJoin, TunResolve};

async fn join(relay: &TestRelay, key: &str, name: &str) -> Result<(RawClient, TunAssigned)> {
    swb_tests::tun_join(relay, key, name).await
}

fn v4(a: &TunAssigned) -> IpAddr {
    swb_tests::tun_v4(a)
}

fn counter(relay: &TestRelay, result: &str) -> u64 {
    let series = format!("swb_relay_tun_packets_total{{result=\"{result}\"}}");
    swb_tests::metric(&relay.handle().metrics_text(), &series).unwrap_or(0)
}

#[tokio::test]
async fn packets_go_to_the_peer_their_address_names_and_spoofed_ones_are_dropped() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let (mut a, aa) = join(&relay, &key, "alpha").await?;
    let (b, ba) = join(&relay, &key, "beta").await?;
    assert_ne!(aa.index, ba.index);
    assert_eq!((aa.v4_net, aa.v4_prefix), ([100, 64, 0, 0], 10));
    let (a4, b4) = (v4(&aa), v4(&ba));

    let good = swb_tunnel::build::udp(a4, b4, 4000, 5000, b"through the relay").context("udp")?;
    let spoofed = swb_tunnel::build::udp(
        IpAddr::from([100, 64, 9, 9]),
        b4,
        4000,
        5000,
        b"not from alpha",
    )
    .context("udp")?;
    a.conn.send_datagram(spoofed.into())?;
    a.conn.send_datagram(good.clone().into())?;
    let got = tokio::time::timeout(WAIT, b.conn.read_datagram()).await??;
    assert_eq!(&got[..], &good[..], "the good packet, not the spoofed one");
    swb_tests::eventually("the spoofed packet counted", WAIT, || async {
        Ok((counter(&relay, "spoofed") == 1).then_some(()))
    })
    .await?;
    assert_eq!(counter(&relay, "forwarded"), 1);
    // Nothing else reached beta.
    let more = tokio::time::timeout(Duration::from_millis(300), b.conn.read_datagram()).await;
    assert!(more.is_err(), "beta got a second datagram: {more:?}");

    // To an address nobody has: dropped, counted.
    let nobody =
        swb_tunnel::build::udp(a4, IpAddr::from([100, 64, 3, 3]), 1, 2, b"?").context("udp")?;
    a.conn.send_datagram(nobody.into())?;
    swb_tests::eventually("counted as no route", WAIT, || async {
        Ok((counter(&relay, "no_route") == 1).then_some(()))
    })
    .await?;

    // Names resolve to indexes within the namespace only.
    for (req, name, want) in [(1, "beta", Some(ba.index)), (2, "nosuch", None)] {
        a.write_frame(&Frame::TunResolve(TunResolve {
            req,
            name: name.into(),
        }))
        .await?;
        match a.read_frame().await? {
            Frame::TunResolved(r) => assert_eq!((r.req, r.index), (req, want), "{name}"),
            f => bail!("{f:?}"),
        }
    }
    let other = relay.create_key("globex")?;
    let (mut g, ga) = join(&relay, &other, "gamma").await?;
    // Another namespace's address space: its packets to acme's beta's
    // address reach nobody.
    let across = swb_tunnel::build::udp(v4(&ga), b4, 1, 2, b"across").context("udp")?;
    g.conn.send_datagram(across.into())?;
    swb_tests::eventually("counted as no route", WAIT, || async {
        Ok((counter(&relay, "no_route") == 2).then_some(()))
    })
    .await?;
    let more = tokio::time::timeout(Duration::from_millis(300), b.conn.read_datagram()).await;
    assert!(more.is_err(), "a packet crossed namespaces: {more:?}");
    g.write_frame(&Frame::TunResolve(TunResolve {
        req: 9,
        name: "alpha".into(),
    }))
    .await?;
    match g.read_frame().await? {
        Frame::TunResolved(r) => assert_eq!(r.index, None, "alpha is of another namespace"),
        f => bail!("{f:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn datagrams_before_hello_or_before_joining_are_discarded_at_once_and_counted() -> Result<()>
{
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let junk = vec![0x45u8; 1100];
    // A stranger that never says Hello: its datagrams are read and dropped
    // (counted), not parked in the connection's buffer until it times out.
    let stranger = RawClient::open(&relay, b"").await?;
    for _ in 0..100 {
        stranger.conn.send_datagram(junk.clone().into())?;
    }
    swb_tests::eventually("the stranger's datagrams counted", WAIT, || async {
        Ok((counter(&relay, "not_joined") >= 90).then_some(()))
    })
    .await?;
    // A session that has not joined TUN mode: the same, and it goes on.
    let (mut a, f) = RawClient::hello(&relay, &key, "alpha").await?;
    assert!(matches!(f, Frame::Welcome(_)), "{f:?}");
    let before = counter(&relay, "not_joined");
    for _ in 0..100 {
        a.conn.send_datagram(junk.clone().into())?;
    }
    swb_tests::eventually("the session's datagrams counted", WAIT, || async {
        Ok((counter(&relay, "not_joined") >= before + 90).then_some(()))
    })
    .await?;
    assert_eq!(counter(&relay, "forwarded"), 0);
    a.write_frame(&Frame::TunJoin(TunJoin { want: None }))
        .await?;
    match a.read_frame().await? {
        Frame::TunAnswer(TunAnswer::Assigned(_)) => {}
        f => bail!("{f:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_daemon_that_cannot_make_its_interface_says_why_in_its_status() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    // A name the kernel will not take up front: a config error.
    let mut bad = relay.daemon_config(&key, "alpha", std::path::PathBuf::new());
    bad.tun = Some(swb_daemon::TunSettings {
        name: "no such name!".into(),
        allow_all: false,
    });
    let e = swb_tests::TestDaemon::spawn(bad)
        .await
        .err()
        .context("accepted")?;
    assert!(e.to_string().contains("--tun-name"), "{e}");
    // `lo` is taken by the loopback interface: the TUN interface cannot be
    // made (as without CAP_NET_ADMIN); the daemon goes on without TUN and
    // says so.
    let d = swb_tests::TestDaemon::start_with(&relay, &key, "alpha", |c| {
        c.tun = Some(swb_daemon::TunSettings {
            name: "lo".into(),
            allow_all: false,
        });
    })
    .await?;
    let why = swb_tests::eventually("TUN off in the status", WAIT, || async {
        let st = d.client().await?.status().await?;
        Ok(st.tun_error.map(|e| (e, st.tun)))
    })
    .await?;
    assert!(
        why.0.contains("cannot create TUN interface lo"),
        "{}",
        why.0
    );
    assert_eq!(why.1, None);
    // Messages still work.
    let b = swb_tests::TestDaemon::start(&relay, &key, "beta").await?;
    d.send("beta", b"still here").await?;
    assert_eq!(b.recv(1).await?[0].body(), b"still here");
    Ok(())
}

#[tokio::test]
async fn the_relay_hands_out_addresses_from_its_configured_range() -> Result<()> {
    let relay = TestRelay::spawn_with(swb_tests::RelayOptions {
        tun_range: (Ipv4Addr::new(10, 77, 0, 0), 16),
        ..Default::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    let (_a, aa) = join(&relay, &key, "alpha").await?;
    assert_eq!((aa.v4_net, aa.v4_prefix), ([10, 77, 0, 0], 16));
    assert_eq!(v4(&aa), IpAddr::from([10, 77, 0, 1]));
    Ok(())
}
