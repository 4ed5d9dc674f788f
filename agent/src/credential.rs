//! The agent's own credential, kept in its state directory with mode 0600 and written
//! atomically: a crash leaves the old file or the new one, never half of one.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shared::AgentId;

#[derive(Clone, Serialize, Deserialize)]
pub struct Credential {
    pub agent_id: AgentId,
    /// `msa_<agent id>_<secret>`, presented as a bearer token in the handshake.
    pub token: String,
    /// The server this credential belongs to.
    pub server: String,
    /// When the server issued it (at enrollment or by a rotation). Older files have none; the
    /// file's modification time stands in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<shared::Timestamp>,
}

impl Credential {
    /// Hex SHA-256 of the whole credential string: how the agent confirms which one it stored.
    pub fn sha256(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(self.token.as_bytes()))
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, {})", self.agent_id, self.server)
    }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("credential.json")
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid credential file: {message}")]
    Invalid { path: PathBuf, message: String },
}

pub fn load(state_dir: &Path) -> Result<Option<Credential>, CredentialError> {
    let path = path(state_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut c: Credential =
                serde_json::from_str(&text).map_err(|e| CredentialError::Invalid { path: path.clone(), message: e.to_string() })?;
            if c.issued_at.is_none() {
                let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                c.issued_at = modified.map(shared::Timestamp::from);
            }
            Ok(Some(c))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CredentialError::Io { path, source }),
    }
}

/// Creates the state directory if it is missing, private to the agent's user (0700): it holds
/// the credential and the output of every run. Its parents are created as usual. An existing
/// directory is left as it is, with a warning if others may read it.
pub fn create_state_dir(state_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = state_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(state_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && state_dir.is_dir() => {
            let mode = std::fs::metadata(state_dir)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %state_dir.display(),
                    mode = format!("{mode:o}"),
                    "the state directory is open to other users; it holds the agent's credential (chmod 700 it)"
                );
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

pub fn store(state_dir: &Path, credential: &Credential) -> Result<(), CredentialError> {
    let path = path(state_dir);
    let io = |source| CredentialError::Io { path: path.clone(), source };
    create_state_dir(state_dir).map_err(io)?;
    let tmp = path.with_extension("json.tmp");
    let text =
        serde_json::to_vec_pretty(credential).map_err(|e| CredentialError::Invalid { path: path.clone(), message: e.to_string() })?;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(&text).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    // The rename is durable only once the directory entry is.
    if let Ok(dir) = std::fs::File::open(state_dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_stored_credential_loads_back_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let c = Credential {
            agent_id: AgentId::from_bytes([1; 8]),
            token: "msa_x".into(),
            server: "https://h:1".into(),
            issued_at: Some(shared::Timestamp::from_unix_millis(5)),
        };
        store(dir.path(), &c).unwrap();
        let back = load(dir.path()).unwrap().unwrap();
        assert_eq!(back.agent_id, c.agent_id);
        assert_eq!(back.token, "msa_x");
        assert_eq!(back.issued_at, c.issued_at);
        assert_eq!(std::fs::metadata(path(dir.path())).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_missing_state_directory_is_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/state");
        create_state_dir(&state).unwrap();
        assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        create_state_dir(&state).unwrap();
    }

    #[test]
    fn a_credential_without_its_issue_time_dates_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), r#"{"agent_id":"0101010101010101","token":"msa_x","server":"https://h:1"}"#).unwrap();
        let back = load(dir.path()).unwrap().unwrap();
        let age = back.issued_at.expect("dated").age(shared::Timestamp::now());
        assert!(age < std::time::Duration::from_secs(3600), "{age:?}");
    }

    #[test]
    fn a_corrupt_credential_file_is_an_error_not_a_reenrollment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "{").unwrap();
        assert!(load(dir.path()).is_err());
    }
}
