//! The rest-hook receiver (FhirSubscriptionSource) against a real FHIR R4 server (hfs, with
//! rest-hook Subscriptions per the R4 Backport IG): the task puts its Subscription, the server
//! handshakes and notifies it of every Patient change (id-only), and each change is a record
//! within a second although the task polls only once a minute; a change made while the
//! receiver was down arrives once it is back, once. A notification is answered only once its
//! records are durable: 200 after the engine acknowledged them, 503 when one was not written.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use medconnect_api::{
    Delivery, OffsetReader, SourceOffset, SourcePartition, SourceRecord, SourceTask,
    SourceTaskContext, props_from,
};
use medconnect_fhir::FhirSourceTask;
use serde_json::{Value, json};
use support::{DEADLINE, Hfs, shared};
use tokio::sync::mpsc;

const TOPIC_URL: &str = "http://medconnect.test/topic/patient";

#[derive(Default)]
struct Stored(Mutex<HashMap<String, SourceOffset>>);

impl OffsetReader for Stored {
    fn offset(&self, partition: &SourcePartition) -> Option<SourceOffset> {
        let key = Value::Object((**partition).clone()).to_string();
        self.0.lock().expect("lock").get(&key).cloned()
    }
}

/// What the engine saw: each record's key, and when.
type Seen = Arc<Mutex<Vec<(String, Instant)>>>;

/// How the fake engine settles each record.
#[derive(Clone, Copy)]
enum Settle {
    Written,
    /// Handed to the test, which settles it.
    Held,
}

/// Drives a started task as the engine does: polls, stores offsets, settles acknowledgements.
fn engine(
    mut task: FhirSourceTask,
    stored: Arc<Stored>,
    seen: Seen,
    settle: Settle,
    held: mpsc::UnboundedSender<SourceRecord>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok(batch) = task.poll().await else { return };
            for mut record in batch {
                let key = String::from_utf8_lossy(record.record.key.as_deref().unwrap_or_default())
                    .to_string();
                seen.lock().expect("lock").push((key, Instant::now()));
                match settle {
                    Settle::Written => {
                        let partition =
                            Value::Object(record.source_partition.clone().into_map()).to_string();
                        stored
                            .0
                            .lock()
                            .expect("lock")
                            .insert(partition, record.source_offset.clone());
                        record.complete(Delivery::Written {
                            topic: "t".into(),
                            partition: 0,
                            offset: 0,
                        });
                    }
                    Settle::Held => {
                        let _ = held.send(record);
                    }
                }
            }
        }
    })
}

async fn start(
    hfs: &Hfs,
    port: u16,
    extra: &[(&str, &str)],
    stored: Arc<Stored>,
) -> FhirSourceTask {
    let port = port.to_string();
    let mut config = props_from(&[
        ("fhir.url", &hfs.url),
        ("fhir.resource.types", "Patient"),
        ("fhir.listener.host", "127.0.0.1"),
        ("fhir.listener.port", &port),
        ("fhir.poll.interval.ms", "60000"),
    ]);
    config.extend(props_from(extra));
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut task = FhirSourceTask::with_receiver(SourceTaskContext {
            connector_name: "fhir-hook-test".into(),
            task_id: 0,
            config: config.clone(),
            offsets: stored.clone(),
            listener_budget: medconnect_api::limits::ByteBudget::unlimited(),
        })
        .expect("a valid config");
        match task.start().await {
            Ok(()) => return task,
            // The port of the previous receiver may not be free yet.
            Err(error) if error.is_retriable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(error) => panic!("start: {error}"),
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A PUT, sent again while hfs 0.2.7 answers "database table is locked" or, for the same
/// SQLite contention on another code path, a bare 500 (a write meeting the receiver's
/// concurrent read; nothing was written), as a client writing to a busy server would.
async fn put(hfs: &Hfs, path: &str, resource: Value) {
    for _ in 0..50 {
        let answer = reqwest::Client::new()
            .put(format!("{}/{path}", hfs.url))
            .header("Content-Type", "application/fhir+json")
            .body(resource.to_string())
            .send()
            .await
            .expect("hfs answers");
        let status = answer.status();
        let text = answer.text().await.unwrap_or_default();
        if status.is_success() {
            return;
        }
        assert!(
            text.contains("is locked") || status.is_server_error(),
            "PUT {path}: {status}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("PUT {path}: hfs stayed locked");
}

async fn wait_for(seen: &Seen, key: &str) -> Instant {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some((_, at)) = seen.lock().expect("lock").iter().find(|(k, _)| k == key) {
            return *at;
        }
        assert!(Instant::now() < deadline, "{key} within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn count(seen: &Seen, key: &str) -> usize {
    seen.lock()
        .expect("lock")
        .iter()
        .filter(|(k, _)| k == key)
        .count()
}

#[tokio::test]
async fn notified_changes_arrive_within_a_second_and_one_made_while_down_arrives_once() {
    let hfs = shared();
    // The R4 Backport IG's topic: a Basic resource; every Patient create, update and delete.
    put(hfs, "Basic/topic-patient", json!({
        "resourceType": "Basic", "id": "topic-patient",
        "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]},
        "extension": [
            {"url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.url", "valueUri": TOPIC_URL},
            {"url": "http://hl7.org/fhir/4.3/StructureDefinition/extension-SubscriptionTopic.resourceTrigger", "extension": [
                {"url": "resource", "valueUri": "http://hl7.org/fhir/StructureDefinition/Patient"},
                {"url": "supportedInteraction", "valueCode": "create"},
                {"url": "supportedInteraction", "valueCode": "update"},
                {"url": "supportedInteraction", "valueCode": "delete"}]}]
    })).await;
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}/notify");
    let managed = [
        ("fhir.subscription.id", "medconnect-patients"),
        ("fhir.subscription.topic", TOPIC_URL),
        ("fhir.subscription.endpoint", endpoint.as_str()),
    ];
    let stored = Arc::new(Stored::default());
    let seen: Seen = Arc::default();
    let (held, _) = mpsc::unbounded_channel();
    let task = start(hfs, port, &managed, stored.clone()).await;
    let running = engine(
        task,
        stored.clone(),
        seen.clone(),
        Settle::Written,
        held.clone(),
    );
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, subscription) = hfs.get("Subscription/medconnect-patients").await;
        if subscription["status"] == "active" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server activated the Subscription: {subscription}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut latencies = Vec::new();
    for i in 0..20 {
        let written = Instant::now();
        put(
            hfs,
            &format!("Patient/hook-{i}"),
            json!({"resourceType": "Patient", "id": format!("hook-{i}")}),
        )
        .await;
        let arrived = wait_for(&seen, &format!("Patient/hook-{i}")).await;
        latencies.push(arrived.saturating_duration_since(written));
    }
    latencies.sort();
    let slowest = latencies[latencies.len() - 1];
    eprintln!(
        "notified change -> record: median {:?}, slowest {slowest:?} (polling once a minute)",
        latencies[10]
    );
    assert!(slowest < Duration::from_secs(1), "{latencies:?}");

    // The receiver goes down; a change is made; the server cannot deliver its notification.
    running.abort();
    let _ = running.await;
    put(
        hfs,
        "Patient/hook-while-down",
        json!({"resourceType": "Patient", "id": "hook-while-down"}),
    )
    .await;
    let task = start(hfs, port, &managed, stored.clone()).await;
    let running = engine(task, stored.clone(), seen.clone(), Settle::Written, held);
    wait_for(&seen, "Patient/hook-while-down").await;
    // A later change arrives too; the one made while down came once, the others once each.
    put(
        hfs,
        "Patient/hook-after",
        json!({"resourceType": "Patient", "id": "hook-after"}),
    )
    .await;
    wait_for(&seen, "Patient/hook-after").await;
    assert_eq!(count(&seen, "Patient/hook-while-down"), 1);
    for i in 0..20 {
        assert_eq!(count(&seen, &format!("Patient/hook-{i}")), 1, "hook-{i}");
    }
    running.abort();
}

fn notification(event: u64, focus: &str) -> Value {
    json!({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Parameters", "parameter": [
        {"name": "subscription", "valueReference": {"reference": "Subscription/by-hand"}},
        {"name": "topic", "valueCanonical": TOPIC_URL},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": "event-notification"},
        {"name": "events-since-subscription-start", "valueString": event.to_string()},
        {"name": "notification-event", "part": [
            {"name": "event-number", "valueString": event.to_string()},
            {"name": "focus", "valueReference": {"reference": focus}}]}]}}]})
}

