//! `https://` servers: a TLS-terminating proxy (a certificate from a CA made in the test with
//! rcgen) in front of a real hfs; the connectors trust the CA of `fhir.tls.ca.file`.

mod support;

use std::path::PathBuf;
use std::sync::Arc;

use medconnect_api::props_from;
use medconnect_api::{ConnectError, Connector, Record, SinkPartitions, SinkRecord};
use medconnect_fhir::FhirSinkConnector;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use support::{put_all, shared, sink_task};

/// A CA (its PEM file in a temporary directory) and a server certificate for `localhost`.
struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    server: rustls::ServerConfig,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["localhost".into()]).expect("params");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca).expect("sign");
    let ca_path = dir.path().join("ca.crt");
    std::fs::write(&ca_path, ca.pem()).expect("write the CA");
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(cert.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .expect("server certificate");
    Pki {
        dir,
        ca: ca_path,
        server,
    }
}

/// Terminates TLS and relays the plain bytes to hfs; aborted on drop.
struct TlsProxy {
    url: String,
    relay: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    async fn start(upstream: &str, config: rustls::ServerConfig) -> Self {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let relay = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    // A client that does not trust the certificate ends the handshake.
                    let Ok(mut tls) = acceptor.accept(inbound).await else {
                        return;
                    };
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut outbound).await;
                });
            }
        });
        Self {
            url: format!("https://localhost:{port}"),
            relay,
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.relay.abort();
    }
}

#[tokio::test]
async fn with_the_ca_resources_arrive_over_https_and_without_it_the_url_is_refused() {
    let hfs = shared();
    let pki = pki();
    let proxy = TlsProxy::start(&hfs.url, pki.server.clone()).await;
    let ca = pki.ca.to_str().expect("UTF-8 path");
    FhirSinkConnector
        .validate(&props_from(&[
            ("fhir.url", &proxy.url),
            ("fhir.tls.ca.file", ca),
        ]))
        .await
        .expect("the server's certificate is trusted with the CA");
    let untrusted = FhirSinkConnector
        .validate(&props_from(&[("fhir.url", &proxy.url)]))
        .await
        .expect_err("not trusted without the CA");
    assert!(
        matches!(untrusted, ConnectError::Config { ref field, .. } if field == "fhir.url"),
        "{untrusted}"
    );
    let missing = FhirSinkConnector
        .validate(&props_from(&[
            ("fhir.url", &proxy.url),
            (
                "fhir.tls.ca.file",
                &format!("{}/nope.crt", pki.dir.path().display()),
            ),
        ]))
        .await
        .expect_err("no CA file");
    assert!(
        matches!(missing, ConnectError::Config { ref field, .. } if field == "fhir.tls.ca.file"),
        "{missing}"
    );

    let system = "urn:test:tls";
    let records: Vec<SinkRecord> = (0..100)
        .map(|i| SinkRecord {
            record: Record::new("tls")
                .with_key(format!("Observation/tls-{i}"))
                .with_value(
                json!({"resourceType": "Observation", "status": "final", "code": {"text": "hr"},
                       "identifier": [{"system": system, "value": i.to_string()}]})
                .to_string(),
            ),
            kafka_partition: 0,
            kafka_offset: i,
        })
        .collect();
    let (mut task, mut errant) = sink_task(
        &proxy.url,
        &[("fhir.tls.ca.file", ca), ("fhir.bundle.size", "25")],
        SinkPartitions::detached(),
    )
    .await;
    put_all(&mut task, &records, 100).await;
    assert_eq!(hfs.count("Observation", system).await, 100);
    assert!(errant.try_recv().is_err());
}
