//! Persistence, behind one seam. [`Store`] is everything the server asks of its database;
//! [`sqlite::SqliteStore`] is the embedded default, [`postgres::PostgresStore`] the one for
//! several servers on one database. Both decode into the row structs of `rows` and map sqlx's
//! errors through the one `From<sqlx::Error>` here; the SQL is each backend's own.
//!
//! **Invariant:** all SQL lives below this module. Callers see row types, never SQL errors:
//! [`StoreError`] says what kind of failure happened without leaking statement text.

pub mod batch;
pub mod postgres;
mod rows;
pub mod sqlite;

#[cfg(test)]
pub(crate) mod conformance;

use async_trait::async_trait;
use shared::api::{AgentStatus, FleetCounts, HeartbeatSample, Role, Transition};
use shared::job::{JobId, RunId, RunState, StateCounts, Stream};
use shared::protocol::{Metrics, RunFinished};
use shared::{AgentId, Labels, Timestamp};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Who the entries the server writes on its own behalf (genesis, pruning) are by.
pub const SERVER_ACTOR: &str = "muster-server";

/// Jobs deleted per transaction by retention: each takes its runs and their output along.
pub const JOBS_PER_PRUNE: u32 = 50;

/// Retired credentials kept per agent. A copy older than this many rotations is refused as an
/// unknown credential instead of being reported as a clone.
pub const RETIRED_KEPT: i64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The disk is full: nothing was written, and the caller may retry later.
    #[error("the database disk is full")]
    Full,
    /// Another writer held the database too long (or PostgreSQL gave up a deadlock or a
    /// serialization conflict): nothing was written, and the caller may retry.
    #[error("the database is busy")]
    Busy,
    /// The database cannot be reached: the connection failed or was lost, no connection came
    /// free in time, or the server is shutting down or starting. The caller may retry.
    #[error("the database is unavailable")]
    Unavailable,
    #[error("stored data is not valid: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("migrating the database: {0}")]
    Migrate(String),
    /// A row with this key exists (a job id chosen twice).
    #[error("already exists")]
    Duplicate,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The one mapping from sqlx's errors to [`StoreError`]: by SQLSTATE for PostgreSQL, by result
/// code for SQLite, and by kind for failures to reach the database at all.
impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => return StoreError::Unavailable,
            sqlx::Error::Database(d) => {
                let mapped = match d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    Some(pg) => from_sqlstate(pg.code()),
                    None => from_sqlite_code(d.code().and_then(|c| c.parse::<i32>().ok())),
                };
                if let Some(mapped) = mapped {
                    return mapped;
                }
            }
            _ => {}
        }
        StoreError::Database(e.to_string())
    }
}

/// PostgreSQL's SQLSTATE codes (appendix A of its manual) that mean more than "failed".
fn from_sqlstate(code: &str) -> Option<StoreError> {
    Some(match code {
        "23505" => StoreError::Duplicate, // unique_violation
        // too_many_connections: the server refuses sessions, which says nothing about its disk.
        "53300" => StoreError::Unavailable,
        // disk_full, insufficient_resources, out_of_memory, configuration_limit_exceeded.
        c if c.starts_with("53") => StoreError::Full,
        // serialization_failure, deadlock_detected, lock_not_available (our lock_timeout).
        "40001" | "40P01" | "55P03" => StoreError::Busy,
        // Connection exceptions; admin_shutdown, crash_shutdown, cannot_connect_now; and a
        // standby (a failover the pool has not followed yet) refusing a write.
        c if c.starts_with("08") => StoreError::Unavailable,
        "57P01" | "57P02" | "57P03" | "25006" => StoreError::Unavailable,
        _ => return None,
    })
}

/// SQLite's result codes (extended for constraints, primary otherwise).
fn from_sqlite_code(code: Option<i32>) -> Option<StoreError> {
    let code = code?;
    // SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE (extended codes).
    if matches!(code, 1555 | 2067) {
        return Some(StoreError::Duplicate);
    }
    // The primary result code is the low byte of the extended one.
    match code & 0xff {
        13 => Some(StoreError::Full),    // SQLITE_FULL
        5 | 6 => Some(StoreError::Busy), // SQLITE_BUSY, SQLITE_LOCKED
        _ => None,
    }
}

