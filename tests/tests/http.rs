//! The HTTPS + JSON endpoint: the same namespaces and mailboxes as QUIC,
//! through a plain HTTP client. Every refusal the API documents is asserted.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use swb_relay::{HttpLimits, MailboxLimits, MAX_REQUEST_BODY};
use swb_tests::{HttpClient, RelayOptions, TestDaemon, TestRelay, WAIT};
use swb_wire::MAX_MESSAGE_BODY;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn msg(from: &str, to: &str, body: &str) -> Value {
    json!({"from": from, "to": to, "body": body})
}

/// Polls `GET /v1/peers` until `name` shows up (a long poll registered).
async fn wait_for_peer(http: &HttpClient, name: &str) -> Result<Value> {
    swb_tests::eventually(&format!("{name} in /v1/peers"), WAIT, || async {
        let r = http.get("/v1/peers").await?;
        Ok(r.json["peers"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == name))
            .cloned())
    })
    .await
}

#[tokio::test]
async fn http_send_reaches_a_daemon_and_daemon_send_reaches_http() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let http = relay.http(Some(&key))?;
    let london = TestDaemon::start(&relay, &key, "london").await?;

    let r = http
        .post("/v1/messages", &msg("ci", "london", "deploy done"))
        .await?;
    assert_eq!(r.status, 202, "{}", r.json);
    assert_eq!(r.json["online"], true);
    let id = r.json["id"].as_str().context("id")?.to_string();
    let got = london.recv_n(1).await?;
    assert_eq!(
        (got[0].from.as_str(), got[0].body(), got[0].id.as_str()),
        ("ci", b"deploy done".to_vec(), id.as_str())
    );

    // The other way: daemon -> HTTP, text and bytes.
    london.send("ci", b"thanks").await?;
    london.send("ci", &[0xff, 0x00, 0xfe]).await?;
    let r = http.get("/v1/messages?as=ci&wait=10").await?;
    assert_eq!(r.status, 200, "{}", r.json);
    let msgs = r.json["messages"].as_array().context("messages")?.clone();
    assert_eq!(msgs.len(), 2, "{}", r.json);
    assert_eq!(msgs[0]["from"], "london");
    assert_eq!(msgs[0]["body"], "thanks");
    assert!(msgs[0]["sent_at"]
        .as_str()
        .is_some_and(|s| s.ends_with('Z')));
    assert_eq!(msgs[1]["body_b64"], "/wD+");
    assert!(msgs[1].get("body").is_none());

    // Acknowledged: the relay forgets them.
    let ids: Vec<Value> = msgs.iter().map(|m| m["id"].clone()).collect();
    let r = http
        .post("/v1/messages/ack", &json!({"as": "ci", "ids": ids}))
        .await?;
    assert_eq!((r.status, r.json["acked"].as_u64()), (200, Some(2)));
    relay
        .wait_stats("all acknowledged", |s| s.held == 0)
        .await?;
    // Acknowledging again is harmless.
    let r = http
        .post("/v1/messages/ack", &json!({"as": "ci", "ids": ids}))
        .await?;
    assert_eq!(r.json["acked"], 0);
    Ok(())
}

#[tokio::test]
async fn long_poll_wakes_when_mail_arrives_not_at_the_timeout() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let http = relay.http(Some(&key))?;
    let poller = http.clone();
    let started = Instant::now();
    let poll = tokio::spawn(async move { poller.get("/v1/messages?as=inbox&wait=60").await });
    let p = wait_for_peer(&http, "inbox").await?;
    assert_eq!(p["via"], "http");
    http.post("/v1/messages", &msg("ci", "inbox", "wake up"))
        .await?;
    let r = tokio::time::timeout(WAIT, poll).await???;
    assert_eq!(r.json["messages"][0]["body"], "wake up");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the poll waited for its timeout"
    );
    // With nothing to receive, the poll returns an empty list at its timeout.
    let r = http.get("/v1/messages?as=inbox&wait=1").await?;
    assert_eq!(r.json, json!({"messages": []}));
    Ok(())
}

