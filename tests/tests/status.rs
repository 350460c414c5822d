//! Status and presence: set-status, get-status, watch, peers — over QUIC
//! (through daemons) and HTTP.

use anyhow::{Context, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use swb_daemon::control::StatusView;
use swb_daemon::{Client, ControlError};
use swb_tests::{TestDaemon, TestRelay, UdpCut, WAIT};

fn kv(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn watcher(d: &TestDaemon, names: &[&str]) -> Result<Client> {
    let mut c = d.client().await?;
    c.watch(
        names.iter().map(|s| s.to_string()).collect(),
        Duration::from_secs(5),
    )
    .await?;
    Ok(c)
}

async fn next(c: &mut Client) -> Result<StatusView> {
    tokio::time::timeout(WAIT, c.next_update())
        .await
        .context("no status update in time")??
        .context("the watch ended")
}

/// Reads updates until one satisfies `pred`.
async fn until(c: &mut Client, pred: impl Fn(&StatusView) -> bool) -> Result<StatusView> {
    loop {
        let s = next(c).await?;
        if pred(&s) {
            return Ok(s);
        }
    }
}

#[tokio::test]
async fn watch_shows_current_values_then_changes_in_order() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let london = TestDaemon::start(&relay, &key, "london").await?;
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;
    let mut lc = london.client().await?;
    let (v, published) = lc
        .set_status(kv(&[("load", "0.31"), ("build", "4711")]), vec![], WAIT)
        .await?;
    assert!(published);
    assert_eq!(v.status, kv(&[("load", "0.31"), ("build", "4711")]));

    let mut w = watcher(&laptop, &["london", "paris"]).await?;
    let first = next(&mut w).await?;
    assert_eq!((first.name.as_str(), first.online), ("london", true));
    assert_eq!(first.status["build"], "4711");
    let second = next(&mut w).await?;
    assert_eq!(
        (second.name.as_str(), second.version, second.online),
        ("paris", 0, false)
    );

    // Changes arrive in order, each with a higher version.
    let mut last = first.version;
    for i in 0..5 {
        lc.set_status(kv(&[("step", &i.to_string())]), vec![], WAIT)
            .await?;
        let s = until(&mut w, |s| {
            s.name == "london" && s.status.get("step").map(String::as_str) == Some(&*i.to_string())
        })
        .await?;
        assert!(s.version > last, "versions grow");
        last = s.version;
    }
    lc.set_status(BTreeMap::new(), vec!["build".into()], WAIT)
        .await?;
    let s = until(&mut w, |s| {
        s.name == "london" && !s.status.contains_key("build")
    })
    .await?;
    assert_eq!(s.status["load"], "0.31");

    // get-status and peers agree.
    let mut c = laptop.client().await?;
    let got = c
        .get_status(vec!["London.switchboard".into()], WAIT)
        .await?;
    assert_eq!(got[0].status, s.status);
    let peers = c.peers(WAIT).await?;
    let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, vec!["laptop", "london"]);
    Ok(())
}

#[tokio::test]
async fn presence_flips_on_attach_clean_detach_and_a_dead_daemon() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;
    let mut w = watcher(&laptop, &["london"]).await?;
    assert!(!next(&mut w).await?.online);

    // Attach → online; clean stop → offline at once.
    let london = TestDaemon::start(&relay, &key, "london").await?;
    until(&mut w, |s| s.online).await?;
    london.handle.shutdown();
    london.join().await??;
    let t = Instant::now();
    until(&mut w, |s| !s.online).await?;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "clean detach took {:?}",
        t.elapsed()
    );

    // A daemon whose packets stop (power loss, network gone): offline once
    // the QUIC idle timeout (here the test daemons' 3 s) runs out.
    let cut = UdpCut::start(relay.addr()).await?;
    let mut cfg = relay.daemon_config(&key, "london", std::path::PathBuf::new());
    cfg.relays = vec![cut.addr.to_string()];
    let london = TestDaemon::spawn(cfg).await?;
    london
        .handle
        .connected()
        .await
        .map_err(anyhow::Error::msg)?;
    until(&mut w, |s| s.online).await?;
    cut.cut();
    let t = Instant::now();
    until(&mut w, |s| !s.online).await?;
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(3 + 3),
        "dead daemon noticed after {took:?}"
    );
    eprintln!("dead daemon went offline after {took:?} (idle timeout 3 s)");
    Ok(())
}

