//! The web dashboard in a real browser: Debian's headless Chromium, driven by playwright-core
//! (tests/browser/dashboard.mjs), against a real server and real agents over HTTPS.
//!
//! Needs `chromium` (Debian's package) and Node.js; `.ci/run` installs Chromium, and this test
//! installs playwright-core from tests/browser/package-lock.json itself if it is missing.

// Helpers below are test code: a panic is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shared::AgentId;
use shared::api::{AgentStatus, CreateToken, Role, TokenCreated};
use tests::{Backend, TestAgent, TestServer};

const CHROMIUM: &str = "/usr/bin/chromium";
/// The script stops itself after 150 s; this is the test's own bound on top of that.
const DEADLINE: Duration = Duration::from_secs(180);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// playwright-core, as pinned by the lock file; installed once per checkout.
fn ensure_playwright() {
    let dir = browser_dir();
    if dir.join("node_modules/playwright-core/package.json").exists() {
        return;
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .output()
        .expect("npm is needed for the dashboard test (Debian: apt-get install nodejs npm)");
    assert!(out.status.success(), "npm ci in {} failed:\n{}", dir.display(), String::from_utf8_lossy(&out.stderr));
}

async fn named_agent(server: &TestServer, hostname: &str, label: &str) -> (TestAgent, AgentId) {
    let token = server.enroll_token(1, &[label]).await;
    let agent = server.spawn_agent_as(Some(hostname), Some(&token), &[]);
    let id = agent.id().await;
    server.api.wait_status(&id, AgentStatus::Online, Duration::from_secs(30)).await;
    (agent, id)
}

/// An agent whose own agent.toml trusts a freshly generated key: it runs only signed jobs.
async fn signed_agent(server: &TestServer, dir: &Path) -> (TestAgent, AgentId, String) {
    let key = dir.join("signing.key");
    let out = server.cli(&["key", "generate", "--out", key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let token = server.enroll_token(1, &["role=till"]).await;
    let config = format!("hostname = \"till-signed\"\ntrusted_keys = [{public:?}]\n");
    let agent = server.spawn_agent_with_config(Some(&token), &["lane=7"], &config);
    let id = agent.id().await;
    server.api.wait_status(&id, AgentStatus::Online, Duration::from_secs(30)).await;
    (agent, id, public)
}

async fn the_dashboard_shows_the_fleet_live_and_runs_a_command(backend: Backend) {
    let chromium = std::env::var("MUSTER_CHROMIUM").unwrap_or_else(|_| CHROMIUM.to_owned());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: the dashboard test needs Debian's chromium (apt-get install chromium; .ci/run does this)"
    );
    ensure_playwright();

    let server = TestServer::spawn_on(backend, &[]).await;
    let (mut victim, victim_id) = named_agent(&server, "kiosk-victim", "role=victim").await;
    let (_worker, worker_id) = named_agent(&server, "pos-worker", "role=worker").await;
    let keys = tempfile::tempdir().unwrap();
    let (_till, till_id, till_key) = signed_agent(&server, keys.path()).await;
    let operator: TokenCreated =
        server.api.post("/tokens", &CreateToken { name: "browser".into(), role: Role::Operator, ttl_secs: Some(600), scope: None }).await;

    let viewer: TokenCreated =
        server.api.post("/tokens", &CreateToken { name: "onlooker".into(), role: Role::Viewer, ttl_secs: Some(600), scope: None }).await;

    let shots = std::env::var("MUSTER_SCREENSHOTS").ok();
    let mut node = Command::new("node")
        .arg(browser_dir().join("dashboard.mjs"))
        .current_dir(browser_dir())
        .env("MUSTER_URL", &server.url)
        .env("MUSTER_TOKEN", &operator.token)
        .env("MUSTER_VIEWER_TOKEN", &viewer.token)
        .env("MUSTER_VICTIM", victim_id.as_str())
        .env("MUSTER_WORKER", worker_id.as_str())
        .env("MUSTER_SIGNED", till_id.as_str())
        .env("MUSTER_SIGNED_KEY", &till_key)
        .env("MUSTER_CHROMIUM", &chromium)
        .envs(shots.iter().map(|s| ("MUSTER_SHOTS", s.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node is needed for the dashboard test");
    let mut stdin = node.stdin.take().unwrap();

    // The script's stdout, line by line, on a thread: it asks for the kill by printing a line.
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = node.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = node.stderr.take().unwrap();
    let errors = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());

    let started = Instant::now();
    let mut seen = Vec::new();
    let mut killed = false;
    let status = loop {
        if let Some(status) = node.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = node.kill();
            panic!("the browser test did not finish in {DEADLINE:?}; it said:\n{}", seen.join("\n"));
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if line == "kill-agent" {
                    victim.process().kill();
                    killed = true;
                    writeln!(stdin, "killed").unwrap();
                }
                seen.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = node.wait().unwrap();
                break status;
            }
        }
    };
    seen.extend(rx.try_iter());
    let errors = errors.join().unwrap_or_default();
    assert!(status.success(), "the browser test failed:\n{}\n{errors}\nserver log:\n{}", seen.join("\n"), server.log());
    assert!(killed && seen.last().map(String::as_str) == Some("ok"), "{}", seen.join("\n"));

    // What the page showed is what the server holds: the label the editor set and not the
    // one it removed, each edit audited.
    assert_eq!(server.api.agent(&victim_id).await.summary.status, AgentStatus::Offline);
    let worker = server.api.agent(&worker_id).await.summary;
    assert_eq!(worker.labels.to_string(), "role=worker,zone=b", "{worker:?}");
    let audit: shared::api::AuditPage = server.api.get("/audit?limit=1000").await;
    let edits: Vec<_> =
        audit.entries.iter().filter(|e| e.action == "agent.labels" && e.target.as_deref() == Some(worker_id.as_str())).collect();
    assert_eq!(edits.len(), 2, "one entry per edit: {edits:?}");
    assert!(edits.iter().all(|e| e.actor.contains("browser")), "{edits:?}");
}

async fn the_audit_page_pages_through_the_log_for_admins_only(backend: Backend) {
    let chromium = std::env::var("MUSTER_CHROMIUM").unwrap_or_else(|_| CHROMIUM.to_owned());
    assert!(Path::new(&chromium).exists(), "{chromium} is missing: the dashboard test needs Debian's chromium (apt-get install chromium)");
    ensure_playwright();

    let server = TestServer::spawn_on(backend, &[]).await;
    let operator: TokenCreated = server
        .api
        .post("/tokens", &CreateToken { name: "<img src=x onerror=alert(1)>".into(), role: Role::Operator, ttl_secs: None, scope: None })
        .await;
    let mut last = None;
    for n in 0..110 {
        let t: TokenCreated =
            server.api.post("/tokens", &CreateToken { name: format!("t{n}"), role: Role::Viewer, ttl_secs: None, scope: None }).await;
        last = Some(t.info.id);
    }
    let resp = server
        .api
        .http()
        .delete(server.api.url(&format!("/tokens/{}", last.unwrap())))
        .bearer_auth(&server.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let page: shared::api::AuditPage = server.api.get("/audit?limit=1000").await;
    let entries = page.entries.len();
    assert!((101..200).contains(&entries), "{entries}");

    let said = run_script(
        "audit.mjs",
        &[
            ("MUSTER_URL", server.url.clone()),
            ("MUSTER_ADMIN_TOKEN", server.admin_token.clone()),
            ("MUSTER_TOKEN", operator.token.clone()),
            ("MUSTER_ENTRIES", entries.to_string()),
            ("MUSTER_CHROMIUM", chromium),
        ],
    )
    .await;
    assert!(said.trim_end().ends_with("ok"), "the audit page test failed:\n{said}");
}

/// Runs a browser script with these variables (and MUSTER_SHOTS from MUSTER_SCREENSHOTS)
/// within the deadline; panics with what it said unless it exits 0. Returns what it said.
async fn run_script(script: &str, envs: &[(&str, String)]) -> String {
    let shots = std::env::var("MUSTER_SCREENSHOTS").ok();
    let mut node = Command::new("node")
        .arg(browser_dir().join(script))
        .current_dir(browser_dir())
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .envs(shots.iter().map(|s| ("MUSTER_SHOTS", s.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node is needed for the dashboard test");
    let started = Instant::now();
    while node.try_wait().unwrap().is_none() {
        if started.elapsed() > DEADLINE {
            let _ = node.kill();
            panic!("{script} did not finish in {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = node.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{said}");
    said
}

async fn admins_accept_agents_rotate_credentials_see_clones_and_approve_jobs_from_the_dashboard(backend: Backend) {
    let chromium = std::env::var("MUSTER_CHROMIUM").unwrap_or_else(|_| CHROMIUM.to_owned());
    assert!(Path::new(&chromium).exists(), "{chromium} is missing: the dashboard test needs Debian's chromium (apt-get install chromium)");
    ensure_playwright();

    let server = TestServer::spawn_on(backend, &["--approval-above", "1"]).await;
    // An agent enrolled with an approve token, waiting.
    let approve: shared::api::EnrollTokenCreated = server
        .api
        .post(
            "/enroll-tokens",
            &shared::api::CreateEnrollToken { ttl_secs: None, uses: Some(1), labels: Default::default(), approve: true },
        )
        .await;
    let mut waiting = server.spawn_agent_as(Some("kiosk-new"), Some(&approve.token), &[]);
    let pending = waiting.id().await;
    server.api.wait_status(&pending, AgentStatus::Online, Duration::from_secs(30)).await;
    // An agent rotated once, whose old credential then came back from somewhere.
    let (mut rotated, cloned) = named_agent(&server, "pos-rotated", "role=worker").await;
    let old = std::fs::read_to_string(rotated.credential_path()).unwrap();
    let old: String = serde_json::from_str::<serde_json::Value>(&old).unwrap()["token"].as_str().unwrap().to_owned();
    let resp = server.api.raw_post(&format!("/agents/{cloned}/rotate-credential"), &serde_json::json!({})).await;
    assert_eq!(resp.status(), 202);
    tests::wait_for("the rotation", Duration::from_secs(20), || async {
        let d = server.api.agent(&cloned).await;
        (d.credential_issued_at > d.enrolled_at).then_some(())
    })
    .await;
    let http = server.api.http();
    let refused = http.get(server.api.url("/agent/check")).bearer_auth(&old).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    tests::wait_for("the clone report", Duration::from_secs(20), || async { server.api.agent(&cloned).await.clone_seen }).await;
    // A job on both accepted agents, made by the bootstrap admin: it waits for a second admin.
    let (mut other, _) = named_agent(&server, "pos-other", "role=worker").await;
    let big = server.api.create_job(&tests::job(shared::job::Target::All, tests::shell("echo both"))).await;
    assert_eq!((big.total, big.approval.is_some()), (2, true), "{big:?}");
    let second: TokenCreated =
        server.api.post("/tokens", &CreateToken { name: "second-admin".into(), role: Role::Admin, ttl_secs: Some(600), scope: None }).await;
    let said = run_script(
        "admin.mjs",
        &[
            ("MUSTER_URL", server.url.clone()),
            ("MUSTER_TOKEN", second.token.clone()),
            ("MUSTER_PENDING", pending.to_string()),
            ("MUSTER_CLONED", cloned.to_string()),
            ("MUSTER_JOB", big.id.to_string()),
            ("MUSTER_CHROMIUM", chromium),
        ],
    )
    .await;
    assert!(said.trim_end().ends_with("ok"), "{said}");

    // What the page did is what the server holds, done by the browser's admin.
    assert!(!server.api.agent(&pending).await.summary.pending);
    tests::wait_for("the browser's rotation to complete", Duration::from_secs(20), || async {
        let d = server.api.agent(&pending).await;
        (d.rotation_requested_at.is_none() && d.credential_issued_at > d.enrolled_at).then_some(())
    })
    .await;
    let done = server.api.wait_job_finished(&big.id, Duration::from_secs(30)).await;
    assert!(done.job.approval.and_then(|a| a.approved_by).is_some_and(|by| by.starts_with("second-admin")));
    let audit: shared::api::AuditPage = server.api.get("/audit?limit=1000").await;
    for action in ["agent.accept", "agent.rotate_credential", "job.approve"] {
        let by: Vec<&str> =
            audit.entries.iter().filter(|e| e.action == action && e.actor.starts_with("second-admin")).map(|e| e.action.as_str()).collect();
        assert!(!by.is_empty(), "{action} by the browser's admin: {:?}", audit.entries);
    }
    waiting.process().kill();
    rotated.process().kill();
    other.process().kill();
}

tests::on_both_backends!(
    the_dashboard_shows_the_fleet_live_and_runs_a_command,
    the_audit_page_pages_through_the_log_for_admins_only,
    admins_accept_agents_rotate_credentials_see_clones_and_approve_jobs_from_the_dashboard,
);
