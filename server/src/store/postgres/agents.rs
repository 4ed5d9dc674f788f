//! Agent rows: reading and listing them, dispatch targets, status transitions, heartbeat
//! history, fleet counts, and marking a node's agents offline.

use shared::api::{AgentStatus, FleetCounts, HeartbeatSample, Transition};
use shared::{AgentId, Timestamp};
use sqlx::{AssertSqlSafe, PgPool};

use crate::store::rows::{self, AGENT_COLUMNS, AgentDb, CredentialDb, HeartbeatDb, TransitionDb, parse_agent_id, parse_labels};
use crate::store::{AgentCredentialRow, AgentRow, AgentTarget, Result};

pub(super) async fn agent_credential(pool: &PgPool, id: &AgentId) -> Result<Option<AgentCredentialRow>> {
    let row: Option<CredentialDb> = sqlx::query_as(
        "SELECT secret_hash, pending_secret_hash, revoked_at, token_labels, rotation_requested_at, approval_pending \
         FROM agents WHERE id = $1",
    )
    .bind(id.as_str())
    .fetch_optional(pool)
    .await?;
    row.map(|r| r.into_row(id)).transpose()
}

pub(super) async fn agent(pool: &PgPool, id: &AgentId) -> Result<Option<AgentRow>> {
    let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1");
    let row: Option<AgentDb> = sqlx::query_as(AssertSqlSafe(sql)).bind(id.as_str()).fetch_optional(pool).await?;
    row.map(AgentRow::try_from).transpose()
}

pub(super) async fn list_agents(pool: &PgPool, status: Option<AgentStatus>) -> Result<Vec<AgentRow>> {
    let rows: Vec<AgentDb> = match status {
        Some(s) => {
            let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE status = $1 ORDER BY hostname, id");
            sqlx::query_as(AssertSqlSafe(sql)).bind(s.as_str()).fetch_all(pool).await
        }
        None => {
            let sql = format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY hostname, id");
            sqlx::query_as(AssertSqlSafe(sql)).fetch_all(pool).await
        }
    }?;
    rows.into_iter().map(AgentRow::try_from).collect()
}

pub(super) async fn agent_targets(pool: &PgPool) -> Result<Vec<AgentTarget>> {
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

pub(super) async fn transitions(pool: &PgPool, id: &AgentId, limit: u32) -> Result<Vec<Transition>> {
    let rows: Vec<TransitionDb> =
        sqlx::query_as("SELECT at, from_status, to_status, reason FROM agent_transitions WHERE agent_id = $1 ORDER BY id DESC LIMIT $2")
            .bind(id.as_str())
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
    rows.into_iter().map(Transition::try_from).collect()
}

pub(super) async fn heartbeats(
    pool: &PgPool,
    id: &AgentId,
    since: Timestamp,
    step: Option<std::time::Duration>,
    limit: u32,
) -> Result<Vec<HeartbeatSample>> {
    let rows: Vec<HeartbeatDb> = match step {
        None => {
            sqlx::query_as(
                "SELECT at, seq, cpu_percent, load1, mem_used, mem_total, disk_used, disk_total, process_count \
                 FROM heartbeats WHERE agent_id = $1 AND at >= $2 ORDER BY at, seq LIMIT $3",
            )
            .bind(id.as_str())
            .bind(since.unix_millis())
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        }
        Some(step) => {
            // BIGINT division truncates toward zero, as SQLite's integer division does.
            let ms = i64::try_from(step.as_millis()).unwrap_or(i64::MAX).max(1);
            sqlx::query_as(
                "SELECT b * $1 AS at, MAX(seq) AS seq, MAX(cpu_percent) AS cpu_percent, MAX(load1) AS load1, \
                 MAX(mem_used) AS mem_used, MAX(mem_total) AS mem_total, MAX(disk_used) AS disk_used, \
                 MAX(disk_total) AS disk_total, MAX(process_count) AS process_count \
                 FROM (SELECT at / $1 AS b, * FROM heartbeats WHERE agent_id = $2 AND at >= $3) AS h GROUP BY b ORDER BY b LIMIT $4",
            )
            .bind(ms)
            .bind(id.as_str())
            .bind(since.unix_millis())
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        }
    };
    Ok(rows.into_iter().map(HeartbeatSample::from).collect())
}

pub(super) async fn fleet_counts(pool: &PgPool) -> Result<FleetCounts> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM agents WHERE revoked_at IS NULL GROUP BY status").fetch_all(pool).await?;
    rows::fleet_counts(rows)
}

pub(super) async fn mark_node_offline(pool: &PgPool, node: &str, at: Timestamp, reason: &str) -> Result<u64> {
    let mut tx = pool.begin().await?;
    // Concurrency: the node's agents are locked first (in id order, so two callers cannot
    // deadlock), and the transitions and the update touch only those rows. Without the lock,
    // an agent that reconnected through another server between the two statements would get
    // a transition to offline written for it, and then not be marked offline (its node moved).
    // FOR UPDATE reads each row as it is once a concurrent writer commits.
    let ids: Vec<(String,)> =
        sqlx::query_as("SELECT id FROM agents WHERE node = $1 AND (status != 'offline' OR connected) ORDER BY id FOR UPDATE")
            .bind(node)
            .fetch_all(&mut *tx)
            .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let ids: Vec<String> = ids.into_iter().map(|(id,)| id).collect();
    sqlx::query(
        "INSERT INTO agent_transitions (agent_id, at, from_status, to_status, reason) \
         SELECT id, $1, status, 'offline', $2 FROM agents WHERE id = ANY($3) AND status != 'offline' ORDER BY id",
    )
    .bind(at.unix_millis())
    .bind(reason)
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    let done = sqlx::query(
        "UPDATE agents SET status = 'offline', status_since = CASE WHEN status = 'offline' THEN status_since ELSE $1 END, \
         connected = FALSE, disconnected_at = COALESCE(disconnected_at, $1) WHERE id = ANY($2)",
    )
    .bind(at.unix_millis())
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

pub(super) async fn prune_heartbeats(pool: &PgPool, before: Timestamp, max_rows: u32) -> Result<u64> {
    // Heartbeats have no key (SQLite's rowid picks them there); the row's ctid does here, read
    // in one statement with the delete. Two pruners at once may pick the same rows: the
    // second deletes what is left of them and counts only that.
    let done =
        sqlx::query("DELETE FROM heartbeats WHERE ctid = ANY(ARRAY(SELECT ctid FROM heartbeats WHERE at < $1 ORDER BY at LIMIT $2))")
            .bind(before.unix_millis())
            .bind(i64::from(max_rows))
            .execute(pool)
            .await?;
    Ok(done.rows_affected())
}
