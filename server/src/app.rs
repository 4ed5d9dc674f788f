//! Start-up and the serving loop. `Application::build` opens the database, loads or generates
//! the TLS identity and binds its own listener (port 0 works: `port()` tells the real one);
//! `run` serves until the cancellation token fires, then drains.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use shared::Timestamp;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::Config;
use crate::config::Database;
use crate::dispatch::Dispatcher;
use crate::events::Events;
use crate::recorder::{Hooks, Recorder};
use crate::registry::Registry;
use crate::store::{AuditEntry, PostgresStore, SqliteStore, Store};
use crate::{api, health, tls};

/// How long shutdown waits for open connections and sessions before giving up on them.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Logs refused connections at most once a second, with how many were refused since the
/// last line: a flood must not become a flood of log lines.
#[derive(Default)]
struct RefusalLog {
    last: Option<std::time::Instant>,
    since: u64,
}

impl RefusalLog {
    fn note(&mut self, remote: SocketAddr, cap: crate::admission::Refused) {
        self.since += 1;
        if self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            tracing::warn!(%remote, cap = cap.as_str(), refused = self.since, "connections refused: over a connection cap");
            self.last = Some(std::time::Instant::now());
            self.since = 0;
        }
    }
}

/// Cancels the HTTP connection a request came on.
#[derive(Clone, Debug)]
pub struct ConnCancel(pub CancellationToken);

/// What every handler and session shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub recorder: Recorder,
    pub events: Events,
    pub fleet: crate::fleet_events::FleetEvents,
    pub dispatcher: Dispatcher,
    pub config: Arc<Config>,
    pub shutdown: CancellationToken,
    /// Tracks agent sessions, which outlive the HTTP connection that upgraded to them.
    pub tracker: TaskTracker,
    pub admission: Arc<crate::admission::Admission>,
    /// Ids of operator tokens revoked on this node, for the streams that hold them.
    pub revoked: tokio::sync::broadcast::Sender<String>,
    pub auditor: crate::audit::Auditor,
    /// Key revocations as stored, read once and kept until this node stores a new one: every
    /// agent gets them after `welcome`, so a reconnect storm must not read them 19,000 times.
    pub key_revocations: Arc<std::sync::Mutex<Option<Arc<Vec<shared::signing::KeyRevocation>>>>>,
    /// When each agent's last clone attempt was reported, to report each at most once a minute.
    pub clone_reports: Arc<crate::identity::CloneReports>,
    /// TLS handshakes in progress (`max_tls_handshakes`): the rest wait their turn.
    pub tls_slots: Arc<tokio::sync::Semaphore>,
    /// Agent sessions between the upgrade request and `welcome` (`max_session_starts`, a
    /// quarter of it per address): past it, an agent is answered 503 with Retry-After at once.
    pub session_starts: Arc<crate::admission::SessionStarts>,
}

impl AppState {
    pub async fn key_revocations(&self) -> Result<Arc<Vec<shared::signing::KeyRevocation>>, crate::store::StoreError> {
        let cached = self.key_revocations.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if let Some(list) = cached {
            return Ok(list);
        }
        let list = Arc::new(self.store.key_revocations().await?);
        *self.key_revocations.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(list.clone());
        Ok(list)
    }

    /// After storing a revocation: the next read goes to the database.
    pub fn forget_key_revocations(&self) {
        *self.key_revocations.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Writes an audit entry. A failure is logged loudly but does not undo the action.
    pub async fn audit(&self, entry: AuditEntry) {
        self.auditor.record(entry).await;
    }
}

pub struct Application {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: AppState,
    recorder_task: tokio::task::JoinHandle<()>,
    store: Arc<dyn Store>,
    ca_file: Option<PathBuf>,
    renewer: Option<tls::Renewer>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("database {database}: {source}")]
    /// `database` as [`Database::describe`] gives it: never a password.
    Store { database: String, source: crate::store::StoreError },
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Opens the configured database and applies its pending migrations: SQLite under the data
/// directory by default, creating both if needed (the directory 0700: it holds the database,
/// the CA's key and dev.env; the database file 0600, which SQLite gives its `-wal` and `-shm`
/// files too), or the PostgreSQL database `--database` names. The data directory is created
/// either way: the TLS identity and dev files live there.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    let dir_err = |source| StartError::DataDir { path: config.data_dir.clone(), source };
    create_private_dir(&config.data_dir).map_err(dir_err)?;
    let failed = |source| StartError::Store { database: config.database.describe(), source };
    match &config.database {
        Database::Sqlite(path) => {
            create_private_file(path).map_err(|source| StartError::DataDir { path: path.clone(), source })?;
            Ok(Arc::new(SqliteStore::open(path).await.map_err(failed)?))
        }
        Database::Postgres(options) => Ok(Arc::new(PostgresStore::open_with(options).await.map_err(failed)?)),
    }
}

