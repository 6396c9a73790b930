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

#[tokio::test]
async fn commands_reach_a_subscribed_device_and_flush_waits_for_the_pubacks() {
    let broker = Mosquitto::start();
    let port = broker.port.to_string();
    let mut subscriber = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
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

    let mut received = BTreeSet::new();
    while received.len() < 200 {
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("only {} of 200 commands arrived", received.len()))
            .expect("read")
            .expect("mosquitto_sub still running");
        if !line.starts_with("devices/probe/") {
            received.insert(line);
        }
    }
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
