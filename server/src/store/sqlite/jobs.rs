//! Jobs and their runs: creating, listing and counting them, reading runs and their output,
//! marking runs dispatched, ending and redelivering them, overdue runs, approval and cancel.

use std::collections::HashMap;

use shared::job::{AgentRun, JobId, RunId, RunState, StateCounts, Stream};
use shared::{AgentId, Timestamp};
use sqlx::{AssertSqlSafe, QueryBuilder, Sqlite, SqlitePool};

use super::{ROWS_PER_STATEMENT, parse_run_state, push_in_list, stream_code, to_i64, to_u64};
use crate::store::rows::{self, AgentRunDb, Heads, JobDb, OPEN, OPEN_RUN_COLUMNS, OpenRunDb, RUN_COLUMNS, RunDb};
use crate::store::{JobRow, OpenRun, Result, RunOutputText, RunRow, StoreError};

pub(super) async fn state_totals(pool: &SqlitePool) -> Result<(Vec<(RunState, u64)>, Vec<(&'static str, u64)>)> {
    let runs: Vec<(String, i64)> = sqlx::query_as("SELECT state, COUNT(*) FROM runs GROUP BY state ORDER BY state").fetch_all(pool).await?;
    let (running, finished): (i64, i64) =
        sqlx::query_as("SELECT COALESCE(SUM(finished_at IS NULL), 0), COALESCE(SUM(finished_at IS NOT NULL), 0) FROM jobs")
            .fetch_one(pool)
            .await?;
    rows::state_totals(runs, running, finished)
}

pub(super) async fn create_job(pool: &SqlitePool, job: &JobRow, runs: &[(RunId, AgentId)]) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO jobs (id, created_at, created_by, target, command, timeout_ms, ttl_ms, concurrency, max_in_flight, \
         max_errors, output_limit, expires_at, signature, scope, approval_required, creator_token) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        sqlx::query("INSERT INTO job_signed_agents (job_id, agents) VALUES (?, ?)")
            .bind(&job.id)
            .bind(rows::signed_agents_text(ids))
            .execute(&mut *tx)
            .await?;
    }
    for (n, chunk) in runs.chunks(ROWS_PER_STATEMENT).enumerate() {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new("INSERT INTO runs (id, job_id, agent_id, seq, state) ");
        q.push_values(chunk.iter().enumerate(), |mut b, (i, (run_id, agent_id))| {
            b.push_bind(run_id.clone())
                .push_bind(job.id.clone())
                .push_bind(agent_id.as_str().to_owned())
                .push_bind((n * ROWS_PER_STATEMENT + i) as i64)
                .push_bind("pending");
        });
        q.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn job(pool: &SqlitePool, id: &str) -> Result<Option<JobRow>> {
    let row: Option<JobDb> = sqlx::query_as("SELECT * FROM jobs WHERE id = ?").bind(id).fetch_optional(pool).await?;
    row.map(JobRow::try_from).transpose()
}

pub(super) async fn list_jobs(pool: &SqlitePool, limit: u32) -> Result<Vec<JobRow>> {
    let rows: Vec<JobDb> =
        sqlx::query_as("SELECT * FROM jobs ORDER BY created_at DESC, id LIMIT ?").bind(i64::from(limit)).fetch_all(pool).await?;
    rows.into_iter().map(JobRow::try_from).collect()
}

pub(super) async fn active_jobs(pool: &SqlitePool) -> Result<Vec<JobRow>> {
    let rows: Vec<JobDb> = sqlx::query_as("SELECT * FROM jobs WHERE finished_at IS NULL ORDER BY created_at, id").fetch_all(pool).await?;
    rows.into_iter().map(JobRow::try_from).collect()
}

pub(super) async fn run_counts(pool: &SqlitePool, job_ids: &[JobId]) -> Result<HashMap<JobId, StateCounts>> {
    let mut out: HashMap<JobId, StateCounts> = HashMap::new();
    for chunk in job_ids.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new("SELECT job_id, state, COUNT(*) FROM runs WHERE job_id IN ");
        push_in_list(&mut q, chunk);
        q.push(" GROUP BY job_id, state");
        let rows: Vec<(JobId, String, i64)> = q.build_query_as().fetch_all(pool).await?;
        for (job, state, n) in rows {
            out.entry(job).or_default().insert(parse_run_state(&state)?, to_u64(n));
        }
    }
    Ok(out)
}

pub(super) async fn runs(pool: &SqlitePool, job_id: &str) -> Result<Vec<RunRow>> {
    runs_where(pool, "r.job_id = ? ORDER BY r.seq", job_id).await
}

pub(super) async fn run(pool: &SqlitePool, run_id: &str) -> Result<Option<RunRow>> {
    Ok(runs_where(pool, "r.id = ?", run_id).await?.pop())
}

