//! Request and response bodies of the operators' HTTP API (`/api/v1/...`).
//! Database rows are separate types in the server; these are the public contract.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::protocol::Metrics;
use crate::{AgentId, Labels, Timestamp};

/// Path prefix of every API route.
pub const PREFIX: &str = "/api/v1";

/// What the server believes about an agent. See docs/protocol.md for the thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Connected, and the last heartbeat is fresh.
    Online,
    /// Connected, but no heartbeat for more than three heartbeat intervals.
    Stale,
    /// Not connected, or silent past the offline threshold.
    Offline,
}

impl AgentStatus {
    pub const ALL: [AgentStatus; 3] = [AgentStatus::Online, AgentStatus::Stale, AgentStatus::Offline];

    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Online => "online",
            AgentStatus::Stale => "stale",
            AgentStatus::Offline => "offline",
        }
    }
}

impl fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown status {0:?}: expected online, stale or offline")]
pub struct UnknownStatus(pub String);

impl std::str::FromStr for AgentStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AgentStatus::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// One agent as listed by `GET /api/v1/agents`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentSummary {
    pub id: AgentId,
    pub hostname: String,
    pub status: AgentStatus,
    pub status_since: Timestamp,
    pub labels: Labels,
    pub last_heartbeat_at: Option<Timestamp>,
    /// Metrics from the last heartbeat, if any arrived.
    pub metrics: Option<Metrics>,
    /// Enrolled with an `approve` token and not accepted yet: connected and reporting health,
    /// but sent no runs and never a target.
    #[serde(default)]
    pub pending: bool,
    /// The operator keys the agent's own config trusts, as it reported them in its last
    /// `hello`. When any are listed the agent runs only jobs signed by one of them. This is
    /// what the agent says; the server shows it and cannot change it.
    #[serde(default)]
    pub trusted_keys: Vec<crate::signing::PublicKey>,
}

impl AgentSummary {
    /// Whether the agent runs only signed jobs (it reported trusted keys).
    pub fn requires_signature(&self) -> bool {
        !self.trusted_keys.is_empty()
    }
}

/// `GET /api/v1/agents/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentDetail {
    #[serde(flatten)]
    pub summary: AgentSummary,
    pub enrolled_at: Timestamp,
    pub heartbeat_interval_ms: Option<u64>,
    pub agent_version: Option<String>,
    /// The current connection, or the last one if the agent is offline.
    pub connection: Option<ConnectionInfo>,
    /// Most recent status transitions, newest first.
    pub transitions: Vec<Transition>,
    /// When the agent's current credential was issued: at enrollment, or by its last rotation.
    pub credential_issued_at: Timestamp,
    /// An administrator asked for a rotation that has not happened yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_requested_at: Option<Timestamp>,
    /// The last refused attempt with a credential this agent gave up in a rotation: a copy of
    /// the agent somewhere else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_seen: Option<CloneSeen>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloneSeen {
    pub at: Timestamp,
    pub from_addr: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub connected: bool,
    pub remote_addr: String,
    pub connected_at: Timestamp,
    pub disconnected_at: Option<Timestamp>,
    /// Which server process holds (or last held) the connection.
    pub node: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub at: Timestamp,
    pub from: Option<AgentStatus>,
    pub to: AgentStatus,
    pub reason: String,
}

/// One stored heartbeat, as `GET /api/v1/agents/{id}/heartbeats` lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatSample {
    pub at: Timestamp,
    pub seq: u64,
    pub cpu_percent: f64,
    pub load1: f64,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub process_count: u64,
}

/// `GET /api/v1/fleet`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetCounts {
    pub total: u64,
    pub online: u64,
    pub stale: u64,
    pub offline: u64,
}

/// What an operator token may do. Each role includes the ones below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read fleet state, jobs and results.
    Viewer,
    /// Also run and cancel commands.
    Operator,
    /// Also manage tokens, enrollment tokens and agents.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Role::Viewer, Role::Operator, Role::Admin]
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: expected viewer, operator or admin"))
    }
}

/// `POST /api/v1/enroll-tokens`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateEnrollToken {
    /// Seconds until the token stops working; none for the server's default (24 hours, or
    /// `max_enroll_token_ttl` if that is shorter).
    #[serde(default, deserialize_with = "crate::whole::option", skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// How many agents may enroll with it; none for the server's default (10).
    #[serde(default, deserialize_with = "crate::whole::option", skip_serializing_if = "Option::is_none")]
    pub uses: Option<u32>,
    /// Labels every agent enrolled with this token gets. They win over the agent's own.
    #[serde(default)]
    pub labels: Labels,
    /// Agents enrolled with this token wait as pending, connected but sent no runs, until an
    /// administrator accepts them (`POST /agents/{id}/accept`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approve: bool,
}

