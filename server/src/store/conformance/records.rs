//! The recorder's batches (`record`): connections in their order, run progress that only moves
//! forward and only for the run's agent, and results with what they change (`Effect`s): stored
//! once, acked, replacing `lost` and `cancelled`, waiting for their output.

use std::sync::Arc;

use shared::AgentId;
use shared::job::{RunId, RunState, Stream};
use shared::protocol::Outcome;

use super::{chunk, connected, enrolled, finished, fleet, job_row, runs_for, ts};
use crate::store::{Effect, Record, Store};

const JOB: &str = "00000000000000j1";

fn accepted(a: &AgentId, run: &str, at: i64) -> Record {
    Record::RunAccepted { agent_id: a.clone(), run_id: run.parse().unwrap(), at: ts(at) }
}

fn started(a: &AgentId, run: &str, at: i64) -> Record {
    Record::RunStarted { agent_id: a.clone(), run_id: run.parse().unwrap(), at: ts(at) }
}

fn ack(a: &AgentId, run: &str) -> Effect {
    Effect::Ack { agent_id: a.clone(), run_id: run.parse().unwrap() }
}

/// The run states a batch announced, as (run, state).
fn states(effects: &[Effect]) -> Vec<(RunId, RunState)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::RunState { run_id, state, .. } => Some((run_id.clone(), *state)),
            _ => None,
        })
        .collect()
}

pub(crate) async fn connection_records_in_one_batch_apply_in_their_order(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let gone = Record::Disconnected { agent_id: a.id.clone(), at: ts(6_000) };
    store.record(&[connected(&a.id, 5_000), gone.clone()]).await.unwrap();
    let row = store.agent(&a.id).await.unwrap().unwrap();
    assert!(!row.connected && row.disconnected_at == Some(ts(6_000)));
    assert_eq!(row.connected_at, Some(ts(5_000)), "when it last connected stays");
    store.record(&[gone, connected(&a.id, 7_000)]).await.unwrap();
    let row = store.agent(&a.id).await.unwrap().unwrap();
    assert!(row.connected && row.disconnected_at.is_none() && row.connected_at == Some(ts(7_000)));
}

pub(crate) async fn a_connection_stores_what_the_hello_said(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let labels = shared::Labels::from_pairs(["site=lab", "agent.os=debian"]).unwrap();
    let hello = Record::Connected {
        agent_id: a.id.clone(),
        at: ts(5_000),
        hostname: "term-7".into(),
        labels: labels.clone(),
        heartbeat_interval_ms: 15_000,
        agent_version: "1.2.3".into(),
        node: "node-a".into(),
        remote_addr: "192.0.2.7:40000".into(),
        trusted_keys: vec![],
    };
    assert!(store.record(&[hello]).await.unwrap().is_empty(), "a connection announces nothing");
    let row = store.agent(&a.id).await.unwrap().unwrap();
    assert_eq!((row.hostname.as_str(), &row.labels, row.heartbeat_interval_ms), ("term-7", &labels, Some(15_000)));
    assert_eq!((row.agent_version.as_deref(), row.node.as_deref()), (Some("1.2.3"), Some("node-a")));
    assert_eq!((row.remote_addr.as_deref(), row.connected_at, row.connected), (Some("192.0.2.7:40000"), Some(ts(5_000)), true));
    assert_eq!(row.status, shared::api::AgentStatus::Offline, "status changes only by a transition");
    let cred = store.agent_credential(&a.id).await.unwrap().unwrap();
    assert_eq!(cred.token_labels, a.token_labels, "what the agent reports never becomes trusted");
}

