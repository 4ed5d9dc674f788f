//! Wall-clock timestamps: unix milliseconds inside, RFC 3339 (UTC, millisecond precision) on the wire.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    pub const fn from_unix_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    pub const fn unix_millis(self) -> i64 {
        self.0
    }

    pub fn parse_rfc3339(s: &str) -> Result<Self, humantime::TimestampError> {
        humantime::parse_rfc3339_weak(s).map(Self::from)
    }

    /// How long ago this was, as seen from `now`; zero for timestamps in the future.
    pub fn age(self, now: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(now.0.saturating_sub(self.0)).unwrap_or(0))
    }

    /// How long from `now` until this time; zero for times in the past.
    pub fn age_until(self, now: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(self.0.saturating_sub(now.0)).unwrap_or(0))
    }

    pub fn saturating_sub(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
    }

    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        let ms = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        };
        Timestamp(ms)
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> SystemTime {
        if t.0 >= 0 {
            UNIX_EPOCH + Duration::from_millis(t.0.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_millis(t.0.unsigned_abs())
        }
    }
}

impl Timestamp {
    /// The last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z).
    pub const MAX_RFC3339: Timestamp = Timestamp(253_402_300_799_999);
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // humantime formats only times from the epoch to the end of year 9999 (and fails, rather
        // than writing, past it). Earlier ones never occur here; later ones are the "never" of
        // an expiry a very long ttl saturated, and read as the last time there is.
        let t = SystemTime::from(Timestamp(self.0.clamp(0, Self::MAX_RFC3339.0)));
        write!(f, "{}", humantime::format_rfc3339_millis(t))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_round_trips_through_rfc3339_with_milliseconds() {
        let t = Timestamp::from_unix_millis(1_763_776_000_123);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2025-11-22T01:46:40.123Z\"");
        let back: Timestamp = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn timestamps_past_year_9999_are_written_as_its_last_millisecond() {
        // A token with a ttl of u64::MAX seconds saturates to i64::MAX; serializing it must not fail.
        let far = Timestamp::from_unix_millis(0).saturating_add(Duration::from_secs(u64::MAX));
        assert_eq!(serde_json::to_string(&far).unwrap(), "\"9999-12-31T23:59:59.999Z\"");
        assert_eq!(Timestamp::MAX_RFC3339.to_string(), "9999-12-31T23:59:59.999Z");
        assert_eq!(Timestamp::parse_rfc3339("9999-12-31T23:59:59.999Z").unwrap(), Timestamp::MAX_RFC3339);
    }

    #[test]
    fn age_of_a_future_timestamp_is_zero() {
        let now = Timestamp::from_unix_millis(1000);
        assert_eq!(Timestamp::from_unix_millis(5000).age(now), Duration::ZERO);
        assert_eq!(Timestamp::from_unix_millis(400).age(now), Duration::from_millis(600));
    }
}
