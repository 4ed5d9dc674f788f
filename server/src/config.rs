//! The server's one typed configuration: defaults, then a TOML file, then `MUSTER_*`
//! environment variables, then flags. Everything is validated here, before any I/O starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

/// muster-server: terminates wss for agents and HTTPS for operators on one port.
#[derive(Debug, Parser)]
#[command(name = "muster-server", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,

    /// Development mode: generated certificate, an admin token, and a local agent enrolled and
    /// connected. Writes `<data-dir>/dev.env` for the `muster` CLI.
    #[arg(long, global = true, global = true)]
    pub dev: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve agents and operators (the default).
    Serve,
    /// Check the config, the TLS identity, the data directory and the database, changing
    /// nothing. Prints what is wrong in one line and exits non-zero.
    Check,
    /// Copy this server's SQLite database (in the data directory), history included, into an
    /// empty PostgreSQL database, to move to a cluster without losing anything. Stop the
    /// server first; then start it (or the cluster's nodes) with `--database` set to the same
    /// URL.
    MigrateDb {
        /// The PostgreSQL database to copy into: `postgres://USER@HOST:PORT/DB`.
        #[arg(long)]
        to: String,
        /// Read the PostgreSQL password from this file (one line), not from the URL.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Create an admin token directly in the database and print it once. Needs write access to
    /// the data directory, which is the root of trust; works while the server runs.
    Bootstrap {
        /// Name recorded for the token and in the audit log.
        #[arg(long, default_value = "bootstrap")]
        name: String,
    },
}

/// Settings that may come from flags, the environment or the config file.
#[derive(Debug, Default, Args)]
pub struct Settings {
    /// TOML config file. Values in it are overridden by environment variables and flags.
    #[arg(long, global = true, env = "MUSTER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address and port for agents (wss) and operators (HTTPS). [default: 127.0.0.1:8443]
    #[arg(long, global = true, env = "MUSTER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database, generated certificates and dev files. [default: ./muster-data]
    #[arg(long, global = true, env = "MUSTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Server certificate chain (PEM). Without it, one is generated into the data directory.
    #[arg(long, global = true, env = "MUSTER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key for --tls-cert (PEM).
    #[arg(long, global = true, env = "MUSTER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Extra DNS names or IP addresses for the generated certificate (localhost, 127.0.0.1 and ::1
    /// are always included). Comma separated. The generated CA may vouch for these names only:
    /// names added later need a new CA.
    #[arg(long, global = true, env = "MUSTER_TLS_HOSTNAMES", value_delimiter = ',')]
    pub tls_hostnames: Option<Vec<String>>,
    /// The PostgreSQL database several servers share, as a URL: `postgres://USER@HOST:PORT/DB`,
    /// with libpq's parameters (`sslmode=verify-full`, `sslrootcert=...`) in its query. Without
    /// it, SQLite in the data directory. A password in it shows in the process list: prefer
    /// --database-password-file.
    #[arg(long, global = true, env = "MUSTER_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// Read the PostgreSQL password from this file (one line).
    #[arg(long, global = true, env = "MUSTER_DATABASE_PASSWORD_FILE")]
    pub database_password_file: Option<PathBuf>,
    /// Name of this server process among several sharing a database. [default: local]
    #[arg(long, global = true, env = "MUSTER_NODE_ID")]
    pub node_id: Option<String>,
    /// How often the server pings each agent. [default: 15s]
    #[arg(long, global = true, env = "MUSTER_PING_INTERVAL", value_parser = parse_duration)]
    pub ping_interval: Option<Duration>,
    /// How long heartbeat history is kept. [default: 7d]
    #[arg(long, global = true, env = "MUSTER_HEARTBEAT_RETENTION", value_parser = parse_duration)]
    pub heartbeat_retention: Option<Duration>,
    /// How long finished jobs, their runs and output are kept after they finished (open jobs
    /// are kept however old). [default: 30d]
    #[arg(long, global = true, env = "MUSTER_JOB_RETENTION", value_parser = parse_duration)]
    pub job_retention: Option<Duration>,
    /// How long audit log entries are kept. [default: 365d]
    #[arg(long, global = true, env = "MUSTER_AUDIT_RETENTION", value_parser = parse_duration)]
    pub audit_retention: Option<Duration>,
    /// Also append each audit entry, with its hash, as one JSON line to this file (created
    /// 0600), after it is committed to the database: a copy to ship elsewhere.
    #[arg(long, global = true, env = "MUSTER_AUDIT_FILE")]
    pub audit_file: Option<PathBuf>,
    /// A job that matches more agents than this waits, undispatched, until an admin other
    /// than the one who created it approves it (`muster job approve ID`). [default: off]
    #[arg(long, global = true, env = "MUSTER_APPROVAL_ABOVE")]
    pub approval_above: Option<u64>,
    /// How often liveness is evaluated. [default: 1s]
    #[arg(long, global = true, env = "MUSTER_SWEEP_INTERVAL", value_parser = parse_duration)]
    pub sweep_interval: Option<Duration>,
    /// URL that gets a signed JSON POST when an agent goes offline or stale or recovers, and
    /// when a job fails. Repeat (or comma-separate) for more. https:// unless
    /// --webhook-allow-http. Never logged whole: it may hold a secret of its own.
    #[arg(long = "webhook", env = "MUSTER_WEBHOOKS", value_delimiter = ',', hide_env_values = true)]
    pub webhooks: Option<Vec<String>>,
    /// Allow http:// webhook URLs, whose alerts (and signatures) cross the network readable
    /// by anyone on the way.
    #[arg(long, global = true, env = "MUSTER_WEBHOOK_ALLOW_HTTP")]
    pub webhook_allow_http: bool,
    /// Follow redirects from webhook receivers (at most 5, never from https to http unless
    /// --webhook-allow-http). Without it a redirect is a failed delivery.
    #[arg(long, global = true, env = "MUSTER_WEBHOOK_ALLOW_REDIRECTS")]
    pub webhook_allow_redirects: bool,
    /// Secret for the webhooks' HMAC-SHA256 signature header (X-Muster-Signature). A flag's
    /// value shows in the process list: prefer --webhook-secret-file.
    #[arg(long, global = true, env = "MUSTER_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Read the webhook secret from this file (one line), or from standard input with `-`.
    #[arg(long, global = true, env = "MUSTER_WEBHOOK_SECRET_FILE", conflicts_with = "webhook_secret")]
    pub webhook_secret_file: Option<PathBuf>,
    /// After an alert about an agent, further problem alerts about it wait this long. [default: 5m]
    #[arg(long, global = true, env = "MUSTER_ALERT_HOLD_DOWN", value_parser = parse_duration)]
    pub alert_hold_down: Option<Duration>,
    /// Log filter, in tracing's EnvFilter syntax. [default: info]
    #[arg(long, global = true, env = "MUSTER_LOG")]
    pub log: Option<String>,
    #[command(flatten)]
    pub limits: LimitSettings,
}

