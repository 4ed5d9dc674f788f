//! The job model's rules for a run, written once and tested without a database. Every store
//! backend fetches what a rule needs, calls it, and applies what it decides: no backend
//! decides anything itself. The output rule (how chunks stitch by offset) is [`crate::output`].
//!
//! - **Progress only moves forward:** `run_accepted` and `run_started` move a run that is
//!   [`takes_progress`] (pending or dispatched) and nothing else, and only for its own agent.
//! - **A result settles a run once:** [`settle`] stores the first result of a run that is open,
//!   or one that replaces a verdict the server reached without the agent (`lost`, `cancelled`):
//!   what actually happened wins. A result for a run already settled, unknown, or of another
//!   agent is not stored, and the agent is told it may forget the run.
//! - **Output first:** a result is stored only when the server holds all the output the agent
//!   reported (up to the job's limit); otherwise the agent is asked to send again from what
//!   is held, and the result waits.
//! - **Ending runs:** cancel, expiry, loss and skipping end only runs that are still open
//!   ([`RunState::is_final`] is false).

use shared::AgentId;
use shared::job::RunState;
use shared::protocol::{Outcome, RunFinished};

use crate::output::{self, Held};

/// The run's state as it results from an outcome the agent reported.
pub fn result_state(outcome: Outcome) -> RunState {
    match outcome {
        Outcome::Succeeded => RunState::Succeeded,
        Outcome::Failed => RunState::Failed,
        Outcome::TimedOut => RunState::TimedOut,
        Outcome::Cancelled => RunState::Cancelled,
        Outcome::Lost => RunState::Lost,
    }
}

/// A final state the server reached without hearing from the agent, which the agent's own
/// result replaces when it arrives.
pub fn replaceable(state: RunState) -> bool {
    matches!(state, RunState::Lost | RunState::Cancelled)
}

/// The run can still take a result (and output): it is open, or its verdict is replaceable.
pub fn takes_result(state: RunState) -> bool {
    !state.is_final() || replaceable(state)
}

/// `run_accepted`/`run_started` may move the run: it has not started or ended yet.
pub fn takes_progress(state: RunState) -> bool {
    matches!(state, RunState::Pending | RunState::Dispatched)
}

/// States as an SQL list, `('a', 'b')`, for a backend's guards: the rule stays here even where
/// the store applies it in a statement.
pub fn sql_states(keep: impl Fn(RunState) -> bool) -> String {
    let names: Vec<String> = RunState::ALL.into_iter().filter(|s| keep(*s)).map(|s| format!("'{}'", s.as_str())).collect();
    format!("({})", names.join(", "))
}

/// What the store holds of a run that a result names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRun {
    pub agent_id: AgentId,
    pub state: RunState,
    pub output_limit: u64,
    /// Milliseconds since the epoch.
    pub dispatched_at: Option<i64>,
    /// Stdout, stderr.
    pub held: [Held; 2],
}

/// What to do with one `run_finished`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Store nothing; tell the agent it may forget the run.
    Forget(Forget),
    /// Store nothing yet: ask for the output from what is held. No ack: the agent keeps the
    /// result and reports it again after sending.
    Resend { stdout_from: u64, stderr_from: u64 },
    /// Store the result, then ack it.
    Store(StoredResult),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forget {
    UnknownRun,
    /// The run belongs to another agent: a peer cannot settle someone else's run.
    NotOwner,
    /// Already settled by an earlier result (a repeat after a reconnect).
    Settled,
}

/// The columns a stored result sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResult {
    pub state: RunState,
    /// Bytes kept of each stream: all the agent reported, or what the server held when it
    /// cut the stream at the limit.
    pub stdout_len: u64,
    pub stderr_len: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Since the run was dispatched.
    pub latency_ms: Option<u64>,
}

