//! Scoped operator tokens and labels edited by operators, end to end: real server, real
//! agents, real TLS. A token scoped `site=paris` sees, targets and relabels only the paris
//! agents, cannot mint a wider token, and the dispatcher holds a job to its creator's scope
//! even when labels change after the job was made.

use std::time::Duration;

use reqwest::StatusCode;
use shared::api::{AgentDetail, AgentSummary, CreateToken, FleetCounts, Role, TokenCreated, WhoAmI};
use shared::job::{JobSummary, RunState, Target};
use shared::{AgentId, Selector};
use tests::{TestServer, job, shell, wait_for};

fn token_req(name: &str, role: Role, scope: Option<Selector>) -> CreateToken {
    CreateToken { name: name.into(), role, ttl_secs: None, scope }
}

fn labels_patch(set: &[(&str, &str)], remove: &[&str]) -> serde_json::Value {
    let set: serde_json::Map<String, serde_json::Value> = set.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
    serde_json::json!({ "labels": { "set": set, "remove": remove } })
}

#[tokio::test]
async fn a_token_scoped_to_paris_sees_targets_and_relabels_only_paris() {
    let server = TestServer::spawn().await;
    let mut paris = server.spawn_agents(2, &["site=paris"]).await;
    let lyon = server.spawn_agents(1, &["site=lyon"]).await;
    let (p1, p2, l1) = (paris[0].1.clone(), paris[1].1.clone(), lyon[0].1.clone());

    let scoped: TokenCreated =
        server.api.post("/tokens", &token_req("paris-admin", Role::Admin, Some("site=paris".parse().unwrap()))).await;
    assert_eq!(scoped.info.scope.as_ref().map(ToString::to_string).as_deref(), Some("site=paris"));
    let api = server.api.with_token(&scoped.token);

    // It sees 2 of the 3 agents; the third is not found, and the counts are its own.
    let mut seen: Vec<AgentId> = api.get::<Vec<AgentSummary>>("/agents").await.into_iter().map(|a| a.id).collect();
    seen.sort();
    let mut want = vec![p1.clone(), p2.clone()];
    want.sort();
    assert_eq!(seen, want);
    assert_eq!(api.raw_get(&format!("/agents/{l1}")).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(api.raw_get(&format!("/agents/{l1}/runs")).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(api.get::<FleetCounts>("/fleet").await.total, 2);
    assert_eq!(server.api.get::<FleetCounts>("/fleet").await.total, 3);
    let me: WhoAmI = api.get("/whoami").await;
    assert_eq!(me.scope.map(|s| s.to_string()).as_deref(), Some("site=paris"));
    let out = server.cli_as(&scoped.token, &["whoami"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("scope site=paris"), "{out:?}");
    let out = server.cli(&["token", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("site=paris"), "{out:?}");

    // `muster run --all` with it runs on the paris agents only.
    let out = server.cli_as(&scoped.token, &["run", "--all", "--shell", "--", "echo ok"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let jobs: Vec<JobSummary> = server.api.get("/jobs").await;
    let detail = server.api.wait_job_finished(&jobs[0].id, Duration::from_secs(30)).await;
    let mut ran: Vec<AgentId> = detail.runs.iter().map(|r| r.agent_id.clone()).collect();
    ran.sort();
    assert_eq!(ran, want);
    assert!(detail.runs.iter().all(|r| r.state == RunState::Succeeded), "{:?}", detail.runs);

    // Naming a lyon agent is refused, and says why.
    let resp = api.raw_post("/jobs", &job(Target::Agents(vec![l1.clone()]), shell("echo no"))).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp.text().await.unwrap().contains("outside this token's scope"));

    // It cannot create a token wider than its own, nor one elsewhere; a narrower one is fine.
    for scope in [None, Some("site=lyon"), Some("role=pos")] {
        let resp = api.raw_post("/tokens", &token_req("wider", Role::Viewer, scope.map(|s| s.parse().unwrap()))).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "scope {scope:?}");
    }
    let narrower: TokenCreated =
        api.post("/tokens", &token_req("kiosks", Role::Viewer, Some("site=paris,role=pos".parse().unwrap()))).await;
    assert_eq!(narrower.info.scope.map(|s| s.to_string()).as_deref(), Some("site=paris,role=pos"));
    let listed: Vec<shared::api::TokenInfo> = api.get("/tokens").await;
    assert!(listed.iter().all(|t| t.scope.is_some()), "a scoped admin lists only tokens within its scope: {listed:?}");

    // It cannot move an agent out of its scope, nor edit agents outside it; other keys it may.
    let resp = api.raw_patch(&format!("/agents/{p1}"), &labels_patch(&[("site", "lyon")], &[])).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = api.raw_patch(&format!("/agents/{p1}"), &labels_patch(&[], &["site"])).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = api.raw_patch(&format!("/agents/{l1}"), &labels_patch(&[("role", "pos")], &[])).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = api.raw_patch(&format!("/agents/{p1}"), &labels_patch(&[("role", "pos")], &[])).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let a: AgentDetail = resp.json().await.unwrap();
    assert_eq!(a.summary.labels.get("role"), Some("pos"));
    // What the agent reports about itself is not for operators to edit.
    let resp = server.api.raw_patch(&format!("/agents/{p1}"), &labels_patch(&[("agent.os", "x")], &[])).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // An agent relabelled out of paris after the job was made gets no run: stop it so the run
    // waits, relabel it through the admin API, start it again.
    let stopped = paris.remove(1).0;
    let mut stopped = stopped;
    stopped.process().stop().await;
    server.api.wait_status(&p2, shared::api::AgentStatus::Offline, Duration::from_secs(30)).await;
    let pending = api.create_job(&job(Target::Agents(vec![p2.clone()]), shell("echo should-not-run"))).await;
    let resp = server.api.raw_patch(&format!("/agents/{p2}"), &labels_patch(&[("site", "lyon")], &[])).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let _back = stopped.restart();
    server.api.wait_status(&p2, shared::api::AgentStatus::Online, Duration::from_secs(30)).await;
    let detail = api.wait_job_finished(&pending.id, Duration::from_secs(30)).await;
    let run = &detail.runs[0];
    assert_eq!(run.state, RunState::Skipped, "{run:?}");
    assert!(run.started_at.is_none() && run.dispatched_at.is_none(), "{run:?}");
    assert!(run.error.as_deref().unwrap_or_default().contains("scope"), "{run:?}");
    // And it is out of the scoped token's sight now.
    assert_eq!(api.raw_get(&format!("/agents/{p2}")).await.status(), StatusCode::NOT_FOUND);

    // The admin's label edits retarget the next job, with no reconnect.
    let out = server.cli(&["agent", l1.as_str(), "label", "group=canary"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let canary = server.api.create_job(&job(Target::Selector("group=canary".parse().unwrap()), shell("echo canary"))).await;
    let detail = server.api.wait_job_finished(&canary.id, Duration::from_secs(30)).await;
    assert_eq!(detail.runs.iter().map(|r| r.agent_id.clone()).collect::<Vec<_>>(), vec![l1.clone()]);
    let out = server.cli(&["agent", l1.as_str(), "label", "group-"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = server.cli(&["agent", p1.as_str(), "label", "group=canary"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let canary = server.api.create_job(&job(Target::Selector("group=canary".parse().unwrap()), shell("echo canary"))).await;
    let detail = server.api.wait_job_finished(&canary.id, Duration::from_secs(30)).await;
    assert_eq!(detail.runs.iter().map(|r| r.agent_id.clone()).collect::<Vec<_>>(), vec![p1.clone()]);

    // The scoped token sees its own jobs, not the admin's.
    let seen: Vec<JobSummary> = api.get("/jobs").await;
    assert!(seen.iter().all(|j| j.id != canary.id) && seen.iter().any(|j| j.id == pending.id));
    assert_eq!(api.raw_get(&format!("/jobs/{}", canary.id)).await.status(), StatusCode::NOT_FOUND);

    // The edits and the refused token are in the audit log, with before and after.
    let entries: Vec<shared::api::AuditEntry> = wait_for("the audit entries", Duration::from_secs(10), || async {
        let page: shared::api::AuditPage = server.api.get("/audit?action=agent.labels").await;
        (page.entries.len() >= 5).then_some(page.entries)
    })
    .await;
    assert!(entries.iter().any(|e| e.detail["before"]["site"] == "paris" && e.detail["after"]["site"] == "lyon"), "{entries:?}");
    let refused: shared::api::AuditPage = server.api.get("/audit?action=token.create_refused").await;
    assert_eq!(refused.entries.len(), 3);
    assert_eq!(api.raw_get("/audit").await.status(), StatusCode::FORBIDDEN);
}
