//! Helpers for end-to-end tests: real `muster-server`, `muster-agent` and `muster` processes
//! on loopback, each server with its own temporary data directory, generated certificate and
//! SQLite file. One helper per thing a test needs; tests read as what the user does.
//!
//! Binaries come from the same target directory as the test executable; `cargo test
//! --workspace` builds them.

// Test support: a panic here is a failed test with a message, which is what a test wants.
#![allow(clippy::print_stderr, clippy::expect_used, clippy::unwrap_used)]

pub mod ws;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use shared::api::{AgentDetail, AgentStatus, AgentSummary, CreateEnrollToken, EnrollTokenCreated};
use shared::{AgentId, Labels};
use tempfile::TempDir;

/// Path of a workspace binary next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run the tests with `cargo test --workspace`, which builds it", path.display());
    path
}

/// Installs the ring provider once for this test process's own TLS clients.
pub fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A free loopback port. The server binds it a moment later; nothing else here races for it.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `deadline` saying what
/// was awaited.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process that is killed when dropped, so a failing test leaves nothing behind.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid()) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// SIGKILL: no chance to say goodbye.
    pub fn kill(&mut self) {
        self.signal(rustix::process::Signal::KILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit (bounded).
    pub async fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.signal(rustix::process::Signal::TERM);
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit by itself, within the deadline.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let end = tokio::time::Instant::now() + deadline;
        while tokio::time::Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Server knobs tests turn down so that liveness shows within a second or two.
pub const TEST_PING_INTERVAL: &str = "500ms";

/// Where a test server keeps its state: the embedded SQLite file, or a private PostgreSQL
/// cluster the test starts (`testdb`), one database per server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each named scenario, an `async fn(Backend)`, once per backend: as `sqlite::NAME` and
/// `postgres::NAME` tests.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await
                }
            )*
        }
    };
}

pub struct TestServer {
    pub dir: TempDir,
    pub backend: Backend,
    /// The PostgreSQL cluster of a `Postgres` server, and its database's URL.
    pub postgres: Option<(Arc<testdb::Cluster>, String)>,
    pub port: u16,
    pub url: String,
    pub ca: PathBuf,
    pub admin_token: String,
    pub process: Option<Process>,
    pub api: Api,
    /// Extra flags for every start of this server.
    pub extra_args: Vec<String>,
}

impl TestServer {
    /// A fresh server: new data directory, `muster-server bootstrap` for an admin token, then
    /// the server itself on a free port, waited for until `/healthz` answers.
    pub async fn spawn() -> TestServer {
        Self::spawn_with(&[]).await
    }

    /// A fresh server started with extra flags.
    pub async fn spawn_with(extra_args: &[&str]) -> TestServer {
        Self::spawn_on(Backend::Sqlite, extra_args).await
    }

