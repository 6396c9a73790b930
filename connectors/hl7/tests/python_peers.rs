//! The connectors against HL7 peers written by others: python's `hl7` package sends with its
//! `mllp_send` CLI, and `hl7apy`'s `MLLPServer` receives. `scripts/hl7-peers` installs both
//! into a venv; its bin directory is taken from `MEDCONNECT_PY_BIN`, else the script's default.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use medconnect_api::{
    Delivery, ErrantRecordReporter, OffsetReader, Props, Record, SinkRecord, SinkTask,
    SinkTaskContext, SourceOffset, SourcePartition, SourceTask, SourceTaskContext,
};
use medconnect_hl7::message::header;
use medconnect_hl7::{MllpSinkTask, MllpSourceTask};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};

const DEADLINE: Duration = Duration::from_secs(30);

const ADT_A01: &str = "MSH|^~\\&|EPIC|HOSP|MEDCONNECT|DC|20240101120000||ADT^A01^ADT_A01|MSG00001|P|2.5.1\nEVN|A01|20240101120000\nPID|1||PAT123^^^HOSP^MR||DOE^JOHN\nPV1|1|I\n";
const ORU_R01: &str = "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000||ORU^R01|LAB0001|P|2.3\nPID|1||77^^^LAB||ROE^JANE\nOBR|1||ORD1|CBC\nOBX|1|NM|WBC||7.5|10*9/L|||||F\n";

/// The venv's bin directory; fails (never skips) when the peers are not installed.
fn python_bin() -> PathBuf {
    let bin = std::env::var_os("MEDCONNECT_PY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("MEDCONNECT_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/medconnect")
                });
            cache.join("venv/bin")
        });
    assert!(
        bin.join("mllp_send").is_file() && bin.join("python").is_file(),
        "the HL7 python peers are not installed in {}: run scripts/hl7-peers (and set MEDCONNECT_PY_BIN to the path it prints if it is not the default)",
        bin.display()
    );
    bin
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

