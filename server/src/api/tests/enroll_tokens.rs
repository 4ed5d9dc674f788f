//! Enrollment tokens: created with uses, ttl, labels and approval (the secret shown once),
//! listed, revoked, each action audited; the defaults; what a scoped admin may make.

use axum::http::StatusCode;
use shared::api::Role;

use crate::testing::TestApp;

fn millis(v: &serde_json::Value) -> i64 {
    shared::Timestamp::parse_rfc3339(v.as_str().unwrap()).unwrap().unix_millis()
}

#[tokio::test]
async fn an_enrollment_token_is_created_with_its_uses_ttl_labels_and_approval_and_works_once_shown() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    let body = serde_json::json!({ "ttl_secs": 3600, "uses": 3, "labels": { "site": "paris", "role": "pos" }, "approve": true });
    let reply = app.post("/api/v1/enroll-tokens", Some(&admin), body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    let created = reply.json();
    let (id, token) = (created["id"].as_str().unwrap().to_owned(), created["token"].as_str().unwrap().to_owned());
    assert!(token.starts_with(&format!("mse_{id}_")), "{token}");
    assert_eq!((created["uses_total"].as_u64(), created["uses_left"].as_u64()), (Some(3), Some(3)));
    assert_eq!(created["labels"], serde_json::json!({ "role": "pos", "site": "paris" }));
    assert_eq!((created["approve"].as_bool(), created["revoked"].as_bool()), (Some(true), Some(false)));
    assert_eq!(millis(&created["expires_at"]) - millis(&created["created_at"]), 3_600_000);

    let row = app.store().enroll_token(&id).await.unwrap().unwrap();
    let secret = token.rsplit('_').next().unwrap();
    assert_eq!(row.secret_hash, crate::auth::hash(secret));
    assert!(row.approve);

    // The agents' own check accepts it, without spending a use.
    let check = app
        .send(
            axum::http::Request::builder()
                .uri("/api/v1/agent/check")
                .header("authorization", format!("Bearer {token}"))
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(check.status, StatusCode::OK, "{}", check.text());
    assert_eq!(check.json(), serde_json::json!({ "enroll_token": id, "uses_left": 3 }));

    let entries = app.audit("enroll_token.create").await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].target.as_deref(), Some(id.as_str()));
    assert_eq!(
        entries[0].detail,
        serde_json::json!({ "ttl_secs": 3600, "uses": 3, "labels": { "role": "pos", "site": "paris" }, "approve": true })
    );
    assert!(!serde_json::to_string(&entries[0]).unwrap().contains(secret));
}

#[tokio::test]
async fn an_enrollment_token_without_settings_lasts_a_day_for_ten_uses() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    let created = app.post("/api/v1/enroll-tokens", Some(&admin), serde_json::json!({})).await.json();
    assert_eq!(created["uses_total"], 10);
    assert_eq!(millis(&created["expires_at"]) - millis(&created["created_at"]), 86_400_000);
    assert_eq!((created["approve"].as_bool(), created["labels"].clone()), (Some(false), serde_json::json!({})));
}

#[tokio::test]
async fn enrollment_tokens_are_listed_without_secrets_and_revoked_once() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    let created = app.post("/api/v1/enroll-tokens", Some(&admin), serde_json::json!({ "uses": 2 })).await.json();
    let id = created["id"].as_str().unwrap().to_owned();
    let secret = created["token"].as_str().unwrap().rsplit('_').next().unwrap().to_owned();

    let listed = app.get("/api/v1/enroll-tokens", Some(&admin)).await;
    assert!(!listed.text().contains(&secret));
    let listed = listed.json();
    let mine = listed.as_array().unwrap().iter().find(|t| t["id"] == id.as_str()).unwrap().clone();
    assert!(mine.get("token").is_none());
    assert_eq!((mine["uses_left"].as_u64(), mine["revoked"].as_bool()), (Some(2), Some(false)));

    assert_eq!(app.delete(&format!("/api/v1/enroll-tokens/{id}"), Some(&admin)).await.status, StatusCode::NO_CONTENT);
    let listed = app.get("/api/v1/enroll-tokens", Some(&admin)).await.json();
    assert_eq!(listed.as_array().unwrap().iter().find(|t| t["id"] == id.as_str()).unwrap()["revoked"], true);
    assert_eq!(app.audit("enroll_token.revoke").await.iter().map(|e| e.target.clone()).collect::<Vec<_>>(), [Some(id.clone())]);
    app.delete(&format!("/api/v1/enroll-tokens/{id}"), Some(&admin)).await.error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(app.audit("enroll_token.revoke").await.len(), 1);
    app.delete("/api/v1/enroll-tokens/0123", Some(&admin)).await.error(StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn an_enrollment_token_request_that_breaks_a_rule_is_400_naming_the_field() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    let cases = [
        (serde_json::json!({ "uses": 0 }), "uses"),
        (serde_json::json!({ "uses": 1_000_001 }), "uses"),
        (serde_json::json!({ "ttl_secs": 0 }), "ttl_secs"),
        (serde_json::json!({ "ttl_secs": 31 * 86_400 }), "ttl_secs"),
        (serde_json::json!({ "labels": { "agent.role": "db" } }), "agent."),
        (serde_json::json!({ "labels": { "bad key!": "x" } }), "label key"),
        (serde_json::json!([null, null]), "expected a map"),
        // Read through a map first (so an array is refused), the body's errors do not name the
        // field as axum's do for the other bodies; they say what was expected.
        (serde_json::json!({ "approve": "yes" }), "expected a boolean"),
    ];
    for (body, field) in cases {
        let message = app.post("/api/v1/enroll-tokens", Some(&admin), body.clone()).await.error(StatusCode::BAD_REQUEST, "bad_request");
        assert!(message.contains(field), "{body}: {message}");
    }
    assert!(app.store().list_enroll_tokens().await.unwrap().is_empty(), "nothing was created");
}

#[tokio::test]
async fn a_scoped_admin_makes_enrollment_tokens_only_inside_its_scope() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    let scoped = app.scoped_token(Role::Admin, "site=paris").await;
    let lyon = app.post("/api/v1/enroll-tokens", Some(&admin), serde_json::json!({ "labels": { "site": "lyon" } })).await.json();

    app.post("/api/v1/enroll-tokens", Some(&scoped), serde_json::json!({})).await.error(StatusCode::FORBIDDEN, "forbidden");
    app.post("/api/v1/enroll-tokens", Some(&scoped), serde_json::json!({ "labels": { "site": "lyon" } }))
        .await
        .error(StatusCode::FORBIDDEN, "forbidden");
    let paris = app.post("/api/v1/enroll-tokens", Some(&scoped), serde_json::json!({ "labels": { "site": "paris" } })).await;
    assert_eq!(paris.status, StatusCode::CREATED, "{}", paris.text());

    let listed = app.get("/api/v1/enroll-tokens", Some(&scoped)).await.json();
    let ids: Vec<&str> = listed.as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [paris.json()["id"].as_str().unwrap()]);
    let lyon_id = lyon["id"].as_str().unwrap();
    app.delete(&format!("/api/v1/enroll-tokens/{lyon_id}"), Some(&scoped)).await.error(StatusCode::NOT_FOUND, "not_found");
    assert!(app.store().enroll_token(lyon_id).await.unwrap().unwrap().revoked_at.is_none());
}
