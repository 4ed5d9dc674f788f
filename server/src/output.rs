//! The rule for storing a run's output, written once and tested without a database.
//!
//! Each stream of a run holds the bytes `[0, held)` with no gap, never more than the job's
//! `output_limit`, and each byte once. A chunk from the agent (`offset`, `data`) is judged
//! against that:
//! - it starts past `held`: a **gap** (refused; the agent is asked to send again from `held`);
//! - it lies within what is held: a **repeat**, nothing to do (its bytes are not compared,
//!   so a re-send costs no read; nothing is stored either way);
//! - it overlaps the end of what is held: accepted only if the overlap equals the stored
//!   bytes, and then only its new tail is stored;
//! - bytes past `output_limit` are dropped and the stream is marked **truncated**; once
//!   truncated, a stream takes nothing more.
//!
//! So stored output per stream is bounded by the limit whatever a peer sends, and a chunk sent
//! twice, or re-sent from 0 after a reconnect, is stitched exactly.

/// What a stream of a run holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Bytes held without a gap, from 0.
    pub len: u64,
    /// Bytes were dropped at the output limit: the stream takes nothing more.
    pub truncated: bool,
}

/// What to do with one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Store `data` at `offset` (the old `held`); the stream then holds `held`.
    Append { offset: u64, data: &'a str, held: Held },
    /// Nothing new: a repeat, or bytes past the limit of a stream already truncated.
    Nothing,
    /// Nothing new stored, but the stream is now truncated (it reached the limit exactly
    /// and more arrived).
    Truncate,
    /// The chunk starts past what is held.
    Gap,
    /// The chunk's bytes differ from the stored ones where they overlap.
    Conflict,
}

/// The stored byte range a chunk overlaps, if any: the caller reads it and passes it to
/// [`decide`].
pub fn overlap(held: Held, offset: u64, len: usize) -> Option<(u64, u64)> {
    let end = offset.saturating_add(len as u64);
    // A chunk wholly within what is held, or for a truncated stream, stores nothing whatever
    // its bytes: it is not compared (so a repeat costs no read).
    (!held.truncated && offset < held.len && end > held.len).then_some((offset, held.len))
}

/// Judges a chunk. `stored` holds the bytes of [`overlap`]'s range when there is one.
pub fn decide<'a>(held: Held, limit: u64, offset: u64, data: &'a str, stored: Option<&[u8]>) -> Decision<'a> {
    if held.truncated {
        return Decision::Nothing;
    }
    if offset > held.len {
        // Past the limit, the missing bytes would be dropped anyway.
        return if held.len >= limit { Decision::Truncate } else { Decision::Gap };
    }
    let skip = usize::try_from(held.len - offset).unwrap_or(usize::MAX);
    if skip >= data.len() {
        return Decision::Nothing;
    }
    if skip > 0 {
        let shared = skip.min(data.len());
        if stored != Some(&data.as_bytes()[..shared]) {
            return Decision::Conflict;
        }
    }
    let Some(fresh) = data.get(skip..) else { return Decision::Conflict };
    let room = usize::try_from(limit.saturating_sub(held.len)).unwrap_or(usize::MAX);
    if room == 0 {
        return Decision::Truncate;
    }
    if fresh.len() <= room {
        return Decision::Append { offset: held.len, data: fresh, held: Held { len: held.len + fresh.len() as u64, truncated: false } };
    }
    // Cut at the limit, on a character boundary so stored output stays valid text.
    let mut cut = room;
    while !fresh.is_char_boundary(cut) {
        cut -= 1;
    }
    let kept = &fresh[..cut];
    Decision::Append { offset: held.len, data: kept, held: Held { len: held.len + kept.len() as u64, truncated: true } }
}

/// Whether a finished run's output is all there: the agent kept `reported` bytes of the
/// stream, of which the server keeps up to `limit`.
pub fn complete(held: Held, reported: u64, limit: u64) -> bool {
    held.truncated || held.len >= reported.min(limit)
}