/// Limits on what any one peer may cost the server. Each has a documented default
/// (README, "Limits") and the same key in the config file.
#[derive(Debug, Default, Args)]
#[command(next_help_heading = "Limits")]
pub struct LimitSettings {
    /// Connections held at once, in total. [default: the open-files limit minus 512]
    #[arg(long, global = true, env = "MUSTER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections that have not presented a valid credential yet, in total. [default: 4096, at most half of max_connections]
    #[arg(long, global = true, env = "MUSTER_MAX_UNAUTHENTICATED")]
    pub max_unauthenticated: Option<usize>,
    /// Unauthenticated connections from one source address. [default: 128]
    #[arg(long, global = true, env = "MUSTER_MAX_UNAUTHENTICATED_PER_ADDRESS")]
    pub max_unauthenticated_per_address: Option<usize>,
    /// Time for a TLS handshake, waiting for a handshake slot included. [default: 10s]
    #[arg(long, global = true, env = "MUSTER_HANDSHAKE_TIMEOUT", value_parser = parse_duration)]
    pub handshake_timeout: Option<Duration>,
    /// TLS handshakes worked on at once; more connections wait their turn (within
    /// handshake_timeout) instead of all slowing down together. [default: 64]
    #[arg(long, global = true, env = "MUSTER_MAX_TLS_HANDSHAKES")]
    pub max_tls_handshakes: Option<usize>,
    /// Agent sessions being opened at once (from the upgrade request until `welcome`); an agent
    /// past it gets 503 with Retry-After and tries again then. [default: 256]
    #[arg(long, global = true, env = "MUSTER_MAX_SESSION_STARTS")]
    pub max_session_starts: Option<usize>,
    /// Time from the TLS handshake until the first request's headers have arrived. [default: 10s]
    #[arg(long, global = true, env = "MUSTER_HEADER_TIMEOUT", value_parser = parse_duration)]
    pub header_timeout: Option<Duration>,
    /// How long an idle keep-alive connection stays open, and the time for the headers of each
    /// later request on it. [default: 75s]
    #[arg(long, global = true, env = "MUSTER_KEEP_ALIVE_TIMEOUT", value_parser = parse_duration)]
    pub keep_alive_timeout: Option<Duration>,
    /// Time for a request's whole body. [default: 30s]
    #[arg(long, global = true, env = "MUSTER_BODY_TIMEOUT", value_parser = parse_duration)]
    pub body_timeout: Option<Duration>,
    /// Largest request body, in bytes; larger ones get 413. [default: 1048576]
    #[arg(long, global = true, env = "MUSTER_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Messages (frames, pings included) one agent session may send per second, sustained. [default: 2000]
    #[arg(long, global = true, env = "MUSTER_AGENT_MESSAGES_PER_SECOND")]
    pub agent_messages_per_second: Option<u32>,
    /// Messages one agent session may send in a burst above the sustained rate. [default: 20000]
    #[arg(long, global = true, env = "MUSTER_AGENT_MESSAGE_BURST")]
    pub agent_message_burst: Option<u32>,
    /// Bytes one agent may send per second, sustained; past it the server reads from that
    /// agent more slowly (nothing is dropped). [default: 8388608]
    #[arg(long, global = true, env = "MUSTER_AGENT_BYTES_PER_SECOND")]
    pub agent_bytes_per_second: Option<u64>,
    /// Bytes one agent may send in a burst above the sustained rate. [default: 67108864]
    #[arg(long, global = true, env = "MUSTER_AGENT_BYTE_BURST")]
    pub agent_byte_burst: Option<u64>,
    /// Bytes of output the recorder's queue holds before sessions wait for the database. [default: 67108864]
    #[arg(long, global = true, env = "MUSTER_RECORDER_QUEUE_BYTES")]
    pub recorder_queue_bytes: Option<usize>,
    /// Longest ttl of an operator token. [default: 365d]
    #[arg(long, global = true, env = "MUSTER_MAX_TOKEN_TTL", value_parser = parse_duration)]
    pub max_token_ttl: Option<Duration>,
    /// Longest ttl of an enrollment token. [default: 30d]
    #[arg(long, global = true, env = "MUSTER_MAX_ENROLL_TOKEN_TTL", value_parser = parse_duration)]
    pub max_enroll_token_ttl: Option<Duration>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    shared::duration::parse(s).map_err(|e| e.to_string())
}

