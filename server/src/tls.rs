//! The server's TLS identity: PEM files given in the config, or a CA and a server certificate
//! generated into `<data_dir>/tls` on first start and reused on every later start, so agents
//! that trust the CA keep trusting the server.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsSource;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where the generated files live.
pub struct GeneratedPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl GeneratedPaths {
    pub fn new(data_dir: &Path) -> Self {
        let dir = data_dir.join("tls");
        GeneratedPaths {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
        }
    }
}

/// The loaded identity, and the CA file agents and operators should trust if it was generated.
pub struct Identity {
    pub config: Arc<ServerConfig>,
    pub ca_file: Option<PathBuf>,
}

pub fn load(source: &TlsSource, data_dir: &Path) -> Result<Identity, TlsError> {
    let (cert, key, ca_file) = match source {
        TlsSource::Files { cert, key } => (cert.clone(), key.clone(), None),
        TlsSource::Generated { hostnames } => {
            let paths = GeneratedPaths::new(data_dir);
            ensure_generated(&paths, hostnames)?;
            (paths.cert, paths.key, Some(paths.ca_cert))
        }
    };
    let mut chain = read_certs(&cert)?;
    // A generated identity presents its CA too, so an agent can pin the CA by fingerprint
    // (`muster-agent install --ca-fingerprint`) without having the file beforehand.
    if let Some(ca) = &ca_file {
        chain.extend(read_certs(ca)?);
    }
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| TlsError::Pem { path: key.clone(), message: e.to_string() })?;
    let mut config = ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key)?;
    // WebSocket upgrades need HTTP/1.1; the API is served over it too.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Identity { config: Arc::new(config), ca_file })
}

pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |message: String| TlsError::Pem { path: path.to_owned(), message };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate found".into()));
    }
    Ok(certs)
}

/// The CA's parameters. Its name carries a digest of its own public key: unique per CA (two
/// servers' CAs are never confused), yet derived again exactly from the key on disk, so a
/// reloaded key issues certificates whose issuer matches the CA certificate.
fn ca_params(key: &KeyPair) -> Result<CertificateParams, rcgen::Error> {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.public_key_raw());
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Muster");
    dn.push(DnType::CommonName, format!("Muster generated CA {}", hex::encode(&digest[..6])));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// Creates whatever is missing: the CA (only if it has neither certificate nor key) and the
/// server certificate, signed by the CA.
fn ensure_generated(paths: &GeneratedPaths, extra_names: &[String]) -> Result<(), TlsError> {
    if paths.cert.exists() && paths.key.exists() && paths.ca_cert.exists() {
        return Ok(());
    }
    let dir = paths.cert.parent().unwrap_or(Path::new("."));
    crate::app::create_private_dir(dir).map_err(|source| TlsError::Write { path: dir.to_owned(), source })?;

    let ca_key = if paths.ca_key.exists() && paths.ca_cert.exists() {
        let pem = std::fs::read_to_string(&paths.ca_key).map_err(|source| TlsError::Read { path: paths.ca_key.clone(), source })?;
        KeyPair::from_pem(&pem)?
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params(&key)?.self_signed(&key)?;
        write_file(&paths.ca_key, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&paths.ca_cert, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(path = %paths.ca_cert.display(), "generated a CA for this server");
        key
    };
    // The issuer's name and key identifier derive from these parameters and the key, so a
    // reloaded CA key signs certificates that chain to the CA certificate on disk.
    let issuer = Issuer::new(ca_params(&ca_key)?, ca_key);

    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    if let Ok(host) = rustix::system::uname().nodename().to_str() {
        names.push(host.to_owned());
    }
    names.extend(extra_names.iter().cloned());
    names.sort();
    names.dedup();
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name.push(DnType::CommonName, "muster-server");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_file(&paths.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&paths.cert, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(path = %paths.cert.display(), "generated a server certificate");
    Ok(())
}

/// Writes a file atomically with the given mode: a reader sees the old file or the new one.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let werr = |source| TlsError::Write { path: path.to_owned(), source };
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(werr)?;
    f.write_all(contents).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, path).map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ensure_provider() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    #[test]
    fn generated_identity_is_reused_on_the_next_start() {
        ensure_provider();
        let dir = tempfile::tempdir().unwrap();
        let source = TlsSource::Generated { hostnames: vec!["muster.example".into()] };
        let first = load(&source, dir.path()).unwrap();
        let ca = std::fs::read(first.ca_file.as_ref().unwrap()).unwrap();
        let cert = std::fs::read(dir.path().join("tls/server.pem")).unwrap();
        load(&source, dir.path()).unwrap();
        assert_eq!(std::fs::read(dir.path().join("tls/ca.pem")).unwrap(), ca);
        assert_eq!(std::fs::read(dir.path().join("tls/server.pem")).unwrap(), cert);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls/server-key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_lost_server_certificate_is_reissued_by_the_same_ca() {
        ensure_provider();
        let dir = tempfile::tempdir().unwrap();
        let source = TlsSource::Generated { hostnames: vec![] };
        load(&source, dir.path()).unwrap();
        let ca = std::fs::read(dir.path().join("tls/ca.pem")).unwrap();
        std::fs::remove_file(dir.path().join("tls/server.pem")).unwrap();
        load(&source, dir.path()).unwrap();
        assert_eq!(std::fs::read(dir.path().join("tls/ca.pem")).unwrap(), ca);

        // The reissued certificate verifies against the CA on disk.
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(&dir.path().join("tls/ca.pem")).unwrap() {
            roots.add(c).unwrap();
        }
        use rustls::client::danger::ServerCertVerifier;
        let verifier = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots)).build().unwrap();
        let chain = read_certs(&dir.path().join("tls/server.pem")).unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        verifier.verify_server_cert(&chain[0], &[], &name, &[], rustls_pki_types::UnixTime::now()).unwrap();
    }

    #[test]
    fn a_missing_certificate_file_is_a_clear_error() {
        ensure_provider();
        let source = TlsSource::Files { cert: "/nonexistent/cert.pem".into(), key: "/nonexistent/key.pem".into() };
        let err = load(&source, Path::new("/tmp")).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }
}
