//! A QUIC connection holds no state for the streams its peer may open
//! until the peer opens them — the patched quinn-proto's item 18
//! (`vendor/quinn-proto/SWITCHBOARD.md`). Upstream made an entry in two
//! hash maps for every permitted stream at the handshake: a mesh link
//! permits 4 096 (`MESH_STREAMS`), about 350 KiB at each end of every link
//! before a byte moved, so a relay of a 1 000-relay mesh held about a third
//! of a gigabyte for streams nobody opened. And the streams still work:
//! named out of order, first by a reset or a STOP_SENDING, and many more
//! over a connection's life than may be open at once.

use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Duration;

/// The tests of this file one at a time: the first reads the process's
/// resident memory, which the other's connections would move.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Resident bytes of this process.
fn resident() -> Result<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: i64 = statm.split_whitespace().nth(1).context("statm")?.parse()?;
    Ok(pages * 4096)
}

const ALPN: &[u8] = b"stream-slots";
const WAIT: Duration = Duration::from_secs(30);

fn transport(streams: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(streams.into());
    t.max_concurrent_uni_streams(streams.into());
    Arc::new(t)
}

/// Resident bytes after `n` connections are up (both ends in this
/// process), less before, per connection; each connection has carried one
/// stream.
async fn per_connection(streams: u32, n: usize) -> Result<f64> {
    let (server, client) = swb_tests::quinn_pair(ALPN, Some(transport(streams)))?;
    let addr = server.local_addr()?;
    let before = resident()?;
    let accept = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..n {
            let conn = server.accept().await.context("no connection")?.await?;
            let (mut send, mut recv) = conn.accept_bi().await?;
            let got = recv.read_to_end(64).await?;
            send.write_all(&got).await?;
            send.finish()?;
            held.push(conn);
        }
        anyhow::Ok((server, held))
    });
    let mut conns = Vec::new();
    for _ in 0..n {
        let conn = tokio::time::timeout(WAIT, client.connect(addr, "localhost")?)
            .await
            .context("handshake timed out")??;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"ping").await?;
        send.finish()?;
        let echo = tokio::time::timeout(WAIT, recv.read_to_end(64))
            .await
            .context("no echo")??;
        anyhow::ensure!(echo == b"ping", "echoed {echo:?}");
        conns.push(conn);
    }
    let (server, held) = tokio::time::timeout(WAIT, accept)
        .await
        .context("the server did not take every connection")???;
    let after = resident()?;
    for c in conns.iter().chain(&held) {
        c.close(0u32.into(), b"done");
    }
    client.wait_idle().await;
    server.wait_idle().await;
    Ok((after - before) as f64 / n as f64)
}

#[tokio::test]
async fn a_connection_holds_no_state_for_streams_its_peer_has_not_opened() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    // The same connections, permitting 4 096 streams each way or 8. One
    // warm-up first: the runtime's and endpoints' first allocations.
    per_connection(8, 2).await?;
    let few = per_connection(8, 16).await?;
    let many = per_connection(4096, 16).await?;
    println!(
        "resident bytes per connection (both ends): 8 streams {few:.0}, 4 096 streams {many:.0}"
    );
    // Up front, 4 096 bidirectional and 4 096 unidirectional streams were
    // hash-map entries of about 550 KiB at each end; a connection is some
    // tens of KiB without them, so the margin is wide both ways.
    assert!(
        many - few < 256.0 * 1024.0,
        "permitting 4 096 streams costs {:.0} KiB more per connection than 8",
        (many - few) / 1024.0
    );
    Ok(())
}

/// What the server saw on one accepted stream.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    Data(Vec<u8>),
    Reset(u64),
    Stopped(u64),
}

#[tokio::test]
async fn streams_named_out_of_order_by_resets_and_stops_all_arrive() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    const LIMIT: u32 = 16;
    const ROUNDS: usize = 5;
    let (server, client) = swb_tests::quinn_pair(ALPN, Some(transport(LIMIT)))?;
    let addr = server.local_addr()?;
    let serve = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let mut seen = Vec::new();
        for _ in 0..ROUNDS * LIMIT as usize {
            let (mut send, mut recv) = conn.accept_bi().await?;
            let id = recv.id().index();
            let what = match recv.read_to_end(64).await {
                Ok(b) if !b.is_empty() => {
                    send.write_all(&b).await?;
                    send.finish()?;
                    Seen::Data(b)
                }
                Ok(_) => {
                    let code = send.stopped().await?.context("finished, not stopped")?;
                    send.reset(0u32.into())?;
                    Seen::Stopped(code.into_inner())
                }
                Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
                    send.finish()?;
                    Seen::Reset(code.into_inner())
                }
                Err(e) => return Err(e.into()),
            };
            seen.push((id, what));
        }
        anyhow::Ok((seen, conn))
    });
    let conn = tokio::time::timeout(WAIT, client.connect(addr, "localhost")?)
        .await
        .context("handshake timed out")??;
    // Each round opens as many streams as may be open at once and names
    // them to the server highest first: the highest by a RESET_STREAM and
    // the next by a STOP_SENDING in even rounds, the other way round in odd
    // ones, the rest by data. Naming a stream makes the server's state for
    // every one below it, so each of the three frames is in turn the first
    // to name a stream. The rounds after the first run on the room the
    // closed streams made.
    let mut want = Vec::new();
    for round in 0..ROUNDS {
        let mut opened = Vec::new();
        for _ in 0..LIMIT {
            let s = tokio::time::timeout(WAIT, conn.open_bi())
                .await
                .context("no room for another stream")??;
            opened.push(s);
        }
        let (reset_at, stop_at) = match round % 2 {
            0 => (LIMIT as usize - 1, LIMIT as usize - 2),
            _ => (LIMIT as usize - 2, LIMIT as usize - 1),
        };
        let mut ends = Vec::new();
        for (i, (mut send, mut recv)) in opened.into_iter().enumerate().rev() {
            let id = send.id().index();
            let body = format!("round {round} stream {id}").into_bytes();
            let echo = if i == reset_at {
                send.reset(7u32.into())?;
                want.push((id, Seen::Reset(7)));
                Vec::new()
            } else if i == stop_at {
                recv.stop(9u32.into())?;
                send.finish()?;
                want.push((id, Seen::Stopped(9)));
                ends.push(tokio::spawn(async move {
                    // The server reset its half once it saw the stop.
                    let _ = send.stopped().await;
                    anyhow::Ok(())
                }));
                continue;
            } else {
                send.write_all(&body).await?;
                send.finish()?;
                want.push((id, Seen::Data(body.clone())));
                body
            };
            ends.push(tokio::spawn(async move {
                let got = recv.read_to_end(64).await?;
                anyhow::ensure!(got == echo, "stream {id} echoed {got:?}");
                anyhow::Ok(())
            }));
        }
        for e in ends {
            tokio::time::timeout(WAIT, e)
                .await
                .context("no answer")???;
        }
    }
    let (mut seen, server_conn) = tokio::time::timeout(WAIT, serve)
        .await
        .context("the server did not see every stream")???;
    conn.close(0u32.into(), b"done");
    drop(server_conn);
    seen.sort();
    want.sort();
    assert_eq!(seen.len(), ROUNDS * LIMIT as usize);
    assert_eq!(seen, want);
    Ok(())
}
