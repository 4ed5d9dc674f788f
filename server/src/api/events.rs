//! `GET /api/v1/events`: the fleet's changes as server-sent events. A client that reconnects
//! with `Last-Event-ID` first gets what it missed (within the replay window), or `resync`.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use shared::api::{FleetEvent, Role};
use tokio::sync::broadcast::error::RecvError;

use super::caller::Caller;
use super::error::Result;
use crate::app::AppState;
use crate::fleet_events::{FleetEvents, Resume};

fn sse(events: &FleetEvents, seq: Option<u64>, event: &FleetEvent) -> Event {
    let name = serde_json::to_value(event).ok().and_then(|v| v["type"].as_str().map(str::to_owned)).unwrap_or_default();
    let e = Event::default().event(name).data(serde_json::to_string(event).unwrap_or_default());
    match seq {
        Some(seq) => e.id(events.id(seq)),
        None => e,
    }
}

/// What a scoped caller's stream shows: events about agents inside its scope (by their labels
/// as stored, read again at most every [`VISIBLE_FOR`]), and no job events: a scoped caller
/// follows its jobs on `GET /api/v1/jobs/{id}/events`. An unscoped stream shows everything.
struct Visible {
    scope: Option<shared::Selector>,
    agents: std::collections::HashSet<shared::AgentId>,
    read_at: Option<tokio::time::Instant>,
    store: std::sync::Arc<dyn crate::store::Store>,
}

const VISIBLE_FOR: Duration = Duration::from_secs(5);

impl Visible {
    async fn shows(&mut self, event: &FleetEvent) -> bool {
        let Some(scope) = &self.scope else { return true };
        let agent = match event {
            FleetEvent::AgentEnrolled { labels, .. } => return scope.matches(labels),
            FleetEvent::AgentStatus { agent_id, .. }
            | FleetEvent::AgentRevoked { agent_id, .. }
            | FleetEvent::CredentialConflict { agent_id, .. }
            | FleetEvent::CloneSuspected { agent_id, .. }
            | FleetEvent::AgentAccepted { agent_id, .. }
            | FleetEvent::Heartbeat { agent_id, .. } => agent_id,
            FleetEvent::Resync => return true,
            FleetEvent::JobCreated { .. } | FleetEvent::JobProgress { .. } | FleetEvent::JobFinished { .. } => return false,
        };
        if self.read_at.is_none_or(|t| t.elapsed() >= VISIBLE_FOR) {
            // A database that cannot answer keeps the last answer.
            if let Ok(rows) = self.store.list_agents(None).await {
                self.agents = rows.into_iter().filter(|r| r.revoked_at.is_none() && scope.matches(&r.labels)).map(|r| r.id).collect();
                self.read_at = Some(tokio::time::Instant::now());
            }
        }
        self.agents.contains(agent)
    }
}

pub async fn stream(
    State(app): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>> {
    caller.require(Role::Viewer)?;
    let (end, guard) = caller.watch(&app);
    let last = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (rx, resume) = app.fleet.subscribe(last.as_deref());
    let mut visible = Visible { scope: caller.scope.clone(), agents: Default::default(), read_at: None, store: app.store.clone() };
    let first: Vec<Event> = match resume {
        Resume::From(missed) => {
            let mut shown = Vec::new();
            for (seq, e) in missed.iter() {
                if visible.shows(e).await {
                    shown.push(sse(&app.fleet, Some(*seq), e));
                }
            }
            shown
        }
        Resume::Resync => vec![sse(&app.fleet, None, &FleetEvent::Resync)],
    };
    struct St {
        first: std::vec::IntoIter<Event>,
        rx: tokio::sync::broadcast::Receiver<(u64, FleetEvent)>,
        fleet: FleetEvents,
        visible: Visible,
        shutdown: tokio_util::sync::CancellationToken,
        _watch: tokio_util::sync::DropGuard,
    }
    let st = St { first: first.into_iter(), rx, fleet: app.fleet.clone(), visible, shutdown: end, _watch: guard };
    let stream = stream::unfold(st, |mut st| async move {
        if let Some(e) = st.first.next() {
            return Some((Ok(e), st));
        }
        loop {
            let received = tokio::select! {
                r = st.rx.recv() => r,
                _ = st.shutdown.cancelled() => return None,
            };
            match received {
                Ok((seq, e)) if st.visible.shows(&e).await => return Some((Ok(sse(&st.fleet, Some(seq), &e)), st)),
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => return Some((Ok(sse(&st.fleet, None, &FleetEvent::Resync)), st)),
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
