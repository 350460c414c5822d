//! Every benchmark still runs (tiny sizes, seconds). The figures come from
//! full runs (`swbd bench …`), never from assertions on timing here.

use anyhow::{ensure, Result};
use std::time::Duration;

const SWBD: &str = env!("CARGO_BIN_EXE_swbd");

async fn bench(args: &[&str]) -> Result<serde_json::Value> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(SWBD)
            .arg("--json")
            .arg("bench")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "bench {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or("").to_string();
    Ok(serde_json::from_str(&last)?)
}

#[tokio::test]
async fn every_benchmark_runs_at_smoke_size() -> Result<()> {
    let v = bench(&["stream", "--bytes", "1048576", "--runs", "1"]).await?;
    ensure!(v["ratio"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    let v = bench(&["mesh", "--messages", "50", "--samples", "20"]).await?;
    ensure!(v["rate_ratio"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    let v = bench(&["ring", "--keys-per-relay", "10"]).await?;
    ensure!(v["relays"] == 1000, "{v}");
    let v = bench(&["accept", "--connections", "20"]).await?;
    ensure!(v["bench"] == "reconnect_storm" && v["failures"] == 0, "{v}");
    let v = bench(&["idle", "--clients", "20", "--settle", "200ms"]).await?;
    ensure!(v["relay_kib_per_client"].as_f64().is_some(), "{v}");
    let v = bench(&["rate", "--messages", "200", "--senders", "4"]).await?;
    ensure!(
        v["receivers"] == 100 && v["ours_per_sec"].as_f64().is_some(),
        "{v}"
    );
    let v = bench(&["latency", "--requests", "20"]).await?;
    ensure!(
        v["in_flight"] == 64 && v["ours_ms"]["p50"].as_f64().is_some(),
        "{v}"
    );
    Ok(())
}
