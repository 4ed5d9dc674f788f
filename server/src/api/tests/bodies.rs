//! Request bodies: bounded in size (413, announced or not) and time (408), refused before
//! they are read without a token, and parsed as JSON with an answer that says what is wrong:
//! the content type, the syntax, the field. Every refusal is the API's error, with
//! `X-Muster-Error`, so a client can tell it from a proxy's.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode, header};
use serde_json::json;
use shared::api::Role;

use super::echo;
use crate::testing::TestApp;

const LIMIT: usize = 1024;

async fn small_limit() -> TestApp {
    TestApp::with(|c| c.limits.max_body_bytes = LIMIT).await
}

fn raw(method: Method, path: &str, token: Option<&str>, content_type: Option<&str>, body: &'static str) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path).header(header::CONTENT_LENGTH, body.len());
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    b.body(Body::from(body)).unwrap()
}

#[tokio::test]
async fn a_body_announced_larger_than_the_limit_is_413_before_the_token_is_looked_at() {
    let app = small_limit().await;
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/jobs")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, LIMIT + 1)
        .body(Body::from(vec![b' '; LIMIT + 1]))
        .unwrap();
    let message = app.send(req).await.error(StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    assert!(message.contains(&LIMIT.to_string()), "{message}");
}

#[tokio::test]
async fn a_body_larger_than_the_limit_that_was_not_announced_is_413_too() {
    let app = small_limit().await;
    app.enroll(1, &[]).await;
    let operator = app.token(Role::Operator).await;
    let chunks = (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; LIMIT / 2])));
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/jobs")
        .header(header::AUTHORIZATION, format!("Bearer {operator}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    app.send(req).await.error(StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    // Just under the limit is read and parsed as usual.
    let mut body = echo("all".into());
    body["command"]["program"]["argv"] = json!(["echo", "x".repeat(LIMIT - 120)]);
    let fits = app.post("/api/v1/jobs", Some(&operator), body).await;
    assert_eq!(fits.status, StatusCode::CREATED, "{}", fits.text());
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_408_and_the_connection_closes() {
    let app = TestApp::with(|c| c.limits.body_timeout = Duration::from_millis(100)).await;
    let admin = app.token(Role::Admin).await;
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/tokens")
        .header(header::AUTHORIZATION, format!("Bearer {admin}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, 64)
        .body(Body::from_stream(futures_util::stream::pending::<Result<Bytes, std::io::Error>>()))
        .unwrap();
    let reply = app.send(req).await;
    reply.error(StatusCode::REQUEST_TIMEOUT, "timeout");
    assert_eq!(reply.header("connection"), Some("close"));
}

#[tokio::test]
async fn a_body_from_a_caller_without_a_token_is_refused_before_it_is_read() {
    let app = TestApp::new().await;
    // The body never ends: had it been read, this would wait for the body timeout.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/jobs")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, 64)
        .body(Body::from_stream(futures_util::stream::pending::<Result<Bytes, std::io::Error>>()))
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), app.send(req)).await.expect("the body was waited for");
    reply.error(StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn a_body_that_is_not_declared_json_is_400_saying_so() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    let body = r#"{"name":"x","role":"viewer"}"#;
    for content_type in [None, Some("text/plain"), Some("application/x-www-form-urlencoded")] {
        let reply = app.send(raw(Method::POST, "/api/v1/tokens", Some(&admin), content_type, body)).await;
        let message = reply.error(StatusCode::BAD_REQUEST, "bad_request");
        assert!(message.contains("application/json"), "{content_type:?}: {message}");
    }
    let ok = app.send(raw(Method::POST, "/api/v1/tokens", Some(&admin), Some("application/json; charset=utf-8"), body)).await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.text());
}

#[tokio::test]
async fn a_body_that_is_not_valid_json_is_400_with_a_message() {
    let app = TestApp::new().await;
    let admin = app.token(Role::Admin).await;
    for (path, body) in [
        ("/api/v1/tokens", r#"{"name": "x", "role": "#),
        ("/api/v1/jobs", "not json"),
        ("/api/v1/enroll-tokens", "{,}"),
        ("/api/v1/keys/revocations", "[1, 2"),
    ] {
        let reply = app.send(raw(Method::POST, path, Some(&admin), Some("application/json"), body)).await;
        let message = reply.error(StatusCode::BAD_REQUEST, "bad_request");
        assert!(message.to_lowercase().contains("json"), "{path}: {message}");
    }
    let reply = app.send(raw(Method::POST, "/api/v1/tokens", Some(&admin), Some("application/json"), "")).await;
    reply.error(StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn an_unknown_field_is_refused_where_the_document_denies_it_and_ignored_where_it_allows_it() {
    let app = TestApp::new().await;
    let agent = app.enroll(1, &["site=lab"]).await;
    let admin = app.token(Role::Admin).await;
    // PatchAgent says additionalProperties: false, at both levels.
    for body in
        [json!({ "labels": { "set": { "role": "db" } }, "force": true }), json!({ "labels": { "set": { "role": "db" }, "replace": true } })]
    {
        let message =
            app.patch(&format!("/api/v1/agents/{agent}"), Some(&admin), body.clone()).await.error(StatusCode::BAD_REQUEST, "bad_request");
        assert!(message.contains("unknown field"), "{body}: {message}");
    }
    assert_eq!(app.store().agent(&agent).await.unwrap().unwrap().labels.to_string(), "site=lab", "a refused edit changed labels");
    let edited = app.patch(&format!("/api/v1/agents/{agent}"), Some(&admin), json!({ "labels": { "set": { "role": "db" } } })).await;
    assert_eq!(edited.status, StatusCode::OK, "{}", edited.text());
    // CreateJob does not deny them: a newer client's optional field is ignored.
    let mut body = echo("all".into());
    body["priority"] = "high".into();
    assert_eq!(app.post("/api/v1/jobs", Some(&admin), body).await.status, StatusCode::CREATED);
}