/// The config file's shape. Unknown keys are an error, so a typo is not silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_hostnames: Option<Vec<String>>,
    database: Option<String>,
    database_password_file: Option<PathBuf>,
    node_id: Option<String>,
    ping_interval: Option<String>,
    heartbeat_retention: Option<String>,
    job_retention: Option<String>,
    audit_retention: Option<String>,
    audit_file: Option<PathBuf>,
    approval_above: Option<u64>,
    sweep_interval: Option<String>,
    webhooks: Option<Vec<String>>,
    webhook_allow_http: Option<bool>,
    webhook_allow_redirects: Option<bool>,
    webhook_secret: Option<String>,
    webhook_secret_file: Option<PathBuf>,
    alert_hold_down: Option<String>,
    log: Option<String>,
    max_connections: Option<usize>,
    max_unauthenticated: Option<usize>,
    max_unauthenticated_per_address: Option<usize>,
    handshake_timeout: Option<String>,
    max_tls_handshakes: Option<usize>,
    max_session_starts: Option<usize>,
    header_timeout: Option<String>,
    keep_alive_timeout: Option<String>,
    body_timeout: Option<String>,
    max_body_bytes: Option<usize>,
    agent_messages_per_second: Option<u32>,
    agent_message_burst: Option<u32>,
    agent_bytes_per_second: Option<u64>,
    agent_byte_burst: Option<u64>,
    recorder_queue_bytes: Option<usize>,
    max_token_ttl: Option<String>,
    max_enroll_token_ttl: Option<String>,
}

/// The resolved configuration the server runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database: Database,
    pub tls: TlsSource,
    pub node_id: String,
    pub ping_interval: Duration,
    pub heartbeat_retention: Duration,
    pub job_retention: Duration,
    pub audit_retention: Duration,
    pub audit_file: Option<PathBuf>,
    /// Jobs matching more agents than this need a second admin's approval; none: never.
    pub approval_above: Option<u64>,
    pub sweep_interval: Duration,
    pub webhooks: Vec<crate::alerts::WebhookUrl>,
    pub webhook_allow_http: bool,
    pub webhook_allow_redirects: bool,
    pub webhook_secret: Option<String>,
    pub alert_hold_down: Duration,
    pub log: String,
    pub limits: Limits,
}

