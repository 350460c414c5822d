//! The HTTPS + JSON endpoint: a second door into the same namespaces and
//! mailboxes, for scripts and machines without the daemon.
//!
//! Served on TCP next to QUIC (same certificate; HTTP/1.1 and HTTP/2 by
//! ALPN). Every request but `/healthz` and `/v1/openapi.json` carries
//! `Authorization: Bearer <API key>`. Every error is
//! `{"error":{"code","message"}}` with a stable code. The routes, and the
//! OpenAPI document describing them, come from one table
//! ([`routes::ENDPOINTS`]), so the two cannot drift.
//!
//! ```text
//! mod.rs       TLS accept loop, API state, authentication, poll slots
//! routes.rs    the route table, the OpenAPI document, the axum router
//! handlers.rs  one handler per route: parse, authenticate, call the router
//! ```

pub(crate) mod handlers;
mod routes;

pub use routes::openapi;

use crate::keys::{AuthError, KeyInfo};
use crate::router::Router;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use swb_wire::MAX_MESSAGE_BODY;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long an open connection may take to finish its requests at shutdown.
const DRAIN_CONNECTION: Duration = Duration::from_secs(2);
/// How long the endpoint waits for every connection to drain at shutdown.
const DRAIN_ALL: Duration = Duration::from_secs(3);
/// Interval of HTTP/2 keep-alive pings.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
/// HTTP/2 streams one connection may have open.
const H2_STREAMS: u32 = 64;
/// Pause after a failed accept (EMFILE and friends) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Largest request body: a 64 KiB message written as JSON-escaped text
/// (up to 6 bytes per byte, `\u0001`) plus the other fields.
pub const MAX_REQUEST_BODY: usize = 6 * MAX_MESSAGE_BODY + 16 * 1024;

/// Limits of the HTTP endpoint. Defaults are documented in the README.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpLimits {
    /// Longest `wait` a receive may ask for (default 60 s).
    pub max_wait: Duration,
    /// Long polls open at once per API key (default 32); more get `429`.
    pub max_polls_per_key: usize,
    /// Most messages one receive returns (default 1000).
    pub max_batch: usize,
    /// TCP connections served at once (default 4096); more are closed.
    pub max_connections: usize,
    /// Time a client has to finish TLS and send its request headers (default 10 s).
    pub header_timeout: Duration,
    /// A connection with no request in flight (no long poll, no event
    /// stream) for this long is closed (default 120 s): an HTTP/2 client
    /// that only answers pings does not hold a connection slot for ever.
    pub idle_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_secs(60),
            max_polls_per_key: 32,
            max_batch: 1000,
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// What one HTTP connection is doing: requests in flight (a response
/// counts until its body is sent, so event streams keep it busy) and when
/// it last changed.
#[derive(Debug)]
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    since: Mutex<tokio::time::Instant>,
}

/// Counts one request in flight while it lives.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: 0.into(),
            since: Mutex::new(tokio::time::Instant::now()),
        })
    }

    fn start(self: &Arc<Self>) -> Busy {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Busy(self.clone())
    }

    /// How long the connection has had nothing in flight (zero if busy).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        self.since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.since.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An error answer: status, stable code, and a sentence that says what to do.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Seconds to wait before retrying (`Retry-After`), for rate limits.
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// `429 rate_limited`, with `Retry-After`.
    pub(crate) fn rate_limited(r: swb_wire::Refusal, wait: Duration) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "rate_limited",
            message: r.message,
            retry_after: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
        }
    }

    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl ApiError {
    /// The error object of an answer: `{"error": {"code", "message"}}`.
    pub(crate) fn to_json(&self) -> Value {
        json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.to_json();
        let mut r = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"switchboard\""),
            );
        }
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

pub(crate) type ApiResult = Result<Response, ApiError>;

pub(crate) fn ok(status: StatusCode, v: Value) -> ApiResult {
    Ok((status, axum::Json(v)).into_response())
}

/// State of the HTTP endpoint.
#[derive(Clone)]
pub(crate) struct Api {
    router: Arc<Router>,
    cancel: CancellationToken,
    polls: Arc<Mutex<HashMap<String, usize>>>,
    carriers: Arc<crate::carrier::Carriers>,
}

/// The client address of an HTTPS connection, in each request's extensions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Remote(pub(crate) std::net::SocketAddr);