/// Why `muster-server check` could not inspect a database, with sqlx's message.
#[derive(Debug)]
pub enum InspectError {
    Open(String),
    Read(String),
}

#[derive(Clone, Debug)]
pub struct ApiTokenRow {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub secret_hash: Vec<u8>,
    pub created_by: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    pub last_used_at: Option<Timestamp>,
    /// The agents the token may see and target; none for the whole fleet.
    pub scope: Option<shared::Selector>,
}

#[derive(Clone, Debug)]
pub struct EnrollTokenRow {
    pub id: String,
    pub secret_hash: Vec<u8>,
    pub created_by: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub uses_total: u32,
    pub uses_left: u32,
    pub labels: Labels,
    pub revoked_at: Option<Timestamp>,
    /// Agents enrolled with it wait as pending until an administrator accepts them.
    pub approve: bool,
}

/// What the handshake needs to authenticate an agent.
#[derive(Clone, Debug)]
pub struct AgentCredentialRow {
    pub id: AgentId,
    pub secret_hash: Vec<u8>,
    /// A credential issued by a rotation and not yet confirmed: it works too, and the first
    /// connection presenting it completes the rotation.
    pub pending_secret_hash: Option<Vec<u8>>,
    pub revoked: bool,
    pub token_labels: Labels,
    /// An administrator asked for a rotation that has not happened yet.
    pub rotation_requested: bool,
    /// Waiting for an administrator's approval: connected, but sent no runs.
    pub approval_pending: bool,
}

/// A new agent, created when an enrollment token is used.
#[derive(Clone, Debug)]
pub struct NewAgent {
    pub id: AgentId,
    pub secret_hash: Vec<u8>,
    pub token_labels: Labels,
    pub at: Timestamp,
    /// Enrolled with an `approve` token: pending until accepted.
    pub approval_pending: bool,
}

/// What accepting a pending agent did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acceptance {
    Accepted,
    /// The agent exists but was not waiting for approval.
    NotPending,
    /// No such agent, or it is revoked.
    Unknown,
}

#[derive(Clone, Debug)]
pub struct AgentRow {
    pub id: AgentId,
    pub hostname: String,
    pub labels: Labels,
    pub status: AgentStatus,
    pub status_since: Timestamp,
    pub enrolled_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
    pub heartbeat_interval_ms: Option<u64>,
    pub agent_version: Option<String>,
    pub last_heartbeat_at: Option<Timestamp>,
    pub last_metrics: Option<Metrics>,
    pub connected: bool,
    pub node: Option<String>,
    pub remote_addr: Option<String>,
    pub connected_at: Option<Timestamp>,
    pub disconnected_at: Option<Timestamp>,
    pub approval_pending: bool,
    /// When the current credential was issued: at enrollment, or by the last rotation.
    pub credential_issued_at: Timestamp,
    pub rotation_requested_at: Option<Timestamp>,
    /// The last time a retired credential of this agent was presented, and from where.
    pub clone_seen: Option<(Timestamp, String)>,
    /// What the agent reported trusting in its last `hello`; empty: it runs unsigned jobs.
    pub trusted_keys: Vec<shared::signing::PublicKey>,
}

/// What targeting needs of an enrolled, unrevoked agent.
#[derive(Clone, Debug)]
pub struct AgentTarget {
    pub id: AgentId,
    pub hostname: String,
    pub labels: Labels,
    /// Waiting for an administrator's approval: never a target.
    pub approval_pending: bool,
}

/// One change from a live session, written by the recorder in batches, in arrival order.
#[derive(Clone, Debug)]
pub enum Record {
    Connected {
        agent_id: AgentId,
        at: Timestamp,
        hostname: String,
        labels: Labels,
        heartbeat_interval_ms: u64,
        agent_version: String,
        node: String,
        remote_addr: String,
        /// The operator keys the agent's config trusts, from its `hello`.
        trusted_keys: Vec<shared::signing::PublicKey>,
    },
    Heartbeat {
        agent_id: AgentId,
        at: Timestamp,
        seq: u64,
        metrics: Box<Metrics>,
    },
    Transition {
        agent_id: AgentId,
        at: Timestamp,
        from: Option<AgentStatus>,
        to: AgentStatus,
        reason: String,
    },
    Disconnected {
        agent_id: AgentId,
        at: Timestamp,
    },
    /// The agent holds the run in its ledger.
    RunAccepted {
        agent_id: AgentId,
        run_id: RunId,
        at: Timestamp,
    },
    RunStarted {
        agent_id: AgentId,
        run_id: RunId,
        at: Timestamp,
    },
    RunOutput {
        agent_id: AgentId,
        run_id: RunId,
        stream: Stream,
        offset: u64,
        data: String,
    },
    RunFinished {
        agent_id: AgentId,
        finished: Box<RunFinished>,
        at: Timestamp,
    },
}

