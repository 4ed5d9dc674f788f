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
            open_runs: vec!["00000000000000aa".into()],
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
        };
        round_trip(&ServerMessage::Welcome(w.clone()), "welcome");
        let json = serde_json::to_string(&ServerMessage::Welcome(w.clone())).unwrap();
        assert!(!json.contains("credential"), "{json}");
        w.credential = Some("msa_0123456789abcdef_00ff".into());
        round_trip(&ServerMessage::Welcome(w), "welcome");
    }
}
