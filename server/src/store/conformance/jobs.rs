//! Jobs and their runs: creating them (all or nothing), listing and counting them, dispatch
//! order and marking, ending and redelivering runs, overdue runs, finishing, cancelling and
//! approving jobs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use shared::job::{CommandSpec, Concurrency, JobId, Program, RunId, RunState, Target};
use shared::protocol::Outcome;
use shared::signing::{JobSignature, PublicKey, Signature};
use shared::{AgentId, Selector};

use super::{connected, enroll, enrolled, finished, fleet, ids, job_row, runs_for, sorted, ts};
use crate::store::{JobApproval, OpenRun, Record, Store, StoreError};

const J1: &str = "00000000000000j1";
const J2: &str = "00000000000000j2";
const J3: &str = "00000000000000j3";
const J4: &str = "00000000000000j4";

fn started(a: &AgentId, run: &str, at: i64) -> Record {
    Record::RunStarted { agent_id: a.clone(), run_id: run.parse().unwrap(), at: ts(at) }
}

fn accepted(a: &AgentId, run: &str, at: i64) -> Record {
    Record::RunAccepted { agent_id: a.clone(), run_id: run.parse().unwrap(), at: ts(at) }
}

fn id_list(ids: &[&str]) -> Vec<RunId> {
    ids.iter().map(|s| s.parse().unwrap()).collect()
}

async fn state(store: &dyn Store, run: &str) -> RunState {
    store.run(run).await.unwrap().unwrap().state
}

pub(crate) async fn a_job_is_stored_with_everything_it_was_created_with(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 3).await;
    store.record(&[connected(&agents[0].id, 1_500)]).await.unwrap();
    let mut job = job_row(J1, 1_000);
    job.created_by = "alice (0123456789abcdef)".into();
    job.target = Target::Agents(vec![agents[2].id.clone(), agents[0].id.clone(), agents[1].id.clone()]);
    job.command = CommandSpec {
        program: Program::Shell("echo \"$GREETING\" | tr a-z A-Z; exit 3".into()),
        cwd: Some("/srv/ü".into()),
        env: BTreeMap::from([("GREETING".into(), "héllo\nworld".into()), ("TOKEN".into(), "s3cret".into())]),
        secret_env: BTreeSet::from(["TOKEN".into()]),
    };
    job.timeout_ms = 30_000;
    job.ttl_ms = 60_000;
    job.concurrency = Some(Concurrency::Percent(25));
    job.max_in_flight = Some(2);
    job.max_errors = Some(1);
    job.output_limit = 4096;
    job.expires_at = ts(61_000);
    job.signature = Some(JobSignature {
        key: PublicKey::from_bytes([7; 32]),
        signature: Signature([9; 64]),
        expires_at: ts(86_400_000),
        selector: Some(Selector::parse("site=lab").unwrap()),
    });
    job.scope = Some(Selector::parse("site=lab,role!=db").unwrap());
    job.approval = Some(JobApproval { creator_token: "00000000000000t1".into(), approved: None });
    let runs = [
        ("ra".parse().unwrap(), agents[2].id.clone()),
        ("rb".parse().unwrap(), agents[0].id.clone()),
        ("rc".parse().unwrap(), agents[1].id.clone()),
    ];
    store.create_job(&job, &runs).await.unwrap();

    let read = store.job(J1).await.unwrap().unwrap();
    assert_eq!(format!("{read:?}"), format!("{job:?}"), "every field as written");
    assert!(read.awaiting_approval());
    assert!(store.job(J2).await.unwrap().is_none());
    let stored = store.runs(J1).await.unwrap();
    let seen: Vec<(&str, &AgentId, &str)> = stored.iter().map(|r| (r.id.as_str(), &r.agent_id, r.hostname.as_str())).collect();
    assert_eq!(seen, [("ra", &agents[2].id, ""), ("rb", &agents[0].id, "h"), ("rc", &agents[1].id, "")], "in the order given");
    for r in &stored {
        assert_eq!((r.job_id.as_str(), r.state, r.accepted), (J1, RunState::Pending, false));
        assert!(r.dispatched_at.is_none() && r.started_at.is_none() && r.finished_at.is_none());
        assert!(r.exit_code.is_none() && r.signal.is_none() && r.error.is_none());
        assert_eq!((r.stdout_len, r.stderr_len, r.stdout_truncated, r.stderr_truncated), (0, 0, false, false));
    }
    assert_eq!(format!("{:?}", store.run("rb").await.unwrap().unwrap()), format!("{:?}", stored[1]));
    assert!(store.run("nope").await.unwrap().is_none());
}

