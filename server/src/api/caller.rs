//! Who is calling: the operator token in `Authorization: Bearer`, checked on every request.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use shared::Timestamp;
use shared::api::Role;

use super::error::Error;
use crate::app::AppState;
use crate::auth::{AuthError, Kind, Presented};

/// `last_used_at` is written at most this often per token, so reads stay reads.
const TOUCH_EVERY_MS: i64 = 60_000;

#[derive(Clone, Debug)]
pub struct Caller {
    pub token_id: String,
    pub name: String,
    pub role: Role,
}

impl Caller {
    pub fn require(&self, need: Role) -> Result<(), Error> {
        if self.role >= need { Ok(()) } else { Err(Error::Forbidden { have: self.role, need }) }
    }

    /// How this caller is named in the audit log and on what it creates.
    pub fn actor(&self) -> String {
        format!("{} ({})", self.name, self.token_id)
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let refused = |e: AuthError| {
            tracing::warn!(path = %parts.uri.path(), reason = %e, "API request refused");
            Error::Unauthorized(e)
        };
        let presented = Presented::from_header(header).map_err(refused)?;
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
        Ok(Caller { token_id: row.id, name: row.name, role: row.role })
    }
}
