//! The audit log's writer: every entry goes through an [`Auditor`], which appends it to the
//! chain in the store and, once that is committed, copies it as one JSON line to
//! `audit_file` if one is set. Refused credentials are summed per source address and written
//! at most once a minute per address, so a flood of bad tokens costs a bounded number of
//! entries (docs/audit.md, "Refused credentials").
//!
//! **Invariant:** no entry holds a secret. Credentials are named by their ids (the part before
//! the secret), a job's environment by its variable names only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::auth::AuthError;
use crate::store::{AuditEntry, Store};

/// Refusals from one address are written as one entry per this window.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(60);
/// Addresses that get an entry of their own per window; refusals from further addresses in the
/// same window are summed into one entry without an address. So refusals cost at most
/// `MAX_REFUSING_ADDRESSES + 1` entries a minute, whatever their number and origin.
pub const MAX_REFUSING_ADDRESSES: usize = 16;
/// Distinct credential ids named in one refusal entry.
const MAX_IDS: usize = 8;
/// Agent ids listed in a job's entries; the count is always there.
pub const MAX_LISTED_AGENTS: usize = 100;

/// Who refused credentials are recorded as.
pub const UNAUTHENTICATED: &str = "unauthenticated";

#[derive(Clone)]
pub struct Auditor {
    store: Arc<dyn Store>,
    file: Option<PathBuf>,
    /// Held from the append to the file copy, so that the file's lines are in the chain's
    /// order for the entries this process writes.
    order: Arc<tokio::sync::Mutex<()>>,
    refusals: Arc<Mutex<Refusals>>,
}

/// Refusals not yet written, for the current window.
#[derive(Default)]
struct Refusals {
    by_address: HashMap<IpAddr, Tally>,
    /// Refusals from addresses past [`MAX_REFUSING_ADDRESSES`].
    others: Option<Tally>,
}

struct Tally {
    first_at: Timestamp,
    last_at: Timestamp,
    count: u64,
    reasons: BTreeMap<&'static str, u64>,
    via: BTreeMap<&'static str, u64>,
    ids: BTreeSet<String>,
}

impl Tally {
    fn new(at: Timestamp) -> Self {
        Tally { first_at: at, last_at: at, count: 0, reasons: BTreeMap::new(), via: BTreeMap::new(), ids: BTreeSet::new() }
    }

    fn add(&mut self, at: Timestamp, via: &'static str, reason: &AuthError, id: Option<String>) {
        self.last_at = at;
        self.count += 1;
        *self.reasons.entry(reason.code()).or_default() += 1;
        *self.via.entry(via).or_default() += 1;
        if let Some(id) = id
            && self.ids.len() < MAX_IDS
        {
            self.ids.insert(id);
        }
    }

    fn entry(self, address: Option<String>, now: Timestamp) -> AuditEntry {
        AuditEntry {
            at: now,
            actor: UNAUTHENTICATED.into(),
            address,
            action: "auth.refused".into(),
            target: None,
            detail: serde_json::json!({
                "refusals": self.count,
                "first_at": self.first_at.to_string(),
                "last_at": self.last_at.to_string(),
                "reasons": self.reasons,
                "via": self.via,
                "credential_ids": self.ids,
            }),
        }
    }
}

impl Auditor {
    pub fn new(store: Arc<dyn Store>, file: Option<PathBuf>) -> Self {
        Auditor { store, file, order: Arc::default(), refusals: Arc::default() }
    }

    /// Appends an entry. A failure is logged loudly but does not undo the audited action.
    pub async fn record(&self, entry: AuditEntry) {
        let _order = self.order.lock().await;
        match self.store.audit(&entry).await {
            Ok(written) => self.ship(&written).await,
            Err(e) => tracing::error!(error = %e, action = %entry.action, actor = %entry.actor, "could not write audit entry"),
        }
    }

    /// Copies committed entries to the audit file, one JSON line each.
    pub async fn ship(&self, written: &[shared::api::AuditEntry]) {
        let Some(path) = &self.file else { return };
        let mut text = String::new();
        for e in written {
            match serde_json::to_string(e) {
                Ok(line) => {
                    text.push_str(&line);
                    text.push('\n');
                }
                Err(err) => tracing::error!(error = %err, id = e.id, "could not encode audit entry for the audit file"),
            }
        }
        if let Err(e) = append_file(path, text.as_bytes()).await {
            tracing::error!(error = %e, path = %path.display(), "could not append to the audit file");
        }
    }

    /// Notes a refused credential from `ip`; written with the others from there at the end
    /// of the window. `credential_id` is the id part of the credential (`mst_<id>`), never its
    /// secret.
    pub fn refused(&self, ip: IpAddr, via: &'static str, reason: &AuthError, credential_id: Option<String>) {
        let key = crate::admission::source(ip);
        let now = Timestamp::now();
        let mut r = self.refusals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let full = r.by_address.len() >= MAX_REFUSING_ADDRESSES;
        let tally = if full && !r.by_address.contains_key(&key) {
            r.others.get_or_insert_with(|| Tally::new(now))
        } else {
            r.by_address.entry(key).or_insert_with(|| Tally::new(now))
        };
        tally.add(now, via, reason, credential_id);
    }

