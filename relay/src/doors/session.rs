//! The QUIC session door: one daemon connection after its TLS handshake —
//! `Hello`, authentication, registration, then an actor loop over the
//! control stream that handles sends and acks and flushes the mailbox.

use super::KEYS_REFRESH_GAP;
use crate::router::{Route, Router};
use crate::services::registry::SessionCtl;
use bytes::BytesMut;
use std::future::poll_fn;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use swb_wire::{
    close, Code, Frame, FrameReader, Limits, Preamble, Refusal, SendAccepted, SendRefused, Welcome,
    MAX_MESSAGE_BODY, PROTOCOL_VERSION,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};

/// Sends one session may have waiting for another relay's answer; more
/// are refused with `busy`.
const FORWARD_QUEUE: usize = 1024;
/// How long the last frame (a refusal, a goodbye) may take to go out.
const GOODBYE_FLUSH: Duration = Duration::from_secs(1);
/// How long the relay waits for the daemon to close after the last frame.
const GOODBYE_LINGER: Duration = Duration::from_secs(2);

/// Most messages delivered to a daemon and not yet acknowledged: the rest
/// waits in the mailbox (bounds the daemon's inbox; keeps it small and hot).
pub const DELIVERY_WINDOW: usize = 4096;

/// First allocation of a session's write buffer after each flush: a
/// frame of `DELIVERIES_PER_FRAME` (the registry's) messages of
/// 128 B fits, and fills it enough to go to QUIC without a copy.
const OUT_CHUNK: usize = 16 * 1024;

/// Bytes of mail bodies written per flush before yielding to other branches.
const FLUSH_BYTES: usize = 256 * 1024;

/// The time, read once for the frames handled together (a clock read
/// was a few per cent of a relay's work per message).
#[derive(Debug, Clone, Copy)]
struct Clock {
    at: tokio::time::Instant,
    wall_ms: u64,
}

