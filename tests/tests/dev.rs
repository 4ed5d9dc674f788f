//! `muster-server --dev`, the README's first command: a server with a generated CA, an admin
//! token in `dev.env`, and a local agent that comes online and runs a command from the CLI.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use shared::api::{AgentStatus, AgentSummary};
use tests::{Api, Process, bin, free_port, wait_for};

#[tokio::test]
async fn dev_mode_runs_a_server_and_a_local_agent_the_cli_can_use() {
    tests::tls_provider();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("muster-data");
    let port = free_port();
    let log = dir.path().join("dev.log");
    let child = Command::new(bin("muster-server"))
        .args(["--dev", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(&data)
        .env_remove("MUSTER_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = Process { child, log };

    // What `source muster-data/dev.env` sets.
    let env_path = data.join("dev.env");
    let env: Vec<(String, String)> = wait_for("dev.env", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&env_path).unwrap_or_default();
        let vars: Vec<(String, String)> =
            text.lines().filter_map(|l| l.strip_prefix("export ")?.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))).collect();
        async move { (vars.len() == 3).then_some(vars) }
    })
    .await;
    let var = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap();
    let api = Api::new(&var("MUSTER_SERVER"), &var("MUSTER_TOKEN"), std::path::Path::new(&var("MUSTER_CA")));
    let agent = wait_for("the local agent to come online", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            let agents: Vec<AgentSummary> = api.get("/agents").await;
            agents.into_iter().find(|a| a.status == AgentStatus::Online && a.labels.to_string() == "env=dev")
        }
    })
    .await;

    let out =
        Command::new(bin("muster")).args(["run", "--all", "--", "echo", "hello-from-dev"]).envs(env.iter().cloned()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello-from-dev"), "{out:?}");
    let out = Command::new(bin("muster")).arg("agents").envs(env.iter().cloned()).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(agent.id.as_str()), "{out:?}");

    // Ctrl-C stops the server and the agent cleanly.
    server.signal(rustix::process::Signal::INT);
    let status = server.wait_exit(Duration::from_secs(20)).await.expect("the dev server stops on SIGINT");
    assert!(status.success(), "{status:?}: {}", server.log_text());
}