#[tokio::test]
async fn a_notification_is_answered_only_once_its_records_are_durable() {
    let hfs = shared();
    let port = free_port();
    let stored = Arc::new(Stored::default());
    let seen: Seen = Arc::default();
    let (held_tx, mut held) = mpsc::unbounded_channel();
    // Only changes from now on: no Subscription of its own, notifications posted by hand.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i128;
    let since = medconnect_fhir::time::format(now);
    let task = start(hfs, port, &[("fhir.initial.since", &since)], stored.clone()).await;
    let running = engine(task, stored, seen.clone(), Settle::Held, held_tx);
    let receiver = format!("http://127.0.0.1:{port}/notify");
    let post = |body: Value| {
        let receiver = receiver.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(receiver)
                .header("Content-Type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .await
                .expect("the receiver answers")
                .status()
                .as_u16()
        })
    };

    put(
        hfs,
        "Patient/gate-1",
        json!({"resourceType": "Patient", "id": "gate-1"}),
    )
    .await;
    let answer = post(notification(1, "Patient/gate-1"));
    let mut record = tokio::time::timeout(DEADLINE, held.recv())
        .await
        .expect("a record")
        .expect("open");
    assert_eq!(
        record.record.key.as_deref(),
        Some(b"Patient/gate-1".as_slice())
    );
    // The record is with the engine, not yet durable: the server is not answered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !answer.is_finished(),
        "answered before the record was durable"
    );
    record.complete(Delivery::Written {
        topic: "fhir.Patient".into(),
        partition: 0,
        offset: 0,
    });
    assert_eq!(
        tokio::time::timeout(DEADLINE, answer)
            .await
            .expect("answered")
            .expect("joined"),
        200
    );

    put(
        hfs,
        "Patient/gate-2",
        json!({"resourceType": "Patient", "id": "gate-2"}),
    )
    .await;
    let answer = post(notification(2, "Patient/gate-2"));
    let mut record = tokio::time::timeout(DEADLINE, held.recv())
        .await
        .expect("a record")
        .expect("open");
    assert_eq!(
        record.record.key.as_deref(),
        Some(b"Patient/gate-2".as_slice())
    );
    record.complete(Delivery::Failed {
        reason: "Kafka unreachable".into(),
    });
    assert_eq!(
        tokio::time::timeout(DEADLINE, answer)
            .await
            .expect("answered")
            .expect("joined"),
        503
    );

    // A notification for a resource type this connector does not read is answered at once.
    assert_eq!(
        post(notification(3, "Encounter/e1")).await.expect("joined"),
        200
    );
    assert_eq!(seen.lock().expect("lock").len(), 2);
    running.abort();
}
