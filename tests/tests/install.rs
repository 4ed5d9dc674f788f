//! Putting the agent on a terminal: `muster-agent install` into a directory tree, run twice,
//! then uninstalled; and the systemd units as `systemd-analyze verify` sees them.

// Helpers below are test code: a panic is a failed test with its message.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use shared::api::AgentSummary;
use tests::{TestServer, bin};

fn agent(args: &[&str], root: &Path) -> Output {
    Command::new(bin("muster-agent")).env_clear().args(["--config", "/dev/null"]).args(args).arg("--root").arg(root).output().unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stdout: {}\nstderr: {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn install_writes_a_private_config_and_identity_enrolls_once_and_is_safe_to_repeat() {
    let server = TestServer::spawn().await;
    let token = server.enroll_token(1, &["site=lab"]).await;
    let root = tempfile::tempdir().unwrap();
    let ca = server.ca.to_str().unwrap();
    let install = ["install", "--server", &server.url, "--ca", ca, "--label", "role=pos", "--enroll-token", &token];

    let said = ok(&agent(&install, root.path()));
    assert!(said.contains("enrolled as"), "{said}");
    let at = |p: &str| root.path().join(p);
    let me = rustix::process::geteuid().as_raw();
    for (path, want) in [
        ("etc/muster/agent.toml", 0o600),
        ("etc/muster/ca.pem", 0o644),
        ("var/lib/muster-agent", 0o700),
        ("var/lib/muster-agent/credential.json", 0o600),
        ("etc/systemd/system/muster-agent.service", 0o644),
        ("usr/local/bin/muster-agent", 0o755),
    ] {
        assert_eq!(mode(&at(path)), want, "{path}");
        assert_eq!(std::fs::metadata(at(path)).unwrap().uid(), me, "{path} belongs to the installing user (root on a terminal)");
    }
    let unit = std::fs::read_to_string(at("etc/systemd/system/muster-agent.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/muster-agent --config /etc/muster/agent.toml"), "{unit}");
    let config = std::fs::read_to_string(at("etc/muster/agent.toml")).unwrap();
    assert!(config.contains(&format!("server = \"{}\"", server.url)) && config.contains("\"role\" = \"pos\""), "{config}");
    let credential = std::fs::read_to_string(at("var/lib/muster-agent/credential.json")).unwrap();

    let agents: Vec<AgentSummary> = server.api.get("/agents").await;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].labels.to_string(), "agent.role=pos,site=lab");

    // Again, with the token now used up: nothing breaks, the identity stays.
    let said = ok(&agent(&install, root.path()));
    assert!(said.contains("already enrolled"), "{said}");
    assert_eq!(std::fs::read_to_string(at("var/lib/muster-agent/credential.json")).unwrap(), credential);
    assert_eq!(std::fs::read_to_string(at("etc/muster/agent.toml")).unwrap(), config);
    assert_eq!(server.api.agents().await.len(), 1);

    // What was installed works: the installed config, pointed at this tree, passes the check.
    let check = Command::new(bin("muster-agent"))
        .env_clear()
        .arg("--config")
        .arg(at("etc/muster/agent.toml"))
        .arg("--ca")
        .arg(at("etc/muster/ca.pem"))
        .arg("--state-dir")
        .arg(at("var/lib/muster-agent"))
        .arg("check")
        .output()
        .unwrap();
    assert!(ok(&check).contains("trusts this agent"));

    // Uninstall keeps the identity unless asked; purge removes it.
    ok(&agent(&["uninstall"], root.path()));
    assert!(!at("etc/systemd/system/muster-agent.service").exists() && !at("usr/local/bin/muster-agent").exists());
    assert!(at("var/lib/muster-agent/credential.json").exists());
    ok(&agent(&["uninstall", "--purge"], root.path()));
    assert!(!at("var/lib/muster-agent").exists() && !at("etc/muster/agent.toml").exists());
}

#[tokio::test]
async fn install_without_a_token_or_with_a_bad_one_fails_clearly_and_enrolls_nothing() {
    let server = TestServer::spawn().await;
    let root = tempfile::tempdir().unwrap();
    let ca = server.ca.to_str().unwrap();
    let out = agent(&["install", "--server", &server.url, "--ca", ca], root.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--enroll-token"));
    let fake = format!("mse_0000000000000000_{}", "0".repeat(64));
    let out = agent(&["install", "--server", &server.url, "--ca", ca, "--enroll-token", &fake], root.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(server.api.agents().await.is_empty());
}

/// Each unit, with ExecStart pointing at the freshly built binary, verifies with no warning at
/// all (systemd-analyze exits 0 on unknown keys, so its output is what tells).
#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    assert!(analyze.exists(), "systemd-analyze is missing: install Debian's systemd package (.ci/run does)");
    let dir = tempfile::tempdir().unwrap();
    let packaging = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
    for (unit, program) in [("muster-agent.service", "muster-agent"), ("muster-server.service", "muster-server")] {
        let text = std::fs::read_to_string(packaging.join(unit)).unwrap();
        let text = text.replace(&format!("/usr/bin/{program}"), bin(program).to_str().unwrap());
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        let out = Command::new(analyze).args(["verify", "--man=no"]).arg(&path).output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.trim().is_empty(), "{unit}: {said}");
    }
}

#[tokio::test]
async fn the_printed_install_command_pins_the_servers_ca_and_a_wrong_pin_is_refused() {
    let server = TestServer::spawn().await;
    let printed = ok(&server.cli(&["enroll-token", "create", "--uses", "2", "--install-command"]));
    let line = printed.lines().map(str::trim).find(|l| l.starts_with("muster-agent install")).unwrap_or_else(|| panic!("{printed}"));
    let args: Vec<&str> = line.split_whitespace().skip(1).collect();
    assert!(args.contains(&"--ca-fingerprint"), "{line}");

    let root = tempfile::tempdir().unwrap();
    let said = ok(&agent(&args, root.path()));
    assert!(said.contains("learned the server's CA") && said.contains("enrolled as"), "{said}");
    let squash = |s: String| s.split_whitespace().collect::<String>();
    let saved = std::fs::read_to_string(root.path().join("etc/muster/ca.pem")).unwrap();
    assert_eq!(squash(saved), squash(std::fs::read_to_string(&server.ca).unwrap()), "the saved CA is the server's");

    let pin_at = args.iter().position(|a| *a == "--ca-fingerprint").unwrap() + 1;
    let wrong = format!("sha256:{}", "0".repeat(64));
    let mut bad: Vec<&str> = args.clone();
    bad[pin_at] = &wrong;
    let other_root = tempfile::tempdir().unwrap();
    let out = agent(&bad, other_root.path());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not match the pinned fingerprint"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!other_root.path().join("var/lib/muster-agent/credential.json").exists(), "nothing enrolled with an unverified server");
}
