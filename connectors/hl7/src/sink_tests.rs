//! The sink task driven through `SinkTask` against a small MLLP receiver on a real socket.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use medconnect_api::{
    ConnectError, ErrantRecordReporter, Record, SinkRecord, SinkTask, SinkTaskContext,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::codec::Decoder;

use super::MllpSinkTask;
use crate::ack::{self, Ack, AckCode};
use crate::message::read_header;
use crate::mllp::MllpCodec;
use crate::samples::adt;

const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
enum Reply {
    Code(AckCode),
    /// Say nothing (the sender's ACK timeout fires).
    Silent,
    /// Close the connection without answering.
    Close,
}

type Script = Arc<dyn Fn(&str, usize) -> Reply + Send + Sync>;

/// A test MLLP receiver: answers each message as the script says (given the control id and
/// how many times that id was seen), and records what it received.
struct Receiver {
    port: u16,
    received: Arc<Mutex<Vec<String>>>,
    accepting: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Receiver {
    async fn start(port: u16, script: Script) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind receiver");
        let port = listener.local_addr().expect("addr").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let accepting = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(serve(listener, script, received.clone(), accepting.clone()));
        Self {
            port,
            received,
            accepting,
            task,
        }
    }

    fn received(&self) -> Vec<String> {
        self.received.lock().expect("lock").clone()
    }

    /// Closes the listener and every connection.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn serve(
    listener: TcpListener,
    script: Script,
    received: Arc<Mutex<Vec<String>>>,
    accepting: Arc<AtomicBool>,
) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        if !accepting.load(Ordering::SeqCst) {
            drop(stream);
            continue;
        }
        let script = script.clone();
        let received = received.clone();
        connections.spawn(async move {
            let mut codec = MllpCodec::new(1 << 20);
            let mut buffer = BytesMut::new();
            loop {
                let frame = match codec.decode(&mut buffer) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => match stream.read_buf(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => continue,
                    },
                    Err(_) => return,
                };
                let header =
                    read_header(&String::from_utf8_lossy(&frame)).expect("the sink sends HL7");
                let seen = {
                    let mut received = received.lock().expect("lock");
                    received.push(header.control_id.clone());
                    received
                        .iter()
                        .filter(|id| **id == header.control_id)
                        .count()
                };
                match script(&header.control_id, seen) {
                    Reply::Code(code) => {
                        let reply = ack::build(
                            Some(&header),
                            &Ack {
                                code,
                                text: "scripted",
                                error: None,
                            },
                        );
                        if stream.write_all(&MllpCodec::frame(&reply)).await.is_err() {
                            return;
                        }
                    }
                    Reply::Silent => {}
                    Reply::Close => return,
                }
            }
        });
    }
}

fn always(code: AckCode) -> Script {
    Arc::new(move |_, _| Reply::Code(code))
}

async fn started(
    port: u16,
    settings: &[(&str, &str)],
) -> (
    MllpSinkTask,
    mpsc::UnboundedReceiver<(SinkRecord, ConnectError)>,
) {
    let mut config: medconnect_api::Props = [
        ("mllp.host", "127.0.0.1".to_string()),
        ("mllp.port", port.to_string()),
        ("retry.backoff.ms", "1".to_string()),
        ("ack.timeout.ms", "2000".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in settings {
        config.insert(k.to_string(), v.to_string());
    }
    let (errant, errant_rx) = mpsc::unbounded_channel();
    let mut task = MllpSinkTask::new(SinkTaskContext {
        connector_name: "hl7-sink-test".into(),
        task_id: 0,
        config,
        errant_records: ErrantRecordReporter::collecting(errant),
        partitions: medconnect_api::SinkPartitions::detached(),
        peers: medconnect_api::relay::alone(),
    })
    .expect("a valid task config");
    task.start().await.expect("sink starts");
    (task, errant_rx)
}

fn records(ids: &[&str]) -> Vec<SinkRecord> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| SinkRecord {
            record: Record::new("hl7.out").with_value(adt(id, "P")),
            kafka_partition: 0,
            kafka_offset: i as i64,
        })
        .collect()
}

