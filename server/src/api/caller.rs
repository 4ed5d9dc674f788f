//! Who is calling: the operator token in `Authorization: Bearer`, checked on every request.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use shared::Timestamp;
use shared::api::Role;

use super::error::Error;
use crate::app::AppState;
use crate::auth::{AuthError, Kind, Presented};
use crate::store::AuditEntry;

/// How often a long-lived stream checks that its token still works.
pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// `last_used_at` is written at most this often per token, so reads stay reads.
const TOUCH_EVERY_MS: i64 = 60_000;

#[derive(Clone, Debug)]
pub struct Caller {
    pub token_id: String,
    pub name: String,
    pub role: Role,
    /// When the token stops working; long-lived streams end then.
    pub expires_at: Option<Timestamp>,
    /// Drops the connection the request came on.
    pub connection: Option<tokio_util::sync::CancellationToken>,
    /// The peer's address (`ip:port`), for the audit log.
    pub address: Option<String>,
    /// The agents this token may see and target; none for the whole fleet.
    pub scope: Option<shared::Selector>,
}

impl Caller {
    pub fn require(&self, need: Role) -> Result<(), Error> {
        if self.role >= need { Ok(()) } else { Err(Error::Forbidden { have: self.role, need }) }
    }

    /// A token that is cancelled when this caller's credential stops working (revoked, or
    /// past its expiry) or the server shuts down: long-lived streams end with it. Revocation on
    /// this node is seen at once; the token is also checked against the database every
    /// [`RECHECK`], so a revocation made elsewhere (another node, `bootstrap`) ends the stream
    /// within that time. Dropping the returned guard stops the watch.
    pub fn watch(&self, app: &AppState) -> (tokio_util::sync::CancellationToken, tokio_util::sync::DropGuard) {
        let end = app.shutdown.child_token();
        let guard = end.clone().drop_guard();
        let (id, expires_at) = (self.token_id.clone(), self.expires_at);
        let mut revoked = app.revoked.subscribe();
        let (store, watch, connection) = (app.store.clone(), end.clone(), self.connection.clone());
        tokio::spawn(async move {
            let until_expiry = async {
                match expires_at {
                    Some(t) => tokio::time::sleep(t.age_until(Timestamp::now())).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(until_expiry);
            let mut recheck = tokio::time::interval(RECHECK);
            loop {
                tokio::select! {
                    _ = watch.cancelled() => return,
                    _ = &mut until_expiry => break,
                    r = revoked.recv() => match r {
                        Ok(gone) if gone == id => break,
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    _ = recheck.tick() => match store.api_token(&id).await {
                        Ok(Some(row)) if row.revoked_at.is_none() => continue,
                        Ok(_) => break,
                        // A database that cannot answer is not a revocation.
                        Err(_) => continue,
                    },
                }
            }
            watch.cancel();
            // A client that does not read is not polled, so ending its stream is not enough.
            if let Some(c) = connection {
                c.cancel();
            }
        });
        (end, guard)
    }

    /// Whether this caller sees an agent with these labels.
    pub fn sees(&self, labels: &shared::Labels) -> bool {
        crate::scope::sees(self.scope.as_ref(), labels)
    }

    /// Refuses a scoped token what only a token of the whole fleet may do.
    pub fn require_unscoped(&self, what: &str) -> Result<(), Error> {
        match &self.scope {
            None => Ok(()),
            Some(s) => Err(Error::OutOfScope(format!("this token is scoped to {s}; {what} needs a token of the whole fleet"))),
        }
    }

    /// How this caller is named in the audit log and on what it creates.
    pub fn actor(&self) -> String {
        format!("{} ({})", self.name, self.token_id)
    }

    /// An audit entry of something this caller did, now, from its address.
    pub fn entry(&self, action: &str, target: Option<String>, detail: serde_json::Value) -> AuditEntry {
        AuditEntry { at: Timestamp::now(), actor: self.actor(), address: self.address.clone(), action: action.into(), target, detail }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let remote = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0);
        let presented = Presented::from_header(header);
        let named = presented.as_ref().ok().map(Presented::public_name);
        let refused = |e: AuthError| {
            crate::logging::refused_request(parts.uri.path(), &e);
            if let Some(remote) = remote {
                app.auditor.refused(remote.ip(), "api", &e, named.clone());
            }
            Error::Unauthorized(e)
        };
        let presented = presented.map_err(refused)?;
        if presented.kind != Kind::Operator {
            return Err(refused(AuthError::WrongKind));
        }
        let row = app.store.api_token(&presented.id).await?.ok_or_else(|| refused(AuthError::Wrong))?;
        if !presented.matches(&row.secret_hash) {
            return Err(refused(AuthError::Wrong));
        }
        if row.revoked_at.is_some() {
            return Err(refused(AuthError::Revoked));
        }
        let now = Timestamp::now();
        if row.expires_at.is_some_and(|e| e <= now) {
            return Err(refused(AuthError::Expired));
        }
        if row.last_used_at.is_none_or(|t| now.unix_millis() - t.unix_millis() > TOUCH_EVERY_MS)
            && let Err(e) = app.store.touch_api_token(&row.id, now).await
        {
            tracing::debug!(error = %e, "could not note token use");
        }
        crate::admission::promote(&parts.extensions);
        let connection = parts.extensions.get::<crate::app::ConnCancel>().map(|c| c.0.clone());
        let address = remote.map(|r| r.to_string());
        Ok(Caller { token_id: row.id, name: row.name, role: row.role, expires_at: row.expires_at, connection, address, scope: row.scope })
    }
}
