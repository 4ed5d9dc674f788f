//! The store for several servers on one database: PostgreSQL through sqlx.
//!
//! It answers every [`Store`] method as [`super::SqliteStore`] does (the same rows in the same
//! order, the same atomicity, the same returned values), and one conformance suite holds both
//! to that. Both decode into `store::rows`; the SQL is this module's. What differs, and why:
//!
//! - **Writers are concurrent.** The SQLite store serializes writers with a process-wide gate
//!   and SQLite has one writer anyway; here several servers write at once, in READ COMMITTED
//!   transactions. So wherever a write depends on what was read, it is made safe against
//!   other processes with one of three tools, and a comment there says what it protects: a
//!   conditional `UPDATE ... WHERE <guard>` (PostgreSQL re-checks the guard on a row's newest
//!   version once a concurrent writer of that row commits, so exactly one of two racing
//!   callers wins); `SELECT ... FOR UPDATE` on the rows a decision reads, held to commit; and
//!   the audit chain's head row, locked for a whole append or prune so the chain stays one
//!   line.
//! - **Waiting is bounded.** `lock_timeout` is 5 s (SQLite's `busy_timeout`): a lock held
//!   longer fails as [`StoreError::Busy`], as do deadlocks PostgreSQL breaks. A connection is
//!   waited for 5 s at most, so a database that cannot be reached is
//!   [`StoreError::Unavailable`], not a hang.
//! - **Lists bind as arrays.** `id = ANY($1)` with one `TEXT[]`, and many rows inserted with
//!   `UNNEST` over a few arrays, where SQLite binds one value per element and chunks to stay
//!   under its variable limit.
//! - **Text sorts by bytes.** Every TEXT column is `COLLATE "C"` (the migration), SQLite's
//!   BINARY, so orders by hostname or id are the same on both.
//! - **Output is BYTEA.** TEXT cannot hold NUL; stored rows are UTF-8, lengths are
//!   `octet_length`, and pages and heads are cut on character boundaries in Rust, by the same
//!   functions as SQLite's (`rows::output_page`, `rows::Heads`).
//! - **Types are strict.** sqlx decodes BIGINT into `i64` and nothing else: counts are BIGINT,
//!   but `SUM` is NUMERIC (so `COUNT(*) FILTER` instead) and a literal is INTEGER (cast).
//!   BIGINT arithmetic raises on overflow where SQLite goes to REAL, so a run's deadline is
//!   summed in NUMERIC.
//! - **Migrations** are `migrations/postgres`, applied at open under sqlx's advisory lock, so
//!   servers that start together migrate once.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};

use shared::api::{AgentStatus, FleetCounts, HeartbeatSample, Transition};
use shared::job::{AgentRun, JobId, RunId, RunState, StateCounts, Stream};
use shared::{AgentId, Labels, Timestamp};

use super::*;

mod agents;
mod audit;
mod check;
mod identity;
mod jobs;
mod output;
mod records;
mod scope;
mod signing;
mod tokens;
mod trust;
pub use check::{PgInspection, inspect_postgres};

/// Connections per server: enough for the recorder, the dispatcher, the sweeper and a burst of
/// API reads at once, few enough that a dozen servers stay under PostgreSQL's default of 100.
const MAX_CONNECTIONS: u32 = 16;

