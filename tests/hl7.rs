//! HL7 v2 over MLLP through a real worker and broker: EHR-style senders written by others
//! (python `hl7`'s `mllp_send`), a downstream receiver written by others (hl7apy's
//! MLLPServer), malformed and oversize input, split frames, concurrent senders, and a broker
//! outage during which no sender is acknowledged.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use medconnect_e2e::{TestCluster, TestWorker, eventually, json};
use medconnect_hl7::mllp::client::{ClientError, MllpClient};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(30);

fn adt(control_id: &str, patient: &str, event: &str) -> String {
    format!(
        "MSH|^~\\&|EPIC|GENHOSP|MEDCONNECT|DC|20261122120000||ADT^{event}^ADT_A01|{control_id}|P|2.5.1\rEVN|{event}|20261122120000\rPID|1||{patient}^^^GENHOSP^MR||DOE^JANE||19800101|F\rPV1|1|I|ICU^101^A\r"
    )
}

fn oru(control_id: &str, patient: &str) -> String {
    format!(
        "MSH|^~\\&|LAB|GENHOSP|EHR|GENHOSP|20261122120000||ORU^R01|{control_id}|P|2.3\rPID|1||{patient}^^^LAB||ROE^JOHN\rOBR|1||ORD1|CBC\rOBX|1|NM|WBC||7.5|10*9/L|||||F\r"
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// The venv with the python peers (scripts/hl7-peers installs it); a missing one fails the test.
fn python_bin() -> PathBuf {
    let cache = std::env::var_os("MEDCONNECT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/medconnect")
        });
    let bin = std::env::var_os("MEDCONNECT_PY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("venv/bin"));
    assert!(
        bin.join("mllp_send").is_file(),
        "python HL7 peers missing in {}: run scripts/hl7-peers",
        bin.display()
    );
    bin
}

/// Creates an MLLP source on a free port and waits until it accepts connections.
async fn mllp_source(
    worker: &TestWorker,
    name: &str,
    extra: serde_json::Value,
) -> anyhow::Result<u16> {
    let port = free_port();
    let mut config = json!({
        "connector.class": "MllpSource", "mllp.bind": "127.0.0.1", "mllp.port": port.to_string(),
        "errors.deadletterqueue.topic.name": "hl7.dlq", "errors.deadletterqueue.context.headers.enable": "true",
    });
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
    }
    worker.rest.create(name, config).await?;
    worker.wait_for_state(name, "RUNNING", 1).await?;
    eventually("the MLLP port to accept", async || {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
    })
    .await?;
    Ok(port)
}

async fn client(port: u16) -> anyhow::Result<MllpClient> {
    Ok(MllpClient::connect("127.0.0.1", port, WAIT, None, 1 << 20).await?)
}

