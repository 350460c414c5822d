//! Discovering a path's MTU again (the vendored quinn-proto's
//! `set_path_mtu_upper_bound` and `restart_path_mtu_discovery`, which a
//! daemon calls when its packets move between UDP and the TCP carrier while
//! the relay's address stays the same): a new bound keeps what the path
//! took if it fits; a restart starts over from QUIC's minimum whatever the
//! bound, and discovery then grows the MTU again.

use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Duration;
use swb_tests::eventually;

const WAIT: Duration = Duration::from_secs(20);
const ALPN: &[u8] = b"path-mtu";
/// quinn's initial and minimum MTU.
const MIN: u16 = swb_quic::carrier::QUIC_MIN_MTU;
/// quinn's default discovery bound; loopback takes far more.
const ETHERNET: u16 = 1452;
const BOUND: u16 = 16_000;

fn mtu(c: &quinn::Connection) -> u16 {
    c.stats().path.current_mtu
}

/// One echoed stream of `len` bytes: traffic for discovery to probe beside.
async fn round_trip(conn: &quinn::Connection, len: usize) -> Result<()> {
    let data = swb_tests::pattern(7, len);
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&data).await?;
    send.finish()?;
    let back = recv.read_to_end(len).await?;
    anyhow::ensure!(back == data, "the echo differs from what was sent");
    Ok(())
}

/// Until the client's path MTU is past Ethernet's, echoing meanwhile.
async fn grown(conn: &quinn::Connection, what: &str) -> Result<u16> {
    eventually(what, WAIT, || async {
        round_trip(conn, 8 * 1024).await?;
        Ok((mtu(conn) > ETHERNET).then(|| mtu(conn)))
    })
    .await
}

#[tokio::test]
async fn a_restart_starts_over_from_the_minimum_where_a_new_bound_keeps_what_fits() -> Result<()> {
    let mut transport = quinn::TransportConfig::default();
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(BOUND);
    transport.mtu_discovery_config(Some(mtud));
    let (server, client) = swb_tests::quinn_pair(ALPN, Some(Arc::new(transport)))?;
    let addr = server.local_addr()?;
    let echo = tokio::spawn(async move {
        let conn = server.accept().await.context("no incoming")?.await?;
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let data = recv.read_to_end(1 << 20).await?;
            send.write_all(&data).await?;
            send.finish()?;
        }
        anyhow::Ok(())
    });
    let conn = client.connect(addr, "localhost")?.await?;
    assert_eq!(mtu(&conn), MIN, "every path starts at QUIC's minimum");
    let first = grown(&conn, "the path MTU past Ethernet's").await?;
    eprintln!("discovered on loopback: {first}");

    // A bound the current MTU fits under keeps it.
    conn.set_path_mtu_upper_bound(Some(BOUND));
    assert_eq!(mtu(&conn), first, "a bound above the current MTU keeps it");
    // A restart drops to the minimum at once, though the MTU fits its bound…
    conn.restart_path_mtu_discovery(Some(BOUND));
    assert_eq!(mtu(&conn), MIN, "a restart starts from QUIC's minimum");
    // …and discovery runs again from there.
    let again = grown(&conn, "the path MTU past Ethernet's again").await?;
    eprintln!("discovered again after the restart: {again}");
    assert!(again <= BOUND);

    // A bound under the current MTU drops it to the minimum, and discovery
    // stays within it.
    conn.set_path_mtu_upper_bound(Some(1300));
    assert_eq!(mtu(&conn), MIN, "a bound under the current MTU drops it");
    for _ in 0..20 {
        round_trip(&conn, 8 * 1024).await?;
        assert!(mtu(&conn) <= 1300, "past its bound: {}", mtu(&conn));
    }

    // The echo ends with the connection, and says if it failed before.
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    tokio::time::timeout(WAIT, echo)
        .await
        .context("the echo outlived its connection")???;
    Ok(())
}
