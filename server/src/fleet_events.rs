//! The fleet event stream behind `GET /api/v1/events`: every event gets an id
//! `<epoch>-<seq>` (the epoch is this process's start, in ms) and stays in a bounded window
//! (the last [`WINDOW`] events), so a client that reconnects with `Last-Event-ID` gets what it
//! missed. An id from another epoch, or older than the window, gets `resync` instead.
//!
//! Like `events`, this is the seam for several servers: a shared bus would carry these too.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use shared::Timestamp;
use shared::api::FleetEvent;
use tokio::sync::broadcast;

/// Events kept for replay.
pub const WINDOW: usize = 10_000;

#[derive(Clone)]
pub struct FleetEvents {
    inner: Arc<Inner>,
}

struct Inner {
    epoch: i64,
    log: Mutex<(u64, VecDeque<(u64, FleetEvent)>)>,
    tx: broadcast::Sender<(u64, FleetEvent)>,
}

impl Default for FleetEvents {
    fn default() -> Self {
        FleetEvents {
            inner: Arc::new(Inner {
                epoch: Timestamp::now().unix_millis(),
                log: Mutex::new((0, VecDeque::with_capacity(WINDOW))),
                tx: broadcast::channel(4096).0,
            }),
        }
    }
}

/// Where a reconnecting client resumes.
pub enum Resume {
    /// Replay these, then follow live.
    From(Vec<(u64, FleetEvent)>),
    /// The id is not in the window: start over.
    Resync,
}

impl FleetEvents {
    pub fn id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.inner.epoch)
    }

    pub fn publish(&self, event: FleetEvent) {
        let mut log = self.inner.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        log.0 += 1;
        let seq = log.0;
        if log.1.len() == WINDOW {
            log.1.pop_front();
        }
        log.1.push_back((seq, event.clone()));
        // Sent under the lock, so subscribers see events in id order.
        let _ = self.inner.tx.send((seq, event));
    }

    /// Subscribes, and works out what to replay for `last_event_id` (None: nothing).
    pub fn subscribe(&self, last_event_id: Option<&str>) -> (broadcast::Receiver<(u64, FleetEvent)>, Resume) {
        let log = self.inner.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let rx = self.inner.tx.subscribe();
        let Some(last) = last_event_id else { return (rx, Resume::From(Vec::new())) };
        let parsed = last.split_once('-').and_then(|(e, s)| Some((e.parse::<i64>().ok()?, s.parse::<u64>().ok()?)));
        let resume = match parsed {
            Some((epoch, seq)) if epoch == self.inner.epoch && log.1.front().is_none_or(|(first, _)| seq + 1 >= *first) => {
                Resume::From(log.1.iter().filter(|(s, _)| *s > seq).cloned().collect())
            }
            _ => Resume::Resync,
        };
        (rx, resume)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revoked(n: u8) -> FleetEvent {
        FleetEvent::AgentRevoked { agent_id: shared::AgentId::from_bytes([n; 8]), at: Timestamp::from_unix_millis(0) }
    }

    #[test]
    fn a_client_resumes_after_its_last_event_or_is_told_to_resync() {
        let ev = FleetEvents::default();
        for n in 1..=3 {
            ev.publish(revoked(n));
        }
        let (_rx, resume) = ev.subscribe(Some(&ev.id(1)));
        let Resume::From(missed) = resume else { panic!("in the window") };
        assert_eq!(missed.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2, 3]);
        assert!(matches!(ev.subscribe(Some("1-1")).1, Resume::Resync), "another epoch");
        assert!(matches!(ev.subscribe(Some("garbage")).1, Resume::Resync));
        for n in 0..WINDOW {
            ev.publish(revoked(n as u8));
        }
        assert!(matches!(ev.subscribe(Some(&ev.id(1))).1, Resume::Resync), "fell out of the window");
    }
}
