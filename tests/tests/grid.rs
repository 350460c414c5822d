//! Past `--full-mesh-max`: nine relays with `full_mesh_max = 4` link as a
//! 3×3 grid (each relay to its column and one partner per other column,
//! not to all eight others) and everything that crosses the mesh — calls
//! between relays, messages in order, a 64 MiB stream, status watches,
//! HTTP at a third relay — takes two hops where there is no link, detours
//! when the relay in the middle dies, and keeps going while the mesh grows
//! past the threshold and shrinks back.

use anyhow::{Context, Result};
use std::collections::BTreeSet;
use std::time::Duration;
use swb_ring::{Grid, Ring};
use swb_tests::{converge, eventually, mesh_key, mesh_relay_max, TestDaemon, TestRelay, WAIT};

const IDS: [&str; 9] = ["g1", "g2", "g3", "g4", "g5", "g6", "g7", "g8", "g9"];
/// Full mesh up to four relays: nine make a 3×3 grid.
const FULL_MESH_MAX: usize = 4;

/// The grid's links of each of `ids` (sorted, as the ring sorts them).
fn grid_links(ids: &[&str]) -> Vec<BTreeSet<String>> {
    let ring = Ring::new(ids.iter().copied());
    let grid = Grid::new(&ring);
    (0..ids.len() as u32)
        .map(|i| {
            grid.links(i)
                .into_iter()
                .map(|j| ids[j as usize].to_string())
                .collect()
        })
        .collect()
}

/// Shares `relays[0]`'s keys file with the others.
fn share_keys(relays: &[TestRelay]) -> Result<()> {
    for r in &relays[1..] {
        std::fs::copy(relays[0].keys_path(), r.keys_path())?;
        r.handle().reload_keys()?;
    }
    Ok(())
}

/// Waits until every relay of `relays` (ids `ids`) but those at `skip`
/// has exactly its grid links up: unused links outside the grid are closed.
async fn wait_grid(relays: &[TestRelay], ids: &[&str], skip: &[usize]) -> Result<()> {
    let want = grid_links(ids);
    for (i, (r, w)) in relays.iter().zip(&want).enumerate() {
        if skip.contains(&i) {
            continue;
        }
        eventually("only the grid's links", WAIT, || async {
            let got: BTreeSet<String> = r.handle().mesh_links().into_iter().collect();
            Ok((got == *w).then_some(()))
        })
        .await
        .with_context(|| format!("links now: {:?}, grid: {w:?}", r.handle().mesh_links()))?;
    }
    Ok(())
}

/// Waits until every ordered pair's calls take the grid's path: one hop
/// when linked, else two through a relay linked to both — once the gossip
/// of the links closed while thinning to the grid has reached everyone
/// (until then a relay may still name a neighbour that heard the target
/// over a link now gone). How many pairs take two hops.
async fn grid_paths(relays: &[TestRelay], links: &[BTreeSet<String>]) -> Result<usize> {
    let last = std::sync::Mutex::new(String::new());
    eventually("every pair on its grid path", WAIT, || async {
        let mut two_hops = 0;
        for (i, r) in relays.iter().enumerate() {
            for (j, to) in IDS.iter().enumerate() {
                if i == j {
                    continue;
                }
                let path = r
                    .handle()
                    .mesh_probe(to)
                    .await
                    .map_err(|e| anyhow::anyhow!("{} → {to}: {e}", IDS[i]))?;
                let ok = path.last().map(String::as_str) == Some(*to)
                    && if links[i].contains(*to) {
                        path.len() == 1
                    } else {
                        two_hops += 1;
                        path.len() == 2
                            && links[i].contains(&path[0])
                            && links[IDS.iter().position(|x| *x == path[0]).context("id")?]
                                .contains(*to)
                    };
                if !ok {
                    *last.lock().expect("lock") = format!("{} → {to}: {path:?}", IDS[i]);
                    return Ok(None);
                }
            }
        }
        Ok(Some(two_hops))
    })
    .await
    .with_context(|| format!("last off the grid: {}", last.lock().expect("lock")))
}

/// Nine relays seeded with the first, converged on the full live set, and
/// thinned to the grid; an API key of `acme` they all accept.
async fn grid9(c: char) -> Result<(Vec<TestRelay>, String)> {
    let k = mesh_key(c);
    let mut relays: Vec<TestRelay> = Vec::new();
    for id in IDS {
        let seeds: Vec<&TestRelay> = relays.first().into_iter().collect();
        relays.push(mesh_relay_max(id, &k, &seeds, FULL_MESH_MAX).await?);
    }
    for r in &relays {
        converge(r, &IDS).await?;
    }
    let api = relays[0].create_key("acme")?;
    share_keys(&relays)?;
    wait_grid(&relays, &IDS, &[]).await?;
    grid_paths(&relays, &grid_links(&IDS)).await?;
    Ok((relays, api))
}