#[tokio::test]
async fn mllp_send_gets_aa_for_records_written_with_the_right_headers() {
    let bin = python_bin();
    let mut task = MllpSourceTask::new(SourceTaskContext {
        connector_name: "hl7-python".into(),
        task_id: 0,
        config: props(&[("mllp.bind", "127.0.0.1".into()), ("mllp.port", "0".into())]),
        offsets: Arc::new(NoOffsets),
        listener_budget: medconnect_api::limits::ByteBudget::unlimited(),
    })
    .expect("a valid task config");
    task.start().await.expect("source starts");
    let port = task.local_addr().expect("bound").port();

    // The engine: every record is written at once.
    let (records_tx, mut records_rx) = mpsc::unbounded_channel::<Record>();
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let engine = tokio::spawn(async move {
        loop {
            let batch = tokio::select! {
                _ = &mut stop_rx => break,
                batch = task.poll() => batch.expect("poll"),
            };
            for mut record in batch {
                assert!(record.rejected.is_none(), "valid messages are not rejected");
                let _ = records_tx.send(record.record.clone());
                record.complete(Delivery::Written {
                    topic: record.record.topic.clone(),
                    partition: 0,
                    offset: 0,
                });
            }
        }
        task.stop().await.expect("stop");
    });

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("messages.hl7");
    std::fs::write(&file, format!("{ADT_A01}{ORU_R01}")).expect("write messages");
    let output = tokio::time::timeout(
        DEADLINE,
        Command::new(bin.join("mllp_send"))
            .arg("--loose")
            .arg("--file")
            .arg(&file)
            .arg("--port")
            .arg(port.to_string())
            .arg("127.0.0.1")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("mllp_send finishes")
    .expect("mllp_send runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "mllp_send failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("\rMSA|AA|MSG00001"),
        "AA for the ADT: {stdout:?}"
    );
    assert!(
        stdout.contains("\rMSA|AA|LAB0001"),
        "AA for the ORU: {stdout:?}"
    );
    assert!(stdout.contains("|ACK^A01^ACK|"), "{stdout:?}");

    let mut received = Vec::new();
    while received.len() < 2 {
        let record = tokio::time::timeout(DEADLINE, records_rx.recv())
            .await
            .expect("records arrive")
            .expect("engine running");
        received.push(record);
    }
    let adt = &received[0];
    assert_eq!(adt.topic, "hl7.adt");
    assert_eq!(adt.key.as_deref(), Some(&b"PAT123"[..]));
    assert_eq!(adt.content_type(), Some("application/hl7-v2"));
    assert_eq!(adt.headers.last_str(header::MESSAGE_TYPE), Some("ADT"));
    assert_eq!(adt.headers.last_str(header::TRIGGER_EVENT), Some("A01"));
    assert_eq!(
        adt.headers.last_str(header::SENDING_APPLICATION),
        Some("EPIC")
    );
    assert_eq!(adt.headers.last_str(header::SENDING_FACILITY), Some("HOSP"));
    assert_eq!(adt.headers.last_str(header::CONTROL_ID), Some("MSG00001"));
    assert_eq!(adt.headers.last_str(header::VERSION), Some("2.5.1"));
    assert!(
        adt.value
            .as_deref()
            .is_some_and(|v| v.starts_with(b"MSH|^~\\&|EPIC|"))
    );
    let oru = &received[1];
    assert_eq!(oru.topic, "hl7.oru");
    assert_eq!(oru.key.as_deref(), Some(&b"77"[..]));
    assert_eq!(oru.headers.last_str(header::CONTROL_ID), Some("LAB0001"));
    assert_eq!(oru.headers.last_str(header::VERSION), Some("2.3"));

    let _ = stop_tx.send(());
    tokio::time::timeout(DEADLINE, engine)
        .await
        .expect("engine stops")
        .expect("engine task");
}

#[tokio::test]
async fn the_sink_delivers_to_hl7apy_s_mllp_server() {
    let bin = python_bin();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/hl7apy_receiver.py");
    let mut receiver = Command::new(bin.join("python"))
        .arg(&script)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the hl7apy receiver");
    let mut lines = BufReader::new(receiver.stdout.take().expect("stdout")).lines();
    let mut next_line = async || {
        tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("the receiver speaks")
            .expect("read")
            .expect("the receiver is running")
    };
    let port = next_line()
        .await
        .strip_prefix("PORT ")
        .expect("PORT line")
        .to_string();

    let (errant_tx, mut errant_rx) = mpsc::unbounded_channel();
    let mut sink = MllpSinkTask::new(SinkTaskContext {
        connector_name: "hl7-sink-python".into(),
        task_id: 0,
        config: props(&[
            ("mllp.host", "127.0.0.1".into()),
            ("mllp.port", port),
            ("retry.max.attempts", "2".into()),
            ("retry.backoff.ms", "1".into()),
        ]),
        errant_records: ErrantRecordReporter::collecting(errant_tx),
        partitions: medconnect_api::SinkPartitions::detached(),
        peers: medconnect_api::relay::alone(),
    })
    .expect("a valid task config");
    sink.start().await.expect("sink starts");

    let values = [
        ADT_A01.replace('\n', "\r"),
        ORU_R01.replace('\n', "\r"),
        ADT_A01.replace('\n', "\r").replace("MSG00001", "REJECT1"),
    ];
    let records = values
        .iter()
        .enumerate()
        .map(|(i, value)| SinkRecord {
            record: Record::new("hl7.out").with_value(value.clone()),
            kafka_partition: 0,
            kafka_offset: i as i64,
        })
        .collect::<Vec<SinkRecord>>();
    // As the engine does: the same batch again after the hinted wait while a refused message
    // has attempts left.
    loop {
        match tokio::time::timeout(DEADLINE, sink.put(records.clone()))
            .await
            .expect("put returns")
        {
            Err(error) if error.retry_after().is_some() => {
                tokio::time::sleep(error.retry_after().unwrap_or_default()).await;
            }
            other => break other.expect("put"),
        }
    }
    sink.flush().await.expect("flush");

    let mut seen = Vec::new();
    while seen.len() < 4 {
        seen.push(next_line().await);
    }
    assert_eq!(
        seen,
        vec![
            "RECEIVED MSG00001",
            "RECEIVED LAB0001",
            "RECEIVED REJECT1",
            "RECEIVED REJECT1"
        ],
        "each message once, the refused one once per attempt"
    );
    let (record, error) = errant_rx.try_recv().expect("the refused message is errant");
    assert_eq!(record.kafka_offset, 2);
    assert!(error.to_string().contains("AE"), "{error}");
    assert!(errant_rx.try_recv().is_err());

    sink.stop().await.expect("stop");
    receiver.kill().await.expect("stop the receiver");
}
