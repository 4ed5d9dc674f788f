//! The `{id}` of a route. Every id the server issues (agents, jobs, runs, tokens, enrollment
//! tokens) is 16 lowercase hex digits, and a job id a client chose (signed jobs) is 32, so
//! anything else is refused with a 400 before any lookup, the same on every route; a path that
//! is not UTF-8 gets the API's JSON error too.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use shared::AgentId;

use super::error::Error;

/// A well-formed id from the path; whether it names anything is the handler's business (404).
#[derive(Clone, Debug)]
pub struct PathId(pub String);

/// The same, for routes under `/agents/{id}`.
#[derive(Clone, Debug)]
pub struct AgentPath(pub AgentId);

/// An agent id has the form of every id, so it is what both extractors parse.
async fn parse<S: Send + Sync>(parts: &mut Parts, state: &S) -> Result<AgentId, Error> {
    let Path(id) = Path::<String>::from_request_parts(parts, state).await?;
    AgentId::parse(&id).map_err(|_| Error::BadRequest(format!("invalid id {id:?}: expected 16 lowercase hex digits")))
}

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<String>::from_request_parts(parts, state).await?;
        if AgentId::parse(&id).is_ok() || shared::job::is_client_job_id(&id) {
            Ok(PathId(id))
        } else {
            Err(Error::BadRequest(format!("invalid id {id:?}: expected 16 (or, for a job, 32) lowercase hex digits")))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AgentPath {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        parse(parts, state).await.map(AgentPath)
    }
}
