//! What both backends share below their SQL: the row structs queries decode into (`...Db`),
//! their conversions into the store's row types, the small conversions every query uses, and
//! the plain functions that turn fetched rows into answers (output pages, the audit chain's
//! entries). A backend's SQL differs; what it decodes and how that becomes a row does not.
//!
//! The structs decode from either database because each field's type decodes from the column
//! each schema gives it: `i64` from SQLite's INTEGER and PostgreSQL's BIGINT, `bool` from
//! INTEGER 0/1 and BOOLEAN, `f64` from REAL and DOUBLE PRECISION, `Vec<u8>` from BLOB and
//! BYTEA, `String` from TEXT. A PostgreSQL expression that yields another type (`COUNT` is
//! BIGINT, but `SUM` is NUMERIC and a literal `1` INTEGER) must be written or cast to one of
//! these.

use std::collections::HashMap;
use std::str::FromStr;

use shared::api::{AgentStatus, FleetCounts, HeartbeatSample, Role, Transition};
use shared::audit::{Fields, GENESIS, PRUNED, canonical_json, entry_hash};
use shared::job::{AgentRun, RunId, RunState, Stream};
use shared::protocol::Metrics;
use shared::signing::{KeyRevocation, PublicKey, Signature};
use shared::{AgentId, JobId, Labels, Timestamp};
use sqlx::FromRow;

use super::{
    AgentCredentialRow, AgentRow, ApiTokenRow, AuditEntry, EnrollTokenRow, JobApproval, JobRow, OpenRun, Result, RunOutputText, RunRow,
    SERVER_ACTOR, StoreError,
};

pub(crate) fn ts(ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(ms)
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i32(v: i64) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

pub(crate) fn parse_labels(json: &str) -> Result<Labels> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("labels: {e}")))
}

pub(crate) fn labels_json(labels: &Labels) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}

pub(crate) fn parse_status(s: &str) -> Result<AgentStatus> {
    AgentStatus::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn parse_agent_id(s: &str) -> Result<AgentId> {
    AgentId::parse(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn parse_run_state(s: &str) -> Result<RunState> {
    RunState::from_str(s).map_err(StoreError::Corrupt)
}

/// `run_output.stream`: 0 stdout, 1 stderr.
pub(crate) fn stream_code(s: Stream) -> i64 {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

/// `agents.trusted_keys`: a JSON array of `ed25519:<hex>`.
pub(crate) fn keys_json(keys: &[PublicKey]) -> String {
    serde_json::to_string(keys).unwrap_or_else(|_| "[]".into())
}

pub(crate) fn parse_keys(json: &str) -> Result<Vec<PublicKey>> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("trusted_keys: {e}")))
}

/// The open states (not [`RunState::is_final`]) as an SQL list; a test holds it to the rule.
pub(crate) const OPEN: &str = "('pending', 'dispatched', 'running')";

#[derive(FromRow)]
pub(crate) struct ApiTokenDb {
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
pub(crate) struct EnrollTokenDb {
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

/// The columns [`AgentDb`] reads, in both schemas.
pub(crate) const AGENT_COLUMNS: &str = "id, hostname, labels, status, status_since, enrolled_at, revoked_at, heartbeat_interval_ms, \
     agent_version, last_heartbeat_at, last_metrics, connected, node, remote_addr, connected_at, disconnected_at, \
     approval_pending, credential_issued_at, rotation_requested_at, clone_seen_at, clone_seen_from, trusted_keys";

#[derive(FromRow)]
pub(crate) struct AgentDb {
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
            trusted_keys: parse_keys(&r.trusted_keys)?,
        })
    }
}

/// What the handshake reads of an agent: `SELECT secret_hash, pending_secret_hash, revoked_at,
/// token_labels, rotation_requested_at, approval_pending FROM agents`.
#[derive(FromRow)]
pub(crate) struct CredentialDb {
    secret_hash: Vec<u8>,
    pending_secret_hash: Option<Vec<u8>>,
    revoked_at: Option<i64>,
    token_labels: String,
    rotation_requested_at: Option<i64>,
    approval_pending: bool,
}

