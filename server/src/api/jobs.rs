//! Jobs: create (or dry-run), list, show, cancel, and follow live over server-sent events.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use shared::api::Role;
use shared::job::{
    CreateJob, DEFAULT_OUTPUT_LIMIT, DEFAULT_TIMEOUT_SECS, DEFAULT_TTL_SECS, DryRun, DryRunAgent, JobDetail, JobEvent, JobSummary, Program,
    RunInfo, RunState, StateCounts, Target,
};
use shared::{AgentId, JobId, RunId, Timestamp};
use tokio::sync::broadcast::error::RecvError;

use super::caller::Caller;
use super::error::{Error, Result};
use super::path::JobPath;
use crate::app::AppState;
use crate::auth;
use crate::store::{AgentTarget, JobRow};

const MAX_TIMEOUT_SECS: u64 = 7 * 86_400;
const MAX_TTL_SECS: u64 = 30 * 86_400;
const MAX_ARGV_BYTES: usize = 64 * 1024;

pub fn summary(job: &JobRow, counts: StateCounts) -> JobSummary {
    JobSummary {
        id: job.id.clone(),
        created_at: job.created_at,
        created_by: job.created_by.clone(),
        target: job.target.clone(),
        command: job.command.redacted(),
        timeout_secs: job.timeout_ms / 1000,
        ttl_secs: job.ttl_ms / 1000,
        concurrency: job.concurrency,
        max_errors: job.max_errors,
        cancelled_at: job.cancelled_at,
        finished_at: job.finished_at,
        total: counts.values().sum(),
        status: shared::job::JobStatus::of(job.finished_at.is_some(), job.cancelled_at.is_some(), job.awaiting_approval(), &counts),
        failed: shared::job::failures(&counts),
        counts,
        signed_by: job.signature.as_ref().map(|s| s.key.clone()),
        approval: job.approval.as_ref().map(|a| shared::job::Approval {
            approved_by: a.approved.as_ref().map(|(by, _)| by.clone()),
            approved_at: a.approved.as_ref().map(|(_, at)| *at),
        }),
    }
}

fn validate(req: &CreateJob) -> Result<()> {
    let bad = |m: &str| Err(Error::BadRequest(m.into()));
    match &req.command.program {
        Program::Argv(argv) if argv.is_empty() || argv[0].is_empty() => return bad("command.argv must name a program"),
        Program::Shell(script) if script.trim().is_empty() => return bad("command.shell must not be empty"),
        _ => {}
    }
    let size = match &req.command.program {
        Program::Argv(a) => a.iter().map(String::len).sum::<usize>(),
        Program::Shell(s) => s.len(),
    } + req.command.env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    if size > MAX_ARGV_BYTES {
        return bad("the command and its environment must be under 64 KiB");
    }
    if let Some(name) = req.command.secret_env.iter().find(|n| !req.command.env.contains_key(*n)) {
        return Err(Error::BadRequest(format!("command.secret_env names {name:?}, which command.env does not set")));
    }
    if req.command.env.keys().any(|k| k.is_empty() || k.contains('=') || k.contains('\0')) {
        return bad("environment variable names must be non-empty, without '=' or NUL");
    }
    if req.timeout_secs.is_some_and(|t| t == 0 || t > MAX_TIMEOUT_SECS) {
        return bad("timeout_secs must be between 1 and 604800 (7 days)");
    }
    if req.ttl_secs.is_some_and(|t| t > MAX_TTL_SECS) {
        return bad("ttl_secs must be at most 2592000 (30 days)");
    }
    if req.output_limit.is_some_and(|l| l == 0 || l > 16 * DEFAULT_OUTPUT_LIMIT) {
        return bad("output_limit must be between 1 byte and 16 MiB");
    }
    if req.max_errors == Some(0) {
        return bad("max_errors must be at least 1; leave it out for no limit");
    }
    if let Some(id) = &req.id
        && !id.is_client_chosen()
    {
        return bad("id must be 32 lowercase hex digits (128 random bits)");
    }
    if let Some(sig) = &req.signature {
        let Some(id) = &req.id else {
            return Err(Error::SignatureRefused("a signed job must carry the id it was signed with".into()));
        };
        let Target::Agents(ids) = &req.target else {
            return Err(Error::SignatureRefused("a signed job must target the agent ids it was signed for (target.agents)".into()));
        };
        // The server checks too, so that a mistake is a clear 403 rather than runs every
        // agent refuses; the agents do not rely on this check.
        let set = shared::signing::AgentSet::new(ids);
        let statement = shared::signing::job_statement(id, &req.command, &set.root(), set.len(), sig.expires_at, sig.selector.as_ref());
        if sig.key.verify(&statement, &sig.signature).is_err() {
            return Err(Error::SignatureRefused("signature: it does not verify for this id, command, set of agents and expiry".into()));
        }
        if sig.expires_at <= Timestamp::now() {
            return Err(Error::SignatureRefused("signature: it has expired".into()));
        }
    }
    Ok(())
}

