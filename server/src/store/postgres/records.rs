//! The recorder's batch (`record`) on PostgreSQL: the [`Plan`] of the batch written kind by
//! kind with a few set-based statements in one transaction. The runs a batch's output and
//! results touch are locked (`FOR UPDATE`, in id order so two batches cannot deadlock on them)
//! before they are read: another node may be writing the same run (an agent that moved).

use shared::api::AgentStatus;
use shared::job::{JobId, RunId, RunState};
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::output::insert_outputs;
use crate::runs::{self};
use crate::store::batch::{Plan, Progress, SettleRow, stored_runs};
use crate::store::rows::{keys_json, labels_json, parse_agent_id, to_i64};
use crate::store::{Effect, Record, Result};

pub(super) async fn record(pool: &PgPool, batch: &[Record]) -> Result<Vec<Effect>> {
    let plan = Plan::new(batch);
    let mut tx = pool.begin().await?;
    let mut effects = Vec::new();
    write_connections(&mut tx, &plan).await?;
    write_transitions(&mut tx, &plan).await?;
    insert_heartbeats(&mut tx, &plan).await?;
    write_run_progress(&mut tx, &plan, &mut effects).await?;
    insert_outputs(&mut tx, &plan.outputs, &mut effects).await?;
    finish_runs(&mut tx, &plan, &mut effects).await?;
    tx.commit().await?;
    Ok(effects)
}

/// Connection columns: the last `Connected` of each agent, then a `Disconnected` that came
/// after it.
async fn write_connections(tx: &mut sqlx::Transaction<'_, Postgres>, plan: &Plan<'_>) -> Result<()> {
    update_from(
        tx,
        "UPDATE agents SET hostname = v.column2, labels = v.column3, heartbeat_interval_ms = v.column4, agent_version = v.column5, \
         connected = TRUE, node = v.column6, remote_addr = v.column7, connected_at = v.column8, disconnected_at = NULL, \
         trusted_keys = v.column9",
        "WHERE agents.id = v.column1",
        &plan.connections,
        |b, c| {
            b.push_bind(c.agent_id.as_str().to_owned())
                .push_bind(c.hostname.to_owned())
                .push_bind(labels_json(c.labels))
                .push_bind(to_i64(c.heartbeat_interval_ms))
                .push_bind(c.agent_version.to_owned())
                .push_bind(c.node.to_owned())
                .push_bind(c.remote_addr.to_owned())
                .push_bind(c.at)
                .push_bind(keys_json(c.trusted_keys));
        },
    )
    .await?;
    update_from(
        tx,
        "UPDATE agents SET connected = FALSE, disconnected_at = v.column2",
        "WHERE agents.id = v.column1",
        &plan.disconnections,
        |b, (id, at)| {
            b.push_bind(id.as_str().to_owned()).push_bind(*at);
        },
    )
    .await
}

/// Every transition is a row, in order; an agent's status is its last one.
async fn write_transitions(tx: &mut sqlx::Transaction<'_, Postgres>, plan: &Plan<'_>) -> Result<()> {
    for chunk in plan.transitions.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new("INSERT INTO agent_transitions (agent_id, at, from_status, to_status, reason) ");
        q.push_values(chunk, |mut b, t| {
            b.push_bind(t.agent_id.as_str().to_owned())
                .push_bind(t.at)
                .push_bind(t.from.map(AgentStatus::as_str))
                .push_bind(t.to.as_str())
                .push_bind(t.reason.to_owned());
        });
        q.build().execute(&mut **tx).await?;
    }
    update_from(
        tx,
        "UPDATE agents SET status = v.column2, status_since = v.column3",
        "WHERE agents.id = v.column1",
        &plan.statuses,
        |b, (id, at, to)| {
            b.push_bind(id.as_str().to_owned()).push_bind(to.as_str()).push_bind(*at);
        },
    )
    .await
}

/// `run_accepted` and `run_started`, guarded so a run only moves forward
/// ([`runs::takes_progress`]) and only for the agent that holds it.
async fn write_run_progress(tx: &mut sqlx::Transaction<'_, Postgres>, plan: &Plan<'_>, effects: &mut Vec<Effect>) -> Result<()> {
    let guard = runs::sql_states(runs::takes_progress);
    update_from(
        tx,
        "UPDATE runs SET accepted = TRUE, state = CASE WHEN runs.state = 'pending' THEN 'dispatched' ELSE runs.state END, \
         dispatched_at = COALESCE(runs.dispatched_at, v.column3)",
        &format!("WHERE runs.id = v.column2 AND runs.agent_id = v.column1 AND runs.state IN {guard}"),
        &plan.accepted,
        |b, p| {
            b.push_bind(p.agent_id.as_str().to_owned()).push_bind(p.run_id.to_string()).push_bind(p.at);
        },
    )
    .await?;
    for chunk in plan.started.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
            "UPDATE runs SET accepted = TRUE, state = 'running', started_at = COALESCE(runs.started_at, v.column3), \
             dispatched_at = COALESCE(runs.dispatched_at, v.column3) FROM (",
        );
        q.push_values(chunk, |mut b, p: &Progress<'_>| {
            b.push_bind(p.agent_id.as_str().to_owned()).push_bind(p.run_id.to_string()).push_bind(p.at);
        });
        q.push(format!(
            ") AS v WHERE runs.id = v.column2 AND runs.agent_id = v.column1 AND runs.state IN {guard} \
             RETURNING runs.id, runs.job_id, runs.agent_id"
        ));
        let rows: Vec<(RunId, JobId, String)> = q.build_query_as().fetch_all(&mut **tx).await?;
        for (run_id, job_id, agent_id) in rows {
            effects.push(Effect::RunState {
                job_id,
                run_id,
                agent_id: parse_agent_id(&agent_id)?,
                state: RunState::Running,
                exit_code: None,
                error: None,
                latency_ms: None,
            });
        }
    }
    Ok(())
}

