//! `GET /api/v1/audit`: the audit log, newest first, filtered and paged by id (admin only).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::Deserialize;
use shared::Timestamp;
use shared::api::{AUDIT_PAGE_MAX, AuditPage, Role};

use super::caller::Caller;
use super::error::{Error, Result};
use crate::app::AppState;
use crate::store::AuditQuery;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    actor: Option<String>,
    action: Option<String>,
    target: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before: Option<u64>,
    limit: Option<u32>,
}

/// An RFC 3339 time, or a duration back from `now`: what `since` takes everywhere in the API.
fn time(name: &str, s: &str, now: Timestamp) -> Result<Timestamp> {
    match Timestamp::parse_rfc3339(s) {
        Ok(t) => Ok(t),
        Err(_) => shared::duration::parse(s)
            .map(|d| now.saturating_sub(d))
            .map_err(|_| Error::BadRequest(format!("{name}: {s:?} is neither an RFC 3339 time nor a duration"))),
    }
}

fn text(name: &str, v: Option<String>) -> Result<Option<String>> {
    match v {
        Some(s) if s.is_empty() || s.chars().count() > 256 => Err(Error::BadRequest(format!("{name} must be 1 to 256 characters"))),
        v => Ok(v),
    }
}

pub async fn list(
    State(app): State<AppState>,
    caller: Caller,
    query: std::result::Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<AuditPage>> {
    caller.require(Role::Admin)?;
    // Entries name agents, tokens and jobs across the whole fleet.
    caller.require_unscoped("reading the audit log")?;
    let Query(q) = query?;
    let now = Timestamp::now();
    let limit = super::limit(q.limit, 100, AUDIT_PAGE_MAX)?;
    if q.before.is_some_and(|b| b > i64::MAX as u64) {
        return Err(Error::BadRequest("before is too large".into()));
    }
    let query = AuditQuery {
        actor: text("actor", q.actor)?,
        action: text("action", q.action)?,
        target: text("target", q.target)?,
        since: q.since.as_deref().map(|s| time("since", s, now)).transpose()?,
        until: q.until.as_deref().map(|s| time("until", s, now)).transpose()?,
        before: q.before,
        limit,
    };
    let entries = app.store.audit_entries(&query).await?;
    let next_before = if entries.len() == limit as usize { entries.last().map(|e| e.id) } else { None };
    Ok(Json(AuditPage { entries, next_before }))
}
