//! The operators' HTTPS API under `/api/v1`, and the agents' WebSocket endpoint beside it.
//! `router` is a plain function of the state, so tests can drive it without a socket.

mod agents;
mod audit;
mod caller;
mod error;
mod events;
mod jobs;
mod keys;
mod path;
mod tokens;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{MethodRouter, delete, get, patch, post};
use axum::{Json, Router};
use shared::api::ApiError;

pub use caller::Caller;
pub use error::Error;
pub use tokens::create_token_row;

use crate::app::AppState;
use crate::gateway;

/// Every API route under `/api/v1`: the router is built from this table, and a test checks the
/// OpenAPI document against it in both directions.
fn api_routes() -> Vec<(&'static str, &'static str, MethodRouter<AppState>)> {
    vec![
        ("GET", "/whoami", get(tokens::whoami)),
        ("GET", "/fleet", get(agents::fleet)),
        ("GET", "/events", get(events::stream)),
        ("GET", "/agents", get(agents::list)),
        ("GET", "/agents/{id}", get(agents::get)),
        ("DELETE", "/agents/{id}", delete(agents::revoke)),
        ("PATCH", "/agents/{id}", patch(agents::patch)),
        ("POST", "/agents/{id}/accept", post(agents::accept)),
        ("POST", "/agents/{id}/rotate-credential", post(agents::rotate)),
        ("GET", "/agents/{id}/heartbeats", get(agents::heartbeats)),
        ("GET", "/agents/{id}/runs", get(agents::runs)),
        ("GET", "/enroll-tokens", get(tokens::list_enroll)),
        ("POST", "/enroll-tokens", post(tokens::create_enroll)),
        ("DELETE", "/enroll-tokens/{id}", delete(tokens::revoke_enroll)),
        ("GET", "/tokens", get(tokens::list_tokens)),
        ("POST", "/tokens", post(tokens::create_token)),
        ("DELETE", "/tokens/{id}", delete(tokens::revoke_token)),
        ("GET", "/jobs", get(jobs::list)),
        ("POST", "/jobs", post(jobs::create)),
        ("GET", "/jobs/{id}", get(jobs::get)),
        ("POST", "/jobs/{id}/cancel", post(jobs::cancel)),
        ("POST", "/jobs/{id}/approve", post(jobs::approve)),
        ("GET", "/jobs/{id}/events", get(jobs::events)),
        ("GET", "/runs/{id}/output", get(jobs::output)),
        ("GET", "/keys/revocations", get(keys::list)),
        ("POST", "/keys/revocations", post(keys::revoke)),
        ("GET", "/audit", get(audit::list)),
        ("GET", "/agent/connect", get(gateway::connect)),
        ("GET", "/agent/check", get(gateway::check)),
        ("GET", "/openapi.json", get(openapi)),
    ]
}

/// Every route the server serves, as (method, full path).
pub fn route_table() -> Vec<(&'static str, String)> {
    let mut table = vec![("GET", "/healthz".to_owned()), ("GET", "/metrics".to_owned())];
    table.extend(api_routes().into_iter().map(|(m, p, _)| (m, format!("{}{p}", shared::api::PREFIX))));
    table
}

/// The OpenAPI 3.1 description of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI)
}

pub fn router(state: AppState) -> Router {
    let mut by_path: std::collections::BTreeMap<&'static str, MethodRouter<AppState>> = std::collections::BTreeMap::new();
    for (_, path, route) in api_routes() {
        let merged = match by_path.remove(path) {
            Some(existing) => existing.merge(route),
            None => route,
        };
        by_path.insert(path, merged);
    }
    let api = by_path.into_iter().fold(Router::new(), |r, (path, route)| r.route(path, route));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .nest(shared::api::PREFIX, api)
        .merge(crate::web::router())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), bounded_body))
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response(strict_transport))
        .with_state(state)
}

/// `Strict-Transport-Security` on every answer: the server speaks only HTTPS, so a browser
/// that has seen it once never tries plain HTTP for this host again. A year, for this host
/// only (the server knows nothing of its subdomains), and no preload, which is the domain
/// owner's decision. Browsers ignore it for IP addresses, such as `--dev`'s 127.0.0.1.
pub const HSTS: &str = "max-age=31536000";

async fn strict_transport(mut resp: axum::response::Response) -> axum::response::Response {
    resp.headers_mut().insert(axum::http::header::STRICT_TRANSPORT_SECURITY, axum::http::HeaderValue::from_static(HSTS));
    resp
}