impl CredentialDb {
    pub(crate) fn into_row(self, id: &AgentId) -> Result<AgentCredentialRow> {
        Ok(AgentCredentialRow {
            id: id.clone(),
            secret_hash: self.secret_hash,
            pending_secret_hash: self.pending_secret_hash,
            revoked: self.revoked_at.is_some(),
            token_labels: parse_labels(&self.token_labels)?,
            rotation_requested: self.rotation_requested_at.is_some(),
            approval_pending: self.approval_pending,
        })
    }
}

#[derive(FromRow)]
pub(crate) struct TransitionDb {
    at: i64,
    from_status: Option<String>,
    to_status: String,
    reason: String,
}

impl TryFrom<TransitionDb> for Transition {
    type Error = StoreError;
    fn try_from(r: TransitionDb) -> Result<Self> {
        Ok(Transition {
            at: ts(r.at),
            from: r.from_status.as_deref().map(parse_status).transpose()?,
            to: parse_status(&r.to_status)?,
            reason: r.reason,
        })
    }
}

#[derive(FromRow)]
pub(crate) struct HeartbeatDb {
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

impl From<HeartbeatDb> for HeartbeatSample {
    fn from(r: HeartbeatDb) -> Self {
        HeartbeatSample {
            at: ts(r.at),
            seq: to_u64(r.seq),
            cpu_percent: r.cpu_percent,
            load1: r.load1,
            mem_used_bytes: to_u64(r.mem_used),
            mem_total_bytes: to_u64(r.mem_total),
            disk_used_bytes: to_u64(r.disk_used),
            disk_total_bytes: to_u64(r.disk_total),
            process_count: to_u64(r.process_count),
        }
    }
}

/// Agents by status, from `SELECT status, COUNT(*) ... GROUP BY status`.
pub(crate) fn fleet_counts(rows: Vec<(String, i64)>) -> Result<FleetCounts> {
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

#[derive(FromRow)]
pub(crate) struct AuditDb {
    id: i64,
    at: i64,
    actor: String,
    address: Option<String>,
    action: String,
    target: Option<String>,
    detail: String,
    prev_hash: Option<String>,
    hash: Option<String>,
}

impl From<AuditDb> for shared::api::AuditEntry {
    fn from(r: AuditDb) -> Self {
        // A detail that is not JSON any more (changed by hand) is passed on as its text, so that
        // verification reports the entry as altered instead of the read failing.
        let detail = serde_json::from_str(&r.detail).unwrap_or(serde_json::Value::String(r.detail));
        shared::api::AuditEntry {
            id: to_u64(r.id),
            at: Timestamp::from_unix_millis(r.at),
            actor: r.actor,
            address: r.address,
            action: r.action,
            target: r.target,
            detail,
            prev_hash: r.prev_hash,
            hash: r.hash,
        }
    }
}

/// The genesis entry that begins the chain when `first` is appended to a log holding
/// `unchained` entries from before the chain, the last of which has id `last_id`.
pub(crate) fn genesis_entry(first: Option<&AuditEntry>, unchained: i64, last_id: i64) -> AuditEntry {
    AuditEntry {
        at: first.map_or_else(Timestamp::now, |e| e.at),
        actor: SERVER_ACTOR.into(),
        address: None,
        action: GENESIS.into(),
        target: None,
        detail: serde_json::json!({
            "unchained_entries": unchained,
            "last_unchained_id": if unchained > 0 { Some(last_id) } else { None },
        }),
    }
}

/// The `audit.pruned` entry for `removed` entries older than `before`, up to `cut`.
pub(crate) fn pruned_entry(now: Timestamp, before: Timestamp, removed: u64, cut: i64, cut_hash: Option<String>) -> AuditEntry {
    AuditEntry {
        at: now,
        actor: SERVER_ACTOR.into(),
        address: None,
        action: PRUNED.into(),
        target: None,
        detail: serde_json::json!({
            "removed": removed,
            "before": before.to_string(),
            "last_removed_id": cut,
            "last_removed_hash": cut_hash,
        }),
    }
}

/// An entry as it is chained: the store inserts `entry`'s fields with `detail` (canonical
/// JSON) as its text.
pub(crate) struct Chained {
    pub detail: String,
    pub hash: String,
    pub entry: shared::api::AuditEntry,
}

/// `e` chained with id `id` after the entry hashed `prev_hash` ([`shared::audit::GENESIS_PREV`] for the
/// genesis entry).
pub(crate) fn chain(id: i64, e: &AuditEntry, prev_hash: &str) -> Chained {
    let fields = Fields {
        id: to_u64(id),
        at: e.at,
        actor: &e.actor,
        address: e.address.as_deref(),
        action: &e.action,
        target: e.target.as_deref(),
        detail: &e.detail,
        prev_hash,
    };
    let hash = entry_hash(&fields);
    Chained {
        detail: canonical_json(&e.detail),
        hash: hash.clone(),
        entry: shared::api::AuditEntry {
            id: to_u64(id),
            at: e.at,
            actor: e.actor.clone(),
            address: e.address.clone(),
            action: e.action.clone(),
            target: e.target.clone(),
            detail: e.detail.clone(),
            prev_hash: Some(prev_hash.to_owned()),
            hash: Some(hash),
        },
    }
}

#[derive(FromRow)]
pub(crate) struct JobDb {
    id: JobId,
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

/// A job's agent list as `job_signed_agents.agents` holds it: ids joined by commas.
pub(crate) fn signed_agents_text(ids: &[AgentId]) -> String {
    ids.iter().map(AgentId::as_str).collect::<Vec<_>>().join(",")
}

pub(crate) fn parse_signed_agents(job_id: &str, list: &str) -> Result<Vec<AgentId>> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| AgentId::parse(s).map_err(|e| StoreError::Corrupt(format!("job {job_id} signed agents: {e}"))))
        .collect()
}

/// A row of `key_revocations`: `(key, by_key, signature)`.
pub(crate) fn key_revocation((key, by, sig): (String, String, String)) -> Result<KeyRevocation> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("key revocation {key}: {what}"));
    let signature: Signature = serde_json::from_value(serde_json::Value::String(sig.clone())).map_err(|_| corrupt("signature"))?;
    Ok(KeyRevocation {
        key: PublicKey::parse(&key).map_err(|_| corrupt("key"))?,
        by: PublicKey::parse(&by).map_err(|_| corrupt("by"))?,
        signature,
    })
}

