//! The CLI checks its arguments before sending anything: usage errors exit with status 2.

use std::process::Command;

fn muster() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_muster"));
    // A server that does not exist: a request sent by mistake would fail differently.
    c.env_clear().env("MUSTER_SERVER", "https://127.0.0.1:1").env("MUSTER_TOKEN", "mst_x");
    c
}

#[test]
fn bad_arguments_exit_with_status_two_and_say_why() {
    let out = muster().args(["enroll-token", "create", "--ttl", "forever"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid duration"));

    let out = muster().args(["agents", "--label", "role in (pos"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid selector"));
}

#[test]
fn an_unreachable_server_is_an_error_with_status_one() {
    let out = muster().args(["fleet"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}
