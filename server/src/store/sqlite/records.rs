//! The recorder's batch (`record`): connections, transitions, heartbeats, run progress,
//! output and results, each kind written with a few set-based statements in one transaction.

use std::collections::HashMap;

use shared::AgentId;
use shared::api::AgentStatus;
use shared::job::{RunId, RunState};
use shared::protocol::{Metrics, RunFinished};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

use super::output::insert_outputs;
use super::{ROWS_PER_STATEMENT, labels_json, parse_agent_id, parse_run_state, push_in_list, to_i64, to_u64, trust, update_from};
use crate::output::Held;
use crate::runs::{self, Forget, Settlement};
use crate::store::{Effect, Record, Result};

pub(super) async fn record(pool: &SqlitePool, batch: &[Record]) -> Result<Vec<Effect>> {
    let mut tx = pool.begin().await?;
    let mut effects = Vec::new();
    // Each kind of record is written with a few set-based statements, however large the
    // batch. Kinds touch different columns, and within a kind the last record of an agent
    // (or run) wins, so the result is the same as applying the records one by one in order.
    write_connections(&mut tx, batch).await?;
    write_transitions(&mut tx, batch).await?;
    let heartbeats: Vec<&Record> = batch.iter().filter(|r| matches!(r, Record::Heartbeat { .. })).collect();
    insert_heartbeats(&mut tx, &heartbeats).await?;
    write_run_progress(&mut tx, batch, &mut effects).await?;
    let outputs: Vec<&Record> = batch.iter().filter(|r| matches!(r, Record::RunOutput { .. })).collect();
    insert_outputs(&mut tx, &outputs, &mut effects).await?;
    finish_runs(&mut tx, batch, &mut effects).await?;
    tx.commit().await?;
    Ok(effects)
}

/// Connection columns: the last `Connected` of each agent, then a `Disconnected` that came
/// after it.
async fn write_connections(tx: &mut sqlx::Transaction<'_, Sqlite>, batch: &[Record]) -> Result<()> {
    let mut last_connected: HashMap<&str, &Record> = HashMap::new();
    let mut last_event: HashMap<&str, &Record> = HashMap::new();
    for r in batch {
        match r {
            Record::Connected { agent_id, .. } => {
                last_connected.insert(agent_id.as_str(), r);
                last_event.insert(agent_id.as_str(), r);
            }
            Record::Disconnected { agent_id, .. } => {
                last_event.insert(agent_id.as_str(), r);
            }
            _ => {}
        }
    }
    let connected: Vec<&Record> = last_connected.into_values().collect();
    update_from(
        tx,
        "UPDATE agents SET hostname = v.column2, labels = v.column3, heartbeat_interval_ms = v.column4, agent_version = v.column5, \
         connected = 1, node = v.column6, remote_addr = v.column7, connected_at = v.column8, disconnected_at = NULL, \
         trusted_keys = v.column9",
        "WHERE agents.id = v.column1",
        &connected,
        |b, r| {
            if let Record::Connected {
                agent_id,
                at,
                hostname,
                labels,
                heartbeat_interval_ms,
                agent_version,
                node,
                remote_addr,
                trusted_keys,
            } = *r
            {
                b.push_bind(agent_id.as_str().to_owned())
                    .push_bind(hostname.clone())
                    .push_bind(labels_json(labels))
                    .push_bind(to_i64(*heartbeat_interval_ms))
                    .push_bind(agent_version.clone())
                    .push_bind(node.clone())
                    .push_bind(remote_addr.clone())
                    .push_bind(at.unix_millis())
                    .push_bind(trust::keys_json(trusted_keys));
            }
        },
    )
    .await?;
    let disconnected: Vec<(&str, i64)> = last_event
        .into_iter()
        .filter_map(|(id, r)| match r {
            Record::Disconnected { at, .. } => Some((id, at.unix_millis())),
            _ => None,
        })
        .collect();
    update_from(
        tx,
        "UPDATE agents SET connected = 0, disconnected_at = v.column2",
        "WHERE agents.id = v.column1",
        &disconnected,
        |b, (id, at)| {
            b.push_bind(id.to_string()).push_bind(*at);
        },
    )
    .await
}

