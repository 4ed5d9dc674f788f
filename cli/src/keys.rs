//! Operator signing keys: `muster key generate|show|revoke`, and signing jobs for `muster run`.
//! The private key stays in its file (0600) and is never sent anywhere; only signatures and
//! the public key leave this machine.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use ring::signature::{Ed25519KeyPair, KeyPair};
use shared::job::{CommandSpec, JobId};
use shared::signing::{AgentSet, JobSignature, KeyRevocation, MAX_VALIDITY_MS, PublicKey, Signature};
use shared::{AgentId, Selector, Timestamp};

const HEADER: &str = "muster-signing-key-v1";

/// Where the key lives when `--signing-key` does not say: `$XDG_CONFIG_HOME/muster/signing.key`
/// or `~/.config/muster/signing.key`.
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("muster").join("signing.key"))
}

pub struct Signer {
    pair: Ed25519KeyPair,
    pub public: PublicKey,
}

impl Signer {
    pub fn load(path: &Path) -> anyhow::Result<Signer> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).with_context(|| format!("signing key {}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!("signing key {}: others can read it (mode {:o}); chmod 600 it", path.display(), meta.permissions().mode() & 0o777);
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("signing key {}", path.display()))?;
        let hex =
            text.trim().strip_prefix(HEADER).map(str::trim).with_context(|| format!("{} is not a Muster signing key", path.display()))?;
        let der = hex::decode(hex).with_context(|| format!("{} is not a Muster signing key", path.display()))?;
        let pair = Ed25519KeyPair::from_pkcs8(&der).map_err(|e| anyhow::anyhow!("signing key {}: {e}", path.display()))?;
        let public = PublicKey::from_bytes(pair.public_key().as_ref().try_into().context("an ed25519 public key is 32 bytes")?);
        Ok(Signer { pair, public })
    }

    fn sign(&self, message: &[u8]) -> anyhow::Result<Signature> {
        Ok(Signature(self.pair.sign(message).as_ref().try_into().context("an ed25519 signature is 64 bytes")?))
    }

    /// Signs a job for exactly these agents.
    pub fn sign_job(
        &self,
        job_id: &str,
        command: &CommandSpec,
        agents: &[AgentId],
        expires_at: Timestamp,
        selector: Option<&Selector>,
    ) -> anyhow::Result<JobSignature> {
        let set = AgentSet::new(agents);
        let statement = shared::signing::job_statement(job_id, command, &set.root(), set.len(), expires_at, selector);
        Ok(JobSignature { key: self.public.clone(), signature: self.sign(&statement)?, expires_at, selector: selector.cloned() })
    }

    pub fn revocation(&self, key: &PublicKey) -> anyhow::Result<KeyRevocation> {
        Ok(KeyRevocation { key: key.clone(), by: self.public.clone(), signature: self.sign(&KeyRevocation::statement(key))? })
    }
}

/// Writes a new key pair to `path` (0600; refuses to replace one unless `force`).
pub fn generate(path: &Path, force: bool) -> anyhow::Result<PublicKey> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("no randomness for a new key"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    writeln!(f, "{HEADER} {}", hex::encode(pkcs8.as_ref()))?;
    f.sync_all()?;
    drop(f);
    if !force && path.exists() {
        let _ = std::fs::remove_file(&tmp);
        bail!("{} exists: a key is not replaced by accident (--force replaces it)", path.display());
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(Signer::load(path)?.public)
}

/// A job id for a signed job: 128 random bits.
pub fn new_job_id() -> anyhow::Result<JobId> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness for a job id"))?;
    Ok(JobId::from_client_bytes(bytes))
}

/// How long a signature stays valid: the job's ttl and timeout, plus a margin for clocks,
/// within what agents accept.
pub fn expiry(ttl: Duration, timeout: Duration) -> Timestamp {
    let margin = Duration::from_secs(300);
    let validity = (ttl + timeout + margin).min(Duration::from_millis(MAX_VALIDITY_MS as u64));
    Timestamp::now().saturating_add(validity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_is_private_loads_back_and_is_not_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k").join("signing.key");
        let public = generate(&path, false).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Signer::load(&path).unwrap().public, public);
        assert!(generate(&path, false).unwrap_err().to_string().contains("exists"));
        assert_eq!(Signer::load(&path).unwrap().public, public, "the old key is intact");
        assert_ne!(generate(&path, true).unwrap(), public);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Signer::load(&path).err().unwrap().to_string().contains("chmod 600"));
    }

    #[test]
    fn a_signed_job_verifies_on_each_named_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        generate(&path, false).unwrap();
        let signer = Signer::load(&path).unwrap();
        let agents: Vec<AgentId> = (0..5).map(|i| AgentId::parse(&format!("{i:016x}")).unwrap()).collect();
        let command = CommandSpec {
            program: shared::job::Program::Shell("uptime".into()),
            cwd: None,
            env: Default::default(),
            secret_env: Default::default(),
        };
        let id = new_job_id().unwrap();
        assert!(id.is_client_chosen());
        let exp = expiry(Duration::from_secs(600), Duration::from_secs(60));
        let sig = signer.sign_job(&id, &command, &agents, exp, None).unwrap();
        let set = AgentSet::new(&agents);
        for a in &agents {
            let run = shared::signing::RunSignature {
                key: sig.key.clone(),
                signature: sig.signature.clone(),
                expires_at: exp,
                selector: None,
                agents: 5,
                proof: set.proof(a).unwrap(),
            };
            assert_eq!(run.verify(&id, &command, a), Ok(()));
        }
    }
}
