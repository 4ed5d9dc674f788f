//! Operator tokens and enrollment tokens: created (secret shown once), listed, revoked.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use shared::Timestamp;
use shared::api::{CreateEnrollToken, CreateToken, EnrollTokenCreated, EnrollTokenInfo, Role, TokenCreated, TokenInfo, WhoAmI};

use super::caller::Caller;
use super::error::{Error, Result};
use super::path::PathId;
use crate::app::AppState;
use crate::auth::{self, Kind};
use crate::store::{ApiTokenRow, AuditEntry, EnrollTokenRow, Store};

const MAX_ENROLL_USES: u32 = 1_000_000;
/// An enrollment token the operator gave no ttl lasts this long (or `max_enroll_token_ttl`, if
/// shorter), and no uses this many: short-lived by default, since it is pasted around.
pub const DEFAULT_ENROLL_TTL: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_ENROLL_USES: u32 = 10;

fn enroll_info(r: &EnrollTokenRow) -> EnrollTokenInfo {
    EnrollTokenInfo {
        id: r.id.clone(),
        created_by: r.created_by.clone(),
        created_at: r.created_at,
        expires_at: r.expires_at,
        uses_total: r.uses_total,
        uses_left: r.uses_left,
        labels: r.labels.clone(),
        revoked: r.revoked_at.is_some(),
        approve: r.approve,
    }
}

fn token_info(r: &ApiTokenRow) -> TokenInfo {
    TokenInfo {
        id: r.id.clone(),
        name: r.name.clone(),
        role: r.role,
        created_by: r.created_by.clone(),
        created_at: r.created_at,
        expires_at: r.expires_at,
        last_used_at: r.last_used_at,
        revoked: r.revoked_at.is_some(),
        scope: r.scope.clone(),
    }
}

fn issue(kind: Kind) -> Result<auth::Issued> {
    auth::issue(kind, None).map_err(|e| Error::Internal(format!("no randomness: {e}")))
}

pub async fn whoami(caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI { token_id: caller.token_id, name: caller.name, role: caller.role, scope: caller.scope })
}

pub async fn create_enroll(
    State(app): State<AppState>,
    caller: Caller,
    body: std::result::Result<Json<serde_json::Map<String, serde_json::Value>>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, [(axum::http::HeaderName, axum::http::HeaderValue); 1], Json<EnrollTokenCreated>)> {
    caller.require(Role::Admin)?;
    // Read as an object first: serde would take a struct of optional fields from an array too
    // (`[null, null]`), which the API does not promise.
    let Json(object) = body?;
    let req: CreateEnrollToken =
        serde_json::from_value(serde_json::Value::Object(object)).map_err(|e| Error::BadRequest(format!("invalid body: {e}")))?;
    let max = app.config.limits.max_enroll_token_ttl;
    let ttl = req.ttl_secs.map_or(DEFAULT_ENROLL_TTL.min(max), Duration::from_secs);
    let uses = req.uses.unwrap_or(DEFAULT_ENROLL_USES);
    if ttl.is_zero() || ttl > max {
        return Err(Error::BadRequest(format!("ttl_secs must be between 1 and {} ({})", max.as_secs(), shared::duration::format(max))));
    }
    if let Some(k) = req.labels.reserved_key() {
        return Err(Error::BadRequest(format!(
            "label {k:?}: keys starting with {:?} are reserved for what agents report about themselves",
            shared::labels::AGENT_PREFIX
        )));
    }
    // An agent enrolled with labels outside the scope would receive the jobs of others.
    if !caller.sees(&req.labels) {
        return Err(Error::OutOfScope(format!(
            "this token is scoped to {}; the labels of its enrollment tokens must match that scope",
            caller.scope.as_ref().map(ToString::to_string).unwrap_or_default()
        )));
    }
    if uses == 0 || uses > MAX_ENROLL_USES {
        return Err(Error::BadRequest(format!("uses must be between 1 and {MAX_ENROLL_USES}")));
    }
    let issued = issue(Kind::Enroll)?;
    let now = Timestamp::now();
    let row = EnrollTokenRow {
        id: issued.id,
        secret_hash: issued.hash,
        created_by: caller.actor(),
        created_at: now,
        expires_at: now.saturating_add(ttl),
        uses_total: uses,
        uses_left: uses,
        labels: req.labels,
        revoked_at: None,
        approve: req.approve,
    };
    app.store.insert_enroll_token(&row).await?;
    app.audit(caller.entry(
        "enroll_token.create",
        Some(row.id.clone()),
        serde_json::json!({ "ttl_secs": ttl.as_secs(), "uses": uses, "labels": row.labels, "approve": row.approve }),
    ))
    .await;
    Ok((StatusCode::CREATED, super::no_store(), Json(EnrollTokenCreated { info: enroll_info(&row), token: issued.token })))
}

