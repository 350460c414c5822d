//! The HTTP API driven by `curl`, a program that shares no code with us:
//! TLS verified with `--cacert` against the dev certificate, HTTP/1.1 and
//! HTTP/2, JSON in and out. `.ci/run` installs curl when it is missing.

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use std::path::Path;
use swb_relay::Identity;
use swb_tests::{RelayOptions, TestDaemon, TestRelay, WAIT};

/// Runs curl against the relay; returns (HTTP status, JSON body).
async fn curl(
    relay: &TestRelay,
    cacert: &Path,
    key: Option<&str>,
    args: &[&str],
    path: &str,
) -> Result<(u16, Value)> {
    let mut c = tokio::process::Command::new("curl");
    c.args(["--silent", "--show-error", "--max-time", "20", "--cacert"])
        .arg(cacert)
        .args(["--write-out", "\n%{http_code}"])
        .args(args)
        .kill_on_drop(true);
    if let Some(k) = key {
        c.args(["-H", &format!("Authorization: Bearer {k}")]);
    }
    // The certificate names localhost: verify it by name, as users do.
    c.arg(format!(
        "https://localhost:{}{path}",
        relay.http_addr().port()
    ));
    let out = tokio::time::timeout(WAIT, c.output())
        .await
        .context("curl did not finish")?
        .context("cannot run curl; install it (apt-get install curl)")?;
    ensure!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let (body, code) = text.rsplit_once('\n').context("status line")?;
    Ok((
        code.trim().parse()?,
        serde_json::from_str(body).unwrap_or(Value::Null),
    ))
}

#[tokio::test]
async fn curl_drives_the_http_api() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let identity = Identity::dev_in_dir(dir.path(), &[])?;
    let cacert = dir.path().join("relay.crt");
    let relay = TestRelay::spawn_with(RelayOptions {
        identity: Some(identity),
        ..RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    let london = TestDaemon::start(&relay, &key, "london").await?;

    // curl -> daemon.
    let (code, v) = curl(
        &relay,
        &cacert,
        Some(&key),
        &[
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"from":"ci","to":"london","body":"built by curl"}"#,
        ],
        "/v1/messages",
    )
    .await?;
    assert_eq!(code, 202, "{v}");
    let got = london.recv_n(1).await?;
    assert_eq!(
        (got[0].from.as_str(), got[0].body()),
        ("ci", b"built by curl".to_vec())
    );
    assert_eq!(v["id"].as_str(), Some(got[0].id.as_str()));

    // daemon -> curl, long poll over HTTP/2, then acknowledge.
    london.send("ci", b"seen").await?;
    let (code, v) = curl(
        &relay,
        &cacert,
        Some(&key),
        &["--http2"],
        "/v1/messages?as=ci&wait=10",
    )
    .await?;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["messages"][0]["body"], "seen");
    let id = v["messages"][0]["id"].as_str().context("id")?.to_string();
    let ack = format!(r#"{{"as":"ci","ids":["{id}"]}}"#);
    let (code, v) = curl(
        &relay,
        &cacert,
        Some(&key),
        &["--http1.1", "-d", &ack],
        "/v1/messages/ack",
    )
    .await?;
    assert_eq!((code, v["acked"].as_u64()), (200, Some(1)), "{v}");

    // Peers, errors and the document, as curl sees them.
    let (code, v) = curl(&relay, &cacert, Some(&key), &[], "/v1/peers").await?;
    assert_eq!(code, 200);
    assert!(
        v["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "london")),
        "{v}"
    );
    let (code, v) = curl(&relay, &cacert, None, &[], "/v1/peers").await?;
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (code, v) = curl(&relay, &cacert, None, &[], "/v1/openapi.json").await?;
    assert_eq!((code, v["openapi"].as_str()), (200, Some("3.1.0")));
    Ok(())
}
