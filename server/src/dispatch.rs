//! Dispatch: turns pending runs into messages to agents, within each job's concurrency and
//! error budget, and ends runs that can no longer happen (expired, skipped, lost).
//!
//! **Invariant:** a run is marked `dispatched` in the database before its message is sent.
//! A crash in between leaves a dispatched run the agent never accepted; when the agent next
//! says `hello` without it, it goes back to `pending` and is sent again. The agent's ledger
//! makes a second delivery of an accepted run harmless.
//!
//! **Invariant:** marking runs dispatched and queueing their messages happen under `sending`,
//! and so does cancelling a job (reading its runs and queueing their `cancel`s). A run is thus
//! either still pending when a job is cancelled (and ends `cancelled` without being sent), or
//! its `run` is already in its session's queue ahead of the `cancel`: never sent after one.
//!
//! Runs are dispatched only to agents connected to this process; with several servers, each
//! node dispatches to the agents it holds.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use shared::job::{JobEvent, JobId, RunId, RunState};
use shared::protocol::{Run, ServerMessage};
use shared::signing::{AgentSet, RunSignature};
use shared::{AgentId, Timestamp};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::events::Events;
use crate::fleet_events::FleetEvents;
use crate::registry::Registry;
use crate::store::{JobRow, OpenRun, Store, StoreError};

/// How long past its timeout a run may stay unreported before it is called lost.
pub const REPORT_GRACE: Duration = Duration::from_secs(30);
/// A dispatch round also runs this often without being asked, for expiry and overdue runs.
const TICK: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Dispatcher {
    pub store: Arc<dyn Store>,
    /// A job's end is audited with its outcome.
    pub auditor: crate::audit::Auditor,
    pub registry: Arc<Registry>,
    pub events: Events,
    pub fleet: FleetEvents,
    /// When each job's progress last went to the fleet stream, and with which counts.
    pub progress: Arc<std::sync::Mutex<std::collections::HashMap<JobId, (tokio::time::Instant, shared::job::StateCounts)>>>,
    /// The signed set of agents of each open signed job, built once from the store: every run
    /// carries its agent's proof from it.
    pub signed: Arc<std::sync::Mutex<std::collections::HashMap<JobId, Arc<AgentSet>>>>,
    pub kick: Arc<Notify>,
    /// Held while runs are marked dispatched and queued, and while a job is cancelled.
    pub sending: Arc<tokio::sync::Mutex<()>>,
}

/// Job progress reaches the fleet stream at most this often per job.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

