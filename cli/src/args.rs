//! The command line, parsed and validated into typed values before any request is sent.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use shared::api::{AgentStatus, Role};
use shared::job::Concurrency;
use shared::{AgentId, Selector};

/// muster: watch a fleet of terminals and manage access to it.
#[derive(Debug, Parser)]
#[command(name = "muster", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub conn: Connection,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Connection {
    /// Server URL, https://host:port.
    #[arg(long, env = "MUSTER_SERVER", global = true)]
    pub server: Option<String>,
    /// Operator token. A flag's value shows in the process list and shell history: prefer
    /// --token-file or MUSTER_TOKEN.
    #[arg(long, env = "MUSTER_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Read the operator token from this file (one line), or from standard input with `-`.
    #[arg(long, env = "MUSTER_TOKEN_FILE", global = true, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for the server; without it, the system's roots.
    #[arg(long, env = "MUSTER_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Operator signing key (from `muster key generate`); `muster run` signs jobs with it.
    /// [default: ~/.config/muster/signing.key if it exists]
    #[arg(long, env = "MUSTER_SIGNING_KEY", global = true)]
    pub signing_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List agents with their status and latest health.
    Agents(AgentsArgs),
    /// Show one agent, relabel it (`muster agent ID label site=lyon canary-`), or revoke it.
    Agent(AgentArgs),
    /// Counts of agents by status.
    Fleet {
        #[arg(long)]
        json: bool,
    },
    /// Enrollment tokens, which let new agents join.
    #[command(subcommand)]
    EnrollToken(EnrollTokenCommand),
    /// Operator tokens, for people and scripts.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Show the token in use: its name and role.
    Whoami,
    /// Run a command on one agent, a labelled group, or all of them, and show the results.
    Run(RunArgs),
    /// List recent jobs.
    Jobs {
        /// How many, newest first.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Follow the fleet's changes live: status changes, enrollments, jobs. Ctrl-C stops.
    Watch {
        /// One JSON event per line.
        #[arg(long)]
        json: bool,
    },
    /// Show one job and its runs, or cancel it.
    #[command(args_conflicts_with_subcommands = true)]
    Job(JobArgs),
    /// Operator signing keys: agents with `trusted_keys` run only jobs signed by one.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Read the audit log (admin), or check its hash chain.
    #[command(args_conflicts_with_subcommands = true)]
    Audit(AuditArgs),
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write a new ed25519 key pair (private key 0600, never sent anywhere) and print its
    /// public key, for agents' `trusted_keys`.
    Generate {
        /// Where to write it. [default: --signing-key, or ~/.config/muster/signing.key]
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace a key that is already there.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of the signing key.
    Show,
    /// Revoke a key on every agent that trusts the signing key: the server delivers the
    /// revocation, signed here, and agents keep it.
    Revoke {
        /// The key to revoke, ed25519:<hex>.
        key: shared::signing::PublicKey,
    },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only entries since this: a duration back from now (1h, 7d) or an RFC 3339 time.
    #[arg(long, value_parser = parse_time_or_duration)]
    pub since: Option<String>,
    /// Only entries before this: a duration back from now or an RFC 3339 time.
    #[arg(long, value_parser = parse_time_or_duration)]
    pub until: Option<String>,
    /// Only entries by this actor: its whole name or its token id.
    #[arg(long)]
    pub actor: Option<String>,
    /// Only this action (token.create), or a family of them (token).
    #[arg(long)]
    pub action: Option<String>,
    /// Only entries about this target (a token, agent or job id).
    #[arg(long)]
    pub target: Option<String>,
    /// How many entries, newest first.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub limit: u32,
    /// One JSON entry per line, with its hashes.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub action_command: Option<AuditAction>,
}

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Fetch the whole audit log and check every entry's hash and every link of the chain.
    /// Prints the head (the newest entry's id and hash); exits 1 saying where it broke.
    Verify {
        /// A head hash recorded earlier (elsewhere): fail unless that entry is still in the
        /// chain, so that entries removed from the end are noticed too.
        #[arg(long, value_parser = parse_hash)]
        head: Option<String>,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["agents", "label", "all"])))]
