//! The agents' endpoint: authenticates the WebSocket handshake, then runs one session per
//! agent connection.
//!
//! **Boundary:** everything an agent sends is untrusted. The credential is checked before the
//! upgrade (HTTP 401 otherwise); after it, every frame is size-limited and decoded into a typed
//! message, and anything malformed closes only this connection, with the close code
//! `docs/protocol.md` documents.
//!
//! Each session selects on: the next frame, messages routed to this agent, the ping timer, a
//! request to close it (replaced, revoked, silent) and server shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use shared::api::ApiError;
use shared::protocol::{self, AgentMessage, Hello, ServerMessage, Welcome, close};
use shared::{AgentId, Labels, Timestamp};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;

use crate::app::AppState;
use crate::auth::{self, AuthError, Kind, Presented};
use crate::health::{self, Thresholds};
use crate::registry::Closer;
use crate::store::{AuditEntry, NewAgent, Record};

/// Heartbeat intervals an agent may announce.
const MIN_HEARTBEAT: Duration = Duration::from_millis(200);
const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);
/// A send that takes longer than this means the agent stopped reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const OUTBOUND_QUEUE: usize = 256;

/// Who is connecting, once the handshake has been authenticated.
struct Authenticated {
    agent_id: AgentId,
    token_labels: Labels,
    /// Set when the agent enrolled in this handshake: its new credential, for `welcome`.
    credential: Option<String>,
}

fn refuse(status: StatusCode, kind: &str, message: String) -> Response {
    (status, Json(ApiError { error: kind.into(), message })).into_response()
}

/// `GET /api/v1/agent/connect`.
pub async fn connect(
    State(app): State<AppState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let auth_header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let who = match authenticate(&app, auth_header).await {
        Ok(who) => who,
        Err(Refusal::Auth(e)) => {
            tracing::warn!(%remote, reason = %e, "agent handshake refused");
            return refuse(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string());
        }
        Err(Refusal::Internal(e)) => {
            tracing::error!(%remote, error = %e, "agent handshake failed");
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the server cannot check credentials right now".into());
        }
    };
    let offered = ws.requested_protocols().any(|p| p.to_str().is_ok_and(|s| s.split(',').any(|s| s.trim() == protocol::SUBPROTOCOL)));
    if !offered {
        return refuse(StatusCode::BAD_REQUEST, "bad_request", format!("offer the WebSocket subprotocol {}", protocol::SUBPROTOCOL));
    }
    let guard = app.tracker.token();
    ws.protocols([protocol::SUBPROTOCOL])
        .max_message_size(protocol::MAX_MESSAGE_BYTES)
        .max_frame_size(protocol::MAX_MESSAGE_BYTES)
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .on_upgrade(move |socket| async move {
            run_session(app, socket, who, remote).await;
            drop(guard);
        })
}

enum Refusal {
    Auth(AuthError),
    Internal(crate::store::StoreError),
}

impl From<crate::store::StoreError> for Refusal {
    fn from(e: crate::store::StoreError) -> Self {
        Refusal::Internal(e)
    }
}

/// A credential that checked out, before anything is done with it.
enum Verified {
    Agent(crate::store::AgentCredentialRow),
    EnrollToken(crate::store::EnrollTokenRow),
}

/// Checks an agent credential or an enrollment token, changing nothing.
async fn verify(app: &AppState, header: Option<&str>) -> Result<Verified, Refusal> {
    let presented = Presented::from_header(header).map_err(Refusal::Auth)?;
    match presented.kind {
        Kind::Agent => {
            let id = AgentId::parse(&presented.id).map_err(|_| Refusal::Auth(AuthError::Malformed))?;
            let row = app.store.agent_credential(&id).await?.ok_or(Refusal::Auth(AuthError::Wrong))?;
            if !presented.matches(&row.secret_hash) {
                return Err(Refusal::Auth(AuthError::Wrong));
            }
            if row.revoked {
                return Err(Refusal::Auth(AuthError::Revoked));
            }
            Ok(Verified::Agent(row))
        }
        Kind::Enroll => {
            let token = app.store.enroll_token(&presented.id).await?.ok_or(Refusal::Auth(AuthError::Wrong))?;
            if !presented.matches(&token.secret_hash) {
                return Err(Refusal::Auth(AuthError::Wrong));
            }
            if token.revoked_at.is_some() {
                return Err(Refusal::Auth(AuthError::Revoked));
            }
            if token.expires_at <= Timestamp::now() {
                return Err(Refusal::Auth(AuthError::Expired));
            }
            if token.uses_left == 0 {
                return Err(Refusal::Auth(AuthError::UsedUp));
            }
            Ok(Verified::EnrollToken(token))
        }
        Kind::Operator => Err(Refusal::Auth(AuthError::WrongKind)),
    }
}

