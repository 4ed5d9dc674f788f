//! One conformance suite for [`Store`]: what every backend must do, written once against the
//! trait and run once per backend, each check on a fresh, empty store.
//!
//! A check is an `async fn name(store: Arc<dyn Store>)` in one of the submodules (by concern, as
//! the SQLite store is split) that uses nothing but the trait. `checks!` lists them all and
//! makes each a `#[tokio::test]`; `backend!` makes one module of those tests per backend, with
//! how to open its store. What only one backend can show (SQLite's files and PRAGMAs, rows changed
//! behind the store's back) stays in that backend's own tests, which call the fixtures here.
//!
//! Fixtures: [`agent`], [`enroll_token`], [`enrolled`], [`fleet`], [`job_row`], and records
//! ([`connected`], [`chunk`], [`finished`], [`transition`], [`heartbeat`]).

use shared::api::AgentStatus;
use shared::job::{RunId, Stream};
use shared::protocol::{Metrics, Outcome, RunFinished};
use shared::{AgentId, Labels, Timestamp};

use super::{EnrollTokenRow, JobRow, NewAgent, OpenRun, Record, Store};

pub(crate) mod agents;
pub(crate) mod audit;
pub(crate) mod identity;
pub(crate) mod jobs;
pub(crate) mod output;
pub(crate) mod records;
pub(crate) mod tokens;

/// Every check, each made a `#[tokio::test]` named after it that opens a store with `$open`
/// (an `async fn` in scope returning what must outlive the store, and the store).
macro_rules! checks {
    ($open:ident) => {
        checks!(@each $open;
            tokens::operator_tokens_are_stored_listed_in_creation_order_touched_and_revoked_once,
            tokens::enrollment_tokens_are_stored_listed_and_revoked_once,
            tokens::enrollment_takes_one_use_per_agent_and_stops_at_zero,
            tokens::an_expired_enrollment_token_enrolls_nobody,
            tokens::enrolling_creates_an_offline_agent_with_the_tokens_labels_and_its_approval,
            tokens::an_agent_id_enrolled_twice_takes_no_second_use,
            tokens::concurrent_enrollments_take_exactly_the_tokens_uses,
            tokens::concurrent_enrollments_of_one_agent_take_one_use,
            agents::agents_are_listed_by_hostname_then_id_and_filtered_by_status,
            agents::targets_leave_out_revoked_agents_and_say_which_wait_for_approval,
            agents::transitions_are_read_newest_first_within_the_limit,
            agents::a_batch_of_heartbeats_keeps_history_and_the_newest_metrics,
            agents::the_newest_heartbeat_sets_the_latest_metrics_whatever_the_order_in_the_batch,
            agents::pruning_heartbeats_takes_at_most_max_rows_and_only_older_ones,
            agents::transitions_set_status_and_restart_marks_the_nodes_agents_offline,
            agents::marking_a_node_offline_changes_only_its_agents_that_were_not_offline_already,
            agents::fleet_counts_leave_out_revoked_agents,
            agents::revoking_an_agent_works_once_and_keeps_its_row,
            agents::an_unknown_agent_has_no_row_credential_runs_or_history,
            records::connection_records_in_one_batch_apply_in_their_order,
            records::a_connection_stores_what_the_hello_said,
            records::run_progress_moves_a_run_forward_only_and_only_for_its_agent,
            records::a_result_is_stored_once_with_its_state_change_and_acked,
            records::a_nul_in_an_agents_error_text_is_stored_replaced_and_fails_no_batch,
            records::a_result_replaces_lost_and_cancelled_but_no_other_final_state,
            records::results_for_unknown_runs_or_other_agents_runs_are_acked_and_change_nothing,
            records::a_result_whose_output_has_a_gap_asks_for_the_rest_before_it_is_stored,
            records::a_result_waits_only_for_the_output_kept_within_the_limit,
            records::concurrent_results_for_one_run_store_it_once,
            output::output_is_stored_once_within_the_limit_whatever_the_offsets,
            output::output_chunks_are_stitched_by_offset_through_repeats_overlaps_and_gaps,
            output::output_is_cut_at_the_limit_on_a_character_boundary,
            output::output_is_refused_for_unknown_runs_other_agents_and_settled_results,
            output::output_heads_give_each_stream_its_head_within_the_total,
            output::output_pages_end_on_a_character_boundary_and_the_next_begins_there,
            jobs::a_job_is_stored_with_everything_it_was_created_with,
            jobs::a_job_id_chosen_twice_is_a_duplicate_and_changes_nothing,
            jobs::a_job_that_cannot_store_all_its_runs_stores_nothing,
            jobs::a_large_job_keeps_its_runs_in_dispatch_order,
            jobs::jobs_are_listed_newest_first_within_the_limit_and_active_ones_oldest_first,
            jobs::run_counts_and_state_totals_count_runs_by_state,
            jobs::an_agents_runs_are_listed_newest_job_first_with_their_command,
            jobs::pending_runs_come_in_dispatch_order_and_marking_returns_only_the_runs_that_moved,
            jobs::ending_runs_changes_only_open_ones_and_returns_them,
            jobs::redelivery_takes_back_only_dispatched_runs_the_agent_never_accepted,
            jobs::an_agents_open_runs_are_its_pending_dispatched_and_running_ones,
            jobs::a_run_is_overdue_once_its_timeout_and_grace_have_passed,
            jobs::a_job_finishes_once_every_run_is_final,
            jobs::cancelling_ends_only_runs_never_sent_and_names_the_ones_agents_must_stop,
            jobs::a_finished_job_is_never_marked_cancelled,
            jobs::cancelling_while_runs_are_marked_never_both_ends_and_sends_a_run,
            jobs::concurrent_dispatch_marks_move_each_run_once,
            jobs::approving_a_job_takes_another_token_and_an_open_job,
            audit::the_chain_begins_with_a_genesis_and_each_entry_links_to_the_one_before,
            audit::filters_and_pages_read_newest_first,
            audit::pruning_removes_the_oldest_entries_and_the_chain_still_verifies,
            audit::twenty_appends_at_once_form_one_linear_chain,
            audit::retention_removes_old_finished_jobs_with_their_runs_and_output_and_keeps_open_ones,
            audit::retention_takes_at_most_max_jobs_the_longest_finished_first,
            identity::a_rotation_replaces_the_credential_only_once_confirmed_and_keeps_the_old_one_retired,
            identity::a_second_issue_within_the_gap_is_refused_and_a_later_one_replaces_the_pending_credential,
            identity::only_the_newest_retired_credentials_are_kept,
            identity::revoked_and_unknown_agents_are_not_rotated,
            identity::a_requested_rotation_is_flagged_until_a_rotation_completes,
            identity::a_clone_sighting_is_kept_on_the_agent,
            identity::accepting_an_agent_works_once,
            identity::concurrent_rotations_within_the_gap_let_exactly_one_through,
            identity::labels_change_only_if_the_trusted_ones_are_still_as_expected,
            identity::concurrent_label_edits_let_exactly_one_win,
            identity::the_keys_an_agent_reports_are_kept_until_it_reports_others,
            identity::a_signed_job_keeps_the_agents_it_was_signed_for,
            identity::a_key_is_revoked_once_and_revocations_are_listed_in_order,
        );
    };
    (@each $open:ident; $($module:ident :: $check:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                let (_backend, store) = $open().await;
                $crate::store::conformance::$module::$check(store).await;
            }
        )+
    };
}

