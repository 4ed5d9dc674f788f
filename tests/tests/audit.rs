//! The audit log as a security team uses it: who did what from where, read through the API and
//! `muster audit`, refused credentials that cannot flood it, a hash chain that `muster audit
//! verify` checks against changes made straight in the database, and retention.

// Helpers below are test code: a panic is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use shared::api::{AuditEntry, AuditPage, CreateToken, Role, TokenCreated};
use shared::job::Target;
use tests::{TestServer, job, shell, wait_for};

const DAY_MS: i64 = 86_400_000;

async fn page(server: &TestServer, query: &str) -> AuditPage {
    server.api.get(&format!("/audit?{query}")).await
}

/// The whole log, newest first.
async fn all(server: &TestServer) -> Vec<AuditEntry> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let q = before.map_or("limit=1000".to_owned(), |b| format!("limit=1000&before={b}"));
        let p = page(server, &q).await;
        out.extend(p.entries);
        match p.next_before {
            Some(b) => before = Some(b),
            None => return out,
        }
    }
}

fn by_action<'a>(entries: &'a [AuditEntry], action: &str) -> Vec<&'a AuditEntry> {
    entries.iter().filter(|e| e.action == action).collect()
}

async fn token(server: &TestServer, name: &str, role: Role) -> TokenCreated {
    server.api.post("/tokens", &CreateToken { name: name.into(), role, ttl_secs: None, scope: None }).await
}

