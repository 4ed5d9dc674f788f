//! The embedded store: one SQLite file in WAL mode through sqlx.
//!
//! Durability: `synchronous = FULL`, so a committed transaction survives a power cut as well
//! as a crash. Throughput comes from batching, not from weaker syncs: the recorder commits many
//! heartbeats per transaction with multi-row statements.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, FromRow, QueryBuilder, Sqlite, SqlitePool};

use shared::api::{AgentStatus, FleetCounts, HeartbeatSample, Role, Transition};
use shared::job::{AgentRun, JobId, RunId, RunState, StateCounts, Stream};
use shared::protocol::{Metrics, Outcome, RunFinished};
use shared::{AgentId, Labels, Timestamp};

use super::*;

/// Rows per multi-row statement: 10 columns each stays far below SQLite's variable limit.
const ROWS_PER_STATEMENT: usize = 500;

mod audit;
pub mod identity;
mod output;
mod scope;
mod signing;
mod trust;
pub use audit::{JOBS_PER_PRUNE, SERVER_ACTOR};
use output::insert_outputs;

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One writer at a time within this process. SQLite allows one writer anyway; without
    /// this gate, a second writer waits in SQLite's busy handler, which sleeps with backoff
    /// (hundreds of milliseconds under load) instead of taking its turn as soon as it can.
    write: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

fn db_err(e: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(d) = &e {
        // Primary result code is the low byte of the extended one.
        let code = d.code().and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff);
        // SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE (extended codes).
        if matches!(d.code().and_then(|c| c.parse::<i32>().ok()), Some(1555 | 2067)) {
            return StoreError::Duplicate;
        }
        match code {
            Some(13) => return StoreError::Full,    // SQLITE_FULL
            Some(5 | 6) => return StoreError::Busy, // SQLITE_BUSY, SQLITE_LOCKED
            _ => {}
        }
    }
    StoreError::Database(e.to_string())
}

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(ms)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn parse_labels(json: &str) -> Result<Labels> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("labels: {e}")))
}

fn labels_json(labels: &Labels) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}

