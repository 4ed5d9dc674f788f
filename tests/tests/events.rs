//! The fleet event stream: live changes, resumed after `Last-Event-ID`, and `muster watch`.

// Helpers below are test code: a panic is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use shared::api::{AgentStatus, FleetEvent};
use tests::{TestServer, bin};

/// Reads SSE frames as (id, event) until `stop` says so or the deadline passes.
async fn read_until(resp: reqwest::Response, stop: impl Fn(&FleetEvent) -> bool) -> Vec<(Option<String>, FleetEvent)> {
    let mut body = resp.bytes_stream();
    let (mut buf, mut seen) = (Vec::<u8>::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let chunk = tokio::time::timeout_at(deadline, body.next()).await.expect("events in time").expect("stream open").unwrap();
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2) {
            let raw: Vec<u8> = buf.drain(..end).collect();
            let text = String::from_utf8_lossy(&raw).into_owned();
            let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
            let id = text.lines().find_map(|l| l.strip_prefix("id: ")).map(str::to_owned);
            let event: FleetEvent = serde_json::from_str(data).unwrap();
            let done = stop(&event);
            seen.push((id, event));
            if done {
                return seen;
            }
        }
    }
}

fn is_status(e: &FleetEvent, want: AgentStatus) -> bool {
    matches!(e, FleetEvent::AgentStatus { to, .. } if *to == want)
}

#[tokio::test]
async fn the_fleet_stream_resumes_after_the_last_event_id_and_muster_watch_shows_it() {
    let server = TestServer::spawn().await;
    let mut watch = Command::new(bin("muster"))
        .arg("watch")
        .env("MUSTER_SERVER", &server.url)
        .env("MUSTER_TOKEN", &server.admin_token)
        .env("MUSTER_CA", &server.ca)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let events = || server.api.http().get(server.api.url("/events")).bearer_auth(&server.admin_token);

    let live = events().send().await.unwrap();
    assert_eq!(live.status(), 200);
    let token = server.enroll_token(1, &["site=lab"]).await;
    let mut agent = server.spawn_agent(Some(&token), &[]);
    let first = read_until(live, |e| is_status(e, AgentStatus::Online)).await;
    let (enrolled_id, _) = first.iter().find(|(_, e)| matches!(e, FleetEvent::AgentEnrolled { .. })).expect("enrolled event");
    let enrolled_id = enrolled_id.clone().expect("events carry ids");

    // While nobody listens, the agent dies (once it holds its credential). Resuming after the
    // enrollment replays the rest.
    let id = agent.id().await;
    agent.process().kill();
    server.api.wait_status(&id, AgentStatus::Offline, Duration::from_secs(10)).await;
    let resumed = events().header("last-event-id", &enrolled_id).send().await.unwrap();
    let replay = read_until(resumed, |e| is_status(e, AgentStatus::Offline)).await;
    assert!(!replay.iter().any(|(_, e)| matches!(e, FleetEvent::AgentEnrolled { .. })), "nothing before the id comes again");
    let online_at = replay.iter().position(|(_, e)| is_status(e, AgentStatus::Online)).expect("the missed online event");
    let offline_at = replay.iter().position(|(_, e)| is_status(e, AgentStatus::Offline)).unwrap();
    assert!(online_at < offline_at);

    let foreign = events().header("last-event-id", "1-1").send().await.unwrap();
    let first = read_until(foreign, |_| true).await;
    assert_eq!(first[0].1, FleetEvent::Resync);

    // `muster watch` printed the same story, a line per event.
    let stdout = watch.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.contains("-> offline");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    let lines = tokio::time::timeout(Duration::from_secs(20), lines).await.expect("watch printed the offline change").unwrap();
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(lines.iter().any(|l| l.contains("enrolled") && l.contains("site=lab")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("offline -> online")), "{lines:?}");
}
