//! Signed jobs with real agents that require them: what the operator signs runs, and nothing a
//! compromised server sends (missing, wrong, re-targeted, replayed or tampered signatures, or a
//! revoked key) starts a process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use shared::AgentId;
use shared::job::{JobDetail, RunInfo, RunState, Target};
use tests::{TestAgent, TestServer, job, shell, wait_for};

const SOON: Duration = Duration::from_secs(30);

struct Fleet {
    server: TestServer,
    dir: tempfile::TempDir,
    key: PathBuf,
    public: String,
}

impl Fleet {
    async fn new() -> Fleet {
        let server = TestServer::spawn().await;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("signing.key");
        let out = server.cli(&["key", "generate", "--out", key.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(public.starts_with("ed25519:"), "{public}");
        let show = server.cli(&["key", "show", "--signing-key", key.to_str().unwrap()]);
        assert_eq!(String::from_utf8_lossy(&show.stdout).trim(), public);
        Fleet { server, dir, key, public }
    }

    /// An agent that runs only jobs signed by the fleet's key; `own` are labels from its own config.
    async fn agent(&self, own: &[&str]) -> (TestAgent, AgentId) {
        let token = self.server.enroll_token(1, &["site=paris"]).await;
        let config = format!("trusted_keys = [{:?}]\n", self.public);
        let agent = self.server.spawn_agent_with_config(Some(&token), own, &config);
        let id = agent.id().await;
        self.server.api.wait_status(&id, shared::api::AgentStatus::Online, SOON).await;
        (agent, id)
    }

    fn marker(&self) -> PathBuf {
        self.dir.path().join("marker")
    }

    /// `muster run --detach` signed with `key`; the job's id.
    fn run_signed(&self, key: &Path, target: &[&str], command: &[&str]) -> String {
        let mut args = vec!["run", "--detach", "--signing-key", key.to_str().unwrap()];
        args.extend_from_slice(target);
        args.push("--");
        args.extend_from_slice(command);
        let out = self.server.cli(&args);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("Signed for"), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    async fn finished(&self, job_id: &str) -> JobDetail {
        self.server.api.wait_job_finished(job_id, SOON).await
    }
}

fn run_on<'a>(job: &'a JobDetail, agent: &AgentId) -> &'a RunInfo {
    job.runs.iter().find(|r| &r.agent_id == agent).expect("a run on that agent")
}

fn refused_with(run: &RunInfo, why: &str) {
    assert_eq!(run.state, RunState::Failed, "{run:?}");
    assert_eq!(run.started_at, None, "a refused run never starts: {run:?}");
    let error = run.error.clone().unwrap_or_default();
    assert!(error.contains(why), "{error:?} should say {why:?}");
}

#[tokio::test]
async fn a_signed_job_runs_on_the_agents_it_names_whose_own_labels_match() {
    let fleet = Fleet::new().await;
    let (_a, a) = fleet.agent(&["site=paris"]).await;
    let (_b, b) = fleet.agent(&["site=lyon"]).await;

    // Both carry site=paris from their enrollment token (what the server reports), so the
    // server targets both; only A's own config says site=paris.
    let id = fleet.run_signed(&fleet.key, &["--label", "site=paris"], &["/bin/echo", "signed"]);
    assert_eq!(id.len(), 32, "the CLI picks a 128-bit job id");
    let done = fleet.finished(&id).await;
    assert!(done.job.signed_by.as_ref().is_some_and(|k| k.to_string() == fleet.public));
    let on_a = run_on(&done, &a);
    assert_eq!((on_a.state, on_a.stdout.as_str()), (RunState::Succeeded, "signed\n"), "{on_a:?}");
    refused_with(run_on(&done, &b), "does not match this agent's own labels");

    // By id, and from the CLI's own exit status.
    let out = fleet.server.cli(&["run", "--signing-key", fleet.key.to_str().unwrap(), "--agent", b.as_str(), "--", "/bin/echo", "b"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    // The same id twice is refused by the API.
    let mut again = job(Target::Agents(vec![a.clone()]), shell("true"));
    again.id = Some(id.parse().unwrap());
    let resp = fleet.server.api.raw_post("/jobs", &again).await;
    assert_eq!(resp.status(), 409);
    // A signature that does not verify is refused by the API too (agents would refuse it).
    again.id = Some("ab".repeat(16).parse().unwrap());
    again.signature = Some(shared::signing::JobSignature {
        key: shared::signing::PublicKey::parse(&fleet.public).unwrap(),
        signature: shared::signing::Signature([7; 64]),
        expires_at: shared::Timestamp::now().saturating_add(Duration::from_secs(600)),
        selector: None,
    });
    let resp = fleet.server.api.raw_post("/jobs", &again).await;
    assert_eq!(resp.status(), 403);
    assert!(resp.text().await.unwrap().contains("signature_refused"));
}

#[tokio::test]
async fn nothing_a_compromised_server_sends_starts_a_process_on_an_agent_that_requires_signatures() {
    let fleet = Fleet::new().await;
    let (mut a_agent, a) = fleet.agent(&[]).await;
    let (_b_agent, b) = fleet.agent(&[]).await;
    let marker = fleet.marker();
    let touch = ["/usr/bin/touch", marker.to_str().unwrap()];
    let api = &fleet.server.api;

    // Unsigned, straight through the API.
    let unsigned = api.create_job(&job(Target::Agents(vec![a.clone()]), shell(&format!("touch {}", marker.display())))).await;
    refused_with(run_on(&fleet.finished(&unsigned.id).await, &a), "not signed");

    // Signed, but by a key the agent does not trust (the server cannot tell).
    let stranger = fleet.dir.path().join("stranger.key");
    assert_eq!(fleet.server.cli(&["key", "generate", "--out", stranger.to_str().unwrap()]).status.code(), Some(0));
    let id = fleet.run_signed(&stranger, &["--agent", a.as_str()], &touch);
    refused_with(run_on(&fleet.finished(&id).await, &a), "not signed by a trusted key");

    // A's runs wait while it is away, so the server's database can be rewritten under them:
    // the command changed, the signature dropped, the run moved to another agent.
    a_agent.process().stop().await;
    api.wait_status(&a, shared::api::AgentStatus::Offline, SOON).await;
    let changed = fleet.run_signed(&fleet.key, &["--agent", a.as_str()], &["/bin/echo", "harmless"]);
    let command = serde_json::json!({ "program": { "argv": touch } }).to_string();
    assert_eq!(fleet.server.sql(&format!("UPDATE jobs SET command = '{command}' WHERE id = '{changed}'")).await, 1);
    let dropped = fleet.run_signed(&fleet.key, &["--agent", a.as_str()], &touch);
    assert_eq!(fleet.server.sql(&format!("UPDATE jobs SET signature = NULL WHERE id = '{dropped}'")).await, 1);
    let moved = fleet.run_signed(&fleet.key, &["--agent", a.as_str()], &touch);
    assert_eq!(fleet.server.sql(&format!("UPDATE runs SET agent_id = '{b}' WHERE job_id = '{moved}'")).await, 1);
    refused_with(run_on(&fleet.finished(&moved).await, &b), "signature refused");

    let a_agent = a_agent.restart();
    refused_with(run_on(&fleet.finished(&changed).await, &a), "signature refused");
    refused_with(run_on(&fleet.finished(&dropped).await, &a), "not signed");

    // Replayed: a second run of a job the agent already ran, under a new run id.
    let ran = fleet.run_signed(&fleet.key, &["--agent", a.as_str()], &["/bin/echo", "once"]);
    assert_eq!(run_on(&fleet.finished(&ran).await, &a).state, RunState::Succeeded);
    // One run per agent and job in the database: the old one is moved aside first.
    let aside = |n: u8| format!("UPDATE runs SET agent_id = '000000000000000{n}' WHERE job_id = '{ran}' AND agent_id = '{a}'");
    assert_eq!(fleet.server.sql(&aside(1)).await, 1);
    fleet.server.sql(&format!("UPDATE jobs SET finished_at = NULL WHERE id = '{ran}'")).await;
    let replay = format!("INSERT INTO runs (id, job_id, agent_id, seq, state) VALUES ('00000000000000ee', '{ran}', '{a}', 1, 'pending')");
    assert_eq!(fleet.server.sql(&replay).await, 1);
    let replayed = wait_for("the replayed run to end", SOON, || async {
        let j = api.job(&ran).await;
        j.runs.into_iter().find(|r| r.id == "00000000000000ee" && r.state.is_final())
    })
    .await;
    refused_with(&replayed, "already ran here");
    // ... also after the agent restarts: it remembers signed job ids on disk.
    let _a_agent = a_agent.restart();
    api.wait_status(&a, shared::api::AgentStatus::Online, SOON).await;
    let replay2 = format!("INSERT INTO runs (id, job_id, agent_id, seq, state) VALUES ('00000000000000ef', '{ran}', '{a}', 2, 'pending')");
    assert_eq!(fleet.server.sql(&aside(2)).await, 1);
    fleet.server.sql(&format!("UPDATE jobs SET finished_at = NULL WHERE id = '{ran}'")).await;
    assert_eq!(fleet.server.sql(&replay2).await, 1);
    let replayed = wait_for("the second replay to end", SOON, || async {
        let j = api.job(&ran).await;
        j.runs.into_iter().find(|r| r.id == "00000000000000ef" && r.state.is_final())
    })
    .await;
    refused_with(&replayed, "already ran here");

    assert!(!marker.exists(), "no refused command ran");
}

#[tokio::test]
async fn a_key_revoked_fleet_wide_is_refused_even_after_the_server_forgets_the_revocation() {
    let mut fleet = Fleet::new().await;
    let second = fleet.dir.path().join("second.key");
    let out = fleet.server.cli(&["key", "generate", "--out", second.to_str().unwrap()]);
    let second_public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // The agent trusts both keys.
    let token = fleet.server.enroll_token(1, &[]).await;
    let config = format!("trusted_keys = [{:?}, {:?}]\n", fleet.public, second_public);
    let agent = fleet.server.spawn_agent_with_config(Some(&token), &[], &config);
    let a = agent.id().await;
    fleet.server.api.wait_status(&a, shared::api::AgentStatus::Online, SOON).await;
    let ok = fleet.run_signed(&second, &["--agent", a.as_str()], &["/bin/echo", "before"]);
    assert_eq!(run_on(&fleet.finished(&ok).await, &a).state, RunState::Succeeded);

    // The first key revokes the second; the server relays it.
    let out = fleet.server.cli(&["key", "revoke", "--signing-key", fleet.key.to_str().unwrap(), &second_public]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("the agent to log the revocation", SOON, || async {
        std::fs::read_dir(agent.state.path()).ok()?.flatten().any(|e| e.file_name() == "revoked-keys.json").then_some(())
    })
    .await;
    let after = fleet.run_signed(&second, &["--agent", a.as_str()], &["/bin/echo", "after"]);
    refused_with(run_on(&fleet.finished(&after).await, &a), "revoked");

    // A server that "forgets" the revocation (deleted, and restarted so nothing is cached)
    // changes nothing: the agent kept it.
    fleet.server.sql("DELETE FROM key_revocations").await;
    fleet.server.process().stop().await;
    fleet.server.start().await;
    let agent = agent.restart();
    fleet.server.api.wait_status(&a, shared::api::AgentStatus::Online, SOON).await;
    let later = fleet.run_signed(&second, &["--agent", a.as_str()], &["/bin/echo", "later"]);
    refused_with(run_on(&fleet.finished(&later).await, &a), "revoked");
    // The key that revoked still works, and `check` shows what the agent trusts.
    let good = fleet.run_signed(&fleet.key, &["--agent", a.as_str()], &["/bin/echo", "still"]);
    assert_eq!(run_on(&fleet.finished(&good).await, &a).state, RunState::Succeeded);
    let check = String::from_utf8_lossy(&agent.check().stdout).into_owned();
    assert!(check.contains("signed jobs: required, 2 trusted keys"), "{check}");
    assert!(check.contains(&format!("{second_public} (revoked)")), "{check}");
}

#[tokio::test]
async fn the_api_and_the_cli_say_which_agents_accept_only_signed_jobs() {
    let fleet = Fleet::new().await;
    let (_signed, signed) = fleet.agent(&[]).await;
    let token = fleet.server.enroll_token(1, &["site=paris"]).await;
    let plain_agent = fleet.server.spawn_agent(Some(&token), &[]);
    let plain = plain_agent.id().await;
    let api = &fleet.server.api;
    api.wait_status(&plain, shared::api::AgentStatus::Online, SOON).await;
    let key = shared::signing::PublicKey::parse(&fleet.public).unwrap();

    // What each agent's hello said, on its page and in the list.
    assert_eq!(api.agent(&signed).await.summary.trusted_keys, vec![key.clone()]);
    assert!(api.agent(&plain).await.summary.trusted_keys.is_empty());
    let listed = api.agents().await;
    let requiring: Vec<&AgentId> = listed.iter().filter(|a| a.requires_signature()).map(|a| &a.id).collect();
    assert_eq!(requiring, vec![&signed]);

    // The dry run counts them and names their keys.
    let mut dry = job(Target::Selector(shared::Selector::parse("site=paris").unwrap()), shell("true"));
    dry.dry_run = true;
    let preview: shared::job::DryRun = api.post("/jobs", &dry).await;
    assert_eq!((preview.matched, preview.require_signature), (2, 1), "{preview:?}");
    let by_id = |id: &AgentId| preview.agents.iter().find(|a| &a.id == id).unwrap().trusted_keys.clone();
    assert_eq!(by_id(&signed), vec![key.clone()]);
    assert!(by_id(&plain).is_empty());

    // The CLI says so too, with and without a key to sign with.
    let text = |out: std::process::Output| {
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let agents = text(fleet.server.cli(&["agents"]));
    let row = agents.lines().find(|l| l.contains(signed.as_str())).unwrap();
    assert!(row.contains("required"), "{agents}");
    assert!(!agents.lines().find(|l| l.contains(plain.as_str())).unwrap().contains("required"), "{agents}");
    let one = text(fleet.server.cli(&["agent", signed.as_str()]));
    assert!(one.contains(&format!("required: runs only jobs signed by {}", fleet.public)), "{one}");
    let unsigned = text(fleet.server.cli(&["run", "--dry-run", "--no-sign", "--label", "site=paris", "--", "true"]));
    assert!(unsigned.contains("1 of 2 agents accept only signed jobs; this job would not be signed"), "{unsigned}");
    let key_path = fleet.key.to_str().unwrap();
    let signing = text(fleet.server.cli(&["run", "--dry-run", "--signing-key", key_path, "--label", "site=paris", "--", "true"]));
    assert!(signing.contains(&format!("this job would be signed with {}", fleet.public)), "{signing}");
}
