//! The HTTPS + JSON endpoint: a second door into the same namespaces and
//! mailboxes, for scripts and machines without the daemon.
//!
//! Served on TCP next to QUIC (same certificate; HTTP/1.1 and HTTP/2 by
//! ALPN). Every request but `/healthz` and `/v1/openapi.json` carries
//! `Authorization: Bearer <API key>`. Every error is
//! `{"error":{"code","message"}}` with a stable code. The routes, and the
//! OpenAPI document describing them, come from one table ([`ENDPOINTS`]),
//! so the two cannot drift.

use crate::keys::{AuthError, KeyInfo};
use crate::registry::{Enqueued, Taken};
use crate::Shared;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use swb_wire::{Code, MessageId, MAX_ACK_IDS, MAX_MESSAGE_BODY};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_secs(60),
            max_polls_per_key: 32,
            max_batch: 1000,
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// An error answer: status, stable code, and a sentence that says what to do.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut r = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"switchboard\""),
            );
        }
        r
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok(status: StatusCode, v: Value) -> ApiResult {
    Ok((status, axum::Json(v)).into_response())
}

/// State of the HTTP endpoint.
#[derive(Clone)]
pub(crate) struct Api {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    polls: Arc<Mutex<HashMap<String, usize>>>,
}

/// Which handler an endpoint runs.
#[derive(Debug, Clone, Copy)]
enum Op {
    Send,
    Receive,
    Ack,
    Peers,
    SetStatus,
    GetStatus,
    WatchStatus,
    Health,
    OpenApi,
}

/// One route: method, path, handler, and its OpenAPI description.
struct Endpoint {
    method: &'static str,
    path: &'static str,
    op: Op,
    auth: bool,
    summary: &'static str,
    responses: &'static [(u16, &'static str)],
}

/// Every route the endpoint serves. The router and the OpenAPI document are
/// both built from this table.
const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        method: "post",
        path: "/v1/messages",
        op: Op::Send,
        auth: true,
        summary: "Send a message to a peer of the key's namespace",
        responses: &[
            (202, "Accepted: {\"id\", \"online\"}"),
            (400, "Bad JSON, unknown field, or bad name (bad_request, bad_name)"),
            (401, "Missing, invalid or revoked API key"),
            (413, "Body larger than 64 KiB (body_too_large) or request too large"),
            (429, "Recipient's mailbox or the namespace is full (mailbox_full, namespace_full)"),
        ],
    },
    Endpoint {
        method: "get",
        path: "/v1/messages",
        op: Op::Receive,
        auth: true,
        summary: "Receive mail of a name, waiting up to `wait` seconds for the first message; messages are leased until acknowledged",
        responses: &[
            (200, "{\"messages\": [{\"id\", \"from\", \"body\" or \"body_b64\", \"sent_at\", \"sent_at_ms\"}]} (empty on timeout)"),
            (400, "Bad or unknown query parameter (bad_request, bad_name)"),
            (401, "Missing, invalid or revoked API key"),
            (429, "Too many long polls open for this key (too_many_polls)"),
        ],
    },
    Endpoint {
        method: "post",
        path: "/v1/messages/ack",
        op: Op::Ack,
        auth: true,
        summary: "Acknowledge received messages: the relay forgets them",
        responses: &[
            (200, "{\"acked\": n}: how many of the ids were held"),
            (400, "Bad JSON, unknown field, bad name or bad id"),
            (401, "Missing, invalid or revoked API key"),
        ],
    },
    Endpoint {
        method: "get",
        path: "/v1/peers",
        op: Op::Peers,
        auth: true,
        summary: "Every known name of the key's namespace: presence, status, and for those attached now how",
        responses: &[
            (200, "{\"peers\": [{\"name\", \"online\", \"since\", \"via\": \"quic\"|\"http\"|null, \"version\", \"updated\", \"status\"}]}"),
            (401, "Missing, invalid or revoked API key"),
        ],
    },
    Endpoint {
        method: "put",
        path: "/v1/status",
        op: Op::SetStatus,
        auth: true,
        summary: "Merge `set` into a peer's status and remove the `clear` keys",
        responses: &[
            (200, "The new status: {\"name\", \"version\", \"online\", \"since\", \"updated\", \"status\"}"),
            (400, "Bad JSON, unknown field, bad name or key (bad_request, bad_name, bad_status)"),
            (401, "Missing, invalid or revoked API key"),
            (413, "Status over 32 keys or 4096 bytes (status_too_large)"),
        ],
    },
    Endpoint {
        method: "get",
        path: "/v1/status/watch",
        op: Op::WatchStatus,
        auth: true,
        summary: "Server-sent events: the current status of each of `peers` (comma-separated), then one event per change; comment keep-alives every 15 s. Without `peers`, the status of the peer named `watch`",
        responses: &[
            (200, "text/event-stream of `status` events, data as GET /v1/status/{name} plus \"lagged\""),
            (400, "Bad or unknown query parameter, bad name, more than 256 peers"),
            (401, "Missing, invalid or revoked API key"),
            (429, "Too many long polls and watches open for this key (too_many_polls)"),
        ],
    },
    Endpoint {
        method: "get",
        path: "/v1/status/{name}",
        op: Op::GetStatus,
        auth: true,
        summary: "A peer's status and presence (a name nobody holds: version 0, offline, empty)",
        responses: &[
            (200, "{\"name\", \"version\", \"online\", \"since\", \"updated\", \"status\"}"),
            (400, "Bad name (bad_name)"),
            (401, "Missing, invalid or revoked API key"),
        ],
    },
    Endpoint {
        method: "get",
        path: "/healthz",
        op: Op::Health,
        auth: false,
        summary: "Liveness",
        responses: &[(200, "{\"status\": \"ok\"}")],
    },
    Endpoint {
        method: "get",
        path: "/v1/openapi.json",
        op: Op::OpenApi,
        auth: false,
        summary: "This document",
        responses: &[(200, "OpenAPI 3.1 document")],
    },
];

