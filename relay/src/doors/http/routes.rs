//! The route table of the HTTP door: every route with its OpenAPI
//! description, the OpenAPI document and the axum router built from it.

use super::handlers::{
    ack, get_status, health, openapi_doc, peers, receive, send, set_status, watch_status,
};
use super::{Api, ApiError};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{on, MethodFilter};
use serde_json::{json, Value};
use swb_wire::MAX_ACK_IDS;

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
pub(crate) struct Endpoint {
    method: &'static str,
    path: &'static str,
    op: Op,
    auth: bool,
    summary: &'static str,
    responses: &'static [(u16, &'static str)],
}

/// Every route the endpoint serves. The router and the OpenAPI document are
/// both built from this table.
pub(crate) const ENDPOINTS: &[Endpoint] = &[
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
            (403, "The API key is limited to other names (name_not_allowed)"),
            (409, "A different message is held under this id (id_conflict)"),
            (413, "Body larger than 64 KiB (body_too_large) or request too large"),
            (429, "Recipient's mailbox or the namespace is full, or the key is over its rate (mailbox_full, namespace_full, rate_limited)"),
            (502, "The recipient's home relay cannot be reached (relay_unavailable)"),
            (503, "The relay could not store the message or is stopping (internal, shutting_down); retry with the same id"),
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
            (403, "The API key is limited to other names (name_not_allowed)"),
            (429, "Too many long polls open for this key, or over its rate (too_many_polls, rate_limited)"),
            (502, "The name's home relay cannot be reached (relay_unavailable)"),
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
            (403, "The API key is limited to other names (name_not_allowed)"),
            (429, "The key is over its rate (rate_limited)"),
            (502, "The name's home relay cannot be reached (relay_unavailable)"),
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
            (429, "The key is over its rate (rate_limited)"),
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
            (403, "The API key is limited to other names (name_not_allowed)"),
            (413, "Status over 32 keys or 4096 bytes (status_too_large)"),
            (429, "The namespace has 10 000 statuses, or the key is over its rate (namespace_full, rate_limited)"),
            (502, "The name's home relay cannot be reached (relay_unavailable)"),
        ],
    },
    Endpoint {
        method: "get",
        path: "/v1/status/watch",
        op: Op::WatchStatus,
        auth: true,
        summary: "Server-sent events: the current status of each of `peers` (comma-separated), then one event per change; comment keep-alives every 15 s; a revoked key's stream ends with an `error` event",
        responses: &[
            (200, "text/event-stream of `status` events, data as GET /v1/status/{name} plus \"lagged\""),
            (400, "Bad or unknown query parameter, bad name, more than 256 peers"),
            (401, "Missing, invalid or revoked API key"),
            (429, "Too many long polls and watches open for this key, or over its rate (too_many_polls, rate_limited)"),
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
            (429, "The key is over its rate (rate_limited)"),
        ],
    },
    Endpoint {
        method: "get",
        path: "/healthz",
        op: Op::Health,
        auth: false,
        summary: "Liveness",
        responses: &[
            (200, "{\"status\": \"ok\"}"),
            (
                503,
                "{\"status\": \"store_failed\", \"error\": \"...\"}: the mail store failed; restart the relay",
            ),
        ],
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

/// A peer name as the server takes it: a DNS label (1–63 letters, digits
/// and inner hyphens, any case), optionally followed by `.switchboard`.
const NAME_PATTERN: &str = "^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[Ss][Ww][Ii][Tt][Cc][Hh][Bb][Oo][Aa][Rr][Dd]\\.?)?$";
/// A status key.
const STATUS_KEY_PATTERN: &str = "^[A-Za-z0-9_.:-]{1,64}$";
/// A message id: 32 hex digits, either case.
const ID_PATTERN: &str = "^[0-9a-fA-F]{32}$";
/// Standard base64 with padding.
const BASE64_PATTERN: &str = "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$";

/// Request and parameter schemas, by operation; the numbers are this
/// relay's limits.
fn op_details(op: Op, lim: &super::HttpLimits) -> Value {
    let name = json!({"type": "string", "pattern": NAME_PATTERN});
    let key = json!({"type": "string", "pattern": STATUS_KEY_PATTERN});
    // Comma-separated names, optional spaces around them.
    let peers_pattern = format!(
        "^ *{n} *(, *{n} *){{0,{more}}}$",
        n = NAME_PATTERN.trim_start_matches('^').trim_end_matches('$'),
        more = swb_wire::MAX_WATCH_NAMES - 1
    );
    match op {
        Op::Send => json!({
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": false,
                "required": ["from", "to"],
                "oneOf": [{"required": ["body"]}, {"required": ["body_b64"]}],
                "properties": {
                    "from": name, "to": name,
                    "body": {"type": "string", "description": "UTF-8 text, at most 65536 bytes once encoded; or use body_b64"},
                    "body_b64": {"type": "string", "pattern": BASE64_PATTERN, "description": "bytes, standard base64 (with padding), at most 65536 bytes decoded"},
                    "id": {"type": "string", "pattern": ID_PATTERN, "description": "optional: a retried send with the same id is stored once"}
                }
            }}}}
        }),
        Op::Receive => json!({
            "parameters": [
                {"name": "as", "in": "query", "required": true, "schema": name},
                {"name": "wait", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": lim.max_wait.as_secs(), "default": 0}},
                {"name": "max", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": lim.max_batch, "default": 100.min(lim.max_batch)}}
            ]
        }),
        Op::Ack => json!({
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": false,
                "required": ["as", "ids"],
                "properties": {
                    "as": name,
                    "ids": {"type": "array", "maxItems": MAX_ACK_IDS, "items": {"type": "string", "pattern": ID_PATTERN}}
                }
            }}}}
        }),
        Op::SetStatus => json!({
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": false,
                "required": ["as"],
                "properties": {
                    "as": name,
                    "set": {"type": "object", "propertyNames": key, "additionalProperties": {"type": "string"}, "maxProperties": swb_wire::MAX_STATUS_KEYS,
                        "description": "keys and values together at most 4096 bytes in the resulting status"},
                    "clear": {"type": "array", "items": key}
                }
            }}}}
        }),
        Op::GetStatus => json!({
            "parameters": [{"name": "name", "in": "path", "required": true, "schema": name}]
        }),
        Op::WatchStatus => json!({
            "parameters": [{"name": "peers", "in": "query", "required": true, "schema": {"type": "string", "pattern": peers_pattern, "description": "comma-separated peer names, at most 256"}}]
        }),
        _ => json!({}),
    }
}

