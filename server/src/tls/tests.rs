//! The TLS identity's tests: generating and reusing it, renewal, the CA's name constraints.

use super::*;

const DAY: i64 = 86_400;

fn ensure_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn generated(names: &[&str]) -> TlsSource {
    TlsSource::Generated { hostnames: names.iter().map(|s| s.to_string()).collect() }
}

fn verifier(ca: &Path) -> Arc<rustls::client::WebPkiServerVerifier> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::new(rustls::crypto::ring::default_provider()))
        .build()
        .unwrap()
}

fn verify(ca: &Path, cert: &CertificateDer<'_>, name: &str) -> Result<(), rustls::Error> {
    let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
    verifier(ca).verify_server_cert(cert, &[], &name, &[], rustls_pki_types::UnixTime::now()).map(|_| ())
}

fn validity_on_disk(path: &Path) -> Validity {
    parse_der(&read_certs(path).unwrap()[0]).unwrap().validity
}

#[test]
fn generated_identity_is_reused_on_the_next_start() {
    ensure_provider();
    let dir = tempfile::tempdir().unwrap();
    let source = generated(&["muster.example"]);
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
    let source = generated(&[]);
    load(&source, dir.path()).unwrap();
    let ca = std::fs::read(dir.path().join("tls/ca.pem")).unwrap();
    std::fs::remove_file(dir.path().join("tls/server.pem")).unwrap();
    load(&source, dir.path()).unwrap();
    assert_eq!(std::fs::read(dir.path().join("tls/ca.pem")).unwrap(), ca);
    let chain = read_certs(&dir.path().join("tls/server.pem")).unwrap();
    verify(&dir.path().join("tls/ca.pem"), &chain[0], "localhost").unwrap();
}

#[test]
fn a_missing_certificate_file_is_a_clear_error() {
    ensure_provider();
    let source = TlsSource::Files { cert: "/nonexistent/cert.pem".into(), key: "/nonexistent/key.pem".into() };
    let err = load(&source, Path::new("/tmp")).err().unwrap();
    assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
}

#[test]
fn the_generated_ca_vouches_only_for_the_servers_names() {
    ensure_provider();
    let dir = tempfile::tempdir().unwrap();
    load(&generated(&["muster.example", "10.1.2.3"]), dir.path()).unwrap();
    let ca = dir.path().join("tls/ca.pem");
    let served = read_certs(&dir.path().join("tls/server.pem")).unwrap();
    for name in ["localhost", "muster.example", "10.1.2.3", "127.0.0.1", "::1"] {
        verify(&ca, &served[0], name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    // Whoever holds the CA's key can sign anything; a client that trusts the CA refuses
    // what lies outside its names, and accepts what lies inside (a subdomain too).
    let key = KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("tls/ca-key.pem")).unwrap()).unwrap();
    let issuer = Issuer::new(ca_params(&key).unwrap(), key);
    let sign = |name: &str| {
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        params.signed_by(&key, &issuer).unwrap().der().clone()
    };
    for outside in ["evil.example", "muster.example.evil", "10.1.2.4", "192.0.2.1"] {
        let err = verify(&ca, &sign(outside), outside).unwrap_err();
        assert!(err.to_string().contains("NameConstraintViolation"), "{outside}: {err}");
    }
    verify(&ca, &sign("api.muster.example"), "api.muster.example").unwrap();
}

#[test]
fn the_ca_lasts_a_year_and_the_server_certificate_ninety_days() {
    ensure_provider();
    let dir = tempfile::tempdir().unwrap();
    let now = now_secs();
    load_at(&generated(&[]), dir.path(), now).unwrap();
    let ca = validity_on_disk(&dir.path().join("tls/ca.pem"));
    let cert = validity_on_disk(&dir.path().join("tls/server.pem"));
    assert_eq!(ca.not_after - now, 365 * DAY);
    assert_eq!(cert.not_after - now, 90 * DAY);
    assert_eq!(now - cert.not_before, 3600, "backdated an hour for slow clocks");
}

#[test]
fn renewal_is_due_once_a_third_of_the_validity_remains() {
    let v = Validity { not_before: 0, not_after: 90 * DAY };
    assert!(!v.renewal_due(60 * DAY - 1));
    assert!(v.renewal_due(60 * DAY));
}

#[test]
fn a_certificate_near_its_end_is_renewed_at_start_and_one_that_is_not_is_kept() {
    ensure_provider();
    let dir = tempfile::tempdir().unwrap();
    let source = generated(&[]);
    let then = now_secs() - 70 * DAY;
    load_at(&source, dir.path(), then).unwrap();
    let old = std::fs::read(dir.path().join("tls/server.pem")).unwrap();
    load_at(&source, dir.path(), then + 59 * DAY).unwrap();
    assert_eq!(std::fs::read(dir.path().join("tls/server.pem")).unwrap(), old, "not due yet");

    // 70 days in, 20 are left: the next start issues a new one, from the same CA.
    let identity = load(&source, dir.path()).unwrap();
    assert_ne!(std::fs::read(dir.path().join("tls/server.pem")).unwrap(), old);
    let renewed = validity_on_disk(&dir.path().join("tls/server.pem"));
    assert!(renewed.not_after - now_secs() > 89 * DAY, "{renewed:?}");
    assert_eq!(identity.renewer.unwrap().validity(), renewed);
    let chain = read_certs(&dir.path().join("tls/server.pem")).unwrap();
    verify(&dir.path().join("tls/ca.pem"), &chain[0], "localhost").unwrap();
}