pub(super) async fn agent_runs(pool: &SqlitePool, agent_id: &AgentId, limit: u32) -> Result<Vec<AgentRun>> {
    let rows: Vec<AgentRunDb> = sqlx::query_as(
        "SELECT r.job_id, r.id AS run_id, j.created_at, j.created_by, j.command, r.state, r.exit_code, r.signal, r.error, \
         r.started_at, r.finished_at FROM runs r JOIN jobs j ON j.id = r.job_id \
         WHERE r.agent_id = ? ORDER BY j.created_at DESC, r.job_id LIMIT ?",
    )
    .bind(agent_id.as_str())
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(AgentRun::try_from).collect()
}

pub(super) async fn run_output_heads(pool: &SqlitePool, job_id: &str, head: u64, total: u64) -> Result<HashMap<RunId, RunOutputText>> {
    use futures_util::TryStreamExt;
    // Rows come in order and are read as a stream, so a job with a great deal of output
    // costs this read no more than `total` bytes (plus one row).
    let mut rows = sqlx::query_as::<_, (RunId, i64, i64, String)>(
        "SELECT o.run_id, o.stream, o.offset, o.data FROM run_output o JOIN runs r ON r.id = o.run_id \
         WHERE r.job_id = ? AND o.offset < ? ORDER BY o.run_id, o.stream, o.offset",
    )
    .bind(job_id)
    .bind(to_i64(head))
    .fetch(pool);
    let mut heads = Heads::new(head, total);
    while let Some((run, stream, offset, data)) = rows.try_next().await? {
        heads.push(run, stream, offset, &data);
    }
    Ok(heads.finish())
}

pub(super) async fn run_output(
    pool: &SqlitePool,
    run_id: &str,
    stream: Stream,
    offset: u64,
    limit: u64,
) -> Result<Option<(RunRow, String)>> {
    let Some(run) = run(pool, run_id).await? else { return Ok(None) };
    let end = offset.saturating_add(limit);
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT offset, data FROM run_output WHERE run_id = ? AND stream = ? AND offset < ? \
         AND offset + length(CAST(data AS BLOB)) > ? ORDER BY offset",
    )
    .bind(run_id)
    .bind(stream_code(stream))
    .bind(to_i64(end))
    .bind(to_i64(offset))
    .fetch_all(pool)
    .await?;
    let pieces: Vec<(u64, &str)> = rows.iter().map(|(o, d)| (to_u64(*o), d.as_str())).collect();
    let held = match stream {
        Stream::Stdout => run.stdout_len,
        Stream::Stderr => run.stderr_len,
    };
    let text = rows::output_page(&pieces, offset, end, held);
    Ok(Some((run, text)))
}

pub(super) async fn pending_runs(pool: &SqlitePool, job_id: &str) -> Result<Vec<OpenRun>> {
    open_runs_where(pool, "job_id = ? AND state = 'pending' ORDER BY seq", &[job_id]).await
}

pub(super) async fn mark_dispatched(pool: &SqlitePool, run_ids: &[RunId], at: Timestamp) -> Result<Vec<RunId>> {
    update_runs(pool, run_ids, "state = 'pending'", |q| {
        q.push("state = 'dispatched', dispatched_at = ").push_bind(at.unix_millis());
    })
    .await
}

pub(super) async fn mark_job_dispatched(pool: &SqlitePool, job_id: &str, at: Timestamp) -> Result<Vec<RunId>> {
    let rows: Vec<(RunId,)> =
        sqlx::query_as("UPDATE runs SET state = 'dispatched', dispatched_at = ? WHERE job_id = ? AND state = 'pending' RETURNING id")
            .bind(at.unix_millis())
            .bind(job_id)
            .fetch_all(pool)
            .await?;
    let mut ids: Vec<RunId> = rows.into_iter().map(|(id,)| id).collect();
    ids.sort_unstable();
    Ok(ids)
}

pub(super) async fn end_runs(pool: &SqlitePool, run_ids: &[RunId], state: RunState, error: &str, at: Timestamp) -> Result<Vec<RunId>> {
    let guard = format!("state IN {OPEN}");
    update_runs(pool, run_ids, &guard, |q| {
        q.push("state = ").push_bind(state.as_str());
        q.push(", error = ").push_bind(error.to_owned());
        q.push(", finished_at = ").push_bind(at.unix_millis());
    })
    .await
}

pub(super) async fn redeliver(pool: &SqlitePool, run_ids: &[RunId]) -> Result<()> {
    update_runs(pool, run_ids, "state = 'dispatched' AND accepted = 0", |q| {
        q.push("state = 'pending', dispatched_at = NULL");
    })
    .await?;
    Ok(())
}

pub(super) async fn open_runs_for_agent(pool: &SqlitePool, agent_id: &AgentId) -> Result<Vec<OpenRun>> {
    let sql = format!("agent_id = ? AND state IN {OPEN} ORDER BY job_id, seq");
    open_runs_where(pool, &sql, &[agent_id.as_str()]).await
}

