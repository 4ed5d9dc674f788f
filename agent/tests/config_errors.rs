//! The agent binary refuses a bad configuration with one clear line and exit status 64, so a
//! service manager does not restart it in a loop.

use std::process::Command;

fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_muster-agent"));
    c.env_clear().arg("--config").arg("/dev/null");
    c
}

#[test]
fn a_plain_http_server_url_is_refused() {
    let out = agent().args(["--server", "http://127.0.0.1:8443"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("https://"), "{err}");
}

#[test]
fn a_missing_server_is_refused() {
    let out = agent().output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no server"));
}

#[test]
fn an_invalid_label_is_refused() {
    let out = agent().args(["--server", "https://127.0.0.1:1", "--label", "has space=x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("label"));
}

#[test]
fn without_credential_or_enrollment_token_the_agent_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent().args(["--server", "https://127.0.0.1:1"]).arg("--state-dir").arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("enrollment token"));
}
