//! The floor of the `rate` and `latency` scenarios: what a relay built on
//! the same stack
//! (quinn, rustls, tokio, one task per connection) does when it does
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

/// The forwarder's endpoint, its address, and the clients' configuration.
fn setup(
    identity: &Identity,
) -> Result<(quinn::Endpoint, std::net::SocketAddr, quinn::ClientConfig)> {
    let tls = identity.server_config(&[ALPN])?;
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));
    server_cfg.transport_config(transport());
    let server = endpoint(Some(server_cfg))?;
    let addr = server.local_addr()?;
    Ok((server, addr, client_config(&identity.fingerprint())?))
}

/// The clients' configuration for a forwarder of certificate `fingerprint`.
fn client_config(fingerprint: &str) -> Result<quinn::ClientConfig> {
    let ctls = Trust::Fingerprint(fingerprint.to_string()).rustls_config(&[ALPN])?;
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(ctls)?,
    ));
    client_cfg.transport_config(transport());
    Ok(client_cfg)
}

/// `swbd-bench floor-process`: the floor's forwarder in a process of its
/// own, as the relay runs in `relay-process` (the same runtime). Prints its
/// address and fingerprint, then forwards one pair of clients after another
/// (each [`floor_latency`] run is a pair) until killed or interrupted.
pub(crate) async fn floor_process_main() -> Result<()> {
    let identity = Identity::ephemeral()?;
    let (server, addr, _) = setup(&identity)?;
    println!("listening {addr} {}", identity.fingerprint());
    // The endpoint is never closed here, so each turn waits for a new
    // pair: an error cannot make this spin.
    let serve = async {
        loop {
            if let Err(e) = forwarder(server.clone()).await {
                // A pair that went wrong (a bench killed mid-run) is no
                // reason to stop serving the next.
                tracing::warn!("floor: a pair ended with an error: {e:#}");
            }
        }
    };
    tokio::select! {
        () = serve => Ok(()),
        r = tokio::signal::ctrl_c() => Ok(r?),
    }
}

/// Deliveries per second of `n` messages of 128 B, one sender to one
/// receiver through a forwarding-only quinn relay.
pub(crate) async fn floor_rate(identity: &Identity, n: usize) -> Result<f64> {
    let (server, addr, client_cfg) = setup(identity)?;
    // The forwarder: the receiver's connection first, then the sender's.
    let fwd = tokio::spawn(forwarder(server.clone()));
    let (rx_ep, rconn, hello, mut from_relay) = client(addr, &client_cfg, true).await?;
    let receiver = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 << 10);
        let mut got = 0usize;
        while got < n {
            let Some(c) = from_relay.read_chunk(64 << 10, true).await? else {
                break;
            };
            buf.extend_from_slice(&c.bytes);
            let at = complete_frames(&buf);
            got += frames(&buf[..at]).count();
            buf.advance(at);
        }
        drop(hello);
        anyhow::Ok(got)
    });

    let (tx_ep, sconn, mut to_relay, _) = client(addr, &client_cfg, false).await?;
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

/// The forwarder: accepts the far end's connection (its stream opens with
/// an empty frame), then the near end's, and pumps frames both ways until
/// both ends finish their streams.
async fn forwarder(server: quinn::Endpoint) -> Result<()> {
    let far = server.accept().await.context("no far end")?.await?;
    let (far_send, mut far_recv) = far.accept_bi().await?;
    let mut hello = [0u8; 2];
    far_recv.read_exact(&mut hello).await?;
    let near = server.accept().await.context("no near end")?.await?;
    let (near_send, near_recv) = near.accept_bi().await?;
    let (a, b) = tokio::join!(pump(near_recv, far_send), pump(far_recv, near_send));
    a?;
    b?;
    near.close(0u32.into(), b"done");
    far.close(0u32.into(), b"done");
    Ok(())
}

/// Reads frames from `from` and hands each read's complete frames, in one
/// piece, to a task writing them to `to` (a hop between two sessions).
async fn pump(mut from: quinn::RecvStream, mut to: quinn::SendStream) -> Result<()> {
    let (hop, mut hop_rx) = tokio::sync::mpsc::channel::<Bytes>(HOP_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(b) = hop_rx.recv().await {
            to.write_all(&b).await?;
        }
        // The far end may have stopped reading once it had what it wanted.
        let _ = to.finish();
        anyhow::Ok(())
    });
    let mut buf = BytesMut::with_capacity(64 << 10);
    loop {
        match from.read_chunk(64 << 10, true).await? {
            None => break,
            Some(c) => buf.extend_from_slice(&c.bytes),
        }
        let at = complete_frames(&buf);
        if at > 0 && hop.send(buf.split_to(at).freeze()).await.is_err() {
            break;
        }
    }
    drop(hop);
    writer.await?
}

/// How many leading bytes of `buf` are complete length-prefixed frames.
fn complete_frames(buf: &[u8]) -> usize {
    let mut at = 0;
    while buf.len() >= at + 2 {
        let len = u16::from_be_bytes([buf[at], buf[at + 1]]) as usize;
        if buf.len() < at + 2 + len {
            break;
        }
        at += 2 + len;
    }
    at
}

