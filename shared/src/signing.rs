//! Signed jobs: what an operator's ed25519 key signs, and how one agent checks that it is
//! named without receiving the whole list.
//!
//! The signature covers a canonical byte encoding of the job ([`job_statement`]): its id, the
//! command (argv or script, cwd, environment), the Merkle root and size of the sorted set of
//! agent ids it targets, an expiry, and optionally a label selector that the agent evaluates
//! over its own labels. The server forwards the signature with each `run`, plus the agent's
//! Merkle proof ([`AgentSet::proof`]); it can neither forge one nor move one to another agent.
//! docs/protocol.md documents the encoding byte by byte.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::job::{CommandSpec, Program};
use crate::{AgentId, Selector, Timestamp};

/// How far apart an agent's clock and the signer's may be when checking an expiry.
pub const CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;
/// The longest an agent accepts a signature to stay valid: it remembers each signed job id
/// until its expiry, so this bounds that memory.
pub const MAX_VALIDITY_MS: i64 = 31 * 86_400 * 1000;

const JOB_DOMAIN: &[u8] = b"muster signed job v1\0";
const REVOCATION_DOMAIN: &[u8] = b"muster key revocation v1\0";

/// An ed25519 public key, written `ed25519:<64 hex digits>`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn from_bytes(b: [u8; 32]) -> PublicKey {
        PublicKey(b)
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn parse(s: &str) -> Result<PublicKey, SigningError> {
        let hex = s.trim().strip_prefix("ed25519:").ok_or(SigningError::BadKey)?;
        Ok(PublicKey(from_hex::<32>(hex).ok_or(SigningError::BadKey)?))
    }

    /// Checks `signature` over `message`.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), SigningError> {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.0)
            .verify(message, &signature.0)
            .map_err(|_| SigningError::BadSignature)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", to_hex(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for PublicKey {
    type Err = SigningError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PublicKey::parse(s)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PublicKey::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An ed25519 signature, written as 128 hex digits.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        from_hex::<64>(&s).map(Signature).ok_or_else(|| serde::de::Error::custom("a signature is 128 hex digits"))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    #[error("a public key is written ed25519:<64 hex digits>")]
    BadKey,
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the proof does not lead from this agent to the signed set of agents")]
    BadProof,
}

/// What an operator sends with a signed job (`CreateJob.signature`). The signed agents are the
/// job's `target.agents`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSignature {
    pub key: PublicKey,
    pub signature: Signature,
    pub expires_at: Timestamp,
    /// Only agents whose own labels match run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
}

/// What travels with each `run` of a signed job: the signature and this agent's proof.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSignature {
    pub key: PublicKey,
    pub signature: Signature,
    pub expires_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// How many agents the job was signed for.
    pub agents: u64,
    /// Sibling hashes from this agent's leaf to the root: `l<hex>` when the sibling is on the
    /// left, `r<hex>` on the right.
    pub proof: Vec<String>,
}

/// A key revoked fleet-wide, signed by a trusted key (possibly the same one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyRevocation {
    pub key: PublicKey,
    pub by: PublicKey,
    pub signature: Signature,
}

impl KeyRevocation {
    pub fn statement(key: &PublicKey) -> Vec<u8> {
        let mut out = REVOCATION_DOMAIN.to_vec();
        out.extend_from_slice(key.bytes());
        out
    }

    pub fn verify(&self) -> Result<(), SigningError> {
        self.by.verify(&KeyRevocation::statement(&self.key), &self.signature)
    }
}

