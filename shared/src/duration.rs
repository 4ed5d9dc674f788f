//! Human durations on the command line and in config files: `90s`, `10m`, `24h`, `7d`, `1h30m`.

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {input:?}: {reason} (examples: 30s, 10m, 24h, 7d, 1h30m)")]
pub struct InvalidDuration {
    pub input: String,
    pub reason: String,
}

/// Parses a duration; a bare number is taken as seconds.
pub fn parse(input: &str) -> Result<Duration, InvalidDuration> {
    let s = input.trim();
    let err = |reason: &str| InvalidDuration { input: input.to_owned(), reason: reason.to_owned() };
    if s.is_empty() {
        return Err(err("empty"));
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| err(&e.to_string()))
}

/// Formats a duration the way `parse` reads it, dropping sub-second parts.
pub fn format(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string().replace(' ', "")
}

/// A short age for tables: `4s`, `12m`, `3h`, `2d`.
pub fn format_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bare_seconds() {
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse("").is_err());
        assert!(parse("soon").is_err());
        assert!(parse("-5m").is_err());
    }

    #[test]
    fn formatting_is_readable_back() {
        let d = Duration::from_secs(5_400);
        assert_eq!(format(d), "1h30m");
        assert_eq!(parse(&format(d)), Ok(d));
        assert_eq!(format_age(Duration::from_secs(3_700)), "1h");
    }
}
