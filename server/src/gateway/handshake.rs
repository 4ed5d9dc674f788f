//! Who is connecting: the credential checked before the upgrade (an agent's own, one a
//! rotation issued, one a rotation retired, or an enrollment token), enrollment once `hello`
//! has arrived, and `GET /api/v1/agent/check`.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use shared::protocol::{Hello, close};
use shared::{AgentId, Labels, Timestamp};

use super::{Ending, refuse};
use crate::app::AppState;
use crate::auth::{self, AuthError, Kind, Presented};
use crate::store::{AuditEntry, NewAgent};

pub(super) enum Refusal {
    Auth(AuthError),
    /// A credential the agent gave up in a rotation: a copy of the agent.
    Superseded(AgentId),
    Internal(crate::store::StoreError),
}

/// Refuses, and reports, a credential retired by a rotation.
pub(super) fn refuse_clone(app: &AppState, id: &AgentId, remote: SocketAddr) -> Response {
    let e = AuthError::Superseded;
    crate::logging::refused_handshake("agent handshake", remote, &e);
    app.auditor.refused(remote.ip(), "agent", &e, Some(format!("msa_{id}")));
    crate::identity::report_clone(app, id, remote);
    refuse(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
}

impl From<crate::store::StoreError> for Refusal {
    fn from(e: crate::store::StoreError) -> Self {
        Refusal::Internal(e)
    }
}

/// A credential that checked out, before anything is done with it.
pub(super) enum Verified {
    /// An agent's credential; `by_pending` when it is the one a rotation issued and the agent
    /// has not confirmed yet (connecting with it confirms it).
    Agent {
        row: crate::store::AgentCredentialRow,
        by_pending: bool,
    },
    EnrollToken(crate::store::EnrollTokenRow),
}

/// The presented credential without its secret, for the audit log's refusals.
pub(super) fn public_name(header: Option<&str>) -> Option<String> {
    Presented::from_header(header).ok().map(|p| p.public_name())
}

/// Checks an agent credential or an enrollment token, changing nothing.
pub(super) async fn verify(app: &AppState, header: Option<&str>) -> Result<Verified, Refusal> {
    let presented = Presented::from_header(header).map_err(Refusal::Auth)?;
    match presented.kind {
        Kind::Agent => {
            let id = AgentId::parse(&presented.id).map_err(|_| Refusal::Auth(AuthError::Malformed))?;
            let row = app.store.agent_credential(&id).await?.ok_or(Refusal::Auth(AuthError::Wrong))?;
            let by_pending = if presented.matches(&row.secret_hash) {
                false
            } else if row.pending_secret_hash.as_deref().is_some_and(|h| presented.matches(h)) {
                true
            } else if crate::identity::is_retired(app, &id, &presented).await? {
                return Err(Refusal::Superseded(id));
            } else {
                return Err(Refusal::Auth(AuthError::Wrong));
            };
            if row.revoked {
                return Err(Refusal::Auth(AuthError::Revoked));
            }
            Ok(Verified::Agent { row, by_pending })
        }
        Kind::Enroll => {
            let token = app.store.enroll_token(&presented.id).await?.ok_or(Refusal::Auth(AuthError::Wrong))?;
            if !presented.matches(&token.secret_hash) {
                return Err(Refusal::Auth(AuthError::Wrong));
            }
            if token.revoked_at.is_some() {
                return Err(Refusal::Auth(AuthError::Revoked));
            }
            if token.expires_at <= Timestamp::now() {
                return Err(Refusal::Auth(AuthError::Expired));
            }
            if token.uses_left == 0 {
                return Err(Refusal::Auth(AuthError::UsedUp));
            }
            Ok(Verified::EnrollToken(token))
        }
        Kind::Operator => Err(Refusal::Auth(AuthError::WrongKind)),
    }
}

/// Who is connected, once `hello` has arrived (and, for a new agent, enrollment is done).
pub(super) struct Authenticated {
    pub(super) agent_id: AgentId,
    pub(super) token_labels: Labels,
    /// Set when the agent enrolled in this handshake: its new credential, for `welcome`.
    pub(super) credential: Option<String>,
    /// Waiting for an administrator's approval.
    pub(super) approval_pending: bool,
    /// An administrator asked for this agent's credential to be rotated.
    pub(super) rotation_requested: bool,
}

/// Takes one use of the enrollment token and creates the agent, atomically; the agent's
/// credential is returned in `welcome`. Runs only once `hello` has been read and checked.
pub(super) async fn enroll(
    app: &AppState,
    token: &crate::store::EnrollTokenRow,
    hello: &Hello,
    remote: SocketAddr,
) -> Result<Authenticated, Ending> {
    let unavailable = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "cannot enroll an agent");
        Ending::close(close::INTERNAL_ERROR, "the server cannot enroll agents right now")
    };
    let now = Timestamp::now();
    let mut id_bytes = [0u8; 8];
    getrandom::fill(&mut id_bytes).map_err(|e| unavailable(&e))?;
    let agent_id = AgentId::from_bytes(id_bytes);
    let issued = auth::issue(Kind::Agent, Some(agent_id.as_str())).map_err(|e| unavailable(&e))?;
    let new = NewAgent {
        id: agent_id.clone(),
        secret_hash: issued.hash,
        token_labels: token.labels.clone(),
        at: now,
        approval_pending: token.approve,
    };
    match app.store.enroll_agent(&token.id, &new).await {
        Ok(true) => {}
        Ok(false) => {
            app.auditor.refused(remote.ip(), "agent", &AuthError::UsedUp, Some(format!("mse_{}", token.id)));
            return Err(Ending::close(close::ENROLLMENT_REFUSED, "the enrollment token is used up, expired or revoked"));
        }
        Err(e) => return Err(unavailable(&e)),
    }
    app.audit(AuditEntry {
        at: now,
        actor: format!("enroll-token:{}", token.id),
        address: Some(remote.to_string()),
        action: "agent.enroll".into(),
        target: Some(agent_id.to_string()),
        detail: serde_json::json!({ "labels": token.labels, "hostname": hello.hostname, "pending": token.approve }),
    })
    .await;
    tracing::info!(agent = %agent_id, token = %token.id, pending = token.approve, "agent enrolled");
    app.fleet.publish(shared::api::FleetEvent::AgentEnrolled { agent_id: agent_id.clone(), labels: token.labels.clone(), at: now });
    Ok(Authenticated {
        agent_id,
        token_labels: token.labels.clone(),
        credential: Some(issued.token),
        approval_pending: token.approve,
        rotation_requested: false,
    })
}

/// `GET /api/v1/agent/check`: whether an agent credential or an enrollment token would be
/// accepted, without connecting a session or using the token. For `muster-agent check`.
pub async fn check(State(app): State<AppState>, ConnectInfo(remote): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    let auth_header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match verify(&app, auth_header).await {
        Ok(Verified::Agent { row, .. }) => Json(serde_json::json!({ "agent_id": row.id, "pending": row.approval_pending })).into_response(),
        Ok(Verified::EnrollToken(t)) => Json(serde_json::json!({ "enroll_token": t.id, "uses_left": t.uses_left })).into_response(),
        Err(Refusal::Auth(e)) => {
            crate::logging::refused_handshake("agent check", remote, &e);
            app.auditor.refused(remote.ip(), "agent", &e, public_name(auth_header));
            refuse(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
        }
        Err(Refusal::Superseded(id)) => refuse_clone(&app, &id, remote),
        Err(Refusal::Internal(e)) => {
            tracing::error!(%remote, error = %e, "agent check failed");
            refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the server cannot check credentials right now".into())
        }
    }
}
