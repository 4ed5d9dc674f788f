//! The agent's one typed configuration: defaults, then a TOML file, then `MUSTER_*`
//! environment variables, then flags. Validated before anything connects.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser};
use serde::Deserialize;
use shared::Labels;

use crate::policy::{Policy, PolicyFile};

/// muster-agent: reports this terminal's health to a Muster server and runs its commands.
#[derive(Debug, Parser)]
#[command(name = "muster-agent", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Connect to the server and serve it (the default).
    Run,
    /// Check the config, the credential, and that the server is reachable, trusted and accepts
    /// this agent. Prints what is wrong in one line and exits non-zero.
    Check,
    /// Install as a service (as root): config, CA, state directory, enrollment, systemd unit.
    /// Safe to run again.
    Install(crate::install::InstallArgs),
    /// Remove the service; with --purge, also the agent's identity and state.
    Uninstall(crate::install::UninstallArgs),
}

#[derive(Debug, Default, Args)]
pub struct Settings {
    /// TOML config file. [default: /etc/muster/agent.toml if it exists]
    #[arg(long, global = true, env = "MUSTER_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Server URL: https://host:port (or wss://host:port).
    #[arg(long, global = true, env = "MUSTER_SERVER")]
    pub server: Option<String>,
    /// CA certificate (PEM) to trust for the server. Without it, the system's roots are used.
    #[arg(long, global = true, env = "MUSTER_CA")]
    pub ca: Option<PathBuf>,
    /// Where the agent keeps its credential. [default: /var/lib/muster-agent]
    #[arg(long, global = true, env = "MUSTER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Enrollment token, used once when the agent has no credential yet. A flag's value shows
    /// in the process list and shell history: prefer --enroll-token-file.
    #[arg(long, global = true, env = "MUSTER_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// Read the enrollment token from this file (one line), or from standard input with `-`.
    #[arg(long, global = true, env = "MUSTER_ENROLL_TOKEN_FILE", conflicts_with = "enroll_token")]
    pub enroll_token_file: Option<PathBuf>,
    /// The name this agent reports, instead of the machine's host name (containers, clones).
    #[arg(long, global = true, env = "MUSTER_HOSTNAME")]
    pub hostname: Option<String>,
    /// A label, key=value; repeat for more. Labels from the enrollment token win on conflict.
    #[arg(long = "label", env = "MUSTER_LABELS", value_delimiter = ',', global = true)]
    pub labels: Vec<String>,
    /// Time between heartbeats (±10% jitter). [default: 10s]
    #[arg(long, global = true, env = "MUSTER_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// First reconnect delay. [default: 1s]
    #[arg(long, global = true, env = "MUSTER_BACKOFF_INITIAL", value_parser = parse_duration)]
    pub backoff_initial: Option<Duration>,
    /// Longest reconnect delay. [default: 60s]
    #[arg(long, global = true, env = "MUSTER_BACKOFF_MAX", value_parser = parse_duration)]
    pub backoff_max: Option<Duration>,
    /// Commands run at once; more wait their turn. [default: 8]
    #[arg(long, global = true, env = "MUSTER_MAX_RUNS")]
    pub max_runs: Option<usize>,
    /// Run commands as this unprivileged user (`user` or `user:group`), with a clean
    /// environment. [default: the agent's own user]
    #[arg(long, global = true, env = "MUSTER_RUN_AS")]
    pub run_as: Option<String>,
    /// Log filter. [default: info]
    #[arg(long, global = true, env = "MUSTER_LOG")]
    pub log: Option<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    shared::duration::parse(s).map_err(|e| e.to_string())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    server: Option<String>,
    ca: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    enroll_token: Option<String>,
    enroll_token_file: Option<PathBuf>,
    hostname: Option<String>,
    labels: Option<Labels>,
    heartbeat_interval: Option<String>,
    backoff_initial: Option<String>,
    backoff_max: Option<String>,
    max_runs: Option<usize>,
    log: Option<String>,
    run_as: Option<String>,
    policy: Option<PolicyFile>,
    #[serde(default)]
    trusted_keys: Vec<String>,
    credential_rotation: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The agents' WebSocket endpoint, derived from the server URL.
    pub connect_url: String,
    pub server: String,
    pub ca: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub enroll_token: Option<EnrollToken>,
    /// Reported instead of the machine's host name when set.
    pub hostname: Option<String>,
    pub labels: Labels,
    pub heartbeat_interval: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub max_runs: usize,
    pub log: String,
    /// What this agent agrees to run, from its own config only.
    pub policy: Arc<Policy>,
    /// Operator keys whose signatures this agent requires; empty: unsigned jobs run.
    pub trusted_keys: Vec<shared::signing::PublicKey>,
    /// How old the agent's credential may get before it asks the server for a new one; `None`
    /// (`credential_rotation = "off"`) never asks. [default: 30 days]
    pub credential_rotation: Option<Duration>,
}