/// Every transition is a row, in order; an agent's status is its last one.
async fn write_transitions(tx: &mut sqlx::Transaction<'_, Sqlite>, batch: &[Record]) -> Result<()> {
    let all: Vec<(&AgentId, i64, Option<AgentStatus>, AgentStatus, &str)> = batch
        .iter()
        .filter_map(|r| match r {
            Record::Transition { agent_id, at, from, to, reason } => Some((agent_id, at.unix_millis(), *from, *to, reason.as_str())),
            _ => None,
        })
        .collect();
    for chunk in all.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO agent_transitions (agent_id, at, from_status, to_status, reason) ");
        q.push_values(chunk, |mut b, (id, at, from, to, reason)| {
            b.push_bind(id.as_str().to_owned())
                .push_bind(*at)
                .push_bind(from.map(AgentStatus::as_str))
                .push_bind(to.as_str())
                .push_bind(reason.to_string());
        });
        q.build().execute(&mut **tx).await?;
    }
    let mut last: HashMap<&str, (i64, AgentStatus)> = HashMap::new();
    for (id, at, _, to, _) in &all {
        last.insert(id.as_str(), (*at, *to));
    }
    let last: Vec<(&str, (i64, AgentStatus))> = last.into_iter().collect();
    update_from(
        tx,
        "UPDATE agents SET status = v.column2, status_since = v.column3",
        "WHERE agents.id = v.column1",
        &last,
        |b, (id, (at, to))| {
            b.push_bind(id.to_string()).push_bind(to.as_str()).push_bind(*at);
        },
    )
    .await
}

/// `run_accepted` and `run_started`, guarded so a run only moves forward and only for the
/// agent that holds it.
async fn write_run_progress(tx: &mut sqlx::Transaction<'_, Sqlite>, batch: &[Record], effects: &mut Vec<Effect>) -> Result<()> {
    let accepted: Vec<(&AgentId, &RunId, i64)> = batch
        .iter()
        .filter_map(|r| match r {
            Record::RunAccepted { agent_id, run_id, at } => Some((agent_id, run_id, at.unix_millis())),
            _ => None,
        })
        .collect();
    update_from(
        tx,
        "UPDATE runs SET accepted = 1, state = CASE WHEN runs.state = 'pending' THEN 'dispatched' ELSE runs.state END, \
         dispatched_at = COALESCE(runs.dispatched_at, v.column3)",
        &format!("WHERE runs.id = v.column2 AND runs.agent_id = v.column1 AND runs.state IN {}", runs::sql_states(runs::takes_progress)),
        &accepted,
        |b, (agent, run, at)| {
            b.push_bind(agent.as_str().to_owned()).push_bind(run.to_string()).push_bind(*at);
        },
    )
    .await?;
    // A run that also finishes in this batch gets its start written with the result.
    let finishing: std::collections::HashSet<&str> = batch
        .iter()
        .filter_map(|r| match r {
            Record::RunFinished { finished, .. } => Some(finished.run_id.as_str()),
            _ => None,
        })
        .collect();
    let started: Vec<(&AgentId, &RunId, i64)> = batch
        .iter()
        .filter_map(|r| match r {
            Record::RunStarted { agent_id, run_id, at } if !finishing.contains(run_id.as_str()) => {
                Some((agent_id, run_id, at.unix_millis()))
            }
            _ => None,
        })
        .collect();
    for chunk in started.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "UPDATE runs SET accepted = 1, state = 'running', started_at = COALESCE(runs.started_at, v.column3), \
             dispatched_at = COALESCE(runs.dispatched_at, v.column3) FROM (",
        );
        q.push_values(chunk, |mut b, (agent, run, at)| {
            b.push_bind(agent.as_str().to_owned()).push_bind(run.to_string()).push_bind(*at);
        });
        q.push(format!(
            ") AS v WHERE runs.id = v.column2 AND runs.agent_id = v.column1 AND runs.state IN {} \
             RETURNING runs.id, runs.job_id, runs.agent_id",
            runs::sql_states(runs::takes_progress)
        ));
        let rows: Vec<(String, String, String)> = q.build_query_as().fetch_all(&mut **tx).await?;
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