#[derive(FromRow)]
pub(crate) struct AgentRunDb {
    job_id: JobId,
    run_id: RunId,
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

impl TryFrom<AgentRunDb> for AgentRun {
    type Error = StoreError;
    fn try_from(r: AgentRunDb) -> Result<Self> {
        Ok(AgentRun {
            command: serde_json::from_str(&r.command).map_err(|e| StoreError::Corrupt(format!("job {}: command: {e}", r.job_id)))?,
            state: parse_run_state(&r.state)?,
            job_id: r.job_id,
            run_id: r.run_id,
            created_at: ts(r.created_at),
            created_by: r.created_by,
            exit_code: r.exit_code.map(to_i32),
            signal: r.signal.map(to_i32),
            error: r.error,
            started_at: r.started_at.map(ts),
            finished_at: r.finished_at.map(ts),
        })
    }
}

/// The columns [`RunDb`] reads, from `runs r LEFT JOIN agents a ON a.id = r.agent_id`.
pub(crate) const RUN_COLUMNS: &str = "r.id, r.job_id, r.agent_id, a.hostname, r.state, r.accepted, r.dispatched_at, r.started_at, \
     r.finished_at, r.exit_code, r.signal, r.error, r.stdout_truncated, r.stderr_truncated, r.stdout_held, r.stderr_held";

#[derive(FromRow)]
pub(crate) struct RunDb {
    id: RunId,
    job_id: JobId,
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

impl TryFrom<RunDb> for RunRow {
    type Error = StoreError;
    fn try_from(r: RunDb) -> Result<Self> {
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
            exit_code: r.exit_code.map(to_i32),
            signal: r.signal.map(to_i32),
            error: r.error,
            stdout_truncated: r.stdout_truncated,
            stderr_truncated: r.stderr_truncated,
            stdout_len: to_u64(r.stdout_held),
            stderr_len: to_u64(r.stderr_held),
        })
    }
}

