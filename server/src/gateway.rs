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
use shared::{AgentId, Timestamp};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;

use crate::app::AppState;
use crate::auth::AuthError;
use crate::health::{self, Thresholds};
use crate::registry::Closer;
use crate::store::Record;

mod handshake;

pub use handshake::check;
use handshake::{Authenticated, Refusal, Verified, enroll, public_name, refuse_clone, verify};

/// Heartbeat intervals an agent may announce.
const MIN_HEARTBEAT: Duration = Duration::from_millis(200);
const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);
/// A send that takes longer than this means the agent stopped reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const OUTBOUND_QUEUE: usize = 256;
/// How long a closing session waits for the agent's answering Close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Largest write buffer of one session. A peer that stops reading (while sending pings, say,
/// whose pongs queue here) is closed when its buffer passes this, instead of growing it.
const MAX_WRITE_BUFFER: usize = 256 * 1024;

/// Seconds a busy server asks an agent to wait before its next attempt (`Retry-After`); the
/// agent adds up to as much again at random.
pub const BUSY_RETRY_AFTER_SECS: u64 = 2;

/// A refusal of Muster's own: the JSON error, and `X-Muster-Error` naming its kind, so an
/// agent can tell it from a proxy or balancer in the way (which never sends it).
fn refuse(status: StatusCode, kind: &str, message: String) -> Response {
    let mut resp = (status, Json(ApiError { error: kind.into(), message })).into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(kind) {
        resp.headers_mut().insert(shared::protocol::MUSTER_ERROR_HEADER, v);
    }
    resp
}

/// `GET /api/v1/agent/connect`. Checks everything that can be checked before the upgrade
/// (the subprotocol, then the credential) without changing anything: an enrollment token's use
/// is taken only after `hello` arrives on an upgraded connection, so a refused or abandoned
/// handshake spends nothing and creates no agent.
pub async fn connect(
    State(app): State<AppState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    ticket: Option<axum::Extension<crate::admission::Ticket>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let offered = ws.requested_protocols().any(|p| p.to_str().is_ok_and(|s| s.split(',').any(|s| s.trim() == protocol::SUBPROTOCOL)));
    if !offered {
        return refuse(StatusCode::BAD_REQUEST, "bad_request", format!("offer the WebSocket subprotocol {}", protocol::SUBPROTOCOL));
    }
    // Before the credential is even looked at: a storm of reconnects is answered at once, each
    // told when to come back, instead of queueing on the database or timing out.
    let Some(start) = app.session_starts.begin(remote.ip()) else {
        crate::telemetry::connection_refused("max_session_starts");
        let mut resp = refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!(
                "the server is opening as many sessions as it takes at once ({} in all, a quarter of that from one address); try again in {BUSY_RETRY_AFTER_SECS}s",
                app.config.limits.max_session_starts
            ),
        );
        resp.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from(BUSY_RETRY_AFTER_SECS));
        return resp;
    };
    let auth_header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let verified = match verify(&app, auth_header).await {
        Ok(v) => v,
        Err(Refusal::Auth(e)) => {
            crate::logging::refused_handshake("agent handshake", remote, &e);
            app.auditor.refused(remote.ip(), "agent", &e, public_name(auth_header));
            return refuse(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string());
        }
        Err(Refusal::Superseded(id)) => return refuse_clone(&app, &id, remote),
        Err(Refusal::Internal(e)) => {
            tracing::error!(%remote, error = %e, "agent handshake failed");
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the server cannot check credentials right now".into());
        }
    };
    // The connection is promoted out of the unauthenticated caps once `hello` has been read
    // too (in `run_session`), so a credential alone cannot hold upgraded sockets open.
    let ticket = ticket.map(|axum::Extension(t)| t);
    let guard = app.tracker.token();
    // An enrollment's credential follows in `welcome`: nothing on the way may keep the exchange.
    let enrolling = matches!(verified, Verified::EnrollToken(_));
    let mut resp = ws
        .protocols([protocol::SUBPROTOCOL])
        .max_message_size(protocol::MAX_MESSAGE_BYTES)
        .max_frame_size(protocol::MAX_MESSAGE_BYTES)
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            run_session(app, socket, verified, remote, ticket.as_ref(), start).await;
            // The session holds its connection's slot until it ends.
            drop(ticket);
            drop(guard);
        });
    if enrolling {
        resp.headers_mut().extend(crate::api::no_store());
    }
    resp
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
        if send(socket, Message::Close(Some(CloseFrame { code: *code, reason: reason.into() }))).await.is_ok() {
            // Wait (briefly) for the agent's Close, reading and discarding what it still sends:
            // closing the socket with unread input would reset the connection and could lose
            // the Close frame, and with it the code that tells the agent what to do.
            let drain = async {
                while let Some(Ok(m)) = socket.recv().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
        }
    }
}

