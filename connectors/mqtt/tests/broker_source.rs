//! The broker source against a real Mosquitto over real sockets, with `mosquitto_pub` as the
//! devices. The test plays the engine: it polls the task and completes each record's
//! `AckHandle` (or, to prove no PUBACK goes out before durability, does not).
//!
//! Each test starts its own broker (a few milliseconds): a broker shared through a `static`
//! would never be dropped, so it would outlive the test binary.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::listener::written;
use common::{CuttableProxy, Mosquitto, source_context};
use medconnect_api::{Delivery, SourceRecord, SourceTask, props_from};
use medconnect_mqtt::{
    HEADER_CLIENT_ID, HEADER_DUP, HEADER_QOS, HEADER_TOPIC, MqttBrokerSourceTask,
};

const DEADLINE: Duration = Duration::from_secs(30);
/// How long a stream must stay silent for the test to believe nothing more comes.
const QUIET: Duration = Duration::from_millis(1500);

fn task(broker: &Mosquitto, client_id: &str) -> MqttBrokerSourceTask {
    task_with(broker, client_id, "500")
}

/// A task whose polls return at most `batch_max` records.
fn task_with(broker: &Mosquitto, client_id: &str, batch_max: &str) -> MqttBrokerSourceTask {
    task_at(&broker.uri(), client_id, batch_max)
}

fn task_at(uri: &str, client_id: &str, batch_max: &str) -> MqttBrokerSourceTask {
    let config = props_from(&[
        ("poll.batch.max", batch_max),
        ("mqtt.server.uri", uri),
        ("mqtt.client.id", client_id),
        ("mqtt.topics", "devices/+/vitals"),
        ("mqtt.topic.pattern", "devices/+device/vitals"),
        ("kafka.topic", "device.vitals"),
        ("kafka.key", "${device}"),
    ]);
    MqttBrokerSourceTask::new(source_context(config)).expect("a valid config")
}

/// Polls until `count` records arrived, settling each as written at once (as the engine does
/// once Kafka acknowledged it): the broker sends no more than its in-flight window (20 for
/// Mosquitto) of unacknowledged messages. Fails at the deadline.
async fn take_settling(task: &mut MqttBrokerSourceTask, count: usize) -> Vec<SourceRecord> {
    let deadline = Instant::now() + DEADLINE;
    let mut records = Vec::new();
    while records.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = tokio::time::timeout(left, task.poll())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} records arrived", records.len()))
            .expect("poll");
        for mut record in batch {
            written(&mut record);
            records.push(record);
        }
    }
    records
}

/// Whatever else arrives until the stream stays silent for `QUIET`.
async fn rest(task: &mut MqttBrokerSourceTask) -> Vec<SourceRecord> {
    let mut records = Vec::new();
    while let Ok(batch) = tokio::time::timeout(QUIET, task.poll()).await {
        records.extend(batch.expect("poll"));
    }
    records
}

fn value(record: &SourceRecord) -> String {
    String::from_utf8(record.record.value.clone().unwrap_or_default().to_vec()).expect("utf-8")
}

fn lines(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|n| format!("{{\"{prefix}\":{n}}}")).collect()
}

