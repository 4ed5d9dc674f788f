//! Peers that lie, flood, stall or never read: each one is closed or refused with the
//! documented answer, bounded in what it costs the server, and everyone else goes on.
//! Every attack here is bounded in count and time and aims only at 127.0.0.0/8.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use shared::api::{AgentStatus, FleetEvent, HeartbeatSample};
use shared::job::{JobSummary, RunState, Stream, Target};
use shared::protocol::{AgentMessage, RunFinished, RunOutput, ServerMessage, close};
use tests::ws::{self, Handshake, Ws};
use tests::{Api, TestServer, db_bytes, job, rss_kib, shell, tls_from, wait_closed, wait_for};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

/// A raw protocol client enrolled with a fresh token: the socket, its id and credential.
async fn raw_agent(server: &TestServer, labels: &[&str], hostname: &str) -> (Ws, shared::AgentId, String) {
    raw_agent_every(server, labels, hostname, 10_000).await
}

/// The same, announcing a heartbeat interval.
async fn raw_agent_every(server: &TestServer, labels: &[&str], hostname: &str, interval_ms: u64) -> (Ws, shared::AgentId, String) {
    let token = server.enroll_token(1, labels).await;
    let Handshake::Open(mut ws) = ws::connect_ca(&server.url, Some(&token), &server.ca).await else { panic!("refused") };
    let welcome = ws::open(&mut ws, hostname, interval_ms).await;
    (*ws, welcome.agent_id, welcome.credential.expect("credential"))
}

/// Reads until a `run` message arrives (answering nothing else).
async fn next_run(ws: &mut Ws) -> shared::protocol::Run {
    let run = ws::read_until(ws, Duration::from_secs(20), |m| match m {
        ServerMessage::Run(r) => Some(r),
        _ => None,
    });
    run.await.expect("a run in time")
}

