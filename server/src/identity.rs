//! Agent identity over time: rotating an agent's credential, and spotting a clone.
//!
//! **Rotation** is two-phase, so that no crash or lost message can lock an agent out:
//! 1. the agent sends `credential_request` (on its own schedule, or after the server's
//!    `rotate_credential` when an administrator asked); the session issues a new credential,
//!    stores its hash as *pending* beside the current one, and sends it in `credential`;
//! 2. the agent writes it to disk and answers `credential_stored` with its SHA-256; the session
//!    then makes the pending credential the only one and retires the old one. If that answer is
//!    lost, the agent's next connection presents the new credential, which completes the
//!    rotation the same way. Until then the old credential keeps working.
//!
//! A session issues at most one credential per [`ISSUE_GAP`] per agent (the store enforces it
//! across sessions), so an agent that asks in a loop costs one database write a minute.
//!
//! **Clones:** the hashes of the last [`crate::store::sqlite::identity::RETIRED_KEPT`] retired
//! credentials are kept. A machine that presents one holds a copy of the agent made before the
//! rotation (a cloned disk image, a copied state directory): it is refused with 401, and the
//! attempt is reported (log, metric, fleet event, webhook, the agent's record, the audit log's
//! refusals), at most once per agent per [`CLONE_REPORT_GAP`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};
use shared::protocol::{NewCredential, ServerMessage};
use shared::{AgentId, Timestamp};
use tokio::time::Instant;

use crate::app::AppState;
use crate::auth::{self, Kind, Presented};
use crate::store::{AuditEntry, StoreError};

/// Least time between two credentials issued to one agent.
pub const ISSUE_GAP: Duration = Duration::from_secs(60);
/// Least time between two clone reports for one agent.
pub const CLONE_REPORT_GAP: Duration = Duration::from_secs(60);
/// Agents whose last clone report is remembered; past this the memory starts over.
const MAX_REMEMBERED: usize = 10_000;

/// A credential issued in this session and not yet confirmed.
pub struct Issued {
    pending_hash: Vec<u8>,
    /// Hex SHA-256 of the whole credential string, as the agent confirms it.
    digest: String,
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Issues the agent a new credential as pending, for a `credential_request`. `None` when one
/// was issued less than [`ISSUE_GAP`] ago (or the agent was revoked meanwhile).
pub async fn issue(app: &AppState, agent_id: &AgentId) -> Result<Option<(Issued, ServerMessage)>, StoreError> {
    let Ok(issued) = auth::issue(Kind::Agent, Some(agent_id.as_str())) else {
        tracing::error!(agent = %agent_id, "no randomness: cannot issue a credential");
        return Ok(None);
    };
    let gap = u64::try_from(ISSUE_GAP.as_millis()).unwrap_or(u64::MAX);
    if !app.store.begin_rotation(agent_id, &issued.hash, Timestamp::now(), gap).await? {
        tracing::info!(agent = %agent_id, "credential request refused: one was issued less than a minute ago");
        return Ok(None);
    }
    tracing::info!(agent = %agent_id, "new credential issued; the old one works until the agent confirms it");
    let pending = Issued { pending_hash: issued.hash, digest: digest(&issued.token) };
    Ok(Some((pending, ServerMessage::Credential(NewCredential { credential: issued.token }))))
}

/// For `credential_stored`: completes the rotation if `sha256` names the credential issued.
pub async fn confirm(app: &AppState, agent_id: &AgentId, issued: &Issued, sha256: &str, remote: SocketAddr) -> Result<bool, StoreError> {
    if issued.digest != sha256 {
        tracing::warn!(agent = %agent_id, "the agent confirmed a credential this session did not issue; ignoring");
        return Ok(false);
    }
    complete(app, agent_id, &issued.pending_hash, "confirmed", remote).await
}

/// Makes the pending credential the agent's only one, and records it.
pub async fn complete(app: &AppState, agent_id: &AgentId, pending_hash: &[u8], how: &str, remote: SocketAddr) -> Result<bool, StoreError> {
    let now = Timestamp::now();
    if !app.store.complete_rotation(agent_id, pending_hash, now).await? {
        return Ok(false);
    }
    metrics::counter!("muster_agent_credential_rotations_total").increment(1);
    tracing::info!(agent = %agent_id, how, "agent credential rotated; the old one no longer works");
    app.audit(AuditEntry {
        at: now,
        actor: format!("agent:{agent_id}"),
        address: Some(remote.to_string()),
        action: "agent.credential_rotated".into(),
        target: Some(agent_id.to_string()),
        detail: serde_json::json!({ "how": how }),
    })
    .await;
    Ok(true)
}

/// Whether `presented` (already known not to be the agent's current or pending credential) is
/// one the agent gave up in a rotation.
pub async fn is_retired(app: &AppState, agent_id: &AgentId, presented: &Presented) -> Result<bool, StoreError> {
    Ok(app.store.retired_credentials(agent_id).await?.iter().any(|h| presented.matches(h)))
}

/// The last clone report per agent, to keep a clone retrying every few seconds from writing
/// the database each time.
#[derive(Default)]
pub struct CloneReports(Mutex<HashMap<AgentId, Instant>>);

/// Reports a refused attempt with a retired credential of `agent_id` from `remote`.
pub fn report_clone(app: &AppState, agent_id: &AgentId, remote: SocketAddr) {
    metrics::counter!("muster_agent_clone_attempts_total").increment(1);
    {
        let mut last = app.clone_reports.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if last.get(agent_id).is_some_and(|t| now.duration_since(*t) < CLONE_REPORT_GAP) {
            return;
        }
        if last.len() >= MAX_REMEMBERED {
            last.clear();
        }
        last.insert(agent_id.clone(), now);
    }
    tracing::warn!(
        agent = %agent_id,
        %remote,
        "a credential this agent gave up in a rotation was presented: a copy of the agent (a cloned image?) was refused"
    );
    let at = Timestamp::now();
    app.fleet.publish(shared::api::FleetEvent::CloneSuspected { agent_id: agent_id.clone(), from_addr: remote.to_string(), at });
    let (store, agent_id) = (app.store.clone(), agent_id.clone());
    tokio::spawn(async move {
        if let Err(e) = store.clone_seen(&agent_id, at, &remote.to_string()).await {
            tracing::warn!(agent = %agent_id, error = %e, "cannot record the clone attempt");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_names_the_whole_credential() {
        let a = digest("msa_0123456789abcdef_00");
        assert_eq!(a.len(), 64);
        assert_ne!(a, digest("msa_0123456789abcdef_01"));
    }
}