fn method_filter(m: &str) -> MethodFilter {
    match m {
        "post" => MethodFilter::POST,
        "put" => MethodFilter::PUT,
        "delete" => MethodFilter::DELETE,
        _ => MethodFilter::GET,
    }
}

/// Request and parameter schemas, by operation.
fn op_details(op: Op) -> Value {
    let name = json!({"type": "string", "pattern": "^[A-Za-z0-9-]{1,63}(\\.switchboard)?$"});
    match op {
        Op::Send => json!({
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": false,
                "required": ["from", "to"],
                "properties": {
                    "from": name, "to": name,
                    "body": {"type": "string", "description": "UTF-8 text; or use body_b64"},
                    "body_b64": {"type": "string", "description": "bytes, standard base64"},
                    "id": {"type": "string", "pattern": "^[0-9a-f]{32}$", "description": "optional: a retried send with the same id is stored once"}
                }
            }}}}
        }),
        Op::Receive => json!({
            "parameters": [
                {"name": "as", "in": "query", "required": true, "schema": name},
                {"name": "wait", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 60, "default": 0}},
                {"name": "max", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}}
            ]
        }),
        Op::Ack => json!({
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": false,
                "required": ["as", "ids"],
                "properties": {
                    "as": name,
                    "ids": {"type": "array", "maxItems": MAX_ACK_IDS, "items": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}
                }
            }}}}
        }),
        Op::SetStatus => json!({
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": false,
                "required": ["as"],
                "properties": {
                    "as": name,
                    "set": {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": swb_wire::MAX_STATUS_KEYS},
                    "clear": {"type": "array", "items": {"type": "string"}}
                }
            }}}}
        }),
        Op::GetStatus => json!({
            "parameters": [{"name": "name", "in": "path", "required": true, "schema": name}]
        }),
        Op::WatchStatus => json!({
            "parameters": [{"name": "peers", "in": "query", "required": true, "schema": {"type": "string", "description": "comma-separated peer names, at most 256"}}]
        }),
        _ => json!({}),
    }
}

