//! Routes, authentication, the two scoring protocols, and the layer that
//! counts and audits every request.
//!
//! Rules:
//! - Scoring and model routes need `Authorization: Bearer TOKEN`. Missing,
//!   unknown, revoked or expired → 401; a valid token of another tenant →
//!   403, whether or not the tenant in the URL exists; the token's own tenant
//!   without a champion → 503. The token is checked before the body is read.
//! - Health (`/v2/health/*`, `/ping`, `/health`), `/version` and `/metrics`
//!   need no token.
//! - OIP errors are `{"error": MESSAGE}`; MLflow errors are MLflow's own
//!   `{"error_code": "BAD_REQUEST", "message": MESSAGE}`. Status: 400 bad
//!   rows, 413 body or rows over the limit, 415 wrong content type, 408 a
//!   request slower than the request timeout.
//! - Every scoring response is computed by one model (one snapshot, see
//!   `state`) and names its version: OIP in `model_version`, MLflow in the
//!   `model_version` header.
//! - Every scoring answer, refusals included, is one of these JSON bodies and
//!   is audited with its token and tenant: the body limit (413, also when
//!   `Content-Length` says so before a byte is read) and the request timeout
//!   (408) are checked in the handlers, after the token, not by layers that
//!   answer on their own; an unknown method gets a JSON 405 (in MLflow's
//!   shape on `/invocations`).
//! - Memory: at most [`crate::serve::state::BODIES_AT_ONCE`] bodies of
//!   `--max-body` are held at once, at most
//!   [`crate::serve::state::TENANT_BODIES_AT_ONCE`] of one tenant (a body
//!   takes its share of its tenant's budget, then of `Shared::bodies`,
//!   before it is read; later ones wait, within the request timeout), and
//!   parsing is bounded by the row limit (`input`'s value budget).
//! - Parsing and scoring run off the async workers (`block_in_place`), one
//!   request per worker at a time (`Shared::scoring`): a large request never
//!   stalls health checks or other tenants' small requests.
//! - Two `Authorization` headers are refused (400): which one a proxy or the
//!   server would take is not something to guess.

use crate::scoring::score_row;
use crate::serve::input::{self, Expect, Refused, Rows};
use crate::serve::metrics::Route;
use crate::serve::state::{Model, Shared};
use crate::serve::tokens::{Caller, Refusal};
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{Datelike, Timelike};
use std::cell::RefCell;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

type S = State<Arc<Shared>>;

/// What a handler tells the observing layer (a response extension).
/// Shared strings and the model itself: nothing is copied per request.
#[derive(Clone, Default)]
struct Info {
    tenant: Option<Arc<str>>,
    token_id: Option<Arc<str>>,
    model: Option<Arc<Model>>,
    rows: u64,
}

/// The router of one server.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{tenant}", get(model_meta))
        .route("/v2/models/{tenant}/ready", get(model_ready))
        .route("/v2/models/{tenant}/infer", post(infer))
        .route("/v2/models/{tenant}/versions/{version}/infer", post(infer_version))
        .route("/invocations", post(invocations))
        .route("/ping", get(ping))
        .route("/health", get(ping))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(shared.clone(), observe))
        .with_state(shared)
}

fn route_of(path: Option<&str>) -> Route {
    match path {
        Some("/v2/health/live") => Route::Live,
        Some("/v2/health/ready") => Route::Ready,
        Some("/v2/models/{tenant}") => Route::ModelMeta,
        Some("/v2/models/{tenant}/ready") => Route::ModelReady,
        Some("/v2/models/{tenant}/infer") => Route::Infer,
        Some("/v2/models/{tenant}/versions/{version}/infer") => Route::InferVersion,
        Some("/invocations") => Route::Invocations,
        Some("/ping") => Route::Ping,
        Some("/health") => Route::Health,
        Some("/version") => Route::Version,
        Some("/metrics") => Route::Metrics,
        _ => Route::Other,
    }
}

