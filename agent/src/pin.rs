//! Trust on first use, done right: learn the server's CA from the TLS handshake, but only if
//! its SHA-256 fingerprint is the one the operator gave (`sha256:<hex>`, printed by
//! `muster enroll-token create --install-command`), and only if the server's certificate
//! really chains to it.

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// Parses `sha256:<64 hex digits>` (colons between bytes allowed, case ignored).
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let hex_part = s.strip_prefix("sha256:").ok_or("a CA fingerprint looks like sha256:<64 hex digits>")?;
    let clean: String = hex_part.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    let bytes = hex::decode(&clean).map_err(|_| "the CA fingerprint is not hex")?;
    bytes.try_into().map_err(|_| "a SHA-256 fingerprint has 32 bytes".into())
}

pub fn fingerprint(cert: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(cert)))
}

#[derive(Debug)]
struct PinnedCa {
    want: [u8; 32],
    found: Arc<Mutex<Option<CertificateDer<'static>>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref())[..] == self.want[..])
            .ok_or_else(|| rustls::Error::General("no certificate from the server has the pinned fingerprint".into()))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let others: Vec<CertificateDer<'_>> = intermediates.iter().filter(|c| c.as_ref() != ca.as_ref()).cloned().collect();
        let ok = verifier.verify_server_cert(end_entity, &others, server_name, ocsp, now)?;
        if let Ok(mut f) = self.found.lock() {
            *f = Some(ca.clone().into_owned());
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects to the server, and returns its CA certificate as PEM if it has the pinned
/// fingerprint and the server's certificate chains to it.
pub async fn fetch_ca(server: &str, pin: &str) -> Result<String, String> {
    let want = parse_fingerprint(pin)?;
    let found = Arc::new(Mutex::new(None));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedCa { want, found: found.clone(), provider };
    let config = rustls::ClientConfig::builder().dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth();
    let authority = server.trim_start_matches("https://").trim_start_matches("wss://").trim_end_matches('/');
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']'), p.parse::<u16>().map_err(|_| format!("bad port in {server}"))?),
        None => (authority, 443),
    };
    let tcp = tokio::time::timeout(std::time::Duration::from_secs(10), tokio::net::TcpStream::connect((host, port)))
        .await
        .map_err(|_| format!("no answer from {host}:{port}"))?
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let name = ServerName::try_from(host.to_owned()).map_err(|_| format!("{host} is not a valid host name"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| {
        format!(
            "the server's CA does not match the pinned fingerprint {pin}: {}",
            e.get_ref().map(|i| i.to_string()).unwrap_or_else(|| e.to_string())
        )
    })?;
    let ca = found.lock().ok().and_then(|f| f.clone()).ok_or("the server's CA was not seen")?;
    Ok(to_pem(&ca))
}

fn to_pem(cert: &CertificateDer<'_>) -> String {
    use std::fmt::Write;
    let b64 = base64_encode(cert.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", String::from_utf8_lossy(line));
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64_encode(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= c.len() { char::from(ABC[((n >> shift) & 63) as usize]) } else { '=' });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_fingerprint(&format!("sha256:{hex}")).unwrap(), [0xab; 32]);
        let colons: Vec<String> = (0..32).map(|_| "AB".to_string()).collect();
        assert_eq!(parse_fingerprint(&format!("sha256:{}", colons.join(":"))).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint(&hex).is_err());
        assert!(parse_fingerprint("sha256:abcd").is_err());
    }

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64_encode(b"Man"), "TWFu");
        assert_eq!(base64_encode(b"Ma"), "TWE=");
        assert_eq!(base64_encode(b"M"), "TQ==");
    }
}