/// What writing a batch changed, for the recorder to announce once it is durable.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// The run's result is stored: tell the agent it may forget it.
    Ack {
        agent_id: AgentId,
        run_id: RunId,
    },
    /// The run's output has a gap: ask the agent for it again.
    Resend {
        agent_id: AgentId,
        run_id: RunId,
        stdout_from: u64,
        stderr_from: u64,
    },
    RunState {
        job_id: JobId,
        run_id: RunId,
        agent_id: AgentId,
        state: RunState,
        exit_code: Option<i32>,
        error: Option<String>,
        /// For a result: how long since the run was dispatched.
        latency_ms: Option<u64>,
    },
    Output {
        job_id: JobId,
        run_id: RunId,
        agent_id: AgentId,
        stream: Stream,
        offset: u64,
        data: String,
    },
}

/// A job as stored.
#[derive(Clone, Debug)]
pub struct JobRow {
    pub id: JobId,
    pub created_at: Timestamp,
    pub created_by: String,
    pub target: shared::job::Target,
    pub command: shared::job::CommandSpec,
    pub timeout_ms: u64,
    pub ttl_ms: u64,
    pub concurrency: Option<shared::job::Concurrency>,
    pub max_in_flight: Option<u32>,
    pub max_errors: Option<u32>,
    pub output_limit: u64,
    pub expires_at: Timestamp,
    pub cancelled_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    /// The operator's signature; the agents it covers are in [`Store::signed_agents`].
    pub signature: Option<shared::signing::JobSignature>,
    /// The scope of the token that created the job: the dispatcher sends a run only to an
    /// agent that still matches it.
    pub scope: Option<shared::Selector>,
    /// Set when the job needs a second admin's approval before anything is dispatched.
    pub approval: Option<JobApproval>,
}

/// A job waiting for, or given, a second admin's approval.
#[derive(Clone, Debug, PartialEq)]
pub struct JobApproval {
    /// The operator token that created the job, which cannot approve it.
    pub creator_token: String,
    pub approved: Option<(String, Timestamp)>,
}

impl JobRow {
    /// True while the job needs an approval it does not have: nothing of it is dispatched.
    pub fn awaiting_approval(&self) -> bool {
        self.approval.as_ref().is_some_and(|a| a.approved.is_none())
    }
}

#[derive(Clone, Debug)]
pub struct RunRow {
    pub id: RunId,
    pub job_id: JobId,
    pub agent_id: AgentId,
    pub hostname: String,
    pub state: RunState,
    pub accepted: bool,
    pub dispatched_at: Option<Timestamp>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Bytes of each stream the server holds (from 0, without a gap).
    pub stdout_len: u64,
    pub stderr_len: u64,
}

/// A run not yet final, with what dispatching needs to know about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenRun {
    pub id: RunId,
    pub job_id: JobId,
    pub agent_id: AgentId,
    pub state: RunState,
    pub accepted: bool,
}

/// The stitched output of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunOutputText {
    pub stdout: String,
    pub stderr: String,
}

/// An audit entry to append: the store gives it its id and chains it (`prev_hash`, `hash`).
/// Never a secret in any field: tokens are named by their ids.
#[derive(Clone, Debug)]
pub struct AuditEntry {
    pub at: Timestamp,
    pub actor: String,
    /// The peer's address, when a peer caused the entry.
    pub address: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub detail: serde_json::Value,
}