/// A pair of relays of the grid with no link between them, and a third
/// linked to neither (by index into [`IDS`]).
fn unlinked_pair() -> (usize, usize, usize) {
    let links = grid_links(&IDS);
    for (a, linked) in links.iter().enumerate() {
        for (b, id) in IDS.iter().enumerate() {
            if a == b || linked.contains(*id) {
                continue;
            }
            if let Some(c) = (0..IDS.len()).find(|&c| c != a && c != b) {
                return (a, b, c);
            }
        }
    }
    unreachable!("a 3×3 grid leaves pairs unlinked")
}

/// The relay (index into [`IDS`]) that `relays[a]`'s calls to `b` pass
/// through now.
async fn middle_of(relays: &[TestRelay], a: usize, b: usize) -> Result<usize> {
    let path = relays[a]
        .handle()
        .mesh_probe(IDS[b])
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(path.len() == 2, "{} → {}: {path:?}", IDS[a], IDS[b]);
    IDS.iter()
        .position(|id| *id == path[0])
        .context("the relay in the middle")
}

#[tokio::test]
async fn nine_relays_past_full_mesh_max_link_as_a_grid_and_every_pair_reaches_every_other(
) -> Result<()> {
    let (relays, _api) = grid9('p').await?;
    let links = grid_links(&IDS);
    for (i, l) in links.iter().enumerate() {
        // 2√N bounds the links; a full mesh would be 8.
        assert!(l.len() <= 6, "{}: {l:?}", IDS[i]);
    }
    let two_hops = grid_paths(&relays, &links).await?;
    eprintln!("72 ordered pairs reached, {two_hops} of them in two hops");
    assert!(two_hops > 0);
    Ok(())
}

#[tokio::test]
async fn peers_on_unlinked_relays_exchange_messages_streams_status_and_http_in_two_hops(
) -> Result<()> {
    use serde_json::json;
    let (relays, api) = grid9('q').await?;
    let (a, b, c) = unlinked_pair();
    let alice_name = swb_tests::name_homed_on(&IDS, "acme", IDS[a]);
    let bob_name = swb_tests::name_homed_on(&IDS, "acme", IDS[b]);
    let hs = swb_tests::HashServer::start().await?;
    let addr = hs.addr;
    let alice = TestDaemon::start(&relays[a], &api, &alice_name).await?;
    let bob = TestDaemon::start_with(&relays[b], &api, &bob_name, |c| {
        c.expose = vec![swb_daemon::Exposure {
            port: 9000,
            target: addr.to_string(),
        }]
    })
    .await?;
    let before = relays[a].handle().metrics_text();
    // Messages, in order, both ways.
    for i in 0..100 {
        alice.send(&bob_name, format!("m{i}").as_bytes()).await?;
    }
    let bodies: Vec<Vec<u8>> = bob.recv_n(100).await?.iter().map(|m| m.body()).collect();
    let want: Vec<Vec<u8>> = (0..100).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(bodies, want, "order kept across two hops");
    bob.send(&alice_name, b"and back").await?;
    assert_eq!(alice.recv_n(1).await?[0].body(), b"and back");
    let after = relays[a].handle().metrics_text();
    let two_hop = |t: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix("swb_relay_mesh_two_hop_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        two_hop(&after) >= two_hop(&before) + 100,
        "alice's relay sent through another relay"
    );
    // A 64 MiB stream, checksummed.
    let s = alice.open_stream(&bob_name, 9000).await?;
    let (sent, back) = swb_tests::send_and_collect(s, 18, 64 << 20).await?;
    assert_eq!(sent, back, "64 MiB across two hops");
    // Alice watches bob's status.
    let mut w = alice.client().await?;
    w.watch(vec![bob_name.clone()], Duration::from_secs(5))
        .await?;
    let mut bc = bob.client().await?;
    bc.set_status(
        [("stage".to_string(), "two".to_string())].into(),
        vec![],
        WAIT,
    )
    .await?;
    loop {
        let u = tokio::time::timeout(WAIT, w.next_update())
            .await??
            .context("watch ended")?;
        if u.online && u.status.get("stage").map(String::as_str) == Some("two") {
            break;
        }
    }
    // HTTP at a third relay: send to bob, read bob's status.
    let via = relays[c].http(Some(&api))?;
    let script = swb_tests::name_homed_on(&IDS, "acme", IDS[c]);
    let r = via
        .post(
            "/v1/messages",
            &json!({"from": script, "to": bob_name, "body": "over http"}),
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.json);
    assert_eq!(bob.recv_n(1).await?[0].body(), b"over http");
    let r = via.get(&format!("/v1/status/{bob_name}")).await?;
    assert_eq!(r.json["status"]["stage"], "two", "{}", r.json);
    Ok(())
}