/// The bytes `[from, to)` out of stored pieces `(offset, text)` sorted by offset, or None if
/// the pieces do not cover the range.
pub fn extract(pieces: &[(u64, &str)], from: u64, to: u64) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(usize::try_from(to.saturating_sub(from)).unwrap_or(0));
    let mut at = from;
    for &(offset, text) in pieces {
        if at >= to {
            break;
        }
        let end = offset + text.len() as u64;
        if end <= at {
            continue;
        }
        if offset > at {
            return None;
        }
        let lo = usize::try_from(at - offset).ok()?;
        let hi = usize::try_from(end.min(to) - offset).ok()?;
        out.extend_from_slice(&text.as_bytes()[lo..hi]);
        at = end.min(to);
    }
    (at >= to).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u64 = 1 << 20;

    fn held(len: u64) -> Held {
        Held { len, truncated: false }
    }

    #[test]
    fn an_append_at_the_end_is_stored_whole() {
        assert_eq!(decide(held(0), LIMIT, 0, "ab", None), Decision::Append { offset: 0, data: "ab", held: held(2) });
    }

    #[test]
    fn a_longer_resend_from_zero_stores_only_its_new_tail() {
        // (0,"ab") then (0,"abcd"): "cd" at 2. A reconnecting agent re-sends from 0 like this.
        assert_eq!(overlap(held(2), 0, 4), Some((0, 2)));
        assert_eq!(decide(held(2), LIMIT, 0, "abcd", Some(b"ab")), Decision::Append { offset: 2, data: "cd", held: held(4) });
    }

    #[test]
    fn a_repeat_changes_nothing_and_a_different_overlap_is_refused() {
        assert_eq!(overlap(held(4), 1, 2), None, "a chunk within what is held needs no read");
        assert_eq!(decide(held(4), LIMIT, 1, "bc", None), Decision::Nothing);
        assert_eq!(decide(held(2), LIMIT, 0, "XXcd", Some(b"ab")), Decision::Conflict);
    }

    #[test]
    fn a_chunk_past_the_end_is_a_gap() {
        assert_eq!(decide(held(2), LIMIT, 3, "d", None), Decision::Gap);
    }

    #[test]
    fn chunks_at_every_offset_store_each_byte_once_and_never_past_the_limit() {
        // The attack: chunks at offsets 0, 1, 2, ... each 16 KiB long.
        let limit = 64 * 1024;
        let text = "x".repeat(limit as usize + 32 * 1024);
        let mut h = held(0);
        let mut stored = String::new();
        for offset in 0..(limit + 1000) {
            let data = &text[offset as usize..(offset as usize + 16 * 1024).min(text.len())];
            let overlap_bytes = overlap(h, offset, data.len()).map(|(a, b)| stored.as_bytes()[a as usize..b as usize].to_vec());
            match decide(h, limit, offset, data, overlap_bytes.as_deref()) {
                Decision::Append { offset: at, data, held: next } => {
                    assert_eq!(at, stored.len() as u64);
                    stored.push_str(data);
                    h = next;
                }
                Decision::Truncate => h.truncated = true,
                Decision::Nothing => {}
                other => panic!("unexpected {other:?} at {offset}"),
            }
        }
        assert_eq!(stored.len() as u64, limit);
        assert!(h.truncated);
    }

    #[test]
    fn the_limit_cuts_on_a_character_boundary_and_marks_the_stream_truncated() {
        // "é" is two bytes: a limit of 3 keeps "aé" (3 bytes) of "aéé".
        let d = decide(held(0), 3, 0, "aéé", None);
        assert_eq!(d, Decision::Append { offset: 0, data: "aé", held: Held { len: 3, truncated: true } });
        let d = decide(held(0), 2, 0, "aé", None);
        assert_eq!(d, Decision::Append { offset: 0, data: "a", held: Held { len: 1, truncated: true } });
        assert_eq!(decide(Held { len: 1, truncated: true }, 2, 1, "é", None), Decision::Nothing);
        // Exactly at the limit, then more: truncated with nothing stored.
        assert_eq!(decide(held(2), 2, 2, "z", None), Decision::Truncate);
        assert!(complete(Held { len: 1, truncated: true }, 3, 2));
    }

    #[test]
    fn a_result_is_complete_when_every_kept_byte_is_held() {
        assert!(complete(held(10), 10, LIMIT));
        assert!(!complete(held(9), 10, LIMIT));
        assert!(complete(held(5), 10, 5));
    }

    #[test]
    fn extract_reads_a_range_across_pieces_and_says_when_it_is_not_covered() {
        let pieces = [(0, "abc"), (3, "def"), (6, "gh")];
        assert_eq!(extract(&pieces, 2, 7).as_deref(), Some(&b"cdefg"[..]));
        assert_eq!(extract(&pieces, 0, 8).as_deref(), Some(&b"abcdefgh"[..]));
        assert_eq!(extract(&[(0, "abc"), (4, "e")], 0, 5), None);
        // Old databases may hold overlapping pieces: the first one covering a byte wins.
        assert_eq!(extract(&[(0, "abc"), (1, "bcd")], 0, 4).as_deref(), Some(&b"abcd"[..]));
    }
}
