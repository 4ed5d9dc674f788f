//! The agent's own policy, with a real agent: what it refuses never starts a process, and the
//! server cannot talk it out of it.

#![allow(clippy::unwrap_used)]
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use shared::job::{CommandSpec, Program, RunInfo, RunState, Target};
use tests::{TestServer, job, shell};

const SOON: Duration = Duration::from_secs(30);

fn argv(a: &[&str]) -> Program {
    Program::Argv(a.iter().map(|s| (*s).to_owned()).collect())
}

async fn run_one(server: &TestServer, agent: &shared::AgentId, command: CommandSpec) -> RunInfo {
    let mut req = job(Target::Agents(vec![agent.clone()]), command.program.clone());
    req.command = command;
    let created = server.api.create_job(&req).await;
    let mut done = server.api.wait_job_finished(&created.id, SOON).await;
    assert_eq!(done.runs.len(), 1);
    done.runs.remove(0)
}

fn spec(program: Program) -> CommandSpec {
    CommandSpec { program, cwd: None, env: BTreeMap::new(), secret_env: Default::default() }
}

fn canonical(p: &Path) -> String {
    std::fs::canonicalize(p).unwrap().to_string_lossy().into_owned()
}

#[tokio::test]
async fn a_listed_policy_runs_only_what_it_lists_and_refused_runs_start_nothing() {
    let server = TestServer::spawn().await;
    let token = server.enroll_token(1, &[]).await;
    let work = tempfile::tempdir().unwrap();
    let inside = work.path().join("app");
    std::fs::create_dir(&inside).unwrap();
    let marker = work.path().join("marker");
    let allowed_touch = work.path().join("allowed");
    let config = format!(
        "[policy]\nprograms = [\"/bin/echo\", \"/usr/bin/printenv\", \"/bin/pwd\"]\n\
         argv_prefixes = [[\"/usr/bin/touch\", {allowed:?}]]\nworking_dirs = [{work:?}]\nenv_allow = [\"KEPT\"]\n",
        allowed = allowed_touch.to_string_lossy(),
        work = work.path().to_string_lossy(),
    );
    let agent = server.spawn_agent_with_config(Some(&token), &[], &config);
    let id = agent.id().await;

    // A listed program, found by name, runs.
    let run = run_one(&server, &id, spec(argv(&["echo", "hello"]))).await;
    assert_eq!((run.state, run.stdout.as_str()), (RunState::Succeeded, "hello\n"), "{:?}", run.error);

    // Anything else ends failed, says which rule refused it, and never starts a process.
    let marker_s = marker.to_string_lossy().into_owned();
    let refused = run_one(&server, &id, spec(argv(&["/usr/bin/touch", &marker_s]))).await;
    assert_eq!(refused.state, RunState::Failed);
    let error = refused.error.unwrap_or_default();
    assert!(error.contains("refused by the agent's policy (programs)"), "{error}");
    assert_eq!(refused.started_at, None, "a refused run never starts");
    let refused = run_one(&server, &id, spec(shell(&format!("touch {marker_s}")))).await;
    assert!(refused.error.unwrap_or_default().contains("policy (shell)"));
    assert!(!marker.exists(), "no refused command ran");

    // An argv prefix allows exactly its arguments, element by element.
    let allowed_s = allowed_touch.to_string_lossy().into_owned();
    let run = run_one(&server, &id, spec(argv(&["/usr/bin/touch", &allowed_s]))).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    assert!(allowed_touch.exists());
    let sneaky = run_one(&server, &id, spec(argv(&["/usr/bin/touch", &format!("{allowed_s}x")]))).await;
    assert!(sneaky.error.unwrap_or_default().contains("policy (programs)"));

    // Working directories: inside the allowed tree only; without one, the first allowed.
    let mut in_app = spec(argv(&["/bin/pwd"]));
    in_app.cwd = Some(inside.to_string_lossy().into_owned());
    assert_eq!(run_one(&server, &id, in_app).await.stdout, format!("{}\n", canonical(&inside)));
    let mut outside = spec(argv(&["/bin/pwd"]));
    outside.cwd = Some("/etc".into());
    assert!(run_one(&server, &id, outside).await.error.unwrap_or_default().contains("policy (working_dirs)"));
    assert_eq!(run_one(&server, &id, spec(argv(&["/bin/pwd"]))).await.stdout, format!("{}\n", canonical(work.path())));

    // The environment: a job's variables are dropped unless allowed, and the agent's own
    // environment (MUSTER_LOG is set for it) is not passed on.
    let mut env = spec(argv(&["/usr/bin/printenv"]));
    env.env = BTreeMap::from([("KEPT".into(), "yes".into()), ("LD_PRELOAD".into(), "/nonexistent.so".into())]);
    let printed = run_one(&server, &id, env).await.stdout;
    assert!(printed.contains("KEPT=yes\n"), "{printed}");
    assert!(!printed.contains("LD_PRELOAD"), "{printed}");
    assert!(!printed.contains("MUSTER_LOG"), "{printed}");
    assert!(printed.contains(&format!("MUSTER_AGENT_ID={id}\n")), "{printed}");

    // `muster-agent check` prints the effective policy.
    let check = agent.check();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(out.contains("policy commands: only 3 listed programs and 1 argv prefixes"), "{out}");
    assert!(out.contains("policy shell: sh -c scripts refused"), "{out}");
    assert!(out.contains("KEPT"), "{out}");
}

