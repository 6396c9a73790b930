//! A compacted topic read from the beginning into memory and written through a producer:
//! the backbone of the config, offset and status stores (Connect's KafkaBasedLog).
//!
//! A reader thread applies every record to the store's callback in log order. A writer whose
//! record is the next one to apply (nothing written before it is still unread) applies it
//! itself as soon as Kafka acknowledged it; otherwise it waits until the reader has applied
//! it. Either way a store reads its own writes, every record is applied once and in log
//! order, and records written by other workers are applied by the reader. Applying its own
//! record spares a writer a fetch cycle: a broker that holds fetches (the embedded one holds
//! each half of `fetch.wait.max.ms`) made every write wait hundreds of milliseconds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use super::StoreError;
use crate::kafka::KafkaSettings;

/// Called for each record of the log: key, value (`None` for a tombstone).
pub type Apply = Box<dyn Fn(&[u8], Option<&[u8]>) + Send + Sync>;

const METADATA_TIMEOUT: Duration = Duration::from_secs(30);

/// Applies records in log order, from the reader thread or from a writer applying its own.
struct Applier {
    apply: Apply,
    /// Next offset to apply, per partition.
    positions: watch::Sender<HashMap<i32, i64>>,
    /// Held while a record is applied and its position moved, so the two appliers never
    /// apply one record twice or out of order.
    order: Mutex<()>,
}

impl Applier {
    fn next(&self, partition: i32) -> i64 {
        self.positions
            .borrow()
            .get(&partition)
            .copied()
            .unwrap_or(0)
    }

    /// Applies the record at `offset` unless it was applied already. A writer's own record
    /// (`own`) is applied only when it is the very next one; the reader applies whatever it
    /// reads next (offsets may skip where compaction removed records).
    fn apply(
        &self,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        own: bool,
    ) {
        let _order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        let next = self.next(partition);
        if offset < next || (own && offset != next) {
            return;
        }
        if let Some(key) = key {
            (self.apply)(key, value);
        }
        self.positions.send_modify(|p| {
            p.insert(partition, offset + 1);
        });
    }
}

