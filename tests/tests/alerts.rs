//! Webhook alerts: a receiver started here gets signed alerts, retried after a failure; its URL
//! and the secret stay out of the log; plain http needs a setting, and redirects are refused.

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
    receiver_answering(|n| if n == 0 { "500 Internal Server Error".into() } else { "200 OK".into() }).await
}

/// A plain HTTP receiver on loopback whose answer to its `n`th request has the status line
/// (and any headers) that `answer(n)` gives.
async fn receiver_answering(answer: impl Fn(usize) -> String + Send + 'static) -> (String, mpsc::Receiver<Request>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook/T0-path-secret", listener.local_addr().unwrap());
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
            let status = answer(n);
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
    let server = TestServer::spawn_with(&["--webhook", &url, "--webhook-secret", "s3cret", "--webhook-allow-http"]).await;
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

    // The refused first delivery was logged, naming the receiver by scheme and host only.
    let log = server.log();
    assert!(log.contains("webhook refused"), "{log}");
    assert!(!log.contains("T0-path-secret") && !log.contains("s3cret"), "the URL's path or the secret is in the log:\n{log}");
}

#[tokio::test]
async fn a_webhook_that_redirects_is_not_followed_and_plain_http_needs_a_setting() {
    let (target, mut followed) = receiver_answering(|_| "200 OK".into()).await;
    let (url, mut hooks) = receiver_answering(move |_| format!("302 Found\r\nlocation: {target}")).await;
    let server = TestServer::spawn_with(&["--webhook", &url, "--webhook-secret", "s3cret", "--webhook-allow-http"]).await;
    let mut agents = server.spawn_agents(1, &[]).await;
    let (mut agent, id) = agents.remove(0);
    agent.process().kill();
    server.api.wait_status(&id, AgentStatus::Offline, Duration::from_secs(10)).await;

    let first = tokio::time::timeout(Duration::from_secs(30), hooks.recv()).await.expect("an alert in time").expect("receiver open");
    assert_eq!(first.headers.get("x-muster-event").map(String::as_str), Some("agent.offline"));
    tests::wait_for("the refused redirect in the log", Duration::from_secs(10), || async {
        server.log().contains("webhook answered with a redirect, which is not followed").then_some(())
    })
    .await;
    assert!(followed.try_recv().is_err(), "the redirect was followed");
    assert!(!server.log().contains("T0-path-secret"), "{}", server.log());

    // Without --webhook-allow-http the same URL does not even start the server.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(tests::bin("muster-server"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--webhook", &url, "--webhook-secret", "s3cret", "check"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{said}");
    assert!(said.contains("webhook_allow_http") && !said.contains("T0-path-secret"), "{said}");
}
