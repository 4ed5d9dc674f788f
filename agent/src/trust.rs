//! Signed jobs on the agent: with `trusted_keys` in agent.toml, a run starts only if its
//! signature verifies with one of them, names this agent, has not expired, matches the
//! agent's own labels when it carries a selector, and belongs to a job this agent has not run
//! before. The server relays signatures and proofs; it cannot make one.
//!
//! **Invariant:** a signed job id is written to `signed-jobs` on disk (and synced) before its
//! run is accepted, and kept until the signature expires, so a replay is refused even across
//! an agent restart.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use shared::protocol::Run;
use shared::signing::{CLOCK_SKEW_MS, KeyRevocation, MAX_VALIDITY_MS, PublicKey};
use shared::{AgentId, JobId, Labels, Timestamp};

const SEEN_FILE: &str = "signed-jobs";
const REVOKED_FILE: &str = "revoked-keys.json";

pub struct Trust {
    keys: BTreeSet<PublicKey>,
    labels: Labels,
    dir: PathBuf,
    seen: Mutex<BTreeMap<JobId, i64>>,
    revoked: Mutex<Vec<KeyRevocation>>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").field("keys", &self.keys).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Trust {
    /// Loads what this agent remembers: signed job ids not yet expired, and revoked keys (each
    /// checked again).
    pub fn open(state_dir: &Path, keys: &[PublicKey], labels: &Labels) -> std::io::Result<Trust> {
        let now = Timestamp::now().unix_millis();
        let mut seen = BTreeMap::new();
        if let Ok(text) = std::fs::read_to_string(state_dir.join(SEEN_FILE)) {
            for line in text.lines() {
                if let Some((id, exp)) = line.split_once(' ')
                    && let Ok(id) = JobId::parse(id)
                    && let Ok(exp) = exp.parse::<i64>()
                    && exp.saturating_add(CLOCK_SKEW_MS) >= now
                {
                    seen.insert(id, exp);
                }
            }
        }
        let mut revoked: Vec<KeyRevocation> = match std::fs::read(state_dir.join(REVOKED_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        revoked.retain(|r| keys.contains(&r.by) && r.verify().is_ok());
        // The agent's own labels, also under the `agent.` prefix the server shows them with.
        let own = labels.with_reported(labels);
        let trust = Trust {
            keys: keys.iter().cloned().collect(),
            labels: own,
            dir: state_dir.to_owned(),
            seen: Mutex::new(seen),
            revoked: Mutex::new(revoked),
        };
        if !trust.keys.is_empty() {
            trust.rewrite_seen()?;
        }
        Ok(trust)
    }

    /// Whether this agent runs only signed jobs.
    pub fn required(&self) -> bool {
        !self.keys.is_empty()
    }

    fn is_revoked(&self, key: &PublicKey) -> bool {
        lock(&self.revoked).iter().any(|r| &r.key == key)
    }

    /// Checks a run against the trusted keys; on success the job id is remembered on disk.
    pub fn admit(&self, run: &Run, me: Option<&AgentId>, now: Timestamp) -> Result<(), String> {
        if !self.required() {
            return Ok(());
        }
        let Some(sig) = &run.signature else {
            return Err("not signed: this agent runs only jobs signed by a trusted key".into());
        };
        if !self.keys.contains(&sig.key) {
            return Err(format!("not signed by a trusted key ({} is not in trusted_keys)", sig.key));
        }
        if self.is_revoked(&sig.key) {
            return Err(format!("signed by a revoked key ({})", sig.key));
        }
        let me = me.ok_or("the agent does not know its own id yet")?;
        sig.verify(&run.job_id, &run.command, me).map_err(|e| format!("signature refused: {e}"))?;
        let (now, exp) = (now.unix_millis(), sig.expires_at.unix_millis());
        if now > exp.saturating_add(CLOCK_SKEW_MS) {
            return Err(format!("signature expired at {}", sig.expires_at));
        }
        if exp.saturating_sub(now) > MAX_VALIDITY_MS + CLOCK_SKEW_MS {
            return Err(format!("signature valid until {}: more than the 31 days an agent accepts", sig.expires_at));
        }
        if let Some(sel) = &sig.selector
            && !sel.matches(&self.labels)
        {
            return Err(format!("the signed selector {sel} does not match this agent's own labels"));
        }
        let mut seen = lock(&self.seen);
        if seen.contains_key(&run.job_id) {
            return Err(format!("job {} already ran here: a signed job runs once per agent (replayed)", run.job_id));
        }
        self.remember(&run.job_id, exp).map_err(|e| format!("the agent could not record the signed job: {e}"))?;
        seen.insert(run.job_id.clone(), exp);
        Ok(())
    }

    fn remember(&self, job_id: &str, exp: i64) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(SEEN_FILE))?;
        writeln!(f, "{job_id} {exp}")?;
        f.sync_data()
    }

    /// The file holds only ids not yet expired.
    fn rewrite_seen(&self) -> std::io::Result<()> {
        let text: String = lock(&self.seen).iter().map(|(id, exp)| format!("{id} {exp}\n")).collect();
        let path = self.dir.join(SEEN_FILE);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(tmp, path)
    }