impl Clock {
    fn now() -> Self {
        Self {
            at: tokio::time::Instant::now(),
            wall_ms: now_ms(),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

enum End {
    /// Peer closed or the connection failed: nothing more to say.
    Gone,
    /// The relay ends the session with this goodbye.
    Goodbye(Refusal),
    /// The peer broke the protocol.
    Protocol(String),
    /// The peer's home is another relay (the mesh changed, or it came to
    /// the wrong one): it goes there.
    Redirect(swb_wire::RelayRecord),
}

struct Io {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    reader: FrameReader,
    out: BytesMut,
    /// Sends accepted at once since the last flush, answered together in
    /// one `SendsAccepted` frame (taken whole at each flush: an idle
    /// session holds no capacity).
    accepted: Vec<swb_wire::Accepted>,
}

impl Io {
    /// Queues `f` after the answers accepted before it (frames keep the
    /// order they were made in; only runs of accepted sends merge).
    fn queue(&mut self, f: &Frame) -> Result<(), End> {
        self.queue_accepted()?;
        self.encode(f)
    }

    fn encode(&mut self, f: &Frame) -> Result<(), End> {
        if self.out.capacity() == 0 {
            // One allocation for a whole batch instead of growing it step by
            // step (this buffer is handed to QUIC whole at each flush).
            self.out.reserve(OUT_CHUNK);
        }
        f.encode(&mut self.out)
            .map_err(|e| End::Protocol(format!("cannot encode {:?}: {e}", f.frame_type())))
    }

    /// Answers a send accepted at once: with the others read in the same
    /// turn, in one frame at the next flush.
    fn accepted(&mut self, req: u64, online: bool) -> Result<(), End> {
        self.accepted.push(swb_wire::Accepted { req, online });
        if self.accepted.len() >= swb_wire::MAX_SENDS_ACCEPTED {
            self.queue_accepted()?;
        }
        Ok(())
    }

    /// Queues the answer to a send: an accepted one joins the run.
    fn answer(&mut self, reply: Frame) -> Result<(), End> {
        match reply {
            Frame::SendAccepted(a) => self.accepted(a.req, a.online),
            other => self.queue(&other),
        }
    }

    fn queue_accepted(&mut self) -> Result<(), End> {
        if self.accepted.is_empty() {
            return Ok(());
        }
        let accepted = std::mem::take(&mut self.accepted);
        self.encode(&Frame::SendsAccepted(swb_wire::SendsAccepted { accepted }))
    }

    async fn flush(&mut self, cancel: &CancellationToken) -> Result<(), End> {
        self.queue_accepted()?;
        if self.out.is_empty() {
            return Ok(());
        }
        // Take the buffer whole: `split` would leave its spare capacity
        // here for the life of the session (memory per idle client). QUIC
        // takes it without a copy if it is mostly full.
        let buf = swb_quic::outgoing(std::mem::take(&mut self.out));
        // The write first: it mostly completes at once, and then the wait
        // for cancellation is never armed (arming and disarming it takes a
        // lock each). A session cancelled meanwhile ends at its next turn.
        tokio::select! {
            biased;
            r = self.send.write_chunk(buf) => r.map_err(|e| {
                debug!("write failed: {e}");
                End::Gone
            }),
            () = cancel.cancelled() => Err(End::Gone),
        }
    }

    /// Reads until one frame is complete.
    async fn read_frame(&mut self) -> Result<Frame, End> {
        loop {
            if let Some(f) = self
                .reader
                .next_frame()
                .map_err(|e| End::Protocol(e.to_string()))?
            {
                return Ok(f);
            }
            self.read_some().await?;
        }
    }

    /// One read into the frame buffer. Cancel-safe.
    async fn read_some(&mut self) -> Result<(), End> {
        // Take what QUIC already buffered instead of holding a read buffer
        // of our own while the session idles (memory per idle client).
        if self.reader.buf().is_empty() && self.reader.buf().capacity() > 4096 {
            *self.reader.buf() = BytesMut::new();
        }
        match self.recv.read_chunk(64 * 1024, true).await {
            Ok(None) => Err(End::Gone),
            Ok(Some(c)) => {
                self.reader.buf().extend_from_slice(&c.bytes);
                Ok(())
            }
            Err(e) => {
                debug!("read failed: {e}");
                Err(End::Gone)
            }
        }
    }
}

/// Serves one daemon connection (TLS done, ALPN `swb/1`) to its end.
/// `started` is when its first packet arrived (for the handshake time).
pub(crate) async fn run(
    router: Arc<Router>,
    conn: quinn::Connection,
    permit: tokio::sync::OwnedSemaphorePermit,
    started: tokio::time::Instant,
    cancel: CancellationToken,
) {
    // The handshake's state lives on the heap only while it runs; the task
    // itself keeps just what an attached session needs (memory per idle
    // client).
    // Datagrams before the session joined TUN mode are discarded as they
    // come: none waits in quinn's buffer (bounded per connection, but
    // sized for a TUN session's bursts).
    // The attached session's state goes on the heap, not in this task:
    // whatever this future holds across an await it holds for the
    // session's life, and locals moved out of still keep their room.
    let a: Box<Attached> = {
        let handshake = Box::pin(open(&router, conn.clone(), permit, started, cancel));
        let a = tokio::select! {
            a = handshake => a,
            never = crate::limits::discard_datagrams(&conn, &router.services().metrics.tun.not_joined) => match never {},
        };
        drop(conn);
        match a {
            Some(a) => Box::new(a),
            None => return,
        }
    };
    let span = tracing::info_span!("session", ns = %a.ns, peer = %a.name, session = a.ctl.id, key = %a.key_id);
    attached(router, a).instrument(span).await;
}

/// A registered session, handed from the handshake to the serving loop.
struct Attached {
    conn: quinn::Connection,
    io: Io,
    ctl: Arc<SessionCtl>,
    ns: String,
    name: String,
    key_id: String,
    remote: std::net::SocketAddr,
    limits: crate::MailboxLimits,
    /// Subscribed before the home check, so a mesh change after the check
    /// is seen by `serve` (a later subscription would miss it and leave the
    /// peer attached at a relay that is no longer its home).
    live: tokio::sync::watch::Receiver<Arc<crate::placement::LiveSet>>,
}

fn failed(router: &Router, reason: &str) {
    router.services().metrics.handshake("failed", reason);
}

/// `Hello`, authentication and registration; `None` when the connection
/// ended on the way. Holds the handshake permit until it returns.
async fn open(
    router: &Arc<Router>,
    conn: quinn::Connection,
    permit: tokio::sync::OwnedSemaphorePermit,
    started: tokio::time::Instant,
    cancel: CancellationToken,
) -> Option<Attached> {
    let _permit = permit;
    let config = router.config();
    let metrics = &router.services().metrics;
    let hello_timeout = config.hello_timeout;
    let remote = conn.remote_address();
    let stream = tokio::select! {
        _ = cancel.cancelled() => {
            conn.close(close::NORMAL.into(), b"relay shutting down");
            return None;
        }
        s = tokio::time::timeout(hello_timeout, conn.accept_bi()) => s,
    };
    let (send, recv) = match stream {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!("no control stream: {e}");
            failed(router, "closed");
            return None;
        }
        Err(_) => {
            failed(router, "timeout");
            conn.close(
                close::PROTOCOL.into(),
                b"no control stream within the hello timeout",
            );
            return None;
        }
    };
    let mut io = Io {
        send,
        recv,
        reader: FrameReader::new(),
        out: BytesMut::with_capacity(1024),
        accepted: Vec::new(),
    };
    Preamble {
        version: PROTOCOL_VERSION,
    }
    .encode(&mut io.out);

    let hello = tokio::select! {
        _ = cancel.cancelled() => Err(End::Goodbye(Refusal::new(Code::SHUTTING_DOWN, "the relay is shutting down; reconnect shortly"))),
        r = tokio::time::timeout(hello_timeout, read_hello(&mut io)) => match r {
            Ok(r) => r,
            Err(_) => Err(End::Goodbye(Refusal::new(Code::TIMEOUT, format!("no Hello within {hello_timeout:?}")))),
        },
    };
    let hello = match hello {
        Ok(h) => h,
        Err(end) => {
            match &end {
                End::Goodbye(r) => metrics.handshake("refused", r.code.as_str()),
                End::Protocol(_) => metrics.handshake("refused", Code::PROTOCOL.as_str()),
                End::Gone | End::Redirect(_) => failed(router, "closed"),
            }
            finish(&conn, &mut io, end, true).await;
            return None;
        }
    };

    // Authenticate and register.
    let refuse = |code, msg: String| End::Goodbye(Refusal::new(code, msg));
    let checked = (|| {
        if hello.version != PROTOCOL_VERSION {
            return Err(refuse(
                Code::UNSUPPORTED_VERSION,
                format!(
                    "this relay speaks protocol version {PROTOCOL_VERSION}, the daemon {}; upgrade the older side",
                    hello.version
                ),
            ));
        }
        let mut verified = router.keys().store().verify(&hello.key);
        if verified == Err(crate::keys::AuthError::Unauthorized)
            && router.refresh_keys(KEYS_REFRESH_GAP)
        {
            // A key created moments ago works before the next poll.
            verified = router.keys().store().verify(&hello.key);
        }
        let info = verified.map_err(|e| match e {
            crate::keys::AuthError::Unauthorized => refuse(
                Code::UNAUTHORIZED,
                "the API key is not valid; check SWB_API_KEY or --api-key-file".into(),
            ),
            crate::keys::AuthError::Revoked => refuse(
                Code::KEY_REVOKED,
                "the API key was revoked; ask the relay's operator for a new key".into(),
            ),
        })?;
        let name = swb_wire::normalize_name(&hello.name)
            .map_err(|e| refuse(Code::BAD_NAME, format!("{e}: {:?}", hello.name)))?;
        if !info.may_use(&name) {
            return Err(refuse(
                Code::NAME_NOT_ALLOWED,
                format!(
                    "this API key may only use the names {}; not {name}",
                    info.names.join(", ")
                ),
            ));
        }
        Ok((info, name))
    })();
    let (info, name) = match checked {
        Ok(v) => v,
        Err(end) => {
            if let End::Goodbye(r) = &end {
                metrics.handshake("refused", r.code.as_str());
                // Anyone can send bad hellos: one line per 10 s at most
                // (the metrics count every one).
                static REFUSED_LOG: crate::limits::LogLimit =
                    crate::limits::LogLimit::new(std::time::Duration::from_secs(10));
                if let Some(suppressed) = REFUSED_LOG.allow() {
                    info!(%remote, code = %r.code, suppressed, "hello refused");
                }
            }
            finish(&conn, &mut io, end, true).await;
            return None;
        }
    };
    let ns = info.namespace.clone();
    // In a mesh, a peer attaches at its home relay; elsewhere it is sent on.
    let live = router.placement().live();
    if let Route::Remote(home) = router.route(&ns, &name) {
        debug!(%remote, %ns, peer = %name, home = %home.id, "redirected to its home relay");
        metrics.handshake("redirected", "home_elsewhere");
        finish(&conn, &mut io, End::Redirect((*home).clone()), true).await;
        return None;
    }
    let (ctl, replaced, limits) = {
        let registry = router.services().registry();
        let id = registry.next_session_id();
        let ctl = Arc::new(SessionCtl::new(
            id,
            info.id.clone(),
            remote,
            cancel,
            conn.clone(),
            hello.instance,
        ));
        let mut reg = registry.of(&ns, &name);
        let replaced = reg.attach(&ns, &name, ctl.clone());
        (ctl, replaced, reg.limits().clone())
    };
    match replaced {
        // The same daemon on a new connection (a reconnect the old one's
        // end has not reached yet, or its probe of a silent path).
        Some(old) if old.instance == hello.instance => {
            debug!(%ns, peer = %name, old = %old.remote, new = %remote, "session moved to a new connection of the same daemon");
            old.end_with(Refusal::new(
                Code::MOVED,
                format!(
                    "this daemon attached as {name} again (from {remote}); this connection ends"
                ),
            ));
        }
        Some(old) => {
            info!(%ns, peer = %name, old = %old.remote, new = %remote, "name taken over by another daemon");
            old.end_with(Refusal::new(
                Code::REPLACED,
                format!(
                    "another daemon attached as {name} (from {remote}); this one stops. Use a different --name on each machine"
                ),
            ));
        }
        None => {}
    }
    // Authenticated and registered: a session's flow-control budget.
    conn.set_receive_window(swb_quic::SESSION_RECEIVE_WINDOW.into());
    metrics.sessions.inc();
    metrics.handshake("accepted", "ok");
    metrics
        .handshake_seconds
        .observe(started.elapsed().as_secs_f64());
    Some(Attached {
        conn,
        io,
        ctl,
        ns,
        name,
        key_id: info.id.clone(),
        remote,
        limits,
        live,
    })
}

/// Serves a registered session to its end.
async fn attached(router: Arc<Router>, mut a: Box<Attached>) {
    info!(remote = %a.remote, "attached");
    // Nothing held across an await below is a temporary or a local it
    // need not be: this future lives as long as the session (memory per
    // idle client).
    let queued = {
        let welcome = welcome(&router, &a);
        a.io.queue(&welcome)
    };
    // Taken out through a call, so the box is freed now: moved out of in
    // place (`*a`), it would keep its allocation (~340 bytes) until `a`
    // goes out of scope — the session's end.
    let Attached {
        conn,
        mut io,
        ctl,
        ns,
        name,
        live,
        ..
    } = unbox(a);
    let queued = queued.and_then(|()| queue_relay_map(&router, &mut io));
    // Shared by the messages this session sends that wait in mailboxes.
    let name: Arc<str> = Arc::from(name);
    {
        let end = match queued {
            Ok(()) => serve(&router, &ctl, &conn, &mut io, &ns, &name, live).await,
            Err(e) => e,
        };
        router
            .services()
            .registry()
            .of(&ns, &name)
            .detach(&ns, &name, ctl.id);
        let end = match end {
            // A cancellation carries its reason in the ctl; none means shutdown.
            End::Gone if ctl.cancel.is_cancelled() => {
                End::Goodbye(ctl.end_reason().unwrap_or_else(|| {
                    Refusal::new(
                        Code::SHUTTING_DOWN,
                        "the relay is shutting down; the daemon reconnects by itself",
                    )
                }))
            }
            other => other,
        };
        match &end {
            End::Gone => debug!("detached"),
            End::Goodbye(r) => info!(code = %r.code, "session ended by relay"),
            End::Protocol(p) => info!("protocol error: {p}"),
            End::Redirect(r) => info!(home = %r.id, "moved to its new home relay"),
        }
        Box::pin(finish(&conn, &mut io, end, false)).await;
    }
}

/// The value out of its box, and the box freed.
#[allow(clippy::boxed_local)] // taking the box is the point: it is freed here
fn unbox<T>(b: Box<T>) -> T {
    *b
}

/// The `Welcome` that tells the daemon it is attached, and its limits.
fn welcome(router: &Router, a: &Attached) -> Frame {
    Frame::Welcome(Welcome {
        namespace: a.ns.clone(),
        name: a.name.clone(),
        relay_id: router.config().relay_id.clone(),
        session: a.ctl.id,
        server_time_ms: now_ms(),
        limits: Limits {
            max_message_body: MAX_MESSAGE_BODY as u32,
            mailbox_messages: a.limits.messages as u32,
            mailbox_bytes: a.limits.bytes as u64,
            message_ttl_secs: a.limits.ttl.as_secs(),
        },
    })
}

/// Queues the live relay map, page by page.
fn queue_relay_map(router: &Router, io: &mut Io) -> Result<(), End> {
    for page in router.placement().relay_map() {
        io.queue(&Frame::RelayMap(page))?;
    }
    Ok(())
}

async fn read_hello(io: &mut Io) -> Result<swb_wire::Hello, End> {
    loop {
        match io.reader.preamble() {
            Ok(Some(p)) => {
                if p.version != PROTOCOL_VERSION {
                    // Still read the Hello if it decodes; otherwise refuse by preamble.
                    return Err(End::Goodbye(Refusal::new(
                        Code::UNSUPPORTED_VERSION,
                        format!(
                            "this relay speaks protocol version {PROTOCOL_VERSION}, the daemon {}; upgrade the older side",
                            p.version
                        ),
                    )));
                }
                break;
            }
            Ok(None) => io.read_some().await?,
            Err(e) => return Err(End::Protocol(e.to_string())),
        }
    }
    match io.read_frame().await? {
        Frame::Hello(h) => Ok(h),
        other => Err(End::Protocol(format!(
            "expected Hello, got {:?}",
            other.frame_type()
        ))),
    }
}

/// A session's TUN addresses and its datagram pump; dropping it stops the
/// pump and takes the peer out of the relay's TUN table.
struct TunSession {
    services: Arc<crate::services::Services>,
    ns: String,
    index: u32,
    /// The allocator that gave `index` (`None`: this relay).
    allocator: Option<String>,
    session: u64,
    stop: CancellationToken,
}

impl Drop for TunSession {
    fn drop(&mut self) {
        self.stop.cancel();
        self.services.tun.leave(&self.ns, self.index, self.session);
    }
}

/// Most TUN calls (an index from the namespace's allocator, which may be a
/// mesh hop away) one session has waiting; past it the session reads no
/// further frames from its daemon until one is answered.
const TUN_CALLS: usize = 16;

/// What a TUN call brought back.
enum TunDone {
    /// A join's index (or why none), from `allocator` (`None`: this
    /// relay). `answer`: the daemon asked; a re-ask after a mesh change is
    /// answered only with new addresses.
    Joined {
        allocator: Option<String>,
        index: Result<(swb_tunnel::AddressPlan, u32), Refusal>,
        answer: bool,
    },
    /// A name's index, for the daemon's name responder.
    Resolved(swb_wire::TunResolved),
}

/// A session's TUN calls in flight: owned by its loop (they end with it),
/// answered in the order they were asked, while deliveries, sends and
/// acks go on.
type TunCalls = Ordered<std::pin::Pin<Box<dyn std::future::Future<Output = TunDone> + Send>>>;

/// A `FuturesOrdered` that exists only while it holds futures: made by the
/// first push, dropped once drained. `FuturesOrdered::new` allocates its
/// ready-to-run queue at once (~150 bytes), and every idle session would
/// otherwise keep two.
struct Ordered<F: std::future::Future>(Option<futures_util::stream::FuturesOrdered<F>>);

impl<F: std::future::Future> Ordered<F> {
    fn new() -> Self {
        Self(None)
    }

    fn push_back(&mut self, f: F) {
        self.0
            .get_or_insert_with(futures_util::stream::FuturesOrdered::new)
            .push_back(f);
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next output in order; pending while empty (no waker kept then:
    /// a select polls this only when it is not empty).
    fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        use std::task::Poll;
        let Some(q) = self.0.as_mut() else {
            return Poll::Pending;
        };
        match futures_util::StreamExt::poll_next_unpin(q, cx) {
            Poll::Ready(Some(out)) => {
                if q.is_empty() {
                    self.0 = None;
                }
                Poll::Ready(out)
            }
            Poll::Ready(None) => {
                self.0 = None;
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// After a mesh change: if the namespace's TUN allocator is another relay
/// than the one that gave this peer its index, asks it for that index
/// again; returns the allocator asked.
fn tun_reask(
    router: &Arc<Router>,
    calls: &mut TunCalls,
    ns: &str,
    name: &str,
    tun: Option<&TunSession>,
) -> Option<Option<String>> {
    let now = router.tun_allocator(ns);
    let index = tun.filter(|t| t.allocator != now).map(|t| t.index)?;
    calls.push_back(tun_join_call(router, ns, name, Some(index), false));
    Some(now)
}

/// Asks the namespace's allocator for `name`'s index (`want`: the one it
/// had).
fn tun_join_call(
    router: &Arc<Router>,
    ns: &str,
    name: &str,
    want: Option<u32>,
    answer: bool,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = TunDone> + Send>> {
    let (router, ns, name) = (router.clone(), ns.to_string(), name.to_string());
    Box::pin(
        async move {
            let allocator = router.tun_allocator(&ns);
            let index = match router.services().tun.plan(&ns) {
                Ok(plan) => router.tun_assign(&ns, &name, want).await.map(|i| (plan, i)),
                Err(r) => Err(r),
            };
            TunDone::Joined {
                allocator,
                index,
                answer,
            }
        }
        .in_current_span(),
    )
}

/// Looks up the index of the peer a `TunResolve` names.
fn tun_resolve_call(
    router: &Arc<Router>,
    ns: &str,
    r: swb_wire::TunResolve,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = TunDone> + Send>> {
    let (router, ns) = (router.clone(), ns.to_string());
    Box::pin(
        async move {
            let index = match swb_wire::normalize_name(&r.name) {
                Ok(n) => router.tun_index(&ns, &n).await,
                Err(_) => None,
            };
            TunDone::Resolved(swb_wire::TunResolved { req: r.req, index })
        }
        .in_current_span(),
    )
}

/// Completes a join whose index came back: the peer's addresses, its
/// packets pumped from now (a second join replaces the first; a refusal
/// leaves the first as it was).
fn tun_joined(
    router: &Arc<Router>,
    ctl: &SessionCtl,
    conn: &quinn::Connection,
    ns: &str,
    allocator: Option<String>,
    index: Result<(swb_tunnel::AddressPlan, u32), Refusal>,
    tun: &mut Option<TunSession>,
) -> swb_wire::TunAnswer {
    let services = router.services();
    let (plan, index) = match index {
        Ok(x) => x,
        Err(r) => return swb_wire::TunAnswer::Refused(r),
    };
    let Some(assigned) = crate::services::tun::assigned(&plan, index) else {
        return swb_wire::TunAnswer::Refused(Refusal::new(
            Code::TUN_UNAVAILABLE,
            format!("no TUN address: index {index} is outside the plan"),
        ));
    };
    if let Some(old) = tun.take() {
        drop(old);
    }
    services.tun.attach(ns, index, ctl.id, conn);
    let stop = ctl.cancel.child_token();
    tokio::spawn(
        router.tasks().track_future(
            super::tun::pump(
                router.clone(),
                conn.clone(),
                ns.to_string(),
                plan,
                index,
                stop.clone(),
            )
            .in_current_span(),
        ),
    );
    *tun = Some(TunSession {
        services: services.clone(),
        ns: ns.to_string(),
        index,
        allocator,
        session: ctl.id,
        stop,
    });
    swb_wire::TunAnswer::Assigned(assigned)
}

/// Waits for the next change of the live set on `rx`, and gives `rx` back
/// (a wait that owns its receiver can stay armed across a loop's turns).
async fn live_changed(
    mut rx: tokio::sync::watch::Receiver<Arc<crate::placement::LiveSet>>,
) -> (
    Result<(), tokio::sync::watch::error::RecvError>,
    tokio::sync::watch::Receiver<Arc<crate::placement::LiveSet>>,
) {
    let r = rx.changed().await;
    (r, rx)
}

/// The session's actor loop. Returns why it ended.
async fn serve(
    router: &Arc<Router>,
    ctl: &Arc<SessionCtl>,
    conn: &quinn::Connection,
    io: &mut Io,
    ns: &str,
    name: &Arc<str>,
    mut live: tokio::sync::watch::Receiver<Arc<crate::placement::LiveSet>>,
) -> End {
    let mut tun: Option<TunSession> = None;
    let cancel = ctl.cancel.clone();
    if let Err(e) = io.flush(&cancel).await {
        return e;
    }
    let mut cursor = 0u64;
    // Delivered and not yet acknowledged by the daemon (flow control).
    let mut unacked = 0usize;
    let mut stalled = false;
    // Deliver whatever waited while the peer was away.
    ctl.notify.notify_one();
    // Where sends go, while no newer live set is published.
    let mut seen = crate::placement::Seen::new(&live);
    let services = router.services();
    // The forwarder to other relays starts with the first message for a
    // peer homed elsewhere (an idle session costs no task or channel).
    let mut fwd: Option<Forwarding> = None;
    // Answers to local sends, each ready once its message is durable (they
    // complete in order: the store commits in order).
    let mut durable = Durables::new();
    let mut tun_calls = TunCalls::new();
    // The allocator a re-ask after a mesh change went to, while it is in
    // flight: one at a time, however often the mesh changes meanwhile.
    let mut reask: Option<Option<String>> = None;
    // Data streams the daemon opens, and their tasks (they end with this
    // loop).
    let mut streams = super::streams::Streams::new(router);
    // The key's send rate, shared with its other sessions and HTTP: looked
    // up once, taken from per send without a lock.
    let key_rate = router.services().send_rate_of(&ctl.key_id);
    // The read buffer may hold complete frames not yet handled.
    let mut parse = false;
    // Waits that stay armed from one turn of the loop to the next, each made
    // again only once it fired: made and dropped every turn, each took a
    // lock to register its waker and another to unregister it — about 2 000
    // instructions per request → reply at one in flight (callgrind), where
    // a turn handles one frame.
    let mut cancelled = std::pin::pin!(cancel.cancelled());
    let mut mail = std::pin::pin!(ctl.notify.notified());
    let mut incoming = std::pin::pin!(conn.accept_bi());
    // The same for datagrams and for the live set. A change of the live set
    // is waited for on a clone of `live` (the wait owns it), so `live`
    // stays free for routing; once a change fired, `live` takes it too.
    let mut datagram = std::pin::pin!(conn.read_datagram());
    let mut changed = std::pin::pin!(live_changed(live.clone()));
    let mut live_open = true;
    // And those that rarely fire are polled only after one of them woke:
    // polling one armed takes locks (quinn's connection, which its driver
    // takes for every packet; the cancellation token's two; the live set's
    // waiter list, which every session shares). New mail, which fires at
    // every message, is not gated.
    let rare = super::wake_gate::WakeGate::new();
    const CANCELLED: u8 = 0;
    const CHANGED: u8 = 1;
    const INCOMING: u8 = 2;
    const DATAGRAM: u8 = 3;
    loop {
        // Ranked: cancellation first (replaced, revoked, shutdown), then new
        // mail, then frames from the daemon.
        tokio::select! {
            biased;
            () = poll_fn(|cx| rare.poll(cx, CANCELLED, cancelled.as_mut())) => return End::Gone,
            // An error: the placement is gone (the relay is stopping), no
            // more changes to wait for.
            (r, rx) = poll_fn(|cx| rare.poll(cx, CHANGED, changed.as_mut())), if live_open => 'changed: {
                live_open = r.is_ok();
                if !live_open {
                    break 'changed;
                }
                changed.set(live_changed(rx));
                rare.arm(CHANGED);
                live.borrow_and_update();
                seen.refresh(&live);
                // The mesh changed: tell the daemon, and move it if its
                // home is now another relay.
                if let Route::Remote(home) = router.route(ns, name) {
                    return End::Redirect((*home).clone());
                }
                if let Err(e) = queue_relay_map(router, io) {
                    return e;
                }
                // The namespace's TUN allocator is another relay now (the
                // mesh grew, healed or lost it): ask it for the index this
                // peer has. It may give another — one relay handed that
                // index out while it did not see the other — and the
                // daemon moves its interface there.
                if reask.is_none() {
                    reask = tun_reask(router, &mut tun_calls, ns, name, tun.as_ref());
                }
            },
            done = poll_fn(|cx| tun_calls.poll_next(cx)), if !tun_calls.is_empty() => {
                let reply = match done {
                    TunDone::Joined { allocator, index, answer } => {
                        let a = tun_joined(router, ctl, conn, ns, allocator, index, &mut tun);
                        // A re-ask answered: ask again only if the allocator
                        // moved once more while it was out.
                        if !answer && reask.take().is_some_and(|asked| asked != router.tun_allocator(ns)) {
                            reask = tun_reask(router, &mut tun_calls, ns, name, tun.as_ref());
                        }
                        (answer || matches!(a, swb_wire::TunAnswer::Assigned(_)))
                            .then_some(Frame::TunAnswer(a))
                    }
                    TunDone::Resolved(r) => Some(Frame::TunResolved(r)),
                };
                if let Some(f) = reply {
                    if let Err(e) = io.queue(&f) {
                        return e;
                    }
                }
            }
            () = &mut mail => {
                mail.set(ctl.notify.notified());
                let room = DELIVERY_WINDOW.saturating_sub(unacked);
                if room == 0 {
                    // The daemon has a window's worth: the next ack resumes.
                    stalled = true;
                    continue;
                }
                ctl.will_look();
                let batch = services.registry().of(ns, name).pending(ns, name, ctl.id, cursor, FLUSH_BYTES, room, tokio::time::Instant::now());
                cursor = batch.cursor;
                unacked += batch.count;
                if batch.more {
                    ctl.notify.notify_one();
                }
                services.metrics.delivered.inc_by(batch.count as u64);
                for d in batch.frames {
                    if let Err(e) = io.queue(&Frame::Deliveries(d)) {
                        return e;
                    }
                }
            }
            // Every answer the store made ready (it commits in groups), so
            // a run of accepted sends goes out as one frame.
            replies = durable.next_run(), if !durable.is_empty() => {
                for reply in replies {
                    if let Err(e) = io.answer(reply) {
                        return e;
                    }
                }
            }
            Some(reply) = async {
                match fwd.as_mut() {
                    Some(f) => f.done.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Err(e) = io.answer(reply) {
                    return e;
                }
                // And the other answers other relays gave meanwhile.
                while let Some(Ok(reply)) = fwd.as_mut().map(|f| f.done.try_recv()) {
                    if let Err(e) = io.answer(reply) {
                        return e;
                    }
                }
            }
            // Read more once every complete frame read so far is handled.
            r = io.read_some(), if !parse => {
                if let Err(e) = r {
                    return e;
                }
                parse = true;
            }
            () = streams.reap() => {}
            s = poll_fn(|cx| rare.poll(cx, INCOMING, incoming.as_mut())) => match s {
                Ok((send, recv)) => {
                    incoming.set(conn.accept_bi());
                    rare.arm(INCOMING);
                    streams.opened(router, ctl, (ns, name), send, recv)
                }
                Err(_) => return End::Gone,
            },
            // Not (yet) in TUN mode: datagrams go nowhere (the pump reads
            // them once joined). Last: a flood of them cannot starve frames.
            d = poll_fn(|cx| rare.poll(cx, DATAGRAM, datagram.as_mut())), if tun.is_none() => match d {
                Ok(_) => {
                    datagram.set(conn.read_datagram());
                    rare.arm(DATAGRAM);
                    services.metrics.tun.not_joined.inc()
                }
                Err(_) => return End::Gone,
            },
        }
        // The frames read, until the buffer holds no complete one (or TUN
        // calls are at their limit: the rest waits for one to be answered).
        // Sends read together are timed together.
        let mut clock: Option<Clock> = None;
        let mut accepted = Tally::new(&services.metrics.accepted);
        while parse && tun_calls.len() < TUN_CALLS {
            match io.reader.next_frame() {
                Ok(Some(Frame::Ack(a))) => {
                    services.ack(ns, name, &a.ids);
                    // Count the ids, not what was still held: a delivered
                    // message that expired meanwhile must free its slot too.
                    unacked = unacked.saturating_sub(a.ids.len());
                    if stalled && unacked < DELIVERY_WINDOW {
                        stalled = false;
                        ctl.notify.notify_one();
                    }
                }
                Ok(Some(Frame::TunJoin(j))) => {
                    tun_calls.push_back(tun_join_call(router, ns, name, j.want, true));
                }
                Ok(Some(Frame::TunResolve(r))) => {
                    tun_calls.push_back(tun_resolve_call(router, ns, r));
                }
                Ok(Some(f)) => {
                    if let Err(e) = handle(
                        router,
                        io,
                        (ns, name, key_rate.as_ref()),
                        f,
                        (&seen, &live, *clock.get_or_insert_with(Clock::now)),
                        &mut fwd,
                        (&mut durable, &mut accepted.0),
                    ) {
                        return e;
                    }
                }
                Ok(None) => parse = false,
                Err(e) => return End::Protocol(e.to_string()),
            }
        }
        // Counted before the answers go out.
        drop(accepted);
        if let Err(e) = io.flush(&cancel).await {
            return e;
        }
    }
}

/// Messages a session accepted from one batch of frames, added to the
/// relay's counter once (when dropped, so an early return counts too): the
/// counter is one word every session on every core writes.
struct Tally<'a>(u64, &'a prometheus::IntCounter);

impl<'a> Tally<'a> {
    fn new(counter: &'a prometheus::IntCounter) -> Self {
        Self(0, counter)
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        if self.0 > 0 {
            self.1.inc_by(self.0);
        }
    }
}

/// A send whose recipient is homed on another relay, for the forwarder.
type Forward = (u64, Arc<swb_wire::RelayRecord>, swb_wire::MeshForward);

/// A session's forwarder task and its channels; the task ends with this.
struct Forwarding {
    jobs: tokio::sync::mpsc::Sender<Forward>,
    done: tokio::sync::mpsc::Receiver<Frame>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarding {
    fn start(router: &Arc<Router>) -> Self {
        let (jobs, rx) = tokio::sync::mpsc::channel::<Forward>(FORWARD_QUEUE);
        let (done_tx, done) = tokio::sync::mpsc::channel::<Frame>(FORWARD_QUEUE);
        let task = tokio::spawn(
            router
                .tasks()
                .track_future(forwarder(router.clone(), rx, done_tx).in_current_span()),
        );
        Self { jobs, done, task }
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards this session's sends to other relays: what is queued when
/// the last calls end goes in one call per home relay (up to
/// [`swb_wire::MAX_FORWARDS_PER_CALL`] messages; it stops taking more at
/// [`swb_wire::FORWARD_CALL_BYTES`] of bodies), the homes' calls side
/// by side. One batch at a time, and each home takes a call's messages in
/// order, so a sender's messages to a peer keep their order. A lone send
/// is a call of one: nothing waits for more. Answers come back as frames
/// for the daemon.
async fn forwarder(
    router: Arc<Router>,
    mut jobs: tokio::sync::mpsc::Receiver<Forward>,
    done: tokio::sync::mpsc::Sender<Frame>,
) {
    let mut batch: Vec<Forward> = Vec::new();
    while let Some(job) = jobs.recv().await {
        let mut bytes = job.2.body.len();
        batch.push(job);
        while batch.len() < swb_wire::MAX_FORWARDS_PER_CALL && bytes < swb_wire::FORWARD_CALL_BYTES
        {
            match jobs.try_recv() {
                Ok(job) => {
                    bytes += job.2.body.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        // Each home's messages, in the order sent (a few homes at most,
        // as a rule: a linear search).
        let mut homes: Vec<(
            Arc<swb_wire::RelayRecord>,
            Vec<u64>,
            Vec<swb_wire::MeshForward>,
        )> = Vec::new();
        for (req, home, f) in batch.drain(..) {
            match homes.iter_mut().find(|(h, _, _)| h.id == home.id) {
                Some((_, reqs, fs)) => {
                    reqs.push(req);
                    fs.push(f);
                }
                None => homes.push((home, vec![req], vec![f])),
            }
        }
        let calls = homes.into_iter().map(|(home, reqs, fs)| {
            let router = &router;
            async move {
                let ids: Vec<swb_wire::MessageId> = fs.iter().map(|f| f.id).collect();
                let answers = router.forward_batch(&home.id, fs).await;
                (reqs, ids, answers)
            }
        });
        for (reqs, ids, answers) in futures_util::future::join_all(calls).await {
            for ((req, id), answer) in reqs.into_iter().zip(ids).zip(answers) {
                let reply = match answer {
                    Ok(online) => Frame::SendAccepted(SendAccepted { req, id, online }),
                    Err(refusal) => Frame::SendRefused(SendRefused { req, refusal }),
                };
                if done.send(reply).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Answers to local sends waiting for their messages to be durable, in
/// order (the store settles appends in order). One receiver of the store's
/// settled updates serves them all, made with the first and dropped with
/// the last (an idle session keeps none); one update answers every send
/// its group commit held.
struct Durables {
    settled: Option<tokio::sync::watch::Receiver<crate::services::store::Settled>>,
    /// (append number, request, message id, recipient online).
    waiting: std::collections::VecDeque<(u64, u64, swb_wire::MessageId, bool)>,
}

impl Durables {
    fn new() -> Self {
        Self {
            settled: None,
            waiting: std::collections::VecDeque::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    fn push(
        &mut self,
        services: &crate::services::Services,
        n: u64,
        req: u64,
        id: swb_wire::MessageId,
        online: bool,
    ) {
        self.settled.get_or_insert_with(|| services.settled());
        self.waiting.push_back((n, req, id, online));
    }

    /// The answers of every send settled now, in order; waits for the
    /// store's next update while there are none. Cancel-safe: nothing is
    /// taken from `waiting` across an await.
    async fn next_run(&mut self) -> Vec<Frame> {
        loop {
            let Some(rx) = self.settled.as_mut() else {
                return std::future::pending().await;
            };
            let mut run = Vec::new();
            {
                let s = rx.borrow_and_update();
                while let Some(&(n, req, id, online)) = self.waiting.front() {
                    let Some(outcome) = s.outcome(n) else { break };
                    self.waiting.pop_front();
                    run.push(match outcome {
                        Ok(()) => Frame::SendAccepted(SendAccepted { req, id, online }),
                        Err(e) => Frame::SendRefused(SendRefused {
                            req,
                            refusal: crate::services::not_stored(&e),
                        }),
                    });
                }
            }
            if !run.is_empty() {
                if self.waiting.is_empty() {
                    self.settled = None;
                }
                return run;
            }
            if rx.changed().await.is_err() {
                // The writer is gone without a last word (it always
                // leaves one): nothing waiting will be stored.
                return self
                    .waiting
                    .drain(..)
                    .map(|(_, req, _, _)| {
                        Frame::SendRefused(SendRefused {
                            req,
                            refusal: crate::services::not_stored(
                                &crate::services::store::StoreError::Stopped,
                            ),
                        })
                    })
                    .collect();
            }
        }
    }
}

fn handle(
    router: &Arc<Router>,
    io: &mut Io,
    (ns, name, key_rate): (&str, &Arc<str>, Option<&crate::limits::KeyRate>),
    f: Frame,
    // Where sends go, and when they came.
    (seen, live, clock): (
        &crate::placement::Seen,
        &tokio::sync::watch::Receiver<Arc<crate::placement::LiveSet>>,
        Clock,
    ),
    fwd: &mut Option<Forwarding>,
    // Sends waiting for the store; sends accepted in this batch.
    (durable, accepted): (&mut Durables, &mut u64),
) -> Result<(), End> {
    let Frame::Send(s) = f else {
        return handle_other(io, f);
    };
    let services = router.services();
    // An oversized body is refused by the mailbox, after the name.
    let fits = s.body.len() <= MAX_MESSAGE_BODY;
    // The key's send rate, across its sessions and HTTP.
    if fits {
        if let Err(refusal) = services.take_send_from(key_rate, clock.at) {
            return io.queue(&Frame::SendRefused(SendRefused {
                req: s.req,
                refusal,
            }));
        }
    }
    // The name is checked once, here, for both ways a send goes.
    let to = match swb_wire::normalized(&s.to) {
        Ok(to) => to,
        Err(e) => {
            let refusal = Refusal::new(Code::BAD_NAME, format!("{e}: {:?}", s.to));
            services.metrics.refused(refusal.code);
            debug!(code = %refusal.code, "send refused");
            return io.queue(&Frame::SendRefused(SendRefused {
                req: s.req,
                refusal,
            }));
        }
    };
    // Recipient homed on another relay: one mesh hop.
    if fits {
        if let Route::Remote(home) = router.route_seen(seen, live, ns, &to) {
            let job = swb_wire::MeshForward {
                namespace: ns.to_string(),
                from: name.to_string(),
                to: to.into_owned(),
                id: s.id,
                body: s.body,
                sent_at_ms: clock.wall_ms,
                hops: 0,
            };
            let f = fwd.get_or_insert_with(|| Forwarding::start(router));
            if f.jobs.try_send((s.req, home, job)).is_err() {
                let refusal = Refusal::new(
                    Code::BUSY,
                    format!("{FORWARD_QUEUE} messages of this session are waiting for another relay already; retry"),
                );
                services.metrics.refused(refusal.code);
                io.queue(&Frame::SendRefused(SendRefused {
                    req: s.req,
                    refusal,
                }))?;
            }
            return Ok(());
        }
    }
    let (req, id) = (s.req, s.id);
    match services.enqueue(ns, name, &to, id, s.body, clock.wall_ms, clock.at) {
        Ok((online, stored)) => {
            *accepted += 1;
            debug!(%id, online, "message accepted");
            match stored.number() {
                Ok(None) => io.accepted(req, online),
                // `accepted` only once the message is durable.
                Ok(Some(n)) => {
                    durable.push(services, n, req, id, online);
                    Ok(())
                }
                Err(e) => io.queue(&Frame::SendRefused(SendRefused {
                    req,
                    refusal: crate::services::not_stored(&e),
                })),
            }
        }
        Err(refusal) => {
            debug!(code = %refusal.code, "send refused");
            io.queue(&Frame::SendRefused(SendRefused { req, refusal }))
        }
    }
}

/// A daemon's frames other than sends, acknowledgements and TUN calls
/// (the session loop handles those itself: an ack also frees room in the
/// delivery window).
fn handle_other(io: &mut Io, f: Frame) -> Result<(), End> {
    match f {
        Frame::Ping(p) => io.queue(&Frame::Pong(p)),
        Frame::Pong(_) => Ok(()),
        other => Err(End::Protocol(format!(
            "unexpected {:?} frame from a daemon",
            other.frame_type()
        ))),
    }
}

/// Says goodbye (or refuses) and closes the connection, giving the peer a
/// moment to read the last frame.
async fn finish(conn: &quinn::Connection, io: &mut Io, end: End, at_hello: bool) {
    let never = CancellationToken::new();
    let (code, reason) = match end {
        End::Gone => {
            conn.close(close::NORMAL.into(), b"");
            return;
        }
        End::Goodbye(r) => {
            let reason = r.code.as_str().as_bytes().to_vec();
            let f = if at_hello {
                Frame::Refused(r)
            } else {
                Frame::Goodbye(r)
            };
            let _ = io.queue(&f);
            (close::REFUSED, reason)
        }
        End::Protocol(p) => {
            let _ = io.queue(&Frame::Goodbye(Refusal::new(Code::PROTOCOL, p)));
            (close::PROTOCOL, b"protocol_error".to_vec())
        }
        End::Redirect(r) => {
            let _ = io.queue(&Frame::Redirect(r));
            (close::REFUSED, b"redirect".to_vec())
        }
    };
    let _ = tokio::time::timeout(GOODBYE_FLUSH, io.flush(&never)).await;
    let _ = io.send.finish();
    // The daemon closes once it read the frame; do not wait longer than this.
    let _ = tokio::time::timeout(GOODBYE_LINGER, conn.closed()).await;
    conn.close(code.into(), &reason);
}