/// Applies `run_finished` records as [`runs::settle`] decides: stores each result whose output
/// is all there, asks for what is missing, acks the rest.
async fn finish_runs(tx: &mut sqlx::Transaction<'_, Postgres>, plan: &Plan<'_>, effects: &mut Vec<Effect>) -> Result<()> {
    if plan.finished.is_empty() {
        return Ok(());
    }
    // Locked in id order to commit: another node may be settling the same run (an agent that
    // moved), and two batches locking in one order cannot deadlock on each other.
    let ids: Vec<&str> = plan.finished_ids();
    let rows: Vec<SettleRow> = sqlx::query_as(
        "SELECT r.id, r.job_id, r.agent_id, r.state, j.output_limit, r.dispatched_at, \
         r.stdout_held, r.stdout_truncated, r.stderr_held, r.stderr_truncated FROM runs r JOIN jobs j ON j.id = r.job_id \
         WHERE r.id = ANY($1) ORDER BY r.id FOR UPDATE OF r",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    let known = stored_runs(rows)?;
    let (settled, updates) = plan.settle(&known);
    effects.extend(settled);
    update_from(
        tx,
        "UPDATE runs SET state = v.column2, exit_code = v.column3, signal = v.column4, error = v.column5, finished_at = v.column6, \
         stdout_len = v.column7, stderr_len = v.column8, stdout_truncated = v.column9, stderr_truncated = v.column10, accepted = TRUE, \
         started_at = COALESCE(runs.started_at, v.column11), dispatched_at = COALESCE(runs.dispatched_at, v.column11)",
        "WHERE runs.id = v.column1",
        &updates,
        |b, u| {
            let (f, r) = (u.finished, &u.result);
            b.push_bind(f.run_id.clone())
                .push_bind(r.state.as_str())
                .push_bind(f.exit_code)
                .push_bind(f.signal)
                .push_bind(u.error.clone())
                .push_bind(u.at)
                .push_bind(to_i64(r.stdout_len))
                .push_bind(to_i64(r.stderr_len))
                .push_bind(r.stdout_truncated)
                .push_bind(r.stderr_truncated)
                .push_bind(u.started_at);
        },
    )
    .await
}

/// Appends heartbeat history and updates each agent's latest metrics, with a few multi-row
/// statements however large the batch.
async fn insert_heartbeats(tx: &mut sqlx::Transaction<'_, Postgres>, plan: &Plan<'_>) -> Result<()> {
    for chunk in plan.heartbeats.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO heartbeats (agent_id, at, seq, cpu_percent, load1, mem_used, mem_total, disk_used, disk_total, process_count) ",
        );
        q.push_values(chunk, |mut b, h| {
            let (disk_used, disk_total) = h.metrics.disk_totals();
            b.push_bind(h.agent_id.as_str().to_owned())
                .push_bind(h.at)
                .push_bind(to_i64(h.seq))
                .push_bind(h.metrics.cpu_percent)
                .push_bind(h.metrics.load_avg[0])
                .push_bind(to_i64(h.metrics.mem_used_bytes))
                .push_bind(to_i64(h.metrics.mem_total_bytes))
                .push_bind(to_i64(disk_used))
                .push_bind(to_i64(disk_total))
                .push_bind(to_i64(h.metrics.process_count));
        });
        q.build().execute(&mut **tx).await?;
    }
    for chunk in plan.latest.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new("UPDATE agents SET last_heartbeat_at = v.column2, last_metrics = v.column3, hostname = v.column4 FROM (");
        q.push_values(chunk, |mut b, &i| {
            let h = &plan.heartbeats[i];
            b.push_bind(h.agent_id.as_str().to_owned())
                .push_bind(h.at)
                .push_bind(serde_json::to_string(h.metrics).unwrap_or_default())
                .push_bind(h.metrics.hostname.clone());
        });
        q.push(") AS v WHERE agents.id = v.column1");
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Rows per multi-row statement: 11 columns each stays far below PostgreSQL's 65,535 binds.
pub(super) const ROWS_PER_STATEMENT: usize = 1000;

/// Builds `(VALUES (..), (..))` rows for an `UPDATE ... FROM` and runs it over chunks. The
/// values' columns are `column1`, `column2`... as PostgreSQL names them; sqlx types each bind.
pub(super) async fn update_from<T, F>(tx: &mut sqlx::Transaction<'_, Postgres>, head: &str, tail: &str, rows: &[T], push: F) -> Result<()>
where
    F: Fn(&mut sqlx::query_builder::Separated<'_, Postgres, &'static str>, &T),
{
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(head);
        q.push(" FROM (");
        q.push_values(chunk, |mut b, row| push(&mut b, row));
        q.push(") AS v ");
        q.push(tail);
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}
