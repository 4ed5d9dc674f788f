//! The server's TLS identity: PEM files given in the config, or a CA and a server certificate
//! generated into `<data_dir>/tls` on first start and reused on every later start, so agents
//! that trust the CA keep trusting the server.
//!
//! The generated CA vouches only for the names it was made for: it carries X.509 name
//! constraints whose permitted subtrees are exactly the server's DNS names (and their
//! subdomains) and IP addresses, so its key, were it stolen, could not impersonate any other
//! site to a client that trusts the CA (rustls/webpki, browsers and OpenSSL enforce them). It is
//! valid for [`CA_VALIDITY`]. The server certificate it signs is valid for [`CERT_VALIDITY`]
//! and is renewed once less than a third of that remains: at start, and while running by a
//! check every [`RENEW_CHECK_EVERY`] that swaps the served certificate in place ([`Served`], a
//! rustls `ResolvesServerCert`), with no restart and no dropped connection.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints,
};
use rustls::ServerConfig;
use rustls::client::danger::ServerCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use shared::Timestamp;
use tokio_util::sync::CancellationToken;
use x509_parser::extensions::GeneralName;

use crate::config::TlsSource;

/// How long a generated CA is valid. Past it, every certificate it signed stops verifying:
/// a new CA must be generated and given to the agents (README, "The generated CA").
pub const CA_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// How long a generated server certificate is valid (never past its CA).
pub const CERT_VALIDITY: Duration = Duration::from_secs(90 * 86_400);
/// How often a running server checks whether its certificate is due for renewal.
pub const RENEW_CHECK_EVERY: Duration = Duration::from_secs(3600);
/// The server warns, at start and daily, when its CA has less than this left.
pub const CA_WARN_BEFORE: Duration = Duration::from_secs(60 * 86_400);
/// Certificates start this far in the past, for clients whose clocks are a little behind.
const BACKDATE: Duration = Duration::from_secs(3600);

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
    #[error("tls_hostnames: {0}")]
    Name(String),
    #[error("a certificate cannot be dated {0} (unix time)")]
    Date(i64),
    #[error(
        "the generated CA {path} expired at {at}: move {dir} aside so that a new CA is generated, then give the agents the new CA (muster-agent install --ca-fingerprint)",
        dir = path.parent().unwrap_or(Path::new(".")).display()
    )]
    CaExpired { path: PathBuf, at: Timestamp },
    #[error(
        "the generated CA {path} may vouch only for {permitted}, not for {name}: move {dir} aside so that a new CA is generated for the new names, then give the agents the new CA",
        dir = path.parent().unwrap_or(Path::new(".")).display()
    )]
    OutsideCa { path: PathBuf, name: String, permitted: String },
}

/// A name the generated certificate is for: a DNS name (lower case, no trailing dot) or an IP
/// address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Name {
    Dns(String),
    Ip(IpAddr),
}

impl Name {
    pub fn parse(s: &str) -> Result<Name, String> {
        let s = s.trim();
        if let Ok(ip) = s.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Ok(Name::Ip(ip));
        }
        let dns = s.trim_end_matches('.').to_ascii_lowercase();
        match rustls_pki_types::DnsName::try_from(dns.as_str()) {
            Ok(_) => Ok(Name::Dns(dns)),
            Err(_) => Err(format!("{s:?} is neither a DNS name nor an IP address")),
        }
    }

    fn from_general(g: &GeneralName<'_>) -> Option<Name> {
        match g {
            GeneralName::DNSName(d) => Some(Name::Dns(d.to_ascii_lowercase())),
            GeneralName::IPAddress(b) => ip_from_bytes(b).map(Name::Ip),
            _ => None,
        }
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Name::Dns(d) => f.write_str(d),
            Name::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
        _ => None,
    }
}

/// One permitted subtree of a CA's name constraints, as RFC 5280 reads it.
#[derive(Clone, Debug, PartialEq)]
enum Permit {
    /// The name and every name under it.
    Dns(String),
    /// The addresses whose masked bits equal `addr`'s.
    Ip { addr: Vec<u8>, mask: Vec<u8> },
}

