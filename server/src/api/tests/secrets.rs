//! No secret in a log line: every secret the API issues or takes (an operator token, an
//! enrollment token, a wrong secret presented, a job's secret variable) goes through the
//! handlers and the dispatcher with every log level on, and none appears in what was logged.

use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use serde_json::json;
use shared::api::Role;

use crate::testing::TestApp;

/// What the handlers logged, on this test's thread (the runtime's only one).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn no_secret_the_api_issues_or_takes_reaches_the_log() {
    let captured = Captured::default();
    let subscriber =
        tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_ansi(false).with_writer(captured.clone()).finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = TestApp::new().await;
    let agent = app.enroll(1, &[]).await;
    let mut session = app.connect(&agent);
    let admin = app.token(Role::Admin).await;
    let token = app.post("/api/v1/tokens", Some(&admin), json!({ "name": "ci", "role": "operator" })).await.json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let enroll = app.post("/api/v1/enroll-tokens", Some(&admin), json!({ "uses": 1 })).await.json()["token"].as_str().unwrap().to_owned();
    let body = json!({
        "target": "all",
        "command": { "program": { "argv": ["deploy"] }, "env": { "API_KEY": "hunter2-value" }, "secret_env": ["API_KEY"] },
    });
    assert_eq!(app.post("/api/v1/jobs", Some(&token), body).await.status, StatusCode::CREATED);
    app.state.dispatcher.round().await.unwrap();
    assert_eq!(crate::testing::runs_sent(&mut session).len(), 1);
    let wrong = format!("{}{}", &token[..token.len() - 1], if token.ends_with('0') { '1' } else { '0' });
    assert_eq!(app.get("/api/v1/whoami", Some(&wrong)).await.status, StatusCode::UNAUTHORIZED);
    app.state.auditor.flush_refusals().await;

    let logged = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("job created"), "nothing was captured: {logged}");
    let secret = |t: &str| t.rsplit('_').next().unwrap().to_owned();
    for s in [secret(&admin), secret(&token), secret(&enroll), secret(&wrong), "hunter2".to_owned()] {
        assert!(!logged.contains(&s), "a secret ({s}) in the log:\n{logged}");
    }
}
