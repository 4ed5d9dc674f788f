//! The dispatcher driven one round at a time, over a temporary SQLite store and a registry of
//! fake sessions (channels the test reads): concurrency, max_errors, expiry, reconciliation
//! after a reconnect, overdue runs, and a job settling when its last run ends. Times the
//! dispatcher compares against the wall clock are set explicitly in the store (a job's
//! `expires_at`, a run's `dispatched_at`), so nothing waits for time to pass.

use std::time::Duration;

use shared::job::{RunId, RunState, StateCounts};
use shared::protocol::{Outcome, ServerMessage};
use shared::{AgentId, Timestamp};
use tokio::sync::mpsc;

use super::*;
use crate::store::SqliteStore;
use crate::testing::{Progress, TestApp, report, runs_sent};

/// A job for `runs` (run id, agent), open for `ttl` from now (in the past if negative).
async fn job(app: &TestApp, id: &str, ttl_secs: i64, shape: impl FnOnce(&mut JobRow), runs: &[(&str, &AgentId)]) -> JobRow {
    let now = Timestamp::now();
    let mut job = crate::store::conformance::job_row(id, now.unix_millis());
    job.expires_at = Timestamp::from_unix_millis(now.unix_millis() + ttl_secs * 1000);
    shape(&mut job);
    let runs: Vec<(RunId, AgentId)> = runs.iter().map(|(r, a)| (r.parse().unwrap(), (*a).clone())).collect();
    app.store().create_job(&job, &runs).await.unwrap();
    job
}

async fn counts(app: &TestApp, job_id: &str) -> StateCounts {
    app.store().run_counts(&[job_id.parse().unwrap()]).await.unwrap().remove(job_id).unwrap_or_default()
}

async fn state(app: &TestApp, run_id: &str) -> (RunState, Option<String>) {
    let run = app.store().run(run_id).await.unwrap().unwrap();
    (run.state, run.error)
}

/// Agents 1..=n, enrolled and connected, with their sessions' queues.
async fn fleet(app: &TestApp, n: u8) -> Vec<(AgentId, mpsc::Receiver<ServerMessage>)> {
    let mut out = Vec::new();
    for i in 1..=n {
        let id = app.enroll(i, &[]).await;
        let rx = app.connect(&id);
        out.push((id, rx));
    }
    out
}

/// Every run sent to these sessions since the last call, with the agent it went to.
fn sent(sessions: &mut [(AgentId, mpsc::Receiver<ServerMessage>)]) -> Vec<(AgentId, RunId)> {
    sessions.iter_mut().flat_map(|(id, rx)| runs_sent(rx).into_iter().map(|r| (id.clone(), r.run_id)).collect::<Vec<_>>()).collect()
}

fn n(c: &StateCounts, s: RunState) -> u64 {
    c.get(&s).copied().unwrap_or(0)
}

fn dispatcher(store: Arc<dyn Store>) -> Dispatcher {
    Dispatcher {
        auditor: crate::audit::Auditor::new(store.clone(), None),
        store,
        registry: Registry::new(),
        events: Events::default(),
        fleet: FleetEvents::default(),
        progress: Default::default(),
        signed: Default::default(),
        kick: Arc::new(Notify::new()),
        sending: Default::default(),
    }
}