/// The agents a target names, in a stable order. Unknown or revoked ids are an error (409, as
/// the request is well formed and the fleet is what refuses it): a typo should not silently
/// shrink a job.
///
/// A scoped caller's target is intersected with its scope: `all` and a selector match only
/// agents inside it, and naming an agent outside it is refused (403) rather than dropped.
async fn resolve(app: &AppState, caller: &Caller, target: &Target) -> Result<Vec<AgentTarget>> {
    let (agents, outside): (Vec<AgentTarget>, Vec<AgentTarget>) =
        app.store.agent_targets().await?.into_iter().partition(|a| caller.sees(&a.labels));
    // Agents waiting for approval are never targets; naming one says so.
    let (pending, agents): (Vec<AgentTarget>, Vec<AgentTarget>) = agents.into_iter().partition(|a| a.approval_pending);
    if let Target::Agents(ids) = target
        && let Some(p) = pending.iter().find(|p| ids.contains(&p.id))
    {
        return Err(Error::Conflict(format!(
            "agent {} is waiting for an administrator to accept it (muster agent accept {}); it gets no runs until then",
            p.id, p.id
        )));
    }
    if let (Target::Agents(ids), Some(scope)) = (target, &caller.scope) {
        let outside: HashSet<&AgentId> = outside.iter().map(|a| &a.id).collect();
        if let Some(id) = ids.iter().find(|id| outside.contains(id)) {
            return Err(Error::OutOfScope(format!(
                "agent {id} is outside this token's scope ({scope}); it can only target agents inside it"
            )));
        }
    }
    match target {
        Target::All => Ok(agents),
        Target::Selector(sel) => Ok(agents.into_iter().filter(|a| sel.matches(&a.labels)).collect()),
        Target::Agents(ids) => {
            if ids.is_empty() {
                return Err(Error::BadRequest("target.agents must list at least one agent".into()));
            }
            let wanted: HashSet<&AgentId> = ids.iter().collect();
            let found: Vec<AgentTarget> = agents.into_iter().filter(|a| wanted.contains(&a.id)).collect();
            let known: HashSet<&AgentId> = found.iter().map(|a| &a.id).collect();
            if let Some(missing) = ids.iter().find(|id| !known.contains(id)) {
                return Err(Error::Conflict(format!("no agent {missing} (or it was revoked)")));
            }
            Ok(found)
        }
    }
}

fn new_id() -> Result<[u8; 8]> {
    auth::random_id_bytes().map_err(|e| Error::Internal(format!("no randomness: {e}")))
}