pub(crate) async fn a_job_id_chosen_twice_is_a_duplicate_and_changes_nothing(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 2).await;
    store.create_job(&job_row(J1, 1), &[("r1".parse().unwrap(), agents[0].id.clone())]).await.unwrap();
    let mut again = job_row(J1, 2);
    again.created_by = "someone else".into();
    let err = store.create_job(&again, &[("r2".parse().unwrap(), agents[1].id.clone())]).await;
    assert!(matches!(err, Err(StoreError::Duplicate)), "{err:?}");
    assert_eq!(store.job(J1).await.unwrap().unwrap().created_by, "t");
    assert_eq!(store.runs(J1).await.unwrap().iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["r1"]);
    assert!(store.run("r2").await.unwrap().is_none(), "none of the second job's runs is stored");
    assert_eq!(store.list_jobs(10).await.unwrap().len(), 1);
}

pub(crate) async fn a_job_that_cannot_store_all_its_runs_stores_nothing(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 3).await;
    store.create_job(&job_row(J1, 1), &[("taken".parse().unwrap(), agents[0].id.clone())]).await.unwrap();
    // Its last run's id is another job's.
    let runs = [("fresh".parse().unwrap(), agents[1].id.clone()), ("taken".parse().unwrap(), agents[2].id.clone())];
    let err = store.create_job(&job_row(J2, 2), &runs).await;
    assert!(matches!(err, Err(StoreError::Duplicate)), "{err:?}");
    // Two runs for one agent.
    let runs = [("x1".parse().unwrap(), agents[1].id.clone()), ("x2".parse().unwrap(), agents[1].id.clone())];
    assert!(store.create_job(&job_row(J3, 3), &runs).await.is_err());
    for job in [J2, J3] {
        assert!(store.job(job).await.unwrap().is_none(), "{job} left nothing");
        assert!(store.runs(job).await.unwrap().is_empty());
    }
    for run in ["fresh", "x1", "x2"] {
        assert!(store.run(run).await.unwrap().is_none(), "{run}");
    }
    assert_eq!(store.run("taken").await.unwrap().unwrap().job_id, J1);
    assert!(store.open_runs_for_agent(&agents[1].id).await.unwrap().is_empty());
    assert_eq!(store.active_jobs().await.unwrap().len(), 1);
}

/// More runs than a backend may write in one statement (SQLite's take 500 at a time).
pub(crate) async fn a_large_job_keeps_its_runs_in_dispatch_order(store: Arc<dyn Store>) {
    const N: u16 = 1200;
    let mut token = super::enroll_token(u32::from(N), 10_000);
    token.id = "00000000000000bb".into();
    store.insert_enroll_token(&token).await.unwrap();
    let mut agents = Vec::new();
    for n in 0..N {
        let [hi, lo] = n.to_be_bytes();
        let mut a = super::agent(0);
        a.id = AgentId::from_bytes([0xa0, hi, lo, 0, 0, 0, 0, 0]);
        assert!(store.enroll_agent(&token.id, &a).await.unwrap());
        agents.push(a.id);
    }
    // Ids that sort otherwise than the order given.
    let runs: Vec<(RunId, AgentId)> =
        agents.into_iter().enumerate().map(|(i, a)| (format!("r{:04}", (i * 7919) % 10_000).parse().unwrap(), a)).collect();
    store.create_job(&job_row(J1, 1), &runs).await.unwrap();
    let want: Vec<&str> = runs.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(store.runs(J1).await.unwrap().iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), want);
    assert_eq!(ids(&store.pending_runs(J1).await.unwrap()), want);
    assert_eq!(store.run_counts(&[J1.parse().unwrap()]).await.unwrap()[J1][&RunState::Pending], u64::from(N));
    let all: Vec<RunId> = runs.iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(store.mark_dispatched(&all, ts(10)).await.unwrap().len(), runs.len());
    assert_eq!(store.end_runs(&all, RunState::Expired, "ttl", ts(20)).await.unwrap().len(), runs.len());
}

