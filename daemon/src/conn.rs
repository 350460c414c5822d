//! The connection actor: dials (see [`crate::dial`]), registers, serves the
//! control stream, reconnects with backoff, follows redirects and re-homes.
//! What the protocol means lives in the sans-IO [`crate::session`] core;
//! this actor only moves frames between it, the link and the control side.

use crate::dial::{ConnectError, Dialer, Link, LinkError};
use crate::session::{Cmd, Effects, End, SessionCore};
use crate::tls::VerifyNote;
use crate::{ConnState, DaemonError, Shared};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use swb_wire::{close, Code, Frame, Refusal, RelayRecord, Welcome};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::{debug, info, warn};

/// Most commands taken from the queue for one write to the relay.
const CMD_BATCH: usize = 256;
/// How long a stopping daemon waits for its endpoints to say goodbye.
const CLOSE_LINGER: Duration = Duration::from_millis(500);
/// How often a connection's health is looked at: the route to the relay,
/// and whether the relay has been heard.
const WATCH_TICK: Duration = Duration::from_millis(250);
/// How long each step of a probe of the next relay (handshake, welcome)
/// may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The wait between probes while the relay stays silent.
const PROBE_AGAIN: Duration = Duration::from_millis(500);
/// For this long after a relay went silent, a redirect back to it (another
/// relay has not noticed yet) is answered by asking that relay again, not
/// by dialing the silent one.
const SILENT_RELAY_AVOID: Duration = Duration::from_secs(10);

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
    /// The relay went silent and the next one welcomed this peer on a new
    /// connection, already registered: serve that one.
    Moved {
        // Boxed: the other outcomes are small.
        link: Box<Link>,
        welcome: Welcome,
        relay: String,
    },
}

/// A relay that went silent: another relay that still names it home has
/// not noticed yet — unless the record is of a newer incarnation (it
/// restarted).
struct Silent {
    id: String,
    incarnation: Option<u64>,
    at: tokio::time::Instant,
}

impl Silent {
    fn new(id: &str, core: &SessionCore) -> Self {
        Self {
            id: id.to_string(),
            incarnation: core.incarnation(id),
            at: tokio::time::Instant::now(),
        }
    }

    /// Whether a redirect to `r` points back at this relay as it was.
    fn is(&self, r: &RelayRecord) -> bool {
        self.id == r.id
            && self.incarnation.is_none_or(|i| i >= r.incarnation)
            && self.at.elapsed() < SILENT_RELAY_AVOID
    }
}

/// A connection attempt running beside the session it may replace.
type Probe = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(Link, Welcome), ConnectError>> + Send>,
>;

/// What the health watch decided on one look.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Look {
    /// Move to a fresh UDP socket.
    rebind: bool,
    /// Start a probe of the next relay.
    probe: bool,
    /// The relay was heard again: a running probe is not needed.
    heard: bool,
}

/// Watches one connection's health, sans-IO: fed the connection's count of
/// received datagrams, the local address the route to the relay picks, and
/// `now`; says when to rebind the socket and when to probe the next relay.
#[derive(Debug)]
struct Watch {
    silence_probe: Duration,
    rx: u64,
    heard: tokio::time::Instant,
    route: Option<std::net::IpAddr>,
    /// Rebound once already during this silence.
    rebound: bool,
    /// No probe before this.
    next_probe: tokio::time::Instant,
}

impl Watch {
    fn new(
        silence_probe: Duration,
        route: Option<std::net::IpAddr>,
        now: tokio::time::Instant,
    ) -> Self {
        Self {
            silence_probe,
            rx: 0,
            heard: now,
            route,
            rebound: false,
            next_probe: now,
        }
    }

    /// How long the relay has been silent.
    fn silent(&self, now: tokio::time::Instant) -> Duration {
        now.saturating_duration_since(self.heard)
    }

    fn look(
        &mut self,
        rx: u64,
        route: Option<std::net::IpAddr>,
        probing: bool,
        now: tokio::time::Instant,
    ) -> Look {
        let mut l = Look::default();
        if rx != self.rx {
            self.rx = rx;
            self.heard = now;
            self.rebound = false;
            l.heard = true;
        }
        if route != self.route {
            self.route = route;
            // A new source address (another interface, a new DHCP lease):
            // move now rather than wait for the relay to go quiet. No
            // route at all: nothing to move to yet.
            l.rebind = route.is_some();
        }
        if self.silent(now) >= self.silence_probe {
            if !self.rebound {
                self.rebound = true;
                l.rebind = true;
            }
            if !probing && now >= self.next_probe {
                l.probe = true;
            }
        }
        l
    }

