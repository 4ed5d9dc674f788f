//! Output chunks into `run_output`, by the rule in [`crate::output`]: each stream of a run
//! holds `[0, held)` once, within the job's output limit. `runs.stdout_held`/`stderr_held`
//! (and the `_truncated` flags) say how far each stream goes, so a chunk is judged without
//! reading what is stored, except where it overlaps stored bytes.

use std::collections::{HashMap, HashSet};

use shared::AgentId;
use shared::job::Stream;
use sqlx::{QueryBuilder, Sqlite};

use super::{ROWS_PER_STATEMENT, push_in_list, stream_code, to_i64, to_u64, update_from};
use crate::output::{self, Decision, Held};
use crate::store::{Effect, Record, Result};

struct RunInfo {
    job_id: String,
    agent_id: String,
    limit: u64,
    held: [Held; 2],
    /// The run's result is stored (and not one a later report may replace): its output is
    /// settled and takes no more chunks.
    settled: bool,
}

/// Rows are merged up to this size, so that reading an overlap touches a few rows at most.
const ROW_BYTES: usize = 64 * 1024;

/// One row to insert: consecutive appends to a stream in one batch become one row.
struct Piece {
    run_id: String,
    stream: usize,
    offset: u64,
    data: String,
}

fn stream_index(s: Stream) -> usize {
    usize::from(s == Stream::Stderr)
}

static CONFLICTS: crate::logging::Throttle = crate::logging::Throttle::new(std::time::Duration::from_secs(1), 5);

/// Judges and stores a batch's output chunks, in order. Each stored piece becomes an `Output`
/// effect; a gap asks the agent (once per run and batch) to send again from what is held.
pub(super) async fn insert_outputs(tx: &mut sqlx::Transaction<'_, Sqlite>, records: &[&Record], effects: &mut Vec<Effect>) -> Result<()> {
    let chunks: Vec<(&AgentId, &String, Stream, u64, &String)> = records
        .iter()
        .filter_map(|r| match r {
            Record::RunOutput { agent_id, run_id, stream, offset, data } => Some((agent_id, run_id, *stream, *offset, data)),
            _ => None,
        })
        .collect();
    if chunks.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = chunks.iter().map(|c| c.1.as_str()).collect::<HashSet<_>>().into_iter().collect();
    let mut runs = run_infos(tx, &ids).await?;
    let mut pieces: Vec<Piece> = Vec::new();
    let mut last_piece: HashMap<(String, usize), usize> = HashMap::new();
    let mut changed: HashSet<String> = HashSet::new();
    let mut resent: HashSet<String> = HashSet::new();
    for (agent_id, run_id, stream, offset, data) in chunks {
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
            Some((from, to)) => stored_range(tx, run_id, si, from, to, &pieces).await?,
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
                    if let Some(tail) = last_row(tx, run_id, si, at).await? {
                        last_piece.insert(key.clone(), pieces.len());
                        pieces.push(tail);
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
    for chunk in pieces.chunks(ROWS_PER_STATEMENT) {
        // A piece that extends a stored row replaces it (same key).
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new("INSERT OR REPLACE INTO run_output (run_id, stream, offset, data) ");
        q.push_values(chunk, |mut b, p| {
            b.push_bind(p.run_id.clone()).push_bind(i64::from(p.stream == 1)).push_bind(to_i64(p.offset)).push_bind(p.data.clone());
        });
        q.build().execute(&mut **tx).await?;
    }
    let updates: Vec<(&str, [Held; 2])> = changed.iter().filter_map(|id| runs.get(id.as_str()).map(|i| (id.as_str(), i.held))).collect();
    update_from(
        tx,
        "UPDATE runs SET stdout_held = v.column2, stdout_truncated = MAX(runs.stdout_truncated, v.column3), \
         stderr_held = v.column4, stderr_truncated = MAX(runs.stderr_truncated, v.column5)",
        "WHERE runs.id = v.column1",
        &updates,
        |b, (id, [out, err])| {
            b.push_bind(id.to_string())
                .push_bind(to_i64(out.len))
                .push_bind(out.truncated)
                .push_bind(to_i64(err.len))
                .push_bind(err.truncated);
        },
    )
    .await
}

async fn run_infos(tx: &mut sqlx::Transaction<'_, Sqlite>, ids: &[&str]) -> Result<HashMap<String, RunInfo>> {
    let mut out = HashMap::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT r.id, r.job_id, r.agent_id, j.output_limit, r.stdout_held, r.stdout_truncated, r.stderr_held, r.stderr_truncated, \
             r.state FROM runs r JOIN jobs j ON j.id = r.job_id WHERE r.id IN ",
        );
        push_in_list(&mut q, chunk);
        type Row = (String, String, String, i64, i64, bool, i64, bool, String);
        let rows: Vec<Row> = q.build_query_as().fetch_all(&mut **tx).await?;
        for (id, job_id, agent_id, limit, out_len, out_t, err_len, err_t, state) in rows {
            let held = [Held { len: to_u64(out_len), truncated: out_t }, Held { len: to_u64(err_len), truncated: err_t }];
            let settled = !crate::runs::takes_result(super::parse_run_state(&state)?);
            out.insert(id, RunInfo { job_id, agent_id, limit: to_u64(limit), held, settled });
        }
    }
    Ok(out)
}

/// Stored bytes `[from, to)` of a stream: from the database and from pieces of this batch not
/// yet inserted. None if they do not cover the range (which the rule then refuses).
async fn stored_range(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    run_id: &str,
    stream: usize,
    from: u64,
    to: u64,
    pending: &[Piece],
) -> Result<Option<Vec<u8>>> {
    // Rows from the one holding `from` (the last starting at or before it) to `to`: a bounded
    // range of the primary key, not every row below `to`.
    let code = stream_code(if stream == 1 { Stream::Stderr } else { Stream::Stdout });
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT offset, data FROM run_output WHERE run_id = ?1 AND stream = ?2 AND offset < ?3 AND offset >= \
         COALESCE((SELECT MAX(offset) FROM run_output WHERE run_id = ?1 AND stream = ?2 AND offset <= ?4), 0) ORDER BY offset",
    )
    .bind(run_id)
    .bind(code)
    .bind(to_i64(to))
    .bind(to_i64(from))
    .fetch_all(&mut **tx)
    .await?;
    let mut pieces: Vec<(u64, &str)> = rows.iter().map(|(o, d)| (to_u64(*o), d.as_str())).collect();
    pieces.extend(pending.iter().filter(|p| p.run_id == run_id && p.stream == stream).map(|p| (p.offset, p.data.as_str())));
    pieces.sort_by_key(|p| p.0);
    Ok(output::extract(&pieces, from, to))
}

/// The stream's last stored row when it ends at `at` (where the next append goes) and is small
/// enough to extend; None otherwise.
async fn last_row(tx: &mut sqlx::Transaction<'_, Sqlite>, run_id: &str, stream: usize, at: u64) -> Result<Option<Piece>> {
    let code = stream_code(if stream == 1 { Stream::Stderr } else { Stream::Stdout });
    let row: Option<(i64, String)> =
        sqlx::query_as("SELECT offset, data FROM run_output WHERE run_id = ? AND stream = ? ORDER BY offset DESC LIMIT 1")
            .bind(run_id)
            .bind(code)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(row.filter(|(offset, data)| to_u64(*offset) + data.len() as u64 == at && data.len() < ROW_BYTES).map(|(offset, data)| Piece {
        run_id: run_id.to_owned(),
        stream,
        offset: to_u64(offset),
        data,
    }))
}