async fn authenticate(app: &AppState, header: Option<&str>) -> Result<Authenticated, Refusal> {
    let token = match verify(app, header).await? {
        Verified::Agent(row) => return Ok(Authenticated { agent_id: row.id, token_labels: row.token_labels, credential: None }),
        Verified::EnrollToken(token) => token,
    };
    let now = Timestamp::now();
    let internal = |e: String| Refusal::Internal(crate::store::StoreError::Database(e));
    let mut id_bytes = [0u8; 8];
    getrandom::fill(&mut id_bytes).map_err(|e| internal(e.to_string()))?;
    let agent_id = AgentId::from_bytes(id_bytes);
    let issued = auth::issue(Kind::Agent, Some(agent_id.as_str())).map_err(|e| internal(e.to_string()))?;
    let new = NewAgent { id: agent_id.clone(), secret_hash: issued.hash, token_labels: token.labels.clone(), at: now };
    if !app.store.enroll_agent(&token.id, &new).await? {
        return Err(Refusal::Auth(AuthError::UsedUp));
    }
    app.audit(AuditEntry {
        at: now,
        actor: format!("enroll-token:{}", token.id),
        action: "agent.enroll".into(),
        target: Some(agent_id.to_string()),
        detail: serde_json::json!({ "labels": token.labels }),
    })
    .await;
    tracing::info!(agent = %agent_id, token = %token.id, "agent enrolled");
    app.fleet.publish(shared::api::FleetEvent::AgentEnrolled { agent_id: agent_id.clone(), labels: token.labels.clone(), at: now });
    Ok(Authenticated { agent_id, token_labels: token.labels, credential: Some(issued.token) })
}

/// `GET /api/v1/agent/check`: whether an agent credential or an enrollment token would be
/// accepted, without connecting a session or using the token. For `muster-agent check`.
pub async fn check(State(app): State<AppState>, ConnectInfo(remote): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    let auth_header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match verify(&app, auth_header).await {
        Ok(Verified::Agent(row)) => Json(serde_json::json!({ "agent_id": row.id })).into_response(),
        Ok(Verified::EnrollToken(t)) => Json(serde_json::json!({ "enroll_token": t.id, "uses_left": t.uses_left })).into_response(),
        Err(Refusal::Auth(e)) => {
            tracing::warn!(%remote, reason = %e, "agent check refused");
            refuse(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
        }
        Err(Refusal::Internal(e)) => {
            tracing::error!(%remote, error = %e, "agent check failed");
            refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the server cannot check credentials right now".into())
        }
    }
}

/// Why a session ended: the Close frame to send (if any) and the reason recorded with the
/// offline transition.
struct Ending {
    close: Option<(u16, String)>,
    reason: String,
}

impl Ending {
    fn close(code: u16, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Ending { close: Some((code, reason.clone())), reason }
    }

    fn quiet(reason: impl Into<String>) -> Self {
        Ending { close: None, reason: reason.into() }
    }
}

async fn send(socket: &mut WebSocket, msg: Message) -> Result<(), ()> {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

async fn send_json(socket: &mut WebSocket, msg: &ServerMessage) -> Result<(), ()> {
    crate::telemetry::message_sent(msg.type_name());
    let text = serde_json::to_string(msg).map_err(|_| ())?;
    send(socket, Message::Text(text.into())).await
}

async fn finish(socket: &mut WebSocket, ending: &Ending) {
    if let Some((code, reason)) = &ending.close {
        // Close reasons are limited to 123 bytes by the protocol.
        let mut reason = reason.clone();
        while reason.len() > 120 {
            reason.pop();
        }
        let _ = send(socket, Message::Close(Some(CloseFrame { code: *code, reason: reason.into() }))).await;
    }
}

/// Maps a read error to the close code the protocol gives it.
fn read_error(e: axum::Error) -> Ending {
    match e.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) => match *e {
            tungstenite::Error::Capacity(c) => Ending::close(close::TOO_BIG, format!("message too big: {c}")),
            tungstenite::Error::Utf8(_) => Ending::close(close::INVALID_PAYLOAD, "text frame is not valid UTF-8"),
            tungstenite::Error::Protocol(p) => Ending::close(close::PROTOCOL_ERROR, format!("websocket protocol error: {p}")),
            other => Ending::quiet(format!("connection lost: {other}")),
        },
        Err(other) => Ending::quiet(format!("connection lost: {other}")),
    }
}

