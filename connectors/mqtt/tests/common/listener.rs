//! The listener task as the tests drive it: they play the engine, polling records and settling
//! each one's `AckHandle` themselves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use medconnect_api::limits::ByteBudget;
use medconnect_api::{Delivery, SourceRecord, SourceTask, props_from};
use medconnect_mqtt::MqttListenerSourceTask;

use super::source_context;

pub const DEADLINE: Duration = Duration::from_secs(30);
/// How long a test waits to believe something does not happen.
pub const QUIET: Duration = Duration::from_millis(1500);
pub const USERS: &str = "pump-3:s3cret-pump\nmonitor-7:s3cret-monitor";

/// A started listener on a free port for `USERS`, mapping `devices/+device/vitals` to
/// `device.vitals` keyed by device; `extra` settings on top.
pub async fn listener(extra: &[(&str, &str)]) -> (MqttListenerSourceTask, u16) {
    let mut pairs = vec![
        ("mqtt.port", "0"),
        ("mqtt.users", USERS),
        ("mqtt.topic.pattern", "devices/+device/vitals"),
        ("kafka.topic", "device.vitals"),
        ("kafka.key", "${device}"),
    ];
    pairs.extend_from_slice(extra);
    let mut task =
        MqttListenerSourceTask::new(source_context(props_from(&pairs))).expect("a valid config");
    task.start().await.expect("start");
    let port = task.local_addr().expect("bound").port();
    (task, port)
}

/// A started listener for anonymous devices (packets up to 16 KiB, into `device.vitals`)
/// inside a worker budget of `worker_bytes`, which it returns; `extra` settings on top.
pub async fn within_worker_budget(
    worker_bytes: usize,
    extra: &[(&str, &str)],
) -> (MqttListenerSourceTask, u16, Arc<ByteBudget>) {
    let worker = ByteBudget::new(worker_bytes);
    let mut pairs = vec![
        ("mqtt.port", "0"),
        ("mqtt.allow.anonymous", "true"),
        ("mqtt.max.packet.bytes", "16384"),
        ("kafka.topic", "device.vitals"),
    ];
    pairs.extend_from_slice(extra);
    let mut context = source_context(props_from(&pairs));
    context.listener_budget = worker.clone();
    let mut task = MqttListenerSourceTask::new(context).expect("a valid config");
    task.start().await.expect("start");
    let port = task.local_addr().expect("bound").port();
    (task, port, worker)
}

/// The next `count` records, within `DEADLINE`; more than `count` fails.
pub async fn next_records(task: &mut MqttListenerSourceTask, count: usize) -> Vec<SourceRecord> {
    let deadline = Instant::now() + DEADLINE;
    let mut records = Vec::new();
    while records.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = tokio::time::timeout(left, task.poll())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} records arrived", records.len()))
            .expect("poll");
        records.extend(batch);
    }
    assert_eq!(records.len(), count, "more records than published");
    records
}

/// Settles a record as Kafka having it.
pub fn written(record: &mut SourceRecord) {
    record.complete(Delivery::Written {
        topic: record.record.topic.clone(),
        partition: 0,
        offset: 0,
    });
}
