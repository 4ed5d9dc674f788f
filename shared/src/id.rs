//! Identifiers that cross the wire, validated once where they enter.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An agent's identity, assigned by the server at enrollment: 16 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid agent id {0:?}: expected 16 lowercase hex digits")]
pub struct InvalidAgentId(pub String);

impl AgentId {
    pub const LEN: usize = 16;

    /// Builds an id from 8 random bytes.
    pub fn from_bytes(bytes: [u8; 8]) -> Self {
        use fmt::Write;
        let mut s = String::with_capacity(Self::LEN);
        for b in bytes {
            let _ = write!(s, "{b:02x}");
        }
        AgentId(s)
    }

    pub fn parse(s: &str) -> Result<Self, InvalidAgentId> {
        let ok = s.len() == Self::LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if ok { Ok(AgentId(s.to_owned())) } else { Err(InvalidAgentId(s.to_owned())) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AgentId {
    type Error = InvalidAgentId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        AgentId::parse(&s)
    }
}

impl From<AgentId> for String {
    fn from(id: AgentId) -> String {
        id.0
    }
}

impl std::str::FromStr for AgentId {
    type Err = InvalidAgentId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AgentId::parse(s)
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_id_accepts_only_sixteen_lowercase_hex_digits() {
        assert!(AgentId::parse("0123456789abcdef").is_ok());
        assert!(AgentId::parse("0123456789ABCDEF").is_err());
        assert!(AgentId::parse("0123").is_err());
        assert!(AgentId::parse("0123456789abcdeg").is_err());
        assert_eq!(AgentId::from_bytes([0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 255]).as_str(), "deadbeef000102ff");
    }

    #[test]
    fn agent_id_refuses_bad_input_when_deserialized() {
        assert!(serde_json::from_str::<AgentId>("\"../etc/passwd\"").is_err());
    }
}
