//! `muster-agent check`: is this agent set up to work? Config, CA, credential, then one real
//! HTTPS request to the server's `/api/v1/agent/check`, which verifies the credential without
//! opening a session. The first problem found is the answer, in one line.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;
use crate::credential;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A problem, as one line for the operator.
#[derive(Debug, PartialEq, Eq)]
pub struct Problem(pub String);

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What was checked, when all is well.
pub async fn run(config: &Config) -> Result<String, Problem> {
    let tls = crate::tls::client_config(config.ca.as_deref()).map_err(|e| Problem(format!("TLS trust: {e}")))?;
    let mut issued = String::new();
    let bearer = match credential::load(&config.state_dir).map_err(|e| Problem(format!("credential: {e}")))? {
        Some(c) => {
            if c.server.trim_end_matches('/') != config.server.trim_end_matches('/') {
                return Err(Problem(format!("credential: it was issued by {}, but the config names {}", c.server, config.server)));
            }
            let rotation = match config.credential_rotation {
                Some(d) => format!("rotated every {}", shared::duration::format(d)),
                None => "never rotated by this agent (credential_rotation = \"off\")".into(),
            };
            if let Some(at) = c.issued_at {
                issued = format!("; credential issued {at}, {rotation}");
            }
            c.token
        }
        None => match &config.enroll_token {
            Some(t) => t.read().map_err(|e| Problem(format!("credential: {e}")))?,
            None => {
                return Err(Problem(format!(
                    "credential: none in {} and no enrollment token: enroll with `muster-agent install`",
                    config.state_dir.display()
                )));
            }
        },
    };
    let (status, body) = get(&config.server, "/api/v1/agent/check", &bearer, tls).await?;
    let message = || serde_json::from_str::<shared::api::ApiError>(&body).map(|e| e.message).unwrap_or_else(|_| body.clone());
    match status {
        200 => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            Ok(match (v["agent_id"].as_str(), v["enroll_token"].as_str()) {
                (Some(id), _) if v["pending"].as_bool() == Some(true) => format!(
                    "ok: {} knows this agent ({id}), but it waits for an administrator's approval (muster agent accept {id}){issued}",
                    config.server
                ),
                (Some(id), _) => format!("ok: {} trusts this agent ({id}){issued}", config.server),
                (_, Some(t)) => format!("ok: {} would enroll this agent with token {t} ({} uses left)", config.server, v["uses_left"]),
                _ => format!("ok: {} answered", config.server),
            })
        }
        401 => Err(Problem(format!("credential: the server refused it: {}", message()))),
        404 => Err(Problem(format!("server: {} answered, but it is not a Muster server (or a much older one)", config.server))),
        s => Err(Problem(format!("server: {} answered HTTP {s}: {}", config.server, message()))),
    }
}

/// One HTTPS GET, by hand: the agent has no HTTP client, and needs none but this.
async fn get(server: &str, path: &str, bearer: &str, tls: Arc<rustls::ClientConfig>) -> Result<(u16, String), Problem> {
    let authority = server.trim_start_matches("https://").trim_start_matches("wss://").trim_end_matches('/');
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse::<u16>().map_err(|_| Problem(format!("server URL: bad port in {server}")))?)
        }
        _ => (authority, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let reach = |e: String| Problem(format!("reachability: cannot connect to {host}:{port}: {e}"));
    let tcp = tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect((host, port)))
        .await
        .map_err(|_| reach("no answer within 10s".into()))?
        .map_err(|e| reach(e.to_string()))?;
    let name = ServerName::try_from(host.to_owned()).map_err(|_| Problem(format!("server URL: {host} is not a valid host name")))?;
    let mut stream = tokio::time::timeout(TIMEOUT, tokio_rustls::TlsConnector::from(tls).connect(name, tcp))
        .await
        .map_err(|_| Problem("TLS: the handshake did not finish within 10s".into()))?
        .map_err(|e| Problem(format!("TLS: {}", describe_tls(&e))))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {bearer}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| reach(e.to_string()))?;
    let mut response = Vec::new();
    let read = tokio::time::timeout(TIMEOUT, stream.take(1 << 20).read_to_end(&mut response)).await;
    read.map_err(|_| reach("no answer within 10s".into()))?.map_err(|e| reach(e.to_string()))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| reach("the answer is not HTTP".into()))?;
    // The server answers small JSON bodies, possibly chunked: keep the JSON object.
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) if a < b => body[a..=b].to_owned(),
        _ => body.trim().to_owned(),
    };
    Ok((status, body))
}

fn describe_tls(e: &std::io::Error) -> String {
    let inner = e.get_ref().map(|i| i.to_string()).unwrap_or_else(|| e.to_string());
    if inner.contains("UnknownIssuer") || inner.contains("BadSignature") || inner.contains("unknown issuer") {
        format!("the server's certificate is not signed by a CA this agent trusts ({inner}); check --ca")
    } else if inner.contains("NotValidForName") || inner.contains("not valid for name") {
        format!("the server's certificate is not valid for this host name ({inner}); check --server")
    } else {
        inner
    }
}
