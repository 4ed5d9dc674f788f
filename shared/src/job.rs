//! Jobs and runs: what an operator asks for (`CreateJob`), and what the API reports back.
//! A job has one run per matched agent; each run moves through [`RunState`].

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{AgentId, Selector, Timestamp};

/// Output kept per stream and run, by default. Past it, output is dropped and flagged.
pub const DEFAULT_OUTPUT_LIMIT: u64 = 1024 * 1024;
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_TTL_SECS: u64 = 600;

pub use crate::id::{JobId, RunId};

/// Which agents a job is for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// These agents, by id.
    Agents(Vec<AgentId>),
    /// Every agent whose labels match.
    Selector(Selector),
    /// Every enrolled agent.
    All,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Agents(ids) => {
                let ids: Vec<&str> = ids.iter().map(AgentId::as_str).collect();
                write!(f, "agents {}", ids.join(","))
            }
            Target::Selector(s) => write!(f, "selector {s}"),
            Target::All => f.write_str("all agents"),
        }
    }
}

/// What to run. `argv` runs the program directly, with no shell; `shell` runs `/bin/sh -c`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Program {
    Argv(Vec<String>),
    Shell(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandSpec {
    pub program: Program,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Names in `env` whose values are secret: the API shows them as [`SECRET_SHOWN`] to
    /// everyone, logs never hold them, and the audit log keeps a digest.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub secret_env: std::collections::BTreeSet<String>,
}

/// What a secret variable's value reads as in the API.
pub const SECRET_SHOWN: &str = "(secret)";

impl CommandSpec {
    /// The command as the API shows it: secret values replaced.
    pub fn redacted(&self) -> CommandSpec {
        let mut out = self.clone();
        for name in &self.secret_env {
            if let Some(v) = out.env.get_mut(name) {
                SECRET_SHOWN.clone_into(v);
            }
        }
        out
    }

    /// A short form for tables and logs.
    pub fn summary(&self) -> String {
        match &self.program {
            Program::Argv(a) => a.join(" "),
            Program::Shell(s) => format!("sh -c {s:?}"),
        }
    }
}

/// At most this many runs in flight at once: a number, or a percentage of the matched agents
/// (rounded up, at least 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Concurrency {
    Count(u32),
    Percent(u8),
}

impl Concurrency {
    pub fn resolve(self, matched: usize) -> u32 {
        match self {
            Concurrency::Count(n) => n,
            Concurrency::Percent(p) => ((matched as u64 * u64::from(p)).div_ceil(100)).max(1) as u32,
        }
    }
}

impl std::str::FromStr for Concurrency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || format!("invalid concurrency {s:?}: a number of runs (10) or a percentage of the targets (25%)");
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Ok(Concurrency::Percent(p)),
                _ => Err(err()),
            },
            None => match s.parse::<u32>() {
                Ok(n) if n > 0 => Ok(Concurrency::Count(n)),
                _ => Err(err()),
            },
        }
    }
}