pub(crate) async fn jobs_are_listed_newest_first_within_the_limit_and_active_ones_oldest_first(store: Arc<dyn Store>) {
    for (id, created_at) in [(J1, 1), (J2, 3), (J3, 2), (J4, 4)] {
        store.create_job(&job_row(id, created_at), &[]).await.unwrap();
    }
    let list = |limit: u32| {
        let store = store.clone();
        async move { store.list_jobs(limit).await.unwrap().into_iter().map(|j| j.id).collect::<Vec<_>>() }
    };
    assert_eq!(list(2).await, [J4, J2]);
    assert_eq!(list(10).await, [J4, J2, J3, J1]);
    assert!(store.finish_job_if_done(J2, ts(10)).await.unwrap(), "a job with no runs is done");
    let active: Vec<JobId> = store.active_jobs().await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(active, [J1, J3, J4], "unfinished, oldest first");
    assert_eq!(list(10).await.len(), 4, "finished jobs are listed too");
}

pub(crate) async fn run_counts_and_state_totals_count_runs_by_state(store: Arc<dyn Store>) {
    let totals = store.state_totals().await.unwrap();
    assert!(totals.0.iter().all(|(_, n)| *n == 0) && totals.1.iter().all(|(_, n)| *n == 0), "{totals:?}");
    let agents = fleet(&*store, 3).await;
    store.create_job(&job_row(J1, 1), &runs_for("a", &agents)).await.unwrap();
    store.create_job(&job_row(J2, 2), &runs_for("b", &agents[..2])).await.unwrap();
    store.create_job(&job_row(J3, 3), &[]).await.unwrap();
    assert!(store.finish_job_if_done(J3, ts(5)).await.unwrap());
    store.mark_dispatched(&id_list(&["a1", "a2"]), ts(10)).await.unwrap();
    store
        .record(&[finished(&agents[2].id, "a2", Outcome::Succeeded, 0, 0, 20), finished(&agents[1].id, "b1", Outcome::Failed, 0, 0, 20)])
        .await
        .unwrap();

    let mut asked: Vec<JobId> = (0..600).map(|i| format!("unknown{i}").parse().unwrap()).collect();
    asked.extend([J1, J2, J3].map(|j| j.parse().unwrap()));
    let counts = store.run_counts(&asked).await.unwrap();
    use RunState::{Dispatched, Failed, Pending, Succeeded};
    assert_eq!(counts.len(), 2, "only jobs with runs: {counts:?}");
    assert_eq!(counts[J1], BTreeMap::from([(Pending, 1), (Dispatched, 1), (Succeeded, 1)]));
    assert_eq!(counts[J2], BTreeMap::from([(Pending, 1), (Failed, 1)]));

    let (runs, jobs) = store.state_totals().await.unwrap();
    let runs: BTreeMap<RunState, u64> = runs.into_iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(runs, BTreeMap::from([(Pending, 2), (Dispatched, 1), (Succeeded, 1), (Failed, 1)]));
    let jobs: BTreeMap<&str, u64> = jobs.into_iter().collect();
    assert_eq!(jobs, BTreeMap::from([("running", 2), ("finished", 1)]));
}

