//! The audit log's hash chain: the canonical encoding of an entry, its SHA-256, and the check
//! `muster audit verify` runs over the whole chain. docs/audit.md writes the encoding down
//! byte for byte, so that anyone can check a log without this code.
//!
//! The server computes `hash` when it appends an entry and the CLI recomputes it from what the
//! API returns; both call [`entry_hash`], so there is one definition of the encoding.

use sha2::{Digest, Sha256};

use crate::Timestamp;
use crate::api::AuditEntry;

/// What every hashed encoding starts with, so that the version of the encoding is part of it.
pub const DOMAIN: &[u8] = b"muster-audit-v1\n";

/// `prev_hash` of the first entry of a chain (the genesis entry): 64 zeros.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The action of the entry a chain starts with.
pub const GENESIS: &str = "audit.genesis";
/// The action of the entry written when old entries are pruned; its detail names the last
/// entry removed (`last_removed_id`, `last_removed_hash`), which the oldest kept entry links to.
pub const PRUNED: &str = "audit.pruned";

/// The fields of an entry that its hash covers, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Fields<'a> {
    pub id: u64,
    pub at: Timestamp,
    pub actor: &'a str,
    pub address: Option<&'a str>,
    pub action: &'a str,
    pub target: Option<&'a str>,
    pub detail: &'a serde_json::Value,
    pub prev_hash: &'a str,
}

impl<'a> Fields<'a> {
    pub fn of(e: &'a AuditEntry, prev_hash: &'a str) -> Self {
        Fields {
            id: e.id,
            at: e.at,
            actor: &e.actor,
            address: e.address.as_deref(),
            action: &e.action,
            target: e.target.as_deref(),
            detail: &e.detail,
            prev_hash,
        }
    }
}

fn text(out: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            out.extend_from_slice(&(b.len() as u64).to_be_bytes());
            out.extend_from_slice(b);
        }
    }
}

/// The bytes an entry's hash is taken over: [`DOMAIN`], then each field in order as a tag byte
/// (0: null, 1: present) and, when present, its length in bytes as 8 bytes big-endian and the
/// bytes. `id` and `at` (unix milliseconds) are decimal ASCII; `detail` is [`canonical_json`].
pub fn canonical(f: &Fields<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(DOMAIN);
    text(&mut out, Some(f.id.to_string().as_bytes()));
    text(&mut out, Some(f.at.unix_millis().to_string().as_bytes()));
    text(&mut out, Some(f.actor.as_bytes()));
    text(&mut out, f.address.map(str::as_bytes));
    text(&mut out, Some(f.action.as_bytes()));
    text(&mut out, f.target.map(str::as_bytes));
    text(&mut out, Some(canonical_json(f.detail).as_bytes()));
    text(&mut out, Some(f.prev_hash.as_bytes()));
    out
}

/// SHA-256 of [`canonical`], as 64 lowercase hex digits.
pub fn entry_hash(f: &Fields<'_>) -> String {
    hex::encode(Sha256::digest(canonical(f)))
}

/// JSON without whitespace, object keys sorted by their UTF-8 bytes, strings escaped only where
/// JSON requires it (`"`, `\`, and U+0000 to U+001F, the short forms `\b \f \n \r \t` where
/// they exist and `\u00xx` in lowercase hex otherwise), numbers as serde_json writes them.
pub fn canonical_json(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write_json(&mut out, v);
    out
}

fn write_json(out: &mut String, v: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(out, k);
                out.push(':');
                write_json(out, &map[k]);
            }
            out.push('}');
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Where and why a chain does not hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Break {
    #[error("entry {id}: its contents do not match its hash (it was changed after it was written)")]
    Altered { id: u64 },
    #[error(
        "entry {newer} links to {expected}, but the entry before it, {older}, has hash {found}: entries between them were removed or changed"
    )]
    Link { newer: u64, older: u64, expected: String, found: String },
    #[error("entry {id} has no hash, but entries before it do: it was written outside the chain")]
    Unchained { id: u64 },
    #[error("entry {id} is chained but older than the genesis entry")]
    BeforeGenesis { id: u64 },
    #[error("entries are not in order: {older} came after {newer}")]
    Order { newer: u64, older: u64 },
    #[error(
        "the oldest entry, {id}, links to {prev_hash}, which neither a genesis nor an audit.pruned entry accounts for: older entries were removed outside retention"
    )]
    Start { id: u64, prev_hash: String },
    #[error("the head {0} recorded elsewhere is not in the chain: entries at its end were removed")]
    HeadMissing(String),
    #[error("the audit log has no chained entries")]
    Empty,
}

