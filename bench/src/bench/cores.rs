//! How far apart the machine's first two CPUs are: the round trip of one
//! cache line between a thread on each. On a virtual machine the host may
//! place the two vCPUs on one core complex (tens of ns) or on two (hundreds),
//! and move them while a benchmark runs. Every message we pass from task to
//! task on the other worker pays that distance, so `rate` and `fanout`
//! print it beside each run (see `docs/performance.md`, *What the two
//! modes are*).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Round trips per measurement: 20–80 ms on the machines seen so far.
const ROUND_TRIPS: u64 = 200_000;
/// A measurement the other thread does not answer within this is abandoned.
const DEADLINE: Duration = Duration::from_secs(5);

/// One cache line, alone on it.
#[repr(align(128))]
struct Line {
    turn: AtomicU64,
    abort: AtomicBool,
}

/// The first two CPUs this process may run on.
fn two_cpus() -> Option<(usize, usize)> {
    let set = rustix::thread::sched_getaffinity(None).ok()?;
    let mut cpus = (0..rustix::thread::CpuSet::MAX_CPU).filter(|&c| set.is_set(c));
    Some((cpus.next()?, cpus.next()?))
}

fn pin(cpu: usize) -> bool {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).is_ok()
}

/// Waits until `line.turn` is `want`; false if aborted or past `until`.
fn wait_for(line: &Line, want: u64, until: Instant) -> bool {
    let mut spins = 0u32;
    while line.turn.load(Ordering::Acquire) != want {
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(4096)
            && (line.abort.load(Ordering::Relaxed) || Instant::now() > until)
        {
            line.abort.store(true, Ordering::Relaxed);
            return false;
        }
        std::hint::spin_loop();
    }
    true
}

/// Nanoseconds per round trip of a cache line between the first two CPUs
/// this process may use, each end a thread pinned to one of them; `None`
/// with fewer than two CPUs, or if a thread could not be pinned or did not
/// get its CPU in time. Blocks for the measurement (tens of ms): call it
/// from a blocking thread.
pub(crate) fn round_trip_ns() -> Option<f64> {
    round_trips_ns(ROUND_TRIPS)
}

fn round_trips_ns(round_trips: u64) -> Option<f64> {
    let (a, b) = two_cpus()?;
    let line = Arc::new(Line {
        turn: AtomicU64::new(0),
        abort: AtomicBool::new(false),
    });
    let until = Instant::now() + DEADLINE;
    let far = {
        let line = line.clone();
        std::thread::Builder::new()
            .name("swb-bench-cores".into())
            .spawn(move || {
                if !pin(b) {
                    line.abort.store(true, Ordering::Relaxed);
                    return false;
                }
                for i in 0..round_trips {
                    if !wait_for(&line, 2 * i + 1, until) {
                        return false;
                    }
                    line.turn.store(2 * i + 2, Ordering::Release);
                }
                true
            })
            .ok()?
    };
    let near = std::thread::Builder::new()
        .name("swb-bench-cores".into())
        .spawn(move || {
            if !pin(a) {
                line.abort.store(true, Ordering::Relaxed);
                return None;
            }
            let t = Instant::now();
            for i in 0..round_trips {
                line.turn.store(2 * i + 1, Ordering::Release);
                if !wait_for(&line, 2 * i + 2, until) {
                    return None;
                }
            }
            Some(t.elapsed())
        })
        .ok()?;
    let took = near.join().ok()?;
    let answered = far.join().ok()?;
    let took = took.filter(|_| answered)?;
    Some(took.as_nanos() as f64 / round_trips as f64)
}

/// [`round_trip_ns`] from async code.
pub(crate) async fn measure() -> Option<f64> {
    tokio::task::spawn_blocking(round_trip_ns)
        .await
        .ok()
        .flatten()
}

/// Round trips measured before and after each run.
pub(crate) type Runs = [(Option<f64>, Option<f64>)];

/// The benches' line for [`Runs`]: `86 ns / 88 ns, 390 ns / -` (`-`:
/// unmeasured).
pub(crate) fn line(runs: &Runs) -> String {
    let show = |ns: Option<f64>| ns.map_or_else(|| "-".to_string(), |ns| format!("{ns:.0} ns"));
    let runs: Vec<String> = runs
        .iter()
        .map(|(b, a)| format!("{} / {}", show(*b), show(*a)))
        .collect();
    format!(
        "  cross-core round trip around each run (before / after): {}",
        runs.join(", ")
    )
}

/// [`Runs`] for `--json`: `[[before, after], …]`, `null` where unmeasured.
pub(crate) fn json(runs: &Runs) -> serde_json::Value {
    serde_json::json!(runs.iter().map(|(b, a)| [b, a]).collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_round_trip_or_says_it_cannot() {
        match two_cpus() {
            // A round trip takes at least a few ns, and these 2 000 took
            // less than the deadline.
            Some(_) => {
                let ns = round_trips_ns(2_000).expect("two CPUs: measured");
                let most = DEADLINE.as_nanos() as f64 / 2_000.0;
                assert!(ns > 1.0 && ns < most, "{ns} ns");
            }
            None => assert_eq!(round_trips_ns(2_000), None),
        }
    }
}