pub(crate) async fn an_agents_runs_are_listed_newest_job_first_with_their_command(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let other = enroll(&*store, 2).await;
    for (n, id) in [J1, J2, J3].into_iter().enumerate() {
        let runs = [(format!("r{n}a").parse().unwrap(), a.id.clone()), (format!("r{n}b").parse().unwrap(), other.id.clone())];
        store.create_job(&job_row(id, n as i64), &runs).await.unwrap();
    }
    let runs = store.agent_runs(&a.id, 2).await.unwrap();
    let seen: Vec<(&str, &str)> = runs.iter().map(|r| (r.job_id.as_str(), r.run_id.as_str())).collect();
    assert_eq!(seen, [(J3, "r2a"), (J2, "r1a")]);
    assert_eq!((runs[0].state, runs[0].command.summary().as_str()), (RunState::Pending, "true"));
    assert_eq!((runs[0].created_at, runs[0].created_by.as_str()), (ts(2), "t"));
    assert!(store.agent_runs(&super::agent(9).id, 10).await.unwrap().is_empty());

    store.mark_dispatched(&id_list(&["r0a"]), ts(10)).await.unwrap();
    let mut result = finished(&a.id, "r0a", Outcome::Failed, 0, 0, 30);
    if let Record::RunFinished { finished, .. } = &mut result {
        (finished.exit_code, finished.error) = (Some(4), Some("exit status 4".into()));
    }
    store.record(&[started(&a.id, "r0a", 20), result]).await.unwrap();
    let all = store.agent_runs(&a.id, 10).await.unwrap();
    assert_eq!(all.len(), 3);
    let last = &all[2];
    assert_eq!(
        (last.run_id.as_str(), last.state, last.exit_code, last.error.as_deref()),
        ("r0a", RunState::Failed, Some(4), Some("exit status 4"))
    );
    assert_eq!((last.started_at, last.finished_at, last.signal), (Some(ts(20)), Some(ts(30)), None));
}

pub(crate) async fn pending_runs_come_in_dispatch_order_and_marking_returns_only_the_runs_that_moved(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 4).await;
    store.create_job(&job_row(J1, 1), &runs_for("r", &agents)).await.unwrap();
    store.create_job(&job_row(J2, 2), &[("other".parse().unwrap(), agents[0].id.clone())]).await.unwrap();
    let pending = store.pending_runs(J1).await.unwrap();
    assert_eq!(ids(&pending), ["r0", "r1", "r2", "r3"]);
    assert_eq!(
        pending[1],
        OpenRun {
            id: "r1".parse().unwrap(),
            job_id: J1.parse().unwrap(),
            agent_id: agents[1].id.clone(),
            state: RunState::Pending,
            accepted: false
        }
    );

    assert_eq!(sorted(store.mark_dispatched(&id_list(&["r3", "r1"]), ts(10)).await.unwrap()), ["r1", "r3"]);
    assert_eq!(ids(&store.pending_runs(J1).await.unwrap()), ["r0", "r2"]);
    let r1 = store.run("r1").await.unwrap().unwrap();
    assert_eq!((r1.state, r1.dispatched_at), (RunState::Dispatched, Some(ts(10))));
    // Runs that moved already, or do not exist, are left out of the answer and left alone.
    assert_eq!(store.mark_dispatched(&id_list(&["r0", "r1", "nope"]), ts(20)).await.unwrap(), ["r0"]);
    assert_eq!(store.run("r1").await.unwrap().unwrap().dispatched_at, Some(ts(10)));
    assert!(store.mark_dispatched(&[], ts(20)).await.unwrap().is_empty());

    assert_eq!(store.mark_job_dispatched(J1, ts(30)).await.unwrap(), ["r2"]);
    assert!(store.mark_job_dispatched(J1, ts(40)).await.unwrap().is_empty());
    assert!(store.mark_job_dispatched("00000000000000j9", ts(40)).await.unwrap().is_empty());
    assert_eq!(store.run("r2").await.unwrap().unwrap().dispatched_at, Some(ts(30)));
    assert_eq!(state(&*store, "other").await, RunState::Pending, "another job's run");
    // Only pending runs move: a run that ended is not sent.
    store.create_job(&job_row(J3, 3), &[("late".parse().unwrap(), agents[0].id.clone())]).await.unwrap();
    store.end_runs(&id_list(&["late"]), RunState::Expired, "ttl", ts(50)).await.unwrap();
    assert!(store.mark_dispatched(&id_list(&["late"]), ts(60)).await.unwrap().is_empty());
    assert!(store.mark_job_dispatched(J3, ts(60)).await.unwrap().is_empty());
    assert_eq!(state(&*store, "late").await, RunState::Expired);
}