/// Creates `dir` with mode 0700 if it is missing (its parents as usual). One that exists is
/// left alone, with a warning if other users may enter it.
pub fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {
            let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %dir.display(), mode = format!("{mode:o}"), "the data directory is open to other users (chmod 700 it)");
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Creates an empty file with mode 0600 unless one exists.
fn create_private_file(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

impl Application {
    pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Self, StartError> {
        let store = open_store(&config).await?;
        crate::telemetry::handle();
        let identity = tls::load(&config.tls, &config.data_dir)?;
        let listener = TcpListener::bind(config.listen).await.map_err(|source| StartError::Bind { addr: config.listen, source })?;

        let now = Timestamp::now();
        match store.mark_node_offline(&config.node_id, now, "server restarted").await {
            Ok(0) => {}
            Ok(n) => tracing::info!(agents = n, "agents held by this node before the restart marked offline"),
            Err(source) => return Err(StartError::Store { database: config.database.describe(), source }),
        }

        let shared_store: Arc<dyn Store> = store.clone();
        let registry = Registry::new();
        let events = Events::default();
        let kick = Arc::new(tokio::sync::Notify::new());
        let fleet = crate::fleet_events::FleetEvents::default();
        let hooks = Hooks { registry: registry.clone(), events: events.clone(), fleet: fleet.clone(), dispatch: kick.clone() };
        let (recorder, recorder_task) = Recorder::spawn(shared_store.clone(), hooks, config.limits.recorder_queue_bytes);
        let auditor = crate::audit::Auditor::new(shared_store.clone(), config.audit_file.clone());
        let dispatcher = Dispatcher {
            auditor: auditor.clone(),
            store: shared_store.clone(),
            registry: registry.clone(),
            events: events.clone(),
            fleet: fleet.clone(),
            progress: Default::default(),
            signed: Default::default(),
            sending: Default::default(),
            kick,
        };
        let config_limits = config.limits.clone();
        let state = AppState {
            store: shared_store,
            registry,
            recorder,
            events,
            fleet,
            dispatcher,
            config: Arc::new(config),
            shutdown,
            tracker: TaskTracker::new(),
            revoked: tokio::sync::broadcast::channel(64).0,
            key_revocations: Default::default(),
            clone_reports: Default::default(),
            tls_slots: Arc::new(tokio::sync::Semaphore::new(config_limits.max_tls_handshakes)),
            session_starts: Arc::new(crate::admission::SessionStarts::new(config_limits.max_session_starts)),
            auditor,
            admission: crate::admission::Admission::new(crate::admission::Caps {
                max_connections: config_limits.max_connections,
                max_unauthenticated: config_limits.max_unauthenticated,
                max_unauthenticated_per_address: config_limits.max_unauthenticated_per_address,
            }),
        };
        let acceptor = TlsAcceptor::from(identity.config);
        Ok(Application { listener, acceptor, state, recorder_task, store, ca_file: identity.ca_file, renewer: identity.renewer })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn port(&self) -> u16 {
        self.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The generated CA certificate that clients should trust, if the identity was generated.
    pub fn ca_file(&self) -> Option<&PathBuf> {
        self.ca_file.as_ref()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until the shutdown token is cancelled, then closes every session with a Close
    /// frame, waits a bounded time for them, and flushes the recorder.
    pub async fn run(self) -> anyhow::Result<()> {
        let Application { listener, acceptor, state, recorder_task, store, renewer, .. } = self;
        let cancel = state.shutdown.clone();
        let tracker = state.tracker.clone();
        tracker.spawn(health::run_sweeper(state.registry.clone(), state.recorder.clone(), state.config.sweep_interval, cancel.clone()));
        let retention = health::Retention {
            heartbeats: state.config.heartbeat_retention,
            jobs: state.config.job_retention,
            audit: state.config.audit_retention,
        };
        tracker.spawn(health::run_pruner(state.auditor.clone(), retention, cancel.clone()));
        tracker.spawn(state.auditor.clone().run(cancel.clone()));
        tracker.spawn(state.dispatcher.clone().run(cancel.clone()));
        if let Some(renewer) = renewer {
            tracker.spawn(renewer.run(cancel.clone()));
        }
        if let Some(secret) = state.config.webhook_secret.clone() {
            let delivery = crate::alerts::Delivery {
                urls: state.config.webhooks.clone(),
                allow_http: state.config.webhook_allow_http,
                allow_redirects: state.config.webhook_allow_redirects,
            };
            let hold = state.config.alert_hold_down;
            tracker.spawn(crate::alerts::run(state.fleet.clone(), delivery, secret, hold, cancel.clone()));
        }

        let router = api::router(state.clone());
        let connections = TaskTracker::new();
        let mut refusals = RefusalLog::default();
        tracing::info!(addr = %listener.local_addr()?, "serving agents (wss) and operators (https)");
        loop {
            let (tcp, remote) = tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, most likely: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let ticket = match state.admission.admit(remote.ip()) {
                Ok(t) => t,
                Err(cap) => {
                    // Closed before TLS: the cheapest answer, and the peer sees it at once.
                    crate::telemetry::connection_refused(cap.as_str());
                    refusals.note(remote, cap);
                    drop(tcp);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let router = router.clone();
            let stop = cancel.clone();
            let limits = state.config.limits.clone();
            let tls_slots = state.tls_slots.clone();
            connections.spawn(async move {
                // A bounded number of handshakes at once, first come first served: under a
                // reconnect storm, each is quick and the rest wait, instead of all of them
                // sharing the CPU until every one times out. Waiting counts in the timeout.
                let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
                let Ok(Ok(slot)) = tokio::time::timeout_at(deadline, tls_slots.acquire_owned()).await else {
                    crate::telemetry::connection_refused("tls_handshake_wait");
                    tracing::debug!(%remote, "no TLS handshake slot within the handshake timeout");
                    return;
                };
                let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                drop(slot);
                let conn_ticket = ticket.clone();
                // Cancelled to drop the connection outright (a revoked token's stream whose client
                // does not read would otherwise never be polled to notice).
                let conn_cancel = tokio_util::sync::CancellationToken::new();
                let cancel_in_service = conn_cancel.clone();
                let spoke = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let spoke_in_service = spoke.clone();
                let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                    spoke_in_service.store(true, std::sync::atomic::Ordering::Relaxed);
                    req.extensions_mut().insert(ConnectInfo(remote));
                    req.extensions_mut().insert(conn_ticket.clone());
                    req.extensions_mut().insert(ConnCancel(cancel_in_service.clone()));
                    router.clone().oneshot(req)
                });
                // HTTP/1.1 only, as documented: hyper's own HTTP/1 connection. An HTTP/2 preface
                // is refused as a bad request. Its header timeout bounds each request's headers
                // and how long an idle keep-alive connection stays; the first request must
                // arrive whole within `header_timeout` of the handshake, so a peer that never
                // speaks (or trickles its first request) is closed.
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    // Request line and headers: at most 80 KiB held per connection.
                    .max_buf_size(80 * 1024)
                    .header_read_timeout(limits.keep_alive_timeout)
                    .serve_connection(TokioIo::new(tls), service)
                    .with_upgrades();
                let mut conn = std::pin::pin!(conn);
                let first_request = tokio::time::sleep(limits.header_timeout);
                tokio::pin!(first_request);
                let mut waiting_first = true;
                // A connection that has not presented a credential by then is closed, whatever it
                // is doing: unauthenticated requests (the dashboard's page, /healthz) take far
                // less, and a peer that never reads its answers cannot hold the slot.
                let unauthenticated_until = tokio::time::sleep(limits.header_timeout + limits.body_timeout);
                tokio::pin!(unauthenticated_until);
                let mut waiting_auth = true;
                let ended = loop {
                    tokio::select! {
                        ended = conn.as_mut() => break ended,
                        _ = &mut first_request, if waiting_first => {
                            waiting_first = false;
                            if !spoke.load(std::sync::atomic::Ordering::Relaxed) {
                                tracing::debug!(%remote, "no request within the header timeout");
                                return;
                            }
                        }
                        _ = &mut unauthenticated_until, if waiting_auth => {
                            waiting_auth = false;
                            if !ticket.is_promoted() {
                                tracing::debug!(%remote, "no credential presented in time");
                                return;
                            }
                        }
                        _ = conn_cancel.cancelled() => {
                            tracing::debug!(%remote, "connection closed: its credential was revoked");
                            return;
                        }
                        _ = stop.cancelled() => {
                            // Finish the request in flight, then close.
                            conn.as_mut().graceful_shutdown();
                            break conn.await;
                        }
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(%remote, error = %e, "connection ended with an error");
                }
                drop(ticket);
            });
        }

        tracing::info!("shutting down: closing agent sessions and connections");
        drop(listener);
        connections.close();
        if tokio::time::timeout(DRAIN_GRACE, connections.wait()).await.is_err() {
            tracing::warn!("some HTTP connections did not finish within the grace period");
        }
        tracker.close();
        if tokio::time::timeout(DRAIN_GRACE, tracker.wait()).await.is_err() {
            tracing::warn!("some agent sessions did not close within the grace period");
        }
        drop(router);
        drop(state);
        if tokio::time::timeout(DRAIN_GRACE, recorder_task).await.is_err() {
            tracing::warn!("the recorder did not finish writing within the grace period");
        }
        store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}
