//! Name-scoped API keys: a key limited to some names may attach as, send
//! from, receive and acknowledge as, and set the status of those names only,
//! over QUIC and HTTP; unscoped keys work as before.

use anyhow::Result;
use serde_json::json;
use swb_tests::{TestDaemon, TestRelay};
use swb_wire::Code;

fn refused_code(r: Result<(), swb_daemon::DaemonError>) -> Code {
    match r {
        Err(swb_daemon::DaemonError::Refused(x)) => x.code,
        other => panic!("expected the relay to refuse, got {other:?}"),
    }
}

#[tokio::test]
async fn a_scoped_key_attaches_only_as_its_names() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let ci = relay.create_scoped_key("acme", "ci-*")?;
    let d = TestDaemon::start(&relay, &ci, "ci-7").await?;
    assert_eq!(d.client().await?.status().await?.state, "connected");
    let other = TestDaemon::spawn(relay.daemon_config(&ci, "london", Default::default())).await?;
    assert_eq!(refused_code(other.join().await?), Code::NAME_NOT_ALLOWED);
    // An unscoped key of the namespace may be anyone.
    let any = relay.create_key("acme")?;
    TestDaemon::start(&relay, &any, "london").await?;
    Ok(())
}

#[tokio::test]
async fn a_scoped_key_acts_over_http_only_as_its_names() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let ci = relay.create_scoped_key("acme", "ci-*,builder")?;
    let http = relay.http(Some(&ci))?;
    let send = |from: &str| json!({"from": from, "to": "london", "body": "x"});
    assert_eq!(http.post("/v1/messages", &send("ci-2")).await?.status, 202);
    assert_eq!(
        http.post("/v1/messages", &send("builder")).await?.status,
        202
    );
    for (what, r) in [
        (
            "send as london",
            http.post("/v1/messages", &send("london")).await?,
        ),
        (
            "receive as london",
            http.get("/v1/messages?as=london&wait=0").await?,
        ),
        (
            "ack as london",
            http.post("/v1/messages/ack", &json!({"as": "london", "ids": []}))
                .await?,
        ),
        (
            "set the status of london",
            http.request(
                "PUT",
                "/v1/status",
                Some(serde_json::to_vec(
                    &json!({"as": "london", "set": {"k": "v"}}),
                )?),
            )
            .await?,
        ),
    ] {
        assert_eq!(
            (r.status, r.code()),
            (403, "name_not_allowed"),
            "{what}: {}",
            r.json
        );
    }
    // Its own names work; reading others' statuses is allowed as before.
    let r = http.get("/v1/messages?as=ci-2&wait=0").await?;
    assert_eq!(r.status, 200, "{}", r.json);
    let r = http
        .request(
            "PUT",
            "/v1/status",
            Some(serde_json::to_vec(
                &json!({"as": "ci-2", "set": {"stage": "test"}}),
            )?),
        )
        .await?;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(http.get("/v1/status/london").await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn narrowing_a_key_in_the_file_ends_sessions_outside_its_names() -> Result<()> {
    let relay = TestRelay::spawn().await?;
    let key = relay.create_key("acme")?;
    let london = TestDaemon::start(&relay, &key, "london").await?;
    let ci = TestDaemon::start(&relay, &key, "ci-1").await?;
    relay.rescope_key_in_file(&key, "ci-*")?;
    assert_eq!(refused_code(london.join().await?), Code::NAME_NOT_ALLOWED);
    // The session inside its names goes on.
    ci.send("ci-1", b"still here").await?;
    assert_eq!(ci.recv(1).await?[0].body(), b"still here");
    Ok(())
}
