//! Agent identity over time, end to end with real agents: credentials rotate (on the agent's
//! schedule, or when an admin asks) without a reconnect and without ever locking an agent out;
//! a copy of the old credential (a cloned machine) is refused and reported as a clone; agents
//! enrolled with an `approve` token wait, sent no runs, until an admin accepts them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use reqwest::StatusCode;
use shared::api::{AgentStatus, AuditPage, CreateToken, Role, TokenCreated};
use shared::job::{RunState, Target};
use shared::protocol::{AgentMessage, CredentialRequest, CredentialStored, ServerMessage};
use tests::ws::{self, Handshake};
use tests::{TestServer, job, shell, wait_for};

fn token_of(credential_json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(credential_json).expect("credential.json");
    v["token"].as_str().expect("token").to_owned()
}

/// `GET /agent/check` with `bearer`: the status and the body.
async fn check(server: &TestServer, bearer: &str) -> (StatusCode, String) {
    let resp = server.api.http().get(server.api.url("/agent/check")).bearer_auth(bearer).send().await.unwrap();
    (resp.status(), resp.text().await.unwrap())
}

async fn audited(server: &TestServer, action: &str) -> Vec<shared::api::AuditEntry> {
    let page: AuditPage = server.api.get(&format!("/audit?action={action}")).await;
    page.entries
}

