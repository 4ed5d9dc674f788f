//! muster-loadgen: many simulated agents speaking the real protocol over real TLS to one
//! server on loopback, for benchmarks. Bounded in agents and time; stops by itself.
//!
//! `muster-loadgen heartbeats`: N agents heartbeat at a fixed interval for a fixed time; then
//! the SQLite file is watched until every heartbeat sent is stored, and the end-to-end
//! ingest rate is reported.
//!
//! `muster-loadgen storm`: N agents connect, then wait for the server to go away (the script
//! kills and restarts it) and come back as real agents do: the agent's own backoff schedule
//! (full jitter, 1 s doubling to 60 s) with no cap on attempts in flight, honouring the
//! server's busy answers. Reports how long until every agent is back, and the rate curve.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use shared::api::{CreateEnrollToken, EnrollTokenCreated};
use shared::protocol::{self, ServerMessage};
use shared::{Labels, Timestamp};
use tests::ws;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Parser)]
#[command(name = "muster-loadgen", about = "Simulated agents for Muster benchmarks (loopback only)")]
struct Cli {
    /// Server URL; must be a loopback address.
    #[arg(long, default_value = "https://127.0.0.1:8443")]
    server: String,
    /// CA certificate of the server.
    #[arg(long)]
    ca: PathBuf,
    /// Admin token, to create the enrollment token for new simulated agents.
    #[arg(long, env = "MUSTER_TOKEN")]
    token: String,
    /// File caching the simulated agents' credentials between runs.
    #[arg(long, default_value = "loadgen-agents.json")]
    agents_file: PathBuf,
    /// How many simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Loopback source addresses to spread connections over (127.0.0.1 ..= 127.0.0.N): one
    /// address gives about 28,000 ports.
    #[arg(long, default_value_t = 4)]
    source_addrs: u8,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Heartbeat at a fixed interval for a fixed time, then measure what reached the database.
    Heartbeats {
        /// Interval between one agent's heartbeats.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
        /// How long to send.
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        duration: Duration,
        /// The server's database, read to see what was stored: its SQLite file, or a
        /// postgres:// URL.
        #[arg(long)]
        db: String,
    },
    /// Create one job for every simulated agent and measure until each result is stored. The
    /// simulated agents answer at the protocol level (started, output, finished) without
    /// starting a process, so this measures the server.
    Broadcast {
        /// The server's database, read to see what was stored: its SQLite file, or a
        /// postgres:// URL.
        #[arg(long)]
        db: String,
        /// Jobs to run, one after another.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// Hold every agent connected; when the server goes away, reconnect with the agent's own
    /// backoff and measure until all are back.
    Storm {
        /// Written once every agent is connected: the cue to kill the server.
        #[arg(long)]
        ready_file: PathBuf,
        /// Give up this long after the first disconnect.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        within: Duration,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    shared::duration::parse(s).map_err(|e| e.to_string())
}

#[derive(Clone, Serialize, Deserialize)]
struct SimAgent {
    agent_id: String,
    credential: String,
}

#[derive(Default, Serialize, Deserialize)]
struct AgentsFile {
    server: String,
    agents: Vec<SimAgent>,
}

const MAX_AGENTS: usize = 19_000;
const MAX_DURATION: Duration = Duration::from_secs(600);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tests::tls_provider();
    let addr = loopback_addr(&cli.server)?;
    if cli.agents == 0 || cli.agents > MAX_AGENTS {
        bail!("--agents must be 1 to {MAX_AGENTS}: one process holds at most 20,000 files; run several processes for more");
    }
    let tls = tests::rustls_config(&cli.ca);
    let agents = ensure_agents(&cli, tls.clone(), addr).await?;
    match &cli.command {
        Cmd::Heartbeats { interval, duration, db } => {
            if *duration > MAX_DURATION {
                bail!("--duration is at most {MAX_DURATION:?}");
            }
            // An agent announces its interval, at least 200 ms, and the server stores one sample
            // per half interval: a simulated agent heartbeating faster would not be one.
            if *interval < Duration::from_millis(200) {
                bail!("--interval is at least 200ms, the shortest an agent may announce; offer more load with more --agents");
            }
            heartbeats(&cli, &agents, tls, addr, *interval, *duration, db).await
        }
        Cmd::Broadcast { db, rounds } => broadcast(&cli, &agents, tls, addr, db, (*rounds).clamp(1, 20)).await,
        Cmd::Storm { ready_file, within } => storm(&cli, &agents, tls, addr, ready_file, (*within).min(MAX_DURATION)).await,
    }
}

/// The server's socket address, refusing anything but loopback.
fn loopback_addr(server: &str) -> anyhow::Result<SocketAddr> {
    let hostport = server.strip_prefix("https://").context("server must be https://")?.trim_end_matches('/');
    let addr: SocketAddr = hostport.parse().context("server must be https://<loopback ip>:<port>")?;
    if !addr.ip().is_loopback() {
        bail!("muster-loadgen only sends to loopback addresses, not {}", addr.ip());
    }
    Ok(addr)
}

async fn ensure_agents(cli: &Cli, tls: Arc<rustls::ClientConfig>, addr: SocketAddr) -> anyhow::Result<Vec<SimAgent>> {
    let mut file: AgentsFile = match std::fs::read_to_string(&cli.agents_file) {
        Ok(text) => serde_json::from_str(&text).context("agents file")?,
        Err(_) => AgentsFile::default(),
    };
    if file.server != cli.server {
        file = AgentsFile { server: cli.server.clone(), agents: Vec::new() };
    }
    let missing = cli.agents.saturating_sub(file.agents.len());
    if missing > 0 {
        let started = Instant::now();
        let api = tests::Api::new(&cli.server, &cli.token, &cli.ca);
        let token: EnrollTokenCreated = api
            .post(
                "/enroll-tokens",
                &CreateEnrollToken {
                    ttl_secs: Some(3600),
                    uses: Some(missing as u32),
                    labels: Labels::from_pairs(["loadgen=yes"])?,
                    approve: false,
                },
            )
            .await;
        let gate = Arc::new(Semaphore::new(cli.connect_concurrency));
        let mut tasks = Vec::with_capacity(missing);
        for i in 0..missing {
            let (gate, tls, token) = (gate.clone(), tls.clone(), token.token.clone());
            let source = source_ip(i, cli.source_addrs);
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await?;
                let mut ws = dial(addr, source, &token, tls).await?;
                let welcome = ws::open(&mut ws, &format!("sim-{i}"), 1000).await;
                let _ = ws.close(None).await;
                Ok::<_, anyhow::Error>(SimAgent {
                    agent_id: welcome.agent_id.to_string(),
                    credential: welcome.credential.context("no credential")?,
                })
            }));
        }
        for t in tasks {
            file.agents.push(t.await??);
        }
        std::fs::write(&cli.agents_file, serde_json::to_vec(&file)?)?;
        eprintln!("enrolled {missing} simulated agents in {:.1}s", started.elapsed().as_secs_f64());
    }
    file.agents.truncate(cli.agents);
    Ok(file.agents)
}