#[tokio::test]
async fn watchers_get_every_change_kept_and_a_gap_is_always_marked_lagged() -> Result<()> {
    // Every change published at once, so the board's recent values are
    // what decides what a watcher sees.
    let relay = TestRelay::spawn_with(swb_tests::RelayOptions {
        status_interval: Duration::ZERO,
        ..Default::default()
    })
    .await?;
    let _key = relay.create_key("acme")?;
    let h = relay.handle();
    let mut fast = h
        .watch_status("acme", &["busy"])
        .map_err(anyhow::Error::msg)?;
    let mut stalled = h
        .watch_status("acme", &["busy"])
        .map_err(anyhow::Error::msg)?;
    assert_eq!(stalled.next().await.context("first")?.0.version, 0);
    assert_eq!(fast.next().await.context("first")?.0.version, 0);
    // 10 000 changes in bursts of 100; `stalled` reads nothing meanwhile,
    // `fast` reads as it can (a burst outruns it: it skips some).
    let publisher = async {
        for i in 0..10_000u32 {
            h.set_status("acme", "busy", vec![("n".into(), i.to_string())], vec![])
                .map_err(|r| anyhow::anyhow!("{r}"))?;
            if i % 100 == 99 {
                tokio::task::yield_now().await;
            }
        }
        anyhow::Ok(())
    };
    let keep_up = async {
        let (mut seen, mut last, mut gaps) = (0, 0u64, 0);
        loop {
            let (s, lagged) = fast.next().await.context("fast watcher ended")?;
            seen += 1;
            assert!(s.version > last, "versions only grow");
            // No change is skipped without the marker.
            if !lagged {
                assert_eq!(s.prev_version, last, "an unmarked gap after {last}");
            } else {
                gaps += 1;
            }
            last = s.version;
            if s.fields.get("n").map(String::as_str) == Some("9999") {
                return anyhow::Ok((seen, gaps));
            }
        }
    };
    let (p, fast_seen) =
        tokio::time::timeout(WAIT, async { tokio::join!(publisher, keep_up) }).await?;
    p?;
    let (fast_seen, gaps) = fast_seen?;
    eprintln!("the reading watcher saw {fast_seen} of 10 000 changes, {gaps} gaps marked");
    // The stalled watcher gets the changes still kept, oldest first: the
    // first marked lagged (it missed the ones before), then each in turn,
    // ending on the newest.
    let mut kept = Vec::new();
    loop {
        let (s, lagged) = tokio::time::timeout(WAIT, stalled.next())
            .await?
            .context("stalled watcher")?;
        kept.push((s.fields["n"].clone(), lagged));
        if s.fields["n"] == "9999" {
            break;
        }
    }
    let expected: Vec<_> = (10_000 - kept.len()..10_000)
        .map(|i| (i.to_string(), i == 10_000 - kept.len()))
        .collect();
    assert_eq!(
        kept, expected,
        "the kept changes in order, the first lagged"
    );
    assert_eq!(
        kept.len(),
        swb_relay::RECENT_CHANGES + 1,
        "the newest and the {} before it (small statuses)",
        swb_relay::RECENT_CHANGES
    );
    // And nothing else is queued for it.
    assert!(stalled.next_now().is_none());
    Ok(())
}

#[tokio::test]
async fn a_thousand_watchers_of_one_peer_all_see_the_final_value() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let london = TestDaemon::start(&relay, &key, "london").await?;
    // 4 daemons × 250 watch streams (under the 256 streams per peer).
    let mut daemons = Vec::new();
    for i in 0..4 {
        daemons.push(TestDaemon::start(&relay, &key, &format!("watcher{i}")).await?);
    }
    let mut watchers = Vec::new();
    for d in &daemons {
        for _ in 0..250 {
            let mut w = watcher(d, &["london"]).await?;
            next(&mut w).await?;
            watchers.push(w);
        }
    }
    let mut lc = london.client().await?;
    for i in 0..20 {
        lc.set_status(kv(&[("n", &i.to_string())]), vec![], WAIT)
            .await?;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for mut w in watchers {
        tasks.spawn(async move {
            until(&mut w, |s| {
                s.status.get("n").map(String::as_str) == Some("19")
            })
            .await
        });
    }
    let mut n = 0;
    while let Some(r) = tasks.join_next().await {
        r??;
        n += 1;
    }
    assert_eq!(n, 1000);
    Ok(())
}

