//! QUIC key updates on the patched quinn-proto (`vendor/quinn-proto`): the
//! next key phase's keys are derived when first needed instead of when the
//! handshake completes (an idle connection never needs them). Both ends
//! must still move through any number of key phases, started by either
//! side or by both at once, with every byte arriving intact — also after a
//! server gave back its TLS session (`release_handshake_state`, what the
//! relay does for every peer), which keeps only the secrets key updates use.

use anyhow::{Context, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::Layer as _;

const WAIT: Duration = Duration::from_secs(20);
const ALPN: &[u8] = b"key-updates";

fn endpoints() -> Result<(quinn::Endpoint, quinn::Endpoint)> {
    swb_tests::quinn_pair(ALPN, None)
}

/// Sends `data` on a new stream and checks the echo is the same bytes.
async fn round_trip(conn: &quinn::Connection, data: &[u8]) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(data).await?;
    send.finish()?;
    let back = recv.read_to_end(data.len()).await?;
    anyhow::ensure!(back == data, "the echo differs from what was sent");
    Ok(())
}

/// Counts quinn-proto's "key update authenticated" events: one each time
/// an end decrypts the first packet of a key phase its peer started.
struct UpdatesSeen(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for UpdatesSeen {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" && format!("{v:?}") == "key update authenticated" {
                    self.0 = true;
                }
            }
        }
        if event.metadata().target().starts_with("quinn_proto") {
            let mut m = Message(false);
            event.record(&mut m);
            if m.0 {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

#[tokio::test]
async fn connections_move_through_key_phases_started_by_either_side() -> Result<()> {
    key_phases(false).await
}

#[tokio::test]
async fn a_server_that_gave_back_its_tls_session_still_moves_through_key_phases() -> Result<()> {
    key_phases(true).await
}

/// The ALPN a connection negotiated, as quinn reports it.
fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// Twelve key phases over one connection, started in turn by the client
/// and the server; with `release`, the server gives back its TLS session
/// as soon as the connection is up.
async fn key_phases(release: bool) -> Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    let seen = Arc::new(AtomicUsize::new(0));
    let subscriber = tracing_subscriber::registry().with(
        UpdatesSeen(seen.clone()).with_filter(tracing_subscriber::filter::LevelFilter::TRACE),
    );
    let _guard = tracing::subscriber::set_default(subscriber);

    let (server, client) = endpoints()?;
    let addr = server.local_addr()?;
    // The server echoes every stream and, when the first byte is `U`,
    // starts a key update of its own first.
    let echo = tokio::spawn(async move {
        let conn = server.accept().await.context("no incoming")?.await?;
        let mut ekm = [0u8; 32];
        anyhow::ensure!(conn.export_keying_material(&mut ekm, b"label", b"").is_ok());
        if release {
            anyhow::ensure!(conn.release_handshake_state(), "nothing was given back");
            // What the session still answers for, and what it no longer can.
            anyhow::ensure!(alpn(&conn).as_deref() == Some(ALPN), "ALPN lost");
            anyhow::ensure!(
                conn.export_keying_material(&mut ekm, b"label", b"")
                    .is_err(),
                "keying material exported from a released session"
            );
            anyhow::ensure!(!conn.release_handshake_state(), "given back twice");
        }
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let data = recv.read_to_end(1 << 20).await?;
            if data.first() == Some(&b'U') {
                conn.force_key_update();
            }
            send.write_all(&data).await?;
            send.finish()?;
        }
        anyhow::Ok(())
    });
    let conn = tokio::time::timeout(WAIT, client.connect(addr, "localhost")?).await??;
    // A client keeps its session (the server may still send it tickets).
    assert!(
        !conn.release_handshake_state(),
        "a client gave back its session"
    );
    assert_eq!(alpn(&conn).as_deref(), Some(ALPN));
    let body = |tag: u8, n: usize| -> Vec<u8> {
        let mut v: Vec<u8> = (0..64 * 1024).map(|i| (i * 31 + n) as u8).collect();
        v[0] = tag;
        v
    };
    tokio::time::timeout(WAIT, async {
        round_trip(&conn, &body(b'-', 0)).await?;
        // Twelve key phases, started in turn by the client and by the
        // server. A forced update is skipped while the previous phase's
        // keys are still kept (three PTOs), so each is asked for again,
        // with more data, until the other end has seen it.
        let mut n = 0;
        for phase in 1..=12 {
            let server_starts = phase % 2 == 0;
            while seen.load(Ordering::SeqCst) < phase {
                n += 1;
                if !server_starts {
                    conn.force_key_update();
                }
                round_trip(&conn, &body(if server_starts { b'U' } else { b'-' }, n)).await?;
            }
            // Data both ways in the phase just reached.
            round_trip(&conn, &body(b'-', n + 1000)).await?;
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("{} key updates seen", seen.load(Ordering::SeqCst)))??;
    assert!(
        conn.close_reason().is_none(),
        "the connection was closed: {:?}",
        conn.close_reason()
    );
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    tokio::time::timeout(WAIT, echo).await???;
    Ok(())
}