/// Where the server keeps its state.
#[derive(Clone)]
pub enum Database {
    /// The embedded default: one file in the data directory.
    Sqlite(PathBuf),
    /// A PostgreSQL database, for several servers sharing one. Its password (in the URL or from
    /// a file) is never printed: see [`Database::describe`].
    Postgres(Box<sqlx::postgres::PgConnectOptions>),
}

impl Database {
    /// A `postgres://` (or `postgresql://`) URL, checked now so that a typo fails at start with
    /// a clear message rather than at the first query.
    pub fn postgres(url: &str, password: Option<String>) -> Result<Database, ConfigError> {
        use std::str::FromStr;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid(
                "database must be a postgres:// URL (without it, SQLite in the data directory is used)".into(),
            ));
        }
        // sqlx's message may quote the URL, password and all: say only what is wrong.
        let options = sqlx::postgres::PgConnectOptions::from_str(url)
            .map_err(|_| ConfigError::Invalid("database is not a valid postgres:// URL".into()))?;
        let options = match password {
            Some(p) => options.password(&p),
            None => options,
        };
        Ok(Database::Postgres(Box::new(options.application_name("muster-server"))))
    }

    /// The database for messages and logs, without any password.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(path) => path.display().to_string(),
            Database::Postgres(o) => {
                format!("postgres://{}@{}:{}/{}", o.get_username(), o.get_host(), o.get_port(), o.get_database().unwrap_or(""))
            }
        }
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// What any one peer may cost the server (see `LimitSettings` for each one's meaning).
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_address: usize,
    pub handshake_timeout: Duration,
    pub max_tls_handshakes: usize,
    pub max_session_starts: usize,
    pub header_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub body_timeout: Duration,
    pub max_body_bytes: usize,
    pub agent_messages_per_second: u32,
    pub agent_message_burst: u32,
    pub agent_bytes_per_second: u64,
    pub agent_byte_burst: u64,
    pub recorder_queue_bytes: usize,
    pub max_token_ttl: Duration,
    pub max_enroll_token_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        let max_connections = default_max_connections();
        Limits {
            max_connections,
            max_unauthenticated: 4096.min(max_connections / 2).max(1),
            max_unauthenticated_per_address: 128,
            handshake_timeout: Duration::from_secs(10),
            max_tls_handshakes: 64,
            max_session_starts: 256,
            header_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(75),
            body_timeout: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            agent_messages_per_second: 2000,
            agent_message_burst: 20_000,
            agent_bytes_per_second: 8 << 20,
            agent_byte_burst: 64 << 20,
            recorder_queue_bytes: 64 << 20,
            max_token_ttl: Duration::from_secs(365 * 86_400),
            max_enroll_token_ttl: Duration::from_secs(30 * 86_400),
        }
    }
}

/// The process's open-files limit less 512 for the database, logs and outgoing requests.
fn default_max_connections() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(1 << 20);
    usize::try_from(soft).unwrap_or(usize::MAX).saturating_sub(512).max(64)
}

