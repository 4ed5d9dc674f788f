//! `muster-agent install` and `uninstall`: put the agent on a terminal in one step, safely and
//! repeatably. Install writes the config and the CA, creates the state directory, enrolls (once:
//! an agent that already holds a credential keeps it), installs the systemd unit, and enables
//! and starts the service. Running it again converges to the same state.
//!
//! `--root DIR` (or `MUSTER_INSTALL_ROOT`) installs into a directory tree instead of `/`, for
//! images and tests; the service is then not started.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use shared::Labels;

use crate::config::Config;
use crate::credential;

pub const UNIT: &str = include_str!("../../packaging/muster-agent.service");
pub const CONFIG_PATH: &str = "/etc/muster/agent.toml";
pub const CA_PATH: &str = "/etc/muster/ca.pem";
pub const STATE_DIR: &str = "/var/lib/muster-agent";
const PACKAGED_UNIT: &str = "/lib/systemd/system/muster-agent.service";
const LOCAL_UNIT: &str = "/etc/systemd/system/muster-agent.service";
const PACKAGED_BIN: &str = "/usr/bin/muster-agent";
const LOCAL_BIN: &str = "/usr/local/bin/muster-agent";

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Enrollment token from `muster enroll-token create`. Not needed if already enrolled.
    #[arg(long, env = "MUSTER_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// Learn the server's CA from the connection, accepting it only if its SHA-256 fingerprint
    /// is this (`sha256:<hex>`). Instead of --ca; `muster enroll-token create --install-command`
    /// prints it.
    #[arg(long)]
    pub ca_fingerprint: Option<String>,
    /// Install under this directory instead of `/` (the service is not started).
    #[arg(long, env = "MUSTER_INSTALL_ROOT")]
    pub root: Option<PathBuf>,
    /// Write everything but do not enable or start the service.
    #[arg(long)]
    pub no_start: bool,
    /// Run only jobs signed by this operator key (`muster key show`); repeat for more. Without
    /// it, the keys already in the config are kept.
    #[arg(long = "trust-key")]
    pub trust_keys: Vec<shared::signing::PublicKey>,
}

/// What an administrator set in agent.toml that install does not own: kept when it rewrites
/// the file, so running it again never drops a policy, trusted keys or `run_as`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Kept {
    pub run_as: Option<String>,
    pub trusted_keys: Vec<String>,
    /// The `[policy]` table, as written.
    pub policy: Option<String>,
}

impl Kept {
    pub fn from_text(text: &str) -> Kept {
        #[derive(serde::Deserialize)]
        struct Top {
            run_as: Option<String>,
            #[serde(default)]
            trusted_keys: Vec<String>,
        }
        let top: Option<Top> = toml::from_str(text).ok();
        let is_header = |l: &str| {
            let t = l.trim_end();
            t.starts_with('[') && !t.starts_with("[[") && t.ends_with(']') && !t.contains('=') && !l.starts_with(' ')
        };
        let mut policy: Option<String> = None;
        for line in text.lines() {
            if is_header(line) {
                if line.trim() == "[policy]" {
                    policy = Some(String::new());
                } else if policy.as_deref().is_some_and(|p| !p.is_empty()) {
                    break;
                }
            }
            if let Some(p) = policy.as_mut() {
                p.push_str(line);
                p.push('\n');
            }
        }
        let (run_as, trusted_keys) = top.map(|t| (t.run_as, t.trusted_keys)).unwrap_or_default();
        Kept { run_as, trusted_keys, policy }
    }
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// Also delete the agent's identity (credential), undelivered results and config. Without
    /// it, installing again brings the same agent back.
    #[arg(long)]
    pub purge: bool,
    #[arg(long, env = "MUSTER_INSTALL_ROOT")]
    pub root: Option<PathBuf>,
}

/// `/etc/x` under the install root.
fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The config file install writes: paths as the service will see them.
pub fn config_text(server: &str, hostname: Option<&str>, labels: &Labels, heartbeat: Option<std::time::Duration>, kept: &Kept) -> String {
    let mut out = String::from("# Written by `muster-agent install`; running it again rewrites this file.\n");
    out += &format!("server = {}\nca = {}\nstate_dir = {}\n", toml_string(server), toml_string(CA_PATH), toml_string(STATE_DIR));
    if let Some(h) = hostname {
        out += &format!("hostname = {}\n", toml_string(h));
    }
    if let Some(h) = heartbeat {
        out += &format!("heartbeat_interval = {}\n", toml_string(&shared::duration::format(h)));
    }
    if let Some(r) = &kept.run_as {
        out += &format!("run_as = {}\n", toml_string(r));
    }
    if !kept.trusted_keys.is_empty() {
        let keys: Vec<String> = kept.trusted_keys.iter().map(|k| toml_string(k)).collect();
        out += &format!("trusted_keys = [{}]\n", keys.join(", "));
    }
    if !labels.is_empty() {
        out += "\n[labels]\n";
        for (k, v) in labels.iter() {
            out += &format!("{} = {}\n", toml_string(k), toml_string(v));
        }
    }
    if let Some(p) = &kept.policy {
        out += "\n";
        out += p;
    }
    out
}