pub(crate) async fn ending_runs_changes_only_open_ones_and_returns_them(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 4).await;
    store.create_job(&job_row(J1, 1), &runs_for("r", &agents)).await.unwrap();
    store.mark_dispatched(&id_list(&["r1", "r2", "r3"]), ts(10)).await.unwrap();
    store.record(&[started(&agents[2].id, "r2", 20), finished(&agents[3].id, "r3", Outcome::Succeeded, 0, 0, 30)]).await.unwrap();
    let ended = store.end_runs(&id_list(&["r0", "r1", "r2", "r3", "nope"]), RunState::Expired, "ttl", ts(50)).await.unwrap();
    assert_eq!(sorted(ended), ["r0", "r1", "r2"]);
    for id in ["r0", "r1", "r2"] {
        let r = store.run(id).await.unwrap().unwrap();
        assert_eq!((r.state, r.error.as_deref(), r.finished_at), (RunState::Expired, Some("ttl"), Some(ts(50))), "{id}");
    }
    let r3 = store.run("r3").await.unwrap().unwrap();
    assert_eq!((r3.state, r3.error, r3.finished_at), (RunState::Succeeded, None, Some(ts(30))), "a final run keeps its end");
    assert!(store.end_runs(&id_list(&["r0", "r1", "r2", "r3"]), RunState::Lost, "again", ts(60)).await.unwrap().is_empty());
    assert_eq!(state(&*store, "r0").await, RunState::Expired);
}

pub(crate) async fn redelivery_takes_back_only_dispatched_runs_the_agent_never_accepted(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 4).await;
    store.create_job(&job_row(J1, 1), &runs_for("r", &agents)).await.unwrap();
    store.mark_dispatched(&id_list(&["r0", "r1", "r2"]), ts(10)).await.unwrap();
    store.record(&[accepted(&agents[1].id, "r1", 15), started(&agents[2].id, "r2", 20)]).await.unwrap();
    store.redeliver(&id_list(&["r0", "r1", "r2", "r3", "nope"])).await.unwrap();
    let r0 = store.run("r0").await.unwrap().unwrap();
    assert_eq!((r0.state, r0.dispatched_at), (RunState::Pending, None), "sent and never accepted: sent again");
    assert_eq!(state(&*store, "r1").await, RunState::Dispatched, "the agent holds it");
    assert_eq!(state(&*store, "r2").await, RunState::Running);
    assert_eq!(state(&*store, "r3").await, RunState::Pending);
    assert_eq!(ids(&store.pending_runs(J1).await.unwrap()), ["r0", "r3"], "back in its place in the dispatch order");
}