pub struct RunArgs {
    /// Run on this agent (by id); repeat for more.
    #[arg(long = "agent")]
    pub agents: Vec<AgentId>,
    /// Run on every agent matching this label selector.
    #[arg(long, short = 'l')]
    pub label: Option<Selector>,
    /// Run on every agent.
    #[arg(long)]
    pub all: bool,
    /// Run the words after `--` as one /bin/sh script instead of a program and its arguments.
    #[arg(long)]
    pub shell: bool,
    /// Set an environment variable for the command, NAME=VALUE; repeat for more.
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Set a secret variable, NAME=VALUE: the API shows it to no one, logs never hold it, and
    /// the audit log keeps a digest. NAME=@FILE reads the value from a file (one line), which
    /// keeps it out of shell history and the process list.
    #[arg(long = "secret-env", value_parser = parse_secret_env)]
    pub secret_env: Vec<(String, String)>,
    /// Stop a run that takes longer than this. [default: 60s]
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// How long to wait for agents that are offline; 0 for online agents only. [default: 10m]
    #[arg(long, value_parser = parse_duration_or_zero)]
    pub ttl: Option<Duration>,
    /// At most this many runs at once: a number (10) or a percentage of the targets (25%).
    #[arg(long)]
    pub concurrency: Option<Concurrency>,
    /// Stop starting new runs once this many have failed.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_errors: Option<u32>,
    /// Show which agents the target matches, and how many are online; run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the job id and return at once.
    #[arg(long)]
    pub detach: bool,
    /// Do not sign the job, even with a signing key configured.
    #[arg(long)]
    pub no_sign: bool,
    /// Print the finished job as JSON instead of live output.
    #[arg(long)]
    pub json: bool,
    /// The command: `-- uname -r`, or with --shell `-- 'df -h / | tail -1'`.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job's id.
    pub id: Option<String>,
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub action: Option<JobAction>,
}

#[derive(Debug, Subcommand)]
pub enum JobAction {
    /// Cancel a job: runs not started are cancelled, running ones are stopped.
    Cancel { id: String },
    /// Approve a job that waits for a second admin (it matched more agents than the server's
    /// approval_above). The admin who created it cannot.
    Approve { id: String },
}

#[derive(Debug, Args)]
pub struct AgentsArgs {
    /// Only agents with this status: online, stale or offline.
    #[arg(long)]
    pub status: Option<AgentStatus>,
    /// Only agents matching this label selector, e.g. 'site=paris,role in (pos,kiosk),!canary'.
    #[arg(long, short = 'l')]
    pub label: Option<Selector>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The agent's id.
    pub id: Option<AgentId>,
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub action: Option<AgentAction>,
}

#[derive(Debug, Subcommand)]
pub enum AgentAction {
    /// Revoke the agent's credential and disconnect it. It must enroll again to come back.
    Revoke { id: AgentId },
    /// Accept an agent that enrolled with an `--approve` token: until then it gets no runs.
    Accept { id: AgentId },
    /// Rotate the agent's credential now (or when it next connects). The old one stops working
    /// once the agent has stored the new one; a copy presented later is reported as a clone.
    Rotate { id: AgentId },
    /// Set (key=value) or remove (key-) the agent's labels, the ones targeting uses:
    /// `muster agent ID label site=lyon canary-`.
    Label {
        #[arg(required = true, value_parser = parse_label_change)]
        changes: Vec<LabelChange>,
    },
}

/// One change of `muster agent ID label`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelChange {
    Set(String, String),
    Remove(String),
}

fn parse_label_change(s: &str) -> Result<LabelChange, String> {
    if let Some(key) = s.strip_suffix('-')
        && !s.contains('=')
    {
        shared::labels::validate_key(key).map_err(|e| e.to_string())?;
        return Ok(LabelChange::Remove(key.to_owned()));
    }
    let (k, v) = shared::Labels::parse_pair(s).map_err(|e| format!("{e} (or key- to remove a label)"))?;
    Ok(LabelChange::Set(k, v))
}

