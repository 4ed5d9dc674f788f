//! What the security notes (docs/security.md) promise, as a user sees it: secrets read from
//! files and standard input, short-lived enrollment tokens by default, private files, the
//! headers of HTTPS answers.

// Helpers below are test code: a panic is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use shared::api::{CreateEnrollToken, CreateToken, EnrollTokenCreated, Role};
use tests::{Process, TestServer, bin, wait_for};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// Runs `cmd`, writing `stdin` to its standard input.
fn run_with_stdin(mut cmd: Command, stdin: &str) -> Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// `muster` against this server with no token in the environment.
fn muster(server: &TestServer, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("muster"));
    cmd.args(args)
        .env_remove("MUSTER_TOKEN")
        .env_remove("MUSTER_TOKEN_FILE")
        .env("MUSTER_SERVER", &server.url)
        .env("MUSTER_CA", &server.ca);
    cmd
}

fn said(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test]
async fn the_cli_reads_its_token_from_a_file_or_standard_input() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{}\n", server.admin_token)).unwrap();

    let out = muster(&server, &["whoami", "--token-file", file.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success() && said(&out).contains("test-admin"), "{}", said(&out));
    let out = run_with_stdin(muster(&server, &["--token-file", "-", "whoami"]), &server.admin_token);
    assert!(out.status.success() && said(&out).contains("test-admin"), "{}", said(&out));
    let mut from_env = muster(&server, &["whoami"]);
    from_env.env("MUSTER_TOKEN_FILE", &file);
    assert!(from_env.output().unwrap().status.success());

    // Both at once is ambiguous, and an empty file says so.
    let out = muster(&server, &["whoami", "--token", "x", "--token-file", file.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", said(&out));
    std::fs::write(&file, "\n").unwrap();
    let out = muster(&server, &["whoami", "--token-file", file.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success() && said(&out).contains("empty"), "{}", said(&out));
}

#[tokio::test]
async fn an_agent_takes_its_enrollment_token_from_standard_input_or_a_file_and_keeps_its_state_private() {
    let server = TestServer::spawn().await;
    let token = server.enroll_token(2, &["site=lab"]).await;

    // Installed, with the token on standard input.
    let root = tempfile::tempdir().unwrap();
    let mut install = Command::new(bin("muster-agent"));
    install.env_clear().args(["--config", "/dev/null", "install", "--server", &server.url, "--ca"]).arg(&server.ca);
    install.args(["--enroll-token-file", "-", "--root"]).arg(root.path());
    let out = run_with_stdin(install, &format!("{token}\n"));
    assert!(out.status.success() && said(&out).contains("enrolled as"), "{}", said(&out));

    // Run by hand, with the token in a file, into a state directory that does not exist yet.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("enroll-token");
    std::fs::write(&file, &token).unwrap();
    let state = dir.path().join("state");
    let log = dir.path().join("agent.log");
    let child = Command::new(bin("muster-agent"))
        .env_clear()
        .args(["--config", "/dev/null", "--server", &server.url, "--ca"])
        .arg(&server.ca)
        .arg("--state-dir")
        .arg(&state)
        .arg("--enroll-token-file")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _agent = Process { child, log };
    let credential = state.join("credential.json");
    wait_for("the hand-run agent to enroll", Duration::from_secs(20), || {
        let credential = credential.clone();
        async move { credential.exists().then_some(()) }
    })
    .await;
    assert_eq!(mode(&state), 0o700, "the state directory it created");
    assert_eq!(mode(&credential), 0o600);
    assert_eq!(server.api.agents().await.len(), 2);
}

#[tokio::test]
async fn enrollment_tokens_are_short_lived_unless_the_operator_says_otherwise() {
    let server = TestServer::spawn().await;
    let defaults = CreateEnrollToken { ttl_secs: None, uses: None, labels: Default::default(), approve: false };
    let created: EnrollTokenCreated = server.api.post("/enroll-tokens", &defaults).await;
    let info = created.info;
    assert_eq!((info.uses_total, info.uses_left), (10, 10));
    assert_eq!(info.expires_at.unix_millis() - info.created_at.unix_millis(), 24 * 3600 * 1000);

    // The CLI leaves the defaults to the server; explicit values work up to the caps.
    let out = server.cli(&["enroll-token", "create"]);
    assert!(out.status.success() && said(&out).contains(": 10 use(s)"), "{}", said(&out));
    let most = CreateEnrollToken { ttl_secs: Some(30 * 86_400), uses: Some(1_000_000), labels: Default::default(), approve: false };
    let created: EnrollTokenCreated = server.api.post("/enroll-tokens", &most).await;
    assert_eq!(created.info.uses_total, 1_000_000);
    let over = CreateEnrollToken { ttl_secs: Some(30 * 86_400 + 1), uses: None, labels: Default::default(), approve: false };
    let resp = server.api.http().post(server.api.url("/enroll-tokens")).bearer_auth(&server.admin_token).json(&over).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    // All of its fields may be left out, but the body is still an object.
    let resp = server
        .api
        .http()
        .post(server.api.url("/enroll-tokens"))
        .bearer_auth(&server.admin_token)
        .header("content-type", "application/json")
        .body("[null, null]")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn a_server_creates_its_data_directory_and_database_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("new/data");
    let out = Command::new(bin("muster-server")).arg("--data-dir").arg(&data).args(["bootstrap", "--name", "t"]).output().unwrap();
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("muster.db")), 0o600);

    // Serving, the database's companions (write-ahead log, shared memory) are private too.
    let port = tests::free_port();
    let log = dir.path().join("server.log");
    let child = Command::new(bin("muster-server"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _server = Process { child, log };
    let tls = data.join("tls");
    wait_for("the server to write its TLS identity and open the database", Duration::from_secs(20), || {
        let (data, tls) = (data.clone(), tls.clone());
        async move {
            (data.join("muster.db-wal").exists() && data.join("muster.db-shm").exists() && tls.join("server.pem").exists()).then_some(())
        }
    })
    .await;
    for file in ["muster.db", "muster.db-wal", "muster.db-shm", "tls/ca-key.pem", "tls/server-key.pem"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    assert_eq!(mode(&tls), 0o700);
}

#[tokio::test]
async fn answers_insist_on_https_new_secrets_stay_out_of_caches_and_strangers_see_no_version() {
    let server = TestServer::spawn().await;
    let http = server.api.http();
    let hsts = |r: &reqwest::Response| r.headers().get("strict-transport-security").map(|v| v.to_str().unwrap().to_owned());
    let no_store = |r: &reqwest::Response| r.headers().get("cache-control").is_some_and(|v| v == "no-store");

    let health = |token: Option<String>| {
        let mut req = http.get(format!("{}/healthz", server.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(hsts(&resp).as_deref(), Some("max-age=31536000"));
            resp.json::<serde_json::Value>().await.unwrap()
        }
    };
    assert_eq!(health(None).await, serde_json::json!({ "status": "ok" }));
    assert_eq!(health(Some(format!("mst_0000000000000000_{}", "0".repeat(64)))).await, serde_json::json!({ "status": "ok" }));
    assert_eq!(health(Some(server.admin_token.clone())).await["version"], env!("CARGO_PKG_VERSION"));

    for path in ["/", "/ui/app.js", "/api/v1/fleet", "/api/v1/nope"] {
        let resp = http.get(format!("{}{path}", server.url)).bearer_auth(&server.admin_token).send().await.unwrap();
        assert!(hsts(&resp).is_some(), "{path}");
        assert!(!no_store(&resp), "{path} carries no secret");
    }
    let create = CreateToken { name: "ci".into(), role: Role::Viewer, ttl_secs: None, scope: None };
    let resp = http.post(server.api.url("/tokens")).bearer_auth(&server.admin_token).json(&create).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    assert!(no_store(&resp) && hsts(&resp).is_some());
    let create = CreateEnrollToken { ttl_secs: None, uses: Some(1), labels: Default::default(), approve: false };
    let resp = http.post(server.api.url("/enroll-tokens")).bearer_auth(&server.admin_token).json(&create).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    assert!(no_store(&resp));

    // The upgrade of an enrollment, whose credential follows in `welcome`, is not to be kept
    // either; an agent's ordinary reconnection carries nothing new.
    let token = resp.json::<EnrollTokenCreated>().await.unwrap().token;
    let (mut ws, headers) = tests::ws::upgrade(&server.url, &token, &server.ca).await;
    assert_eq!(headers.get("cache-control").map(|v| v.to_str().unwrap()), Some("no-store"));
    let welcome = tests::ws::open(&mut ws, "kiosk-1", 1000).await;
    let credential = welcome.credential.expect("an enrollment's welcome carries the credential");
    drop(ws);
    let (_ws, headers) = tests::ws::upgrade(&server.url, &credential, &server.ca).await;
    assert!(headers.get("cache-control").is_none(), "{headers:?}");
}