#[tokio::test]
async fn an_admin_rotation_replaces_the_credential_in_session_and_a_copy_is_refused_as_a_clone() {
    let server = TestServer::spawn().await;
    let token = server.enroll_token(1, &[]).await;
    let mut agent = server.spawn_agent(Some(&token), &[]);
    let id = agent.id().await;
    let before = server.api.wait_status(&id, AgentStatus::Online, Duration::from_secs(20)).await;
    let connected_at = before.connection.as_ref().map(|c| c.connected_at);
    let old_file = std::fs::read_to_string(agent.credential_path()).unwrap();
    let old = token_of(&old_file);

    let out = server.cli(&["agent", "rotate", id.as_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("rotate its credential now"), "{out:?}");

    // The agent stores a new credential; the server then holds only that one.
    let path = agent.credential_path();
    let new = wait_for("the agent to store a new credential", Duration::from_secs(20), || {
        let (path, old) = (path.clone(), old.clone());
        async move { std::fs::read_to_string(&path).ok().map(|t| token_of(&t)).filter(|t| *t != old) }
    })
    .await;
    let detail = wait_for("the rotation to complete on the server", Duration::from_secs(20), || async {
        let d = server.api.agent(&id).await;
        (d.rotation_requested_at.is_none() && d.credential_issued_at > d.enrolled_at).then_some(d)
    })
    .await;
    assert_eq!(detail.connection.as_ref().map(|c| c.connected_at), connected_at, "rotated within the session, no reconnect");
    assert_eq!(check(&server, &new).await.0, StatusCode::OK);
    let (status, body) = check(&server, &old).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("replaced by a rotation"), "{body}");
    let rotated = audited(&server, "agent.credential_rotated").await;
    assert_eq!(rotated.len(), 1, "{rotated:?}");
    assert_eq!(rotated[0].actor, format!("agent:{id}"));
    assert_eq!(audited(&server, "agent.rotate_credential").await.len(), 1);

    // A machine cloned before the rotation starts with the old credential: refused, reported.
    let mut clone = server.spawn_agent_from_credential(&old_file);
    let seen = wait_for("the clone to be reported", Duration::from_secs(20), || async { server.api.agent(&id).await.clone_seen }).await;
    assert!(seen.from_addr.starts_with("127.0.0.1:"), "{seen:?}");
    let clone_log = clone.process().log.clone();
    let text = wait_for("the clone to log its refusal", Duration::from_secs(20), || {
        let t = std::fs::read_to_string(&clone_log).unwrap_or_default();
        async move { t.contains("replaced by a rotation").then_some(t) }
    })
    .await;
    assert!(!text.contains("connected"), "the clone never got a session: {text}");
    let out = server.cli(&["agent", id.as_str()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Clone?"), "{out:?}");

    // The real agent was never disturbed, and still runs jobs.
    let d = server.api.agent(&id).await;
    assert_eq!(d.summary.status, AgentStatus::Online);
    assert_eq!(d.connection.as_ref().map(|c| c.connected_at), connected_at);
    let created = server.api.create_job(&job(Target::Agents(vec![id.clone()]), shell("echo still-here"))).await;
    let done = server.api.wait_job_finished(&created.id, Duration::from_secs(30)).await;
    assert_eq!(done.runs[0].state, RunState::Succeeded, "{:?}", done.runs);
    clone.process().kill();
    agent.process().kill();
}

#[tokio::test]
async fn an_agent_rotates_its_credential_on_its_own_schedule_and_keeps_working() {
    let server = TestServer::spawn().await;
    let token = server.enroll_token(1, &[]).await;
    let mut agent = server.spawn_agent_with_config(Some(&token), &[], "credential_rotation = \"1s\"\n");
    let id = agent.id().await;
    let detail = wait_for("the agent to rotate its credential", Duration::from_secs(30), || async {
        let d = server.api.agent(&id).await;
        (d.credential_issued_at > d.enrolled_at).then_some(d)
    })
    .await;
    assert_eq!(detail.summary.status, AgentStatus::Online);
    let stored = token_of(&std::fs::read_to_string(agent.credential_path()).unwrap());
    assert_eq!(check(&server, &stored).await.0, StatusCode::OK, "the agent holds the credential the server accepts");
    let rotated = wait_for("the rotation to be audited", Duration::from_secs(10), || async {
        let e = audited(&server, "agent.credential_rotated").await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(rotated[0].detail["how"], "confirmed");
    // Asking again at once is refused by the server (one credential a minute), so the agent
    // stays on the one it has.
    let created = server.api.create_job(&job(Target::Agents(vec![id.clone()]), shell("echo ok"))).await;
    let done = server.api.wait_job_finished(&created.id, Duration::from_secs(30)).await;
    assert_eq!(done.runs[0].state, RunState::Succeeded, "{:?}", done.runs);
    assert_eq!(audited(&server, "agent.credential_rotated").await.len(), 1);
    assert_eq!(token_of(&std::fs::read_to_string(agent.credential_path()).unwrap()), stored);
    agent.process().kill();
}

#[tokio::test]
async fn a_lost_confirmation_never_locks_the_agent_out() {
    let server = TestServer::spawn().await;
    let enroll = server.enroll_token(1, &[]).await;
    let tls = tests::rustls_config(&server.ca);
    let Handshake::Open(mut ws) = ws::connect(&server.url, Some(&enroll), tls.clone()).await.unwrap() else { panic!("refused") };
    let welcome = ws::open(&mut ws, "raw", 1000).await;
    let first = welcome.credential.expect("credential at enrollment");
    drop(ws);

    // Ask for a new credential, confirm the wrong one, and go away.
    let Handshake::Open(mut ws) = ws::connect(&server.url, Some(&first), tls.clone()).await.unwrap() else { panic!("refused") };
    ws::open(&mut ws, "raw", 1000).await;
    ws::send(&mut ws, &AgentMessage::CredentialRequest(CredentialRequest {})).await.unwrap();
    let second = ws::read_until(&mut ws, Duration::from_secs(10), |m| match m {
        ServerMessage::Credential(c) => Some(c.credential),
        _ => None,
    })
    .await
    .expect("a new credential");
    ws::send(&mut ws, &AgentMessage::CredentialStored(CredentialStored { sha256: "0".repeat(64) })).await.unwrap();
    drop(ws);

    // Until the agent shows it has the new one, both work.
    assert_eq!(check(&server, &first).await.0, StatusCode::OK);
    assert_eq!(check(&server, &second).await.0, StatusCode::OK);
    // Connecting with the new one completes the rotation; the old one is then a clone's.
    let Handshake::Open(mut ws) = ws::connect(&server.url, Some(&second), tls.clone()).await.unwrap() else { panic!("refused") };
    ws::open(&mut ws, "raw", 1000).await;
    let (status, body) = check(&server, &first).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("replaced by a rotation"), "{body}");
    assert_eq!(check(&server, &second).await.0, StatusCode::OK);
    let rotated = audited(&server, "agent.credential_rotated").await;
    assert_eq!(rotated.len(), 1);
    assert_eq!(rotated[0].detail["how"], "connected with the new credential");
    // A second request within the minute gets no credential. Messages are handled in order, so
    // a second `hello` (which closes the session) shows whether anything came before it.
    ws::send(&mut ws, &AgentMessage::CredentialRequest(CredentialRequest {})).await.unwrap();
    ws::send(&mut ws, &ws::hello("raw", 1000)).await.unwrap();
    let credential = ws::read_until(&mut ws, Duration::from_secs(10), |m| matches!(m, ServerMessage::Credential(_)).then_some(()));
    assert!(credential.await.is_none(), "a second credential within the minute");
    assert_eq!(check(&server, &second).await.0, StatusCode::OK);
}

#[tokio::test]
async fn agents_from_an_approve_token_wait_for_an_admin_and_get_no_runs_until_then() {
    let server = TestServer::spawn().await;
    let (_normal, normal_id) = server.spawn_agents(1, &[]).await.remove(0);
    let out = server.cli(&["enroll-token", "create", "--approve", "--uses", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("muster agent accept"), "{stdout}");
    let token = stdout.lines().next().unwrap().trim().to_owned();
    let mut agent = server.spawn_agent(Some(&token), &[]);
    let id = agent.id().await;
    let detail = server.api.wait_status(&id, AgentStatus::Online, Duration::from_secs(20)).await;
    assert!(detail.summary.pending);
    let log = agent.process().log.clone();
    wait_for("the agent to log that it waits", Duration::from_secs(10), || {
        let waits = std::fs::read_to_string(&log).unwrap_or_default().contains("waits for an administrator's approval");
        async move { waits.then_some(()) }
    })
    .await;
    let out = server.cli(&["agents"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("online (pending)"), "{out:?}");

    // It is never a target: not in --all, and named, refused with the reason.
    let all = server.api.create_job(&job(Target::All, shell("echo all"))).await;
    let done = server.api.wait_job_finished(&all.id, Duration::from_secs(30)).await;
    let ran: Vec<_> = done.runs.iter().map(|r| r.agent_id.clone()).collect();
    assert_eq!(ran, vec![normal_id.clone()]);
    let resp = server.api.raw_post("/jobs", &job(Target::Agents(vec![id.clone()]), shell("echo no"))).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert!(resp.text().await.unwrap().contains("waiting for an administrator"));

    // Only an admin accepts it.
    let operator: TokenCreated =
        server.api.post("/tokens", &CreateToken { name: "op".into(), role: Role::Operator, ttl_secs: None, scope: None }).await;
    let resp = server.api.with_token(&operator.token).raw_post(&format!("/agents/{id}/accept"), &serde_json::json!({})).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let out = server.cli(&["agent", "accept", id.as_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!server.api.agent(&id).await.summary.pending);
    let resp = server.api.raw_post(&format!("/agents/{id}/accept"), &serde_json::json!({})).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT, "accepting twice says it is not pending");
    let accepted = audited(&server, "agent.accept").await;
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].target.as_deref(), Some(id.as_str()));

    // Now it runs jobs like any agent, without reconnecting.
    let created = server.api.create_job(&job(Target::Agents(vec![id.clone()]), shell("echo accepted"))).await;
    let done = server.api.wait_job_finished(&created.id, Duration::from_secs(30)).await;
    assert_eq!(done.runs[0].state, RunState::Succeeded, "{:?}", done.runs);
    agent.process().kill();
}
