//! What only a PostgreSQL installation does: `muster-server check` against it, and moving an
//! existing SQLite installation into it with `migrate-db`, history included.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use shared::api::AgentStatus;
use shared::job::{RunState, Target};
use tests::{Backend, TestServer, bin, job, shell};

fn server_cmd(server: &TestServer, args: &[&str]) -> std::process::Output {
    Command::new(bin("muster-server")).arg("--data-dir").arg(server.dir.path()).args(args).output().expect("run muster-server")
}

#[tokio::test]
async fn check_reports_a_postgres_database_and_says_when_it_cannot_be_reached() {
    let server = TestServer::spawn_on(Backend::Postgres, &[]).await;
    let (cluster, url) = server.postgres.clone().expect("postgres");
    let out = server_cmd(&server, &["--database", &url, "check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("is reachable and up to date"), "{text}");
    assert!(text.contains("PostgreSQL 1"), "names the server's version: {text}");

    tokio::task::spawn_blocking(move || cluster.stop()).await.unwrap();
    let out = server_cmd(&server, &["--database", &url, "check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot connect to postgres://postgres@127.0.0.1:"), "{err}");
}

#[tokio::test]
async fn migrate_db_moves_an_sqlite_installation_into_postgres_and_nothing_is_lost() {
    // An installation with history: agents, heartbeats, transitions, a job with output, tokens
    // and the audit chain.
    let mut server = TestServer::spawn().await;
    let agents = server.spawn_agents(2, &["site=lab"]).await;
    let created = server.api.create_job(&job(Target::All, shell("echo migrated; echo oops >&2; exit 3"))).await;
    let before_job = server.api.wait_job_finished(&created.id, Duration::from_secs(30)).await;
    let req = shared::api::CreateToken { name: "kept".into(), role: shared::api::Role::Viewer, ttl_secs: None, scope: None };
    let viewer: shared::api::TokenCreated = server.api.post("/tokens", &req).await;
    let viewer = viewer.token;
    let before_agents = server.api.agents().await;
    let mut before_beats = Vec::new();
    for (_, id) in &agents {
        let beats: Vec<shared::api::HeartbeatSample> = server.api.get(&format!("/agents/{id}/heartbeats?since=1970-01-01T00:00:00Z")).await;
        assert!(!beats.is_empty());
        before_beats.push(beats.len());
    }
    server.process().stop().await;

    let cluster = tokio::task::spawn_blocking(testdb::Cluster::start).await.unwrap();
    let url = cluster.fresh_database();
    let out = server_cmd(&server, &["migrate-db", "--to", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("run_output: ") && text.contains("heartbeats: ") && text.contains("audit_log"), "{text}");
    // Copying twice would merge two histories: refused, nothing changed.
    let again = server_cmd(&server, &["migrate-db", "--to", &url]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds data"), "{}", String::from_utf8_lossy(&again.stderr));

    // The same installation, now on PostgreSQL: same agents (their credentials still work),
    // same job with its output, same tokens, and an audit chain that still verifies.
    server.extra_args.extend(["--database".to_owned(), url.clone()]);
    server.start().await;
    for (_, id) in &agents {
        server.api.wait_status(id, AgentStatus::Online, Duration::from_secs(30)).await;
    }
    let after_agents = server.api.agents().await;
    let ids = |v: &[shared::api::AgentSummary]| v.iter().map(|a| (a.id.clone(), a.hostname.clone(), a.labels.clone())).collect::<Vec<_>>();
    assert_eq!(ids(&after_agents), ids(&before_agents));
    let after_job = server.api.job(&created.id).await;
    assert_eq!(after_job.job.counts, before_job.job.counts);
    assert_eq!(after_job.job.counts.get(&RunState::Failed), Some(&2));
    let outputs = |d: &shared::job::JobDetail| {
        d.runs.iter().map(|r| (r.id.clone(), r.stdout.clone(), r.stderr.clone(), r.exit_code)).collect::<Vec<_>>()
    };
    assert_eq!(outputs(&after_job), outputs(&before_job));
    assert!(after_job.runs.iter().all(|r| r.stdout == "migrated\n" && r.stderr == "oops\n"), "{:?}", after_job.runs);
    for ((_, id), n) in agents.iter().zip(before_beats) {
        let beats: Vec<shared::api::HeartbeatSample> = server.api.get(&format!("/agents/{id}/heartbeats?since=1970-01-01T00:00:00Z")).await;
        assert!(beats.len() >= n, "{} heartbeats after, {n} before", beats.len());
    }
    assert_eq!(server.api.with_token(&viewer).raw_get("/agents").await.status(), 200, "a token made before the move still works");
    let verify = server.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    // New work lands after the copied ids.
    let next = server.api.create_job(&job(Target::All, shell("true"))).await;
    server.api.wait_job_finished(&next.id, Duration::from_secs(30)).await;
    let verify = server.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    drop(server);
    drop(cluster);
}
