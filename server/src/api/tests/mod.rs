//! The router driven in-process: an `AppState` over a temporary SQLite store
//! ([`crate::testing::TestApp`]), requests sent with `tower::ServiceExt::oneshot`, no socket and
//! no TLS. Each file holds what API users rely on for one concern.

mod auth;
mod bodies;
mod enroll_tokens;
mod jobs;
mod openapi;
mod probes;
mod secrets;
mod tokens;

/// A job body running `echo hi` on `target` (`"all"`, `{"agents": [...]}`, `{"selector": ...}`).
fn echo(target: serde_json::Value) -> serde_json::Value {
    serde_json::json!({ "target": target, "command": { "program": { "argv": ["echo", "hi"] } } })
}
