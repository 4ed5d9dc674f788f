//! Rendering for people: aligned tables and short human units.

use std::fmt::Write;
use std::time::Duration;

/// Text from agents (and anything else the server only relays) made safe for a terminal:
/// control characters, which could clear the screen, set the window title or forge a table
/// row with a newline, are shown escaped (`\n`, `\x1b`) instead of acted on.
pub fn safe(s: &str) -> String {
    escape(s, false)
}

/// Like [`safe`], but keeps tabs: for lines of a command's output.
pub fn safe_line(s: &str) -> String {
    escape(s, true)
}

fn escape(s: &str, keep_tabs: bool) -> String {
    if !s.chars().any(|c| c.is_control() && !(keep_tabs && c == '\t')) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\t' if keep_tabs => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// A number for a table column, never wider than a few characters whatever it is.
pub fn pct(v: f64) -> String {
    if v.is_finite() && (0.0..=1000.0).contains(&v) { format!("{v:.0}%") } else { "?".into() }
}

/// Left-aligned columns, two spaces apart; the last column is not padded. Every cell is
/// passed through [`safe`].
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| safe(c)).collect()).collect();
    let rows = &rows;
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 == widths.len() {
                s.push_str(cell);
            } else {
                let _ = write!(s, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// "1 agent", "2 agents".
pub fn agents(n: u64) -> String {
    if n == 1 { "1 agent".into() } else { format!("{n} agents") }
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

pub fn percent(used: u64, total: u64) -> String {
    if total == 0 { "-".into() } else { format!("{:.0}%", used as f64 / total as f64 * 100.0) }
}

pub fn age(d: Duration) -> String {
    format!("{} ago", shared::duration::format_age(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "BB"], &[vec!["long".into(), "x".into()], vec!["s".into(), "y".into()]]);
        assert_eq!(t, "A     BB\nlong  x\ns     y\n");
    }

    #[test]
    fn agent_text_cannot_drive_the_terminal_or_forge_rows() {
        assert_eq!(safe("pos-1"), "pos-1");
        assert_eq!(safe("a\x1b[2J\x1b]0;pwned\x07"), "a\\x1b[2J\\x1b]0;pwned\\x07");
        assert_eq!(safe("x\nonline  fake"), "x\\nonline  fake");
        assert_eq!(safe_line("a\tb\rc"), "a\tb\\rc");
        let t = table(&["HOST"], &[vec!["a\nb".into()]]);
        assert_eq!(t.lines().count(), 2, "{t}");
        assert_eq!(pct(1e308), "?");
        assert_eq!(pct(12.4), "12%");
    }

    #[test]
    fn units_are_readable() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024 / 2), "1.5 GiB");
        assert_eq!(percent(1, 4), "25%");
        assert_eq!(percent(1, 0), "-");
    }
}