/// The default `credential_rotation`.
pub const DEFAULT_CREDENTIAL_ROTATION: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

pub const DEFAULT_CONFIG: &str = "/etc/muster/agent.toml";

impl Config {
    pub fn resolve(s: &Settings) -> Result<Config, ConfigError> {
        let file = match &s.config {
            Some(path) => read_file(path)?,
            None if Path::new(DEFAULT_CONFIG).exists() => read_file(Path::new(DEFAULT_CONFIG))?,
            None => FileSettings::default(),
        };
        let invalid = |m: String| ConfigError::Invalid(m);
        let dur = |flag: Option<Duration>, file: &Option<String>, key: &str, default: Duration| match (flag, file) {
            (Some(d), _) => Ok(d),
            (None, Some(v)) => shared::duration::parse(v).map_err(|e| invalid(format!("{key}: {e}"))),
            (None, None) => Ok(default),
        };
        let enroll_token = enroll_token(s, &file)?;
        let server = s
            .server
            .clone()
            .or(file.server)
            .ok_or_else(|| invalid("no server: set --server, MUSTER_SERVER or `server` in the config file".into()))?;
        let mut labels = file.labels.unwrap_or_default();
        let flag_labels = Labels::from_pairs(s.labels.iter().filter(|l| !l.is_empty())).map_err(|e| invalid(e.to_string()))?;
        labels = labels.overlaid_with(&flag_labels);
        let config = Config {
            connect_url: connect_url(&server).map_err(invalid)?,
            server,
            ca: s.ca.clone().or(file.ca),
            state_dir: s.state_dir.clone().or(file.state_dir).unwrap_or_else(|| PathBuf::from("/var/lib/muster-agent")),
            enroll_token,
            hostname: s.hostname.clone().or(file.hostname).filter(|h| !h.is_empty()),
            labels,
            heartbeat_interval: dur(s.heartbeat_interval, &file.heartbeat_interval, "heartbeat_interval", Duration::from_secs(10))?,
            backoff_initial: dur(s.backoff_initial, &file.backoff_initial, "backoff_initial", Duration::from_secs(1))?,
            backoff_max: dur(s.backoff_max, &file.backoff_max, "backoff_max", Duration::from_secs(60))?,
            max_runs: s.max_runs.or(file.max_runs).unwrap_or(8),
            log: s.log.clone().or(file.log).unwrap_or_else(|| "info".into()),
            trusted_keys: file
                .trusted_keys
                .iter()
                .map(|k| shared::signing::PublicKey::parse(k).map_err(|e| invalid(format!("trusted_keys: {k:?}: {e}"))))
                .collect::<Result<_, _>>()?,
            credential_rotation: match file.credential_rotation.as_deref() {
                None => Some(DEFAULT_CREDENTIAL_ROTATION),
                Some("off") => None,
                Some(v) => match shared::duration::parse(v) {
                    Ok(d) if !d.is_zero() => Some(d),
                    _ => return Err(invalid(format!("credential_rotation: {v:?} is not a duration (30d, 12h) or \"off\""))),
                },
            },
            policy: Arc::new(
                Policy::from_file(file.policy, s.run_as.as_deref().or(file.run_as.as_deref()).filter(|r| !r.is_empty()))
                    .map_err(invalid)?,
            ),
        };
        if let Some(h) = &config.hostname
            && (h.len() > 255 || h.chars().any(char::is_control))
        {
            return Err(invalid(format!("hostname {h:?} must be at most 255 bytes, with no control characters")));
        }
        if !(1..=256).contains(&config.max_runs) {
            return Err(invalid("max_runs must be between 1 and 256".into()));
        }
        if !(Duration::from_millis(200)..=Duration::from_secs(3600)).contains(&config.heartbeat_interval) {
            return Err(invalid("heartbeat_interval must be between 200ms and 1h".into()));
        }
        if config.backoff_initial.is_zero() || config.backoff_initial > config.backoff_max {
            return Err(invalid("backoff_initial must be positive and no larger than backoff_max".into()));
        }
        if config.backoff_max > Duration::from_secs(3600) {
            return Err(invalid("backoff_max must be at most 1h: an agent that waits longer is an agent nobody can reach".into()));
        }
        Ok(config)
    }
}