/// The OpenAPI 3.1 document of [`ENDPOINTS`].
pub fn openapi() -> Value {
    let error = json!({"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}
    }}});
    let mut paths = serde_json::Map::new();
    for e in ENDPOINTS {
        let mut responses = serde_json::Map::new();
        for (status, desc) in e.responses {
            let schema = if *status >= 400 {
                json!({"$ref": "#/components/schemas/Error"})
            } else {
                json!({"type": "object"})
            };
            responses.insert(
                status.to_string(),
                json!({"description": desc, "content": {"application/json": {"schema": schema}}}),
            );
        }
        let mut op = json!({
            "summary": e.summary,
            "operationId": format!("{:?}", e.op).to_lowercase(),
            "responses": responses,
        });
        if !e.auth {
            op["security"] = json!([]);
        }
        if let (Value::Object(o), Value::Object(extra)) = (&mut op, op_details(e.op)) {
            o.extend(extra);
        }
        let entry = paths.entry(e.path).or_insert_with(|| json!({}));
        entry[e.method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Switchboard relay HTTP API", "version": "1"},
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key (swbk_...)"}},
            "schemas": {"Error": error}
        },
        "paths": paths,
    })
}

/// The router over [`ENDPOINTS`].
pub(crate) fn router(api: Api) -> Router {
    let mut r = Router::new();
    let mut by_path: Vec<(&str, axum::routing::MethodRouter<Api>)> = Vec::new();
    for e in ENDPOINTS {
        let filter = method_filter(e.method);
        let mr = match e.op {
            Op::Send => on(filter, send),
            Op::Receive => on(filter, receive),
            Op::Ack => on(filter, ack),
            Op::Peers => on(filter, peers),
            Op::SetStatus => on(filter, set_status),
            Op::GetStatus => on(filter, get_status),
            Op::WatchStatus => on(filter, watch_status),
            Op::Health => on(filter, health),
            Op::OpenApi => on(filter, openapi_doc),
        };
        match by_path.iter_mut().find(|(p, _)| *p == e.path) {
            Some((_, existing)) => {
                let merged = std::mem::take(existing).merge(mr);
                *existing = merged;
            }
            None => by_path.push((e.path, mr)),
        }
    }
    for (path, mr) in by_path {
        r = r.route(path, mr.fallback(method_not_allowed));
    }
    r.fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            count_requests,
        ))
        .with_state(api)
}

/// Counts each request by route template (never the concrete path, which
/// may hold a peer name) and status code.
async fn count_requests(
    State(api): State<Api>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    api.shared
        .metrics
        .http_requests
        .with_label_values(&[route.as_str(), resp.status().as_str()])
        .inc();
    resp
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; GET /v1/openapi.json lists them",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method; GET /v1/openapi.json lists them",
    )
}

/// Sends an API operation to the relay that is home of its peer and
/// answers with that relay's answer.
async fn forward_http(api: &Api, home: &str, op: Value) -> ApiResult {
    match crate::mesh::http_call(&api.shared, home, op.to_string()).await {
        Ok((status, body)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            Ok((status, axum::Json(v)).into_response())
        }
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "relay_unavailable",
            format!("the relay that holds this peer's mail is unreachable right now ({e}); retry"),
        )),
    }
}