/// MSA-1 of an ACK.
fn ack_code(ack: &[u8]) -> String {
    let text = String::from_utf8_lossy(ack);
    text.split('\r')
        .find(|s| s.starts_with("MSA|"))
        .and_then(|msa| msa.split('|').nth(1))
        .unwrap_or("none")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ehr_messages_from_mllp_send_land_in_per_type_topics_after_aa() -> anyhow::Result<()> {
    let bin = python_bin();
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let port = mllp_source(&worker, "ehr-in", json!({})).await?;

    // One ADT^A01, one ORU^R01, then a batch of 20 mixed messages, as an EHR would send them.
    let mut batch = format!(
        "{}\n{}",
        adt("MSG00001", "PAT123", "A01"),
        oru("LAB0001", "PAT123")
    );
    for i in 0..20 {
        batch.push('\n');
        batch.push_str(&if i % 2 == 0 {
            adt(&format!("B{i:03}"), &format!("PAT{i}"), "A08")
        } else {
            oru(&format!("B{i:03}"), &format!("PAT{i}"))
        });
    }
    let file = cluster.path("messages.hl7");
    // mllp_send separates messages by blank-line-free newlines; segments end in \r.
    std::fs::write(&file, batch.replace("\r\n", "\n"))?;
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(bin.join("mllp_send"))
            .args(["--loose", "--file"])
            .arg(&file)
            .args(["--port", &port.to_string(), "127.0.0.1"])
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "mllp_send failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.matches("MSA|AA|").count(),
        22,
        "an AA for every message: {stdout:?}"
    );
    assert!(stdout.contains("ACK^A01^ACK"), "{stdout:?}");

    let adts = cluster.read_topic("hl7.adt", 11).await?;
    let orus = cluster.read_topic("hl7.oru", 11).await?;
    let first = adts
        .iter()
        .find(|r| r.header("hl7.control.id") == Some("MSG00001"))
        .expect("the ADT^A01");
    assert_eq!(
        first.key.as_deref(),
        Some("PAT123"),
        "keyed by the patient id PID-3.1"
    );
    assert_eq!(first.header("content-type"), Some("application/hl7-v2"));
    assert_eq!(first.header("hl7.message.type"), Some("ADT"));
    assert_eq!(first.header("hl7.trigger.event"), Some("A01"));
    assert_eq!(first.header("hl7.sending.application"), Some("EPIC"));
    assert_eq!(first.header("hl7.sending.facility"), Some("GENHOSP"));
    assert_eq!(first.header("hl7.version"), Some("2.5.1"));
    assert!(
        first
            .value
            .as_deref()
            .is_some_and(|v| v.starts_with("MSH|^~\\&|EPIC|")),
        "the raw message"
    );
    assert!(
        orus.iter()
            .any(|r| r.header("hl7.control.id") == Some("LAB0001")
                && r.header("hl7.version") == Some("2.3"))
    );
    assert_eq!(cluster.count_records("hl7.adt").await?, 11);
    assert_eq!(cluster.count_records("hl7.oru").await?, 11);
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_ae_and_land_in_the_dead_letter_topic() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let port = mllp_source(&worker, "ehr-in", json!({})).await?;
    let mut sender = client(port).await?;

    // MSH-10 (control id) missing: parses, fails validation.
    let bad =
        "MSH|^~\\&|EPIC|GENHOSP|MEDCONNECT|DC|20261122120000||ADT^A01||P|2.5.1\rPID|1||PAT9\r";
    let ack = sender.request(bad.as_bytes(), WAIT).await?;
    assert_eq!(ack_code(&ack), "AE", "{}", String::from_utf8_lossy(&ack));
    let ack_text = String::from_utf8_lossy(&ack);
    assert!(ack_text.contains("\rERR|"), "an ERR segment: {ack_text:?}");
    assert!(
        ack_text.starts_with("MSH|^~\\&|MEDCONNECT|DC|EPIC|GENHOSP|"),
        "sender and receiver swapped: {ack_text:?}"
    );

    // Not HL7 at all.
    let ack = sender.request(b"hello, is this the lab?", WAIT).await?;
    assert_eq!(ack_code(&ack), "AR");

    let dead = cluster.read_topic("hl7.dlq", 2).await?;
    assert_eq!(dead[0].value.as_deref(), Some(bad), "the message as sent");
    assert_eq!(dead[0].header("__connect.errors.stage"), Some("TASK_POLL"));
    assert_eq!(
        dead[0].header("__connect.errors.connector.name"),
        Some("ehr-in")
    );
    assert_eq!(
        dead[0].header("__connect.errors.class.name"),
        Some("io.medconnect.connectors.hl7.MllpSourceConnector")
    );
    assert!(
        dead[0]
            .header("__connect.errors.exception.message")
            .is_some_and(|m| m.contains("MSH-10")),
        "{:?}",
        dead[0].headers
    );
    assert_eq!(dead[1].value.as_deref(), Some("hello, is this the lab?"));

    // The connection and the task are fine: the next good message gets AA.
    let ack = sender
        .request(adt("OK1", "PAT1", "A01").as_bytes(), WAIT)
        .await?;
    assert_eq!(ack_code(&ack), "AA");
    worker.wait_for_state("ehr-in", "RUNNING", 1).await?;
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_frames_oversize_frames_and_concurrent_senders() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let port = mllp_source(&worker, "ehr-in", json!({"mllp.max.message.bytes": "4096"})).await?;

    // A frame split over several TCP writes, with junk before it.
    let mut sender = client(port).await?;
    let framed = [
        b"\r\n".as_slice(),
        b"\x0b",
        adt("SPLIT1", "PAT5", "A01").as_bytes(),
        b"\x1c\r",
    ]
    .concat();
    for piece in framed.chunks(17) {
        sender.send_raw(piece, WAIT).await?;
        // Separate reads on the receiving side.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(ack_code(&sender.receive(WAIT).await?), "AA");

    // Oversize: rejected with AR, connection closed, nothing buffered without bound.
    let mut big = client(port).await?;
    let huge = format!("{}{}", adt("BIG1", "PAT6", "A01"), "NTE|1||".repeat(1000));
    let ack = big.request(huge.as_bytes(), WAIT).await?;
    assert_eq!(ack_code(&ack), "AR");
    assert!(
        matches!(
            big.receive(WAIT).await,
            Err(ClientError::Closed) | Err(ClientError::Frame(_))
        ),
        "the connection is closed"
    );

    // 8 senders at once, 20 messages each, each waiting for its ACK as real senders do.
    let mut senders = Vec::new();
    for s in 0..8 {
        senders.push(tokio::spawn(async move {
            let mut sender = client(port).await?;
            for m in 0..20 {
                let ack = sender
                    .request(
                        adt(&format!("S{s}M{m:02}"), &format!("PATC{s}"), "A08").as_bytes(),
                        WAIT,
                    )
                    .await?;
                anyhow::ensure!(
                    ack_code(&ack) == "AA",
                    "sender {s} message {m}: {}",
                    String::from_utf8_lossy(&ack)
                );
            }
            anyhow::Ok(())
        }));
    }
    for sender in senders {
        sender.await??;
    }
    let records = cluster.read_topic("hl7.adt", 161).await?;
    for s in 0..8 {
        let ids: Vec<&str> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(&format!("PATC{s}")))
            .filter_map(|r| r.header("hl7.control.id"))
            .collect();
        let expected: Vec<String> = (0..20).map(|m| format!("S{s}M{m:02}")).collect();
        assert_eq!(
            ids, expected,
            "sender {s}: every message, in the order sent"
        );
    }
    assert!(
        records
            .iter()
            .all(|r| r.header("hl7.control.id") != Some("BIG1"))
    );
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_aa_while_kafka_is_unreachable_and_retransmissions_arrive_after() -> anyhow::Result<()> {
    let (cluster, network) = TestCluster::start_behind_proxy().await?;
    let worker = cluster.start_worker().await?;
    let port = mllp_source(&worker, "ehr-in", json!({})).await?;
    let mut sender = client(port).await?;
    assert_eq!(
        ack_code(
            &sender
                .request(adt("BEFORE", "PAT1", "A01").as_bytes(), WAIT)
                .await?
        ),
        "AA"
    );

    network.cut();
    sender
        .send(adt("DURING", "PAT1", "A01").as_bytes(), WAIT)
        .await?;
    // The sender's own ACK timeout: no answer while Kafka cannot take the message.
    match sender.receive(Duration::from_secs(3)).await {
        Err(ClientError::Timeout(_)) => {}
        Ok(ack) => panic!(
            "answered while Kafka was unreachable: {}",
            String::from_utf8_lossy(&ack)
        ),
        Err(other) => panic!("unexpected: {other}"),
    }
    // The sender retransmits on a new connection, as EHRs do after an ACK timeout.
    let mut retransmit = client(port).await?;
    retransmit
        .send(adt("DURING", "PAT1", "A01").as_bytes(), WAIT)
        .await?;

    network.restore();
    // Both copies are acknowledged once Kafka has them (at least once: a duplicate, never a loss).
    assert_eq!(
        ack_code(&sender.receive(Duration::from_secs(120)).await?),
        "AA"
    );
    assert_eq!(
        ack_code(&retransmit.receive(Duration::from_secs(120)).await?),
        "AA"
    );
    let records = cluster.read_topic("hl7.adt", 3).await?;
    let during = records
        .iter()
        .filter(|r| r.header("hl7.control.id") == Some("DURING"))
        .count();
    assert_eq!(during, 2);
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_delivers_to_a_real_mllp_receiver_and_dead_letters_rejections()
-> anyhow::Result<()> {
    let bin = python_bin();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../connectors/hl7/tests/peers/hl7apy_receiver.py");
    let mut receiver = Command::new(bin.join("python"))
        .arg(&script)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(
        receiver
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    )
    .lines();
    let port = tokio::time::timeout(WAIT, lines.next_line())
        .await??
        .and_then(|l| l.strip_prefix("PORT ").map(str::to_string))
        .ok_or_else(|| anyhow::anyhow!("the receiver did not start"))?;

    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let first = adt("OUT1", "PAT1", "A01");
    let rejected = adt("REJECT1", "PAT2", "A01");
    let last = oru("OUT2", "PAT3");
    cluster
        .produce(
            "hl7.outbound",
            &[
                (Some("PAT1"), &first),
                (Some("PAT2"), &rejected),
                (Some("PAT3"), &last),
            ],
        )
        .await?;
    worker
        .rest
        .create(
            "lis-out",
            json!({"connector.class": "MllpSink", "topics": "hl7.outbound", "mllp.host": "127.0.0.1", "mllp.port": port,
                   "retry.max.attempts": "2", "retry.backoff.ms": "10",
                   "errors.tolerance": "all", "errors.deadletterqueue.topic.name": "hl7.outbound.dlq",
                   "errors.deadletterqueue.context.headers.enable": "true"}),
        )
        .await?;
    let mut received = Vec::new();
    while received.len() < 4 {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await??
            .ok_or_else(|| anyhow::anyhow!("receiver exited"))?;
        received.push(line);
    }
    assert_eq!(
        received,
        vec![
            "RECEIVED OUT1",
            "RECEIVED REJECT1",
            "RECEIVED REJECT1",
            "RECEIVED OUT2"
        ],
        "AE retried, then moved on"
    );
    let dead = cluster.read_topic("hl7.outbound.dlq", 1).await?;
    assert_eq!(dead[0].value.as_deref(), Some(rejected.as_str()));
    assert_eq!(dead[0].header("__connect.errors.stage"), Some("TASK_PUT"));
    assert_eq!(dead[0].header("__connect.errors.offset"), Some("1"));

    // Offsets are committed only for handled messages: all three, once flushed.
    assert_eq!(
        worker.rest.put_empty("/connectors/lis-out/stop").await?.0,
        204
    );
    worker.wait_for_state("lis-out", "STOPPED", 0).await?;
    let (_, offsets) = worker.rest.get("/connectors/lis-out/offsets").await?;
    assert_eq!(offsets["offsets"][0]["offset"]["kafka_offset"], 3);
    worker.shutdown().await;
    Ok(())
}

/// An ADT message of about `bytes` bytes (notes appended).
fn adt_of_size(control_id: &str, patient: &str, bytes: usize) -> String {
    let mut message = adt(control_id, patient, "A01");
    let note = "NTE|1||Lorem ipsum dolor sit amet, consectetur adipiscing elit\r";
    while message.len() < bytes {
        message.push_str(note);
    }
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_kafka_takes_is_answered_ar_and_the_listener_goes_on()
-> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    // A listener limit above what the producer takes is refused, naming the setting.
    let (code, body) = worker
        .rest
        .post(
            "/connectors",
            &json!({"name": "too-big", "config": {"connector.class": "MllpSource",
                    "mllp.bind": "127.0.0.1", "mllp.port": "0", "mllp.max.message.bytes": "4194304"}}),
        )
        .await?;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("mllp.max.message.bytes:")),
        "{body}"
    );

    // With the defaults, 1.1 MB (under the old 4 MiB limit, over Kafka's 1,000,000 bytes) is
    // answered AR: it used to fail the task and close the listener for every sender.
    let port = mllp_source(&worker, "ehr-in", json!({})).await?;
    let mut sender = client(port).await?;
    let huge = adt_of_size("HUGE1", "PAT7", 1_100_000);
    assert_eq!(
        ack_code(&sender.request(huge.as_bytes(), WAIT).await?),
        "AR"
    );

    let mut next = client(port).await?;
    let ack = next
        .request(adt("AFTER1", "PAT8", "A01").as_bytes(), WAIT)
        .await?;
    assert_eq!(ack_code(&ack), "AA");
    worker.wait_for_state("ehr-in", "RUNNING", 1).await?;
    let records = cluster.read_all("hl7.adt").await?;
    let ids: Vec<&str> = records
        .iter()
        .filter_map(|r| r.header("hl7.control.id"))
        .collect();
    assert_eq!(ids, vec!["AFTER1"]);
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_producer_refuses_is_answered_ar_and_the_connection_goes_on()
-> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    // A producer limit set for the whole worker, which connector validation cannot see: the
    // listener accepts messages the producer refuses.
    let mut config = cluster.worker_config();
    config.producer = medconnect_runtime::WorkerConfig::from_toml(
        "bootstrap_servers = \"unused\"\n[producer]\n\"message.max.bytes\" = \"200000\"",
    )
    .map_err(anyhow::Error::msg)?
    .producer;
    let worker = cluster.start_worker_with(config).await?;
    let port = mllp_source(
        &worker,
        "ehr-in",
        json!({"errors.deadletterqueue.topic.name": ""}),
    )
    .await?;
    let mut sender = client(port).await?;
    let ack = sender
        .request(adt_of_size("HUGE2", "PAT9", 300_000).as_bytes(), WAIT)
        .await?;
    assert_eq!(ack_code(&ack), "AR", "{}", String::from_utf8_lossy(&ack));
    assert!(
        String::from_utf8_lossy(&ack).contains("not stored"),
        "{}",
        String::from_utf8_lossy(&ack)
    );
    // Only that record failed: the same connection carries the next message.
    let ack = sender
        .request(adt("AFTER2", "PAT9", "A01").as_bytes(), WAIT)
        .await?;
    assert_eq!(ack_code(&ack), "AA");
    worker.wait_for_state("ehr-in", "RUNNING", 1).await?;
    let records = cluster.read_all("hl7.adt").await?;
    let ids: Vec<&str> = records
        .iter()
        .filter_map(|r| r.header("hl7.control.id"))
        .collect();
    assert_eq!(ids, vec!["AFTER2"]);
    worker.shutdown().await;
    Ok(())
}

