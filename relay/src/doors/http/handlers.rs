//! One handler per route: parse and check the request, authenticate, and
//! hand the operation to the router (which finds the peer's home).

use super::{ok, Api, ApiError, ApiResult, MAX_REQUEST_BODY};
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use swb_wire::{Code, Deliver, MessageId, Refusal, MAX_ACK_IDS, MAX_MESSAGE_BODY};
use tracing::debug;

/// Interval of the keep-alive comment on event streams.
const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

fn name(field: &str, raw: &str) -> Result<String, ApiError> {
    swb_wire::normalize_name(raw).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_name",
            format!("{field}: {e}: {raw:?}"),
        )
    })
}

/// A name-scoped key may act only as its names.
fn allowed(key: &crate::keys::KeyInfo, name: &str) -> Result<(), ApiError> {
    if key.may_use(name) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "name_not_allowed",
            format!(
                "this API key may only use the names {}; not {name}",
                key.names.join(", ")
            ),
        ))
    }
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
    parse_json(&bytes)
}

/// Parses a request body (no I/O): JSON, no `null` fields, the type's own
/// checks (unknown fields refused).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))?;
    // A field is given or left out; `null` is neither (the document says so).
    if let Some((k, _)) = v
        .as_object()
        .and_then(|o| o.iter().find(|(_, v)| v.is_null()))
    {
        return Err(ApiError::bad(format!(
            "{k}: null is not a value here; leave the field out instead"
        )));
    }
    serde_json::from_value(v).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
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
pub(crate) struct SendReq {
    from: String,
    to: String,
    body: Option<String>,
    body_b64: Option<String>,
    id: Option<String>,
}