/// Count every request; write the audit line of scoring requests.
async fn observe(State(s): S, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let route = route_of(req.extensions().get::<MatchedPath>().map(|m| m.as_str()));
    // The request id: the server's random prefix and a keyed hash of a
    // counter (review 26: the bare counter, shown to every tenant in
    // `x-request-id`, told each how many requests the others made).
    let rid = route.scores().then(|| s.request_counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let mut resp = next.run(req).await;
    let secs = t0.elapsed().as_secs_f64();
    let status = resp.status().as_u16();
    let info = resp.extensions_mut().remove::<Info>().unwrap_or_default();
    let tenant = info.tenant.as_deref().unwrap_or("-");
    s.metrics.record(tenant, route, status, if status == 200 { info.rows } else { 0 }, secs);
    if let Some(n) = rid {
        let mut id = Vec::with_capacity(32);
        id.extend_from_slice(s.request_prefix.as_bytes());
        id.push(b'-');
        id.extend_from_slice(s.request_suffix(n).as_bytes());
        let now = chrono::Utc::now();
        LINE.with_borrow_mut(|line| {
            line.clear();
            audit_line(line, now, &id, &info, route, status, secs);
            s.audit.log(now.date_naive(), line);
        });
        if let Ok(v) = HeaderValue::from_maybe_shared(axum::body::Bytes::from(id)) {
            resp.headers_mut().insert("x-request-id", v);
        }
    }
    resp
}

thread_local! {
    /// The audit line being formatted (reused: no allocation per request).
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

/// One audit line: a JSON object (no newline) with the time, request id,
/// token id, tenant, model version, route, rows, status and latency.
fn audit_line(out: &mut Vec<u8>, now: chrono::DateTime<chrono::Utc>, rid: &[u8], info: &Info, route: crate::serve::metrics::Route, status: u16, secs: f64) {
    // RFC 3339, UTC, milliseconds (as chrono's to_rfc3339_opts(Millis, true)).
    let ms = (now.timestamp_subsec_millis()).min(999);
    let _ = write!(
        out,
        "{{\"time\":\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{ms:03}Z\",\"request_id\":",
        now.year(),
        now.month(),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    // The id is hex, '-' and digits: no escaping needed.
    out.push(b'"');
    out.extend_from_slice(rid);
    out.push(b'"');
    let opt = |out: &mut Vec<u8>, key: &[u8], v: Option<&str>| {
        out.extend_from_slice(key);
        match v {
            Some(v) => push_json_str(out, v),
            None => out.extend_from_slice(b"null"),
        }
    };
    opt(out, b",\"token_id\":", info.token_id.as_deref());
    opt(out, b",\"tenant\":", info.tenant.as_deref());
    opt(out, b",\"model_version\":", info.model.as_ref().map(|m| m.version.as_str()));
    out.extend_from_slice(b",\"route\":");
    push_json_str(out, route.name());
    out.extend_from_slice(b",\"rows\":");
    push_i64(out, info.rows as i64);
    out.extend_from_slice(b",\"status\":");
    push_i64(out, status as i64);
    out.extend_from_slice(b",\"latency_ms\":");
    push_f64(out, (secs * 1e6).round() / 1e3);
    out.push(b'}');
}

/// Protocol of an error body.
#[derive(Clone, Copy)]
enum Proto {
    Oip,
    Mlflow,
}

fn error(proto: Proto, status: StatusCode, msg: &str, info: Info) -> Response {
    let body = match proto {
        Proto::Oip => serde_json::json!({ "error": msg }),
        Proto::Mlflow => {
            let code = match status.as_u16() {
                400 | 413 | 415 => "BAD_REQUEST",
                408 => "DEADLINE_EXCEEDED",
                401 => "UNAUTHENTICATED",
                403 => "PERMISSION_DENIED",
                503 => "TEMPORARILY_UNAVAILABLE",
                _ => "INTERNAL_ERROR",
            };
            serde_json::json!({ "error_code": code, "message": msg })
        }
    };
    let mut r = (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    if status != StatusCode::BAD_REQUEST {
        // Answered before the body was read: the connection cannot be
        // reused (the unread body is still on it), so say so; a client
        // would otherwise send its next request into a closing socket.
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r.extensions_mut().insert(info);
    r
}

fn bearer(h: &HeaderMap) -> &[u8] {
    let Some(v) = h.get(header::AUTHORIZATION) else { return b"" };
    let v = v.as_bytes();
    if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") { v[7..].trim_ascii() } else { b"" }
}

/// Check the token; with `tenant`, also that it is the token's tenant.
fn authorize(s: &Shared, h: &HeaderMap, tenant: Option<&str>, proto: Proto) -> Result<Caller, Response> {
    if h.get_all(header::AUTHORIZATION).iter().nth(1).is_some() {
        return Err(error(proto, StatusCode::BAD_REQUEST, "more than one Authorization header; send one", Info::default()));
    }
    let set = s.tokens.load();
    let caller = set.caller(bearer(h), chrono::Utc::now()).map_err(|why| {
        let msg = match why {
            Refusal::Missing => "missing token: send Authorization: Bearer TOKEN (dagrun tokens create TENANT)",
            Refusal::Unknown | Refusal::Revoked | Refusal::Expired => "invalid token (unknown, revoked or expired)",
        };
        let mut r = error(proto, StatusCode::UNAUTHORIZED, msg, Info::default());
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    })?;
    let caller = caller.clone();
    if let Some(t) = tenant
        && t != &*caller.tenant
    {
        let info = Info { tenant: Some(caller.tenant.clone()), token_id: Some(caller.token_id.clone()), ..Info::default() };
        return Err(error(proto, StatusCode::FORBIDDEN, "this token may not use this model", info));
    }
    Ok(caller)
}

/// A URL whose model name or version axum cannot decode (invalid UTF-8 after
/// percent-decoding): the token is checked first, as for every other answer,
/// and the answer is the protocol's JSON error, audited like the rest.
fn bad_path(s: &Shared, h: &HeaderMap, proto: Proto) -> Response {
    match authorize(s, h, None, proto) {
        Err(r) => r,
        Ok(c) => error(proto, StatusCode::BAD_REQUEST, "the model name or version in the URL is not valid percent-encoded UTF-8", info_of(&c, None)),
    }
}

fn info_of(c: &Caller, m: Option<&Arc<Model>>) -> Info {
    Info { tenant: Some(c.tenant.clone()), token_id: Some(c.token_id.clone()), model: m.cloned(), rows: 0 }
}

/// The champion (or `version`) of the caller's tenant.
fn pick(s: &Shared, c: &Caller, version: Option<&str>, proto: Proto) -> Result<Arc<Model>, Response> {
    let models = s.models.load();
    let tm = models.get(&*c.tenant);
    let m = match version {
        None => tm.and_then(|t| t.champion.clone()),
        Some(v) => tm.and_then(|t| t.versions.get(v).cloned()),
    };
    m.ok_or_else(|| match version {
        None => error(proto, StatusCode::SERVICE_UNAVAILABLE, "no model is promoted for this tenant yet (dagrun models promote)", info_of(c, None)),
        Some(_) => error(proto, StatusCode::NOT_FOUND, "no such model version for this tenant (dagrun models list)", info_of(c, None)),
    })
}

/// The media type of the body: None without a Content-Type header, else
/// whether it is (case-insensitively, parameters ignored) one of `accepted`.
fn media_type(h: &HeaderMap, accepted: &[&'static str]) -> Option<Option<&'static str>> {
    let v = h.get(header::CONTENT_TYPE)?.as_bytes();
    let mt = v.split(|&b| b == b';').next().unwrap_or(b"").trim_ascii();
    Some(accepted.iter().find(|a| a.as_bytes().eq_ignore_ascii_case(mt)).copied())
}

/// What a request holds while its answer is made, once its body is read:
/// its share of the body budgets (the bytes live until then), and its
/// connection's mark of a request in progress (not evicted: `serve::InRequest`).
type BodyHeld<'s> = (tokio::sync::OwnedSemaphorePermit, tokio::sync::SemaphorePermit<'s>, Option<crate::serve::Slot>);

/// The request body, read within the request timeout and the server's
/// budget of bodies held at once (see [`BodyHeld`]). A declared length over
/// the limit is refused before anything is read.
async fn take_body<'s>(
    s: &'s Shared,
    c: &Caller,
    parts: &axum::http::request::Parts,
    body: Body,
    proto: Proto,
    info: &Info,
    deadline: tokio::time::Instant,
) -> Result<(axum::body::Bytes, BodyHeld<'s>), Response> {
    use http_body_util::BodyExt;
    let h = &parts.headers;
    let max = s.limits.max_body;
    let too_large = || error(proto, StatusCode::PAYLOAD_TOO_LARGE, "request body over the size limit (dagrun serve --max-body)", info.clone());
    let declared = h.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    // At most max_body, so never more than a tenant's budget (or the server's).
    let kib = declared.map_or(max, |n| n as usize).div_ceil(1024).clamp(1, max.div_ceil(1024)).min(u32::MAX as usize);
    let mine = s.body_budget_of(&c.tenant);
    let read = async {
        let own = mine.acquire_many_owned(kib as u32).await.expect("a tenant's body budget is never closed");
        let permit = (own, s.bodies.acquire_many(kib as u32).await.expect("the body budget is never closed"));
        let bytes = http_body_util::Limited::new(body, max).collect().await.map(|b| b.to_bytes());
        (permit, bytes)
    };
    match tokio::time::timeout_at(deadline, read).await {
        Err(_) => Err(error(
            proto,
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive within the request timeout (dagrun serve --request-timeout)",
            info.clone(),
        )),
        Ok(((own, all), Ok(bytes))) => {
            // The body is here: in a request until the answer is made.
            let in_request = parts.extensions.get::<crate::serve::InRequest>().map(crate::serve::InRequest::enter);
            Ok((bytes, (own, all, in_request)))
        }
        Ok((_, Err(e))) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok((_, Err(_))) => Err(error(proto, StatusCode::BAD_REQUEST, "cannot read the request body", info.clone())),
    }
}

/// Run `answer` (parse, check, score) off the async workers, one request per
/// worker at a time; a request that gets no turn before its deadline is
/// answered 503 (the server is busy), not queued on.
async fn off_workers(s: &Shared, deadline: tokio::time::Instant, proto: Proto, info: &Info, answer: impl FnOnce() -> Response) -> Response {
    match tokio::time::timeout_at(deadline, s.scoring.acquire()).await {
        Ok(turn) => {
            let _turn = turn.expect("the scoring semaphore is never closed");
            tokio::task::block_in_place(answer)
        }
        Err(_) => {
            let mut r =
                error(proto, StatusCode::SERVICE_UNAVAILABLE, "the server is busy: no scoring slot within the request timeout; retry later", info.clone());
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

fn refused(proto: Proto, r: Refused, info: Info) -> Response {
    match r {
        Refused::Bad(m) => error(proto, StatusCode::BAD_REQUEST, &m, info),
        Refused::TooManyRows(m) => error(proto, StatusCode::PAYLOAD_TOO_LARGE, &m, info),
    }
}

fn score(m: &Model, rows: &Rows) -> Vec<f64> {
    let d = &m.deployed;
    (0..rows.len()).map(|i| score_row(&d.artifact, &d.stats, d.as_of, rows.logins[i], rows.amounts[i], rows.dates[i])).collect()
}

fn push_f64(out: &mut Vec<u8>, x: f64) {
    let mut b = ryu::Buffer::new();
    out.extend_from_slice(b.format_finite(x).as_bytes());
}

fn push_i64(out: &mut Vec<u8>, x: i64) {
    let mut b = itoa::Buffer::new();
    out.extend_from_slice(b.format(x).as_bytes());
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes; writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn json_response(body: Vec<u8>, info: Info) -> Response {
    let mut r = (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    r.extensions_mut().insert(info);
    r
}

// ------------------------------------------------------------ health, metadata

async fn live() -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], r#"{"live":true}"#).into_response()
}

async fn ready(State(s): S) -> Response {
    if s.draining.load(std::sync::atomic::Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "application/json")], r#"{"ready":false}"#).into_response()
    } else {
        (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], r#"{"ready":true}"#).into_response()
    }
}

async fn ping() -> Response {
    (StatusCode::OK, "\n").into_response()
}

async fn version() -> Response {
    (StatusCode::OK, concat!("dagrun ", env!("CARGO_PKG_VERSION"), "\n")).into_response()
}

async fn metrics(State(s): S) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "application/json")], r#"{"error":"no such route"}"#).into_response()
}

/// A JSON 405 in the route's protocol: MLflow's shape on `/invocations`, else OIP's.
async fn method_not_allowed(uri: axum::http::Uri) -> Response {
    let body = if uri.path() == "/invocations" {
        r#"{"error_code":"BAD_REQUEST","message":"this route does not take this method"}"#
    } else {
        r#"{"error":"this route does not take this method"}"#
    };
    (StatusCode::METHOD_NOT_ALLOWED, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn tensor_meta(name: &str, dt: &str) -> serde_json::Value {
    serde_json::json!({"name": name, "datatype": dt, "shape": [-1]})
}

async fn model_meta(State(s): S, tenant: Result<Path<String>, PathRejection>, h: HeaderMap) -> Response {
    let Ok(Path(tenant)) = tenant else { return bad_path(&s, &h, Proto::Oip) };
    let c = match authorize(&s, &h, Some(&tenant), Proto::Oip) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let models = s.models.load();
    let tm = models.get(&*c.tenant);
    let versions: Vec<&String> = tm.map(|t| t.versions.keys().collect()).unwrap_or_default();
    let champion = tm.and_then(|t| t.champion.as_ref());
    let body = serde_json::json!({
        "name": tenant,
        "versions": versions,
        "platform": "dagrun",
        "champion": champion.map(|m| &m.version),
        "feature_version": champion.map(|m| &m.deployed.artifact.feature_set_version),
        "inputs": [
            tensor_meta("Customer_ID", "INT64"),
            tensor_meta("Login_Count", "INT64"),
            tensor_meta("Purchase_Amount", "FP64"),
            tensor_meta("Last_Visit_Date", "BYTES"),
            {"name": "Tenant_ID", "datatype": "BYTES", "shape": [-1], "optional": true},
        ],
        "outputs": [tensor_meta("Customer_ID", "INT64"), tensor_meta("score", "FP64")],
    });
    json_response(body.to_string().into_bytes(), info_of(&c, champion))
}

async fn model_ready(State(s): S, tenant: Result<Path<String>, PathRejection>, h: HeaderMap) -> Response {
    let Ok(Path(tenant)) = tenant else { return bad_path(&s, &h, Proto::Oip) };
    let c = match authorize(&s, &h, Some(&tenant), Proto::Oip) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let m = s.models.load().get(&*c.tenant).and_then(|t| t.champion.clone());
    let body = serde_json::json!({"name": tenant, "ready": m.is_some(), "model_version": m.as_ref().map(|m| &m.version)}).to_string();
    let status = if m.is_some() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut r = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    r.extensions_mut().insert(info_of(&c, m.as_ref()));
    r
}

// ------------------------------------------------------------ OIP inference

// (The handlers take the whole request rather than axum's `HeaderMap`
// extractor, which copies every header.)

async fn infer(State(s): S, tenant: Result<Path<String>, PathRejection>, req: Request) -> Response {
    let Ok(Path(tenant)) = tenant else { return bad_path(&s, req.headers(), Proto::Oip) };
    oip_infer(s, tenant, None, req).await
}

async fn infer_version(State(s): S, path: Result<Path<(String, String)>, PathRejection>, req: Request) -> Response {
    let Ok(Path((tenant, version))) = path else { return bad_path(&s, req.headers(), Proto::Oip) };
    oip_infer(s, tenant, Some(version), req).await
}

async fn oip_infer(s: Arc<Shared>, tenant: String, version: Option<String>, req: Request) -> Response {
    let deadline = tokio::time::Instant::now() + s.limits.request_timeout;
    let (parts, body) = req.into_parts();
    let h = &parts.headers;
    let p = Proto::Oip;
    let c = match authorize(&s, h, Some(&tenant), p) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let m = match pick(&s, &c, version.as_deref(), p) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let info = info_of(&c, Some(&m));
    match media_type(h, &["application/json"]) {
        None | Some(Some(_)) => {}
        Some(None) => return error(p, StatusCode::UNSUPPORTED_MEDIA_TYPE, "send the inference request as application/json", info),
    }
    let (bytes, _held) = match take_body(&s, &c, &parts, body, p, &info, deadline).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    off_workers(&s, deadline, p, &info.clone(), || oip_answer(&s, &c, &m, &bytes, info)).await
}

/// What a caller's rows are checked against: its tenant, the model's `as_of`
/// and the row limit.
fn expect<'a>(s: &Shared, c: &'a Caller, m: &Model) -> Expect<'a> {
    Expect { tenant: &c.tenant, as_of: m.deployed.as_of, max_rows: s.limits.max_rows }
}

/// Parse, check and score an OIP request body.
fn oip_answer(s: &Shared, c: &Caller, m: &Arc<Model>, bytes: &[u8], mut info: Info) -> Response {
    let p = Proto::Oip;
    let req = match input::parse_oip(bytes, s.limits.max_rows) {
        Ok(r) => r,
        Err(e) => return refused(p, e, info),
    };
    let ex = expect(s, c, m);
    let rows = match input::oip_rows(&req, &ex) {
        Ok(r) => r,
        Err(e) => return refused(p, e, info),
    };
    let scores = score(m, &rows);
    let n = rows.len();
    let mut out = Vec::with_capacity(200 + n * 32);
    out.extend_from_slice(b"{\"model_name\":");
    push_json_str(&mut out, &c.tenant);
    out.extend_from_slice(b",\"model_version\":");
    push_json_str(&mut out, &m.version);
    if let Some(id) = &req.id {
        out.extend_from_slice(b",\"id\":");
        push_json_str(&mut out, id);
    }
    out.extend_from_slice(b",\"outputs\":[{\"name\":\"Customer_ID\",\"datatype\":\"INT64\",\"shape\":[");
    push_i64(&mut out, n as i64);
    out.extend_from_slice(b"],\"data\":[");
    for (i, id) in rows.ids.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_i64(&mut out, *id);
    }
    out.extend_from_slice(b"]},{\"name\":\"score\",\"datatype\":\"FP64\",\"shape\":[");
    push_i64(&mut out, n as i64);
    out.extend_from_slice(b"],\"data\":[");
    for (i, x) in scores.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_f64(&mut out, *x);
    }
    out.extend_from_slice(b"]}]}");
    info.rows = n as u64;
    json_response(out, info)
}

// ------------------------------------------------------------ MLflow

async fn invocations(State(s): S, req: Request) -> Response {
    let deadline = tokio::time::Instant::now() + s.limits.request_timeout;
    let p = Proto::Mlflow;
    let (parts, body) = req.into_parts();
    let h = &parts.headers;
    let c = match authorize(&s, h, None, p) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let m = match pick(&s, &c, None, p) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let info = info_of(&c, Some(&m));
    let csv = match media_type(h, &["application/json", "text/csv"]) {
        Some(Some("application/json")) => false,
        Some(Some(_)) => true,
        _ => {
            return error(
                p,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send application/json (dataframe_split or dataframe_records) or text/csv with a header line",
                info,
            );
        }
    };
    let (bytes, _held) = match take_body(&s, &c, &parts, body, p, &info, deadline).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    off_workers(&s, deadline, p, &info.clone(), || mlflow_answer(&s, &c, &m, &bytes, csv, info)).await
}

/// Parse, check and score an MLflow request body (CSV or JSON).
fn mlflow_answer(s: &Shared, c: &Caller, m: &Arc<Model>, bytes: &[u8], csv: bool, mut info: Info) -> Response {
    let p = Proto::Mlflow;
    let ex = expect(s, c, m);
    let rows = match if csv { input::csv_rows(bytes, &ex) } else { input::mlflow_json_rows(bytes, &ex) } {
        Ok(r) => r,
        Err(e) => return refused(p, e, info),
    };
    let scores = score(m, &rows);
    let n = rows.len();
    let mut out = Vec::with_capacity(32 + n * 48);
    out.extend_from_slice(b"{\"predictions\":[");
    for i in 0..n {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"Customer_ID\":");
        push_i64(&mut out, rows.ids[i]);
        out.extend_from_slice(b",\"score\":");
        push_f64(&mut out, scores[i]);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    info.rows = n as u64;
    let version = HeaderValue::from_str(&m.version).ok();
    let mut r = json_response(out, info);
    if let Some(v) = version {
        r.headers_mut().insert("model_version", v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_lines_are_json_with_chronos_time_format() {
        let now = chrono::Utc::now();
        let info = Info { tenant: Some("Tenant_\"A".into()), token_id: Some("0a1b2c3d".into()), model: None, rows: 7 };
        let mut out = Vec::new();
        audit_line(&mut out, now, b"abcd0123-42", &info, crate::serve::metrics::Route::Invocations, 200, 0.0012345);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["time"], now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        assert_eq!(v["request_id"], "abcd0123-42");
        assert_eq!(v["token_id"], "0a1b2c3d");
        assert_eq!(v["tenant"], "Tenant_\"A");
        assert!(v["model_version"].is_null());
        assert_eq!(v["route"], "/invocations");
        assert_eq!((v["rows"].as_u64(), v["status"].as_u64(), v["latency_ms"].as_f64()), (Some(7), Some(200), Some(1.235)));
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 9, "{keys:?}");
    }
}
