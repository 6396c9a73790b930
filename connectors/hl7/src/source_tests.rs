//! The source task driven through `SourceTask` with real TCP senders; the test plays the
//! engine by polling records and completing (or dropping) their acknowledgement handles.

use std::sync::Arc;
use std::time::Duration;

use medconnect_api::{
    ConnectError, Delivery, OffsetReader, SourceOffset, SourcePartition, SourceRecord, SourceTask,
    SourceTaskContext,
};

use super::MllpSourceTask;
use crate::ack::{AckCode, AckReply, parse_reply};
use crate::message::header;
use crate::mllp::{ClientError, MllpClient};
use crate::samples::{ADT_A01, ORU_R01, adt};

/// Long enough for a slow CI machine; a passing test never waits for it.
const DEADLINE: Duration = Duration::from_secs(10);
/// How long a test watches for an answer that must not come. A wrong implementation
/// answers at once, so this can only let a bug pass, never fail a correct one.
const QUIET: Duration = Duration::from_millis(300);

struct NoOffsets;

impl OffsetReader for NoOffsets {
    fn offset(&self, _partition: &SourcePartition) -> Option<SourceOffset> {
        None
    }
}

pub(crate) fn context(settings: &[(&str, &str)]) -> SourceTaskContext {
    let mut config: medconnect_api::Props = [("mllp.bind", "127.0.0.1"), ("mllp.port", "0")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in settings {
        config.insert(k.to_string(), v.to_string());
    }
    SourceTaskContext {
        connector_name: "hl7-test".into(),
        task_id: 0,
        config,
        offsets: Arc::new(NoOffsets),
    }
}

async fn started(settings: &[(&str, &str)]) -> MllpSourceTask {
    let mut task = MllpSourceTask::new(context(settings)).expect("a valid task config");
    task.start().await.expect("source starts");
    task
}

async fn client(task: &MllpSourceTask) -> MllpClient {
    let address = task.local_addr().expect("bound");
    MllpClient::connect("127.0.0.1", address.port(), DEADLINE, None, 1 << 20)
        .await
        .expect("connect")
}

/// Polls until `n` records arrived.
async fn poll_n(task: &mut MllpSourceTask, n: usize) -> Vec<SourceRecord> {
    let mut records = Vec::new();
    while records.len() < n {
        let batch = tokio::time::timeout(DEADLINE, task.poll())
            .await
            .expect("records within the deadline")
            .expect("poll");
        records.extend(batch);
    }
    assert_eq!(records.len(), n, "more records than expected");
    records
}

async fn reply(client: &mut MllpClient) -> AckReply {
    let frame = client.receive(DEADLINE).await.expect("an answer");
    parse_reply(&frame).expect("a well-formed ACK")
}

fn written() -> Delivery {
    Delivery::Written {
        topic: "hl7.adt".into(),
        partition: 0,
        offset: 1,
    }
}

#[tokio::test]
async fn aa_is_sent_only_after_the_record_is_written() {
    let mut task = started(&[]).await;
    let mut sender = client(&task).await;
    sender
        .send(ADT_A01.as_bytes(), DEADLINE)
        .await
        .expect("send");

    let mut records = poll_n(&mut task, 1).await;
    let record = &records[0].record;
    assert_eq!(record.topic, "hl7.adt");
    assert_eq!(record.key.as_deref(), Some(&b"PAT123"[..]));
    assert_eq!(record.value.as_deref(), Some(ADT_A01.as_bytes()));
    assert_eq!(
        record.headers.last_str(header::CONTROL_ID),
        Some("MSG00001")
    );
    assert!(records[0].rejected.is_none());

    assert!(
        matches!(sender.receive(QUIET).await, Err(ClientError::Timeout(_))),
        "nothing may be answered before the engine completes the record"
    );
    records[0].complete(written());
    let ack = reply(&mut sender).await;
    assert_eq!(
        (ack.code, ack.control_id.as_str()),
        (AckCode::Accept, "MSG00001")
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn a_dropped_or_failed_delivery_is_never_an_aa() {
    let mut task = started(&[]).await;
    let mut sender = client(&task).await;

    sender
        .send(adt("DROP1", "P1").as_bytes(), DEADLINE)
        .await
        .expect("send");
    drop(poll_n(&mut task, 1).await);
    let ack = reply(&mut sender).await;
    assert_eq!(
        (ack.code, ack.control_id.as_str()),
        (AckCode::Reject, "DROP1")
    );

    sender
        .send(adt("FAIL1", "P1").as_bytes(), DEADLINE)
        .await
        .expect("send");
    let mut records = poll_n(&mut task, 1).await;
    records[0].complete(Delivery::Failed {
        reason: "producer closed".into(),
    });
    let ack = reply(&mut sender).await;
    assert_eq!(
        (ack.code, ack.control_id.as_str()),
        (AckCode::Reject, "FAIL1")
    );

    sender
        .send(adt("DLQ1", "P1").as_bytes(), DEADLINE)
        .await
        .expect("send");
    let mut records = poll_n(&mut task, 1).await;
    records[0].complete(Delivery::DeadLettered {
        reason: "transform failed".into(),
    });
    let ack = reply(&mut sender).await;
    assert_eq!(ack.code, AckCode::Error);
    assert!(ack.text.contains("transform failed"), "{}", ack.text);
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn a_record_kafka_refuses_is_answered_ar_and_the_connection_goes_on() {
    let mut task = started(&[]).await;
    let mut sender = client(&task).await;
    sender
        .send(adt("HUGE1", "P1").as_bytes(), DEADLINE)
        .await
        .expect("send");
    let mut records = poll_n(&mut task, 1).await;
    records[0].complete(Delivery::Rejected {
        reason: "Kafka refused the record: Message size too large".into(),
    });
    let ack = reply(&mut sender).await;
    assert_eq!(
        (ack.code, ack.control_id.as_str()),
        (AckCode::Reject, "HUGE1")
    );
    assert!(ack.text.contains("too large"), "{}", ack.text);

    // Only that record failed: the same connection carries the next message.
    sender
        .send(adt("NEXT1", "P1").as_bytes(), DEADLINE)
        .await
        .expect("send");
    let mut records = poll_n(&mut task, 1).await;
    records[0].complete(written());
    let ack = reply(&mut sender).await;
    assert_eq!(
        (ack.code, ack.control_id.as_str()),
        (AckCode::Accept, "NEXT1")
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn an_invalid_message_is_rejected_to_the_dead_letter_topic_and_answered_ae() {
    let mut task = started(&[]).await;
    let mut sender = client(&task).await;
    let invalid = "MSH|^~\\&|EPIC|HOSP|MC|DC|2024||ADT^A01||P|2.5\rPID|1||P9\r";
    sender
        .send(invalid.as_bytes(), DEADLINE)
        .await
        .expect("send");

    let mut records = poll_n(&mut task, 1).await;
    let rejected = &records[0];
    assert!(
        matches!(&rejected.rejected, Some(ConnectError::Data(reason)) if reason.contains("MSH-10"))
    );
    assert!(
        rejected.ack.is_some(),
        "the engine must be able to tell the listener"
    );
    assert_eq!(rejected.record.value.as_deref(), Some(invalid.as_bytes()));
    assert_eq!(
        rejected
            .record
            .headers
            .last_str(header::SENDING_APPLICATION),
        Some("EPIC")
    );
    assert!(matches!(
        sender.receive(QUIET).await,
        Err(ClientError::Timeout(_))
    ));

    records[0].complete(Delivery::DeadLettered {
        reason: "bad record".into(),
    });
    let frame = sender.receive(DEADLINE).await.expect("answer");
    let ack = parse_reply(&frame).expect("ack");
    assert_eq!(ack.code, AckCode::Error);
    assert!(ack.text.contains("MSH-10"), "{}", ack.text);
    let text = String::from_utf8_lossy(&frame);
    assert!(text.contains("\rERR|MSH^1^10^101&"), "{text:?}");
    assert!(
        text.starts_with("MSH|^~\\&|MC|DC|EPIC|HOSP|"),
        "sender and receiver swapped: {text:?}"
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn bytes_that_are_no_message_get_a_generic_ar() {
    let mut task = started(&[]).await;
    let mut sender = client(&task).await;
    sender
        .send(b"\x00\x01 not hl7", DEADLINE)
        .await
        .expect("send");
    let mut records = poll_n(&mut task, 1).await;
    assert!(records[0].rejected.is_some());
    records[0].complete(Delivery::Failed {
        reason: "no dead-letter topic".into(),
    });
    let frame = sender.receive(DEADLINE).await.expect("answer");
    assert!(frame.starts_with(b"MSH|^~\\&|MEDCONNECT|"));
    assert_eq!(parse_reply(&frame).expect("ack").code, AckCode::Reject);
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn an_unsupported_version_is_answered_ar() {
    let mut task = started(&[]).await;
    let mut sender = client(&task).await;
    sender
        .send(ADT_A01.replace("|2.5.1\r", "|9.9\r").as_bytes(), DEADLINE)
        .await
        .expect("send");
    let mut records = poll_n(&mut task, 1).await;
    records[0].complete(Delivery::DeadLettered { reason: "r".into() });
    let ack = reply(&mut sender).await;
    assert_eq!(
        (ack.code, ack.control_id.as_str()),
        (AckCode::Reject, "MSG00001")
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn a_full_queue_is_answered_ar_at_once() {
    let mut task = started(&[("queue.capacity", "1")]).await;
    let mut first = client(&task).await;
    let mut second = client(&task).await;
    // Nothing polls: whichever message is queued first fills the queue, the other must be
    // answered AR right away instead of waiting.
    first
        .send(adt("Q1", "P1").as_bytes(), DEADLINE)
        .await
        .expect("send");
    second
        .send(adt("Q2", "P2").as_bytes(), DEADLINE)
        .await
        .expect("send");
    let (busy, mut waiting, queued_id) = tokio::select! {
        frame = first.receive(DEADLINE) => (frame, second, "Q2"),
        frame = second.receive(DEADLINE) => (frame, first, "Q1"),
    };
    let busy = parse_reply(&busy.expect("an immediate answer")).expect("ack");
    assert_eq!(busy.code, AckCode::Reject);
    assert_ne!(busy.control_id, queued_id);
    assert!(busy.text.contains("busy"), "{}", busy.text);

    let mut records = poll_n(&mut task, 1).await;
    assert_eq!(
        records[0].record.headers.last_str(header::CONTROL_ID),
        Some(queued_id)
    );
    records[0].complete(written());
    let ack = reply(&mut waiting).await;
    assert_eq!(
        (ack.code, ack.control_id.as_str()),
        (AckCode::Accept, queued_id)
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn a_connection_s_messages_are_processed_in_order_one_at_a_time() {
    let mut task = started(&[]).await;
    let mut sender = client(&task).await;
    let mut pipelined = Vec::new();
    for i in 1..=3 {
        pipelined.extend_from_slice(&crate::mllp::MllpCodec::frame(
            adt(&format!("ORD{i}"), "P").as_bytes(),
        ));
    }
    sender.send_raw(&pipelined, DEADLINE).await.expect("send");
    for i in 1..=3 {
        let mut records = poll_n(&mut task, 1).await;
        let id = format!("ORD{i}");
        assert_eq!(
            records[0].record.headers.last_str(header::CONTROL_ID),
            Some(id.as_str())
        );
        assert!(
            tokio::time::timeout(QUIET, task.poll()).await.is_err(),
            "the next message must wait for this one's answer"
        );
        records[0].complete(written());
        let ack = reply(&mut sender).await;
        assert_eq!(
            (ack.code, ack.control_id.as_str()),
            (AckCode::Accept, id.as_str())
        );
    }
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn concurrent_connections_are_served_independently() {
    let mut task = started(&[]).await;
    let address = task.local_addr().expect("bound");
    let senders: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn(async move {
                let mut sender =
                    MllpClient::connect("127.0.0.1", address.port(), DEADLINE, None, 1 << 20)
                        .await
                        .expect("connect");
                let id = format!("C{i}");
                let message = if i % 2 == 0 {
                    adt(&id, &format!("P{i}"))
                } else {
                    ORU_R01.replace("LAB0001", &id)
                };
                let frame = sender
                    .request(message.as_bytes(), DEADLINE)
                    .await
                    .expect("answer");
                (id, parse_reply(&frame).expect("ack"))
            })
        })
        .collect();
    let mut records = poll_n(&mut task, 8).await;
    let mut topics: Vec<_> = records.iter().map(|r| r.record.topic.clone()).collect();
    topics.sort();
    topics.dedup();
    assert_eq!(topics, vec!["hl7.adt".to_string(), "hl7.oru".to_string()]);
    for record in &mut records {
        record.complete(written());
    }
    for sender in senders {
        let (id, ack) = sender.await.expect("sender task");
        assert_eq!((ack.code, ack.control_id), (AckCode::Accept, id));
    }
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn an_oversize_message_is_rejected_and_the_connection_closed() {
    let mut task = started(&[("mllp.max.message.bytes", "1024")]).await;
    let mut sender = client(&task).await;
    let mut big = ADT_A01.to_string();
    big.push_str(&"NTE|1||".repeat(300));
    sender.send(big.as_bytes(), DEADLINE).await.expect("send");
    let ack = reply(&mut sender).await;
    assert_eq!(ack.code, AckCode::Reject);
    assert!(ack.text.contains("maximum size"), "{}", ack.text);
    assert!(matches!(
        sender.receive(DEADLINE).await,
        Err(ClientError::Closed | ClientError::Frame(_))
    ));
    assert!(
        tokio::time::timeout(QUIET, task.poll()).await.is_err(),
        "nothing was queued"
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn a_stalled_frame_is_closed_after_the_read_timeout() {
    let mut task = started(&[
        ("mllp.read.timeout.ms", "200"),
        ("mllp.idle.timeout.ms", "0"),
    ])
    .await;
    let mut sender = client(&task).await;
    sender
        .send_raw(b"\x0bMSH|^~\\&|partial", DEADLINE)
        .await
        .expect("send");
    assert!(matches!(
        sender.receive(DEADLINE).await,
        Err(ClientError::Closed | ClientError::Frame(_))
    ));
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let mut task = started(&[("mllp.idle.timeout.ms", "200")]).await;
    let mut sender = client(&task).await;
    assert!(matches!(
        sender.receive(DEADLINE).await,
        Err(ClientError::Closed | ClientError::Frame(_))
    ));
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn stop_closes_connections_without_answering_pending_messages() {
    let mut task = started(&[]).await;
    let mut sender = client(&task).await;
    sender
        .send(ADT_A01.as_bytes(), DEADLINE)
        .await
        .expect("send");
    let mut records = poll_n(&mut task, 1).await;
    task.stop().await.expect("stop");
    records[0].complete(written());
    match sender.receive(DEADLINE).await {
        Err(ClientError::Closed | ClientError::Frame(_)) => {}
        other => panic!("expected the connection closed without an answer, got {other:?}"),
    }
    let address = task.local_addr().expect("was bound");
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "the listener must be closed"
    );
}

#[tokio::test]
async fn immediate_mode_answers_aa_before_the_write() {
    let mut task = started(&[("ack.mode", "immediate")]).await;
    let mut sender = client(&task).await;
    sender
        .send(ADT_A01.as_bytes(), DEADLINE)
        .await
        .expect("send");
    let ack = reply(&mut sender).await;
    assert_eq!(ack.code, AckCode::Accept);
    let records = poll_n(&mut task, 1).await;
    assert!(records[0].ack.is_some());
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn junk_between_frames_is_ignored() {
    let mut task = started(&[]).await;
    let mut sender = client(&task).await;
    let mut bytes = b"\r\n garbage \r\n".to_vec();
    bytes.extend_from_slice(&crate::mllp::MllpCodec::frame(ADT_A01.as_bytes()));
    sender.send_raw(&bytes, DEADLINE).await.expect("send");
    let mut records = poll_n(&mut task, 1).await;
    assert_eq!(records[0].record.value.as_deref(), Some(ADT_A01.as_bytes()));
    records[0].complete(written());
    assert_eq!(reply(&mut sender).await.code, AckCode::Accept);
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn the_bound_address_is_written_to_the_address_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("mllp.addr");
    let file_setting = file.display().to_string();
    let mut task = started(&[("listener.address.file", &file_setting)]).await;
    let written = std::fs::read_to_string(&file).expect("address file");
    assert_eq!(written, task.local_addr().expect("bound").to_string());
    task.stop().await.expect("stop");
}
