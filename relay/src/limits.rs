//! Rate limits (a leaf): token buckets, one per key or per source address
//! in a bounded table, a limiter for log lines an attacker could otherwise
//! multiply, and the wait a busy relay asks refused clients for.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;
use tokio::time::Instant;

/// A rate: `per_sec` on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: f64,
    /// Most tokens held (the largest burst).
    pub burst: f64,
}

impl Rate {
    /// `per_sec` per second with bursts of `burst`.
    pub fn new(per_sec: f64, burst: f64) -> Self {
        Self { per_sec, burst }
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate.per_sec).min(rate.burst);
        self.at = now;
    }

    /// Takes one token if there is one.
    fn take(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes one token, or says how long until one is there.
    fn take_or_wait(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        if self.take(rate, now) {
            Ok(())
        } else {
            Err(self.wait(rate))
        }
    }

    /// Time until one token is there.
    fn wait(&self, rate: Rate) -> Duration {
        if self.tokens >= 1.0 || rate.per_sec <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) / rate.per_sec)
    }
}

/// One bucket per key (API key id, source address), in a table of at most
/// `max_keys` entries: when it is full, buckets that refilled completely
/// (idle keys) are dropped; if none did, the least recently used half is.
#[derive(Debug)]
pub struct Limiter<K> {
    rate: Rate,
    max_keys: usize,
    /// Keyed (addresses and key ids come from the network) and fast: the
    /// per-key send rate is looked up on every message.
    buckets: HashMap<K, Bucket, ahash::RandomState>,
}

impl<K: Hash + Eq> Limiter<K> {
    /// A limiter of `rate` per key, remembering at most `max_keys` keys.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(1),
            buckets: HashMap::default(),
        }
    }

    /// Takes one token of `key`: `Ok` if allowed, else how long until
    /// the next one. A key already in the table is looked up as it is
    /// given (no owned copy made: this runs per message).
    pub fn take<Q>(&mut self, key: &Q, now: Instant) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let rate = self.rate;
        if let Some(b) = self.buckets.get_mut(key) {
            return b.take_or_wait(rate, now);
        }
        if self.buckets.len() >= self.max_keys {
            self.trim(now);
        }
        self.buckets
            .entry(key.to_owned())
            .or_insert_with(|| Bucket::full(rate, now))
            .take_or_wait(rate, now)
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn trim(&mut self, now: Instant) {
        let rate = self.rate;
        self.buckets.retain(|_, b| {
            let mut b2 = *b;
            b2.refill(rate, now);
            b2.tokens < rate.burst
        });
        if self.buckets.len() >= self.max_keys {
            // Everyone is busy: forget the half used longest ago (they
            // start again with a full bucket; the table stays bounded).
            let mut ats: Vec<Instant> = self.buckets.values().map(|b| b.at).collect();
            ats.sort();
            let cut = ats[ats.len() / 2];
            self.buckets.retain(|_, b| b.at > cut);
        }
    }
}

/// One key's rate, shared without a lock by every session of the key on
/// every core: the token bucket as a generic cell rate algorithm (GCRA), a
/// single atomic "theoretical arrival time" moved forward by one interval
/// per take. Equivalent to a [`Bucket`] of the same [`Rate`]: `burst`
/// takes at once, then one per `1 / per_sec`.
#[derive(Debug)]
pub struct SharedRate {
    /// When the bucket is next full, in [`TICKS_PER_NS`] ticks since the
    /// table's epoch (0: full since the start).
    tat: std::sync::atomic::AtomicU64,
}

/// Ticks per nanosecond of [`SharedRate`]'s clock: a sixteenth of a
/// nanosecond keeps the interval of rates up to 10⁹ per second within 3 %
/// (of 50 000 per second, exact), and a u64 of them lasts 36 years.
const TICKS_PER_NS: u64 = 16;

/// A rate in [`SharedRate`]'s ticks.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    /// Ticks per token (0: too fast to count — every take is allowed).
    interval: u64,
    /// How far ahead of now the arrival time may run: the burst less one.
    tolerance: u64,
}

impl Gcra {
    fn of(rate: Rate) -> Self {
        let cap = u64::MAX as f64 / 4.0;
        // Ticks per token, unrounded (infinite for a rate of nothing).
        let ticks = 1e9 * TICKS_PER_NS as f64 / rate.per_sec.max(0.0);
        // From the unrounded interval: a rate too fast to count still has
        // its burst's worth of tolerance, so a take timed a moment before
        // another session's (each reads its clock once per run of frames)
        // is not refused.
        let tolerance = ((rate.burst - 1.0).max(0.0) * ticks).min(cap);
        Self {
            interval: ticks.round().min(cap) as u64,
            tolerance: tolerance as u64,
        }
    }
}

