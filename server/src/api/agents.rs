//! Fleet state: agents, their heartbeats, and fleet counts.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use shared::api::{AgentDetail, AgentStatus, AgentSummary, CloneSeen, ConnectionInfo, FleetCounts, HeartbeatSample, PatchAgent, Role};
use shared::job::AgentRun;
use shared::protocol::close;
use shared::{AgentId, Selector, Timestamp};

use super::caller::Caller;
use super::error::{Error, Result};
use super::path::AgentPath;
use crate::app::AppState;
use crate::store::AgentRow;

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    /// A label selector: `site=paris,role in (pos,kiosk),!canary`.
    label: Option<String>,
}

pub fn summary(row: &AgentRow) -> AgentSummary {
    AgentSummary {
        id: row.id.clone(),
        hostname: row.hostname.clone(),
        status: row.status,
        status_since: row.status_since,
        labels: row.labels.clone(),
        last_heartbeat_at: row.last_heartbeat_at,
        metrics: row.last_metrics.clone(),
        pending: row.approval_pending,
        trusted_keys: row.trusted_keys.clone(),
    }
}

/// The agent, or 404 for one the server never enrolled or that lies outside the caller's
/// scope (a scoped token cannot tell those apart).
async fn visible_agent(app: &AppState, caller: &Caller, id: &AgentId) -> Result<AgentRow> {
    match app.store.agent(id).await? {
        Some(row) if caller.sees(&row.labels) => Ok(row),
        _ => Err(Error::NotFound(format!("no agent {id}"))),
    }
}

/// 404 for an agent the server never enrolled (or outside the caller's scope), rather than an
/// empty history.
async fn require_agent(app: &AppState, caller: &Caller, id: &AgentId) -> Result<()> {
    visible_agent(app, caller, id).await.map(|_| ())
}

