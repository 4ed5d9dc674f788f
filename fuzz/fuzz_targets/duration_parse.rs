//! Human durations (`30s`, `1h30m`, `7d`, a bare number of seconds), as the CLI and both config
//! files read them, and the two ways they are written back.
//!
//! Checks: `parse` never panics; `format` of what it returned parses back to the same whole
//! seconds; `format` and `format_age` never panic, and `format` round-trips, for any Duration.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shared::duration::{format, format_age, parse};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(d) = parse(&text) {
        check(d);
    }
    // The same bytes as a Duration: seconds, then nanoseconds.
    if let (Some(secs), Some(nanos)) = (data.get(..8), data.get(8..12)) {
        let secs = u64::from_le_bytes(secs.try_into().unwrap_or_default());
        let nanos = u32::from_le_bytes(nanos.try_into().unwrap_or_default()) % 1_000_000_000;
        check(Duration::new(secs, nanos));
    }
});

fn check(d: Duration) {
    let written = format(d);
    assert_eq!(parse(&written), Ok(Duration::from_secs(d.as_secs())), "{d:?} written as {written:?}");
    let _ = format_age(d);
}
