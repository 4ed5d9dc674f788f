//! The API's one error type, and the one place errors become HTTP statuses. SQL text and other
//! internals are logged, never sent.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use shared::api::ApiError;

use crate::auth::AuthError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Unauthorized(AuthError),
    #[error("this token's role ({have}) may not do that; it needs {need}")]
    Forbidden { have: shared::api::Role, need: shared::api::Role },
    /// A signature that does not authorize the request (a signed job or key revocation that does
    /// not verify, has expired, or does not say what it covers): 403, as for a missing role.
    #[error("{0}")]
    SignatureRefused(String),
    /// The caller's token scope does not reach what it asked for.
    #[error("{0}")]
    OutOfScope(String),
    /// A rule about who may do this refuses this caller (an admin approving its own job).
    #[error("{0}")]
    NotAllowed(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// A well-formed request that the state of things refuses (a target that matches no agents).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl From<JsonRejection> for Error {
    fn from(r: JsonRejection) -> Self {
        Error::BadRequest(r.body_text())
    }
}

impl From<QueryRejection> for Error {
    fn from(r: QueryRejection) -> Self {
        Error::BadRequest(r.body_text())
    }
}

impl From<PathRejection> for Error {
    fn from(r: PathRejection) -> Self {
        Error::BadRequest(r.body_text())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, kind, message) = match &self {
            Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", self.to_string()),
            Error::Forbidden { .. } | Error::OutOfScope(_) | Error::NotAllowed(_) => (StatusCode::FORBIDDEN, "forbidden", self.to_string()),
            Error::SignatureRefused(_) => (StatusCode::FORBIDDEN, "signature_refused", self.to_string()),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", self.to_string()),
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request", self.to_string()),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict", self.to_string()),
            Error::Store(StoreError::Full) => {
                tracing::error!("database disk full");
                (StatusCode::INSUFFICIENT_STORAGE, "unavailable", "the server's disk is full; nothing was changed".into())
            }
            Error::Store(StoreError::Duplicate) => (StatusCode::CONFLICT, "conflict", "that id is already taken".into()),
            Error::Store(StoreError::Busy) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the database is busy; try again".into()),
            Error::Store(StoreError::Unavailable) => {
                if let Some(suppressed) = UNAVAILABLE.admit() {
                    tracing::warn!(suppressed, "the database is unavailable");
                }
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the server cannot reach its database; try again".into())
            }
            Error::Store(e) => {
                tracing::error!(error = %e, "store error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log".into())
            }
            Error::Internal(e) => {
                tracing::error!(error = %e, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log".into())
            }
        };
        let mut resp = (status, Json(ApiError { error: kind.into(), message })).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        resp.headers_mut().insert(shared::protocol::MUSTER_ERROR_HEADER, axum::http::HeaderValue::from_static(kind));
        resp
    }
}

/// An unreachable database fails every request at once: one line a few seconds says so.
static UNAVAILABLE: crate::logging::Throttle = crate::logging::Throttle::new(std::time::Duration::from_secs(5), 1);

pub type Result<T, E = Error> = std::result::Result<T, E>;
