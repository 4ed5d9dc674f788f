//! Credentials: operator tokens (`mst_`), enrollment tokens (`mse_`) and agent credentials
//! (`msa_`). Each is `<prefix><id>_<secret>`: the id finds the row, the secret is checked
//! against the SHA-256 hash stored there in constant time. Secrets are 256 random bits, so a
//! plain hash is enough; the server never stores or logs a secret.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const ID_LEN: usize = 16;
const SECRET_LEN: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Operator,
    Enroll,
    Agent,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Operator => "mst_",
            Kind::Enroll => "mse_",
            Kind::Agent => "msa_",
        }
    }
}

/// A credential as presented, parsed but not yet checked.
#[derive(Clone, PartialEq, Eq)]
pub struct Presented {
    pub kind: Kind,
    pub id: String,
    secret: String,
}

impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Presented({:?}, {})", self.kind, self.id)
    }
}

/// A freshly made credential: the string to hand out once, and the hash to store.
pub struct Issued {
    pub id: String,
    pub token: String,
    pub hash: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no credential: send Authorization: Bearer <token>")]
    Missing,
    #[error("malformed credential")]
    Malformed,
    #[error("unknown or wrong credential")]
    Wrong,
    #[error("credential expired")]
    Expired,
    #[error("credential revoked")]
    Revoked,
    #[error("enrollment token has no uses left")]
    UsedUp,
    #[error("this credential may not do that")]
    WrongKind,
    #[error(
        "this agent credential was replaced by a rotation: the machine presenting it holds a copy of that agent (a cloned image or a copied state directory); enroll it with its own token"
    )]
    Superseded,
}

impl AuthError {
    /// A stable name for the reason, for the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Wrong => "wrong",
            AuthError::Expired => "expired",
            AuthError::Revoked => "revoked",
            AuthError::UsedUp => "used_up",
            AuthError::WrongKind => "wrong_kind",
            AuthError::Superseded => "superseded",
        }
    }
}

fn random_hex(bytes: usize) -> Result<String, getrandom::Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)?;
    Ok(hex::encode(buf))
}

pub fn random_id() -> Result<String, getrandom::Error> {
    random_hex(ID_LEN / 2)
}

/// The 8 random bytes of a new job, run or agent id.
pub fn random_id_bytes() -> Result<[u8; ID_LEN / 2], getrandom::Error> {
    let mut buf = [0u8; ID_LEN / 2];
    getrandom::fill(&mut buf)?;
    Ok(buf)
}

pub fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Issues a credential of `kind` for `id` (a fresh random id when `None`).
pub fn issue(kind: Kind, id: Option<&str>) -> Result<Issued, getrandom::Error> {
    let id = match id {
        Some(id) => id.to_owned(),
        None => random_id()?,
    };
    let secret = random_hex(SECRET_LEN / 2)?;
    Ok(Issued { token: format!("{}{id}_{secret}", kind.prefix()), hash: hash(&secret), id })
}

impl Presented {
    /// Parses an `Authorization` header value (`Bearer <token>`).
    pub fn from_header(value: Option<&str>) -> Result<Self, AuthError> {
        let value = value.ok_or(AuthError::Missing)?;
        let token = value.strip_prefix("Bearer ").ok_or(AuthError::Malformed)?;
        Self::parse(token.trim())
    }

    pub fn parse(token: &str) -> Result<Self, AuthError> {
        let kind =
            [Kind::Operator, Kind::Enroll, Kind::Agent].into_iter().find(|k| token.starts_with(k.prefix())).ok_or(AuthError::Malformed)?;
        let (id, secret) = token[kind.prefix().len()..].split_once('_').ok_or(AuthError::Malformed)?;
        let hexy = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !hexy(id, ID_LEN) || !hexy(secret, SECRET_LEN) {
            return Err(AuthError::Malformed);
        }
        Ok(Presented { kind, id: id.to_owned(), secret: secret.to_owned() })
    }

    /// The credential named without its secret (`mst_<id>`), for the audit log.
    pub fn public_name(&self) -> String {
        format!("{}{}", self.kind.prefix(), self.id)
    }

    /// True when the secret matches the stored hash; constant time in the secret.
    pub fn matches(&self, stored_hash: &[u8]) -> bool {
        hash(&self.secret).ct_eq(stored_hash).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_token_parses_and_matches_only_its_own_hash() {
        let a = issue(Kind::Operator, None).unwrap();
        let b = issue(Kind::Operator, None).unwrap();
        let p = Presented::parse(&a.token).unwrap();
        assert_eq!(p.kind, Kind::Operator);
        assert_eq!(p.id, a.id);
        assert!(p.matches(&a.hash));
        assert!(!p.matches(&b.hash));
        assert!(!a.token.contains(&hex::encode(&a.hash)));
    }

    #[test]
    fn agent_credentials_carry_the_agent_id() {
        let c = issue(Kind::Agent, Some("0123456789abcdef")).unwrap();
        assert!(c.token.starts_with("msa_0123456789abcdef_"));
        assert_eq!(Presented::parse(&c.token).unwrap().kind, Kind::Agent);
    }

    #[test]
    fn malformed_headers_are_told_apart_from_missing_ones() {
        assert_eq!(Presented::from_header(None), Err(AuthError::Missing));
        assert_eq!(Presented::from_header(Some("Basic abc")), Err(AuthError::Malformed));
        assert_eq!(Presented::from_header(Some("Bearer mst_short_x")), Err(AuthError::Malformed));
        assert_eq!(Presented::from_header(Some("Bearer xyz_0123456789abcdef_00")), Err(AuthError::Malformed));
    }
}
