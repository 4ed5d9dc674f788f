//! Identifiers that cross the wire, validated once where they enter.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The impls every id type shares: parse once, then a string that is known to be valid.
macro_rules! string_id {
    ($name:ident, $err:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = $err;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                if $name::is_valid(&s) { Ok($name(s)) } else { Err($err(s)) }
            }
        }

        impl TryFrom<&str> for $name {
            type Error = $err;
            fn try_from(s: &str) -> Result<Self, Self::Error> {
                $name::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = $err;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::parse(s)
            }
        }

        /// Read access to the text, for the many places that only print or bind an id.
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        #[cfg(feature = "sqlx")]
        impl<DB: sqlx::Database> sqlx::Type<DB> for $name
        where
            String: sqlx::Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <String as sqlx::Type<DB>>::type_info()
            }
            fn compatible(ty: &DB::TypeInfo) -> bool {
                <String as sqlx::Type<DB>>::compatible(ty)
            }
        }

        #[cfg(feature = "sqlx")]
        impl<'q, DB: sqlx::Database> sqlx::Encode<'q, DB> for $name
        where
            String: sqlx::Encode<'q, DB>,
        {
            fn encode_by_ref(
                &self,
                buf: &mut <DB as sqlx::Database>::ArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <String as sqlx::Encode<'q, DB>>::encode_by_ref(&self.0, buf)
            }
        }

        /// A stored id is checked as it is read: a corrupt row is an error, not a bad id loose
        /// in the server.
        #[cfg(feature = "sqlx")]
        impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for $name
        where
            String: sqlx::Decode<'r, DB>,
        {
            fn decode(value: <DB as sqlx::Database>::ValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                Ok($name::try_from(<String as sqlx::Decode<'r, DB>>::decode(value)?)?)
            }
        }

        #[cfg(feature = "sqlx")]
        impl sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <String as sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex_of(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

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
        AgentId(hex_of(&bytes))
    }

    pub fn parse(s: &str) -> Result<Self, InvalidAgentId> {
        if Self::is_valid(s) { Ok(AgentId(s.to_owned())) } else { Err(InvalidAgentId(s.to_owned())) }
    }

    fn is_valid(s: &str) -> bool {
        lower_hex(s, Self::LEN)
    }
}

string_id!(AgentId, InvalidAgentId);

/// Whether `s` is a token: 1 to 64 ASCII letters, digits, `-` or `_`. Never a path, never
/// needs quoting, prints as itself.
fn token(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `s` has the form of an id the server issues (16 lowercase hex digits) or a client
/// picks for a job (32).
pub fn is_issued_form(s: &str) -> bool {
    lower_hex(s, 16) || lower_hex(s, 32)
}

/// A job's id. The server picks 16 lowercase hex digits, a client 32 (128 random bits, which a
/// signed job needs so that its id can never have been seen before). The type holds any token
/// (1 to 64 letters, digits, `-`, `_`): what the protocol allows and what is safe to store, log
/// and use as a key; the API refuses ids of any other form than those it issues.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid job id {0:?}: expected 1 to 64 letters, digits, '-' or '_'")]
pub struct InvalidJobId(pub String);

impl JobId {
    /// The length of an id a client picks.
    pub const CLIENT_LEN: usize = 32;

    /// A server-picked id from 8 random bytes.
    pub fn from_bytes(bytes: [u8; 8]) -> Self {
        JobId(hex_of(&bytes))
    }

    /// A client-picked id from 16 random bytes.
    pub fn from_client_bytes(bytes: [u8; 16]) -> Self {
        JobId(hex_of(&bytes))
    }

    pub fn parse(s: &str) -> Result<Self, InvalidJobId> {
        if Self::is_valid(s) { Ok(JobId(s.to_owned())) } else { Err(InvalidJobId(s.to_owned())) }
    }

    fn is_valid(s: &str) -> bool {
        token(s)
    }

    /// Whether this has the form a client picks (32 lowercase hex digits), as a signed job's
    /// id must.
    pub fn is_client_chosen(&self) -> bool {
        lower_hex(&self.0, Self::CLIENT_LEN)
    }
}

string_id!(JobId, InvalidJobId);

/// A run's id (one agent's part of a job). The server picks 16 lowercase hex digits; the type,
/// like the protocol, holds any token (1 to 64 letters, digits, `-`, `_`), which the agent can
/// use as a directory name in its ledger.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid run id {0:?}: expected 1 to 64 letters, digits, '-' or '_'")]
pub struct InvalidRunId(pub String);

impl RunId {
    pub fn from_bytes(bytes: [u8; 8]) -> Self {
        RunId(hex_of(&bytes))
    }

    pub fn parse(s: &str) -> Result<Self, InvalidRunId> {
        if Self::is_valid(s) { Ok(RunId(s.to_owned())) } else { Err(InvalidRunId(s.to_owned())) }
    }

    fn is_valid(s: &str) -> bool {
        token(s)
    }
}

string_id!(RunId, InvalidRunId);

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

    #[test]
    fn job_and_run_ids_are_tokens_that_can_never_be_paths() {
        for ok in ["0123456789abcdef", "r1", "started-long_ago", &"a".repeat(64)] {
            assert!(JobId::parse(ok).is_ok(), "{ok:?}");
            assert!(RunId::parse(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "../../etc/passwd", "a b", "r.1", "r/1", "é", &"a".repeat(65)] {
            assert!(JobId::parse(bad).is_err(), "{bad:?}");
            assert!(RunId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<RunId>("\"run 1\"").is_err());
        assert_eq!(serde_json::to_string(&RunId::from_bytes([0; 8])).unwrap(), "\"0000000000000000\"");
    }

    #[test]
    fn the_server_and_clients_issue_job_ids_of_their_own_forms() {
        assert_eq!(JobId::from_bytes([0xab; 8]).as_str(), "abababababababab");
        let client = JobId::from_client_bytes([1; 16]);
        assert!(client.is_client_chosen() && is_issued_form(&client));
        assert!(!JobId::from_bytes([1; 8]).is_client_chosen());
        assert!(is_issued_form("0123456789abcdef"));
        assert!(!is_issued_form("00000000000000j1"));
        assert!(!is_issued_form(&"A".repeat(32)));
    }
}
