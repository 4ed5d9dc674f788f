//! Admission control for connections: how many the process holds in total, and how many of
//! them have not authenticated yet, in total and per source address.
//!
//! A connection is *unauthenticated* from accept until a request on it presents a valid agent
//! credential, enrollment token or operator token; then it is promoted and stops counting
//! against the unauthenticated caps. So a peer that opens sockets and never speaks (or never
//! gets past TLS) holds at most `max_unauthenticated_per_address` slots, and all of them
//! together at most `max_unauthenticated`, leaving the rest for agents and operators that hold
//! a credential. Sites behind NAT share an address, but their agents count against the
//! per-address cap only for the few milliseconds of their handshake.
//!
//! A refused connection is closed at once, before TLS: cheap for the server, and never a hang
//! for the peer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The caps, from the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    pub max_connections: usize,
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_address: usize,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Total,
    Unauthenticated,
    PerAddress,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Total => "max_connections",
            Refused::Unauthenticated => "max_unauthenticated",
            Refused::PerAddress => "max_unauthenticated_per_address",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    unauthenticated: usize,
    per_address: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
pub struct Admission {
    caps: Caps,
    total: AtomicUsize,
    counts: Mutex<Counts>,
}

impl Admission {
    pub fn new(caps: Caps) -> Arc<Self> {
        Arc::new(Admission { caps, total: AtomicUsize::new(0), counts: Mutex::new(Counts::default()) })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits a new connection from `ip`, or says which cap refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refused> {
        let ip = source(ip);
        let mut counts = self.counts();
        if self.total.load(Ordering::Relaxed) >= self.caps.max_connections {
            return Err(Refused::Total);
        }
        if counts.unauthenticated >= self.caps.max_unauthenticated {
            return Err(Refused::Unauthenticated);
        }
        let here = counts.per_address.entry(ip).or_default();
        if *here >= self.caps.max_unauthenticated_per_address {
            return Err(Refused::PerAddress);
        }
        *here += 1;
        counts.unauthenticated += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(Ticket(Arc::new(TicketInner { admission: self.clone(), ip, promoted: AtomicBool::new(false) })))
    }

    /// Connections held now: (total, unauthenticated).
    pub fn held(&self) -> (usize, usize) {
        let unauthenticated = self.counts().unauthenticated;
        (self.total.load(Ordering::Relaxed), unauthenticated)
    }

    fn release_unauthenticated(&self, ip: IpAddr) {
        let mut counts = self.counts();
        counts.unauthenticated = counts.unauthenticated.saturating_sub(1);
        if let Some(n) = counts.per_address.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_address.remove(&ip);
            }
        }
    }
}

/// The "address" a per-address cap counts: an IPv4 address, or the /64 an IPv6 address is in
/// (one host usually holds a whole /64, so counting /128s would give it millions of shares).
pub(crate) fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// One admitted connection. Clones share it; the slot is given back when the last clone goes
/// (the connection task holds one, an upgraded agent session another). Requests carry it as an
/// extension so that authentication can promote the connection.
#[derive(Clone, Debug)]
pub struct Ticket(Arc<TicketInner>);

#[derive(Debug)]
struct TicketInner {
    admission: Arc<Admission>,
    ip: IpAddr,
    promoted: AtomicBool,
}

impl Ticket {
    pub fn is_promoted(&self) -> bool {
        self.0.promoted.load(Ordering::Acquire)
    }

    /// The connection presented a valid credential: it no longer counts as unauthenticated.
    pub fn promote(&self) {
        if !self.0.promoted.swap(true, Ordering::AcqRel) {
            self.0.admission.release_unauthenticated(self.0.ip);
        }
    }
}

