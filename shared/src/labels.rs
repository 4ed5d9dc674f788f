//! Labels: `key=value` pairs that describe an agent (`site=paris`, `role=pos`) and that
//! selectors match on. Keys and values are validated so that every label can be written in a
//! selector and on a command line without quoting.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub const MAX_KEY_LEN: usize = 63;
pub const MAX_VALUE_LEN: usize = 63;
pub const MAX_LABELS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidLabel {
    #[error(
        "invalid label key {0:?}: 1 to 63 characters of letters, digits, '.', '_', '-', '/', starting and ending with a letter or digit"
    )]
    Key(String),
    #[error("invalid label value {0:?}: up to 63 characters of letters, digits, '.', '_', '-'")]
    Value(String),
    #[error("invalid label {0:?}: expected key=value")]
    Pair(String),
    #[error("too many labels: at most {MAX_LABELS}")]
    TooMany,
}

/// Labels an agent reports about itself are kept under this prefix (`agent.role=db`), so that
/// they match only selectors that name it, and never stand in for the labels that targeting
/// trusts (the enrollment token's, and those operators set). No other source may use it.
pub const AGENT_PREFIX: &str = "agent.";

pub fn validate_key(k: &str) -> Result<(), InvalidLabel> {
    // A reported label is the prefix and a key that is valid by itself.
    let b = k.strip_prefix(AGENT_PREFIX).unwrap_or(k).as_bytes();
    let edge_ok = |c: u8| c.is_ascii_alphanumeric();
    let ok = !b.is_empty()
        && b.len() <= MAX_KEY_LEN
        && edge_ok(b[0])
        && edge_ok(b[b.len() - 1])
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'/'));
    if ok { Ok(()) } else { Err(InvalidLabel::Key(k.to_owned())) }
}

/// Whether a key is in the namespace of labels agents report about themselves.
pub fn is_reported(k: &str) -> bool {
    k.starts_with(AGENT_PREFIX)
}

pub fn validate_value(v: &str) -> Result<(), InvalidLabel> {
    let ok = v.len() <= MAX_VALUE_LEN && v.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(InvalidLabel::Value(v.to_owned())) }
}

