//! Logging what untrusted peers send, without letting them write the log: text from a peer is
//! cut to a short length with control characters escaped (so it cannot forge lines or
//! terminal sequences), and refusals are throttled to a few lines a second with a count of
//! what was left out.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Longest piece of peer-supplied text a log line carries.
pub const MAX_LOGGED_CHARS: usize = 120;

/// `s` cut to [`MAX_LOGGED_CHARS`] characters with control characters escaped; a cut is
/// marked with `…`.
pub fn untrusted(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_LOGGED_CHARS + 8));
    for (i, c) in s.chars().enumerate() {
        if i == MAX_LOGGED_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Lets through at most `per_window` events a window; counts the rest.
pub struct Throttle {
    window: Duration,
    per_window: u64,
    state: Mutex<(Option<Instant>, u64)>,
    suppressed: AtomicU64,
}

impl Throttle {
    pub const fn new(window: Duration, per_window: u64) -> Self {
        Throttle { window, per_window, state: Mutex::new((None, 0)), suppressed: AtomicU64::new(0) }
    }

    /// `Some(n)` if this event may be logged, with `n` events suppressed since the last one
    /// logged; `None` if it should be counted and left out.
    pub fn admit(&self) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if st.0.is_none_or(|start| now.duration_since(start) >= self.window) {
            *st = (Some(now), 0);
        }
        if st.1 < self.per_window {
            st.1 += 1;
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

static REFUSED_REQUESTS: Throttle = Throttle::new(Duration::from_secs(1), 10);

/// An API request refused for its credential.
pub fn refused_request(path: &str, reason: &dyn std::fmt::Display) {
    if let Some(suppressed) = REFUSED_REQUESTS.admit() {
        tracing::warn!(path = %untrusted(path), %reason, suppressed, "API request refused");
    }
}

static REFUSED_HANDSHAKES: Throttle = Throttle::new(Duration::from_secs(1), 10);

/// An agent handshake (or agent check) refused for its credential.
pub fn refused_handshake(what: &str, remote: std::net::SocketAddr, reason: &dyn std::fmt::Display) {
    if let Some(suppressed) = REFUSED_HANDSHAKES.admit() {
        tracing::warn!(%remote, %reason, suppressed, "{what} refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_text_is_cut_and_cannot_forge_lines_or_escapes() {
        assert_eq!(untrusted("pos-1"), "pos-1");
        assert_eq!(untrusted("a\nlevel=error fake\x1b[2J"), "a\\nlevel=error fake\\u{1b}[2J");
        let long = "x".repeat(60 * 1024);
        let cut = untrusted(&long);
        assert_eq!(cut.chars().count(), MAX_LOGGED_CHARS + 1);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn a_throttle_lets_a_few_through_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_secs(3600), 2);
        assert_eq!(t.admit(), Some(0));
        assert_eq!(t.admit(), Some(0));
        for _ in 0..5 {
            assert_eq!(t.admit(), None);
        }
        assert_eq!(t.suppressed.load(Ordering::Relaxed), 5);
    }
}