/// Applies `run_finished` records: stores each result whose output is all there (or asks for
/// what is missing). A result replaces `lost` and `cancelled`: what actually happened wins.
async fn finish_runs(tx: &mut sqlx::Transaction<'_, Sqlite>, batch: &[Record], effects: &mut Vec<Effect>) -> Result<()> {
    let finished: Vec<(&AgentId, &RunFinished, i64)> = batch
        .iter()
        .filter_map(|r| match r {
            Record::RunFinished { agent_id, finished, at } => Some((agent_id, finished.as_ref(), at.unix_millis())),
            _ => None,
        })
        .collect();
    if finished.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = finished.iter().map(|(_, f, _)| f.run_id.as_str()).collect();
    let mut known: HashMap<String, (String, runs::StoredRun)> = HashMap::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT r.id, r.job_id, r.agent_id, r.state, j.output_limit, r.dispatched_at, \
             r.stdout_held, r.stdout_truncated, r.stderr_held, r.stderr_truncated FROM runs r JOIN jobs j ON j.id = r.job_id WHERE r.id IN ",
        );
        push_in_list(&mut q, chunk);
        type Row = (String, String, String, String, i64, Option<i64>, i64, bool, i64, bool);
        let rows: Vec<Row> = q.build_query_as().fetch_all(&mut **tx).await?;
        for (id, job, agent, state, limit, dispatched_at, out_len, out_t, err_len, err_t) in rows {
            let run = runs::StoredRun {
                agent_id: parse_agent_id(&agent)?,
                state: parse_run_state(&state)?,
                output_limit: to_u64(limit),
                dispatched_at,
                held: [Held { len: to_u64(out_len), truncated: out_t }, Held { len: to_u64(err_len), truncated: err_t }],
            };
            known.insert(id, (job, run));
        }
    }
    let started_at: HashMap<&str, i64> = batch
        .iter()
        .filter_map(|r| match r {
            Record::RunStarted { run_id, at, .. } => Some((run_id.as_str(), at.unix_millis())),
            _ => None,
        })
        .collect();
    let mut updates = Vec::new();
    for (agent_id, f, at) in finished {
        let ack = Effect::Ack { agent_id: agent_id.clone(), run_id: f.run_id.clone() };
        let stored = known.get(&f.run_id);
        match runs::settle(stored.map(|(_, run)| run), agent_id, f, at) {
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
                let job_id = stored.map(|(job, _)| job.clone()).unwrap_or_default();
                effects.push(Effect::RunState {
                    job_id,
                    run_id: f.run_id.clone(),
                    agent_id: agent_id.clone(),
                    state: result.state,
                    exit_code: f.exit_code,
                    error: f.error.clone(),
                    latency_ms: result.latency_ms,
                });
                effects.push(ack);
                updates.push((f, result, at, started_at.get(f.run_id.as_str()).copied()));
            }
        }
    }
    update_from(
        tx,
        "UPDATE runs SET state = v.column2, exit_code = v.column3, signal = v.column4, error = v.column5, finished_at = v.column6, \
         stdout_len = v.column7, stderr_len = v.column8, stdout_truncated = v.column9, stderr_truncated = v.column10, accepted = 1, \
         started_at = COALESCE(runs.started_at, v.column11), dispatched_at = COALESCE(runs.dispatched_at, v.column11)",
        "WHERE runs.id = v.column1",
        &updates,
        |b, (f, r, at, started)| {
            b.push_bind(f.run_id.clone())
                .push_bind(r.state.as_str())
                .push_bind(f.exit_code)
                .push_bind(f.signal)
                .push_bind(f.error.clone())
                .push_bind(*at)
                .push_bind(to_i64(r.stdout_len))
                .push_bind(to_i64(r.stderr_len))
                .push_bind(r.stdout_truncated)
                .push_bind(r.stderr_truncated)
                .push_bind(*started);
        },
    )
    .await
}

/// Appends heartbeat history and updates each agent's latest metrics, with a few multi-row
/// statements however large the batch.
async fn insert_heartbeats(tx: &mut sqlx::Transaction<'_, Sqlite>, records: &[&Record]) -> Result<()> {
    struct Row<'a> {
        agent_id: &'a str,
        at: i64,
        seq: i64,
        metrics: &'a Metrics,
    }
    let rows: Vec<Row<'_>> = records
        .iter()
        .filter_map(|r| match r {
            Record::Heartbeat { agent_id, at, seq, metrics } => {
                Some(Row { agent_id: agent_id.as_str(), at: at.unix_millis(), seq: to_i64(*seq), metrics })
            }
            _ => None,
        })
        .collect();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO heartbeats (agent_id, at, seq, cpu_percent, load1, mem_used, mem_total, disk_used, disk_total, process_count) ",
        );
        q.push_values(chunk, |mut b, r| {
            let (disk_used, disk_total) = r.metrics.disk_totals();
            b.push_bind(r.agent_id.to_owned())
                .push_bind(r.at)
                .push_bind(r.seq)
                .push_bind(r.metrics.cpu_percent)
                .push_bind(r.metrics.load_avg[0])
                .push_bind(to_i64(r.metrics.mem_used_bytes))
                .push_bind(to_i64(r.metrics.mem_total_bytes))
                .push_bind(to_i64(disk_used))
                .push_bind(to_i64(disk_total))
                .push_bind(to_i64(r.metrics.process_count));
        });
        q.build().execute(&mut **tx).await?;
    }

    // Only the newest heartbeat of each agent in the batch sets its latest metrics.
    let mut latest: HashMap<&str, &Row<'_>> = HashMap::with_capacity(rows.len());
    for r in &rows {
        latest
            .entry(r.agent_id)
            .and_modify(|cur| {
                if r.at >= cur.at {
                    *cur = r
                }
            })
            .or_insert(r);
    }
    let latest: Vec<&Row<'_>> = latest.into_values().collect();
    for chunk in latest.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> =
            QueryBuilder::new("UPDATE agents SET last_heartbeat_at = v.column2, last_metrics = v.column3, hostname = v.column4 FROM (");
        q.push_values(chunk, |mut b, r| {
            b.push_bind(r.agent_id.to_owned())
                .push_bind(r.at)
                .push_bind(serde_json::to_string(r.metrics).unwrap_or_default())
                .push_bind(r.metrics.hostname.clone());
        });
        q.push(") AS v WHERE agents.id = v.column1");
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}