pub(crate) async fn an_agents_open_runs_are_its_pending_dispatched_and_running_ones(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let b = enroll(&*store, 2).await;
    for (n, job) in [J1, J2, J3, J4].into_iter().enumerate() {
        store
            .create_job(
                &job_row(job, n as i64),
                &[(format!("a{n}").parse().unwrap(), a.id.clone()), (format!("b{n}").parse().unwrap(), b.id.clone())],
            )
            .await
            .unwrap();
    }
    store.mark_dispatched(&id_list(&["a1", "a2", "a3"]), ts(10)).await.unwrap();
    store.record(&[started(&a.id, "a2", 20), finished(&a.id, "a3", Outcome::Succeeded, 0, 0, 30)]).await.unwrap();
    let mut open = store.open_runs_for_agent(&a.id).await.unwrap();
    open.sort_by(|x, y| x.id.cmp(&y.id));
    let seen: Vec<(&str, &str, RunState, bool)> = open.iter().map(|r| (r.id.as_str(), r.job_id.as_str(), r.state, r.accepted)).collect();
    assert_eq!(seen, [("a0", J1, RunState::Pending, false), ("a1", J2, RunState::Dispatched, false), ("a2", J3, RunState::Running, true)]);
    assert!(open.iter().all(|r| r.agent_id == a.id));
    assert_eq!(store.open_runs_for_agent(&b.id).await.unwrap().len(), 4);
}

pub(crate) async fn a_run_is_overdue_once_its_timeout_and_grace_have_passed(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 4).await;
    let mut job = job_row(J1, 1);
    job.timeout_ms = 1_000;
    store.create_job(&job, &runs_for("r", &agents)).await.unwrap();
    store.mark_dispatched(&id_list(&["r0", "r1", "r3"]), ts(100)).await.unwrap();
    store.record(&[started(&agents[1].id, "r1", 1_000), finished(&agents[3].id, "r3", Outcome::Succeeded, 0, 0, 200)]).await.unwrap();
    let overdue = |now: i64| {
        let store = store.clone();
        async move {
            let mut runs = store.overdue_runs(ts(now), 500).await.unwrap();
            runs.sort_by(|x, y| x.id.cmp(&y.id));
            runs
        }
    };
    // Sent at 100: due by 100 + 1,000 + 500. Started at 1,000: due by 2,500.
    assert!(overdue(1_600).await.is_empty(), "due by, not before");
    let late = overdue(1_601).await;
    assert_eq!(
        late,
        [OpenRun {
            id: "r0".parse().unwrap(),
            job_id: J1.parse().unwrap(),
            agent_id: agents[0].id.clone(),
            state: RunState::Dispatched,
            accepted: false
        }]
    );
    assert_eq!(ids(&overdue(2_500).await), ["r0"]);
    let both = overdue(2_501).await;
    assert_eq!(ids(&both), ["r0", "r1"]);
    assert_eq!((both[1].state, both[1].accepted), (RunState::Running, true));
    assert_eq!(ids(&overdue(1_000_000).await), ["r0", "r1"], "a pending or finished run is never overdue");
}

pub(crate) async fn a_job_finishes_once_every_run_is_final(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 2).await;
    store.create_job(&job_row(J1, 1), &runs_for("r", &agents)).await.unwrap();
    assert!(!store.finish_job_if_done(J1, ts(10)).await.unwrap());
    store.end_runs(&id_list(&["r0"]), RunState::Expired, "ttl", ts(20)).await.unwrap();
    assert!(!store.finish_job_if_done(J1, ts(20)).await.unwrap(), "one run is still pending");
    assert_eq!(store.job(J1).await.unwrap().unwrap().finished_at, None);
    store.record(&[finished(&agents[1].id, "r1", Outcome::Succeeded, 0, 0, 30)]).await.unwrap();
    assert!(store.finish_job_if_done(J1, ts(40)).await.unwrap());
    assert!(!store.finish_job_if_done(J1, ts(50)).await.unwrap(), "once");
    assert_eq!(store.job(J1).await.unwrap().unwrap().finished_at, Some(ts(40)));
    assert!(store.active_jobs().await.unwrap().is_empty());
    assert!(!store.finish_job_if_done("00000000000000j9", ts(50)).await.unwrap());
}