pub async fn create(
    State(app): State<AppState>,
    caller: Caller,
    body: std::result::Result<Json<CreateJob>, JsonRejection>,
) -> Result<Response> {
    caller.require(Role::Operator)?;
    let Json(req) = body?;
    validate(&req)?;
    let matched = resolve(&app, &caller, &req.target).await?;
    if req.dry_run {
        let ids: Vec<AgentId> = matched.iter().map(|a| a.id.clone()).collect();
        let mut keys = app.store.agent_trusted_keys(&ids).await?;
        let agents: Vec<DryRunAgent> = matched
            .iter()
            .map(|a| DryRunAgent {
                id: a.id.clone(),
                hostname: a.hostname.clone(),
                online: app.registry.is_connected(&a.id),
                trusted_keys: keys.remove(&a.id).unwrap_or_default(),
            })
            .collect();
        let online = agents.iter().filter(|a| a.online).count() as u64;
        let needs_approval = needs_approval(&app, agents.len());
        let require_signature = agents.iter().filter(|a| !a.trusted_keys.is_empty()).count() as u64;
        return Ok(Json(DryRun { matched: agents.len() as u64, online, needs_approval, require_signature, agents }).into_response());
    }
    if matched.is_empty() {
        return Err(Error::Conflict(format!("the target ({}) matches no agents", req.target)));
    }
    let now = Timestamp::now();
    let ttl = Duration::from_secs(req.ttl_secs.unwrap_or(DEFAULT_TTL_SECS));
    // A signed run cannot start after its signature expires: neither can the job.
    let expires_at = match &req.signature {
        Some(sig) => now.saturating_add(ttl).min(sig.expires_at),
        None => now.saturating_add(ttl),
    };
    let job = JobRow {
        id: match &req.id {
            Some(id) => id.clone(),
            None => JobId::from_bytes(new_id()?),
        },
        created_at: now,
        created_by: caller.actor(),
        target: req.target.clone(),
        command: req.command.clone(),
        timeout_ms: req.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS) * 1000,
        ttl_ms: ttl.as_millis() as u64,
        concurrency: req.concurrency,
        max_in_flight: req.concurrency.map(|c| c.resolve(matched.len())),
        max_errors: req.max_errors,
        output_limit: req.output_limit.unwrap_or(DEFAULT_OUTPUT_LIMIT),
        expires_at,
        cancelled_at: None,
        finished_at: None,
        signature: req.signature.clone(),
        scope: caller.scope.clone(),
        approval: needs_approval(&app, matched.len())
            .then(|| crate::store::JobApproval { creator_token: caller.token_id.clone(), approved: None }),
    };
    let runs = matched.iter().map(|a| Ok((RunId::from_bytes(new_id()?), a.id.clone()))).collect::<Result<Vec<_>>>()?;
    app.store.create_job(&job, &runs).await?;
    app.audit(caller.entry(
        "job.create",
        Some(job.id.to_string()),
        serde_json::json!({
            "target": job.target,
            "command": crate::audit::command_detail(&job.command),
            "agents": crate::audit::agents_detail(matched.iter().map(|a| a.id.as_str())),
            "timeout_secs": job.timeout_ms / 1000,
            "ttl_secs": job.ttl_ms / 1000,
            "concurrency": job.concurrency,
            "max_errors": job.max_errors,
            "scope": job.scope,
            "needs_approval": job.approval.is_some(),
        }),
    ))
    .await;
    tracing::info!(job = %job.id, by = %job.created_by, agents = runs.len(), signed = job.signature.is_some(), "job created");
    tracing::debug!(job = %job.id, command = %job.command.summary(), "job command");
    app.fleet.publish(shared::api::FleetEvent::JobCreated {
        job_id: job.id.clone(),
        command: job.command.summary(),
        target: job.target.to_string(),
        total: runs.len() as u64,
        created_by: job.created_by.clone(),
        at: now,
        status: if job.awaiting_approval() { shared::job::JobStatus::AwaitingApproval } else { shared::job::JobStatus::Running },
    });
    app.dispatcher.kick.notify_one();
    // The summary, not every run: a broadcast's detail is large, and dispatch is running now.
    let counts = BTreeMap::from([(RunState::Pending, runs.len() as u64)]);
    Ok((StatusCode::CREATED, Json(summary(&job, counts))).into_response())
}

/// Whether a job matching `matched` agents waits for a second admin.
fn needs_approval(app: &AppState, matched: usize) -> bool {
    app.config.approval_above.is_some_and(|n| matched as u64 > n)
}

/// `POST /api/v1/jobs/{id}/approve`: a second admin releases a job that waits for approval.
/// The admin who created it cannot (403); one that is not waiting is a 409.
pub async fn approve(State(app): State<AppState>, caller: Caller, JobPath(id): JobPath) -> Result<Json<JobSummary>> {
    caller.require(Role::Admin)?;
    let job = visible_job(&app, &caller, &id).await?;
    let Some(approval) = &job.approval else {
        return Err(Error::Conflict(format!("job {id} does not need an approval")));
    };
    if approval.approved.is_some() {
        return Err(Error::Conflict(format!("job {id} is already approved")));
    }
    if approval.creator_token == caller.token_id {
        return Err(Error::NotAllowed(format!("job {id} was created with this token: another admin must approve it")));
    }
    if job.cancelled_at.is_some() || job.finished_at.is_some() {
        return Err(Error::Conflict(format!("job {id} is cancelled or finished")));
    }
    let now = Timestamp::now();
    if !app.store.approve_job(&id, &caller.token_id, &caller.actor(), now).await? {
        return Err(Error::Conflict(format!("job {id} changed meanwhile; read it again")));
    }
    tracing::info!(job = %id, by = %caller.actor(), "job approved");
    app.audit(caller.entry("job.approve", Some(id.to_string()), serde_json::json!({ "created_by": job.created_by }))).await;
    app.dispatcher.kick.notify_one();
    let job = visible_job(&app, &caller, &id).await?;
    let counts = app.store.run_counts(std::slice::from_ref(&job.id)).await?.remove(&job.id).unwrap_or_default();
    Ok(Json(summary(&job, counts)))
}

