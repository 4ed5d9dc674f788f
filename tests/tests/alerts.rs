//! Webhook alerts: a receiver started here gets signed alerts, retried after a failure.

// Helpers below are test code: a panic is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use shared::api::AgentStatus;
use shared::job::{Program, Target};
use tests::{TestServer, job};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

struct Request {
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// A plain HTTP receiver on loopback: answers 500 to the first request and 200 after.
async fn receiver() -> (String, mpsc::Receiver<Request>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        for n in 0..64 {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head_end, length) = loop {
                let k = sock.read(&mut chunk).await.unwrap_or(0);
                if k == 0 {
                    break (0, 0);
                }
                buf.extend_from_slice(&chunk[..k]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let length =
                        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                    break (end + 4, length);
                }
            };
            while buf.len() < head_end + length {
                let k = sock.read(&mut chunk).await.unwrap_or(0);
                if k == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..k]);
            }
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let headers = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
                .collect();
            let status = if n == 0 { "500 Internal Server Error" } else { "200 OK" };
            let _ = sock.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes()).await;
            let _ = tx.send(Request { headers, body: buf[head_end..].to_vec() }).await;
        }
    });
    (url, rx)
}

fn signed(secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn a_failed_job_and_an_agent_going_offline_reach_the_webhook_signed_and_retried() {
    let (url, mut hooks) = receiver().await;
    let server = TestServer::spawn_with(&["--webhook", &url, "--webhook-secret", "s3cret"]).await;
    let mut agents = server.spawn_agents(1, &[]).await;
    let (mut agent, id) = agents.remove(0);

    let failing = server.api.create_job(&job(Target::Agents(vec![id.clone()]), Program::Argv(vec!["false".into()]))).await;
    server.api.wait_job_finished(&failing.id, Duration::from_secs(15)).await;
    agent.process().kill();
    server.api.wait_status(&id, AgentStatus::Offline, Duration::from_secs(10)).await;

    let mut seen: HashMap<String, Vec<Request>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(seen.get("job.failed").is_some_and(|v| !v.is_empty()) && seen.get("agent.offline").is_some_and(|v| !v.is_empty())) {
        let r = tokio::time::timeout_at(deadline, hooks.recv()).await.expect("alerts in time").expect("receiver open");
        let event = r.headers.get("x-muster-event").cloned().unwrap_or_default();
        seen.entry(event).or_default().push(r);
    }
    for (event, requests) in &seen {
        for r in requests {
            assert_eq!(r.headers.get("x-muster-signature"), Some(&signed("s3cret", &r.body)), "{event}: signature");
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(body["event"], event.as_str());
        }
    }
    let offline: serde_json::Value = serde_json::from_slice(&seen["agent.offline"][0].body).unwrap();
    assert_eq!(offline["agent_id"], id.as_str());
    let failed: serde_json::Value = serde_json::from_slice(&seen["job.failed"][0].body).unwrap();
    assert_eq!(failed["job_id"], failing.id.as_str());
    assert_eq!(failed["counts"]["failed"], 1);
    // The receiver refused the very first delivery; it came again, with the same delivery id.
    let all: Vec<&Request> = seen.values().flatten().collect();
    let deliveries: Vec<&String> = all.iter().filter_map(|r| r.headers.get("x-muster-delivery")).collect();
    assert!(deliveries.len() > deliveries.iter().collect::<std::collections::HashSet<_>>().len(), "a retried delivery: {deliveries:?}");
}
