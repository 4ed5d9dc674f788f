//! Hostile neighbours: a fleet of 50 real agents and 2,000 simulated ones heartbeats while,
//! at the same time and bounded in time, peers make every attack the hostile-input tests make
//! one at a time. What a user relies on holds throughout: no good agent goes stale or offline,
//! a new agent enrolls, every API probe answers within 5 s, the server's memory stays within
//! its idle size + 256 MiB, the database grows by at most 64 MiB a minute, and the server
//! never restarts. The measured figures are printed (`NEIGHBOURS:` lines) for
//! docs/benchmarks.md.
//!
//! Everything here aims at 127.0.0.0/8 and stops by itself.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use shared::AgentId;
use shared::api::{AgentDetail, AgentStatus, AgentSummary};
use shared::job::{JobSummary, Stream, Target};
use shared::protocol::{AgentMessage, RunOutput, ServerMessage};
use tests::ws::{self, Handshake, Ws};
use tests::{TestServer, db_bytes, job, rss_kib, shell, tls_from};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const SIMULATED: usize = 2000;
const REAL: usize = 50;
const SIM_INTERVAL_MS: u64 = 5000;
const ATTACK_FOR: Duration = Duration::from_secs(40);

/// Dials from a chosen loopback address, so the fleet's handshakes spread like real sites'.
async fn dial_from(server: &TestServer, source: [u8; 4], bearer: &str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::from((source, 0))).unwrap();
    let tcp = sock.connect(std::net::SocketAddr::from(([127, 0, 0, 1], server.port))).await.unwrap();
    let mut req = format!("wss://127.0.0.1:{}{}", server.port, shared::protocol::CONNECT_PATH).into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {bearer}").parse().unwrap());
    req.headers_mut().insert("sec-websocket-protocol", shared::protocol::SUBPROTOCOL.parse().unwrap());
    let tls = tokio_tungstenite::Connector::Rustls(tests::rustls_config(&server.ca));
    let (ws, _) = tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(tls)).await.unwrap();
    ws
}