#[derive(Debug, Subcommand)]
pub enum EnrollTokenCommand {
    /// Create an enrollment token; it is shown only once.
    Create {
        /// How long the token works, e.g. 30m, 24h, 7d. [default: the server's, 24h]
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// How many agents may enroll with it. [default: the server's, 10]
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        uses: Option<u32>,
        /// A label every agent enrolled with it gets (key=value); repeat for more.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Agents enrolled with it wait as pending, sent no runs, until an admin accepts each
        /// one (`muster agent accept ID`).
        #[arg(long)]
        approve: bool,
        /// Also print a ready-to-paste `muster-agent install` line, with the server's CA pinned
        /// by fingerprint (from --ca / MUSTER_CA).
        #[arg(long)]
        install_command: bool,
        #[arg(long)]
        json: bool,
    },
    /// List enrollment tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an enrollment token so no more agents can use it.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an operator token; it is shown only once.
    Create {
        /// A name for the token: who or what uses it.
        #[arg(long)]
        name: String,
        /// viewer (read), operator (also run commands) or admin (also manage tokens and agents).
        #[arg(long, default_value = "viewer")]
        role: Role,
        /// Expire after this long; without it the token lasts until revoked.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Only the agents this label selector matches (site=paris): the token sees and
        /// targets no others. A scoped token's new tokens keep its scope's every term.
        #[arg(long)]
        scope: Option<shared::Selector>,
        #[arg(long)]
        json: bool,
    },
    /// List operator tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an operator token.
    Revoke { id: String },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = shared::duration::parse(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    shared::duration::parse(s).map_err(|e| e.to_string())
}

fn parse_time_or_duration(s: &str) -> Result<String, String> {
    if shared::Timestamp::parse_rfc3339(s).is_ok() || shared::duration::parse(s).is_ok() {
        Ok(s.to_owned())
    } else {
        Err("expected a duration back from now (1h, 7d) or an RFC 3339 time (2026-12-01T09:00:00Z)".into())
    }
}

fn parse_hash(s: &str) -> Result<String, String> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_prefix("sha256:").unwrap_or(&s).to_owned();
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) { Ok(s) } else { Err("expected 64 hex digits (an entry's hash)".into()) }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    shared::Labels::parse_pair(s).map_err(|e| e.to_string())
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

fn parse_secret_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = parse_env(s)?;
    match v.strip_prefix('@') {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{k}: {path}: {e}"))?;
            Ok((k, text.trim_end_matches(['\r', '\n']).to_owned()))
        }
        None => Ok((k, v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn label_changes_parse_like_kubectl() {
        let cli = Cli::try_parse_from(["muster", "agent", "0123456789abcdef", "label", "site=lyon", "canary-"]).unwrap();
        let Command::Agent(AgentArgs { id: Some(_), action: Some(AgentAction::Label { changes }), .. }) = cli.command else {
            panic!("not a label command")
        };
        assert_eq!(changes, vec![LabelChange::Set("site".into(), "lyon".into()), LabelChange::Remove("canary".into())]);
    }

    #[test]
    fn bad_arguments_are_refused_before_any_request() {
        for args in [
            vec!["muster", "agents", "--status", "up"],
            vec!["muster", "agents", "--label", "role in (pos"],
            vec!["muster", "agent", "not-an-id"],
            vec!["muster", "enroll-token", "create", "--ttl", "soon"],
            vec!["muster", "enroll-token", "create", "--uses", "0"],
            vec!["muster", "enroll-token", "create", "--label", "no-equals"],
            vec!["muster", "token", "create", "--name", "x", "--role", "root"],
            vec!["muster", "run", "--", "uptime"],
            vec!["muster", "run", "--all", "--agent", "0123456789abcdef", "--", "uptime"],
            vec!["muster", "run", "--all"],
            vec!["muster", "run", "--all", "--concurrency", "0", "--", "uptime"],
            vec!["muster", "run", "--all", "--max-errors", "0", "--", "uptime"],
            vec!["muster", "audit", "--since", "last tuesday"],
            vec!["muster", "audit", "--limit", "0"],
            vec!["muster", "audit", "verify", "--head", "abc"],
            vec!["muster", "agent", "0123456789abcdef", "label"],
            vec!["muster", "agent", "0123456789abcdef", "label", "no-equals-or-dash"],
            vec!["muster", "agent", "0123456789abcdef", "label", "bad key=v"],
            vec!["muster", "token", "create", "--name", "x", "--scope", "site in (paris"],
        ] {
            assert!(Cli::try_parse_from(&args).is_err(), "{args:?} should be refused");
        }
    }

    #[test]
    fn run_takes_a_target_options_and_the_command_after_the_double_dash() {
        let cli =
            Cli::try_parse_from(["muster", "run", "-l", "role=pos", "--concurrency", "25%", "--ttl", "0", "--", "uname", "-r"]).unwrap();
        let Command::Run(r) = cli.command else { panic!("run") };
        assert_eq!(r.command, ["uname", "-r"]);
        assert_eq!(r.concurrency, Some(Concurrency::Percent(25)));
        assert_eq!(r.ttl, Some(Duration::ZERO));
    }

    #[test]
    fn agent_shows_by_id_or_revokes() {
        let cli = Cli::try_parse_from(["muster", "agent", "0123456789abcdef"]).unwrap();
        assert!(matches!(cli.command, Command::Agent(AgentArgs { id: Some(_), action: None, .. })));
        let cli = Cli::try_parse_from(["muster", "agent", "revoke", "0123456789abcdef"]).unwrap();
        assert!(matches!(cli.command, Command::Agent(AgentArgs { action: Some(AgentAction::Revoke { .. }), .. })));
    }
}