fn source_ip(i: usize, n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(n.max(1))) as u8))
}

async fn dial(addr: SocketAddr, source: IpAddr, bearer: &str, tls: Arc<rustls::ClientConfig>) -> anyhow::Result<ws::Ws> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut req = format!("wss://{addr}{}", protocol::CONNECT_PATH).into_client_request()?;
    req.headers_mut().insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {bearer}"))?);
    req.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol::SUBPROTOCOL));
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(4096);
    let (ws, _) = tokio_tungstenite::client_async_tls_with_config(req, tcp, Some(config), Some(Connector::Rustls(tls))).await?;
    Ok(ws)
}

/// Connects every simulated agent and completes hello/welcome.
async fn connect_all(
    cli: &Cli,
    agents: &[SimAgent],
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    interval: Duration,
) -> anyhow::Result<Vec<ws::Ws>> {
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(cli.connect_concurrency));
    let interval_ms = interval.as_millis() as u64;
    let mut tasks = Vec::with_capacity(agents.len());
    for (i, a) in agents.iter().enumerate() {
        let (gate, tls, cred) = (gate.clone(), tls.clone(), a.credential.clone());
        let source = source_ip(i, cli.source_addrs);
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let mut ws = dial(addr, source, &cred, tls).await?;
            ws::open(&mut ws, &format!("sim-{i}"), interval_ms.max(200)).await;
            Ok::<_, anyhow::Error>(ws)
        }));
    }
    let mut out = Vec::with_capacity(agents.len());
    for t in tasks {
        out.push(t.await??);
    }
    eprintln!("connected {} agents in {:.1}s", out.len(), started.elapsed().as_secs_f64());
    Ok(out)
}

