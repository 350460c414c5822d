//! The connection actor: dials (see [`crate::dial`]), registers, serves the
//! control stream, reconnects with backoff, follows redirects and re-homes.
//! What the protocol means lives in the sans-IO [`crate::session`] core;
//! this actor only moves frames between it, the link and the control side.

use crate::dial::{ConnectError, Dialer, Link};
use crate::session::{Cmd, Effects, End, SessionCore};
use crate::tls::VerifyNote;
use crate::{ConnState, DaemonError, Shared};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use swb_wire::{close, Code, Frame, Refusal, RelayRecord};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::{debug, info, warn};

/// Most commands taken from the queue for one write to the relay.
const CMD_BATCH: usize = 256;
/// How long a stopping daemon waits for its endpoints to say goodbye.
const CLOSE_LINGER: Duration = Duration::from_millis(500);

/// Capped exponential backoff with jitter: attempt n waits a random time in
/// `[d/2, d]` where `d = min(max, min * 2^n)`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn delay(&self, attempt: u32, rand01: f64) -> Duration {
        let exp = self.min.saturating_mul(1u32 << attempt.min(20));
        let d = exp.min(self.max);
        d.mul_f64(0.5 + 0.5 * rand01.clamp(0.0, 1.0))
    }
}

/// How serving one connection ended.
enum Served {
    /// The daemon is stopping.
    Shutdown,
    /// The session ended (see [`End`]).
    Ended(End),
}

struct Actor {
    shared: Arc<Shared>,
    cmd_rx: mpsc::Receiver<Cmd>,
    core: SessionCore,
    dialer: Dialer,
    /// The relay to try next (a redirect, or the next one on the ring).
    next: Option<RelayRecord>,
}

/// Runs until shutdown or a fatal refusal.
pub(crate) async fn run(
    shared: Arc<Shared>,
    cmd_rx: mpsc::Receiver<Cmd>,
    tls: rustls::ClientConfig,
    note: VerifyNote,
    cancel: CancellationToken,
) -> Result<(), DaemonError> {
    let dialer = Dialer::new(shared.config.clone(), tls, note)?;
    let mut actor = Actor {
        shared,
        cmd_rx,
        core: SessionCore::default(),
        dialer,
        next: None,
    };
    let res = actor.run(cancel).await;
    let error = match &res {
        Ok(()) => None,
        Err(e) => Some(e.to_string()),
    };
    actor
        .shared
        .state
        .send_replace(ConnState::Stopped { error });
    actor.core.fail_pending(&Refusal::new(
        Code::SHUTTING_DOWN,
        "the daemon stopped before the relay answered; the message was not confirmed",
    ));
    for ep in actor.dialer.take_endpoints() {
        ep.close(close::NORMAL.into(), b"daemon stopping");
        let _ = tokio::time::timeout(CLOSE_LINGER, ep.wait_idle()).await;
    }
    res
}

impl Actor {
    fn publish_pending(&self) {
        self.shared
            .pending_sends
            .store(self.core.pending_sends(), Ordering::Relaxed);
    }