#[test]
fn a_certificate_made_to_last_for_ever_is_replaced_by_one_that_renews() {
    ensure_provider();
    let dir = tempfile::tempdir().unwrap();
    let source = generated(&[]);
    load(&source, dir.path()).unwrap();
    // As the server signed them before: rcgen's default validity, 1975 to 4096.
    let key = KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("tls/ca-key.pem")).unwrap()).unwrap();
    let issuer = Issuer::new(ca_params(&key).unwrap(), key);
    let (_, host) = wanted_names(&[]).unwrap();
    let names: Vec<String> = wanted_names(&[]).unwrap().0.iter().chain(&host).map(Name::to_string).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().unwrap();
    let old = params.signed_by(&server_key, &issuer).unwrap();
    write_file(&dir.path().join("tls/server-key.pem"), server_key.serialize_pem().as_bytes(), 0o600).unwrap();
    write_file(&dir.path().join("tls/server.pem"), old.pem().as_bytes(), 0o644).unwrap();
    assert!(validity_on_disk(&dir.path().join("tls/server.pem")).not_after > now_secs() + 1000 * 365 * DAY);

    load(&source, dir.path()).unwrap();
    let now = validity_on_disk(&dir.path().join("tls/server.pem"));
    assert_eq!(now.not_after - now.not_before, 90 * DAY + 3600);
}

/// The certificate a client gets from a handshake with `config` on loopback.
async fn presented(config: Arc<ServerConfig>, ca: &Path) -> CertificateDer<'static> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let client = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, tcp).await.unwrap();
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned();
    drop(tls);
    server.await.unwrap();
    cert
}

#[tokio::test]
async fn a_running_server_serves_its_renewed_certificate_without_a_restart() {
    ensure_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("tls/ca.pem");
    // Started 61 days ago: a third of the certificate's 90 days is left, less a day.
    let identity = load_at(&generated(&[]), dir.path(), now_secs() - 61 * DAY).unwrap();
    let renewer = identity.renewer.unwrap();
    let before = presented(identity.config.clone(), &ca).await;

    assert!(!renewer.renew_if_due(now_secs() - 31 * DAY).unwrap(), "not due then");
    assert!(renewer.renew_if_due(now_secs()).unwrap());
    let after = presented(identity.config.clone(), &ca).await;
    assert_ne!(before, after, "the same acceptor presents the new certificate");
    assert_eq!(after, read_certs(&dir.path().join("tls/server.pem")).unwrap()[0], "and it is the one on disk");
    assert!(!renewer.renew_if_due(now_secs()).unwrap(), "once renewed, not again");
}

#[test]
fn names_outside_an_existing_ca_are_refused_and_an_expired_ca_stops_the_start() {
    ensure_provider();
    let dir = tempfile::tempdir().unwrap();
    let then = now_secs() - 400 * DAY;
    load_at(&generated(&["a.example"]), dir.path(), then).unwrap();
    let err = load_at(&generated(&["b.example"]), dir.path(), then + DAY).err().unwrap();
    assert!(matches!(err, TlsError::OutsideCa { ref name, .. } if name == "b.example"), "{err}");
    let err = load(&generated(&["a.example"]), dir.path()).err().unwrap();
    assert!(matches!(err, TlsError::CaExpired { .. }), "{err}");
    assert!(err.to_string().contains("move"), "{err}");
}

#[test]
fn names_are_dns_names_or_ip_addresses() {
    assert_eq!(Name::parse("Muster.Example.").unwrap(), Name::Dns("muster.example".into()));
    assert_eq!(Name::parse("[::1]").unwrap(), Name::Ip(std::net::Ipv6Addr::LOCALHOST.into()));
    for bad in ["", "two words", "*.example.com", "-x.example", "a..b"] {
        assert!(Name::parse(bad).is_err(), "{bad:?}");
    }
    let p = Permit::Dns("example.com".into());
    assert!(p.allows(&Name::Dns("example.com".into())) && p.allows(&Name::Dns("a.example.com".into())));
    assert!(!p.allows(&Name::Dns("badexample.com".into())) && !p.allows(&Name::Ip([10, 0, 0, 1].into())));
    let p = Permit::Ip { addr: vec![10, 1, 0, 0], mask: vec![255, 255, 0, 0] };
    assert!(p.allows(&Name::Ip([10, 1, 9, 9].into())) && !p.allows(&Name::Ip([10, 2, 0, 0].into())));
}
