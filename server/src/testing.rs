//! Test support for the middle tier: an [`AppState`] over a temporary SQLite store, assembled
//! as `Application::build` assembles one but with no listener, no TLS and no background task
//! except the recorder, so the router can be driven with `tower::ServiceExt::oneshot` and the
//! dispatcher one round at a time. Agents are enrolled straight through the `Store` trait and
//! "connected" as fake sessions in the registry: a channel whose receiving end the test reads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use shared::api::{CreateToken, Role};
use shared::protocol::ServerMessage;
use shared::{AgentId, Labels, Timestamp};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::app::AppState;
use crate::config::{Config, Settings};
use crate::dispatch::Dispatcher;
use crate::events::Events;
use crate::recorder::{Hooks, Recorder};
use crate::registry::{Closer, Registry};
use crate::store::{EnrollTokenRow, NewAgent, SqliteStore, Store};

/// The address every test request comes from, as the accept loop would tell the router.
pub const PEER: ([u8; 4], u16) = ([127, 0, 0, 1], 40_000);

/// The enrollment token the fixtures enroll agents with.
const FIXTURE_ENROLL_TOKEN: &str = "00000000000000ee";

pub struct TestApp {
    pub state: AppState,
    /// The same store as `state.store`, typed, for what only SQLite tests need.
    pub sqlite: SqliteStore,
    _dir: tempfile::TempDir,
}

/// An answer read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the API's error shape: this status, `{"error": kind, "message": ...}` and
    /// `X-Muster-Error: kind`. Returns the message.
    #[track_caller]
    pub fn error(&self, status: StatusCode, kind: &str) -> String {
        assert_eq!(self.status, status, "{}", self.text());
        let body = self.json();
        assert_eq!(body["error"], kind, "{body}");
        assert_eq!(self.header(shared::protocol::MUSTER_ERROR_HEADER), Some(kind), "X-Muster-Error of {body}");
        let message = body["message"].as_str().unwrap_or_else(|| panic!("no message in {body}")).to_owned();
        assert!(!message.is_empty(), "an empty message");
        message
    }
}

impl TestApp {
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// A state whose config `configure` adjusts first (limits, `approval_above`, ...).
    pub async fn with(configure: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings { data_dir: Some(dir.path().to_owned()), ..Settings::default() };
        let mut config = Config::resolve(&settings).unwrap();
        configure(&mut config);
        let sqlite = SqliteStore::open(&config.database_path()).await.unwrap();
        crate::telemetry::handle();
        let store: Arc<dyn Store> = Arc::new(sqlite.clone());
        let registry = Registry::new();
        let events = Events::default();
        let kick = Arc::new(tokio::sync::Notify::new());
        let fleet = crate::fleet_events::FleetEvents::default();
        let hooks = Hooks { registry: registry.clone(), events: events.clone(), fleet: fleet.clone(), dispatch: kick.clone() };
        let (recorder, _task) = Recorder::spawn(store.clone(), hooks, config.limits.recorder_queue_bytes);
        let auditor = crate::audit::Auditor::new(store.clone(), None);
        let dispatcher = Dispatcher {
            auditor: auditor.clone(),
            store: store.clone(),
            registry: registry.clone(),
            events: events.clone(),
            fleet: fleet.clone(),
            progress: Default::default(),
            signed: Default::default(),
            sending: Default::default(),
            kick,
        };
        let limits = config.limits.clone();
        let state = AppState {
            store,
            registry,
            recorder,
            events,
            fleet,
            dispatcher,
            config: Arc::new(config),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            revoked: tokio::sync::broadcast::channel(64).0,
            key_revocations: Default::default(),
            clone_reports: Default::default(),
            tls_slots: Arc::new(tokio::sync::Semaphore::new(limits.max_tls_handshakes)),
            session_starts: Arc::new(crate::admission::SessionStarts::new(limits.max_session_starts)),
            auditor,
            admission: crate::admission::Admission::new(crate::admission::Caps {
                max_connections: limits.max_connections,
                max_unauthenticated: limits.max_unauthenticated,
                max_unauthenticated_per_address: limits.max_unauthenticated_per_address,
            }),
        };
        TestApp { state, sqlite, _dir: dir }
    }

    pub fn store(&self) -> &dyn Store {
        self.state.store.as_ref()
    }

    /// An operator token of the whole fleet with this role, made as `bootstrap` makes one.
    pub async fn token(&self, role: Role) -> String {
        self.make_token(role, None).await
    }

    /// An operator token scoped to a selector.
    pub async fn scoped_token(&self, role: Role, scope: &str) -> String {
        self.make_token(role, Some(shared::Selector::parse(scope).unwrap())).await
    }

    async fn make_token(&self, role: Role, scope: Option<shared::Selector>) -> String {
        let req = CreateToken { name: format!("{role} for a test"), role, ttl_secs: None, scope };
        let (created, _) = crate::api::create_token_row(self.store(), &req, "test").await.unwrap();
        created.token
    }

    /// Enrolls agent `n` (id `nnnn...`) with these trusted labels, as an enrollment would.
    pub async fn enroll(&self, n: u8, labels: &[&str]) -> AgentId {
        self.enroll_as(n, labels, false).await
    }