pub async fn list(
    State(app): State<AppState>,
    caller: Caller,
    query: std::result::Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AgentSummary>>> {
    caller.require(Role::Viewer)?;
    let Query(q) = query?;
    let status = q.status.as_deref().map(str::parse::<AgentStatus>).transpose().map_err(|e| Error::BadRequest(e.to_string()))?;
    let selector = q.label.as_deref().map(Selector::parse).transpose().map_err(|e| Error::BadRequest(e.to_string()))?;
    let rows = app.store.list_agents(status).await?;
    Ok(Json(
        rows.iter()
            .filter(|r| r.revoked_at.is_none())
            .filter(|r| caller.sees(&r.labels))
            .filter(|r| selector.as_ref().is_none_or(|s| s.matches(&r.labels)))
            .map(summary)
            .collect(),
    ))
}

pub async fn get(State(app): State<AppState>, caller: Caller, AgentPath(id): AgentPath) -> Result<Json<AgentDetail>> {
    caller.require(Role::Viewer)?;
    let row = visible_agent(&app, &caller, &id).await?;
    let transitions = app.store.transitions(&id, 20).await?;
    let connection = match (&row.remote_addr, row.connected_at, &row.node) {
        (Some(addr), Some(at), Some(node)) => Some(ConnectionInfo {
            connected: row.connected,
            remote_addr: addr.clone(),
            connected_at: at,
            disconnected_at: row.disconnected_at,
            node: node.clone(),
        }),
        _ => None,
    };
    Ok(Json(AgentDetail {
        summary: summary(&row),
        enrolled_at: row.enrolled_at,
        heartbeat_interval_ms: row.heartbeat_interval_ms,
        agent_version: row.agent_version.clone(),
        connection,
        transitions,
        credential_issued_at: row.credential_issued_at,
        rotation_requested_at: row.rotation_requested_at,
        clone_seen: row.clone_seen.as_ref().map(|(at, from)| CloneSeen { at: *at, from_addr: from.clone() }),
    }))
}

#[derive(Debug, Deserialize)]
pub struct HeartbeatQuery {
    /// RFC 3339 time, or a duration back from now (`1h`). Default: one hour back.
    since: Option<String>,
    /// At most this many samples, oldest first. Default 1000, at most 10000.
    limit: Option<u32>,
    /// One sample per step (`1m`, `10m`), each field the highest in its step: for charts of
    /// long periods. Default: every heartbeat.
    step: Option<String>,
}

pub async fn heartbeats(
    State(app): State<AppState>,
    caller: Caller,
    AgentPath(id): AgentPath,
    query: std::result::Result<Query<HeartbeatQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<HeartbeatSample>>> {
    caller.require(Role::Viewer)?;
    let Query(q) = query?;
    let now = Timestamp::now();
    let since = match q.since.as_deref() {
        None => now.saturating_sub(std::time::Duration::from_secs(3600)),
        Some(s) => match Timestamp::parse_rfc3339(s) {
            Ok(t) => t,
            Err(_) => now.saturating_sub(
                shared::duration::parse(s)
                    .map_err(|_| Error::BadRequest(format!("since: {s:?} is neither an RFC 3339 time nor a duration")))?,
            ),
        },
    };
    let step = match q.step.as_deref() {
        None => None,
        Some(s) => match shared::duration::parse(s) {
            Ok(d) if d >= std::time::Duration::from_secs(1) => Some(d),
            _ => return Err(Error::BadRequest(format!("step: {s:?} is not a duration of at least 1s"))),
        },
    };
    let limit = super::limit(q.limit, 1000, 10_000)?;
    require_agent(&app, &caller, &id).await?;
    Ok(Json(app.store.heartbeats(&id, since, step, limit).await?))
}

#[derive(Debug, Deserialize)]
pub struct RunsQuery {
    /// At most this many runs, newest job first. Default 20, at most 500.
    limit: Option<u32>,
}

/// `GET /api/v1/agents/{id}/runs`: what the agent was asked to run, and how each run ended.
pub async fn runs(
    State(app): State<AppState>,
    caller: Caller,
    AgentPath(id): AgentPath,
    query: std::result::Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AgentRun>>> {
    caller.require(Role::Viewer)?;
    let Query(q) = query?;
    let limit = super::limit(q.limit, 20, 500)?;
    require_agent(&app, &caller, &id).await?;
    let mut runs = app.store.agent_runs(&id, limit).await?;
    for r in &mut runs {
        r.command = r.command.redacted();
    }
    Ok(Json(runs))
}

pub async fn fleet(State(app): State<AppState>, caller: Caller) -> Result<Json<FleetCounts>> {
    caller.require(Role::Viewer)?;
    if caller.scope.is_none() {
        return Ok(Json(app.store.fleet_counts().await?));
    }
    let mut counts = FleetCounts::default();
    for r in app.store.list_agents(None).await?.iter().filter(|r| r.revoked_at.is_none() && caller.sees(&r.labels)) {
        match r.status {
            AgentStatus::Online => counts.online += 1,
            AgentStatus::Stale => counts.stale += 1,
            AgentStatus::Offline => counts.offline += 1,
        }
        counts.total += 1;
    }
    Ok(Json(counts))
}

/// `DELETE /api/v1/agents/{id}`: revokes the agent's credential and closes its connection.
pub async fn revoke(State(app): State<AppState>, caller: Caller, AgentPath(id): AgentPath) -> Result<StatusCode> {
    caller.require(Role::Admin)?;
    let now = Timestamp::now();
    require_agent(&app, &caller, &id).await?;
    if !app.store.revoke_agent(&id, now).await? {
        return Err(Error::NotFound(format!("no agent {id}, or it is already revoked")));
    }
    app.registry.close(&id, close::REVOKED, "credential revoked");
    // Its runs cannot report any more: end them now, with the reason, instead of leaving them
    // to expire or be called lost.
    let open = app.store.open_runs_for_agent(&id).await?;
    let mut by_job: std::collections::BTreeMap<&shared::JobId, Vec<crate::store::OpenRun>> = Default::default();
    for r in &open {
        by_job.entry(&r.job_id).or_default().push(r.clone());
    }
    for (job_id, runs) in by_job {
        app.dispatcher.end(job_id, &runs, shared::job::RunState::Cancelled, "the agent's credential was revoked").await?;
    }
    app.dispatcher.kick.notify_one();
    app.fleet.publish(shared::api::FleetEvent::AgentRevoked { agent_id: id.clone(), at: now });
    app.audit(caller.entry("agent.revoke", Some(id.to_string()), serde_json::json!({ "runs_cancelled": open.len() }))).await;
    Ok(StatusCode::NO_CONTENT)
}

/// `PATCH /api/v1/agents/{id}`: sets and removes the agent's trusted labels, the ones
/// enrollment tokens set and targeting uses. The next job sees them; the session needs no
/// reconnect, as targeting and dispatch read labels from the store.
pub async fn patch(
    State(app): State<AppState>,
    caller: Caller,
    AgentPath(id): AgentPath,
    body: std::result::Result<Json<PatchAgent>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<AgentDetail>> {
    caller.require(Role::Operator)?;
    let Json(req) = body?;
    let row = visible_agent(&app, &caller, &id).await?;
    if row.revoked_at.is_some() {
        return Err(Error::NotFound(format!("no agent {id}, or it is revoked")));
    }
    let before = app.store.agent_credential(&id).await?.ok_or_else(|| Error::NotFound(format!("no agent {id}")))?.token_labels;
    let (after, effective) = crate::scope::edit_labels(&before, &row.labels, &req.labels, caller.scope.as_ref()).map_err(|e| match e {
        crate::scope::EditRefusal::Invalid(m) => Error::BadRequest(m),
        crate::scope::EditRefusal::Scope(m) => Error::OutOfScope(m),
    })?;
    if !app.store.set_agent_labels(&id, &before, &after, &effective).await? {
        return Err(Error::Conflict(format!("agent {id}'s labels changed meanwhile (or it was revoked); read them and try again")));
    }
    app.audit(caller.entry("agent.labels", Some(id.to_string()), serde_json::json!({ "before": before, "after": after }))).await;
    get(State(app), caller, AgentPath(id)).await
}

/// `POST /api/v1/agents/{id}/accept`: lets an agent enrolled with an `approve` token receive
/// runs. 409 if it is not waiting for approval.
pub async fn accept(State(app): State<AppState>, caller: Caller, AgentPath(id): AgentPath) -> Result<Json<AgentDetail>> {
    caller.require(Role::Admin)?;
    require_agent(&app, &caller, &id).await?;
    let now = Timestamp::now();
    match app.store.accept_agent(&id, now, &caller.actor()).await? {
        crate::store::Acceptance::Accepted => {}
        crate::store::Acceptance::NotPending => return Err(Error::Conflict(format!("agent {id} is not waiting for approval"))),
        crate::store::Acceptance::Unknown => return Err(Error::NotFound(format!("no agent {id}, or it is revoked"))),
    }
    tracing::info!(agent = %id, by = %caller.actor(), "agent accepted");
    app.audit(caller.entry("agent.accept", Some(id.to_string()), serde_json::json!({}))).await;
    app.fleet.publish(shared::api::FleetEvent::AgentAccepted { agent_id: id.clone(), by: caller.actor(), at: now });
    app.dispatcher.kick.notify_one();
    get(State(app), caller, AgentPath(id)).await
}

/// `POST /api/v1/agents/{id}/rotate-credential`: asks the agent to rotate its credential now
/// (if connected) or when it next connects. The old credential stops working once the agent
/// has stored the new one; a copy of it presented later is reported as a clone.
pub async fn rotate(State(app): State<AppState>, caller: Caller, AgentPath(id): AgentPath) -> Result<(StatusCode, Json<AgentDetail>)> {
    caller.require(Role::Admin)?;
    require_agent(&app, &caller, &id).await?;
    if !app.store.request_rotation(&id, Timestamp::now()).await? {
        return Err(Error::NotFound(format!("no agent {id}, or it is revoked")));
    }
    let connected = match app.registry.sender(&id) {
        Some(tx) => tx.try_send(shared::protocol::ServerMessage::RotateCredential(Default::default())).is_ok(),
        None => false,
    };
    tracing::info!(agent = %id, by = %caller.actor(), connected, "credential rotation requested");
    app.audit(caller.entry("agent.rotate_credential", Some(id.to_string()), serde_json::json!({ "connected": connected }))).await;
    let detail = get(State(app), caller, AgentPath(id)).await?;
    Ok((StatusCode::ACCEPTED, detail))
}
