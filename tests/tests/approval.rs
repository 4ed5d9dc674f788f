//! A second approver for large jobs, end to end: with `--approval-above 1`, a job that matches
//! two agents is created but nothing of it runs until an admin other than its creator approves
//! it; the creator, operators and a second approval are refused; an unapproved job expires.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use reqwest::StatusCode;
use shared::api::{AuditPage, CreateToken, Role, TokenCreated};
use shared::job::{DryRun, JobSummary, RunState, Target};
use tests::{TestServer, job, shell};

async fn token(server: &TestServer, name: &str, role: Role) -> TokenCreated {
    server.api.post("/tokens", &CreateToken { name: name.into(), role, ttl_secs: None, scope: None }).await
}

#[tokio::test]
async fn a_large_job_waits_for_a_second_admin_and_runs_once_approved() {
    let server = TestServer::spawn_with(&["--approval-above", "1"]).await;
    let agents = server.spawn_agents(2, &[]).await;
    let one = agents[0].1.clone();

    // Small jobs run as before, and the dry run says which jobs would wait.
    let small = server.api.create_job(&job(Target::Agents(vec![one.clone()]), shell("echo small"))).await;
    assert!(small.approval.is_none());
    let mut dry = job(Target::All, shell("echo big"));
    dry.dry_run = true;
    assert!(server.api.post::<_, DryRun>("/jobs", &dry).await.needs_approval);

    let out = server.cli(&["run", "--all", "--detach", "--", "echo", "big"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let big = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let waiting = server.api.job(&big).await;
    assert_eq!(waiting.job.approval.as_ref().map(|a| a.approved_by.clone()), Some(None));
    // The dispatcher has handled a later job, so it has seen this one too, and left it alone.
    let later = server.api.create_job(&job(Target::Agents(vec![one.clone()]), shell("echo later"))).await;
    server.api.wait_job_finished(&later.id, Duration::from_secs(30)).await;
    server.api.wait_job_finished(&small.id, Duration::from_secs(30)).await;
    let still = server.api.job(&big).await;
    assert!(still.runs.iter().all(|r| r.state == RunState::Pending), "{:?}", still.runs);
    let out = server.cli(&["job", &big]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("waiting for a second admin"), "{out:?}");

    // Not the creator, not an operator.
    let out = server.cli(&["job", "approve", &big]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another admin must approve it"), "{out:?}");
    let operator = token(&server, "op", Role::Operator).await;
    let resp = server.api.with_token(&operator.token).raw_post(&format!("/jobs/{big}/approve"), &serde_json::json!({})).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // A second admin releases it; it runs on both agents.
    let second = token(&server, "second-admin", Role::Admin).await;
    let out = server.cli_as(&second.token, &["job", "approve", &big]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done = server.api.wait_job_finished(&big, Duration::from_secs(30)).await;
    assert_eq!(done.runs.len(), 2);
    assert!(done.runs.iter().all(|r| r.state == RunState::Succeeded), "{:?}", done.runs);
    let approved_by = done.job.approval.and_then(|a| a.approved_by).unwrap();
    assert!(approved_by.starts_with("second-admin"), "{approved_by}");
    let resp = server.api.with_token(&second.token).raw_post(&format!("/jobs/{big}/approve"), &serde_json::json!({})).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let page: AuditPage = server.api.get("/audit?action=job.approve").await;
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.entries[0].target.as_deref(), Some(big.as_str()));
}

#[tokio::test]
async fn a_job_nobody_approves_expires_without_running() {
    let server = TestServer::spawn_with(&["--approval-above", "1"]).await;
    let _agents = server.spawn_agents(2, &[]).await;
    let mut req = job(Target::All, shell("echo never"));
    req.ttl_secs = Some(1);
    let created: JobSummary = server.api.create_job(&req).await;
    assert!(created.approval.is_some());
    let done = server.api.wait_job_finished(&created.id, Duration::from_secs(30)).await;
    assert!(done.runs.iter().all(|r| r.state == RunState::Expired), "{:?}", done.runs);
    assert!(done.runs[0].error.as_deref().unwrap_or_default().contains("no second admin approved"), "{:?}", done.runs);
}