#[tokio::test]
async fn tun_packets_between_unlinked_relays_take_two_hops() -> Result<()> {
    let (relays, api) = grid9('t').await?;
    let (a, b, _) = unlinked_pair();
    let middle = middle_of(&relays, a, b).await?;
    let alpha = swb_tests::name_homed_on(&IDS, "acme", IDS[a]);
    let beta = swb_tests::name_homed_on(&IDS, "acme", IDS[b]);
    let (x, xa) = swb_tests::tun_join(&relays[a], &api, &alpha).await?;
    let (y, ya) = swb_tests::tun_join(&relays[b], &api, &beta).await?;
    let (x4, y4) = (swb_tests::tun_v4(&xa), swb_tests::tun_v4(&ya));
    let via = |r: &TestRelay| {
        swb_tests::metric(&r.handle().metrics_text(), "swb_relay_mesh_via_total").unwrap_or(0)
    };
    let before = via(&relays[middle]);
    // Datagrams may be lost: send until one arrives each way.
    for (from, to, src, dst) in [(&x, &y, x4, y4), (&y, &x, y4, x4)] {
        let p = swb_tunnel::build::udp(src, dst, 4000, 5000, b"two hops").context("udp")?;
        let got = eventually("a packet across two hops", WAIT, || async {
            from.conn.send_datagram(p.clone().into())?;
            match tokio::time::timeout(Duration::from_millis(200), to.conn.read_datagram()).await {
                Ok(d) => Ok(Some(d?)),
                Err(_) => Ok(None),
            }
        })
        .await?;
        assert_eq!(&got[..], &p[..]);
    }
    assert!(
        via(&relays[middle]) > before,
        "{} passed the packets on",
        IDS[middle]
    );
    Ok(())
}

#[tokio::test]
async fn when_the_relay_in_the_middle_dies_traffic_detours() -> Result<()> {
    let (mut relays, api) = grid9('r').await?;
    let (a, b, _) = unlinked_pair();
    let middle = middle_of(&relays, a, b).await?;
    let alice_name = swb_tests::name_homed_on(&IDS, "acme", IDS[a]);
    let bob_name = swb_tests::name_homed_on(&IDS, "acme", IDS[b]);
    let alice = TestDaemon::start(&relays[a], &api, &alice_name).await?;
    let bob = TestDaemon::start(&relays[b], &api, &bob_name).await?;
    for i in 0..20 {
        alice.send(&bob_name, format!("m{i}").as_bytes()).await?;
    }
    // The middle relay dies without a goodbye or a mail handoff.
    let t = std::time::Instant::now();
    relays[middle].kill();
    let rest: Vec<&str> = IDS
        .iter()
        .copied()
        .filter(|id| *id != IDS[middle])
        .collect();
    converge(&relays[a], &rest).await?;
    let path = eventually("another path", WAIT, || async {
        Ok(relays[a].handle().mesh_probe(IDS[b]).await.ok())
    })
    .await?;
    let took = t.elapsed();
    eprintln!("{} → {}: detour {path:?} after {took:?}", IDS[a], IDS[b]);
    assert!(!path.contains(&IDS[middle].to_string()));
    assert!(
        took < swb_relay::mesh::MESH_IDLE + Duration::from_secs(5),
        "detour took {took:?}"
    );
    for i in 20..40 {
        alice.send(&bob_name, format!("m{i}").as_bytes()).await?;
    }
    let bodies: Vec<Vec<u8>> = bob.recv_n(40).await?.iter().map(|m| m.body()).collect();
    let want: Vec<Vec<u8>> = (0..40).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(bodies, want, "nothing lost, order kept");
    Ok(())
}

