//! Persistence, behind one seam. [`Store`] is everything the server asks of its database;
//! [`sqlite::SqliteStore`] is the embedded default. A PostgreSQL store for clustered servers is
//! another implementation of the same trait.
//!
//! **Invariant:** all SQL lives below this module. Callers see row types, never SQL errors:
//! [`StoreError`] says what kind of failure happened without leaking statement text.

pub mod sqlite;

use async_trait::async_trait;
use shared::api::{AgentStatus, FleetCounts, HeartbeatSample, Role, Transition};
use shared::protocol::Metrics;
use shared::{AgentId, Labels, Timestamp};

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The disk is full: nothing was written, and the caller may retry later.
    #[error("the database disk is full")]
    Full,
    /// Another writer held the database too long.
    #[error("the database is busy")]
    Busy,
    #[error("stored data is not valid: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("migrating the database: {0}")]
    Migrate(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

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
}

/// What the handshake needs to authenticate an agent.
#[derive(Clone, Debug)]
pub struct AgentCredentialRow {
    pub id: AgentId,
    pub secret_hash: Vec<u8>,
    pub revoked: bool,
    pub token_labels: Labels,
}

/// A new agent, created when an enrollment token is used.
#[derive(Clone, Debug)]
pub struct NewAgent {
    pub id: AgentId,
    pub secret_hash: Vec<u8>,
    pub token_labels: Labels,
    pub at: Timestamp,
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
}

#[derive(Clone, Debug)]
pub struct AuditEntry {
    pub at: Timestamp,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub detail: serde_json::Value,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // Operator tokens.
    async fn insert_api_token(&self, row: &ApiTokenRow) -> Result<()>;
    async fn api_token(&self, id: &str) -> Result<Option<ApiTokenRow>>;
    async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRow>>;
    async fn revoke_api_token(&self, id: &str, at: Timestamp) -> Result<bool>;
    async fn touch_api_token(&self, id: &str, at: Timestamp) -> Result<()>;

    // Enrollment.
    async fn insert_enroll_token(&self, row: &EnrollTokenRow) -> Result<()>;
    async fn enroll_token(&self, id: &str) -> Result<Option<EnrollTokenRow>>;
    async fn list_enroll_tokens(&self) -> Result<Vec<EnrollTokenRow>>;
    async fn revoke_enroll_token(&self, id: &str, at: Timestamp) -> Result<bool>;
    /// Takes one use of the token and creates the agent, atomically. False, and nothing
    /// written, if the token is expired, revoked or used up by the time this runs.
    async fn enroll_agent(&self, token_id: &str, agent: &NewAgent) -> Result<bool>;

    // Agents.
    async fn agent_credential(&self, id: &AgentId) -> Result<Option<AgentCredentialRow>>;
    async fn agent(&self, id: &AgentId) -> Result<Option<AgentRow>>;
    async fn list_agents(&self, status: Option<AgentStatus>) -> Result<Vec<AgentRow>>;
    async fn transitions(&self, id: &AgentId, limit: u32) -> Result<Vec<Transition>>;
    async fn heartbeats(&self, id: &AgentId, since: Timestamp, limit: u32) -> Result<Vec<HeartbeatSample>>;
    async fn fleet_counts(&self) -> Result<FleetCounts>;
    async fn revoke_agent(&self, id: &AgentId, at: Timestamp) -> Result<bool>;

    /// Writes a batch of session records in one transaction.
    async fn record(&self, batch: &[Record]) -> Result<()>;
    /// At start-up: agents this node held are no longer connected. Returns how many changed.
    async fn mark_node_offline(&self, node: &str, at: Timestamp, reason: &str) -> Result<u64>;
    /// Deletes up to `max_rows` heartbeats older than `before`; returns how many went.
    async fn prune_heartbeats(&self, before: Timestamp, max_rows: u32) -> Result<u64>;

    async fn audit(&self, entry: &AuditEntry) -> Result<()>;
}

/// Writes an audit entry. A failure is logged loudly but does not undo the audited action.
pub async fn audit_or_log(store: &dyn Store, entry: AuditEntry) {
    if let Err(e) = store.audit(&entry).await {
        tracing::error!(error = %e, action = %entry.action, actor = %entry.actor, "could not write audit entry");
    }
}
