//! Operator tokens: created with the secret shown once and only its hash stored, listed
//! without secrets, revoked once, each action audited; and what a scoped admin may create.

use axum::http::StatusCode;
use shared::api::Role;

use crate::testing::TestApp;

/// The secret part of `mst_<id>_<secret>`.
fn secret(token: &str) -> &str {
    token.rsplit('_').next().unwrap()
}

#[tokio::test]
async fn a_new_token_is_shown_once_and_only_the_hash_of_its_secret_is_stored() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    let reply =
        app.post("/api/v1/tokens", Some(&admin), serde_json::json!({ "name": "deploy", "role": "operator", "ttl_secs": 3600 })).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    let created = reply.json();
    let token = created["token"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(token.starts_with(&format!("mst_{id}_")), "{token}");
    assert_eq!(
        (created["name"].as_str(), created["role"].as_str(), created["revoked"].as_bool()),
        (Some("deploy"), Some("operator"), Some(false))
    );
    let (made, expires) = (created["created_at"].as_str().unwrap(), created["expires_at"].as_str().unwrap());
    let lifetime =
        shared::Timestamp::parse_rfc3339(expires).unwrap().unix_millis() - shared::Timestamp::parse_rfc3339(made).unwrap().unix_millis();
    assert_eq!(lifetime, 3_600_000);

    let row = app.store().api_token(&id).await.unwrap().unwrap();
    assert_eq!(row.secret_hash, crate::auth::hash(secret(&token)));
    assert!(!format!("{row:?}").contains(secret(&token)), "the secret is stored: {row:?}");

    // It works, and is never shown again.
    let me = app.get("/api/v1/whoami", Some(&token)).await.json();
    assert_eq!((me["token_id"].as_str(), me["role"].as_str()), (Some(id.as_str()), Some("operator")));
    let listed = app.get("/api/v1/tokens", Some(&admin)).await;
    assert!(!listed.text().contains(secret(&token)), "a secret in the list: {}", listed.text());
    let listed = listed.json();
    let mine = listed.as_array().unwrap().iter().find(|t| t["id"] == id.as_str()).unwrap();
    assert!(mine.get("token").is_none(), "{mine}");
    assert!(mine["last_used_at"].is_string(), "a use is noted: {mine}");
    assert_eq!(listed.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn creating_a_token_is_audited_with_who_from_where_and_no_secret() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    let admin_id = app.get("/api/v1/whoami", Some(&admin)).await.json()["token_id"].as_str().unwrap().to_owned();
    let created = app.post("/api/v1/tokens", Some(&admin), serde_json::json!({ "name": "wall", "role": "viewer" })).await.json();
    let entries = app.audit("token.create").await;
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e.target.as_deref(), created["id"].as_str());
    assert_eq!(e.actor, format!("admin for a test ({admin_id})"));
    assert_eq!(e.address.as_deref(), Some("127.0.0.1:40000"));
    assert_eq!((e.detail["name"].as_str(), e.detail["role"].as_str()), (Some("wall"), Some("viewer")));
    assert!(e.hash.is_some(), "the entry is chained");
    let text = serde_json::to_string(e).unwrap();
    assert!(!text.contains(secret(created["token"].as_str().unwrap())), "a secret in {text}");
}

#[tokio::test]
async fn a_token_is_revoked_once_audited_and_its_streams_told() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    let viewer = app.token(Role::Viewer).await;
    let id = app.get("/api/v1/whoami", Some(&viewer)).await.json()["token_id"].as_str().unwrap().to_owned();
    let mut streams = app.state.revoked.subscribe();

    let reply = app.delete(&format!("/api/v1/tokens/{id}"), Some(&admin)).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert!(reply.body.is_empty());
    assert_eq!(streams.try_recv().ok().as_deref(), Some(id.as_str()), "streams held with the token are told");
    let entries = app.audit("token.revoke").await;
    assert_eq!(entries.iter().map(|e| e.target.as_deref()).collect::<Vec<_>>(), [Some(id.as_str())]);
    let listed = app.get("/api/v1/tokens", Some(&admin)).await.json();
    assert_eq!(listed.as_array().unwrap().iter().find(|t| t["id"] == id.as_str()).unwrap()["revoked"], true);

    let again = app.delete(&format!("/api/v1/tokens/{id}"), Some(&admin)).await;
    assert!(again.error(StatusCode::NOT_FOUND, "not_found").contains("already revoked"));
    assert_eq!(app.audit("token.revoke").await.len(), 1, "a revoke that did nothing is not audited");
    app.delete("/api/v1/tokens/00000000000000ff", Some(&admin)).await.error(StatusCode::NOT_FOUND, "not_found");
    let message = app.delete("/api/v1/tokens/NOT-AN-ID", Some(&admin)).await.error(StatusCode::BAD_REQUEST, "bad_request");
    assert!(message.contains("invalid id"), "{message}");
}

