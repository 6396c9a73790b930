//! `https://` URLs: a TLS-terminating proxy (a certificate from a CA made in the test with
//! rcgen) in front of a real osmem-server; the sink trusts the CA of `connection.tls.ca.file`.

mod support;

use std::path::PathBuf;
use std::sync::Arc;

use medconnect_api::{ConnectError, Connector, SinkPartitions, SinkTask};
use medconnect_elasticsearch::ElasticsearchSinkConnector;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::{Osmem, props, put_all, task, vitals};

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

/// Terminates TLS and relays the plain bytes to osmem-server; aborted on drop.
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
async fn with_the_ca_documents_arrive_over_https() {
    let osmem = Osmem::start();
    let pki = pki();
    let proxy = TlsProxy::start(&osmem.url, pki.server.clone()).await;
    let ca = pki.ca.to_str().expect("UTF-8 path");

    ElasticsearchSinkConnector
        .validate(&props(&[
            ("connection.url", &proxy.url),
            ("connection.tls.ca.file", ca),
        ]))
        .await
        .expect("validate reaches the cluster over TLS");
    let (mut sink, mut errant) = task(
        &proxy.url,
        &[("key.ignore", "true"), ("connection.tls.ca.file", ca)],
        SinkPartitions::detached(),
    )
    .await;
    put_all(&mut sink, &vitals("vitals", 500), 100).await;
    assert_eq!(osmem.count("vitals").await, 500);
    assert!(errant.try_recv().is_err());
    sink.stop().await.expect("stop");
    drop(pki.dir);
}

#[tokio::test]
async fn without_the_ca_validate_names_the_untrusted_certificate() {
    let osmem = Osmem::start();
    let pki = pki();
    let proxy = TlsProxy::start(&osmem.url, pki.server.clone()).await;
    let error = ElasticsearchSinkConnector
        .validate(&props(&[("connection.url", &proxy.url)]))
        .await
        .expect_err("the proxy's certificate is not trusted");
    match error {
        ConnectError::Config {
            field,
            reason: message,
        } => {
            assert_eq!(field, "connection.url");
            assert!(
                message.contains("certificate") && message.contains("connection.tls.ca.file"),
                "{message}"
            );
        }
        other => panic!("expected a config error, got {other:?}"),
    }

    let missing = pki.dir.path().join("missing.crt");
    let error = ElasticsearchSinkConnector
        .validate(&props(&[
            ("connection.url", &proxy.url),
            ("connection.tls.ca.file", missing.to_str().expect("UTF-8")),
        ]))
        .await
        .expect_err("no CA file there");
    assert!(
        matches!(&error, ConnectError::Config { field, .. } if field == "connection.tls.ca.file"),
        "{error:?}"
    );
}
