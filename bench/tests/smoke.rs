//! Every benchmark still runs (`swbd-bench all --smoke`: tiny sizes,
//! seconds). The figures come from full runs, never from assertions on
//! timing here.

use anyhow::{ensure, Result};
use std::time::Duration;

const BENCH: &str = env!("CARGO_BIN_EXE_swbd-bench");

#[tokio::test]
async fn every_benchmark_runs_at_smoke_size() -> Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(BENCH)
            .args(["--json", "all", "--smoke"])
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "bench all --smoke failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("summary").is_some())
        .collect();
    let scenarios: std::collections::BTreeSet<&str> = summary
        .iter()
        .filter_map(|v| v["summary"].as_str())
        .collect();
    for s in [
        "stream", "ring", "mesh", "fanout", "accept", "idle", "latency", "rate", "durable",
        "shards",
    ] {
        ensure!(scenarios.contains(s), "no summary for {s}: {stdout}");
    }
    ensure!(
        summary
            .iter()
            .all(|v| v["ours"].as_f64().is_some_and(f64::is_finite)
                && v["baseline"].as_f64().is_some_and(f64::is_finite)),
        "every figure is a number: {stdout}"
    );
    Ok(())
}