    /// A fresh server on this backend: with `Postgres`, a private cluster of its own.
    pub async fn spawn_on(backend: Backend, extra_args: &[&str]) -> TestServer {
        tls_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let postgres = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let cluster = tokio::task::spawn_blocking(testdb::Cluster::start).await.expect("start PostgreSQL");
                let url = cluster.fresh_database();
                Some((Arc::new(cluster), url))
            }
        };
        let mut extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        if let Some((_, url)) = &postgres {
            extra_args.extend(["--database".to_owned(), url.clone()]);
        }
        let out = Command::new(bin("muster-server"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(&extra_args)
            .arg("bootstrap")
            .arg("--name")
            .arg("test-admin")
            .output()
            .expect("run bootstrap");
        assert!(out.status.success(), "bootstrap failed: {}", String::from_utf8_lossy(&out.stderr));
        let admin_token = String::from_utf8(out.stdout).expect("utf8").trim().to_owned();
        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        let ca = dir.path().join("tls/ca.pem");
        let mut server = TestServer {
            api: Api::placeholder(&url, &admin_token),
            dir,
            backend,
            postgres,
            port,
            url,
            ca,
            admin_token,
            process: None,
            extra_args,
        };
        server.start().await;
        server
    }

    /// Starts (or restarts) the server process on the same port and data directory.
    pub async fn start(&mut self) {
        let n = std::fs::read_dir(self.dir.path()).map(|d| d.count()).unwrap_or(0);
        let log = self.dir.path().join(format!("server-{n}.log"));
        let child = Command::new(bin("muster-server"))
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(if self.extra_args.iter().any(|a| a == "--ping-interval") { vec![] } else { vec!["--ping-interval", TEST_PING_INTERVAL] })
            .arg("--sweep-interval")
            .arg("100ms")
            .args(&self.extra_args)
            .env("MUSTER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn muster-server");
        self.process = Some(Process { child, log });
        let ca = self.ca.clone();
        wait_for("the server to generate its CA", Duration::from_secs(20), || {
            let ca = ca.clone();
            async move { ca.exists().then_some(()) }
        })
        .await;
        self.api = Api::new(&self.url, &self.admin_token, &self.ca);
        let api = self.api.clone();
        wait_for("the server to answer /healthz", Duration::from_secs(20), || {
            let api = api.clone();
            async move { api.healthz().await.then_some(()) }
        })
        .await;
    }

    pub fn log(&self) -> String {
        // Every server log of this data directory, oldest first.
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect())
            .unwrap_or_default();
        logs.sort();
        logs.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect()
    }

    pub fn process(&mut self) -> &mut Process {
        self.process.as_mut().expect("server is running")
    }

    pub async fn enroll_token(&self, uses: u32, labels: &[&str]) -> String {
        self.enroll_token_with_ttl(uses, labels, 600).await
    }

    pub async fn enroll_token_with_ttl(&self, uses: u32, labels: &[&str], ttl_secs: u64) -> String {
        let req = CreateEnrollToken {
            ttl_secs: Some(ttl_secs),
            uses: Some(uses),
            labels: Labels::from_pairs(labels).expect("labels"),
            approve: false,
        };
        let created: EnrollTokenCreated = self.api.post("/enroll-tokens", &req).await;
        created.token
    }

    /// Starts a real agent that enrolls with `token` and keeps its state in a directory of its own.
    pub fn spawn_agent(&self, token: Option<&str>, labels: &[&str]) -> TestAgent {
        self.spawn_agent_as(None, token, labels)
    }

    /// An agent that reports `hostname` (its `--hostname`) instead of this machine's name.
    pub fn spawn_agent_as(&self, hostname: Option<&str>, token: Option<&str>, labels: &[&str]) -> TestAgent {
        self.agent_template(hostname, labels).start_with(token)
    }

    /// An agent with this text as its agent.toml (beside the usual flags, which win).
    pub fn spawn_agent_with_config(&self, token: Option<&str>, labels: &[&str], config: &str) -> TestAgent {
        let mut agent = self.agent_template(None, labels);
        agent.config = Some(config.to_owned());
        agent.start_with(token)
    }

    /// An agent started from a copy of another agent's credential file, as a cloned disk image
    /// would be: no enrollment token, someone else's identity.
    pub fn spawn_agent_from_credential(&self, credential_json: &str) -> TestAgent {
        let agent = self.agent_template(None, &[]);
        std::fs::write(agent.credential_path(), credential_json).expect("write credential.json");
        agent.start_with(None)
    }

    fn agent_template(&self, hostname: Option<&str>, labels: &[&str]) -> TestAgent {
        TestAgent {
            state: tempfile::tempdir().expect("tempdir"),
            process: None,
            server: self.url.clone(),
            ca: self.ca.clone(),
            hostname: hostname.map(str::to_owned),
            labels: labels.iter().map(|s| s.to_string()).collect(),
            heartbeat_interval: "300ms".into(),
            config: None,
        }
    }

    /// Runs one SQL statement straight on the server's database (its SQLite file, or its
    /// PostgreSQL database), as anyone holding the data directory or the database could;
    /// returns the rows it changed.
    pub async fn sql(&self, statement: &str) -> u64 {
        use sqlx::ConnectOptions;
        if let Some((_, url)) = &self.postgres {
            let mut conn: sqlx::PgConnection =
                url.parse::<sqlx::postgres::PgConnectOptions>().expect("url").connect().await.expect("connect");
            let done = sqlx::query(sqlx::AssertSqlSafe(statement.to_owned())).execute(&mut conn).await.expect(statement);
            return done.rows_affected();
        }
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(self.dir.path().join("muster.db"))
            .busy_timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("open the server's database");
        let done = sqlx::query(sqlx::AssertSqlSafe(statement.to_owned())).execute(&mut conn).await.expect(statement);
        done.rows_affected()
    }

    /// Runs the `muster` CLI against this server as the admin.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(&self.admin_token, args)
    }

    /// Runs the `muster` CLI against this server with another token.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        Command::new(bin("muster"))
            .args(args)
            .env("MUSTER_SERVER", &self.url)
            .env("MUSTER_TOKEN", token)
            .env("MUSTER_CA", &self.ca)
            .output()
            .expect("run muster")
    }
}