    async fn run(&mut self, cancel: CancellationToken) -> Result<(), DaemonError> {
        let backoff = Backoff {
            min: self.shared.config.backoff_min,
            max: self.shared.config.backoff_max,
        };
        let relays = self.shared.config.relays.clone();
        let mut attempts = 0u32;
        let mut last_logged: Option<String> = None;
        let mut relay_idx = 0usize;
        loop {
            let target = self.next.take();
            let relay = match &target {
                Some(r) => r.addrs.first().cloned().unwrap_or_default(),
                None => relays[relay_idx % relays.len()].clone(),
            };
            let attempt = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                r = self.dialer.connect(&relay, target.as_ref()) => r,
            };
            let err = match attempt {
                Ok((link, welcome)) => {
                    self.shared.metrics.connects.inc();
                    if attempts > 0 {
                        info!(relay = %relay, attempts, "reconnected to relay");
                    } else {
                        info!(relay = %relay, addr = %link.addr, ns = %welcome.namespace, "connected to relay");
                    }
                    attempts = 0;
                    let home = (welcome.namespace.clone(), welcome.relay_id.clone());
                    *self.shared.conn.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(link.conn.clone());
                    self.shared.state.send_replace(ConnState::Connected {
                        relay: relay.clone(),
                        welcome,
                        since: SystemTime::now(),
                    });
                    // Streams peers open to us, and our status published
                    // again, live as long as this connection.
                    let streams_stop = cancel.child_token();
                    let streams = tokio::spawn(self.shared.tasks.track_future({
                        let shared = self.shared.clone();
                        let conn = link.conn.clone();
                        let stop = streams_stop.clone();
                        async move {
                            let republish = async {
                                tokio::select! {
                                    _ = crate::status::republish(&shared) => {}
                                    _ = stop.cancelled() => {}
                                }
                            };
                            tokio::join!(
                                crate::streams::accept_loop(shared.clone(), conn, stop.clone()),
                                republish
                            );
                        }
                        .instrument(tracing::Span::current())
                    }));
                    let served = self.serve(link, &cancel).await;
                    streams_stop.cancel();
                    let _ = streams.await;
                    *self.shared.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    let end = match served {
                        Served::Shutdown => return Ok(()),
                        Served::Ended(end) => end,
                    };
                    match end {
                        End::Fatal(r) => {
                            let e = DaemonError::Refused(r);
                            warn!("{e}");
                            return Err(e);
                        }
                        End::Redirect(r) => {
                            self.shared.metrics.reconnects.inc();
                            info!(home = %r.id, "the mesh changed: moving to the new home relay");
                            self.next = Some(r);
                            continue;
                        }
                        End::Lost(why) => {
                            self.shared.metrics.reconnects.inc();
                            warn!(relay = %relay, "lost connection to relay: {why}; reconnecting");
                            last_logged = Some(why.clone());
                            // Re-home: the next live relay on the ring takes over.
                            self.next =
                                self.core
                                    .successor(&home.0, &self.shared.config.name, &home.1);
                            why
                        }
                    }
                }
                Err(ConnectError::Redirect(r)) => {
                    debug!(home = %r.id, "redirected to the home relay");
                    self.next = Some(r);
                    if !self.core.redirected() {
                        continue;
                    }
                    // Relays disagree about the mesh for now: back off.
                    attempts += 1;
                    format!(
                        "redirected {} times in a row (the mesh is changing)",
                        self.core.redirects()
                    )
                }
                Err(ConnectError::Fatal(e)) => {
                    warn!("{e}");
                    return Err(e);
                }
                Err(ConnectError::Retry(why)) => {
                    self.shared.metrics.connect_failures.inc();
                    // Log a failure once, not per retry; a new kind of failure is news.
                    if last_logged.as_deref() != Some(why.as_str()) {
                        warn!(relay = %relay, "cannot reach relay: {why}; retrying with backoff");
                        last_logged = Some(why.clone());
                    } else {
                        debug!(relay = %relay, attempts, "still cannot reach relay: {why}");
                    }
                    attempts += 1;
                    relay_idx += 1;
                    why
                }
            };
            self.shared.state.send_replace(ConnState::Connecting {
                relay: relays[relay_idx % relays.len()].clone(),
                attempts,
                last_error: Some(err),
            });
            let delay = backoff.delay(attempts, fastrand::f64());
            let until = tokio::time::Instant::now() + delay;
            // Keep absorbing commands while waiting, so CLI calls don't block.
            loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep_until(until) => break,
                    cmd = self.cmd_rx.recv() => match cmd {
                        Some(c) => {
                            // Frames are written on the next connection.
                            let _ = self.core.absorb(c);
                            self.publish_pending();
                        }
                        None => return Ok(()),
                    },
                }
            }
        }
    }

    /// Reports what handling frames changed.
    fn apply(&self, fx: Effects) {
        let m = &self.shared.metrics;
        if fx.accepted > 0 {
            m.sends
                .with_label_values(&["accepted"])
                .inc_by(fx.accepted as u64);
        }
        if fx.refused > 0 {
            m.sends
                .with_label_values(&["refused"])
                .inc_by(fx.refused as u64);
        }
        if fx.received > 0 {
            m.received.inc_by(fx.received as u64);
            self.shared.inbox_gen.send_modify(|g| *g += 1);
        }
        if fx.map_changed {
            self.shared
                .relay_count
                .store(self.core.relay_count(), Ordering::Relaxed);
        }
        self.publish_pending();
    }

    /// Handles every complete frame in the read buffer.
    fn drain(&mut self, link: &mut Link, out: &mut Vec<Frame>) -> Result<(), End> {
        let mut fx = Effects::default();
        let r = loop {
            match link.reader.next_frame() {
                Ok(Some(f)) => {
                    let mut inbox = self.shared.inbox();
                    if let Err(end) = self.core.on_frame(f, &mut inbox, out, &mut fx) {
                        link.conn.close(close::NORMAL.into(), b"goodbye");
                        break Err(end);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(End::Lost(format!("relay sent bad data: {e}"))),
            }
        };
        self.apply(fx);
        r
    }

    async fn serve(&mut self, mut link: Link, cancel: &CancellationToken) -> Served {
        // Resend what the previous connection left unanswered, and acks.
        let first = self.core.on_connected();
        self.publish_pending();
        if let Err(e) = link.write(&first).await {
            return Served::Ended(End::Lost(e.to_string()));
        }
        // Frames that arrived together with the Welcome (mail held while
        // this peer was away) are already buffered.
        let mut out = Vec::new();
        if let Err(end) = self.drain(&mut link, &mut out) {
            return Served::Ended(end);
        }
        if !out.is_empty() {
            if let Err(e) = link.write(&out).await {
                return Served::Ended(End::Lost(e.to_string()));
            }
        }
        loop {
            // Ranked: shutdown, then local commands, then relay frames.
            let out: Vec<Frame> = tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    link.conn.close(close::NORMAL.into(), b"daemon stopping");
                    return Served::Shutdown;
                }
                cmd = self.cmd_rx.recv() => match cmd {
                    None => return Served::Shutdown,
                    Some(c) => {
                        let mut out: Vec<Frame> = self.core.absorb(c).into_iter().collect();
                        // Whatever else is queued goes out in the same write.
                        while out.len() < CMD_BATCH {
                            match self.cmd_rx.try_recv() {
                                Ok(c) => out.extend(self.core.absorb(c)),
                                Err(_) => break,
                            }
                        }
                        out.extend(self.core.take_acks());
                        self.publish_pending();
                        out
                    }
                },
                r = link.read_some() => {
                    if let Err(e) = r {
                        return Served::Ended(End::Lost(e.to_string()));
                    }
                    let mut out = Vec::new();
                    if let Err(end) = self.drain(&mut link, &mut out) {
                        return Served::Ended(end);
                    }
                    out
                }
            };
            if !out.is_empty() {
                if let Err(e) = link.write(&out).await {
                    return Served::Ended(End::Lost(e.to_string()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(50));
        assert_eq!(b.delay(3, 1.0), Duration::from_millis(800));
        assert_eq!(b.delay(30, 1.0), Duration::from_secs(5));
        assert_eq!(b.delay(30, 0.0), Duration::from_millis(2500));
    }
}
