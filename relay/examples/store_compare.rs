//! The mail store's design measured: our segment log against redb on a
//! delete-on-ack workload, every commit synced (see the README's
//! *Durable mail*).
//!
//! ```text
//! cargo run --release -p swb-relay --features store-compare --example store_compare [RUNS]
//! ```

use swb_relay::store_compare;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(3);
    // Batches of 64: the group-commit size at a few thousand messages/s.
    let shapes = [
        (200_000u64, 10_000u64, 64u64, 128usize),
        (50_000, 10_000, 64, 4096),
    ];
    for (total, backlog, batch, body) in shapes {
        let mut rows: Vec<Vec<store_compare::Figures>> = Vec::new();
        for _ in 0..runs.max(1) {
            let dir = tempfile::tempdir_in(
                std::env::var_os("SWB_STORE_DIR").map_or_else(std::env::temp_dir, Into::into),
            )?;
            rows.push(store_compare::run(dir.path(), total, backlog, batch, body)?);
        }
        println!(
            "{total} messages of {body} B, {batch} per synced commit, mailbox {backlog} deep; medians of {} runs (min–max)",
            rows.len()
        );
        for i in 0..rows[0].len() {
            let mut rates: Vec<f64> = rows.iter().map(|r| r[i].per_sec).collect();
            rates.sort_by(f64::total_cmp);
            let mut peak: Vec<u64> = rows.iter().map(|r| r[i].peak_bytes).collect();
            peak.sort();
            let mut end: Vec<u64> = rows.iter().map(|r| r[i].end_bytes).collect();
            end.sort();
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            println!(
                "  {:<20} {:>9.0} msgs/s ({:.0}–{:.0})   disk peak {:>7.1} MiB   at the end {:>7.1} MiB",
                rows[0][i].name,
                rates[rates.len() / 2],
                rates[0],
                rates[rates.len() - 1],
                mib(peak[peak.len() / 2]),
                mib(end[end.len() / 2]),
            );
        }
    }
    Ok(())
}
