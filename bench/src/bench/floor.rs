//! The floor of the `rate` scenario: what a relay built on the same stack
//! (quinn, rustls, tokio, one task per connection) delivers when it does
//! nothing but forward. Two client endpoints and a forwarder endpoint with
//! the relay's TLS and socket settings; the sender writes 128 B messages in
//! length-prefixed frames, batched per write as the daemon batches its
//! sends; the forwarder's task for the sender's connection parses what it
//! reads and hands each read's complete frames to the receiver's
//! connection's task over a bounded channel (the hop a message makes
//! between two sessions on the relay), which writes them on.
//!
//! No acceptance travels back to the sender and no acknowledgement from
//! the receiver, there is no mailbox, no name lookup, no message id: what
//! NATS core pub/sub promises and nothing more. Switchboard's figure
//! divided by this one says how much of the gap to NATS is the stack and
//! how much what the relay and daemons do per message.

use anyhow::{ensure, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use std::sync::Arc;
use std::time::{Duration, Instant};
use swb_daemon::Trust;
use swb_relay::Identity;

/// Message body size, as the `rate` scenario's.
const BODY: usize = 128;
/// Frames per write on the sender, as the daemon's most commands per write.
const BATCH: usize = 256;
/// Reads in flight between the forwarder's two tasks.
const HOP_QUEUE: usize = 64;
const ALPN: &[u8] = b"swb-bench-floor";

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.path_mtu_upper_bound(Some(swb_quic::carrier::path_mtu_hook()));
    Arc::new(t)
}

fn endpoint(server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint> {
    Ok(quinn::Endpoint::new(
        swb_quic::carrier::endpoint_config(),
        server,
        swb_relay::udp_socket("127.0.0.1:0".parse()?)?,
        Arc::new(quinn::TokioRuntime),
    )?)
}

/// Deliveries per second of `n` messages of 128 B, one sender to one
/// receiver through a forwarding-only quinn relay.
pub(crate) async fn floor_rate(identity: &Identity, n: usize) -> Result<f64> {
    let tls = identity.server_config(&[ALPN])?;
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));
    server_cfg.transport_config(transport());
    let server = endpoint(Some(server_cfg))?;
    let addr = server.local_addr()?;
    let ctls = Trust::Fingerprint(identity.fingerprint()).rustls_config(&[ALPN])?;
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(ctls)?,
    ));
    client_cfg.transport_config(transport());

    // The forwarder: the receiver's connection first, then the sender's.
    let fwd = {
        let server = server.clone();
        tokio::spawn(async move {
            let rconn = server.accept().await.context("no receiver")?.await?;
            let (mut to_receiver, _) = rconn.accept_bi().await?;
            let sconn = server.accept().await.context("no sender")?.await?;
            let (_, mut from_sender) = sconn.accept_bi().await?;
            let (hop, mut hop_rx) = tokio::sync::mpsc::channel::<Bytes>(HOP_QUEUE);
            let writer = tokio::spawn(async move {
                while let Some(b) = hop_rx.recv().await {
                    to_receiver.write_all(&b).await?;
                }
                // The receiver stops reading once it counted them all.
                let _ = to_receiver.finish();
                anyhow::Ok(())
            });
            let mut buf = BytesMut::with_capacity(64 << 10);
            loop {
                match from_sender.read_chunk(64 << 10, true).await? {
                    None => break,
                    Some(c) => buf.extend_from_slice(&c.bytes),
                }
                // Walk the complete frames; hand them on in one piece.
                let mut at = 0;
                while buf.len() >= at + 2 {
                    let len = u16::from_be_bytes([buf[at], buf[at + 1]]) as usize;
                    if buf.len() < at + 2 + len {
                        break;
                    }
                    at += 2 + len;
                }
                if at > 0 && hop.send(buf.split_to(at).freeze()).await.is_err() {
                    break;
                }
            }
            drop(hop);
            writer.await??;
            sconn.close(0u32.into(), b"done");
            anyhow::Ok(())
        })
    };

    let mut rx_ep = endpoint(None)?;
    rx_ep.set_default_client_config(client_cfg.clone());
    let rconn = rx_ep.connect(addr, "localhost")?.await?;
    let (mut hello, mut from_relay) = rconn.open_bi().await?;
    // A stream exists for the peer once it carries a byte.
    hello.write_all(&[0]).await?;
    let receiver = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 << 10);
        let mut got = 0usize;
        while got < n {
            let Some(c) = from_relay.read_chunk(64 << 10, true).await? else {
                break;
            };
            buf.extend_from_slice(&c.bytes);
            while buf.len() >= 2 {
                let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
                if buf.len() < 2 + len {
                    break;
                }
                buf.advance(2 + len);
                got += 1;
            }
        }
        drop(hello);
        anyhow::Ok(got)
    });

    let mut tx_ep = endpoint(None)?;
    tx_ep.set_default_client_config(client_cfg);
    let sconn = tx_ep.connect(addr, "localhost")?.await?;
    let (mut to_relay, _) = sconn.open_bi().await?;
    let mut frame = Vec::with_capacity(2 + BODY);
    frame.extend_from_slice(&(BODY as u16).to_be_bytes());
    frame.extend_from_slice(&[0x42; BODY]);
    let mut batch = Vec::with_capacity(BATCH * frame.len());
    let t = Instant::now();
    let mut sent = 0;
    while sent < n {
        batch.clear();
        let k = BATCH.min(n - sent);
        for _ in 0..k {
            batch.extend_from_slice(&frame);
        }
        to_relay.write_all(&batch).await?;
        sent += k;
    }
    let got = tokio::time::timeout(Duration::from_secs(60), receiver)
        .await
        .context("the floor's deliveries stalled")???;
    let took = t.elapsed();
    ensure!(
        got == n,
        "floor: the receiver counted {got} of {n} messages"
    );
    to_relay.finish()?;
    tokio::time::timeout(Duration::from_secs(10), fwd)
        .await
        .context("the floor's forwarder did not end")???;
    rconn.close(0u32.into(), b"done");
    sconn.close(0u32.into(), b"done");
    server.close(0u32.into(), b"done");
    tx_ep.wait_idle().await;
    rx_ep.wait_idle().await;
    Ok(n as f64 / took.as_secs_f64())
}