#[tokio::test]
async fn unacknowledged_http_lease_comes_back_after_the_visibility_timeout() -> Result<()> {
    let relay = TestRelay::spawn_with(RelayOptions {
        limits: MailboxLimits {
            visibility: Duration::from_millis(300),
            ..MailboxLimits::default()
        },
        ..RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    let http = relay.http(Some(&key))?;
    http.post("/v1/messages", &msg("ci", "worker", "job 1"))
        .await?;
    let first = http.get("/v1/messages?as=worker").await?;
    let id = first.json["messages"][0]["id"].clone();
    assert!(id.is_string(), "{}", first.json);
    // Leased: an immediate second receive does not see it...
    let again = http.get("/v1/messages?as=worker").await?;
    assert_eq!(again.json["messages"], json!([]));
    // ...but once the lease runs out unacknowledged, it is handed out again.
    let back = http.get("/v1/messages?as=worker&wait=10").await?;
    assert_eq!(back.json["messages"][0]["id"], id);
    Ok(())
}

#[tokio::test]
async fn lease_of_a_daemon_that_went_away_is_free_for_http() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let http = relay.http(Some(&key))?;
    let d = TestDaemon::start(&relay, &key, "box").await?;
    http.post("/v1/messages", &msg("ci", "box", "for box"))
        .await?;
    // Delivered to the daemon, never acknowledged; the daemon stops.
    let mut c = d.client().await?;
    assert_eq!(c.recv(WAIT, 10).await?.len(), 1);
    d.handle.shutdown();
    d.join().await??;
    let r = http.get("/v1/messages?as=box&wait=10").await?;
    assert_eq!(r.json["messages"][0]["body"], "for box");
    Ok(())
}

#[tokio::test]
async fn peers_lists_quic_and_http_peers_of_the_namespace_only() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let acme = relay.create_key("acme")?;
    let globex = relay.create_key("globex")?;
    let _london = TestDaemon::start(&relay, &acme, "london").await?;
    let _other = TestDaemon::start(&relay, &globex, "paris").await?;
    let http = relay.http(Some(&acme))?;
    http.get("/v1/messages?as=script").await?;
    let r = http.get("/v1/peers").await?;
    assert_eq!(r.status, 200);
    let peers = r.json["peers"].as_array().context("peers")?;
    let names: Vec<(&str, &str)> = peers
        .iter()
        .filter_map(|p| Some((p["name"].as_str()?, p["via"].as_str()?)))
        .collect();
    assert_eq!(names, vec![("london", "quic"), ("script", "http")]);
    assert!(peers.iter().all(|p| p["since"].as_str().is_some()));
    Ok(())
}

#[tokio::test]
async fn cross_namespace_send_looks_exactly_like_a_name_nobody_holds() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let acme = relay.create_key("acme")?;
    let globex = relay.create_key("globex")?;
    let _london = TestDaemon::start(&relay, &globex, "london").await?;
    let http = relay.http(Some(&acme))?;
    let a = http.post("/v1/messages", &msg("ci", "london", "x")).await?;
    let b = http.post("/v1/messages", &msg("ci", "nobody", "x")).await?;
    assert_eq!(a.status, b.status);
    assert_eq!(a.json["online"], b.json["online"]);
    let keys = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
    assert_eq!(keys(&a.json), keys(&b.json));
    Ok(())
}