/// One module of tests per backend: how to open a fresh store, then every check.
macro_rules! backend {
    (sqlite) => {
        mod sqlite {
            /// A file in a temporary directory, as the server keeps it.
            async fn open() -> (tempfile::TempDir, std::sync::Arc<dyn $crate::store::Store>) {
                let dir = tempfile::tempdir().unwrap();
                let store = $crate::store::SqliteStore::open(&dir.path().join("conformance.db")).await.unwrap();
                (dir, std::sync::Arc::new(store))
            }
            checks!(open);
        }
    };
    (postgres) => {
        mod postgres {
            /// A fresh database in a private cluster (testdb), which lives as long as the store.
            async fn open() -> (testdb::Cluster, std::sync::Arc<dyn $crate::store::Store>) {
                let cluster = testdb::Cluster::start();
                let url = cluster.fresh_database();
                let store = $crate::store::PostgresStore::open(&url).await.unwrap();
                (cluster, std::sync::Arc::new(store))
            }
            checks!(open);
        }
    };
}

backend!(sqlite);
backend!(postgres);

/// The enrollment token [`enroll_token`] makes.
pub(crate) const TOKEN: &str = "00000000000000aa";

pub(crate) fn ts(ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(ms)
}

/// Agent `n`: id `nnnn...` (hex), secret hash `[n; 32]`, the token label `site=lab`, at 1 s.
pub(crate) fn agent(n: u8) -> NewAgent {
    NewAgent {
        id: AgentId::from_bytes([n; 8]),
        secret_hash: vec![n; 32],
        token_labels: Labels::from_pairs(["site=lab"]).unwrap(),
        at: ts(1_000),
        approval_pending: false,
    }
}

/// [`TOKEN`] with `uses` uses, created at 0 and expiring at `expires_at` (ms).
pub(crate) fn enroll_token(uses: u32, expires_at: i64) -> EnrollTokenRow {
    EnrollTokenRow {
        id: TOKEN.into(),
        secret_hash: vec![1; 32],
        created_by: "test".into(),
        created_at: ts(0),
        expires_at: ts(expires_at),
        uses_total: uses,
        uses_left: uses,
        labels: Labels::new(),
        revoked_at: None,
        approve: false,
    }
}