/// Which entries `GET /api/v1/audit` wants: newest first, ids below `before`, at most `limit`.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    /// The whole actor, or the id in its parentheses.
    pub actor: Option<String>,
    /// An action (`token.create`) or a family of them (`token`).
    pub action: Option<String>,
    pub target: Option<String>,
    /// `at >= since`.
    pub since: Option<Timestamp>,
    /// `at < until`.
    pub until: Option<Timestamp>,
    pub before: Option<u64>,
    pub limit: u32,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Closes the pool: waits for queries in flight, then lets connections go.
    async fn close(&self);

    // Operator tokens.
    async fn insert_api_token(&self, row: &ApiTokenRow) -> Result<()>;
    async fn api_token(&self, id: &str) -> Result<Option<ApiTokenRow>>;
    /// Oldest first; tokens created in the same millisecond by id.
    async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRow>>;
    async fn revoke_api_token(&self, id: &str, at: Timestamp) -> Result<bool>;
    async fn touch_api_token(&self, id: &str, at: Timestamp) -> Result<()>;

    // Enrollment.
    async fn insert_enroll_token(&self, row: &EnrollTokenRow) -> Result<()>;
    async fn enroll_token(&self, id: &str) -> Result<Option<EnrollTokenRow>>;
    /// Oldest first; tokens created in the same millisecond by id.
    async fn list_enroll_tokens(&self) -> Result<Vec<EnrollTokenRow>>;
    async fn revoke_enroll_token(&self, id: &str, at: Timestamp) -> Result<bool>;
    /// Takes one use of the token and creates the agent, atomically. False, and nothing
    /// written, if the token is expired, revoked or used up by the time this runs.
    async fn enroll_agent(&self, token_id: &str, agent: &NewAgent) -> Result<bool>;

    // Agents.
    async fn agent_credential(&self, id: &AgentId) -> Result<Option<AgentCredentialRow>>;
    async fn agent(&self, id: &AgentId) -> Result<Option<AgentRow>>;
    async fn list_agents(&self, status: Option<AgentStatus>) -> Result<Vec<AgentRow>>;
    /// Every agent that is not revoked, with only what a target matches on.
    async fn agent_targets(&self) -> Result<Vec<AgentTarget>>;
    async fn transitions(&self, id: &AgentId, limit: u32) -> Result<Vec<Transition>>;
    /// Stored heartbeats since `since`, oldest first (by `seq` within a millisecond). With a
    /// `step`, one sample per step-long bucket: each field the highest in the bucket, `at` the
    /// bucket's start.
    async fn heartbeats(
        &self,
        id: &AgentId,
        since: Timestamp,
        step: Option<std::time::Duration>,
        limit: u32,
    ) -> Result<Vec<HeartbeatSample>>;
    async fn fleet_counts(&self) -> Result<FleetCounts>;
    /// Runs by state (in order of the state's name), and jobs by `running`/`finished`, over
    /// everything stored.
    async fn state_totals(&self) -> Result<(Vec<(RunState, u64)>, Vec<(&'static str, u64)>)>;
    async fn revoke_agent(&self, id: &AgentId, at: Timestamp) -> Result<bool>;

    /// Writes a batch of session records in one transaction.
    async fn record(&self, batch: &[Record]) -> Result<Vec<Effect>>;
    /// At start-up: agents this node held are no longer connected. Returns how many changed.
    async fn mark_node_offline(&self, node: &str, at: Timestamp, reason: &str) -> Result<u64>;
    /// Deletes up to `max_rows` of the oldest heartbeats older than `before`; returns how many
    /// went.
    async fn prune_heartbeats(&self, before: Timestamp, max_rows: u32) -> Result<u64>;

    /// Appends an entry to the audit chain in one transaction with reading the chain's head.
    /// Returns what was written: the entry, after the genesis entry if the chain began now.
    async fn audit(&self, entry: &AuditEntry) -> Result<Vec<shared::api::AuditEntry>>;
    async fn audit_entries(&self, query: &AuditQuery) -> Result<Vec<shared::api::AuditEntry>>;
    /// Removes up to `max_rows` of the oldest audit entries older than `before` and appends an
    /// `audit.pruned` entry naming the last one removed (returned; nothing if none was old).
    async fn prune_audit(&self, before: Timestamp, max_rows: u32, now: Timestamp) -> Result<Vec<shared::api::AuditEntry>>;
    /// Deletes up to `max_jobs` jobs that finished before `before` (the earliest finished first,
    /// by id within a millisecond), with their runs and output; returns how many jobs went.
    /// Jobs still open are never deleted.
    async fn prune_jobs(&self, before: Timestamp, max_jobs: u32) -> Result<u64>;

    // Jobs.
    /// Stores a job and all its runs (state `pending`) in one transaction.
    async fn create_job(&self, job: &JobRow, runs: &[(RunId, AgentId)]) -> Result<()>;
    async fn job(&self, id: &str) -> Result<Option<JobRow>>;
    /// Newest first.
    async fn list_jobs(&self, limit: u32) -> Result<Vec<JobRow>>;
    /// Jobs not finished, oldest first; jobs created in the same millisecond by id.
    async fn active_jobs(&self) -> Result<Vec<JobRow>>;
    async fn run_counts(&self, job_ids: &[JobId]) -> Result<std::collections::HashMap<JobId, StateCounts>>;
    async fn runs(&self, job_id: &str) -> Result<Vec<RunRow>>;
    /// An agent's runs, newest job first.
    async fn agent_runs(&self, agent_id: &AgentId, limit: u32) -> Result<Vec<shared::job::AgentRun>>;
    async fn run(&self, run_id: &str) -> Result<Option<RunRow>>;
    /// The first `head` bytes of each stream of each of the job's runs, and no more than
    /// `total` bytes in all (runs past that get less or nothing; their lengths tell).
    async fn run_output_heads(&self, job_id: &str, head: u64, total: u64) -> Result<std::collections::HashMap<RunId, RunOutputText>>;
    /// Up to `limit` bytes of one stream of a run from `offset`, ending on a character
    /// boundary; None if there is no such run.
    async fn run_output(&self, run_id: &str, stream: Stream, offset: u64, limit: u64) -> Result<Option<(RunRow, String)>>;
    /// Pending runs of a job in dispatch order.
    async fn pending_runs(&self, job_id: &str) -> Result<Vec<OpenRun>>;
    /// Moves pending runs to `dispatched`; returns the ones that moved, in id order.
    async fn mark_dispatched(&self, run_ids: &[RunId], at: Timestamp) -> Result<Vec<RunId>>;
    /// Moves every pending run of a job to `dispatched`; returns the ones that moved, in id
    /// order.
    async fn mark_job_dispatched(&self, job_id: &str, at: Timestamp) -> Result<Vec<RunId>>;
    /// Ends runs that are not final yet with `state`; returns the ones that changed, in id order.
    async fn end_runs(&self, run_ids: &[RunId], state: RunState, error: &str, at: Timestamp) -> Result<Vec<RunId>>;
    /// Moves dispatched runs the agent never accepted back to `pending`, for redelivery.
    async fn redeliver(&self, run_ids: &[RunId]) -> Result<()>;
    /// The agent's runs not final yet, by job id, then in dispatch order.
    async fn open_runs_for_agent(&self, agent_id: &AgentId) -> Result<Vec<OpenRun>>;
    /// Dispatched or running runs whose report is overdue: no result by `dispatched_at` (or
    /// `started_at`) + the job's timeout + `grace`. By job id, then in dispatch order.
    async fn overdue_runs(&self, now: Timestamp, grace_ms: u64) -> Result<Vec<OpenRun>>;
    /// Sets `finished_at` if every run of the job is final; true if it did.
    async fn finish_job_if_done(&self, job_id: &str, at: Timestamp) -> Result<bool>;
    /// Marks the job cancelled and ends its pending runs `cancelled`, in one transaction. A
    /// finished job is left as it is (two empty lists).
    /// Returns those, and the runs already sent (dispatched or running), which only their agent
    /// can stop: the caller sends them `cancel`.
    async fn cancel_job(&self, job_id: &str, at: Timestamp) -> Result<Option<(Vec<OpenRun>, Vec<OpenRun>)>>;

    // Signed jobs.
    /// The agents a signed job was signed for (empty for an unsigned job).
    async fn signed_agents(&self, job_id: &str) -> Result<Vec<AgentId>>;
    /// Stores a key revocation; false if that key was already revoked.
    async fn insert_key_revocation(&self, r: &shared::signing::KeyRevocation, at: Timestamp, by: &str) -> Result<bool>;
    async fn key_revocations(&self) -> Result<Vec<shared::signing::KeyRevocation>>;

    // Labels edited by operators.
    /// Replaces an agent's trusted labels and its effective ones, if its trusted labels are
    /// still `expected` (so two edits at once cannot lose one); false if they changed or the
    /// agent is revoked or unknown.
    async fn set_agent_labels(&self, id: &AgentId, expected: &Labels, token_labels: &Labels, labels: &Labels) -> Result<bool>;
    /// The effective labels of these agents, as stored now (revoked ones left out).
    async fn agent_labels(&self, ids: &[AgentId]) -> Result<std::collections::HashMap<AgentId, Labels>>;

    // Agent identity over time.
    /// Records `pending_hash` as the agent's next credential, beside the current one. False if
    /// the agent is revoked or unknown, or had a credential issued less than `gap_ms` ago.
    async fn begin_rotation(&self, id: &AgentId, pending_hash: &[u8], at: Timestamp, gap_ms: u64) -> Result<bool>;
    /// Makes the pending credential `pending_hash` the only one, retiring the old one. False if
    /// that is not the pending credential (already completed, or replaced by a later issue).
    async fn complete_rotation(&self, id: &AgentId, pending_hash: &[u8], at: Timestamp) -> Result<bool>;
    /// Hashes of the agent's credentials retired by rotations, newest [`RETIRED_KEPT`] only,
    /// in byte order of the hashes.
    async fn retired_credentials(&self, id: &AgentId) -> Result<Vec<Vec<u8>>>;
    /// Notes that a retired credential of the agent was presented from `from`.
    async fn clone_seen(&self, id: &AgentId, at: Timestamp, from: &str) -> Result<()>;
    /// Asks for the agent's credential to be rotated at its next chance. False if unknown.
    async fn request_rotation(&self, id: &AgentId, at: Timestamp) -> Result<bool>;
    async fn accept_agent(&self, id: &AgentId, at: Timestamp, by: &str) -> Result<Acceptance>;

    /// Records the approval of a job that waits for one, unless `token` created it or it was
    /// cancelled or finished meanwhile; false if nothing changed.
    async fn approve_job(&self, job_id: &str, token: &str, by: &str, at: Timestamp) -> Result<bool>;
    /// The keys those of these agents that require signed jobs reported trusting; an agent
    /// that reported none (or is revoked) is left out.
    async fn agent_trusted_keys(&self, ids: &[AgentId]) -> Result<std::collections::HashMap<AgentId, Vec<shared::signing::PublicKey>>>;
}

/// Writes an audit entry, for code without an [`crate::audit::Auditor`] (`bootstrap`, which
/// runs beside the server on its database). A failure is logged loudly but does not undo the
/// audited action.
pub async fn audit_or_log(store: &dyn Store, entry: AuditEntry) {
    if let Err(e) = store.audit(&entry).await {
        tracing::error!(error = %e, action = %entry.action, actor = %entry.actor, "could not write audit entry");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_errors_map_by_sqlstate() {
        let kind = |code: &str| from_sqlstate(code).map(|e| e.to_string());
        assert_eq!(kind("23505"), Some(StoreError::Duplicate.to_string()));
        assert_eq!(kind("53100"), Some(StoreError::Full.to_string()));
        assert_eq!(kind("53200"), Some(StoreError::Full.to_string()));
        assert_eq!(kind("53300"), Some(StoreError::Unavailable.to_string()), "too many connections is not a full disk");
        for busy in ["40001", "40P01", "55P03"] {
            assert_eq!(kind(busy), Some(StoreError::Busy.to_string()), "{busy}");
        }
        for gone in ["08000", "08006", "57P01", "57P02", "57P03", "25006"] {
            assert_eq!(kind(gone), Some(StoreError::Unavailable.to_string()), "{gone}");
        }
        assert_eq!(kind("23503"), None, "a foreign key violation is a plain database error");
        assert!(matches!(StoreError::from(sqlx::Error::PoolTimedOut), StoreError::Unavailable));
    }

    #[test]
    fn sqlite_errors_map_by_result_code() {
        assert!(matches!(from_sqlite_code(Some(2067)), Some(StoreError::Duplicate)));
        assert!(matches!(from_sqlite_code(Some(1555)), Some(StoreError::Duplicate)));
        assert!(matches!(from_sqlite_code(Some(13)), Some(StoreError::Full)));
        assert!(matches!(from_sqlite_code(Some(517)), Some(StoreError::Busy)), "SQLITE_BUSY_SNAPSHOT");
        assert!(from_sqlite_code(Some(787)).is_none(), "a foreign key violation is a plain database error");
    }
}