/// Waits for `hello`: the first message, within the hello timeout.
async fn read_hello(socket: &mut WebSocket) -> Result<Hello, Ending> {
    let first = tokio::time::timeout(Duration::from_millis(protocol::HELLO_TIMEOUT_MS), socket.recv()).await;
    let msg = match first {
        Err(_) => return Err(Ending::close(close::TIMEOUT, "no hello within the timeout")),
        Ok(None) => return Err(Ending::quiet("closed before hello")),
        Ok(Some(Err(e))) => return Err(read_error(e)),
        Ok(Some(Ok(m))) => m,
    };
    let text = match msg {
        Message::Text(t) => t,
        Message::Binary(_) => return Err(Ending::close(close::UNSUPPORTED_DATA, "binary frames are not part of the protocol")),
        Message::Close(_) => return Err(Ending::quiet("closed before hello")),
        _ => return Err(Ending::close(close::PROTOCOL_ERROR, "expected hello first")),
    };
    match AgentMessage::decode(text.as_str()) {
        Ok(AgentMessage::Hello(h)) => {
            if h.protocol != protocol::PROTOCOL_VERSION {
                return Err(Ending::close(
                    close::UNSUPPORTED_VERSION,
                    format!("protocol {} not supported; this server speaks {}", h.protocol, protocol::PROTOCOL_VERSION),
                ));
            }
            let interval = Duration::from_millis(h.heartbeat_interval_ms);
            if !(MIN_HEARTBEAT..=MAX_HEARTBEAT).contains(&interval) {
                return Err(Ending::close(close::INVALID_PAYLOAD, "heartbeat_interval_ms must be between 200 and 3600000"));
            }
            if h.hostname.is_empty() || h.hostname.len() > 255 || h.agent_version.len() > 64 {
                return Err(Ending::close(close::INVALID_PAYLOAD, "hostname must be 1 to 255 bytes, agent_version at most 64"));
            }
            Ok(h)
        }
        Ok(other) => Err(Ending::close(close::PROTOCOL_ERROR, format!("expected hello first, got {}", other.type_name()))),
        Err(e) => Err(Ending::close(e.close_code(), e.to_string())),
    }
}