#[tokio::test]
async fn a_run_sent_back_to_pending_after_its_job_was_cancelled_never_starts() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
    let store: Arc<dyn Store> = Arc::new(sqlite);
    let agent = crate::store::NewAgent {
        id: AgentId::from_bytes([1; 8]),
        secret_hash: vec![1; 32],
        token_labels: Default::default(),
        at: Timestamp::from_unix_millis(1),
        approval_pending: false,
    };
    store
        .insert_enroll_token(&crate::store::EnrollTokenRow {
            id: "00000000000000aa".into(),
            secret_hash: vec![1; 32],
            created_by: "test".into(),
            created_at: Timestamp::from_unix_millis(0),
            expires_at: Timestamp::now().saturating_add(Duration::from_secs(60)),
            uses_total: 1,
            uses_left: 1,
            labels: Default::default(),
            revoked_at: None,
            approve: false,
        })
        .await
        .unwrap();
    assert!(store.enroll_agent("00000000000000aa", &agent).await.unwrap());
    let now = Timestamp::now();
    let mut job = crate::store::conformance::job_row("00000000000000d1", now.unix_millis());
    job.expires_at = now.saturating_add(Duration::from_secs(600));
    store.create_job(&job, &[("r1".parse().unwrap(), agent.id.clone())]).await.unwrap();
    let d = dispatcher(store.clone());
    store.mark_dispatched(&["r1".parse().unwrap()], now).await.unwrap();
    let (ended, on_agents) = d.cancel(&job.id, now).await.unwrap().unwrap();
    assert!(ended.is_empty() && on_agents.len() == 1);
    // The agent reconnects without the run: reconciliation puts it back to pending.
    store.redeliver(&["r1".parse().unwrap()]).await.unwrap();
    assert_eq!(store.run("r1").await.unwrap().unwrap().state, RunState::Pending);
    d.round().await.unwrap();
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!(run.state, RunState::Cancelled);
    assert_eq!(run.error.as_deref(), Some("cancelled before it started"));
}

#[tokio::test]
async fn no_more_runs_are_in_flight_than_max_in_flight_and_the_next_goes_out_when_one_ends() {
    let app = TestApp::new().await;
    let mut sessions = fleet(&app, 5).await;
    let ids: Vec<String> = (1..=5).map(|i| format!("r{i}")).collect();
    let runs: Vec<(&str, &AgentId)> = ids.iter().map(String::as_str).zip(sessions.iter().map(|(a, _)| a)).collect();
    let j = job(&app, "00000000000000c1", 600, |j| j.max_in_flight = Some(2), &runs).await;
    let d = &app.state.dispatcher;

    d.round().await.unwrap();
    let mut out = sent(&mut sessions);
    assert_eq!(out.len(), 2, "{out:?}");
    d.round().await.unwrap();
    assert!(sent(&mut sessions).is_empty(), "a round with no free slot sent a run");

    // Accepted and started still hold their slot.
    let (agent, run) = out[0].clone();
    report(app.store(), &agent, Progress::Accepted(&run)).await;
    report(app.store(), &agent, Progress::Started(&run)).await;
    d.round().await.unwrap();
    assert!(sent(&mut sessions).is_empty(), "a running run's slot was given away");

    // Each run that ends frees one slot, for one more run, until none is left.
    let mut ended = 0;
    while let Some((agent, run)) = out.pop() {
        report(app.store(), &agent, Progress::Finished(&run, Outcome::Succeeded)).await;
        ended += 1;
        d.round().await.unwrap();
        let next = sent(&mut sessions);
        let c = counts(&app, &j.id).await;
        assert!(n(&c, RunState::Dispatched) + n(&c, RunState::Running) <= 2, "{c:?}");
        assert_eq!(next.len(), usize::from(ended + out.len() < 5), "after {ended} ended: {next:?}");
        out.extend(next);
    }
    assert_eq!(counts(&app, &j.id).await, StateCounts::from([(RunState::Succeeded, 5)]));
    assert!(app.store().job(&j.id).await.unwrap().unwrap().finished_at.is_some());
}