/// `GET /v1/quic` with `Upgrade: swb-quic/1`: this HTTPS connection becomes
/// a carrier of QUIC packets (see [`crate::carrier`]).
pub(crate) async fn carrier_upgrade(
    axum::extract::State(api): axum::extract::State<Api>,
    mut req: axum::extract::Request,
) -> Response {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(swb_quic::carrier::PROTOCOL));
    if !wants {
        return ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "bad_request",
            format!(
                "this path carries QUIC packets: send `Connection: upgrade` and `Upgrade: {}`",
                swb_quic::carrier::PROTOCOL
            ),
        )
        .into_response();
    }
    let Some(Remote(remote)) = req.extensions().get::<Remote>().copied() else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no client address",
        )
        .into_response();
    };
    let slot = match api.carriers.admit(remote.ip()) {
        Ok(s) => s,
        Err(why) => {
            let msg = match why {
                crate::carrier::Refused::Full => {
                    "the relay carries as many TCP carriers as it takes"
                }
                crate::carrier::Refused::PerIp => "too many TCP carriers from this address",
            };
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", msg).into_response();
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let cancel = api.cancel.clone();
    api.router.tasks().spawn(async move {
        match on_upgrade.await {
            Ok(up) => {
                tokio::select! {
                    _ = crate::carrier::serve(hyper_util::rt::TokioIo::new(up), slot) => {}
                    _ = cancel.cancelled() => {}
                }
            }
            Err(e) => debug!(%remote, "carrier upgrade failed: {e}"),
        }
    });
    let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    r.headers_mut().insert(
        header::UPGRADE,
        HeaderValue::from_static(swb_quic::carrier::PROTOCOL),
    );
    r
}

impl Api {
    /// Counts one long poll or watch of `key_id` against the per-key cap.
    pub(crate) fn take_poll_slot(&self, key_id: &str) -> Result<PollSlot, ApiError> {
        let max = self.router.config().http.max_polls_per_key;
        let mut p = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        let n = p.entry(key_id.to_string()).or_insert(0);
        if *n >= max {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_polls",
                format!(
                    "this API key already has {max} receives and watches open (the limit); close one first"
                ),
            ));
        }
        *n += 1;
        Ok(PollSlot {
            polls: self.polls.clone(),
            key_id: key_id.to_string(),
        })
    }

    /// Checks the bearer key. An unknown key makes the relay look at its
    /// keys file once (rate-limited), like the QUIC handshake does.
    pub(crate) fn auth(&self, headers: &HeaderMap) -> Result<KeyInfo, ApiError> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let Some(v) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized(
                "missing API key: send the header `Authorization: Bearer <API key>`",
            ));
        };
        let key = v
            .to_str()
            .ok()
            .and_then(|s| {
                s.strip_prefix("Bearer ")
                    .or_else(|| s.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <API key>`"))?;
        let mut r = self.router.keys().store().verify(key);
        if r == Err(AuthError::Unauthorized)
            && self.router.refresh_keys(crate::doors::KEYS_REFRESH_GAP)
        {
            r = self.router.keys().store().verify(key);
        }
        let info = r.map_err(|e| match e {
            AuthError::Unauthorized => {
                unauthorized("the API key is not valid; check the key you were given")
            }
            AuthError::Revoked => key_revoked(),
        })?;
        self.router
            .services()
            .take_http(&info.id)
            .map_err(|(r, wait)| ApiError::rate_limited(r, wait))?;
        Ok(info)
    }
}

impl Api {
    /// What a long poll or event stream of `key` also waits on: cancelled
    /// when the key is revoked. An error if it was revoked just now.
    pub(crate) fn revocation(&self, key: &KeyInfo) -> Result<CancellationToken, ApiError> {
        let token = self.router.services().revocation(&key.id);
        // Taken first, checked after: a revocation in between is seen here,
        // a later one cancels the token.
        if self.router.keys().store().is_active(&key.id) {
            Ok(token)
        } else {
            Err(key_revoked())
        }
    }
}

/// The answer to a request (or the end of a long poll) of a revoked key.
pub(crate) fn key_revoked() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "key_revoked",
        "the API key was revoked; ask the relay's operator for a new key",
    )
}

/// Counts a key's open long polls; the count drops when this does.
pub(crate) struct PollSlot {
    polls: Arc<Mutex<HashMap<String, usize>>>,
    key_id: String,
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        let mut p = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = p.get_mut(&self.key_id) {
            *n -= 1;
            if *n == 0 {
                p.remove(&self.key_id);
            }
        }
    }
}

/// Accepts TCP connections, does TLS, and serves HTTP/1.1 or HTTP/2 until
/// `cancel`; then lets open requests finish (long polls return at once).
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Arc<Router>,
    carriers: Arc<crate::carrier::Carriers>,
    cancel: CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let lim = router.config().http.clone();
    let tasks = router.tasks().clone();
    let api = Api {
        router,
        cancel: cancel.clone(),
        polls: Arc::new(Mutex::new(HashMap::new())),
        carriers,
    };
    let app = routes::router(api);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(lim.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_STREAMS)
        .keep_alive_interval(H2_KEEPALIVE);
    let builder = Arc::new(builder);
    let slots = Arc::new(tokio::sync::Semaphore::new(lim.max_connections));
    let mut conns = JoinSet::new();
    loop {
        let (tcp, remote) = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!("https accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%remote, "too many https connections; closing this one");
            continue;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        let cancel = cancel.clone();
        let header_timeout = lim.header_timeout;
        let idle_timeout = lim.idle_timeout.max(Duration::from_millis(100));
        conns.spawn(tasks.track_future(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%remote, "tls handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    debug!(%remote, "tls handshake timed out");
                    return;
                }
            };
            // Every request counts as in flight until its response body
            // is sent (or dropped).
            let activity = Activity::new();
            let tracked = activity.clone();
            let svc = tower::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let busy = tracked.start();
                let app = app.clone();
                async move {
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut().insert(Remote(remote));
                    let resp = tower::ServiceExt::oneshot(app, req).await?;
                    Ok::<_, std::convert::Infallible>(resp.map(|body| {
                        let stream =
                            futures_util::StreamExt::map(body.into_data_stream(), move |chunk| {
                                let _busy = &busy;
                                chunk
                            });
                        axum::body::Body::from_stream(stream)
                    }))
                }
            });
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            // Upgrades on: `GET /v1/quic` turns the connection into a
            // carrier, which then lives on without this task.
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            let mut check = tokio::time::interval(idle_timeout / 4);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            debug!(%remote, "https connection ended: {e}");
                        }
                        break;
                    }
                    _ = cancel.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(DRAIN_CONNECTION, conn.as_mut()).await;
                        break;
                    }
                    _ = check.tick() => {
                        if activity.idle_for() >= idle_timeout {
                            debug!(%remote, "https connection idle; closing it");
                            conn.as_mut().graceful_shutdown();
                            let _ = tokio::time::timeout(DRAIN_CONNECTION, conn.as_mut()).await;
                            break;
                        }
                    }
                }
            }
        }));
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_ALL, async {
        while conns.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        conns.abort_all();
    }
    info!("https endpoint stopped");
}