#[tokio::test]
async fn a_thousand_qos1_publishes_from_ten_devices_are_a_thousand_records() {
    let broker = Mosquitto::start();
    let mut task = task(&broker, "bridge-thousand");
    task.start().await.expect("start");

    let devices: Vec<String> = (0..10).map(|d| format!("monitor-{d}")).collect();
    let publishers = devices.iter().map(|device| {
        let topic = format!("devices/{device}/vitals");
        let broker = &broker;
        async move { broker.publish_lines(&topic, &lines(device, 0..100)).await }
    });
    let (_, records) = tokio::join!(
        futures::future::join_all(publishers),
        take_settling(&mut task, 1000)
    );
    let extra = rest(&mut task).await;
    assert!(
        extra.is_empty(),
        "{} records beyond the 1,000 published",
        extra.len()
    );
    assert_eq!(records.len(), 1000);
    let mut seen = BTreeSet::new();
    for record in &records {
        let key = String::from_utf8(record.record.key.clone().expect("a key").to_vec()).unwrap();
        let headers = &record.record.headers;
        assert_eq!(record.record.topic, "device.vitals");
        assert_eq!(
            headers.last_str(HEADER_TOPIC),
            Some(format!("devices/{key}/vitals").as_str())
        );
        assert_eq!(headers.last_str(HEADER_QOS), Some("1"));
        assert_eq!(headers.last_str(HEADER_CLIENT_ID), Some("bridge-thousand"));
        assert_eq!(record.record.content_type(), Some("application/json"));
        assert!(value(record).starts_with(&format!("{{\"{key}\":")));
        seen.insert(value(record));
    }
    assert_eq!(seen.len(), 1000, "every payload exactly once");
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn messages_never_settled_are_redelivered_after_a_restart_so_no_puback_went_out() {
    let broker = Mosquitto::start();
    // One record per poll, so that the test settles exactly the first 60.
    let mut first = task_with(&broker, "bridge-redeliver", "1");
    first.start().await.expect("start");
    broker
        .publish_lines("devices/pump-1/vitals", &lines("pump-1", 0..100))
        .await;

    // The engine settles the first 60 only; the others stay in flight, never completed.
    let settled = take_settling(&mut first, 60).await;
    // Room for the PUBACKs to be written before the task stops (one still queued when the
    // connection ends is dropped, and its message comes again: a duplicate, not a loss).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = rest(&mut first).await;
    // Mosquitto sends at most its in-flight window (20) of unacknowledged messages.
    assert!(!held.is_empty() && held.len() <= 40, "held {}", held.len());
    first.stop().await.expect("stop");
    drop(held);

    let mut second = task_with(&broker, "bridge-redeliver", "1");
    second.start().await.expect("restart");
    let mut again = take_settling(&mut second, 40).await;
    for mut record in rest(&mut second).await {
        written(&mut record);
        again.push(record);
    }

    let settled_values: BTreeSet<String> = settled.iter().map(value).collect();
    let again_values: BTreeSet<String> = again.iter().map(value).collect();
    let expected: BTreeSet<String> = lines("pump-1", 60..100).into_iter().collect();
    assert_eq!(
        again.len(),
        40,
        "exactly the 40 unsettled messages come again"
    );
    assert_eq!(again_values, expected);
    assert!(
        settled_values.is_disjoint(&again_values),
        "a settled message came again"
    );
    let resent = again
        .iter()
        .filter(|r| r.record.headers.last_str(HEADER_DUP) == Some("true"))
        .count();
    println!(
        "redelivered after restart: {} (DUP-flagged: {resent})",
        again.len()
    );
    second.stop().await.expect("stop");
}

#[tokio::test]
async fn a_persistent_session_keeps_what_devices_publish_while_the_task_is_stopped() {
    let broker = Mosquitto::start();
    let mut first = task(&broker, "bridge-resume");
    first.start().await.expect("start");
    first.stop().await.expect("stop");

    broker
        .publish_lines("devices/wearable-2/vitals", &lines("w", 0..30))
        .await;

    let mut second = task(&broker, "bridge-resume");
    second.start().await.expect("restart");
    let mut records = take_settling(&mut second, 30).await;
    records.extend(rest(&mut second).await);
    assert_eq!(records.len(), 30);
    let values: BTreeSet<String> = records.iter().map(value).collect();
    assert_eq!(values, lines("w", 0..30).into_iter().collect());
    second.stop().await.expect("stop");
}

#[tokio::test]
async fn an_unreachable_broker_is_a_retriable_start_error() {
    let broker = Mosquitto::start();
    let port = broker.port;
    drop(broker);
    let config = props_from(&[
        ("mqtt.server.uri", &format!("tcp://127.0.0.1:{port}")),
        ("mqtt.client.id", "nobody"),
        ("mqtt.topics", "a/b"),
        ("mqtt.connect.timeout.ms", "2000"),
    ]);
    let mut task = MqttBrokerSourceTask::new(source_context(config)).unwrap();
    let error = task.start().await.expect_err("no broker");
    assert!(error.is_retriable(), "{error}");
}

#[tokio::test]
async fn after_a_connection_cut_unacknowledged_messages_come_again_as_counted_duplicates() {
    let broker = Mosquitto::start();
    let proxy = CuttableProxy::start(broker.port).await;
    let mut task = task_at(&proxy.uri(), "bridge-cut", "1");
    task.start().await.expect("start");
    broker
        .publish_lines("devices/pump-9/vitals", &lines("p", 0..50))
        .await;

    // Mosquitto's in-flight window (20) arrives; none is settled before the cut.
    let mut held = Vec::new();
    while held.len() < 20 {
        held.extend(rest_until_first(&mut task).await);
    }
    held.extend(rest(&mut task).await);
    assert_eq!(held.len(), 20, "Mosquitto's in-flight window");
    proxy.cut();
    // The task sees the loss (and waits 500 ms to reconnect); only then does the engine
    // settle the 20: their PUBACKs belong to a connection that is gone, so none is sent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    held.iter_mut().for_each(written);

    let mut after = take_settling(&mut task, 50).await;
    for mut record in rest(&mut task).await {
        written(&mut record);
        after.push(record);
    }
    let duplicates = after
        .iter()
        .filter(|r| r.record.headers.last_str(HEADER_DUP) == Some("true"))
        .count();
    let distinct: BTreeSet<String> = held.iter().chain(&after).map(value).collect();
    println!(
        "after the cut: {} records, {duplicates} of them resent duplicates",
        after.len()
    );
    assert_eq!(
        distinct,
        lines("p", 0..50).into_iter().collect(),
        "nothing lost"
    );
    assert_eq!(
        after.len(),
        50,
        "the 20 held come again, then the 30 never sent"
    );
    assert_eq!(
        duplicates, 20,
        "exactly the 20 unacknowledged are duplicates"
    );
    task.stop().await.expect("stop");
}

/// The next batch, waiting for it.
async fn rest_until_first(task: &mut MqttBrokerSourceTask) -> Vec<SourceRecord> {
    tokio::time::timeout(DEADLINE, task.poll())
        .await
        .expect("a record in time")
        .expect("poll")
}

#[tokio::test]
async fn two_tasks_on_a_shared_subscription_split_the_stream_without_loss() {
    let broker = Mosquitto::start();
    let shared = |client_id: &str| {
        let config = props_from(&[
            ("mqtt.server.uri", &broker.uri()),
            ("mqtt.client.id", client_id),
            ("mqtt.topics", "$share/medconnect/devices/+/vitals"),
        ]);
        MqttBrokerSourceTask::new(source_context(config)).expect("a valid config")
    };
    let (mut a, mut b) = (shared("bridge-share-0"), shared("bridge-share-1"));
    a.start().await.expect("start a");
    b.start().await.expect("start b");
    broker
        .publish_lines("devices/m-1/vitals", &lines("s", 0..200))
        .await;

    let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
    while from_a.len() + from_b.len() < 200 {
        tokio::select! {
            batch = a.poll() => from_a.extend(batch.expect("poll a")),
            batch = b.poll() => from_b.extend(batch.expect("poll b")),
            _ = tokio::time::sleep(DEADLINE) => panic!("only {} of 200", from_a.len() + from_b.len()),
        }
        from_a.iter_mut().chain(from_b.iter_mut()).for_each(written);
    }
    from_a.extend(rest(&mut a).await);
    from_b.extend(rest(&mut b).await);
    println!(
        "shared subscription: {} to one task, {} to the other",
        from_a.len(),
        from_b.len()
    );
    assert_eq!(
        from_a.len() + from_b.len(),
        200,
        "each message to one task only"
    );
    assert!(
        !from_a.is_empty() && !from_b.is_empty(),
        "both tasks got a share"
    );
    let all: BTreeSet<String> = from_a.iter().chain(&from_b).map(value).collect();
    assert_eq!(all, lines("s", 0..200).into_iter().collect());
    a.stop().await.expect("stop");
    b.stop().await.expect("stop");
}

#[tokio::test]
async fn records_kafka_failed_to_take_come_again_without_a_restart() {
    let broker = Mosquitto::start();
    let mut task = task_with(&broker, "bridge-failed", "1");
    task.start().await.expect("start");
    broker
        .publish_lines("devices/pump-5/vitals", &lines("f", 0..30))
        .await;

    // The engine writes the first 10, then Kafka fails the next 10.
    let written_first = take_settling(&mut task, 10).await;
    let mut failed = Vec::new();
    while failed.len() < 10 {
        for mut record in rest_until_first(&mut task).await {
            record.complete(Delivery::Failed {
                reason: "Kafka unreachable".into(),
            });
            failed.push(record);
        }
    }
    // Kafka is back: whatever comes now is written at once.
    let mut after = Vec::new();
    while let Ok(batch) = tokio::time::timeout(QUIET, task.poll()).await {
        for mut record in batch.expect("poll") {
            written(&mut record);
            after.push(record);
        }
    }
    let failed_values: BTreeSet<String> = failed.iter().map(value).collect();
    let after_values: BTreeSet<String> = after.iter().map(value).collect();
    let written_values: BTreeSet<String> = written_first
        .iter()
        .map(value)
        .chain(after_values.iter().cloned())
        .collect();
    println!(
        "failed 10, then {} records ({} distinct)",
        after.len(),
        after_values.len()
    );
    assert!(
        failed_values.is_subset(&after_values),
        "every failed record came again"
    );
    assert_eq!(
        written_values,
        lines("f", 0..30).into_iter().collect(),
        "all 30 written"
    );
    task.stop().await.expect("stop");

    // Everything was acknowledged in the end: a restart gets nothing.
    let mut again = task_with(&broker, "bridge-failed", "1");
    again.start().await.expect("restart");
    let left = rest(&mut again).await;
    assert_eq!(left.len(), 0, "nothing left unacknowledged");
    again.stop().await.expect("stop");
}

#[tokio::test]
async fn credentials_are_checked_by_the_broker_and_a_refusal_names_the_setting() {
    let broker = Mosquitto::start_with_user("medconnect", "s3cret");
    let with_password = |password: &str| {
        let config = props_from(&[
            ("mqtt.server.uri", &broker.uri()),
            ("mqtt.client.id", "bridge-auth"),
            ("mqtt.topics", "devices/+/vitals"),
            ("mqtt.username", "medconnect"),
            ("mqtt.password", password),
        ]);
        MqttBrokerSourceTask::new(source_context(config)).expect("a valid config")
    };

    let mut refused = with_password("wrong");
    let error = refused.start().await.expect_err("a wrong password");
    assert!(
        matches!(&error, medconnect_api::ConnectError::Config { field, .. } if field == "mqtt.username"),
        "{error}"
    );
    assert!(
        !error.to_string().contains("wrong"),
        "the password is never echoed: {error}"
    );

    let mut admitted = with_password("s3cret");
    admitted.start().await.expect("the right password");
    admitted.stop().await.expect("stop");
}