async fn heartbeats(
    cli: &Cli,
    agents: &[SimAgent],
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    interval: Duration,
    duration: Duration,
    db: &str,
) -> anyhow::Result<()> {
    let conns = connect_all(cli, agents, tls, addr, interval).await?;
    let sent = Arc::new(AtomicU64::new(0));
    let t0 = Timestamp::now();
    let start = tokio::time::Instant::now();
    let stop_at = start + duration;
    let n = conns.len();
    let mut tasks = Vec::with_capacity(n);
    for (i, mut conn) in conns.into_iter().enumerate() {
        let sent = sent.clone();
        // Spread the agents evenly over one interval, as a real fleet's jitter does.
        let mut next = start + interval.mul_f64(i as f64 / n as f64);
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {
                        if next >= stop_at { break; }
                        seq += 1;
                        let text = serde_json::to_string(&ws::heartbeat(seq, "sim")).unwrap_or_default();
                        if conn.send(Message::Text(text.into())).await.is_err() { break; }
                        sent.fetch_add(1, Ordering::Relaxed);
                        next += interval;
                    }
                    msg = conn.next() => match msg {
                        Some(Ok(Message::Text(t))) => { let _ = ServerMessage::decode(t.as_str()); }
                        Some(Ok(_)) => {}
                        _ => break,
                    }
                }
            }
            conn
        }));
    }
    let mut conns = Vec::with_capacity(n);
    for t in tasks {
        conns.push(t.await?);
    }
    let send_secs = start.elapsed().as_secs_f64();
    let total = sent.load(Ordering::Relaxed);

    // Wait (bounded) until the database holds every heartbeat sent since t0.
    let pool = Db::open(db).await?;
    // Stop when everything is there, or when the count has not moved for 2 s (the server
    // dropped some under overload); the rate counts up to the last row that arrived.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut stored, mut last_change) = (0u64, start.elapsed());
    loop {
        let count = pool.count("SELECT COUNT(*) FROM heartbeats WHERE at >= $1", &t0.unix_millis().to_string()).await?;
        if count != stored {
            stored = count;
            last_change = start.elapsed();
        }
        if stored >= total || start.elapsed() - last_change > Duration::from_secs(2) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_stored_secs = last_change.as_secs_f64();
    for mut c in conns {
        let _ = c.close(None).await;
    }
    let offered = n as f64 / interval.as_secs_f64();
    println!("agents={n} interval={interval:?} offered={offered:.0}/s");
    println!("sent={total} in {send_secs:.2}s ({:.0}/s)", total as f64 / send_secs);
    println!("stored={stored} ({:.2}%), the last after {all_stored_secs:.2}s", stored as f64 * 100.0 / total.max(1) as f64);
    println!("ingest_rate={:.0} heartbeats/s end to end", stored as f64 / all_stored_secs);
    if stored < total {
        bail!("{} heartbeats sent but not stored", total - stored);
    }
    Ok(())
}