pub(crate) async fn run_progress_moves_a_run_forward_only_and_only_for_its_agent(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 3).await;
    let [a, b, c] = [&agents[0].id, &agents[1].id, &agents[2].id];
    store.create_job(&job_row(JOB, 1), &runs_for("r", &agents)).await.unwrap();
    store.mark_dispatched(&["r0".parse().unwrap()], ts(5)).await.unwrap();
    // Another agent cannot move a run.
    assert!(store.record(&[accepted(b, "r0", 8), started(b, "r0", 9)]).await.unwrap().is_empty());
    let r0 = store.run("r0").await.unwrap().unwrap();
    assert_eq!((r0.state, r0.accepted, r0.started_at), (RunState::Dispatched, false, None));

    store.record(&[accepted(a, "r0", 10)]).await.unwrap();
    let r0 = store.run("r0").await.unwrap().unwrap();
    assert_eq!((r0.state, r0.accepted, r0.dispatched_at), (RunState::Dispatched, true, Some(ts(5))));

    let effects = store.record(&[started(a, "r0", 20)]).await.unwrap();
    assert_eq!(
        effects,
        [Effect::RunState {
            job_id: JOB.parse().unwrap(),
            run_id: "r0".parse().unwrap(),
            agent_id: a.clone(),
            state: RunState::Running,
            exit_code: None,
            error: None,
            latency_ms: None,
        }]
    );
    // Repeats, and acceptance after the start, change nothing and announce nothing.
    assert!(store.record(&[started(a, "r0", 30), accepted(a, "r0", 40)]).await.unwrap().is_empty());
    let r0 = store.run("r0").await.unwrap().unwrap();
    assert_eq!((r0.state, r0.started_at), (RunState::Running, Some(ts(20))));

    // A pending run the agent reports accepted was sent to it: it is dispatched now.
    store.record(&[accepted(b, "r1", 50)]).await.unwrap();
    let r1 = store.run("r1").await.unwrap().unwrap();
    assert_eq!((r1.state, r1.accepted, r1.dispatched_at), (RunState::Dispatched, true, Some(ts(50))));
    // A pending run that starts is running, sent when it started.
    assert_eq!(states(&store.record(&[started(c, "r2", 60)]).await.unwrap()), [("r2".parse().unwrap(), RunState::Running)]);
    let r2 = store.run("r2").await.unwrap().unwrap();
    assert_eq!((r2.state, r2.accepted, r2.dispatched_at, r2.started_at), (RunState::Running, true, Some(ts(60)), Some(ts(60))));
    // A final run stays final.
    store.end_runs(&["r1".parse().unwrap()], RunState::Expired, "ttl", ts(70)).await.unwrap();
    assert!(store.record(&[accepted(b, "r1", 80), started(b, "r1", 80)]).await.unwrap().is_empty());
    assert_eq!(store.run("r1").await.unwrap().unwrap().state, RunState::Expired);
    // Unknown runs are ignored.
    assert!(store.record(&[accepted(a, "nope", 90), started(a, "nope", 90)]).await.unwrap().is_empty());
}

