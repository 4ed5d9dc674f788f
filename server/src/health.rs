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

use crate::recorder::Recorder;
use crate::registry::{Change, Registry};
use crate::store::{Record, Store};

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

/// Deletes heartbeat history older than `retention`, a bounded chunk at a time so that the
/// single writer lock is never held for long. Runs at start and then hourly.
pub async fn run_pruner(store: Arc<dyn Store>, retention: Duration, cancel: CancellationToken) {
    const CHUNK: u32 = 10_000;
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let before = Timestamp::now().saturating_sub(retention);
        let mut total = 0u64;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            match store.prune_heartbeats(before, CHUNK).await {
                Ok(n) => {
                    total += n;
                    if n < u64::from(CHUNK) {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning heartbeat history failed; will retry");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(rows = total, "pruned heartbeat history");
        }
    }
}
