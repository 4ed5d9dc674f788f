//! Who may call: a missing, malformed, wrong, revoked or expired token is a 401 with the API's
//! error body and headers; roles bound what a valid token may do (403); a scoped token sees
//! and targets only the agents inside its scope.

use axum::http::StatusCode;
use shared::Timestamp;
use shared::api::Role;

use super::echo;
use crate::testing::TestApp;

/// Asserts a refusal for the credential: 401, `unauthorized` in the body and in
/// `X-Muster-Error`, `WWW-Authenticate: Bearer`. Returns the message.
#[track_caller]
fn unauthorized(reply: &crate::testing::Reply) -> String {
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"), "{}", reply.text());
    reply.error(StatusCode::UNAUTHORIZED, "unauthorized")
}

/// `mst_<id>_<secret>` with the secret's last digit changed: the right id, a wrong secret.
fn with_wrong_secret(token: &str) -> String {
    let mut t = token.to_owned();
    let last = t.pop().unwrap();
    t.push(if last == '0' { '1' } else { '0' });
    t
}

#[tokio::test]
async fn a_request_without_a_valid_token_is_401_with_the_json_error_and_its_headers() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    let send = |header: Option<String>| {
        let mut b = axum::http::Request::builder().uri("/api/v1/whoami");
        if let Some(h) = header {
            b = b.header("authorization", h);
        }
        app.send(b.body(axum::body::Body::empty()).unwrap())
    };
    let cases = [
        (None, "no credential"),
        (Some("Bearer".to_owned()), "malformed credential"),
        (Some("Bearer not-a-token".to_owned()), "malformed credential"),
        (Some(format!("Basic {admin}")), "malformed credential"),
        (Some(format!("Bearer mse_{}_{}", "a".repeat(16), "b".repeat(64))), "this credential may not do that"),
        (Some(format!("Bearer msa_{}_{}", "a".repeat(16), "b".repeat(64))), "this credential may not do that"),
        (Some(format!("Bearer mst_{}_{}", "a".repeat(16), "b".repeat(64))), "unknown or wrong credential"),
        (Some(format!("Bearer {}", with_wrong_secret(&admin))), "unknown or wrong credential"),
    ];
    for (header, expected) in cases {
        let reply = send(header.clone()).await;
        let message = unauthorized(&reply);
        assert!(message.starts_with(expected), "{header:?}: {message}");
    }
    assert_eq!(send(Some(format!("Bearer {admin}"))).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_revoked_token_is_refused_from_the_next_request() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    let viewer = app.token(Role::Viewer).await;
    let viewer_id = app.get("/api/v1/whoami", Some(&viewer)).await.json()["token_id"].as_str().unwrap().to_owned();
    assert_eq!(app.delete(&format!("/api/v1/tokens/{viewer_id}"), Some(&admin)).await.status, StatusCode::NO_CONTENT);
    let message = unauthorized(&app.get("/api/v1/jobs", Some(&viewer)).await);
    assert_eq!(message, "credential revoked");
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let app = TestApp::new().await;
    let issued = crate::auth::issue(crate::auth::Kind::Operator, None).unwrap();
    let now = Timestamp::now();
    let row = crate::store::ApiTokenRow {
        id: issued.id.clone(),
        name: "old".into(),
        role: Role::Admin,
        secret_hash: issued.hash.clone(),
        created_by: "test".into(),
        created_at: now.saturating_sub(std::time::Duration::from_secs(7200)),
        expires_at: Some(now.saturating_sub(std::time::Duration::from_secs(1))),
        revoked_at: None,
        last_used_at: None,
        scope: None,
    };
    app.store().insert_api_token(&row).await.unwrap();
    let message = unauthorized(&app.get("/api/v1/whoami", Some(&issued.token)).await);
    assert_eq!(message, "credential expired");
    // A body from such a caller is refused before it is read, with the same answer.
    let message = unauthorized(&app.post("/api/v1/tokens", Some(&issued.token), serde_json::json!({ "name": "x", "role": "admin" })).await);
    assert_eq!(message, "credential expired");
}

#[tokio::test]
async fn refused_credentials_are_audited_by_address_and_credential_id_never_by_secret() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    let wrong = with_wrong_secret(&admin);
    unauthorized(&app.get("/api/v1/whoami", Some(&wrong)).await);
    unauthorized(&app.get("/api/v1/whoami", None).await);
    unauthorized(&app.get("/api/v1/whoami", Some("garbage")).await);
    app.state.auditor.flush_refusals().await;
    let entries = app.audit("auth.refused").await;
    assert_eq!(entries.len(), 1, "one entry per address and window");
    let e = &entries[0];
    assert_eq!((e.actor.as_str(), e.address.as_deref()), ("unauthenticated", Some("127.0.0.1")));
    assert_eq!(e.detail["refusals"], 3);
    assert_eq!(e.detail["reasons"], serde_json::json!({ "missing": 1, "malformed": 1, "wrong": 1 }));
    let id = admin.split('_').nth(1).unwrap();
    assert_eq!(e.detail["credential_ids"], serde_json::json!([format!("mst_{id}")]));
    let secret = admin.rsplit('_').next().unwrap();
    let text = serde_json::to_string(e).unwrap();
    assert!(!text.contains(&secret[..16]) && !text.contains(&wrong.rsplit('_').next().unwrap()[..16]), "a secret in {text}");
}