#[tokio::test]
async fn every_refusal_has_its_status_and_code() -> Result<()> {
    let relay = TestRelay::spawn_with(RelayOptions {
        limits: MailboxLimits {
            messages: 1,
            ..MailboxLimits::default()
        },
        http: HttpLimits {
            max_polls_per_key: 1,
            ..HttpLimits::default()
        },
        ..RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    let http = relay.http(Some(&key))?;

    // Authentication.
    let r = relay.http(None)?.get("/v1/peers").await?;
    assert_eq!((r.status, r.code()), (401, "unauthorized"));
    assert!(r
        .headers
        .get("www-authenticate")
        .is_some_and(|v| v.as_bytes().starts_with(b"Bearer")));
    let bogus = format!("swbk_{}_{}", "0".repeat(12), "0".repeat(64));
    let r = relay
        .http(Some(&bogus))?
        .post("/v1/messages", &msg("a", "b", "x"))
        .await?;
    assert_eq!((r.status, r.code()), (401, "unauthorized"));
    assert!(r.headers.get("www-authenticate").is_some());
    let revoked = relay.create_key("acme")?;
    relay.revoke_key_in_file(&revoked)?;
    relay.handle().reload_keys()?;
    let r = relay.http(Some(&revoked))?.get("/v1/peers").await?;
    assert_eq!((r.status, r.code()), (401, "key_revoked"));

    // Bad JSON, unknown fields, bad names, bad bodies.
    let r = http
        .request("POST", "/v1/messages", Some(b"{not json".to_vec()))
        .await?;
    assert_eq!((r.status, r.code()), (400, "bad_request"));
    let r = http
        .post(
            "/v1/messages",
            &json!({"from": "a", "to": "b", "body": "x", "prio": 1}),
        )
        .await?;
    assert_eq!((r.status, r.code()), (400, "bad_request"));
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("prio"),
        "{}",
        r.json
    );
    let r = http
        .post("/v1/messages", &msg("a", "no_such!", "x"))
        .await?;
    assert_eq!((r.status, r.code()), (400, "bad_name"));
    let r = http
        .post("/v1/messages", &json!({"from": "a", "to": "b"}))
        .await?;
    assert_eq!((r.status, r.code()), (400, "bad_request"));
    let r = http
        .post(
            "/v1/messages",
            &json!({"from": "a", "to": "b", "body": "x", "body_b64": "eA=="}),
        )
        .await?;
    assert_eq!((r.status, r.code()), (400, "bad_request"));
    let r = http
        .post(
            "/v1/messages",
            &json!({"from": "a", "to": "b", "body_b64": "!!"}),
        )
        .await?;
    assert_eq!((r.status, r.code()), (400, "bad_request"));
    let big = "x".repeat(MAX_MESSAGE_BODY + 1);
    let r = http.post("/v1/messages", &msg("a", "b", &big)).await?;
    assert_eq!((r.status, r.code()), (413, "body_too_large"));
    let huge = vec![b' '; MAX_REQUEST_BODY + 1];
    let r = http.request("POST", "/v1/messages", Some(huge)).await?;
    assert_eq!((r.status, r.code()), (413, "request_too_large"));
    // Exactly the limit fits.
    let r = http
        .post(
            "/v1/messages",
            &msg("a", "big", &"y".repeat(MAX_MESSAGE_BODY)),
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.json);

    // Full mailbox (limit 1 here).
    assert_eq!(
        http.post("/v1/messages", &msg("a", "full", "1"))
            .await?
            .status,
        202
    );
    let r = http.post("/v1/messages", &msg("a", "full", "2")).await?;
    assert_eq!((r.status, r.code()), (429, "mailbox_full"));

    // Receive parameters.
    for q in [
        "/v1/messages",
        "/v1/messages?as=b&wait=61",
        "/v1/messages?as=b&wait=-1",
        "/v1/messages?as=b&max=0",
        "/v1/messages?as=b&color=red",
    ] {
        let r = http.get(q).await?;
        assert_eq!(
            (r.status, r.code()),
            (400, "bad_request"),
            "{q}: {}",
            r.json
        );
    }
    let r = http.get("/v1/messages?as=Not_A_Name").await?;
    assert_eq!((r.status, r.code()), (400, "bad_name"));
    let r = http.get("/v1/peers?x=1").await?;
    assert_eq!((r.status, r.code()), (400, "bad_request"));

    // Acknowledge input.
    let r = http
        .post("/v1/messages/ack", &json!({"as": "b", "ids": ["xyz"]}))
        .await?;
    assert_eq!((r.status, r.code()), (400, "bad_request"));
    let many: Vec<String> = (0..1025).map(|i| format!("{i:032x}")).collect();
    let r = http
        .post("/v1/messages/ack", &json!({"as": "b", "ids": many}))
        .await?;
    assert_eq!((r.status, r.code()), (400, "bad_request"));
    let r = http
        .post(
            "/v1/messages/ack",
            &json!({"as": "b", "ids": [], "all": true}),
        )
        .await?;
    assert_eq!((r.status, r.code()), (400, "bad_request"));

    // Long polls per key (limit 1 here).
    let poller = http.clone();
    let open = tokio::spawn(async move { poller.get("/v1/messages?as=waiter&wait=30").await });
    wait_for_peer(&http, "waiter").await?;
    let r = http.get("/v1/messages?as=other&wait=1").await?;
    assert_eq!((r.status, r.code()), (429, "too_many_polls"));
    http.post("/v1/messages", &msg("a", "waiter", "release"))
        .await?;
    assert_eq!(tokio::time::timeout(WAIT, open).await???.status, 200);
    // The slot is free again.
    assert_eq!(http.get("/v1/messages?as=other").await?.status, 200);

    // Routing.
    let r = http.get("/v2/nothing").await?;
    assert_eq!((r.status, r.code()), (404, "not_found"));
    let r = http.request("DELETE", "/v1/messages", None).await?;
    assert_eq!((r.status, r.code()), (405, "method_not_allowed"));
    Ok(())
}

#[tokio::test]
async fn openapi_document_lists_exactly_the_routes_served() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let http = relay.http(Some(&key))?;
    let r = relay.http(None)?.get("/v1/openapi.json").await?;
    assert_eq!(r.status, 200);
    let doc = r.json;
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc,
        swb_relay::openapi(),
        "served document is the generated one"
    );
    let paths = doc["paths"].as_object().context("paths")?;
    let mut routes = Vec::new();
    for (path, ops) in paths {
        for (method, op) in ops.as_object().context("ops")? {
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path}"
            );
            routes.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    routes.sort();
    assert_eq!(
        routes,
        vec![
            "GET /healthz",
            "GET /v1/messages",
            "GET /v1/openapi.json",
            "GET /v1/peers",
            "GET /v1/status/watch",
            "GET /v1/status/{name}",
            "POST /v1/messages",
            "POST /v1/messages/ack",
            "PUT /v1/status",
        ]
    );
    // Every documented route is served: never 404/405.
    for route in &routes {
        let (method, path) = route.split_once(' ').context("route")?;
        let body = (method == "POST" || method == "PUT").then(|| b"{}".to_vec());
        let r = http.request(method, path, body).await?;
        assert!(
            r.status != 404 && r.status != 405,
            "{route} answered {}",
            r.status
        );
    }
    Ok(())
}