/// The OpenAPI 3.1 document of [`ENDPOINTS`] with the default limits.
pub fn openapi() -> Value {
    openapi_for(&super::HttpLimits::default())
}

/// The OpenAPI 3.1 document of [`ENDPOINTS`] for a relay with `lim`.
pub(crate) fn openapi_for(lim: &super::HttpLimits) -> Value {
    let error = json!({"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}
    }}});
    let mut paths = serde_json::Map::new();
    for e in ENDPOINTS {
        let mut responses = serde_json::Map::new();
        for (status, desc) in e.responses {
            let content = if *status >= 400 {
                json!({"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}})
            } else if matches!(e.op, Op::WatchStatus) {
                // Each event: `event: status`, an `id` (the version) and
                // `data` (the status as JSON); a revoked key's last one is
                // `event: error`.
                json!({"text/event-stream": {"schema": {
                    "type": "object",
                    "properties": {
                        "event": {"type": "string", "enum": ["status", "error"]},
                        "id": {"type": "string"},
                        "data": {"type": "string", "contentMediaType": "application/json"}
                    }
                }}})
            } else {
                json!({"application/json": {"schema": {"type": "object"}}})
            };
            responses.insert(
                status.to_string(),
                json!({"description": desc, "content": content}),
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
        if let (Value::Object(o), Value::Object(extra)) = (&mut op, op_details(e.op, lim)) {
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
pub(crate) fn router(api: Api) -> axum::Router {
    let mut r = axum::Router::new();
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
    // Not part of the JSON API: QUIC packets over this connection.
    r = r.route(
        swb_quic::carrier::PATH,
        axum::routing::get(super::carrier_upgrade).fallback(method_not_allowed),
    );
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
    api.router
        .services()
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