    /// A probe ended without moving: the next one waits a little.
    fn probed(&mut self, now: tokio::time::Instant) {
        self.next_probe = now + PROBE_AGAIN;
    }
}

struct Actor {
    shared: Arc<Shared>,
    cmd_rx: mpsc::Receiver<Cmd>,
    core: SessionCore,
    dialer: Dialer,
    /// The relay to try next (a redirect, or the next one on the ring).
    next: Option<RelayRecord>,
    /// A connection already registered (a probe that moved us): served
    /// next instead of dialing, with the address it was dialed at.
    ready: Option<(Link, Welcome, String)>,
    /// The relay that last went silent, and when.
    silent: Option<Silent>,
    /// Connections served so far: the number of the current one.
    link_gen: u64,
    /// Sends taken from the queue and not written yet (see
    /// [`crate::outbound`]).
    unwritten: usize,
    /// Room for the sends callers registered, taken from
    /// [`crate::outbound::Outbound`] (kept between takes).
    registered: Vec<Cmd>,
}

/// Registered sends [`Actor::registered`] keeps room for between takes.
const REGISTERED_ROOM: usize = 64;

/// Runs until shutdown or a fatal refusal.
pub(crate) async fn run(
    shared: Arc<Shared>,
    cmd_rx: mpsc::Receiver<Cmd>,
    tls: rustls::ClientConfig,
    note: VerifyNote,
    cancel: CancellationToken,
) -> Result<(), DaemonError> {
    let dialer = Dialer::new(shared.config.clone(), tls, note, shared.paths.clone())?;
    let mut actor = Actor {
        cmd_rx,
        core: SessionCore::new(shared.out.reqs()),
        shared,
        dialer,
        next: None,
        ready: None,
        silent: None,
        link_gen: 0,
        unwritten: 0,
        registered: Vec::new(),
    };
    let res = actor.run(cancel).await;
    let error = match &res {
        Ok(()) => None,
        Err(e) => Some(e.to_string()),
    };
    actor.shared.set_state(ConnState::Stopped { error });
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

/// Marks what an acknowledgement names as acknowledged in the inbox. Here,
/// on the actor's side, and not where the application acknowledged: the
/// inbox's sets are then written by the thread that reads them for every
/// delivery, not by two threads taking turns with their cache lines.
/// Until then the messages stay known, so a redelivery meanwhile is
/// dropped as a duplicate (and this acknowledgement is still sent).
fn mark_acked(shared: &Shared, cmd: &Cmd) {
    if let Cmd::Ack(acked) | Cmd::AckWritten(acked) = cmd {
        shared.inbox().acked(acked.iter().copied());
    }
}

impl Actor {
    /// A command, taken while connection `current` is served (if any);
    /// the frames to write for it go to `out`.
    fn absorb(&mut self, cmd: Cmd, current: Option<u64>, out: &mut Vec<Frame>) {
        self.unwritten += usize::from(queued(&cmd));
        mark_acked(&self.shared, &cmd);
        self.core.absorb(cmd, current, out);
    }

    /// Files the sends callers wrote themselves (on connection `current`,
    /// if it is still the one served) since the last call.
    fn file_registered(&mut self, current: Option<u64>, out: &mut Vec<Frame>) {
        let mut registered = std::mem::take(&mut self.registered);
        self.shared.out.take_registered(&mut registered);
        let taken = registered.len();
        for cmd in registered.drain(..) {
            self.absorb(cmd, current, out);
        }
        // Room a burst grew is kept while sends come as fast, not once
        // they slow down (the list and this buffer trade places at every
        // take, so both shrink).
        if taken < REGISTERED_ROOM && registered.capacity() > REGISTERED_ROOM {
            registered = Vec::new();
        }
        self.registered = registered;
    }

    /// Everything absorbed so far was written (or dropped, unwanted).
    fn settle(&mut self) {
        self.shared.out.written(std::mem::take(&mut self.unwritten));
    }

    /// Writes the actor's frames; then everything absorbed is written.
    async fn write(&mut self, link: &Link, frames: &[Frame]) -> Result<(), End> {
        if frames.is_empty() {
            return Ok(());
        }
        match self.shared.out.write(frames).await {
            Ok(()) => {
                self.settle();
                Ok(())
            }
            Err(e) => Err(End::Lost(lost(link, e))),
        }
    }

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
            let (relay, attempt) = match self.ready.take() {
                Some((link, welcome, relay)) => (relay, Ok((link, welcome))),
                None => {
                    let relay = match &target {
                        Some(r) => r.addrs.first().cloned().unwrap_or_default(),
                        None => relays[relay_idx % relays.len()].clone(),
                    };
                    // Commands are taken while dialing too (sends wait
                    // for the connection, and `status` counts them).
                    let mut connect = Box::pin(self.dialer.connect(&relay, target.as_ref()));
                    let attempt = 'dial: loop {
                        tokio::select! {
                            biased;
                            _ = cancel.cancelled() => return Ok(()),
                            r = &mut connect => break 'dial r,
                            cmd = self.cmd_rx.recv() => match cmd {
                                Some(c) => {
                                    // (Fields apart: `connect` holds the dialer.)
                                    self.unwritten += usize::from(queued(&c));
                                    mark_acked(&self.shared, &c);
                                    // Written on the connection, when it comes.
                                    self.core.absorb(c, None, &mut Vec::new());
                                    self.shared
                                        .pending_sends
                                        .store(self.core.pending_sends(), Ordering::Relaxed);
                                }
                                None => return Ok(()),
                            },
                        }
                    };
                    drop(connect);
                    (relay, attempt)
                }
            };
            // A busy relay's own idea of when to come back, if it gave one.
            let mut hinted = None;
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
                    self.shared.set_state(ConnState::Connected {
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
                    let served = self.serve(link, &relay, &home, &cancel).await;
                    // Done with, however it ended (closed already as a
                    // rule): a caller's write still waiting on it ends too.
                    let done = self
                        .shared
                        .conn
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take();
                    if let Some(conn) = done {
                        conn.close(close::NORMAL.into(), b"reconnecting");
                    }
                    // Sends queue for the actor again until the next one.
                    self.shared.out.remove().await;
                    // What callers wrote on it is unanswered: the next
                    // connection starts with it.
                    self.file_registered(None, &mut Vec::new());
                    self.publish_pending();
                    streams_stop.cancel();
                    let _ = streams.await;
                    let end = match served {
                        Served::Shutdown => return Ok(()),
                        Served::Ended(end) => end,
                        Served::Moved {
                            link,
                            welcome,
                            relay: to,
                        } => {
                            self.shared.metrics.reconnects.inc();
                            info!(silent = %home.1, home = %welcome.relay_id, "relay went silent: moved to the relay that is home now");
                            self.silent = Some(Silent::new(&home.1, &self.core));
                            self.ready = Some((*link, welcome, to));
                            continue;
                        }
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
                        // Moved with no probe of its own running: a
                        // connection of this daemon the relay took late.
                        End::Lost(why) | End::Moved(Refusal { message: why, .. }) => {
                            self.shared.metrics.reconnects.inc();
                            warn!(relay = %relay, "lost connection to relay: {why}; reconnecting");
                            last_logged = Some(why.clone());
                            self.silent = Some(Silent::new(&home.1, &self.core));
                            // Re-home: the next live relay on the ring takes over.
                            self.next =
                                self.core
                                    .successor(&home.0, &self.shared.config.name, &home.1);
                            why
                        }
                    }
                }
                Err(ConnectError::Redirect(r))
                    if self.silent.as_ref().is_some_and(|s| s.is(&r)) =>
                {
                    // The relay we asked has not noticed yet that our old
                    // home went silent: ask it again shortly.
                    self.next = target;
                    attempts += 1;
                    format!(
                        "relay {relay} still names {} home, which went silent; asking again",
                        r.id
                    )
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
                Err(ConnectError::Busy(why, wait)) => {
                    // Same relay (it is up, only full), when it asked: a
                    // random point of its window, so the clients it refused
                    // together do not come back together.
                    self.shared.metrics.connect_failures.inc();
                    debug!(relay = %relay, attempts, ?wait, "relay busy: {why}");
                    attempts += 1;
                    hinted = Some(wait.mul_f64(fastrand::f64()));
                    format!("{why} (the relay is busy; retrying within {wait:?})")
                }
            };
            self.shared.set_state(ConnState::Connecting {
                relay: relays[relay_idx % relays.len()].clone(),
                attempts,
                last_error: Some(err),
            });
            let delay = hinted.unwrap_or_else(|| backoff.delay(attempts, fastrand::f64()));
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
                            self.absorb(c, None, &mut Vec::new());
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
                Ok(Some(Frame::TunAnswer(a))) => match a {
                    swb_wire::TunAnswer::Assigned(a) => {
                        crate::tun::assigned(&self.shared, &a, &link.conn)
                    }
                    swb_wire::TunAnswer::Refused(r) => {
                        crate::tun::off(&self.shared, format!("the relay refused: {r}"), false)
                    }
                },
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

    /// Where a probe goes when the relay `home` went silent: the next relay
    /// on our name's ring (its record), or — alone in the mesh — the same
    /// relay again on a new connection (it may have restarted).
    fn probe(&self, relay: &str, home: &(String, String)) -> Probe {
        let target = self
            .core
            .successor(&home.0, &self.shared.config.name, &home.1);
        let addr = match &target {
            Some(r) => r.addrs.first().cloned().unwrap_or_default(),
            None => relay.to_string(),
        };
        let mut dialer = self.dialer.clone();
        Box::pin(async move {
            dialer
                .connect_within(&addr, target.as_ref(), PROBE_TIMEOUT)
                .await
        })
    }

    /// Moves the session's endpoint to a fresh socket (see [`Dialer::rebind`]).
    fn rebind(&mut self, link: &Link, why: &str) {
        match self.dialer.rebind(link.addr) {
            Ok(local) => {
                self.shared.metrics.rebinds.inc();
                info!(%local, "{why}: moved to a new UDP socket");
            }
            Err(e) => warn!("{why}, and no new UDP socket: {e}"),
        }
    }

    async fn serve(
        &mut self,
        mut link: Link,
        relay: &str,
        home: &(String, String),
        cancel: &CancellationToken,
    ) -> Served {
        // Resend what the previous connection left unanswered, and acks;
        // with TUN, ask for the addresses (the ones we had, if any).
        let mut first = self.core.on_connected();
        if crate::tun::wanted(&self.shared) {
            let want = self
                .shared
                .tun
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|t| t.index());
            first.push(Frame::TunJoin(swb_wire::TunJoin { want }));
        }
        self.publish_pending();
        let Some(send) = link.take_send() else {
            return Served::Ended(End::Lost("the control stream was taken".into()));
        };
        self.link_gen += 1;
        let current = Some(self.link_gen);
        // From here, callers may write their sends themselves.
        if let Err(e) = self.shared.out.install(self.link_gen, send, &first).await {
            return Served::Ended(End::Lost(lost(&link, e)));
        }
        self.settle();
        // Frames that arrived together with the Welcome (mail held while
        // this peer was away) are already buffered.
        let mut out = Vec::new();
        if let Err(end) = self.drain(&mut link, &mut out) {
            return Served::Ended(end);
        }
        if let Err(end) = self.write(&link, &out).await {
            return Served::Ended(end);
        }
        let now = tokio::time::Instant::now();
        let mut watch = Watch::new(
            self.shared.config.silence_probe,
            crate::dial::local_route(link.addr),
            now,
        );
        let mut tick = tokio::time::interval(WATCH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe: Option<Probe> = None;
        let mut probe_failed = false;
        // Armed once for the session, not made and dropped every turn (each
        // took a lock to register and another to unregister).
        let mut cancelled = std::pin::pin!(cancel.cancelled());
        loop {
            // Ranked: shutdown, then local commands, then relay frames.
            let out: Vec<Frame> = tokio::select! {
                biased;
                () = &mut cancelled => {
                    link.conn.close(close::NORMAL.into(), b"daemon stopping");
                    return Served::Shutdown;
                }
                r = async { probe.as_mut().expect("guarded by is_some").await }, if probe.is_some() => {
                    probe = None;
                    watch.probed(tokio::time::Instant::now());
                    match r {
                        Ok((new, welcome)) => {
                            link.conn.close(close::NORMAL.into(), b"moved: the relay went silent");
                            let relay = new.addr.to_string();
                            return Served::Moved { link: Box::new(new), welcome, relay };
                        }
                        Err(ConnectError::Redirect(r)) if r.id == home.1 => {
                            debug!("the next relay still names {} home: waiting", r.id);
                        }
                        Err(ConnectError::Redirect(r)) => {
                            link.conn.close(close::NORMAL.into(), b"redirected");
                            return Served::Ended(End::Redirect(r));
                        }
                        Err(ConnectError::Retry(why) | ConnectError::Busy(why, _)) => {
                            debug!("probe: {why}")
                        }
                        // Not ours to stop on (the session still stands),
                        // but worth saying once per silence.
                        Err(ConnectError::Fatal(e)) if !probe_failed => {
                            probe_failed = true;
                            warn!("asking the next relay failed: {e}");
                        }
                        Err(ConnectError::Fatal(e)) => debug!("probe: {e}"),
                    }
                    Vec::new()
                }
                _ = tick.tick() => {
                    let now = tokio::time::Instant::now();
                    let rx = link.conn.stats().udp_rx.datagrams;
                    let route = crate::dial::local_route(link.addr);
                    let look = watch.look(rx, route, probe.is_some(), now);
                    if look.heard {
                        probe_failed = false;
                        if probe.take().is_some() {
                            debug!("the relay answered again: probe dropped");
                        }
                    }
                    if look.rebind {
                        let why = if watch.silent(now) >= watch.silence_probe {
                            format!("relay {} silent for {:.1} s", home.1, watch.silent(now).as_secs_f64())
                        } else {
                            "the local address changed".to_string()
                        };
                        self.rebind(&link, &why);
                    }
                    // Silent on UDP: the TCP carrier first, then another relay.
                    if look.probe && !self.shared.paths.hold_probe(link.addr, now) {
                        probe = Some(self.probe(relay, home));
                    }
                    Vec::new()
                }
                cmd = self.cmd_rx.recv() => match cmd {
                    None => return Served::Shutdown,
                    Some(c) => {
                        let mut out = Vec::new();
                        // Filed in the order their callers sent them.
                        self.file_registered(current, &mut out);
                        self.absorb(c, current, &mut out);
                        // Whatever else is queued goes out in the same write.
                        while out.len() < CMD_BATCH {
                            match self.cmd_rx.try_recv() {
                                Ok(c) => self.absorb(c, current, &mut out),
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
                    // Sends their callers wrote are registered before the
                    // relay can answer them: file them first.
                    let mut out = Vec::new();
                    self.file_registered(current, &mut out);
                    out.extend(self.core.take_acks());
                    if let Err(end) = self.drain(&mut link, &mut out) {
                        // This daemon attached again on another connection
                        // (the relay knows it by its instance): its running
                        // probe's, as a rule — wait for it. Without one, a
                        // probe's hello the relay read late: reconnect. (A
                        // `replaced` is another daemon's doing: this one
                        // stops.)
                        if let (End::Moved(_), Some(running)) = (&end, probe.as_mut()) {
                            link.conn.close(close::NORMAL.into(), b"moved to this daemon's probe");
                            return tokio::select! {
                                _ = cancel.cancelled() => Served::Shutdown,
                                r = running => moved_while_probing(r),
                            };
                        }
                        return Served::Ended(end);
                    }
                    out
                }
            };
            if let Err(end) = self.write(&link, &out).await {
                return Served::Ended(end);
            }
        }
    }
}

/// Whether `cmd` is a send its caller queued for the actor to write.
fn queued(cmd: &Cmd) -> bool {
    matches!(
        cmd,
        Cmd::Send { written: None, .. } | Cmd::SendBatch { written: None, .. }
    )
}

/// Why writing to `link` failed, in words (the connection's own reason if
/// it has one).
fn lost(link: &Link, e: LinkError) -> String {
    match e {
        LinkError::Lost(why) => link.lost(&why).to_string(),
        other => other.to_string(),
    }
}

/// The session moved while a probe ran (see [`Actor::serve`]): the probe's
/// connection, if it came up, is the session now. If it did not, the move
/// was the probe's all the same — its welcome lost or late — and the
/// daemon reconnects.
fn moved_while_probing(r: Result<(Link, Welcome), ConnectError>) -> Served {
    match r {
        Ok((new, welcome)) => {
            let relay = new.addr.to_string();
            Served::Moved {
                link: Box::new(new),
                welcome,
                relay,
            }
        }
        Err(ConnectError::Redirect(r)) => Served::Ended(End::Redirect(r)),
        Err(ConnectError::Retry(why) | ConnectError::Busy(why, _)) => Served::Ended(End::Lost(
            format!("moved while this daemon's probe ran, which did not finish: {why}"),
        )),
        Err(ConnectError::Fatal(e)) => Served::Ended(End::Lost(format!(
            "moved while this daemon's probe ran, which failed: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_relay_means_one_rebind_then_probes_until_heard() {
        let t0 = tokio::time::Instant::now();
        let ip = Some(std::net::IpAddr::from([192, 168, 1, 2]));
        let mut w = Watch::new(Duration::from_secs(3), ip, t0);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Heard now and then: nothing to do.
        assert_eq!(
            w.look(5, ip, false, at(1000)),
            Look {
                heard: true,
                ..Look::default()
            }
        );
        assert_eq!(w.look(5, ip, false, at(3900)), Look::default());
        // Three seconds of silence: rebind once and probe.
        let l = w.look(5, ip, false, at(4000));
        assert!(l.rebind && l.probe && !l.heard, "{l:?}");
        // Still silent, probe running: nothing new.
        assert_eq!(w.look(5, ip, true, at(4250)), Look::default());
        // The probe ended without a move: the next waits PROBE_AGAIN.
        w.probed(at(4300));
        assert_eq!(w.look(5, ip, false, at(4500)), Look::default());
        let l = w.look(5, ip, false, at(4800));
        assert!(
            l.probe && !l.rebind,
            "no second rebind in one silence: {l:?}"
        );
        // Heard again: the silence is over; a later one rebinds again.
        assert!(w.look(6, ip, true, at(5000)).heard);
        assert_eq!(w.look(6, ip, false, at(7000)), Look::default());
        let l = w.look(6, ip, false, at(8000));
        assert!(l.rebind && l.probe, "{l:?}");
    }

    #[test]
    fn a_new_local_address_rebinds_at_once_and_no_route_waits() {
        let t0 = tokio::time::Instant::now();
        let a = Some(std::net::IpAddr::from([192, 168, 1, 2]));
        let b = Some(std::net::IpAddr::from([192, 168, 1, 3]));
        let mut w = Watch::new(Duration::from_secs(3), a, t0);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(
            w.look(1, a, false, at(250)),
            Look {
                heard: true,
                ..Look::default()
            }
        );
        // The interface went away: no route, nothing to bind to yet.
        assert_eq!(w.look(1, None, false, at(500)), Look::default());
        // Another came up with another address: move now, not at 3 s.
        let l = w.look(1, b, false, at(750));
        assert!(l.rebind && !l.probe, "{l:?}");
        assert_eq!(
            w.look(2, b, false, at(1000)),
            Look {
                heard: true,
                ..Look::default()
            }
        );
    }

    #[test]
    fn a_redirect_back_to_the_silent_relay_is_not_followed_unless_it_restarted() {
        let rec = |id: &str, incarnation: u64| RelayRecord {
            id: id.into(),
            addrs: vec![format!("{id}:7443")],
            fingerprint: String::new(),
            incarnation,
        };
        let s = Silent {
            id: "r2".into(),
            incarnation: Some(7),
            at: tokio::time::Instant::now(),
        };
        assert!(s.is(&rec("r2", 7)), "the same relay, not yet noticed dead");
        assert!(!s.is(&rec("r2", 8)), "restarted: a newer incarnation");
        assert!(!s.is(&rec("r1", 7)), "another relay");
        let old = Silent {
            at: tokio::time::Instant::now() - SILENT_RELAY_AVOID,
            ..s
        };
        assert!(
            !old.is(&rec("r2", 7)),
            "long ago: the mesh would know by now"
        );
    }

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