pub(crate) async fn a_result_is_stored_once_with_its_state_change_and_acked(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    store.create_job(&job_row(JOB, 1), &[("r1".parse().unwrap(), a.id.clone())]).await.unwrap();
    store.mark_dispatched(&["r1".parse().unwrap()], ts(100)).await.unwrap();
    let mut result = finished(&a.id, "r1", Outcome::Failed, 3, 0, 400);
    if let Record::RunFinished { finished, .. } = &mut result {
        finished.exit_code = Some(2);
        finished.signal = Some(9);
        finished.error = Some("boom".into());
    }
    let effects = store.record(&[started(&a.id, "r1", 150), chunk(&a.id, "r1", Stream::Stdout, 0, "out"), result.clone()]).await.unwrap();
    let state = Effect::RunState {
        job_id: JOB.parse().unwrap(),
        run_id: "r1".parse().unwrap(),
        agent_id: a.id.clone(),
        state: RunState::Failed,
        exit_code: Some(2),
        error: Some("boom".into()),
        latency_ms: Some(300),
    };
    assert!(effects.contains(&state), "{effects:?}");
    assert!(effects.contains(&ack(&a.id, "r1")), "{effects:?}");
    assert_eq!(states(&effects), [("r1".parse().unwrap(), RunState::Failed)], "a start in the result's batch is not announced apart");
    let pos = |e: &Effect| effects.iter().position(|x| x == e);
    assert!(pos(&state) < pos(&ack(&a.id, "r1")), "the ack follows what it acknowledges");

    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!((run.state, run.exit_code, run.signal, run.error.as_deref()), (RunState::Failed, Some(2), Some(9), Some("boom")));
    assert_eq!((run.dispatched_at, run.started_at, run.finished_at), (Some(ts(100)), Some(ts(150)), Some(ts(400))));
    assert_eq!((run.accepted, run.stdout_len, run.stderr_len), (true, 3, 0));

    // The agent did not get the ack and sends the result again: acked again, nothing else.
    assert_eq!(store.record(std::slice::from_ref(&result)).await.unwrap(), [ack(&a.id, "r1")]);
    // Nor does another outcome change a stored result.
    let other = finished(&a.id, "r1", Outcome::Succeeded, 3, 0, 900);
    assert_eq!(store.record(&[other]).await.unwrap(), [ack(&a.id, "r1")]);
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!((run.state, run.finished_at), (RunState::Failed, Some(ts(400))));
}

pub(crate) async fn a_nul_in_an_agents_error_text_is_stored_replaced_and_fails_no_batch(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    store.create_job(&job_row(JOB, 1), &[("r1".parse().unwrap(), a.id.clone())]).await.unwrap();
    store.mark_dispatched(&["r1".parse().unwrap()], ts(100)).await.unwrap();
    let mut result = finished(&a.id, "r1", Outcome::Failed, 0, 0, 400);
    if let Record::RunFinished { finished, .. } = &mut result {
        finished.error = Some("exec: bad\0name".into());
    }
    let effects = store.record(&[result, super::heartbeat(&a.id, 1, 401, "host", 5.0)]).await.expect("the batch is written");
    assert!(effects.contains(&ack(&a.id, "r1")), "{effects:?}");
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!((run.state, run.error.as_deref()), (RunState::Failed, Some("exec: bad\u{FFFD}name")));
    assert_eq!(store.agent(&a.id).await.unwrap().unwrap().last_heartbeat_at, Some(ts(401)), "the rest of the batch landed");
}

pub(crate) async fn a_result_replaces_lost_and_cancelled_but_no_other_final_state(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 4).await;
    let [a, b, c, d] = [&agents[0].id, &agents[1].id, &agents[2].id, &agents[3].id];
    store.create_job(&job_row(JOB, 1), &runs_for("r", &agents)).await.unwrap();
    store.mark_dispatched(&["r0".parse().unwrap(), "r2".parse().unwrap(), "r3".parse().unwrap()], ts(10)).await.unwrap();
    store.end_runs(&["r0".parse().unwrap()], RunState::Lost, "the agent came back without it", ts(20)).await.unwrap();
    store.end_runs(&["r2".parse().unwrap()], RunState::Expired, "ttl", ts(20)).await.unwrap();
    store.end_runs(&["r3".parse().unwrap()], RunState::TimedOut, "no report", ts(20)).await.unwrap();
    // r1 was never sent: cancelling ends it.
    let (ended, _) = store.cancel_job(JOB, ts(25)).await.unwrap().unwrap();
    assert_eq!(super::ids(&ended), ["r1"]);

    let effects = store
        .record(&[
            finished(a, "r0", Outcome::Succeeded, 0, 0, 30),
            finished(b, "r1", Outcome::Failed, 0, 0, 30),
            finished(c, "r2", Outcome::Succeeded, 0, 0, 30),
            finished(d, "r3", Outcome::Succeeded, 0, 0, 30),
        ])
        .await
        .unwrap();
    let mut announced = states(&effects);
    announced.sort();
    assert_eq!(
        announced,
        [("r0".parse().unwrap(), RunState::Succeeded), ("r1".parse().unwrap(), RunState::Failed)],
        "what actually happened wins"
    );
    for (agent, run) in [(a, "r0"), (b, "r1"), (c, "r2"), (d, "r3")] {
        assert!(effects.contains(&ack(agent, run)), "{run} is acked: {effects:?}");
    }
    let state = |id: &'static str| {
        let store = store.clone();
        async move { store.run(id).await.unwrap().unwrap().state }
    };
    assert_eq!(state("r0").await, RunState::Succeeded);
    assert_eq!(state("r1").await, RunState::Failed);
    assert_eq!(state("r2").await, RunState::Expired);
    assert_eq!(state("r3").await, RunState::TimedOut);
    assert_eq!(store.run("r0").await.unwrap().unwrap().finished_at, Some(ts(30)));
}

