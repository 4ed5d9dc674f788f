//! Agent rows: reading and listing them, dispatch targets, status transitions, heartbeat
//! history, fleet counts, and marking a node's agents offline.

use shared::api::{AgentStatus, FleetCounts, HeartbeatSample, Transition};
use shared::{AgentId, Timestamp};
use sqlx::{AssertSqlSafe, SqlitePool};

use crate::store::rows::{self, AGENT_COLUMNS, AgentDb, CredentialDb, HeartbeatDb, TransitionDb, parse_agent_id, parse_labels};
use crate::store::{AgentCredentialRow, AgentRow, AgentTarget, Result};

pub(super) async fn agent_credential(pool: &SqlitePool, id: &AgentId) -> Result<Option<AgentCredentialRow>> {
    let row: Option<CredentialDb> = sqlx::query_as(
        "SELECT secret_hash, pending_secret_hash, revoked_at, token_labels, rotation_requested_at, approval_pending \
         FROM agents WHERE id = ?",
    )
    .bind(id.as_str())
    .fetch_optional(pool)
    .await?;
    row.map(|r| r.into_row(id)).transpose()
}

pub(super) async fn agent(pool: &SqlitePool, id: &AgentId) -> Result<Option<AgentRow>> {
    let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?");
    let row: Option<AgentDb> = sqlx::query_as(AssertSqlSafe(sql)).bind(id.as_str()).fetch_optional(pool).await?;
    row.map(AgentRow::try_from).transpose()
}

pub(super) async fn list_agents(pool: &SqlitePool, status: Option<AgentStatus>) -> Result<Vec<AgentRow>> {
    let rows: Vec<AgentDb> = match status {
        Some(s) => {
            let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE status = ? ORDER BY hostname, id");
            sqlx::query_as(AssertSqlSafe(sql)).bind(s.as_str()).fetch_all(pool).await
        }
        None => {
            let sql = format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY hostname, id");
            sqlx::query_as(AssertSqlSafe(sql)).fetch_all(pool).await
        }
    }?;
    rows.into_iter().map(AgentRow::try_from).collect()
}

pub(super) async fn agent_targets(pool: &SqlitePool) -> Result<Vec<AgentTarget>> {
    let rows: Vec<(String, String, String, bool)> =
        sqlx::query_as("SELECT id, hostname, labels, approval_pending FROM agents WHERE revoked_at IS NULL ORDER BY hostname, id")
            .fetch_all(pool)
            .await?;
    rows.into_iter()
        .map(|(id, hostname, labels, approval_pending)| {
            Ok(AgentTarget { id: parse_agent_id(&id)?, hostname, labels: parse_labels(&labels)?, approval_pending })
        })
        .collect()
}

pub(super) async fn transitions(pool: &SqlitePool, id: &AgentId, limit: u32) -> Result<Vec<Transition>> {
    let rows: Vec<TransitionDb> =
        sqlx::query_as("SELECT at, from_status, to_status, reason FROM agent_transitions WHERE agent_id = ? ORDER BY id DESC LIMIT ?")
            .bind(id.as_str())
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
    rows.into_iter().map(Transition::try_from).collect()
}

pub(super) async fn heartbeats(
    pool: &SqlitePool,
    id: &AgentId,
    since: Timestamp,
    step: Option<std::time::Duration>,
    limit: u32,
) -> Result<Vec<HeartbeatSample>> {
    let query = match step {
        None => sqlx::query_as(
            "SELECT at, seq, cpu_percent, load1, mem_used, mem_total, disk_used, disk_total, process_count \
             FROM heartbeats WHERE agent_id = ? AND at >= ? ORDER BY at, seq LIMIT ?",
        ),
        Some(step) => {
            let ms = i64::try_from(step.as_millis()).unwrap_or(i64::MAX).max(1);
            sqlx::query_as(
                "SELECT b * ? AS at, MAX(seq) AS seq, MAX(cpu_percent) AS cpu_percent, MAX(load1) AS load1, \
                 MAX(mem_used) AS mem_used, MAX(mem_total) AS mem_total, MAX(disk_used) AS disk_used, \
                 MAX(disk_total) AS disk_total, MAX(process_count) AS process_count \
                 FROM (SELECT at / ? AS b, * FROM heartbeats WHERE agent_id = ? AND at >= ?) GROUP BY b ORDER BY b LIMIT ?",
            )
            .bind(ms)
            .bind(ms)
        }
    };
    let rows: Vec<HeartbeatDb> = query.bind(id.as_str()).bind(since.unix_millis()).bind(i64::from(limit)).fetch_all(pool).await?;
    Ok(rows.into_iter().map(HeartbeatSample::from).collect())
}

pub(super) async fn fleet_counts(pool: &SqlitePool) -> Result<FleetCounts> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM agents WHERE revoked_at IS NULL GROUP BY status").fetch_all(pool).await?;
    rows::fleet_counts(rows)
}

pub(super) async fn mark_node_offline(pool: &SqlitePool, node: &str, at: Timestamp, reason: &str) -> Result<u64> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO agent_transitions (agent_id, at, from_status, to_status, reason) \
         SELECT id, ?, status, 'offline', ? FROM agents WHERE node = ? AND status != 'offline'",
    )
    .bind(at.unix_millis())
    .bind(reason)
    .bind(node)
    .execute(&mut *tx)
    .await?;
    let done = sqlx::query(
        "UPDATE agents SET status = 'offline', status_since = CASE WHEN status = 'offline' THEN status_since ELSE ? END, \
         connected = 0, disconnected_at = COALESCE(disconnected_at, ?) \
         WHERE node = ? AND (status != 'offline' OR connected = 1)",
    )
    .bind(at.unix_millis())
    .bind(at.unix_millis())
    .bind(node)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

pub(super) async fn prune_heartbeats(pool: &SqlitePool, before: Timestamp, max_rows: u32) -> Result<u64> {
    let done = sqlx::query("DELETE FROM heartbeats WHERE rowid IN (SELECT rowid FROM heartbeats WHERE at < ? ORDER BY at LIMIT ?)")
        .bind(before.unix_millis())
        .bind(i64::from(max_rows))
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}