impl SharedRate {
    fn new() -> Self {
        Self {
            tat: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Takes one token at `now` (ticks): `Ok`, or how long until one is
    /// there.
    fn take(&self, g: Gcra, now: u64) -> Result<(), Duration> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut tat = self.tat.load(Relaxed);
        loop {
            let start = tat.max(now);
            let ahead = start - now;
            if ahead > g.tolerance {
                let ticks = ahead - g.tolerance;
                return Err(Duration::from_nanos(ticks.div_ceil(TICKS_PER_NS)));
            }
            match self.tat.compare_exchange_weak(
                tat,
                start.saturating_add(g.interval),
                Relaxed,
                Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now_tat) => tat = now_tat,
            }
        }
    }

    /// Whether the bucket is full at `now` (an idle key).
    fn full(&self, now: u64) -> bool {
        self.tat.load(std::sync::atomic::Ordering::Relaxed) <= now
    }
}

/// The per-key rates of one relay: a [`SharedRate`] per key, which a
/// session looks up once ([`Self::rate_of`]) and then takes from per
/// message without a lock; HTTP requests look theirs up per request. At
/// most `max_keys` keys are remembered beyond those in use: a rate held by
/// a session is never forgotten (its key would get a second, full bucket).
#[derive(Debug)]
pub struct KeyRates {
    rate: Rate,
    gcra: Gcra,
    epoch: Instant,
    max_keys: usize,
    table: std::sync::Mutex<HashMap<String, std::sync::Arc<SharedRate>, ahash::RandomState>>,
}

/// One key's rate as a session holds it: [`KeyRate::take`] per message.
#[derive(Debug, Clone)]
pub struct KeyRate {
    rate: std::sync::Arc<SharedRate>,
    gcra: Gcra,
    epoch: Instant,
}

impl KeyRate {
    /// Takes one token: `Ok`, or how long until one is there.
    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        self.rate.take(self.gcra, ticks(self.epoch, now))
    }
}

fn ticks(epoch: Instant, now: Instant) -> u64 {
    let ns = now.saturating_duration_since(epoch).as_nanos();
    u64::try_from(ns.saturating_mul(u128::from(TICKS_PER_NS))).unwrap_or(u64::MAX / 2)
}

