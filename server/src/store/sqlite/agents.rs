//! Agent rows: reading and listing them, dispatch targets, status transitions, heartbeat
//! history, fleet counts, and marking a node's agents offline.

use shared::api::{AgentStatus, FleetCounts, HeartbeatSample, Transition};
use shared::protocol::Metrics;
use shared::{AgentId, Timestamp};
use sqlx::{AssertSqlSafe, FromRow, SqlitePool};

use super::{parse_agent_id, parse_labels, parse_status, to_u64, trust, ts};
use crate::store::{AgentCredentialRow, AgentRow, AgentTarget, Result, StoreError};

#[derive(FromRow)]
struct AgentDb {
    id: String,
    hostname: String,
    labels: String,
    status: String,
    status_since: i64,
    enrolled_at: i64,
    revoked_at: Option<i64>,
    heartbeat_interval_ms: Option<i64>,
    agent_version: Option<String>,
    last_heartbeat_at: Option<i64>,
    last_metrics: Option<String>,
    connected: bool,
    node: Option<String>,
    remote_addr: Option<String>,
    connected_at: Option<i64>,
    disconnected_at: Option<i64>,
    approval_pending: bool,
    credential_issued_at: Option<i64>,
    rotation_requested_at: Option<i64>,
    clone_seen_at: Option<i64>,
    clone_seen_from: Option<String>,
    trusted_keys: String,
}

const AGENT_COLUMNS: &str = "id, hostname, labels, status, status_since, enrolled_at, revoked_at, heartbeat_interval_ms, \
     agent_version, last_heartbeat_at, last_metrics, connected, node, remote_addr, connected_at, disconnected_at, \
     approval_pending, credential_issued_at, rotation_requested_at, clone_seen_at, clone_seen_from, trusted_keys";

impl TryFrom<AgentDb> for AgentRow {
    type Error = StoreError;
    fn try_from(r: AgentDb) -> Result<Self> {
        let last_metrics = match r.last_metrics {
            Some(m) => Some(serde_json::from_str::<Metrics>(&m).map_err(|e| StoreError::Corrupt(format!("metrics: {e}")))?),
            None => None,
        };
        Ok(AgentRow {
            id: parse_agent_id(&r.id)?,
            hostname: r.hostname,
            labels: parse_labels(&r.labels)?,
            status: parse_status(&r.status)?,
            status_since: ts(r.status_since),
            enrolled_at: ts(r.enrolled_at),
            revoked_at: r.revoked_at.map(ts),
            heartbeat_interval_ms: r.heartbeat_interval_ms.map(to_u64),
            agent_version: r.agent_version,
            last_heartbeat_at: r.last_heartbeat_at.map(ts),
            last_metrics,
            connected: r.connected,
            node: r.node,
            remote_addr: r.remote_addr,
            connected_at: r.connected_at.map(ts),
            disconnected_at: r.disconnected_at.map(ts),
            approval_pending: r.approval_pending,
            credential_issued_at: ts(r.credential_issued_at.unwrap_or(r.enrolled_at)),
            rotation_requested_at: r.rotation_requested_at.map(ts),
            clone_seen: r.clone_seen_at.map(ts).zip(r.clone_seen_from),
            trusted_keys: trust::parse_keys(&r.trusted_keys)?,
        })
    }
}

#[derive(FromRow)]
struct TransitionDb {
    at: i64,
    from_status: Option<String>,
    to_status: String,
    reason: String,
}

#[derive(FromRow)]
struct HeartbeatDb {
    at: i64,
    seq: i64,
    cpu_percent: f64,
    load1: f64,
    mem_used: i64,
    mem_total: i64,
    disk_used: i64,
    disk_total: i64,
    process_count: i64,
}

pub(super) async fn agent_credential(pool: &SqlitePool, id: &AgentId) -> Result<Option<AgentCredentialRow>> {
    type Row = (Vec<u8>, Option<Vec<u8>>, Option<i64>, String, Option<i64>, bool);
    let row: Option<Row> = sqlx::query_as(
        "SELECT secret_hash, pending_secret_hash, revoked_at, token_labels, rotation_requested_at, approval_pending \
         FROM agents WHERE id = ?",
    )
    .bind(id.as_str())
    .fetch_optional(pool)
    .await?;
    row.map(|(secret_hash, pending_secret_hash, revoked_at, token_labels, rotation_requested_at, approval_pending)| {
        Ok(AgentCredentialRow {
            id: id.clone(),
            secret_hash,
            pending_secret_hash,
            revoked: revoked_at.is_some(),
            token_labels: parse_labels(&token_labels)?,
            rotation_requested: rotation_requested_at.is_some(),
            approval_pending,
        })
    })
    .transpose()
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
    rows.into_iter()
        .map(|r| {
            Ok(Transition {
                at: ts(r.at),
                from: r.from_status.as_deref().map(parse_status).transpose()?,
                to: parse_status(&r.to_status)?,
                reason: r.reason,
            })
        })
        .collect()
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
             FROM heartbeats WHERE agent_id = ? AND at >= ? ORDER BY at LIMIT ?",
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
    Ok(rows
        .into_iter()
        .map(|r| HeartbeatSample {
            at: ts(r.at),
            seq: to_u64(r.seq),
            cpu_percent: r.cpu_percent,
            load1: r.load1,
            mem_used_bytes: to_u64(r.mem_used),
            mem_total_bytes: to_u64(r.mem_total),
            disk_used_bytes: to_u64(r.disk_used),
            disk_total_bytes: to_u64(r.disk_total),
            process_count: to_u64(r.process_count),
        })
        .collect())
}

pub(super) async fn fleet_counts(pool: &SqlitePool) -> Result<FleetCounts> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM agents WHERE revoked_at IS NULL GROUP BY status").fetch_all(pool).await?;
    let mut counts = FleetCounts::default();
    for (status, n) in rows {
        let n = to_u64(n);
        match parse_status(&status)? {
            AgentStatus::Online => counts.online = n,
            AgentStatus::Stale => counts.stale = n,
            AgentStatus::Offline => counts.offline = n,
        }
        counts.total += n;
    }
    Ok(counts)
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
    let done = sqlx::query("DELETE FROM heartbeats WHERE rowid IN (SELECT rowid FROM heartbeats WHERE at < ? LIMIT ?)")
        .bind(before.unix_millis())
        .bind(i64::from(max_rows))
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}