#[tokio::test]
async fn without_a_policy_the_agent_runs_anything_as_before() {
    let server = TestServer::spawn().await;
    let token = server.enroll_token(1, &[]).await;
    let agent = server.spawn_agent(Some(&token), &[]);
    let id = agent.id().await;
    let run = run_one(&server, &id, spec(shell("echo $((6 * 7)); printenv MUSTER_LOG"))).await;
    assert_eq!((run.state, run.stdout.as_str()), (RunState::Succeeded, "42\ninfo\n"));
    let out = String::from_utf8_lossy(&agent.check().stdout).into_owned();
    assert!(out.contains("policy commands: any command"), "{out}");
}

#[tokio::test]
async fn run_as_runs_commands_as_that_user_with_a_clean_environment_and_no_inherited_descriptors() {
    let server = TestServer::spawn().await;
    let token = server.enroll_token(1, &[]).await;
    if !rustix::process::geteuid().is_root() {
        // Only root can switch users: the agent must say so instead of starting.
        let mut agent = server.spawn_agent_with_config(Some(&token), &[], "run_as = \"nobody\"\n");
        let status = agent.process().wait_exit(SOON).await;
        assert_eq!(status.and_then(|s| s.code()), Some(64));
        assert!(agent.process().log_text().contains("must run as root"));
        return;
    }
    let agent = server.spawn_agent_with_config(Some(&token), &[], "run_as = \"nobody\"\n");
    let id = agent.id().await;
    let run = run_one(&server, &id, spec(shell("id -u; id -G; echo \"$HOME $USER\"; printenv MUSTER_LOG; ls /proc/self/fd"))).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?} {}", run.error, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    let nobody = nix_uid("nobody");
    assert_eq!(lines[0], nobody.to_string(), "{}", run.stdout);
    assert!(!lines[1].split(' ').any(|g| g == "0"), "no root group: {}", run.stdout);
    assert!(lines[2].ends_with(" nobody"), "{}", run.stdout);
    // Descriptors: stdin, stdout, stderr, and the one `ls` opened to list the directory.
    let fds: Vec<&str> = lines[3..].to_vec();
    assert_eq!(fds, ["0", "1", "2", "3"], "{}", run.stdout);
}

fn nix_uid(name: &str) -> u32 {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd.lines().find_map(|l| l.strip_prefix(&format!("{name}:x:"))).and_then(|r| r.split(':').next()).unwrap().parse().unwrap()
}