pub struct TestAgent {
    pub state: TempDir,
    pub process: Option<Process>,
    server: String,
    ca: PathBuf,
    hostname: Option<String>,
    labels: Vec<String>,
    heartbeat_interval: String,
    config: Option<String>,
}

impl TestAgent {
    fn start_with(mut self, token: Option<&str>) -> TestAgent {
        let n = std::fs::read_dir(self.state.path()).map(|d| d.count()).unwrap_or(0);
        let log = self.state.path().join(format!("agent-{n}.log"));
        let mut cmd = Command::new(bin("muster-agent"));
        cmd.arg("--server")
            .arg(&self.server)
            .arg("--ca")
            .arg(&self.ca)
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--heartbeat-interval")
            .arg(&self.heartbeat_interval)
            .arg("--backoff-initial")
            .arg("100ms")
            .arg("--backoff-max")
            .arg("1s")
            .env_remove("MUSTER_ENROLL_TOKEN")
            .env("MUSTER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for l in &self.labels {
            cmd.arg("--label").arg(l);
        }
        if let Some(h) = &self.hostname {
            cmd.arg("--hostname").arg(h);
        }
        if let Some(t) = token {
            cmd.arg("--enroll-token").arg(t);
        }
        if let Some(text) = &self.config {
            let path = self.state.path().join("agent.toml");
            std::fs::write(&path, text).expect("write agent.toml");
            cmd.arg("--config").arg(path);
        }
        self.process = Some(Process { child: cmd.spawn().expect("spawn muster-agent"), log });
        self
    }

    /// Starts the agent again from the same state directory, with no enrollment token.
    pub fn restart(mut self) -> TestAgent {
        self.process = None;
        self.start_with(None)
    }

    pub fn process(&mut self) -> &mut Process {
        self.process.as_mut().expect("agent is running")
    }

    /// `muster-agent check` with this agent's flags and config.
    pub fn check(&self) -> Output {
        let mut cmd = Command::new(bin("muster-agent"));
        cmd.arg("--server").arg(&self.server).arg("--ca").arg(&self.ca).arg("--state-dir").arg(self.state.path());
        if self.config.is_some() {
            cmd.arg("--config").arg(self.state.path().join("agent.toml"));
        }
        cmd.arg("check").env_remove("MUSTER_ENROLL_TOKEN").output().expect("run muster-agent check")
    }

    pub fn credential_path(&self) -> PathBuf {
        self.state.path().join("credential.json")
    }

    /// The id the agent stored after enrolling, once it has.
    pub async fn id(&self) -> AgentId {
        let path = self.credential_path();
        wait_for("the agent to store its credential", Duration::from_secs(20), || {
            let path = path.clone();
            async move {
                let text = std::fs::read_to_string(&path).ok()?;
                let v: serde_json::Value = serde_json::from_str(&text).ok()?;
                AgentId::parse(v["agent_id"].as_str()?).ok()
            }
        })
        .await
    }
}

/// The operators' API as a test uses it: typed, panicking on anything unexpected.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn placeholder(base: &str, token: &str) -> Api {
        Api { http: reqwest::Client::new(), base: base.to_owned(), token: token.to_owned() }
    }

    pub fn new(base: &str, token: &str, ca: &Path) -> Api {
        Api { http: client_trusting(ca), base: base.to_owned(), token: token.to_owned() }
    }

    pub fn with_token(&self, token: &str) -> Api {
        Api { http: self.http.clone(), base: self.base.clone(), token: token.to_owned() }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub async fn healthz(&self) -> bool {
        matches!(self.http.get(format!("{}/healthz", self.base)).send().await, Ok(r) if r.status().is_success())
    }

    pub async fn raw_get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).bearer_auth(&self.token).send().await.expect("request")
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> T {
        let resp = self.raw_get(path).await;
        let status = resp.status();
        let body = resp.text().await.expect("body");
        assert!(status.is_success(), "GET {path}: {status} {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    pub async fn raw_post<B: Serialize>(&self, path: &str, body: &B) -> reqwest::Response {
        self.http.post(self.url(path)).bearer_auth(&self.token).json(body).send().await.expect("request")
    }

    pub async fn raw_patch<B: Serialize>(&self, path: &str, body: &B) -> reqwest::Response {
        self.http.patch(self.url(path)).bearer_auth(&self.token).json(body).send().await.expect("request")
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> T {
        let resp = self.http.post(self.url(path)).bearer_auth(&self.token).json(body).send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        assert!(status.is_success(), "POST {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: {e}: {text}"))
    }

    pub async fn agents(&self) -> Vec<AgentSummary> {
        self.get("/agents").await
    }

    pub async fn agent(&self, id: &AgentId) -> AgentDetail {
        self.get(&format!("/agents/{id}")).await
    }

    /// Waits until the agent has `status`, and returns what the API then says of it.
    pub async fn wait_status(&self, id: &AgentId, status: AgentStatus, deadline: Duration) -> AgentDetail {
        wait_for(&format!("agent {id} to be {status}"), deadline, || async move {
            let resp = self.raw_get(&format!("/agents/{id}")).await;
            if !resp.status().is_success() {
                return None;
            }
            let a: AgentDetail = resp.json().await.ok()?;
            (a.summary.status == status).then_some(a)
        })
        .await
    }
}