impl Permit {
    fn allows(&self, name: &Name) -> bool {
        match (self, name) {
            (Permit::Dns(base), Name::Dns(n)) => {
                let base = base.trim_start_matches('.').to_ascii_lowercase();
                *n == base || n.strip_suffix(&base).is_some_and(|head| head.ends_with('.'))
            }
            (Permit::Ip { addr, mask }, Name::Ip(ip)) => {
                let octets = match ip {
                    IpAddr::V4(v4) => v4.octets().to_vec(),
                    IpAddr::V6(v6) => v6.octets().to_vec(),
                };
                octets.len() == addr.len() && octets.iter().zip(mask).zip(addr).all(|((o, m), a)| o & m == a & m)
            }
            _ => false,
        }
    }
}

/// A certificate's validity, in unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// Due for renewal once less than a third of the validity remains.
    pub fn renewal_due(&self, now: i64) -> bool {
        now >= self.not_after - (self.not_after - self.not_before) / 3
    }

    fn left(&self, now: i64) -> Duration {
        Duration::from_secs(u64::try_from(self.not_after - now).unwrap_or(0))
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn at(unix_secs: i64) -> Timestamp {
    Timestamp::from_unix_millis(unix_secs.saturating_mul(1000))
}

pub fn now_secs() -> i64 {
    Timestamp::now().unix_millis() / 1000
}

/// What a certificate's DER says of its validity, names and constraints.
struct Parsed {
    validity: Validity,
    names: Vec<Name>,
    /// `None`: no name constraints at all (a CA generated before they were introduced).
    permits: Option<Vec<Permit>>,
}

fn parse_der(der: &[u8]) -> Result<Parsed, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let v = cert.validity();
    let validity = Validity { not_before: v.not_before.timestamp(), not_after: v.not_after.timestamp() };
    let names = match cert.subject_alternative_name().map_err(|e| e.to_string())? {
        Some(san) => san.value.general_names.iter().filter_map(Name::from_general).collect(),
        None => Vec::new(),
    };
    let permits = cert.name_constraints().map_err(|e| e.to_string())?.map(|nc| {
        nc.value
            .permitted_subtrees
            .iter()
            .flatten()
            .filter_map(|s| match &s.base {
                GeneralName::DNSName(d) => Some(Permit::Dns(d.to_string())),
                GeneralName::IPAddress(b) if b.len() == 8 || b.len() == 32 => {
                    let (addr, mask) = b.split_at(b.len() / 2);
                    Some(Permit::Ip { addr: addr.to_vec(), mask: mask.to_vec() })
                }
                _ => None,
            })
            .collect()
    });
    Ok(Parsed { validity, names, permits })
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

/// The certificate the server presents, swappable while it serves: each handshake takes the
/// current one, so a renewal applies to the next connection and leaves open ones alone.
#[derive(Debug)]
pub struct Served {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Served {
    fn new(key: CertifiedKey) -> Self {
        Served { current: RwLock::new(Arc::new(key)) }
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
    }
}

impl ResolvesServerCert for Served {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The loaded identity, the CA file agents and operators should trust if it was generated, and
/// what renews a generated certificate while the server runs.
pub struct Identity {
    pub config: Arc<ServerConfig>,
    pub ca_file: Option<PathBuf>,
    pub renewer: Option<Renewer>,
}

pub fn load(source: &TlsSource, data_dir: &Path) -> Result<Identity, TlsError> {
    load_at(source, data_dir, now_secs())
}

/// [`load`] as if the time were `now` (unix seconds).
pub fn load_at(source: &TlsSource, data_dir: &Path, now: i64) -> Result<Identity, TlsError> {
    let (served, ca_file, renewer) = match source {
        TlsSource::Files { cert, key } => (Arc::new(Served::new(certified_key(read_certs(cert)?, read_key(key)?)?)), None, None),
        TlsSource::Generated { hostnames } => {
            let renewer = ensure_generated(GeneratedPaths::new(data_dir), hostnames, now)?;
            (renewer.served(), Some(renewer.issuing.paths.ca_cert.clone()), Some(renewer))
        }
    };
    let mut config = ServerConfig::builder().with_no_client_auth().with_cert_resolver(served);
    // WebSocket upgrades need HTTP/1.1; the API is served over it too.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Identity { config: Arc::new(config), ca_file, renewer })
}

/// What `muster-server check` says of the TLS identity, changing nothing.
pub fn check(source: &TlsSource, data_dir: &Path, now: i64) -> Result<String, TlsError> {
    match source {
        TlsSource::Files { cert, key } => {
            certified_key(read_certs(cert)?, read_key(key)?)?;
            Ok(format!("certificate {} and its key load and match", cert.display()))
        }
        TlsSource::Generated { .. } => {
            let paths = GeneratedPaths::new(data_dir);
            if !paths.cert.exists() {
                return Ok("no certificate yet; a CA and a certificate are generated at first start".into());
            }
            let ca = Ca::load(&paths)?;
            if ca.validity.not_after <= now {
                return Err(TlsError::CaExpired { path: paths.ca_cert, at: at(ca.validity.not_after) });
            }
            let chain = read_certs(&paths.cert)?;
            certified_key(chain.clone(), read_key(&paths.key)?)?;
            let parsed = parse_der(&chain[0]).map_err(|message| TlsError::Pem { path: paths.cert.clone(), message })?;
            let renew = if parsed.validity.renewal_due(now) { "; it is renewed at the next start" } else { "" };
            Ok(format!(
                "generated certificate {} loads, valid until {}{renew}; agents trust {}, valid until {}",
                paths.cert.display(),
                at(parsed.validity.not_after),
                paths.ca_cert.display(),
                at(ca.validity.not_after)
            ))
        }
    }
}

fn certified_key(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<CertifiedKey, TlsError> {
    Ok(CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())?)
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

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem { path: path.to_owned(), message: e.to_string() })
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

fn date(unix_secs: i64) -> Result<time::OffsetDateTime, TlsError> {
    time::OffsetDateTime::from_unix_timestamp(unix_secs).map_err(|_| TlsError::Date(unix_secs))
}

/// A CA that permits exactly these names, valid from `now` (backdated) for [`CA_VALIDITY`].
fn new_ca(names: &[Name], now: i64) -> Result<(KeyPair, rcgen::Certificate), TlsError> {
    let key = KeyPair::generate()?;
    let mut params = ca_params(&key)?;
    params.not_before = date(now - secs(BACKDATE))?;
    params.not_after = date(now.saturating_add(secs(CA_VALIDITY)))?;
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: names
            .iter()
            .map(|n| match n {
                Name::Dns(d) => GeneralSubtree::DnsName(d.clone()),
                Name::Ip(ip) => GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(*ip, if ip.is_ipv4() { 32 } else { 128 })),
            })
            .collect(),
        excluded_subtrees: Vec::new(),
    });
    let cert = params.self_signed(&key)?;
    Ok((key, cert))
}

