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
        listener_budget: medconnect_api::limits::ByteBudget::unlimited(),
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

/// Polls a condition (a counter the listener updates from another task) until it holds.
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not reached within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A message of type `code` (MSH-9.1), valid in every other respect.
fn typed(code: &str, control_id: &str) -> String {
    adt(control_id, "P1").replace("ADT^A01^ADT_A01", &format!("{code}^Z01"))
}

#[tokio::test]
async fn a_message_that_would_pass_the_topic_cap_is_answered_ar_and_kept_from_its_topic() {
    let mut task = started(&[("topic.max.distinct", "2")]).await;
    let mut sender = client(&task).await;
    for (code, id, topic) in [("ADT", "T1", "hl7.adt"), ("ORU", "T2", "hl7.oru")] {
        sender
            .send(typed(code, id).as_bytes(), DEADLINE)
            .await
            .expect("send");
        let mut records = poll_n(&mut task, 1).await;
        assert_eq!(records[0].record.topic, topic);
        assert!(records[0].rejected.is_none());
        records[0].complete(written());
        assert_eq!(reply(&mut sender).await.code, AckCode::Accept);
    }
    // A third distinct type: rejected before any record goes to a new topic.
    sender
        .send(typed("ZZ1", "T3").as_bytes(), DEADLINE)
        .await
        .expect("send");
    let mut records = poll_n(&mut task, 1).await;
    assert!(
        matches!(&records[0].rejected, Some(ConnectError::Data(reason)) if reason.contains("topic.max.distinct")),
        "{:?}",
        records[0].rejected
    );
    // Even when the dead-letter write succeeds, the sender learns it was not taken.
    records[0].complete(Delivery::DeadLettered {
        reason: "rejected".into(),
    });
    let frame = sender.receive(DEADLINE).await.expect("answer");
    let ack = parse_reply(&frame).expect("ack");
    assert_eq!((ack.code, ack.control_id.as_str()), (AckCode::Reject, "T3"));
    assert!(ack.text.contains("topic.max.distinct"), "{}", ack.text);
    let text = String::from_utf8_lossy(&frame);
    assert!(text.contains("\rERR|MSH^1^9^200&"), "{text:?}");
    // Known topics stay open.
    sender
        .send(typed("ORU", "T4").as_bytes(), DEADLINE)
        .await
        .expect("send");
    let mut records = poll_n(&mut task, 1).await;
    assert!(records[0].rejected.is_none());
    records[0].complete(written());
    assert_eq!(reply(&mut sender).await.code, AckCode::Accept);
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn a_fixed_topic_has_no_cap() {
    let mut task = started(&[("topic", "hl7.inbound"), ("topic.max.distinct", "1")]).await;
    let mut sender = client(&task).await;
    for (i, code) in ["ADT", "ORU", "ZZ1"].iter().enumerate() {
        sender
            .send(typed(code, &format!("F{i}")).as_bytes(), DEADLINE)
            .await
            .expect("send");
        let mut records = poll_n(&mut task, 1).await;
        assert!(records[0].rejected.is_none());
        records[0].complete(written());
        assert_eq!(reply(&mut sender).await.code, AckCode::Accept);
    }
    task.stop().await.expect("stop");
}

/// A raw socket that sent the start of a frame of `bytes` bytes and never its end.
async fn partial_frame(task: &MllpSourceTask, bytes: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let address = task.local_addr().expect("bound");
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let mut frame = vec![0x0b];
    frame.extend_from_slice(ADT_A01.as_bytes());
    frame.resize(bytes + 1, b'x');
    stream.write_all(&frame).await.expect("write");
    stream
}

/// Sends a 20,001-byte frame and expects AR "busy" naming its control id, then the close.
async fn refused_for_the_budget(task: &MllpSourceTask) {
    let address = task.local_addr().expect("bound");
    let mut sender = MllpClient::connect("127.0.0.1", address.port(), DEADLINE, None, 1 << 20)
        .await
        .expect("connect");
    let mut frame = vec![0x0b];
    frame.extend_from_slice(ADT_A01.as_bytes());
    frame.resize(20_001, b'x');
    sender.send_raw(&frame, DEADLINE).await.expect("send");
    let ack = reply(&mut sender).await;
    assert_eq!(
        (ack.code, ack.control_id.as_str()),
        (AckCode::Reject, "MSG00001")
    );
    assert!(ack.text.contains("budget"), "{}", ack.text);
    assert!(matches!(
        sender.receive(DEADLINE).await,
        Err(ClientError::Closed | ClientError::Frame(_))
    ));
}

#[tokio::test]
async fn two_listeners_together_cannot_hold_more_than_the_worker_budget() {
    // Each listener may hold 65,536 bytes, the worker only 65,536 over both.
    let worker = medconnect_api::limits::ByteBudget::new(65_536);
    let settings = [
        ("mllp.frame.budget.bytes", "65536"),
        ("mllp.max.message.bytes", "60000"),
    ];
    let mut listeners = Vec::new();
    for _ in 0..2 {
        let mut context = context(&settings);
        context.listener_budget = worker.clone();
        let mut task = MllpSourceTask::new(context).expect("a valid task config");
        task.start().await.expect("source starts");
        listeners.push(task);
    }
    let (first, second) = (&listeners[0], &listeners[1]);
    let first_budget = first.frame_budget().expect("started");
    let second_budget = second.frame_budget().expect("started");
    // Two senders stall 20,000 bytes each on the first listener, one on the second.
    let mut stalled = Vec::new();
    for n in 1..=2 {
        stalled.push(partial_frame(first, 20_000).await);
        until("the first listener's frames held", || {
            first_budget.used() == n * 20_000
        })
        .await;
    }
    stalled.push(partial_frame(second, 20_000).await);
    until("the second listener's frame held", || {
        second_budget.used() == 20_000
    })
    .await;
    assert_eq!(worker.used(), 60_000);

    // The second listener has 45,536 bytes of its own left, the worker 5,536: refused.
    refused_for_the_budget(second).await;
    assert_eq!(second_budget.refused(), 0, "the listener itself had room");
    assert!(worker.refused() >= 1);
    assert!(worker.peak() <= 65_536, "peak {}", worker.peak());
    until("the refused frame given back", || worker.used() == 60_000).await;

    // Once the first listener's senders go, the second listener serves a sender again.
    stalled.drain(..2);
    until("the first listener's frames given back", || {
        worker.used() == 20_000
    })
    .await;
    let second = &mut listeners[1];
    let mut sender = client(second).await;
    sender
        .send(ADT_A01.as_bytes(), DEADLINE)
        .await
        .expect("send");
    let mut records = poll_n(second, 1).await;
    records[0].complete(written());
    assert_eq!(reply(&mut sender).await.code, AckCode::Accept);
    drop(stalled);
    until("everything given back", || worker.used() == 0).await;
    for mut task in listeners {
        task.stop().await.expect("stop");
    }
}

#[tokio::test]
async fn connections_together_cannot_hold_more_than_the_frame_budget() {
    let mut task = started(&[
        ("mllp.frame.budget.bytes", "65536"),
        ("mllp.max.message.bytes", "60000"),
    ])
    .await;
    let budget = task.frame_budget().expect("started");
    // Three senders each stall 20,000 bytes into a frame: 60,000 of 65,536 held.
    let mut stalled = Vec::new();
    for n in 1..=3 {
        stalled.push(partial_frame(&task, 20_000).await);
        until("the stalled frames held", || budget.used() == n * 20_000).await;
    }
    // A fourth cannot get its 20,000: refused with AR naming the control id, and closed.
    refused_for_the_budget(&task).await;
    assert!(budget.refused() >= 1);
    assert!(budget.peak() <= 65_536, "peak {}", budget.peak());
    until("the refused frame given back", || budget.used() == 60_000).await;

    // Once the stalled senders go, a normal sender is served.
    drop(stalled);
    until("every stalled frame given back", || budget.used() == 0).await;
    let mut sender = client(&task).await;
    sender
        .send(ADT_A01.as_bytes(), DEADLINE)
        .await
        .expect("send");
    let mut records = poll_n(&mut task, 1).await;
    assert!(budget.used() >= ADT_A01.len(), "held until answered");
    records[0].complete(written());
    assert_eq!(reply(&mut sender).await.code, AckCode::Accept);
    until("the answered message given back", || budget.used() == 0).await;
    assert!(budget.peak() <= 65_536, "peak {}", budget.peak());
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn one_address_cannot_take_more_than_its_connections() {
    let mut task = started(&[("mllp.max.connections.per.peer", "2")]).await;
    let mut first = client(&task).await;
    let mut second = client(&task).await;
    // Both served (so both were accepted before the third connects).
    for (sender, id) in [(&mut first, "PEER1"), (&mut second, "PEER2")] {
        sender
            .send(adt(id, "P1").as_bytes(), DEADLINE)
            .await
            .expect("send");
        let mut records = poll_n(&mut task, 1).await;
        records[0].complete(written());
        assert_eq!(reply(sender).await.code, AckCode::Accept);
    }
    let mut third = client(&task).await;
    assert!(matches!(
        third.receive(DEADLINE).await,
        Err(ClientError::Closed | ClientError::Frame(_))
    ));
    // A slot comes back when a connection closes.
    drop(first);
    let address = task.local_addr().expect("bound");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut again = loop {
        let mut candidate =
            MllpClient::connect("127.0.0.1", address.port(), DEADLINE, None, 1 << 20)
                .await
                .expect("connect");
        if candidate
            .send(adt("PEER3", "P1").as_bytes(), DEADLINE)
            .await
            .is_ok()
        {
            match tokio::time::timeout(QUIET, task.poll()).await {
                Ok(Ok(mut records)) => {
                    records[0].complete(written());
                    break candidate;
                }
                Ok(Err(error)) => panic!("poll: {error}"),
                Err(_) => {}
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no slot came back");
    };
    assert_eq!(reply(&mut again).await.code, AckCode::Accept);
    task.stop().await.expect("stop");
}

const FHS: &str = "FHS|^~\\&|EPIC|HOSP|MEDCONNECT|DC|20240101120000||||FILE7\r";
const BHS: &str = "BHS|^~\\&|EPIC|HOSP|MEDCONNECT|DC|20240101120000||||BATCH7\r";

/// The MSA segments of a batch answer, as (code, control id), and its segment names.
fn batch_answer(frame: &[u8]) -> (Vec<(String, String)>, Vec<String>) {
    let text = String::from_utf8_lossy(frame);
    let segments: Vec<&str> = text.split('\r').filter(|s| !s.is_empty()).collect();
    let msa = segments
        .iter()
        .filter(|s| s.starts_with("MSA|"))
        .map(|s| {
            let f: Vec<&str> = s.split('|').collect();
            (f[1].to_string(), f[2].to_string())
        })
        .collect();
    let names = segments.iter().map(|s| s[..3].to_string()).collect();
    (msa, names)
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test]
async fn a_batch_is_stored_message_by_message_and_answered_with_a_batch_of_acks() {
    let mut task = started(&[]).await;
    let mut sender = client(&task).await;
    let messages = [adt("B1", "P1"), adt("B2", "P2"), adt("B3", "P3")];
    let batch = format!("{FHS}{BHS}{}BTS|3\rFTS|1\r", messages.concat());
    sender.send(batch.as_bytes(), DEADLINE).await.expect("send");
    let mut records = poll_n(&mut task, 3).await;
    for (record, message) in records.iter().zip(&messages) {
        assert!(record.rejected.is_none());
        assert_eq!(record.record.value.as_deref(), Some(message.as_bytes()));
    }
    // Nothing is answered until every message is durable.
    records[0].complete(written());
    records[1].complete(written());
    assert!(matches!(
        sender.receive(QUIET).await,
        Err(ClientError::Timeout(_))
    ));
    records[2].complete(written());
    let frame = sender.receive(DEADLINE).await.expect("answer");
    let (msa, names) = batch_answer(&frame);
    assert_eq!(msa, pairs(&[("AA", "B1"), ("AA", "B2"), ("AA", "B3")]));
    assert_eq!(
        names,
        [
            "FHS", "BHS", "MSH", "MSA", "MSH", "MSA", "MSH", "MSA", "BTS", "FTS"
        ]
    );
    let text = String::from_utf8_lossy(&frame);
    assert!(
        text.contains("|FILE7\rBHS|"),
        "FHS-12 names the file: {text:?}"
    );
    assert!(
        text.contains("|BATCH7\rMSH|"),
        "BHS-12 names the batch: {text:?}"
    );
    assert!(text.contains("\rBTS|3|\rFTS|1\r"), "{text:?}");
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn two_messages_in_one_frame_are_two_records_never_one() {
    let mut task = started(&[]).await;
    let mut sender = client(&task).await;
    let frame = format!("{}{}", adt("TWO1", "P1"), ORU_R01);
    sender.send(frame.as_bytes(), DEADLINE).await.expect("send");
    let mut records = poll_n(&mut task, 2).await;
    assert_eq!(
        records[0].record.headers.last_str(header::CONTROL_ID),
        Some("TWO1")
    );
    assert_eq!(records[1].record.value.as_deref(), Some(ORU_R01.as_bytes()));
    for record in &mut records {
        record.complete(written());
    }
    let (msa, names) = batch_answer(&sender.receive(DEADLINE).await.expect("answer"));
    assert_eq!(msa, pairs(&[("AA", "TWO1"), ("AA", "LAB0001")]));
    assert_eq!(names, ["BHS", "MSH", "MSA", "MSH", "MSA", "BTS"]);
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn in_a_batch_only_the_messages_stored_are_aa() {
    let mut task = started(&[]).await;
    let mut sender = client(&task).await;
    let bad = "MSH|^~\\&|EPIC|HOSP|MC|DC|2024||ADT^A01||P|2.5\rPID|1||P9\r";
    let batch = format!(
        "{BHS}{}{bad}{}{}BTS|4\r",
        adt("G1", "P1"),
        adt("G3", "P3"),
        adt("G4", "P4")
    );
    sender.send(batch.as_bytes(), DEADLINE).await.expect("send");
    let mut records = poll_n(&mut task, 4).await;
    assert!(records[1].rejected.is_some(), "the bad one is rejected");
    records[0].complete(written());
    records[1].complete(Delivery::DeadLettered {
        reason: "bad record".into(),
    });
    // Kafka refused one valid message: it is not stored, so it is not AA.
    records[2].complete(Delivery::Failed {
        reason: "timed out".into(),
    });
    records[3].complete(written());
    let (msa, _) = batch_answer(&sender.receive(DEADLINE).await.expect("answer"));
    assert_eq!(
        msa,
        pairs(&[("AA", "G1"), ("AE", ""), ("AR", "G3"), ("AA", "G4")])
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn a_broken_batch_is_rejected_whole_and_nothing_is_queued() {
    let mut task = started(&[]).await;
    let mut sender = client(&task).await;
    // BTS-1 says 3: a message went missing on the way.
    let batch = format!("{BHS}{}{}BTS|3\r", adt("X1", "P1"), adt("X2", "P2"));
    sender.send(batch.as_bytes(), DEADLINE).await.expect("send");
    let frame = sender.receive(DEADLINE).await.expect("answer");
    let (msa, names) = batch_answer(&frame);
    assert_eq!(msa, pairs(&[("AR", "X1"), ("AR", "X2")]));
    assert_eq!(
        names,
        ["BHS", "MSH", "MSA", "ERR", "MSH", "MSA", "ERR", "BTS"]
    );
    assert!(String::from_utf8_lossy(&frame).contains("BTS-1"));
    assert!(
        tokio::time::timeout(QUIET, task.poll()).await.is_err(),
        "nothing was queued"
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn a_batch_that_does_not_fit_the_queue_is_refused_whole() {
    let mut task = started(&[("queue.capacity", "2")]).await;
    let mut sender = client(&task).await;
    let batch = format!(
        "{BHS}{}{}{}BTS|3\r",
        adt("Q1", "P1"),
        adt("Q2", "P2"),
        adt("Q3", "P3")
    );
    sender.send(batch.as_bytes(), DEADLINE).await.expect("send");
    let (msa, _) = batch_answer(&sender.receive(DEADLINE).await.expect("answer"));
    assert_eq!(msa, pairs(&[("AR", "Q1"), ("AR", "Q2"), ("AR", "Q3")]));
    assert!(
        tokio::time::timeout(QUIET, task.poll()).await.is_err(),
        "nothing was queued"
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn idle_senders_cannot_lock_out_a_sender_with_a_message() {
    let mut task = started(&[("mllp.max.connections", "2")]).await;
    let mut first = client(&task).await;
    let mut second = client(&task).await;
    for (sender, id) in [(&mut first, "IDLE1"), (&mut second, "IDLE2")] {
        sender
            .send(adt(id, "P1").as_bytes(), DEADLINE)
            .await
            .expect("send");
        let mut records = poll_n(&mut task, 1).await;
        records[0].complete(written());
        assert_eq!(reply(sender).await.code, AckCode::Accept);
    }
    until("both connections idle", || task.idle_connections() == 2).await;
    // Every slot is taken by a silent sender: the new one is served, the oldest idle closed.
    let mut third = client(&task).await;
    third
        .send(adt("NEW1", "P3").as_bytes(), DEADLINE)
        .await
        .expect("send");
    let mut records = poll_n(&mut task, 1).await;
    records[0].complete(written());
    assert_eq!(reply(&mut third).await.code, AckCode::Accept);
    assert!(matches!(
        first.receive(DEADLINE).await,
        Err(ClientError::Closed | ClientError::Frame(_))
    ));
    // The other idle sender keeps its connection.
    second
        .send(adt("IDLE2B", "P2").as_bytes(), DEADLINE)
        .await
        .expect("send");
    let mut records = poll_n(&mut task, 1).await;
    records[0].complete(written());
    assert_eq!(reply(&mut second).await.code, AckCode::Accept);
    task.stop().await.expect("stop");
}