pub(crate) async fn cancelling_ends_only_runs_never_sent_and_names_the_ones_agents_must_stop(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 4).await;
    let job = job_row("00000000000000c1", 1);
    store.create_job(&job, &runs_for("r", &agents)).await.unwrap();
    // r1 was marked dispatched (its message may be on the way), r2 runs, r3 is done; r0 was
    // never sent.
    assert_eq!(store.mark_dispatched(&id_list(&["r1", "r2", "r3"]), ts(2)).await.unwrap().len(), 3);
    store.record(&[started(&agents[2].id, "r2", 2), finished(&agents[3].id, "r3", Outcome::Succeeded, 0, 0, 2)]).await.unwrap();
    let (ended, on_agents) = store.cancel_job(&job.id, ts(3)).await.unwrap().unwrap();
    assert_eq!(ids(&ended), ["r0"]);
    assert_eq!(ended[0].state, RunState::Pending, "as it was when the cancel found it");
    assert_eq!(ids(&on_agents), ["r1", "r2"], "a run already sent is told to stop, in dispatch order");
    assert_eq!((on_agents[0].state, on_agents[1].state), (RunState::Dispatched, RunState::Running));
    assert_eq!(state(&*store, "r1").await, RunState::Dispatched, "left to its agent, which reports how it ended");
    assert_eq!(state(&*store, "r2").await, RunState::Running);
    assert_eq!(state(&*store, "r3").await, RunState::Succeeded);
    let r0 = store.run("r0").await.unwrap().unwrap();
    assert_eq!((r0.state, r0.error.as_deref(), r0.finished_at), (RunState::Cancelled, Some("cancelled before it started"), Some(ts(3))));
    assert_eq!(store.job(&job.id).await.unwrap().unwrap().cancelled_at, Some(ts(3)));
    // Cancelling again ends nothing more, names the runs still out, and keeps the first time.
    let (ended, on_agents) = store.cancel_job(&job.id, ts(9)).await.unwrap().unwrap();
    assert!(ended.is_empty());
    assert_eq!(ids(&on_agents), ["r1", "r2"]);
    assert_eq!(store.job(&job.id).await.unwrap().unwrap().cancelled_at, Some(ts(3)));
    assert!(store.cancel_job("00000000000000c9", ts(3)).await.unwrap().is_none());
}

pub(crate) async fn a_finished_job_is_never_marked_cancelled(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 1).await;
    let job = job_row("00000000000000c2", 1);
    store.create_job(&job, &runs_for("f", &agents)).await.unwrap();
    assert_eq!(store.mark_dispatched(&id_list(&["f0"]), ts(2)).await.unwrap().len(), 1);
    store.record(&[finished(&agents[0].id, "f0", Outcome::Succeeded, 0, 0, 3)]).await.unwrap();
    assert!(store.finish_job_if_done(&job.id, ts(4)).await.unwrap());
    let (ended, on_agents) = store.cancel_job(&job.id, ts(5)).await.unwrap().expect("the job exists");
    assert!(ended.is_empty() && on_agents.is_empty());
    assert_eq!(store.job(&job.id).await.unwrap().unwrap().cancelled_at, None, "finished as it finished");
}

pub(crate) async fn cancelling_while_runs_are_marked_never_both_ends_and_sends_a_run(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 40).await;
    let runs = runs_for("r", &agents);
    store.create_job(&job_row(J1, 1), &runs).await.unwrap();
    let all: Vec<RunId> = runs.iter().map(|(r, _)| r.clone()).collect();
    let marker = {
        let (store, all) = (store.clone(), all.clone());
        tokio::spawn(async move {
            let mut moved = Vec::new();
            for chunk in all.chunks(4) {
                moved.extend(store.mark_dispatched(chunk, ts(10)).await.unwrap());
                tokio::task::yield_now().await;
            }
            moved
        })
    };
    let canceller = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            store.cancel_job(J1, ts(10)).await.unwrap().unwrap()
        })
    };
    let (moved, (ended, on_agents)) = (marker.await.unwrap(), canceller.await.unwrap());
    let ended: Vec<RunId> = ended.into_iter().map(|r| r.id).collect();
    let on_agents: Vec<RunId> = on_agents.into_iter().map(|r| r.id).collect();
    // The cancel ends every run still pending in one go, so whatever was marked was marked
    // before it, and it names exactly those to be stopped.
    assert_eq!(sorted(moved.clone()), sorted(on_agents), "every run sent is told to stop");
    let mut both: Vec<RunId> = moved.iter().chain(&ended).cloned().collect();
    both.sort();
    both.dedup();
    assert_eq!(both.len(), moved.len() + ended.len(), "no run is both cancelled and sent");
    assert_eq!(both, sorted(all), "every run is one or the other");
    for id in &ended {
        assert_eq!(state(&*store, id).await, RunState::Cancelled);
    }
    for id in &moved {
        assert_eq!(state(&*store, id).await, RunState::Dispatched);
    }
}