/// The CA as loaded from disk: what signs, what it is valid for and until when.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    validity: Validity,
    permits: Option<Vec<Permit>>,
}

impl Ca {
    fn load(paths: &GeneratedPaths) -> Result<Ca, TlsError> {
        let pem = std::fs::read_to_string(&paths.ca_key).map_err(|source| TlsError::Read { path: paths.ca_key.clone(), source })?;
        let key = KeyPair::from_pem(&pem)?;
        let der = read_certs(&paths.ca_cert)?.swap_remove(0);
        let parsed = parse_der(&der).map_err(|message| TlsError::Pem { path: paths.ca_cert.clone(), message })?;
        // The issuer's name and key identifier derive from these parameters and the key, so a
        // reloaded CA key signs certificates that chain to the CA certificate on disk.
        let issuer = Issuer::new(ca_params(&key)?, key);
        Ok(Ca { issuer, der, validity: parsed.validity, permits: parsed.permits })
    }

    fn allows(&self, name: &Name) -> bool {
        self.permits.as_ref().is_none_or(|p| p.iter().any(|p| p.allows(name)))
    }

    fn permitted(&self) -> String {
        let list: Vec<String> = self
            .permits
            .iter()
            .flatten()
            .map(|p| match p {
                Permit::Dns(d) => d.clone(),
                Permit::Ip { addr, .. } => ip_from_bytes(addr).map_or_else(|| hex::encode(addr), |ip| ip.to_string()),
            })
            .collect();
        list.join(", ")
    }

    /// A server certificate for `names`, valid from `now` (backdated) for [`CERT_VALIDITY`],
    /// never past the CA: its PEM, its key's PEM, and its validity.
    fn issue(&self, names: &[Name], now: i64) -> Result<(String, String, Validity), TlsError> {
        let validity =
            Validity { not_before: now - secs(BACKDATE), not_after: now.saturating_add(secs(CERT_VALIDITY)).min(self.validity.not_after) };
        let mut params = CertificateParams::new(names.iter().map(Name::to_string).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, "muster-server");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = date(validity.not_before)?;
        params.not_after = date(validity.not_after)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem(), validity))
    }
}

