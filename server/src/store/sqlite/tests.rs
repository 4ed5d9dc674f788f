//! The store's own tests, against a temp-file database; `job_row`, `enrolled` and the other
//! helpers here are also used by the submodules' tests.

use shared::api::{AgentStatus, FleetCounts};
use shared::job::{RunState, Stream};
use shared::protocol::{Metrics, Outcome, RunFinished};
use shared::{AgentId, Labels, Timestamp};

use super::*;

async fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
    (dir, store)
}

pub(super) fn agent(n: u8) -> NewAgent {
    NewAgent {
        id: AgentId::from_bytes([n; 8]),
        secret_hash: vec![n; 32],
        token_labels: Labels::from_pairs(["site=lab"]).unwrap(),
        at: Timestamp::from_unix_millis(1_000),
        approval_pending: false,
    }
}

/// A store holding one enrolled agent.
pub(super) async fn enrolled() -> (tempfile::TempDir, SqliteStore, NewAgent) {
    let (dir, store) = open().await;
    store.insert_enroll_token(&enroll_token(5, 10_000)).await.unwrap();
    let a = agent(1);
    store.enroll_agent("00000000000000aa", &a).await.unwrap();
    (dir, store, a)
}

pub(super) fn enroll_token(uses: u32, expires_at: i64) -> EnrollTokenRow {
    EnrollTokenRow {
        id: "00000000000000aa".into(),
        secret_hash: vec![1; 32],
        created_by: "test".into(),
        created_at: Timestamp::from_unix_millis(0),
        expires_at: Timestamp::from_unix_millis(expires_at),
        uses_total: uses,
        uses_left: uses,
        labels: Labels::new(),
        revoked_at: None,
        approve: false,
    }
}

#[tokio::test]
async fn enrollment_takes_one_use_per_agent_and_stops_at_zero() {
    let (_dir, store) = open().await;
    store.insert_enroll_token(&enroll_token(2, 10_000)).await.unwrap();
    assert!(store.enroll_agent("00000000000000aa", &agent(1)).await.unwrap());
    assert!(store.enroll_agent("00000000000000aa", &agent(2)).await.unwrap());
    assert!(!store.enroll_agent("00000000000000aa", &agent(3)).await.unwrap());
    assert!(store.agent_credential(&agent(3).id).await.unwrap().is_none());
    assert_eq!(store.enroll_token("00000000000000aa").await.unwrap().unwrap().uses_left, 0);
}

#[tokio::test]
async fn an_expired_enrollment_token_enrolls_nobody() {
    let (_dir, store) = open().await;
    store.insert_enroll_token(&enroll_token(5, 500)).await.unwrap();
    assert!(!store.enroll_agent("00000000000000aa", &agent(1)).await.unwrap());
}

#[tokio::test]
async fn a_batch_of_heartbeats_keeps_history_and_the_newest_metrics() {
    let (_dir, store, a) = enrolled().await;
    let hb = |seq: u64, at: i64, cpu: f64| Record::Heartbeat {
        agent_id: a.id.clone(),
        at: Timestamp::from_unix_millis(at),
        seq,
        metrics: Box::new(Metrics { hostname: "h1".into(), cpu_percent: cpu, ..Metrics::default() }),
    };
    let batch: Vec<Record> = (0..1200).map(|i| hb(i, 2_000 + i as i64, i as f64 / 100.0)).collect();
    store.record(&batch).await.unwrap();
    let row = store.agent(&a.id).await.unwrap().unwrap();
    assert_eq!(row.last_heartbeat_at, Some(Timestamp::from_unix_millis(3_199)));
    assert_eq!(row.hostname, "h1");
    assert_eq!(row.last_metrics.unwrap().cpu_percent, 11.99);
    let hist = store.heartbeats(&a.id, Timestamp::from_unix_millis(3_000), None, 1000).await.unwrap();
    assert_eq!(hist.len(), 200);
    assert!(hist.windows(2).all(|w| w[0].at < w[1].at && w[0].seq < w[1].seq));
    // In buckets of 100 ms: 3,000..3,099 and 3,100..3,199, each with its highest figures.
    let step = Some(std::time::Duration::from_millis(100));
    let buckets = store.heartbeats(&a.id, Timestamp::from_unix_millis(3_000), step, 1000).await.unwrap();
    let seen: Vec<(i64, u64, f64)> = buckets.iter().map(|b| (b.at.unix_millis(), b.seq, b.cpu_percent)).collect();
    assert_eq!(seen, [(3_000, 1099, 10.99), (3_100, 1199, 11.99)]);
    assert_eq!(store.prune_heartbeats(Timestamp::from_unix_millis(3_000), 10_000).await.unwrap(), 1000);
}

