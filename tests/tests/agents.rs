//! Agents dialing in: enrollment, credentials, liveness, restarts and hostile input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use shared::api::AgentStatus;
use shared::protocol::close;
use tests::ws::{self, Handshake};
use tests::{Backend, TestServer, wait_for};
use tokio_tungstenite::tungstenite::Message;

const SOON: Duration = Duration::from_secs(15);

async fn agent_enrolls_once_then_reconnects_with_its_stored_credential(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let token = server.enroll_token(1, &["site=lab"]).await;
    let mut agent = server.spawn_agent(Some(&token), &["role=pos", "site=ignored"]);
    let id = agent.id().await;
    let a = server.api.wait_status(&id, AgentStatus::Online, SOON).await;
    assert_eq!(
        a.summary.labels.to_string(),
        "agent.role=pos,agent.site=ignored,site=lab",
        "the token's labels are the trusted ones; the agent's own are kept under agent."
    );
    let mode = std::fs::metadata(agent.credential_path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the credential file is private");

    agent.process().stop().await;
    server.api.wait_status(&id, AgentStatus::Offline, SOON).await;

    // The token is used up now; the agent comes back with its own credential.
    let agent = agent.restart();
    let back = server.api.wait_status(&id, AgentStatus::Online, SOON).await;
    assert_eq!(back.summary.id, id);
    assert_eq!(server.api.agents().await.len(), 1, "no second enrollment");
    let reasons: Vec<_> = back.transitions.iter().map(|t| (t.to, t.reason.clone())).collect();
    assert!(reasons.iter().any(|(to, r)| *to == AgentStatus::Offline && r.contains("closed by agent")), "{reasons:?}");
    drop(agent);
}

async fn wrong_expired_and_used_up_credentials_are_refused_with_401_before_the_upgrade(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let used = server.enroll_token(1, &[]).await;
    let Handshake::Open(mut ws) = ws::connect_ca(&server.url, Some(&used), &server.ca).await else { panic!("first use is accepted") };
    let welcome = ws::open(&mut ws, "first", 1000).await;
    let credential = welcome.credential.expect("credential at enrollment");
    let expired = server.enroll_token_with_ttl(5, &[], 1).await;

    let wrong_secret = format!("{}{}", &credential[..credential.len() - 4], "0000");
    let zeros = "0".repeat(64);
    let unknown_agent = format!("msa_ffffffffffffffff_{zeros}");
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no credential", None, "no credential"),
        ("garbage", Some("not-a-token".into()), "malformed"),
        ("wrong agent secret", Some(wrong_secret), "wrong"),
        ("unknown agent", Some(unknown_agent), "wrong"),
        ("used-up token", Some(used.clone()), "no uses left"),
        ("operator token", Some(server.admin_token.clone()), "may not"),
    ];
    for (name, bearer, expect) in cases {
        match ws::connect_ca(&server.url, bearer.as_deref(), &server.ca).await {
            Handshake::Refused { status, body } => {
                assert_eq!(status, 401, "{name}: {body}");
                assert!(body.contains(expect), "{name}: {body:?} should say {expect:?}");
            }
            Handshake::Open(_) => panic!("{name}: the upgrade must be refused"),
        }
    }
    // The expiry is a known instant a second away: wait for it to pass, then check.
    let refused_expired = wait_for("the 1s enrollment token to expire", Duration::from_secs(5), || async {
        match ws::connect_ca(&server.url, Some(&expired), &server.ca).await {
            Handshake::Refused { status: 401, body } if body.contains("expired") => Some(()),
            _ => None,
        }
    })
    .await;
    let () = refused_expired;

    // A credential that works stops working once the agent is revoked.
    let Handshake::Open(_) = ws::connect_ca(&server.url, Some(&credential), &server.ca).await else { panic!("the real credential works") };
    let out = server.cli(&["agent", "revoke", welcome.agent_id.as_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        matches!(ws::connect_ca(&server.url, Some(&credential), &server.ca).await, Handshake::Refused { status: 401, body } if body.contains("revoked"))
    );

    let log = server.log();
    assert!(log.matches("agent handshake refused").count() >= 7, "refusals are logged:\n{log}");
}

async fn agent_comes_back_online_by_itself_after_the_server_restarts(backend: Backend) {
    let mut server = TestServer::spawn_on(backend, &[]).await;
    let token = server.enroll_token(1, &[]).await;
    let agent = server.spawn_agent(Some(&token), &[]);
    let id = agent.id().await;
    server.api.wait_status(&id, AgentStatus::Online, SOON).await;

    server.process().kill();
    server.start().await;
    let a = server.api.wait_status(&id, AgentStatus::Online, SOON).await;
    let reasons: Vec<_> = a.transitions.iter().map(|t| t.reason.as_str()).collect();
    assert!(reasons.contains(&"server restarted"), "the crash is recorded as a transition: {reasons:?}");
    drop(agent);
}

async fn agent_killed_with_sigkill_is_marked_offline(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let token = server.enroll_token(1, &[]).await;
    let mut agent = server.spawn_agent(Some(&token), &[]);
    let id = agent.id().await;
    server.api.wait_status(&id, AgentStatus::Online, SOON).await;

    agent.process().kill();
    // The kernel closes a killed process's socket; the documented threshold for a link that
    // dies silently is three ping intervals (1.5 s here).
    let a = server.api.wait_status(&id, AgentStatus::Offline, Duration::from_secs(5)).await;
    let last = &a.transitions[0];
    assert_eq!((last.from, last.to), (Some(AgentStatus::Online), AgentStatus::Offline));
    assert!(!a.connection.expect("connection info").connected);
}

async fn agent_that_stops_heartbeating_while_connected_goes_stale_then_offline(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let token = server.enroll_token(1, &[]).await;
    let Handshake::Open(mut ws) = ws::connect_ca(&server.url, Some(&token), &server.ca).await else { panic!("enroll") };
    let welcome = ws::open(&mut ws, "quiet", 300).await;
    ws::send(&mut ws, &ws::heartbeat(1, "quiet")).await.unwrap();
    let id = welcome.agent_id;
    server.api.wait_status(&id, AgentStatus::Online, SOON).await;

    // Keep answering pings (the link is alive) but send no more heartbeats.
    let reader = tokio::spawn(async move { ws::close_code(&mut ws, Duration::from_secs(20)).await });
    let stale = server.api.wait_status(&id, AgentStatus::Stale, Duration::from_secs(5)).await;
    assert!(stale.transitions[0].reason.starts_with("no heartbeat"), "{:?}", stale.transitions[0]);
    let offline = server.api.wait_status(&id, AgentStatus::Offline, Duration::from_secs(5)).await;
    assert_eq!(offline.transitions[0].from, Some(AgentStatus::Stale));
    assert_eq!(reader.await.unwrap(), Some(close::TIMEOUT));
}

async fn malformed_input_closes_only_that_connection_with_its_close_code(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let token = server.enroll_token(10, &[]).await;
    let good = server.spawn_agent(Some(&token), &[]);
    let good_id = good.id().await;
    server.api.wait_status(&good_id, AgentStatus::Online, SOON).await;

    let oversized = format!(r#"{{"type":"heartbeat","seq":1,"pad":"{}"}}"#, "x".repeat(shared::protocol::MAX_MESSAGE_BYTES + 1));
    let cases: Vec<(&str, Message, u16)> = vec![
        ("invalid JSON", Message::Text("{not json".into()), close::INVALID_PAYLOAD),
        ("unknown type", Message::Text(r#"{"type":"launch","x":1}"#.into()), close::UNKNOWN_TYPE),
        ("wrong fields", Message::Text(r#"{"type":"heartbeat","seq":"one"}"#.into()), close::INVALID_PAYLOAD),
        ("binary garbage", Message::Binary(vec![0xde, 0xad, 0xbe, 0xef, 0, 255].into()), close::UNSUPPORTED_DATA),
        ("second hello", Message::Text(serde_json::to_string(&ws::hello("again", 1000)).unwrap().into()), close::PROTOCOL_ERROR),
        ("oversized message", Message::Text(oversized.into()), close::TOO_BIG),
    ];
    for (name, frame, code) in cases {
        let Handshake::Open(mut ws) = ws::connect_ca(&server.url, Some(&token), &server.ca).await else { panic!("{name}: connect") };
        ws::open(&mut ws, name, 1000).await;
        use futures_util::SinkExt;
        let _ = ws.send(frame).await;
        assert_eq!(ws::close_code(&mut ws, Duration::from_secs(5)).await, Some(code), "{name}");
    }
    // Before hello, too.
    let Handshake::Open(mut ws) = ws::connect_ca(&server.url, Some(&token), &server.ca).await else { panic!("connect") };
    ws::send(&mut ws, &ws::heartbeat(1, "early")).await.unwrap();
    assert_eq!(ws::close_code(&mut ws, Duration::from_secs(5)).await, Some(close::PROTOCOL_ERROR), "heartbeat before hello");

    // The well-behaved agent was never disturbed, and its heartbeats are still recorded.
    let before = server.api.agent(&good_id).await.summary.last_heartbeat_at.unwrap();
    wait_for("the good agent's next heartbeat", SOON, || async {
        let a = server.api.agent(&good_id).await;
        (a.summary.status == AgentStatus::Online && a.summary.last_heartbeat_at.unwrap() > before).then_some(())
    })
    .await;
    let transitions = server.api.agent(&good_id).await.transitions;
    assert_eq!(transitions.len(), 1, "the good agent never left online: {transitions:?}");
    drop(good);
}

async fn heartbeat_history_is_kept_and_served(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let token = server.enroll_token(1, &[]).await;
    let agent = server.spawn_agent(Some(&token), &[]);
    let id = agent.id().await;
    let samples: Vec<shared::api::HeartbeatSample> = wait_for("three stored heartbeats", SOON, || async {
        let s: Vec<shared::api::HeartbeatSample> = server.api.get(&format!("/agents/{id}/heartbeats?since=10m")).await;
        (s.len() >= 3).then_some(s)
    })
    .await;
    assert!(samples.windows(2).all(|w| w[0].at <= w[1].at && w[0].seq < w[1].seq), "oldest first, in order");
    assert!(samples.iter().all(|s| s.mem_total_bytes > 0 && s.disk_total_bytes > 0));

    // Summed up in hour-long buckets (one, or two across an hour's turn), each holding the
    // highest figures of its hour, for charts of long periods.
    let hourly: Vec<shared::api::HeartbeatSample> = server.api.get(&format!("/agents/{id}/heartbeats?since=10m&step=1h")).await;
    assert!((1..=2).contains(&hourly.len()), "{hourly:?}");
    assert!(hourly.iter().all(|b| b.at.unix_millis() % 3_600_000 == 0), "{hourly:?}");
    let newest = samples.iter().map(|s| s.seq).max().unwrap();
    assert!(hourly.iter().map(|b| b.seq).max().unwrap() >= newest);
    let peak = samples.iter().map(|s| s.mem_used_bytes).max().unwrap();
    assert!(hourly.iter().map(|b| b.mem_used_bytes).max().unwrap() >= peak);
    assert_eq!(server.api.raw_get(&format!("/agents/{id}/heartbeats?step=0s")).await.status(), 400);
    drop(agent);
}

async fn an_agent_reports_the_hostname_it_is_given_in_hello_and_heartbeats(backend: Backend) {
    let server = TestServer::spawn_on(backend, &[]).await;
    let token = server.enroll_token(1, &[]).await;
    let agent = server.spawn_agent_as(Some("kiosk-7"), Some(&token), &[]);
    let id = agent.id().await;
    let a = server.api.wait_status(&id, AgentStatus::Online, SOON).await;
    assert_eq!(a.summary.hostname, "kiosk-7", "from hello");
    let a = wait_for("a heartbeat with metrics", SOON, || async {
        let a = server.api.agent(&id).await;
        a.summary.metrics.is_some().then_some(a)
    })
    .await;
    assert_eq!((a.summary.hostname.as_str(), a.summary.metrics.unwrap().hostname.as_str()), ("kiosk-7", "kiosk-7"));
    let out = server.cli(&["agents"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("kiosk-7"));
    drop(agent);
}

tests::on_both_backends!(
    agent_enrolls_once_then_reconnects_with_its_stored_credential,
    wrong_expired_and_used_up_credentials_are_refused_with_401_before_the_upgrade,
    agent_comes_back_online_by_itself_after_the_server_restarts,
    agent_killed_with_sigkill_is_marked_offline,
    agent_that_stops_heartbeating_while_connected_goes_stale_then_offline,
    malformed_input_closes_only_that_connection_with_its_close_code,
    heartbeat_history_is_kept_and_served,
    an_agent_reports_the_hostname_it_is_given_in_hello_and_heartbeats,
);