pub(crate) async fn results_for_unknown_runs_or_other_agents_runs_are_acked_and_change_nothing(store: Arc<dyn Store>) {
    let agents = fleet(&*store, 2).await;
    let [a, b] = [&agents[0].id, &agents[1].id];
    store.create_job(&job_row(JOB, 1), &runs_for("r", &agents)).await.unwrap();
    let effects = store
        .record(&[
            finished(a, "nope", Outcome::Succeeded, 0, 0, 30),
            chunk(a, "r1", Stream::Stdout, 0, "forged"),
            finished(a, "r1", Outcome::Succeeded, 6, 0, 30),
        ])
        .await
        .unwrap();
    assert_eq!(effects, [ack(a, "nope"), ack(a, "r1")], "so the agent forgets them, and nothing is announced");
    let r1 = store.run("r1").await.unwrap().unwrap();
    assert_eq!((r1.state, r1.stdout_len, r1.finished_at), (RunState::Pending, 0, None));
    assert!(store.record(&[finished(b, "r1", Outcome::Succeeded, 0, 0, 40)]).await.unwrap().contains(&ack(b, "r1")));
    assert_eq!(store.run("r1").await.unwrap().unwrap().state, RunState::Succeeded, "its own agent's result is taken");
}

pub(crate) async fn a_result_whose_output_has_a_gap_asks_for_the_rest_before_it_is_stored(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    store.create_job(&job_row(JOB, 1), &[("r1".parse().unwrap(), a.id.clone())]).await.unwrap();
    let out = |offset: u64, data: &str| chunk(&a.id, "r1", Stream::Stdout, offset, data);
    let finish = finished(&a.id, "r1", Outcome::Succeeded, 11, 0, 9);
    // Bytes 3..6 were lost on the way: the server asks for them and keeps the run open.
    let effects = store.record(&[out(0, "one"), out(6, "ree"), finish.clone()]).await.unwrap();
    assert!(
        effects.contains(&Effect::Resend { agent_id: a.id.clone(), run_id: "r1".parse().unwrap(), stdout_from: 3, stderr_from: 0 }),
        "{effects:?}"
    );
    assert!(!effects.contains(&ack(&a.id, "r1")), "no ack before the result is stored: {effects:?}");
    assert!(states(&effects).is_empty());
    assert_eq!(store.runs(JOB).await.unwrap()[0].state, RunState::Pending);
    // The agent resends from 3 (overlapping what is there) and finishes again.
    let effects = store.record(&[out(3, "twothree"), finish]).await.unwrap();
    assert!(effects.contains(&ack(&a.id, "r1")), "{effects:?}");
    assert_eq!(store.runs(JOB).await.unwrap()[0].state, RunState::Succeeded);
    // Once the result is stored, the output is settled: later chunks change nothing.
    assert!(store.record(&[out(11, "forged")]).await.unwrap().is_empty());
    let heads = store.run_output_heads(JOB, 1 << 20, 1 << 30).await.unwrap();
    assert_eq!(heads["r1"].stdout, "onetwothree");
    assert_eq!(store.run("r1").await.unwrap().unwrap().stdout_len, 11);
}