/// The server's database, read-only, to see what was stored: SQLite or PostgreSQL.
enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Db {
    async fn open(db: &str) -> anyhow::Result<Db> {
        if db.starts_with("postgres://") || db.starts_with("postgresql://") {
            let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(db).await.context("connecting to PostgreSQL")?;
            return Ok(Db::Postgres(pool));
        }
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(db).read_only(true))
            .await
            .context("opening the server's database")?;
        Ok(Db::Sqlite(pool))
    }

    /// `SELECT COUNT(*) ... $1` with one bind, a number or a text.
    async fn count(&self, sql: &'static str, arg: &str) -> anyhow::Result<u64> {
        let n: i64 = match self {
            Db::Sqlite(p) => {
                let q = sqlx::query_as::<_, (i64,)>(sqlx::AssertSqlSafe(sql.replace("$1", "?")));
                match arg.parse::<i64>() {
                    Ok(v) => q.bind(v).fetch_one(p).await?.0,
                    Err(_) => q.bind(arg).fetch_one(p).await?.0,
                }
            }
            Db::Postgres(p) => {
                let q = sqlx::query_as::<_, (i64,)>(sql);
                match arg.parse::<i64>() {
                    Ok(v) => q.bind(v).fetch_one(p).await?.0,
                    Err(_) => q.bind(arg).fetch_one(p).await?.0,
                }
            }
        };
        Ok(n as u64)
    }

    /// Per run of the job: dispatched and finished, in ms after the job's creation, and how
    /// many output rows it has.
    async fn timings(&self, job: &str) -> anyhow::Result<Vec<(i64, i64, i64)>> {
        const SQL: &str = "SELECT r.dispatched_at - j.created_at, r.finished_at - j.created_at, \
             (SELECT COUNT(*) FROM run_output o WHERE o.run_id = r.id) FROM runs r JOIN jobs j ON j.id = r.job_id WHERE r.job_id = $1";
        Ok(match self {
            Db::Sqlite(p) => sqlx::query_as(sqlx::AssertSqlSafe(SQL.replace("$1", "?"))).bind(job).fetch_all(p).await?,
            Db::Postgres(p) => sqlx::query_as(SQL).bind(job).fetch_all(p).await?,
        })
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn describe(name: &str, mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!(
        "{name}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (n={})",
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        percentile(&v, 1.0),
        v.len()
    )
}

async fn broadcast(
    cli: &Cli,
    agents: &[SimAgent],
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    db: &str,
    rounds: u32,
) -> anyhow::Result<()> {
    use shared::job::{CommandSpec, CreateJob, JobSummary, Program, Stream, Target};
    use shared::protocol::{AgentMessage, Outcome, RunFinished, RunOutput, RunStarted};

    let conns = connect_all(cli, agents, tls, addr, Duration::from_secs(60)).await?;
    let n = conns.len();
    // When each `run` reached its simulated agent, relative to the moment the job was posted.
    let t0 = Arc::new(std::sync::Mutex::new(Instant::now()));
    let received = Arc::new(std::sync::Mutex::new(Vec::<f64>::with_capacity(n)));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::with_capacity(n);
    for mut conn in conns {
        let (t0, received, stop) = (t0.clone(), received.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = conn.next() => m,
                    _ = stop.cancelled() => break,
                };
                let Some(Ok(Message::Text(t))) = msg else {
                    if matches!(msg, Some(Ok(_))) {
                        continue;
                    }
                    break;
                };
                let Ok(ServerMessage::Run(run)) = ServerMessage::decode(t.as_str()) else { continue };
                let at = t0.lock().map(|t| t.elapsed().as_secs_f64() * 1000.0).unwrap_or(0.0);
                if let Ok(mut r) = received.lock() {
                    r.push(at);
                }
                let id = run.run_id;
                let replies = [
                    AgentMessage::RunStarted(RunStarted { run_id: id.clone() }),
                    AgentMessage::RunOutput(RunOutput { run_id: id.clone(), stream: Stream::Stdout, offset: 0, data: "ok\n".into() }),
                    AgentMessage::RunFinished(RunFinished {
                        run_id: id,
                        outcome: Outcome::Succeeded,
                        exit_code: Some(0),
                        signal: None,
                        error: None,
                        stdout_len: 3,
                        stderr_len: 0,
                        stdout_truncated: false,
                        stderr_truncated: false,
                    }),
                ];
                for m in &replies {
                    if ws::send(&mut conn, m).await.is_err() {
                        return conn;
                    }
                }
            }
            conn
        }));
    }

    let api = tests::Api::new(&cli.server, &cli.token, &cli.ca);
    let pool = Db::open(db).await?;
    for round in 1..=rounds {
        if let Ok(mut r) = received.lock() {
            r.clear();
        }
        let req = CreateJob {
            target: Target::Selector(shared::Selector::parse("loadgen=yes")?),
            command: CommandSpec {
                program: Program::Argv(vec!["true".into()]),
                cwd: None,
                env: Default::default(),
                secret_env: Default::default(),
            },
            timeout_secs: Some(60),
            ttl_secs: Some(60),
            concurrency: None,
            max_errors: None,
            output_limit: None,
            dry_run: false,
            id: None,
            signature: None,
        };
        let started = Instant::now();
        if let Ok(mut t) = t0.lock() {
            *t = started;
        }
        let job: JobSummary = api.post("/jobs", &req).await;
        let posted_ms = started.elapsed().as_secs_f64() * 1000.0;
        let deadline = started + Duration::from_secs(120);
        let (all_stored_ms, from_creation_ms) = loop {
            let done = pool
                .count("SELECT COUNT(*) FROM runs WHERE job_id = $1 AND state NOT IN ('pending', 'dispatched', 'running')", &job.id)
                .await?;
            if done as usize >= n {
                break (started.elapsed().as_secs_f64() * 1000.0, Timestamp::now().unix_millis() - job.created_at.unix_millis());
            }
            if Instant::now() > deadline {
                bail!("only {done} of {n} results stored after 120 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let rows = pool.timings(&job.id).await?;
        let received_ms = received.lock().map(|r| r.clone()).unwrap_or_default();
        let ok = rows.iter().filter(|r| r.2 == 1).count();
        println!("round {round}: {n} agents, job {}", job.id);
        println!("  POST /jobs answered (job and {n} runs committed) after {posted_ms:.0} ms");
        println!("  {}", describe("run message received by the agent (from the POST)", received_ms));
        println!("  {}", describe("result received by the server (from job creation)", rows.iter().map(|r| r.1 as f64).collect()));
        println!(
            "  every result stored (committed) {all_stored_ms:.0} ms after the POST, {from_creation_ms} ms after the job's creation; {ok}/{n} with their output"
        );
    }
    stop.cancel();
    for t in tasks {
        if let Ok(mut c) = t.await {
            let _ = c.close(None).await;
        }
    }
    Ok(())
}

/// How one reconnect attempt ended, as the storm counts them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Connected,
    /// Muster's 503 with `X-Muster-Error`: the wait it asked for.
    Busy(Duration),
    Failed,
}

/// One attempt, as the real agent makes it: TCP, TLS, upgrade, `hello`, `welcome`, each within
/// the agent's own timeouts (15 s to connect, 15 s for `welcome`).
async fn attempt(addr: SocketAddr, source: IpAddr, cred: &str, tls: Arc<rustls::ClientConfig>) -> (Attempt, Option<ws::Ws>, String) {
    use tokio_tungstenite::tungstenite;
    let dialed = tokio::time::timeout(Duration::from_secs(15), dial(addr, source, cred, tls)).await;
    let mut conn = match dialed {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            if let Some(tungstenite::Error::Http(resp)) = e.downcast_ref::<tungstenite::Error>()
                && resp.status().as_u16() == 503
                && resp.headers().contains_key(protocol::MUSTER_ERROR_HEADER)
            {
                let secs = resp.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(1);
                return (Attempt::Busy(Duration::from_secs(secs)), None, String::new());
            }
            // The kind of failure, without addresses or ports, to count them.
            let why = match e.downcast_ref::<tungstenite::Error>() {
                Some(tungstenite::Error::Http(resp)) => format!("HTTP {}", resp.status()),
                Some(tungstenite::Error::Io(io)) => format!("io: {:?}", io.kind()),
                Some(tungstenite::Error::Tls(t)) => format!("tls: {t}"),
                Some(other) => format!("ws: {other}"),
                None => match e.downcast_ref::<std::io::Error>() {
                    Some(io) => format!("tcp: {:?} ({})", io.kind(), io.raw_os_error().unwrap_or(0)),
                    None => format!("other: {e}"),
                },
            };
            return (Attempt::Failed, None, why);
        }
        Err(_) => return (Attempt::Failed, None, "connect timed out (15 s)".into()),
    };
    if ws::send(&mut conn, &ws::hello("sim", 10_000)).await.is_err() {
        return (Attempt::Failed, None, "hello not sent".into());
    }
    let welcome = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(m) = conn.next().await {
            match m {
                Ok(Message::Text(t)) => {
                    return match ServerMessage::decode(t.as_str()) {
                        Ok(ServerMessage::Welcome(_)) => Ok(()),
                        _ => Err("not welcome first".to_owned()),
                    };
                }
                Ok(Message::Close(f)) => return Err(format!("closed before welcome: {}", f.map(|f| u16::from(f.code)).unwrap_or(0))),
                Ok(_) => {}
                Err(e) => return Err(format!("lost before welcome: {e}")),
            }
        }
        Err("closed before welcome".to_owned())
    });
    match welcome.await {
        Ok(Ok(())) => (Attempt::Connected, Some(conn), String::new()),
        Ok(Err(why)) => (Attempt::Failed, None, why),
        Err(_) => (Attempt::Failed, None, "no welcome within 15 s".into()),
    }
}