#[derive(Clone, Debug)]
pub enum TlsSource {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// Generate a CA and a server certificate into `<data_dir>/tls` on first start; reuse them.
    Generated {
        hostnames: Vec<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub const DEFAULT_LISTEN: &'static str = "127.0.0.1:8443";

    pub fn default_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8443))
    }

    /// Layers the file (if any) under the environment and flags, then validates.
    pub fn resolve(settings: &Settings) -> Result<Config, ConfigError> {
        let file = match &settings.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let dur = |flag: Option<Duration>, file: &Option<String>, key: &str, default: Duration| -> Result<Duration, ConfigError> {
            match (flag, file) {
                (Some(d), _) => Ok(d),
                (None, Some(s)) => shared::duration::parse(s).map_err(|e| ConfigError::Invalid(format!("{key}: {e}"))),
                (None, None) => Ok(default),
            }
        };
        let limits = resolve_limits(&settings.limits, &file, dur)?;
        let webhook_secret = webhook_secret(settings, &file)?;
        let allow_http = settings.webhook_allow_http || file.webhook_allow_http.unwrap_or(false);
        let webhooks = settings
            .webhooks
            .clone()
            .or(file.webhooks.clone())
            .unwrap_or_default()
            .iter()
            .filter(|w| !w.is_empty())
            .enumerate()
            .map(|(i, w)| {
                crate::alerts::WebhookUrl::parse(w, allow_http).map_err(|e| ConfigError::Invalid(format!("webhook {}: {e}", i + 1)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tls = match (settings.tls_cert.clone().or(file.tls_cert), settings.tls_key.clone().or(file.tls_key)) {
            (Some(cert), Some(key)) => TlsSource::Files { cert, key },
            (None, None) => TlsSource::Generated { hostnames: settings.tls_hostnames.clone().or(file.tls_hostnames).unwrap_or_default() },
            _ => return Err(ConfigError::Invalid("tls_cert and tls_key must be given together".into())),
        };
        let data_dir = settings.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from("muster-data"));
        let database = match settings.database.clone().or(file.database) {
            None => Database::Sqlite(data_dir.join("muster.db")),
            Some(url) => {
                let password = match settings.database_password_file.as_ref().or(file.database_password_file.as_ref()) {
                    Some(path) => Some(
                        std::fs::File::open(path)
                            .map_err(Into::into)
                            .and_then(shared::secret::read)
                            .map_err(|e| ConfigError::Invalid(format!("database password file {}: {e}", path.display())))?,
                    ),
                    None => None,
                };
                Database::postgres(&url, password)?
            }
        };
        let config = Config {
            listen: settings.listen.or(file.listen).unwrap_or_else(Self::default_listen),
            data_dir,
            database,
            tls,
            node_id: settings.node_id.clone().or(file.node_id).unwrap_or_else(|| "local".into()),
            ping_interval: dur(settings.ping_interval, &file.ping_interval, "ping_interval", Duration::from_secs(15))?,
            heartbeat_retention: dur(
                settings.heartbeat_retention,
                &file.heartbeat_retention,
                "heartbeat_retention",
                Duration::from_secs(7 * 86_400),
            )?,
            job_retention: dur(settings.job_retention, &file.job_retention, "job_retention", Duration::from_secs(30 * 86_400))?,
            audit_retention: dur(settings.audit_retention, &file.audit_retention, "audit_retention", Duration::from_secs(365 * 86_400))?,
            audit_file: settings.audit_file.clone().or(file.audit_file),
            approval_above: settings.approval_above.or(file.approval_above),
            sweep_interval: dur(settings.sweep_interval, &file.sweep_interval, "sweep_interval", Duration::from_secs(1))?,
            webhooks,
            webhook_allow_http: allow_http,
            webhook_allow_redirects: settings.webhook_allow_redirects || file.webhook_allow_redirects.unwrap_or(false),
            webhook_secret,
            alert_hold_down: dur(settings.alert_hold_down, &file.alert_hold_down, "alert_hold_down", Duration::from_secs(300))?,
            log: settings.log.clone().or(file.log).unwrap_or_else(|| "info".into()),
            limits,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.ping_interval < Duration::from_millis(100) || self.ping_interval > Duration::from_secs(300) {
            return bad("ping_interval must be between 100ms and 5m");
        }
        if self.sweep_interval < Duration::from_millis(50) || self.sweep_interval > Duration::from_secs(60) {
            return bad("sweep_interval must be between 50ms and 1m");
        }
        if self.heartbeat_retention < Duration::from_secs(60) {
            return bad("heartbeat_retention must be at least 1m");
        }
        // A bare number is seconds: `audit_retention = "365"` would keep six minutes.
        if self.job_retention < Duration::from_secs(3600) {
            return bad("job_retention must be at least 1h");
        }
        if self.audit_retention < Duration::from_secs(86_400) {
            return bad("audit_retention must be at least 1d");
        }
        if self.audit_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return bad("audit_file must be a path");
        }
        if let TlsSource::Generated { hostnames } = &self.tls
            && let Some(Err(e)) = hostnames.iter().map(|h| crate::tls::Name::parse(h)).find(Result::is_err)
        {
            return Err(ConfigError::Invalid(format!("tls_hostnames: {e}")));
        }
        if !self.webhooks.is_empty() && self.webhook_secret.as_deref().is_none_or(str::is_empty) {
            return bad("webhooks need a webhook_secret, so receivers can check who sent them");
        }
        if self.node_id.is_empty()
            || self.node_id.len() > 64
            || !self.node_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad("node_id must be 1 to 64 letters, digits, '-' or '_'");
        }
        Ok(())
    }

    /// Where the embedded SQLite database lives in the data directory (used unless a
    /// PostgreSQL database is configured).
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("muster.db")
    }

    /// How long the server waits for any frame from an agent before closing its connection.
    pub fn idle_timeout(&self) -> Duration {
        self.ping_interval * 3
    }
}