#[tokio::test]
async fn a_peer_that_sends_pings_and_never_reads_is_closed_with_its_buffer_bounded() {
    // A budget this high leaves only the write-buffer cap to stop the flood.
    let server = TestServer::spawn_with(&["--agent-messages-per-second", "10000000", "--agent-message-burst", "10000000"]).await;
    let mut server = server;
    let pid = server.process().pid();
    let before = rss_kib(pid);
    let (mut ws, _, _) = raw_agent(&server, &[], "flooder").await;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    // Bounded: at most 2 million pings or 30 s; the server must cut us off long before.
    let closed = loop {
        if sent >= 2_000_000 || started.elapsed() > Duration::from_secs(30) {
            break false;
        }
        match tokio::time::timeout(Duration::from_secs(5), ws.send(Message::Ping(vec![7u8; 125].into()))).await {
            Ok(Ok(())) => sent += 1,
            _ => break true,
        }
    };
    assert!(closed, "the server never closed a peer that does not read ({sent} pings sent)");
    let after = rss_kib(pid);
    eprintln!(
        "FIGURE: ping flood, never reading: cut off after {sent} pings in {:.1}s; server rss {} -> {} MiB",
        started.elapsed().as_secs_f64(),
        before / 1024,
        after / 1024
    );
    assert!(after < before + 64 * 1024, "server grew from {before} KiB to {after} KiB for one non-reading peer");
    // Everyone else is still served, and the flooder's session is over.
    assert!(server.api.healthz().await);
    wait_for("the server to end the flooder's session", Duration::from_secs(20), || async {
        server.log().contains("agent disconnected").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_flood_of_heartbeats_is_cut_off_and_costs_a_quiet_agent_no_sample() {
    let server = TestServer::spawn().await;
    let (noisy, noisy_id, _) = raw_agent(&server, &[], "noisy").await;
    // The quiet one keeps to the interval it announced.
    let (mut quiet, quiet_id, _) = raw_agent_every(&server, &[], "quiet", 250).await;
    let text = serde_json::to_string(&ws::heartbeat(1, "noisy")).unwrap();
    let (mut tx, mut rx) = noisy.split();
    // The flooder reads too, as any WebSocket client does, so it sees the Close frame.
    let reader = tokio::spawn(async move {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(until, rx.next()).await {
                Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    });
    let flood = tokio::spawn(async move {
        // Bounded: 200,000 heartbeats or until the server closes the connection.
        for _ in 0..200_000 {
            if tx.send(Message::Text(text.clone().into())).await.is_err() {
                break;
            }
        }
        reader.await.unwrap()
    });
    for seq in 1..=5 {
        ws::send(&mut quiet, &ws::heartbeat(seq, "quiet")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let code = flood.await.unwrap();
    assert_eq!(code, Some(close::RATE_LIMITED), "the flooder is closed with the documented code");
    let api = server.api.clone();
    let samples: Vec<HeartbeatSample> = wait_for("the quiet agent's five samples", Duration::from_secs(10), || {
        let api = api.clone();
        let id = quiet_id.clone();
        async move {
            let s: Vec<HeartbeatSample> = api.get(&format!("/agents/{id}/heartbeats")).await;
            (s.len() == 5).then_some(s)
        }
    })
    .await;
    assert_eq!(samples.len(), 5);
    let noisy_samples: Vec<HeartbeatSample> = server.api.get(&format!("/agents/{noisy_id}/heartbeats")).await;
    eprintln!("FIGURE: heartbeat flood: closed with {code:?}; {} of its samples stored; the quiet agent's 5 of 5", noisy_samples.len());
    assert!(noisy_samples.len() <= 3, "a flood of heartbeats stores about one per half interval, not {}", noisy_samples.len());
    let metrics = server.api.http().get(format!("{}/metrics", server.url)).bearer_auth(&server.admin_token).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(metrics.contains("muster_agent_messages_over_budget_total"), "{metrics}");
}

#[tokio::test]
async fn output_past_the_limit_is_never_stored_and_job_reads_stay_small() {
    let server = TestServer::spawn().await;
    let (mut agent, id, _) = raw_agent(&server, &[], "liar").await;
    let mut req = job(Target::Agents(vec![id.clone()]), shell("true"));
    req.output_limit = Some(64 * 1024);
    let created: JobSummary = server.api.post("/jobs", &req).await;
    let run = next_run(&mut agent).await;
    let db_before = db_bytes(server.dir.path());
    // The attack: 16 KiB chunks at offsets 0, 1, 2, ... (each overlapping the last), then
    // 0, 1000, 2000, ... far past the limit, then one whose overlap differs.
    let data = "y".repeat(16 * 1024);
    for offset in (0..1000u64).chain((1..2000u64).map(|i| i * 1000)) {
        let msg = AgentMessage::RunOutput(RunOutput { run_id: run.run_id.clone(), stream: Stream::Stdout, offset, data: data.clone() });
        ws::send(&mut agent, &msg).await.unwrap();
    }
    let differing =
        AgentMessage::RunOutput(RunOutput { run_id: run.run_id.clone(), stream: Stream::Stdout, offset: 10, data: "z".repeat(100) });
    ws::send(&mut agent, &differing).await.unwrap();
    let finished = AgentMessage::RunFinished(RunFinished {
        run_id: run.run_id.clone(),
        outcome: shared::protocol::Outcome::Succeeded,
        exit_code: Some(0),
        signal: None,
        error: None,
        stdout_len: 3000 * 16 * 1024,
        stderr_len: 0,
        stdout_truncated: false,
        stderr_truncated: false,
    });
    ws::send(&mut agent, &finished).await.unwrap();
    let detail = server.api.wait_job_finished(&created.id, Duration::from_secs(30)).await;
    let r = &detail.runs[0];
    assert_eq!(r.state, RunState::Succeeded);
    assert_eq!(r.stdout_len, 64 * 1024, "never past output_limit");
    assert!(r.stdout_truncated);
    assert!(r.stdout.chars().all(|c| c == 'y'), "the differing overlap was refused");
    let page: shared::job::OutputPage = server.api.get(&format!("/runs/{}/output?stream=stdout&offset=60000&limit=100000", r.id)).await;
    assert_eq!((page.offset, page.next_offset, page.len, page.complete), (60000, 64 * 1024, 64 * 1024, true));
    let grown = db_bytes(server.dir.path()).saturating_sub(db_before);
    let detail_bytes = server.api.raw_get(&format!("/jobs/{}", created.id)).await.bytes().await.unwrap().len();
    eprintln!(
        "FIGURE: output attack: 3,000 chunks of 16 KiB; stored {} bytes, database +{grown} bytes, job detail {detail_bytes} bytes",
        r.stdout_len
    );
    assert!(grown < 8 << 20, "3,000 chunks of 16 KiB grew the database by {grown} bytes");
}

#[tokio::test]
async fn far_future_ttls_are_refused_and_token_listing_keeps_working() {
    let server = TestServer::spawn().await;
    let resp = server
        .api
        .http()
        .post(server.api.url("/tokens"))
        .bearer_auth(&server.admin_token)
        .json(&serde_json::json!({ "name": "forever", "role": "viewer", "ttl_secs": 315_360_000_000u64 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let out = server.cli(&["token", "create", "--name", "x", "--role", "viewer", "--ttl", "10000y"]);
    assert!(!out.status.success());
    let out = server.cli(&["token", "list"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resp = server
        .api
        .http()
        .post(server.api.url("/enroll-tokens"))
        .bearer_auth(&server.admin_token)
        .json(&serde_json::json!({ "ttl_secs": 400 * 86_400u64, "uses": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "enrollment tokens are capped at 30 days by default");
}

#[tokio::test]
async fn silent_connections_are_closed_and_one_address_cannot_crowd_out_the_rest() {
    let server = TestServer::spawn_with(&["--max-unauthenticated-per-address", "20", "--header-timeout", "1s"]).await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(tls_from([127, 0, 0, 2], server.port, &server.ca).await.expect("admitted"));
    }
    // The 21st from the same address is closed at once, before TLS.
    let refused = tls_from([127, 0, 0, 2], server.port, &server.ca).await;
    assert!(refused.is_err(), "a connection over the per-address cap must be refused");
    // Others still get in: the API answers and a new agent enrolls, from other addresses.
    assert!(server.api.healthz().await);
    let token = server.enroll_token(1, &[]).await;
    let Handshake::Open(mut ws) = ws::connect_ca(&server.url, Some(&token), &server.ca).await else { panic!("refused") };
    ws::open(&mut ws, "newcomer", 10_000).await;
    // The silent ones are closed by the header timeout, and the address has room again.
    for s in &mut silent {
        wait_closed(s, Duration::from_secs(5)).await;
    }
    wait_for("the address to have room again", Duration::from_secs(5), || async {
        tls_from([127, 0, 0, 2], server.port, &server.ca).await.ok().map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn http2_is_not_served_and_a_preface_is_answered_at_once() {
    let server = TestServer::spawn().await;
    let mut tls = tls_from([127, 0, 0, 1], server.port, &server.ca).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None, "no ALPN offered by this client");
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let answer = wait_closed(&mut tls, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || text.starts_with("HTTP/1.1"), "an HTTP/2 preface got {text:?}");
}

#[tokio::test]
async fn a_slow_body_gets_408_and_an_oversized_one_413() {
    let server = TestServer::spawn_with(&["--body-timeout", "1s"]).await;
    let token = &server.admin_token;
    let mut tls = tls_from([127, 0, 0, 1], server.port, &server.ca).await.unwrap();
    let head = format!(
        "POST /api/v1/jobs HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: 1000000000\r\n\r\n{{"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let answer = String::from_utf8_lossy(&wait_closed(&mut tls, Duration::from_secs(5)).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let mut tls = tls_from([127, 0, 0, 1], server.port, &server.ca).await.unwrap();
    let head = format!(
        "POST /api/v1/jobs HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let answer = String::from_utf8_lossy(&wait_closed(&mut tls, Duration::from_secs(5)).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[tokio::test]
async fn a_revoked_agent_gets_no_welcome_and_its_open_runs_end_with_a_reason() {
    let server = TestServer::spawn().await;
    let (mut agent, id, credential) = raw_agent(&server, &[], "doomed").await;
    let created: JobSummary = server.api.post("/jobs", &job(Target::Agents(vec![id.clone()]), shell("sleep 60"))).await;
    let run = next_run(&mut agent).await;
    ws::send(&mut agent, &AgentMessage::RunStarted(shared::protocol::RunStarted { run_id: run.run_id.clone() })).await.unwrap();
    // A second connection with the same credential is verified and upgraded, then the agent
    // is revoked before its hello: it must be closed, not welcomed.
    let Handshake::Open(mut late) = ws::connect_ca(&server.url, Some(&credential), &server.ca).await else { panic!("refused") };
    let resp = server.api.http().delete(server.api.url(&format!("/agents/{id}"))).bearer_auth(&server.admin_token).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    ws::send(&mut late, &ws::hello("doomed", 10_000)).await.unwrap();
    let mut welcomed = false;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), late.next()).await.expect("an answer to hello") {
            Some(Ok(Message::Text(t))) => welcomed |= matches!(ServerMessage::decode(t.as_str()), Ok(ServerMessage::Welcome(_))),
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            _ => break None,
        }
    };
    assert!(!welcomed, "a revoked agent got a welcome");
    assert_eq!(code, Some(close::REVOKED));
    let detail = server.api.wait_job_finished(&created.id, Duration::from_secs(10)).await;
    assert_eq!(detail.runs[0].state, RunState::Cancelled);
    assert!(detail.runs[0].error.as_deref().unwrap_or("").contains("revoked"), "{:?}", detail.runs[0].error);
    server.api.wait_status(&id, AgentStatus::Offline, Duration::from_secs(10)).await;
}

/// Reads an SSE response until it ends; panics past the deadline.
async fn stream_ends(resp: reqwest::Response, deadline: Duration) {
    let mut body = resp.bytes_stream();
    let until = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(until, body.next()).await {
            Err(_) => panic!("the event stream was still open after {deadline:?}"),
            Ok(None | Some(Err(_))) => return,
            Ok(Some(Ok(_))) => {}
        }
    }
}

#[tokio::test]
async fn revoked_and_expired_operator_tokens_lose_their_event_streams() {
    let server = TestServer::spawn().await;
    let (_agent, _, _) = raw_agent(&server, &[], "target").await;
    let created: shared::api::TokenCreated = server.api.post("/tokens", &serde_json::json!({ "name": "watcher", "role": "viewer" })).await;
    let watcher = server.api.with_token(&created.token);
    let fleet = watcher.raw_get("/events").await;
    assert_eq!(fleet.status(), 200);
    let resp = server
        .api
        .http()
        .delete(server.api.url(&format!("/tokens/{}", created.info.id)))
        .bearer_auth(&server.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    stream_ends(fleet, Duration::from_secs(3)).await;

    let short: shared::api::TokenCreated =
        server.api.post("/tokens", &serde_json::json!({ "name": "short", "role": "viewer", "ttl_secs": 2 })).await;
    let job_created: JobSummary = server.api.post("/jobs", &job(Target::All, shell("true"))).await;
    let stream = server.api.with_token(&short.token).raw_get(&format!("/jobs/{}/events", job_created.id)).await;
    assert_eq!(stream.status(), 200);
    stream_ends(stream, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_agent_cannot_choose_the_labels_that_targeting_trusts() {
    let server = TestServer::spawn().await;
    let token = server.enroll_token(1, &["role=pos"]).await;
    let Handshake::Open(mut ws) = ws::connect_ca(&server.url, Some(&token), &server.ca).await else { panic!("refused") };
    let mut hello = ws::hello("pos-1", 10_000);
    if let AgentMessage::Hello(h) = &mut hello {
        h.labels = shared::Labels::from_pairs(["role=db", "rack=r1"]).unwrap();
    }
    ws::send(&mut ws, &hello).await.unwrap();
    let welcome = ws::read_until(&mut ws, Duration::from_secs(10), |m| match m {
        ServerMessage::Welcome(w) => Some(w),
        _ => None,
    })
    .await
    .expect("a welcome");
    assert_eq!(welcome.labels.to_string(), "agent.rack=r1,agent.role=db,role=pos");
    let dry = |sel: &str| {
        let mut req = job(Target::Selector(shared::Selector::parse(sel).unwrap()), shell("true"));
        req.dry_run = true;
        req
    };
    let db: shared::job::DryRun = server.api.post("/jobs", &dry("role=db")).await;
    assert_eq!(db.matched, 0, "an agent's own claim of role=db is not what role=db targets");
    let reported: shared::job::DryRun = server.api.post("/jobs", &dry("agent.role=db")).await;
    assert_eq!(reported.matched, 1);
    // Tokens may not hand out the reported namespace either.
    let resp = server
        .api
        .http()
        .post(server.api.url("/enroll-tokens"))
        .bearer_auth(&server.admin_token)
        .json(&serde_json::json!({ "ttl_secs": 600, "uses": 1, "labels": { "agent.role": "db" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // A heartbeat whose hostname would forge a log line closes the session; the name stays.
    server.api.wait_status(&welcome.agent_id, AgentStatus::Online, Duration::from_secs(10)).await;
    let mut hb = ws::heartbeat(1, "pos-1\nlevel=ERROR forged");
    ws::send(&mut ws, &hb).await.unwrap();
    assert_eq!(ws::close_code(&mut ws, Duration::from_secs(5)).await, Some(close::INVALID_PAYLOAD));
    let detail = server.api.agent(&welcome.agent_id).await;
    assert_eq!(detail.summary.hostname, "pos-1");
    if let AgentMessage::Heartbeat(h) = &mut hb {
        h.metrics.hostname = "x".repeat(100_000);
    }
    assert!(serde_json::to_string(&hb).unwrap().len() < shared::protocol::MAX_MESSAGE_BYTES);
}

#[tokio::test]
async fn a_refused_or_abandoned_handshake_spends_no_enrollment_use() {
    let server = TestServer::spawn().await;
    let token = server.enroll_token(1, &[]).await;
    // No subprotocol: refused before anything is spent.
    let url = format!("{}{}", server.url.replacen("https://", "wss://", 1), shared::protocol::CONNECT_PATH);
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let refused = tokio_tungstenite::connect_async_tls_with_config(
        req,
        None,
        false,
        Some(tokio_tungstenite::Connector::Rustls(tests::rustls_config(&server.ca))),
    )
    .await;
    assert!(refused.is_err());
    // Upgraded, then gone before hello: nothing spent either.
    let Handshake::Open(mut ws) = ws::connect_ca(&server.url, Some(&token), &server.ca).await else { panic!("refused") };
    let _ = ws.send(Message::Close(None)).await;
    drop(ws);
    let tokens: Vec<shared::api::EnrollTokenInfo> = server.api.get("/enroll-tokens").await;
    assert_eq!(tokens[0].uses_left, 1, "no use was spent");
    assert!(server.api.agents().await.is_empty(), "no orphan agent was created");
    // The one use still enrolls a real agent, with its hostname.
    let Handshake::Open(mut ws) = ws::connect_ca(&server.url, Some(&token), &server.ca).await else { panic!("refused") };
    let welcome = ws::open(&mut ws, "pos-9", 10_000).await;
    let detail = server.api.wait_status(&welcome.agent_id, AgentStatus::Online, Duration::from_secs(10)).await;
    assert_eq!(detail.summary.hostname, "pos-9");
}

#[tokio::test]
async fn two_machines_with_one_credential_raise_a_conflict_instead_of_a_silent_loop() {
    let server = TestServer::spawn().await;
    let mut events = server.api.raw_get("/events").await.bytes_stream();
    let (mut first, id, credential) = raw_agent(&server, &[], "original").await;
    ws::send(&mut first, &ws::heartbeat(1, "original")).await.unwrap();
    let api = server.api.clone();
    wait_for("the first session's heartbeat to be stored", Duration::from_secs(10), || {
        let (api, id) = (api.clone(), id.clone());
        async move {
            let s: Vec<HeartbeatSample> = api.get(&format!("/agents/{id}/heartbeats")).await;
            (!s.is_empty()).then_some(())
        }
    })
    .await;
    let Handshake::Open(mut clone) = ws::connect_ca(&server.url, Some(&credential), &server.ca).await else { panic!("refused") };
    ws::open(&mut clone, "clone", 10_000).await;
    assert_eq!(ws::close_code(&mut first, Duration::from_secs(5)).await, Some(close::REPLACED));
    // The original comes back and replaces the clone's live session: they take turns.
    ws::send(&mut clone, &ws::heartbeat(1, "clone")).await.unwrap();
    let api = server.api.clone();
    wait_for("both sessions' heartbeats to be stored", Duration::from_secs(10), || {
        let (api, id) = (api.clone(), id.clone());
        async move {
            let s: Vec<HeartbeatSample> = api.get(&format!("/agents/{id}/heartbeats")).await;
            (s.len() >= 2).then_some(())
        }
    })
    .await;
    let Handshake::Open(mut again) = ws::connect_ca(&server.url, Some(&credential), &server.ca).await else { panic!("refused") };
    ws::open(&mut again, "original", 10_000).await;
    assert_eq!(ws::close_code(&mut clone, Duration::from_secs(5)).await, Some(close::REPLACED));
    // Read the fleet stream (bounded by a deadline) until the conflict shows.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = Vec::new();
    let found = loop {
        let chunk = tokio::time::timeout_at(until, events.next()).await.expect("a credential_conflict event in time");
        buf.extend_from_slice(&chunk.expect("stream open").unwrap());
        let text = String::from_utf8_lossy(&buf).into_owned();
        let hit = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<FleetEvent>(d).ok())
            .find(|e| matches!(e, FleetEvent::CredentialConflict { .. }));
        if let Some(e) = hit {
            break e;
        }
    };
    let FleetEvent::CredentialConflict { agent_id, previous_addr, current_addr, .. } = found else { unreachable!() };
    assert_eq!(agent_id, id);
    assert_ne!(previous_addr, current_addr);
}

#[tokio::test]
async fn the_server_answers_a_close_and_accepts_a_ping_between_fragments() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
    let server = TestServer::spawn().await;
    let (mut ws, id, _) = raw_agent(&server, &[], "fragments").await;
    let text = serde_json::to_string(&ws::heartbeat(1, "fragments")).unwrap();
    let (a, b) = text.as_bytes().split_at(text.len() / 2);
    let frame = |opcode, is_final, payload: &[u8]| {
        Frame::from_payload(FrameHeader { is_final, opcode, ..FrameHeader::default() }, payload.to_vec().into())
    };
    ws.send(Message::Frame(frame(OpCode::Data(Data::Text), false, a))).await.unwrap();
    ws.send(Message::Ping(b"between".to_vec().into())).await.unwrap();
    ws.send(Message::Frame(frame(OpCode::Data(Data::Continue), true, b))).await.unwrap();
    let api = server.api.clone();
    wait_for("the fragmented heartbeat to be stored", Duration::from_secs(10), || {
        let api = api.clone();
        let id = id.clone();
        async move {
            let s: Vec<HeartbeatSample> = api.get(&format!("/agents/{id}/heartbeats")).await;
            (!s.is_empty()).then_some(())
        }
    })
    .await;
    ws.send(Message::Close(None)).await.unwrap();
    let echoed = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("an answer to Close") {
            Some(Ok(Message::Close(_))) => break true,
            Some(Ok(_)) => {}
            _ => break false,
        }
    };
    assert!(echoed, "the server must answer a Close frame");
}

#[tokio::test]
async fn refused_requests_cannot_flood_the_log() {
    let server = TestServer::spawn().await;
    let before = server.log().len();
    let long = "a".repeat(60 * 1024);
    let api = Api::new(&server.url, "mst_nope_nope", &server.ca);
    for _ in 0..100 {
        let _ = api.raw_get(&format!("/agents/{long}")).await;
    }
    let log = server.log();
    let added = &log[before..];
    eprintln!("FIGURE: 100 refused requests with 60 KiB paths: {} bytes of log", added.len());
    assert!(added.len() < 64 * 1024, "100 refused requests with 60 KiB paths wrote {} bytes of log", added.len());
    assert!(added.lines().all(|l| l.len() < 2000), "no log line carries a whole path");
}

#[tokio::test]
async fn a_lost_connection_is_recorded_in_words() {
    let server = TestServer::spawn().await;
    let (ws, id, _) = raw_agent(&server, &[], "cut").await;
    server.api.wait_status(&id, AgentStatus::Online, Duration::from_secs(10)).await;
    // Dropped without a Close frame or a TLS close_notify.
    drop(ws);
    let detail = server.api.wait_status(&id, AgentStatus::Offline, Duration::from_secs(10)).await;
    let reason = &detail.transitions.first().expect("a transition").reason;
    assert!(!reason.contains("http"), "a status reason quotes a library: {reason}");
    assert!(reason.starts_with("connection"), "{reason}");
}

#[tokio::test]
async fn a_tcp_peer_that_never_starts_tls_is_dropped_after_the_handshake_timeout() {
    let server = TestServer::spawn_with(&["--handshake-timeout", "1s"]).await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    let got = wait_closed(&mut tcp, Duration::from_secs(5)).await;
    assert!(got.is_empty());
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout() {
    let server = TestServer::spawn_with(&["--keep-alive-timeout", "1s"]).await;
    let mut tls = tls_from([127, 0, 0, 1], server.port, &server.ca).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n").await.unwrap();
    // The answer comes, then nothing: the server closes the idle connection by itself.
    let got = String::from_utf8_lossy(&wait_closed(&mut tls, Duration::from_secs(5)).await).into_owned();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

#[tokio::test]
async fn unauthenticated_connections_in_total_are_capped_and_authenticated_ones_go_on() {
    let server = TestServer::spawn_with(&["--max-unauthenticated", "10", "--header-timeout", "2s"]).await;
    let (mut agent, id, _) = raw_agent_every(&server, &[], "steady", 250).await;
    assert!(server.api.healthz().await);
    let mut silent = Vec::new();
    for i in 0..10u8 {
        silent.push(tls_from([127, 0, 0, 30 + i], server.port, &server.ca).await.expect("admitted"));
    }
    assert!(tls_from([127, 0, 0, 60], server.port, &server.ca).await.is_err(), "the 11th unauthenticated connection is refused");
    // The agent that already authenticated keeps heartbeating and stays online.
    for seq in 1..=4 {
        ws::send(&mut agent, &ws::heartbeat(seq, "steady")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(server.api.agent(&id).await.summary.status, AgentStatus::Online);
    for s in &mut silent {
        wait_closed(s, Duration::from_secs(5)).await;
    }
    wait_for("room for a new connection", Duration::from_secs(5), || async {
        tls_from([127, 0, 0, 60], server.port, &server.ca).await.ok().map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn an_agent_over_its_byte_budget_is_slowed_to_it_and_loses_nothing() {
    let server = TestServer::spawn_with(&["--agent-bytes-per-second", "100000", "--agent-byte-burst", "200000"]).await;
    let (ws, _, _) = raw_agent(&server, &[], "bulky").await;
    let (mut tx, mut rx) = ws.split();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = rx.next().await {
            if let Message::Close(f) = m {
                return f.map(|f| u16::from(f.code));
            }
        }
        None
    });
    let chunk = AgentMessage::RunOutput(RunOutput {
        run_id: "0000000000000001".parse().unwrap(),
        stream: Stream::Stdout,
        offset: 0,
        data: "b".repeat(16 * 1024),
    });
    let text = serde_json::to_string(&chunk).unwrap();
    // Bounded: send as fast as the server takes it for 3 s.
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        if tokio::time::timeout(Duration::from_millis(200), tx.send(Message::Text(text.clone().into()))).await.is_ok_and(|r| r.is_err()) {
            break;
        }
    }
    let scrape = server.api.http().get(format!("{}/metrics", server.url)).bearer_auth(&server.admin_token).send().await.unwrap();
    let metrics = scrape.text().await.unwrap();
    let read: f64 = metrics
        .lines()
        .find(|l| l.starts_with("muster_ws_messages_received_total") && l.contains("run_output"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    let allowed = (200_000.0 + 100_000.0 * started.elapsed().as_secs_f64()) / text.len() as f64 + 3.0;
    eprintln!(
        "FIGURE: byte budget 100 kB/s: {read} chunks of 16 KiB read in {:.1}s (at most {allowed:.0} allowed)",
        started.elapsed().as_secs_f64()
    );
    assert!(read > 0.0 && read <= allowed, "the server read {read} chunks; the budget allows {allowed:.0}");
    assert!(!reader.is_finished(), "an agent over its byte budget is slowed, not closed");
}

#[tokio::test]
async fn a_connection_that_never_presents_a_credential_is_closed_in_time() {
    let server = TestServer::spawn_with(&["--header-timeout", "1s", "--body-timeout", "1s"]).await;
    let mut tls = tls_from([127, 0, 0, 1], server.port, &server.ca).await.unwrap();
    // Requests that need no token keep the connection busy, but not past its allowance.
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n").await.unwrap();
    let got = String::from_utf8_lossy(&wait_closed(&mut tls, Duration::from_secs(6)).await).into_owned();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

#[tokio::test]
async fn past_its_session_starts_the_server_answers_busy_at_once_and_the_agent_comes_back_when_told() {
    let server = TestServer::spawn_with(&["--max-session-starts", "1"]).await;
    let token = server.enroll_token(3, &[]).await;
    // A peer that upgrades and never says hello holds the one session start.
    let Handshake::Open(holder) = ws::connect_ca(&server.url, Some(&token), &server.ca).await else { panic!("refused") };
    // The next attempt is refused at once with Muster's own 503, not left to time out.
    let started = std::time::Instant::now();
    match ws::connect_ca(&server.url, Some(&token), &server.ca).await {
        Handshake::Refused { status, body } => {
            assert_eq!(status, 503, "{body}");
            assert!(body.contains("\"busy\""), "{body}");
        }
        Handshake::Open(_) => panic!("a second session start was let in"),
    }
    eprintln!("refused in {:?}", started.elapsed());
    // The real agent is told the same, says so, and waits as asked rather than backing off.
    let mut agent = server.spawn_agent(Some(&token), &[]);
    let log = agent.process().log.clone();
    wait_for("the agent to be told the server is busy", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { text.contains("server busy; trying again when it asked").then_some(()) }
    })
    .await;
    // Once the holder goes, the agent gets in.
    drop(holder);
    let id = agent.id().await;
    server.api.wait_status(&id, AgentStatus::Online, Duration::from_secs(20)).await;
    let metrics = server.api.http().get(format!("{}/metrics", server.url)).bearer_auth(&server.admin_token).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert!(text.lines().any(|l| l.starts_with("muster_connections_refused_total{cap=\"max_session_starts\"}")), "{text}");
    agent.process().kill();
}
