//! A batch's output chunks judged by the rule in [`crate::output`], for every backend: each
//! stream of a run holds `[0, held)` once, within the job's output limit. The backend fetches
//! each run's [`RunInfo`] (`runs.stdout_held`/`stderr_held` and the `_truncated` flags say how
//! far each stream goes, so a chunk is judged without reading what is stored, except where it
//! overlaps stored bytes), answers the few reads of [`OutputReads`], and writes the
//! [`OutputPlan`].

use std::collections::{HashMap, HashSet};

use shared::AgentId;
use shared::job::{JobId, RunId, RunState, Stream};

use crate::output::{self, Decision, Held};
use crate::store::{Effect, Result};

pub struct Chunk<'a> {
    pub agent_id: &'a AgentId,
    pub run_id: &'a RunId,
    pub stream: Stream,
    pub offset: u64,
    pub data: &'a str,
}

/// What the store holds of a run that output names.
pub struct RunInfo {
    pub job_id: JobId,
    pub agent_id: String,
    pub limit: u64,
    /// Stdout, stderr.
    pub held: [Held; 2],
    /// The run's result is stored (and not one a later report may replace): its output is
    /// settled and takes no more chunks.
    pub settled: bool,
}

impl RunInfo {
    pub fn new(job_id: JobId, agent_id: String, state: RunState, limit: u64, held: [Held; 2]) -> RunInfo {
        RunInfo { job_id, agent_id, limit, held, settled: !crate::runs::takes_result(state) }
    }
}

/// What a backend fetches for each run the chunks name: id, job id, agent id, the job's output
/// limit, held length and truncated flag of stdout and stderr, state.
pub type InfoRow = (RunId, JobId, String, i64, i64, bool, i64, bool, String);

/// The fetched rows as [`plan`] takes them.
pub fn run_infos(rows: Vec<InfoRow>) -> Result<HashMap<RunId, RunInfo>> {
    use crate::store::rows::{parse_run_state, to_u64};
    let mut out = HashMap::with_capacity(rows.len());
    for (id, job_id, agent_id, limit, out_len, out_t, err_len, err_t, state) in rows {
        let held = [Held { len: to_u64(out_len), truncated: out_t }, Held { len: to_u64(err_len), truncated: err_t }];
        out.insert(id, RunInfo::new(job_id, agent_id, parse_run_state(&state)?, to_u64(limit), held));
    }
    Ok(out)
}

/// Rows are merged up to this size, so that reading an overlap touches a few rows at most.
pub const ROW_BYTES: usize = 64 * 1024;

/// One row to write: consecutive appends to a stream in one batch become one row. A piece
/// that extends a stored row replaces it (same key: run, stream, offset).
pub struct Piece {
    pub run_id: RunId,
    /// 0 stdout, 1 stderr: the stored `stream` column.
    pub stream: usize,
    pub offset: u64,
    pub data: String,
}

/// What the chunks change: rows to insert or replace, and each changed run's streams.
pub struct OutputPlan {
    pub pieces: Vec<Piece>,
    pub held: Vec<(RunId, [Held; 2])>,
}

/// The reads judging a chunk may need, inside the batch's transaction.
pub trait OutputReads {
    /// Stored rows `(offset, data)` of a stream from the one holding `from` (the last starting
    /// at or before it) up to those starting before `to`, by offset.
    fn rows(&mut self, run_id: &str, stream: usize, from: u64, to: u64) -> impl Future<Output = Result<Vec<(u64, String)>>> + Send;
    /// The stream's last stored row, by offset.
    fn last_row(&mut self, run_id: &str, stream: usize) -> impl Future<Output = Result<Option<(u64, String)>>> + Send;
}

fn stream_index(s: Stream) -> usize {
    usize::from(s == Stream::Stderr)
}

static CONFLICTS: crate::logging::Throttle = crate::logging::Throttle::new(std::time::Duration::from_secs(1), 5);