/// A validated set of labels, ordered by key.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<String, String>", into = "BTreeMap<String, String>")]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, key: &str, value: &str) -> Result<(), InvalidLabel> {
        validate_key(key)?;
        validate_value(value)?;
        if !self.0.contains_key(key) && self.0.len() >= MAX_LABELS {
            return Err(InvalidLabel::TooMany);
        }
        self.0.insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    /// Parses one `key=value` argument.
    pub fn parse_pair(s: &str) -> Result<(String, String), InvalidLabel> {
        let (k, v) = s.split_once('=').ok_or_else(|| InvalidLabel::Pair(s.to_owned()))?;
        let (k, v) = (k.trim(), v.trim());
        validate_key(k)?;
        validate_value(v)?;
        Ok((k.to_owned(), v.to_owned()))
    }

    /// Parses `key=value` arguments, as given with repeated `--label` flags.
    pub fn from_pairs<I, S>(pairs: I) -> Result<Self, InvalidLabel>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut labels = Labels::new();
        for p in pairs {
            let (k, v) = Self::parse_pair(p.as_ref())?;
            labels.insert(&k, &v)?;
        }
        Ok(labels)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Removes a key; true if it was there.
    pub fn remove(&mut self, key: &str) -> bool {
        self.0.remove(key).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The labels targeting trusts (`self`) with what the agent reported about itself added
    /// under [`AGENT_PREFIX`]. Trusted labels come first: when the two together exceed
    /// [`MAX_LABELS`], reported ones are left out (in key order).
    pub fn with_reported(&self, reported: &Labels) -> Labels {
        let mut out = self.0.clone();
        for (k, v) in &reported.0 {
            if out.len() >= MAX_LABELS {
                break;
            }
            // A key already in the reported namespace would be prefixed twice into one that does
            // not validate when read back; such a key is the agent's mistake, and left out.
            if is_reported(k) {
                continue;
            }
            out.insert(format!("{AGENT_PREFIX}{k}"), v.clone());
        }
        Labels(out)
    }

    /// The first key in the reported namespace, if any: such labels are the agent's alone.
    pub fn reserved_key(&self) -> Option<&str> {
        self.0.keys().map(String::as_str).find(|k| is_reported(k))
    }

    /// `self` with every label of `over` laid on top: `over` wins where both have a key.
    pub fn overlaid_with(&self, over: &Labels) -> Labels {
        let mut out = self.0.clone();
        for (k, v) in &over.0 {
            out.insert(k.clone(), v.clone());
        }
        Labels(out)
    }
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = InvalidLabel;
    fn try_from(map: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        if map.len() > MAX_LABELS {
            return Err(InvalidLabel::TooMany);
        }
        for (k, v) in &map {
            validate_key(k)?;
            validate_value(v)?;
        }
        Ok(Labels(map))
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(l: Labels) -> Self {
        l.0
    }
}

impl fmt::Display for Labels {
    /// `site=paris,role=pos`: the form `--label` and selectors accept.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Labels({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_from_pairs_and_refuse_bad_keys_and_values() {
        let l = Labels::from_pairs(["site=paris", "role=pos", "team/owner=ops-1"]).unwrap();
        assert_eq!(l.to_string(), "role=pos,site=paris,team/owner=ops-1");
        assert!(Labels::from_pairs(["site"]).is_err());
        assert!(Labels::from_pairs(["-site=x"]).is_err());
        assert!(Labels::from_pairs(["site=a b"]).is_err());
        assert!(Labels::from_pairs(["site=a,b"]).is_err());
        assert!(serde_json::from_str::<Labels>(r#"{"bad key":"x"}"#).is_err());
    }

    #[test]
    fn reported_labels_live_under_their_own_prefix_and_never_replace_trusted_ones() {
        let trusted = Labels::from_pairs(["role=pos"]).unwrap();
        let reported = Labels::from_pairs(["role=db", "rack=r1"]).unwrap();
        let merged = trusted.with_reported(&reported);
        assert_eq!(merged.to_string(), "agent.rack=r1,agent.role=db,role=pos");
        assert_eq!(merged.get("role"), Some("pos"));
        assert_eq!(merged.reserved_key(), Some("agent.rack"));
        assert_eq!(trusted.reserved_key(), None);
        // A prefixed key may be as long as any other key after its prefix.
        let long = format!("{}{}", AGENT_PREFIX, "k".repeat(MAX_KEY_LEN));
        assert!(validate_key(&long).is_ok());
        assert!(validate_key("agent.").is_err());
        // A reported key that already has the prefix is left out, never stored twice-prefixed.
        let sneaky = Labels::from_pairs([format!("{AGENT_PREFIX}{}=x", "k".repeat(MAX_KEY_LEN))]).unwrap();
        let merged = trusted.with_reported(&sneaky);
        assert_eq!(merged, trusted);
        assert!(serde_json::from_str::<Labels>(&serde_json::to_string(&merged).unwrap()).is_ok());
    }

    #[test]
    fn trusted_labels_keep_their_room_when_an_agent_reports_too_many() {
        let trusted = Labels::from_pairs((0..MAX_LABELS - 1).map(|i| format!("t{i}=x"))).unwrap();
        let reported = Labels::from_pairs((0..10).map(|i| format!("r{i}=y"))).unwrap();
        let merged = trusted.with_reported(&reported);
        assert_eq!(merged.len(), MAX_LABELS);
        assert!(serde_json::from_str::<Labels>(&serde_json::to_string(&merged).unwrap()).is_ok());
    }

    #[test]
    fn overlay_lets_the_upper_set_win() {
        let base = Labels::from_pairs(["site=lab", "role=pos"]).unwrap();
        let over = Labels::from_pairs(["site=paris"]).unwrap();
        assert_eq!(base.overlaid_with(&over).to_string(), "role=pos,site=paris");
    }
}
