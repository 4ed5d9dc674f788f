//! One connection to the server: the handshake, `hello`/`welcome`, then heartbeats until the
//! link drops, the server closes it, or the agent is told to stop.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use shared::RunId;
use shared::protocol::{self, AgentMessage, Heartbeat, Hello, ServerMessage, Welcome, close};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::credential::{self, Credential};
use crate::executor::{Executor, Phase};
use crate::metrics::{self, Collector};

/// Output is sent in pieces of at most this many bytes.
const CHUNK: usize = 16 * 1024;
/// Messages about runs sent per turn of the loop, so heartbeats and reads keep their turn.
const PUMP_BUDGET: usize = 64;

/// What this session has told the server about each run (a new session tells it again).
#[derive(Default)]
struct Reported {
    accepted: std::collections::HashSet<RunId>,
    started: std::collections::HashSet<RunId>,
    finished: std::collections::HashSet<RunId>,
}

impl Reported {
    fn forget(&mut self, id: &str) {
        self.accepted.remove(id);
        self.started.remove(id);
        self.finished.remove(id);
    }
}

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);
const METRICS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for a `credential` after asking before asking again.
const CREDENTIAL_RETRY: Duration = Duration::from_secs(600);

/// How a session ended.
#[derive(Debug)]
pub enum Outcome {
    /// The agent was told to stop; it closed the connection cleanly.
    Stopped,
    /// The session was established and later ended; `healthy_for` is how long it lasted, and
    /// `close_code` the server's close code if it sent one.
    Ended { healthy_for: Duration, reason: String, close_code: Option<u16> },
    /// The connection or handshake failed before the session was established.
    Failed(String),
    /// The server said it is busy (503 with `X-Muster-Error`) and when to come back.
    Busy { retry_after: Duration, reason: String },
}

/// Why a connection attempt failed.
#[derive(Debug)]
enum ConnectError {
    Failed(String),
    /// Muster's own 503: try again after this long (plus jitter).
    Busy {
        retry_after: Duration,
        reason: String,
    },
}

impl From<String> for ConnectError {
    fn from(s: String) -> Self {
        ConnectError::Failed(s)
    }
}

impl From<&str> for ConnectError {
    fn from(s: &str) -> Self {
        ConnectError::Failed(s.to_owned())
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Failed(s) | ConnectError::Busy { reason: s, .. } => f.write_str(s),
        }
    }
}

/// The wait a busy server asked for, if this refusal is Muster's own 503: `Retry-After` in
/// seconds (at most an hour), or 1 s if it gave none.
fn busy_retry_after(status: StatusCode, headers: &tokio_tungstenite::tungstenite::http::HeaderMap) -> Option<Duration> {
    if status != StatusCode::SERVICE_UNAVAILABLE || !headers.contains_key(protocol::MUSTER_ERROR_HEADER) {
        return None;
    }
    let secs = headers.get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(1);
    Some(Duration::from_secs(secs.clamp(1, 3600)))
}

/// The credential (or enrollment token) to present.
pub enum Presenting {
    Credential(Credential),
    EnrollToken(String),
}

fn bearer(p: &Presenting) -> String {
    match p {
        Presenting::Credential(c) => format!("Bearer {}", c.token),
        Presenting::EnrollToken(t) => format!("Bearer {t}"),
    }
}

pub struct Session<'a> {
    pub config: &'a Config,
    pub tls: Arc<rustls::ClientConfig>,
    pub collector: &'a mut Collector,
    pub executor: &'a Executor,
    pub cancel: &'a CancellationToken,
}

/// Enrolls once and disconnects: connect with the token, `hello`, store the credential from
/// `welcome`, close. For `muster-agent install`.
pub async fn enroll(config: &Config, tls: Arc<rustls::ClientConfig>, token: &str) -> Result<shared::AgentId, String> {
    let executor = Executor::open(&config.state_dir, 1, config.policy.clone(), crate::trust(config).map_err(|e| format!("{e:#}"))?)
        .map_err(|e| format!("state directory {}: {e}", config.state_dir.display()))?;
    let mut collector = Collector::default();
    let cancel = CancellationToken::new();
    let session = Session { config, tls, collector: &mut collector, executor: &executor, cancel: &cancel };
    let presenting = Presenting::EnrollToken(token.to_owned());
    let mut ws = session.connect(&presenting).await.map_err(|e| e.to_string())?;
    let welcome = session.open(&mut ws, &presenting).await;
    let frame = CloseFrame { code: CloseCode::Normal, reason: "enrolled".into() };
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
    welcome.map(|w| w.agent_id)
}