/// The names the generated certificate is for: localhost and the loopback addresses, the
/// configured `tls_hostnames` (all required), and this machine's host name (dropped if it is
/// not a valid DNS name, or if an existing CA does not cover it).
fn wanted_names(extra: &[String]) -> Result<(Vec<Name>, Option<Name>), TlsError> {
    let mut required = vec![Name::Dns("localhost".into()), Name::Ip([127, 0, 0, 1].into()), Name::Ip(std::net::Ipv6Addr::LOCALHOST.into())];
    for e in extra {
        // Validated with the config already; a name that is not one is refused again here.
        let name = Name::parse(e).map_err(TlsError::Name)?;
        required.push(name);
    }
    required.sort();
    required.dedup();
    let host = rustix::system::uname().nodename().to_str().ok().and_then(|h| Name::parse(h).ok()).filter(|h| !required.contains(h));
    Ok((required, host))
}

/// Loads what exists, creates what is missing (the CA only if it has neither certificate nor
/// key) and issues a new server certificate if the one on disk is missing, unreadable, not
/// this CA's, for other names, or due for renewal.
fn ensure_generated(paths: GeneratedPaths, extra_names: &[String], now: i64) -> Result<Renewer, TlsError> {
    let dir = paths.cert.parent().unwrap_or(Path::new(".")).to_owned();
    crate::app::create_private_dir(&dir).map_err(|source| TlsError::Write { path: dir.clone(), source })?;
    let (required, host) = wanted_names(extra_names)?;

    if !(paths.ca_key.exists() && paths.ca_cert.exists()) {
        let names: Vec<Name> = required.iter().chain(&host).cloned().collect();
        let (key, cert) = new_ca(&names, now)?;
        write_file(&paths.ca_key, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&paths.ca_cert, cert.pem().as_bytes(), 0o644)?;
        let names: Vec<String> = names.iter().map(Name::to_string).collect();
        tracing::info!(path = %paths.ca_cert.display(), names = %names.join(","), "generated a CA for this server, limited to its names");
    }
    let ca = Ca::load(&paths)?;
    if ca.validity.not_after <= now {
        return Err(TlsError::CaExpired { path: paths.ca_cert.clone(), at: at(ca.validity.not_after) });
    }
    if ca.permits.is_none() {
        tracing::warn!(
            path = %paths.ca_cert.display(),
            "the generated CA predates name constraints and may vouch for any name; move {} aside for a new one (agents then need the new CA)",
            dir.display()
        );
    }
    if let Some(name) = required.iter().find(|n| !ca.allows(n)) {
        return Err(TlsError::OutsideCa { path: paths.ca_cert.clone(), name: name.to_string(), permitted: ca.permitted() });
    }
    let mut names = required;
    match host {
        Some(h) if ca.allows(&h) => names.push(h),
        Some(h) => {
            tracing::warn!(host = %h, path = %paths.ca_cert.display(), "this machine's host name is not among the generated CA's names; the certificate leaves it out")
        }
        None => {}
    }
    names.sort();

    let issuing = Issuing { paths, names, ca };
    let (key, validity) = match issuing.reuse(now) {
        Some(fit) => fit,
        None => issuing.issue_and_write(now)?,
    };
    let renewer = Renewer { issuing, served: Arc::new(Served::new(key)), validity: Mutex::new(validity), ca_warned: Mutex::new(None) };
    renewer.warn_if_ca_ends_soon(now);
    Ok(renewer)
}

/// What a generated server certificate is made from: the CA, the names, the files.
struct Issuing {
    paths: GeneratedPaths,
    names: Vec<Name>,
    ca: Ca,
}