impl KeyRates {
    /// `rate` per key, remembering at most `max_keys` keys not in use.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            gcra: Gcra::of(rate),
            epoch: Instant::now(),
            max_keys: max_keys.max(1),
            table: std::sync::Mutex::new(HashMap::default()),
        }
    }

    /// The rate limited.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// The rate of `key`, to take from per message.
    pub fn rate_of(&self, key: &str) -> KeyRate {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let rate = match t.get(key) {
            Some(r) => r.clone(),
            None => {
                if t.len() >= self.max_keys {
                    let now = ticks(self.epoch, Instant::now());
                    trim(&mut t, self.max_keys, now);
                }
                let r = std::sync::Arc::new(SharedRate::new());
                t.insert(key.to_owned(), r.clone());
                r
            }
        };
        KeyRate {
            rate,
            gcra: self.gcra,
            epoch: self.epoch,
        }
    }

    /// Takes one token of `key` (looked up now): `Ok`, or how long until
    /// one is there.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        self.rate_of(key).take(now)
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Makes room in a full table: forgets the idle keys nobody holds; if that
/// is not enough, the keys nobody holds, the most recently busy kept. Keys
/// held by sessions stay (there are at most as many as sessions).
fn trim(
    t: &mut HashMap<String, std::sync::Arc<SharedRate>, ahash::RandomState>,
    max_keys: usize,
    now: u64,
) {
    let unheld = |r: &std::sync::Arc<SharedRate>| std::sync::Arc::strong_count(r) == 1;
    t.retain(|_, r| !(unheld(r) && r.full(now)));
    if t.len() >= max_keys {
        let mut tats: Vec<u64> = t
            .values()
            .filter(|r| unheld(r))
            .map(|r| r.tat.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        if tats.is_empty() {
            return;
        }
        tats.sort_unstable();
        let cut = tats[tats.len() / 2];
        t.retain(|_, r| !unheld(r) || r.tat.load(std::sync::atomic::Ordering::Relaxed) > cut);
    }
}

/// Lets a log line through at most once per `every`, counting the rest.
#[derive(Debug)]
pub struct LogLimit {
    every: Duration,
    state: std::sync::Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    /// At most one line per `every`.
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed since the last line)` if a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.0 {
            Some(at) if now.saturating_duration_since(at) < self.every => {
                s.1 += 1;
                None
            }
            _ => {
                let suppressed = s.1;
                *s = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// How long a client refused for too many handshakes at once should wait
/// before it tries again (sent as [`swb_wire::busy`]'s hint): the refusals
/// of about the last second divided by the rate handshakes were admitted at,
/// so the refused come back spread over the time the relay needs for them
/// instead of all at once, again and again, each attempt a TLS ClientHello
/// the relay must read and answer.
#[derive(Debug)]
pub(crate) struct RetryHint {
    refused: f64,
    admitted: f64,
    at: Instant,
}

impl RetryHint {
    /// The time constant of the decaying counts (about the last second).
    const WINDOW: Duration = Duration::from_secs(1);
    /// The shortest hint: about a handshake's time, for a slot to free.
    pub(crate) const MIN_WAIT: Duration = Duration::from_millis(250);
    /// Admissions per second assumed at least (nothing admitted lately, say
    /// every slot in a slow handshake, must not read as an infinite wait).
    const MIN_RATE: f64 = 50.0;

    pub(crate) fn new(now: Instant) -> Self {
        Self {
            refused: 0.0,
            admitted: 0.0,
            at: now,
        }
    }

    fn decay(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        let f = (-dt / Self::WINDOW.as_secs_f64()).exp();
        self.refused *= f;
        self.admitted *= f;
        self.at = now;
    }

    /// A handshake got a slot.
    pub(crate) fn admitted(&mut self, now: Instant) {
        self.decay(now);
        self.admitted += 1.0;
    }

    /// A handshake was refused: how long its client should wait.
    pub(crate) fn refused(&mut self, now: Instant) -> Duration {
        self.decay(now);
        self.refused += 1.0;
        let rate = (self.admitted / Self::WINDOW.as_secs_f64()).max(Self::MIN_RATE);
        Duration::from_secs_f64(self.refused / rate)
            .clamp(Self::MIN_WAIT, swb_wire::busy::MAX_RETRY_IN)
    }
}

/// Reads and counts away every datagram `conn` receives, so none waits in
/// quinn's per-connection buffer while the connection is not (yet) one
/// whose datagrams are read (before `Hello` or a mesh proof, or a session
/// not in TUN mode); pends forever once the connection is gone.
pub(crate) async fn discard_datagrams(
    conn: &quinn::Connection,
    counter: &prometheus::IntCounter,
) -> std::convert::Infallible {
    while conn.read_datagram().await.is_ok() {
        counter.inc();
    }
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_retry_hint_spreads_a_storm_over_the_time_its_admissions_take() {
        let t0 = Instant::now();
        let mut h = RetryHint::new(t0);
        // A steady 2 000 admissions a second for a few seconds.
        for i in 0..6000u32 {
            h.admitted(t0 + Duration::from_micros(500 * u64::from(i)));
        }
        let t1 = t0 + Duration::from_secs(3);
        // A lone refusal waits about a handshake's time.
        assert_eq!(h.refused(t1), RetryHint::MIN_WAIT);
        // 10 000 refused within 100 ms: the last is told about 10 000 /
        // 2 000 per second.
        let mut last = Duration::ZERO;
        for i in 0..10_000u32 {
            last = h.refused(t1 + Duration::from_micros(10 * u64::from(i)));
        }
        assert!(
            last > Duration::from_secs(4) && last < Duration::from_secs(6),
            "{last:?}"
        );
        // Nothing admitted for a minute and a flood refused: capped.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..100_000 {
            last = h.refused(t2);
        }
        assert_eq!(last, swb_wire::busy::MAX_RETRY_IN);
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_its_rate() {
        let mut l = Limiter::new(Rate::new(10.0, 3.0), 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.take(&"a", t0).is_ok());
        }
        let wait = l.take(&"a", t0).expect_err("burst spent");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another key has its own bucket.
        assert!(l.take(&"b", t0).is_ok());
        // A tenth of a second later, one more.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.take(&"a", t1).is_ok());
        assert!(l.take(&"a", t1).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_stays_bounded() {
        let mut l = Limiter::new(Rate::new(1.0, 2.0), 10);
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let _ = l.take(&i, t0 + Duration::from_millis(u64::from(i)));
            assert!(l.len() <= 10, "{} keys remembered", l.len());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_log_limit_lets_one_line_through_per_period_and_counts_the_rest() {
        let l = LogLimit::new(Duration::from_secs(10));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(l.allow(), Some(2));
    }

    #[test]
    fn a_key_rate_allows_its_burst_then_one_per_interval() {
        let rates = KeyRates::new(Rate::new(1000.0, 10.0), 100);
        let t0 = Instant::now();
        let r = rates.rate_of("k");
        for _ in 0..10 {
            assert!(r.take(t0).is_ok());
        }
        let wait = r.take(t0).expect_err("past the burst");
        assert_eq!(wait, Duration::from_millis(1));
        let t1 = t0 + Duration::from_millis(1);
        assert!(r.take(t1).is_ok());
        assert!(r.take(t1).is_err());
        // Over a second of takes every 10 µs: the burst and 1 000 more.
        let mut ok = 0;
        for i in 0..100_000u64 {
            if r.take(t1 + Duration::from_micros(10 * i)).is_ok() {
                ok += 1;
            }
        }
        assert!((999..=1001).contains(&ok), "{ok} allowed in a second");
    }

    #[test]
    fn a_key_rate_decides_as_the_token_bucket_does() {
        let rate = Rate::new(100.0, 5.0);
        let mut bucket = Limiter::new(rate, 10);
        let rates = KeyRates::new(rate, 10);
        let t0 = Instant::now();
        let mut t = t0;
        let (mut ok, mut refused) = (0, 0);
        // Bursts and gaps off the 10 ms grid, so no take sits on a boundary
        // where float and integer clocks may round apart.
        for i in 0..5000u64 {
            t += Duration::from_micros(if i % 50 < 40 { 130 } else { 7_300 });
            let a = bucket.take("k", t).is_ok();
            let b = rates.take("k", t).is_ok();
            assert_eq!(a, b, "take {i} at {:?}", t - t0);
            if a {
                ok += 1;
            } else {
                refused += 1;
            }
        }
        assert!(ok > 100 && refused > 100, "{ok} allowed, {refused} refused");
    }

    #[test]
    fn every_session_of_a_key_takes_from_one_rate() {
        let rates = KeyRates::new(Rate::new(1.0, 5.0), 100);
        let t0 = Instant::now();
        let (a, b) = (rates.rate_of("k"), rates.rate_of("k"));
        let other = rates.rate_of("other");
        for _ in 0..3 {
            assert!(a.take(t0).is_ok());
        }
        for _ in 0..2 {
            assert!(b.take(t0).is_ok());
        }
        assert!(a.take(t0).is_err() && b.take(t0).is_err());
        assert!(rates.take("k", t0).is_err(), "HTTP's lookup shares it too");
        assert!(other.take(t0).is_ok(), "another key has its own");
    }

    #[test]
    fn concurrent_takes_never_pass_the_burst() {
        let rates = KeyRates::new(Rate::new(1.0, 1000.0), 100);
        let t0 = Instant::now();
        let allowed = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                let r = rates.rate_of("k");
                let allowed = &allowed;
                s.spawn(move || {
                    for _ in 0..20_000 {
                        if r.take(t0).is_ok() {
                            allowed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(allowed.into_inner(), 1000);
    }

    #[test]
    fn a_rate_a_session_holds_survives_a_full_table() {
        let rates = KeyRates::new(Rate::new(1.0, 2.0), 2);
        let t0 = Instant::now();
        let held = rates.rate_of("held");
        assert!(held.take(t0).is_ok() && held.take(t0).is_ok());
        // Busy keys nobody holds fill the table again and again.
        for i in 0..10 {
            assert!(rates.take(&format!("k{i}"), t0).is_ok());
        }
        assert!(rates.len() <= 3, "{} keys remembered", rates.len());
        // Still the same bucket: not forgotten and refilled.
        assert!(rates.rate_of("held").take(t0).is_err());
        assert!(held.take(t0).is_err());
        drop(held);
        // Idle and no longer held: forgotten when room is needed.
        let later = t0 + Duration::from_secs(10);
        assert!(rates.take("new", later).is_ok());
        assert!(rates.take("newer", later).is_ok());
        assert!(rates.rate_of("held").take(later).is_ok());
    }

    #[test]
    fn a_take_timed_before_another_sessions_is_not_refused() {
        // Sessions read the clock once per run of frames: one may take at
        // an instant a little before one another session already took at.
        for rate in [Rate::new(50_000.0, 100_000.0), Rate::new(1e12, 1e12)] {
            let rates = KeyRates::new(rate, 10);
            let t0 = Instant::now() + Duration::from_secs(1);
            let (a, b) = (rates.rate_of("k"), rates.rate_of("k"));
            assert!(a.take(t0 + Duration::from_millis(1)).is_ok());
            assert!(b.take(t0).is_ok(), "{rate:?}");
        }
    }
}
