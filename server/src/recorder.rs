//! The one writer for live session records: connections, heartbeats and status transitions.
//! Sessions hand records to a bounded queue; one task drains it in batches of whatever has
//! arrived and commits each batch as one transaction, so SQLite's single-writer lock is taken
//! once per batch rather than once per heartbeat.
//!
//! **Invariant:** records are written in the order they were queued, so an agent's
//! `Connected`, transitions and `Disconnected` land in the order they happened.
//!
//! Heartbeats are queued with `try_send` and dropped (and counted) when the queue is full: a
//! stalled database must not stop sessions from answering pings. Connection and transition
//! records wait for room, because losing one would leave a wrong status behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use shared::job::JobEvent;
use shared::protocol::{Resend, ResultAck, ServerMessage};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::events::Events;
use crate::fleet_events::FleetEvents;
use crate::registry::Registry;
use crate::store::{Effect, Record, Store, StoreError};

/// Who hears about a batch once it is committed: agents (acks, resend requests), event
/// streams, and the dispatcher (a run ended, so a slot or the job may be free).
#[derive(Clone)]
pub struct Hooks {
    pub registry: Arc<Registry>,
    pub events: Events,
    pub fleet: FleetEvents,
    pub dispatch: Arc<Notify>,
}

/// Heartbeats reach the fleet stream at most this often per agent.
const HEARTBEAT_EVENT_EVERY: Duration = Duration::from_secs(15);

const QUEUE: usize = 65_536;
const MAX_BATCH: usize = 8_192;

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Queued>,
    stats: Arc<Stats>,
    /// Bytes the queue may hold: with 65,536 records of up to 16 KiB of output (or a heartbeat
    /// with 64 file systems) each, a count alone would let the queue grow to gigabytes.
    bytes: Arc<Semaphore>,
}

/// A record in the queue, with the bytes it holds and the session whose share they use.
struct Queued {
    record: Record,
    weight: u32,
    session: Option<Arc<Semaphore>>,
}

/// Bytes a session may have in the queue at once: one agent that outpaces the disk waits for
/// its own records, and leaves the rest of the queue to everyone else.
pub const SESSION_QUEUE_BYTES: usize = 1 << 20;

/// A session's share of the queue.
pub fn session_share() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(SESSION_QUEUE_BYTES))
}

