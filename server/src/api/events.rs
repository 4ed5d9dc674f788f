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

pub async fn stream(
    State(app): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>> {
    caller.require(Role::Viewer)?;
    let (end, guard) = caller.watch(&app);
    let last = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (rx, resume) = app.fleet.subscribe(last.as_deref());
    let first: Vec<Event> = match resume {
        Resume::From(missed) => missed.iter().map(|(seq, e)| sse(&app.fleet, Some(*seq), e)).collect(),
        Resume::Resync => vec![sse(&app.fleet, None, &FleetEvent::Resync)],
    };
    struct St {
        first: std::vec::IntoIter<Event>,
        rx: tokio::sync::broadcast::Receiver<(u64, FleetEvent)>,
        fleet: FleetEvents,
        shutdown: tokio_util::sync::CancellationToken,
        _watch: tokio_util::sync::DropGuard,
    }
    let st = St { first: first.into_iter(), rx, fleet: app.fleet.clone(), shutdown: end, _watch: guard };
    let stream = stream::unfold(st, |mut st| async move {
        if let Some(e) = st.first.next() {
            return Some((Ok(e), st));
        }
        let received = tokio::select! {
            r = st.rx.recv() => r,
            _ = st.shutdown.cancelled() => return None,
        };
        match received {
            Ok((seq, e)) => Some((Ok(sse(&st.fleet, Some(seq), &e)), st)),
            Err(RecvError::Lagged(_)) => Some((Ok(sse(&st.fleet, None, &FleetEvent::Resync)), st)),
            Err(RecvError::Closed) => None,
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