/// The webhook secret: flags and environment first, then the file; in each, a value or a file
/// to read it from (stdin only from the command line or the environment).
fn webhook_secret(settings: &Settings, file: &FileSettings) -> Result<Option<String>, ConfigError> {
    let from_file = |path: &Path| {
        let read = if path.as_os_str() == shared::secret::STDIN {
            shared::secret::read(std::io::stdin().lock())
        } else {
            std::fs::File::open(path).map_err(Into::into).and_then(shared::secret::read)
        };
        read.map_err(|e| ConfigError::Invalid(format!("webhook secret file {}: {e}", path.display())))
    };
    if let Some(s) = &settings.webhook_secret {
        return Ok(Some(s.clone()));
    }
    if let Some(path) = &settings.webhook_secret_file {
        return from_file(path).map(Some);
    }
    match (&file.webhook_secret, &file.webhook_secret_file) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid("the config file gives both webhook_secret and webhook_secret_file".into())),
        (Some(s), None) => Ok(Some(s.clone())),
        (None, Some(path)) if path.as_os_str() == shared::secret::STDIN => {
            Err(ConfigError::Invalid("webhook_secret_file in a config file must be a file, not `-`".into()))
        }
        (None, Some(path)) => from_file(path).map(Some),
        (None, None) => Ok(None),
    }
}

fn resolve_limits(
    flags: &LimitSettings,
    file: &FileSettings,
    dur: impl Fn(Option<Duration>, &Option<String>, &str, Duration) -> Result<Duration, ConfigError>,
) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let max_connections = flags.max_connections.or(file.max_connections).unwrap_or(d.max_connections);
    let limits = Limits {
        max_connections,
        max_unauthenticated: flags
            .max_unauthenticated
            .or(file.max_unauthenticated)
            .unwrap_or_else(|| d.max_unauthenticated.min(max_connections / 2).max(1)),
        max_unauthenticated_per_address: flags
            .max_unauthenticated_per_address
            .or(file.max_unauthenticated_per_address)
            .unwrap_or(d.max_unauthenticated_per_address),
        handshake_timeout: dur(flags.handshake_timeout, &file.handshake_timeout, "handshake_timeout", d.handshake_timeout)?,
        max_tls_handshakes: flags.max_tls_handshakes.or(file.max_tls_handshakes).unwrap_or(d.max_tls_handshakes),
        max_session_starts: flags.max_session_starts.or(file.max_session_starts).unwrap_or(d.max_session_starts),
        header_timeout: dur(flags.header_timeout, &file.header_timeout, "header_timeout", d.header_timeout)?,
        keep_alive_timeout: dur(flags.keep_alive_timeout, &file.keep_alive_timeout, "keep_alive_timeout", d.keep_alive_timeout)?,
        body_timeout: dur(flags.body_timeout, &file.body_timeout, "body_timeout", d.body_timeout)?,
        max_body_bytes: flags.max_body_bytes.or(file.max_body_bytes).unwrap_or(d.max_body_bytes),
        agent_messages_per_second: flags
            .agent_messages_per_second
            .or(file.agent_messages_per_second)
            .unwrap_or(d.agent_messages_per_second),
        agent_message_burst: flags.agent_message_burst.or(file.agent_message_burst).unwrap_or(d.agent_message_burst),
        agent_bytes_per_second: flags.agent_bytes_per_second.or(file.agent_bytes_per_second).unwrap_or(d.agent_bytes_per_second),
        agent_byte_burst: flags.agent_byte_burst.or(file.agent_byte_burst).unwrap_or(d.agent_byte_burst),
        recorder_queue_bytes: flags.recorder_queue_bytes.or(file.recorder_queue_bytes).unwrap_or(d.recorder_queue_bytes),
        max_token_ttl: dur(flags.max_token_ttl, &file.max_token_ttl, "max_token_ttl", d.max_token_ttl)?,
        max_enroll_token_ttl: dur(flags.max_enroll_token_ttl, &file.max_enroll_token_ttl, "max_enroll_token_ttl", d.max_enroll_token_ttl)?,
    };
    limits.validate()?;
    Ok(limits)
}

