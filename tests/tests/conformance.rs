//! The HTTP API against its own OpenAPI document, by an independent
//! schema-driven tester (Schemathesis): every request the document allows
//! is served as documented, every one it forbids is refused, no response
//! strays from what the document says. `./test` installs Schemathesis into
//! `target/test-tools/schemathesis` (a Python venv); `SWB_SCHEMATHESIS`
//! may name another `st`.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::Duration;
use swb_relay::HttpLimits;
use swb_tests::{RelayOptions, TestRelay};

fn schemathesis() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SWB_SCHEMATHESIS") {
        return Ok(PathBuf::from(p));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let st = root.join("target/test-tools/schemathesis/bin/st");
    if st.exists() {
        return Ok(st);
    }
    bail!(
        "Schemathesis is not installed: run ./test (it installs it into target/test-tools/schemathesis), or set SWB_SCHEMATHESIS to an `st` program"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_does_what_its_openapi_document_says() -> Result<()> {
    let st = schemathesis()?;
    let dir = tempfile::tempdir()?;
    let identity = swb_relay::Identity::dev_in_dir(dir.path(), &[])?;
    let relay = TestRelay::spawn_with(RelayOptions {
        identity: Some(identity),
        // Short long polls (the document says the maximum), and no rate
        // limits: the tester sends thousands of requests with one key.
        http: HttpLimits {
            max_wait: Duration::from_secs(1),
            ..HttpLimits::default()
        },
        key_http_rate: None,
        key_send_rate: None,
        ..RelayOptions::default()
    })
    .await?;
    let key = relay.create_key("acme")?;
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("conformance/schemathesis.toml");
    let url = format!(
        "https://localhost:{}/v1/openapi.json",
        relay.http_addr().port()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new(&st)
            .arg("--config-file")
            .arg(&config)
            .arg("--no-color")
            .args(["run", &url, "--checks", "all", "--max-time", "60"])
            .args([
                "--request-timeout",
                "10",
                "--request-retries",
                "2",
                // One worker: with two threads, Python 3.11's `ast.parse`
                // (which Hypothesis calls to describe its strategies) can
                // fail with "AST constructor recursion depth mismatch"
                // (its AST depth counter lives in state the interpreter's
                // threads share; cf. CPython gh-106905), an error of the
                // tool, not of the API. Seen once in a CI run on 2026-12-05.
                "--workers",
                "1",
            ])
            .arg("--tls-verify")
            .arg(dir.path().join("relay.crt"))
            .args(["-H", &format!("Authorization: Bearer {key}")])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("schemathesis did not finish in 10 minutes")?
    .with_context(|| format!("cannot run {}", st.display()))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let summary: String = text
        .lines()
        .filter(|l| l.contains("generated") || l.contains("passed") || l.contains("failures"))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("schemathesis: {summary}");
    if !out.status.success() {
        bail!("schemathesis found disagreements between the API and its document:\n{text}");
    }
    Ok(())
}