/// Holds a session like an agent: heartbeats every 10 s with jitter, until the link drops.
async fn hold(conn: &mut ws::Ws, stop: &tokio_util::sync::CancellationToken) -> bool {
    let mut seq = 0u64;
    let mut next = tokio::time::Instant::now() + Duration::from_secs(10).mul_f64(shared::backoff::random_fraction());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep_until(next) => {
                seq += 1;
                if ws::send(conn, &ws::heartbeat(seq, "sim")).await.is_err() { return true; }
                next += Duration::from_secs(10).mul_f64(0.9 + 0.2 * shared::backoff::random_fraction());
            }
            m = conn.next() => match m {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return true,
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn storm(
    cli: &Cli,
    agents: &[SimAgent],
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    ready_file: &Path,
    within: Duration,
) -> anyhow::Result<()> {
    let conns = connect_all(cli, agents, tls.clone(), addr, Duration::from_secs(10)).await?;
    let n = conns.len();
    let origin = Instant::now();
    // (ms since origin, outcome) of every attempt, and when each agent went away and came back.
    let log = Arc::new(std::sync::Mutex::new(Vec::<(u64, Attempt)>::new()));
    let reasons = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let gone = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let back = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::with_capacity(n);
    for (i, (mut conn, a)) in conns.into_iter().zip(agents).enumerate() {
        let (log, gone, back, stop, tls, cred) = (log.clone(), gone.clone(), back.clone(), stop.clone(), tls.clone(), a.credential.clone());
        let reasons = reasons.clone();
        let source = source_ip(i, cli.source_addrs);
        tasks.push(tokio::spawn(async move {
            if !hold(&mut conn, &stop).await {
                return;
            }
            // The dead session's socket goes now, as the agent's does: holding it while
            // reconnecting would count two files per agent.
            drop(conn);
            let ms = || origin.elapsed().as_millis() as u64;
            if let Ok(mut g) = gone.lock() {
                g.push(ms());
            }
            // The agent's own schedule: what `muster-agent` does after a session ends.
            let mut backoff = shared::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
            loop {
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
                loop {
                    let (outcome, conn, why) = attempt(addr, source, &cred, tls.clone()).await;
                    if let Ok(mut l) = log.lock() {
                        l.push((ms(), outcome));
                    }
                    if outcome == Attempt::Failed
                        && let Ok(mut r) = reasons.lock()
                    {
                        *r.entry(why).or_default() += 1;
                    }
                    match (outcome, conn) {
                        (Attempt::Connected, Some(mut c)) => {
                            back.fetch_add(1, Ordering::Relaxed);
                            hold(&mut c, &stop).await;
                            return;
                        }
                        (Attempt::Busy(wait), _) => {
                            tokio::select! {
                                _ = tokio::time::sleep(shared::backoff::after_busy(wait)) => {}
                                _ = stop.cancelled() => return,
                            }
                        }
                        _ => break,
                    }
                }
            }
        }));
    }
    std::fs::write(ready_file, b"ready\n")?;
    eprintln!("{n} agents connected; waiting for the server to go away");
    // Bounded: the script kills the server within a minute of the cue.
    let cue_deadline = Instant::now() + Duration::from_secs(60);
    while gone.lock().map(|g| g.is_empty()).unwrap_or(true) {
        if Instant::now() > cue_deadline {
            stop.cancel();
            bail!("the server did not go away within 60 s of the cue");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first_gone = gone.lock().map(|g| g.iter().copied().min().unwrap_or(0)).unwrap_or(0);
    let deadline = Instant::now() + within;
    while (back.load(Ordering::Relaxed) as usize) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_back_ms = origin.elapsed().as_millis() as u64;
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let log = log.lock().map(|l| l.clone()).unwrap_or_default();
    let back = back.load(Ordering::Relaxed) as usize;
    let count = |pred: &dyn Fn(&Attempt) -> bool| log.iter().filter(|(_, a)| pred(a)).count();
    println!("agents={n} server gone at t=0");
    println!(
        "back: {back}/{n}, the last {:.1}s after the server went away",
        log.iter().filter(|(_, a)| *a == Attempt::Connected).map(|(t, _)| *t).max().unwrap_or(all_back_ms).saturating_sub(first_gone)
            as f64
            / 1000.0
    );
    println!(
        "attempts: {} (connected {}, busy {}, failed {})",
        log.len(),
        count(&|a| *a == Attempt::Connected),
        count(&|a| matches!(a, Attempt::Busy(_))),
        count(&|a| *a == Attempt::Failed)
    );
    for (why, count) in reasons.lock().map(|r| r.clone()).unwrap_or_default() {
        println!("  failed: {count} x {why}");
    }
    println!("curve (per second after the server went away): attempts / connected / busy / failed");
    let last = log.iter().map(|(t, _)| *t).max().unwrap_or(first_gone);
    for sec in 0..=((last.saturating_sub(first_gone)) / 1000) {
        let (lo, hi) = (first_gone + sec * 1000, first_gone + (sec + 1) * 1000);
        let here: Vec<&Attempt> = log.iter().filter(|(t, _)| (lo..hi).contains(t)).map(|(_, a)| a).collect();
        let c = |p: &dyn Fn(&Attempt) -> bool| here.iter().filter(|a| p(a)).count();
        println!(
            "  {sec:>3}s  {:>6} / {:>6} / {:>6} / {:>6}",
            here.len(),
            c(&|a| *a == Attempt::Connected),
            c(&|a| matches!(a, Attempt::Busy(_))),
            c(&|a| *a == Attempt::Failed)
        );
    }
    if back < n {
        bail!("{} agents were not back within {within:?}", n - back);
    }
    Ok(())
}