pub(crate) async fn a_result_waits_only_for_the_output_kept_within_the_limit(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    let mut job = job_row(JOB, 1);
    job.output_limit = 8;
    store.create_job(&job, &[("r1".parse().unwrap(), a.id.clone())]).await.unwrap();
    // The server keeps 8 of the 10 bytes and drops the rest: stdout is complete. Of stderr
    // it has nothing yet.
    store.record(&[chunk(&a.id, "r1", Stream::Stdout, 0, "0123456789")]).await.unwrap();
    let finish = finished(&a.id, "r1", Outcome::Succeeded, 10, 2, 50);
    let effects = store.record(std::slice::from_ref(&finish)).await.unwrap();
    assert_eq!(effects, [Effect::Resend { agent_id: a.id.clone(), run_id: "r1".parse().unwrap(), stdout_from: 8, stderr_from: 0 }]);
    let effects = store.record(&[chunk(&a.id, "r1", Stream::Stderr, 0, "e!"), finish]).await.unwrap();
    assert!(effects.contains(&ack(&a.id, "r1")), "{effects:?}");
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!((run.state, run.stdout_len, run.stdout_truncated), (RunState::Succeeded, 8, true));
    assert_eq!((run.stderr_len, run.stderr_truncated), (2, false));
    let (_, text) = store.run_output("r1", Stream::Stdout, 0, 100).await.unwrap().unwrap();
    assert_eq!(text, "01234567");

    // The agent's own truncation is kept, and so is reporting more than the limit: the
    // server holds exactly the limit here, without having dropped a byte itself.
    store.create_job(&job_row("00000000000000j2", 2), &[("r2".parse().unwrap(), a.id.clone())]).await.unwrap();
    let mut j3 = job_row("00000000000000j3", 3);
    j3.output_limit = 4;
    store.create_job(&j3, &[("r3".parse().unwrap(), a.id.clone())]).await.unwrap();
    let mut cut = finished(&a.id, "r2", Outcome::Succeeded, 2, 0, 60);
    if let Record::RunFinished { finished, .. } = &mut cut {
        finished.stdout_truncated = true;
    }
    store
        .record(&[
            chunk(&a.id, "r2", Stream::Stdout, 0, "ok"),
            cut,
            chunk(&a.id, "r3", Stream::Stdout, 0, "four"),
            finished(&a.id, "r3", Outcome::Succeeded, 9, 0, 60),
        ])
        .await
        .unwrap();
    let r2 = store.run("r2").await.unwrap().unwrap();
    assert_eq!((r2.state, r2.stdout_len, r2.stdout_truncated), (RunState::Succeeded, 2, true));
    let r3 = store.run("r3").await.unwrap().unwrap();
    assert_eq!((r3.state, r3.stdout_len, r3.stdout_truncated), (RunState::Succeeded, 4, true));
}

pub(crate) async fn concurrent_results_for_one_run_store_it_once(store: Arc<dyn Store>) {
    let a = enrolled(&*store).await;
    store.create_job(&job_row(JOB, 1), &[("r1".parse().unwrap(), a.id.clone())]).await.unwrap();
    store.mark_dispatched(&["r1".parse().unwrap()], ts(10)).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|n| {
            let (store, id) = (store.clone(), a.id.clone());
            let outcome = if n % 2 == 0 { Outcome::Succeeded } else { Outcome::Failed };
            tokio::spawn(async move { store.record(&[finished(&id, "r1", outcome, 0, 0, 100 + n)]).await.unwrap() })
        })
        .collect();
    let mut announced = Vec::new();
    for t in tasks {
        let effects = t.await.unwrap();
        assert!(effects.contains(&ack(&a.id, "r1")), "every copy is acked: {effects:?}");
        announced.extend(states(&effects));
    }
    assert_eq!(announced.len(), 1, "one result is stored and announced: {announced:?}");
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!(run.state, announced[0].1, "the stored result is the announced one");
}
