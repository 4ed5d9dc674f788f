//! What an agent may say, beyond what decoding checks: lengths, ranges and characters of
//! every field of every message. The server calls [`AgentMessage::validate`] on each message
//! before anything else sees it, so a stored hostname, a label or a metric is never longer,
//! stranger or larger than these rules allow. The agent checks its own metrics the same way
//! before sending them.

use super::{AgentMessage, Hello, Metrics, RunFinished, RunOutput};

/// Largest `data` of one `run_output` chunk, in bytes.
pub const MAX_OUTPUT_CHUNK: usize = 16 * 1024;
/// Longest hostname, in bytes (DNS allows 253; a little room for names that are not DNS).
pub const MAX_HOSTNAME: usize = 255;
/// Longest short descriptive string (os, kernel, arch, versions, file system types).
pub const MAX_SHORT_TEXT: usize = 128;
/// Longest mount point.
pub const MAX_MOUNT: usize = 1024;
/// Most file systems in one heartbeat.
pub const MAX_DISKS: usize = 64;
/// Longest `error` of a `run_finished`.
pub const MAX_ERROR_TEXT: usize = 4096;
/// Most operator keys one agent may report trusting in `hello`.
pub const MAX_TRUSTED_KEYS: usize = 32;
/// Largest load average taken as real.
pub const MAX_LOAD: f64 = 1e6;

/// Why a message was refused: the field and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct Invalid {
    pub field: &'static str,
    pub rule: String,
}

fn invalid(field: &'static str, rule: impl Into<String>) -> Invalid {
    Invalid { field, rule: rule.into() }
}

/// Printable text: no control characters (newlines, escapes, NUL), at most `max` bytes.
pub fn check_text(field: &'static str, s: &str, max: usize) -> Result<(), Invalid> {
    if s.len() > max {
        return Err(invalid(field, format!("at most {max} bytes")));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(field, "no control characters"));
    }
    Ok(())
}

/// A hostname: 1 to 255 bytes of printable text without spaces at either end.
pub fn check_hostname(field: &'static str, s: &str) -> Result<(), Invalid> {
    check_text(field, s, MAX_HOSTNAME)?;
    if s.is_empty() || s.trim() != s {
        return Err(invalid(field, "1 to 255 bytes, no spaces at either end"));
    }
    Ok(())
}

fn check_hello(h: &Hello) -> Result<(), Invalid> {
    check_hostname("hostname", &h.hostname)?;
    check_text("agent_version", &h.agent_version, 64)?;
    if h.trusted_keys.len() > MAX_TRUSTED_KEYS {
        return Err(invalid("trusted_keys", format!("at most {MAX_TRUSTED_KEYS} keys")));
    }
    Ok(())
}

impl Metrics {
    /// Every field within the range a real machine can report.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_hostname("metrics.hostname", &self.hostname)?;
        check_text("metrics.os", &self.os, MAX_SHORT_TEXT)?;
        check_text("metrics.kernel", &self.kernel, MAX_SHORT_TEXT)?;
        check_text("metrics.arch", &self.arch, MAX_SHORT_TEXT)?;
        check_text("metrics.agent_version", &self.agent_version, 64)?;
        if !(self.cpu_percent.is_finite() && (0.0..=100.0).contains(&self.cpu_percent)) {
            return Err(invalid("metrics.cpu_percent", "a number from 0 to 100"));
        }
        if !self.load_avg.iter().all(|l| l.is_finite() && (0.0..=MAX_LOAD).contains(l)) {
            return Err(invalid("metrics.load_avg", "numbers from 0 to 1000000"));
        }
        if self.mem_used_bytes > self.mem_total_bytes {
            return Err(invalid("metrics.mem_used_bytes", "at most mem_total_bytes"));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(invalid("metrics.disks", format!("at most {MAX_DISKS} file systems")));
        }
        for d in &self.disks {
            check_text("metrics.disks.mount", &d.mount, MAX_MOUNT)?;
            check_text("metrics.disks.fs_type", &d.fs_type, MAX_SHORT_TEXT)?;
            if d.used_bytes > d.total_bytes {
                return Err(invalid("metrics.disks.used_bytes", "at most total_bytes"));
            }
        }
        // Sums over the disks must not overflow where the server adds them up.
        let (mut used, mut total) = (0u64, 0u64);
        for d in &self.disks {
            used = used.checked_add(d.used_bytes).ok_or_else(|| invalid("metrics.disks", "sizes too large"))?;
            total = total.checked_add(d.total_bytes).ok_or_else(|| invalid("metrics.disks", "sizes too large"))?;
        }
        Ok(())
    }
}