impl Session<'_> {
    pub async fn run(self, presenting: &Presenting) -> Outcome {
        let mut ws = match self.connect(presenting).await {
            Ok(ws) => ws,
            Err(ConnectError::Failed(e)) => return Outcome::Failed(e),
            Err(ConnectError::Busy { retry_after, reason }) => return Outcome::Busy { retry_after, reason },
        };
        let welcome = match self.open(&mut ws, presenting).await {
            Ok(w) => w,
            Err(e) => {
                let _ = ws.close(None).await;
                return Outcome::Failed(e);
            }
        };
        tracing::info!(agent = %welcome.agent_id, labels = %welcome.labels, "connected");
        if welcome.pending {
            tracing::warn!(
                agent = %welcome.agent_id,
                "this agent waits for an administrator's approval (muster agent accept {}); it gets no runs until then",
                welcome.agent_id
            );
        }
        self.executor.set_agent_id(welcome.agent_id.clone());
        let current = match presenting {
            Presenting::Credential(c) => Some(c.clone()),
            Presenting::EnrollToken(_) => credential::load(&self.config.state_dir).ok().flatten(),
        };
        self.heartbeat_loop(ws, &welcome, current).await
    }

    async fn connect(&self, presenting: &Presenting) -> Result<Ws, ConnectError> {
        let mut request = self.config.connect_url.as_str().into_client_request().map_err(|e| format!("bad server URL: {e}"))?;
        let headers = request.headers_mut();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&bearer(presenting)).map_err(|_| "credential is not a valid header value")?,
        );
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol::SUBPROTOCOL));
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(4 * 1024)
            .max_message_size(Some(protocol::MAX_MESSAGE_BYTES))
            .max_frame_size(Some(protocol::MAX_MESSAGE_BYTES));
        let connecting =
            tokio_tungstenite::connect_async_tls_with_config(request, Some(ws_config), true, Some(Connector::Rustls(self.tls.clone())));
        let result = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, connecting) => r,
            _ = self.cancel.cancelled() => return Err("stopping".into()),
        };
        match result {
            Err(_) => Err(format!("no answer from {} within {}s", self.config.server, CONNECT_TIMEOUT.as_secs()).into()),
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(tungstenite::Error::Http(resp))) => {
                let body = resp.body().as_deref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
                let message = serde_json::from_str::<shared::api::ApiError>(&body).map(|e| e.message).unwrap_or(body);
                if let Some(retry_after) = busy_retry_after(resp.status(), resp.headers()) {
                    Err(ConnectError::Busy { retry_after, reason: format!("the server is busy: {message}") })
                } else if resp.status() == StatusCode::UNAUTHORIZED {
                    Err(format!("the server refused this agent's credential: {message}").into())
                } else {
                    Err(format!("the server answered {}: {message}", resp.status()).into())
                }
            }
            Ok(Err(e)) => Err(format!("cannot connect to {}: {e}", self.config.server).into()),
        }
    }

    /// Sends `hello`, waits for `welcome`, and stores a credential handed out at enrollment
    /// before anything else happens.
    async fn open(&self, ws: &mut Ws, presenting: &Presenting) -> Result<Welcome, String> {
        let hello = AgentMessage::Hello(Hello {
            protocol: protocol::PROTOCOL_VERSION,
            agent_version: shared::VERSION.into(),
            hostname: self.config.hostname.clone().unwrap_or_else(metrics::hostname),
            labels: self.config.labels.clone(),
            heartbeat_interval_ms: u64::try_from(self.config.heartbeat_interval.as_millis()).unwrap_or(u64::MAX),
            open_runs: self.executor.open_run_ids(),
            trusted_keys: self.config.trusted_keys.clone(),
        });
        send(ws, &hello).await?;
        let deadline = Instant::now() + WELCOME_TIMEOUT;
        let welcome = loop {
            let frame = tokio::time::timeout_at(deadline, ws.next()).await.map_err(|_| "no welcome from the server".to_owned())?;
            match frame {
                Some(Ok(Message::Text(t))) => match ServerMessage::decode(t.as_str()) {
                    Ok(ServerMessage::Welcome(w)) => break w,
                    Ok(_) => return Err("expected welcome first".into()),
                    Err(e) => return Err(format!("unexpected message before welcome: {e}")),
                },
                Some(Ok(Message::Close(f))) => return Err(format!("server closed the connection: {}", describe_close(f.as_ref()))),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("connection lost before welcome: {e}")),
                None => return Err("connection closed before welcome".into()),
            }
        };
        if let Presenting::EnrollToken(_) = presenting {
            let token = welcome.credential.clone().ok_or("enrolled, but the server sent no credential")?;
            let cred = Credential {
                agent_id: welcome.agent_id.clone(),
                token,
                server: self.config.server.clone(),
                issued_at: Some(shared::Timestamp::now()),
            };
            credential::store(&self.config.state_dir, &cred).map_err(|e| format!("cannot store the credential: {e}"))?;
            tracing::info!(agent = %welcome.agent_id, path = %credential::path(&self.config.state_dir).display(), "enrolled; credential stored");
        }
        Ok(welcome)
    }

    /// Stores a credential a rotation issued, after checking it is one for this agent.
    fn store_rotated(&self, agent_id: &shared::AgentId, token: String) -> Result<Credential, String> {
        if !token.strip_prefix("msa_").and_then(|t| t.strip_prefix(agent_id.as_str())).is_some_and(|t| t.starts_with('_')) {
            return Err("the server sent a credential for another agent".into());
        }
        let cred =
            Credential { agent_id: agent_id.clone(), token, server: self.config.server.clone(), issued_at: Some(shared::Timestamp::now()) };
        credential::store(&self.config.state_dir, &cred).map_err(|e| format!("cannot store the new credential: {e}"))?;
        Ok(cred)
    }

    async fn heartbeat_loop(self, mut ws: Ws, welcome: &Welcome, mut current: Option<Credential>) -> Outcome {
        let started = Instant::now();
        let ping_interval = Duration::from_millis(welcome.ping_interval_ms.max(100));
        // Three missed pings and the server is gone, even if TCP has not noticed.
        let dead_after = ping_interval * 3;
        let mut last_heard = Instant::now();
        let mut seq = 0u64;
        let mut next_heartbeat = Instant::now();
        let mut last_metrics = None;
        let mut reported = Reported::default();
        // Whatever is open (from before a reconnect or a restart) is reported first.
        self.executor.poke();
        let ended = |reason: String| Outcome::Ended { healthy_for: started.elapsed(), reason, close_code: None };
        let period = self.config.credential_rotation;
        let mut ask_at = rotation_due(current.as_ref(), period);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(ask_at.unwrap_or_else(Instant::now)), if ask_at.is_some() => {
                    tracing::info!("the agent's credential is due for rotation; asking the server for a new one");
                    if let Err(e) = send(&mut ws, &AgentMessage::CredentialRequest(Default::default())).await {
                        return ended(e);
                    }
                    ask_at = Some(Instant::now() + CREDENTIAL_RETRY);
                }
                _ = self.executor.changed() => {
                    match pump(&mut ws, self.executor, &mut reported).await {
                        Ok(true) => self.executor.poke(),
                        Ok(false) => {}
                        Err(e) => return ended(e),
                    }
                }
                _ = self.cancel.cancelled() => {
                    let frame = CloseFrame { code: CloseCode::Normal, reason: "agent stopping".into() };
                    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
                    return Outcome::Stopped;
                }
                _ = tokio::time::sleep_until(next_heartbeat) => {
                    seq += 1;
                    let mut metrics = collect(self.collector, &mut last_metrics).await;
                    if let Some(name) = &self.config.hostname {
                        metrics.hostname.clone_from(name);
                    }
                    metrics.sanitize();
                    if let Err(e) = send(&mut ws, &AgentMessage::Heartbeat(Heartbeat { seq, metrics })).await {
                        return ended(e);
                    }
                    next_heartbeat = Instant::now() + jittered(self.config.heartbeat_interval);
                }
                _ = tokio::time::sleep_until(last_heard + dead_after) => {
                    return ended(format!("nothing heard from the server for {}s", dead_after.as_secs()));
                }
                frame = ws.next() => match frame {
                    None => return ended("connection closed".into()),
                    Some(Err(e)) => return ended(format!("connection lost: {e}")),
                    Some(Ok(msg)) => {
                        last_heard = Instant::now();
                        match msg {
                            Message::Text(t) => match ServerMessage::decode(t.as_str()) {
                                Ok(ServerMessage::Welcome(_)) => tracing::debug!("ignoring a second welcome"),
                                Ok(ServerMessage::Run(run)) => {
                                    tracing::info!(run = %run.run_id, job = %run.job_id, "run received");
                                    tracing::debug!(run = %run.run_id, command = %run.command.summary(), "run command");
                                    let id = run.run_id.clone();
                                    if !self.executor.receive(run) {
                                        // A repeat: tell the server again where it stands.
                                        reported.forget(&id);
                                        self.executor.poke();
                                    }
                                }
                                Ok(ServerMessage::Cancel(c)) => {
                                    tracing::info!(run = %c.run_id, "cancel received");
                                    self.executor.cancel(&c.run_id);
                                }
                                Ok(ServerMessage::ResultAck(a)) => self.executor.ack(&a.run_id),
                                Ok(ServerMessage::KeyRevoked(r)) => match self.executor.trust().revoke(&r) {
                                    Ok(true) => tracing::warn!(key = %r.key, by = %r.by, "operator key revoked; its signatures are refused from now on"),
                                    Ok(false) => {}
                                    Err(e) => tracing::warn!(key = %r.key, error = %e, "ignoring a key revocation"),
                                },
                                Ok(ServerMessage::Resend(r)) => {
                                    reported.finished.remove(&r.run_id);
                                    self.executor.resend_from(&r.run_id, r.stdout_from, r.stderr_from);
                                }
                                Ok(ServerMessage::RotateCredential(_)) => {
                                    tracing::info!("the server asks this agent to rotate its credential");
                                    if current.is_some() {
                                        if let Err(e) = send(&mut ws, &AgentMessage::CredentialRequest(Default::default())).await {
                                            return ended(e);
                                        }
                                        ask_at = Some(Instant::now() + CREDENTIAL_RETRY);
                                    }
                                }
                                Ok(ServerMessage::Credential(c)) => match self.store_rotated(&welcome.agent_id, c.credential) {
                                    Ok(cred) => {
                                        tracing::info!(path = %credential::path(&self.config.state_dir).display(), "new credential stored");
                                        let stored = AgentMessage::CredentialStored(protocol::CredentialStored { sha256: cred.sha256() });
                                        ask_at = rotation_due(Some(&cred), period);
                                        current = Some(cred);
                                        if let Err(e) = send(&mut ws, &stored).await {
                                            return ended(e);
                                        }
                                    }
                                    // The old credential keeps working: the server replaces it
                                    // only once this agent confirms the new one.
                                    Err(e) => tracing::error!(error = %e, "credential rotation failed; keeping the current credential"),
                                },
                                Err(e) => tracing::warn!(error = %e, "ignoring a message this agent does not understand"),
                            },
                            Message::Close(f) => {
                                let why = describe_close(f.as_ref());
                                if f.as_ref().is_some_and(|f| u16::from(f.code) == close::REVOKED) {
                                    tracing::error!("the server revoked this agent's credential; re-enroll it");
                                }
                                return Outcome::Ended {
                                    healthy_for: started.elapsed(),
                                    reason: format!("server closed the connection: {why}"),
                                    close_code: f.as_ref().map(|f| u16::from(f.code)),
                                };
                            }
                            // tungstenite answers pings by itself.
                            _ => {}
                        }
                    }
                }
            }
        }
    }
}