#[tokio::test]
async fn a_token_request_that_breaks_a_rule_is_400_naming_the_field() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    let too_long = "x".repeat(65);
    let cases = [
        (serde_json::json!({ "name": "", "role": "viewer" }), "name"),
        (serde_json::json!({ "name": "   ", "role": "viewer" }), "name"),
        (serde_json::json!({ "name": too_long, "role": "viewer" }), "name"),
        (serde_json::json!({ "name": "a\u{7}b", "role": "viewer" }), "name"),
        (serde_json::json!({ "name": "x", "role": "root" }), "role"),
        (serde_json::json!({ "role": "viewer" }), "name"),
        (serde_json::json!({ "name": "x", "role": "viewer", "ttl_secs": 0 }), "ttl_secs"),
        (serde_json::json!({ "name": "x", "role": "viewer", "ttl_secs": 366 * 86_400 }), "ttl_secs"),
        (serde_json::json!({ "name": "x", "role": "viewer", "ttl_secs": -1 }), "ttl_secs"),
        (serde_json::json!({ "name": "x", "role": "viewer", "scope": "site in (" }), "scope"),
    ];
    for (body, field) in cases {
        let reply = app.post("/api/v1/tokens", Some(&admin), body.clone()).await;
        let message = reply.error(StatusCode::BAD_REQUEST, "bad_request");
        assert!(message.contains(field), "{body}: {message}");
    }
    assert_eq!(app.store().list_api_tokens().await.unwrap().len(), 1, "nothing was created");
    assert!(app.audit("token.create").await.is_empty());
}

#[tokio::test]
async fn a_scoped_admin_creates_only_narrower_tokens_and_sees_only_those() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    let scoped = app.scoped_token(Role::Admin, "site=paris").await;

    let message = app
        .post("/api/v1/tokens", Some(&scoped), serde_json::json!({ "name": "wider", "role": "viewer" }))
        .await
        .error(StatusCode::FORBIDDEN, "forbidden");
    assert!(message.contains("site=paris"), "{message}");
    let refused = app.audit("token.create_refused").await;
    assert_eq!(refused.len(), 1, "reaching for more is audited");
    assert_eq!(refused[0].detail["caller_scope"], "site=paris");

    let narrower = app
        .post("/api/v1/tokens", Some(&scoped), serde_json::json!({ "name": "tills", "role": "operator", "scope": "site=paris,role=pos" }))
        .await;
    assert_eq!(narrower.status, StatusCode::CREATED, "{}", narrower.text());
    let narrower_id = narrower.json()["id"].as_str().unwrap().to_owned();

    let seen = |token: String| {
        let app = &app;
        async move {
            let listed = app.get("/api/v1/tokens", Some(&token)).await.json();
            listed.as_array().unwrap().iter().map(|t| t["scope"].as_str().unwrap_or("").to_owned()).collect::<Vec<_>>()
        }
    };
    let mut by_scoped = seen(scoped.clone()).await;
    by_scoped.sort();
    assert_eq!(by_scoped, ["site=paris", "site=paris,role=pos"]);
    assert_eq!(seen(admin.clone()).await.len(), 3);
    // A token it does not cover is not its to revoke: not found, as for no token.
    let admin_id = app.get("/api/v1/whoami", Some(&admin)).await.json()["token_id"].as_str().unwrap().to_owned();
    app.delete(&format!("/api/v1/tokens/{admin_id}"), Some(&scoped)).await.error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(app.delete(&format!("/api/v1/tokens/{narrower_id}"), Some(&scoped)).await.status, StatusCode::NO_CONTENT);
}
