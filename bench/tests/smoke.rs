//! Every benchmark still runs (`swbd-bench all --smoke`: tiny sizes,
//! seconds). The figures come from full runs, never from assertions on
//! timing here.

use anyhow::{ensure, Result};
use std::time::Duration;

const BENCH: &str = env!("CARGO_BIN_EXE_swbd-bench");

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[tokio::test]
async fn every_benchmark_runs_at_smoke_size() -> Result<()> {
    // Output goes to files, so a run that does not finish still says how far
    // it got (which scenario hangs or is slow).
    let dir = tempfile::tempdir()?;
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = tokio::process::Command::new(BENCH)
        .args(["--json", "all", "--smoke"])
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .kill_on_drop(true)
        .spawn()?;
    let status = tokio::time::timeout(Duration::from_secs(420), child.wait()).await;
    let stdout = std::fs::read_to_string(&out_path)?;
    let stderr = std::fs::read_to_string(&err_path)?;
    let Ok(status) = status else {
        child.kill().await?;
        anyhow::bail!(
            "bench all --smoke did not finish in 420 s; its output so far:\n{}\n--- stderr:\n{}",
            tail(&stdout, 10),
            tail(&stderr, 30)
        );
    };
    ensure!(
        status?.success(),
        "bench all --smoke failed: {stdout}{stderr}"
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect();
    let summary: Vec<&serde_json::Value> = lines
        .iter()
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
    // The latency floors, in this process and in one of their own, each
    // held against NATS, and the relay process against its floor.
    let latency: Vec<&serde_json::Value> =
        lines.iter().filter(|v| v["bench"] == "latency").collect();
    ensure!(
        latency.len() == 2,
        "latency at 1 and 64 in flight: {stdout}"
    );
    for v in &latency {
        for k in [
            "quinn_forwarder_floor_p50_ratio_vs_nats",
            "quinn_forwarder_floor_process_p50_ratio_vs_nats",
            "rust_api_relay_process_p50_ratio_vs_quinn_forwarder_floor_process",
        ] {
            ensure!(
                v[k].as_f64().is_some_and(|r| r.is_finite() && r > 0.0),
                "latency has no {k}: {v}"
            );
        }
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