pub async fn list_enroll(State(app): State<AppState>, caller: Caller) -> Result<Json<Vec<EnrollTokenInfo>>> {
    caller.require(Role::Admin)?;
    Ok(Json(app.store.list_enroll_tokens().await?.iter().filter(|r| caller.sees(&r.labels)).map(enroll_info).collect()))
}

pub async fn revoke_enroll(State(app): State<AppState>, caller: Caller, PathId(id): PathId) -> Result<StatusCode> {
    caller.require(Role::Admin)?;
    let now = Timestamp::now();
    let visible = app.store.enroll_token(&id).await?.is_some_and(|r| caller.sees(&r.labels));
    if !visible || !app.store.revoke_enroll_token(&id, now).await? {
        return Err(Error::NotFound(format!("no enrollment token {id}, or it is already revoked")));
    }
    app.audit(caller.entry("enroll_token.revoke", Some(id), serde_json::json!({}))).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Creates an operator token. Used by the API, `--dev` and `muster-server bootstrap`; returns
/// the audit entry for the caller to record (with the address it knows).
pub async fn create_token_row(store: &dyn Store, req: &CreateToken, created_by: &str) -> Result<(TokenCreated, AuditEntry)> {
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Err(Error::BadRequest("name must be 1 to 64 printable characters".into()));
    }
    let issued = issue(Kind::Operator)?;
    let now = Timestamp::now();
    let row = ApiTokenRow {
        id: issued.id,
        name: name.to_owned(),
        role: req.role,
        secret_hash: issued.hash,
        created_by: created_by.to_owned(),
        created_at: now,
        expires_at: req.ttl_secs.map(|s| now.saturating_add(Duration::from_secs(s))),
        revoked_at: None,
        last_used_at: None,
        scope: req.scope.clone(),
    };
    store.insert_api_token(&row).await?;
    let entry = AuditEntry {
        at: now,
        actor: created_by.to_owned(),
        address: None,
        action: "token.create".into(),
        target: Some(row.id.clone()),
        detail: serde_json::json!({ "name": row.name, "role": row.role, "ttl_secs": req.ttl_secs, "scope": row.scope }),
    };
    Ok((TokenCreated { info: token_info(&row), token: issued.token }, entry))
}

pub async fn create_token(
    State(app): State<AppState>,
    caller: Caller,
    body: std::result::Result<Json<CreateToken>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, [(axum::http::HeaderName, axum::http::HeaderValue); 1], Json<TokenCreated>)> {
    caller.require(Role::Admin)?;
    let Json(req) = body?;
    if req.ttl_secs == Some(0) {
        return Err(Error::BadRequest("ttl_secs must be positive; leave it out for a token that lasts until revoked".into()));
    }
    let max = app.config.limits.max_token_ttl;
    if req.ttl_secs.is_some_and(|s| s > max.as_secs()) {
        return Err(Error::BadRequest(format!("ttl_secs must be at most {} ({})", max.as_secs(), shared::duration::format(max))));
    }
    if let Err(why) = crate::scope::new_token_scope(caller.scope.as_ref(), req.scope.as_ref()) {
        // Audited: a scoped token reaching for more is worth knowing about.
        app.audit(caller.entry(
            "token.create_refused",
            None,
            serde_json::json!({ "name": req.name, "role": req.role, "scope": req.scope, "caller_scope": caller.scope }),
        ))
        .await;
        return Err(Error::OutOfScope(why));
    }
    let (created, mut entry) = create_token_row(app.store.as_ref(), &req, &caller.actor()).await?;
    entry.address = caller.address.clone();
    app.audit(entry).await;
    Ok((StatusCode::CREATED, super::no_store(), Json(created)))
}

pub async fn list_tokens(State(app): State<AppState>, caller: Caller) -> Result<Json<Vec<TokenInfo>>> {
    caller.require(Role::Admin)?;
    let tokens = app.store.list_api_tokens().await?;
    Ok(Json(tokens.iter().filter(|r| crate::scope::covers(caller.scope.as_ref(), r.scope.as_ref())).map(token_info).collect()))
}

pub async fn revoke_token(State(app): State<AppState>, caller: Caller, PathId(id): PathId) -> Result<StatusCode> {
    caller.require(Role::Admin)?;
    let now = Timestamp::now();
    let visible = app.store.api_token(&id).await?.is_some_and(|r| crate::scope::covers(caller.scope.as_ref(), r.scope.as_ref()));
    if !visible || !app.store.revoke_api_token(&id, now).await? {
        return Err(Error::NotFound(format!("no token {id}, or it is already revoked")));
    }
    // Streams held with this token end now (no receivers is fine).
    let _ = app.revoked.send(id.clone());
    app.audit(caller.entry("token.revoke", Some(id), serde_json::json!({}))).await;
    Ok(StatusCode::NO_CONTENT)
}
