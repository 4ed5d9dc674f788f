//! The server binary refuses a bad configuration with one clear line and exit status 64.

use std::process::Command;

fn server() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_muster-server"));
    c.env_clear();
    c
}

#[test]
fn a_config_file_with_an_unknown_key_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:9\"\nping_intervall = \"5s\"\n").unwrap();
    let out = server().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("ping_intervall"), "{err}");
}

#[test]
fn an_out_of_range_setting_from_the_environment_is_refused() {
    let out = server().env("MUSTER_PING_INTERVAL", "1ms").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ping_interval"));
}

#[test]
fn a_port_already_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = server().arg("--listen").arg(&addr).arg("--data-dir").arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on") && err.contains(&addr), "{err}");
}