/// A receiver that answers every message AE and reports each message and when its
/// connection closes.
async fn refusing_receiver() -> anyhow::Result<(
    u16,
    tokio::sync::mpsc::UnboundedReceiver<&'static str>,
    tokio::task::JoinHandle<()>,
)> {
    use medconnect_hl7::ack::{self, Ack, AckCode};
    use medconnect_hl7::message::read_header;
    use medconnect_hl7::mllp::MllpCodec;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let serving = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let events = events.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    // One MLLP frame: 0x0b, the message, 0x1c 0x0d.
                    if let Some(end) = buffer.windows(2).position(|w| w == b"\x1c\r") {
                        let start = buffer.iter().position(|b| *b == 0x0b).map_or(0, |s| s + 1);
                        let frame =
                            String::from_utf8_lossy(&buffer[start.min(end)..end]).into_owned();
                        buffer.drain(..end + 2);
                        let _ = events.send("message");
                        let header = read_header(&frame).ok();
                        let reply = ack::build(
                            header.as_ref(),
                            &Ack {
                                code: AckCode::Error,
                                text: "refused",
                                error: None,
                            },
                        );
                        if stream.write_all(&MllpCodec::frame(&reply)).await.is_err() {
                            let _ = events.send("closed");
                            return;
                        }
                        continue;
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => {
                            let _ = events.send("closed");
                            return;
                        }
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    Ok((port, events_rx, serving))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_sink_ends_its_backoff_between_attempts() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    // A shutdown timeout longer than the test: only the backoff itself may end early.
    let mut config = cluster.worker_config();
    config.tasks.shutdown_timeout_ms = 600_000;
    let worker = cluster.start_worker_with(config).await?;
    let (port, mut events, serving) = refusing_receiver().await?;
    cluster
        .produce(
            "hl7.outbound",
            &[(Some("PAT1"), &adt("SLOW1", "PAT1", "A01"))],
        )
        .await?;
    worker
        .rest
        .create(
            "lis-out",
            json!({"connector.class": "MllpSink", "topics": "hl7.outbound", "mllp.host": "127.0.0.1",
                   "mllp.port": port.to_string(), "retry.max.attempts": "3", "retry.backoff.ms": "3600000",
                   "errors.tolerance": "all"}),
        )
        .await?;
    let first = tokio::time::timeout(WAIT, events.recv()).await?;
    assert_eq!(first, Some("message"));

    // The sink now waits an hour before its second attempt; a stop must end that wait (the
    // stop call answers once the task has stopped, and the worker's shutdown timeout here is
    // ten minutes: only the end of the backoff lets it answer within WAIT).
    let stopped = tokio::time::timeout(WAIT, worker.rest.put_empty("/connectors/lis-out/stop"))
        .await
        .map_err(|_| {
            anyhow::anyhow!("the stop did not end the sink's backoff within {WAIT:?}")
        })??;
    assert_eq!(stopped.0, 204, "{}", stopped.1);
    let next = tokio::time::timeout(WAIT, events.recv()).await?;
    assert_eq!(
        next,
        Some("closed"),
        "the sink stopped and closed its connection without another attempt"
    );
    worker.wait_for_state("lis-out", "STOPPED", 0).await?;
    serving.abort();
    worker.shutdown().await;
    Ok(())
}

// The dead-letter topic takes no larger records than the record's own topic: a record
// refused by both fails only itself (Delivery::Rejected, answered AR), never the listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_its_topic_and_the_dead_letter_topic_fails_only_itself()
-> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    // The worker's producer limit applies to the dead-letter topic as much as to the record's
    // own: a record refused by one is refused by the other.
    let mut config = cluster.worker_config();
    config.producer = medconnect_runtime::WorkerConfig::from_toml(
        "bootstrap_servers = \"unused\"\n[producer]\n\"message.max.bytes\" = \"200000\"",
    )
    .map_err(anyhow::Error::msg)?
    .producer;
    let worker = cluster.start_worker_with(config).await?;
    let port = mllp_source(&worker, "ehr-in", json!({"errors.tolerance": "all"})).await?;
    let mut sender = client(port).await?;
    let ack = sender
        .request(adt_of_size("HUGE3", "PAT9", 300_000).as_bytes(), WAIT)
        .await?;
    assert_eq!(ack_code(&ack), "AR", "{}", String::from_utf8_lossy(&ack));
    let ack = sender
        .request(adt("AFTER3", "PAT9", "A01").as_bytes(), WAIT)
        .await?;
    assert_eq!(ack_code(&ack), "AA");
    worker.wait_for_state("ehr-in", "RUNNING", 1).await?;
    let records = cluster.read_all("hl7.adt").await?;
    let ids: Vec<&str> = records
        .iter()
        .filter_map(|r| r.header("hl7.control.id"))
        .collect();
    assert_eq!(ids, vec!["AFTER3"]);
    worker.shutdown().await;
    Ok(())
}