/// Bytes a record holds in the queue, for the byte budget (strings, and a little per record).
fn weight(record: &Record) -> u32 {
    let n = match record {
        Record::RunOutput { data, .. } => data.len(),
        Record::RunFinished { finished, .. } => finished.error.as_ref().map_or(0, String::len),
        Record::Heartbeat { metrics, .. } => {
            let m = metrics.as_ref();
            let text = m.hostname.len() + m.os.len() + m.kernel.len() + m.arch.len() + m.agent_version.len();
            256 + text + m.disks.iter().map(|d| 48 + d.mount.len() + d.fs_type.len()).sum::<usize>()
        }
        _ => 0,
    };
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[derive(Debug, Default)]
pub struct Stats {
    pub written: AtomicU64,
    pub dropped_heartbeats: AtomicU64,
    pub batches: AtomicU64,
}

impl Recorder {
    /// Starts the writer. It runs until every `Recorder` clone is dropped, then writes what is
    /// left and ends; await the handle to know everything queued is on disk.
    pub fn spawn(store: Arc<dyn Store>, hooks: Hooks, queue_bytes: usize) -> (Recorder, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(Stats::default());
        let bytes = Arc::new(Semaphore::new(queue_bytes.min(Semaphore::MAX_PERMITS)));
        let handle = tokio::spawn(run(store, rx, stats.clone(), hooks, bytes.clone()));
        (Recorder { tx, stats, bytes }, handle)
    }

    /// Queues a record that must not be lost, waiting for room (in records and in bytes) if
    /// the queue is full.
    pub async fn send(&self, record: Record) {
        self.send_as(None, record).await;
    }

    /// The same, for a session: its output also waits for room in the session's own share.
    pub async fn send_as(&self, session: Option<&Arc<Semaphore>>, record: Record) {
        let weight = weight(&record);
        if weight > 0 {
            // One message is at most 128 KiB and both budgets at least that, so this always
            // fits. The permits are given back by the writer once the batch is written.
            if let Some(s) = session {
                match s.acquire_many(weight).await {
                    Ok(p) => p.forget(),
                    Err(_) => return,
                }
            }
            match self.bytes.acquire_many(weight).await {
                Ok(p) => p.forget(),
                Err(_) => return,
            }
        }
        let queued = Queued { record, weight, session: session.cloned() };
        if self.tx.send(queued).await.is_err() {
            tracing::error!("recorder stopped; a session record was not written");
        }
    }

    /// Queues a heartbeat if there is room (in records and in bytes); drops it otherwise.
    pub fn heartbeat(&self, record: Record) {
        let weight = weight(&record);
        let room = match self.bytes.try_acquire_many(weight) {
            Ok(p) => {
                p.forget();
                match self.tx.try_send(Queued { record, weight, session: None }) {
                    Ok(()) => true,
                    Err(_) => {
                        self.bytes.add_permits(weight as usize);
                        false
                    }
                }
            }
            Err(_) => false,
        };
        if !room {
            let n = self.stats.dropped_heartbeats.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(dropped = n + 1, "recorder queue full: heartbeats dropped");
            }
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Queued>, stats: Arc<Stats>, hooks: Hooks, bytes: Arc<Semaphore>) {
    let mut queued = Vec::with_capacity(MAX_BATCH);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut shares = Vec::new();
    let mut last_heartbeat_event: std::collections::HashMap<shared::AgentId, tokio::time::Instant> = Default::default();
    while rx.recv_many(&mut queued, MAX_BATCH).await > 0 {
        let mut held = 0usize;
        for q in queued.drain(..) {
            held += q.weight as usize;
            if let Some(s) = q.session {
                shares.push((s, q.weight as usize));
            }
            batch.push(q.record);
        }
        let t = std::time::Instant::now();
        let effects = write_with_retry(store.as_ref(), &batch).await;
        crate::telemetry::db_batch(batch.len(), t.elapsed());
        announce_fleet(&hooks.fleet, &batch, &mut last_heartbeat_event);
        tracing::debug!(records = batch.len(), ms = t.elapsed().as_millis() as u64, "batch written");
        announce(&hooks, effects);
        stats.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        bytes.add_permits(held);
        for (s, n) in shares.drain(..) {
            s.add_permits(n);
        }
        batch.clear();
    }
}

/// Retries a failed batch until it is written: a full disk or a busy or unreachable database
/// is a pause, not a loss. Each failure is logged with its cause.
async fn write_with_retry(store: &dyn Store, batch: &[Record]) -> Vec<Effect> {
    let mut delay = Duration::from_millis(100);
    let mut attempts = 0u32;
    loop {
        match store.record(batch).await {
            Ok(effects) => {
                if attempts > 0 {
                    tracing::info!(attempts, records = batch.len(), "recorder caught up");
                }
                return effects;
            }
            Err(e) => {
                attempts += 1;
                match e {
                    StoreError::Full | StoreError::Busy | StoreError::Unavailable => {
                        tracing::warn!(error = %e, records = batch.len(), "cannot write session records; retrying")
                    }
                    _ => tracing::error!(error = %e, records = batch.len(), "cannot write session records; retrying"),
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Tells agents and watchers what the committed batch changed. Acks go out only now, after
/// the commit, so an agent never forgets a result the server does not have.
fn announce(hooks: &Hooks, effects: Vec<Effect>) {
    let mut run_ended = false;
    for e in effects {
        match e {
            Effect::Ack { agent_id, run_id } => {
                if let Some(tx) = hooks.registry.sender(&agent_id) {
                    // If the session is gone or busy, the agent repeats `run_finished` after
                    // reconnecting and is acknowledged then.
                    let _ = tx.try_send(ServerMessage::ResultAck(ResultAck { run_id }));
                }
            }
            Effect::Resend { agent_id, run_id, stdout_from, stderr_from } => {
                if let Some(tx) = hooks.registry.sender(&agent_id) {
                    let _ = tx.try_send(ServerMessage::Resend(Resend { run_id, stdout_from, stderr_from }));
                }
            }
            Effect::RunState { job_id, run_id, agent_id, state, exit_code, error, latency_ms } => {
                run_ended |= state.is_final();
                if let Some(ms) = latency_ms {
                    crate::telemetry::run_result(Duration::from_millis(ms));
                }
                hooks.events.publish(&job_id, JobEvent::Run { run_id, agent_id, state, exit_code, error });
            }
            Effect::Output { job_id, run_id, agent_id, stream, offset, data } => {
                hooks.events.publish(&job_id, JobEvent::Output { run_id, agent_id, stream, offset, data });
            }
        }
    }
    if run_ended {
        hooks.dispatch.notify_one();
    }
}

/// Status changes, and heartbeats (throttled), to the fleet event stream, once committed.
fn announce_fleet(fleet: &FleetEvents, batch: &[Record], last: &mut std::collections::HashMap<shared::AgentId, tokio::time::Instant>) {
    use shared::api::FleetEvent;
    let now = tokio::time::Instant::now();
    for r in batch {
        match r {
            Record::Transition { agent_id, at, from, to, reason } => {
                fleet.publish(FleetEvent::AgentStatus { agent_id: agent_id.clone(), from: *from, to: *to, reason: reason.clone(), at: *at })
            }
            Record::Heartbeat { agent_id, at, metrics, .. } => {
                if last.get(agent_id).is_some_and(|t| now.duration_since(*t) < HEARTBEAT_EVENT_EVERY) {
                    continue;
                }
                last.insert(agent_id.clone(), now);
                let (disk_used_bytes, disk_total_bytes) = metrics.disk_totals();
                fleet.publish(FleetEvent::Heartbeat {
                    agent_id: agent_id.clone(),
                    at: *at,
                    cpu_percent: metrics.cpu_percent,
                    mem_used_bytes: metrics.mem_used_bytes,
                    mem_total_bytes: metrics.mem_total_bytes,
                    disk_used_bytes,
                    disk_total_bytes,
                });
            }
            _ => {}
        }
    }
}
