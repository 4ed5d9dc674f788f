//! `muster-server --dev`: the server with a generated certificate, a fresh admin token, and a
//! local agent enrolled and connected, like `vault server -dev`. Not for production: the admin
//! token is printed and written to `<data-dir>/dev.env`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use shared::api::{CreateToken, Role};
use shared::{Labels, Timestamp};
use tokio_util::sync::CancellationToken;

use crate::auth::{self, Kind};
use crate::config::{Config, TlsSource};
use crate::store::{EnrollTokenRow, Store};
use crate::{Application, api};

/// The file `muster` users `source` to talk to the dev server.
pub fn env_file(data_dir: &Path) -> PathBuf {
    data_dir.join("dev.env")
}

pub async fn run(config: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    if matches!(config.tls, TlsSource::Files { .. }) {
        anyhow::bail!("--dev generates its own certificate; leave out --tls-cert and --tls-key");
    }
    let data_dir = config.data_dir.clone();
    let app = Application::build(config, cancel.clone()).await?;
    let addr = app.local_addr()?;
    let host = if addr.ip().is_unspecified() { "127.0.0.1".to_owned() } else { addr.ip().to_string() };
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let server_url = format!("https://{host}:{}", addr.port());
    let ca = std::fs::canonicalize(app.ca_file().context("the dev server has no generated CA")?)?;
    let store = app.state().store.clone();

    let (admin, entry) = api::create_token_row(
        store.as_ref(),
        &CreateToken { name: "dev-admin".into(), role: Role::Admin, ttl_secs: None, scope: None },
        "muster-server --dev",
    )
    .await
    .map_err(|e| anyhow::anyhow!("creating the dev admin token: {e}"))?;
    app.state().audit(entry).await;
    let enroll_token = dev_enroll_token(store.as_ref()).await?;

    let env_path = env_file(&data_dir);
    let env = format!("export MUSTER_SERVER={server_url}\nexport MUSTER_TOKEN={}\nexport MUSTER_CA={}\n", admin.token, ca.display());
    crate::tls::write_file(&env_path, env.as_bytes(), 0o600)?;
    print_banner(&server_url, &env, &env_path);

    let server = tokio::spawn(app.run());
    let agent_task = local_agent(&server_url, &ca, &data_dir, enroll_token, &cancel)?;

    let result = server.await.context("server task")?;
    cancel.cancel();
    if let Some(task) = agent_task
        && let Ok(Err(e)) = task.await
    {
        tracing::warn!(error = %format!("{e:#}"), "the local agent stopped");
    }
    result
}

type AgentTask = tokio::task::JoinHandle<anyhow::Result<()>>;

/// Starts the local agent in this process, cancelled with the server (a child token: it closes
/// its connection when the server stops).
#[cfg(feature = "dev-agent")]
fn local_agent(
    server_url: &str,
    ca: &Path,
    data_dir: &Path,
    token: String,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<AgentTask>> {
    let agent_dir = std::fs::canonicalize(data_dir)?.join("agent");
    let agent = agent_config(server_url, ca, &agent_dir, token)?;
    Ok(Some(tokio::spawn(agent::run(agent, cancel.child_token()))))
}

/// This build has no agent inside (packages are built so): say how to start one instead.
#[cfg(not(feature = "dev-agent"))]
#[allow(clippy::print_stdout)]
fn local_agent(
    server_url: &str,
    ca: &Path,
    _data_dir: &Path,
    token: String,
    _cancel: &CancellationToken,
) -> anyhow::Result<Option<AgentTask>> {
    println!("This muster-server was built without the local development agent (cargo feature dev-agent).");
    println!("Start one within ten minutes with:\n");
    println!("    muster-agent --server {server_url} --ca {} --state-dir ./muster-agent --enroll-token {token}\n", ca.display());
    Ok(None)
}

#[allow(clippy::print_stdout)]
fn print_banner(server_url: &str, env: &str, env_path: &Path) {
    println!("\nMuster is running in development mode at {server_url}");
    if cfg!(feature = "dev-agent") {
        println!("A local agent is being enrolled; `muster agents` shows it within seconds.\n");
    }
    println!("To use the CLI, run:\n\n    source {}\n\nwhich sets:\n", env_path.display());
    for line in env.lines() {
        println!("    {line}");
    }
    println!("\nThe dashboard is at {server_url}/ (sign in with the MUSTER_TOKEN above; the certificate is");
    println!("signed by the generated CA in MUSTER_CA, so the browser asks once whether to trust it).");
    println!("\nDevelopment mode: the admin token above is not for production. Ctrl-C stops the server and the agent.\n");
}

/// A one-use enrollment token for the local agent. An agent that already holds a credential
/// ignores it, and it expires unused after ten minutes.
async fn dev_enroll_token(store: &dyn Store) -> anyhow::Result<String> {
    let issued = auth::issue(Kind::Enroll, None).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let now = Timestamp::now();
    let labels = Labels::from_pairs(["env=dev"])?;
    store
        .insert_enroll_token(&EnrollTokenRow {
            approve: false,
            id: issued.id,
            secret_hash: issued.hash,
            created_by: "muster-server --dev".into(),
            created_at: now,
            expires_at: now.saturating_add(Duration::from_secs(600)),
            uses_total: 1,
            uses_left: 1,
            labels,
            revoked_at: None,
        })
        .await?;
    Ok(issued.token)
}

/// The local agent runs inside this process: the same code as `muster-agent`, dialing this
/// server over real wss with the generated CA, so `cargo run --bin muster-server -- --dev`
/// needs no other binary.
#[cfg(feature = "dev-agent")]
fn agent_config(server_url: &str, ca: &Path, state_dir: &Path, enroll_token: String) -> anyhow::Result<agent::config::Config> {
    Ok(agent::config::Config {
        connect_url: agent::config::connect_url(server_url).map_err(|e| anyhow::anyhow!(e))?,
        server: server_url.to_owned(),
        ca: Some(ca.to_owned()),
        state_dir: state_dir.to_owned(),
        enroll_token: Some(agent::config::EnrollToken::Value(enroll_token)),
        hostname: None,
        labels: Labels::new(),
        heartbeat_interval: Duration::from_secs(10),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        max_runs: 8,
        log: String::new(),
        policy: Default::default(),
        trusted_keys: Vec::new(),
        credential_rotation: Some(agent::config::DEFAULT_CREDENTIAL_ROTATION),
    })
}
