//! `swbd-bench`: Switchboard's benchmarks, each against a baseline measured
//! in the same run (direct quinn, a bare quinn server, nats-server), with a
//! summary table (`all`). A separate binary so that `swbd` ships none of it.
//! Benchmarks print figures; they assert nothing about speed.

/// The same allocator as `swbd`, so in-process relays and daemons measure
/// what ships (see the README's performance section). The `system-alloc`
/// feature leaves the system allocator in place, for heaptrack (which sees
/// only malloc) with `SWB_BENCH_WRAP`.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod nats;

use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;

/// Switchboard benchmarks: figures and ratios against baselines measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "swbd-bench", version, max_term_width = 100)]
struct Cli {
    /// Print figures as JSON (one object per line) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: bench::BenchCommand,
}

/// Output settings shared by the scenarios.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    /// JSON output.
    pub(crate) json: bool,
}

/// A duration flag: plain seconds (`10`) or humantime (`500ms`, `2m`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration (like 10, 500ms, 2m): {e}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("swbd-bench: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = Output { json: cli.json };
    // The bench runs as a task on the runtime's workers, as a server's work
    // does, not in `block_on` on the main thread: a loop there would be
    // woken across threads for every reply, NATS' clients and ours alike.
    // That hop cost 20–60 µs per round trip at one request in flight here.
    let bench = rt.spawn(async move { bench::run(cli.command, &out).await });
    let result = rt
        .block_on(bench)
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the bench task failed: {e}")));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("swbd-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