/// Collects metrics off the async thread, within a time limit: a hung filesystem must not
/// stop heartbeats. On timeout the previous metrics are sent again.
async fn collect(collector: &mut Collector, last: &mut Option<shared::protocol::Metrics>) -> shared::protocol::Metrics {
    let mut c = std::mem::take(collector);
    let handle = tokio::task::spawn_blocking(move || {
        let m = c.collect();
        (c, m)
    });
    match tokio::time::timeout(METRICS_TIMEOUT, handle).await {
        Ok(Ok((c, m))) => {
            *collector = c;
            *last = Some(m.clone());
            m
        }
        _ => {
            tracing::warn!("collecting metrics took too long; sending the previous ones");
            *collector = Collector::new();
            last.clone().unwrap_or_default()
        }
    }
}

/// When to ask for a new credential: once it is `period` old, plus up to a tenth of the period
/// (at most a minute) so that agents enrolled together do not all ask at once.
fn rotation_due(current: Option<&Credential>, period: Option<Duration>) -> Option<Instant> {
    let (issued_at, period) = (current?.issued_at?, period?);
    let age = issued_at.age(shared::Timestamp::now());
    let spread = (period / 10).min(Duration::from_secs(60)).mul_f64(shared::backoff::random_fraction());
    Some(Instant::now() + period.saturating_sub(age) + spread)
}

fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + 0.2 * shared::backoff::random_fraction())
}

fn describe_close(f: Option<&CloseFrame>) -> String {
    match f {
        Some(f) => format!("{} {}", u16::from(f.code), f.reason),
        None => "no reason given".into(),
    }
}

async fn send(ws: &mut Ws, msg: &AgentMessage) -> Result<(), String> {
    let text = serde_json::to_string(msg).map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(10), ws.send(Message::Text(text.into()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("connection lost: {e}")),
        Err(_) => Err("the server stopped reading".into()),
    }
}

/// Sends what the server has not heard yet about runs, up to a budget. True if more remains.
async fn pump(ws: &mut Ws, executor: &Executor, reported: &mut Reported) -> Result<bool, String> {
    use shared::job::Stream;
    use shared::protocol::{RunAccepted, RunOutput, RunStarted};
    let mut budget = PUMP_BUDGET;
    for (id, status) in executor.runs() {
        loop {
            if budget == 0 {
                return Ok(true);
            }
            // Decide under the lock, send without it.
            let (msg, stream_sent) = {
                let st = status.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if st.phase == Phase::Queued && !reported.accepted.contains(&id) {
                    reported.accepted.insert(id.clone());
                    (AgentMessage::RunAccepted(RunAccepted { run_id: id.clone() }), None)
                } else if st.phase == Phase::Running && !reported.started.contains(&id) {
                    reported.started.insert(id.clone());
                    (AgentMessage::RunStarted(RunStarted { run_id: id.clone() }), None)
                } else if st.sent_out < st.out_len || st.sent_err < st.err_len {
                    let (stream, offset) =
                        if st.sent_out < st.out_len { (Stream::Stdout, st.sent_out) } else { (Stream::Stderr, st.sent_err) };
                    drop(st);
                    let data = executor.read_chunk(&id, stream, offset, CHUNK).unwrap_or_default();
                    let len = data.len() as u64;
                    (AgentMessage::RunOutput(RunOutput { run_id: id.clone(), stream, offset, data }), Some((stream, offset, len)))
                } else if st.phase == Phase::Finished && !reported.finished.contains(&id) {
                    match &st.result {
                        Some(r) => {
                            reported.finished.insert(id.clone());
                            (AgentMessage::RunFinished(r.clone()), None)
                        }
                        None => break,
                    }
                } else {
                    break;
                }
            };
            if let Some((stream, offset, len)) = stream_sent {
                let mut guard = status.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let st = &mut *guard;
                let (sent, total) = match stream {
                    Stream::Stdout => (&mut st.sent_out, st.out_len),
                    Stream::Stderr => (&mut st.sent_err, st.err_len),
                };
                if len == 0 {
                    // Nothing readable there (the file is gone or cut short): skip it, and
                    // the server's completeness check will ask again if it matters.
                    tracing::warn!(run = %id, ?stream, offset, "output could not be read; skipping it");
                    *sent = total;
                    continue;
                }
                *sent = offset + len;
            }
            send(ws, &msg).await?;
            budget -= 1;
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::http::HeaderMap;

    #[test]
    fn only_musters_own_503_is_a_busy_server() {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(busy_retry_after(StatusCode::SERVICE_UNAVAILABLE, &h), None, "a proxy's 503 carries no X-Muster-Error");
        h.insert(protocol::MUSTER_ERROR_HEADER, HeaderValue::from_static("busy"));
        assert_eq!(busy_retry_after(StatusCode::SERVICE_UNAVAILABLE, &h), Some(Duration::from_secs(7)));
        assert_eq!(busy_retry_after(StatusCode::UNAUTHORIZED, &h), None);
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("999999"));
        assert_eq!(busy_retry_after(StatusCode::SERVICE_UNAVAILABLE, &h), Some(Duration::from_secs(3600)));
        h.remove(header::RETRY_AFTER);
        assert_eq!(busy_retry_after(StatusCode::SERVICE_UNAVAILABLE, &h), Some(Duration::from_secs(1)));
    }
}
