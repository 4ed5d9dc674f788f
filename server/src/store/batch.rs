//! A recorder batch planned once for every backend: which rows each kind of record writes, and
//! what the batch's results settle to. A backend turns a [`Plan`] into its own set-based
//! statements in one transaction; it decides nothing (the rules are [`crate::runs`] and
//! [`crate::output`], the output chunks' planning is [`output`]).
//!
//! Kinds touch different columns, and within a kind the last record of an agent (or run) wins,
//! so writing kind by kind gives the same result as applying the records one by one in order.

pub mod output;

use std::collections::{HashMap, HashSet};

use shared::api::AgentStatus;
use shared::job::{JobId, RunId};
use shared::protocol::{Metrics, RunFinished};
use shared::signing::PublicKey;
use shared::{AgentId, Labels};

use super::{Effect, Record};
use crate::runs::{self, Forget, Settlement, StoredResult, StoredRun};

/// The last `Connected` of an agent in the batch.
pub struct Connection<'a> {
    pub agent_id: &'a AgentId,
    pub at: i64,
    pub hostname: &'a str,
    pub labels: &'a Labels,
    pub heartbeat_interval_ms: u64,
    pub agent_version: &'a str,
    pub node: &'a str,
    pub remote_addr: &'a str,
    pub trusted_keys: &'a [PublicKey],
}

pub struct TransitionRow<'a> {
    pub agent_id: &'a AgentId,
    pub at: i64,
    pub from: Option<AgentStatus>,
    pub to: AgentStatus,
    pub reason: &'a str,
}

pub struct HeartbeatRow<'a> {
    pub agent_id: &'a AgentId,
    pub at: i64,
    pub seq: u64,
    pub metrics: &'a Metrics,
}

/// `run_accepted` or `run_started`.
pub struct Progress<'a> {
    pub agent_id: &'a AgentId,
    pub run_id: &'a RunId,
    pub at: i64,
}

pub struct Finished<'a> {
    pub agent_id: &'a AgentId,
    pub finished: &'a RunFinished,
    pub at: i64,
}

