//! Reconnect delays: exponential from `initial` to `max` (backon), each drawn uniformly from
//! zero up to that bound ("full jitter"), so that a fleet that lost its server at the same
//! moment does not come back at the same moment. The schedule starts over once a connection
//! has stayed healthy for [`HEALTHY_AFTER`].

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// How long a connection must last before the next failure starts again from `initial`.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(30);

pub struct Backoff {
    builder: ExponentialBuilder,
    schedule: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        // backon's own jitter adds at most `initial` on top; full jitter is applied below.
        let builder = ExponentialBuilder::new().with_min_delay(initial).with_max_delay(max).with_factor(2.0).without_max_times();
        Backoff { schedule: builder.build(), builder, max }
    }

    /// The upper bound for the next attempt, before jitter.
    pub fn next_bound(&mut self) -> Duration {
        self.schedule.next().unwrap_or(self.max)
    }

    /// The delay before the next attempt: uniform in [0, bound].
    pub fn next_delay(&mut self) -> Duration {
        let bound = self.next_bound();
        bound.mul_f64(random_fraction())
    }

    pub fn reset(&mut self) {
        self.schedule = self.builder.build();
    }
}

/// The wait after the server closed a session with a code that means "not again soon":
/// another connection with this credential replaced this one (4002: two machines share the
/// credential, and taking turns every few seconds would help neither), or the agent was over
/// its message budget (4005). Uniform in [60 s, 180 s]; None for any other code, which takes
/// the ordinary schedule.
pub fn after_close(code: u16) -> Option<Duration> {
    use crate::protocol::close;
    matches!(code, close::REPLACED | close::RATE_LIMITED).then(|| HARD_BACKOFF_MIN + HARD_BACKOFF_SPREAD.mul_f64(random_fraction()))
}

/// The wait after a busy server's 503: its `Retry-After`, plus up to as much again at random.
pub fn after_busy(retry_after: Duration) -> Duration {
    retry_after + retry_after.mul_f64(random_fraction())
}

pub const HARD_BACKOFF_MIN: Duration = Duration::from_secs(60);
pub const HARD_BACKOFF_SPREAD: Duration = Duration::from_secs(120);

/// A uniform fraction in [0, 1). Falls back to 0.5 if the OS has no randomness to give.
pub fn random_fraction() -> f64 {
    match getrandom::u64() {
        Ok(n) => (n >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaced_and_rate_limited_sessions_wait_at_least_a_minute() {
        use crate::protocol::close;
        for _ in 0..100 {
            let d = after_close(close::REPLACED).unwrap();
            assert!((HARD_BACKOFF_MIN..=HARD_BACKOFF_MIN + HARD_BACKOFF_SPREAD).contains(&d), "{d:?}");
        }
        assert!(after_close(close::RATE_LIMITED).is_some());
        assert_eq!(after_close(close::GOING_AWAY), None);
        assert_eq!(after_close(close::NORMAL), None);
    }

    #[test]
    fn a_busy_server_is_retried_after_its_retry_after_plus_jitter() {
        let ra = Duration::from_secs(2);
        let waits: Vec<Duration> = (0..200).map(|_| after_busy(ra)).collect();
        assert!(waits.iter().all(|d| (ra..=ra * 2).contains(d)), "{waits:?}");
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > 150, "spread out: {} distinct", distinct.len());
    }

    #[test]
    fn bounds_double_up_to_the_cap_and_start_over_on_reset() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let bounds: Vec<u64> = (0..9).map(|_| b.next_bound().as_secs()).collect();
        assert_eq!(bounds, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        b.reset();
        assert_eq!(b.next_bound(), Duration::from_secs(1));
    }

    #[test]
    fn delays_are_jittered_within_the_bound() {
        let mut b = Backoff::new(Duration::from_secs(8), Duration::from_secs(8));
        let delays: Vec<Duration> = (0..200).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(8)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 150, "delays should spread out, got {} distinct", distinct.len());
        assert!(delays.iter().any(|d| *d < Duration::from_secs(4)) && delays.iter().any(|d| *d > Duration::from_secs(4)));
    }
}
