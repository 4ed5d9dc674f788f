//! The embedded store: one SQLite file in WAL mode through sqlx.
//!
//! Durability: `synchronous = FULL`, so a committed transaction survives a power cut as well
//! as a crash. Throughput comes from batching, not from weaker syncs: the recorder commits many
//! heartbeats per transaction with multi-row statements.
//!
//! This file holds the pool, the writer gate, the conversions every query shares and the
//! `Store` impl, which delegates to one submodule per concern. A method that writes takes the
//! gate here, around the whole call.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, QueryBuilder, Sqlite, SqlitePool};

use shared::api::{AgentStatus, FleetCounts, HeartbeatSample, Transition};
use shared::job::{AgentRun, JobId, RunId, RunState, StateCounts, Stream};
use shared::{AgentId, Labels, Timestamp};

use super::rows::{labels_json, parse_agent_id, parse_labels, parse_run_state, stream_code, to_i64, to_u64};
use super::*;

/// Rows per multi-row statement: 10 columns each stays far below SQLite's variable limit.
const ROWS_PER_STATEMENT: usize = 500;

mod agents;
mod audit;
mod check;
pub mod identity;
mod jobs;
mod output;
mod records;
mod scope;
mod signing;
mod tokens;
mod trust;
pub use super::{InspectError, JOBS_PER_PRUNE, SERVER_ACTOR};
pub use check::{Inspection, inspect};

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
        let pool = SqlitePoolOptions::new().max_connections(8).min_connections(1).connect_with(options).await?;
        sqlx::migrate!("../migrations/sqlite").run(&pool).await.map_err(|e| StoreError::Migrate(e.to_string()))?;
        Ok(SqliteStore { pool, write: Arc::new(tokio::sync::Mutex::new(())) })
    }

    async fn writer(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.write.lock().await
    }

    /// Marks a token or an agent revoked; false if there is none, or it already was.
    async fn revoke(&self, table: &'static str, id: &str, at: Timestamp) -> Result<bool> {
        let _gate = self.writer().await;
        let sql = format!("UPDATE {table} SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL");
        let done = sqlx::query(AssertSqlSafe(sql)).bind(at.unix_millis()).bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn close(&self) {
        self.pool.close().await;
    }

    async fn insert_api_token(&self, r: &ApiTokenRow) -> Result<()> {
        let _gate = self.writer().await;
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
        let _gate = self.writer().await;
        tokens::touch_api_token(&self.pool, id, at).await
    }

    async fn insert_enroll_token(&self, r: &EnrollTokenRow) -> Result<()> {
        let _gate = self.writer().await;
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
        let _gate = self.writer().await;
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
        let _gate = self.writer().await;
        records::record(&self.pool, batch).await
    }

    async fn mark_node_offline(&self, node: &str, at: Timestamp, reason: &str) -> Result<u64> {
        let _gate = self.writer().await;
        agents::mark_node_offline(&self.pool, node, at, reason).await
    }

    async fn prune_heartbeats(&self, before: Timestamp, max_rows: u32) -> Result<u64> {
        let _gate = self.writer().await;
        agents::prune_heartbeats(&self.pool, before, max_rows).await
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
        let _gate = self.writer().await;
        jobs::mark_dispatched(&self.pool, run_ids, at).await
    }

    async fn mark_job_dispatched(&self, job_id: &str, at: Timestamp) -> Result<Vec<RunId>> {
        let _gate = self.writer().await;
        jobs::mark_job_dispatched(&self.pool, job_id, at).await
    }

    async fn end_runs(&self, run_ids: &[RunId], state: RunState, error: &str, at: Timestamp) -> Result<Vec<RunId>> {
        let _gate = self.writer().await;
        jobs::end_runs(&self.pool, run_ids, state, error, at).await
    }

    async fn redeliver(&self, run_ids: &[RunId]) -> Result<()> {
        let _gate = self.writer().await;
        jobs::redeliver(&self.pool, run_ids).await
    }

    async fn open_runs_for_agent(&self, agent_id: &AgentId) -> Result<Vec<OpenRun>> {
        jobs::open_runs_for_agent(&self.pool, agent_id).await
    }

    async fn overdue_runs(&self, now: Timestamp, grace_ms: u64) -> Result<Vec<OpenRun>> {
        jobs::overdue_runs(&self.pool, now, grace_ms).await
    }

    async fn finish_job_if_done(&self, job_id: &str, at: Timestamp) -> Result<bool> {
        let _gate = self.writer().await;
        jobs::finish_job_if_done(&self.pool, job_id, at).await
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
        jobs::approve_job(&self.pool, job_id, token, by, at).await
    }

    async fn agent_trusted_keys(&self, ids: &[AgentId]) -> Result<HashMap<AgentId, Vec<shared::signing::PublicKey>>> {
        trust::agent_trusted_keys(&self.pool, ids).await
    }

    async fn agent_labels(&self, ids: &[AgentId]) -> Result<HashMap<AgentId, Labels>> {
        scope::agent_labels(&self.pool, ids).await
    }

    async fn cancel_job(&self, job_id: &str, at: Timestamp) -> Result<Option<(Vec<OpenRun>, Vec<OpenRun>)>> {
        let _gate = self.writer().await;
        jobs::cancel_job(&self.pool, job_id, at).await
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
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
