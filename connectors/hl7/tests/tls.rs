//! MLLP over TLS: the sink sends to the source through a TLS listener that requires a client
//! certificate; certificates come from a CA made in the test with rcgen.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use medconnect_api::tls;
use medconnect_api::{
    Delivery, ErrantRecordReporter, OffsetReader, Props, Record, SinkRecord, SinkTask,
    SinkTaskContext, SourceOffset, SourcePartition, SourceTask, SourceTaskContext,
};
use medconnect_hl7::mllp::{ClientError, MllpClient};
use medconnect_hl7::{MllpSinkTask, MllpSourceTask};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(10);
const ADT_A01: &str = "MSH|^~\\&|EPIC|HOSP|MEDCONNECT|DC|20240101120000||ADT^A01^ADT_A01|TLS0001|P|2.5.1\rPID|1||PAT9^^^HOSP^MR||DOE^JOHN\r";

struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).expect("write PEM");
    path
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");

    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, stem: &str| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca).expect("sign");
        (
            write(dir.path(), &format!("{stem}.crt"), &cert.pem()),
            write(dir.path(), &format!("{stem}.key"), &key.serialize_pem()),
        )
    };
    let server = leaf(
        vec!["localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        "server",
    );
    let client = leaf(
        vec!["ehr.example".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
        "client",
    );
    let ca_path = write(dir.path(), "ca.crt", &ca.pem());
    Pki {
        _dir: dir,
        ca: ca_path,
        server,
        client,
    }
}

struct NoOffsets;

impl OffsetReader for NoOffsets {
    fn offset(&self, _partition: &SourcePartition) -> Option<SourceOffset> {
        None
    }
}

fn props(pairs: &[(&str, String)]) -> Props {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test]
async fn the_sink_delivers_over_tls_to_a_listener_that_requires_client_certificates() {
    let pki = pki();
    let mut source = MllpSourceTask::new(SourceTaskContext {
        connector_name: "hl7-tls".into(),
        task_id: 0,
        config: props(&[
            ("mllp.bind", "127.0.0.1".into()),
            ("mllp.port", "0".into()),
            ("mllp.tls.enabled", "true".into()),
            ("mllp.tls.cert.file", path(&pki.server.0)),
            ("mllp.tls.key.file", path(&pki.server.1)),
            ("mllp.tls.client.ca.file", path(&pki.ca)),
        ]),
        offsets: Arc::new(NoOffsets),
        listener_budget: medconnect_api::limits::ByteBudget::unlimited(),
    })
    .expect("a valid task config");
    source.start().await.expect("TLS source starts");
    let port = source.local_addr().expect("bound").port();

    // A sender without a client certificate is refused: no message gets through.
    let anonymous = tls::connector(&pki.ca, None).expect("connector");
    let name = tls::server_name("localhost").expect("name");
    match MllpClient::connect(
        "127.0.0.1",
        port,
        DEADLINE,
        Some((&anonymous, name)),
        1 << 20,
    )
    .await
    {
        Err(_) => {}
        Ok(mut client) => {
            // TLS 1.3 reports the missing certificate only after the handshake.
            let _ = client.send(ADT_A01.as_bytes(), DEADLINE).await;
            let answer = client.receive(DEADLINE).await;
            assert!(
                matches!(answer, Err(ClientError::Closed | ClientError::Frame(_))),
                "a sender without a certificate must be cut off, got {answer:?}"
            );
        }
    }

    let (errant_tx, mut errant_rx) = mpsc::unbounded_channel();
    let mut sink = MllpSinkTask::new(SinkTaskContext {
        connector_name: "hl7-tls-sink".into(),
        task_id: 0,
        config: props(&[
            ("mllp.host", "localhost".into()),
            ("mllp.port", port.to_string()),
            ("mllp.tls.enabled", "true".into()),
            ("mllp.tls.ca.file", path(&pki.ca)),
            ("mllp.tls.cert.file", path(&pki.client.0)),
            ("mllp.tls.key.file", path(&pki.client.1)),
        ]),
        errant_records: ErrantRecordReporter::collecting(errant_tx),
        partitions: medconnect_api::SinkPartitions::detached(),
        peers: medconnect_api::relay::alone(),
    })
    .expect("a valid task config");
    sink.start().await.expect("TLS sink starts");

    let put = tokio::spawn(async move {
        let record = SinkRecord {
            record: Record::new("hl7.out").with_value(ADT_A01),
            kafka_partition: 0,
            kafka_offset: 0,
        };
        let result = sink.put(vec![record]).await;
        (sink, result)
    });

    let mut batch = tokio::time::timeout(DEADLINE, source.poll())
        .await
        .expect("the message arrives over TLS")
        .expect("poll");
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].record.value.as_deref(), Some(ADT_A01.as_bytes()));
    batch[0].complete(Delivery::Written {
        topic: "hl7.adt".into(),
        partition: 0,
        offset: 0,
    });

    let (mut sink, result) = tokio::time::timeout(DEADLINE, put)
        .await
        .expect("put returns")
        .expect("put task");
    result.expect("the listener answered AA");
    assert!(errant_rx.try_recv().is_err());
    sink.stop().await.expect("stop sink");
    source.stop().await.expect("stop source");
}
