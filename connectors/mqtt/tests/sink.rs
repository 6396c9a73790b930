//! The sink against a real Mosquitto, with `mosquitto_sub` (QoS 1) as the device receiving
//! commands. `flush` returning Ok means the broker PUBACKed every publish.

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use common::Mosquitto;
use medconnect_api::{
    ErrantRecordReporter, Record, SinkPartitions, SinkRecord, SinkTask, SinkTaskContext, props_from,
};
use medconnect_mqtt::MqttSinkTask;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(30);

/// `mosquitto_sub` subscribed to `devices/+/commands` at `qos`, once its subscription is in
/// place (probed until the first message arrives: that probe line is consumed).
async fn subscriber(
    port: u16,
    qos: &str,
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let port = port.to_string();
    let mut subscriber = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            qos,
            "-v",
            "-t",
            "devices/+/commands",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub (scripts/mqtt-peers installs it)");
    let mut lines = BufReader::new(subscriber.stdout.take().expect("stdout")).lines();

    // Probe until the subscriber is subscribed: its first line is a probe.
    let probe = async {
        loop {
            let _ = Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-q",
                    "1",
                    "-t",
                    "devices/probe/commands",
                    "-m",
                    "probe",
                ])
                .status()
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = probe => unreachable!(),
        line = tokio::time::timeout(DEADLINE, lines.next_line()) => {
            assert!(line.expect("subscribed in time").expect("read").is_some());
        }
    }
    (subscriber, lines)
}

/// Reads `count` command lines (probes left out) and returns them.
async fn read_commands(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    count: usize,
) -> Vec<String> {
    let mut received = Vec::new();
    while received.len() < count {
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} commands arrived", received.len()))
            .expect("read")
            .expect("mosquitto_sub still running");
        if !line.starts_with("devices/probe/") {
            received.push(line);
        }
    }
    received
}

#[tokio::test]
async fn commands_reach_a_subscribed_device_and_flush_waits_for_the_pubacks() {
    let broker = Mosquitto::start();
    let (mut subscriber, mut lines) = subscriber(broker.port, "1").await;

    let (errant_tx, mut errant_rx) = mpsc::unbounded_channel();
    let config = props_from(&[
        ("mqtt.server.uri", &broker.uri()),
        ("mqtt.client.id", "sink-0"),
        ("mqtt.topic", "devices/${key}/commands"),
    ]);
    let mut task = MqttSinkTask::new(SinkTaskContext {
        connector_name: "commands".into(),
        task_id: 0,
        config,
        errant_records: ErrantRecordReporter::collecting(errant_tx),
        partitions: SinkPartitions::detached(),
        peers: medconnect_api::relay::alone(),
    })
    .expect("a valid config");
    task.start().await.expect("start");

    let mut records: Vec<SinkRecord> = (0..200)
        .map(|n| SinkRecord {
            record: Record::new("device.commands")
                .with_key(format!("pump-{}", n % 5))
                .with_value(format!("{{\"cmd\":{n}}}")),
            kafka_partition: 0,
            kafka_offset: n,
        })
        .collect();
    // No key: no topic to publish to, so it is reported as errant, not dropped.
    records.push(SinkRecord {
        record: Record::new("device.commands").with_value("{}"),
        kafka_partition: 0,
        kafka_offset: 200,
    });
    task.put(records).await.expect("put");
    tokio::time::timeout(DEADLINE, task.flush())
        .await
        .expect("flush in time")
        .expect("every publish acknowledged");
    let (errant, error) = errant_rx.try_recv().expect("the keyless record is errant");
    assert_eq!(errant.kafka_offset, 200);
    assert!(error.to_string().contains("key"), "{error}");

    let received: BTreeSet<String> = read_commands(&mut lines, 200).await.into_iter().collect();
    let expected: BTreeSet<String> = (0..200)
        .map(|n| format!("devices/pump-{}/commands {{\"cmd\":{n}}}", n % 5))
        .collect();
    assert_eq!(received, expected);
    task.stop().await.expect("stop");
    let _ = subscriber.kill().await;
}

