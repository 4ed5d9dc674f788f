//! Live events inside one server process: run state changes and output, published once they
//! are durable, for the job event streams (SSE) to follow.
//!
//! This is the seam for several servers: a Redis pub/sub implementation publishes the same
//! events to every node, so a stream on one node sees runs on agents held by another.

use shared::job::{JobEvent, JobId};
use tokio::sync::broadcast;

const CAPACITY: usize = 16_384;

#[derive(Clone, Debug)]
pub struct BusEvent {
    pub job_id: JobId,
    pub event: JobEvent,
}

#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<BusEvent>,
}

impl Default for Events {
    fn default() -> Self {
        Events { tx: broadcast::channel(CAPACITY).0 }
    }
}

impl Events {
    pub fn publish(&self, job_id: &JobId, event: JobEvent) {
        // No subscribers is fine: nobody is watching.
        let _ = self.tx.send(BusEvent { job_id: job_id.clone(), event });
    }

    /// A receiver that sees every event published from now on; one that falls more than
    /// the channel's capacity behind is told it lagged.
    pub fn subscribe(&self) -> broadcast::Receiver<BusEvent> {
        self.tx.subscribe()
    }
}
