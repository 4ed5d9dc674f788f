//! The operators' API and CLI: authentication, roles, and what `muster` prints.

use std::time::Duration;

use shared::api::{AgentStatus, AgentSummary, ApiError, CreateToken, FleetCounts, Role, TokenCreated};
use tests::TestServer;

#[tokio::test]
async fn api_refuses_requests_without_a_valid_token() {
    let server = TestServer::spawn().await;
    let http = server.api.http();

    let resp = http.get(server.api.url("/agents")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let err: ApiError = resp.json().await.unwrap();
    assert_eq!(err.error, "unauthorized");

    for bad in [
        "Bearer nonsense",
        "Basic YWRtaW46YWRtaW4=",
        "Bearer mst_0000000000000000_0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let resp = http.get(server.api.url("/fleet")).header("authorization", bad).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{bad}");
    }

    // A viewer reads but may not manage; a revoked or expired token does nothing at all.
    let viewer: TokenCreated =
        server.api.post("/tokens", &CreateToken { name: "dash".into(), role: Role::Viewer, ttl_secs: None, scope: None }).await;
    let as_viewer = server.api.with_token(&viewer.token);
    let _: FleetCounts = as_viewer.get("/fleet").await;
    let resp = as_viewer
        .http()
        .post(as_viewer.url("/tokens"))
        .bearer_auth(&viewer.token)
        .json(&CreateToken { name: "x".into(), role: Role::Admin, ttl_secs: None, scope: None })
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = server
        .api
        .http()
        .delete(server.api.url(&format!("/tokens/{}", viewer.info.id)))
        .bearer_auth(&server.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(as_viewer.raw_get("/fleet").await.status(), 401);

    // Health needs no token; unknown routes and bad input are JSON errors.
    assert!(server.api.healthz().await);
    let resp = server.api.raw_get("/nope").await;
    assert_eq!(resp.status(), 404);
    let _: ApiError = resp.json().await.unwrap();
    let resp = server.api.raw_get("/agents?status=sideways").await;
    assert_eq!(resp.status(), 400);
    // A malformed id is a 400 on every route, before any lookup; a well-formed unknown one a 404.
    for path in ["/agents/zzzz", "/jobs/zzzz", "/jobs/0123456789ABCDEF/events", "/agents/%FF/runs"] {
        let resp = server.api.raw_get(path).await;
        assert_eq!(resp.status(), 400, "{path}");
        assert_eq!(resp.json::<ApiError>().await.unwrap().error, "bad_request", "{path}");
    }
    for path in ["/tokens/zzzz", "/enroll-tokens/0123"] {
        let resp = server.api.http().delete(server.api.url(path)).bearer_auth(&server.admin_token).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{path}");
    }
    assert_eq!(server.api.raw_get("/jobs/0123456789abcdef").await.status(), 404);
    let resp = server
        .api
        .http()
        .post(server.api.url("/tokens"))
        .bearer_auth(&server.admin_token)
        .header("content-type", "application/json")
        .body("{\"name\":")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let _: ApiError = resp.json().await.unwrap();
}

#[tokio::test]
async fn cli_creates_an_enrollment_token_and_lists_the_agent_that_used_it() {
    let server = TestServer::spawn().await;
    let out = server.cli(&["enroll-token", "create", "--ttl", "1h", "--uses", "2", "--label", "site=paris"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout.lines().next().unwrap().trim().to_owned();
    assert!(token.starts_with("mse_"), "{stdout}");

    let agent = server.spawn_agent(Some(&token), &["role=kiosk"]);
    let id = agent.id().await;
    server.api.wait_status(&id, AgentStatus::Online, Duration::from_secs(15)).await;
    tests::wait_for("metrics from the first heartbeat", Duration::from_secs(15), || async {
        server.api.agent(&id).await.summary.metrics.map(|_| ())
    })
    .await;

    let out = server.cli(&["agents"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(table.starts_with("STATUS"), "{table}");
    let row = table.lines().find(|l| l.contains(id.as_str())).unwrap_or_else(|| panic!("agent in table:\n{table}"));
    assert!(row.starts_with("online") && row.contains("agent.role=kiosk,site=paris"), "{row}");

    // The agent's own `role` is a reported label: selectors name it with its prefix.
    let out = server.cli(&["agents", "--json", "--label", "site=paris,agent.role in (kiosk,pos)"]);
    let listed: Vec<AgentSummary> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 1);
    let out = server.cli(&["agents", "--json", "--label", "!site"]);
    let listed: Vec<AgentSummary> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(listed.is_empty());

    let out = server.cli(&["agent", id.as_str()]);
    let detail = String::from_utf8(out.stdout).unwrap();
    assert!(detail.contains("Status     online") && detail.contains("offline  online  connected"), "{detail}");
    let out = server.cli(&["fleet"]);
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "1 agent: 1 online, 0 stale, 0 offline");
    drop(agent);
}

#[tokio::test]
async fn cli_reports_a_refused_token_and_bad_arguments_with_non_zero_status() {
    let server = TestServer::spawn().await;
    let out = std::process::Command::new(tests::bin("muster"))
        .args(["agents"])
        .env("MUSTER_SERVER", &server.url)
        .env("MUSTER_TOKEN", "mst_0000000000000000_0000000000000000000000000000000000000000000000000000000000000000")
        .env("MUSTER_CA", &server.ca)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused the token"));

    let out = server.cli(&["agents", "--status", "sideways"]);
    assert_eq!(out.status.code(), Some(2));
    let out = std::process::Command::new(tests::bin("muster"))
        .args(["fleet"])
        .env_remove("MUSTER_SERVER")
        .env_remove("MUSTER_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no server"));

    // Untrusted certificate: the CLI refuses to talk and says why.
    let out = std::process::Command::new(tests::bin("muster"))
        .args(["fleet"])
        .env("MUSTER_SERVER", &server.url)
        .env("MUSTER_TOKEN", &server.admin_token)
        .env_remove("MUSTER_CA")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).to_lowercase().contains("certificate"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Parses Prometheus text exposition into (series, value), failing on any malformed line.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix('#') {
            let words: Vec<&str> = rest.split_whitespace().collect();
            assert!(matches!(words.first(), Some(&"HELP") | Some(&"TYPE")), "bad comment line: {line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels: {line}");
        }
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        out.push((series.to_owned(), value));
    }
    out
}

#[tokio::test]
async fn metrics_are_prometheus_text_need_a_token_and_their_counters_move() {
    let server = TestServer::spawn().await;
    let anonymous = server.api.http().get(format!("{}/metrics", server.url)).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);

    let token = server.enroll_token(1, &[]).await;
    let agent = server.spawn_agent(Some(&token), &[]);
    let id = agent.id().await;
    server.api.wait_status(&id, AgentStatus::Online, Duration::from_secs(15)).await;

    let scrape = || async {
        let resp = server.api.http().get(format!("{}/metrics", server.url)).bearer_auth(&server.admin_token).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        parse_prometheus(&resp.text().await.unwrap())
    };
    let value = |m: &[(String, f64)], series: &str| m.iter().find(|(s, _)| s == series).map(|(_, v)| *v);
    let first = scrape().await;
    assert_eq!(value(&first, "muster_agents_connected"), Some(1.0));
    assert_eq!(value(&first, r#"muster_agents{status="online"}"#), Some(1.0));
    assert_eq!(value(&first, &format!(r#"muster_build_info{{version="{}"}}"#, shared::VERSION)), Some(1.0));
    assert!(first.iter().any(|(s, _)| s.starts_with("muster_db_batch_write_seconds_bucket")), "a histogram of write latency");
    let heartbeats = r#"muster_ws_messages_received_total{type="heartbeat"}"#;
    let before = value(&first, heartbeats).unwrap_or(0.0);
    tests::wait_for("the heartbeat counter to move", Duration::from_secs(15), || async {
        let now = scrape().await;
        (value(&now, heartbeats).unwrap_or(0.0) > before).then_some(())
    })
    .await;
    drop(agent);
}

/// What the OpenAPI document promises of tokens: a name is counted in characters, and a ttl is
/// at most max_token_ttl.
#[tokio::test]
async fn token_names_count_characters_and_ttls_are_capped() {
    let server = TestServer::spawn().await;
    let create = |name: String, ttl_secs: Option<u64>| {
        let req = CreateToken { name, role: Role::Viewer, ttl_secs, scope: None };
        server.api.http().post(server.api.url("/tokens")).bearer_auth(&server.admin_token).json(&req).send()
    };
    assert_eq!(create("é".repeat(64), None).await.unwrap().status(), 201);
    assert_eq!(create("é".repeat(65), None).await.unwrap().status(), 400);
    // A ttl past max_token_ttl (a year by default) is refused; the longest allowed is taken.
    assert_eq!(create("forever".into(), Some(u64::MAX)).await.unwrap().status(), 400);
    let resp = create("a year".into(), Some(365 * 86_400)).await.unwrap();
    assert_eq!(resp.status(), 201);
    let created: TokenCreated = resp.json().await.unwrap();
    assert!(created.info.expires_at.is_some());
    let listed: Vec<shared::api::TokenInfo> = server.api.get("/tokens").await;
    assert!(listed.iter().any(|t| t.id == created.info.id));
}

/// Every operation in the served OpenAPI document reaches a handler: no "no route" 404 and no
/// 405, whatever else it says without credentials.
#[tokio::test]
async fn every_documented_operation_is_served() {
    let server = TestServer::spawn().await;
    let doc: serde_json::Value = server.api.http().get(server.api.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    let mut probed = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "0123456789abcdef");
        for method in ops.as_object().unwrap().keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let resp = server.api.http().request(method.clone(), format!("{}{concrete}", server.url)).send().await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            assert_ne!(status, 405, "{method} {path}");
            assert!(!(status == 404 && body.contains("no route")), "{method} {path} is not served");
            probed += 1;
        }
    }
    assert!(probed >= 20, "only {probed} operations documented");
}

/// `muster-server bootstrap --data-dir DIR` (flags after the subcommand, as the README shows)
/// works, and `muster ... | head` closing the pipe early is a quiet success.
#[tokio::test]
async fn global_flags_follow_the_subcommand_and_a_closed_pipe_is_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(tests::bin("muster-server")).arg("bootstrap").arg("--data-dir").arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("mst_"));

    let server = TestServer::spawn().await;
    let mut child = std::process::Command::new(tests::bin("muster"))
        .args(["token", "list"])
        .env("MUSTER_SERVER", &server.url)
        .env("MUSTER_TOKEN", &server.admin_token)
        .env("MUSTER_CA", &server.ca)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the CLI writes its table.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit {:?}", out.status);
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}
