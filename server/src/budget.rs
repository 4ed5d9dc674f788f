//! Per-agent budgets: token buckets for messages and bytes, refilled continuously. A real
//! agent sends a heartbeat every few seconds and output in 16 KiB chunks; the defaults sit
//! far above that, so only a peer that floods ever meets them.
//!
//! - **Messages** over budget are dropped (and counted); a session that keeps going after
//!   [`DROPS_BEFORE_CLOSE`] drops is closed with `close::RATE_LIMITED`. A flood of small
//!   messages (pings, heartbeats) is what this stops.
//! - **Bytes** over budget are not dropped: the session stops reading from the agent until the
//!   budget has refilled, so TCP holds the agent to the budget's rate and no byte of output is
//!   lost. A legitimate agent that re-sends a great deal of output after a reconnect is slowed,
//!   never cut off; a peer that floods bytes costs the server at most the budget's rate.

use tokio::time::Instant;

/// Dropped messages after which the session is closed.
pub const DROPS_BEFORE_CLOSE: u64 = 1000;

#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    level: f64,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Self {
        Bucket { rate, burst, level: burst }
    }

    fn refill(&mut self, secs: f64) {
        self.level = (self.level + secs * self.rate).min(self.burst);
    }
}

/// What [`Budget::take`] decided about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Over budget: drop the message. `which` names the budget.
    Drop {
        which: &'static str,
    },
    /// Over budget for too long: close the session.
    Close {
        which: &'static str,
    },
}

#[derive(Debug)]
pub struct Budget {
    messages: Bucket,
    bytes: Bucket,
    last: Instant,
    pub dropped: u64,
}

impl Budget {
    pub fn new(messages_per_sec: u32, message_burst: u32, bytes_per_sec: u64, byte_burst: u64) -> Self {
        Budget {
            messages: Bucket::new(f64::from(messages_per_sec), f64::from(message_burst)),
            bytes: Bucket::new(bytes_per_sec as f64, byte_burst as f64),
            last: Instant::now(),
            dropped: 0,
        }
    }

    pub fn from_limits(l: &crate::config::Limits) -> Self {
        Self::new(l.agent_messages_per_second, l.agent_message_burst, l.agent_bytes_per_second, l.agent_byte_burst)
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.messages.refill(secs);
        self.bytes.refill(secs);
    }

    /// Charges one message of `len` bytes: its bytes always (the byte budget may go into debt
    /// by one message, which [`Budget::pause`] then waits out), its count if there is room.
    pub fn take(&mut self, len: usize) -> Verdict {
        self.refill();
        if self.messages.level < 1.0 {
            self.dropped += 1;
            let which = "messages";
            return if self.dropped > DROPS_BEFORE_CLOSE { Verdict::Close { which } } else { Verdict::Drop { which } };
        }
        self.messages.level -= 1.0;
        self.bytes.level -= len as f64;
        // Drops count towards closing only while the agent stays over budget: once it is back
        // under half its burst, it starts afresh.
        if self.messages.level >= self.messages.burst / 2.0 {
            self.dropped = 0;
        }
        Verdict::Pass
    }

    /// How long to stop reading from the agent before the byte budget is out of debt.
    pub fn pause(&mut self) -> Option<std::time::Duration> {
        self.refill();
        (self.bytes.level < 0.0).then(|| std::time::Duration::from_secs_f64(-self.bytes.level / self.bytes.rate))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_then_messages_drop_then_the_session_closes() {
        let mut b = Budget::new(10, 20, 1 << 20, 1 << 20);
        for _ in 0..20 {
            assert_eq!(b.take(100), Verdict::Pass);
        }
        assert_eq!(b.take(100), Verdict::Drop { which: "messages" });
        for _ in 1..DROPS_BEFORE_CLOSE {
            assert!(matches!(b.take(100), Verdict::Drop { .. }));
        }
        assert_eq!(b.take(100), Verdict::Close { which: "messages" });
    }

    #[tokio::test(start_paused = true)]
    async fn drops_are_forgiven_once_the_agent_is_back_under_budget() {
        let mut b = Budget::new(10, 20, 1 << 20, 1 << 20);
        for _ in 0..20 {
            b.take(1);
        }
        for _ in 0..DROPS_BEFORE_CLOSE {
            assert!(matches!(b.take(1), Verdict::Drop { .. }));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(b.take(1), Verdict::Pass);
        assert_eq!(b.dropped, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_refills_at_its_rate() {
        let mut b = Budget::new(10, 10, 1 << 20, 1 << 20);
        for _ in 0..10 {
            assert_eq!(b.take(1), Verdict::Pass);
        }
        assert!(matches!(b.take(1), Verdict::Drop { .. }));
        tokio::time::advance(Duration::from_millis(500)).await;
        for _ in 0..5 {
            assert_eq!(b.take(1), Verdict::Pass);
        }
        assert!(matches!(b.take(1), Verdict::Drop { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_over_budget_pause_reading_until_the_debt_is_paid() {
        let mut b = Budget::new(1000, 1000, 1000, 4000);
        assert_eq!(b.take(4000), Verdict::Pass);
        assert_eq!(b.pause(), None);
        // One more message goes into debt; nothing is dropped, reading waits instead.
        assert_eq!(b.take(500), Verdict::Pass);
        assert_eq!(b.pause(), Some(Duration::from_millis(500)));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(b.pause(), None);
        assert_eq!(b.dropped, 0);
    }
}