/// The rule for a result: `stored` is the run as the store holds it (None if unknown), `at`
/// when the result arrived (milliseconds since the epoch).
pub fn settle(stored: Option<&StoredRun>, agent: &AgentId, f: &RunFinished, at: i64) -> Settlement {
    let Some(run) = stored else { return Settlement::Forget(Forget::UnknownRun) };
    if run.agent_id != *agent {
        return Settlement::Forget(Forget::NotOwner);
    }
    if !takes_result(run.state) {
        return Settlement::Forget(Forget::Settled);
    }
    let [out, err] = run.held;
    let limit = run.output_limit;
    if !output::complete(out, f.stdout_len, limit) || !output::complete(err, f.stderr_len, limit) {
        return Settlement::Resend { stdout_from: out.len, stderr_from: err.len };
    }
    Settlement::Store(StoredResult {
        state: result_state(f.outcome),
        stdout_len: f.stdout_len.min(out.len),
        stderr_len: f.stderr_len.min(err.len),
        stdout_truncated: f.stdout_truncated || out.truncated || f.stdout_len > limit,
        stderr_truncated: f.stderr_truncated || err.truncated || f.stderr_len > limit,
        latency_ms: run.dispatched_at.map(|d| u64::try_from(at - d).unwrap_or(0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(outcome: Outcome, stdout_len: u64, stderr_len: u64) -> RunFinished {
        RunFinished {
            run_id: "r1".parse().unwrap(),
            outcome,
            exit_code: Some(0),
            signal: None,
            error: None,
            stdout_len,
            stderr_len,
            stdout_truncated: false,
            stderr_truncated: false,
        }
    }

    fn stored(state: RunState, out: u64, err: u64) -> StoredRun {
        StoredRun {
            agent_id: AgentId::from_bytes([1; 8]),
            state,
            output_limit: 100,
            dispatched_at: Some(1_000),
            held: [Held { len: out, truncated: false }, Held { len: err, truncated: false }],
        }
    }

    fn me() -> AgentId {
        AgentId::from_bytes([1; 8])
    }

    #[test]
    fn a_result_with_all_its_output_is_stored_with_its_latency() {
        let s = settle(Some(&stored(RunState::Running, 5, 2)), &me(), &finished(Outcome::Failed, 5, 2), 1_250);
        assert_eq!(
            s,
            Settlement::Store(StoredResult {
                state: RunState::Failed,
                stdout_len: 5,
                stderr_len: 2,
                stdout_truncated: false,
                stderr_truncated: false,
                latency_ms: Some(250),
            })
        );
    }

    #[test]
    fn missing_output_asks_for_it_from_what_is_held_and_stores_nothing() {
        let s = settle(Some(&stored(RunState::Running, 3, 2)), &me(), &finished(Outcome::Succeeded, 5, 2), 2_000);
        assert_eq!(s, Settlement::Resend { stdout_from: 3, stderr_from: 2 });
    }

    #[test]
    fn output_past_the_limit_is_not_waited_for_and_marks_the_stream_truncated() {
        let s = settle(Some(&stored(RunState::Running, 100, 0)), &me(), &finished(Outcome::Succeeded, 500, 0), 2_000);
        let Settlement::Store(r) = s else { panic!("{s:?}") };
        assert_eq!((r.stdout_len, r.stdout_truncated, r.stderr_truncated), (100, true, false));
    }

    #[test]
    fn a_result_replaces_lost_and_cancelled_but_never_a_stored_result() {
        for state in [RunState::Lost, RunState::Cancelled, RunState::Pending, RunState::Dispatched] {
            let s = settle(Some(&stored(state, 0, 0)), &me(), &finished(Outcome::Succeeded, 0, 0), 2_000);
            assert!(matches!(s, Settlement::Store(StoredResult { state: RunState::Succeeded, .. })), "{state}: {s:?}");
        }
        for state in [RunState::Succeeded, RunState::Failed, RunState::TimedOut, RunState::Expired, RunState::Skipped] {
            let s = settle(Some(&stored(state, 0, 0)), &me(), &finished(Outcome::Failed, 0, 0), 2_000);
            assert_eq!(s, Settlement::Forget(Forget::Settled), "{state}");
        }
    }

    #[test]
    fn another_agents_run_or_an_unknown_one_is_forgotten_unstored() {
        let other = AgentId::from_bytes([2; 8]);
        let f = finished(Outcome::Succeeded, 0, 0);
        assert_eq!(settle(Some(&stored(RunState::Running, 0, 0)), &other, &f, 1), Settlement::Forget(Forget::NotOwner));
        assert_eq!(settle(None, &me(), &f, 1), Settlement::Forget(Forget::UnknownRun));
    }

    #[test]
    fn progress_moves_only_runs_not_yet_started_and_sql_lists_follow_the_rules() {
        assert_eq!(sql_states(takes_progress), "('pending', 'dispatched')");
        assert_eq!(sql_states(|s| !s.is_final()), "('pending', 'dispatched', 'running')");
        assert_eq!(sql_states(|s| !takes_result(s)), "('succeeded', 'failed', 'timed_out', 'expired', 'skipped')");
    }
}
