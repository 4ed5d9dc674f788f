//! `muster watch`: the fleet's changes as they happen, one line each. Reconnects by itself,
//! resuming after the last event it printed.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use reqwest::Method;
use shared::api::FleetEvent;

use crate::client::{Client, check};
use crate::sse::take_frames;

fn line(e: &FleetEvent) -> String {
    let text = match e {
        FleetEvent::AgentStatus { agent_id, from, to, reason, at } => {
            format!("{at}  agent {agent_id}  {} -> {to}  ({reason})", from.map_or("-".into(), |f| f.to_string()))
        }
        FleetEvent::AgentEnrolled { agent_id, labels, at } => format!("{at}  agent {agent_id}  enrolled  {labels}"),
        FleetEvent::AgentRevoked { agent_id, at } => format!("{at}  agent {agent_id}  revoked"),
        FleetEvent::CredentialConflict { agent_id, previous_addr, current_addr, at } => {
            format!("{at}  agent {agent_id}  credential in use twice: {current_addr} replaced a live session from {previous_addr}")
        }
        FleetEvent::CloneSuspected { agent_id, from_addr, at } => {
            format!("{at}  agent {agent_id}  a retired credential of this agent was presented from {from_addr}: a clone? (refused)")
        }
        FleetEvent::AgentAccepted { agent_id, by, at } => format!("{at}  agent {agent_id}  accepted by {by}"),
        FleetEvent::Heartbeat { agent_id, at, cpu_percent, mem_used_bytes, mem_total_bytes, .. } => {
            format!(
                "{at}  agent {agent_id}  cpu {}  mem {}",
                crate::output::pct(*cpu_percent),
                crate::output::percent(*mem_used_bytes, *mem_total_bytes)
            )
        }
        FleetEvent::JobCreated { job_id, command, target, total, created_by, at, .. } => {
            format!("{at}  job {job_id}  created by {created_by}: {command} on {} ({target})", crate::output::agents(*total))
        }
        FleetEvent::JobProgress { job_id, counts, status, .. } | FleetEvent::JobFinished { job_id, counts, status, .. } => {
            let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
            format!("job {job_id}  {}: {}", status.as_str().replace('_', " "), counts.join(", "))
        }
        FleetEvent::Resync => "(some events were missed; `muster agents` and `muster jobs` show the current state)".into(),
    };
    // Reasons and addresses come from agents and peers: one event, one line, no escapes.
    crate::output::safe(&text)
}

pub async fn watch(client: &Client, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut last_id: Option<String> = None;
    let mut failures = 0u32;
    // The agent's reconnect schedule (shared::backoff): capped exponential with full jitter, so
    // operators' streams cut by a server restart do not all come back at once.
    let mut backoff = shared::backoff::Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
    loop {
        let mut req = client.request(Method::GET, "/events");
        if let Some(id) = &last_id {
            req = req.header("last-event-id", id);
        }
        let resp = match client.execute(req).await {
            Ok(r) => check(r).await?,
            Err(e) => {
                failures += 1;
                if failures > 30 {
                    return Err(e.context("the event stream is gone"));
                }
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        failures = 0;
        backoff.reset();
        let mut body = resp.bytes_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            buf.extend_from_slice(&chunk);
            for frame in take_frames(&mut buf) {
                if frame.id.is_some() {
                    last_id = frame.id;
                }
                if json {
                    writeln!(out, "{}", frame.data)?;
                } else {
                    let event: FleetEvent = serde_json::from_str(&frame.data).context("an event this CLI does not understand")?;
                    writeln!(out, "{}", line(&event))?;
                }
                out.flush()?;
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// The first reconnect waits up to this (jittered), doubling to [`RECONNECT_MAX`].
pub const RECONNECT_INITIAL: Duration = Duration::from_millis(500);
pub const RECONNECT_MAX: Duration = Duration::from_secs(10);
