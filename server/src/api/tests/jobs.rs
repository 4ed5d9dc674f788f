//! Jobs through the API: created against agents in the store (one pending run each), refused
//! with a field name when malformed and with 409 when the fleet cannot take them, read,
//! listed, cancelled (twice), and held for a second admin above `approval_above`.

use axum::http::StatusCode;
use serde_json::json;
use shared::api::Role;
use shared::job::RunState;
use shared::protocol::{Outcome, ServerMessage};

use super::echo;
use crate::testing::{Progress, TestApp, report, runs_sent};

fn id_of(v: &serde_json::Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_owned()
}

#[tokio::test]
async fn a_job_has_one_pending_run_per_matched_agent_and_is_audited() {
    let app = TestApp::new().await;
    let a = app.enroll(1, &["site=paris"]).await;
    let b = app.enroll(2, &["site=paris"]).await;
    app.enroll(3, &["site=lyon"]).await;
    let operator = app.token(Role::Operator).await;
    let body = json!({
        "target": { "selector": "site=paris" },
        "command": { "program": { "shell": "uptime" } },
        "timeout_secs": 30, "ttl_secs": 120, "concurrency": "50%", "max_errors": 1,
    });
    let reply = app.post("/api/v1/jobs", Some(&operator), body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let job = reply.json();
    assert_eq!((job["total"].as_u64(), job["counts"].clone()), (Some(2), json!({ "pending": 2 })));
    assert_eq!((job["timeout_secs"].as_u64(), job["ttl_secs"].as_u64(), job["max_errors"].as_u64()), (Some(30), Some(120), Some(1)));
    assert_eq!((job["concurrency"].as_str(), job["finished_at"].clone()), (Some("50%"), serde_json::Value::Null));
    let id = id_of(&job);
    assert_eq!(app.store().job(&id).await.unwrap().unwrap().max_in_flight, Some(1), "50% of 2 agents");

    let detail = app.get(&format!("/api/v1/jobs/{id}"), Some(&operator)).await.json();
    let mut runs: Vec<(String, String)> = detail["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["agent_id"].as_str().unwrap().into(), r["state"].as_str().unwrap().into()))
        .collect();
    runs.sort();
    assert_eq!(runs, [(a.to_string(), "pending".to_owned()), (b.to_string(), "pending".to_owned())]);

    let entries = app.audit("job.create").await;
    assert_eq!(entries.len(), 1);
    let d = &entries[0].detail;
    assert_eq!((entries[0].target.as_deref(), d["agents"]["count"].as_u64()), (Some(id.as_str()), Some(2)));
    assert_eq!(d["command"], json!({ "shell": "uptime" }));
}

#[tokio::test]
async fn a_job_naming_an_agent_the_fleet_does_not_have_is_refused_and_nothing_is_stored() {
    let app = TestApp::new().await;
    let known = app.enroll(1, &[]).await;
    let waiting = app.enroll_as(2, &[], true).await;
    let revoked = app.enroll(3, &[]).await;
    app.store().revoke_agent(&revoked, shared::Timestamp::now()).await.unwrap();
    let operator = app.token(Role::Operator).await;

    let message = app
        .post("/api/v1/jobs", Some(&operator), echo(json!({ "agents": [known, "00000000000000ff"] })))
        .await
        .error(StatusCode::CONFLICT, "conflict");
    assert!(message.contains("00000000000000ff"), "{message}");
    let message =
        app.post("/api/v1/jobs", Some(&operator), echo(json!({ "agents": [revoked] }))).await.error(StatusCode::CONFLICT, "conflict");
    assert!(message.contains("revoked"), "{message}");
    let message =
        app.post("/api/v1/jobs", Some(&operator), echo(json!({ "agents": [waiting] }))).await.error(StatusCode::CONFLICT, "conflict");
    assert!(message.contains("waiting for an administrator"), "{message}");
    let message =
        app.post("/api/v1/jobs", Some(&operator), echo(json!({ "agents": [] }))).await.error(StatusCode::BAD_REQUEST, "bad_request");
    assert!(message.contains("target.agents"), "{message}");
    let message =
        app.post("/api/v1/jobs", Some(&operator), echo(json!({ "agents": ["KNOWN"] }))).await.error(StatusCode::BAD_REQUEST, "bad_request");
    assert!(message.contains("target"), "{message}");
    assert!(app.store().list_jobs(10).await.unwrap().is_empty());
    assert!(app.audit("job.create").await.is_empty());

    // `all` leaves out the pending and the revoked agent.
    let job = app.post("/api/v1/jobs", Some(&operator), echo("all".into())).await.json();
    assert_eq!(job["total"], 1);
}

#[tokio::test]
async fn a_job_for_all_agents_when_none_match_is_409_and_its_dry_run_matches_none() {
    let app = TestApp::new().await;
    let operator = app.token(Role::Operator).await;
    let message = app.post("/api/v1/jobs", Some(&operator), echo("all".into())).await.error(StatusCode::CONFLICT, "conflict");
    assert!(message.contains("matches no agents"), "{message}");
    let mut dry = echo("all".into());
    dry["dry_run"] = true.into();
    let reply = app.post("/api/v1/jobs", Some(&operator), dry.clone()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), json!({ "matched": 0, "online": 0, "needs_approval": false, "require_signature": 0, "agents": [] }));

    // A dry run reports what matches, and who is online, and creates nothing.
    let a = app.enroll(1, &[]).await;
    app.enroll(2, &[]).await;
    let _session = app.connect(&a);
    let reply = app.post("/api/v1/jobs", Some(&operator), dry).await.json();
    assert_eq!((reply["matched"].as_u64(), reply["online"].as_u64()), (Some(2), Some(1)));
    assert!(app.store().list_jobs(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_job_that_breaks_a_rule_is_400_naming_the_field() {
    let app = TestApp::new().await;
    app.enroll(1, &[]).await;
    let operator = app.token(Role::Operator).await;
    let with = |extra: serde_json::Value| {
        let mut body = echo("all".into());
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let big = "x".repeat(64 * 1024);
    let cases = [
        (with(json!({ "command": { "program": { "argv": [] } } })), "command.argv"),
        (with(json!({ "command": { "program": { "argv": [""] } } })), "command.argv"),
        (with(json!({ "command": { "program": { "shell": "  " } } })), "command.shell"),
        (with(json!({ "command": { "program": { "argv": ["echo", big] } } })), "64 KiB"),
        (with(json!({ "command": { "program": { "argv": ["env"] }, "env": { "A=B": "1" } } })), "environment variable names"),
        (with(json!({ "command": { "program": { "argv": ["env"] }, "secret_env": ["TOKEN"] } })), "command.secret_env"),
        (with(json!({ "command": { "program": { "run": "x" } } })), "command.program"),
        (with(json!({ "timeout_secs": 0 })), "timeout_secs"),
        (with(json!({ "timeout_secs": 604_801 })), "timeout_secs"),
        (with(json!({ "timeout_secs": "soon" })), "timeout_secs"),
        (with(json!({ "ttl_secs": 2_592_001 })), "ttl_secs"),
        (with(json!({ "output_limit": 0 })), "output_limit"),
        (with(json!({ "max_errors": 0 })), "max_errors"),
        (with(json!({ "concurrency": "0" })), "concurrency"),
        (with(json!({ "concurrency": "150%" })), "concurrency"),
        (with(json!({ "id": "abc" })), "id must be"),
        (with(json!({ "target": "some" })), "target"),
        (json!({ "target": "all" }), "command"),
        (json!({ "command": { "program": { "argv": ["true"] } } }), "target"),
    ];
    for (body, field) in cases {
        let reply = app.post("/api/v1/jobs", Some(&operator), body.clone()).await;
        let message = reply.error(StatusCode::BAD_REQUEST, "bad_request");
        assert!(message.contains(field), "{field}: {message}");
    }
    assert!(app.store().list_jobs(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_job_id_chosen_twice_is_409() {
    let app = TestApp::new().await;
    app.enroll(1, &[]).await;
    let operator = app.token(Role::Operator).await;
    let mut body = echo("all".into());
    body["id"] = "0123456789abcdef0123456789abcdef".into();
    let first = app.post("/api/v1/jobs", Some(&operator), body.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    assert_eq!(first.json()["id"], "0123456789abcdef0123456789abcdef");
    app.post("/api/v1/jobs", Some(&operator), body).await.error(StatusCode::CONFLICT, "conflict");
    assert_eq!(app.get("/api/v1/jobs/0123456789abcdef0123456789abcdef", Some(&operator)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn jobs_are_read_by_id_and_listed_newest_first_within_a_limit() {
    let app = TestApp::new().await;
    app.enroll(1, &[]).await;
    let viewer = app.token(Role::Viewer).await;
    let operator = app.token(Role::Operator).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(id_of(&app.post("/api/v1/jobs", Some(&operator), echo("all".into())).await.json()));
    }
    let listed = app.get("/api/v1/jobs", Some(&viewer)).await.json();
    let mut listed: Vec<String> = listed.as_array().unwrap().iter().map(id_of).collect();
    assert_eq!(listed.len(), 3);
    let one = app.get("/api/v1/jobs?limit=1", Some(&viewer)).await.json();
    assert_eq!(one.as_array().unwrap().len(), 1);
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    for bad in ["/api/v1/jobs?limit=0", "/api/v1/jobs?limit=1001", "/api/v1/jobs?limit=many"] {
        let message = app.get(bad, Some(&viewer)).await.error(StatusCode::BAD_REQUEST, "bad_request");
        assert!(message.contains("limit"), "{bad}: {message}");
    }
    app.get("/api/v1/jobs/00000000000000ff", Some(&viewer)).await.error(StatusCode::NOT_FOUND, "not_found");
    app.get("/api/v1/jobs/not-an-id", Some(&viewer)).await.error(StatusCode::BAD_REQUEST, "bad_request");
    let detail = app.get(&format!("/api/v1/jobs/{}", ids[0]), Some(&viewer)).await.json();
    assert_eq!((detail["id"].as_str(), detail["runs"].as_array().map(Vec::len)), (Some(ids[0].as_str()), Some(1)));
    let run = detail["runs"][0]["id"].as_str().unwrap();
    let page = app.get(&format!("/api/v1/runs/{run}/output"), Some(&viewer)).await.json();
    assert_eq!((page["data"].as_str(), page["complete"].as_bool()), (Some(""), Some(false)));
}

#[tokio::test]
async fn cancelling_ends_runs_not_sent_tells_agents_to_stop_the_rest_and_can_be_repeated() {
    let app = TestApp::new().await;
    let online = app.enroll(1, &[]).await;
    let offline = app.enroll(2, &[]).await;
    let mut session = app.connect(&online);
    let operator = app.token(Role::Operator).await;
    let id = id_of(&app.post("/api/v1/jobs", Some(&operator), echo("all".into())).await.json());
    app.state.dispatcher.round().await.unwrap();
    let sent = runs_sent(&mut session);
    assert_eq!(sent.len(), 1);

    let reply = app.post(&format!("/api/v1/jobs/{id}/cancel"), Some(&operator), json!({})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let detail = reply.json();
    let cancelled_at = detail["cancelled_at"].clone();
    assert!(cancelled_at.is_string(), "{detail}");
    let state_of = |d: &serde_json::Value, agent: &shared::AgentId| {
        let run = d["runs"].as_array().unwrap().iter().find(|r| r["agent_id"] == agent.as_str()).unwrap();
        (run["state"].as_str().unwrap().to_owned(), run["error"].as_str().map(str::to_owned))
    };
    assert_eq!(state_of(&detail, &offline), ("cancelled".into(), Some("cancelled before it started".into())));
    assert_eq!(state_of(&detail, &online).0, "dispatched", "only its agent can end a run it holds");
    match session.try_recv() {
        Ok(ServerMessage::Cancel(c)) => assert_eq!(c.run_id, sent[0].run_id),
        other => panic!("expected a cancel, got {other:?}"),
    }
    let entries = app.audit("job.cancel").await;
    assert_eq!(entries[0].detail, json!({ "not_started": 1, "signalled": 1 }));

    // Again: the same job, cancelled when it first was; nothing more ends.
    let again = app.post(&format!("/api/v1/jobs/{id}/cancel"), Some(&operator), json!({})).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    let again = again.json();
    assert_eq!(again["cancelled_at"], cancelled_at);
    assert_eq!(again["counts"], json!({ "cancelled": 1, "dispatched": 1 }));

    // The agent reports how it ended; the job then settles.
    report(app.store(), &online, Progress::Finished(&sent[0].run_id, Outcome::Cancelled)).await;
    app.state.dispatcher.round().await.unwrap();
    let done = app.get(&format!("/api/v1/jobs/{id}"), Some(&operator)).await.json();
    assert!(done["finished_at"].is_string(), "{done}");
    assert_eq!(done["counts"], json!({ "cancelled": 2 }));
    app.post("/api/v1/jobs/00000000000000ff/cancel", Some(&operator), json!({})).await.error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn cancelling_a_finished_job_leaves_it_finished_not_cancelled() {
    let app = TestApp::new().await;
    let agent = app.enroll(1, &[]).await;
    let mut session = app.connect(&agent);
    let operator = app.token(Role::Operator).await;
    let id = id_of(&app.post("/api/v1/jobs", Some(&operator), echo("all".into())).await.json());
    app.state.dispatcher.round().await.unwrap();
    let run = runs_sent(&mut session).pop().unwrap();
    report(app.store(), &agent, Progress::Finished(&run.run_id, Outcome::Succeeded)).await;
    app.state.dispatcher.round().await.unwrap();
    assert!(app.store().job(&id).await.unwrap().unwrap().finished_at.is_some());

    let reply = app.post(&format!("/api/v1/jobs/{id}/cancel"), Some(&operator), json!({})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let job = reply.json();
    assert_eq!(job["cancelled_at"], serde_json::Value::Null, "a job that succeeded now reads as cancelled: {job}");
    assert_eq!((job["counts"].clone(), job["status"].as_str()), (json!({ "succeeded": 1 }), Some("succeeded")));
    assert!(app.store().job(&id).await.unwrap().unwrap().cancelled_at.is_none());
    assert!(app.audit("job.cancel").await.is_empty(), "a cancel that did nothing is not audited");
}

#[tokio::test]
async fn a_job_above_approval_above_waits_for_another_admin_then_dispatches() {
    let app = TestApp::with(|c| c.approval_above = Some(1)).await;
    let mut sessions = Vec::new();
    for n in 1..=2 {
        let id = app.enroll(n, &[]).await;
        sessions.push(app.connect(&id));
    }
    let creator = app.token(Role::Admin).await;
    let other = app.token(Role::Admin).await;
    let operator = app.token(Role::Operator).await;
    let other_actor = {
        let me = app.get("/api/v1/whoami", Some(&other)).await.json();
        format!("{} ({})", me["name"].as_str().unwrap(), me["token_id"].as_str().unwrap())
    };

    let mut dry = echo("all".into());
    dry["dry_run"] = true.into();
    assert_eq!(app.post("/api/v1/jobs", Some(&creator), dry).await.json()["needs_approval"], true);
    let job = app.post("/api/v1/jobs", Some(&creator), echo("all".into())).await.json();
    assert_eq!(job["approval"], json!({ "approved_by": null, "approved_at": null }));
    let id = id_of(&job);
    app.state.dispatcher.round().await.unwrap();
    assert!(sessions.iter_mut().all(|s| runs_sent(s).is_empty()), "a job waiting for approval dispatched a run");

    let path = format!("/api/v1/jobs/{id}/approve");
    let message = app.post(&path, Some(&creator), json!({})).await.error(StatusCode::FORBIDDEN, "forbidden");
    assert!(message.contains("another admin"), "{message}");
    app.post(&path, Some(&operator), json!({})).await.error(StatusCode::FORBIDDEN, "forbidden");
    let approved = app.post(&path, Some(&other), json!({})).await;
    assert_eq!(approved.status, StatusCode::OK, "{}", approved.text());
    assert_eq!(approved.json()["approval"]["approved_by"].as_str(), Some(other_actor.as_str()));
    let entries = app.audit("job.approve").await;
    assert_eq!((entries.len(), entries[0].actor.as_str()), (1, other_actor.as_str()));
    let message = app.post(&path, Some(&other), json!({})).await.error(StatusCode::CONFLICT, "conflict");
    assert!(message.contains("already approved"), "{message}");

    app.state.dispatcher.round().await.unwrap();
    assert!(sessions.iter_mut().all(|s| runs_sent(s).len() == 1), "each agent gets its run once approved");

    // A job under the threshold needs nothing, and says so.
    let mut one = echo(json!({ "agents": [shared::AgentId::from_bytes([1; 8])] }));
    one["ttl_secs"] = 60.into();
    let small = id_of(&app.post("/api/v1/jobs", Some(&creator), one).await.json());
    let message = app.post(&format!("/api/v1/jobs/{small}/approve"), Some(&other), json!({})).await.error(StatusCode::CONFLICT, "conflict");
    assert!(message.contains("does not need"), "{message}");
}

#[tokio::test]
async fn a_cancelled_job_waiting_for_approval_cannot_be_approved() {
    let app = TestApp::with(|c| c.approval_above = Some(0)).await;
    app.enroll(1, &[]).await;
    let creator = app.token(Role::Admin).await;
    let other = app.token(Role::Admin).await;
    let id = id_of(&app.post("/api/v1/jobs", Some(&creator), echo("all".into())).await.json());
    assert_eq!(app.post(&format!("/api/v1/jobs/{id}/cancel"), Some(&creator), json!({})).await.status, StatusCode::OK);
    let message = app.post(&format!("/api/v1/jobs/{id}/approve"), Some(&other), json!({})).await.error(StatusCode::CONFLICT, "conflict");
    assert!(message.contains("cancelled"), "{message}");
    assert_eq!(app.store().runs(&id).await.unwrap()[0].state, RunState::Cancelled);
}

#[tokio::test]
async fn a_secret_variable_is_sent_to_its_agent_and_shown_to_nobody() {
    let app = TestApp::new().await;
    let agent = app.enroll(1, &[]).await;
    let mut session = app.connect(&agent);
    let admin = app.token(Role::Admin).await;
    let body = json!({
        "target": "all",
        "command": { "program": { "argv": ["deploy"] }, "env": { "API_KEY": "hunter2-value", "LANG": "C" }, "secret_env": ["API_KEY"] },
    });
    let created = app.post("/api/v1/jobs", Some(&admin), body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let id = id_of(&created.json());
    assert_eq!(created.json()["command"]["env"], json!({ "API_KEY": "(secret)", "LANG": "C" }));
    let replies = [
        app.get(&format!("/api/v1/jobs/{id}"), Some(&admin)).await,
        app.get("/api/v1/jobs", Some(&admin)).await,
        app.get(&format!("/api/v1/agents/{agent}/runs"), Some(&admin)).await,
        app.get("/api/v1/audit", Some(&admin)).await,
    ];
    for reply in replies {
        assert_eq!(reply.status, StatusCode::OK);
        assert!(!reply.text().contains("hunter2"), "the secret in {}", reply.text());
    }
    app.state.dispatcher.round().await.unwrap();
    let run = runs_sent(&mut session).pop().unwrap();
    assert_eq!(run.command.env.get("API_KEY").map(String::as_str), Some("hunter2-value"), "the agent needs the value");
}