#[tokio::test]
async fn past_max_errors_the_pending_runs_are_skipped_and_the_running_ones_left_to_finish() {
    let app = TestApp::new().await;
    let mut sessions = fleet(&app, 5).await;
    let ids: Vec<String> = (1..=5).map(|i| format!("r{i}")).collect();
    let runs: Vec<(&str, &AgentId)> = ids.iter().map(String::as_str).zip(sessions.iter().map(|(a, _)| a)).collect();
    let j = job(
        &app,
        "00000000000000c2",
        600,
        |j| {
            j.max_in_flight = Some(3);
            j.max_errors = Some(2);
        },
        &runs,
    )
    .await;
    let d = &app.state.dispatcher;
    d.round().await.unwrap();
    let out = sent(&mut sessions);
    assert_eq!(out.len(), 3);
    for (agent, run) in &out {
        report(app.store(), agent, Progress::Started(run)).await;
    }

    // One failure is under the budget: its slot goes to the next run.
    report(app.store(), &out[0].0, Progress::Finished(&out[0].1, Outcome::Failed)).await;
    d.round().await.unwrap();
    let fourth = sent(&mut sessions);
    assert_eq!(fourth.len(), 1);
    report(app.store(), &fourth[0].0, Progress::Started(&fourth[0].1)).await;

    // The second (a timeout counts as one) reaches it: the pending run ends skipped, no more go out.
    report(app.store(), &out[1].0, Progress::Finished(&out[1].1, Outcome::TimedOut)).await;
    d.round().await.unwrap();
    assert!(sent(&mut sessions).is_empty());
    let c = counts(&app, &j.id).await;
    assert_eq!(c, StateCounts::from([(RunState::Failed, 1), (RunState::TimedOut, 1), (RunState::Running, 2), (RunState::Skipped, 1)]));
    let skipped = app.store().runs(&j.id).await.unwrap().into_iter().find(|r| r.state == RunState::Skipped).unwrap();
    assert_eq!(skipped.error.as_deref(), Some("the job reached its max_errors"));
    assert!(app.store().job(&j.id).await.unwrap().unwrap().finished_at.is_none(), "the job ended with runs still running");

    // The running ones report as usual, and the job settles.
    for (agent, run) in [&out[2], &fourth[0]] {
        report(app.store(), agent, Progress::Finished(run, Outcome::Succeeded)).await;
    }
    d.round().await.unwrap();
    let c = counts(&app, &j.id).await;
    assert_eq!(c, StateCounts::from([(RunState::Failed, 1), (RunState::TimedOut, 1), (RunState::Succeeded, 2), (RunState::Skipped, 1)]));
    assert!(app.store().job(&j.id).await.unwrap().unwrap().finished_at.is_some());
}

#[tokio::test]
async fn a_lost_run_counts_against_max_errors() {
    let app = TestApp::new().await;
    let mut sessions = fleet(&app, 2).await;
    let (a, b) = (sessions[0].0.clone(), sessions[1].0.clone());
    let j = job(
        &app,
        "00000000000000c3",
        600,
        |j| {
            j.max_in_flight = Some(1);
            j.max_errors = Some(1);
        },
        &[("r1", &a), ("r2", &b)],
    )
    .await;
    let d = &app.state.dispatcher;
    d.round().await.unwrap();
    assert_eq!(sent(&mut sessions), [(a.clone(), "r1".parse().unwrap())]);
    report(app.store(), &a, Progress::Started("r1")).await;
    // The agent comes back without it.
    d.reconcile(&a, &[]).await.unwrap();
    d.round().await.unwrap();
    assert!(sent(&mut sessions).is_empty());
    assert_eq!(counts(&app, &j.id).await, StateCounts::from([(RunState::Lost, 1), (RunState::Skipped, 1)]));
}