/// Judges a batch's chunks, in order. Each stored piece becomes an `Output` effect; a gap asks
/// the agent (once per run and batch) to send again from what is held.
pub async fn plan<R: OutputReads>(
    reads: &mut R,
    chunks: &[Chunk<'_>],
    runs: &mut HashMap<RunId, RunInfo>,
    effects: &mut Vec<Effect>,
) -> Result<OutputPlan> {
    let mut pieces: Vec<Piece> = Vec::new();
    let mut last_piece: HashMap<(RunId, usize), usize> = HashMap::new();
    let mut changed: HashSet<RunId> = HashSet::new();
    let mut resent: HashSet<RunId> = HashSet::new();
    for &Chunk { agent_id, run_id, stream, offset, data } in chunks {
        let Some(info) = runs.get_mut(run_id.as_str()) else {
            crate::telemetry::output_refused("unknown_run");
            continue;
        };
        if info.agent_id != agent_id.as_str() {
            crate::telemetry::output_refused("not_owner");
            continue;
        }
        if info.settled {
            crate::telemetry::output_refused("settled");
            continue;
        }
        let si = stream_index(stream);
        let held = info.held[si];
        let stored = match output::overlap(held, offset, data.len()) {
            Some((from, to)) => stored_range(reads, run_id, si, from, to, &pieces).await?,
            None => None,
        };
        match output::decide(held, info.limit, offset, data, stored.as_deref()) {
            Decision::Append { offset: at, data: fresh, held: next } => {
                info.held[si] = next;
                changed.insert(run_id.clone());
                effects.push(Effect::Output {
                    job_id: info.job_id.clone(),
                    run_id: run_id.clone(),
                    agent_id: agent_id.clone(),
                    stream,
                    offset: at,
                    data: fresh.to_owned(),
                });
                let key = (run_id.clone(), si);
                if !last_piece.contains_key(&key) {
                    // The stream's last stored row, if small, is extended rather than followed by
                    // another small row: an agent that sends a byte at a time still leaves rows of
                    // tens of KiB, so an overlap is read from a few rows.
                    let tail = reads.last_row(run_id, si).await?;
                    if let Some((offset, data)) = tail.filter(|(o, d)| o + d.len() as u64 == at && d.len() < ROW_BYTES) {
                        last_piece.insert(key.clone(), pieces.len());
                        pieces.push(Piece { run_id: run_id.clone(), stream: si, offset, data });
                    }
                }
                match last_piece.get(&key).and_then(|&i| pieces.get_mut(i)) {
                    Some(p) if p.offset + p.data.len() as u64 == at && p.data.len() + fresh.len() <= ROW_BYTES => p.data.push_str(fresh),
                    _ => {
                        last_piece.insert(key, pieces.len());
                        pieces.push(Piece { run_id: run_id.clone(), stream: si, offset: at, data: fresh.to_owned() });
                    }
                }
            }
            Decision::Nothing => {}
            Decision::Truncate => {
                info.held[si].truncated = true;
                changed.insert(run_id.clone());
            }
            Decision::Gap => {
                crate::telemetry::output_refused("gap");
                if resent.insert(run_id.clone()) {
                    effects.push(Effect::Resend {
                        agent_id: agent_id.clone(),
                        run_id: run_id.clone(),
                        stdout_from: info.held[0].len,
                        stderr_from: info.held[1].len,
                    });
                }
            }
            Decision::Conflict => {
                crate::telemetry::output_refused("conflict");
                if let Some(suppressed) = CONFLICTS.admit() {
                    tracing::warn!(agent = %agent_id, run = %run_id, offset, suppressed, "output chunk differs from stored output; refused");
                }
            }
        }
    }
    let held = changed.into_iter().filter_map(|id| runs.get(id.as_str()).map(|i| i.held).map(|h| (id, h))).collect();
    Ok(OutputPlan { pieces, held })
}

/// Stored bytes `[from, to)` of a stream: from the database and from pieces of this batch not
/// yet written. None if they do not cover the range (which the rule then refuses).
async fn stored_range<R: OutputReads>(
    reads: &mut R,
    run_id: &str,
    stream: usize,
    from: u64,
    to: u64,
    pending: &[Piece],
) -> Result<Option<Vec<u8>>> {
    let rows = reads.rows(run_id, stream, from, to).await?;
    let mut pieces: Vec<(u64, &str)> = rows.iter().map(|(o, d)| (*o, d.as_str())).collect();
    pieces.extend(pending.iter().filter(|p| p.run_id == run_id && p.stream == stream).map(|p| (p.offset, p.data.as_str())));
    pieces.sort_by_key(|p| p.0);
    Ok(output::extract(&pieces, from, to))
}
