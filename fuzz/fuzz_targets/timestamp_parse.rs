//! Wall-clock timestamps: RFC 3339 in (`?since=`, stored rows, JSON bodies), RFC 3339 out
//! (every API response, logs, the CLI).
//!
//! Checks: parsing never panics and what it returns is written back as text that parses to
//! the same value; a Timestamp of any i64 milliseconds formats, serializes and does arithmetic
//! without panicking, and round-trips where RFC 3339 can express it (1970 to 9999).
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use shared::Timestamp;

/// 9999-12-31T23:59:59.999Z: the last millisecond RFC 3339, whose years have four digits, can name.
const LAST_WRITABLE_MS: i64 = 253_402_300_799_999;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(t) = Timestamp::parse_rfc3339(&text) {
        check(t);
    }
    if let Ok(t) = serde_json::from_str::<Timestamp>(&text) {
        check(t);
    }
    if let Some(ms) = data.get(..8) {
        let ms = i64::from_le_bytes(ms.try_into().unwrap_or_default());
        let t = Timestamp::from_unix_millis(ms);
        check(t);
        let d = Duration::from_millis(data.get(8..16).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default())));
        for u in [t.saturating_add(d), t.saturating_sub(d)] {
            let _ = (u.age(t), t.age(u), u.age_until(t), t.age_until(u));
            let _ = SystemTime::from(u);
            let _ = u.to_string();
        }
    }
});

fn check(t: Timestamp) {
    // Display has no way to fail but panicking in `to_string`; it must write something.
    let shown = t.to_string();
    let json = serde_json::to_string(&t).unwrap_or_else(|e| panic!("{} ms does not serialize: {e}", t.unix_millis()));
    let _ = format!("{t:?}");
    let _ = SystemTime::from(t);
    if (0..=LAST_WRITABLE_MS).contains(&t.unix_millis()) {
        assert_eq!(Timestamp::parse_rfc3339(&shown).ok(), Some(t), "{shown:?}");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).ok(), Some(t), "{json}");
    }
}
