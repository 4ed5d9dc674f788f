//! The agent protocol: versioned JSON text messages over one WebSocket per agent.
//!
//! Every message is a JSON object with a `type` field naming it. Messages an agent sends are
//! [`AgentMessage`]; messages the server sends are [`ServerMessage`]. Unknown *fields* are
//! ignored so that either side can add optional fields without a version bump; an unknown
//! *type* is a protocol error ([`close::UNKNOWN_TYPE`]). `docs/protocol.md` is the reference.

mod health;
mod run;
mod session;
mod validate;

use serde::{Deserialize, Serialize};

pub use health::{DiskUsage, Heartbeat, Metrics};
pub use run::{Cancel, Outcome, Resend, ResultAck, Run, RunAccepted, RunFinished, RunOutput, RunStarted};
pub use session::{CredentialRequest, CredentialStored, Hello, NewCredential, RotateCredential, Welcome};
pub use validate::{Invalid, MAX_OUTPUT_CHUNK, check_hostname, check_text};

/// Path of the agents' WebSocket endpoint on the server.
pub const CONNECT_PATH: &str = "/api/v1/agent/connect";
/// WebSocket subprotocol an agent must offer; the server selects it or refuses the upgrade.
pub const SUBPROTOCOL: &str = "muster.v1";
/// Protocol version carried in `hello`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest message either side accepts, in bytes. Larger ones close the connection with
/// [`close::TOO_BIG`].
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;
/// Header on every refusal the server itself makes (its value is the error kind: `busy`,
/// `unauthorized`, ...). A refusal without it came from something in between (a proxy, a load
/// balancer), which is a different problem for the agent.
pub const MUSTER_ERROR_HEADER: &str = "x-muster-error";
/// How long the server waits for `hello` after the upgrade.
pub const HELLO_TIMEOUT_MS: u64 = 10_000;

/// WebSocket close codes the server uses, and what each means for the agent.
pub mod close {
    /// Orderly close: the agent is shutting down, or the server is.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down or restarting; reconnect with backoff.
    pub const GOING_AWAY: u16 = 1001;
    /// A message arrived out of order (anything before `hello`, or a second `hello`).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A binary frame: the protocol is text only.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A text frame that is not valid UTF-8, not JSON, or a known message with the wrong fields.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message over [`super::MAX_MESSAGE_BYTES`].
    pub const TOO_BIG: u16 = 1009;
    /// The server hit an internal error; reconnect with backoff.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// A JSON message whose `type` this server does not know.
    pub const UNKNOWN_TYPE: u16 = 4000;
    /// `hello` carried a protocol version this server does not speak.
    pub const UNSUPPORTED_VERSION: u16 = 4001;
    /// A newer connection authenticated as the same agent; this one is closed.
    pub const REPLACED: u16 = 4002;
    /// The agent's credential was revoked; reconnecting will be refused with HTTP 401.
    pub const REVOKED: u16 = 4003;
    /// Nothing arrived within the idle timeout, or no heartbeat within the offline threshold.
    pub const TIMEOUT: u16 = 4004;
    /// The agent sent more messages or bytes than its budget allows; reconnect after a long
    /// backoff.
    pub const RATE_LIMITED: u16 = 4005;
    /// The enrollment token stopped being usable between the upgrade and `hello` (it ran out,
    /// expired or was revoked); nothing was created. Reconnecting is refused with HTTP 401.
    pub const ENROLLMENT_REFUSED: u16 = 4006;
}

/// A message from an agent to the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    Hello(Hello),
    Heartbeat(Heartbeat),
    RunAccepted(RunAccepted),
    RunStarted(RunStarted),
    RunOutput(RunOutput),
    RunFinished(RunFinished),
    CredentialRequest(CredentialRequest),
    CredentialStored(CredentialStored),
}

/// A message from the server to an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome(Welcome),
    Run(Run),
    Cancel(Cancel),
    ResultAck(ResultAck),
    Resend(Resend),
    /// An operator key revoked fleet-wide, signed by a trusted key: the agent checks the
    /// signature itself and, if it verifies, never accepts that key again.
    KeyRevoked(Box<crate::signing::KeyRevocation>),
    /// An administrator asked for the agent's credential to be rotated.
    RotateCredential(RotateCredential),
    /// The agent's next credential, after its `credential_request`.
    Credential(NewCredential),
}