async fn put(task: &mut MllpSinkTask, batch: Vec<SinkRecord>) -> Result<(), ConnectError> {
    tokio::time::timeout(DEADLINE, task.put(batch))
        .await
        .expect("put returns")
}

/// Puts a batch as the engine does: again after the hinted wait while the receiver refuses a
/// message that has attempts left.
async fn put_retrying(task: &mut MllpSinkTask, batch: Vec<SinkRecord>) -> Result<(), ConnectError> {
    loop {
        match put(task, batch.clone()).await {
            Err(error) if error.retry_after().is_some() => {
                tokio::time::sleep(error.retry_after().unwrap_or_default()).await;
            }
            other => return other,
        }
    }
}

#[tokio::test]
async fn acknowledged_messages_are_delivered_in_order() {
    let receiver = Receiver::start(0, always(AckCode::Accept)).await;
    let (mut task, mut errant) = started(receiver.port, &[]).await;
    put(&mut task, records(&["A1", "A2", "A3"]))
        .await
        .expect("put");
    task.flush().await.expect("flush");
    assert_eq!(receiver.received(), vec!["A1", "A2", "A3"]);
    assert!(errant.try_recv().is_err(), "nothing errant");
    task.stop().await.expect("stop");
    receiver.stop().await;
}

#[tokio::test]
async fn refused_messages_are_retried_then_reported_as_errant() {
    let script: Script = Arc::new(|id, _| match id {
        "BAD" => Reply::Code(AckCode::Error),
        _ => Reply::Code(AckCode::Accept),
    });
    let receiver = Receiver::start(0, script).await;
    let (mut task, mut errant) = started(receiver.port, &[("retry.max.attempts", "3")]).await;
    put_retrying(&mut task, records(&["OK1", "BAD", "OK2"]))
        .await
        .expect("put");
    assert_eq!(receiver.received(), vec!["OK1", "BAD", "BAD", "BAD", "OK2"]);
    let (record, error) = errant.try_recv().expect("BAD reported");
    assert_eq!(record.kafka_offset, 1);
    assert!(
        matches!(&error, ConnectError::Data(reason) if reason.contains("AE")),
        "{error}"
    );
    // The receiver's ACK text may quote the message: kept apart, never in the error's text.
    assert!(!error.to_string().contains("scripted"), "{error}");
    assert!(!format!("{error:?}").contains("scripted"), "{error:?}");
    let peer = error.peer_text().expect("the ACK text is kept");
    assert_eq!((peer.header(), peer.text()), ("hl7.ack.text", "scripted"));
    assert!(errant.try_recv().is_err(), "only BAD is errant");
    receiver.stop().await;
}

#[tokio::test]
async fn a_reject_or_a_missing_ack_is_retried_until_accepted() {
    let script: Script = Arc::new(|id, seen| match (id, seen) {
        ("R1", 1) => Reply::Code(AckCode::Reject),
        ("T1", 1) => Reply::Silent,
        _ => Reply::Code(AckCode::Accept),
    });
    let receiver = Receiver::start(0, script).await;
    let (mut task, mut errant) = started(receiver.port, &[("ack.timeout.ms", "300")]).await;
    put_retrying(&mut task, records(&["R1", "T1"]))
        .await
        .expect("put");
    assert_eq!(receiver.received(), vec!["R1", "R1", "T1", "T1"]);
    assert!(errant.try_recv().is_err());
    receiver.stop().await;
}

#[tokio::test]
async fn an_unreachable_receiver_is_a_retriable_error() {
    let receiver = Receiver::start(0, always(AckCode::Accept)).await;
    let port = receiver.port;
    receiver.stop().await;
    let (mut task, _errant) = started(port, &[]).await;
    let error = put(&mut task, records(&["X"]))
        .await
        .expect_err("nobody listens");
    assert!(error.is_retriable(), "{error}");
}

#[tokio::test]
async fn the_sink_reconnects_after_the_receiver_restarts() {
    let receiver = Receiver::start(0, always(AckCode::Accept)).await;
    let port = receiver.port;
    let (mut task, mut errant) = started(port, &[]).await;
    put(&mut task, records(&["BEFORE"])).await.expect("put");
    receiver.stop().await;

    let error = put(&mut task, records(&["DOWN"]))
        .await
        .expect_err("receiver down");
    assert!(error.is_retriable(), "{error}");

    let receiver = Receiver::start(port, always(AckCode::Accept)).await;
    put(&mut task, records(&["DOWN"]))
        .await
        .expect("put after restart");
    assert_eq!(receiver.received(), vec!["DOWN"]);
    assert!(errant.try_recv().is_err());
    receiver.stop().await;
}

