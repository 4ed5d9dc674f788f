//! The operators' HTTPS API under `/api/v1`, and the agents' WebSocket endpoint beside it.
//! `router` is a plain function of the state, so tests can drive it without a socket.

mod agents;
mod caller;
mod error;
mod events;
mod jobs;
mod tokens;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use shared::api::ApiError;

pub use caller::Caller;
pub use error::Error;
pub use tokens::create_token_row;

use crate::app::AppState;
use crate::gateway;

/// Largest request body the API accepts.
const MAX_BODY: usize = 1024 * 1024;

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/whoami", get(tokens::whoami))
        .route("/fleet", get(agents::fleet))
        .route("/events", get(events::stream))
        .route("/agents", get(agents::list))
        .route("/agents/{id}", get(agents::get).delete(agents::revoke))
        .route("/agents/{id}/heartbeats", get(agents::heartbeats))
        .route("/enroll-tokens", get(tokens::list_enroll).post(tokens::create_enroll))
        .route("/enroll-tokens/{id}", delete(tokens::revoke_enroll))
        .route("/tokens", get(tokens::list_tokens).post(tokens::create_token))
        .route("/tokens/{id}", delete(tokens::revoke_token))
        .route("/jobs", get(jobs::list).post(jobs::create))
        .route("/jobs/{id}", get(jobs::get))
        .route("/jobs/{id}/cancel", post(jobs::cancel))
        .route("/jobs/{id}/events", get(jobs::events))
        .route("/agent/connect", get(gateway::connect))
        .route("/agent/check", get(gateway::check));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .nest(shared::api::PREFIX, api)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok", "version": shared::VERSION }))
}

/// `GET /metrics`: Prometheus text. Fleet state is information, so it takes a token (any
/// role); point Prometheus's `authorization` at a viewer token.
async fn metrics(
    axum::extract::State(app): axum::extract::State<AppState>,
    caller: Caller,
) -> Result<impl axum::response::IntoResponse, Error> {
    caller.require(shared::api::Role::Viewer)?;
    let text = crate::telemetry::render(&app).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

async fn not_found(uri: axum::http::Uri) -> (StatusCode, Json<ApiError>) {
    (StatusCode::NOT_FOUND, Json(ApiError { error: "not_found".into(), message: format!("no route for {}", uri.path()) }))
}
