//! Opening a session: the agent's `hello` and the server's `welcome`.

use serde::{Deserialize, Serialize};

use crate::{AgentId, Labels};

/// The agent's first message after the upgrade. Nothing else is accepted before it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version the agent speaks: [`super::PROTOCOL_VERSION`].
    pub protocol: u32,
    pub agent_version: String,
    pub hostname: String,
    /// Labels from the agent's own config. Labels set by the enrollment token win on conflict.
    #[serde(default)]
    pub labels: Labels,
    /// How often this agent sends heartbeats; the server derives `stale` and `offline` from it.
    pub heartbeat_interval_ms: u64,
    /// Runs in the agent's ledger whose results the server has not acknowledged yet: running,
    /// waiting, or finished with the result still on the agent's disk. A run the server sent
    /// that is missing here never reached the agent.
    #[serde(default)]
    pub open_runs: Vec<crate::job::RunId>,
    /// The operator keys this agent's own config trusts (`trusted_keys` in agent.toml). When
    /// any are listed the agent runs only jobs signed by one of them; the server shows this
    /// so operators know how to send a job, and cannot change it. At most
    /// [`super::validate::MAX_TRUSTED_KEYS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_keys: Vec<crate::signing::PublicKey>,
}

/// The server's answer to `hello`: the session is open.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub agent_id: AgentId,
    /// Present only when the agent connected with an enrollment token: its own credential, to be
    /// stored and used from now on. Shown once; the server keeps only its hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// The labels the server holds for this agent: the token's, overlaid on the agent's own.
    pub labels: Labels,
    /// How often the server sends WebSocket pings; an agent that hears nothing from the server
    /// for three of these reconnects.
    pub ping_interval_ms: u64,
    pub server_version: String,
    /// The agent enrolled with a token that requires an administrator's approval and has not
    /// been accepted yet: it is connected and reports health, but is sent no runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

/// From the server: an administrator asked for this agent's credential to be rotated. The
/// agent answers with [`CredentialRequest`] (it may wait until it can write its state
/// directory).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RotateCredential {}

/// From the agent: issue a new credential. Sent when the agent's credential is older than its
/// configured rotation period, or after [`RotateCredential`]. The server answers with
/// [`NewCredential`], at most once a minute per agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CredentialRequest {}

/// From the server: the agent's next credential, shown once. Until the agent confirms it with
/// [`CredentialStored`] (or connects with it) the old credential keeps working; after that
/// only the new one does, and the old one presented again is reported as a clone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewCredential {
    pub credential: String,
}

/// From the agent: the new credential is on disk. `sha256` is the hex SHA-256 of the whole
/// credential string, naming which one was stored without sending it back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CredentialStored {
    pub sha256: String,
}

#[cfg(test)]
mod tests {
    use super::super::tests::round_trip;
    use super::super::{AgentMessage, ServerMessage};
    use super::*;

    #[test]
    fn hello_round_trips() {
        let msg = AgentMessage::Hello(Hello {
            protocol: 1,
            agent_version: "0.1.0".into(),
            hostname: "pos-0042".into(),
            labels: Labels::from_pairs(["site=paris"]).unwrap(),
            heartbeat_interval_ms: 10_000,
            open_runs: vec!["00000000000000aa".parse().unwrap()],
            trusted_keys: vec![crate::signing::PublicKey::from_bytes([7; 32])],
        });
        round_trip(&msg, "hello");
    }

    #[test]
    fn welcome_round_trips_with_and_without_a_credential() {
        let mut w = Welcome {
            agent_id: AgentId::parse("0123456789abcdef").unwrap(),
            credential: None,
            labels: Labels::from_pairs(["site=paris", "role=pos"]).unwrap(),
            ping_interval_ms: 15_000,
            server_version: "0.1.0".into(),
            pending: false,
        };
        round_trip(&ServerMessage::Welcome(w.clone()), "welcome");
        let json = serde_json::to_string(&ServerMessage::Welcome(w.clone())).unwrap();
        assert!(!json.contains("credential"), "{json}");
        w.credential = Some("msa_0123456789abcdef_00ff".into());
        round_trip(&ServerMessage::Welcome(w), "welcome");
    }

    #[test]
    fn rotation_messages_round_trip() {
        round_trip(&ServerMessage::RotateCredential(RotateCredential {}), "rotate_credential");
        round_trip(&ServerMessage::Credential(NewCredential { credential: "msa_0123456789abcdef_00ff".into() }), "credential");
        round_trip(&AgentMessage::CredentialRequest(CredentialRequest {}), "credential_request");
        round_trip(&AgentMessage::CredentialStored(CredentialStored { sha256: "ab".repeat(32) }), "credential_stored");
    }
}