pub async fn install(config: &Config, args: &InstallArgs) -> Result<Vec<String>, String> {
    let root = args.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let live = args.root.is_none();
    if live && !rustix::process::geteuid().is_root() {
        return Err("install needs root (or --root DIR to install into a directory)".into());
    }
    let mut done = Vec::new();
    let ca_pem = match (&config.ca, &args.ca_fingerprint) {
        (Some(ca), None) => std::fs::read(ca).map_err(|e| format!("CA file {}: {e}", ca.display()))?,
        (None, Some(pin)) => {
            let pem = crate::pin::fetch_ca(&config.server, pin).await?;
            done.push(format!("learned the server's CA, pinned by {pin}"));
            pem.into_bytes()
        }
        (Some(_), Some(_)) => return Err("give --ca or --ca-fingerprint, not both".into()),
        (None, None) => return Err("give the server's CA with --ca FILE or --ca-fingerprint sha256:...".into()),
    };
    let state_dir = under(&root, STATE_DIR);
    std::fs::create_dir_all(&state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    write(&under(&root, CA_PATH), &ca_pem, 0o644)?;
    let heartbeat = (config.heartbeat_interval != std::time::Duration::from_secs(10)).then_some(config.heartbeat_interval);
    let mut kept = std::fs::read_to_string(under(&root, CONFIG_PATH)).map(|t| Kept::from_text(&t)).unwrap_or_default();
    if let Some(r) = &config.policy.run_as {
        kept.run_as = Some(format!("{}:{}", r.user, r.group));
    }
    if !args.trust_keys.is_empty() {
        kept.trusted_keys = args.trust_keys.iter().map(ToString::to_string).collect();
    } else if !config.trusted_keys.is_empty() {
        kept.trusted_keys = config.trusted_keys.iter().map(ToString::to_string).collect();
    }
    let text = config_text(&config.server, config.hostname.as_deref(), &config.labels, heartbeat, &kept);
    // What the service will read must be valid: check it before replacing the old file.
    let check = std::env::temp_dir().join(format!("muster-agent-install-{}.toml", std::process::id()));
    write(&check, text.as_bytes(), 0o600)?;
    let parsed = Config::resolve(&crate::config::Settings { config: Some(check.clone()), ..Default::default() });
    let _ = std::fs::remove_file(&check);
    parsed.map_err(|e| format!("the config install would write is not valid: {e}"))?;
    write(&under(&root, CONFIG_PATH), text.as_bytes(), 0o600)?;
    if !kept.trusted_keys.is_empty() {
        done.push(format!("signed jobs required: {} trusted keys", kept.trusted_keys.len()));
    }
    if let Some(r) = &kept.run_as {
        done.push(format!("commands run as {r}"));
    }
    done.push(format!("config {} and CA {}", CONFIG_PATH, CA_PATH));

    // Enroll with the files just written, exactly as the service will run.
    let mut effective = config.clone();
    effective.state_dir = state_dir.clone();
    effective.ca = Some(under(&root, CA_PATH));
    match credential::load(&state_dir).map_err(|e| e.to_string())? {
        Some(c) if c.server.trim_end_matches('/') == config.server.trim_end_matches('/') => {
            done.push(format!("already enrolled as {}; identity kept", c.agent_id));
        }
        Some(c) => return Err(format!("this agent is enrolled with {}; run `muster-agent uninstall --purge` first to move it", c.server)),
        None => {
            // `--enroll-token-file` is the agent's global setting, read into `config`.
            let token = match (&args.enroll_token, &config.enroll_token) {
                (Some(t), _) => t.clone(),
                (None, Some(t)) => t.read()?,
                (None, None) => return Err("not enrolled yet: give --enroll-token-file PATH (or --enroll-token)".into()),
            };
            let tls = crate::tls::client_config(effective.ca.as_deref()).map_err(|e| e.to_string())?;
            let id = crate::session::enroll(&effective, tls, &token).await.map_err(|e| format!("enrollment failed: {e}"))?;
            done.push(format!("enrolled as {id}"));
        }
    }

    let bin = if under(&root, PACKAGED_BIN).exists() {
        PACKAGED_BIN
    } else {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
        let target = under(&root, LOCAL_BIN);
        if std::fs::canonicalize(&exe).ok() != std::fs::canonicalize(&target).ok() {
            let bytes = std::fs::read(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
            write(&target, &bytes, 0o755)?;
        }
        LOCAL_BIN
    };
    if !under(&root, PACKAGED_UNIT).exists() {
        write(&under(&root, LOCAL_UNIT), UNIT.replace(PACKAGED_BIN, bin).as_bytes(), 0o644)?;
        done.push(format!("systemd unit {LOCAL_UNIT} running {bin}"));
    }

    if live && !args.no_start {
        for argv in [&["daemon-reload"][..], &["enable", "muster-agent"][..], &["restart", "muster-agent"][..]] {
            let status = Command::new("systemctl").args(argv).status().map_err(|e| format!("systemctl: {e}"))?;
            if !status.success() {
                return Err(format!("systemctl {} failed ({status})", argv.join(" ")));
            }
        }
        done.push("service muster-agent enabled and (re)started".into());
    }
    Ok(done)
}

pub fn uninstall(args: &UninstallArgs) -> Result<Vec<String>, String> {
    let root = args.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let live = args.root.is_none();
    if live && !rustix::process::geteuid().is_root() {
        return Err("uninstall needs root (or --root DIR)".into());
    }
    let mut done = Vec::new();
    if live && Path::new(LOCAL_UNIT).exists() {
        let _ = Command::new("systemctl").args(["disable", "--now", "muster-agent"]).status();
        done.push("service stopped and disabled".into());
    }
    for path in [LOCAL_UNIT, LOCAL_BIN] {
        let p = under(&root, path);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            done.push(format!("removed {path}"));
        }
    }
    if args.purge {
        for path in [CONFIG_PATH, CA_PATH] {
            let _ = std::fs::remove_file(under(&root, path));
        }
        let state = under(&root, STATE_DIR);
        if state.exists() {
            std::fs::remove_dir_all(&state).map_err(|e| format!("{}: {e}", state.display()))?;
        }
        done.push(format!("removed the agent's identity and state ({STATE_DIR}) and config"));
    } else {
        done.push(format!("kept the agent's identity in {STATE_DIR} and its config: installing again brings it back"));
    }
    if live && done.iter().any(|d| d.starts_with("service")) {
        let _ = Command::new("systemctl").arg("daemon-reload").status();
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_config_reads_back_as_the_same_settings() {
        let labels = Labels::from_pairs(["site=paris", "role=pos"]).unwrap();
        let text = config_text("https://muster.example:8443", Some("kiosk \"7\""), &labels, None, &Kept::default());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        let settings = crate::config::Settings { config: Some(path), ..Default::default() };
        let c = Config::resolve(&settings).unwrap();
        assert_eq!(c.server, "https://muster.example:8443");
        assert_eq!(c.labels, labels);
        assert_eq!(c.hostname.as_deref(), Some("kiosk \"7\""));
        assert_eq!(c.state_dir, Path::new(STATE_DIR));
        assert_eq!(c.ca.as_deref(), Some(Path::new(CA_PATH)));
    }

    #[test]
    fn a_rewritten_config_keeps_the_policy_trusted_keys_and_run_as() {
        let key = format!("ed25519:{}", "ab".repeat(32));
        let old = format!(
            "server = \"https://h:1\"\nrun_as = \"nobody\"\ntrusted_keys = [\"{key}\"]\n\n[labels]\nsite = \"x\"\n\n\
             [policy]\nprograms = [\"/bin/true\"]\nargv_prefixes = [\n  [\"/bin/echo\", \"a\"],\n]\n"
        );
        let kept = Kept::from_text(&old);
        assert_eq!(kept.run_as.as_deref(), Some("nobody"));
        assert_eq!(kept.trusted_keys, [key]);
        assert!(kept.policy.as_deref().unwrap().contains("[\"/bin/echo\", \"a\"]"), "{kept:?}");
        let text = config_text("https://h:1", None, &Labels::from_pairs(["site=y"]).unwrap(), None, &kept);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, &text).unwrap();
        let c = Config::resolve(&crate::config::Settings { config: Some(path), ..Default::default() }).unwrap();
        assert_eq!(c.trusted_keys.len(), 1);
        assert_eq!(c.policy.run_as.as_ref().map(|r| r.user.as_str()), Some("nobody"));
        assert!(matches!(c.policy.commands, crate::policy::Commands::Listed { .. }), "{text}");
        assert_eq!(Kept::from_text(&text), kept, "stable across rewrites");
    }
}
