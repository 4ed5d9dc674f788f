//! Commands: broadcast and targeted jobs, delivery across restarts, limits, and results.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use shared::Selector;
use shared::api::AgentStatus;
use shared::job::{AgentRun, Concurrency, DryRun, JobDetail, Program, RunState, Target};
use tests::{Backend, TestServer, job, processes_with, shell, wait_for};

const SOON: Duration = Duration::from_secs(30);

fn states(j: &JobDetail) -> Vec<RunState> {
    j.runs.iter().map(|r| r.state).collect()
}

async fn broadcast_to_twenty_agents_runs_once_on_each_and_the_cli_reports_it(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let agents = server.spawn_agents(20, &["fleet=test"]).await;
    let ids: HashSet<String> = agents.iter().map(|(_, id)| id.to_string()).collect();

    let created = server.api.create_job(&job(Target::All, shell("echo $MUSTER_AGENT_ID"))).await;
    assert_eq!(created.total, 20);
    let done = server.api.wait_job_finished(&created.id, SOON).await;
    assert!(states(&done).iter().all(|s| *s == RunState::Succeeded), "{:?}", done.job.counts);
    let echoed: HashSet<String> = done.runs.iter().map(|r| r.stdout.trim().to_owned()).collect();
    assert_eq!(echoed, ids, "each agent ran it once, as itself");
    assert!(done.runs.iter().all(|r| r.stdout == format!("{}\n", r.agent_id)));

    // The same through the CLI: live lines labelled by host, a grouped summary, exit 0.
    let out = server.cli(&["run", "--all", "--shell", "--", "echo ok"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().filter(|l| l.ends_with(": ok")).count(), 20 + 1, "20 live lines and the summary:\n{stdout}");
    assert!(stdout.contains("20 agents succeeded: ok"), "{stdout}");

    // One failure makes the exit status non-zero.
    let victim = agents[3].1.to_string();
    let script = format!("test $MUSTER_AGENT_ID != {victim}");
    let out = server.cli(&["run", "--all", "--shell", "--", &script]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 agent failed (exit 1)"));
}

async fn a_label_selector_targets_exactly_the_matching_agents(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let pos = server.spawn_agents(2, &["role=pos", "site=paris"]).await;
    let kiosk = server.spawn_agents(1, &["role=kiosk", "site=paris"]).await;
    let canary = server.spawn_agents(1, &["role=pos", "site=paris", "canary=yes"]).await;
    let _other = server.spawn_agents(1, &["role=pos", "site=lyon"]).await;

    let selector = Selector::parse("site=paris,role in (pos,kiosk),!canary").unwrap();
    let mut req = job(Target::Selector(selector), Program::Argv(vec!["true".into()]));
    req.dry_run = true;
    let dry: DryRun = server.api.post("/jobs", &req).await;
    assert_eq!((dry.matched, dry.online), (3, 3));

    req.dry_run = false;
    let created = server.api.create_job(&req).await;
    let targeted: HashSet<_> = server.api.job(&created.id).await.runs.iter().map(|r| r.agent_id.clone()).collect();
    let expected: HashSet<_> = pos.iter().chain(kiosk.iter()).map(|(_, id)| id.clone()).collect();
    assert_eq!(targeted, expected);
    assert!(!targeted.contains(&canary[0].1));
    let done = server.api.wait_job_finished(&created.id, SOON).await;
    assert!(states(&done).iter().all(|s| *s == RunState::Succeeded));

    // A target that names an unknown agent, or matches nothing, is refused: the request is well
    // formed, the fleet is what refuses it.
    let resp = server
        .api
        .http()
        .post(server.api.url("/jobs"))
        .bearer_auth(&server.admin_token)
        .json(&job(Target::Selector(Selector::parse("site=mars").unwrap()), Program::Argv(vec!["true".into()])))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    assert_eq!(resp.json::<shared::api::ApiError>().await.unwrap().error, "conflict");
}

async fn an_offline_agent_gets_its_run_when_it_reconnects_and_one_away_past_the_ttl_expires(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let mut agents = server.spawn_agents(2, &[]).await;
    let (mut late, late_id) = agents.remove(0);
    let (mut gone, gone_id) = agents.remove(0);
    late.process().stop().await;
    gone.process().stop().await;
    server.api.wait_status(&late_id, AgentStatus::Offline, SOON).await;
    server.api.wait_status(&gone_id, AgentStatus::Offline, SOON).await;

    let mut waits = job(Target::Agents(vec![late_id.clone()]), shell("echo delivered"));
    waits.ttl_secs = Some(300);
    let waits = server.api.create_job(&waits).await;
    let mut expires = job(Target::Agents(vec![gone_id.clone()]), shell("echo never"));
    expires.ttl_secs = Some(1);
    let expires = server.api.create_job(&expires).await;

    let expired = server.api.wait_job_finished(&expires.id, SOON).await;
    assert_eq!(states(&expired), [RunState::Expired]);
    assert_eq!(server.api.job(&waits.id).await.runs[0].state, RunState::Pending, "still waiting for its agent");

    let _late = late.restart();
    let delivered = server.api.wait_job_finished(&waits.id, SOON).await;
    assert_eq!(states(&delivered), [RunState::Succeeded]);
    assert_eq!(delivered.runs[0].stdout, "delivered\n");

    // Each agent's run history says what it was asked to do and how that ended.
    let history: Vec<AgentRun> = server.api.get(&format!("/agents/{late_id}/runs")).await;
    let seen: Vec<(&str, RunState)> = history.iter().map(|r| (r.job_id.as_str(), r.state)).collect();
    assert_eq!(seen, [(waits.id.as_str(), RunState::Succeeded)]);
    let history: Vec<AgentRun> = server.api.get(&format!("/agents/{gone_id}/runs")).await;
    assert_eq!(history.iter().map(|r| r.state).collect::<Vec<_>>(), [RunState::Expired]);
    assert_eq!(server.api.raw_get(&format!("/agents/{late_id}/runs?limit=0")).await.status(), 400);
    assert_eq!(server.api.raw_get(&format!("/agents/{late_id}/runs?limit=501")).await.status(), 400);
    assert_eq!(server.api.raw_get("/agents/0123456789abcdef/runs").await.status(), 404);
    let out = server.cli(&["agent", late_id.as_str()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Recent runs:") && stdout.contains("succeeded") && stdout.contains("echo delivered"), "{stdout}");
}

async fn concurrency_limits_runs_in_flight_and_max_errors_skips_the_rest(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let _agents = server.spawn_agents(6, &[]).await;

    let mut limited = job(Target::All, shell("sleep 0.4"));
    limited.concurrency = Some(Concurrency::Count(2));
    let limited = server.api.create_job(&limited).await;
    let done = server.api.wait_job_finished(&limited.id, SOON).await;
    assert!(states(&done).iter().all(|s| *s == RunState::Succeeded));
    assert_eq!((done.job.status, done.job.failed), (shared::job::JobStatus::Succeeded, 0));
    // Dispatch-to-finish intervals, as the server recorded them: never more than 2 overlap.
    let spans: Vec<(i64, i64)> =
        done.runs.iter().map(|r| (r.dispatched_at.unwrap().unix_millis(), r.finished_at.unwrap().unix_millis())).collect();
    let most = spans.iter().map(|(t, _)| spans.iter().filter(|(s, e)| s <= t && t < e).count()).max().unwrap();
    assert!(most <= 2, "at most 2 runs in flight, saw {most}: {spans:?}");

    let mut failing = job(Target::All, Program::Argv(vec!["false".into()]));
    failing.concurrency = Some(Concurrency::Count(1));
    failing.max_errors = Some(2);
    let failing = server.api.create_job(&failing).await;
    let done = server.api.wait_job_finished(&failing.id, SOON).await;
    assert_eq!(done.job.counts.get(&RunState::Failed), Some(&2), "{:?}", done.job.counts);
    assert_eq!(done.job.counts.get(&RunState::Skipped), Some(&4), "{:?}", done.job.counts);
    // The server says what the job came to: skipped runs are not failures, failed ones are.
    assert_eq!((done.job.status, done.job.failed), (shared::job::JobStatus::Failed, 2));
}

async fn timeout_and_cancel_kill_the_command_and_its_children(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let agents = server.spawn_agents(1, &[]).await;
    let target = Target::Agents(vec![agents[0].1.clone()]);

    let mut slow = job(target.clone(), shell("sleep 300.4711 & sleep 300.4711; wait"));
    slow.timeout_secs = Some(1);
    let slow = server.api.create_job(&slow).await;
    let done = server.api.wait_job_finished(&slow.id, SOON).await;
    assert_eq!(states(&done), [RunState::TimedOut]);
    wait_for("the timed-out processes to be gone", Duration::from_secs(10), || async { (processes_with("300.4711") == 0).then_some(()) })
        .await;

    let stuck = server.api.create_job(&job(target, shell("sleep 300.4712 & sleep 300.4712; wait"))).await;
    wait_for("the command to be running", SOON, || async {
        (server.api.job(&stuck.id).await.runs[0].state == RunState::Running && processes_with("300.4712") >= 2).then_some(())
    })
    .await;
    let out = server.cli(&["job", "cancel", &stuck.id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done = server.api.wait_job_finished(&stuck.id, SOON).await;
    assert_eq!(states(&done), [RunState::Cancelled]);
    wait_for("the cancelled processes to be gone", Duration::from_secs(10), || async { (processes_with("300.4712") == 0).then_some(()) })
        .await;
}

async fn output_over_the_cap_is_truncated_and_flagged(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let agents = server.spawn_agents(1, &[]).await;
    let mut big = job(Target::Agents(vec![agents[0].1.clone()]), shell("head -c 50000 /dev/zero | tr '\\0' x; echo tail >&2"));
    big.output_limit = Some(1000);
    let big = server.api.create_job(&big).await;
    let done = server.api.wait_job_finished(&big.id, SOON).await;
    let run = &done.runs[0];
    assert_eq!(run.state, RunState::Succeeded);
    assert_eq!(run.stdout.len(), 1000);
    assert!(run.stdout.bytes().all(|b| b == b'x'));
    assert!(run.stdout_truncated && !run.stderr_truncated);
    assert_eq!(run.stderr, "tail\n");
}

async fn server_killed_mid_broadcast_loses_no_run_and_runs_none_twice(backend: Backend) {
    let mut server = TestServer::spawn_on(backend, &[]).await;
    let agents = server.spawn_agents(8, &[]).await;
    let effects = tempfile::tempdir().unwrap();
    let script = format!("echo $MUSTER_RUN_ID >> {}/$MUSTER_AGENT_ID; sleep 0.5; echo done", effects.path().display());
    let mut req = job(Target::All, shell(&script));
    req.concurrency = Some(Concurrency::Count(3));
    let created = server.api.create_job(&req).await;
    wait_for("some runs to finish", SOON, || async {
        let j = server.api.job(&created.id).await;
        (j.job.counts.get(&RunState::Succeeded).copied().unwrap_or(0) >= 2).then_some(())
    })
    .await;

    server.process().kill();
    server.start().await;
    let done = server.api.wait_job_finished(&created.id, Duration::from_secs(60)).await;
    assert!(states(&done).iter().all(|s| *s == RunState::Succeeded), "{:?}", done.job.counts);
    assert!(done.runs.iter().all(|r| r.stdout == "done\n"));
    for (_, id) in &agents {
        let lines = std::fs::read_to_string(effects.path().join(id.as_str())).unwrap_or_default();
        assert_eq!(lines.lines().count(), 1, "agent {id} ran the command exactly once: {lines:?}");
    }
}

async fn agent_killed_mid_run_ends_the_run_in_a_definite_state(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let mut agents = server.spawn_agents(1, &[]).await;
    let (mut agent, id) = agents.remove(0);
    let created = server.api.create_job(&job(Target::Agents(vec![id.clone()]), shell("echo started; sleep 30.4713"))).await;
    wait_for("the command to be running", SOON, || async {
        (server.api.job(&created.id).await.runs[0].state == RunState::Running).then_some(())
    })
    .await;

    agent.process().kill();
    let agent = agent.restart();
    let done = server.api.wait_job_finished(&created.id, SOON).await;
    let run = &done.runs[0];
    assert_eq!(run.state, RunState::Lost);
    assert!(run.error.as_deref().unwrap_or_default().contains("restarted"), "{:?}", run.error);
    // The orphaned command is not ours to keep: clean it up.
    let _ = std::process::Command::new("pkill").args(["-f", "30.4713"]).status();
    drop(agent);
}

async fn the_job_event_stream_starts_with_a_snapshot_and_ends_when_the_job_does(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let agents = server.spawn_agents(1, &[]).await;
    let created = server.api.create_job(&job(Target::Agents(vec![agents[0].1.clone()]), shell("echo one; sleep 0.3; echo two"))).await;
    let resp = server.api.raw_get(&format!("/jobs/{}/events", created.id)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    // The stream ends by itself after `finished`, so reading it all is bounded.
    let body = tokio::time::timeout(SOON, resp.text()).await.expect("stream ends").unwrap();
    let events: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(events.first(), Some(&"snapshot"));
    assert_eq!(events.last(), Some(&"finished"));
    assert!(body.contains(r#""data":"one\n""#) || body.contains("one\\n"), "{body}");
}

async fn a_secret_variable_reaches_the_command_and_nobody_else(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let token = server.enroll_token(1, &[]).await;
    let agent = server.spawn_agent(Some(&token), &[]);
    let id = agent.id().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "from-a-file-6d1c\n").unwrap();
    let out = server.cli(&[
        "run",
        "--agent",
        id.as_str(),
        "--env",
        "PLAIN=visible",
        "--secret-env",
        "TOKEN=s3cr3t-9f2e",
        "--secret-env",
        &format!("OTHER=@{}", file.display()),
        "--shell",
        "--",
        "echo $PLAIN ${#TOKEN} ${#OTHER}",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("visible 11 16"), "the command got both values: {stdout}");
    let jobs: Vec<shared::job::JobSummary> = server.api.get("/jobs").await;
    let summary = &jobs[0];
    assert_eq!(summary.command.env.get("TOKEN").map(String::as_str), Some(shared::job::SECRET_SHOWN));
    assert_eq!(summary.command.env.get("PLAIN").map(String::as_str), Some("visible"));
    let detail = server.api.raw_get(&format!("/jobs/{}", summary.id)).await.text().await.unwrap();
    let runs = server.api.raw_get(&format!("/agents/{id}/runs")).await.text().await.unwrap();
    let audit = server.api.raw_get("/audit?limit=1000").await.text().await.unwrap();
    for (what, text) in [("job detail", &detail), ("agent runs", &runs), ("audit", &audit), ("server log", &server.log())] {
        assert!(!text.contains("s3cr3t-9f2e") && !text.contains("from-a-file-6d1c"), "{what} holds a secret: {text}");
    }
    assert!(audit.contains("secret_env_sha256"), "{audit}");
    // A name marked secret must be one the command sets.
    let mut bad = job(Target::Agents(vec![id.clone()]), shell("true"));
    bad.command.secret_env.insert("MISSING".into());
    assert_eq!(server.api.raw_post("/jobs", &bad).await.status(), 400);
}

tests::on_both_backends!(
    broadcast_to_twenty_agents_runs_once_on_each_and_the_cli_reports_it,
    a_label_selector_targets_exactly_the_matching_agents,
    an_offline_agent_gets_its_run_when_it_reconnects_and_one_away_past_the_ttl_expires,
    concurrency_limits_runs_in_flight_and_max_errors_skips_the_rest,
    timeout_and_cancel_kill_the_command_and_its_children,
    output_over_the_cap_is_truncated_and_flagged,
    server_killed_mid_broadcast_loses_no_run_and_runs_none_twice,
    agent_killed_mid_run_ends_the_run_in_a_definite_state,
    the_job_event_stream_starts_with_a_snapshot_and_ends_when_the_job_does,
    a_secret_variable_reaches_the_command_and_nobody_else,
);