impl Dispatcher {
    pub async fn run(self, cancel: CancellationToken) {
        let mut sweep = tokio::time::interval(TICK);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sweeping = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.kick.notified() => false,
                _ = sweep.tick() => true,
            };
            if let Err(e) = self.round().await {
                tracing::warn!(error = %e, "dispatch round failed; retrying");
            }
            // Overdue runs are a matter of seconds: checked on the timer, not on every kick.
            if sweeping && let Err(e) = self.sweep_overdue().await {
                tracing::warn!(error = %e, "overdue sweep failed; retrying");
            }
        }
    }

    fn announce_progress(&self, job_id: &JobId, counts: &shared::job::StateCounts, status: shared::job::JobStatus) {
        let mut progress = self.progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = tokio::time::Instant::now();
        let due = progress.get(job_id).is_none_or(|(t, last)| last != counts && now.duration_since(*t) >= PROGRESS_EVERY);
        if due {
            progress.insert(job_id.clone(), (now, counts.clone()));
            self.fleet.publish(shared::api::FleetEvent::JobProgress {
                job_id: job_id.to_owned(),
                counts: counts.clone(),
                status,
                failed: shared::job::failures(counts),
            });
        }
    }

    async fn sweep_overdue(&self) -> Result<(), StoreError> {
        let overdue = self.store.overdue_runs(Timestamp::now(), REPORT_GRACE.as_millis() as u64).await?;
        for r in &overdue {
            self.end(&r.job_id, std::slice::from_ref(r), RunState::Lost, "no report from the agent within the timeout and a 30s grace")
                .await?;
        }
        if !overdue.is_empty() {
            self.kick.notify_one();
        }
        Ok(())
    }

    fn publish_states(&self, job_id: &JobId, runs: &[OpenRun], changed: &[RunId], state: RunState, error: Option<&str>) {
        let changed: HashSet<&RunId> = changed.iter().collect();
        for r in runs.iter().filter(|r| changed.contains(&r.id)) {
            self.events.publish(
                job_id,
                JobEvent::Run {
                    run_id: r.id.clone(),
                    agent_id: r.agent_id.clone(),
                    state,
                    exit_code: None,
                    error: error.map(str::to_owned),
                },
            );
        }
    }

    /// Ends `runs` with a final state and announces the ones that changed.
    pub async fn end(&self, job_id: &JobId, runs: &[OpenRun], state: RunState, why: &str) -> Result<(), StoreError> {
        if runs.is_empty() {
            return Ok(());
        }
        let ids: Vec<RunId> = runs.iter().map(|r| r.id.clone()).collect();
        let changed = self.store.end_runs(&ids, state, why, Timestamp::now()).await?;
        self.publish_states(job_id, runs, &changed, state, Some(why));
        Ok(())
    }

    pub async fn round(&self) -> Result<(), StoreError> {
        let now = Timestamp::now();
        let jobs = self.store.active_jobs().await?;
        let ids: Vec<JobId> = jobs.iter().map(|j| j.id.clone()).collect();
        let counts = self.store.run_counts(&ids).await?;
        for job in &jobs {
            let c = counts.get(&job.id).cloned().unwrap_or_default();
            let n = |s: RunState| c.get(&s).copied().unwrap_or(0);
            let (pending, in_flight) = (n(RunState::Pending), n(RunState::Dispatched) + n(RunState::Running));
            if pending + in_flight == 0 {
                if self.store.finish_job_if_done(&job.id, now).await? {
                    tracing::info!(job = %job.id, "job finished");
                    self.auditor
                        .record(crate::store::AuditEntry {
                            at: now,
                            actor: crate::store::sqlite::SERVER_ACTOR.into(),
                            address: None,
                            action: "job.finish".into(),
                            target: Some(job.id.to_string()),
                            detail: serde_json::json!({
                                "counts": c,
                                "cancelled": job.cancelled_at.is_some(),
                                "created_by": job.created_by,
                            }),
                        })
                        .await;
                    self.events.publish(&job.id, JobEvent::Finished { counts: c.clone() });
                    let status = shared::job::JobStatus::of(true, job.cancelled_at.is_some(), false, &c);
                    self.fleet.publish(shared::api::FleetEvent::JobFinished {
                        job_id: job.id.clone(),
                        failed: shared::job::failures(&c),
                        counts: c,
                        status,
                    });
                    self.progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&job.id);
                    self.signed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&job.id);
                }
                continue;
            }
            self.announce_progress(&job.id, &c, shared::job::JobStatus::of(false, job.cancelled_at.is_some(), job.awaiting_approval(), &c));
            if pending == 0 {
                continue;
            }
            if job.cancelled_at.is_some() {
                // Runs sent back to pending after the cancel (their agent reconnected without
                // them) never start.
                let waiting = self.store.pending_runs(&job.id).await?;
                self.end(&job.id, &waiting, RunState::Cancelled, "cancelled before it started").await?;
                continue;
            }
            if job.awaiting_approval() {
                if now >= job.expires_at {
                    let waiting = self.store.pending_runs(&job.id).await?;
                    self.end(&job.id, &waiting, RunState::Expired, "no second admin approved the job before its ttl ran out").await?;
                }
                continue;
            }
            let t = std::time::Instant::now();
            let waiting = self.store.pending_runs(&job.id).await?;
            tracing::debug!(runs = waiting.len(), ms = t.elapsed().as_millis() as u64, "read pending runs");
            let errors = shared::job::failures(&c);
            if job.max_errors.is_some_and(|m| errors >= u64::from(m)) {
                self.end(&job.id, &waiting, RunState::Skipped, "the job reached its max_errors").await?;
                continue;
            }
            self.dispatch_job(job, waiting, in_flight, now).await?;
        }
        Ok(())
    }

    /// Cancels a job: pending runs end `cancelled`, and every run already sent is told to stop.
    /// `None` if there is no such job.
    pub async fn cancel(&self, job_id: &JobId, at: Timestamp) -> Result<Option<(Vec<OpenRun>, Vec<OpenRun>)>, StoreError> {
        let _sending = self.sending.lock().await;
        let Some((ended, on_agents)) = self.store.cancel_job(job_id, at).await? else { return Ok(None) };
        for r in &on_agents {
            if let Some(tx) = self.registry.sender(&r.agent_id) {
                let _ = tx.try_send(ServerMessage::Cancel(shared::protocol::Cancel { run_id: r.id.clone() }));
            }
        }
        let ids: Vec<RunId> = ended.iter().map(|r| r.id.clone()).collect();
        self.publish_states(job_id, &ended, &ids, RunState::Cancelled, None);
        Ok(Some((ended, on_agents)))
    }

    async fn dispatch_job(&self, job: &JobRow, waiting: Vec<OpenRun>, in_flight: u64, now: Timestamp) -> Result<(), StoreError> {
        let mut slots = job.max_in_flight.map_or(usize::MAX, |m| u64::from(m).saturating_sub(in_flight) as usize);
        let (mut send, mut expire) = (Vec::new(), Vec::new());
        let waiting_count = waiting.len();
        for r in waiting {
            if self.registry.is_connected(&r.agent_id) {
                if slots > 0 {
                    slots -= 1;
                    send.push(r);
                }
            } else if now >= job.expires_at {
                expire.push(r);
            }
        }
        self.end(&job.id, &expire, RunState::Expired, "the agent was not online before the job's ttl ran out").await?;
        if let Some(scope) = &job.scope
            && !send.is_empty()
        {
            // Labels may have changed since the job was made: check the creator's scope again
            // against what is stored now, so a run never reaches an agent moved out of it.
            let ids: Vec<AgentId> = send.iter().map(|r| r.agent_id.clone()).collect();
            let labels = self.store.agent_labels(&ids).await?;
            let (inside, outside): (Vec<OpenRun>, Vec<OpenRun>) =
                send.into_iter().partition(|r| labels.get(&r.agent_id).is_some_and(|l| scope.matches(l)));
            send = inside;
            if !outside.is_empty() {
                let why = format!("the agent no longer matches the scope of the token that created the job ({scope})");
                self.end(&job.id, &outside, RunState::Skipped, &why).await?;
            }
        }
        if send.is_empty() {
            return Ok(());
        }
        let _sending = self.sending.lock().await;
        let t = std::time::Instant::now();
        // Stamped now, not at the start of the round: the round read the counts after the
        // results that freed these slots were stored, so a run's recorded dispatch never comes
        // before the end of the run it replaced.
        let marked_at = Timestamp::now();
        // The common broadcast sends every pending run at once: one statement by job.
        let marked: HashSet<RunId> = if send.len() == waiting_count {
            self.store.mark_job_dispatched(&job.id, marked_at).await?
        } else {
            let ids: Vec<RunId> = send.iter().map(|r| r.id.clone()).collect();
            self.store.mark_dispatched(&ids, marked_at).await?
        }
        .into_iter()
        .collect();
        tracing::debug!(runs = marked.len(), ms = t.elapsed().as_millis() as u64, "marked dispatched");
        let mut undelivered = Vec::new();
        let mut delivered = Vec::new();
        let set = match &job.signature {
            Some(_) => Some(self.signed_set(&job.id).await?),
            None => None,
        };
        for r in send.into_iter().filter(|r| marked.contains(&r.id)) {
            let signature = match (&job.signature, &set) {
                (Some(sig), Some(set)) => Some(Box::new(RunSignature {
                    key: sig.key.clone(),
                    signature: sig.signature.clone(),
                    expires_at: sig.expires_at,
                    selector: sig.selector.clone(),
                    agents: set.len(),
                    // Every run's agent is in the signed set (the API made the runs from it);
                    // an empty proof would only make that agent refuse.
                    proof: set.proof(&r.agent_id).unwrap_or_default(),
                })),
                _ => None,
            };
            let msg = ServerMessage::Run(Run {
                run_id: r.id.clone(),
                job_id: job.id.clone(),
                command: job.command.clone(),
                timeout_ms: job.timeout_ms,
                output_limit: job.output_limit,
                signature,
            });
            let sent = self.registry.sender(&r.agent_id).is_some_and(|tx| tx.try_send(msg).is_ok());
            if sent {
                delivered.push(r);
            } else {
                undelivered.push(r.id);
            }
        }
        if !undelivered.is_empty() {
            // The session went away or is full: back to pending, for the next round.
            self.store.redeliver(&undelivered).await?;
        }
        tracing::debug!(runs = delivered.len(), ms = t.elapsed().as_millis() as u64, "dispatched");
        let ids: Vec<RunId> = delivered.iter().map(|r| r.id.clone()).collect();
        self.publish_states(&job.id, &delivered, &ids, RunState::Dispatched, None);
        Ok(())
    }

    async fn signed_set(&self, job_id: &JobId) -> Result<Arc<AgentSet>, StoreError> {
        if let Some(set) = self.signed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(job_id) {
            return Ok(set.clone());
        }
        let ids = self.store.signed_agents(job_id).await?;
        let set = Arc::new(AgentSet::new(&ids));
        self.signed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(job_id.clone(), set.clone());
        Ok(set)
    }

    /// When an agent says hello: runs the server thinks are on it but that the agent does not
    /// list either never reached it (sent again) or were lost with its state.
    pub async fn reconcile(&self, agent_id: &AgentId, agent_has: &[RunId]) -> Result<Vec<OpenRun>, StoreError> {
        let has: HashSet<&RunId> = agent_has.iter().collect();
        let open = self.store.open_runs_for_agent(agent_id).await?;
        let (mut redeliver, mut lost, mut held) = (Vec::new(), Vec::new(), Vec::new());
        for r in open {
            match (has.contains(&r.id), r.state) {
                (true, _) => held.push(r),
                (false, RunState::Pending) => {}
                (false, RunState::Dispatched) if !r.accepted => redeliver.push(r.id),
                (false, _) => lost.push(r),
            }
        }
        self.store.redeliver(&redeliver).await?;
        for r in &lost {
            self.end(&r.job_id, std::slice::from_ref(r), RunState::Lost, "the agent came back without it").await?;
        }
        self.kick.notify_one();
        Ok(held)
    }
}

#[cfg(test)]
mod tests;