impl Drop for TicketInner {
    fn drop(&mut self) {
        if !*self.promoted.get_mut() {
            self.admission.release_unauthenticated(self.ip);
        }
        self.admission.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Agent sessions being opened (from the upgrade request until `welcome`): at most `max` in
/// all, and at most a quarter of that from one source address, so that a peer holding a valid
/// credential on a few addresses (each upgrade may wait 10 s for its `hello`) cannot take every
/// start from the rest of the fleet.
#[derive(Debug)]
pub struct SessionStarts {
    all: Arc<tokio::sync::Semaphore>,
    per_address: usize,
    by_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One session start, given back when dropped.
#[derive(Debug)]
pub struct SessionStart {
    _permit: tokio::sync::OwnedSemaphorePermit,
    ip: IpAddr,
    by_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl SessionStarts {
    pub fn new(max: usize) -> Self {
        SessionStarts { all: Arc::new(tokio::sync::Semaphore::new(max)), per_address: (max / 4).max(1), by_address: Default::default() }
    }

    /// A start for a session from `ip`, or None if the server or that address is at its share.
    pub fn begin(&self, ip: IpAddr) -> Option<SessionStart> {
        let ip = source(ip);
        let permit = self.all.clone().try_acquire_owned().ok()?;
        let mut by = self.by_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let here = by.entry(ip).or_default();
        if *here >= self.per_address {
            return None;
        }
        *here += 1;
        Some(SessionStart { _permit: permit, ip, by_address: self.by_address.clone() })
    }
}

impl Drop for SessionStart {
    fn drop(&mut self) {
        let mut by = self.by_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = by.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by.remove(&self.ip);
            }
        }
    }
}

/// Promotes the connection a request came on, if it carries a ticket.
pub fn promote(extensions: &axum::http::Extensions) {
    if let Some(t) = extensions.get::<Ticket>() {
        t.promote();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(total: usize, unauth: usize, per: usize) -> Caps {
        Caps { max_connections: total, max_unauthenticated: unauth, max_unauthenticated_per_address: per }
    }

    #[test]
    fn one_address_gets_at_most_a_quarter_of_the_session_starts() {
        let starts = SessionStarts::new(8);
        let one: IpAddr = [127, 0, 0, 2].into();
        let held: Vec<SessionStart> = (0..2).map(|_| starts.begin(one).unwrap()).collect();
        assert!(starts.begin(one).is_none(), "a third start from one address");
        let others: Vec<SessionStart> = (3..9).map(|n| starts.begin([127, 0, 0, n].into()).unwrap()).collect();
        assert!(starts.begin([127, 0, 0, 99].into()).is_none(), "all 8 in use");
        drop(held);
        assert!(starts.begin(one).is_some(), "starts come back when dropped");
        drop(others);
    }

    #[test]
    fn one_address_cannot_take_more_than_its_share_of_unauthenticated_slots() {
        let a = Admission::new(caps(100, 50, 2));
        let ip: IpAddr = [127, 0, 0, 2].into();
        let t1 = a.admit(ip).unwrap();
        let _t2 = a.admit(ip).unwrap();
        assert_eq!(a.admit(ip).unwrap_err(), Refused::PerAddress);
        assert!(a.admit([127, 0, 0, 3].into()).is_ok(), "another address still gets in");
        // Once one of them authenticates, the address has room again.
        t1.promote();
        assert!(a.admit(ip).is_ok());
    }

    #[test]
    fn slots_come_back_when_the_last_clone_of_a_ticket_goes() {
        let a = Admission::new(caps(2, 2, 2));
        let ip: IpAddr = [127, 0, 0, 1].into();
        let t = a.admit(ip).unwrap();
        let session = t.clone();
        t.promote();
        drop(t);
        assert_eq!(a.held(), (1, 0), "the session's clone keeps the slot");
        drop(session);
        assert_eq!(a.held(), (0, 0));
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let a = Admission::new(caps(100, 50, 1));
        let one: IpAddr = "2001:db8::1".parse().unwrap();
        let other_in_the_same_64: IpAddr = "2001:db8::ffff:1".parse().unwrap();
        let _t = a.admit(one).unwrap();
        assert_eq!(a.admit(other_in_the_same_64).unwrap_err(), Refused::PerAddress);
        assert!(a.admit("2001:db8:0:1::1".parse().unwrap()).is_ok());
    }

    #[test]
    fn the_total_cap_counts_authenticated_connections_too() {
        let a = Admission::new(caps(2, 2, 2));
        let ip: IpAddr = [127, 0, 0, 1].into();
        let t1 = a.admit(ip).unwrap();
        t1.promote();
        let t2 = a.admit(ip).unwrap();
        t2.promote();
        assert_eq!(a.admit(ip).unwrap_err(), Refused::Total);
    }

    #[test]
    fn unauthenticated_connections_in_total_leave_room_for_the_rest() {
        let a = Admission::new(caps(10, 2, 5));
        let _t1 = a.admit([127, 0, 0, 1].into()).unwrap();
        let _t2 = a.admit([127, 0, 0, 2].into()).unwrap();
        assert_eq!(a.admit([127, 0, 0, 3].into()).unwrap_err(), Refused::Unauthenticated);
    }
}
