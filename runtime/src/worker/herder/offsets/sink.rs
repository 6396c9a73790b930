//! A sink connector's offsets are its consumer group's (`connect-<name>`) committed offsets,
//! shown and altered in KIP-875's shape: partition `{"kafka_topic","kafka_partition"}`,
//! offset `{"kafka_offset"}`.

use std::time::Duration;

use medconnect_api::Props;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Map, Value, json};

use crate::kafka::KafkaSettings;
use crate::worker::connector_config as cc;

/// A partition's new offset, or `None` to delete it (as `PATCH .../offsets` gives them).
type PartitionChange = (Map<String, Value>, Option<Map<String, Value>>);

const TIMEOUT: Duration = Duration::from_secs(15);

pub fn group_id(connector: &str) -> String {
    format!("connect-{connector}")
}

fn consumer(settings: &KafkaSettings, connector: &str) -> Result<BaseConsumer, String> {
    settings
        .consumer_config(Some(&group_id(connector)), &Default::default())
        .create()
        .map_err(|e| format!("cannot create consumer: {}", crate::kafka::secret_hidden(e)))
}

/// The partitions of the topics a sink reads.
fn partitions(consumer: &BaseConsumer, config: &Props) -> Result<TopicPartitionList, String> {
    let metadata = consumer
        .fetch_metadata(None, TIMEOUT)
        .map_err(|e| format!("cannot read topic metadata: {e}"))?;
    let listed: Vec<&str> = config
        .get(cc::TOPICS)
        .map(|t| {
            t.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let regex = match config.get(cc::TOPICS_REGEX).filter(|r| !r.is_empty()) {
        Some(r) => Some(regex::Regex::new(&format!("^(?:{r})$")).map_err(|e| e.to_string())?),
        None => None,
    };
    let mut list = TopicPartitionList::new();
    for topic in metadata.topics() {
        let wanted = listed.contains(&topic.name())
            || regex.as_ref().is_some_and(|r| r.is_match(topic.name()));
        if wanted {
            for partition in topic.partitions() {
                list.add_partition(topic.name(), partition.id());
            }
        }
    }
    Ok(list)
}

pub async fn read(
    settings: &KafkaSettings,
    connector: &str,
    config: &Props,
) -> Result<Vec<(Value, Value)>, String> {
    let settings = settings.clone();
    let connector = connector.to_string();
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let consumer = consumer(&settings, &connector)?;
        let wanted = partitions(&consumer, &config)?;
        let committed = consumer
            .committed_offsets(wanted, TIMEOUT)
            .map_err(|e| format!("cannot read committed offsets: {e}"))?;
        let offsets = committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((
                    json!({"kafka_topic": e.topic(), "kafka_partition": e.partition()}),
                    json!({"kafka_offset": o}),
                )),
                _ => None,
            })
            .collect();
        // A list returned by `committed_offsets` must go before its consumer (librdkafka).
        drop(committed);
        Ok(offsets)
    })
    .await
    .map_err(|e| e.to_string())?
}

pub async fn alter(
    settings: &KafkaSettings,
    connector: &str,
    offsets: &[PartitionChange],
) -> Result<(), String> {
    let mut list = TopicPartitionList::new();
    for (partition, offset) in offsets {
        let topic = partition
            .get("kafka_topic")
            .and_then(Value::as_str)
            .ok_or("sink partitions need a string \"kafka_topic\"")?;
        let number = partition
            .get("kafka_partition")
            .and_then(Value::as_i64)
            .ok_or("sink partitions need an integer \"kafka_partition\"")?;
        let Some(offset) = offset else {
            return Err("deleting a single partition's offset is not supported for sink connectors; use DELETE /connectors/{name}/offsets to reset them all".into());
        };
        let value = offset
            .get("kafka_offset")
            .and_then(Value::as_i64)
            .filter(|o| *o >= 0)
            .ok_or("sink offsets need a non-negative integer \"kafka_offset\"")?;
        list.add_partition_offset(topic, number as i32, Offset::Offset(value))
            .map_err(|e| e.to_string())?;
    }
    let settings = settings.clone();
    let connector = connector.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer = consumer(&settings, &connector)?;
        consumer
            .commit(&list, CommitMode::Sync)
            .map_err(|e| format!("cannot commit offsets: {e}"))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Resets to the beginning: commits each partition's low watermark.
pub async fn reset(
    settings: &KafkaSettings,
    connector: &str,
    config: &Props,
) -> Result<(), String> {
    let settings = settings.clone();
    let connector = connector.to_string();
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let consumer = consumer(&settings, &connector)?;
        let wanted = partitions(&consumer, &config)?;
        let mut list = TopicPartitionList::new();
        for element in wanted.elements() {
            let (low, _) = consumer
                .fetch_watermarks(element.topic(), element.partition(), TIMEOUT)
                .map_err(|e| format!("cannot read watermarks: {e}"))?;
            list.add_partition_offset(element.topic(), element.partition(), Offset::Offset(low))
                .map_err(|e| e.to_string())?;
        }
        if list.count() == 0 {
            return Ok(());
        }
        consumer
            .commit(&list, CommitMode::Sync)
            .map_err(|e| format!("cannot commit offsets: {e}"))
    })
    .await
    .map_err(|e| e.to_string())?
}