/// What a chain that holds looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Chained entries checked.
    pub entries: u64,
    pub head_id: u64,
    pub head_hash: String,
    pub oldest_id: u64,
    /// How the oldest kept entry is accounted for: the genesis entry, or a pruning.
    pub start: Start,
    /// Entries from before the chain began (they have no hash), not checked.
    pub unchained: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    Genesis,
    /// The oldest entry links to the last one an `audit.pruned` entry says it removed.
    Pruned {
        last_removed_id: u64,
    },
}

/// Checks a chain fed newest first, a page at a time, holding only the entry before and the
/// hashes `audit.pruned` entries name; so a log of any length is checked in constant memory.
#[derive(Debug, Default)]
pub struct Verifier {
    newer: Option<(u64, String)>,
    head: Option<(u64, String)>,
    oldest: Option<(u64, String, String)>,
    entries: u64,
    unchained: u64,
    genesis_seen: bool,
    /// `last_removed_hash` → `last_removed_id`, from every `audit.pruned` entry seen.
    pruned: std::collections::HashMap<String, u64>,
    want_head: Option<String>,
    head_found: bool,
}

impl Verifier {
    pub fn new(recorded_head: Option<String>) -> Self {
        Verifier { want_head: recorded_head.map(|h| h.trim().to_ascii_lowercase()), ..Verifier::default() }
    }

    /// The next older entry.
    pub fn push(&mut self, e: &AuditEntry) -> Result<(), Break> {
        if let Some((newer, _)) = &self.newer
            && e.id >= *newer
        {
            return Err(Break::Order { newer: *newer, older: e.id });
        }
        let (Some(hash), Some(prev)) = (&e.hash, &e.prev_hash) else {
            if self.genesis_seen {
                self.unchained += 1;
                return Ok(());
            }
            return Err(Break::Unchained { id: e.id });
        };
        if self.genesis_seen {
            // Before the genesis entry there are only unchained entries.
            return Err(Break::BeforeGenesis { id: e.id });
        }
        if entry_hash(&Fields::of(e, prev)) != *hash {
            return Err(Break::Altered { id: e.id });
        }
        if let Some((newer, expected)) = &self.newer
            && expected != hash
        {
            return Err(Break::Link { newer: *newer, older: e.id, expected: expected.clone(), found: hash.clone() });
        }
        if self.want_head.as_deref() == Some(hash.as_str()) {
            self.head_found = true;
        }
        if e.action == PRUNED
            && let (Some(h), Some(id)) = (e.detail["last_removed_hash"].as_str(), e.detail["last_removed_id"].as_u64())
        {
            self.pruned.insert(h.to_owned(), id);
        }
        if self.head.is_none() {
            self.head = Some((e.id, hash.clone()));
        }
        self.entries += 1;
        self.newer = Some((e.id, prev.clone()));
        self.oldest = Some((e.id, hash.clone(), prev.clone()));
        if e.action == GENESIS && prev == GENESIS_PREV {
            self.genesis_seen = true;
        }
        Ok(())
    }