#[tokio::test]
async fn a_viewer_token_reads_but_cannot_create_jobs_or_tokens() {
    let app = TestApp::new().await;
    let agent = app.enroll(1, &["site=lab"]).await;
    let viewer = app.token(Role::Viewer).await;
    for path in ["/api/v1/jobs", "/api/v1/agents", "/api/v1/fleet", &format!("/api/v1/agents/{agent}")] {
        assert_eq!(app.get(path, Some(&viewer)).await.status, StatusCode::OK, "{path}");
    }
    let refused = [
        app.post("/api/v1/jobs", Some(&viewer), echo("all".into())).await,
        app.post("/api/v1/tokens", Some(&viewer), serde_json::json!({ "name": "mine", "role": "viewer" })).await,
        app.post("/api/v1/enroll-tokens", Some(&viewer), serde_json::json!({})).await,
        app.get("/api/v1/tokens", Some(&viewer)).await,
        app.get("/api/v1/audit", Some(&viewer)).await,
        app.delete(&format!("/api/v1/agents/{agent}"), Some(&viewer)).await,
    ];
    for reply in refused {
        let message = reply.error(StatusCode::FORBIDDEN, "forbidden");
        assert!(message.contains("viewer"), "{message}");
    }
    assert!(app.store().list_jobs(10).await.unwrap().is_empty(), "a refused job was stored");
    assert_eq!(app.store().list_api_tokens().await.unwrap().len(), 1, "a refused token was stored");
    assert!(app.store().list_enroll_tokens().await.unwrap().iter().all(|t| t.id == "00000000000000ee"));
}

#[tokio::test]
async fn an_operator_runs_jobs_but_cannot_manage_tokens() {
    let app = TestApp::new().await;
    app.enroll(1, &[]).await;
    let operator = app.token(Role::Operator).await;
    assert_eq!(app.post("/api/v1/jobs", Some(&operator), echo("all".into())).await.status, StatusCode::CREATED);
    let message = app
        .post("/api/v1/tokens", Some(&operator), serde_json::json!({ "name": "more", "role": "admin" }))
        .await
        .error(StatusCode::FORBIDDEN, "forbidden");
    assert!(message.contains("operator") && message.contains("admin"), "{message}");
    app.get("/api/v1/enroll-tokens", Some(&operator)).await.error(StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn a_scoped_token_sees_and_targets_only_the_agents_inside_its_scope() {
    let app = TestApp::new().await;
    let paris = app.enroll(1, &["site=paris"]).await;
    let lyon = app.enroll(2, &["site=lyon"]).await;
    let admin = app.token(Role::Admin).await;
    let scoped = app.scoped_token(Role::Operator, "site=paris").await;

    let listed = app.get("/api/v1/agents", Some(&scoped)).await.json();
    let ids: Vec<&str> = listed.as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [paris.as_str()]);
    assert_eq!(app.get("/api/v1/fleet", Some(&scoped)).await.json()["total"], 1);
    // Outside the scope is "not found", as for an id never enrolled.
    app.get(&format!("/api/v1/agents/{lyon}"), Some(&scoped)).await.error(StatusCode::NOT_FOUND, "not_found");
    app.get(&format!("/api/v1/agents/{lyon}/runs"), Some(&scoped)).await.error(StatusCode::NOT_FOUND, "not_found");

    // Naming an agent outside it is forbidden; `all` and selectors are cut to it.
    let message = app
        .post("/api/v1/jobs", Some(&scoped), echo(serde_json::json!({ "agents": [lyon] })))
        .await
        .error(StatusCode::FORBIDDEN, "forbidden");
    assert!(message.contains(lyon.as_str()), "{message}");
    app.post("/api/v1/jobs", Some(&scoped), echo(serde_json::json!({ "selector": "site=lyon" })))
        .await
        .error(StatusCode::CONFLICT, "conflict");
    let created = app.post("/api/v1/jobs", Some(&scoped), echo("all".into())).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let job_id = created.json()["id"].as_str().unwrap().to_owned();
    let runs = app.get(&format!("/api/v1/jobs/{job_id}"), Some(&scoped)).await.json()["runs"].clone();
    let targets: Vec<&str> = runs.as_array().unwrap().iter().map(|r| r["agent_id"].as_str().unwrap()).collect();
    assert_eq!(targets, [paris.as_str()]);
    assert_eq!(app.store().job(&job_id).await.unwrap().unwrap().scope.map(|s| s.to_string()).as_deref(), Some("site=paris"));

    // Jobs of the whole fleet are not the scoped token's to see.
    let fleet_job = app.post("/api/v1/jobs", Some(&admin), echo("all".into())).await.json()["id"].as_str().unwrap().to_owned();
    app.get(&format!("/api/v1/jobs/{fleet_job}"), Some(&scoped)).await.error(StatusCode::NOT_FOUND, "not_found");
    app.post(&format!("/api/v1/jobs/{fleet_job}/cancel"), Some(&scoped), serde_json::json!({}))
        .await
        .error(StatusCode::NOT_FOUND, "not_found");
    let listed = app.get("/api/v1/jobs", Some(&scoped)).await.json();
    let jobs: Vec<&str> = listed.as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(jobs, [job_id.as_str()]);
    assert_eq!(app.get("/api/v1/jobs", Some(&admin)).await.json().as_array().unwrap().len(), 2);

    // What covers the whole fleet is refused to it.
    let scoped_admin = app.scoped_token(Role::Admin, "site=paris").await;
    for path in ["/api/v1/audit", "/metrics"] {
        let message = app.get(path, Some(&scoped_admin)).await.error(StatusCode::FORBIDDEN, "forbidden");
        assert!(message.contains("site=paris"), "{path}: {message}");
    }
}
