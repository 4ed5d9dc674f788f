//! Operator signing keys revoked fleet-wide. The server stores and relays revocations; it
//! cannot make one: each is signed by an operator key, and each agent checks it against its own
//! `trusted_keys`.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use shared::api::Role;
use shared::protocol::ServerMessage;
use shared::signing::KeyRevocation;

use super::caller::Caller;
use super::error::{Error, Result};
use crate::app::AppState;

/// Revocations kept at most: they are sent to every agent on every connection.
const MAX_REVOCATIONS: usize = 1000;

pub async fn list(State(app): State<AppState>, caller: Caller) -> Result<Json<Vec<KeyRevocation>>> {
    caller.require(Role::Viewer)?;
    Ok(Json(app.key_revocations().await?.as_ref().clone()))
}

pub async fn revoke(
    State(app): State<AppState>,
    caller: Caller,
    body: std::result::Result<Json<KeyRevocation>, JsonRejection>,
) -> Result<(StatusCode, Json<KeyRevocation>)> {
    caller.require(Role::Admin)?;
    let Json(r) = body?;
    r.verify().map_err(|_| Error::SignatureRefused(format!("the revocation of {} is not signed by {}", r.key, r.by)))?;
    if app.key_revocations().await?.len() >= MAX_REVOCATIONS {
        return Err(Error::Conflict(format!("{MAX_REVOCATIONS} keys are revoked already; that is the most the server keeps")));
    }
    let new = app.store.insert_key_revocation(&r, shared::Timestamp::now(), &caller.actor()).await?;
    app.forget_key_revocations();
    if new {
        let senders = app.registry.senders();
        let reached = senders.iter().filter(|tx| tx.try_send(ServerMessage::KeyRevoked(Box::new(r.clone()))).is_ok()).count();
        tracing::warn!(key = %r.key, by = %r.by, sessions = reached, "operator key revoked fleet-wide");
        app.audit(caller.entry("key.revoke", Some(r.key.to_string()), serde_json::json!({ "by": r.by, "sessions": reached }))).await;
    }
    // Agents that were not reached now get it when they next connect.
    Ok((if new { StatusCode::CREATED } else { StatusCode::OK }, Json(r)))
}