pub(crate) async fn concurrent_dispatch_marks_move_each_run_once(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 20).await;
    let mut all = Vec::new();
    for (n, job) in [J1, J2, J3, J4, "00000000000000j5"].into_iter().enumerate() {
        let runs = runs_for(&format!("j{n}r"), &agents);
        all.extend(runs.iter().map(|(r, _)| r.clone()));
        store.create_job(&job_row(job, n as i64), &runs).await.unwrap();
    }
    let tasks: Vec<_> = (0..4)
        .map(|n| {
            let (store, mut ids) = (store.clone(), all.clone());
            if n % 2 == 1 {
                ids.reverse();
            }
            tokio::spawn(async move { store.mark_dispatched(&ids, ts(10 + n)).await.unwrap() })
        })
        .collect();
    let mut moved = Vec::new();
    for t in tasks {
        moved.extend(t.await.unwrap());
    }
    assert_eq!(moved.len(), 100, "each run moved by one call");
    assert_eq!(sorted(moved), sorted(all));
}

pub(crate) async fn approving_a_job_takes_another_token_and_an_open_job(store: Arc<dyn Store>) {
    let waiting = |id: &str| {
        let mut j = job_row(id, 1);
        j.approval = Some(JobApproval { creator_token: "00000000000000ta".into(), approved: None });
        j
    };
    for id in [J1, J3, J4] {
        store.create_job(&waiting(id), &[]).await.unwrap();
    }
    store.create_job(&job_row(J2, 1), &[]).await.unwrap();
    assert!(store.job(J1).await.unwrap().unwrap().awaiting_approval());
    assert!(!store.approve_job(J1, "00000000000000ta", "alice", ts(40)).await.unwrap(), "not by the token that created it");
    assert!(store.job(J1).await.unwrap().unwrap().awaiting_approval());
    assert!(store.approve_job(J1, "00000000000000tb", "bob (00000000000000tb)", ts(50)).await.unwrap());
    let approval = store.job(J1).await.unwrap().unwrap().approval;
    let approved = JobApproval { creator_token: "00000000000000ta".into(), approved: Some(("bob (00000000000000tb)".into(), ts(50))) };
    assert_eq!(approval, Some(approved.clone()));
    assert!(!store.approve_job(J1, "00000000000000tc", "carol", ts(60)).await.unwrap(), "once");
    assert_eq!(store.job(J1).await.unwrap().unwrap().approval, Some(approved));

    assert!(!store.approve_job(J2, "00000000000000tb", "bob", ts(50)).await.unwrap(), "it needs no approval");
    assert_eq!(store.job(J2).await.unwrap().unwrap().approval, None);
    store.cancel_job(J3, ts(30)).await.unwrap();
    assert!(!store.approve_job(J3, "00000000000000tb", "bob", ts(50)).await.unwrap(), "cancelled meanwhile");
    assert!(store.finish_job_if_done(J4, ts(30)).await.unwrap());
    assert!(!store.approve_job(J4, "00000000000000tb", "bob", ts(50)).await.unwrap(), "finished meanwhile");
    assert!(store.job(J3).await.unwrap().unwrap().awaiting_approval());
    assert!(!store.approve_job("00000000000000j9", "00000000000000tb", "bob", ts(50)).await.unwrap());
}