#[tokio::test]
async fn transitions_set_status_and_restart_marks_the_nodes_agents_offline() {
    let (_dir, store, a) = enrolled().await;
    let at = Timestamp::from_unix_millis(5_000);
    store
        .record(&[
            Record::Connected {
                agent_id: a.id.clone(),
                at,
                hostname: "h".into(),
                labels: Labels::new(),
                heartbeat_interval_ms: 1000,
                agent_version: "0".into(),
                node: "n1".into(),
                remote_addr: "127.0.0.1:1".into(),
                trusted_keys: vec![],
            },
            Record::Transition {
                agent_id: a.id.clone(),
                at,
                from: Some(AgentStatus::Offline),
                to: AgentStatus::Online,
                reason: "connected".into(),
            },
        ])
        .await
        .unwrap();
    assert_eq!(store.fleet_counts().await.unwrap(), FleetCounts { total: 1, online: 1, stale: 0, offline: 0 });
    assert_eq!(store.mark_node_offline("other", at, "restart").await.unwrap(), 0);
    assert_eq!(store.mark_node_offline("n1", at, "restart").await.unwrap(), 1);
    let row = store.agent(&a.id).await.unwrap().unwrap();
    assert_eq!(row.status, AgentStatus::Offline);
    assert!(!row.connected);
    let t = store.transitions(&a.id, 10).await.unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!((t[0].from, t[0].to, t[0].reason.as_str()), (Some(AgentStatus::Online), AgentStatus::Offline, "restart"));
}

pub(super) fn connected(a: &AgentId, at: i64) -> Record {
    Record::Connected {
        agent_id: a.clone(),
        at: Timestamp::from_unix_millis(at),
        hostname: "h".into(),
        labels: Labels::new(),
        heartbeat_interval_ms: 1000,
        agent_version: "0".into(),
        node: "n1".into(),
        remote_addr: "127.0.0.1:1".into(),
        trusted_keys: vec![],
    }
}

#[tokio::test]
async fn connection_records_in_one_batch_apply_in_their_order() {
    let (_dir, store, a) = enrolled().await;
    let gone = Record::Disconnected { agent_id: a.id.clone(), at: Timestamp::from_unix_millis(6_000) };
    store.record(&[connected(&a.id, 5_000), gone.clone()]).await.unwrap();
    let row = store.agent(&a.id).await.unwrap().unwrap();
    assert!(!row.connected && row.disconnected_at == Some(Timestamp::from_unix_millis(6_000)));
    store.record(&[gone, connected(&a.id, 7_000)]).await.unwrap();
    let row = store.agent(&a.id).await.unwrap().unwrap();
    assert!(row.connected && row.disconnected_at.is_none() && row.connected_at == Some(Timestamp::from_unix_millis(7_000)));
}

/// A job created at `created_at` (ms) that runs `true`; also used by the submodules' tests.
pub(super) fn job_row(id: &str, created_at: i64) -> JobRow {
    use shared::job::{CommandSpec, Program, Target};
    JobRow {
        id: id.into(),
        created_at: Timestamp::from_unix_millis(created_at),
        created_by: "t".into(),
        target: Target::All,
        command: CommandSpec {
            program: Program::Argv(vec!["true".into()]),
            cwd: None,
            env: Default::default(),
            secret_env: Default::default(),
        },
        timeout_ms: 1000,
        ttl_ms: 1000,
        concurrency: None,
        max_in_flight: None,
        max_errors: None,
        output_limit: 1 << 20,
        expires_at: Timestamp::from_unix_millis(created_at + 1_000),
        cancelled_at: None,
        finished_at: None,
        signature: None,
        scope: None,
        approval: None,
    }
}