#[tokio::test]
async fn pending_runs_past_the_ttl_expire_and_an_agent_online_in_time_gets_its_run() {
    let app = TestApp::new().await;
    let online = app.enroll(1, &[]).await;
    let late = app.enroll(2, &[]).await;
    let never = app.enroll(3, &[]).await;
    let mut online_rx = app.connect(&online);
    let fresh = job(&app, "00000000000000e1", 600, |_| {}, &[("fresh-late", &late)]).await;
    let stale = job(&app, "00000000000000e2", -1, |_| {}, &[("stale-online", &online), ("stale-never", &never)]).await;
    let d = &app.state.dispatcher;

    d.round().await.unwrap();
    // Past the ttl, a connected agent still gets its run: the ttl bounds waiting for agents.
    assert_eq!(runs_sent(&mut online_rx).iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), ["stale-online"]);
    assert_eq!(state(&app, "stale-never").await, (RunState::Expired, Some("the agent was not online before the job's ttl ran out".into())));
    assert_eq!(state(&app, "fresh-late").await, (RunState::Pending, None), "an offline agent's run waits within the ttl");

    // The late agent comes online within its job's ttl and gets its run; the expired one stays so.
    let mut late_rx = app.connect(&late);
    let mut never_rx = app.connect(&never);
    d.round().await.unwrap();
    assert_eq!(runs_sent(&mut late_rx).iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), ["fresh-late"]);
    assert!(runs_sent(&mut never_rx).is_empty());
    assert_eq!(state(&app, "stale-never").await.0, RunState::Expired);
    assert_eq!(counts(&app, &fresh.id).await, StateCounts::from([(RunState::Dispatched, 1)]));
    assert_eq!(counts(&app, &stale.id).await, StateCounts::from([(RunState::Dispatched, 1), (RunState::Expired, 1)]));
}

#[tokio::test]
async fn a_job_still_waiting_for_approval_at_its_ttl_expires_without_sending_anything() {
    let app = TestApp::new().await;
    let agent = app.enroll(1, &[]).await;
    let mut rx = app.connect(&agent);
    let approval = Some(crate::store::JobApproval { creator_token: "00000000000000aa".into(), approved: None });
    let waiting = job(&app, "00000000000000a1", 600, |j| j.approval = approval.clone(), &[("waits", &agent)]).await;
    let late = job(&app, "00000000000000a2", -1, |j| j.approval = approval.clone(), &[("too-late", &agent)]).await;
    let d = &app.state.dispatcher;
    d.round().await.unwrap();
    assert!(runs_sent(&mut rx).is_empty(), "a job waiting for approval sent a run");
    assert_eq!(state(&app, "waits").await.0, RunState::Pending);
    assert_eq!(state(&app, "too-late").await, (RunState::Expired, Some("no second admin approved the job before its ttl ran out".into())));

    assert!(app.store().approve_job(&waiting.id, "00000000000000bb", "second admin", Timestamp::now()).await.unwrap());
    d.round().await.unwrap();
    assert_eq!(runs_sent(&mut rx).iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), ["waits"]);
    assert!(app.store().job(&late.id).await.unwrap().unwrap().finished_at.is_some());
}

#[tokio::test]
async fn a_reconnected_agent_gets_back_the_runs_it_never_accepted_and_the_ones_it_lost_end_lost() {
    let app = TestApp::new().await;
    let agent = app.enroll(1, &[]).await;
    let mut rx = app.connect(&agent);
    // One run per job: never accepted, accepted, running and still held, accepted and held.
    for (n, run) in ["never-accepted", "accepted-lost", "running-held", "accepted-held"].iter().enumerate() {
        job(&app, &format!("00000000000000f{n}"), 600, |_| {}, &[(run, &agent)]).await;
    }
    let d = &app.state.dispatcher;
    d.round().await.unwrap();
    assert_eq!(runs_sent(&mut rx).len(), 4);
    report(app.store(), &agent, Progress::Accepted("accepted-lost")).await;
    report(app.store(), &agent, Progress::Started("running-held")).await;
    report(app.store(), &agent, Progress::Accepted("accepted-held")).await;

    // The agent comes back on a new connection (which replaces the old session), and its
    // hello lists what its ledger holds.
    let mut rx = app.connect(&agent);
    let held = d.reconcile(&agent, &["running-held".parse().unwrap(), "accepted-held".parse().unwrap()]).await.unwrap();
    let mut held: Vec<&str> = held.iter().map(|r| r.id.as_str()).collect();
    held.sort();
    assert_eq!(held, ["accepted-held", "running-held"]);
    assert_eq!(state(&app, "never-accepted").await, (RunState::Pending, None), "a run that never reached the agent goes back");
    assert_eq!(state(&app, "accepted-lost").await, (RunState::Lost, Some("the agent came back without it".into())));
    assert_eq!(state(&app, "running-held").await.0, RunState::Running);
    assert_eq!(state(&app, "accepted-held").await.0, RunState::Dispatched);

    // The next round sends the returned run again, and only it.
    d.round().await.unwrap();
    assert_eq!(runs_sent(&mut rx).iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), ["never-accepted"]);
    // `lost` is provisional: a result that arrives after all is what happened.
    report(app.store(), &agent, Progress::Finished("accepted-lost", Outcome::Succeeded)).await;
    assert_eq!(state(&app, "accepted-lost").await.0, RunState::Succeeded);
}

