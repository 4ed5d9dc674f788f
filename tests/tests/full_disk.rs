//! A full disk under the server: writes are refused with a clear error, reads and every other
//! connection keep working, and what happened meanwhile is written once there is room again.
//!
//! The server's data directory is a small tmpfs of its own, mounted in a private mount
//! namespace (`unshare --user --map-root-user --mount`), so the test fills a real filesystem
//! without touching the machine's. The test reaches into it through `/proc/<pid>/root`.

// Helpers below are test code: a panic is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use shared::api::{AgentStatus, ApiError, CreateToken, Role};
use tests::{Api, Process, TEST_PING_INTERVAL, TestServer, bin, free_port, wait_for};

const SOON: Duration = Duration::from_secs(30);

/// A server whose data directory is a `size` tmpfs seen only by the server process.
async fn server_on_small_disk(size: &str) -> (TestServer, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let port = free_port();
    let log = dir.path().join("server-0.log");
    let token_file = dir.path().join("admin-token");
    // Mount, bootstrap an admin token (written outside the tmpfs), then become the server.
    let script = r#"mount -t tmpfs -o "size=$1" tmpfs "$2" || exit 97
"$3" --data-dir "$2" bootstrap --name test-admin > "$4" || exit 98
exec "$3" --data-dir "$2" --listen "127.0.0.1:$5" --ping-interval "$6" --sweep-interval 100ms"#;
    let child = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", size])
        .arg(&data)
        .arg(bin("muster-server"))
        .arg(&token_file)
        .arg(port.to_string())
        .arg(TEST_PING_INTERVAL)
        .env("MUSTER_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("unshare (util-linux) is needed for the full-disk test");
    let process = Process { child, log };
    // The data directory as the server sees it.
    let inside = PathBuf::from(format!("/proc/{}/root{}", process.pid(), data.display()));
    let ca_inside = inside.join("tls/ca.pem");
    wait_for("the server to generate its CA on its tmpfs", SOON, || {
        let ca = ca_inside.clone();
        async move { ca.exists().then_some(()) }
    })
    .await;
    let ca = dir.path().join("ca.pem");
    std::fs::copy(&ca_inside, &ca).unwrap();
    let admin_token = std::fs::read_to_string(&token_file).unwrap().trim().to_owned();
    let url = format!("https://127.0.0.1:{port}");
    let api = Api::new(&url, &admin_token, &ca);
    let probe = api.clone();
    wait_for("the server to answer /healthz", SOON, || {
        let api = probe.clone();
        async move { api.healthz().await.then_some(()) }
    })
    .await;
    let server = TestServer {
        dir,
        backend: tests::Backend::Sqlite,
        postgres: None,
        port,
        url,
        ca,
        admin_token,
        process: Some(process),
        api,
        extra_args: Vec::new(),
    };
    (server, inside)
}

/// Writes a file until the filesystem has no room left; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0x55u8; 64 * 1024];
    // Bounded: far more chunks than a small test filesystem can hold.
    for _ in 0..100_000 {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_data()) {
            assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
            return path;
        }
    }
    panic!("{} never filled up", dir.display());
}

async fn create_token(server: &TestServer, name: &str) -> reqwest::Response {
    server
        .api
        .http()
        .post(server.api.url("/tokens"))
        .bearer_auth(&server.admin_token)
        .json(&CreateToken { name: name.into(), role: Role::Viewer, ttl_secs: None, scope: None })
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_full_disk_refuses_writes_clearly_and_loses_nothing_once_there_is_room() {
    let (mut server, data) = server_on_small_disk("16m").await;
    let mut agents = server.spawn_agents(2, &["disk=small"]).await;
    let (mut leaving, leaving_id) = agents.remove(1);
    let (_staying, staying_id) = agents.remove(0);

    let filler = fill(&data);

    // Writes are refused with 507 and a sentence; SQLite may still have room in its log for a
    // few, so ask until one is refused.
    let mut n = 0;
    let refused: ApiError = wait_for("a write to be refused for want of space", SOON, || {
        n += 1;
        let name = format!("probe-{n}");
        let server = &server;
        async move {
            let resp = create_token(server, &name).await;
            (resp.status() == 507).then_some(resp)
        }
    })
    .await
    .json()
    .await
    .unwrap();
    assert!(refused.message.contains("nothing was changed"), "{refused:?}");

    // Reads go on, and so do the agents' connections.
    assert!(server.api.healthz().await);
    assert_eq!(server.api.agents().await.len(), 2);
    // An agent that goes away now cannot be recorded yet: the writer says so and keeps trying...
    leaving.process().kill();
    wait_for("the recorder to meet the full disk", SOON, || {
        let log = server.log();
        async move { log.contains("cannot write session records; retrying").then_some(()) }
    })
    .await;
    assert_eq!(server.api.agent(&leaving_id).await.summary.status, AgentStatus::Online, "not yet recorded");

    // ...and is, once there is room again; the server never stopped.
    std::fs::remove_file(&filler).unwrap();
    server.api.wait_status(&leaving_id, AgentStatus::Offline, SOON).await;
    assert_eq!(create_token(&server, "after").await.status(), 201);
    let before = server.api.agent(&staying_id).await.summary.last_heartbeat_at;
    wait_for("the staying agent's heartbeats to be stored again", SOON, || {
        let api = server.api.clone();
        let id = staying_id.clone();
        async move {
            let a = api.agent(&id).await;
            (a.summary.status == AgentStatus::Online && a.summary.last_heartbeat_at > before).then_some(())
        }
    })
    .await;
    assert!(server.process().child.try_wait().unwrap().is_none(), "the server is still running");
    assert!(server.log().contains("recorder caught up"), "{}", server.log());
}