/// An enrollment token as listed; the secret is never shown again after creation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnrollTokenInfo {
    pub id: String,
    pub created_by: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub uses_total: u32,
    pub uses_left: u32,
    pub labels: Labels,
    pub revoked: bool,
    /// Agents enrolled with it wait for an administrator's approval.
    #[serde(default)]
    pub approve: bool,
}

/// The answer to creating an enrollment token: the only time its secret is shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnrollTokenCreated {
    #[serde(flatten)]
    pub info: EnrollTokenInfo,
    pub token: String,
}

/// `POST /api/v1/tokens`: a new operator token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateToken {
    pub name: String,
    pub role: Role,
    /// Seconds until it expires; none for a token that lasts until revoked.
    #[serde(default, deserialize_with = "crate::whole::option")]
    pub ttl_secs: Option<u64>,
    /// A label selector bounding the agents the token sees and targets; none for the whole
    /// fleet. A scoped token may only create tokens whose scope has every term of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<crate::Selector>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_by: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub last_used_at: Option<Timestamp>,
    pub revoked: bool,
    /// Null for a token of the whole fleet.
    pub scope: Option<crate::Selector>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenCreated {
    #[serde(flatten)]
    pub info: TokenInfo,
    pub token: String,
}

/// `GET /api/v1/whoami`: the caller's own token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WhoAmI {
    pub token_id: String,
    pub name: String,
    pub role: Role,
    /// Null for a token of the whole fleet.
    pub scope: Option<crate::Selector>,
}