#[tokio::test]
async fn a_run_unreported_past_its_timeout_and_the_grace_ends_lost() {
    let app = TestApp::new().await;
    let (a, b, c) = (app.enroll(1, &[]).await, app.enroll(2, &[]).await, app.enroll(3, &[]).await);
    // The fixture job's timeout is one second.
    let j = job(&app, "00000000000000d2", 600, |_| {}, &[("overdue", &a), ("in-time", &b), ("started-long-ago", &c)]).await;
    let now = Timestamp::now();
    let long_ago = now.saturating_sub(Duration::from_millis(j.timeout_ms) + REPORT_GRACE + Duration::from_secs(1));
    let just_in_time = now.saturating_sub(Duration::from_millis(j.timeout_ms) + REPORT_GRACE - Duration::from_secs(5));
    let store = app.store();
    store.mark_dispatched(&["overdue".parse().unwrap(), "started-long-ago".parse().unwrap()], long_ago).await.unwrap();
    store.mark_dispatched(&["in-time".parse().unwrap()], just_in_time).await.unwrap();
    let started = crate::store::Record::RunStarted { agent_id: c.clone(), run_id: "started-long-ago".parse().unwrap(), at: long_ago };
    store.record(&[started]).await.unwrap();

    let mut events = app.state.events.subscribe();
    app.state.dispatcher.sweep_overdue().await.unwrap();
    let why = Some("no report from the agent within the timeout and a 30s grace".to_owned());
    assert_eq!(state(&app, "overdue").await, (RunState::Lost, why.clone()));
    assert_eq!(state(&app, "started-long-ago").await, (RunState::Lost, why));
    assert_eq!(state(&app, "in-time").await.0, RunState::Dispatched);
    let mut announced = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let JobEvent::Run { run_id, state: RunState::Lost, .. } = e.event {
            announced.push(run_id);
        }
    }
    announced.sort();
    assert_eq!(announced, ["overdue", "started-long-ago"]);
}

#[tokio::test]
async fn a_job_settles_once_when_its_last_run_ends_audited_and_announced() {
    let app = TestApp::new().await;
    let mut sessions = fleet(&app, 2).await;
    let (a, b) = (sessions[0].0.clone(), sessions[1].0.clone());
    let j = job(&app, "00000000000000b1", 600, |_| {}, &[("first", &a), ("second", &b)]).await;
    let d = &app.state.dispatcher;
    let mut events = app.state.events.subscribe();
    let (mut fleet_events, _) = app.state.fleet.subscribe(None);
    d.round().await.unwrap();
    assert_eq!(sent(&mut sessions).len(), 2);

    report(app.store(), &a, Progress::Finished("first", Outcome::Succeeded)).await;
    d.round().await.unwrap();
    assert!(!app.store().finish_job_if_done(&j.id, Timestamp::now()).await.unwrap(), "a job with a run open finished");
    assert!(app.store().job(&j.id).await.unwrap().unwrap().finished_at.is_none());

    report(app.store(), &b, Progress::Finished("second", Outcome::Failed)).await;
    d.round().await.unwrap();
    assert!(app.store().job(&j.id).await.unwrap().unwrap().finished_at.is_some());
    d.round().await.unwrap();
    let expected = StateCounts::from([(RunState::Succeeded, 1), (RunState::Failed, 1)]);
    let entries = app.audit("job.finish").await;
    assert_eq!(entries.len(), 1, "a job finishes once");
    assert_eq!((entries[0].actor.as_str(), entries[0].target.as_deref()), (crate::store::sqlite::SERVER_ACTOR, Some(j.id.as_str())));
    assert_eq!(entries[0].detail["counts"], serde_json::json!({ "succeeded": 1, "failed": 1 }));

    let mut finished = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let JobEvent::Finished { counts } = e.event {
            finished.push(counts);
        }
    }
    assert_eq!(finished, std::slice::from_ref(&expected), "the job's stream hears it once");
    let mut fleet_finished = Vec::new();
    while let Ok((_, e)) = fleet_events.try_recv() {
        if let shared::api::FleetEvent::JobFinished { job_id, counts, status, failed } = e {
            fleet_finished.push((job_id, counts, status, failed));
        }
    }
    assert_eq!(fleet_finished, [(j.id.clone(), expected, shared::job::JobStatus::Failed, 1)]);
}