#[tokio::test]
async fn an_agents_runs_are_listed_newest_job_first_with_their_command() {
    let (_dir, store, a) = enrolled().await;
    let other = agent(2);
    store.enroll_agent("00000000000000aa", &other).await.unwrap();
    for (n, id) in ["00000000000000j1", "00000000000000j2", "00000000000000j3"].into_iter().enumerate() {
        let runs = [(format!("r{n}a"), a.id.clone()), (format!("r{n}b"), other.id.clone())];
        store.create_job(&job_row(id, n as i64), &runs).await.unwrap();
    }
    let runs = store.agent_runs(&a.id, 2).await.unwrap();
    let seen: Vec<(&str, &str)> = runs.iter().map(|r| (r.job_id.as_str(), r.run_id.as_str())).collect();
    assert_eq!(seen, [("00000000000000j3", "r2a"), ("00000000000000j2", "r1a")]);
    assert_eq!((runs[0].state, runs[0].command.summary().as_str()), (RunState::Pending, "true"));
    assert!(store.agent_runs(&agent(9).id, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn cancelling_ends_only_runs_never_sent_and_names_the_ones_agents_must_stop() {
    let (_dir, store, a) = enrolled().await;
    let b = agent(2);
    assert!(store.enroll_agent("00000000000000aa", &b).await.unwrap());
    let job = job_row("00000000000000c1", 1);
    store.create_job(&job, &[("r1".into(), a.id.clone()), ("r2".into(), b.id.clone())]).await.unwrap();
    // r1 was marked dispatched (its message may be on the way); r2 was never sent.
    assert_eq!(store.mark_dispatched(&["r1".into()], Timestamp::from_unix_millis(2)).await.unwrap(), vec!["r1".to_string()]);
    let (ended, on_agents) = store.cancel_job(&job.id, Timestamp::from_unix_millis(3)).await.unwrap().unwrap();
    assert_eq!(ended.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["r2"]);
    assert_eq!(on_agents.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["r1"], "a dispatched run is told to stop");
    let state = |id: &'static str| {
        let store = store.clone();
        async move { store.run(id).await.unwrap().unwrap().state }
    };
    assert_eq!(state("r1").await, RunState::Dispatched, "left to its agent, which reports how it ended");
    assert_eq!(state("r2").await, RunState::Cancelled);
    assert!(store.cancel_job("00000000000000c9", Timestamp::from_unix_millis(3)).await.unwrap().is_none());
}

#[tokio::test]
async fn a_result_whose_output_has_a_gap_asks_for_the_rest_before_it_is_stored() {
    let (_dir, store, a) = enrolled().await;
    let job = job_row("00000000000000j1", 1);
    store.create_job(&job, &[("r1".into(), a.id.clone())]).await.unwrap();
    let chunk = |offset: u64, data: &str| Record::RunOutput {
        agent_id: a.id.clone(),
        run_id: "r1".into(),
        stream: Stream::Stdout,
        offset,
        data: data.into(),
    };
    let finish = Record::RunFinished {
        agent_id: a.id.clone(),
        finished: Box::new(RunFinished {
            run_id: "r1".into(),
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            signal: None,
            error: None,
            stdout_len: 9,
            stderr_len: 0,
            stdout_truncated: false,
            stderr_truncated: false,
        }),
        at: Timestamp::from_unix_millis(9),
    };
    // Bytes 3..6 were lost on the way: the server asks for them and keeps the run open.
    let effects = store.record(&[chunk(0, "one"), chunk(6, "ree"), finish.clone()]).await.unwrap();
    assert!(
        effects.contains(&Effect::Resend { agent_id: a.id.clone(), run_id: "r1".into(), stdout_from: 3, stderr_from: 0 }),
        "{effects:?}"
    );
    assert_eq!(store.runs("00000000000000j1").await.unwrap()[0].state, RunState::Pending);
    // The agent resends from 3 (overlapping what is there) and finishes again.
    let effects = store.record(&[chunk(3, "twothree"), finish]).await.unwrap();
    assert!(effects.contains(&Effect::Ack { agent_id: a.id.clone(), run_id: "r1".into() }), "{effects:?}");
    assert_eq!(store.runs("00000000000000j1").await.unwrap()[0].state, RunState::Succeeded);
    // Once the result is stored, the output is settled: later chunks change nothing.
    store.record(&[chunk(11, "forged")]).await.unwrap();
    let out = store.run_output_heads("00000000000000j1", 1 << 20, 1 << 30).await.unwrap();
    assert_eq!(out["r1"].stdout, "onetwothree");
}

#[tokio::test]
async fn output_is_stored_once_within_the_limit_whatever_the_offsets() {
    let (_dir, store, a) = enrolled().await;
    let mut job = job_row("00000000000000j1", 1);
    job.output_limit = 8 * 1024;
    store.create_job(&job, &[("r1".into(), a.id.clone())]).await.unwrap();
    let chunk = |offset: u64, data: &str| Record::RunOutput {
        agent_id: a.id.clone(),
        run_id: "r1".into(),
        stream: Stream::Stdout,
        offset,
        data: data.into(),
    };
    // (0,"ab") then (0,"abcd"): the new tail is stitched on; a differing overlap is refused.
    store.record(&[chunk(0, "ab")]).await.unwrap();
    let effects = store.record(&[chunk(0, "abcd"), chunk(1, "XY")]).await.unwrap();
    assert!(effects.iter().any(|e| matches!(e, Effect::Output { offset: 2, data, .. } if data == "cd")), "{effects:?}");
    let run = store.run("r1").await.unwrap().unwrap();
    assert_eq!(run.stdout_len, 4);
    // The attack: 4 KiB chunks at offsets 4, 5, 6, ... in batches.
    let big = "abcd".repeat(4 * 1024);
    for start in (4..(10 * 1024)).step_by(512) {
        let batch: Vec<Record> = (start..start + 512).map(|o| chunk(o, &big[o as usize..][..4 * 1024])).collect();
        store.record(&batch).await.unwrap();
    }
    let (run, text) = store.run_output("r1", Stream::Stdout, 0, 1 << 20).await.unwrap().unwrap();
    assert_eq!(run.stdout_len, 8 * 1024);
    assert!(run.stdout_truncated);
    assert_eq!(text, big[..8 * 1024]);
    let stored: i64 = sqlx::query_scalar("SELECT SUM(length(data)) FROM run_output").fetch_one(&store.pool).await.unwrap();
    assert_eq!(stored, 8 * 1024, "each byte once, none past the limit");
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM run_output").fetch_one(&store.pool).await.unwrap();
    assert_eq!(rows, 1, "appends extend the last small row instead of adding rows");
    // Pages of the output end where the next begins.
    let (_, page) = store.run_output("r1", Stream::Stdout, 1000, 10).await.unwrap().unwrap();
    assert_eq!(page, big[1000..1010]);
}
