//! Jobs and their runs: creating, listing and counting them, reading runs and their output,
//! marking runs dispatched, ending and redelivering them, overdue runs, approval and cancel.

use std::collections::HashMap;

use shared::job::{AgentRun, JobId, RunId, RunState, StateCounts, Stream};
use shared::{AgentId, Timestamp};
use sqlx::{AssertSqlSafe, PgPool};

use crate::store::rows::{
    self, AgentRunDb, Heads, JobDb, OPEN, OPEN_RUN_COLUMNS, OpenRunDb, RUN_COLUMNS, RunDb, parse_run_state, stream_code, to_i64, to_u64,
};
use crate::store::{JobRow, OpenRun, Result, RunOutputText, RunRow, StoreError};

/// Runs inserted per statement. `UNNEST` binds three arrays whatever the count, so this only
/// bounds the size of one message, not a parameter limit.
const RUNS_PER_STATEMENT: usize = 10_000;

pub(super) async fn state_totals(pool: &PgPool) -> Result<(Vec<(RunState, u64)>, Vec<(&'static str, u64)>)> {
    let runs: Vec<(String, i64)> = sqlx::query_as("SELECT state, COUNT(*) FROM runs GROUP BY state ORDER BY state").fetch_all(pool).await?;
    let (running, finished): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*) FILTER (WHERE finished_at IS NULL), COUNT(*) FILTER (WHERE finished_at IS NOT NULL) FROM jobs")
            .fetch_one(pool)
            .await?;
    rows::state_totals(runs, running, finished)
}

pub(super) async fn create_job(pool: &PgPool, job: &JobRow, runs: &[(RunId, AgentId)]) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO jobs (id, created_at, created_by, target, command, timeout_ms, ttl_ms, concurrency, max_in_flight, \
         max_errors, output_limit, expires_at, signature, scope, approval_required, creator_token) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(&job.id)
    .bind(job.created_at.unix_millis())
    .bind(&job.created_by)
    .bind(serde_json::to_string(&job.target).map_err(|e| StoreError::Corrupt(e.to_string()))?)
    .bind(serde_json::to_string(&job.command).map_err(|e| StoreError::Corrupt(e.to_string()))?)
    .bind(to_i64(job.timeout_ms))
    .bind(to_i64(job.ttl_ms))
    .bind(job.concurrency.map(|c| c.to_string()))
    .bind(job.max_in_flight.map(i64::from))
    .bind(job.max_errors.map(i64::from))
    .bind(to_i64(job.output_limit))
    .bind(job.expires_at.unix_millis())
    .bind(job.signature.as_ref().map(serde_json::to_string).transpose().map_err(|e| StoreError::Corrupt(e.to_string()))?)
    .bind(job.scope.as_ref().map(ToString::to_string))
    .bind(job.approval.is_some())
    .bind(job.approval.as_ref().map(|a| a.creator_token.clone()))
    .execute(&mut *tx)
    .await?;
    if job.signature.is_some()
        && let shared::job::Target::Agents(ids) = &job.target
    {
        sqlx::query("INSERT INTO job_signed_agents (job_id, agents) VALUES ($1, $2)")
            .bind(&job.id)
            .bind(rows::signed_agents_text(ids))
            .execute(&mut *tx)
            .await?;
    }
    for (n, chunk) in runs.chunks(RUNS_PER_STATEMENT).enumerate() {
        let ids: Vec<&str> = chunk.iter().map(|(run, _)| run.as_str()).collect();
        let agents: Vec<&str> = chunk.iter().map(|(_, agent)| agent.as_str()).collect();
        let seqs: Vec<i64> = (0..chunk.len()).map(|i| (n * RUNS_PER_STATEMENT + i) as i64).collect();
        sqlx::query(
            "INSERT INTO runs (id, job_id, agent_id, seq, state) \
             SELECT r.id, $1, r.agent_id, r.seq, 'pending' FROM UNNEST($2::text[], $3::text[], $4::bigint[]) AS r (id, agent_id, seq)",
        )
        .bind(&job.id)
        .bind(&ids)
        .bind(&agents)
        .bind(&seqs)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn job(pool: &PgPool, id: &str) -> Result<Option<JobRow>> {
    let row: Option<JobDb> = sqlx::query_as("SELECT * FROM jobs WHERE id = $1").bind(id).fetch_optional(pool).await?;
    row.map(JobRow::try_from).transpose()
}

pub(super) async fn list_jobs(pool: &PgPool, limit: u32) -> Result<Vec<JobRow>> {
    let rows: Vec<JobDb> =
        sqlx::query_as("SELECT * FROM jobs ORDER BY created_at DESC, id LIMIT $1").bind(i64::from(limit)).fetch_all(pool).await?;
    rows.into_iter().map(JobRow::try_from).collect()
}

pub(super) async fn active_jobs(pool: &PgPool) -> Result<Vec<JobRow>> {
    let rows: Vec<JobDb> = sqlx::query_as("SELECT * FROM jobs WHERE finished_at IS NULL ORDER BY created_at, id").fetch_all(pool).await?;
    rows.into_iter().map(JobRow::try_from).collect()
}

pub(super) async fn run_counts(pool: &PgPool, job_ids: &[JobId]) -> Result<HashMap<JobId, StateCounts>> {
    let rows: Vec<(JobId, String, i64)> =
        sqlx::query_as("SELECT job_id, state, COUNT(*) FROM runs WHERE job_id = ANY($1) GROUP BY job_id, state")
            .bind(job_ids)
            .fetch_all(pool)
            .await?;
    let mut out: HashMap<JobId, StateCounts> = HashMap::new();
    for (job, state, n) in rows {
        out.entry(job).or_default().insert(parse_run_state(&state)?, to_u64(n));
    }
    Ok(out)
}

pub(super) async fn runs(pool: &PgPool, job_id: &str) -> Result<Vec<RunRow>> {
    runs_where(pool, "r.job_id = $1 ORDER BY r.seq", job_id).await
}

pub(super) async fn run(pool: &PgPool, run_id: &str) -> Result<Option<RunRow>> {
    Ok(runs_where(pool, "r.id = $1", run_id).await?.pop())
}

pub(super) async fn agent_runs(pool: &PgPool, agent_id: &AgentId, limit: u32) -> Result<Vec<AgentRun>> {
    let rows: Vec<AgentRunDb> = sqlx::query_as(
        "SELECT r.job_id, r.id AS run_id, j.created_at, j.created_by, j.command, r.state, r.exit_code, r.signal, r.error, \
         r.started_at, r.finished_at FROM runs r JOIN jobs j ON j.id = r.job_id \
         WHERE r.agent_id = $1 ORDER BY j.created_at DESC, r.job_id LIMIT $2",
    )
    .bind(agent_id.as_str())
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(AgentRun::try_from).collect()
}

/// A stored output row's text: the bytes are the UTF-8 of a string the server stored.
fn row_text<'a>(run_id: &str, data: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(data).map_err(|e| StoreError::Corrupt(format!("output of run {run_id}: {e}")))
}