    /// The same, for an agent enrolled with an `approve` token: pending until accepted.
    pub async fn enroll_as(&self, n: u8, labels: &[&str], approval_pending: bool) -> AgentId {
        if self.store().enroll_token(FIXTURE_ENROLL_TOKEN).await.unwrap().is_none() {
            let now = Timestamp::now();
            let token = EnrollTokenRow {
                id: FIXTURE_ENROLL_TOKEN.into(),
                secret_hash: vec![0xee; 32],
                created_by: "test".into(),
                created_at: now,
                expires_at: now.saturating_add(Duration::from_secs(3600)),
                uses_total: 255,
                uses_left: 255,
                labels: Labels::new(),
                revoked_at: None,
                approve: false,
            };
            self.store().insert_enroll_token(&token).await.unwrap();
        }
        let agent = NewAgent {
            id: AgentId::from_bytes([n; 8]),
            secret_hash: vec![n; 32],
            token_labels: Labels::from_pairs(labels.iter().copied()).unwrap(),
            at: Timestamp::now(),
            approval_pending,
        };
        assert!(self.store().enroll_agent(FIXTURE_ENROLL_TOKEN, &agent).await.unwrap(), "agent {n} not enrolled");
        agent.id
    }

    /// Registers a fake session for the agent: what the server sends it arrives on the
    /// returned receiver.
    pub fn connect(&self, id: &AgentId) -> mpsc::Receiver<ServerMessage> {
        connect(&self.state.registry, id, 64)
    }

    /// The audit entries with this action, newest first.
    pub async fn audit(&self, action: &str) -> Vec<shared::api::AuditEntry> {
        let q = crate::store::AuditQuery { action: Some(action.into()), limit: 1000, ..Default::default() };
        self.store().audit_entries(&q).await.unwrap()
    }

    /// Sends a request through the router, as the accept loop hands it over (with the peer's
    /// address), and reads the answer whole.
    pub async fn send(&self, req: Request<Body>) -> Reply {
        let resp = self.respond(req).await;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(Duration::from_secs(10), body.collect()).await.expect("the body did not end").unwrap().to_bytes();
        Reply { status: parts.status, headers: parts.headers, body }
    }

    /// The same, leaving the body unread (for streams).
    pub async fn respond(&self, mut req: Request<Body>) -> axum::response::Response {
        req.extensions_mut().insert(ConnectInfo(SocketAddr::from(PEER)));
        crate::api::router(self.state.clone()).oneshot(req).await.unwrap()
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send(request(Method::GET, path, token, None)).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> Reply {
        self.send(request(Method::DELETE, path, token, None)).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: serde_json::Value) -> Reply {
        self.send(request(Method::POST, path, token, Some(body))).await
    }

    pub async fn patch(&self, path: &str, token: Option<&str>, body: serde_json::Value) -> Reply {
        self.send(request(Method::PATCH, path, token, Some(body))).await
    }
}

/// A request as a client sends one: `/api/v1` paths given whole, a JSON body with its
/// Content-Type and Content-Length.
pub fn request(method: Method, path: &str, token: Option<&str>, body: Option<serde_json::Value>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    match body {
        Some(v) => {
            let bytes = serde_json::to_vec(&v).unwrap();
            b.header(header::CONTENT_TYPE, "application/json").header(header::CONTENT_LENGTH, bytes.len()).body(Body::from(bytes)).unwrap()
        }
        None => b.body(Body::empty()).unwrap(),
    }
}

/// Registers a fake session for `id` in `registry`, with an outbound queue of `capacity`.
pub fn connect(registry: &Registry, id: &AgentId, capacity: usize) -> mpsc::Receiver<ServerMessage> {
    let (tx, rx) = mpsc::channel(capacity);
    let thresholds = crate::health::Thresholds::for_interval(Duration::from_secs(10));
    registry.register(id, thresholds, tx, Closer::default(), SocketAddr::from(PEER));
    rx
}

/// The `run` messages waiting in a fake session's queue, taken out.
pub fn runs_sent(rx: &mut mpsc::Receiver<ServerMessage>) -> Vec<shared::protocol::Run> {
    let mut out = Vec::new();
    while let Ok(m) = rx.try_recv() {
        if let ServerMessage::Run(r) = m {
            out.push(r);
        }
    }
    out
}

/// What an agent reports of a run, written as the recorder writes it (one batch).
pub async fn report(store: &dyn Store, agent: &AgentId, record: Progress<'_>) {
    use crate::store::Record;
    let at = Timestamp::now();
    let record = match record {
        Progress::Accepted(run_id) => Record::RunAccepted { agent_id: agent.clone(), run_id: run_id.parse().unwrap(), at },
        Progress::Started(run_id) => Record::RunStarted { agent_id: agent.clone(), run_id: run_id.parse().unwrap(), at },
        Progress::Finished(run_id, outcome) => {
            let exit_code = Some(i32::from(outcome != shared::protocol::Outcome::Succeeded));
            let finished = shared::protocol::RunFinished {
                run_id: run_id.parse().unwrap(),
                outcome,
                exit_code,
                signal: None,
                error: None,
                stdout_len: 0,
                stderr_len: 0,
                stdout_truncated: false,
                stderr_truncated: false,
            };
            Record::RunFinished { agent_id: agent.clone(), finished: Box::new(finished), at }
        }
    };
    store.record(&[record]).await.unwrap();
}

/// One report of an agent about a run.
#[derive(Clone, Copy, Debug)]
pub enum Progress<'a> {
    Accepted(&'a str),
    Started(&'a str),
    Finished(&'a str, shared::protocol::Outcome),
}