#[tokio::test]
async fn a_mesh_growing_past_full_mesh_max_and_shrinking_back_loses_nothing() -> Result<()> {
    let k = mesh_key('s');
    let mut relays: Vec<TestRelay> = Vec::new();
    for id in &IDS[..4] {
        let seeds: Vec<&TestRelay> = relays.first().into_iter().collect();
        relays.push(mesh_relay_max(id, &k, &seeds, FULL_MESH_MAX).await?);
    }
    for r in &relays {
        converge(r, &IDS[..4]).await?;
    }
    let api = relays[0].create_key("acme")?;
    share_keys(&relays)?;
    // Homed on g1 and g2 with four relays and with nine (the ring moves
    // only names to the relays that join), so only the mesh changes
    // under them; g1 and g2 are not linked in the 3×3 grid.
    let alice_name = swb_tests::name_homed_on(&IDS, "acme", "g1");
    let bob_name = swb_tests::name_homed_on(&IDS, "acme", "g2");
    let four = Ring::new(IDS[..4].iter().copied());
    assert_eq!(four.home("acme", &alice_name), Some("g1"));
    assert_eq!(four.home("acme", &bob_name), Some("g2"));
    assert!(!grid_links(&IDS)[0].contains("g2"));
    let hs = swb_tests::HashServer::start().await?;
    let addr = hs.addr;
    let alice = TestDaemon::start(&relays[0], &api, &alice_name).await?;
    let bob = TestDaemon::start_with(&relays[1], &api, &bob_name, |c| {
        c.expose = vec![swb_daemon::Exposure {
            port: 9000,
            target: addr.to_string(),
        }]
    })
    .await?;
    // A stream open all along, a chunk every 20 ms, checksummed at the end.
    let (stream_stop_tx, mut stream_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stream = alice.open_stream(&bob_name, 9000).await?;
    let streamer = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut n = 0u64;
        while stream_stop_rx.try_recv().is_err() {
            let chunk = swb_tests::pattern(n, 16 * 1024);
            ctx.update(&chunk);
            wr.write_all(&chunk).await?;
            n += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wr.shutdown().await?;
        let mut back = Vec::new();
        rd.read_to_end(&mut back).await?;
        anyhow::ensure!(
            back == ctx.finish().as_ref(),
            "the stream's checksum differs"
        );
        Ok::<u64, anyhow::Error>(n * 16 * 1024)
    });
    // Alice sends all along; every accepted message must arrive.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sender = {
        let ctl = alice.handle.control_path().to_path_buf();
        let bob = bob_name.clone();
        tokio::spawn(async move {
            let mut sent = 0u32;
            loop {
                if stop_rx.try_recv().is_ok() {
                    return Ok::<u32, anyhow::Error>(sent);
                }
                let mut c = swb_daemon::control::Client::connect(&ctl).await?;
                c.send(&bob, format!("m{sent}").as_bytes(), WAIT)
                    .await
                    .with_context(|| format!("send m{sent}"))?;
                sent += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Grow to nine: past the threshold, the grid.
    for id in &IDS[4..] {
        relays.push(mesh_relay_max(id, &k, &[&relays[0]], FULL_MESH_MAX).await?);
    }
    share_keys(&relays)?;
    for r in &relays {
        converge(r, &IDS).await?;
    }
    // Every link outside the grid closes, but g1–g2, which the open
    // stream still uses.
    wait_grid(&relays, &IDS, &[0, 1]).await?;
    assert!(
        relays[0].handle().mesh_links().contains(&"g2".to_string()),
        "a link with a stream on it stays up"
    );
    // Shrink back to four: a full mesh again.
    for r in &mut relays[4..] {
        r.stop().await;
    }
    for r in &relays[..4] {
        converge(r, &IDS[..4]).await?;
    }
    for r in &relays[..4] {
        eventually("a full mesh again", WAIT, || async {
            Ok((r.handle().mesh_links().len() == 3).then_some(()))
        })
        .await?;
    }
    let _ = stream_stop_tx.send(());
    let streamed = streamer.await??;
    let _ = stop_tx.send(());
    let sent = sender.await??;
    let got = bob.recv_n(sent as usize).await?;
    let mut seen = BTreeSet::new();
    for m in &got {
        assert!(seen.insert(m.body()), "a duplicate");
    }
    let want: Vec<Vec<u8>> = (0..sent).map(|i| format!("m{i}").into_bytes()).collect();
    let bodies: Vec<Vec<u8>> = got.iter().map(|m| m.body()).collect();
    assert_eq!(
        bodies, want,
        "every accepted message arrived once, in order"
    );
    eprintln!(
        "while the mesh grew 4 → 9 → 4: {sent} messages sent, all arrived in order; a stream carried {streamed} bytes intact"
    );
    Ok(())
}