pub(super) async fn run_output_heads(pool: &PgPool, job_id: &str, head: u64, total: u64) -> Result<HashMap<RunId, RunOutputText>> {
    use futures_util::TryStreamExt;
    // Rows come in order and are read as a stream, so a job with a great deal of output
    // costs this read no more than `total` bytes (plus one row).
    let mut rows = sqlx::query_as::<_, (RunId, i64, i64, Vec<u8>)>(
        "SELECT o.run_id, o.stream, o.\"offset\", o.data FROM run_output o JOIN runs r ON r.id = o.run_id \
         WHERE r.job_id = $1 AND o.\"offset\" < $2 ORDER BY o.run_id, o.stream, o.\"offset\"",
    )
    .bind(job_id)
    .bind(to_i64(head))
    .fetch(pool);
    let mut heads = Heads::new(head, total);
    while let Some((run, stream, offset, data)) = rows.try_next().await? {
        let text = row_text(&run, &data)?;
        heads.push(run.clone(), stream, offset, text);
    }
    Ok(heads.finish())
}

pub(super) async fn run_output(pool: &PgPool, run_id: &str, stream: Stream, offset: u64, limit: u64) -> Result<Option<(RunRow, String)>> {
    let Some(run) = run(pool, run_id).await? else { return Ok(None) };
    let end = offset.saturating_add(limit);
    // Offsets and lengths in bytes: `octet_length` of the BYTEA, as SQLite's
    // `length(CAST(data AS BLOB))`. The page is cut on a character boundary in Rust.
    let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT \"offset\", data FROM run_output WHERE run_id = $1 AND stream = $2 AND \"offset\" < $3 \
         AND \"offset\" + octet_length(data) > $4 ORDER BY \"offset\"",
    )
    .bind(run_id)
    .bind(stream_code(stream))
    .bind(to_i64(end))
    .bind(to_i64(offset))
    .fetch_all(pool)
    .await?;
    let pieces = rows.iter().map(|(o, d)| Ok((to_u64(*o), row_text(run_id, d)?))).collect::<Result<Vec<(u64, &str)>>>()?;
    let held = match stream {
        Stream::Stdout => run.stdout_len,
        Stream::Stderr => run.stderr_len,
    };
    let text = rows::output_page(&pieces, offset, end, held);
    Ok(Some((run, text)))
}