fn refusal_status(code: Code) -> StatusCode {
    match code {
        Code::MAILBOX_FULL | Code::NAMESPACE_FULL | Code::RATE_LIMITED => {
            StatusCode::TOO_MANY_REQUESTS
        }
        Code::NAME_NOT_ALLOWED => StatusCode::FORBIDDEN,
        Code::ID_CONFLICT => StatusCode::CONFLICT,
        Code::BODY_TOO_LARGE | Code::STATUS_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
        Code::BAD_NAME | Code::BAD_STATUS => StatusCode::BAD_REQUEST,
        Code::RELAY_UNAVAILABLE => StatusCode::BAD_GATEWAY,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// A refusal as an HTTP error answer.
fn refused(r: Refusal) -> ApiError {
    ApiError::new(refusal_status(r.code), r.code.as_str(), r.message)
}

/// A send request, checked: sender, recipient, body, id if given.
pub(crate) struct CheckedSend {
    from: String,
    to: String,
    payload: Bytes,
    id: Option<MessageId>,
}

impl CheckedSend {
    /// Body length (for the fuzz checks).
    #[cfg(feature = "fuzzing")]
    pub(crate) fn payload_len(&self) -> usize {
        self.payload.len()
    }
}

/// Checks a send request (no I/O).
pub(crate) fn check_send(req: SendReq) -> Result<CheckedSend, ApiError> {
    let from = name("from", &req.from)?;
    let to = name("to", &req.to)?;
    let payload: Bytes = match (req.body, req.body_b64) {
        (Some(t), None) => Bytes::from(t.into_bytes()),
        // Padding required, unused trailing bits tolerated (as most
        // encoders and the document's pattern allow).
        (None, Some(b)) => base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
        )
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
        Some(s) => Some(
            MessageId::parse_hex(&s.to_ascii_lowercase())
                .ok_or_else(|| ApiError::bad(format!("id {s:?} is not 32 hex digits")))?,
        ),
        None => None,
    };
    Ok(CheckedSend {
        from,
        to,
        payload,
        id,
    })
}

pub(crate) async fn send(State(api): State<Api>, headers: HeaderMap, body: Body) -> ApiResult {
    let key = api.auth(&headers)?;
    let req: SendReq = read_json(body).await?;
    let CheckedSend {
        from,
        to,
        payload,
        id,
    } = check_send(req)?;
    allowed(&key, &from)?;
    api.router
        .services()
        .take_send(&key.id, tokio::time::Instant::now())
        .map_err(|r| ApiError::rate_limited(r, Duration::from_secs(1)))?;
    let id = match id {
        Some(id) => id,
        None => random_id()?,
    };
    let online = api
        .router
        .send(&key.namespace, &from, &to, id, payload, now_ms())
        .await
        .map_err(refused)?;
    debug!(to = %to, %id, online, "message accepted over http");
    ok(
        StatusCode::ACCEPTED,
        json!({"id": id.to_string(), "online": online}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiveQuery {
    #[serde(rename = "as")]
    as_name: Option<String>,
    wait: Option<String>,
    max: Option<String>,
}

fn message_json(m: &Deliver) -> Value {
    let mut v = json!({
        "id": m.id.to_string(),
        "from": m.from,
        "sent_at": crate::services::status::rfc3339_of_ms(m.sent_at_ms),
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

pub(crate) async fn receive(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let key = api.auth(&headers)?;
    let q: ReceiveQuery = parse_query(q)?;
    let lim = &api.router.config().http;
    let as_name = q
        .as_name
        .ok_or_else(|| ApiError::bad("the query needs as=NAME: whose mail to receive"))?;
    let me = name("as", &as_name)?;
    allowed(&key, &me)?;
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
    let revoked = api.revocation(&key)?;
    let receive = api.router.receive(
        &key.namespace,
        &me,
        Duration::from_secs(wait),
        max,
        &api.cancel,
    );
    // A revoked key's poll ends at once (what it took stays leased and is
    // handed out again).
    let got = tokio::select! {
        r = receive => r.map_err(refused)?,
        _ = revoked.cancelled() => return Err(super::key_revoked()),
    };
    let msgs: Vec<Value> = got.iter().map(message_json).collect();
    ok(StatusCode::OK, json!({"messages": msgs}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AckReq {
    #[serde(rename = "as")]
    as_name: String,
    ids: Vec<String>,
}

/// Checks an acknowledgement (no I/O): the name and the ids.
pub(crate) fn check_ack(req: AckReq) -> Result<(String, Vec<MessageId>), ApiError> {
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
    Ok((me, ids))
}

pub(crate) async fn ack(State(api): State<Api>, headers: HeaderMap, body: Body) -> ApiResult {
    let key = api.auth(&headers)?;
    let req: AckReq = read_json(body).await?;
    let (me, ids) = check_ack(req)?;
    allowed(&key, &me)?;
    let n = api
        .router
        .ack(&key.namespace, &me, ids)
        .await
        .map_err(refused)?;
    ok(StatusCode::OK, json!({"acked": n}))
}

pub(crate) async fn peers(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let key = api.auth(&headers)?;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoParams {}
    let _: NoParams = parse_query(q)?;
    let now = tokio::time::Instant::now();
    let attached = api.router.services().registry().peers(&key.namespace, now);
    let known = api.router.peers(&key.namespace).await;
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
pub(crate) struct SetStatusReq {
    #[serde(rename = "as")]
    as_name: String,
    #[serde(default)]
    set: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    clear: Vec<String>,
}

/// Checks a status change (no I/O): the name, and the change as it would
/// apply to an empty status.
pub(crate) fn check_set_status(
    req: SetStatusReq,
) -> Result<(String, swb_wire::SetStatus), ApiError> {
    let me = name("as", &req.as_name)?;
    let change = swb_wire::SetStatus {
        set: req.set.into_iter().collect(),
        clear: req.clear,
        replace: false,
    };
    swb_wire::apply_status(&Default::default(), &change).map_err(refused)?;
    Ok((me, change))
}

pub(crate) async fn set_status(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let key = api.auth(&headers)?;
    let req: SetStatusReq = read_json(body).await?;
    let (me, change) = check_set_status(req)?;
    allowed(&key, &me)?;
    let s = api
        .router
        .set_status(&key.namespace, &me, change)
        .await
        .map_err(refused)?;
    ok(StatusCode::OK, s.to_json())
}

pub(crate) async fn get_status(
    State(api): State<Api>,
    headers: HeaderMap,
    axum::extract::Path(who): axum::extract::Path<String>,
) -> ApiResult {
    let key = api.auth(&headers)?;
    let who = name("name", &who)?;
    api.router
        .prepare_watch(&key.namespace, std::slice::from_ref(&who), false)
        .await;
    let s = api
        .router
        .services()
        .registry()
        .board()
        .get(&key.namespace, &who);
    ok(StatusCode::OK, s.to_json())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchQuery {
    peers: Option<String>,
}

pub(crate) async fn watch_status(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let key = api.auth(&headers)?;
    let q: WatchQuery = parse_query(q)?;
    let Some(peers) = q.peers else {
        return Err(ApiError::bad(
            "peers= is required: the comma-separated names to watch",
        ));
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
    let names = crate::services::watch::names(&raw)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_name", e.to_string()))?;
    let slot = api.take_poll_slot(&key.id)?;
    let revoked = api.revocation(&key)?;
    api.router.prepare_watch(&key.namespace, &names, true).await;
    let watcher = api.router.services().watcher(&key.namespace, &names);
    let event = |s: &crate::Snapshot, lagged: bool| {
        let mut v = s.to_json();
        v["lagged"] = json!(lagged);
        axum::response::sse::Event::default()
            .event("status")
            .id(s.version.to_string())
            .data(v.to_string())
    };
    // The poll slot lives as long as the event stream. A revoked key's
    // stream ends with an `error` event saying so.
    let stream = futures_util::stream::unfold(
        (watcher, slot, Some(revoked)),
        move |(mut w, slot, revoked)| async move {
            let revoked = revoked?;
            tokio::select! {
                next = w.next() => {
                    let (snap, lagged) = next?;
                    Some((
                        Ok::<_, std::convert::Infallible>(event(&snap, lagged)),
                        (w, slot, Some(revoked)),
                    ))
                }
                _ = revoked.cancelled() => {
                    let e = super::key_revoked().to_json();
                    let end = axum::response::sse::Event::default().event("error").data(e.to_string());
                    Some((Ok(end), (w, slot, None)))
                }
            }
        },
    );
    use futures_util::StreamExt;
    let stream = stream.take_until(api.cancel.clone().cancelled_owned());
    Ok(axum::response::sse::Sse::new(stream)
        .keep_alive(
            axum::response::sse::KeepAlive::new()
                .interval(SSE_KEEPALIVE)
                .text("keep-alive"),
        )
        .into_response())
}

/// Liveness: `503` once the mail store failed (it stays failed until the
/// relay restarts, so an orchestrator should restart it).
pub(crate) async fn health(State(api): State<Api>) -> ApiResult {
    match api.router.services().store_failure() {
        None => ok(StatusCode::OK, json!({"status": "ok"})),
        Some(e) => ok(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "store_failed",
                "error": format!("the mail store failed ({e}); no mail is accepted until the relay is restarted")}),
        ),
    }
}

pub(crate) async fn openapi_doc(State(api): State<Api>) -> ApiResult {
    ok(
        StatusCode::OK,
        super::routes::openapi_for(&api.router.config().http),
    )
}