/// One simulated agent: heartbeats on its own jittered schedule, answers pings (the library
/// does, as long as we read), and counts it if the server ever drops it.
async fn simulated(mut ws: Ws, until: Instant, lost: Arc<AtomicU64>) {
    let interval = Duration::from_millis(SIM_INTERVAL_MS);
    let mut seq = 0u64;
    let mut next = Instant::now() + interval.mul_f64(rand_fraction());
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                if next >= until {
                    let _ = ws.send(Message::Close(None)).await;
                    return;
                }
                seq += 1;
                if ws::send(&mut ws, &ws::heartbeat(seq, "sim")).await.is_err() {
                    lost.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                next += interval.mul_f64(0.9 + 0.2 * rand_fraction());
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    lost.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

fn rand_fraction() -> f64 {
    (getrandom::u64().unwrap_or(1 << 52) >> 11) as f64 / (1u64 << 53) as f64
}

/// Attack: enroll once, then flood `frame` without reading, reconnecting each time the server
/// closes the connection, until `until`.
async fn flooder(server: Arc<TestServer>, frame: Message, until: Instant) -> u64 {
    let token = server.enroll_token(1, &["group=attacker"]).await;
    let Handshake::Open(mut ws) = ws::connect_ca(&server.url, Some(&token), &server.ca).await else { return 0 };
    let credential = ws::open(&mut ws, "flooder", 10_000).await.credential.unwrap();
    let mut sessions = 0;
    while Instant::now() < until {
        sessions += 1;
        for _ in 0..100_000 {
            let sent = tokio::time::timeout(Duration::from_secs(2), ws.send(frame.clone())).await;
            if !matches!(sent, Ok(Ok(()))) || Instant::now() >= until {
                break;
            }
        }
        drop(ws);
        tokio::time::sleep(Duration::from_millis(200)).await;
        match ws::connect(&server.url, Some(&credential), tests::rustls_config(&server.ca)).await {
            Ok(Handshake::Open(mut next)) => {
                ws::send(&mut next, &ws::hello("flooder", 10_000)).await.ok();
                ws = next;
            }
            _ => return sessions,
        }
    }
    sessions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_is_served_while_hostile_neighbours_attack() {
    let mut server = TestServer::spawn_with(&["--ping-interval", "5s"]).await;
    let pid = server.process().pid();
    let rss_start = rss_kib(pid);

    // The fleet: real agents heartbeating every 2 s, simulated ones every 5 s.
    let real = server.spawn_agents_every(REAL, &["group=real"], "2s").await;
    let token = server.enroll_token(SIMULATED as u32, &["group=sim"]).await;
    let gate = Arc::new(Semaphore::new(64));
    let server = Arc::new(server);
    let sims: Vec<([u8; 4], String)> = (0..SIMULATED).map(|i| ([127, 0, 1, 1 + (i % 16) as u8], token.clone())).collect();
    // Each simulated agent starts heartbeating right after its welcome, as a real one does.
    let fleet_until = Instant::now() + Duration::from_secs(120);
    let lost = Arc::new(AtomicU64::new(0));
    let mut handshakes = Vec::new();
    for (source, token) in sims {
        let (gate, server, lost) = (gate.clone(), server.clone(), lost.clone());
        handshakes.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let mut ws = dial_from(&server, source, &token).await;
            let welcome = ws::open(&mut ws, &format!("sim-{}", source[3]), SIM_INTERVAL_MS).await;
            drop(permit);
            (welcome.agent_id, tokio::spawn(simulated(ws, fleet_until, lost)))
        }));
    }
    let mut sim_ids = Vec::new();
    let mut fleet = Vec::new();
    for h in handshakes {
        let (id, task) = h.await.unwrap();
        sim_ids.push(id);
        fleet.push(task);
    }

    // Settle, then measure the idle size the attacks are held against.
    let settle = Instant::now() + Duration::from_secs(5);
    tokio::time::sleep_until(settle).await;
    let rss_idle = rss_kib(pid);
    let db_idle = db_bytes(server.dir.path());
    eprintln!("NEIGHBOURS: rss before agents {} MiB, with {} agents idle {} MiB", rss_start / 1024, REAL + SIMULATED, rss_idle / 1024);

    let attack_started = Instant::now();
    let until = attack_started + ATTACK_FOR;
    let mut attacks = Vec::new();
    // Floods of pings and heartbeats from peers that never read.
    attacks.push(tokio::spawn(flooder(server.clone(), Message::Ping(vec![1u8; 125].into()), until)));
    let hb = serde_json::to_string(&ws::heartbeat(1, "flooder")).unwrap();
    attacks.push(tokio::spawn(flooder(server.clone(), Message::Text(hb.into()), until)));
    // Output far past the limit, at every offset.
    {
        let server = server.clone();
        attacks.push(tokio::spawn(async move {
            let token = server.enroll_token(1, &["group=attacker"]).await;
            let Handshake::Open(mut ws) = ws::connect_ca(&server.url, Some(&token), &server.ca).await else { return 0 };
            let id = ws::open(&mut ws, "liar", 10_000).await.agent_id;
            let mut req = job(Target::Agents(vec![id]), shell("true"));
            req.output_limit = Some(1 << 20);
            let _: JobSummary = server.api.post("/jobs", &req).await;
            let run = ws::read_until(&mut ws, Duration::from_secs(30), |m| match m {
                ServerMessage::Run(r) => Some(r),
                _ => None,
            });
            let Some(run) = run.await else { return 0 };
            let data = "o".repeat(16 * 1024);
            let mut sent = 0;
            for offset in (0..).step_by(1000) {
                if Instant::now() >= until {
                    break;
                }
                let m =
                    AgentMessage::RunOutput(RunOutput { run_id: run.run_id.clone(), stream: Stream::Stdout, offset, data: data.clone() });
                if ws::send(&mut ws, &m).await.is_err() {
                    break;
                }
                sent += 1;
                // Keep within the message budget so the attack lasts; its bytes are the point.
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            sent
        }));
    }
    // Sockets that never speak, from one address, beyond its cap.
    {
        let server = server.clone();
        attacks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            let mut refused = 0u64;
            while Instant::now() < until {
                match tls_from([127, 0, 0, 2], server.port, &server.ca).await {
                    Ok(s) => held.push(s),
                    Err(_) => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                held.truncate(400);
            }
            refused
        }));
    }
    // Slow bodies, HTTP/2 prefaces and a log flood.
    {
        let server = server.clone();
        attacks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut slow = Vec::new();
            while Instant::now() < until && n < 300 {
                n += 1;
                if let Ok(mut s) = tls_from([127, 0, 0, 3], server.port, &server.ca).await {
                    let head = format!(
                        "POST /api/v1/jobs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: 1000000\r\n\r\n{{",
                        server.admin_token
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    slow.push(s);
                }
                if let Ok(mut s) = tls_from([127, 0, 0, 4], server.port, &server.ca).await {
                    let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
                }
                let long = "p".repeat(60 * 1024);
                let bad = tests::Api::new(&server.url, "mst_0000000000000000_00", &server.ca);
                let _ = bad.raw_get(&format!("/agents/{long}")).await;
                let _ = server
                    .api
                    .http()
                    .post(server.api.url("/tokens"))
                    .bearer_auth(&server.admin_token)
                    .json(&serde_json::json!({ "name": "forever", "role": "viewer", "ttl_secs": 315_360_000_000u64 }))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            n
        }));
    }
    // Two machines with one credential, replacing each other.
    {
        let server = server.clone();
        attacks.push(tokio::spawn(async move {
            let token = server.enroll_token(1, &["group=attacker"]).await;
            let Handshake::Open(mut ws) = ws::connect_ca(&server.url, Some(&token), &server.ca).await else { return 0 };
            let credential = ws::open(&mut ws, "clone", 10_000).await.credential.unwrap();
            let mut swaps = 0;
            while Instant::now() < until {
                if let Ok(Handshake::Open(mut other)) = ws::connect(&server.url, Some(&credential), tests::rustls_config(&server.ca)).await
                {
                    let _ = ws::send(&mut other, &ws::hello("clone", 10_000)).await;
                    swaps += 1;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            swaps
        }));
    }

    // Probes: the API answers, and memory and disk are sampled, throughout.
    let worst = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let rss_max = Arc::new(AtomicU64::new(rss_idle));
    let probing = Arc::new(AtomicBool::new(true));
    let probe = {
        let (server, worst, failed, rss_max, probing) = (server.clone(), worst.clone(), failed.clone(), rss_max.clone(), probing.clone());
        tokio::spawn(async move {
            let mut probes = 0u64;
            while probing.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = tokio::time::timeout(Duration::from_secs(5), server.api.raw_get("/fleet")).await.is_ok_and(|r| r.status() == 200);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                worst.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
                rss_max.fetch_max(rss_kib(pid), Ordering::Relaxed);
                probes += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            probes
        })
    };

    let mut results = Vec::new();
    for a in attacks {
        results.push(a.await.unwrap());
    }
    let attack_secs = attack_started.elapsed().as_secs_f64();
    // A newcomer enrolls while the attackers' leftovers drain.
    let token = server.enroll_token(1, &["group=new"]).await;
    let t = Instant::now();
    let Handshake::Open(mut newcomer) = ws::connect_ca(&server.url, Some(&token), &server.ca).await else {
        panic!("a new agent was refused")
    };
    let new_id = ws::open(&mut newcomer, "newcomer", 10_000).await.agent_id;
    let enroll_ms = t.elapsed().as_millis();
    probing.store(false, Ordering::Relaxed);
    let probes = probe.await.unwrap();
    let db_grown = db_bytes(server.dir.path()).saturating_sub(db_idle);

    // Every good agent is online and never left: one `connected` transition each.
    let agents: Vec<AgentSummary> = server.api.get("/agents").await;
    let good: Vec<&AgentSummary> = agents.iter().filter(|a| matches!(a.labels.get("group"), Some("real" | "sim"))).collect();
    assert_eq!(good.len(), REAL + SIMULATED);
    let not_online: Vec<&AgentSummary> = good.iter().copied().filter(|a| a.status != AgentStatus::Online).collect();
    if let Some(first) = not_online.first() {
        let d: AgentDetail = server.api.agent(&first.id).await;
        panic!(
            "{} good agents not online ({} dropped as seen by the agents, {:.0}s after the attacks began); the first: {:?}",
            not_online.len(),
            lost.load(Ordering::Relaxed),
            attack_started.elapsed().as_secs_f64(),
            d.transitions
        );
    }
    let ids: Vec<AgentId> = real.iter().map(|(_, id)| id.clone()).chain(sim_ids.iter().take(200).cloned()).collect();
    for id in &ids {
        let d: AgentDetail = server.api.agent(id).await;
        assert_eq!(d.transitions.len(), 1, "agent {id} changed status during the attacks: {:?}", d.transitions);
    }
    assert_eq!(lost.load(Ordering::Relaxed), 0, "simulated agents were dropped by the server");
    server.api.wait_status(&new_id, AgentStatus::Online, Duration::from_secs(10)).await;

    let worst_ms = worst.load(Ordering::Relaxed);
    let rss_peak = rss_max.load(Ordering::Relaxed);
    eprintln!(
        "NEIGHBOURS: {attack_secs:.0}s of attacks ({results:?}); {probes} API probes, {} failed, slowest {worst_ms} ms; \
         rss idle {} MiB, peak {} MiB; database grew {:.1} MiB; new agent enrolled in {enroll_ms} ms",
        failed.load(Ordering::Relaxed),
        rss_idle / 1024,
        rss_peak / 1024,
        db_grown as f64 / (1 << 20) as f64
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0, "API probes failed or took over 5 s");
    assert!(worst_ms < 5000);
    assert!(rss_peak <= rss_idle + 256 * 1024, "memory grew from {rss_idle} KiB to {rss_peak} KiB");
    let minutes = (attack_secs / 60.0).ceil().max(1.0);
    assert!((db_grown as f64) <= minutes * (64 << 20) as f64, "the database grew {db_grown} bytes in {attack_secs:.0}s");
    let mut server = Arc::try_unwrap(server).ok().expect("only the test holds the server now");
    assert!(server.process().child.try_wait().unwrap().is_none(), "the server exited");
    for f in fleet {
        f.abort();
    }
}