pub struct KafkaLog {
    topic: String,
    producer: crate::kafka::Producer,
    applier: Arc<Applier>,
    /// Next offset to apply, per partition; moves forward as records are applied.
    positions: watch::Receiver<HashMap<i32, i64>>,
    watermark_consumer: Arc<BaseConsumer>,
    stop: Arc<AtomicBool>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl KafkaLog {
    /// Starts reading `topic` from the beginning; returns once everything already in it is applied.
    pub async fn open(
        settings: &KafkaSettings,
        topic: &str,
        apply: Apply,
    ) -> Result<Self, StoreError> {
        let producer = settings.producer(&Default::default())?;
        // librdkafka needs a group id to assign partitions; this reader never joins or commits.
        let reader_group = format!("medconnect-log-reader-{topic}");
        let consumer: BaseConsumer = settings
            .consumer_config(Some(&reader_group), &Default::default())
            .create()
            .map_err(|e| StoreError::kafka(topic, e))?;
        let watermark_consumer: BaseConsumer = settings
            .consumer_config(Some(&reader_group), &Default::default())
            .create()
            .map_err(|e| StoreError::kafka(topic, e))?;
        let topic_name = topic.to_string();
        let partitions = tokio::task::spawn_blocking(move || {
            partitions_of(&consumer, &topic_name).map(|p| (consumer, p))
        })
        .await
        .map_err(|e| StoreError::Internal(e.to_string()))?;
        let (consumer, partitions) = partitions?;
        let mut assignment = TopicPartitionList::new();
        for partition in &partitions {
            assignment
                .add_partition_offset(topic, *partition, Offset::Beginning)
                .map_err(|e| StoreError::kafka(topic, e))?;
        }
        consumer
            .assign(&assignment)
            .map_err(|e| StoreError::kafka(topic, e))?;

        let (position_tx, positions) = watch::channel(HashMap::new());
        let applier = Arc::new(Applier {
            apply,
            positions: position_tx,
            order: Mutex::new(()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let reader_stop = stop.clone();
        let reader_topic = topic.to_string();
        let reader_applier = applier.clone();
        let reader = std::thread::Builder::new()
            .name(format!("log-{topic}"))
            .spawn(move || read_loop(consumer, &reader_topic, &reader_applier, reader_stop))
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        let log = Self {
            topic: topic.to_string(),
            producer,
            applier,
            positions,
            watermark_consumer: Arc::new(watermark_consumer),
            stop,
            reader: Mutex::new(Some(reader)),
        };
        log.read_to_end().await?;
        Ok(log)
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Waits until every record written to the log before this call has been applied.
    pub async fn read_to_end(&self) -> Result<(), StoreError> {
        let consumer = self.watermark_consumer.clone();
        let topic = self.topic.clone();
        let ends = tokio::task::spawn_blocking(move || -> Result<Vec<(i32, i64)>, StoreError> {
            let partitions = partitions_of(&consumer, &topic)?;
            partitions
                .into_iter()
                .map(|p| {
                    consumer
                        .fetch_watermarks(&topic, p, METADATA_TIMEOUT)
                        .map(|(_, high)| (p, high))
                        .map_err(|e| StoreError::kafka(&topic, e))
                })
                .collect()
        })
        .await
        .map_err(|e| StoreError::Internal(e.to_string()))??;
        for (partition, end) in ends {
            self.wait_for(partition, end).await?;
        }
        Ok(())
    }

    /// Writes a record (a tombstone when `value` is `None`) and returns once it is applied.
    pub async fn write(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
        self.write_all(&[(key.to_vec(), value.map(<[u8]>::to_vec))])
            .await
    }

    /// Writes records in order and returns once the last is applied: a change of several
    /// records (a connector, its target state, its task configs and their commit) waits for
    /// Kafka once, not once per record. The producer is idempotent, so the records land in
    /// the order given; all are handed to it before the first delivery is awaited.
    pub async fn write_all(
        &self,
        records: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), StoreError> {
        let mut deliveries = Vec::with_capacity(records.len());
        for (key, value) in records {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).key(key.as_slice());
            if let Some(value) = value {
                record = record.payload(value.as_slice());
            }
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(e, _)| StoreError::kafka(&self.topic, e))?;
            deliveries.push(delivery);
        }
        let mut last = None;
        for ((key, value), delivery) in records.iter().zip(deliveries) {
            let delivered = tokio::time::timeout(METADATA_TIMEOUT, delivery)
                .await
                .map_err(|_| StoreError::Timeout {
                    topic: self.topic.clone(),
                    what: "writing a record".into(),
                })?
                .map_err(|_| StoreError::Internal(format!("producer of {} closed", self.topic)))?
                .map_err(|(e, _)| StoreError::kafka(&self.topic, e))?;
            let (partition, offset) = (delivered.partition, delivered.offset);
            // Once every record before it is applied (by the reader, or by the writers of
            // concurrent records), this one is next: applied here without a fetch cycle.
            self.wait_for(partition, offset).await?;
            self.applier
                .apply(partition, offset, Some(key), value.as_deref(), true);
            last = Some((partition, offset));
        }
        match last {
            Some((partition, offset)) => self.wait_for(partition, offset + 1).await,
            None => Ok(()),
        }
    }

    /// The next offset the reader will apply in `partition`.
    pub fn position(&self, partition: i32) -> i64 {
        self.positions
            .borrow()
            .get(&partition)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until the reader applied every record of `partition` before `next_offset`.
    pub async fn wait_for(&self, partition: i32, next_offset: i64) -> Result<(), StoreError> {
        let mut positions = self.positions.clone();
        let reached =
            positions.wait_for(|p| p.get(&partition).copied().unwrap_or(0) >= next_offset);
        match tokio::time::timeout(METADATA_TIMEOUT, reached).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(StoreError::Internal(format!(
                "reader of {} stopped",
                self.topic
            ))),
            Err(_) => Err(StoreError::Timeout {
                topic: self.topic.clone(),
                what: format!("reading partition {partition} up to offset {next_offset}"),
            }),
        }
    }

    pub fn close(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.reader.lock().ok().and_then(|mut r| r.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for KafkaLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn partitions_of(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, StoreError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .map_err(|e| StoreError::kafka(topic, e))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(StoreError::Timeout {
            topic: topic.to_string(),
            what: "finding its partitions (does the topic exist?)".into(),
        });
    }
    Ok(partitions)
}

fn read_loop(consumer: BaseConsumer, topic: &str, applier: &Applier, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) => {
                applier.apply(
                    message.partition(),
                    message.offset(),
                    message.key(),
                    message.payload(),
                    false,
                );
            }
            Some(Err(error)) => {
                tracing::warn!(%topic, %error, "error reading internal topic; retrying");
            }
        }
    }
}