    /// Writes the refusals noted since the last flush: one entry per address, and one for the
    /// addresses past the cap.
    pub async fn flush_refusals(&self) {
        let taken = std::mem::take(&mut *self.refusals.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let now = Timestamp::now();
        let mut by_address: Vec<(IpAddr, Tally)> = taken.by_address.into_iter().collect();
        by_address.sort_by_key(|(_, t)| t.first_at);
        for (ip, tally) in by_address {
            self.record(tally.entry(Some(ip.to_string()), now)).await;
        }
        if let Some(others) = taken.others {
            let mut e = others.entry(None, now);
            if let Some(d) = e.detail.as_object_mut() {
                d.insert("addresses_over_cap".into(), serde_json::Value::Bool(true));
            }
            self.record(e).await;
        }
    }

    /// Flushes refusals every [`REFUSAL_WINDOW`], and once more at shutdown.
    pub async fn run(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(REFUSAL_WINDOW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => self.flush_refusals().await,
            }
        }
        self.flush_refusals().await;
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

async fn append_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    // Opened for each batch, so a rotated file is followed at once.
    let mut f = tokio::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).await?;
    f.write_all(bytes).await?;
    f.sync_data().await
}

/// A job's agents for its entries: how many, and the first [`MAX_LISTED_AGENTS`] ids.
pub fn agents_detail<'a>(ids: impl ExactSizeIterator<Item = &'a str>) -> serde_json::Value {
    let total = ids.len();
    let listed: Vec<&str> = ids.take(MAX_LISTED_AGENTS).collect();
    serde_json::json!({ "count": total, "ids": listed, "ids_cut": total > MAX_LISTED_AGENTS })
}

/// A command for its entry: the program and directory, and the environment's names only (its
/// values may hold credentials).
pub fn command_detail(c: &shared::job::CommandSpec) -> serde_json::Value {
    let mut v = serde_json::Map::new();
    match &c.program {
        shared::job::Program::Argv(argv) => v.insert("argv".into(), serde_json::json!(argv)),
        shared::job::Program::Shell(script) => v.insert("shell".into(), serde_json::json!(script)),
    };
    if let Some(cwd) = &c.cwd {
        v.insert("cwd".into(), serde_json::json!(cwd));
    }
    if !c.env.is_empty() {
        v.insert("env_names".into(), serde_json::json!(c.env.keys().collect::<Vec<_>>()));
    }
    if !c.secret_env.is_empty() {
        // A digest, so an auditor can tell two uses of the same secret apart from two secrets.
        use sha2::Digest;
        let digests: serde_json::Map<String, serde_json::Value> = c
            .secret_env
            .iter()
            .filter_map(|n| {
                c.env.get(n).map(|v| (n.clone(), serde_json::json!(format!("sha256:{}", hex::encode(sha2::Sha256::digest(v.as_bytes()))))))
            })
            .collect();
        v.insert("secret_env_sha256".into(), serde_json::Value::Object(digests));
    }
    serde_json::Value::Object(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jobs_agents_are_counted_and_listed_up_to_the_bound() {
        let ids: Vec<String> = (0..250).map(|i| format!("{i:016x}")).collect();
        let d = agents_detail(ids.iter().map(String::as_str));
        assert_eq!(d["count"], 250);
        assert_eq!(d["ids"].as_array().map(Vec::len), Some(MAX_LISTED_AGENTS));
        assert_eq!(d["ids_cut"], true);
    }

    #[tokio::test]
    async fn refusals_from_many_addresses_cost_a_bounded_number_of_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::open(&dir.path().join("t.db")).await.unwrap());
        let auditor = Auditor::new(store.clone(), None);
        for n in 0..1000u32 {
            let ip = IpAddr::from([10, 0, (n / 250) as u8, (n % 250) as u8]);
            auditor.refused(ip, "api", &AuthError::Wrong, Some(format!("mst_{n:016x}")));
            auditor.refused(ip, "agent", &AuthError::Malformed, None);
        }
        auditor.flush_refusals().await;
        let q = crate::store::AuditQuery { action: Some("auth.refused".into()), limit: 1000, ..Default::default() };
        let entries = store.audit_entries(&q).await.unwrap();
        assert_eq!(entries.len(), MAX_REFUSING_ADDRESSES + 1);
        assert_eq!(entries.iter().map(|e| e.detail["refusals"].as_u64().unwrap()).sum::<u64>(), 2000);
        let others = entries.iter().find(|e| e.address.is_none()).unwrap();
        assert_eq!((others.detail["refusals"].as_u64(), others.detail["addresses_over_cap"].as_bool()), (Some(2000 - 32), Some(true)));
        assert!(entries.iter().all(|e| e.detail["credential_ids"].as_array().unwrap().len() <= MAX_IDS));
        auditor.flush_refusals().await;
        assert_eq!(store.audit_entries(&q).await.unwrap().len(), MAX_REFUSING_ADDRESSES + 1, "nothing left to write");
    }

    #[test]
    fn a_commands_environment_values_are_left_out() {
        let c = shared::job::CommandSpec {
            program: shared::job::Program::Argv(vec!["deploy".into()]),
            cwd: None,
            env: [("API_KEY".to_owned(), "s3cret".to_owned())].into_iter().collect(),
            secret_env: ["API_KEY".to_owned()].into_iter().collect(),
        };
        let text = command_detail(&c).to_string();
        assert!(text.contains("API_KEY") && text.contains("deploy"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