    /// After the oldest entry: how the chain starts, and the head it ends in.
    pub fn finish(self) -> Result<Summary, Break> {
        let (Some((head_id, head_hash)), Some((oldest_id, _, prev))) = (self.head, self.oldest) else {
            return Err(Break::Empty);
        };
        let start = if self.genesis_seen {
            Start::Genesis
        } else if let Some(id) = self.pruned.get(&prev) {
            Start::Pruned { last_removed_id: *id }
        } else {
            return Err(Break::Start { id: oldest_id, prev_hash: prev });
        };
        if let Some(want) = self.want_head
            && !self.head_found
        {
            return Err(Break::HeadMissing(want));
        }
        Ok(Summary { entries: self.entries, head_id, head_hash, oldest_id, start, unchained: self.unchained })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(id: u64, action: &str, detail: serde_json::Value, prev: &str) -> AuditEntry {
        let mut e = AuditEntry {
            id,
            at: Timestamp::from_unix_millis(1_764_633_600_000 + id as i64),
            actor: "alice (0123456789abcdef)".into(),
            address: Some("127.0.0.1:50000".into()),
            action: action.into(),
            target: None,
            detail,
            prev_hash: Some(prev.into()),
            hash: None,
        };
        e.hash = Some(entry_hash(&Fields::of(&e, prev)));
        e
    }

    /// A chain of `n` entries after a genesis, oldest first.
    fn chain(n: u64) -> Vec<AuditEntry> {
        let mut out = vec![entry(1, GENESIS, json!({}), GENESIS_PREV)];
        for id in 2..=n + 1 {
            let prev = out.last().and_then(|e| e.hash.clone()).unwrap();
            out.push(entry(id, "token.create", json!({ "n": id }), &prev));
        }
        out
    }

    fn verify(entries: &[AuditEntry], head: Option<&str>) -> Result<Summary, Break> {
        let mut v = Verifier::new(head.map(str::to_owned));
        for e in entries.iter().rev() {
            v.push(e)?;
        }
        v.finish()
    }

    #[test]
    fn the_encoding_is_exactly_as_documented() {
        let detail = json!({ "b": [1, true, null], "a": "x\"\\\n\u{1}é" });
        let f = Fields {
            id: 7,
            at: Timestamp::from_unix_millis(1000),
            actor: "al",
            address: None,
            action: "t.c",
            target: Some(""),
            detail: &detail,
            prev_hash: "00",
        };
        let json = r#"{"a":"x\"\\\n\u0001é","b":[1,true,null]}"#;
        assert_eq!(canonical_json(&detail), json);
        let mut want = b"muster-audit-v1\n".to_vec();
        for field in [Some("7"), Some("1000"), Some("al"), None, Some("t.c"), Some(""), Some(json), Some("00")] {
            match field {
                None => want.push(0),
                Some(s) => {
                    want.push(1);
                    want.extend_from_slice(&(s.len() as u64).to_be_bytes());
                    want.extend_from_slice(s.as_bytes());
                }
            }
        }
        assert_eq!(canonical(&f), want);
        assert_eq!(entry_hash(&f), hex::encode(Sha256::digest(&want)));
        // The worked example in docs/audit.md.
        assert_eq!(entry_hash(&f), "5785c0ea4726b8273fd017dcf304f041023aada2f28627f4a38ab3dcd058dede");
    }

    #[test]
    fn null_and_empty_are_different_and_fields_cannot_shift() {
        let d = json!({});
        let base = Fields {
            id: 1,
            at: Timestamp::from_unix_millis(0),
            actor: "ab",
            address: None,
            action: "c",
            target: None,
            detail: &d,
            prev_hash: "",
        };
        let empty = Fields { address: Some(""), ..base };
        assert_ne!(entry_hash(&base), entry_hash(&empty));
        let shifted = Fields { actor: "a", action: "bc", ..base };
        assert_ne!(entry_hash(&base), entry_hash(&shifted));
    }

    #[test]
    fn an_intact_chain_verifies_and_names_its_head() {
        let c = chain(5);
        let s = verify(&c, None).unwrap();
        assert_eq!((s.entries, s.head_id, s.oldest_id, s.start.clone()), (6, 6, 1, Start::Genesis));
        assert_eq!(Some(s.head_hash.clone()), c[5].hash);
        assert!(verify(&c, c[3].hash.as_deref()).is_ok(), "an older recorded head is still in the chain");
    }

    #[test]
    fn a_changed_entry_is_found() {
        let mut c = chain(5);
        c[2].detail = json!({ "n": 99 });
        assert_eq!(verify(&c, None), Err(Break::Altered { id: 3 }));
    }

    #[test]
    fn a_removed_middle_entry_breaks_the_link() {
        let mut c = chain(5);
        c.remove(2);
        assert!(matches!(verify(&c, None), Err(Break::Link { newer: 4, older: 2, .. })), "{:?}", verify(&c, None));
    }

    #[test]
    fn a_removed_tail_is_found_only_against_a_recorded_head() {
        let mut c = chain(5);
        let head = c.last().and_then(|e| e.hash.clone()).unwrap();
        c.pop();
        assert!(verify(&c, None).is_ok());
        assert_eq!(verify(&c, Some(&head)), Err(Break::HeadMissing(head)));
    }

    #[test]
    fn a_pruned_start_is_accepted_only_when_an_audit_pruned_entry_names_it() {
        let c = chain(5);
        let cut = &c[2];
        let mut kept: Vec<AuditEntry> = c[3..].to_vec();
        let prev = kept.last().and_then(|e| e.hash.clone()).unwrap();
        kept.push(entry(7, PRUNED, json!({ "last_removed_id": cut.id, "last_removed_hash": cut.hash, "removed": 3 }), &prev));
        assert_eq!(verify(&kept, None).unwrap().start, Start::Pruned { last_removed_id: 3 });
        // Removing the oldest entries without the pruning entry is found.
        let mut cut_more = kept.clone();
        cut_more.remove(0);
        assert!(matches!(verify(&cut_more, None), Err(Break::Start { id: 5, .. })));
    }

    #[test]
    fn entries_from_before_the_chain_are_counted_not_checked_and_none_may_follow_it() {
        let mut c = chain(2);
        let legacy = AuditEntry { id: 0, prev_hash: None, hash: None, ..c[0].clone() };
        c.insert(0, legacy.clone());
        assert_eq!(verify(&c, None).unwrap().unchained, 1);
        let mut late = chain(2);
        late.push(AuditEntry { id: 9, ..legacy });
        assert_eq!(verify(&late, None), Err(Break::Unchained { id: 9 }));
    }
}
