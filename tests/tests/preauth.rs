//! Hostile until authenticated: a connection that has not proven a key
//! (an API key's `Hello`, or the mesh key) gets a small flow-control
//! budget, so strangers holding every handshake slot still pin little of
//! the relay's memory, and real daemons still attach.

use anyhow::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use swb_tests::{TestDaemon, TestRelay};

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
    // The relay allows 8 streams before a session raises the limit.
    for _ in 1..8 {
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