/// An HTTPS client that trusts only the given CA file.
pub fn client_trusting(ca: &Path) -> reqwest::Client {
    tls_provider();
    reqwest::Client::builder()
        .use_preconfigured_tls(rustls_config(ca).as_ref().clone())
        .timeout(Duration::from_secs(10))
        // Below the server's keep-alive timeout, so the client never reuses a connection the
        // server is closing.
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

pub fn rustls_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(c.expect("CA cert")).expect("add CA");
    }
    Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}

impl Api {
    pub async fn create_job(&self, req: &shared::job::CreateJob) -> shared::job::JobSummary {
        self.post("/jobs", req).await
    }

    pub async fn job(&self, id: &str) -> shared::job::JobDetail {
        self.get(&format!("/jobs/{id}")).await
    }

    /// Waits until every run of the job is final and the job says it finished.
    pub async fn wait_job_finished(&self, id: &str, deadline: Duration) -> shared::job::JobDetail {
        wait_for(&format!("job {id} to finish"), deadline, || async move {
            let j = self.job(id).await;
            j.job.finished_at.is_some().then_some(j)
        })
        .await
    }
}

/// A job request with the defaults a test starts from.
pub fn job(target: shared::job::Target, program: shared::job::Program) -> shared::job::CreateJob {
    shared::job::CreateJob {
        target,
        command: shared::job::CommandSpec { program, cwd: None, env: Default::default(), secret_env: Default::default() },
        timeout_secs: Some(30),
        ttl_secs: None,
        concurrency: None,
        max_errors: None,
        output_limit: None,
        dry_run: false,
        id: None,
        signature: None,
    }
}

pub fn shell(script: &str) -> shared::job::Program {
    shared::job::Program::Shell(script.to_owned())
}

/// How many processes on this machine have `marker` in their command line.
pub fn processes_with(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
                .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker)))
                .count()
        })
        .unwrap_or(0)
}

impl TestServer {
    /// Starts `n` agents enrolled with one token (labels for all), waits for all to be online,
    /// and returns them with their ids.
    pub async fn spawn_agents(&self, n: usize, labels: &[&str]) -> Vec<(TestAgent, AgentId)> {
        self.spawn_agents_every(n, labels, "300ms").await
    }

    /// The same, with agents that heartbeat every `interval`.
    pub async fn spawn_agents_every(&self, n: usize, labels: &[&str], interval: &str) -> Vec<(TestAgent, AgentId)> {
        let token = self.enroll_token(n as u32, labels).await;
        let agents: Vec<TestAgent> = (0..n)
            .map(|_| {
                let mut a = self.agent_template(None, &[]);
                a.heartbeat_interval = interval.to_owned();
                a.start_with(Some(&token))
            })
            .collect();
        let mut out = Vec::new();
        for a in agents {
            let id = a.id().await;
            self.api.wait_status(&id, shared::api::AgentStatus::Online, Duration::from_secs(30)).await;
            out.push((a, id));
        }
        out
    }
}

/// Resident memory of a process, in KiB (from /proc).
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

/// A TLS connection to the server from a chosen loopback source address, with nothing sent
/// on it: what a peer that completes the handshake and never speaks holds.
pub async fn tls_from(source: [u8; 4], port: u16, ca: &Path) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(std::net::SocketAddr::from((source, 0)))?;
    let tcp = sock.connect(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let connector = tokio_rustls::TlsConnector::from(rustls_config(ca));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// Waits until the peer closes `stream` (a read returns 0 or an error); panics past `deadline`.
pub async fn wait_closed<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, deadline: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + deadline;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Err(_) => panic!("the server did not close the connection within {deadline:?}"),
            Ok(Ok(0) | Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Size of the server's database files (the SQLite file and its WAL), in bytes.
pub fn db_bytes(dir: &Path) -> u64 {
    ["muster.db", "muster.db-wal"].iter().map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0)).sum()
}