#[tokio::test]
async fn http2_works_like_http1() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let mut http = relay.http(Some(&key))?;
    http.http2 = true;
    let r = http.post("/v1/messages", &msg("a", "b", "over h2")).await?;
    assert_eq!(r.status, 202, "{}", r.json);
    let r = http.get("/v1/messages?as=b").await?;
    assert_eq!(r.json["messages"][0]["body"], "over h2");
    assert_eq!(
        relay.http(None)?.get("/healthz").await?.json["status"],
        "ok"
    );
    Ok(())
}

#[tokio::test]
async fn a_client_that_sends_no_headers_is_cut_off() -> Result<()> {
    let relay = TestRelay::spawn_with(RelayOptions {
        http: HttpLimits {
            header_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        },
        ..RelayOptions::default()
    })
    .await?;
    // Silent at the TLS stage...
    let mut tcp = tokio::net::TcpStream::connect(relay.http_addr()).await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await?
        .unwrap_or(0);
    assert_eq!(
        n, 0,
        "the relay should close a connection that never starts TLS"
    );
    // ...and after TLS, silent before the request headers end.
    let tls = swb_daemon::Trust::Fingerprint(relay.fingerprint()).rustls_config(&[b"http/1.1"])?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(relay.http_addr()).await?;
    let mut s = connector
        .connect(
            rustls::pki_types::ServerName::from(relay.http_addr().ip()),
            tcp,
        )
        .await?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await?;
    let mut out = Vec::new();
    let r = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await?;
    // Closed (possibly with a 408 first), not left hanging.
    assert!(
        r.is_err() || out.is_empty() || out.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // Everyone else is still served.
    let key = relay.create_key("acme")?;
    assert_eq!(relay.http(Some(&key))?.get("/v1/peers").await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn revoking_a_key_ends_its_long_polls_and_event_streams_at_once() -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir()?;
    let identity = swb_relay::Identity::dev_in_dir(dir.path(), &[])?;
    let relay = TestRelay::spawn_with(RelayOptions {
        identity: Some(identity),
        ..RelayOptions::default()
    })
    .await?;
    let doomed = relay.create_key("acme")?;
    let kept = relay.create_key("acme")?;
    let http = relay.http(Some(&doomed))?;
    let other = relay.http(Some(&kept))?;
    // A long poll (30 s) of the key, in flight: its name shows as a peer.
    let poll = tokio::spawn(async move { http.get("/v1/messages?as=ci&wait=30").await });
    wait_for_peer(&other, "ci").await?;
    // An event stream of the key (curl reads it as it comes).
    let mut curl = tokio::process::Command::new(swb_tests::need_program("curl", "curl")?)
        .args(["-sSN", "--max-time", "60", "--cacert"])
        .arg(dir.path().join("relay.crt"))
        .args(["-H", &format!("Authorization: Bearer {doomed}")])
        .arg(format!(
            "https://localhost:{}/v1/status/watch?peers=london",
            relay.http_addr().port()
        ))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(curl.stdout.take().context("stdout")?).lines();
    let mut next_line = async || -> Result<Option<String>> {
        Ok(tokio::time::timeout(WAIT, lines.next_line()).await??)
    };
    // The current status of london first: the stream is open.
    while !next_line()
        .await?
        .context("curl ended")?
        .starts_with("data: ")
    {}
    // Revoked in the file only: the relay's poll notices.
    let t = Instant::now();
    relay.revoke_key_in_file(&doomed)?;
    let r = tokio::time::timeout(WAIT, poll).await???;
    assert_eq!((r.status, r.code()), (401, "key_revoked"), "{}", r.json);
    let mut event = None;
    while let Some(l) = next_line().await? {
        if l == "event: error" {
            event = next_line().await?;
        }
    }
    let event = event.context("the stream ended without an error event")?;
    let v: Value = serde_json::from_str(event.trim_start_matches("data: "))?;
    assert_eq!(v["error"]["code"], "key_revoked", "{v}");
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "ended {took:?} after the revocation"
    );
    // The other key of the namespace goes on.
    let r = other.get("/v1/messages?as=ci&wait=0").await?;
    assert_eq!(r.status, 200, "{}", r.json);
    Ok(())
}

#[tokio::test]
async fn an_idle_connection_is_closed_but_a_long_poll_is_not_cut() -> Result<()> {
    let relay = TestRelay::spawn_with(RelayOptions {
        http: HttpLimits {
            idle_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        },
        ..RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    // An HTTP/2 client that says its preface and settings, then nothing:
    // before, it held a connection slot for as long as it answered pings.
    let tls = swb_daemon::Trust::Fingerprint(relay.fingerprint()).rustls_config(&[b"h2"])?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(relay.http_addr()).await?;
    let mut s = connector
        .connect(
            rustls::pki_types::ServerName::from(relay.http_addr().ip()),
            tcp,
        )
        .await?;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    // An empty SETTINGS frame: length 0, type 4, flags 0, stream 0.
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await?;
    let mut out = Vec::new();
    // Closed after the idle timeout (GOAWAY, then EOF), well before the
    // 30 s keep-alive would notice anything.
    let end = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .context("an idle HTTP/2 connection was kept open")?;
    // Closed: cleanly, or without TLS's close_notify.
    if let Err(e) = end {
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    }
    // A long poll is a request in flight: not idle, not cut.
    let t = Instant::now();
    let r = relay
        .http(Some(&key))?
        .get("/v1/messages?as=ci&wait=1")
        .await?;
    assert_eq!(r.status, 200, "{}", r.json);
    assert!(t.elapsed() >= Duration::from_millis(900), "answered early");
    Ok(())
}

/// Unmounts a tmpfs when dropped.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_relay_whose_disk_fills_refuses_mail_and_fails_its_health_check() -> Result<()> {
    // The mail log on a 192 KiB tmpfs: mounting needs root.
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    std::fs::create_dir(&state)?;
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=192k", "tmpfs"])
        .arg(&state)
        .output();
    match mounted {
        Ok(o) if o.status.success() => {}
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            assert!(
                std::env::var("SWB_REQUIRE_NETNS").as_deref() != Ok("1"),
                "mounting a tmpfs is needed (root) and SWB_REQUIRE_NETNS=1, but: {why}"
            );
            eprintln!("skipped: mounting a tmpfs needs root ({why})");
            return Ok(());
        }
    }
    let _unmount = Tmpfs(state.clone());
    let relay = TestRelay::spawn_with(RelayOptions {
        state_dir: Some(state),
        ..Default::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    let http = relay.http(Some(&key))?;
    assert_eq!(relay.http(None)?.get("/healthz").await?.status, 200);
    let body = "x".repeat(30_000);
    let mut accepted = 0;
    let refused = loop {
        let r = http.post("/v1/messages", &msg("a", "b", &body)).await?;
        if r.status != 202 {
            break r;
        }
        accepted += 1;
        assert!(
            accepted < 20,
            "192 KiB cannot hold {accepted} messages of 30 KB"
        );
    };
    assert!(accepted >= 1, "the first messages fit");
    assert_eq!(refused.status, 503, "{}", refused.json);
    let said = refused.json.to_string();
    assert!(said.contains("could not store the message"), "{said}");
    // For good: a small message that would fit is refused too, and the
    // health check says why.
    let r = http.post("/v1/messages", &msg("a", "b", "small")).await?;
    assert_eq!(r.status, 503, "{}", r.json);
    let h = relay.http(None)?.get("/healthz").await?;
    assert_eq!(h.status, 503, "{}", h.json);
    assert_eq!(h.json["status"], "store_failed");
    assert!(
        h.json["error"]
            .as_str()
            .is_some_and(|e| e.contains("restarted")),
        "{}",
        h.json
    );
    // What was accepted before is still there to receive. (So are the
    // refused ones: mail is delivered as it is accepted into the mailbox,
    // before it is durable — the sender's retry under the same id is
    // what the recipient drops as a duplicate.)
    let got = http.get("/v1/messages?as=b&max=100").await?;
    let msgs = got.json["messages"].as_array().context("messages")?;
    assert!(msgs.len() >= accepted, "{} of {accepted}", msgs.len());
    assert!(
        msgs[..accepted].iter().all(|m| m["body"] == body.as_str()),
        "the accepted ones first, in order"
    );
    Ok(())
}