#[tokio::test]
async fn status_survives_a_relay_restart_and_limits_are_enforced() -> Result<()> {
    let mut relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let london = TestDaemon::start(&relay, &key, "london").await?;
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;
    let mut lc = london.client().await?;
    lc.set_status(kv(&[("role", "db")]), vec![], WAIT).await?;
    relay.restart().await?;
    // The daemon republishes its status after reconnecting.
    swb_tests::eventually("london's status republished", WAIT, || async {
        let mut c = laptop.client().await?;
        Ok(
            match c
                .get_status(vec!["london".into()], Duration::from_secs(5))
                .await
            {
                Ok(s) => (s[0].status.get("role").map(String::as_str) == Some("db")).then_some(()),
                Err(_) => None,
            },
        )
    })
    .await?;
    // Limits: too large, too many keys, bad key — refused with codes.
    let big = "x".repeat(swb_wire::MAX_STATUS_BYTES);
    let code = |r: Result<(StatusView, bool), ControlError>| match r {
        Err(ControlError::Remote { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(
        code(lc.set_status(kv(&[("k", &big)]), vec![], WAIT).await),
        "status_too_large"
    );
    let many: BTreeMap<String, String> = (0..40).map(|i| (format!("k{i}"), "v".into())).collect();
    assert_eq!(
        code(lc.set_status(many, vec![], WAIT).await),
        "status_too_large"
    );
    assert_eq!(
        code(lc.set_status(kv(&[("no spaces", "v")]), vec![], WAIT).await),
        "bad_status"
    );
    // The refused changes left the status as it was.
    let s = laptop
        .client()
        .await?
        .get_status(vec!["london".into()], WAIT)
        .await?;
    assert_eq!(s[0].status, kv(&[("role", "db")]));
    Ok(())
}

#[tokio::test]
async fn other_namespaces_status_looks_like_a_name_nobody_held() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let acme = relay.create_key("acme")?;
    let globex = relay.create_key("globex")?;
    let theirs = TestDaemon::start(&relay, &globex, "london").await?;
    theirs
        .client()
        .await?
        .set_status(kv(&[("secret", "1")]), vec![], WAIT)
        .await?;
    let ours = TestDaemon::start(&relay, &acme, "laptop").await?;
    let mut c = ours.client().await?;
    let got = c
        .get_status(vec!["london".into(), "nobody".into()], WAIT)
        .await?;
    let strip = |mut s: StatusView| {
        s.name.clear();
        s
    };
    assert_eq!(strip(got[0].clone()), strip(got[1].clone()));
    assert!(!got[0].online && got[0].status.is_empty() && got[0].version == 0);
    assert!(c.peers(WAIT).await?.iter().all(|p| p.name != "london"));
    // HTTP: the same.
    let http = relay.http(Some(&acme))?;
    let a = http.get("/v1/status/london").await?;
    let b = http.get("/v1/status/nobody").await?;
    assert_eq!(a.status, b.status);
    let mut aj = a.json.clone();
    let mut bj = b.json.clone();
    aj["name"] = json!("");
    bj["name"] = json!("");
    assert_eq!(aj, bj);
    Ok(())
}

#[tokio::test]
async fn http_status_set_get_peers_and_refusals() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let london = TestDaemon::start(&relay, &key, "london").await?;
    let http = relay.http(Some(&key))?;
    let r = http
        .request(
            "PUT",
            "/v1/status",
            Some(serde_json::to_vec(
                &json!({"as": "ci", "set": {"stage": "test"}}),
            )?),
        )
        .await?;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["status"]["stage"], "test");
    // A daemon sees what HTTP set.
    let s = london
        .client()
        .await?
        .get_status(vec!["ci".into()], WAIT)
        .await?;
    assert_eq!(s[0].status["stage"], "test");
    let r = http.get("/v1/status/ci").await?;
    assert_eq!(
        (r.status, r.json["status"]["stage"].as_str()),
        (200, Some("test"))
    );
    let r = http.get("/v1/peers").await?;
    let peers = r.json["peers"].as_array().context("peers")?;
    let ci = peers
        .iter()
        .find(|p| p["name"] == "ci")
        .context("ci listed")?;
    assert_eq!(
        (ci["online"].as_bool(), ci["status"]["stage"].as_str()),
        (Some(false), Some("test"))
    );
    let lo = peers
        .iter()
        .find(|p| p["name"] == "london")
        .context("london listed")?;
    assert_eq!(
        (lo["online"].as_bool(), lo["via"].as_str()),
        (Some(true), Some("quic"))
    );

    let put = |body: serde_json::Value| {
        let http = http.clone();
        async move {
            http.request("PUT", "/v1/status", Some(serde_json::to_vec(&body)?))
                .await
        }
    };
    let r = put(json!({"as": "ci", "set": {"k": "x".repeat(5000)}})).await?;
    assert_eq!((r.status, r.code()), (413, "status_too_large"));
    let r = put(json!({"as": "ci", "set": {"bad key": "v"}})).await?;
    assert_eq!((r.status, r.code()), (400, "bad_status"));
    let r = put(json!({"as": "ci", "set": {}, "colour": "red"})).await?;
    assert_eq!((r.status, r.code()), (400, "bad_request"));
    let r = put(json!({"as": "Not_A_Name", "set": {}})).await?;
    assert_eq!((r.status, r.code()), (400, "bad_name"));
    let r = http.get("/v1/status/watch?peers=").await?;
    assert_eq!((r.status, r.code()), (400, "bad_request"));
    let r = relay.http(None)?.get("/v1/status/ci").await?;
    assert_eq!(r.status, 401);
    Ok(())
}