/// Every topic the broker has (metadata for all topics: asking for one would create it).
fn broker_topics(bootstrap: &str) -> anyhow::Result<Vec<String>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("allow.auto.create.topics", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    let mut topics: Vec<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .collect();
    topics.sort();
    Ok(topics)
}

/// A valid message of type `code` (MSH-9.1).
fn typed(code: &str, control_id: &str) -> String {
    adt(control_id, "PATT", "A01").replace("ADT^A01^ADT_A01", &format!("{code}^Z01"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_cannot_create_topics_past_the_cap() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let port = mllp_source(&worker, "ehr-in", json!({"topic.max.distinct": "2"})).await?;
    let mut sender = client(port).await?;
    for (code, id) in [("ADT", "C1"), ("ORU", "C2"), ("ADT", "C3")] {
        let ack = sender.request(typed(code, id).as_bytes(), WAIT).await?;
        assert_eq!(ack_code(&ack), "AA", "{}", String::from_utf8_lossy(&ack));
    }
    // Two more types: each answered AR with the reason, kept in the dead-letter topic.
    for (code, id) in [("ZZ1", "C4"), ("ZZ2", "C5")] {
        let ack = sender.request(typed(code, id).as_bytes(), WAIT).await?;
        let text = String::from_utf8_lossy(&ack);
        assert_eq!(ack_code(&ack), "AR", "{text}");
        assert!(text.contains("topic.max.distinct"), "{text}");
        assert!(text.contains(&format!("MSA|AR|{id}|")), "{text}");
    }
    let dead = cluster.read_topic("hl7.dlq", 2).await?;
    let dead_ids: Vec<&str> = dead
        .iter()
        .filter_map(|r| r.header("hl7.control.id"))
        .collect();
    assert_eq!(dead_ids, vec!["C4", "C5"], "nothing lost");
    // The cap holds for the types it admitted.
    let ack = sender.request(typed("ORU", "C6").as_bytes(), WAIT).await?;
    assert_eq!(ack_code(&ack), "AA");
    let topics = broker_topics(&cluster.bootstrap())?;
    let hl7_topics: Vec<&String> = topics.iter().filter(|t| t.starts_with("hl7.")).collect();
    assert_eq!(
        hl7_topics,
        vec!["hl7.adt", "hl7.dlq", "hl7.oru"],
        "no topic for the refused types: {topics:?}"
    );
    assert_eq!(cluster.count_records("hl7.adt").await?, 2);
    assert_eq!(cluster.count_records("hl7.oru").await?, 2);
    worker.shutdown().await;
    Ok(())
}

/// Sends one frame with python-hl7's MLLPClient and parses the answer with python-hl7's batch
/// parser: the batches of the answer, each with its envelope and (MSA-1, MSA-2) per ACK.
async fn python_batch(
    cluster: &TestCluster,
    port: u16,
    name: &str,
    payload: &str,
) -> anyhow::Result<serde_json::Value> {
    let bin = python_bin();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../connectors/hl7/tests/peers/hl7_batch_send.py");
    let file = cluster.path(name);
    std::fs::write(&file, payload)?;
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(bin.join("python"))
            .arg(&script)
            .arg(port.to_string())
            .arg(&file)
            .output(),
    )
    .await??;
    anyhow::ensure!(
        output.status.success(),
        "the python batch sender failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hl7_batches_are_stored_message_by_message_and_answered_with_a_batch_of_acks()
-> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let port = mllp_source(&worker, "ehr-in", json!({})).await?;
    let fhs = "FHS|^~\\&|EPIC|GENHOSP|MEDCONNECT|DC|20261122120000||||FILE1\r";
    let bhs = "BHS|^~\\&|EPIC|GENHOSP|MEDCONNECT|DC|20261122120000||||BATCH1\r";

    // A file of one batch of three: three records in order, one AA each in a batch ACK.
    let three = ["BA1", "BA2", "BA3"].map(|id| adt(id, "PATB", "A01"));
    let answer = python_batch(
        &cluster,
        port,
        "three.hl7",
        &format!("{fhs}{bhs}{}BTS|3\rFTS|1\r", three.concat()),
    )
    .await?;
    assert_eq!(
        answer,
        json!({"file": true, "batches": [{"header": "BHS", "trailer": "BTS|3|",
               "acks": [["AA", "BA1"], ["AA", "BA2"], ["AA", "BA3"]]}]})
    );
    let records = cluster.read_topic("hl7.adt", 3).await?;
    let ids: Vec<&str> = records
        .iter()
        .filter_map(|r| r.header("hl7.control.id"))
        .collect();
    assert_eq!(ids, vec!["BA1", "BA2", "BA3"]);
    assert_eq!(records[1].value.as_deref(), Some(three[1].as_str()));

    // Two messages without an envelope: two records, not one.
    let answer = python_batch(
        &cluster,
        port,
        "two.hl7",
        &format!("{}{}", adt("TW1", "PATB", "A08"), oru("TW2", "PATB")),
    )
    .await?;
    assert_eq!(
        answer,
        json!({"file": false, "batches": [{"header": "BHS", "trailer": "BTS|2|",
               "acks": [["AA", "TW1"], ["AA", "TW2"]]}]})
    );

    // One bad message: the others are stored and AA, the bad one AE and dead-lettered.
    let bad =
        "MSH|^~\\&|EPIC|GENHOSP|MEDCONNECT|DC|20261122120000||ADT^A01||P|2.5.1\rPID|1||PATB\r";
    let answer = python_batch(
        &cluster,
        port,
        "bad.hl7",
        &format!(
            "{bhs}{}{bad}{}BTS|3\r",
            adt("BD1", "PATB", "A01"),
            adt("BD3", "PATB", "A01")
        ),
    )
    .await?;
    assert_eq!(
        answer["batches"][0]["acks"],
        json!([["AA", "BD1"], ["AE", ""], ["AA", "BD3"]])
    );
    let dead = cluster.read_topic("hl7.dlq", 1).await?;
    assert_eq!(dead[0].value.as_deref(), Some(bad));

    // A truncated batch (BTS-1 says 3, two arrived): every message AR, nothing stored.
    let answer = python_batch(
        &cluster,
        port,
        "short.hl7",
        &format!(
            "{bhs}{}{}BTS|3\r",
            adt("SH1", "PATB", "A01"),
            adt("SH2", "PATB", "A01")
        ),
    )
    .await?;
    assert_eq!(
        answer["batches"][0]["acks"],
        json!([["AR", "SH1"], ["AR", "SH2"]])
    );

    // A last single message marks the end: everything before it is in the topic.
    let mut sender = client(port).await?;
    let ack = sender
        .request(adt("END1", "PATB", "A01").as_bytes(), WAIT)
        .await?;
    assert_eq!(ack_code(&ack), "AA");
    let records = cluster.read_topic("hl7.adt", 7).await?;
    let ids: Vec<&str> = records
        .iter()
        .filter_map(|r| r.header("hl7.control.id"))
        .collect();
    assert_eq!(ids, vec!["BA1", "BA2", "BA3", "TW1", "BD1", "BD3", "END1"]);
    assert_eq!(cluster.count_records("hl7.adt").await?, 7);
    assert_eq!(cluster.count_records("hl7.oru").await?, 1);
    assert_eq!(cluster.count_records("hl7.dlq").await?, 1);
    worker.shutdown().await;
    Ok(())
}

// Found by the hl7_config fuzz target: an index past usize in key.field panicked inside
// hl7-parser while the REST API validated the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_field_index_past_usize_is_a_400_naming_the_setting() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let config = json!({"name": "bad-key", "connector.class": "MllpSource", "mllp.bind": "127.0.0.1",
                        "mllp.port": "0", "key.field": "PID.3.19223372036854775807"});
    let (code, body) = worker
        .rest
        .put("/connector-plugins/MllpSource/config/validate", &config)
        .await?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["error_count"], 1, "{body}");
    let (code, body) = worker
        .rest
        .post("/connectors", &json!({"name": "bad-key", "config": config}))
        .await?;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("key.field")),
        "{body}"
    );
    let (code, _) = worker.rest.get("/connectors").await?;
    assert_eq!(code, 200, "the worker answers after it");
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mllp_listeners_share_the_workers_listener_budget() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let cluster = TestCluster::start().await?;
    // Each listener may hold its default 64 MiB; the worker only 100,000 bytes over both.
    let mut config = cluster.worker_config();
    config.tasks.listener_budget_bytes = 100_000;
    let worker = cluster.start_worker_with(config).await?;
    let first = mllp_source(&worker, "ward-a", json!({})).await?;
    let second = mllp_source(
        &worker,
        "ward-b",
        json!({"mllp.max.message.bytes": "200000"}),
    )
    .await?;

    // A sender on the first listener stalls 60,000 bytes into a frame.
    let mut stalled = tokio::net::TcpStream::connect(("127.0.0.1", first)).await?;
    let mut partial = vec![0x0b];
    partial.extend_from_slice(adt_of_size("STALL1", "PAT1", 60_000).as_bytes());
    stalled.write_all(&partial).await?;
    let metrics = eventually("the stalled frame held", async || {
        let (_, text) = worker.rest.get_text("/metrics").await.ok()?;
        (budget_measure(&text, "used")? >= 60_000).then_some(text)
    })
    .await?;
    assert_eq!(budget_measure(&metrics, "capacity"), Some(100_000));

    // A 50,000-byte message on the second listener does not fit what the worker has left.
    let mut sender = client(second).await?;
    let ack = sender
        .request(adt_of_size("BIG1", "PAT2", 50_000).as_bytes(), WAIT)
        .await?;
    assert_eq!(ack_code(&ack), "AR", "{}", String::from_utf8_lossy(&ack));
    assert!(String::from_utf8_lossy(&ack).contains("budget"));

    // Once the stalled sender goes, the same message is stored.
    drop(stalled);
    let ack = eventually("the budget given back", async || {
        let mut sender = client(second).await.ok()?;
        let ack = sender
            .request(adt_of_size("BIG1", "PAT2", 50_000).as_bytes(), WAIT)
            .await
            .ok()?;
        (ack_code(&ack) == "AA").then_some(ack)
    })
    .await?;
    assert_eq!(ack_code(&ack), "AA");
    let (_, metrics) = worker.rest.get_text("/metrics").await?;
    assert!(
        !metrics.contains("medconnect_listener_budget_refusals 0"),
        "{metrics}"
    );
    let stored = cluster.read_topic("hl7.adt", 1).await?;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].header("hl7.control.id"), Some("BIG1"));
    worker.shutdown().await;
    Ok(())
}

/// A measure of `medconnect_listener_budget_bytes` in a `/metrics` text.
fn budget_measure(metrics: &str, measure: &str) -> Option<u64> {
    let prefix = format!("medconnect_listener_budget_bytes{{measure=\"{measure}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}
