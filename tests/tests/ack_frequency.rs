//! A sender held by its congestion window with no more packets in flight
//! than its peer may sit on (the peer acknowledges after more than its
//! ack-eliciting threshold, or after its ACK delay, 25 ms) asks for an
//! immediate acknowledgement — an IMMEDIATE_ACK frame of the QUIC ACK
//! frequency extension, the patched quinn-proto's item 16
//! (`vendor/quinn-proto/SWITCHBOARD.md`). Without it, every window-wide
//! flight of such a burst waited out the peer's ACK delay: 26 ms stalls
//! in `swbd-bench latency` at 64 requests in flight, where the window is
//! two 16 KB packets on loopback, and at the relay, which asks daemons for
//! an ACK only every 9 packets, whenever a burst met a window of 8.
//!
//! Daemons ask the same of the relay, so that one message at a time its
//! acknowledgement rides its answer instead of a packet of its own.

use anyhow::{Context, Result};
use quinn_proto::congestion::{Controller, ControllerFactory};
use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ALPN: &[u8] = b"ack-frequency";
/// Bytes of the burst: about 90 windows of [`WINDOW`].
const BURST: usize = 1024 * 1024;
/// The congestion window, fixed: 10 packets of 1200 bytes, quinn's
/// initial window (at the smallest MTU) — 9 full packets fit below it.
const WINDOW: u64 = 12_000;

/// A congestion controller whose window never moves, so that every flight
/// of the burst meets it (a real one grows past it after the first ACKs).
#[derive(Debug, Clone)]
struct Fixed;

impl Controller for Fixed {
    fn on_congestion_event(&mut self, _: Instant, _: Instant, _: bool, _: u64) {}
    fn on_mtu_update(&mut self, _: u16) {}
    fn window(&self) -> u64 {
        WINDOW
    }
    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }
    fn initial_window(&self) -> u64 {
        WINDOW
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

impl ControllerFactory for Fixed {
    fn build(self: Arc<Self>, _: Instant, _: u16) -> Box<dyn Controller> {
        Box::new(Fixed)
    }
}

/// Sends [`BURST`] bytes client → server on one stream, both ends asking
/// their peer to acknowledge after more than `threshold` packets (or 25
/// ms); returns how long until the server read it all, and the client's
/// and the server's connection stats.
async fn burst(
    threshold: u32,
) -> Result<(Duration, quinn::ConnectionStats, quinn::ConnectionStats)> {
    let mut t = quinn::TransportConfig::default();
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(threshold.into());
    t.ack_frequency_config(Some(ack));
    t.congestion_controller_factory(Arc::new(Fixed));
    // Packets of 1200 bytes throughout: no MTU probe in between.
    t.mtu_discovery_config(None);
    let (server, client) = swb_tests::quinn_pair(ALPN, Some(Arc::new(t)))?;
    let addr = server.local_addr()?;
    let wait = Duration::from_secs(30);
    let accept = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let mut recv = conn.accept_uni().await?;
        let got = recv.read_to_end(BURST).await?;
        let done = Instant::now();
        anyhow::ensure!(got.len() == BURST, "the server read {} bytes", got.len());
        let stats = conn.stats();
        conn.close(0u32.into(), b"done");
        server.wait_idle().await;
        anyhow::Ok((done, stats))
    });
    let conn = tokio::time::timeout(wait, client.connect(addr, "localhost")?)
        .await
        .context("handshake timed out")??;
    let mut send = conn.open_uni().await?;
    let start = Instant::now();
    send.write_all(&vec![0x5a; BURST]).await?;
    send.finish()?;
    let (done, server_stats) = tokio::time::timeout(wait, accept)
        .await
        .context("the burst did not arrive")???;
    Ok((done.duration_since(start), conn.stats(), server_stats))
}