    /// A revocation from the server: kept (on disk) only if a trusted key signed it.
    pub fn revoke(&self, r: &KeyRevocation) -> Result<bool, String> {
        if !self.keys.contains(&r.by) {
            return Err(format!("revocation signed by {}, which this agent does not trust", r.by));
        }
        r.verify().map_err(|e| format!("revocation refused: {e}"))?;
        let mut revoked = lock(&self.revoked);
        if revoked.iter().any(|x| x.key == r.key) {
            return Ok(false);
        }
        revoked.push(r.clone());
        let bytes = serde_json::to_vec(&*revoked).map_err(|e| e.to_string())?;
        let path = self.dir.join(REVOKED_FILE);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path)).map_err(|e| format!("cannot store the revocation: {e}"))?;
        Ok(true)
    }

    /// For `muster-agent check`.
    pub fn describe(&self) -> Vec<String> {
        if self.keys.is_empty() {
            return vec!["signed jobs: not required (no trusted_keys)".into()];
        }
        let mut out = vec![format!("signed jobs: required, {} trusted keys", self.keys.len())];
        for k in &self.keys {
            out.push(format!("  trusted key {k}{}", if self.is_revoked(k) { " (revoked)" } else { "" }));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use ring::signature::{Ed25519KeyPair, KeyPair};
    use shared::job::{CommandSpec, Program};
    use shared::signing::{AgentSet, RunSignature, Signature};

    use super::*;

    struct Op(Ed25519KeyPair, PublicKey);

    fn operator() -> Op {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public = PublicKey::from_bytes(pair.public_key().as_ref().try_into().unwrap());
        Op(pair, public)
    }

    fn signed_run(op: &Op, job: &str, me: &AgentId, expires: Timestamp) -> Run {
        let command = CommandSpec {
            program: Program::Argv(vec!["/bin/true".into()]),
            cwd: None,
            env: Default::default(),
            secret_env: Default::default(),
        };
        let set = AgentSet::new([me]);
        let statement = shared::signing::job_statement(job, &command, &set.root(), 1, expires, None);
        Run {
            run_id: "00000000000000aa".parse().unwrap(),
            job_id: job.parse().unwrap(),
            command,
            timeout_ms: 1000,
            output_limit: 1024,
            signature: Some(Box::new(RunSignature {
                key: op.1.clone(),
                signature: Signature(op.0.sign(&statement).as_ref().try_into().unwrap()),
                expires_at: expires,
                selector: None,
                agents: 1,
                proof: set.proof(me).unwrap(),
            })),
        }
    }

    #[test]
    fn expiry_is_checked_with_a_margin_for_clocks_and_long_validity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let op = operator();
        let me = AgentId::parse("00000000000000a1").unwrap();
        let trust = Trust::open(dir.path(), std::slice::from_ref(&op.1), &Labels::new()).unwrap();
        let now = Timestamp::now();
        let old = signed_run(&op, &"1".repeat(32), &me, now.saturating_sub(std::time::Duration::from_secs(600)));
        assert!(trust.admit(&old, Some(&me), now).unwrap_err().contains("expired"));
        let skewed = signed_run(&op, &"2".repeat(32), &me, now.saturating_sub(std::time::Duration::from_secs(60)));
        assert_eq!(trust.admit(&skewed, Some(&me), now), Ok(()), "within the clock margin");
        let forever = signed_run(&op, &"3".repeat(32), &me, now.saturating_add(std::time::Duration::from_secs(90 * 86_400)));
        assert!(trust.admit(&forever, Some(&me), now).unwrap_err().contains("31 days"));
    }

    #[test]
    fn a_job_id_is_admitted_once_even_across_a_restart_and_unsigned_runs_only_without_keys() {
        let dir = tempfile::tempdir().unwrap();
        let op = operator();
        let me = AgentId::parse("00000000000000a1").unwrap();
        let later = Timestamp::now().saturating_add(std::time::Duration::from_secs(600));
        let run = signed_run(&op, &"4".repeat(32), &me, later);
        let trust = Trust::open(dir.path(), std::slice::from_ref(&op.1), &Labels::new()).unwrap();
        assert_eq!(trust.admit(&run, Some(&me), Timestamp::now()), Ok(()));
        assert!(trust.admit(&run, Some(&me), Timestamp::now()).unwrap_err().contains("already ran here"));
        let reopened = Trust::open(dir.path(), std::slice::from_ref(&op.1), &Labels::new()).unwrap();
        assert!(reopened.admit(&run, Some(&me), Timestamp::now()).unwrap_err().contains("already ran here"));
        let mut unsigned = run.clone();
        unsigned.signature = None;
        assert!(reopened.admit(&unsigned, Some(&me), Timestamp::now()).unwrap_err().contains("not signed"));
        let open = Trust::open(tempfile::tempdir().unwrap().path(), &[], &Labels::new()).unwrap();
        assert_eq!(open.admit(&unsigned, Some(&me), Timestamp::now()), Ok(()), "no trusted_keys: as before");
    }
}
