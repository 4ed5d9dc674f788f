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
    #[arg(long)]
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
    #[arg(long, env = "MUSTER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address and port for agents (wss) and operators (HTTPS). [default: 127.0.0.1:8443]
    #[arg(long, env = "MUSTER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database, generated certificates and dev files. [default: ./muster-data]
    #[arg(long, env = "MUSTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Server certificate chain (PEM). Without it, one is generated into the data directory.
    #[arg(long, env = "MUSTER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key for --tls-cert (PEM).
    #[arg(long, env = "MUSTER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Extra DNS names or IP addresses for the generated certificate (localhost, 127.0.0.1 and ::1
    /// are always included). Comma separated.
    #[arg(long, env = "MUSTER_TLS_HOSTNAMES", value_delimiter = ',')]
    pub tls_hostnames: Option<Vec<String>>,
    /// Name of this server process among several sharing a database. [default: local]
    #[arg(long, env = "MUSTER_NODE_ID")]
    pub node_id: Option<String>,
    /// How often the server pings each agent. [default: 15s]
    #[arg(long, env = "MUSTER_PING_INTERVAL", value_parser = parse_duration)]
    pub ping_interval: Option<Duration>,
    /// How long heartbeat history is kept. [default: 7d]
    #[arg(long, env = "MUSTER_HEARTBEAT_RETENTION", value_parser = parse_duration)]
    pub heartbeat_retention: Option<Duration>,
    /// How often liveness is evaluated. [default: 1s]
    #[arg(long, env = "MUSTER_SWEEP_INTERVAL", value_parser = parse_duration)]
    pub sweep_interval: Option<Duration>,
    /// URL that gets a signed JSON POST when an agent goes offline or stale or recovers, and
    /// when a job fails. Repeat (or comma-separate) for more.
    #[arg(long = "webhook", env = "MUSTER_WEBHOOKS", value_delimiter = ',')]
    pub webhooks: Option<Vec<String>>,
    /// Secret for the webhooks' HMAC-SHA256 signature header (X-Muster-Signature).
    #[arg(long, env = "MUSTER_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// After an alert about an agent, further problem alerts about it wait this long. [default: 5m]
    #[arg(long, env = "MUSTER_ALERT_HOLD_DOWN", value_parser = parse_duration)]
    pub alert_hold_down: Option<Duration>,
    /// Log filter, in tracing's EnvFilter syntax. [default: info]
    #[arg(long, env = "MUSTER_LOG")]
    pub log: Option<String>,
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
    node_id: Option<String>,
    ping_interval: Option<String>,
    heartbeat_retention: Option<String>,
    sweep_interval: Option<String>,
    webhooks: Option<Vec<String>>,
    webhook_secret: Option<String>,
    alert_hold_down: Option<String>,
    log: Option<String>,
}

/// The resolved configuration the server runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls: TlsSource,
    pub node_id: String,
    pub ping_interval: Duration,
    pub heartbeat_retention: Duration,
    pub sweep_interval: Duration,
    pub webhooks: Vec<String>,
    pub webhook_secret: Option<String>,
    pub alert_hold_down: Duration,
    pub log: String,
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
        let tls = match (settings.tls_cert.clone().or(file.tls_cert), settings.tls_key.clone().or(file.tls_key)) {
            (Some(cert), Some(key)) => TlsSource::Files { cert, key },
            (None, None) => TlsSource::Generated { hostnames: settings.tls_hostnames.clone().or(file.tls_hostnames).unwrap_or_default() },
            _ => return Err(ConfigError::Invalid("tls_cert and tls_key must be given together".into())),
        };
        let config = Config {
            listen: settings.listen.or(file.listen).unwrap_or_else(Self::default_listen),
            data_dir: settings.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from("muster-data")),
            tls,
            node_id: settings.node_id.clone().or(file.node_id).unwrap_or_else(|| "local".into()),
            ping_interval: dur(settings.ping_interval, &file.ping_interval, "ping_interval", Duration::from_secs(15))?,
            heartbeat_retention: dur(
                settings.heartbeat_retention,
                &file.heartbeat_retention,
                "heartbeat_retention",
                Duration::from_secs(7 * 86_400),
            )?,
            sweep_interval: dur(settings.sweep_interval, &file.sweep_interval, "sweep_interval", Duration::from_secs(1))?,
            webhooks: settings.webhooks.clone().or(file.webhooks).unwrap_or_default().into_iter().filter(|w| !w.is_empty()).collect(),
            webhook_secret: settings.webhook_secret.clone().or(file.webhook_secret),
            alert_hold_down: dur(settings.alert_hold_down, &file.alert_hold_down, "alert_hold_down", Duration::from_secs(300))?,
            log: settings.log.clone().or(file.log).unwrap_or_else(|| "info".into()),
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
        if let Some(w) = self.webhooks.iter().find(|w| !(w.starts_with("https://") || w.starts_with("http://"))) {
            return Err(ConfigError::Invalid(format!("webhook {w:?} must be an http:// or https:// URL")));
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

    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("muster.db")
    }

    /// How long the server waits for any frame from an agent before closing its connection.
    pub fn idle_timeout(&self) -> Duration {
        self.ping_interval * 3
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
    fn webhooks_need_a_secret_and_an_http_url() {
        let s = Settings { webhooks: Some(vec!["https://hooks.example/muster".into()]), ..Settings::default() };
        assert!(Config::resolve(&s).unwrap_err().to_string().contains("webhook_secret"));
        let s = Settings { webhooks: Some(vec!["ftp://x".into()]), webhook_secret: Some("k".into()), ..Settings::default() };
        assert!(Config::resolve(&s).is_err());
        let s = Settings {
            webhooks: Some(vec!["https://hooks.example/muster".into()]),
            webhook_secret: Some("k".into()),
            ..Settings::default()
        };
        assert_eq!(Config::resolve(&s).unwrap().alert_hold_down, Duration::from_secs(300));
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let s = Settings { ping_interval: Some(Duration::from_millis(1)), ..Settings::default() };
        assert!(Config::resolve(&s).is_err());
        let s = Settings { node_id: Some("no spaces".into()), ..Settings::default() };
        assert!(Config::resolve(&s).is_err());
    }
}