/// The bodies of the complete frames `region` holds (see [`complete_frames`]).
fn frames(mut region: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let len = u16::from_be_bytes([*region.first()?, *region.get(1)?]) as usize;
        let body = region.get(2..2 + len)?;
        region = &region[2 + len..];
        Some(body)
    })
}

/// A client endpoint connected to the forwarder, with its stream; the far
/// end announces its stream with an empty frame (a stream exists for the
/// peer once it carries a byte).
async fn client(
    addr: std::net::SocketAddr,
    cfg: &quinn::ClientConfig,
    far: bool,
) -> Result<(
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
)> {
    let mut ep = endpoint(None)?;
    ep.set_default_client_config(cfg.clone());
    let conn = ep.connect(addr, "localhost")?.await?;
    let (mut send, recv) = conn.open_bi().await?;
    if far {
        send.write_all(&[0, 0]).await?;
    }
    Ok((ep, conn, send, recv))
}

/// Where [`floor_latency`] forwards through.
pub(crate) enum Floor<'a> {
    /// A forwarder in this process, made for the run.
    Here(&'a Identity),
    /// The forwarder of a `floor-process` (its address and fingerprint):
    /// in a process of its own, as the relay process is.
    Process(std::net::SocketAddr, &'a str),
}

/// Request → reply round trips of `size` bytes through a forwarding-only
/// quinn relay, `inflight` at a time: the requester writes a request, the
/// responder reads it and writes it back as the reply. `n` round trips.
pub(crate) async fn floor_latency(
    floor: Floor<'_>,
    n: usize,
    size: usize,
    inflight: usize,
) -> Result<Vec<Duration>> {
    let size = size.clamp(8, u16::MAX as usize);
    let (server, addr, client_cfg) = match floor {
        Floor::Here(identity) => {
            let (server, addr, client_cfg) = setup(identity)?;
            (Some(server), addr, client_cfg)
        }
        Floor::Process(addr, fingerprint) => (None, addr, client_config(fingerprint)?),
    };
    let fwd = server.clone().map(|s| tokio::spawn(forwarder(s)));
    let (resp_ep, rconn, mut to_fwd, mut from_fwd) = client(addr, &client_cfg, true).await?;
    // The responder echoes every complete frame it reads, as it reads it.
    let responder = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 << 10);
        while let Some(c) = from_fwd.read_chunk(64 << 10, true).await? {
            buf.extend_from_slice(&c.bytes);
            let at = complete_frames(&buf);
            if at > 0 {
                to_fwd.write_all(&buf.split_to(at)).await?;
            }
        }
        let _ = to_fwd.finish();
        anyhow::Ok(())
    });
    let (req_ep, qconn, mut send, mut recv) = client(addr, &client_cfg, false).await?;
    // The requester is a task of its own, as the responder is.
    let requester = tokio::spawn(async move {
        let request = |seq: u64| {
            let mut f = Vec::with_capacity(2 + size);
            f.extend_from_slice(&(size as u16).to_be_bytes());
            f.extend_from_slice(&seq.to_be_bytes());
            f.resize(2 + size, 0x42);
            f
        };
        let mut sent_at = std::collections::HashMap::new();
        let mut times = Vec::with_capacity(n);
        let mut next = 0u64;
        let mut out = Vec::new();
        while (next as usize) < n.min(inflight) {
            sent_at.insert(next, Instant::now());
            out.extend_from_slice(&request(next));
            next += 1;
        }
        send.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(64 << 10);
        while times.len() < n {
            let c = tokio::time::timeout(Duration::from_secs(30), recv.read_chunk(64 << 10, true))
                .await
                .context("no reply from the floor within 30 s")??
                .context("the floor's forwarder closed the stream")?;
            buf.extend_from_slice(&c.bytes);
            out.clear();
            let replies = buf.split_to(complete_frames(&buf));
            for body in frames(&replies) {
                let seq = u64::from_be_bytes(body[..8].try_into().context("short reply")?);
                if let Some(t) = sent_at.remove(&seq) {
                    times.push(t.elapsed());
                }
                if (next as usize) < n {
                    sent_at.insert(next, Instant::now());
                    out.extend_from_slice(&request(next));
                    next += 1;
                }
            }
            if !out.is_empty() {
                send.write_all(&out).await?;
            }
        }
        anyhow::Ok((times, send))
    });
    let (times, mut send) = requester.await??;
    send.finish()?;
    tokio::time::timeout(Duration::from_secs(10), async {
        responder.await??;
        match fwd {
            Some(f) => f.await?,
            None => Ok(()),
        }
    })
    .await
    .context("the floor's forwarder did not end")??;
    qconn.close(0u32.into(), b"done");
    rconn.close(0u32.into(), b"done");
    if let Some(server) = server {
        server.close(0u32.into(), b"done");
    }
    req_ep.wait_idle().await;
    resp_ep.wait_idle().await;
    ensure!(times.len() == n, "floor: {} of {n} replies", times.len());
    Ok(times)
}
