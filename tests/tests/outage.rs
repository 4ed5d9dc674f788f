//! PostgreSQL going away mid-test and coming back: what a clustered installation relies on
//! when its database fails over or restarts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use reqwest::StatusCode;
use shared::api::AgentStatus;
use shared::job::{RunState, Target};
use tests::{Backend, TestServer, job, shell, wait_for};

/// How long the database stays away: longer than a few recorder retries and than the
/// agents' heartbeat interval many times over.
const OUTAGE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn the_database_away_for_ten_seconds_keeps_agents_connected_answers_503_and_loses_no_result() {
    let server = TestServer::spawn_on(Backend::Postgres, &[]).await;
    let agents = server.spawn_agents(3, &[]).await;
    let before: Vec<_> = {
        let mut v = Vec::new();
        for (_, id) in &agents {
            v.push(server.api.agent(id).await.connection.expect("connected").connected_at);
        }
        v
    };
    // Runs that finish while the database is away: their results must wait, not vanish.
    let created = server.api.create_job(&job(Target::All, shell("sleep 3; echo survived"))).await;
    let api = server.api.clone();
    let id = created.id.clone();
    wait_for("every run to start", Duration::from_secs(20), || {
        let (api, id) = (api.clone(), id.clone());
        async move { (api.job(&id).await.job.counts.get(&RunState::Running) == Some(&3)).then_some(()) }
    })
    .await;

    let cluster = server.postgres.as_ref().expect("a PostgreSQL server").0.clone();
    let stopping = cluster.clone();
    tokio::task::spawn_blocking(move || stopping.stop()).await.expect("stop PostgreSQL");
    let api = server.api.clone();
    let refused = wait_for("the API to answer 503 while the database is away", Duration::from_secs(15), || {
        let api = api.clone();
        async move {
            let r = api.raw_get("/agents").await;
            (r.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(r)
        }
    })
    .await;
    assert_eq!(refused.headers().get("x-muster-error").and_then(|v| v.to_str().ok()), Some("unavailable"));
    let body: shared::api::ApiError = refused.json().await.expect("a JSON error");
    assert!(body.message.contains("database"), "{}", body.message);
    // The outage itself: the runs finish on their agents meanwhile.
    tokio::time::sleep(OUTAGE).await;
    let starting = cluster.clone();
    tokio::task::spawn_blocking(move || starting.start_again()).await.expect("start PostgreSQL");

    // The server catches up by itself: every result stored, the job finished.
    let done = server.api.wait_job_finished(&created.id, Duration::from_secs(60)).await;
    assert_eq!(done.job.counts.get(&RunState::Succeeded), Some(&3), "{:?}", done.job.counts);
    assert!(done.runs.iter().all(|r| r.stdout == "survived\n"), "{:?}", done.runs);
    // Nobody reconnected: the sessions outlived the database's absence.
    for ((_, id), connected_at) in agents.iter().zip(before) {
        let a = server.api.wait_status(id, AgentStatus::Online, Duration::from_secs(10)).await;
        assert_eq!(a.connection.expect("connected").connected_at, connected_at, "agent {id} reconnected");
    }
    assert!(!server.log().contains("panicked"), "{}", server.log());
}