async fn run_session(app: AppState, mut socket: WebSocket, who: Authenticated, remote: SocketAddr) {
    let agent_id = who.agent_id.clone();
    let hello = match read_hello(&mut socket).await {
        Ok(h) => h,
        Err(ending) => {
            tracing::warn!(agent = %agent_id, %remote, reason = %ending.reason, "agent session refused");
            finish(&mut socket, &ending).await;
            return;
        }
    };
    let interval = Duration::from_millis(hello.heartbeat_interval_ms);
    let labels = hello.labels.overlaid_with(&who.token_labels);
    let (out_tx, mut out_rx) = mpsc::channel(OUTBOUND_QUEUE);
    let closer = Closer::default();
    let now = Timestamp::now();
    app.recorder
        .send(Record::Connected {
            agent_id: agent_id.clone(),
            at: now,
            hostname: hello.hostname.clone(),
            labels: labels.clone(),
            heartbeat_interval_ms: hello.heartbeat_interval_ms,
            agent_version: hello.agent_version.clone(),
            node: app.config.node_id.clone(),
            remote_addr: remote.to_string(),
        })
        .await;
    let reg = app.registry.register(&agent_id, Thresholds::for_interval(interval), out_tx, closer.clone());
    if let Some(change) = reg.change {
        app.recorder.send(health::record_for(change, now)).await;
    }
    tracing::info!(agent = %agent_id, hostname = %hello.hostname, %remote, version = %hello.agent_version, "agent connected");
    // Settle what the agent holds against what the server believes it sent. This comes after
    // registering, which closes any older session of this agent: a run sent into that dying
    // session is then reset here and sent again (a repeat the agent's ledger makes harmless)
    // instead of waiting out its timeout.
    let held = match app.dispatcher.reconcile(&agent_id, &hello.open_runs).await {
        Ok(held) => held,
        Err(e) => {
            tracing::error!(agent = %agent_id, error = %e, "cannot reconcile the agent's runs");
            let ending = Ending::close(close::INTERNAL_ERROR, "server cannot read its database");
            finish(&mut socket, &ending).await;
            leave(&app, &agent_id, reg.conn, &ending).await;
            return;
        }
    };

    let welcome = ServerMessage::Welcome(Welcome {
        agent_id: agent_id.clone(),
        credential: who.credential,
        labels,
        ping_interval_ms: u64::try_from(app.config.ping_interval.as_millis()).unwrap_or(u64::MAX),
        server_version: shared::VERSION.into(),
    });
    let ending = if send_json(&mut socket, &welcome).await.is_err() {
        Ending::quiet("could not send welcome")
    } else {
        app.dispatcher.kick.notify_one();
        if let Err(e) = cancel_held_runs_of_cancelled_jobs(&app, &mut socket, &held).await {
            Ending::quiet(e)
        } else {
            session_loop(&app, &mut socket, &agent_id, reg.conn, &closer, &mut out_rx).await
        }
    };
    finish(&mut socket, &ending).await;
    leave(&app, &agent_id, reg.conn, &ending).await;
}

/// A registered session is over: unless a newer one replaced it, the agent is offline.
async fn leave(app: &AppState, agent_id: &AgentId, conn: u64, ending: &Ending) {
    if let Some(change) = app.registry.unregister(agent_id, conn, &ending.reason) {
        let at = Timestamp::now();
        app.recorder.send(health::record_for(change, at)).await;
        app.recorder.send(Record::Disconnected { agent_id: agent_id.clone(), at }).await;
    }
    tracing::info!(agent = %agent_id, reason = %ending.reason, "agent disconnected");
}

/// A job cancelled while the agent was away: its runs still on the agent get their cancel now.
async fn cancel_held_runs_of_cancelled_jobs(app: &AppState, socket: &mut WebSocket, held: &[crate::store::OpenRun]) -> Result<(), String> {
    let mut cancelled_jobs = std::collections::HashMap::new();
    for r in held {
        let cancelled = match cancelled_jobs.get(&r.job_id) {
            Some(c) => *c,
            None => {
                let c = app.store.job(&r.job_id).await.ok().flatten().is_some_and(|j| j.cancelled_at.is_some());
                cancelled_jobs.insert(r.job_id.clone(), c);
                c
            }
        };
        if cancelled {
            let msg = ServerMessage::Cancel(shared::protocol::Cancel { run_id: r.id.clone() });
            send_json(socket, &msg).await.map_err(|()| "connection lost while sending a cancel".to_owned())?;
        }
    }
    Ok(())
}

enum Event {
    Frame(Option<Result<Message, axum::Error>>),
    Outbound(Option<ServerMessage>),
    Ping,
    Close,
    Shutdown,
}

