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
}