#[tokio::test]
async fn a_sender_held_by_its_window_asks_for_an_immediate_ack() -> Result<()> {
    // The peer may hold 20 packets unacknowledged; the window lets 9 out.
    let (took, client, server) = burst(20).await?;
    // About 90 flights: waiting out the peer's 25 ms ACK delay after each
    // took about 2 s; asked for, each ACK comes a loopback round trip
    // after its flight.
    assert!(
        took < Duration::from_secs(1),
        "{BURST} bytes took {took:?}: flights waited for delayed ACKs"
    );
    assert!(
        client.frame_tx.immediate_ack > 0 && server.frame_rx.immediate_ack > 0,
        "no IMMEDIATE_ACK sent ({}) or received ({})",
        client.frame_tx.immediate_ack,
        server.frame_rx.immediate_ack
    );
    Ok(())
}

#[tokio::test]
async fn a_sender_with_more_packets_in_flight_than_the_peer_holds_asks_for_none() -> Result<()> {
    // The peer acknowledges every second packet; 9 fit in the window.
    let (_, client, server) = burst(1).await?;
    assert_eq!(
        (client.frame_tx.immediate_ack, server.frame_rx.immediate_ack),
        (0, 0),
        "IMMEDIATE_ACK sent where the peer acknowledges within the window anyway"
    );
    Ok(())
}

/// One message at a time between two daemons, one answering the other's
/// questions (the answer sent, then the question acknowledged), every
/// acknowledgement rides a packet that goes anyway:
///
/// - The relay's QUIC acknowledgement of the daemon's packets rides its
///   answer to the daemon's send. Daemons ask the relay to acknowledge only
///   every 9 ack-eliciting packets (or after 25 ms), as the relay asks of
///   them; with quinn's default, every second one, the relay sent a packet
///   with only an ACK in it before each answer: three packets a round to
///   the answering daemon instead of two.
/// - The daemon's acknowledgement of the question rides the packet of its
///   answer: the caller writes it to the stream itself when the stream is
///   free, as it writes its sends, instead of handing it to the connection
///   actor, whose write came after QUIC had sent the answer: two packets a
///   round instead of one.
#[tokio::test]
async fn one_message_at_a_time_acknowledgements_ride_the_answers_both_ways() -> Result<()> {
    use swb_tests::{TestDaemon, TestRelay, WAIT};
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let a = TestDaemon::start(&relay, &key, "alpha").await?;
    let b = TestDaemon::start(&relay, &key, "beta").await?;
    let (atx, mut arx) = (a.handle.sender(), a.handle.receiver());
    let (btx, mut brx) = (b.handle.sender(), b.handle.receiver());
    const ROUNDS: u64 = 200;
    let before = b.traffic().await?;
    for i in 0..ROUNDS {
        atx.submit("beta", format!("ask {i}"), WAIT)
            .await?
            .answer()
            .await?;
        let got = brx.recv(1, WAIT).await?;
        anyhow::ensure!(got.len() == 1, "round {i}: beta received {}", got.len());
        // As a server answers: the answer first, then the question's
        // acknowledgement, then the wait for the relay to accept.
        let mut answer = btx.submit("alpha", format!("answer {i}"), WAIT).await?;
        brx.ack(&[got[0].id]).await?;
        answer.answer().await?;
        let got = arx.recv(1, WAIT).await?;
        anyhow::ensure!(got.len() == 1, "round {i}: alpha received {}", got.len());
        arx.ack(&[got[0].id]).await?;
    }
    let after = b.traffic().await?;
    let per_round = |n: u64| n as f64 / ROUNDS as f64;
    // Beta receives the question and the answer to its send...
    let received = per_round(after.received_packets - before.received_packets);
    assert!(
        received < 2.5,
        "beta received {received:.2} packets a round: the relay acknowledged in packets of their own"
    );
    // ...and sends its answer with the acknowledgement in it.
    let sent = per_round(after.sent_packets - before.sent_packets);
    assert!(
        sent < 1.5,
        "beta sent {sent:.2} packets a round: its acknowledgements left apart from its answers"
    );
    Ok(())
}