impl fmt::Display for Concurrency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Concurrency::Count(n) => write!(f, "{n}"),
            Concurrency::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Concurrency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u32),
            /// A count written `10.0`: whole, so an integer to JSON Schema too.
            F(f64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string().parse().map_err(serde::de::Error::custom),
            Raw::F(f) if f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&f) => {
                (f as u32).to_string().parse().map_err(serde::de::Error::custom)
            }
            Raw::F(f) => Err(serde::de::Error::custom(format!("invalid concurrency {f}: a whole number of runs or a percentage"))),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `POST /api/v1/jobs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateJob {
    pub target: Target,
    pub command: CommandSpec,
    /// Execution time limit per run. Default 60 s.
    #[serde(default, deserialize_with = "crate::whole::option")]
    pub timeout_secs: Option<u64>,
    /// How long runs wait for agents that are offline. Default 10 min; 0: online agents only.
    #[serde(default, deserialize_with = "crate::whole::option")]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub concurrency: Option<Concurrency>,
    /// Stop dispatching once this many runs have failed; the rest end `skipped`.
    #[serde(default, deserialize_with = "crate::whole::option")]
    pub max_errors: Option<u32>,
    /// Bytes of output kept per stream and run. Default 1 MiB, at most 16 MiB.
    #[serde(default, deserialize_with = "crate::whole::option")]
    pub output_limit: Option<u64>,
    /// Only report what the target matches; create nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// The job's id, chosen by the caller (32 lowercase hex digits: 128 random bits); a signed
    /// job must have one. The API refuses an id it has seen. Default: the server picks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<JobId>,
    /// The operator's signature over the job; the target must then be `agents`, the ids it
    /// was signed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<crate::signing::JobSignature>,
}

/// Where a run is. The first three are in progress; the rest are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Waiting for its agent to be online, or for a concurrency slot.
    Pending,
    /// Sent to the agent, not yet started.
    Dispatched,
    Running,
    /// Exit status 0.
    Succeeded,
    /// Non-zero exit, killed by a signal, or could not start.
    Failed,
    TimedOut,
    Cancelled,
    /// Never delivered before the job's ttl ran out.
    Expired,
    /// Not dispatched because the job reached max_errors.
    Skipped,
    /// The agent came back without it, or did not report within timeout plus a grace.
    /// A result that arrives later replaces it.
    Lost,
}

impl RunState {
    pub const ALL: [RunState; 10] = [
        RunState::Pending,
        RunState::Dispatched,
        RunState::Running,
        RunState::Succeeded,
        RunState::Failed,
        RunState::TimedOut,
        RunState::Cancelled,
        RunState::Expired,
        RunState::Skipped,
        RunState::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::Dispatched => "dispatched",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::TimedOut => "timed_out",
            RunState::Cancelled => "cancelled",
            RunState::Expired => "expired",
            RunState::Skipped => "skipped",
            RunState::Lost => "lost",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, RunState::Pending | RunState::Dispatched | RunState::Running)
    }

    /// The run did not succeed, for a reason the operator did not choose: it failed, timed out,
    /// was lost, or never reached its agent before the job's ttl. One rule for everyone: it
    /// counts toward `max_errors`, makes its job `failed`, and raises `job.failed`. Cancelled
    /// and skipped runs are not failures (an operator, or max_errors, stopped them).
    pub fn is_failure(self) -> bool {
        matches!(self, RunState::Failed | RunState::TimedOut | RunState::Lost | RunState::Expired)
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RunState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunState::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| format!("unknown run state {s:?}"))
    }
}

/// Runs of a job by state; states with no runs are left out.
pub type StateCounts = BTreeMap<RunState, u64>;

/// How many of these runs are failures ([`RunState::is_failure`]).
pub fn failures(counts: &StateCounts) -> u64 {
    counts.iter().filter(|(s, _)| s.is_failure()).map(|(_, n)| n).sum()
}

/// Where a job is, as the API reports it, so no client derives it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a second admin's approval: nothing dispatched.
    AwaitingApproval,
    /// Some runs are not final yet (a cancelled job runs until its agents stop).
    Running,
    /// Every run succeeded.
    Succeeded,
    /// Finished with at least one failure.
    Failed,
    /// Cancelled, and finished without a failure.
    Cancelled,
}

impl JobStatus {
    pub fn of(finished: bool, cancelled: bool, awaiting_approval: bool, counts: &StateCounts) -> JobStatus {
        if !finished {
            return if awaiting_approval && !cancelled { JobStatus::AwaitingApproval } else { JobStatus::Running };
        }
        if failures(counts) > 0 {
            JobStatus::Failed
        } else if cancelled || counts.iter().any(|(s, n)| *n > 0 && *s != RunState::Succeeded) {
            // Skipped runs without a failure cannot happen; cancelled ones mean a cancel.
            JobStatus::Cancelled
        } else {
            JobStatus::Succeeded
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::AwaitingApproval => "awaiting_approval",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: JobId,
    pub created_at: Timestamp,
    pub created_by: String,
    pub target: Target,
    pub command: CommandSpec,
    pub timeout_secs: u64,
    pub ttl_secs: u64,
    pub concurrency: Option<Concurrency>,
    pub max_errors: Option<u32>,
    pub cancelled_at: Option<Timestamp>,
    /// When every run reached a final state.
    pub finished_at: Option<Timestamp>,
    pub total: u64,
    pub counts: StateCounts,
    pub status: JobStatus,
    /// Runs that are failures ([`RunState::is_failure`]).
    pub failed: u64,
    /// The operator key that signed the job, if it is signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<crate::signing::PublicKey>,
    /// Present when the job matched more agents than the server's `approval_above`: nothing is
    /// dispatched until an admin other than its creator approves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
}

/// A second admin's approval of a large job, given or still awaited.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// Who approved it; none while it waits.
    pub approved_by: Option<String>,
    pub approved_at: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub id: RunId,
    pub agent_id: AgentId,
    pub hostname: String,
    pub state: RunState,
    pub exit_code: Option<i32>,
    /// Signal that ended the process, if one did.
    pub signal: Option<i32>,
    /// Why the run failed to start, was lost, or was not run.
    pub error: Option<String>,
    pub dispatched_at: Option<Timestamp>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    /// The head of each stream: at most [`DETAIL_HEAD_BYTES`] in a job's detail (and less once
    /// the detail holds [`DETAIL_TOTAL_BYTES`] of output in all). When `stdout` is shorter than
    /// `stdout_len`, the rest is at `GET /api/v1/runs/{id}/output`.
    pub stdout: String,
    pub stderr: String,
    /// Bytes of each stream the server holds.
    #[serde(default)]
    pub stdout_len: u64,
    #[serde(default)]
    pub stderr_len: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// Output bytes per stream of each run in a job's detail.
pub const DETAIL_HEAD_BYTES: u64 = 64 * 1024;
/// Output bytes in one job's detail, over all its runs.
pub const DETAIL_TOTAL_BYTES: u64 = 8 * 1024 * 1024;
/// Most bytes one `GET /api/v1/runs/{id}/output` returns.
pub const OUTPUT_PAGE_MAX: u64 = 1024 * 1024;

/// `GET /api/v1/runs/{id}/output?stream=&offset=&limit=`: a page of one stream of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputPage {
    pub run_id: RunId,
    pub stream: Stream,
    pub offset: u64,
    /// The bytes from `offset`, ending on a character boundary.
    pub data: String,
    /// Where the next page starts: `offset` plus the length of `data`.
    pub next_offset: u64,
    /// Bytes of the stream the server holds now (more may come while the run is open).
    pub len: u64,
    /// Output past the job's limit was dropped.
    pub truncated: bool,
    /// The run is over and `next_offset` is the end: nothing more will come.
    pub complete: bool,
}

/// `GET /api/v1/jobs/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: JobSummary,
    /// The agents the target resolved to when the job was created.
    pub runs: Vec<RunInfo>,
}