/// `s` with control characters replaced by `_` and cut to `max` bytes on a character boundary.
fn clean(s: &mut String, max: usize) {
    if s.chars().any(char::is_control) {
        *s = s.chars().map(|c| if c.is_control() { '_' } else { c }).collect();
    }
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

impl Metrics {
    /// Brings what a machine reported within [`Metrics::validate`]'s rules: the agent calls
    /// this before sending, so an odd mount point or a clock jump costs a heartbeat nothing.
    pub fn sanitize(&mut self) {
        clean(&mut self.hostname, MAX_HOSTNAME);
        let trimmed = self.hostname.trim();
        if trimmed.len() != self.hostname.len() {
            self.hostname = trimmed.to_owned();
        }
        if self.hostname.is_empty() {
            self.hostname = "unknown".into();
        }
        for (s, max) in [
            (&mut self.os, MAX_SHORT_TEXT),
            (&mut self.kernel, MAX_SHORT_TEXT),
            (&mut self.arch, MAX_SHORT_TEXT),
            (&mut self.agent_version, 64),
        ] {
            clean(s, max);
        }
        self.cpu_percent = if self.cpu_percent.is_finite() { self.cpu_percent.clamp(0.0, 100.0) } else { 0.0 };
        for l in &mut self.load_avg {
            *l = if l.is_finite() { l.clamp(0.0, MAX_LOAD) } else { 0.0 };
        }
        self.mem_used_bytes = self.mem_used_bytes.min(self.mem_total_bytes);
        self.disks.retain(|d| d.mount.len() <= MAX_MOUNT && !d.mount.chars().any(char::is_control));
        self.disks.truncate(MAX_DISKS);
        let mut total = 0u64;
        self.disks.retain(|d| match total.checked_add(d.total_bytes) {
            Some(t) => {
                total = t;
                true
            }
            None => false,
        });
        for d in &mut self.disks {
            clean(&mut d.fs_type, MAX_SHORT_TEXT);
            d.used_bytes = d.used_bytes.min(d.total_bytes);
        }
    }
}

fn check_output(o: &RunOutput) -> Result<(), Invalid> {
    if o.data.len() > MAX_OUTPUT_CHUNK {
        return Err(invalid("data", format!("at most {MAX_OUTPUT_CHUNK} bytes per chunk")));
    }
    if o.offset.checked_add(o.data.len() as u64).is_none_or(|end| end > i64::MAX as u64) {
        return Err(invalid("offset", "offset plus length must stay below 2^63"));
    }
    Ok(())
}

fn check_finished(f: &RunFinished) -> Result<(), Invalid> {
    if let Some(e) = &f.error {
        // Errors may span lines (a command's own message); escaping is the printer's job.
        if e.len() > MAX_ERROR_TEXT {
            return Err(invalid("error", format!("at most {MAX_ERROR_TEXT} bytes")));
        }
    }
    if f.stdout_len > i64::MAX as u64 || f.stderr_len > i64::MAX as u64 {
        return Err(invalid("stdout_len", "below 2^63"));
    }
    Ok(())
}

impl AgentMessage {
    /// Checks every field against the protocol's rules (`docs/protocol.md`, "Limits").
    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            AgentMessage::Hello(h) => check_hello(h),
            AgentMessage::Heartbeat(hb) => hb.metrics.validate(),
            // Run ids are checked as they are decoded (`RunId`).
            AgentMessage::RunAccepted(_) | AgentMessage::RunStarted(_) => Ok(()),
            AgentMessage::RunOutput(o) => check_output(o),
            AgentMessage::RunFinished(f) => check_finished(f),
            AgentMessage::CredentialRequest(_) => Ok(()),
            AgentMessage::CredentialStored(c) => {
                if c.sha256.len() != 64 || !c.sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err(invalid("sha256", "64 lowercase hex digits"));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::health::tests::sample_metrics;
    use super::super::{Heartbeat, RunOutput};
    use super::*;
    use crate::job::Stream;

    fn heartbeat(m: Metrics) -> AgentMessage {
        AgentMessage::Heartbeat(Heartbeat { seq: 1, metrics: m })
    }

    #[test]
    fn a_real_heartbeat_is_valid() {
        assert_eq!(heartbeat(sample_metrics()).validate(), Ok(()));
    }

    #[test]
    fn hostnames_that_forge_lines_or_fill_memory_are_refused() {
        for bad in ["", " pos", "pos\nlevel=error", "pos\x1b[2J", &"x".repeat(100_000)] {
            let mut m = sample_metrics();
            m.hostname = bad.to_owned();
            let e = heartbeat(m).validate().unwrap_err();
            assert_eq!(e.field, "metrics.hostname", "{bad:?}");
        }
    }

    #[test]
    fn metrics_out_of_range_are_refused() {
        type Break = Box<dyn Fn(&mut Metrics)>;
        let cases: Vec<Break> = vec![
            Box::new(|m| m.cpu_percent = 1e308),
            Box::new(|m| m.cpu_percent = f64::NAN),
            Box::new(|m| m.cpu_percent = -1.0),
            Box::new(|m| m.load_avg[1] = f64::INFINITY),
            Box::new(|m| m.mem_used_bytes = m.mem_total_bytes + 1),
            Box::new(|m| m.disks[0].used_bytes = u64::MAX),
            Box::new(|m| m.disks = vec![m.disks[0].clone(); MAX_DISKS + 1]),
            Box::new(|m| m.os = "a\u{7}".into()),
        ];
        for (i, f) in cases.iter().enumerate() {
            let mut m = sample_metrics();
            f(&mut m);
            assert!(heartbeat(m).validate().is_err(), "case {i}");
        }
    }

    #[test]
    fn sanitized_metrics_always_validate() {
        let mut m = sample_metrics();
        m.hostname = " pos\n1 ".into();
        m.cpu_percent = f64::NAN;
        m.load_avg = [f64::INFINITY, -1.0, 2.0];
        m.mem_used_bytes = u64::MAX;
        m.os = "é".repeat(200);
        m.disks.push(super::super::DiskUsage { mount: "/mnt/a\nb".into(), fs_type: "x".into(), used_bytes: 9, total_bytes: 1 });
        m.disks.push(super::super::DiskUsage { mount: "/big".into(), fs_type: "x".into(), used_bytes: 0, total_bytes: u64::MAX });
        m.sanitize();
        assert_eq!(heartbeat(m.clone()).validate(), Ok(()));
        assert_eq!(m.hostname, "pos_1");
        assert_eq!(m.disks.len(), 1);
    }

    #[test]
    fn output_chunks_are_at_most_16_kib_and_cannot_overflow_offsets() {
        let chunk = |offset: u64, len: usize| {
            AgentMessage::RunOutput(RunOutput { run_id: "r1".parse().unwrap(), stream: Stream::Stdout, offset, data: "x".repeat(len) })
        };
        assert_eq!(chunk(0, MAX_OUTPUT_CHUNK).validate(), Ok(()));
        assert_eq!(chunk(0, MAX_OUTPUT_CHUNK + 1).validate().unwrap_err().field, "data");
        assert_eq!(chunk(u64::MAX, 1).validate().unwrap_err().field, "offset");
    }
}
