//! A raw agent-protocol client for tests and the load generator: real wss with the real
//! handshake, but every frame chosen by the caller, malformed ones included.

use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use shared::Labels;
use shared::protocol::{self, AgentMessage, Heartbeat, Hello, Metrics, ServerMessage, Welcome};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How the handshake went: the socket, or the HTTP status and body of a refusal.
pub enum Handshake {
    Open(Box<Ws>),
    Refused { status: u16, body: String },
}

pub async fn connect(
    server: &str,
    bearer: Option<&str>,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> Result<Handshake, tungstenite::Error> {
    let url = format!("{}{}", server.replacen("https://", "wss://", 1), protocol::CONNECT_PATH);
    let mut req = url.into_client_request()?;
    if let Some(b) = bearer {
        req.headers_mut().insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {b}")).expect("header"));
    }
    req.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol::SUBPROTOCOL));
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(4096).max_message_size(Some(1 << 20));
    match tokio_tungstenite::connect_async_tls_with_config(req, Some(config), true, Some(Connector::Rustls(tls))).await {
        Ok((ws, _)) => Ok(Handshake::Open(Box::new(ws))),
        Err(tungstenite::Error::Http(resp)) => Ok(Handshake::Refused {
            status: resp.status().as_u16(),
            body: resp.body().as_deref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default(),
        }),
        Err(e) => Err(e),
    }
}

pub async fn connect_ca(server: &str, bearer: Option<&str>, ca: &Path) -> Handshake {
    connect(server, bearer, crate::rustls_config(ca)).await.expect("connect")
}

/// An upgrade that must succeed: the socket and the headers of the server's 101.
pub async fn upgrade(server: &str, bearer: &str, ca: &Path) -> (Box<Ws>, tungstenite::http::HeaderMap) {
    let url = format!("{}{}", server.replacen("https://", "wss://", 1), protocol::CONNECT_PATH);
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {bearer}")).expect("header"));
    req.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol::SUBPROTOCOL));
    let tls = Connector::Rustls(crate::rustls_config(ca));
    let (ws, resp) = tokio_tungstenite::connect_async_tls_with_config(req, None, true, Some(tls)).await.expect("upgrade");
    (Box::new(ws), resp.headers().clone())
}

pub fn hello(hostname: &str, interval_ms: u64) -> AgentMessage {
    AgentMessage::Hello(Hello {
        protocol: protocol::PROTOCOL_VERSION,
        agent_version: "test".into(),
        hostname: hostname.into(),
        labels: Labels::new(),
        heartbeat_interval_ms: interval_ms,
        open_runs: Vec::new(),
        trusted_keys: Vec::new(),
    })
}

pub fn heartbeat(seq: u64, hostname: &str) -> AgentMessage {
    AgentMessage::Heartbeat(Heartbeat {
        seq,
        metrics: Metrics { hostname: hostname.into(), agent_version: "test".into(), mem_total_bytes: 1 << 30, ..Metrics::default() },
    })
}

pub async fn send(ws: &mut Ws, msg: &AgentMessage) -> Result<(), tungstenite::Error> {
    ws.send(Message::Text(serde_json::to_string(msg).expect("json").into())).await
}

/// Sends `hello` and returns the `welcome`.
pub async fn open(ws: &mut Ws, hostname: &str, interval_ms: u64) -> Welcome {
    send(ws, &hello(hostname, interval_ms)).await.expect("send hello");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("welcome in time") {
            Some(Ok(Message::Text(t))) => match ServerMessage::decode(t.as_str()).expect("server message") {
                ServerMessage::Welcome(w) => return w,
                other => panic!("expected welcome, got {other:?}"),
            },
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected welcome, got {other:?}"),
        }
    }
}

/// Reads (answering pings) until the server closes; returns the close code, if any.
pub async fn close_code(ws: &mut Ws, deadline: Duration) -> Option<u16> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => panic!("the server did not close the connection within {deadline:?}"),
            Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return None,
        }
    }
}

/// Reads server messages (skipping control frames and the ones `pick` passes over) until `pick`
/// takes one; None if the connection ends or nothing is taken within `deadline`.
pub async fn read_until<T>(ws: &mut Ws, deadline: Duration, mut pick: impl FnMut(ServerMessage) -> Option<T>) -> Option<T> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(until, ws.next()).await.ok()?? {
            Ok(Message::Text(t)) => {
                if let Some(v) = ServerMessage::decode(t.as_str()).ok().and_then(&mut pick) {
                    return Some(v);
                }
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}
