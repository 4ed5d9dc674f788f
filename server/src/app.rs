//! Start-up and the serving loop. `Application::build` opens the database, loads or generates
//! the TLS identity and binds its own listener (port 0 works: `port()` tells the real one);
//! `run` serves until the cancellation token fires, then drains.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use shared::Timestamp;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::events::Events;
use crate::recorder::{Hooks, Recorder};
use crate::registry::Registry;
use crate::store::{AuditEntry, SqliteStore, Store};
use crate::{api, health, tls};

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for open connections and sessions before giving up on them.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

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
}

impl AppState {
    /// Writes an audit entry. A failure is logged loudly but does not undo the action.
    pub async fn audit(&self, entry: AuditEntry) {
        crate::store::audit_or_log(self.store.as_ref(), entry).await;
    }
}

pub struct Application {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: AppState,
    recorder_task: tokio::task::JoinHandle<()>,
    store: SqliteStore,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("database {path}: {source}")]
    Store { path: PathBuf, source: crate::store::StoreError },
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Opens the database under the data directory, creating both if needed.
pub async fn open_store(config: &Config) -> Result<SqliteStore, StartError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir { path: config.data_dir.clone(), source })?;
    let path = config.database_path();
    SqliteStore::open(&path).await.map_err(|source| StartError::Store { path, source })
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
            Err(source) => return Err(StartError::Store { path: config.database_path(), source }),
        }

        let shared_store: Arc<dyn Store> = Arc::new(store.clone());
        let registry = Registry::new();
        let events = Events::default();
        let kick = Arc::new(tokio::sync::Notify::new());
        let fleet = crate::fleet_events::FleetEvents::default();
        let hooks = Hooks { registry: registry.clone(), events: events.clone(), fleet: fleet.clone(), dispatch: kick.clone() };
        let (recorder, recorder_task) = Recorder::spawn(shared_store.clone(), hooks);
        let dispatcher = Dispatcher {
            store: shared_store.clone(),
            registry: registry.clone(),
            events: events.clone(),
            fleet: fleet.clone(),
            progress: Default::default(),
            kick,
        };
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
        };
        Ok(Application { listener, acceptor: TlsAcceptor::from(identity.config), state, recorder_task, store, ca_file: identity.ca_file })
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
        let Application { listener, acceptor, state, recorder_task, store, .. } = self;
        let cancel = state.shutdown.clone();
        let tracker = state.tracker.clone();
        tracker.spawn(health::run_sweeper(state.registry.clone(), state.recorder.clone(), state.config.sweep_interval, cancel.clone()));
        tracker.spawn(health::run_pruner(state.store.clone(), state.config.heartbeat_retention, cancel.clone()));
        tracker.spawn(state.dispatcher.clone().run(cancel.clone()));
        if let Some(secret) = state.config.webhook_secret.clone() {
            let (urls, hold) = (state.config.webhooks.clone(), state.config.alert_hold_down);
            tracker.spawn(crate::alerts::run(state.fleet.clone(), urls, secret, hold, cancel.clone()));
        }

        let router = api::router(state.clone());
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
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
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let router = router.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
                let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(remote));
                    router.clone().oneshot(req)
                });
                let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
                builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(%remote, error = %e, "connection ended with an error");
                }
            });
        }

        tracing::info!("shutting down: closing agent sessions and connections");
        drop(listener);
        if tokio::time::timeout(DRAIN_GRACE, graceful.shutdown()).await.is_err() {
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