/// The job, or 404 if there is none or the caller's scope does not cover it.
async fn visible_job(app: &AppState, caller: &Caller, id: &str) -> Result<JobRow> {
    match app.store.job(id).await? {
        Some(job) if crate::scope::covers(caller.scope.as_ref(), job.scope.as_ref()) => Ok(job),
        _ => Err(Error::NotFound(format!("no job {id}"))),
    }
}

/// The job with every run and its output, as stored now.
async fn load(app: &AppState, caller: &Caller, id: &str) -> Result<JobDetail> {
    let job = visible_job(app, caller, id).await?;
    let runs = app.store.runs(id).await?;
    let mut outputs = app.store.run_output_heads(id, shared::job::DETAIL_HEAD_BYTES, shared::job::DETAIL_TOTAL_BYTES).await?;
    let mut counts: StateCounts = BTreeMap::new();
    for r in &runs {
        *counts.entry(r.state).or_default() += 1;
    }
    let runs = runs
        .into_iter()
        .map(|r| {
            let out = outputs.remove(&r.id).unwrap_or_default();
            RunInfo {
                id: r.id,
                agent_id: r.agent_id,
                hostname: r.hostname,
                state: r.state,
                exit_code: r.exit_code,
                signal: r.signal,
                error: r.error,
                dispatched_at: r.dispatched_at,
                started_at: r.started_at,
                finished_at: r.finished_at,
                stdout: out.stdout,
                stderr: out.stderr,
                stdout_len: r.stdout_len,
                stderr_len: r.stderr_len,
                stdout_truncated: r.stdout_truncated,
                stderr_truncated: r.stderr_truncated,
            }
        })
        .collect();
    Ok(JobDetail { job: summary(&job, counts), runs })
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<u32>,
}