/// `Cache-Control: no-store`, for the answers that carry a new secret (a token, an enrollment
/// token, an agent's first credential): no cache, the browser's included, may keep a copy.
pub fn no_store() -> [(axum::http::HeaderName, axum::http::HeaderValue); 1] {
    [(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"))]
}

/// Reads every request body whole, within `max_body_bytes` (413 beyond) and `body_timeout`
/// (408 when it takes longer), before any handler runs: a peer that announces a large body and
/// sends it a byte at a time holds its connection for the timeout at most. API bodies are
/// small JSON documents, so buffering them costs nothing the handlers would not spend anyway.
async fn bounded_body(
    axum::extract::State(app): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let limits = &app.config.limits;
    let too_large = || {
        crate::telemetry::body_refused("too_large");
        refusal(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the request body is larger than {} bytes", limits.max_body_bytes))
    };
    let announced = req.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return too_large();
    }
    let (mut parts, body) = req.into_parts();
    // Every route that takes a body needs a token: check it before reading, so a peer without
    // one never makes the server hold a body. (The handler checks it again, with its role.)
    let has_body = announced.is_some_and(|n| n > 0) || parts.headers.contains_key(axum::http::header::TRANSFER_ENCODING);
    if has_body && let Err(e) = <Caller as axum::extract::FromRequestParts<AppState>>::from_request_parts(&mut parts, &app).await {
        return e.into_response();
    }
    match tokio::time::timeout(limits.body_timeout, axum::body::to_bytes(body, limits.max_body_bytes)).await {
        Err(_) => {
            crate::telemetry::body_refused("timeout");
            let message = format!("the request body did not arrive within {}", shared::duration::format(limits.body_timeout));
            let mut resp = refusal(StatusCode::REQUEST_TIMEOUT, "timeout", message);
            resp.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
            resp
        }
        Ok(Err(e)) if is_length_limit(&e) => too_large(),
        Ok(Err(_)) => refusal(StatusCode::BAD_REQUEST, "bad_request", "the request body could not be read".to_owned()),
        Ok(Ok(bytes)) => next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await,
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// A list's `limit` query parameter: `default` when absent, refused outside 1..=`max`.
fn limit(requested: Option<u32>, default: u32, max: u32) -> Result<u32, Error> {
    match requested.unwrap_or(default) {
        n if (1..=max).contains(&n) => Ok(n),
        _ => Err(Error::BadRequest(format!("limit must be between 1 and {max}"))),
    }
}

/// `GET /healthz`: for probes and load balancers, so it needs no token. The version, which
/// tells a scanner which advisories apply, is there only for a caller with a valid token.
async fn healthz(axum::extract::State(app): axum::extract::State<AppState>, req: axum::extract::Request) -> Json<serde_json::Value> {
    use axum::extract::FromRequestParts;
    let (mut parts, _) = req.into_parts();
    // No header, no check: an unauthenticated probe is not a refused request worth a log line.
    let authenticated =
        parts.headers.contains_key(axum::http::header::AUTHORIZATION) && Caller::from_request_parts(&mut parts, &app).await.is_ok();
    match authenticated {
        true => Json(serde_json::json!({ "status": "ok", "version": shared::VERSION })),
        false => Json(serde_json::json!({ "status": "ok" })),
    }
}

/// `GET /metrics`: Prometheus text. Fleet state is information, so it takes a token (any
/// role); point Prometheus's `authorization` at a viewer token.
async fn metrics(
    axum::extract::State(app): axum::extract::State<AppState>,
    caller: Caller,
) -> Result<impl axum::response::IntoResponse, Error> {
    caller.require(shared::api::Role::Viewer)?;
    // The gauges count the whole fleet.
    caller.require_unscoped("reading /metrics")?;
    let text = crate::telemetry::render(&app).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    refusal(StatusCode::NOT_FOUND, "not_found", format!("no route for {}", uri.path()))
}

/// A refusal made outside a handler (a body past its bounds, a path with no route): the API's
/// error with `X-Muster-Error`, as [`Error`] answers everything else, so that a client can tell
/// the server's 413 or 404 from a proxy's (docs/protocol.md).
fn refusal(status: StatusCode, kind: &'static str, message: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut resp = (status, Json(ApiError { error: kind.into(), message })).into_response();
    resp.headers_mut().insert(shared::protocol::MUSTER_ERROR_HEADER, axum::http::HeaderValue::from_static(kind));
    resp
}

#[cfg(test)]
mod tests;