fn put(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The bytes an operator signs for a job (see docs/protocol.md, "Signed jobs").
pub fn job_statement(
    job_id: &str,
    command: &CommandSpec,
    agents_root: &[u8; 32],
    agents: u64,
    expires_at: Timestamp,
    selector: Option<&Selector>,
) -> Vec<u8> {
    let mut out = JOB_DOMAIN.to_vec();
    put(&mut out, job_id);
    match &command.program {
        Program::Argv(argv) => {
            out.push(1);
            out.extend_from_slice(&(argv.len() as u32).to_be_bytes());
            for a in argv {
                put(&mut out, a);
            }
        }
        Program::Shell(script) => {
            out.push(2);
            put(&mut out, script);
        }
    }
    match &command.cwd {
        None => out.push(0),
        Some(cwd) => {
            out.push(1);
            put(&mut out, cwd);
        }
    }
    out.extend_from_slice(&(command.env.len() as u32).to_be_bytes());
    for (k, v) in &command.env {
        put(&mut out, k);
        put(&mut out, v);
    }
    out.extend_from_slice(agents_root);
    out.extend_from_slice(&agents.to_be_bytes());
    out.extend_from_slice(&expires_at.unix_millis().to_be_bytes());
    match selector {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put(&mut out, &s.to_string());
        }
    }
    out
}

fn leaf(id: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(id.as_bytes());
    h.finalize().into()
}

fn node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The set of agents a job is signed for, as a Merkle tree over their sorted ids: leaves are
/// `SHA-256(0x00 || id)`, inner nodes `SHA-256(0x01 || left || right)`, and a node without a
/// sibling moves up a level unchanged.
#[derive(Clone, Debug)]
pub struct AgentSet {
    ids: Vec<String>,
    levels: Vec<Vec<[u8; 32]>>,
}

impl AgentSet {
    pub fn new<'a>(ids: impl IntoIterator<Item = &'a AgentId>) -> AgentSet {
        let mut ids: Vec<String> = ids.into_iter().map(|a| a.as_str().to_owned()).collect();
        ids.sort();
        ids.dedup();
        let mut levels = vec![ids.iter().map(|i| leaf(i)).collect::<Vec<_>>()];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let below = levels.last().map(Vec::as_slice).unwrap_or_default();
            let up = below.chunks(2).map(|p| if p.len() == 2 { node(&p[0], &p[1]) } else { p[0] }).collect();
            levels.push(up);
        }
        AgentSet { ids, levels }
    }

    pub fn len(&self) -> u64 {
        self.ids.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn root(&self) -> [u8; 32] {
        self.levels.last().and_then(|l| l.first()).copied().unwrap_or([0; 32])
    }

    /// The proof that `id` is in the set, or None if it is not.
    pub fn proof(&self, id: &AgentId) -> Option<Vec<String>> {
        let mut i = self.ids.binary_search_by(|x| x.as_str().cmp(id.as_str())).ok()?;
        let mut out = Vec::new();
        for level in &self.levels[..self.levels.len() - 1] {
            let sibling = i ^ 1;
            if let Some(h) = level.get(sibling) {
                out.push(format!("{}{}", if sibling < i { 'l' } else { 'r' }, to_hex(h)));
            }
            i /= 2;
        }
        Some(out)
    }
}

/// The root that `proof` leads to from `id`'s leaf.
pub fn root_from_proof(id: &AgentId, proof: &[String]) -> Result<[u8; 32], SigningError> {
    let mut h = leaf(id.as_str());
    if proof.len() > 64 {
        return Err(SigningError::BadProof);
    }
    for step in proof {
        let (side, hex) = step.split_at_checked(1).ok_or(SigningError::BadProof)?;
        let sibling = from_hex::<32>(hex).ok_or(SigningError::BadProof)?;
        h = match side {
            "l" => node(&sibling, &h),
            "r" => node(&h, &sibling),
            _ => return Err(SigningError::BadProof),
        };
    }
    Ok(h)
}

impl RunSignature {
    /// Checks that this signature covers `job_id` and `command` for agent `me`, by `key`.
    /// Expiry, trust in the key, the selector and replays are the agent's to check.
    pub fn verify(&self, job_id: &str, command: &CommandSpec, me: &AgentId) -> Result<(), SigningError> {
        let root = root_from_proof(me, &self.proof)?;
        let statement = job_statement(job_id, command, &root, self.agents, self.expires_at, self.selector.as_ref());
        self.key.verify(&statement, &self.signature)
    }
}

pub fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for byte in b {
        s.push(DIGITS[usize::from(byte >> 4)] as char);
        s.push(DIGITS[usize::from(byte & 15)] as char);
    }
    s
}

fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ring::signature::KeyPair;

    use super::*;

    fn ids(n: usize) -> Vec<AgentId> {
        (0..n).map(|i| AgentId::parse(&format!("{i:0width$x}", width = AgentId::LEN)).unwrap()).collect()
    }

    fn key() -> ring::signature::Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    #[test]
    fn every_member_proves_its_place_and_nobody_else_can() {
        for n in [1, 2, 3, 5, 8, 13, 100] {
            let all = ids(n + 1);
            let (members, outsider) = (&all[..n], &all[n]);
            let set = AgentSet::new(members);
            for id in members {
                let proof = set.proof(id).unwrap();
                assert_eq!(root_from_proof(id, &proof).unwrap(), set.root(), "n={n}");
                assert_ne!(root_from_proof(outsider, &proof).unwrap(), set.root(), "a proof is for one agent");
            }
            assert!(set.proof(outsider).is_none());
        }
    }

    #[test]
    fn a_signed_run_verifies_for_its_agent_and_not_for_changes() {
        let kp = key();
        let public = PublicKey::from_bytes(kp.public_key().as_ref().try_into().unwrap());
        let agents = ids(10);
        let set = AgentSet::new(&agents);
        let command =
            CommandSpec { program: Program::Argv(vec!["uptime".into()]), cwd: None, env: BTreeMap::new(), secret_env: Default::default() };
        let expires = Timestamp::from_unix_millis(1_900_000_000_000);
        let statement = job_statement("0123456789abcdef0123456789abcdef", &command, &set.root(), set.len(), expires, None);
        let signature = Signature(kp.sign(&statement).as_ref().try_into().unwrap());
        let run = |id: &AgentId| RunSignature {
            key: public.clone(),
            signature: signature.clone(),
            expires_at: expires,
            selector: None,
            agents: set.len(),
            proof: set.proof(id).unwrap(),
        };
        let sig = run(&agents[3]);
        assert_eq!(sig.verify("0123456789abcdef0123456789abcdef", &command, &agents[3]), Ok(()));
        // Another agent, another job id, another command, a later expiry: all refused.
        assert!(sig.verify("0123456789abcdef0123456789abcdef", &command, &agents[4]).is_err());
        assert!(sig.verify("0123456789abcdef0123456789abcdee", &command, &agents[3]).is_err());
        let mut other = command.clone();
        other.env.insert("LD_PRELOAD".into(), "/tmp/x.so".into());
        assert!(sig.verify("0123456789abcdef0123456789abcdef", &other, &agents[3]).is_err());
        let mut later = sig.clone();
        later.expires_at = Timestamp::from_unix_millis(1_900_000_000_001);
        assert!(later.verify("0123456789abcdef0123456789abcdef", &command, &agents[3]).is_err());
        let mut selected = sig.clone();
        selected.selector = Some(Selector::parse("site=paris").unwrap());
        assert!(selected.verify("0123456789abcdef0123456789abcdef", &command, &agents[3]).is_err());
        // A revocation verifies only for the key it names.
        let revoked = PublicKey::from_bytes([7; 32]);
        let r = KeyRevocation {
            key: revoked.clone(),
            by: public.clone(),
            signature: Signature(kp.sign(&KeyRevocation::statement(&revoked)).as_ref().try_into().unwrap()),
        };
        assert_eq!(r.verify(), Ok(()));
        assert!(KeyRevocation { key: public.clone(), ..r }.verify().is_err());
    }

    #[test]
    fn keys_and_signatures_round_trip_as_text() {
        let k = PublicKey::from_bytes([0xab; 32]);
        assert_eq!(PublicKey::parse(&k.to_string()).unwrap(), k);
        assert!(PublicKey::parse("ed25519:abc").is_err());
        assert!(PublicKey::parse(&k.to_string().to_uppercase()).is_err());
        let s: Signature = serde_json::from_str(&format!("\"{}\"", "0f".repeat(64))).unwrap();
        assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{}\"", "0f".repeat(64)));
    }
}