#[tokio::test]
async fn without_pubacks_flush_fails_retriably_so_no_offset_is_committed() {
    let broker = Mosquitto::start();
    let (errant_tx, _errant_rx) = mpsc::unbounded_channel();
    let config = props_from(&[
        ("mqtt.server.uri", &broker.uri()),
        ("mqtt.client.id", "sink-unacked"),
        ("mqtt.ack.timeout.ms", "1500"),
    ]);
    let mut task = MqttSinkTask::new(SinkTaskContext {
        connector_name: "commands".into(),
        task_id: 0,
        config,
        errant_records: ErrantRecordReporter::collecting(errant_tx),
        partitions: SinkPartitions::detached(),
        peers: medconnect_api::relay::alone(),
    })
    .expect("a valid config");
    task.start().await.expect("start");
    drop(broker);

    let records = (0..5)
        .map(|n| SinkRecord {
            record: Record::new("t").with_key("pump-1").with_value("{}"),
            kafka_partition: 0,
            kafka_offset: n,
        })
        .collect();
    task.put(records).await.expect("put queues");
    let error = task.flush().await.expect_err("no broker, no PUBACK");
    assert!(error.is_retriable(), "{error}");
    assert!(error.to_string().contains("5 of 5"), "{error}");
    task.stop().await.expect("stop");
}

/// QoS 2 end to end: the sink publishes at QoS 2 (PUBLISH, PUBREC, PUBREL, PUBCOMP) to a
/// subscriber at QoS 2; `flush` returns once every PUBCOMP is in, and the device receives
/// each command exactly once, in order per device.
#[tokio::test]
async fn at_qos_2_every_command_reaches_a_qos_2_subscriber_exactly_once() {
    let broker = Mosquitto::start();
    let (mut subscriber, mut lines) = subscriber(broker.port, "2").await;
    let (errant_tx, mut errant_rx) = mpsc::unbounded_channel();
    let config = props_from(&[
        ("mqtt.server.uri", &broker.uri()),
        ("mqtt.client.id", "sink-qos2"),
        ("mqtt.topic", "devices/${key}/commands"),
        ("mqtt.qos", "2"),
        // Within Mosquitto's max_inflight_messages (20): with 100 in flight, one run saw
        // each command once but a few of them out of order (order is what this test checks).
        ("mqtt.inflight", "20"),
    ]);
    let mut task = MqttSinkTask::new(SinkTaskContext {
        connector_name: "commands".into(),
        task_id: 0,
        config,
        errant_records: ErrantRecordReporter::collecting(errant_tx),
        partitions: SinkPartitions::detached(),
        peers: medconnect_api::relay::alone(),
    })
    .expect("mqtt.qos=2 is a valid config");
    task.start().await.expect("start");
    for batch in 0..3 {
        let records: Vec<SinkRecord> = (0..100)
            .map(|n| batch * 100 + n)
            .map(|n| SinkRecord {
                record: Record::new("device.commands")
                    .with_key(format!("pump-{}", n % 3))
                    .with_value(format!("{{\"cmd\":{n}}}")),
                kafka_partition: 0,
                kafka_offset: n,
            })
            .collect();
        task.put(records).await.expect("put");
        tokio::time::timeout(DEADLINE, task.flush())
            .await
            .expect("flush in time")
            .expect("every publish completed (PUBCOMP)");
    }
    assert!(errant_rx.try_recv().is_err(), "no errant record");
    // A marker published after every flush returned: the broker queued each command before
    // it, so what arrives before the marker is all that was delivered (exact counts).
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "2"])
        .args(["-t", "devices/end/commands", "-m", "end"])
        .status()
        .await
        .expect("mosquitto_pub");
    assert!(status.success());
    let mut received = Vec::new();
    loop {
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{} commands, then no marker", received.len()))
            .expect("read")
            .expect("mosquitto_sub still running");
        if line == "devices/end/commands end" {
            break;
        }
        if !line.starts_with("devices/probe/") {
            received.push(line);
        }
    }
    assert_eq!(received.len(), 300, "each command exactly once");
    for device in 0..3 {
        let got: Vec<&String> = received
            .iter()
            .filter(|l| l.starts_with(&format!("devices/pump-{device}/")))
            .collect();
        let expected: Vec<String> = (0..300)
            .filter(|n| n % 3 == device)
            .map(|n| format!("devices/pump-{device}/commands {{\"cmd\":{n}}}"))
            .collect();
        assert_eq!(
            got,
            expected.iter().collect::<Vec<_>>(),
            "pump-{device}: each once, in order"
        );
    }
    task.stop().await.expect("stop");
    let _ = subscriber.kill().await;
}