/// `PATCH /api/v1/agents/{id}`: changes to an agent's trusted labels (the ones targeting
/// uses). Keys under `agent.` are the agent's own report and cannot be edited.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchAgent {
    pub labels: LabelEdit,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelEdit {
    /// Labels to add or change.
    #[serde(default)]
    pub set: Labels,
    /// Keys to remove (a key that is not there is not an error).
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Every error the API returns has this body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// A stable machine-readable kind: `unauthorized`, `forbidden`, `not_found`, `bad_request`,
    /// `conflict`, `payload_too_large`, `unavailable`, `internal`.
    pub error: String,
    /// A sentence for a person.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
        let json = serde_json::to_string(v).unwrap();
        assert_eq!(&serde_json::from_str::<T>(&json).unwrap(), v, "{json}");
    }

    #[test]
    fn api_bodies_round_trip() {
        let t = Timestamp::from_unix_millis(1_763_776_000_000);
        let summary = AgentSummary {
            id: AgentId::parse("0123456789abcdef").unwrap(),
            hostname: "pos-1".into(),
            status: AgentStatus::Stale,
            status_since: t,
            labels: Labels::from_pairs(["site=paris"]).unwrap(),
            last_heartbeat_at: Some(t),
            metrics: Some(Metrics::default()),
            pending: true,
            trusted_keys: vec![crate::signing::PublicKey::from_bytes([7; 32])],
        };
        round_trip(&summary);
        assert!(summary.requires_signature());
        // From a server that does not report keys: the agent requires none.
        let mut old = serde_json::to_value(&summary).unwrap();
        old.as_object_mut().unwrap().remove("trusted_keys");
        assert!(!serde_json::from_value::<AgentSummary>(old).unwrap().requires_signature());
        round_trip(&AgentDetail {
            summary,
            enrolled_at: t,
            heartbeat_interval_ms: Some(10_000),
            agent_version: Some("0.1.0".into()),
            connection: Some(ConnectionInfo {
                connected: true,
                remote_addr: "127.0.0.1:5555".into(),
                connected_at: t,
                disconnected_at: None,
                node: "local".into(),
            }),
            transitions: vec![Transition { at: t, from: Some(AgentStatus::Online), to: AgentStatus::Stale, reason: "late".into() }],
            credential_issued_at: t,
            rotation_requested_at: Some(t),
            clone_seen: Some(CloneSeen { at: t, from_addr: "127.0.0.2:5555".into() }),
        });
        round_trip(&FleetCounts { total: 3, online: 1, stale: 1, offline: 1 });
        round_trip(&CreateEnrollToken { ttl_secs: Some(60), uses: Some(2), labels: Labels::new(), approve: true });
        round_trip(&CreateEnrollToken { ttl_secs: None, uses: None, labels: Labels::new(), approve: false });
        round_trip(&CreateToken { name: "ci".into(), role: Role::Operator, ttl_secs: None, scope: None });
        round_trip(&CreateToken { name: "paris".into(), role: Role::Admin, ttl_secs: None, scope: Some("site=paris".parse().unwrap()) });
        round_trip(&PatchAgent { labels: LabelEdit { set: Labels::from_pairs(["site=lyon"]).unwrap(), remove: vec!["canary".into()] } });
        let edit: PatchAgent = serde_json::from_str(r#"{"labels": {"remove": ["canary"]}}"#).unwrap();
        assert!(edit.labels.set.is_empty());
        assert!(serde_json::from_str::<PatchAgent>(r#"{"labels": {}, "name": "x"}"#).is_err());
        round_trip(&ApiError { error: "not_found".into(), message: "no agent 0123".into() });
        round_trip(&AuditPage {
            entries: vec![AuditEntry {
                id: 7,
                at: t,
                actor: "alice (0123456789abcdef)".into(),
                address: Some("127.0.0.1:5555".into()),
                action: "token.create".into(),
                target: Some("fedcba9876543210".into()),
                detail: serde_json::json!({ "role": "viewer" }),
                prev_hash: Some("00".repeat(32)),
                hash: Some("ab".repeat(32)),
            }],
            next_before: Some(7),
        });
    }

    #[test]
    fn roles_are_ordered_by_power() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!("operator".parse::<Role>(), Ok(Role::Operator));
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn status_parses_from_its_name() {
        assert_eq!("stale".parse::<AgentStatus>(), Ok(AgentStatus::Stale));
        assert!("up".parse::<AgentStatus>().is_err());
    }
}

/// Events on `GET /api/v1/events` (server-sent events; the SSE event name is `type`, the SSE
/// id is `<server epoch>-<sequence>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FleetEvent {
    /// An agent's status changed.
    AgentStatus {
        agent_id: AgentId,
        from: Option<AgentStatus>,
        to: AgentStatus,
        reason: String,
        at: Timestamp,
    },
    AgentEnrolled {
        agent_id: AgentId,
        labels: Labels,
        at: Timestamp,
    },
    AgentRevoked {
        agent_id: AgentId,
        at: Timestamp,
    },
    /// A connection with this agent's credential replaced a session that was still alive: two
    /// machines are using one credential (a cloned image, or a copied credential file).
    CredentialConflict {
        agent_id: AgentId,
        /// The address of the session that was replaced, then of the one that replaced it.
        previous_addr: String,
        current_addr: String,
        at: Timestamp,
    },
    /// A credential this agent gave up in a rotation was presented again, from `from_addr`: a
    /// copy of the agent (a cloned image, a copied state directory). The attempt was refused.
    CloneSuspected {
        agent_id: AgentId,
        from_addr: String,
        at: Timestamp,
    },
    /// An administrator accepted an agent that was waiting for approval; it gets runs now.
    AgentAccepted {
        agent_id: AgentId,
        by: String,
        at: Timestamp,
    },
    /// The latest health of an agent, at most once per agent every 15 seconds.
    Heartbeat {
        agent_id: AgentId,
        at: Timestamp,
        cpu_percent: f64,
        mem_used_bytes: u64,
        mem_total_bytes: u64,
        disk_used_bytes: u64,
        disk_total_bytes: u64,
    },
    JobCreated {
        job_id: crate::JobId,
        command: String,
        target: String,
        total: u64,
        created_by: String,
        at: Timestamp,
        status: crate::job::JobStatus,
    },
    /// Run counts of a running job, at most once a second per job.
    JobProgress {
        job_id: crate::JobId,
        counts: crate::job::StateCounts,
        status: crate::job::JobStatus,
        /// Runs that are failures ([`crate::job::RunState::is_failure`]).
        failed: u64,
    },
    JobFinished {
        job_id: crate::JobId,
        counts: crate::job::StateCounts,
        status: crate::job::JobStatus,
        /// Runs that are failures ([`crate::job::RunState::is_failure`]).
        failed: u64,
    },
    /// The client asked to resume from an event this server no longer holds (too old, or from
    /// before a restart): fetch the state again.
    Resync,
}

/// One entry of the audit log (`GET /api/v1/audit`). `prev_hash` and `hash` chain it to the
/// entry before (docs/audit.md has the encoding); both are null on entries written before the
/// chain began.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: u64,
    pub at: Timestamp,
    /// Who: `name (token id)` for an operator token, `enroll-token:ID` for an enrollment,
    /// `unauthenticated` for a refused credential, `muster-server` for what the server does itself.
    pub actor: String,
    /// The peer's address (`ip:port`; only `ip` for refusals, which are summed per address).
    pub address: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub detail: serde_json::Value,
    pub prev_hash: Option<String>,
    pub hash: Option<String>,
}

/// A page of the audit log, newest first. `next_before`, when set, is the `before` that asks
/// for the next (older) page; null on the last page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    pub next_before: Option<u64>,
}

/// Most entries one audit page holds (`limit`); the default is 100.
pub const AUDIT_PAGE_MAX: u32 = 1000;

#[cfg(test)]
mod fleet_event_tests {
    use super::*;

    #[test]
    fn fleet_events_round_trip() {
        let e = FleetEvent::AgentStatus {
            agent_id: AgentId::parse("0123456789abcdef").unwrap(),
            from: Some(AgentStatus::Online),
            to: AgentStatus::Offline,
            reason: "connection closed".into(),
            at: Timestamp::from_unix_millis(1),
        };
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains("\"type\":\"agent_status\""), "{json}");
        assert_eq!(serde_json::from_str::<FleetEvent>(&json).unwrap(), e);
    }
}