/// Runs an API operation another relay forwarded here (the peer's home);
/// returns the status code and JSON body.
pub(crate) async fn serve_forwarded(
    shared: &Arc<Shared>,
    cancel: &CancellationToken,
    json: &str,
) -> (u16, Vec<u8>) {
    #[derive(Deserialize)]
    struct Op {
        op: String,
        ns: String,
        #[serde(rename = "as")]
        as_name: String,
        #[serde(default)]
        wait: u64,
        #[serde(default)]
        max: usize,
        #[serde(default)]
        ids: Vec<String>,
        #[serde(default)]
        set: std::collections::BTreeMap<String, String>,
        #[serde(default)]
        clear: Vec<String>,
    }
    let r: ApiResult = match serde_json::from_str::<Op>(json) {
        Err(e) => Err(ApiError::bad(format!("bad forwarded operation: {e}"))),
        Ok(o) => match o.op.as_str() {
            "receive" => {
                let wait = o.wait.min(shared.config.http.max_wait.as_secs());
                let max = o.max.clamp(1, shared.config.http.max_batch);
                receive_core(shared, cancel, &o.ns, &o.as_name, wait, max).await
            }
            "ack" => {
                let ids: Vec<MessageId> = o
                    .ids
                    .iter()
                    .filter_map(|s| MessageId::parse_hex(s))
                    .collect();
                ack_core(shared, &o.ns, &o.as_name, &ids)
            }
            "set_status" => {
                let change = swb_wire::SetStatus {
                    set: o.set.into_iter().collect(),
                    clear: o.clear,
                    replace: false,
                };
                set_status_core(shared, &o.ns, &o.as_name, &change)
            }
            other => Err(ApiError::bad(format!(
                "unknown forwarded operation {other:?}"
            ))),
        },
    };
    let resp = match r {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    let status = resp.status().as_u16();
    let body = axum::body::to_bytes(resp.into_body(), 16 << 20)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    (status, body)
}

impl Api {
    /// Counts one long poll or watch of `key_id` against the per-key cap.
    fn take_poll_slot(&self, key_id: &str) -> Result<PollSlot, ApiError> {
        let max = self.shared.config.http.max_polls_per_key;
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
    fn auth(&self, headers: &HeaderMap) -> Result<KeyInfo, ApiError> {
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
        let mut r = self.shared.keys().verify(key);
        if r == Err(AuthError::Unauthorized)
            && self.shared.refresh_keys(crate::session::KEYS_REFRESH_GAP)
        {
            r = self.shared.keys().verify(key);
        }
        r.map_err(|e| match e {
            AuthError::Unauthorized => {
                unauthorized("the API key is not valid; check the key you were given")
            }
            AuthError::Revoked => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "key_revoked",
                "the API key was revoked; ask the relay's operator for a new key",
            ),
        })
    }
}

fn name(field: &str, raw: &str) -> Result<String, ApiError> {
    swb_wire::normalize_name(raw).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_name",
            format!("{field}: {e}: {raw:?}"),
        )
    })
}

async fn read_json<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes: Bytes = axum::body::to_bytes(body, MAX_REQUEST_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!("the request body is larger than {MAX_REQUEST_BODY} bytes"),
            )
        })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

fn random_id() -> Result<MessageId, ApiError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut b).map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no randomness",
        )
    })?;
    Ok(MessageId(b))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendReq {
    from: String,
    to: String,
    body: Option<String>,
    body_b64: Option<String>,
    id: Option<String>,
}

