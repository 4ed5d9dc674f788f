//! When an agent counts as online, stale or offline, and the task that checks.
//!
//! Thresholds derive from the heartbeat interval the agent announced in `hello`:
//! stale after [`STALE_AFTER_INTERVALS`] intervals without a heartbeat, offline (the server
//! closes the connection) after [`OFFLINE_AFTER_INTERVALS`]. A disconnect is offline at once.
//! The gap between the heartbeat interval (with its ±10% jitter) and three intervals is what
//! keeps a healthy agent from flapping.

use std::sync::Arc;
use std::time::Duration;

use shared::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::audit::Auditor;
use crate::recorder::Recorder;
use crate::registry::{Change, Registry};
use crate::store::sqlite::SERVER_ACTOR;
use crate::store::{AuditEntry, Record};

pub const STALE_AFTER_INTERVALS: u32 = 3;
pub const OFFLINE_AFTER_INTERVALS: u32 = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub stale_after: Duration,
    pub offline_after: Duration,
}

impl Thresholds {
    pub fn for_interval(interval: Duration) -> Self {
        Thresholds { stale_after: interval * STALE_AFTER_INTERVALS, offline_after: interval * OFFLINE_AFTER_INTERVALS }
    }
}

pub fn record_for(change: Change, at: Timestamp) -> Record {
    Record::Transition { agent_id: change.agent_id, at, from: change.from, to: change.to, reason: change.reason }
}

/// Runs the liveness sweep every `every` until cancelled.
pub async fn run_sweeper(registry: Arc<Registry>, recorder: Recorder, every: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let changes = registry.sweep(tokio::time::Instant::now());
        let now = Timestamp::now();
        for c in changes {
            tracing::info!(agent = %c.agent_id, to = %c.to, reason = %c.reason, "agent status changed");
            recorder.send(record_for(c, now)).await;
        }
    }
}

/// How long what the pruner removes is kept.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub heartbeats: Duration,
    /// After a job finished; open jobs are kept however old.
    pub jobs: Duration,
    pub audit: Duration,
}

/// Deletes heartbeat history, finished jobs (with their runs and output) and audit entries
/// past their retention, a bounded chunk at a time so that the single writer lock is never
/// held for long. Runs at start and then hourly. Removing jobs and audit entries is itself
/// audited: `retention.jobs_pruned` and `audit.pruned` (which the chain's check relies on).
pub async fn run_pruner(auditor: Auditor, retention: Retention, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        prune_once(&auditor, retention, &cancel).await;
    }
}

/// One pass of every kind of pruning.
pub async fn prune_once(auditor: &Auditor, retention: Retention, cancel: &CancellationToken) {
    let store = auditor.store().clone();
    let now = Timestamp::now();
    let before = now.saturating_sub(retention.heartbeats);
    let heartbeats =
        chunked(cancel, "heartbeat history", HEARTBEATS_PER_PRUNE, || store.prune_heartbeats(before, HEARTBEATS_PER_PRUNE)).await;
    if heartbeats > 0 {
        tracing::info!(rows = heartbeats, "pruned heartbeat history");
    }
    let jobs_before = now.saturating_sub(retention.jobs);
    let jobs = chunked(cancel, "finished jobs", JOBS_PER_PRUNE, || store.prune_jobs(jobs_before, JOBS_PER_PRUNE)).await;
    if jobs > 0 {
        tracing::info!(jobs, "pruned finished jobs");
        auditor
            .record(AuditEntry {
                at: Timestamp::now(),
                actor: SERVER_ACTOR.into(),
                address: None,
                action: "retention.jobs_pruned".into(),
                target: None,
                detail: serde_json::json!({ "jobs": jobs, "finished_before": jobs_before.to_string() }),
            })
            .await;
    }
    let audit_before = now.saturating_sub(retention.audit);
    let mut removed = 0u64;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        match store.prune_audit(audit_before, AUDIT_PER_PRUNE, Timestamp::now()).await {
            Ok(written) if written.is_empty() => break,
            Ok(written) => {
                removed += written.iter().filter_map(|e| e.detail["removed"].as_u64()).sum::<u64>();
                auditor.ship(&written).await;
                tokio::task::yield_now().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "pruning the audit log failed; will retry");
                break;
            }
        }
    }
    if removed > 0 {
        tracing::info!(entries = removed, "pruned the audit log");
    }
}

const HEARTBEATS_PER_PRUNE: u32 = 10_000;
const JOBS_PER_PRUNE: u32 = crate::store::sqlite::JOBS_PER_PRUNE;
const AUDIT_PER_PRUNE: u32 = 10_000;

/// Calls `prune` until it removes less than a full chunk; returns how much went.
async fn chunked<F, Fut>(cancel: &CancellationToken, what: &str, chunk: u32, mut prune: F) -> u64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::store::Result<u64>>,
{
    let mut total = 0u64;
    loop {
        if cancel.is_cancelled() {
            return total;
        }
        match prune().await {
            Ok(n) => {
                total += n;
                if n < u64::from(chunk) {
                    return total;
                }
                tokio::task::yield_now().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "pruning {what} failed; will retry");
                return total;
            }
        }
    }
}