impl AgentMessage {
    pub const TYPES: &'static [&'static str] =
        &["hello", "heartbeat", "run_accepted", "run_started", "run_output", "run_finished", "credential_request", "credential_stored"];

    pub fn type_name(&self) -> &'static str {
        match self {
            AgentMessage::Hello(_) => "hello",
            AgentMessage::Heartbeat(_) => "heartbeat",
            AgentMessage::RunAccepted(_) => "run_accepted",
            AgentMessage::RunStarted(_) => "run_started",
            AgentMessage::RunOutput(_) => "run_output",
            AgentMessage::RunFinished(_) => "run_finished",
            AgentMessage::CredentialRequest(_) => "credential_request",
            AgentMessage::CredentialStored(_) => "credential_stored",
        }
    }
}

impl ServerMessage {
    pub const TYPES: &'static [&'static str] =
        &["welcome", "run", "cancel", "result_ack", "resend", "key_revoked", "rotate_credential", "credential"];

    pub fn type_name(&self) -> &'static str {
        match self {
            ServerMessage::Welcome(_) => "welcome",
            ServerMessage::Run(_) => "run",
            ServerMessage::Cancel(_) => "cancel",
            ServerMessage::ResultAck(_) => "result_ack",
            ServerMessage::Resend(_) => "resend",
            ServerMessage::KeyRevoked(_) => "key_revoked",
            ServerMessage::RotateCredential(_) => "rotate_credential",
            ServerMessage::Credential(_) => "credential",
        }
    }
}

/// Why a text message could not be decoded, and so which close code answers it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not valid JSON: {0}")]
    InvalidJson(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("malformed {kind} message: {reason}")]
    Malformed { kind: String, reason: String },
}

impl DecodeError {
    pub fn close_code(&self) -> u16 {
        match self {
            DecodeError::InvalidJson(_) | DecodeError::Malformed { .. } => close::INVALID_PAYLOAD,
            DecodeError::UnknownType(_) => close::UNKNOWN_TYPE,
        }
    }
}

/// Decodes a message of either direction, telling a bad payload from an unknown type.
pub fn decode<T: serde::de::DeserializeOwned>(text: &str, known: &[&str]) -> Result<T, DecodeError> {
    match serde_json::from_str::<T>(text) {
        Ok(msg) => Ok(msg),
        // The slow path runs only for bad input: parse again to say what was wrong.
        Err(e) => match serde_json::from_str::<serde_json::Value>(text) {
            Err(_) => Err(DecodeError::InvalidJson(e.to_string())),
            Ok(v) => match v.get("type").and_then(|t| t.as_str()) {
                Some(t) if !known.contains(&t) => Err(DecodeError::UnknownType(t.to_owned())),
                Some(t) => Err(DecodeError::Malformed { kind: t.to_owned(), reason: e.to_string() }),
                None => Err(DecodeError::Malformed { kind: "untyped".into(), reason: "no \"type\" field".into() }),
            },
        },
    }
}

impl AgentMessage {
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        decode(text, Self::TYPES)
    }
}

impl ServerMessage {
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        decode(text, Self::TYPES)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Asserts that a message survives JSON and back unchanged, and carries its `type`.
    pub(crate) fn round_trip<T>(msg: &T, type_name: &str)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let json = serde_json::to_string(msg).unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["type"], type_name, "{json}");
        let back: T = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, msg);
    }

    #[test]
    fn decode_tells_invalid_json_from_unknown_type_from_malformed() {
        assert!(matches!(AgentMessage::decode("{not json"), Err(DecodeError::InvalidJson(_))));
        assert_eq!(AgentMessage::decode(r#"{"type":"launch_missiles"}"#), Err(DecodeError::UnknownType("launch_missiles".into())));
        let e = AgentMessage::decode(r#"{"type":"heartbeat","seq":"x"}"#).unwrap_err();
        assert!(matches!(e, DecodeError::Malformed { ref kind, .. } if kind == "heartbeat"));
        assert_eq!(e.close_code(), close::INVALID_PAYLOAD);
        assert!(matches!(AgentMessage::decode("[1,2]"), Err(DecodeError::Malformed { .. })));
    }
}
