//! Running commands: the server's `run`, `cancel`, `result_ack` and `resend`; the agent's
//! `run_accepted`, `run_started`, `run_output` and `run_finished`.
//!
//! Output travels in chunks that carry their byte offset in the run's stream, so a chunk sent
//! twice (after a reconnect, or a restart of either side) is recognized and stored once. The
//! agent keeps a run's output and result on disk until the server acknowledges the result.

use serde::{Deserialize, Serialize};

use crate::job::{CommandSpec, JobId, RunId, Stream};

/// Server → agent: execute this, once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub run_id: RunId,
    pub job_id: JobId,
    pub command: CommandSpec,
    pub timeout_ms: u64,
    /// Bytes of output kept per stream; the rest is discarded and flagged as truncated.
    pub output_limit: u64,
    /// For a signed job: the operator's signature and this agent's proof that it is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Box<crate::signing::RunSignature>>,
}

/// Server → agent: stop this run (SIGTERM to its process group, SIGKILL after a grace).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    pub run_id: RunId,
}

/// Server → agent: the result is stored; the agent may forget the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultAck {
    pub run_id: RunId,
}

/// Server → agent: output is missing from these offsets on; send it again, then `run_finished`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resend {
    pub run_id: RunId,
    pub stdout_from: u64,
    pub stderr_from: u64,
}

/// Agent → server: the run is in the agent's ledger, waiting for a free slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAccepted {
    pub run_id: RunId,
}

/// Agent → server: the process started (the run is in the agent's ledger).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStarted {
    pub run_id: RunId,
}

/// Agent → server: a piece of output. `data` is UTF-8 (invalid bytes in the process's output
/// are replaced with U+FFFD by the agent); `offset` counts bytes of that text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOutput {
    pub run_id: RunId,
    pub stream: Stream,
    pub offset: u64,
    pub data: String,
}

/// How a run ended, as the agent saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Exit status 0.
    Succeeded,
    /// Non-zero exit status, killed by a signal, or could not start (`error` says why).
    Failed,
    TimedOut,
    Cancelled,
    /// The agent restarted while the run was in progress; what happened to it is unknown.
    Lost,
}

/// Agent → server: the run is over. Repeated until the server answers `result_ack`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFinished {
    pub run_id: RunId,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Total bytes of each stream the agent kept; the server checks it has them all.
    pub stdout_len: u64,
    pub stderr_len: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::tests::round_trip;
    use super::super::{AgentMessage, ServerMessage};
    use super::*;
    use crate::job::Program;

    #[test]
    fn server_run_messages_round_trip() {
        let run = Run {
            run_id: "00000000000000aa".parse().unwrap(),
            job_id: "00000000000000bb".parse().unwrap(),
            command: CommandSpec {
                program: Program::Shell("uname -r".into()),
                cwd: Some("/tmp".into()),
                env: BTreeMap::from([("LANG".into(), "C".into())]),
                secret_env: Default::default(),
            },
            timeout_ms: 60_000,
            output_limit: 1 << 20,
            signature: None,
        };
        round_trip(&ServerMessage::Run(run.clone()), "run");
        let mut signed = run.clone();
        signed.signature = Some(Box::new(crate::signing::RunSignature {
            key: crate::signing::PublicKey::from_bytes([1; 32]),
            signature: crate::signing::Signature([2; 64]),
            expires_at: crate::Timestamp::from_unix_millis(1_800_000_000_000),
            selector: Some(crate::Selector::parse("site=paris").unwrap()),
            agents: 3,
            proof: vec![format!("l{}", "ab".repeat(32)), format!("r{}", "cd".repeat(32))],
        }));
        round_trip(&ServerMessage::Run(signed), "run");
        round_trip(
            &ServerMessage::KeyRevoked(Box::new(crate::signing::KeyRevocation {
                key: crate::signing::PublicKey::from_bytes([3; 32]),
                by: crate::signing::PublicKey::from_bytes([1; 32]),
                signature: crate::signing::Signature([4; 64]),
            })),
            "key_revoked",
        );
        round_trip(&ServerMessage::Cancel(Cancel { run_id: "a".parse().unwrap() }), "cancel");
        round_trip(&ServerMessage::ResultAck(ResultAck { run_id: "a".parse().unwrap() }), "result_ack");
        round_trip(&ServerMessage::Resend(Resend { run_id: "a".parse().unwrap(), stdout_from: 10, stderr_from: 0 }), "resend");
    }

    #[test]
    fn agent_run_messages_round_trip() {
        round_trip(&AgentMessage::RunAccepted(RunAccepted { run_id: "a".parse().unwrap() }), "run_accepted");
        round_trip(&AgentMessage::RunStarted(RunStarted { run_id: "a".parse().unwrap() }), "run_started");
        round_trip(
            &AgentMessage::RunOutput(RunOutput {
                run_id: "a".parse().unwrap(),
                stream: Stream::Stdout,
                offset: 0,
                data: "6.1.0-18\n".into(),
            }),
            "run_output",
        );
        round_trip(
            &AgentMessage::RunFinished(RunFinished {
                run_id: "a".parse().unwrap(),
                outcome: Outcome::Failed,
                exit_code: Some(2),
                signal: None,
                error: None,
                stdout_len: 9,
                stderr_len: 0,
                stdout_truncated: false,
                stderr_truncated: false,
            }),
            "run_finished",
        );
    }
}