/// An enrollment token as configured: its value, or a file that is read when the token is
/// needed, so that an agent already enrolled no longer needs the file. Its `Debug` shows no
/// secret.
#[derive(Clone)]
pub enum EnrollToken {
    Value(String),
    File(PathBuf),
}

impl std::fmt::Debug for EnrollToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnrollToken::Value(_) => f.write_str("EnrollToken(given)"),
            EnrollToken::File(p) => write!(f, "EnrollToken(file {})", p.display()),
        }
    }
}

impl EnrollToken {
    pub fn read(&self) -> Result<String, String> {
        match self {
            EnrollToken::Value(t) => Ok(t.clone()),
            EnrollToken::File(path) => std::fs::File::open(path)
                .map_err(shared::secret::SecretError::from)
                .and_then(shared::secret::read)
                .map_err(|e| format!("enrollment token file {}: {e}", path.display())),
        }
    }
}

/// The enrollment token: flags and environment first, then the config file; in each, a value
/// or a file. Standard input (`-`, from the command line or the environment only) is read
/// now, since it can be read only once.
fn enroll_token(s: &Settings, file: &FileSettings) -> Result<Option<EnrollToken>, ConfigError> {
    if let Some(t) = s.enroll_token.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(EnrollToken::Value(t.clone())));
    }
    match &s.enroll_token_file {
        Some(path) if path.as_os_str() == shared::secret::STDIN => {
            let token = shared::secret::read(std::io::stdin().lock())
                .map_err(|e| ConfigError::Invalid(format!("the enrollment token on standard input: {e}")))?;
            return Ok(Some(EnrollToken::Value(token)));
        }
        Some(path) => return Ok(Some(EnrollToken::File(path.clone()))),
        None => {}
    }
    match (&file.enroll_token, &file.enroll_token_file) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid("the config file gives both enroll_token and enroll_token_file".into())),
        (Some(t), None) => Ok(Some(t.clone()).filter(|t| !t.is_empty()).map(EnrollToken::Value)),
        (None, Some(path)) if path.as_os_str() == shared::secret::STDIN => {
            Err(ConfigError::Invalid("enroll_token_file in a config file must be a file, not `-`".into()))
        }
        (None, Some(path)) => Ok(Some(EnrollToken::File(path.clone()))),
        (None, None) => Ok(None),
    }
}

/// `https://host:port[/]` or `wss://...` → `wss://host:port/api/v1/agent/connect`.
pub fn connect_url(server: &str) -> Result<String, String> {
    let rest = server
        .strip_prefix("https://")
        .or_else(|| server.strip_prefix("wss://"))
        .ok_or_else(|| format!("server URL {server:?} must start with https:// (TLS is always on)"))?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || authority.contains('?') || authority.contains('@') {
        return Err(format!("server URL {server:?} must be https://host[:port] with no path"));
    }
    Ok(format!("wss://{authority}{}", shared::protocol::CONNECT_PATH))
}

fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.message().to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_become_the_connect_endpoint() {
        assert_eq!(connect_url("https://muster.example:8443").unwrap(), "wss://muster.example:8443/api/v1/agent/connect");
        assert_eq!(connect_url("wss://127.0.0.1:8443/").unwrap(), "wss://127.0.0.1:8443/api/v1/agent/connect");
        assert!(connect_url("http://muster.example").is_err());
        assert!(connect_url("https://muster.example/other").is_err());
    }

    #[test]
    fn flag_labels_overlay_file_labels_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "server = \"https://h:1\"\nlabels = { site = \"lab\", role = \"pos\" }\n").unwrap();
        let s = Settings { config: Some(path.clone()), labels: vec!["site=paris".into()], ..Settings::default() };
        assert_eq!(Config::resolve(&s).unwrap().labels.to_string(), "role=pos,site=paris");
        let s = Settings { config: Some(path), labels: vec!["bad label".into()], ..Settings::default() };
        assert!(Config::resolve(&s).is_err());
    }

    #[test]
    fn a_hostname_override_is_taken_from_a_flag_or_the_file_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "server = \"https://h:1\"\nhostname = \"kiosk-7\"\n").unwrap();
        let s = Settings { config: Some(path.clone()), ..Settings::default() };
        assert_eq!(Config::resolve(&s).unwrap().hostname.as_deref(), Some("kiosk-7"));
        let s = Settings { config: Some(path.clone()), hostname: Some("pos-1".into()), ..Settings::default() };
        assert_eq!(Config::resolve(&s).unwrap().hostname.as_deref(), Some("pos-1"));
        let s = Settings { config: Some(path), hostname: Some("bad\nname".into()), ..Settings::default() };
        assert!(Config::resolve(&s).unwrap_err().to_string().contains("control characters"));
    }

    #[test]
    fn the_enrollment_token_can_come_from_a_file_read_only_when_needed() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "mse_0123456789abcdef_x\n").unwrap();
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, format!("server = \"https://h:1\"\nenroll_token_file = {:?}\n", token.to_str().unwrap())).unwrap();
        let s = Settings { config: Some(config.clone()), ..Settings::default() };
        let resolved = Config::resolve(&s).unwrap().enroll_token.unwrap();
        assert_eq!(resolved.read().unwrap(), "mse_0123456789abcdef_x");
        assert!(!format!("{resolved:?}").contains("mse_"), "Debug shows no secret");
        // A missing file is an error only when the token is read: an enrolled agent needs none.
        std::fs::remove_file(&token).unwrap();
        let resolved = Config::resolve(&s).unwrap().enroll_token.unwrap();
        assert!(resolved.read().unwrap_err().contains(token.to_str().unwrap()));
        // A flag wins over the file, as everywhere.
        let s = Settings { config: Some(config), enroll_token: Some("mse_flag".into()), ..Settings::default() };
        assert_eq!(Config::resolve(&s).unwrap().enroll_token.unwrap().read().unwrap(), "mse_flag");

        let both = dir.path().join("both.toml");
        std::fs::write(&both, "server = \"https://h:1\"\nenroll_token = \"a\"\nenroll_token_file = \"/t\"\n").unwrap();
        assert!(Config::resolve(&Settings { config: Some(both), ..Settings::default() }).is_err());
        let stdin = dir.path().join("stdin.toml");
        std::fs::write(&stdin, "server = \"https://h:1\"\nenroll_token_file = \"-\"\n").unwrap();
        assert!(Config::resolve(&Settings { config: Some(stdin), ..Settings::default() }).is_err());
        assert!(Cli::try_parse_from(["muster-agent", "--enroll-token", "a", "--enroll-token-file", "b"]).is_err());
    }

    #[test]
    fn a_missing_server_is_a_clear_error() {
        let err = Config::resolve(&Settings { config: Some("/dev/null".into()), ..Settings::default() }).unwrap_err();
        assert!(err.to_string().contains("no server"), "{err}");
    }
}