/// The columns [`OpenRunDb`] reads from `runs`.
pub(crate) const OPEN_RUN_COLUMNS: &str = "id, job_id, agent_id, state, accepted";

#[derive(FromRow)]
pub(crate) struct OpenRunDb {
    id: RunId,
    job_id: JobId,
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

/// What `Store::state_totals` answers: runs by state, and jobs `running`/`finished`.
pub(crate) type StateTotals = (Vec<(RunState, u64)>, Vec<(&'static str, u64)>);

pub(crate) fn state_totals(runs: Vec<(String, i64)>, running: i64, finished: i64) -> Result<StateTotals> {
    let runs = runs.into_iter().map(|(s, n)| Ok((parse_run_state(&s)?, to_u64(n)))).collect::<Result<Vec<_>>>()?;
    Ok((runs, vec![("running", to_u64(running)), ("finished", to_u64(finished))]))
}

/// The heads of a job's output (`Store::run_output_heads`), stitched from stored rows fed in
/// order of run, stream and offset: the first `head` bytes of each stream, `total` in all.
pub(crate) struct Heads {
    head: u64,
    total: u64,
    spent: u64,
    out: HashMap<RunId, RunOutputText>,
}

impl Heads {
    pub(crate) fn new(head: u64, total: u64) -> Self {
        Heads { head, total, spent: 0, out: HashMap::new() }
    }

    /// Takes one stored row. Every run seen gets an entry, even if none of its text fits.
    pub(crate) fn push(&mut self, run: RunId, stream: i64, offset: i64, data: &str) {
        let e = self.out.entry(run).or_default();
        let text = if stream == 0 { &mut e.stdout } else { &mut e.stderr };
        let (offset, have) = (to_u64(offset), text.len() as u64);
        if offset > have || self.spent >= self.total {
            return;
        }
        let want = usize::try_from(self.head.min(have + (self.total - self.spent)) - have).unwrap_or(0);
        let fresh = data.get(usize::try_from(have - offset).unwrap_or(usize::MAX)..).unwrap_or_default();
        let mut cut = want.min(fresh.len());
        while !fresh.is_char_boundary(cut) {
            cut -= 1;
        }
        text.push_str(&fresh[..cut]);
        self.spent += cut as u64;
    }

    pub(crate) fn finish(self) -> HashMap<RunId, RunOutputText> {
        self.out
    }
}

/// A page of one stream (`Store::run_output`): bytes `[offset, end)` of what is held, from
/// the stored rows that overlap it, cut back to the last whole character so that the next
/// page starts where this one stops.
pub(crate) fn output_page(pieces: &[(u64, &str)], offset: u64, end: u64, held: u64) -> String {
    let bytes = crate::output::extract(pieces, offset.min(held), end.min(held)).unwrap_or_default();
    match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let mut b = e.into_bytes();
            b.truncate(valid);
            String::from_utf8(b).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_states_in_sql_are_the_rules_open_states() {
        assert_eq!(OPEN, crate::runs::sql_states(|s| !s.is_final()));
    }

    #[test]
    fn heads_and_pages_end_on_character_boundaries() {
        let mut heads = Heads::new(4, 100);
        heads.push("r1".parse().unwrap(), 0, 0, "aé");
        heads.push("r1".parse().unwrap(), 0, 3, "€b");
        heads.push("r2".parse().unwrap(), 1, 5, "gap");
        let out = heads.finish();
        // "aé" is 3 bytes; the euro sign (3 bytes) does not fit in the fourth.
        assert_eq!(out["r1"].stdout, "aé");
        assert_eq!(out["r2"], RunOutputText::default(), "a run whose rows start past what is held is still listed");
        let pieces = [(0, "aé"), (3, "€b")];
        assert_eq!(output_page(&pieces, 0, 5, 7), "aé");
        assert_eq!(output_page(&pieces, 3, 100, 7), "€b");
    }
}
