//! The `{id}` of a route. Every id the server issues (agents, jobs, runs, tokens, enrollment
//! tokens) is 16 lowercase hex digits, and a job id a client chose (signed jobs) is 32, so
//! anything else is refused with a 400 before any lookup, the same on every route; a path that
//! is not UTF-8 gets the API's JSON error too.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use shared::{AgentId, JobId};

use super::error::Error;

/// A well-formed token id from the path; whether it names anything is the handler's business
/// (404). Token ids have the form of agent ids.
#[derive(Clone, Debug)]
pub struct PathId(pub String);

/// The same, for routes under `/agents/{id}`.
#[derive(Clone, Debug)]
pub struct AgentPath(pub AgentId);

/// The same, for routes under `/jobs/{id}`: only the forms the server and clients issue.
#[derive(Clone, Debug)]
pub struct JobPath(pub JobId);

/// The id from the path, parsed by `parse`; `expected` says what it should have been.
async fn id<S: Send + Sync, T>(parts: &mut Parts, state: &S, parse: fn(&str) -> Option<T>, expected: &str) -> Result<T, Error> {
    let Path(id) = Path::<String>::from_request_parts(parts, state).await?;
    parse(&id).ok_or_else(|| Error::BadRequest(format!("invalid id {id:?}: expected {expected}")))
}

const SIXTEEN: &str = "16 lowercase hex digits";

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        id(parts, state, |s| AgentId::parse(s).ok(), SIXTEEN).await.map(|id| PathId(id.into()))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AgentPath {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        id(parts, state, |s| AgentId::parse(s).ok(), SIXTEEN).await.map(AgentPath)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for JobPath {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let parse = |s: &str| shared::id::is_issued_form(s).then(|| JobId::parse(s).ok()).flatten();
        id(parts, state, parse, "16 (or, for a job a client named, 32) lowercase hex digits").await.map(JobPath)
    }
}