pub async fn list(
    State(app): State<AppState>,
    caller: Caller,
    query: std::result::Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<JobSummary>>> {
    caller.require(Role::Viewer)?;
    let Query(q) = query?;
    let limit = super::limit(q.limit, 50, 1000)?;
    // A scoped caller sees fewer than `limit` when others' jobs are among the newest.
    let jobs: Vec<JobRow> =
        app.store.list_jobs(limit).await?.into_iter().filter(|j| crate::scope::covers(caller.scope.as_ref(), j.scope.as_ref())).collect();
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id.clone()).collect();
    let mut counts = app.store.run_counts(&ids).await?;
    Ok(Json(jobs.iter().map(|j| summary(j, counts.remove(&j.id).unwrap_or_default())).collect()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputQuery {
    stream: Option<shared::job::Stream>,
    offset: Option<u64>,
    limit: Option<u64>,
}

/// `GET /api/v1/runs/{id}/output`: one stream of a run, a page at a time, so that no read has
/// to hold a whole job's output.
pub async fn output(
    State(app): State<AppState>,
    caller: Caller,
    JobPath(id): JobPath,
    query: std::result::Result<Query<OutputQuery>, QueryRejection>,
) -> Result<Json<shared::job::OutputPage>> {
    caller.require(Role::Viewer)?;
    let Query(q) = query?;
    let stream = q.stream.unwrap_or(shared::job::Stream::Stdout);
    let offset = q.offset.unwrap_or(0);
    let max = shared::job::OUTPUT_PAGE_MAX;
    let limit = match q.limit.unwrap_or(64 * 1024) {
        n if (1..=max).contains(&n) => n,
        _ => return Err(Error::BadRequest(format!("limit must be between 1 and {max}"))),
    };
    if offset > i64::MAX as u64 {
        return Err(Error::BadRequest("offset is too large".into()));
    }
    let (run, data) = app.store.run_output(&id, stream, offset, limit).await?.ok_or_else(|| Error::NotFound(format!("no run {id}")))?;
    visible_job(&app, &caller, &run.job_id).await.map_err(|_| Error::NotFound(format!("no run {id}")))?;
    let (len, truncated) = match stream {
        shared::job::Stream::Stdout => (run.stdout_len, run.stdout_truncated),
        shared::job::Stream::Stderr => (run.stderr_len, run.stderr_truncated),
    };
    let start = offset.min(len);
    let next_offset = start + data.len() as u64;
    Ok(Json(shared::job::OutputPage {
        run_id: run.id,
        stream,
        offset: start,
        data,
        next_offset,
        len,
        truncated,
        complete: run.state.is_final() && next_offset >= len,
    }))
}

pub async fn get(State(app): State<AppState>, caller: Caller, JobPath(id): JobPath) -> Result<Json<JobDetail>> {
    caller.require(Role::Viewer)?;
    Ok(Json(load(&app, &caller, &id).await?))
}

/// `POST /api/v1/jobs/{id}/cancel`: runs not started end `cancelled`; running ones are told to
/// stop (SIGTERM, then SIGKILL) and report how they ended.
pub async fn cancel(State(app): State<AppState>, caller: Caller, JobPath(id): JobPath) -> Result<Json<JobDetail>> {
    caller.require(Role::Operator)?;
    let now = Timestamp::now();
    // A finished job has nothing left to stop, and stays as it ended: marking it cancelled
    // would make a job that succeeded read as cancelled (`muster jobs`, the dashboard).
    if visible_job(&app, &caller, &id).await?.finished_at.is_some() {
        return Ok(Json(load(&app, &caller, &id).await?));
    }
    let (ended, on_agents) = app.dispatcher.cancel(&id, now).await?.ok_or_else(|| Error::NotFound(format!("no job {id}")))?;
    app.audit(caller.entry(
        "job.cancel",
        Some(id.to_string()),
        serde_json::json!({ "not_started": ended.len(), "signalled": on_agents.len() }),
    ))
    .await;
    app.dispatcher.kick.notify_one();
    Ok(Json(load(&app, &caller, &id).await?))
}

fn sse(event: &JobEvent) -> Event {
    let name = match event {
        JobEvent::Snapshot(_) => "snapshot",
        JobEvent::Run { .. } => "run",
        JobEvent::Output { .. } => "output",
        JobEvent::Finished { .. } => "finished",
        JobEvent::Resync => "resync",
    };
    Event::default().event(name).data(serde_json::to_string(event).unwrap_or_default())
}

/// `GET /api/v1/jobs/{id}/events`: a snapshot, then live run changes and output, then
/// `finished`. Subscribing happens before the snapshot is read, so nothing falls in between;
/// a client sees some events twice at worst (output carries offsets to tell).
pub async fn events(
    State(app): State<AppState>,
    caller: Caller,
    JobPath(id): JobPath,
) -> Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>> {
    caller.require(Role::Viewer)?;
    let (end, guard) = caller.watch(&app);
    let rx = app.events.subscribe();
    let detail = load(&app, &caller, &id).await?;
    let done = detail.job.finished_at.is_some();
    let counts = detail.job.counts.clone();
    let mut first = vec![sse(&JobEvent::Snapshot(Box::new(detail)))];
    if done {
        first.push(sse(&JobEvent::Finished { counts }));
    }
    struct St {
        first: std::vec::IntoIter<Event>,
        rx: tokio::sync::broadcast::Receiver<crate::events::BusEvent>,
        id: JobId,
        done: bool,
        shutdown: tokio_util::sync::CancellationToken,
        _watch: tokio_util::sync::DropGuard,
    }
    let st = St { first: first.into_iter(), rx, id, done, shutdown: end, _watch: guard };
    let stream = stream::unfold(st, |mut st| async move {
        if let Some(e) = st.first.next() {
            return Some((Ok(e), st));
        }
        if st.done {
            return None;
        }
        loop {
            let received = tokio::select! {
                r = st.rx.recv() => r,
                _ = st.shutdown.cancelled() => return None,
            };
            match received {
                Ok(ev) if ev.job_id == st.id => {
                    st.done = matches!(ev.event, JobEvent::Finished { .. });
                    return Some((Ok(sse(&ev.event)), st));
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => return Some((Ok(sse(&JobEvent::Resync)), st)),
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
