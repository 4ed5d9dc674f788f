//! `muster-agent check` and `muster-server check`: each broken setup is named in one line.

// Helpers below are test code: a panic is a failed test with its message.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};
use std::time::Duration;

use shared::api::AgentStatus;
use tests::{TestServer, bin};

fn agent_check(server: &str, ca: &std::path::Path, state: &std::path::Path) -> Output {
    Command::new(bin("muster-agent"))
        .env_clear()
        .args(["--config", "/dev/null", "--server", server])
        .arg("--ca")
        .arg(ca)
        .arg("--state-dir")
        .arg(state)
        .arg("check")
        .output()
        .unwrap()
}

fn says(out: &Output, code: i32, needle: &str) {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(code), "stdout: {stdout}\nstderr: {stderr}");
    let text = if code == 0 { &stdout } else { &stderr };
    assert!(text.contains(needle), "expected {needle:?} in: {text}");
    if code != 0 {
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
}

#[tokio::test]
async fn agent_check_names_each_broken_setup_in_one_line() {
    let server = TestServer::spawn().await;
    let other = TestServer::spawn().await;
    let token = server.enroll_token(1, &[]).await;
    let agent = server.spawn_agent(Some(&token), &[]);
    let id = agent.id().await;
    server.api.wait_status(&id, AgentStatus::Online, Duration::from_secs(15)).await;
    let state = agent.state.path();

    says(&agent_check(&server.url, &server.ca, state), 0, "trusts this agent");
    says(&agent_check(&server.url, &other.ca, state), 1, "not signed by a CA this agent trusts");
    let nothing_there = format!("https://127.0.0.1:{}", tests::free_port());
    says(&agent_check(&nothing_there, &server.ca, state), 1, "credential: it was issued by");
    let empty = tempfile::tempdir().unwrap();
    says(&agent_check(&nothing_there, &server.ca, empty.path()), 1, "credential: none in");

    let out = server.cli(&["agent", "revoke", id.as_str()]);
    assert!(out.status.success());
    says(&agent_check(&server.url, &server.ca, state), 1, "refused it: credential revoked");

    // Unreachable: the credential's server, with nothing listening any more.
    let mut server = server;
    server.process().kill();
    says(&agent_check(&server.url, &server.ca, state), 1, "reachability: cannot connect");
    drop(agent);
}

#[tokio::test]
async fn server_check_validates_the_data_directory_and_names_a_bad_certificate() {
    let server = TestServer::spawn().await;
    let out = Command::new(bin("muster-server")).env_clear().arg("--data-dir").arg(server.dir.path()).arg("check").output().unwrap();
    says(&out, 0, "is intact and up to date");

    let garbage = server.dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let out = Command::new(bin("muster-server"))
        .env_clear()
        .arg("--data-dir")
        .arg(server.dir.path())
        .arg("--tls-cert")
        .arg(&garbage)
        .arg("--tls-key")
        .arg(&garbage)
        .arg("check")
        .output()
        .unwrap();
    says(&out, 1, "TLS:");
    assert!(String::from_utf8_lossy(&out.stderr).contains("garbage.pem"));
}