/// The peer sent Close: answer it, as RFC 6455 asks. The library queued the answer when it read
/// the frame; flushing sends it.
async fn echo_close(socket: &mut WebSocket) {
    let _ = tokio::time::timeout(Duration::from_secs(2), futures_util::SinkExt::flush(socket)).await;
}

/// Maps a read error to the close code the protocol gives it, and says in words what happened
/// (no library text with URLs in it reaches the agent's status history).
fn read_error(e: axum::Error) -> Ending {
    match e.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) => match *e {
            tungstenite::Error::Capacity(tungstenite::error::CapacityError::MessageTooLong { size, max_size }) => {
                Ending::close(close::TOO_BIG, format!("message of {size} bytes is over the limit of {max_size}"))
            }
            tungstenite::Error::Capacity(_) => Ending::close(close::TOO_BIG, "message too big"),
            tungstenite::Error::WriteBufferFull(_) => Ending::quiet("the agent stopped reading: its write buffer is full"),
            tungstenite::Error::Utf8(_) => Ending::close(close::INVALID_PAYLOAD, "text frame is not valid UTF-8"),
            tungstenite::Error::Protocol(p) => Ending::close(close::PROTOCOL_ERROR, format!("websocket protocol error: {p}")),
            tungstenite::Error::Io(io) => Ending::quiet(io_reason(&io)),
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => Ending::quiet("connection closed"),
            tungstenite::Error::Tls(_) => Ending::quiet("connection lost: TLS error"),
            _ => Ending::quiet("connection lost"),
        },
        Err(_) => Ending::quiet("connection lost"),
    }
}

fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::UnexpectedEof => "connection lost: closed without a TLS close_notify".into(),
        ErrorKind::ConnectionReset => "connection lost: reset by the peer".into(),
        ErrorKind::ConnectionAborted => "connection lost: aborted".into(),
        ErrorKind::BrokenPipe => "connection lost: broken pipe".into(),
        ErrorKind::TimedOut => "connection lost: timed out".into(),
        _ => "connection lost".into(),
    }
}

/// Waits for `hello`: the first message, within the hello timeout, every field checked.
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
        Message::Close(_) => {
            echo_close(socket).await;
            return Err(Ending::quiet("closed before hello"));
        }
        _ => return Err(Ending::close(close::PROTOCOL_ERROR, "expected hello first")),
    };
    let msg = AgentMessage::decode(text.as_str()).map_err(|e| Ending::close(e.close_code(), e.to_string()))?;
    msg.validate().map_err(|e| Ending::close(close::INVALID_PAYLOAD, format!("invalid {}: {e}", msg.type_name())))?;
    match msg {
        AgentMessage::Hello(h) => {
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
            Ok(h)
        }
        other => Err(Ending::close(close::PROTOCOL_ERROR, format!("expected hello first, got {}", other.type_name()))),
    }
}