impl Limits {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        let secs = |d: Duration, lo: u64, hi: u64| (Duration::from_millis(lo)..=Duration::from_secs(hi)).contains(&d);
        if self.max_connections < 2 {
            return bad("max_connections must be at least 2");
        }
        if self.max_unauthenticated == 0 || self.max_unauthenticated >= self.max_connections {
            return bad("max_unauthenticated must be at least 1 and below max_connections, to keep room for agents and operators");
        }
        if self.max_unauthenticated_per_address == 0 {
            return bad("max_unauthenticated_per_address must be at least 1");
        }
        if self.max_tls_handshakes == 0 || self.max_session_starts == 0 {
            return bad("max_tls_handshakes and max_session_starts must be at least 1");
        }
        if !secs(self.handshake_timeout, 100, 300)
            || !secs(self.header_timeout, 100, 300)
            || !secs(self.keep_alive_timeout, 100, 3600)
            || !secs(self.body_timeout, 100, 3600)
        {
            return bad(
                "handshake_timeout and header_timeout must be between 100ms and 5m, keep_alive_timeout and body_timeout between 100ms and 1h",
            );
        }
        if !(1024..=(1 << 30)).contains(&self.max_body_bytes) {
            return bad("max_body_bytes must be between 1024 and 1073741824");
        }
        if self.agent_messages_per_second == 0 || self.agent_message_burst == 0 {
            return bad("agent_messages_per_second and agent_message_burst must be at least 1");
        }
        // A burst must hold at least one largest message, or that message could never pass.
        let max_message = shared::protocol::MAX_MESSAGE_BYTES as u64;
        // At least 64 KiB/s, so that waiting out one largest message takes at most 2 s.
        if self.agent_bytes_per_second < 64 * 1024 || self.agent_byte_burst < max_message {
            return bad("agent_bytes_per_second must be at least 65536 and agent_byte_burst at least 131072 (one largest message)");
        }
        if self.recorder_queue_bytes < shared::protocol::MAX_MESSAGE_BYTES {
            return bad("recorder_queue_bytes must be at least 131072 (one largest message)");
        }
        let year = 365 * 86_400;
        if !secs(self.max_token_ttl, 60_000, 10 * year) || !secs(self.max_enroll_token_ttl, 60_000, 10 * year) {
            return bad("max_token_ttl and max_enroll_token_ttl must be between 1m and 3650d");
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.message().to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9000\"\nnode_id = \"a\"\nping_interval = \"5s\"\n").unwrap();
        let settings = Settings { config: Some(path), node_id: Some("b".into()), ..Settings::default() };
        let c = Config::resolve(&settings).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.node_id, "b");
        assert_eq!(c.ping_interval, Duration::from_secs(5));
        assert_eq!(c.heartbeat_retention, Duration::from_secs(7 * 86_400));
        assert_eq!(
            (c.job_retention, c.audit_retention, c.audit_file),
            (Duration::from_secs(30 * 86_400), Duration::from_secs(365 * 86_400), None)
        );
    }

    #[test]
    fn retention_and_the_audit_file_come_from_the_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "job_retention = \"7d\"\naudit_retention = \"730d\"\naudit_file = \"/var/log/muster/audit.jsonl\"\n")
            .unwrap();
        let c = Config::resolve(&Settings { config: Some(path.clone()), ..Settings::default() }).unwrap();
        assert_eq!(c.job_retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.audit_retention, Duration::from_secs(730 * 86_400));
        assert_eq!(c.audit_file, Some(PathBuf::from("/var/log/muster/audit.jsonl")));
        let s = Settings { config: Some(path), audit_retention: Some(Duration::from_secs(365)), ..Settings::default() };
        assert!(Config::resolve(&s).unwrap_err().to_string().contains("audit_retention"));
    }

    #[test]
    fn the_database_is_sqlite_in_the_data_directory_unless_a_postgres_url_is_given_and_its_password_never_shows() {
        let c = Config::resolve(&Settings { data_dir: Some("/srv/m".into()), ..Settings::default() }).unwrap();
        assert!(matches!(&c.database, Database::Sqlite(p) if p == Path::new("/srv/m/muster.db")));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "database = \"postgres://muster:hunter2@db.example:6543/fleet?sslmode=verify-full\"\n").unwrap();
        let c = Config::resolve(&Settings { config: Some(path.clone()), ..Settings::default() }).unwrap();
        assert_eq!(c.database.describe(), "postgres://muster@db.example:6543/fleet");
        assert!(!format!("{c:?}").contains("hunter2"), "the password shows in the config's Debug");

        let secret = dir.path().join("db-password");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let s =
            Settings { database: Some("postgresql://muster@db/fleet".into()), database_password_file: Some(secret), ..Settings::default() };
        let Database::Postgres(o) = Config::resolve(&s).unwrap().database else { panic!("not postgres") };
        assert_eq!(o.get_database(), Some("fleet"));

        for bad in ["mysql://x/y", "/var/lib/muster.db", "postgres://u:hunter2@[bad/x"] {
            let err = Config::resolve(&Settings { database: Some(bad.into()), ..Settings::default() }).unwrap_err().to_string();
            assert!(err.contains("postgres://") && !err.contains("hunter2"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_typo_in_the_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "lisen = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::resolve(&Settings { config: Some(path), ..Settings::default() }).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn webhooks_need_a_secret_and_an_https_url_unless_http_is_allowed() {
        let s = Settings { webhooks: Some(vec!["https://hooks.example/muster".into()]), ..Settings::default() };
        assert!(Config::resolve(&s).unwrap_err().to_string().contains("webhook_secret"));
        let s = Settings { webhooks: Some(vec!["ftp://x".into()]), webhook_secret: Some("k".into()), ..Settings::default() };
        assert!(Config::resolve(&s).is_err());
        let plain = || Settings {
            webhooks: Some(vec!["https://hooks.example/a".into(), "http://hooks.example/T0/B1/xyzzy".into()]),
            webhook_secret: Some("k".into()),
            ..Settings::default()
        };
        let err = Config::resolve(&plain()).unwrap_err().to_string();
        assert!(err.contains("webhook 2") && err.contains("webhook_allow_http"), "{err}");
        assert!(!err.contains("xyzzy"), "the URL's path is not shown: {err}");
        let allowed = Config::resolve(&Settings { webhook_allow_http: true, ..plain() }).unwrap();
        assert_eq!(allowed.webhooks[1].to_string(), "http://hooks.example/…");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(
            &path,
            "webhooks = [\"http://h/x\"]\nwebhook_secret = \"k\"\nwebhook_allow_http = true\nwebhook_allow_redirects = true\n",
        )
        .unwrap();
        let c = Config::resolve(&Settings { config: Some(path), ..Settings::default() }).unwrap();
        assert!(c.webhook_allow_redirects && c.webhooks.len() == 1);
        let s = Settings {
            webhooks: Some(vec!["https://hooks.example/muster".into()]),
            webhook_secret: Some("k".into()),
            ..Settings::default()
        };
        assert_eq!(Config::resolve(&s).unwrap().alert_hold_down, Duration::from_secs(300));
    }

    #[test]
    fn the_webhook_secret_can_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let path = dir.path().join("server.toml");
        let toml = format!("webhooks = [\"https://hooks.example/muster\"]\nwebhook_secret_file = {:?}\n", secret.to_str().unwrap());
        std::fs::write(&path, toml).unwrap();
        let c = Config::resolve(&Settings { config: Some(path.clone()), ..Settings::default() }).unwrap();
        assert_eq!(c.webhook_secret.as_deref(), Some("s3cret"));
        let s = Settings { config: Some(path), webhook_secret: Some("flag".into()), ..Settings::default() };
        assert_eq!(Config::resolve(&s).unwrap().webhook_secret.as_deref(), Some("flag"));
        std::fs::write(&secret, "").unwrap();
        let s = Settings { webhook_secret_file: Some(secret), ..Settings::default() };
        assert!(Config::resolve(&s).unwrap_err().to_string().contains("empty"));
        assert!(Cli::try_parse_from(["muster-server", "--webhook-secret", "a", "--webhook-secret-file", "b"]).is_err());
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let s = Settings { ping_interval: Some(Duration::from_millis(1)), ..Settings::default() };
        assert!(Config::resolve(&s).is_err());
        let s = Settings { node_id: Some("no spaces".into()), ..Settings::default() };
        assert!(Config::resolve(&s).is_err());
        let s = Settings { tls_hostnames: Some(vec!["muster.example".into(), "*.example".into()]), ..Settings::default() };
        assert!(Config::resolve(&s).unwrap_err().to_string().contains("*.example"));
    }
}