/// Agent 1, enrolled with [`TOKEN`] (5 uses, so 4 are left for [`enroll`]).
pub(crate) async fn enrolled(store: &dyn Store) -> NewAgent {
    store.insert_enroll_token(&enroll_token(5, 10_000)).await.unwrap();
    enroll(store, 1).await
}

/// Agent `n`, enrolled with [`TOKEN`], which must exist and have a use left.
pub(crate) async fn enroll(store: &dyn Store, n: u8) -> NewAgent {
    let a = agent(n);
    assert!(store.enroll_agent(TOKEN, &a).await.unwrap(), "agent {n} enrolls");
    a
}

/// Agents 1 to `n`, enrolled with [`TOKEN`] (which has `n` + 4 uses).
pub(crate) async fn fleet(store: &dyn Store, n: u8) -> Vec<NewAgent> {
    store.insert_enroll_token(&enroll_token(u32::from(n) + 4, 10_000)).await.unwrap();
    let mut agents = Vec::new();
    for i in 1..=n {
        agents.push(enroll(store, i).await);
    }
    agents
}

/// A `hello` from agent `a` at `at` (ms) on node `n1`, hostname `h`, no labels or keys.
pub(crate) fn connected(a: &AgentId, at: i64) -> Record {
    Record::Connected {
        agent_id: a.clone(),
        at: ts(at),
        hostname: "h".into(),
        labels: Labels::new(),
        heartbeat_interval_ms: 1000,
        agent_version: "0".into(),
        node: "n1".into(),
        remote_addr: "127.0.0.1:1".into(),
        trusted_keys: vec![],
    }
}

pub(crate) fn transition(a: &AgentId, at: i64, from: Option<AgentStatus>, to: AgentStatus, reason: &str) -> Record {
    Record::Transition { agent_id: a.clone(), at: ts(at), from, to, reason: reason.into() }
}

/// A heartbeat whose metrics say `hostname` and `cpu` percent.
pub(crate) fn heartbeat(a: &AgentId, seq: u64, at: i64, hostname: &str, cpu: f64) -> Record {
    Record::Heartbeat {
        agent_id: a.clone(),
        at: ts(at),
        seq,
        metrics: Box::new(Metrics { hostname: hostname.into(), cpu_percent: cpu, ..Metrics::default() }),
    }
}

/// A job created at `created_at` (ms) that runs `true`, for every agent, with no options.
pub(crate) fn job_row(id: &str, created_at: i64) -> JobRow {
    use shared::job::{CommandSpec, Program, Target};
    JobRow {
        id: id.parse().unwrap(),
        created_at: ts(created_at),
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
        expires_at: ts(created_at + 1_000),
        cancelled_at: None,
        finished_at: None,
        signature: None,
        scope: None,
        approval: None,
    }
}

/// Output of `run` from agent `a`.
pub(crate) fn chunk(a: &AgentId, run: &str, stream: Stream, offset: u64, data: &str) -> Record {
    Record::RunOutput { agent_id: a.clone(), run_id: run.parse().unwrap(), stream, offset, data: data.into() }
}

/// A result of `run` from agent `a`: `outcome`, with the stream lengths the agent kept.
pub(crate) fn finished(a: &AgentId, run: &str, outcome: Outcome, stdout_len: u64, stderr_len: u64, at: i64) -> Record {
    Record::RunFinished {
        agent_id: a.clone(),
        finished: Box::new(RunFinished {
            run_id: run.parse().unwrap(),
            outcome,
            exit_code: matches!(outcome, Outcome::Succeeded).then_some(0),
            signal: None,
            error: None,
            stdout_len,
            stderr_len,
            stdout_truncated: false,
            stderr_truncated: false,
        }),
        at: ts(at),
    }
}

/// The ids of open runs, in the order given.
pub(crate) fn ids(runs: &[OpenRun]) -> Vec<&str> {
    runs.iter().map(|r| r.id.as_str()).collect()
}

/// Run ids in a stable order, for answers whose order the trait leaves open.
pub(crate) fn sorted(mut ids: Vec<RunId>) -> Vec<RunId> {
    ids.sort();
    ids
}

/// Run ids `prefix0`, `prefix1`, ... for `agents`, one each.
pub(crate) fn runs_for(prefix: &str, agents: &[NewAgent]) -> Vec<(RunId, AgentId)> {
    agents.iter().enumerate().map(|(i, a)| (format!("{prefix}{i}").parse().unwrap(), a.id.clone())).collect()
}