/// How long a caller waits for a connection, and a statement for a lock.
const WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostgresStore")
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user@host/db`) and applies pending
    /// migrations.
    pub async fn open(url: &str) -> Result<Self> {
        // The URL may hold a password: sqlx's message about it is passed on, the URL never.
        let options = PgConnectOptions::from_str(url).map_err(|e| StoreError::Database(format!("the database URL: {e}")))?;
        Self::open_with(&options).await
    }

    /// As [`PostgresStore::open`], with options already parsed (`--database`, and a password
    /// from a file).
    pub async fn open_with(options: &PgConnectOptions) -> Result<Self> {
        let options = options.clone().application_name("muster-server");
        let pool_options = || PgPoolOptions::new().min_connections(1).acquire_timeout(WAIT);
        // Servers starting together take turns under sqlx's advisory lock: the second waits for
        // the first's migrations however long they take, so they run on a connection of their
        // own without the lock_timeout the store's connections have.
        let migrating = pool_options().max_connections(1).connect_with(options.clone()).await?;
        let migrated = sqlx::migrate!("../migrations/postgres").run(&migrating).await;
        migrating.close().await;
        migrated.map_err(|e| StoreError::Migrate(e.to_string()))?;
        let options = options.options([("lock_timeout", format!("{}ms", WAIT.as_millis()))]);
        let pool = pool_options().max_connections(MAX_CONNECTIONS).connect_with(options).await?;
        Ok(PostgresStore { pool })
    }

    /// Marks a token or an agent revoked; false if there is none, or it already was. The
    /// guard makes one of two concurrent revocations the one that did it.
    async fn revoke(&self, table: &'static str, id: &str, at: Timestamp) -> Result<bool> {
        let sql = format!("UPDATE {table} SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL");
        let done = sqlx::query(AssertSqlSafe(sql)).bind(at.unix_millis()).bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn close(&self) {
        self.pool.close().await;
    }

    async fn insert_api_token(&self, r: &ApiTokenRow) -> Result<()> {
        tokens::insert_api_token(&self.pool, r).await
    }

    async fn api_token(&self, id: &str) -> Result<Option<ApiTokenRow>> {
        tokens::api_token(&self.pool, id).await
    }

    async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRow>> {
        tokens::list_api_tokens(&self.pool).await
    }

    async fn revoke_api_token(&self, id: &str, at: Timestamp) -> Result<bool> {
        self.revoke("api_tokens", id, at).await
    }

    async fn touch_api_token(&self, id: &str, at: Timestamp) -> Result<()> {
        tokens::touch_api_token(&self.pool, id, at).await
    }

    async fn insert_enroll_token(&self, r: &EnrollTokenRow) -> Result<()> {
        tokens::insert_enroll_token(&self.pool, r).await
    }

    async fn enroll_token(&self, id: &str) -> Result<Option<EnrollTokenRow>> {
        tokens::enroll_token(&self.pool, id).await
    }

    async fn list_enroll_tokens(&self) -> Result<Vec<EnrollTokenRow>> {
        tokens::list_enroll_tokens(&self.pool).await
    }

    async fn revoke_enroll_token(&self, id: &str, at: Timestamp) -> Result<bool> {
        self.revoke("enroll_tokens", id, at).await
    }

    async fn enroll_agent(&self, token_id: &str, agent: &NewAgent) -> Result<bool> {
        tokens::enroll_agent(&self.pool, token_id, agent).await
    }

    async fn agent_credential(&self, id: &AgentId) -> Result<Option<AgentCredentialRow>> {
        agents::agent_credential(&self.pool, id).await
    }

    async fn agent(&self, id: &AgentId) -> Result<Option<AgentRow>> {
        agents::agent(&self.pool, id).await
    }

    async fn list_agents(&self, status: Option<AgentStatus>) -> Result<Vec<AgentRow>> {
        agents::list_agents(&self.pool, status).await
    }

    async fn agent_targets(&self) -> Result<Vec<AgentTarget>> {
        agents::agent_targets(&self.pool).await
    }

    async fn transitions(&self, id: &AgentId, limit: u32) -> Result<Vec<Transition>> {
        agents::transitions(&self.pool, id, limit).await
    }

    async fn heartbeats(
        &self,
        id: &AgentId,
        since: Timestamp,
        step: Option<std::time::Duration>,
        limit: u32,
    ) -> Result<Vec<HeartbeatSample>> {
        agents::heartbeats(&self.pool, id, since, step, limit).await
    }

    async fn fleet_counts(&self) -> Result<FleetCounts> {
        agents::fleet_counts(&self.pool).await
    }

    async fn state_totals(&self) -> Result<(Vec<(RunState, u64)>, Vec<(&'static str, u64)>)> {
        jobs::state_totals(&self.pool).await
    }

    async fn revoke_agent(&self, id: &AgentId, at: Timestamp) -> Result<bool> {
        self.revoke("agents", id.as_str(), at).await
    }

    async fn record(&self, batch: &[Record]) -> Result<Vec<Effect>> {
        records::record(&self.pool, batch).await
    }

    async fn mark_node_offline(&self, node: &str, at: Timestamp, reason: &str) -> Result<u64> {
        agents::mark_node_offline(&self.pool, node, at, reason).await
    }

    async fn prune_heartbeats(&self, before: Timestamp, max_rows: u32) -> Result<u64> {
        agents::prune_heartbeats(&self.pool, before, max_rows).await
    }

    async fn audit(&self, e: &AuditEntry) -> Result<Vec<shared::api::AuditEntry>> {
        audit::append_one(&self.pool, e).await
    }

    async fn audit_entries(&self, q: &AuditQuery) -> Result<Vec<shared::api::AuditEntry>> {
        audit::page(&self.pool, q).await
    }

    async fn prune_audit(&self, before: Timestamp, max_rows: u32, now: Timestamp) -> Result<Vec<shared::api::AuditEntry>> {
        audit::prune(&self.pool, before, max_rows, now).await
    }

    async fn prune_jobs(&self, before: Timestamp, max_jobs: u32) -> Result<u64> {
        audit::prune_jobs(&self.pool, before, max_jobs).await
    }

    async fn create_job(&self, job: &JobRow, runs: &[(RunId, AgentId)]) -> Result<()> {
        jobs::create_job(&self.pool, job, runs).await
    }

    async fn job(&self, id: &str) -> Result<Option<JobRow>> {
        jobs::job(&self.pool, id).await
    }

    async fn list_jobs(&self, limit: u32) -> Result<Vec<JobRow>> {
        jobs::list_jobs(&self.pool, limit).await
    }

    async fn active_jobs(&self) -> Result<Vec<JobRow>> {
        jobs::active_jobs(&self.pool).await
    }

    async fn run_counts(&self, job_ids: &[JobId]) -> Result<HashMap<JobId, StateCounts>> {
        jobs::run_counts(&self.pool, job_ids).await
    }

    async fn runs(&self, job_id: &str) -> Result<Vec<RunRow>> {
        jobs::runs(&self.pool, job_id).await
    }

    async fn run(&self, run_id: &str) -> Result<Option<RunRow>> {
        jobs::run(&self.pool, run_id).await
    }

    async fn agent_runs(&self, agent_id: &AgentId, limit: u32) -> Result<Vec<AgentRun>> {
        jobs::agent_runs(&self.pool, agent_id, limit).await
    }

    async fn run_output_heads(&self, job_id: &str, head: u64, total: u64) -> Result<HashMap<RunId, RunOutputText>> {
        jobs::run_output_heads(&self.pool, job_id, head, total).await
    }

    async fn run_output(&self, run_id: &str, stream: Stream, offset: u64, limit: u64) -> Result<Option<(RunRow, String)>> {
        jobs::run_output(&self.pool, run_id, stream, offset, limit).await
    }

    async fn pending_runs(&self, job_id: &str) -> Result<Vec<OpenRun>> {
        jobs::pending_runs(&self.pool, job_id).await
    }

    async fn mark_dispatched(&self, run_ids: &[RunId], at: Timestamp) -> Result<Vec<RunId>> {
        jobs::mark_dispatched(&self.pool, run_ids, at).await
    }

    async fn mark_job_dispatched(&self, job_id: &str, at: Timestamp) -> Result<Vec<RunId>> {
        jobs::mark_job_dispatched(&self.pool, job_id, at).await
    }

    async fn end_runs(&self, run_ids: &[RunId], state: RunState, error: &str, at: Timestamp) -> Result<Vec<RunId>> {
        jobs::end_runs(&self.pool, run_ids, state, error, at).await
    }

    async fn redeliver(&self, run_ids: &[RunId]) -> Result<()> {
        jobs::redeliver(&self.pool, run_ids).await
    }

    async fn open_runs_for_agent(&self, agent_id: &AgentId) -> Result<Vec<OpenRun>> {
        jobs::open_runs_for_agent(&self.pool, agent_id).await
    }

    async fn overdue_runs(&self, now: Timestamp, grace_ms: u64) -> Result<Vec<OpenRun>> {
        jobs::overdue_runs(&self.pool, now, grace_ms).await
    }

    async fn finish_job_if_done(&self, job_id: &str, at: Timestamp) -> Result<bool> {
        jobs::finish_job_if_done(&self.pool, job_id, at).await
    }

    async fn cancel_job(&self, job_id: &str, at: Timestamp) -> Result<Option<(Vec<OpenRun>, Vec<OpenRun>)>> {
        jobs::cancel_job(&self.pool, job_id, at).await
    }

    async fn signed_agents(&self, job_id: &str) -> Result<Vec<AgentId>> {
        signing::signed_agents(&self.pool, job_id).await
    }

    async fn insert_key_revocation(&self, r: &shared::signing::KeyRevocation, at: Timestamp, by: &str) -> Result<bool> {
        signing::insert_key_revocation(&self.pool, r, at, by).await
    }

    async fn key_revocations(&self) -> Result<Vec<shared::signing::KeyRevocation>> {
        signing::key_revocations(&self.pool).await
    }

    async fn set_agent_labels(&self, id: &AgentId, expected: &Labels, token_labels: &Labels, labels: &Labels) -> Result<bool> {
        scope::set_agent_labels(&self.pool, id, expected, token_labels, labels).await
    }

    async fn agent_labels(&self, ids: &[AgentId]) -> Result<HashMap<AgentId, Labels>> {
        scope::agent_labels(&self.pool, ids).await
    }

    async fn begin_rotation(&self, id: &AgentId, pending_hash: &[u8], at: Timestamp, gap_ms: u64) -> Result<bool> {
        identity::begin_rotation(&self.pool, id, pending_hash, at, gap_ms).await
    }

    async fn complete_rotation(&self, id: &AgentId, pending_hash: &[u8], at: Timestamp) -> Result<bool> {
        identity::complete_rotation(&self.pool, id, pending_hash, at).await
    }

    async fn retired_credentials(&self, id: &AgentId) -> Result<Vec<Vec<u8>>> {
        identity::retired_credentials(&self.pool, id).await
    }

    async fn clone_seen(&self, id: &AgentId, at: Timestamp, from: &str) -> Result<()> {
        identity::clone_seen(&self.pool, id, at, from).await
    }

    async fn request_rotation(&self, id: &AgentId, at: Timestamp) -> Result<bool> {
        identity::request_rotation(&self.pool, id, at).await
    }

    async fn accept_agent(&self, id: &AgentId, at: Timestamp, by: &str) -> Result<Acceptance> {
        identity::accept_agent(&self.pool, id, at, by).await
    }

    async fn approve_job(&self, job_id: &str, token: &str, by: &str, at: Timestamp) -> Result<bool> {
        jobs::approve_job(&self.pool, job_id, token, by, at).await
    }

    async fn agent_trusted_keys(&self, ids: &[AgentId]) -> Result<HashMap<AgentId, Vec<shared::signing::PublicKey>>> {
        trust::agent_trusted_keys(&self.pool, ids).await
    }
}

/// Agent ids as one `TEXT[]` bind, for `= ANY($n)`.
fn id_array(ids: &[AgentId]) -> Vec<&str> {
    ids.iter().map(AgentId::as_str).collect()
}