#[tokio::test]
async fn sse_watch_with_curl() -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir()?;
    let identity = swb_relay::Identity::dev_in_dir(dir.path(), &[])?;
    let relay = TestRelay::spawn_with(swb_tests::RelayOptions {
        identity: Some(identity),
        ..swb_tests::RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    let london = TestDaemon::start(&relay, &key, "london").await?;
    london
        .client()
        .await?
        .set_status(kv(&[("v", "1")]), vec![], WAIT)
        .await?;
    let mut curl = tokio::process::Command::new("curl")
        .args(["-sSN", "--max-time", "30", "--cacert"])
        .arg(dir.path().join("relay.crt"))
        .args(["-H", &format!("Authorization: Bearer {key}")])
        .arg(format!(
            "https://localhost:{}/v1/status/watch?peers=london,paris",
            relay.http_addr().port()
        ))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run curl; apt-get install curl")?;
    let mut lines = tokio::io::BufReader::new(curl.stdout.take().context("stdout")?).lines();
    let mut data = Vec::new();
    let mut read_event = async || -> Result<serde_json::Value> {
        loop {
            let l = tokio::time::timeout(WAIT, lines.next_line())
                .await??
                .context("curl ended")?;
            if let Some(d) = l.strip_prefix("data: ") {
                return Ok(serde_json::from_str(d)?);
            }
        }
    };
    // Current values first...
    data.push(read_event().await?);
    data.push(read_event().await?);
    assert_eq!(
        (data[0]["name"].as_str(), data[0]["status"]["v"].as_str()),
        (Some("london"), Some("1"))
    );
    assert_eq!(
        (data[1]["name"].as_str(), data[1]["version"].as_u64()),
        (Some("paris"), Some(0))
    );
    // ...then changes.
    london
        .client()
        .await?
        .set_status(kv(&[("v", "2")]), vec![], WAIT)
        .await?;
    let e = read_event().await?;
    assert_eq!(e["status"]["v"], "2");
    assert_eq!(e["lagged"], false);
    london.handle.shutdown();
    let e = read_event().await?;
    assert_eq!(
        (e["name"].as_str(), e["online"].as_bool()),
        (Some("london"), Some(false))
    );
    Ok(())
}

#[tokio::test]
async fn concurrent_set_status_calls_share_one_stream_apply_in_order_and_survive_a_restart(
) -> Result<()> {
    let mut relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let london = TestDaemon::start(&relay, &key, "london").await?;
    let laptop = TestDaemon::start(&relay, &key, "laptop").await?;
    // Four programs set their own key of london's status at once, 50
    // times each: every call is answered with a status holding its own
    // change, each program's answers have growing versions, and the relay
    // ends with exactly what the daemon holds.
    let round = |tag: &'static str| {
        let london = &london;
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for j in 0..4 {
                let mut c = london.client().await?;
                tasks.spawn(async move {
                    let mut last = 0;
                    for i in 0..50 {
                        let k = format!("{tag}{j}");
                        let (v, published) = c
                            .set_status(kv(&[(&k, &i.to_string())]), vec![], WAIT)
                            .await?;
                        anyhow::ensure!(published, "not published");
                        anyhow::ensure!(
                            v.status.get(&k) == Some(&i.to_string()),
                            "answer without its own change: {v:?}"
                        );
                        anyhow::ensure!(v.version > last, "versions went back");
                        last = v.version;
                    }
                    anyhow::Ok(())
                });
            }
            while let Some(r) = tasks.join_next().await {
                r??;
            }
            anyhow::Ok(())
        }
    };
    round("a").await?;
    let expect = |tags: &[&str]| {
        let mut m = BTreeMap::new();
        for t in tags {
            for j in 0..4 {
                m.insert(format!("{t}{j}"), "49".to_string());
            }
        }
        m
    };
    let s = laptop
        .client()
        .await?
        .get_status(vec!["london".into()], WAIT)
        .await?;
    assert_eq!(s[0].status, expect(&["a"]));
    // A new connection gets a new publisher stream.
    relay.restart().await?;
    round("b").await?;
    let s = laptop
        .client()
        .await?
        .get_status(vec!["london".into()], WAIT)
        .await?;
    assert_eq!(s[0].status, expect(&["a", "b"]));
    Ok(())
}
