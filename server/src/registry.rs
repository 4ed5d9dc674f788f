//! The agents connected to this server process, and what it believes of their liveness.
//!
//! This is the routing seam: a command for an agent goes to the session registered here. With
//! several servers, a node that does not hold the agent forwards over the message bus to the one
//! that does (recorded as `agents.node`).
//!
//! **Invariant:** at most one session per agent. A newer session replaces an older one, which is
//! closed with `close::REPLACED` and does not mark the agent offline on its way out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shared::AgentId;
use shared::api::AgentStatus;
use shared::protocol::{ServerMessage, close};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::health::Thresholds;

/// Asks one session to close, with a code and a reason the session sends in its Close frame.
#[derive(Clone, Default)]
pub struct Closer {
    token: CancellationToken,
    reason: Arc<Mutex<Option<(u16, String)>>>,
}

impl Closer {
    /// The first caller's code and reason win.
    pub fn close(&self, code: u16, reason: impl Into<String>) {
        {
            let mut r = lock(&self.reason);
            if r.is_none() {
                *r = Some((code, reason.into()));
            }
        }
        self.token.cancel();
    }

    pub async fn closed(&self) {
        self.token.cancelled().await;
    }

    pub fn reason(&self) -> Option<(u16, String)> {
        lock(&self.reason).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Entry {
    conn: u64,
    status: AgentStatus,
    last_heartbeat: Instant,
    thresholds: Thresholds,
    outbound: mpsc::Sender<ServerMessage>,
    closer: Closer,
    remote: std::net::SocketAddr,
    /// A heartbeat has arrived on this session (registration alone does not make it live).
    heartbeated: bool,
}

/// A session that was alive (it heartbeated within [`LIVE_WITHIN`]) was replaced by another
/// connection with the same credential, for the second time within [`CONFLICT_WINDOW`]: two
/// machines share one credential (a cloned image, or a copied credential file) and take turns.
/// A reconnect after a network blip replaces a session once (often one that has gone quiet) and
/// is not reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub previous: std::net::SocketAddr,
    pub current: std::net::SocketAddr,
}

/// How recent the replaced session's last heartbeat must be for a replacement to count.
pub const LIVE_WITHIN: Duration = Duration::from_secs(5);
/// Two replacements of live sessions within this long are a conflict.
pub const CONFLICT_WINDOW: Duration = Duration::from_secs(600);

/// A status change the caller must record.
#[derive(Debug, PartialEq, Eq)]
pub struct Change {
    pub agent_id: AgentId,
    pub from: Option<AgentStatus>,
    pub to: AgentStatus,
    pub reason: String,
}

#[derive(Default)]
pub struct Registry {
    entries: Mutex<HashMap<AgentId, Entry>>,
    next_conn: AtomicU64,
    /// When each agent's live session was last replaced (entries older than the window are
    /// dropped as new ones come, so this holds at most the agents replaced recently).
    replaced: Mutex<HashMap<AgentId, Instant>>,
}

/// What `register` hands back to the session.
pub struct Registration {
    pub conn: u64,
    pub change: Option<Change>,
    pub conflict: Option<Conflict>,
}

impl Registry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a session that has just said hello. The agent is online from now.
    pub fn register(
        &self,
        id: &AgentId,
        thresholds: Thresholds,
        outbound: mpsc::Sender<ServerMessage>,
        closer: Closer,
        remote: std::net::SocketAddr,
    ) -> Registration {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            conn,
            status: AgentStatus::Online,
            last_heartbeat: Instant::now(),
            thresholds,
            outbound,
            closer,
            remote,
            heartbeated: false,
        };
        let old = lock(&self.entries).insert(id.clone(), entry);
        let live =
            old.as_ref().filter(|old| old.status == AgentStatus::Online && old.heartbeated && old.last_heartbeat.elapsed() < LIVE_WITHIN);
        let conflict = live.and_then(|old| {
            let mut replaced = lock(&self.replaced);
            let now = Instant::now();
            replaced.retain(|_, at| now.duration_since(*at) < CONFLICT_WINDOW);
            let again = replaced.insert(id.clone(), now).is_some();
            again.then_some(Conflict { previous: old.remote, current: remote })
        });
        let change = match old {
            Some(old) => {
                old.closer.close(close::REPLACED, "replaced by a newer connection from the same agent");
                (old.status != AgentStatus::Online).then(|| Change {
                    agent_id: id.clone(),
                    from: Some(old.status),
                    to: AgentStatus::Online,
                    reason: "reconnected".into(),
                })
            }
            None => {
                Some(Change { agent_id: id.clone(), from: Some(AgentStatus::Offline), to: AgentStatus::Online, reason: "connected".into() })
            }
        };
        Registration { conn, change, conflict }
    }

    /// Notes a heartbeat; a stale agent becomes online again.
    pub fn heartbeat(&self, id: &AgentId, conn: u64) -> Option<Change> {
        let mut entries = lock(&self.entries);
        let e = entries.get_mut(id).filter(|e| e.conn == conn)?;
        e.last_heartbeat = Instant::now();
        e.heartbeated = true;
        if e.status == AgentStatus::Stale {
            e.status = AgentStatus::Online;
            return Some(Change {
                agent_id: id.clone(),
                from: Some(AgentStatus::Stale),
                to: AgentStatus::Online,
                reason: "heartbeat resumed".into(),
            });
        }
        None
    }

    /// Removes a session that ended. Returns the offline change to record, unless a newer
    /// session has already taken the agent's place.
    pub fn unregister(&self, id: &AgentId, conn: u64, reason: &str) -> Option<Change> {
        let mut entries = lock(&self.entries);
        if entries.get(id).is_some_and(|e| e.conn == conn) {
            let e = entries.remove(id)?;
            return Some(Change { agent_id: id.clone(), from: Some(e.status), to: AgentStatus::Offline, reason: reason.to_owned() });
        }
        None
    }

    /// Evaluates every session's liveness: marks late ones stale and closes silent ones (their
    /// sessions then record the offline transition as they end).
    pub fn sweep(&self, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut entries = lock(&self.entries);
        for (id, e) in entries.iter_mut() {
            let silent = now.saturating_duration_since(e.last_heartbeat);
            if silent > e.thresholds.offline_after {
                e.closer.close(close::TIMEOUT, format!("no heartbeat for {}", shared::duration::format(silent)));
            } else if silent > e.thresholds.stale_after && e.status == AgentStatus::Online {
                e.status = AgentStatus::Stale;
                changes.push(Change {
                    agent_id: id.clone(),
                    from: Some(AgentStatus::Online),
                    to: AgentStatus::Stale,
                    reason: format!("no heartbeat for {}", shared::duration::format(silent.max(Duration::from_secs(1)))),
                });
            }
        }
        changes
    }

    /// Closes an agent's session, if it has one here.
    pub fn close(&self, id: &AgentId, code: u16, reason: &str) -> bool {
        match lock(&self.entries).get(id) {
            Some(e) => {
                e.closer.close(code, reason);
                true
            }
            None => false,
        }
    }

    /// The channel to an agent's session, if it is connected here.
    pub fn sender(&self, id: &AgentId) -> Option<mpsc::Sender<ServerMessage>> {
        lock(&self.entries).get(id).map(|e| e.outbound.clone())
    }

    /// Every live session's outbound queue, for a message to the whole fleet.
    pub fn senders(&self) -> Vec<mpsc::Sender<ServerMessage>> {
        lock(&self.entries).values().map(|e| e.outbound.clone()).collect()
    }

    pub fn is_connected(&self, id: &AgentId) -> bool {
        lock(&self.entries).contains_key(id)
    }

    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> Thresholds {
        Thresholds::for_interval(Duration::from_secs(10))
    }

    fn addr(n: u8) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, n], 40000))
    }

    #[tokio::test(start_paused = true)]
    async fn replacing_a_live_session_is_a_conflict_and_replacing_a_quiet_one_is_not() {
        let r = Registry::new();
        let (tx, _rx) = mpsc::channel(4);
        // The agent whose link died reconnects after its old session went quiet: no conflict.
        let first = r.register(&id(1), thresholds(), tx.clone(), Closer::default(), addr(1));
        r.heartbeat(&id(1), first.conn);
        tokio::time::advance(LIVE_WITHIN + Duration::from_secs(1)).await;
        let reconnect = r.register(&id(1), thresholds(), tx.clone(), Closer::default(), addr(3));
        assert_eq!(reconnect.conflict, None);
        // Two machines take turns replacing each other's live sessions: the second turn is one.
        r.heartbeat(&id(1), reconnect.conn);
        let clone = r.register(&id(1), thresholds(), tx.clone(), Closer::default(), addr(2));
        assert_eq!(clone.conflict, None, "one replacement of a live session may be a quick reconnect");
        r.heartbeat(&id(1), clone.conn);
        let back = r.register(&id(1), thresholds(), tx, Closer::default(), addr(3));
        assert_eq!(back.conflict, Some(Conflict { previous: addr(2), current: addr(3) }));
    }

    fn id(n: u8) -> AgentId {
        AgentId::from_bytes([n; 8])
    }

    #[tokio::test(start_paused = true)]
    async fn agent_goes_stale_after_three_intervals_and_recovers_on_heartbeat() {
        let r = Registry::new();
        let (tx, _rx) = mpsc::channel(1);
        let reg = r.register(&id(1), thresholds(), tx, Closer::default(), addr(1));
        assert_eq!(reg.change.map(|c| c.to), Some(AgentStatus::Online));

        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(r.sweep(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        let changes = r.sweep(Instant::now());
        assert_eq!(changes.len(), 1);
        assert_eq!((changes[0].from, changes[0].to), (Some(AgentStatus::Online), AgentStatus::Stale));
        assert!(r.sweep(Instant::now()).is_empty(), "stale is reported once");

        let back = r.heartbeat(&id(1), reg.conn).unwrap();
        assert_eq!((back.from, back.to), (Some(AgentStatus::Stale), AgentStatus::Online));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_session_is_closed_past_the_offline_threshold() {
        let r = Registry::new();
        let (tx, _rx) = mpsc::channel(1);
        let closer = Closer::default();
        r.register(&id(1), thresholds(), tx, closer.clone(), addr(1));
        tokio::time::advance(Duration::from_secs(61)).await;
        r.sweep(Instant::now());
        assert_eq!(closer.reason().map(|(c, _)| c), Some(close::TIMEOUT));
    }

    #[tokio::test]
    async fn a_replaced_session_leaves_without_marking_the_agent_offline() {
        let r = Registry::new();
        let (tx, _rx) = mpsc::channel(1);
        let old_closer = Closer::default();
        let old = r.register(&id(1), thresholds(), tx.clone(), old_closer.clone(), addr(1));
        let new = r.register(&id(1), thresholds(), tx, Closer::default(), addr(2));
        assert!(new.change.is_none(), "online to online is no transition");
        assert_eq!(old_closer.reason().map(|(c, _)| c), Some(close::REPLACED));
        assert!(r.unregister(&id(1), old.conn, "closed").is_none());
        assert!(r.is_connected(&id(1)));
        let gone = r.unregister(&id(1), new.conn, "closed").unwrap();
        assert_eq!(gone.to, AgentStatus::Offline);
    }
}