async fn session_loop(
    app: &AppState,
    socket: &mut WebSocket,
    agent_id: &AgentId,
    conn: u64,
    closer: &Closer,
    outbound: &mut mpsc::Receiver<ServerMessage>,
) -> Ending {
    let idle_timeout = app.config.idle_timeout();
    let mut ping = tokio::time::interval_at(Instant::now() + app.config.ping_interval, app.config.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    loop {
        // Borrow the socket only while waiting; handle the event after the select.
        let event = tokio::select! {
            frame = socket.recv() => Event::Frame(frame),
            msg = outbound.recv() => Event::Outbound(msg),
            _ = ping.tick() => Event::Ping,
            _ = closer.closed() => Event::Close,
            _ = app.shutdown.cancelled() => Event::Shutdown,
        };
        match event {
            Event::Shutdown => return Ending::close(close::GOING_AWAY, "server shutting down"),
            Event::Close => {
                let (code, reason) = closer.reason().unwrap_or((close::NORMAL, "closed by the server".into()));
                return Ending::close(code, reason);
            }
            Event::Ping => {
                if last_heard.elapsed() > idle_timeout {
                    return Ending::close(close::TIMEOUT, format!("nothing heard for {}", shared::duration::format(idle_timeout)));
                }
                if send(socket, Message::Ping(Default::default())).await.is_err() {
                    return Ending::quiet("connection lost while sending a ping");
                }
            }
            Event::Outbound(None) => return Ending::close(close::INTERNAL_ERROR, "session channel closed"),
            Event::Outbound(Some(msg)) => {
                if send_json(socket, &msg).await.is_err() {
                    return Ending::quiet("connection lost while sending");
                }
            }
            Event::Frame(None) => return Ending::quiet("connection closed"),
            Event::Frame(Some(Err(e))) => return read_error(e),
            Event::Frame(Some(Ok(frame))) => {
                last_heard = Instant::now();
                match frame {
                    Message::Text(text) => {
                        if let Err(ending) = handle_text(app, agent_id, conn, text.as_str()).await {
                            return ending;
                        }
                    }
                    Message::Binary(_) => return Ending::close(close::UNSUPPORTED_DATA, "binary frames are not part of the protocol"),
                    Message::Close(frame) => {
                        let why =
                            frame.map(|f| format!("closed by agent ({} {})", f.code, f.reason)).unwrap_or_else(|| "closed by agent".into());
                        return Ending::quiet(why);
                    }
                    // Pongs (and pings, which the library answers) only prove the link is alive.
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
        }
    }
}

async fn handle_text(app: &AppState, agent_id: &AgentId, conn: u64, text: &str) -> Result<(), Ending> {
    let decoded = AgentMessage::decode(text);
    if let Ok(m) = &decoded {
        crate::telemetry::message_received(m.type_name());
    }
    match decoded {
        Ok(AgentMessage::Heartbeat(hb)) => {
            let now = Timestamp::now();
            if let Some(change) = app.registry.heartbeat(agent_id, conn) {
                tracing::info!(agent = %agent_id, to = %change.to, reason = %change.reason, "agent status changed");
                app.recorder.send(health::record_for(change, now)).await;
            }
            app.recorder.heartbeat(Record::Heartbeat { agent_id: agent_id.clone(), at: now, seq: hb.seq, metrics: Box::new(hb.metrics) });
            Ok(())
        }
        Ok(AgentMessage::Hello(_)) => Err(Ending::close(close::PROTOCOL_ERROR, "hello sent twice")),
        Ok(AgentMessage::RunAccepted(m)) => {
            app.recorder.send(Record::RunAccepted { agent_id: agent_id.clone(), run_id: m.run_id, at: Timestamp::now() }).await;
            Ok(())
        }
        Ok(AgentMessage::RunStarted(m)) => {
            app.recorder.send(Record::RunStarted { agent_id: agent_id.clone(), run_id: m.run_id, at: Timestamp::now() }).await;
            Ok(())
        }
        Ok(AgentMessage::RunOutput(m)) => {
            // Waiting for room in the recorder's queue slows this agent down, which is the
            // backpressure output needs; nothing is dropped.
            let record =
                Record::RunOutput { agent_id: agent_id.clone(), run_id: m.run_id, stream: m.stream, offset: m.offset, data: m.data };
            app.recorder.send(record).await;
            Ok(())
        }
        Ok(AgentMessage::RunFinished(m)) => {
            app.recorder.send(Record::RunFinished { agent_id: agent_id.clone(), finished: Box::new(m), at: Timestamp::now() }).await;
            Ok(())
        }
        Err(e) => {
            tracing::warn!(agent = %agent_id, error = %e, "malformed message from agent");
            Err(Ending::close(e.close_code(), e.to_string()))
        }
    }
}