/// What a batch writes, kind by kind.
pub struct Plan<'a> {
    pub connections: Vec<Connection<'a>>,
    /// Agents whose last connection record in the batch is a `Disconnected`, and when.
    pub disconnections: Vec<(&'a AgentId, i64)>,
    /// Every transition, in order: each is a row of history.
    pub transitions: Vec<TransitionRow<'a>>,
    /// Each agent's status after the batch: its last transition.
    pub statuses: Vec<(&'a AgentId, i64, AgentStatus)>,
    /// Every heartbeat, in order: each is a row of history.
    pub heartbeats: Vec<HeartbeatRow<'a>>,
    /// Indexes into `heartbeats`: each agent's newest, which sets its latest metrics.
    pub latest: Vec<usize>,
    pub accepted: Vec<Progress<'a>>,
    /// `run_started` of runs that do not also finish in this batch (those get their start
    /// written with the result).
    pub started: Vec<Progress<'a>>,
    pub outputs: Vec<output::Chunk<'a>>,
    pub finished: Vec<Finished<'a>>,
    /// When each run of the batch started, for results that arrive with their start.
    pub started_at: HashMap<&'a str, i64>,
}

impl<'a> Plan<'a> {
    pub fn new(batch: &'a [Record]) -> Plan<'a> {
        let mut last_connected: HashMap<&AgentId, Connection<'a>> = HashMap::new();
        let mut last_event: HashMap<&AgentId, Option<i64>> = HashMap::new();
        let mut transitions = Vec::new();
        let mut heartbeats = Vec::new();
        let mut accepted = Vec::new();
        let mut started_all = Vec::new();
        let mut outputs = Vec::new();
        let mut finished = Vec::new();
        for r in batch {
            match r {
                Record::Connected {
                    agent_id,
                    at,
                    hostname,
                    labels,
                    heartbeat_interval_ms,
                    agent_version,
                    node,
                    remote_addr,
                    trusted_keys,
                } => {
                    last_connected.insert(
                        agent_id,
                        Connection {
                            agent_id,
                            at: at.unix_millis(),
                            hostname,
                            labels,
                            heartbeat_interval_ms: *heartbeat_interval_ms,
                            agent_version,
                            node,
                            remote_addr,
                            trusted_keys,
                        },
                    );
                    last_event.insert(agent_id, None);
                }
                Record::Disconnected { agent_id, at } => {
                    last_event.insert(agent_id, Some(at.unix_millis()));
                }
                Record::Transition { agent_id, at, from, to, reason } => {
                    transitions.push(TransitionRow { agent_id, at: at.unix_millis(), from: *from, to: *to, reason })
                }
                Record::Heartbeat { agent_id, at, seq, metrics } => {
                    heartbeats.push(HeartbeatRow { agent_id, at: at.unix_millis(), seq: *seq, metrics })
                }
                Record::RunAccepted { agent_id, run_id, at } => accepted.push(Progress { agent_id, run_id, at: at.unix_millis() }),
                Record::RunStarted { agent_id, run_id, at } => started_all.push(Progress { agent_id, run_id, at: at.unix_millis() }),
                Record::RunOutput { agent_id, run_id, stream, offset, data } => {
                    outputs.push(output::Chunk { agent_id, run_id, stream: *stream, offset: *offset, data })
                }
                Record::RunFinished { agent_id, finished: f, at } => {
                    finished.push(Finished { agent_id, finished: f, at: at.unix_millis() })
                }
            }
        }
        let mut statuses: HashMap<&AgentId, (i64, AgentStatus)> = HashMap::new();
        for t in &transitions {
            statuses.insert(t.agent_id, (t.at, t.to));
        }
        // Only the newest heartbeat of each agent in the batch sets its latest metrics.
        let mut latest: HashMap<&AgentId, usize> = HashMap::with_capacity(heartbeats.len());
        for (i, h) in heartbeats.iter().enumerate() {
            latest
                .entry(h.agent_id)
                .and_modify(|cur| {
                    if h.at >= heartbeats[*cur].at {
                        *cur = i
                    }
                })
                .or_insert(i);
        }
        let finishing: HashSet<&str> = finished.iter().map(|f| f.finished.run_id.as_str()).collect();
        let started_at = started_all.iter().map(|s| (s.run_id.as_str(), s.at)).collect();
        Plan {
            connections: last_connected.into_values().collect(),
            disconnections: last_event.into_iter().filter_map(|(id, at)| at.map(|at| (id, at))).collect(),
            statuses: statuses.into_iter().map(|(id, (at, to))| (id, at, to)).collect(),
            transitions,
            latest: latest.into_values().collect(),
            heartbeats,
            accepted,
            started: started_all.into_iter().filter(|s| !finishing.contains(s.run_id.as_str())).collect(),
            outputs,
            finished,
            started_at,
        }
    }

    /// The run ids the batch's results name, for the backend to fetch.
    pub fn finished_ids(&self) -> Vec<&'a str> {
        self.finished.iter().map(|f| f.finished.run_id.as_str()).collect()
    }

    /// Settles each result against the stored run (fetched by the backend, with its job id):
    /// the effects to announce, and the results to write.
    pub fn settle(&self, stored: &HashMap<RunId, (JobId, StoredRun)>) -> (Vec<Effect>, Vec<ResultRow<'a>>) {
        let mut effects = Vec::new();
        let mut rows = Vec::new();
        for &Finished { agent_id, finished: f, at } in &self.finished {
            let ack = Effect::Ack { agent_id: agent_id.clone(), run_id: f.run_id.clone() };
            let known = stored.get(&f.run_id);
            match runs::settle(known.map(|(_, run)| run), agent_id, f, at) {
                Settlement::Forget(why) => {
                    match why {
                        Forget::UnknownRun => tracing::warn!(agent = %agent_id, run = %f.run_id, "result for an unknown run"),
                        Forget::NotOwner => tracing::warn!(agent = %agent_id, run = %f.run_id, "result for another agent's run refused"),
                        Forget::Settled => {}
                    }
                    effects.push(ack);
                }
                Settlement::Resend { stdout_from, stderr_from } => {
                    effects.push(Effect::Resend { agent_id: agent_id.clone(), run_id: f.run_id.clone(), stdout_from, stderr_from });
                }
                Settlement::Store(result) => {
                    effects.push(Effect::RunState {
                        // `settle` stores only a run it was given, so `known` is there.
                        job_id: match known {
                            Some((job, _)) => job.clone(),
                            None => continue,
                        },
                        run_id: f.run_id.clone(),
                        agent_id: agent_id.clone(),
                        state: result.state,
                        exit_code: f.exit_code,
                        error: f.error.clone(),
                        latency_ms: result.latency_ms,
                    });
                    effects.push(ack);
                    rows.push(ResultRow {
                        finished: f,
                        result,
                        at,
                        started_at: self.started_at.get(f.run_id.as_str()).copied(),
                        // NUL is the one character PostgreSQL's TEXT cannot hold: one agent's odd
                        // message must not fail every batch it is in. Both backends store the same.
                        error: f.error.as_ref().map(|e| e.replace('\0', "\u{FFFD}")),
                    });
                }
            }
        }
        (effects, rows)
    }
}

/// What a backend fetches for each run a batch's results name: id, job id, agent id, state,
/// the job's output limit, dispatched_at, then held length and truncated flag of stdout and
/// stderr.
pub type SettleRow = (RunId, JobId, String, String, i64, Option<i64>, i64, bool, i64, bool);

/// The fetched rows as [`Plan::settle`] takes them.
pub fn stored_runs(rows: Vec<SettleRow>) -> super::Result<HashMap<RunId, (JobId, StoredRun)>> {
    use super::rows::{parse_agent_id, parse_run_state, to_u64};
    use crate::output::Held;
    let mut known = HashMap::with_capacity(rows.len());
    for (id, job, agent, state, limit, dispatched_at, out_len, out_t, err_len, err_t) in rows {
        let run = StoredRun {
            agent_id: parse_agent_id(&agent)?,
            state: parse_run_state(&state)?,
            output_limit: to_u64(limit),
            dispatched_at,
            held: [Held { len: to_u64(out_len), truncated: out_t }, Held { len: to_u64(err_len), truncated: err_t }],
        };
        known.insert(id, (job, run));
    }
    Ok(known)
}

/// A result to write: the run's columns from [`StoredResult`] and the report.
pub struct ResultRow<'a> {
    pub finished: &'a RunFinished,
    pub result: StoredResult,
    pub at: i64,
    /// The run's start, when it arrived in the same batch.
    pub started_at: Option<i64>,
    /// The report's error text as stored.
    pub error: Option<String>,
}