fn refusal_status(code: Code) -> StatusCode {
    match code {
        Code::MAILBOX_FULL | Code::NAMESPACE_FULL => StatusCode::TOO_MANY_REQUESTS,
        Code::BODY_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
        Code::BAD_NAME => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn send(State(api): State<Api>, headers: HeaderMap, body: Body) -> ApiResult {
    let key = api.auth(&headers)?;
    let req: SendReq = read_json(body).await?;
    let from = name("from", &req.from)?;
    let to = name("to", &req.to)?;
    let payload: Bytes = match (req.body, req.body_b64) {
        (Some(t), None) => Bytes::from(t.into_bytes()),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b.as_bytes())
            .map(Bytes::from)
            .map_err(|e| ApiError::bad(format!("body_b64 is not valid base64: {e}")))?,
        _ => {
            return Err(ApiError::bad(
                "give exactly one of `body` (text) and `body_b64` (bytes)",
            ))
        }
    };
    if payload.len() > MAX_MESSAGE_BODY {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::BODY_TOO_LARGE.as_str(),
            format!(
                "the message body has {} bytes; the limit is {MAX_MESSAGE_BODY}",
                payload.len()
            ),
        ));
    }
    let id = match req.id {
        Some(s) => MessageId::parse_hex(&s.to_ascii_lowercase())
            .ok_or_else(|| ApiError::bad(format!("id {s:?} is not 32 hex digits")))?,
        None => random_id()?,
    };
    let shared = &api.shared;
    if let Some(home) = crate::mesh::home_elsewhere(shared, &key.namespace, &to) {
        let f = swb_wire::MeshForward {
            namespace: key.namespace.clone(),
            from,
            to,
            id,
            body: payload,
            sent_at_ms: now_ms(),
        };
        return match crate::mesh::forward(shared, &home.id, f).await {
            Ok(online) => {
                shared.metrics.forwarded.inc();
                ok(
                    StatusCode::ACCEPTED,
                    json!({"id": id.to_string(), "online": online}),
                )
            }
            Err(r) => {
                shared.metrics.refused(r.code);
                Err(ApiError::new(
                    refusal_status(r.code),
                    r.code.as_str(),
                    r.message,
                ))
            }
        };
    }
    let r = shared.registry().enqueue(
        &key.namespace,
        &from,
        &to,
        id,
        payload,
        now_ms(),
        tokio::time::Instant::now(),
    );
    match r {
        Enqueued::Accepted { online } => {
            shared.metrics.accepted.inc();
            debug!(to = %to, %id, online, "message accepted over http");
            ok(
                StatusCode::ACCEPTED,
                json!({"id": id.to_string(), "online": online}),
            )
        }
        Enqueued::Refused(r) => {
            shared.metrics.refused(r.code);
            Err(ApiError::new(
                refusal_status(r.code),
                r.code.as_str(),
                r.message,
            ))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiveQuery {
    #[serde(rename = "as")]
    as_name: Option<String>,
    wait: Option<String>,
    max: Option<String>,
}

/// Counts a key's open long polls; the count drops when this does.
struct PollSlot {
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

/// Marks a name attached over HTTP for the poll's lifetime.
struct Presence {
    shared: Arc<Shared>,
    ns: String,
    name: String,
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.shared
            .registry()
            .http_poll_end(&self.ns, &self.name, tokio::time::Instant::now());
    }
}

fn message_json(m: &Taken) -> Value {
    let sent = UNIX_EPOCH + Duration::from_millis(m.sent_at_ms);
    let mut v = json!({
        "id": m.id.to_string(),
        "from": m.from,
        "sent_at": humantime::format_rfc3339_millis(sent).to_string(),
        "sent_at_ms": m.sent_at_ms,
    });
    match std::str::from_utf8(&m.body) {
        Ok(t) => v["body"] = Value::String(t.to_string()),
        Err(_) => {
            v["body_b64"] = Value::String(base64::engine::general_purpose::STANDARD.encode(&m.body))
        }
    }
    v
}

fn parse_query<T: serde::de::DeserializeOwned>(q: Option<String>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(q.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad(format!("bad query: {e}")))
}

async fn receive(State(api): State<Api>, headers: HeaderMap, RawQuery(q): RawQuery) -> ApiResult {
    let key = api.auth(&headers)?;
    let q: ReceiveQuery = parse_query(q)?;
    let lim = &api.shared.config.http;
    let as_name = q
        .as_name
        .ok_or_else(|| ApiError::bad("the query needs as=NAME: whose mail to receive"))?;
    let me = name("as", &as_name)?;
    let max_wait = lim.max_wait.as_secs();
    let wait = match q.wait.as_deref() {
        None => 0,
        Some(w) => w
            .parse::<u64>()
            .ok()
            .filter(|w| *w <= max_wait)
            .ok_or_else(|| {
                ApiError::bad(format!("wait={w}: give whole seconds from 0 to {max_wait}"))
            })?,
    };
    let max = match q.max.as_deref() {
        None => 100.min(lim.max_batch),
        Some(m) => m
            .parse::<usize>()
            .ok()
            .filter(|m| (1..=lim.max_batch).contains(m))
            .ok_or_else(|| {
                ApiError::bad(format!(
                    "max={m}: give a number from 1 to {}",
                    lim.max_batch
                ))
            })?,
    };
    let _slot = api.take_poll_slot(&key.id)?;
    if let Some(home) = crate::mesh::home_elsewhere(&api.shared, &key.namespace, &me) {
        let op = json!({"op": "receive", "ns": key.namespace, "as": me, "wait": wait, "max": max});
        return forward_http(&api, &home.id, op).await;
    }
    receive_core(&api.shared, &api.cancel, &key.namespace, &me, wait, max).await
}

/// Receives mail of `me` held here (the home relay).
async fn receive_core(
    shared: &Arc<Shared>,
    cancel: &CancellationToken,
    ns: &str,
    me: &str,
    wait: u64,
    max: usize,
) -> ApiResult {
    let notify = shared
        .registry()
        .http_poll_begin(ns, me, tokio::time::Instant::now());
    let _presence = Presence {
        shared: shared.clone(),
        ns: ns.to_string(),
        name: me.to_string(),
    };
    let key = KeyInfo {
        id: String::new(),
        namespace: ns.to_string(),
    };
    let me = me.to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    loop {
        // Register for wake-ups before looking, so mail that lands between
        // the look and the wait is not missed.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let got =
            shared
                .registry()
                .http_take(&key.namespace, &me, max, tokio::time::Instant::now());
        if !got.is_empty() {
            shared.metrics.delivered.inc_by(got.len() as u64);
            let msgs: Vec<Value> = got.iter().map(message_json).collect();
            return ok(StatusCode::OK, json!({"messages": msgs}));
        }
        tokio::select! {
            _ = cancel.cancelled() => return ok(StatusCode::OK, json!({"messages": []})),
            _ = tokio::time::sleep_until(deadline) => return ok(StatusCode::OK, json!({"messages": []})),
            _ = &mut notified => {}
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckReq {
    #[serde(rename = "as")]
    as_name: String,
    ids: Vec<String>,
}

async fn ack(State(api): State<Api>, headers: HeaderMap, body: Body) -> ApiResult {
    let key = api.auth(&headers)?;
    let req: AckReq = read_json(body).await?;
    let me = name("as", &req.as_name)?;
    if req.ids.len() > MAX_ACK_IDS {
        return Err(ApiError::bad(format!(
            "{} ids; acknowledge at most {MAX_ACK_IDS} at a time",
            req.ids.len()
        )));
    }
    let ids = req
        .ids
        .iter()
        .map(|s| {
            MessageId::parse_hex(&s.to_ascii_lowercase())
                .ok_or_else(|| ApiError::bad(format!("id {s:?} is not 32 hex digits")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(home) = crate::mesh::home_elsewhere(&api.shared, &key.namespace, &me) {
        let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        let op = json!({"op": "ack", "ns": key.namespace, "as": me, "ids": ids});
        return forward_http(&api, &home.id, op).await;
    }
    ack_core(&api.shared, &key.namespace, &me, &ids)
}

fn ack_core(shared: &Shared, ns: &str, me: &str, ids: &[MessageId]) -> ApiResult {
    let n = shared.registry().ack(ns, me, ids);
    shared.metrics.acked.inc_by(n as u64);
    ok(StatusCode::OK, json!({"acked": n}))
}

async fn peers(State(api): State<Api>, headers: HeaderMap, RawQuery(q): RawQuery) -> ApiResult {
    let key = api.auth(&headers)?;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoParams {}
    let _: NoParams = parse_query(q)?;
    let now = tokio::time::Instant::now();
    let attached = api.shared.registry().peers(&key.namespace, now);
    let known = crate::mesh::known_everywhere(&api.shared, &key.namespace).await;
    let list: Vec<Value> = known
        .iter()
        .map(|s| {
            let mut v = s.to_json();
            let via = attached
                .iter()
                .find(|p| p.name == *s.name)
                .map(|p| p.via.as_str());
            v["via"] = json!(via);
            v
        })
        .collect();
    ok(StatusCode::OK, json!({"peers": list}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStatusReq {
    #[serde(rename = "as")]
    as_name: String,
    #[serde(default)]
    set: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    clear: Vec<String>,
}

async fn set_status(State(api): State<Api>, headers: HeaderMap, body: Body) -> ApiResult {
    let key = api.auth(&headers)?;
    let req: SetStatusReq = read_json(body).await?;
    let me = name("as", &req.as_name)?;
    if let Some(home) = crate::mesh::home_elsewhere(&api.shared, &key.namespace, &me) {
        let op = json!({"op": "set_status", "ns": key.namespace, "as": me, "set": req.set, "clear": req.clear});
        return forward_http(&api, &home.id, op).await;
    }
    let change = swb_wire::SetStatus {
        set: req.set.into_iter().collect(),
        clear: req.clear,
        replace: false,
    };
    set_status_core(&api.shared, &key.namespace, &me, &change)
}

fn set_status_core(shared: &Shared, ns: &str, me: &str, change: &swb_wire::SetStatus) -> ApiResult {
    let r = shared
        .registry()
        .status
        .set_fields(ns, me, change, tokio::time::Instant::now());
    match r {
        Ok(s) => ok(StatusCode::OK, s.to_json()),
        Err(refusal) => {
            let status = if refusal.code == Code::STATUS_TOO_LARGE {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            Err(ApiError::new(
                status,
                refusal.code.as_str(),
                refusal.message,
            ))
        }
    }
}

async fn get_status(
    State(api): State<Api>,
    headers: HeaderMap,
    axum::extract::Path(who): axum::extract::Path<String>,
) -> ApiResult {
    let key = api.auth(&headers)?;
    let who = name("name", &who)?;
    crate::mesh::prepare_watch(
        &api.shared,
        &key.namespace,
        std::slice::from_ref(&who),
        false,
    )
    .await;
    let s = api.shared.registry().status.get(&key.namespace, &who);
    ok(StatusCode::OK, s.to_json())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchQuery {
    peers: Option<String>,
}

async fn watch_status(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let key = api.auth(&headers)?;
    let q: WatchQuery = parse_query(q)?;
    let Some(peers) = q.peers else {
        // `/v1/status/watch` without `peers` is the status of a peer named `watch`.
        let s = api.shared.registry().status.get(&key.namespace, "watch");
        return ok(StatusCode::OK, s.to_json());
    };
    let raw: Vec<String> = peers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if raw.is_empty() || raw.len() > swb_wire::MAX_WATCH_NAMES {
        return Err(ApiError::bad(format!(
            "peers= names 1 to {} peers, comma-separated",
            swb_wire::MAX_WATCH_NAMES
        )));
    }
    let names = crate::status_streams::names(&raw)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_name", e))?;
    let slot = api.take_poll_slot(&key.id)?;
    crate::mesh::prepare_watch(&api.shared, &key.namespace, &names, true).await;
    let watcher = crate::status_streams::StatusWatcher::new(&api.shared, &key.namespace, &names);
    let event = |s: &crate::Snapshot, lagged: bool| {
        let mut v = s.to_json();
        v["lagged"] = json!(lagged);
        axum::response::sse::Event::default()
            .event("status")
            .id(s.version.to_string())
            .data(v.to_string())
    };
    // The poll slot lives as long as the event stream.
    let stream = futures_util::stream::unfold((watcher, slot), move |(mut w, slot)| async move {
        let (snap, lagged) = w.next().await?;
        Some((
            Ok::<_, std::convert::Infallible>(event(&snap, lagged)),
            (w, slot),
        ))
    });
    use futures_util::StreamExt;
    let stream = stream.take_until(api.cancel.clone().cancelled_owned());
    Ok(axum::response::sse::Sse::new(stream)
        .keep_alive(
            axum::response::sse::KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keep-alive"),
        )
        .into_response())
}

async fn health() -> ApiResult {
    ok(StatusCode::OK, json!({"status": "ok"}))
}

async fn openapi_doc() -> ApiResult {
    ok(StatusCode::OK, openapi())
}

/// Accepts TCP connections, does TLS, and serves HTTP/1.1 or HTTP/2 until
/// `cancel`; then lets open requests finish (long polls return at once).
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let lim = shared.config.http.clone();
    let api = Api {
        shared,
        cancel: cancel.clone(),
        polls: Arc::new(Mutex::new(HashMap::new())),
    };
    let app = router(api);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(lim.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64u32)
        .keep_alive_interval(Duration::from_secs(30));
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
                    tokio::time::sleep(Duration::from_millis(50)).await;
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
        conns.spawn(async move {
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
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%remote, "https connection ended: {e}");
                    }
                }
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.as_mut()).await;
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(3), async {
        while conns.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        conns.abort_all();
    }
    info!("https endpoint stopped");
}
