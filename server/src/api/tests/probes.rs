//! What probes, scrapers and followers read: `/healthz` (no token; the version only for a
//! valid one), `/metrics` (Prometheus text, a token), and the two event streams
//! (`text/event-stream`, read one event at a time with a deadline, never to their end).

use std::time::Duration;

use axum::http::{Method, StatusCode};
use http_body_util::BodyExt;
use shared::api::Role;

use super::echo;
use crate::testing::{TestApp, request};

/// The next event of a stream: its text up to the blank line that ends it.
async fn next_event(body: &mut axum::body::Body, buffered: &mut String) -> String {
    let read = async {
        loop {
            if let Some(end) = buffered.find("\n\n") {
                let event = buffered[..end].to_owned();
                buffered.drain(..end + 2);
                return event;
            }
            let frame = body.frame().await.expect("the stream ended").unwrap();
            if let Ok(data) = frame.into_data() {
                buffered.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read).await.expect("no event within 5s")
}

/// An event's `data:` field, parsed.
fn data(event: &str) -> serde_json::Value {
    let line = event.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or_else(|| panic!("no data in {event:?}"));
    serde_json::from_str(line).unwrap()
}

#[tokio::test]
async fn healthz_needs_no_token_and_shows_the_version_only_with_a_valid_one() {
    let app = TestApp::new().await;
    let viewer = app.token(Role::Viewer).await;
    let open = app.get("/healthz", None).await;
    assert_eq!(open.status, StatusCode::OK);
    assert_eq!(open.json(), serde_json::json!({ "status": "ok" }));
    assert_eq!(open.header("strict-transport-security"), Some(crate::api::HSTS));
    assert_eq!(app.get("/healthz", Some("mst_nonsense")).await.json(), serde_json::json!({ "status": "ok" }));
    let known = app.get("/healthz", Some(&viewer)).await.json();
    assert_eq!(known, serde_json::json!({ "status": "ok", "version": shared::VERSION }));
}

#[tokio::test]
async fn metrics_are_prometheus_text_for_any_role_and_refused_without_a_token() {
    let app = TestApp::new().await;
    app.enroll(1, &[]).await;
    app.get("/metrics", None).await.error(StatusCode::UNAUTHORIZED, "unauthorized");
    let viewer = app.token(Role::Viewer).await;
    let reply = app.get("/metrics", Some(&viewer)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), Some("text/plain; version=0.0.4"));
    let text = reply.text();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "not a value: {line:?}");
        assert!(name.starts_with("muster_"), "{line:?}");
    }
    assert!(text.contains("muster_agents{status=\"offline\"} 1"), "{text}");
    assert!(text.contains(&format!("muster_build_info{{version=\"{}\"}} 1", shared::VERSION)), "{text}");
}

#[tokio::test]
async fn the_fleet_stream_is_server_sent_events_with_ids_and_needs_a_token() {
    let app = TestApp::new().await;
    let viewer = app.token(Role::Viewer).await;
    app.get("/api/v1/events", None).await.error(StatusCode::UNAUTHORIZED, "unauthorized");

    let resp = app.respond(request(Method::GET, "/api/v1/events", Some(&viewer), None)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
    let mut body = resp.into_body();
    let agent = shared::AgentId::from_bytes([7; 8]);
    app.state.fleet.publish(shared::api::FleetEvent::AgentRevoked { agent_id: agent.clone(), at: shared::Timestamp::now() });
    let mut buffered = String::new();
    let event = next_event(&mut body, &mut buffered).await;
    assert!(event.lines().any(|l| l == "event: agent_revoked"), "{event:?}");
    assert!(event.lines().any(|l| l.starts_with("id: ")), "{event:?}");
    assert_eq!(data(&event)["agent_id"], agent.as_str());

    // An id the server never issued: told to resync, at once.
    let mut req = request(Method::GET, "/api/v1/events", Some(&viewer), None);
    req.headers_mut().insert("last-event-id", "garbage".parse().unwrap());
    let mut body = app.respond(req).await.into_body();
    let event = next_event(&mut body, &mut String::new()).await;
    assert!(event.lines().any(|l| l == "event: resync"), "{event:?}");
}

#[tokio::test]
async fn a_jobs_stream_starts_with_its_snapshot_and_a_finished_job_ends_its_stream() {
    let app = TestApp::new().await;
    let agent = app.enroll(1, &[]).await;
    let operator = app.token(Role::Operator).await;
    let job = app.post("/api/v1/jobs", Some(&operator), echo("all".into())).await.json();
    let id = job["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/jobs/{id}/events");

    let resp = app.respond(request(Method::GET, &path, Some(&operator), None)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
    let mut body = resp.into_body();
    let mut buffered = String::new();
    let snapshot = next_event(&mut body, &mut buffered).await;
    assert!(snapshot.lines().any(|l| l == "event: snapshot"), "{snapshot:?}");
    let detail = data(&snapshot);
    assert_eq!((detail["type"].as_str(), detail["id"].as_str()), (Some("snapshot"), Some(id.as_str())), "{detail}");
    assert_eq!(detail["runs"][0]["state"], "pending");

    // Live: the run's dispatch arrives on the open stream.
    let _session = app.connect(&agent);
    app.state.dispatcher.round().await.unwrap();
    let run = next_event(&mut body, &mut buffered).await;
    assert!(run.lines().any(|l| l == "event: run"), "{run:?}");

    app.get("/api/v1/jobs/00000000000000ff/events", Some(&operator)).await.error(StatusCode::NOT_FOUND, "not_found");
    app.get(&path, None).await.error(StatusCode::UNAUTHORIZED, "unauthorized");

    // A finished job: its snapshot, `finished`, and the end.
    app.post(&format!("/api/v1/jobs/{id}/cancel"), Some(&operator), serde_json::json!({})).await;
    let run_id = app.store().runs(&id).await.unwrap()[0].id.clone();
    crate::testing::report(app.store(), &agent, crate::testing::Progress::Finished(&run_id, shared::protocol::Outcome::Cancelled)).await;
    app.state.dispatcher.round().await.unwrap();
    let resp = app.respond(request(Method::GET, &path, Some(&operator), None)).await;
    let mut body = resp.into_body();
    let mut buffered = String::new();
    assert!(next_event(&mut body, &mut buffered).await.contains("event: snapshot"));
    assert!(next_event(&mut body, &mut buffered).await.contains("event: finished"));
    let end = tokio::time::timeout(Duration::from_secs(5), body.frame()).await.expect("the stream of a finished job did not end");
    assert!(end.is_none(), "more after finished: {end:?}");
}