#[tokio::test]
async fn every_change_is_audited_with_who_from_where_and_no_secret() {
    let audit_dir = tempfile::tempdir().unwrap();
    let audit_file = audit_dir.path().join("audit.jsonl");
    let server = TestServer::spawn_with(&["--audit-file", audit_file.to_str().unwrap()]).await;
    let whoami: shared::api::WhoAmI = server.api.get("/whoami").await;
    let admin = format!("test-admin ({})", whoami.token_id);

    let made = token(&server, "deploy", Role::Operator).await;
    let resp = server
        .api
        .http()
        .delete(server.api.url(&format!("/tokens/{}", made.info.id)))
        .bearer_auth(&server.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let enroll = server.enroll_token(1, &["site=lab"]).await;
    let agent = server.spawn_agent(Some(&enroll), &[]);
    let agent_id = agent.id().await;
    server.api.wait_status(&agent_id, shared::api::AgentStatus::Online, Duration::from_secs(30)).await;
    let mut req = job(Target::Agents(vec![agent_id.clone()]), shell("true"));
    req.command.env.insert("API_KEY".into(), "s3cret-value".into());
    let created = server.api.create_job(&req).await;
    server.api.wait_job_finished(&created.id, Duration::from_secs(30)).await;
    let resp =
        server.api.http().delete(server.api.url(&format!("/agents/{agent_id}"))).bearer_auth(&server.admin_token).send().await.unwrap();
    assert_eq!(resp.status(), 204);

    let entries = wait_for("the job's end to be audited", Duration::from_secs(10), || async {
        let e = all(&server).await;
        (!by_action(&e, "job.finish").is_empty()).then_some(e)
    })
    .await;
    let one = |action: &str| {
        let found = by_action(&entries, action);
        assert_eq!(found.len(), 1, "one {action} entry in {entries:#?}");
        found[0].clone()
    };
    for (action, target) in [
        ("token.revoke", made.info.id.clone()),
        ("enroll_token.create", enroll[4..20].to_owned()),
        ("job.create", created.id.to_string()),
        ("agent.revoke", agent_id.to_string()),
    ] {
        let e = one(action);
        assert_eq!(e.actor, admin, "{action}");
        assert!(e.address.as_deref().is_some_and(|a| a.starts_with("127.0.0.1:")), "{action}: {e:?}");
        assert_eq!(e.target.as_deref(), Some(target.as_str()), "{action}");
    }
    let created_token = by_action(&entries, "token.create").into_iter().find(|e| e.target.as_deref() == Some(&made.info.id)).unwrap();
    assert_eq!((created_token.actor.as_str(), created_token.detail["role"].as_str()), (admin.as_str(), Some("operator")));
    let bootstrap = by_action(&entries, "token.create").into_iter().find(|e| e.actor == "muster-server bootstrap").unwrap();
    assert_eq!(bootstrap.target.as_deref(), Some(whoami.token_id.as_str()));
    let enrolled = one("agent.enroll");
    assert_eq!((enrolled.target.as_deref(), enrolled.actor.starts_with("enroll-token:")), (Some(agent_id.as_str()), true));
    assert!(enrolled.address.as_deref().is_some_and(|a| a.starts_with("127.0.0.1:")));
    let job_entry = one("job.create");
    assert_eq!(job_entry.detail["agents"]["count"], 1);
    assert_eq!(job_entry.detail["agents"]["ids"], serde_json::json!([agent_id.as_str()]));
    assert_eq!(job_entry.detail["command"]["env_names"], serde_json::json!(["API_KEY"]));
    let finished = one("job.finish");
    assert_eq!((finished.target.as_deref(), &finished.detail["counts"]["succeeded"]), (Some(created.id.as_str()), &serde_json::json!(1)));
    assert_eq!(one("audit.genesis").id, 1);

    // No secret anywhere: not the tokens handed out, not the agent's credential, not the job's environment.
    let text = serde_json::to_string(&entries).unwrap();
    let credential = std::fs::read_to_string(agent.credential_path()).unwrap();
    let agent_secret = serde_json::from_str::<serde_json::Value>(&credential).unwrap()["token"].as_str().map(str::to_owned);
    for secret in
        [made.token.as_str(), enroll.as_str(), server.admin_token.as_str(), "s3cret-value"].into_iter().chain(agent_secret.as_deref())
    {
        let tail = &secret[secret.len().saturating_sub(64)..];
        assert!(!text.contains(tail), "a secret is in the audit log");
    }

    // The copy in the audit file: the server's own entries, 0600, each as the API has it, chained.
    let mode = std::fs::metadata(&audit_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let lines: Vec<AuditEntry> = std::fs::read_to_string(&audit_file).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() >= 6, "{lines:#?}");
    for pair in lines.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash, "the file's lines link up");
    }
    for line in &lines {
        assert_eq!(entries.iter().find(|e| e.id == line.id), Some(line));
    }

    // The CLI shows the same, filtered.
    let out = server.cli(&["audit", "--action", "token", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Vec<AuditEntry> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(listed.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["token.revoke", "token.create", "token.create"]);
    let out = server.cli(&["audit", "--since", "1h", "--target", agent_id.as_str()]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("ID") && table.contains("agent.revoke") && table.contains("agent.enroll"), "{table}");
}

#[tokio::test]
async fn only_admins_read_the_audit_log_and_filters_and_pages_hold() {
    let server = TestServer::spawn().await;
    for role in [Role::Viewer, Role::Operator] {
        let t = token(&server, &format!("{role}"), role).await;
        assert_eq!(server.api.with_token(&t.token).raw_get("/audit").await.status(), 403, "{role}");
        let out = tests_cli_as(&server, &t.token, &["audit"]);
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not allowed"));
    }
    assert_eq!(server.api.http().get(server.api.url("/audit")).send().await.unwrap().status(), 401);
    for n in 0..5 {
        token(&server, &format!("t{n}"), Role::Viewer).await;
    }

    // Five pages of one entry's `token.create` by the admin, then the bootstrap's, newest first.
    let whoami: shared::api::WhoAmI = server.api.get("/whoami").await;
    let mut seen = Vec::new();
    let mut q = format!("action=token.create&actor={}&limit=2", whoami.token_id);
    loop {
        let p = page(&server, &q).await;
        assert!(p.entries.len() <= 2);
        seen.extend(p.entries.iter().map(|e| e.id));
        match p.next_before {
            Some(b) => q = format!("action=token.create&actor={}&limit=2&before={b}", whoami.token_id),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7, "two role tokens and five more: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first: {seen:?}");
    assert!(page(&server, "since=2099-01-01T00:00:00Z").await.entries.is_empty());
    assert_eq!(page(&server, "until=1h").await.entries.len(), 0);
    assert_eq!(page(&server, "since=1h&action=token").await.entries.len(), 8);
    for bad in ["since=yesterday", "limit=0", "limit=1001", "before=-1", "actor=", "colour=red"] {
        assert_eq!(server.api.raw_get(&format!("/audit?{bad}")).await.status(), 400, "{bad}");
    }
}

fn tests_cli_as(server: &TestServer, token: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(tests::bin("muster"))
        .args(args)
        .env("MUSTER_SERVER", &server.url)
        .env("MUSTER_TOKEN", token)
        .env("MUSTER_CA", &server.ca)
        .output()
        .unwrap()
}

#[tokio::test]
async fn a_flood_of_refused_credentials_costs_one_entry_per_address_and_minute_with_the_count() {
    let mut server = TestServer::spawn().await;
    let http = server.api.http().clone();
    let wrong = "mst_0123456789abcdef_".to_owned() + &"ab".repeat(32);
    for n in 0..200 {
        let bearer = if n % 2 == 0 { wrong.as_str() } else { "nonsense" };
        let resp = http.get(server.api.url("/fleet")).bearer_auth(bearer).send().await.unwrap();
        assert_eq!(resp.status(), 401);
    }
    let agent_wrong = "msa_0123456789abcdef_".to_owned() + &"cd".repeat(32);
    for _ in 0..20 {
        let resp = http.get(server.api.url("/agent/check")).bearer_auth(&agent_wrong).send().await.unwrap();
        assert_eq!(resp.status(), 401);
    }
    // Refusals are written once a minute, and at shutdown.
    server.process().stop().await.expect("the server stops");
    server.start().await;
    let entries = by_action(&all(&server).await, "auth.refused").into_iter().cloned().collect::<Vec<_>>();
    assert!((1..=2).contains(&entries.len()), "{entries:#?}");
    let total: u64 = entries.iter().map(|e| e.detail["refusals"].as_u64().unwrap()).sum();
    assert_eq!(total, 220);
    let sum = |path: &str| entries.iter().map(|e| e.detail.pointer(path).and_then(|v| v.as_u64()).unwrap_or(0)).sum::<u64>();
    assert_eq!((sum("/via/api"), sum("/via/agent"), sum("/reasons/malformed")), (200, 20, 100));
    for e in &entries {
        assert_eq!((e.actor.as_str(), e.address.as_deref()), ("unauthenticated", Some("127.0.0.1")));
        let ids = e.detail["credential_ids"].as_array().unwrap();
        assert!(ids.iter().all(|i| i == "mst_0123456789abcdef" || i == "msa_0123456789abcdef"), "{ids:?}");
        assert!(!e.detail.to_string().contains(&"ab".repeat(32)), "no secret");
    }
}

#[tokio::test]
async fn verify_passes_on_an_intact_log_and_finds_a_changed_or_removed_entry() {
    let server = TestServer::spawn().await;
    for n in 0..6 {
        token(&server, &format!("t{n}"), Role::Viewer).await;
    }
    let verify = |args: &[&str]| {
        let out = server.cli(&[&["audit", "verify"], args].concat());
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, said) = verify(&[]);
    assert!(ok, "{said}");
    let entries = all(&server).await;
    let head = entries[0].hash.clone().unwrap();
    assert!(said.contains(&format!("head {} {head}", entries[0].id)) && said.contains("from its genesis entry"), "{said}");

    // A detail changed straight in the database.
    let middle = entries.iter().find(|e| e.id == 4).unwrap();
    let original = shared::audit::canonical_json(&middle.detail);
    assert_eq!(server.sql(r#"UPDATE audit_log SET detail = '{"name":"t1","role":"admin","ttl_secs":null}' WHERE id = 4"#).await, 1);
    let (ok, said) = verify(&[]);
    assert!(!ok && said.contains("entry 4: its contents do not match its hash"), "{said}");
    server.sql(&format!("UPDATE audit_log SET detail = '{}' WHERE id = 4", original.replace('\'', "''"))).await;
    assert!(verify(&[]).0, "put back, it verifies again");

    // The newest entry removed: unnoticed alone, found against the head recorded before.
    let newest = entries[0].id;
    server.sql(&format!("DELETE FROM audit_log WHERE id = {newest}")).await;
    assert!(verify(&[]).0);
    let (ok, said) = verify(&["--head", &head]);
    assert!(!ok && said.contains("is not in the chain"), "{said}");

    // An entry removed from the middle.
    server.sql("DELETE FROM audit_log WHERE id = 4").await;
    let (ok, said) = verify(&[]);
    assert!(!ok && said.contains("entry 5 links to") && said.contains("removed or changed"), "{said}");
}

#[tokio::test]
async fn retention_prunes_old_finished_jobs_keeps_open_ones_and_the_chain_still_verifies() {
    let mut server = TestServer::spawn().await;
    let enroll = server.enroll_token(1, &[]).await;
    let mut agent = server.spawn_agent(Some(&enroll), &[]);
    let agent_id = agent.id().await;
    server.api.wait_status(&agent_id, shared::api::AgentStatus::Online, Duration::from_secs(30)).await;
    let done = server.api.create_job(&job(Target::Agents(vec![agent_id.clone()]), shell("echo kept-for-a-while"))).await;
    server.api.wait_job_finished(&done.id, Duration::from_secs(30)).await;
    agent.process().stop().await;
    server.api.wait_status(&agent_id, shared::api::AgentStatus::Offline, Duration::from_secs(30)).await;
    let mut waiting = job(Target::Agents(vec![agent_id.clone()]), shell("true"));
    waiting.ttl_secs = Some(30 * 86_400);
    let open = server.api.create_job(&waiting).await;
    let before = all(&server).await;

    // Time passes: the finished job 31 days ago, the open one created 40 days ago, and the
    // oldest audit entries 400 days ago.
    server.process().stop().await.expect("the server stops");
    server.sql(&format!("UPDATE jobs SET finished_at = finished_at - {} WHERE id = '{}'", 31 * DAY_MS, done.id)).await;
    server.sql(&format!("UPDATE jobs SET created_at = created_at - {} WHERE id = '{}'", 40 * DAY_MS, open.id)).await;
    assert_eq!(server.sql(&format!("UPDATE audit_log SET at = at - {} WHERE id <= 3", 400 * DAY_MS)).await, 3);
    server.start().await;

    let entries = wait_for("retention to run at start", Duration::from_secs(20), || async {
        let e = all(&server).await;
        (!by_action(&e, "audit.pruned").is_empty() && !by_action(&e, "retention.jobs_pruned").is_empty()).then_some(e)
    })
    .await;
    assert_eq!(server.api.raw_get(&format!("/jobs/{}", done.id)).await.status(), 404);
    assert_eq!(server.api.job(&open.id).await.job.finished_at, None);
    assert_eq!(server.sql(&format!("DELETE FROM runs WHERE job_id = '{}'", done.id)).await, 0, "its runs went with it");
    let pruned = by_action(&entries, "audit.pruned")[0];
    assert_eq!((&pruned.detail["removed"], &pruned.detail["last_removed_id"]), (&serde_json::json!(3), &serde_json::json!(3)));
    assert_eq!(pruned.detail["last_removed_hash"].as_str(), before.iter().find(|e| e.id == 3).and_then(|e| e.hash.as_deref()));
    assert!(entries.iter().all(|e| e.id > 3));
    let out = server.cli(&["audit", "verify"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("after entries up to 3, removed by retention"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