fn parse_status(s: &str) -> Result<AgentStatus> {
    AgentStatus::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn parse_agent_id(s: &str) -> Result<AgentId> {
    AgentId::parse(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            .pragma("temp_store", "memory");
        let pool = SqlitePoolOptions::new().max_connections(8).min_connections(1).connect_with(options).await.map_err(db_err)?;
        sqlx::migrate!("../migrations").run(&pool).await.map_err(|e| StoreError::Migrate(e.to_string()))?;
        Ok(SqliteStore { pool, write: Arc::new(tokio::sync::Mutex::new(())) })
    }

    async fn writer(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.write.lock().await
    }

    /// Marks a token or an agent revoked; false if there is none, or it already was.
    async fn revoke(&self, table: &'static str, id: &str, at: Timestamp) -> Result<bool> {
        let _gate = self.writer().await;
        let sql = format!("UPDATE {table} SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL");
        let done = sqlx::query(AssertSqlSafe(sql)).bind(at.unix_millis()).bind(id).execute(&self.pool).await.map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[derive(FromRow)]
struct ApiTokenDb {
    id: String,
    name: String,
    role: String,
    secret_hash: Vec<u8>,
    created_by: String,
    created_at: i64,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    last_used_at: Option<i64>,
    scope: Option<String>,
}

impl TryFrom<ApiTokenDb> for ApiTokenRow {
    type Error = StoreError;
    fn try_from(r: ApiTokenDb) -> Result<Self> {
        Ok(ApiTokenRow {
            role: Role::from_str(&r.role).map_err(StoreError::Corrupt)?,
            id: r.id,
            name: r.name,
            secret_hash: r.secret_hash,
            created_by: r.created_by,
            created_at: ts(r.created_at),
            expires_at: r.expires_at.map(ts),
            revoked_at: r.revoked_at.map(ts),
            last_used_at: r.last_used_at.map(ts),
            scope: r
                .scope
                .as_deref()
                .map(shared::Selector::parse)
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("token scope: {e}")))?,
        })
    }
}

#[derive(FromRow)]
struct EnrollTokenDb {
    id: String,
    secret_hash: Vec<u8>,
    created_by: String,
    created_at: i64,
    expires_at: i64,
    uses_total: i64,
    uses_left: i64,
    labels: String,
    revoked_at: Option<i64>,
    approve: bool,
}

impl TryFrom<EnrollTokenDb> for EnrollTokenRow {
    type Error = StoreError;
    fn try_from(r: EnrollTokenDb) -> Result<Self> {
        Ok(EnrollTokenRow {
            labels: parse_labels(&r.labels)?,
            id: r.id,
            secret_hash: r.secret_hash,
            created_by: r.created_by,
            created_at: ts(r.created_at),
            expires_at: ts(r.expires_at),
            uses_total: u32::try_from(r.uses_total).unwrap_or(0),
            uses_left: u32::try_from(r.uses_left).unwrap_or(0),
            revoked_at: r.revoked_at.map(ts),
            approve: r.approve,
        })
    }
}

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

#[async_trait]
impl Store for SqliteStore {
    async fn insert_api_token(&self, r: &ApiTokenRow) -> Result<()> {
        let _gate = self.writer().await;
        sqlx::query(
            "INSERT INTO api_tokens (id, name, role, secret_hash, created_by, created_at, expires_at, scope) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(&r.name)
        .bind(r.role.as_str())
        .bind(&r.secret_hash)
        .bind(&r.created_by)
        .bind(r.created_at.unix_millis())
        .bind(r.expires_at.map(Timestamp::unix_millis))
        .bind(r.scope.as_ref().map(ToString::to_string))
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn api_token(&self, id: &str) -> Result<Option<ApiTokenRow>> {
        let row: Option<ApiTokenDb> =
            sqlx::query_as("SELECT * FROM api_tokens WHERE id = ?").bind(id).fetch_optional(&self.pool).await.map_err(db_err)?;
        row.map(ApiTokenRow::try_from).transpose()
    }

    async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRow>> {
        let rows: Vec<ApiTokenDb> =
            sqlx::query_as("SELECT * FROM api_tokens ORDER BY created_at").fetch_all(&self.pool).await.map_err(db_err)?;
        rows.into_iter().map(ApiTokenRow::try_from).collect()
    }

    async fn revoke_api_token(&self, id: &str, at: Timestamp) -> Result<bool> {
        self.revoke("api_tokens", id, at).await
    }

    async fn touch_api_token(&self, id: &str, at: Timestamp) -> Result<()> {
        let _gate = self.writer().await;
        sqlx::query("UPDATE api_tokens SET last_used_at = ? WHERE id = ?")
            .bind(at.unix_millis())
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn insert_enroll_token(&self, r: &EnrollTokenRow) -> Result<()> {
        let _gate = self.writer().await;
        sqlx::query(
            "INSERT INTO enroll_tokens (id, secret_hash, created_by, created_at, expires_at, uses_total, uses_left, labels, approve) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(&r.secret_hash)
        .bind(&r.created_by)
        .bind(r.created_at.unix_millis())
        .bind(r.expires_at.unix_millis())
        .bind(i64::from(r.uses_total))
        .bind(i64::from(r.uses_left))
        .bind(labels_json(&r.labels))
        .bind(r.approve)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn enroll_token(&self, id: &str) -> Result<Option<EnrollTokenRow>> {
        let row: Option<EnrollTokenDb> =
            sqlx::query_as("SELECT * FROM enroll_tokens WHERE id = ?").bind(id).fetch_optional(&self.pool).await.map_err(db_err)?;
        row.map(EnrollTokenRow::try_from).transpose()
    }

    async fn list_enroll_tokens(&self) -> Result<Vec<EnrollTokenRow>> {
        let rows: Vec<EnrollTokenDb> =
            sqlx::query_as("SELECT * FROM enroll_tokens ORDER BY created_at").fetch_all(&self.pool).await.map_err(db_err)?;
        rows.into_iter().map(EnrollTokenRow::try_from).collect()
    }

    async fn revoke_enroll_token(&self, id: &str, at: Timestamp) -> Result<bool> {
        self.revoke("enroll_tokens", id, at).await
    }

    async fn enroll_agent(&self, token_id: &str, agent: &NewAgent) -> Result<bool> {
        let _gate = self.writer().await;
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let taken = sqlx::query(
            "UPDATE enroll_tokens SET uses_left = uses_left - 1 \
             WHERE id = ? AND uses_left > 0 AND revoked_at IS NULL AND expires_at > ?",
        )
        .bind(token_id)
        .bind(agent.at.unix_millis())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if taken.rows_affected() != 1 {
            return Ok(false);
        }
        let labels = labels_json(&agent.token_labels);
        sqlx::query(
            "INSERT INTO agents (id, secret_hash, enroll_token_id, enrolled_at, hostname, token_labels, labels, status, status_since, \
             approval_pending) VALUES (?, ?, ?, ?, '', ?, ?, 'offline', ?, ?)",
        )
        .bind(agent.id.as_str())
        .bind(&agent.secret_hash)
        .bind(token_id)
        .bind(agent.at.unix_millis())
        .bind(&labels)
        .bind(&labels)
        .bind(agent.at.unix_millis())
        .bind(agent.approval_pending)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    async fn agent_credential(&self, id: &AgentId) -> Result<Option<AgentCredentialRow>> {
        type Row = (Vec<u8>, Option<Vec<u8>>, Option<i64>, String, Option<i64>, bool);
        let row: Option<Row> = sqlx::query_as(
            "SELECT secret_hash, pending_secret_hash, revoked_at, token_labels, rotation_requested_at, approval_pending \
             FROM agents WHERE id = ?",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
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

    async fn agent(&self, id: &AgentId) -> Result<Option<AgentRow>> {
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?");
        let row: Option<AgentDb> = sqlx::query_as(AssertSqlSafe(sql)).bind(id.as_str()).fetch_optional(&self.pool).await.map_err(db_err)?;
        row.map(AgentRow::try_from).transpose()
    }

    async fn list_agents(&self, status: Option<AgentStatus>) -> Result<Vec<AgentRow>> {
        let rows: Vec<AgentDb> = match status {
            Some(s) => {
                let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE status = ? ORDER BY hostname, id");
                sqlx::query_as(AssertSqlSafe(sql)).bind(s.as_str()).fetch_all(&self.pool).await
            }
            None => {
                let sql = format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY hostname, id");
                sqlx::query_as(AssertSqlSafe(sql)).fetch_all(&self.pool).await
            }
        }
        .map_err(db_err)?;
        rows.into_iter().map(AgentRow::try_from).collect()
    }

    async fn agent_targets(&self) -> Result<Vec<AgentTarget>> {
        let rows: Vec<(String, String, String, bool)> =
            sqlx::query_as("SELECT id, hostname, labels, approval_pending FROM agents WHERE revoked_at IS NULL ORDER BY hostname, id")
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
        rows.into_iter()
            .map(|(id, hostname, labels, approval_pending)| {
                Ok(AgentTarget { id: parse_agent_id(&id)?, hostname, labels: parse_labels(&labels)?, approval_pending })
            })
            .collect()
    }

    async fn transitions(&self, id: &AgentId, limit: u32) -> Result<Vec<Transition>> {
        let rows: Vec<TransitionDb> =
            sqlx::query_as("SELECT at, from_status, to_status, reason FROM agent_transitions WHERE agent_id = ? ORDER BY id DESC LIMIT ?")
                .bind(id.as_str())
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
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

    async fn heartbeats(
        &self,
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
        let rows: Vec<HeartbeatDb> =
            query.bind(id.as_str()).bind(since.unix_millis()).bind(i64::from(limit)).fetch_all(&self.pool).await.map_err(db_err)?;
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

    async fn fleet_counts(&self) -> Result<FleetCounts> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT status, COUNT(*) FROM agents WHERE revoked_at IS NULL GROUP BY status")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
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

    async fn state_totals(&self) -> Result<(Vec<(RunState, u64)>, Vec<(&'static str, u64)>)> {
        let runs: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM runs GROUP BY state").fetch_all(&self.pool).await.map_err(db_err)?;
        let (running, finished): (i64, i64) =
            sqlx::query_as("SELECT COALESCE(SUM(finished_at IS NULL), 0), COALESCE(SUM(finished_at IS NOT NULL), 0) FROM jobs")
                .fetch_one(&self.pool)
                .await
                .map_err(db_err)?;
        let runs = runs.into_iter().map(|(s, n)| Ok((parse_run_state(&s)?, to_u64(n)))).collect::<Result<Vec<_>>>()?;
        Ok((runs, vec![("running", to_u64(running)), ("finished", to_u64(finished))]))
    }

    async fn revoke_agent(&self, id: &AgentId, at: Timestamp) -> Result<bool> {
        self.revoke("agents", id.as_str(), at).await
    }

    async fn record(&self, batch: &[Record]) -> Result<Vec<Effect>> {
        let _gate = self.writer().await;
        let mut tx = self.pool.begin().await.map_err(db_err)?;
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
        tx.commit().await.map_err(db_err)?;
        Ok(effects)
    }

    async fn mark_node_offline(&self, node: &str, at: Timestamp, reason: &str) -> Result<u64> {
        let _gate = self.writer().await;
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        sqlx::query(
            "INSERT INTO agent_transitions (agent_id, at, from_status, to_status, reason) \
             SELECT id, ?, status, 'offline', ? FROM agents WHERE node = ? AND status != 'offline'",
        )
        .bind(at.unix_millis())
        .bind(reason)
        .bind(node)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let done = sqlx::query(
            "UPDATE agents SET status = 'offline', status_since = CASE WHEN status = 'offline' THEN status_since ELSE ? END, \
             connected = 0, disconnected_at = COALESCE(disconnected_at, ?) \
             WHERE node = ? AND (status != 'offline' OR connected = 1)",
        )
        .bind(at.unix_millis())
        .bind(at.unix_millis())
        .bind(node)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn prune_heartbeats(&self, before: Timestamp, max_rows: u32) -> Result<u64> {
        let _gate = self.writer().await;
        let done = sqlx::query("DELETE FROM heartbeats WHERE rowid IN (SELECT rowid FROM heartbeats WHERE at < ? LIMIT ?)")
            .bind(before.unix_millis())
            .bind(i64::from(max_rows))
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn audit(&self, e: &AuditEntry) -> Result<Vec<shared::api::AuditEntry>> {
        self.audit_append(e).await
    }

    async fn audit_entries(&self, q: &AuditQuery) -> Result<Vec<shared::api::AuditEntry>> {
        self.audit_page(q).await
    }

    async fn prune_audit(&self, before: Timestamp, max_rows: u32, now: Timestamp) -> Result<Vec<shared::api::AuditEntry>> {
        self.audit_prune(before, max_rows, now).await
    }

    async fn prune_jobs(&self, before: Timestamp, max_jobs: u32) -> Result<u64> {
        self.jobs_prune(before, max_jobs).await
    }

    async fn create_job(&self, job: &JobRow, runs: &[(RunId, AgentId)]) -> Result<()> {
        let _gate = self.writer().await;
        let mut tx = self.pool.begin().await.map_err(db_err)?;
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
        .await
        .map_err(db_err)?;
        if job.signature.is_some()
            && let shared::job::Target::Agents(ids) = &job.target
        {
            let list: Vec<&str> = ids.iter().map(AgentId::as_str).collect();
            sqlx::query("INSERT INTO job_signed_agents (job_id, agents) VALUES (?, ?)")
                .bind(&job.id)
                .bind(list.join(","))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
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
            q.build().execute(&mut *tx).await.map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(())
    }

    async fn job(&self, id: &str) -> Result<Option<JobRow>> {
        let row: Option<JobDb> =
            sqlx::query_as("SELECT * FROM jobs WHERE id = ?").bind(id).fetch_optional(&self.pool).await.map_err(db_err)?;
        row.map(JobRow::try_from).transpose()
    }

    async fn list_jobs(&self, limit: u32) -> Result<Vec<JobRow>> {
        let rows: Vec<JobDb> = sqlx::query_as("SELECT * FROM jobs ORDER BY created_at DESC, id LIMIT ?")
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.into_iter().map(JobRow::try_from).collect()
    }

    async fn active_jobs(&self) -> Result<Vec<JobRow>> {
        let rows: Vec<JobDb> = sqlx::query_as("SELECT * FROM jobs WHERE finished_at IS NULL ORDER BY created_at")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.into_iter().map(JobRow::try_from).collect()
    }

    async fn run_counts(&self, job_ids: &[JobId]) -> Result<HashMap<JobId, StateCounts>> {
        let mut out: HashMap<JobId, StateCounts> = HashMap::new();
        for chunk in job_ids.chunks(ROWS_PER_STATEMENT) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new("SELECT job_id, state, COUNT(*) FROM runs WHERE job_id IN ");
            push_in_list(&mut q, chunk);
            q.push(" GROUP BY job_id, state");
            let rows: Vec<(String, String, i64)> = q.build_query_as().fetch_all(&self.pool).await.map_err(db_err)?;
            for (job, state, n) in rows {
                out.entry(job).or_default().insert(parse_run_state(&state)?, to_u64(n));
            }
        }
        Ok(out)
    }

    async fn runs(&self, job_id: &str) -> Result<Vec<RunRow>> {
        runs_where(&self.pool, "r.job_id = ? ORDER BY r.seq", job_id).await
    }

    async fn run(&self, run_id: &str) -> Result<Option<RunRow>> {
        Ok(runs_where(&self.pool, "r.id = ?", run_id).await?.pop())
    }
    async fn agent_runs(&self, agent_id: &AgentId, limit: u32) -> Result<Vec<AgentRun>> {
        let rows: Vec<AgentRunDb> = sqlx::query_as(
            "SELECT r.job_id, r.id AS run_id, j.created_at, j.created_by, j.command, r.state, r.exit_code, r.signal, r.error, \
             r.started_at, r.finished_at FROM runs r JOIN jobs j ON j.id = r.job_id \
             WHERE r.agent_id = ? ORDER BY j.created_at DESC, r.job_id LIMIT ?",
        )
        .bind(agent_id.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.into_iter()
            .map(|r| {
                Ok(AgentRun {
                    command: serde_json::from_str(&r.command)
                        .map_err(|e| StoreError::Corrupt(format!("job {}: command: {e}", r.job_id)))?,
                    state: parse_run_state(&r.state)?,
                    job_id: r.job_id,
                    run_id: r.run_id,
                    created_at: ts(r.created_at),
                    created_by: r.created_by,
                    exit_code: r.exit_code.map(|c| i32::try_from(c).unwrap_or(i32::MAX)),
                    signal: r.signal.map(|c| i32::try_from(c).unwrap_or(i32::MAX)),
                    error: r.error,
                    started_at: r.started_at.map(ts),
                    finished_at: r.finished_at.map(ts),
                })
            })
            .collect()
    }

    async fn run_output_heads(&self, job_id: &str, head: u64, total: u64) -> Result<HashMap<RunId, RunOutputText>> {
        use futures_util::TryStreamExt;
        // Rows come in order and are read as a stream, so a job with a great deal of output
        // costs this read no more than `total` bytes (plus one row).
        let mut rows = sqlx::query_as::<_, (String, i64, i64, String)>(
            "SELECT o.run_id, o.stream, o.offset, o.data FROM run_output o JOIN runs r ON r.id = o.run_id \
             WHERE r.job_id = ? AND o.offset < ? ORDER BY o.run_id, o.stream, o.offset",
        )
        .bind(job_id)
        .bind(to_i64(head))
        .fetch(&self.pool);
        let mut out: HashMap<RunId, RunOutputText> = HashMap::new();
        let mut spent = 0u64;
        while let Some((run, stream, offset, data)) = rows.try_next().await.map_err(db_err)? {
            let e = out.entry(run).or_default();
            let text = if stream == 0 { &mut e.stdout } else { &mut e.stderr };
            let (offset, have) = (to_u64(offset), text.len() as u64);
            if offset > have || spent >= total {
                continue;
            }
            let want = usize::try_from(head.min(have + (total - spent)) - have).unwrap_or(0);
            let fresh = data.get(usize::try_from(have - offset).unwrap_or(usize::MAX)..).unwrap_or_default();
            let mut cut = want.min(fresh.len());
            while !fresh.is_char_boundary(cut) {
                cut -= 1;
            }
            text.push_str(&fresh[..cut]);
            spent += cut as u64;
        }
        Ok(out)
    }

    async fn run_output(&self, run_id: &str, stream: Stream, offset: u64, limit: u64) -> Result<Option<(RunRow, String)>> {
        let Some(run) = self.run(run_id).await? else { return Ok(None) };
        let end = offset.saturating_add(limit);
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT offset, data FROM run_output WHERE run_id = ? AND stream = ? AND offset < ? \
             AND offset + length(CAST(data AS BLOB)) > ? ORDER BY offset",
        )
        .bind(run_id)
        .bind(stream_code(stream))
        .bind(to_i64(end))
        .bind(to_i64(offset))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        let pieces: Vec<(u64, &str)> = rows.iter().map(|(o, d)| (to_u64(*o), d.as_str())).collect();
        let held = match stream {
            Stream::Stdout => run.stdout_len,
            Stream::Stderr => run.stderr_len,
        };
        let bytes = crate::output::extract(&pieces, offset.min(held), end.min(held)).unwrap_or_default();
        // Pages end on a character boundary: the next page starts where this one stops.
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let valid = e.utf8_error().valid_up_to();
                let mut b = e.into_bytes();
                b.truncate(valid);
                String::from_utf8(b).unwrap_or_default()
            }
        };
        Ok(Some((run, text)))
    }

    async fn pending_runs(&self, job_id: &str) -> Result<Vec<OpenRun>> {
        self.open_runs_where("job_id = ? AND state = 'pending' ORDER BY seq", &[job_id]).await
    }

    async fn mark_dispatched(&self, run_ids: &[RunId], at: Timestamp) -> Result<Vec<RunId>> {
        let _gate = self.writer().await;
        update_runs(&self.pool, run_ids, "state = 'pending'", |q| {
            q.push("state = 'dispatched', dispatched_at = ").push_bind(at.unix_millis());
        })
        .await
    }

    async fn mark_job_dispatched(&self, job_id: &str, at: Timestamp) -> Result<Vec<RunId>> {
        let _gate = self.writer().await;
        let rows: Vec<(String,)> =
            sqlx::query_as("UPDATE runs SET state = 'dispatched', dispatched_at = ? WHERE job_id = ? AND state = 'pending' RETURNING id")
                .bind(at.unix_millis())
                .bind(job_id)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    async fn end_runs(&self, run_ids: &[RunId], state: RunState, error: &str, at: Timestamp) -> Result<Vec<RunId>> {
        let _gate = self.writer().await;
        let guard = format!("state IN {OPEN}");
        update_runs(&self.pool, run_ids, &guard, |q| {
            q.push("state = ").push_bind(state.as_str());
            q.push(", error = ").push_bind(error.to_owned());
            q.push(", finished_at = ").push_bind(at.unix_millis());
        })
        .await
    }

    async fn redeliver(&self, run_ids: &[RunId]) -> Result<()> {
        let _gate = self.writer().await;
        update_runs(&self.pool, run_ids, "state = 'dispatched' AND accepted = 0", |q| {
            q.push("state = 'pending', dispatched_at = NULL");
        })
        .await?;
        Ok(())
    }

    async fn open_runs_for_agent(&self, agent_id: &AgentId) -> Result<Vec<OpenRun>> {
        let sql = format!("agent_id = ? AND state IN {OPEN}");
        self.open_runs_where(&sql, &[agent_id.as_str()]).await
    }

    async fn overdue_runs(&self, now: Timestamp, grace_ms: u64) -> Result<Vec<OpenRun>> {
        let rows: Vec<OpenRunDb> = sqlx::query_as(
            "SELECT r.id, r.job_id, r.agent_id, r.state, r.accepted FROM runs r JOIN jobs j ON j.id = r.job_id \
             WHERE r.state IN ('dispatched', 'running') AND j.finished_at IS NULL \
             AND COALESCE(r.started_at, r.dispatched_at) + j.timeout_ms + ? < ?",
        )
        .bind(to_i64(grace_ms))
        .bind(now.unix_millis())
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.into_iter().map(OpenRun::try_from).collect()
    }

    async fn finish_job_if_done(&self, job_id: &str, at: Timestamp) -> Result<bool> {
        let _gate = self.writer().await;
        let sql = format!(
            "UPDATE jobs SET finished_at = ? WHERE id = ? AND finished_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM runs WHERE job_id = ? AND state IN {OPEN})"
        );
        let done =
            sqlx::query(AssertSqlSafe(sql)).bind(at.unix_millis()).bind(job_id).bind(job_id).execute(&self.pool).await.map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn signed_agents(&self, job_id: &str) -> Result<Vec<AgentId>> {
        signing::signed_agents(&self.pool, job_id).await
    }

    async fn insert_key_revocation(&self, r: &shared::signing::KeyRevocation, at: Timestamp, by: &str) -> Result<bool> {
        let _gate = self.writer().await;
        signing::insert_key_revocation(&self.pool, r, at, by).await
    }

    async fn key_revocations(&self) -> Result<Vec<shared::signing::KeyRevocation>> {
        signing::key_revocations(&self.pool).await
    }

    async fn set_agent_labels(&self, id: &AgentId, expected: &Labels, token_labels: &Labels, labels: &Labels) -> Result<bool> {
        let _gate = self.writer().await;
        scope::set_agent_labels(&self.pool, id, expected, token_labels, labels).await
    }

    async fn begin_rotation(&self, id: &AgentId, pending_hash: &[u8], at: Timestamp, gap_ms: u64) -> Result<bool> {
        let _gate = self.writer().await;
        identity::begin_rotation(&self.pool, id, pending_hash, at, gap_ms).await
    }

    async fn complete_rotation(&self, id: &AgentId, pending_hash: &[u8], at: Timestamp) -> Result<bool> {
        let _gate = self.writer().await;
        identity::complete_rotation(&self.pool, id, pending_hash, at).await
    }

    async fn retired_credentials(&self, id: &AgentId) -> Result<Vec<Vec<u8>>> {
        identity::retired_credentials(&self.pool, id).await
    }

    async fn clone_seen(&self, id: &AgentId, at: Timestamp, from: &str) -> Result<()> {
        let _gate = self.writer().await;
        identity::clone_seen(&self.pool, id, at, from).await
    }

    async fn request_rotation(&self, id: &AgentId, at: Timestamp) -> Result<bool> {
        let _gate = self.writer().await;
        identity::request_rotation(&self.pool, id, at).await
    }

    async fn accept_agent(&self, id: &AgentId, at: Timestamp, by: &str) -> Result<Acceptance> {
        let _gate = self.writer().await;
        identity::accept_agent(&self.pool, id, at, by).await
    }

    async fn approve_job(&self, job_id: &str, token: &str, by: &str, at: Timestamp) -> Result<bool> {
        let _gate = self.writer().await;
        let done = sqlx::query(
            "UPDATE jobs SET approved_by = ?, approved_at = ? WHERE id = ? AND approval_required = 1 AND approved_at IS NULL \
             AND cancelled_at IS NULL AND finished_at IS NULL AND creator_token IS NOT ?",
        )
        .bind(by)
        .bind(at.unix_millis())
        .bind(job_id)
        .bind(token)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn agent_trusted_keys(&self, ids: &[AgentId]) -> Result<HashMap<AgentId, Vec<shared::signing::PublicKey>>> {
        trust::agent_trusted_keys(&self.pool, ids).await
    }

    async fn agent_labels(&self, ids: &[AgentId]) -> Result<HashMap<AgentId, Labels>> {
        scope::agent_labels(&self.pool, ids).await
    }

    async fn cancel_job(&self, job_id: &str, at: Timestamp) -> Result<Option<(Vec<OpenRun>, Vec<OpenRun>)>> {
        // One transaction: the runs read are the runs changed. A run already sent (dispatched,
        // accepted or not) is left to its agent, which is told to stop it and reports how it
        // ended; only a run never sent ends here.
        let _gate = self.writer().await;
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let done = sqlx::query("UPDATE jobs SET cancelled_at = COALESCE(cancelled_at, ?) WHERE id = ?")
            .bind(at.unix_millis())
            .bind(job_id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        let sql = format!("{OPEN_RUN_SELECT} WHERE job_id = ? AND state IN {OPEN} ORDER BY seq");
        let rows: Vec<OpenRunDb> = sqlx::query_as(AssertSqlSafe(sql)).bind(job_id).fetch_all(&mut *tx).await.map_err(db_err)?;
        let open = rows.into_iter().map(OpenRun::try_from).collect::<Result<Vec<_>>>()?;
        sqlx::query("UPDATE runs SET state = 'cancelled', error = 'cancelled before it started', finished_at = ? WHERE job_id = ? AND state = 'pending'")
            .bind(at.unix_millis())
            .bind(job_id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(Some(open.into_iter().partition(|r| r.state == RunState::Pending)))
    }
}

async fn runs_where(pool: &SqlitePool, sql_where: &'static str, bind: &str) -> Result<Vec<RunRow>> {
    let head = "SELECT r.id, r.job_id, r.agent_id, a.hostname, r.state, r.accepted, r.dispatched_at, r.started_at, r.finished_at, \
         r.exit_code, r.signal, r.error, r.stdout_truncated, r.stderr_truncated, r.stdout_held, r.stderr_held \
         FROM runs r LEFT JOIN agents a ON a.id = r.agent_id WHERE ";
    let rows: Vec<RunDb> = sqlx::query_as(AssertSqlSafe(format!("{head}{sql_where}"))).bind(bind).fetch_all(pool).await.map_err(db_err)?;
    rows.into_iter()
        .map(|r| {
            Ok(RunRow {
                state: parse_run_state(&r.state)?,
                agent_id: parse_agent_id(&r.agent_id)?,
                id: r.id,
                job_id: r.job_id,
                hostname: r.hostname.unwrap_or_default(),
                accepted: r.accepted,
                dispatched_at: r.dispatched_at.map(ts),
                started_at: r.started_at.map(ts),
                finished_at: r.finished_at.map(ts),
                exit_code: r.exit_code.map(|c| i32::try_from(c).unwrap_or(i32::MAX)),
                signal: r.signal.map(|c| i32::try_from(c).unwrap_or(i32::MAX)),
                error: r.error,
                stdout_truncated: r.stdout_truncated,
                stderr_truncated: r.stderr_truncated,
                stdout_len: to_u64(r.stdout_held),
                stderr_len: to_u64(r.stderr_held),
            })
        })
        .collect()
}

fn stream_code(s: Stream) -> i64 {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

fn parse_run_state(s: &str) -> Result<RunState> {
    RunState::from_str(s).map_err(StoreError::Corrupt)
}

#[derive(FromRow)]
struct JobDb {
    id: String,
    created_at: i64,
    created_by: String,
    target: String,
    command: String,
    timeout_ms: i64,
    ttl_ms: i64,
    concurrency: Option<String>,
    max_in_flight: Option<i64>,
    max_errors: Option<i64>,
    output_limit: i64,
    expires_at: i64,
    cancelled_at: Option<i64>,
    finished_at: Option<i64>,
    signature: Option<String>,
    scope: Option<String>,
    approval_required: bool,
    creator_token: Option<String>,
    approved_by: Option<String>,
    approved_at: Option<i64>,
}

impl TryFrom<JobDb> for JobRow {
    type Error = StoreError;
    fn try_from(r: JobDb) -> Result<Self> {
        let corrupt = |what: &str, e: String| StoreError::Corrupt(format!("job {}: {what}: {e}", r.id));
        let signature = r.signature.as_deref().map(serde_json::from_str).transpose().map_err(|e| corrupt("signature", e.to_string()))?;
        let scope = r.scope.as_deref().map(shared::Selector::parse).transpose().map_err(|e| corrupt("scope", e.to_string()))?;
        Ok(JobRow {
            target: serde_json::from_str(&r.target).map_err(|e| corrupt("target", e.to_string()))?,
            command: serde_json::from_str(&r.command).map_err(|e| corrupt("command", e.to_string()))?,
            concurrency: r.concurrency.as_deref().map(str::parse).transpose().map_err(|e: String| corrupt("concurrency", e))?,
            id: r.id,
            created_at: ts(r.created_at),
            created_by: r.created_by,
            timeout_ms: to_u64(r.timeout_ms),
            ttl_ms: to_u64(r.ttl_ms),
            max_in_flight: r.max_in_flight.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            max_errors: r.max_errors.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            output_limit: to_u64(r.output_limit),
            expires_at: ts(r.expires_at),
            cancelled_at: r.cancelled_at.map(ts),
            finished_at: r.finished_at.map(ts),
            signature,
            scope,
            approval: r.approval_required.then(|| JobApproval {
                creator_token: r.creator_token.unwrap_or_default(),
                approved: r.approved_by.zip(r.approved_at.map(ts)),
            }),
        })
    }
}

#[derive(FromRow)]
struct AgentRunDb {
    job_id: String,
    run_id: String,
    created_at: i64,
    created_by: String,
    command: String,
    state: String,
    exit_code: Option<i64>,
    signal: Option<i64>,
    error: Option<String>,
    started_at: Option<i64>,
    finished_at: Option<i64>,
}

#[derive(FromRow)]
struct RunDb {
    id: String,
    job_id: String,
    agent_id: String,
    hostname: Option<String>,
    state: String,
    accepted: bool,
    dispatched_at: Option<i64>,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    exit_code: Option<i64>,
    signal: Option<i64>,
    error: Option<String>,
    stdout_truncated: bool,
    stderr_truncated: bool,
    stdout_held: i64,
    stderr_held: i64,
}

const OPEN_RUN_SELECT: &str = "SELECT id, job_id, agent_id, state, accepted FROM runs";

#[derive(FromRow)]
struct OpenRunDb {
    id: String,
    job_id: String,
    agent_id: String,
    state: String,
    accepted: bool,
}

impl TryFrom<OpenRunDb> for OpenRun {
    type Error = StoreError;
    fn try_from(r: OpenRunDb) -> Result<Self> {
        Ok(OpenRun {
            state: parse_run_state(&r.state)?,
            agent_id: parse_agent_id(&r.agent_id)?,
            id: r.id,
            job_id: r.job_id,
            accepted: r.accepted,
        })
    }
}

const OPEN: &str = "('pending', 'dispatched', 'running')";

impl SqliteStore {
    async fn open_runs_where(&self, sql_where: &str, binds: &[&str]) -> Result<Vec<OpenRun>> {
        let sql = format!("{OPEN_RUN_SELECT} WHERE {sql_where}");
        let mut q = sqlx::query_as::<_, OpenRunDb>(AssertSqlSafe(sql));
        for b in binds {
            q = q.bind(b.to_string());
        }
        q.fetch_all(&self.pool).await.map_err(db_err)?.into_iter().map(OpenRun::try_from).collect()
    }
}

/// Pushes `(?, ?, ...)` with one bind per id.
fn push_in_list<S: AsRef<str>>(q: &mut QueryBuilder<Sqlite>, ids: &[S]) {
    q.push("(");
    let mut sep = q.separated(", ");
    for id in ids {
        sep.push_bind(id.as_ref().to_owned());
    }
    q.push(")");
}

/// Runs `UPDATE runs SET <set> WHERE <guard> AND id IN (...) RETURNING id` over chunks of
/// ids; `set` pushes the assignments and their binds.
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
        let rows: Vec<(String,)> = q.build_query_as().fetch_all(pool).await.map_err(db_err)?;
        changed.extend(rows.into_iter().map(|(id,)| id));
    }
    Ok(changed)
}

/// Builds `(VALUES (..), (..))` rows for an `UPDATE ... FROM` and runs it over chunks.
async fn update_from<T, F>(tx: &mut sqlx::Transaction<'_, Sqlite>, head: &str, tail: &str, rows: &[T], push: F) -> Result<()>
where
    F: Fn(&mut sqlx::query_builder::Separated<'_, Sqlite, &'static str>, &T),
{
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(head);
        q.push(" FROM (");
        q.push_values(chunk, |mut b, row| push(&mut b, row));
        q.push(") AS v ");
        q.push(tail);
        q.build().execute(&mut **tx).await.map_err(db_err)?;
    }
    Ok(())
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
        q.build().execute(&mut **tx).await.map_err(db_err)?;
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
        "WHERE runs.id = v.column2 AND runs.agent_id = v.column1 AND runs.state IN ('pending', 'dispatched')",
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
        q.push(
            ") AS v WHERE runs.id = v.column2 AND runs.agent_id = v.column1 AND runs.state IN ('pending', 'dispatched') \
             RETURNING runs.id, runs.job_id, runs.agent_id",
        );
        let rows: Vec<(String, String, String)> = q.build_query_as().fetch_all(&mut **tx).await.map_err(db_err)?;
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
    let mut known: HashMap<String, (String, String, RunState, u64, Option<i64>)> = HashMap::new();
    let mut have: HashMap<String, [crate::output::Held; 2]> = HashMap::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT r.id, r.job_id, r.agent_id, r.state, j.output_limit, r.dispatched_at,              r.stdout_held, r.stdout_truncated, r.stderr_held, r.stderr_truncated FROM runs r JOIN jobs j ON j.id = r.job_id WHERE r.id IN ",
        );
        push_in_list(&mut q, chunk);
        type Row = (String, String, String, String, i64, Option<i64>, i64, bool, i64, bool);
        let rows: Vec<Row> = q.build_query_as().fetch_all(&mut **tx).await.map_err(db_err)?;
        for (id, job, agent, state, limit, dispatched_at, out_len, out_t, err_len, err_t) in rows {
            use crate::output::Held;
            have.insert(id.clone(), [Held { len: to_u64(out_len), truncated: out_t }, Held { len: to_u64(err_len), truncated: err_t }]);
            known.insert(id, (job, agent, parse_run_state(&state)?, to_u64(limit), dispatched_at));
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
        let Some((job_id, owner, state, limit, dispatched_at)) = known.get(&f.run_id) else {
            tracing::warn!(agent = %agent_id, run = %f.run_id, "result for an unknown run");
            effects.push(ack);
            continue;
        };
        if owner != agent_id.as_str() {
            // Not this agent's run: store nothing, and let it forget the run.
            tracing::warn!(agent = %agent_id, run = %f.run_id, "result for another agent's run refused");
            effects.push(ack);
            continue;
        }
        if state.is_final() && !matches!(state, RunState::Lost | RunState::Cancelled) {
            effects.push(ack);
            continue;
        }
        let [out, err] = have.get(&f.run_id).copied().unwrap_or_default();
        if !crate::output::complete(out, f.stdout_len, *limit) || !crate::output::complete(err, f.stderr_len, *limit) {
            effects.push(Effect::Resend {
                agent_id: agent_id.clone(),
                run_id: f.run_id.clone(),
                stdout_from: out.len,
                stderr_from: err.len,
            });
            continue;
        }
        // What is kept: all the agent reported, or what the server held when it cut the stream.
        let (want_out, want_err) = (f.stdout_len.min(out.len), f.stderr_len.min(err.len));
        let new_state = match f.outcome {
            Outcome::Succeeded => RunState::Succeeded,
            Outcome::Failed => RunState::Failed,
            Outcome::TimedOut => RunState::TimedOut,
            Outcome::Cancelled => RunState::Cancelled,
            Outcome::Lost => RunState::Lost,
        };
        let started = started_at.get(f.run_id.as_str()).copied();
        updates.push((
            f,
            new_state,
            at,
            want_out,
            want_err,
            f.stdout_truncated || out.truncated || f.stdout_len > *limit,
            f.stderr_truncated || err.truncated || f.stderr_len > *limit,
            started,
        ));
        effects.push(Effect::RunState {
            job_id: job_id.clone(),
            run_id: f.run_id.clone(),
            agent_id: agent_id.clone(),
            state: new_state,
            exit_code: f.exit_code,
            error: f.error.clone(),
            latency_ms: dispatched_at.map(|d| to_u64(at - d)),
        });
        effects.push(ack);
    }
    update_from(
        tx,
        "UPDATE runs SET state = v.column2, exit_code = v.column3, signal = v.column4, error = v.column5, finished_at = v.column6, \
         stdout_len = v.column7, stderr_len = v.column8, stdout_truncated = v.column9, stderr_truncated = v.column10, accepted = 1, \
         started_at = COALESCE(runs.started_at, v.column11), dispatched_at = COALESCE(runs.dispatched_at, v.column11)",
        "WHERE runs.id = v.column1",
        &updates,
        |b, (f, state, at, out_len, err_len, out_t, err_t, started)| {
            b.push_bind(f.run_id.clone())
                .push_bind(state.as_str())
                .push_bind(f.exit_code)
                .push_bind(f.signal)
                .push_bind(f.error.clone())
                .push_bind(*at)
                .push_bind(to_i64(*out_len))
                .push_bind(to_i64(*err_len))
                .push_bind(*out_t)
                .push_bind(*err_t)
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
        q.build().execute(&mut **tx).await.map_err(db_err)?;
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
        q.build().execute(&mut **tx).await.map_err(db_err)?;
    }
    Ok(())
}

/// A job for tests elsewhere in the server (the dispatcher's).
#[cfg(test)]
pub fn test_job_row(id: &str, created_at: i64) -> JobRow {
    tests::job_row(id, created_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        (dir, store)
    }

    fn agent(n: u8) -> NewAgent {
        NewAgent {
            id: AgentId::from_bytes([n; 8]),
            secret_hash: vec![n; 32],
            token_labels: Labels::from_pairs(["site=lab"]).unwrap(),
            at: Timestamp::from_unix_millis(1_000),
            approval_pending: false,
        }
    }

    /// A store holding one enrolled agent.
    pub(super) async fn enrolled() -> (tempfile::TempDir, SqliteStore, NewAgent) {
        let (dir, store) = open().await;
        store.insert_enroll_token(&enroll_token(5, 10_000)).await.unwrap();
        let a = agent(1);
        store.enroll_agent("00000000000000aa", &a).await.unwrap();
        (dir, store, a)
    }

    fn enroll_token(uses: u32, expires_at: i64) -> EnrollTokenRow {
        EnrollTokenRow {
            id: "00000000000000aa".into(),
            secret_hash: vec![1; 32],
            created_by: "test".into(),
            created_at: Timestamp::from_unix_millis(0),
            expires_at: Timestamp::from_unix_millis(expires_at),
            uses_total: uses,
            uses_left: uses,
            labels: Labels::new(),
            revoked_at: None,
            approve: false,
        }
    }

    #[tokio::test]
    async fn enrollment_takes_one_use_per_agent_and_stops_at_zero() {
        let (_dir, store) = open().await;
        store.insert_enroll_token(&enroll_token(2, 10_000)).await.unwrap();
        assert!(store.enroll_agent("00000000000000aa", &agent(1)).await.unwrap());
        assert!(store.enroll_agent("00000000000000aa", &agent(2)).await.unwrap());
        assert!(!store.enroll_agent("00000000000000aa", &agent(3)).await.unwrap());
        assert!(store.agent_credential(&agent(3).id).await.unwrap().is_none());
        assert_eq!(store.enroll_token("00000000000000aa").await.unwrap().unwrap().uses_left, 0);
    }

    #[tokio::test]
    async fn an_expired_enrollment_token_enrolls_nobody() {
        let (_dir, store) = open().await;
        store.insert_enroll_token(&enroll_token(5, 500)).await.unwrap();
        assert!(!store.enroll_agent("00000000000000aa", &agent(1)).await.unwrap());
    }

    #[tokio::test]
    async fn a_batch_of_heartbeats_keeps_history_and_the_newest_metrics() {
        let (_dir, store, a) = enrolled().await;
        let hb = |seq: u64, at: i64, cpu: f64| Record::Heartbeat {
            agent_id: a.id.clone(),
            at: Timestamp::from_unix_millis(at),
            seq,
            metrics: Box::new(Metrics { hostname: "h1".into(), cpu_percent: cpu, ..Metrics::default() }),
        };
        let batch: Vec<Record> = (0..1200).map(|i| hb(i, 2_000 + i as i64, i as f64 / 100.0)).collect();
        store.record(&batch).await.unwrap();
        let row = store.agent(&a.id).await.unwrap().unwrap();
        assert_eq!(row.last_heartbeat_at, Some(Timestamp::from_unix_millis(3_199)));
        assert_eq!(row.hostname, "h1");
        assert_eq!(row.last_metrics.unwrap().cpu_percent, 11.99);
        let hist = store.heartbeats(&a.id, Timestamp::from_unix_millis(3_000), None, 1000).await.unwrap();
        assert_eq!(hist.len(), 200);
        assert!(hist.windows(2).all(|w| w[0].at < w[1].at && w[0].seq < w[1].seq));
        // In buckets of 100 ms: 3,000..3,099 and 3,100..3,199, each with its highest figures.
        let step = Some(std::time::Duration::from_millis(100));
        let buckets = store.heartbeats(&a.id, Timestamp::from_unix_millis(3_000), step, 1000).await.unwrap();
        let seen: Vec<(i64, u64, f64)> = buckets.iter().map(|b| (b.at.unix_millis(), b.seq, b.cpu_percent)).collect();
        assert_eq!(seen, [(3_000, 1099, 10.99), (3_100, 1199, 11.99)]);
        assert_eq!(store.prune_heartbeats(Timestamp::from_unix_millis(3_000), 10_000).await.unwrap(), 1000);
    }

    #[tokio::test]
    async fn transitions_set_status_and_restart_marks_the_nodes_agents_offline() {
        let (_dir, store, a) = enrolled().await;
        let at = Timestamp::from_unix_millis(5_000);
        store
            .record(&[
                Record::Connected {
                    agent_id: a.id.clone(),
                    at,
                    hostname: "h".into(),
                    labels: Labels::new(),
                    heartbeat_interval_ms: 1000,
                    agent_version: "0".into(),
                    node: "n1".into(),
                    remote_addr: "127.0.0.1:1".into(),
                    trusted_keys: vec![],
                },
                Record::Transition {
                    agent_id: a.id.clone(),
                    at,
                    from: Some(AgentStatus::Offline),
                    to: AgentStatus::Online,
                    reason: "connected".into(),
                },
            ])
            .await
            .unwrap();
        assert_eq!(store.fleet_counts().await.unwrap(), FleetCounts { total: 1, online: 1, stale: 0, offline: 0 });
        assert_eq!(store.mark_node_offline("other", at, "restart").await.unwrap(), 0);
        assert_eq!(store.mark_node_offline("n1", at, "restart").await.unwrap(), 1);
        let row = store.agent(&a.id).await.unwrap().unwrap();
        assert_eq!(row.status, AgentStatus::Offline);
        assert!(!row.connected);
        let t = store.transitions(&a.id, 10).await.unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].from, t[0].to, t[0].reason.as_str()), (Some(AgentStatus::Online), AgentStatus::Offline, "restart"));
    }

    pub(super) fn connected(a: &AgentId, at: i64) -> Record {
        Record::Connected {
            agent_id: a.clone(),
            at: Timestamp::from_unix_millis(at),
            hostname: "h".into(),
            labels: Labels::new(),
            heartbeat_interval_ms: 1000,
            agent_version: "0".into(),
            node: "n1".into(),
            remote_addr: "127.0.0.1:1".into(),
            trusted_keys: vec![],
        }
    }

    #[tokio::test]
    async fn connection_records_in_one_batch_apply_in_their_order() {
        let (_dir, store, a) = enrolled().await;
        let gone = Record::Disconnected { agent_id: a.id.clone(), at: Timestamp::from_unix_millis(6_000) };
        store.record(&[connected(&a.id, 5_000), gone.clone()]).await.unwrap();
        let row = store.agent(&a.id).await.unwrap().unwrap();
        assert!(!row.connected && row.disconnected_at == Some(Timestamp::from_unix_millis(6_000)));
        store.record(&[gone, connected(&a.id, 7_000)]).await.unwrap();
        let row = store.agent(&a.id).await.unwrap().unwrap();
        assert!(row.connected && row.disconnected_at.is_none() && row.connected_at == Some(Timestamp::from_unix_millis(7_000)));
    }

    /// A job created at `created_at` (ms) that runs `true`; also used by the submodules' tests.
    pub(super) fn job_row(id: &str, created_at: i64) -> JobRow {
        use shared::job::{CommandSpec, Program, Target};
        JobRow {
            id: id.into(),
            created_at: Timestamp::from_unix_millis(created_at),
            created_by: "t".into(),
            target: Target::All,
            command: CommandSpec {
                program: Program::Argv(vec!["true".into()]),
                cwd: None,
                env: Default::default(),
                secret_env: Default::default(),
            },
            timeout_ms: 1000,
            ttl_ms: 1000,
            concurrency: None,
            max_in_flight: None,
            max_errors: None,
            output_limit: 1 << 20,
            expires_at: Timestamp::from_unix_millis(created_at + 1_000),
            cancelled_at: None,
            finished_at: None,
            signature: None,
            scope: None,
            approval: None,
        }
    }

    #[tokio::test]
    async fn an_agents_runs_are_listed_newest_job_first_with_their_command() {
        let (_dir, store, a) = enrolled().await;
        let other = agent(2);
        store.enroll_agent("00000000000000aa", &other).await.unwrap();
        for (n, id) in ["00000000000000j1", "00000000000000j2", "00000000000000j3"].into_iter().enumerate() {
            let runs = [(format!("r{n}a"), a.id.clone()), (format!("r{n}b"), other.id.clone())];
            store.create_job(&job_row(id, n as i64), &runs).await.unwrap();
        }
        let runs = store.agent_runs(&a.id, 2).await.unwrap();
        let seen: Vec<(&str, &str)> = runs.iter().map(|r| (r.job_id.as_str(), r.run_id.as_str())).collect();
        assert_eq!(seen, [("00000000000000j3", "r2a"), ("00000000000000j2", "r1a")]);
        assert_eq!((runs[0].state, runs[0].command.summary().as_str()), (RunState::Pending, "true"));
        assert!(store.agent_runs(&agent(9).id, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn cancelling_ends_only_runs_never_sent_and_names_the_ones_agents_must_stop() {
        let (_dir, store, a) = enrolled().await;
        let b = agent(2);
        assert!(store.enroll_agent("00000000000000aa", &b).await.unwrap());
        let job = job_row("00000000000000c1", 1);
        store.create_job(&job, &[("r1".into(), a.id.clone()), ("r2".into(), b.id.clone())]).await.unwrap();
        // r1 was marked dispatched (its message may be on the way); r2 was never sent.
        assert_eq!(store.mark_dispatched(&["r1".into()], Timestamp::from_unix_millis(2)).await.unwrap(), vec!["r1".to_string()]);
        let (ended, on_agents) = store.cancel_job(&job.id, Timestamp::from_unix_millis(3)).await.unwrap().unwrap();
        assert_eq!(ended.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["r2"]);
        assert_eq!(on_agents.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["r1"], "a dispatched run is told to stop");
        let state = |id: &'static str| {
            let store = store.clone();
            async move { store.run(id).await.unwrap().unwrap().state }
        };
        assert_eq!(state("r1").await, RunState::Dispatched, "left to its agent, which reports how it ended");
        assert_eq!(state("r2").await, RunState::Cancelled);
        assert!(store.cancel_job("00000000000000c9", Timestamp::from_unix_millis(3)).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_result_whose_output_has_a_gap_asks_for_the_rest_before_it_is_stored() {
        let (_dir, store, a) = enrolled().await;
        let job = job_row("00000000000000j1", 1);
        store.create_job(&job, &[("r1".into(), a.id.clone())]).await.unwrap();
        let chunk = |offset: u64, data: &str| Record::RunOutput {
            agent_id: a.id.clone(),
            run_id: "r1".into(),
            stream: Stream::Stdout,
            offset,
            data: data.into(),
        };
        let finish = Record::RunFinished {
            agent_id: a.id.clone(),
            finished: Box::new(RunFinished {
                run_id: "r1".into(),
                outcome: Outcome::Succeeded,
                exit_code: Some(0),
                signal: None,
                error: None,
                stdout_len: 9,
                stderr_len: 0,
                stdout_truncated: false,
                stderr_truncated: false,
            }),
            at: Timestamp::from_unix_millis(9),
        };
        // Bytes 3..6 were lost on the way: the server asks for them and keeps the run open.
        let effects = store.record(&[chunk(0, "one"), chunk(6, "ree"), finish.clone()]).await.unwrap();
        assert!(
            effects.contains(&Effect::Resend { agent_id: a.id.clone(), run_id: "r1".into(), stdout_from: 3, stderr_from: 0 }),
            "{effects:?}"
        );
        assert_eq!(store.runs("00000000000000j1").await.unwrap()[0].state, RunState::Pending);
        // The agent resends from 3 (overlapping what is there) and finishes again.
        let effects = store.record(&[chunk(3, "twothree"), finish]).await.unwrap();
        assert!(effects.contains(&Effect::Ack { agent_id: a.id.clone(), run_id: "r1".into() }), "{effects:?}");
        assert_eq!(store.runs("00000000000000j1").await.unwrap()[0].state, RunState::Succeeded);
        // Once the result is stored, the output is settled: later chunks change nothing.
        store.record(&[chunk(11, "forged")]).await.unwrap();
        let out = store.run_output_heads("00000000000000j1", 1 << 20, 1 << 30).await.unwrap();
        assert_eq!(out["r1"].stdout, "onetwothree");
    }

    #[tokio::test]
    async fn output_is_stored_once_within_the_limit_whatever_the_offsets() {
        let (_dir, store, a) = enrolled().await;
        let mut job = job_row("00000000000000j1", 1);
        job.output_limit = 8 * 1024;
        store.create_job(&job, &[("r1".into(), a.id.clone())]).await.unwrap();
        let chunk = |offset: u64, data: &str| Record::RunOutput {
            agent_id: a.id.clone(),
            run_id: "r1".into(),
            stream: Stream::Stdout,
            offset,
            data: data.into(),
        };
        // (0,"ab") then (0,"abcd"): the new tail is stitched on; a differing overlap is refused.
        store.record(&[chunk(0, "ab")]).await.unwrap();
        let effects = store.record(&[chunk(0, "abcd"), chunk(1, "XY")]).await.unwrap();
        assert!(effects.iter().any(|e| matches!(e, Effect::Output { offset: 2, data, .. } if data == "cd")), "{effects:?}");
        let run = store.run("r1").await.unwrap().unwrap();
        assert_eq!(run.stdout_len, 4);
        // The attack: 4 KiB chunks at offsets 4, 5, 6, ... in batches.
        let big = "abcd".repeat(4 * 1024);
        for start in (4..(10 * 1024)).step_by(512) {
            let batch: Vec<Record> = (start..start + 512).map(|o| chunk(o, &big[o as usize..][..4 * 1024])).collect();
            store.record(&batch).await.unwrap();
        }
        let (run, text) = store.run_output("r1", Stream::Stdout, 0, 1 << 20).await.unwrap().unwrap();
        assert_eq!(run.stdout_len, 8 * 1024);
        assert!(run.stdout_truncated);
        assert_eq!(text, big[..8 * 1024]);
        let stored: i64 = sqlx::query_scalar("SELECT SUM(length(data)) FROM run_output").fetch_one(&store.pool).await.unwrap();
        assert_eq!(stored, 8 * 1024, "each byte once, none past the limit");
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM run_output").fetch_one(&store.pool).await.unwrap();
        assert_eq!(rows, 1, "appends extend the last small row instead of adding rows");
        // Pages of the output end where the next begins.
        let (_, page) = store.run_output("r1", Stream::Stdout, 1000, 10).await.unwrap().unwrap();
        assert_eq!(page, big[1000..1010]);
    }
}