#[tokio::test]
async fn a_run_whose_session_queue_is_full_goes_back_to_pending_and_out_in_a_later_round() {
    let app = TestApp::new().await;
    let agent = app.enroll(1, &[]).await;
    let mut rx = crate::testing::connect(&app.state.registry, &agent, 1);
    app.state.registry.sender(&agent).unwrap().try_send(ServerMessage::RotateCredential(Default::default())).unwrap();
    job(&app, "00000000000000a9", 600, |_| {}, &[("queued", &agent)]).await;
    let d = &app.state.dispatcher;
    d.round().await.unwrap();
    assert_eq!(state(&app, "queued").await.0, RunState::Pending, "a run that could not be queued stays marked dispatched");
    assert!(matches!(rx.try_recv(), Ok(ServerMessage::RotateCredential(_))));
    d.round().await.unwrap();
    assert_eq!(runs_sent(&mut rx).iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), ["queued"]);
    assert_eq!(state(&app, "queued").await.0, RunState::Dispatched);
}

#[tokio::test]
async fn a_run_of_a_scoped_job_is_skipped_if_its_agent_left_the_scope_before_dispatch() {
    let app = TestApp::new().await;
    let agent = app.enroll(1, &["site=paris"]).await;
    let mut rx = app.connect(&agent);
    job(&app, "00000000000000a8", 600, |j| j.scope = Some(shared::Selector::parse("site=paris").unwrap()), &[("moved", &agent)]).await;
    let paris = shared::Labels::from_pairs(["site=paris"]).unwrap();
    let lyon = shared::Labels::from_pairs(["site=lyon"]).unwrap();
    assert!(app.store().set_agent_labels(&agent, &paris, &lyon, &lyon).await.unwrap());
    app.state.dispatcher.round().await.unwrap();
    assert!(runs_sent(&mut rx).is_empty(), "a run left its creator's scope");
    let (s, why) = state(&app, "moved").await;
    assert_eq!(s, RunState::Skipped);
    assert!(why.is_some_and(|w| w.contains("scope")));
}

#[tokio::test]
async fn the_running_dispatcher_sends_a_job_created_through_the_api_to_its_connected_agent() {
    let app = TestApp::new().await;
    let agent = app.enroll(1, &[]).await;
    let mut rx = app.connect(&agent);
    let cancel = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(app.state.dispatcher.clone().run(cancel.clone()));
    let operator = app.token(shared::api::Role::Operator).await;
    let body = serde_json::json!({ "target": "all", "command": { "program": { "argv": ["true"] } } });
    let created = app.post("/api/v1/jobs", Some(&operator), body).await;
    assert_eq!(created.status, axum::http::StatusCode::CREATED, "{}", created.text());
    let job_id = created.json()["id"].as_str().unwrap().to_owned();
    let msg = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("no run within 5s").unwrap();
    let ServerMessage::Run(run) = msg else { panic!("expected a run, got {msg:?}") };
    assert_eq!(run.job_id.as_str(), job_id.as_str());
    assert_eq!(state(&app, &run.run_id).await.0, RunState::Dispatched, "marked before it was sent");
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), running).await.expect("the dispatcher did not stop").unwrap();
}