#[tokio::test]
async fn a_retried_batch_does_not_resend_acknowledged_records() {
    let accepting_flag: Arc<Mutex<Option<Arc<AtomicBool>>>> = Arc::new(Mutex::new(None));
    let closes = Arc::new(AtomicUsize::new(0));
    let script: Script = {
        let flag = accepting_flag.clone();
        let closes = closes.clone();
        Arc::new(move |id, seen| {
            if id == "B2" && seen == 1 {
                // The receiver goes away in the middle of the batch.
                if let Some(accepting) = flag.lock().expect("lock").as_ref() {
                    accepting.store(false, Ordering::SeqCst);
                }
                closes.fetch_add(1, Ordering::SeqCst);
                return Reply::Close;
            }
            Reply::Code(AckCode::Accept)
        })
    };
    let receiver = Receiver::start(0, script).await;
    *accepting_flag.lock().expect("lock") = Some(receiver.accepting.clone());
    let (mut task, mut errant) = started(receiver.port, &[]).await;

    let batch = records(&["B1", "B2", "B3"]);
    let error = put(&mut task, batch.clone())
        .await
        .expect_err("receiver went away");
    assert!(error.is_retriable(), "{error}");
    assert_eq!(closes.load(Ordering::SeqCst), 1);

    receiver.accepting.store(true, Ordering::SeqCst);
    put(&mut task, batch)
        .await
        .expect("the engine's retry of the batch");
    assert_eq!(receiver.received(), vec!["B1", "B2", "B2", "B3"]);
    assert!(errant.try_recv().is_err());
    receiver.stop().await;
}

#[tokio::test]
async fn a_refused_message_hands_its_backoff_to_the_engine_instead_of_sleeping_in_put() {
    let receiver = Receiver::start(0, always(AckCode::Error)).await;
    // An hour between attempts: a sleep inside put would outlive the test's deadline.
    let (mut task, mut errant) = started(
        receiver.port,
        &[("retry.max.attempts", "2"), ("retry.backoff.ms", "3600000")],
    )
    .await;
    let error = put(&mut task, records(&["SLOW"]))
        .await
        .expect_err("refused, with an attempt left");
    assert!(error.is_retriable(), "{error}");
    assert_eq!(error.retry_after(), Some(Duration::from_secs(3600)));
    assert_eq!(receiver.received(), vec!["SLOW"]);
    // The engine's retry after the wait: the last attempt, then the record is errant.
    put(&mut task, records(&["SLOW"]))
        .await
        .expect("reported as errant");
    assert_eq!(receiver.received(), vec!["SLOW", "SLOW"]);
    assert!(errant.try_recv().is_ok(), "SLOW reported");
    task.stop().await.expect("stop");
    receiver.stop().await;
}

#[tokio::test]
async fn a_receiver_that_stops_reading_cannot_hold_a_put() {
    // Accepts connections and never reads: once the socket buffers are full, a write blocks.
    // A small receive buffer, fixed (no autotuning, which may grow to tcp_rmem's 32 MiB), and
    // a message far larger than the sender's largest send buffer (tcp_wmem, 4 MiB here).
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let listener = socket.listen(16).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let (mut task, mut errant) = started(port, &[("ack.timeout.ms", "500")]).await;
    // Far more than the socket buffers hold.
    let big = adt("BIG", "P") + &"OBX|1|ST|NOTE||".repeat(16 * 1024 * 1024 / 16);
    let batch = vec![SinkRecord {
        record: Record::new("hl7.out").with_value(big),
        kafka_partition: 0,
        kafka_offset: 0,
    }];
    let error = put(&mut task, batch)
        .await
        .expect_err("the receiver never took the message");
    assert!(error.is_retriable(), "{error}");
    assert!(error.to_string().contains("did not take"), "{error}");
    assert!(errant.try_recv().is_err());
    task.stop().await.expect("stop");
    silent.abort();
}