/// The answer to a dry run.
/// One run on one agent, as `GET /api/v1/agents/{id}/runs` lists them (newest job first).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentRun {
    pub job_id: JobId,
    pub run_id: RunId,
    /// When the job was created, and by whom.
    pub created_at: Timestamp,
    pub created_by: String,
    pub command: CommandSpec,
    pub state: RunState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DryRun {
    pub matched: u64,
    pub online: u64,
    /// The job would wait for a second admin's approval (it matches more agents than the
    /// server's `approval_above`).
    #[serde(default)]
    pub needs_approval: bool,
    /// How many of the matched agents run only signed jobs: an unsigned job fails on them.
    #[serde(default)]
    pub require_signature: u64,
    pub agents: Vec<DryRunAgent>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DryRunAgent {
    pub id: AgentId,
    pub hostname: String,
    pub online: bool,
    /// The keys the agent reported trusting (`AgentSummary::trusted_keys`); when any are
    /// listed it runs only a job signed by one of them.
    #[serde(default)]
    pub trusted_keys: Vec<crate::signing::PublicKey>,
}

/// Events on `GET /api/v1/jobs/{id}/events` (server-sent events; the SSE event name is `type`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEvent {
    /// First on every stream: the job as it is now.
    Snapshot(Box<JobDetail>),
    /// A run changed state.
    Run { run_id: RunId, agent_id: AgentId, state: RunState, exit_code: Option<i32>, error: Option<String> },
    /// Output. `offset` is the byte offset of `data` in the run's stream, so a client that
    /// already has those bytes can tell.
    Output { run_id: RunId, agent_id: AgentId, stream: Stream, offset: u64, data: String },
    /// Every run is final; the stream ends after this.
    Finished { counts: StateCounts },
    /// The client fell behind and missed events; fetch the job again.
    Resync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_parses_numbers_and_percentages() {
        assert_eq!("10".parse::<Concurrency>(), Ok(Concurrency::Count(10)));
        assert_eq!("25%".parse::<Concurrency>(), Ok(Concurrency::Percent(25)));
        for bad in ["0", "0%", "101%", "-1", "ten", ""] {
            assert!(bad.parse::<Concurrency>().is_err(), "{bad}");
        }
        assert_eq!(Concurrency::Percent(25).resolve(10), 3);
        assert_eq!(Concurrency::Percent(1).resolve(3), 1);
        assert_eq!(serde_json::from_str::<Concurrency>("5").unwrap(), Concurrency::Count(5));
        assert_eq!(serde_json::from_str::<Concurrency>("5.0").unwrap(), Concurrency::Count(5));
        for bad in ["0", "0.0", "2.5", "-1", "4294967296", "4294967296.0"] {
            assert!(serde_json::from_str::<Concurrency>(bad).is_err(), "{bad}");
        }
        assert_eq!(serde_json::to_string(&Concurrency::Percent(50)).unwrap(), "\"50%\"");
    }

    #[test]
    fn create_job_round_trips_with_each_target() {
        for target in [
            Target::All,
            Target::Selector(Selector::parse("site=paris,!canary").unwrap()),
            Target::Agents(vec![AgentId::parse("0123456789abcdef").unwrap()]),
        ] {
            let job = CreateJob {
                target,
                command: CommandSpec {
                    program: Program::Argv(vec!["uname".into(), "-r".into()]),
                    cwd: None,
                    env: BTreeMap::new(),
                    secret_env: Default::default(),
                },
                timeout_secs: Some(5),
                ttl_secs: Some(0),
                concurrency: Some(Concurrency::Percent(10)),
                max_errors: Some(1),
                output_limit: None,
                dry_run: false,
                id: Some("0123456789abcdef0123456789abcdef".parse().unwrap()),
                signature: None,
            };
            let json = serde_json::to_string(&job).unwrap();
            assert_eq!(serde_json::from_str::<CreateJob>(&json).unwrap(), job, "{json}");
        }
        let all: CreateJob = serde_json::from_str(r#"{"target":"all","command":{"program":{"shell":"uptime"}}}"#).unwrap();
        assert_eq!(all.target, Target::All);
    }

    #[test]
    fn states_know_whether_they_are_final() {
        assert!(!RunState::Dispatched.is_final());
        assert!(RunState::Expired.is_final() && RunState::Expired.is_failure());
        assert!(RunState::TimedOut.is_failure() && !RunState::Cancelled.is_failure() && !RunState::Skipped.is_failure());
        assert_eq!("timed_out".parse::<RunState>(), Ok(RunState::TimedOut));
    }

    #[test]
    fn a_jobs_status_follows_one_rule() {
        let c = |pairs: &[(RunState, u64)]| pairs.iter().copied().collect::<StateCounts>();
        let ok = c(&[(RunState::Succeeded, 3)]);
        assert_eq!(JobStatus::of(true, false, false, &ok), JobStatus::Succeeded);
        assert_eq!(JobStatus::of(false, false, true, &c(&[(RunState::Pending, 3)])), JobStatus::AwaitingApproval);
        assert_eq!(JobStatus::of(false, true, true, &c(&[(RunState::Pending, 3)])), JobStatus::Running);
        let expired = c(&[(RunState::Succeeded, 2), (RunState::Expired, 1)]);
        assert_eq!((JobStatus::of(true, false, false, &expired), failures(&expired)), (JobStatus::Failed, 1));
        let cancelled = c(&[(RunState::Succeeded, 2), (RunState::Cancelled, 1)]);
        assert_eq!(JobStatus::of(true, true, false, &cancelled), JobStatus::Cancelled);
        let both = c(&[(RunState::Failed, 1), (RunState::Cancelled, 1)]);
        assert_eq!(JobStatus::of(true, true, false, &both), JobStatus::Failed);
    }

    #[test]
    fn job_events_round_trip() {
        let e = JobEvent::Output {
            run_id: "00000000000000aa".parse().unwrap(),
            agent_id: AgentId::parse("0123456789abcdef").unwrap(),
            stream: Stream::Stderr,
            offset: 12,
            data: "oops\n".into(),
        };
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains("\"type\":\"output\""));
        assert_eq!(serde_json::from_str::<JobEvent>(&json).unwrap(), e);
    }

    #[test]
    fn a_dry_run_round_trips_with_the_agents_that_require_signatures() {
        let dry = DryRun {
            matched: 2,
            online: 1,
            require_signature: 1,
            needs_approval: true,
            agents: vec![
                DryRunAgent {
                    id: AgentId::parse("0123456789abcdef").unwrap(),
                    hostname: "pos-1".into(),
                    online: true,
                    trusted_keys: vec![crate::signing::PublicKey::from_bytes([7; 32])],
                },
                DryRunAgent {
                    id: AgentId::parse("0123456789abcdee").unwrap(),
                    hostname: "pos-2".into(),
                    online: false,
                    trusted_keys: vec![],
                },
            ],
        };
        let json = serde_json::to_string(&dry).unwrap();
        assert!(json.contains(&format!("\"trusted_keys\":[\"ed25519:{}\"]", "07".repeat(32))), "{json}");
        assert_eq!(serde_json::from_str::<DryRun>(&json).unwrap(), dry);
        let old: DryRun = serde_json::from_str(r#"{"matched":0,"online":0,"agents":[]}"#).unwrap();
        assert_eq!(old.require_signature, 0);
    }

    #[test]
    fn agent_runs_round_trip() {
        let run = AgentRun {
            job_id: "00000000000000ab".parse().unwrap(),
            run_id: "00000000000000aa".parse().unwrap(),
            created_at: Timestamp::from_unix_millis(1_763_776_000_000),
            created_by: "token ci".into(),
            command: CommandSpec {
                program: Program::Shell("uptime".into()),
                cwd: None,
                env: BTreeMap::new(),
                secret_env: Default::default(),
            },
            state: RunState::Failed,
            exit_code: Some(2),
            signal: None,
            error: None,
            started_at: Some(Timestamp::from_unix_millis(1_763_776_000_100)),
            finished_at: Some(Timestamp::from_unix_millis(1_763_776_000_200)),
        };
        let json = serde_json::to_string(&run).unwrap();
        assert_eq!(serde_json::from_str::<AgentRun>(&json).unwrap(), run, "{json}");
    }
}