async fn run_session(
    app: AppState,
    mut socket: WebSocket,
    verified: Verified,
    remote: SocketAddr,
    ticket: Option<&crate::admission::Ticket>,
    start: crate::admission::SessionStart,
) {
    let hello = match read_hello(&mut socket).await {
        Ok(h) => {
            if let Some(t) = ticket {
                t.promote();
            }
            h
        }
        Err(ending) => {
            let who = match &verified {
                Verified::Agent { row, .. } => row.id.to_string(),
                Verified::EnrollToken(t) => format!("enroll-token:{}", t.id),
            };
            tracing::warn!(who = %who, %remote, reason = %ending.reason, "agent session refused");
            finish(&mut socket, &ending).await;
            return;
        }
    };
    let who = match verified {
        Verified::Agent { row, by_pending } => {
            if by_pending {
                // The agent stored the credential a rotation issued, and its confirmation was lost.
                let hash = row.pending_secret_hash.as_deref().unwrap_or_default();
                if let Err(e) = crate::identity::complete(&app, &row.id, hash, "connected with the new credential", remote).await {
                    tracing::error!(agent = %row.id, error = %e, "cannot complete the credential rotation");
                    let ending = Ending::close(close::INTERNAL_ERROR, "server cannot write its database");
                    finish(&mut socket, &ending).await;
                    return;
                }
            }
            Authenticated {
                agent_id: row.id,
                token_labels: row.token_labels,
                credential: None,
                approval_pending: row.approval_pending,
                rotation_requested: row.rotation_requested && !by_pending,
            }
        }
        Verified::EnrollToken(token) => match enroll(&app, &token, &hello, remote).await {
            Ok(who) => who,
            Err(ending) => {
                tracing::warn!(token = %token.id, %remote, reason = %ending.reason, "enrollment refused");
                finish(&mut socket, &ending).await;
                return;
            }
        },
    };
    let agent_id = who.agent_id.clone();
    let interval = Duration::from_millis(hello.heartbeat_interval_ms);
    let labels = who.token_labels.with_reported(&hello.labels);
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
            trusted_keys: hello.trusted_keys.clone(),
        })
        .await;
    let reg = app.registry.register(&agent_id, Thresholds::for_interval(interval), out_tx, closer.clone(), remote);
    if let Some(change) = reg.change {
        app.recorder.send(health::record_for(change, now)).await;
    }
    if let Some(conflict) = reg.conflict {
        crate::alerts::credential_conflict(&app, &agent_id, conflict);
    }
    // Revocation writes the database, then closes the registered session. A session that was
    // verified before the revocation but registered after that close is caught here.
    if who.credential.is_none() {
        let refused = match app.store.agent_credential(&agent_id).await {
            Ok(Some(row)) if !row.revoked => None,
            Ok(_) => {
                app.auditor.refused(remote.ip(), "agent", &AuthError::Revoked, Some(format!("msa_{agent_id}")));
                Some(Ending::close(close::REVOKED, "credential revoked"))
            }
            Err(e) => {
                tracing::error!(agent = %agent_id, error = %e, "cannot check the agent's credential");
                Some(Ending::close(close::INTERNAL_ERROR, "server cannot read its database"))
            }
        };
        if let Some(ending) = refused {
            finish(&mut socket, &ending).await;
            leave(&app, &agent_id, reg.conn, &ending).await;
            return;
        }
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
        pending: who.approval_pending,
    });
    let sent = send_json(&mut socket, &welcome).await;
    // The session is open: the next agent may start.
    drop(start);
    let ending = if sent.is_err() {
        Ending::quiet("could not send welcome")
    } else {
        app.dispatcher.kick.notify_one();
        let rotate = ServerMessage::RotateCredential(protocol::RotateCredential {});
        if who.rotation_requested && send_json(&mut socket, &rotate).await.is_err() {
            Ending::quiet("could not send rotate_credential")
        } else if let Err(e) = send_revocations(&app, &mut socket).await {
            Ending::quiet(e)
        } else if let Err(e) = cancel_held_runs_of_cancelled_jobs(&app, &mut socket, &held).await {
            Ending::quiet(e)
        } else {
            let mut session = Session {
                app: &app,
                agent_id: &agent_id,
                conn: reg.conn,
                budget: crate::budget::Budget::from_limits(&app.config.limits),
                min_sample_gap: (interval / 2).max(MIN_HEARTBEAT / 2),
                last_sample: None,
                queued: crate::recorder::session_share(),
                remote,
                issued: None,
            };
            session.run(&mut socket, &closer, &mut out_rx).await
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
/// Every key revoked fleet-wide, so an agent that was away learns of it before any run.
async fn send_revocations(app: &AppState, socket: &mut WebSocket) -> Result<(), String> {
    let revocations = app.key_revocations().await.map_err(|e| format!("cannot read key revocations: {e}"))?;
    for r in revocations.iter() {
        send_json(socket, &ServerMessage::KeyRevoked(Box::new(r.clone())))
            .await
            .map_err(|()| "connection lost while sending key revocations".to_owned())?;
    }
    Ok(())
}

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

/// One open session: what it needs to judge each message the agent sends.
struct Session<'a> {
    app: &'a AppState,
    agent_id: &'a AgentId,
    conn: u64,
    budget: crate::budget::Budget,
    /// Heartbeats closer together than this count for liveness but are not stored: an agent
    /// that heartbeats far faster than it announced costs the database no more than one that
    /// keeps to its interval.
    min_sample_gap: Duration,
    last_sample: Option<Instant>,
    /// This session's share of the recorder's queue.
    queued: std::sync::Arc<tokio::sync::Semaphore>,
    remote: SocketAddr,
    /// The credential this session issued and the agent has not confirmed yet.
    issued: Option<crate::identity::Issued>,
}

impl Session<'_> {
    async fn run(&mut self, socket: &mut WebSocket, closer: &Closer, outbound: &mut mpsc::Receiver<ServerMessage>) -> Ending {
        let app = self.app;
        let idle_timeout = app.config.idle_timeout();
        let mut ping = tokio::time::interval_at(Instant::now() + app.config.ping_interval, app.config.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        // While the agent is over its byte budget, nothing is read from it (see `budget`).
        let mut paused_until: Option<Instant> = None;
        loop {
            // Borrow the socket only while waiting; handle the event after the select.
            let event = tokio::select! {
                _ = tokio::time::sleep_until(paused_until.unwrap_or_else(Instant::now)), if paused_until.is_some() => {
                    paused_until = None;
                    continue;
                }
                frame = socket.recv(), if paused_until.is_none() => Event::Frame(frame),
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
                // The registry dropped this session's sender: it was replaced or closed, and the
                // closer says how (the two can be seen in either order).
                Event::Outbound(None) => {
                    let (code, reason) = closer.reason().unwrap_or((close::INTERNAL_ERROR, "session channel closed".into()));
                    return Ending::close(code, reason);
                }
                Event::Outbound(Some(msg)) => {
                    if send_json(socket, &msg).await.is_err() {
                        return Ending::quiet("connection lost while sending");
                    }
                }
                Event::Frame(None) => return Ending::quiet("connection closed"),
                Event::Frame(Some(Err(e))) => return read_error(e),
                Event::Frame(Some(Ok(frame))) => {
                    last_heard = Instant::now();
                    let len = match &frame {
                        Message::Text(t) => t.len(),
                        Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
                        Message::Close(_) => 0,
                    };
                    match self.budget.take(len) {
                        crate::budget::Verdict::Pass => {}
                        crate::budget::Verdict::Drop { which } => {
                            crate::telemetry::agent_over_budget(which);
                            if self.budget.dropped == 1 {
                                tracing::warn!(agent = %self.agent_id, budget = which, "agent over its message budget: dropping messages");
                            }
                            continue;
                        }
                        crate::budget::Verdict::Close { which } => {
                            crate::telemetry::agent_over_budget(which);
                            return Ending::close(close::RATE_LIMITED, format!("over the {which} budget"));
                        }
                    }
                    if let Some(wait) = self.budget.pause() {
                        crate::telemetry::agent_over_budget("bytes");
                        paused_until = Some(Instant::now() + wait);
                    }
                    match frame {
                        Message::Text(text) => match self.handle_text(text.as_str()).await {
                            Err(ending) => return ending,
                            Ok(Some(reply)) => {
                                if send_json(socket, &reply).await.is_err() {
                                    return Ending::quiet("connection lost while sending");
                                }
                            }
                            Ok(None) => {}
                        },
                        Message::Binary(_) => return Ending::close(close::UNSUPPORTED_DATA, "binary frames are not part of the protocol"),
                        Message::Close(frame) => {
                            echo_close(socket).await;
                            let why = frame
                                .map(|f| format!("closed by agent ({} {})", f.code, crate::logging::untrusted(&f.reason)))
                                .unwrap_or_else(|| "closed by agent".into());
                            return Ending::quiet(why);
                        }
                        // Pongs (and pings, which the library answers) only prove the link is alive.
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
            }
        }
    }

    /// Handles one message; a reply, if any, goes straight back to this agent.
    async fn handle_text(&mut self, text: &str) -> Result<Option<ServerMessage>, Ending> {
        let (app, agent_id) = (self.app, self.agent_id);
        let msg = match AgentMessage::decode(text) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(agent = %agent_id, error = %crate::logging::untrusted(&e.to_string()), "malformed message from agent");
                return Err(Ending::close(e.close_code(), e.to_string()));
            }
        };
        crate::telemetry::message_received(msg.type_name());
        if let Err(e) = msg.validate() {
            tracing::warn!(agent = %agent_id, kind = msg.type_name(), error = %e, "invalid message from agent");
            return Err(Ending::close(close::INVALID_PAYLOAD, format!("invalid {}: {e}", msg.type_name())));
        }
        match msg {
            AgentMessage::Heartbeat(hb) => {
                let now = Timestamp::now();
                if let Some(change) = app.registry.heartbeat(agent_id, self.conn) {
                    tracing::info!(agent = %agent_id, to = %change.to, reason = %change.reason, "agent status changed");
                    app.recorder.send(health::record_for(change, now)).await;
                }
                if self.last_sample.is_some_and(|t| t.elapsed() < self.min_sample_gap) {
                    crate::telemetry::agent_over_budget("heartbeat_interval");
                    return Ok(None);
                }
                self.last_sample = Some(Instant::now());
                app.recorder.heartbeat(Record::Heartbeat {
                    agent_id: agent_id.clone(),
                    at: now,
                    seq: hb.seq,
                    metrics: Box::new(hb.metrics),
                });
                Ok(None)
            }
            AgentMessage::Hello(_) => Err(Ending::close(close::PROTOCOL_ERROR, "hello sent twice")),
            AgentMessage::CredentialRequest(_) => {
                let unavailable = |e: crate::store::StoreError| {
                    tracing::error!(agent = %agent_id, error = %e, "cannot issue a credential");
                    Ending::close(close::INTERNAL_ERROR, "server cannot write its database")
                };
                match crate::identity::issue(app, agent_id).await.map_err(unavailable)? {
                    Some((issued, reply)) => {
                        self.issued = Some(issued);
                        Ok(Some(reply))
                    }
                    None => Ok(None),
                }
            }
            AgentMessage::CredentialStored(m) => {
                let Some(issued) = self.issued.take() else {
                    tracing::warn!(agent = %agent_id, "credential_stored without a credential issued in this session; ignoring");
                    return Ok(None);
                };
                if let Err(e) = crate::identity::confirm(app, agent_id, &issued, &m.sha256, self.remote).await {
                    tracing::error!(agent = %agent_id, error = %e, "cannot complete the credential rotation");
                    return Err(Ending::close(close::INTERNAL_ERROR, "server cannot write its database"));
                }
                Ok(None)
            }
            AgentMessage::RunAccepted(m) => {
                app.recorder.send(Record::RunAccepted { agent_id: agent_id.clone(), run_id: m.run_id, at: Timestamp::now() }).await;
                Ok(None)
            }
            AgentMessage::RunStarted(m) => {
                app.recorder.send(Record::RunStarted { agent_id: agent_id.clone(), run_id: m.run_id, at: Timestamp::now() }).await;
                Ok(None)
            }
            AgentMessage::RunOutput(m) => {
                // Waiting for room in the recorder's queue (records and bytes) slows this agent
                // down, which is the backpressure output needs; nothing is dropped.
                let record =
                    Record::RunOutput { agent_id: agent_id.clone(), run_id: m.run_id, stream: m.stream, offset: m.offset, data: m.data };
                app.recorder.send_as(Some(&self.queued), record).await;
                Ok(None)
            }
            AgentMessage::RunFinished(m) => {
                let record = Record::RunFinished { agent_id: agent_id.clone(), finished: Box::new(m), at: Timestamp::now() };
                app.recorder.send_as(Some(&self.queued), record).await;
                Ok(None)
            }
        }
    }
}