impl Issuing {
    /// The certificate on disk and its validity, if it is fit to serve at `now`: it loads, its
    /// key matches, it chains to this CA, it is for exactly these names, it is not due, and it
    /// was not made to last longer than [`CERT_VALIDITY`] (as those generated before renewal
    /// was, for millennia).
    fn reuse(&self, now: i64) -> Option<(CertifiedKey, Validity)> {
        let chain = read_certs(&self.paths.cert).ok()?;
        let parsed = parse_der(chain.first()?).ok()?;
        let mut names = parsed.names.clone();
        names.sort();
        let v = parsed.validity;
        if names != self.names || v.renewal_due(now) || v.not_after - v.not_before > secs(CERT_VALIDITY + BACKDATE) {
            return None;
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der.clone()).ok()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build().ok()?;
        let name = rustls_pki_types::ServerName::try_from("localhost").ok()?;
        let time = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(now).ok()?));
        verifier.verify_server_cert(&chain[0], &[], &name, &[], time).ok()?;
        let key = certified_key(vec![chain[0].clone(), self.ca.der.clone()], read_key(&self.paths.key).ok()?).ok()?;
        Some((key, parsed.validity))
    }

    /// Issues a certificate, writes it (key first: a crash in between leaves a pair that does
    /// not match, which the next start replaces) and returns it, ready to serve. A generated
    /// identity presents its CA too, so an agent can pin the CA by fingerprint
    /// (`muster-agent install --ca-fingerprint`) without having the file beforehand.
    fn issue_and_write(&self, now: i64) -> Result<(CertifiedKey, Validity), TlsError> {
        let (cert_pem, key_pem, validity) = self.ca.issue(&self.names, now)?;
        write_file(&self.paths.key, key_pem.as_bytes(), 0o600)?;
        write_file(&self.paths.cert, cert_pem.as_bytes(), 0o644)?;
        let chain = vec![read_certs(&self.paths.cert)?.swap_remove(0), self.ca.der.clone()];
        let key = certified_key(chain, read_key(&self.paths.key)?)?;
        tracing::info!(path = %self.paths.cert.display(), until = %at(validity.not_after), "generated a server certificate");
        Ok((key, validity))
    }
}

/// Keeps a generated certificate fresh while the server runs.
pub struct Renewer {
    issuing: Issuing,
    served: Arc<Served>,
    validity: Mutex<Validity>,
    ca_warned: Mutex<Option<i64>>,
}

impl Renewer {
    /// The validity of the certificate being served.
    pub fn validity(&self) -> Validity {
        *self.validity.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the server presents; renewals replace its certificate in place.
    pub fn served(&self) -> Arc<Served> {
        self.served.clone()
    }

    /// Renews the served certificate if it is due at `now` (unix seconds), writing the new one
    /// to disk and serving it from the next handshake on. Nothing is done when a new
    /// certificate would not last longer than the current one (its CA ends first).
    pub fn renew_if_due(&self, now: i64) -> Result<bool, TlsError> {
        self.warn_if_ca_ends_soon(now);
        let current = self.validity();
        let would_end = now.saturating_add(secs(CERT_VALIDITY)).min(self.issuing.ca.validity.not_after);
        if !current.renewal_due(now) || would_end <= current.not_after {
            return Ok(false);
        }
        let (key, validity) = self.issuing.issue_and_write(now)?;
        self.served.replace(key);
        *self.validity.lock().unwrap_or_else(PoisonError::into_inner) = validity;
        Ok(true)
    }

    fn warn_if_ca_ends_soon(&self, now: i64) {
        let ca = self.issuing.ca.validity;
        if ca.left(now) >= CA_WARN_BEFORE {
            return;
        }
        let mut warned = self.ca_warned.lock().unwrap_or_else(PoisonError::into_inner);
        if warned.is_some_and(|w| now - w < 86_400) {
            return;
        }
        *warned = Some(now);
        tracing::warn!(
            path = %self.issuing.paths.ca_cert.display(),
            until = %at(ca.not_after),
            "the generated CA expires soon; after that the server cannot start with it: generate a new one and give it to the agents (README, \"The generated CA\")"
        );
    }

    /// Checks every [`RENEW_CHECK_EVERY`] until cancelled. A failed renewal is logged and
    /// tried again at the next check; the current certificate keeps being served.
    pub async fn run(self, cancel: CancellationToken) {
        let mut every = tokio::time::interval(RENEW_CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = every.tick() => {}
            }
            match self.renew_if_due(now_secs()) {
                Ok(true) => tracing::info!("renewed the server certificate; new connections get the new one"),
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "renewing the server certificate failed; trying again in an hour"),
            }
        }
    }
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
mod tests;