pub(super) async fn pending_runs(pool: &PgPool, job_id: &str) -> Result<Vec<OpenRun>> {
    open_runs_where(pool, "job_id = $1 AND state = 'pending' ORDER BY seq", job_id).await
}

// Concurrency, for the four updates below: each moves a run only if its guard (the state it
// must be in) still holds on the row's newest version. Two servers dispatching, ending or
// redelivering the same run at once: one changes it and returns it, the other gets nothing.

pub(super) async fn mark_dispatched(pool: &PgPool, run_ids: &[RunId], at: Timestamp) -> Result<Vec<RunId>> {
    let rows: Vec<(RunId,)> =
        sqlx::query_as("UPDATE runs SET state = 'dispatched', dispatched_at = $1 WHERE state = 'pending' AND id = ANY($2) RETURNING id")
            .bind(at.unix_millis())
            .bind(run_ids)
            .fetch_all(pool)
            .await?;
    Ok(sorted(rows))
}

pub(super) async fn mark_job_dispatched(pool: &PgPool, job_id: &str, at: Timestamp) -> Result<Vec<RunId>> {
    let rows: Vec<(RunId,)> =
        sqlx::query_as("UPDATE runs SET state = 'dispatched', dispatched_at = $1 WHERE job_id = $2 AND state = 'pending' RETURNING id")
            .bind(at.unix_millis())
            .bind(job_id)
            .fetch_all(pool)
            .await?;
    Ok(sorted(rows))
}

pub(super) async fn end_runs(pool: &PgPool, run_ids: &[RunId], state: RunState, error: &str, at: Timestamp) -> Result<Vec<RunId>> {
    let sql = format!("UPDATE runs SET state = $1, error = $2, finished_at = $3 WHERE state IN {OPEN} AND id = ANY($4) RETURNING id");
    let rows: Vec<(RunId,)> =
        sqlx::query_as(AssertSqlSafe(sql)).bind(state.as_str()).bind(error).bind(at.unix_millis()).bind(run_ids).fetch_all(pool).await?;
    Ok(sorted(rows))
}