pub(super) async fn overdue_runs(pool: &SqlitePool, now: Timestamp, grace_ms: u64) -> Result<Vec<OpenRun>> {
    let rows: Vec<OpenRunDb> = sqlx::query_as(
        "SELECT r.id, r.job_id, r.agent_id, r.state, r.accepted FROM runs r JOIN jobs j ON j.id = r.job_id \
         WHERE r.state IN ('dispatched', 'running') AND j.finished_at IS NULL \
         AND COALESCE(r.started_at, r.dispatched_at) + j.timeout_ms + ? < ? ORDER BY r.job_id, r.seq",
    )
    .bind(to_i64(grace_ms))
    .bind(now.unix_millis())
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(OpenRun::try_from).collect()
}

pub(super) async fn finish_job_if_done(pool: &SqlitePool, job_id: &str, at: Timestamp) -> Result<bool> {
    let sql = format!(
        "UPDATE jobs SET finished_at = ? WHERE id = ? AND finished_at IS NULL \
         AND NOT EXISTS (SELECT 1 FROM runs WHERE job_id = ? AND state IN {OPEN})"
    );
    let done = sqlx::query(AssertSqlSafe(sql)).bind(at.unix_millis()).bind(job_id).bind(job_id).execute(pool).await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn approve_job(pool: &SqlitePool, job_id: &str, token: &str, by: &str, at: Timestamp) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET approved_by = ?, approved_at = ? WHERE id = ? AND approval_required = 1 AND approved_at IS NULL \
         AND cancelled_at IS NULL AND finished_at IS NULL AND creator_token IS NOT ?",
    )
    .bind(by)
    .bind(at.unix_millis())
    .bind(job_id)
    .bind(token)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn cancel_job(pool: &SqlitePool, job_id: &str, at: Timestamp) -> Result<Option<(Vec<OpenRun>, Vec<OpenRun>)>> {
    // One transaction: the runs read are the runs changed. A run already sent (dispatched,
    // accepted or not) is left to its agent, which is told to stop it and reports how it
    // ended; only a run never sent ends here.
    let mut tx = pool.begin().await?;
    // A finished job stays as it finished: nothing to cancel, nothing marked.
    let done = sqlx::query("UPDATE jobs SET cancelled_at = COALESCE(cancelled_at, ?) WHERE id = ? AND finished_at IS NULL")
        .bind(at.unix_millis())
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        let exists: Option<(i64,)> = sqlx::query_as("SELECT 1 FROM jobs WHERE id = ?").bind(job_id).fetch_optional(&mut *tx).await?;
        return Ok(exists.map(|_| (Vec::new(), Vec::new())));
    }
    let sql = format!("SELECT {OPEN_RUN_COLUMNS} FROM runs WHERE job_id = ? AND state IN {OPEN} ORDER BY seq");
    let rows: Vec<OpenRunDb> = sqlx::query_as(AssertSqlSafe(sql)).bind(job_id).fetch_all(&mut *tx).await?;
    let open = rows.into_iter().map(OpenRun::try_from).collect::<Result<Vec<_>>>()?;
    sqlx::query("UPDATE runs SET state = 'cancelled', error = 'cancelled before it started', finished_at = ? WHERE job_id = ? AND state = 'pending'")
        .bind(at.unix_millis())
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(open.into_iter().partition(|r| r.state == RunState::Pending)))
}

async fn runs_where(pool: &SqlitePool, sql_where: &'static str, bind: &str) -> Result<Vec<RunRow>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM runs r LEFT JOIN agents a ON a.id = r.agent_id WHERE {sql_where}");
    let rows: Vec<RunDb> = sqlx::query_as(AssertSqlSafe(sql)).bind(bind).fetch_all(pool).await?;
    rows.into_iter().map(RunRow::try_from).collect()
}

async fn open_runs_where(pool: &SqlitePool, sql_where: &str, binds: &[&str]) -> Result<Vec<OpenRun>> {
    let sql = format!("SELECT {OPEN_RUN_COLUMNS} FROM runs WHERE {sql_where}");
    let mut q = sqlx::query_as::<_, OpenRunDb>(AssertSqlSafe(sql));
    for b in binds {
        q = q.bind(b.to_string());
    }
    q.fetch_all(pool).await?.into_iter().map(OpenRun::try_from).collect()
}

/// Runs `UPDATE runs SET <set> WHERE <guard> AND id IN (...) RETURNING id` over chunks of
/// ids; `set` pushes the assignments and their binds. Returns the changed ids in order.
async fn update_runs<F>(pool: &SqlitePool, ids: &[RunId], guard: &str, set: F) -> Result<Vec<RunId>>
where
    F: Fn(&mut QueryBuilder<Sqlite>),
{
    let mut changed = Vec::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new("UPDATE runs SET ");
        set(&mut q);
        q.push(" WHERE ");
        q.push(guard);
        q.push(" AND id IN ");
        push_in_list(&mut q, chunk);
        q.push(" RETURNING id");
        let rows: Vec<(RunId,)> = q.build_query_as().fetch_all(pool).await?;
        changed.extend(rows.into_iter().map(|(id,)| id));
    }
    changed.sort_unstable();
    Ok(changed)
}