pub(super) async fn redeliver(pool: &PgPool, run_ids: &[RunId]) -> Result<()> {
    sqlx::query("UPDATE runs SET state = 'pending', dispatched_at = NULL WHERE state = 'dispatched' AND NOT accepted AND id = ANY($1)")
        .bind(run_ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// The ids an `UPDATE ... RETURNING` changed, in id order (RETURNING has none).
fn sorted(rows: Vec<(RunId,)>) -> Vec<RunId> {
    let mut ids: Vec<RunId> = rows.into_iter().map(|(id,)| id).collect();
    ids.sort_unstable();
    ids
}

pub(super) async fn open_runs_for_agent(pool: &PgPool, agent_id: &AgentId) -> Result<Vec<OpenRun>> {
    let sql = format!("agent_id = $1 AND state IN {OPEN} ORDER BY job_id, seq");
    open_runs_where(pool, &sql, agent_id.as_str()).await
}

pub(super) async fn overdue_runs(pool: &PgPool, now: Timestamp, grace_ms: u64) -> Result<Vec<OpenRun>> {
    // The deadline is summed in NUMERIC: a huge timeout would overflow BIGINT, which raises
    // here (failing the whole sweep) where SQLite goes to REAL and simply finds it not due.
    let rows: Vec<OpenRunDb> = sqlx::query_as(
        "SELECT r.id, r.job_id, r.agent_id, r.state, r.accepted FROM runs r JOIN jobs j ON j.id = r.job_id \
         WHERE r.state IN ('dispatched', 'running') AND j.finished_at IS NULL \
         AND COALESCE(r.started_at, r.dispatched_at)::numeric + j.timeout_ms + $1 < $2 ORDER BY r.job_id, r.seq",
    )
    .bind(to_i64(grace_ms))
    .bind(now.unix_millis())
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(OpenRun::try_from).collect()
}

pub(super) async fn finish_job_if_done(pool: &PgPool, job_id: &str, at: Timestamp) -> Result<bool> {
    // Concurrency: `finished_at IS NULL` is re-checked on the newest row, so of two servers
    // finishing the job at once one does. Every writer that ends a run calls this after its
    // commit, so the last run's end always finds the others ended.
    let sql = format!(
        "UPDATE jobs SET finished_at = $1 WHERE id = $2 AND finished_at IS NULL \
         AND NOT EXISTS (SELECT 1 FROM runs WHERE job_id = $2 AND state IN {OPEN})"
    );
    let done = sqlx::query(AssertSqlSafe(sql)).bind(at.unix_millis()).bind(job_id).execute(pool).await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn approve_job(pool: &PgPool, job_id: &str, token: &str, by: &str, at: Timestamp) -> Result<bool> {
    // Concurrency: one guarded update; of two approvals (or an approval and a cancel) the
    // guard lets exactly the first through. `IS DISTINCT FROM` is SQLite's `IS NOT`.
    let done = sqlx::query(
        "UPDATE jobs SET approved_by = $1, approved_at = $2 WHERE id = $3 AND approval_required AND approved_at IS NULL \
         AND cancelled_at IS NULL AND finished_at IS NULL AND creator_token IS DISTINCT FROM $4",
    )
    .bind(by)
    .bind(at.unix_millis())
    .bind(job_id)
    .bind(token)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn cancel_job(pool: &PgPool, job_id: &str, at: Timestamp) -> Result<Option<(Vec<OpenRun>, Vec<OpenRun>)>> {
    // One transaction: the runs read are the runs changed. A run already sent (dispatched,
    // accepted or not) is left to its agent, which is told to stop it and reports how it
    // ended; only a run never sent ends here.
    let mut tx = pool.begin().await?;
    // A finished job stays as it finished: nothing to cancel, nothing marked. The guard is
    // re-checked on the newest row, so a job another server finishes meanwhile is left alone.
    let done = sqlx::query("UPDATE jobs SET cancelled_at = COALESCE(cancelled_at, $1) WHERE id = $2 AND finished_at IS NULL")
        .bind(at.unix_millis())
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        let exists: Option<(bool,)> = sqlx::query_as("SELECT TRUE FROM jobs WHERE id = $1").bind(job_id).fetch_optional(&mut *tx).await?;
        return Ok(exists.map(|_| (Vec::new(), Vec::new())));
    }
    // Concurrency: the open runs are locked as they are read. A dispatcher on another server
    // marking one dispatched either committed first (it is read as dispatched, and its agent
    // told to stop) or waits for this commit (and finds it cancelled, not pending). Without
    // the lock a run read as pending could be sent meanwhile, and never be told to stop.
    let sql = format!("SELECT {OPEN_RUN_COLUMNS} FROM runs WHERE job_id = $1 AND state IN {OPEN} ORDER BY seq FOR UPDATE");
    let rows: Vec<OpenRunDb> = sqlx::query_as(AssertSqlSafe(sql)).bind(job_id).fetch_all(&mut *tx).await?;
    let open = rows.into_iter().map(OpenRun::try_from).collect::<Result<Vec<_>>>()?;
    sqlx::query(
        "UPDATE runs SET state = 'cancelled', error = 'cancelled before it started', finished_at = $1 WHERE job_id = $2 AND state = 'pending'",
    )
    .bind(at.unix_millis())
    .bind(job_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(open.into_iter().partition(|r| r.state == RunState::Pending)))
}

async fn runs_where(pool: &PgPool, sql_where: &'static str, bind: &str) -> Result<Vec<RunRow>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM runs r LEFT JOIN agents a ON a.id = r.agent_id WHERE {sql_where}");
    let rows: Vec<RunDb> = sqlx::query_as(AssertSqlSafe(sql)).bind(bind).fetch_all(pool).await?;
    rows.into_iter().map(RunRow::try_from).collect()
}

async fn open_runs_where(pool: &PgPool, sql_where: &str, bind: &str) -> Result<Vec<OpenRun>> {
    let sql = format!("SELECT {OPEN_RUN_COLUMNS} FROM runs WHERE {sql_where}");
    let rows: Vec<OpenRunDb> = sqlx::query_as(AssertSqlSafe(sql)).bind(bind).fetch_all(pool).await?;
    rows.into_iter().map(OpenRun::try_from).collect()
}
