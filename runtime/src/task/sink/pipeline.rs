//! The sink pipeline: consumed records through the transforms to `put`, then `pre_commit`
//! and the offset commit; rebalances, pauses and holds in between.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use medconnect_api::{
    ConnectError, ConnectResult, SinkOffsets, SinkRecord, SinkTask, TopicPartition,
};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::kafka::record_of;
use crate::metrics::TaskMetrics;
use crate::task::errors::{ErrorReporter, Stage};
use crate::task::{RunState, RunnerSettings};
use crate::transform::TransformChain;

use super::consumer::{Detach, GroupConsumer, Rebalance, assign, protocol_name, unassign};
use super::lent::{ConsumerPartitions, ErrantRecords};
use super::{bounded, lock};

pub(super) struct Sink {
    /// First, so dropped before the task and the consumer (fields drop in order).
    pub(super) _detach: Detach,
    pub(super) connector: String,
    pub(super) task: Box<dyn SinkTask>,
    pub(super) consumer: Arc<GroupConsumer>,
    pub(super) partitions: Arc<ConsumerPartitions>,
    pub(super) transforms: TransformChain,
    pub(super) errors: Arc<ErrorReporter>,
    pub(super) errant: Arc<ErrantRecords>,
    pub(super) metrics: TaskMetrics,
    /// Next offset to commit per (topic, partition): past every record put, filtered or dead-lettered.
    pub(super) positions: Positions,
    pub(super) uncommitted: i64,
    pub(super) stop: CancellationToken,
    pub(super) shutdown_timeout: Duration,
    /// Assignment changes from the consumer's rebalance callback, for the runner to apply.
    pub(super) rebalances: mpsc::UnboundedReceiver<Rebalance>,
    /// The partitions the task was told of with `open` and not yet with `close`.
    pub(super) open: BTreeSet<TopicPartition>,
    /// The connector is paused: partitions assigned now are paused at once.
    pub(super) paused: bool,
}

impl Sink {
    pub(super) async fn run(
        &mut self,
        mut run_state: watch::Receiver<RunState>,
        settings: &RunnerSettings,
    ) -> Option<ConnectError> {
        let mut flush = tokio::time::interval(settings.offset_flush_interval);

        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let consumer = self.consumer.clone();
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                // Before reading on: a rebalance waits for the runner, and records of newly
                // assigned partitions are read only after the task opened them.
                Some(event) = self.rebalances.recv() => {
                    if let Err(error) = self.rebalance(event, true).await {
                        return Some(error);
                    }
                }
                changed = run_state.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    self.paused = *run_state.borrow_and_update() == RunState::Paused;
                    self.pause(self.paused);
                }
                _ = flush.tick() => {
                    if let Err(error) = self.flush_and_commit().await {
                        return Some(error);
                    }
                }
                message = consumer.recv() => {
                    let first = match message {
                        Ok(message) => message,
                        Err(error) => {
                            self.metrics.error(Stage::KafkaConsume.as_str());
                            tracing::warn!(connector = %self.connector, %error, "consumer error");
                            continue;
                        }
                    };
                    if self.paused {
                        // A partition assigned while paused: hold it, and read this record again on resume.
                        self.hold(&first);
                        continue;
                    }
                    let mut batch = vec![to_sink_record(&first)];
                    while batch.len() < settings.sink_batch_max {
                        match consumer.recv().now_or_never() {
                            Some(Ok(message)) => batch.push(to_sink_record(&message)),
                            _ => break,
                        }
                    }
                    if let Err(error) = self.deliver(batch).await {
                        return Some(error);
                    }
                }
            }
        }
    }

    /// Transforms a batch and puts it, retrying retriable failures while the task runs.
    async fn deliver(&mut self, batch: Vec<SinkRecord>) -> ConnectResult<()> {
        self.metrics.records_in(batch.len() as u64);
        let transformed = if self.transforms.is_empty() {
            // Nothing to apply, nothing to keep for a dead letter: the batch goes as read.
            self.positions.advance_past(&batch);
            self.uncommitted += batch.len() as i64;
            batch
        } else {
            self.transform(batch)?
        };
        self.metrics.set_commit_lag(self.uncommitted);
        if transformed.is_empty() {
            return Ok(());
        }
        self.put(transformed).await
    }

    /// Applies the transforms to a batch: the records they keep, in order; every record's
    /// position advances, kept, filtered or dead-lettered.
    fn transform(&mut self, batch: Vec<SinkRecord>) -> ConnectResult<Vec<SinkRecord>> {
        let mut transformed = Vec::with_capacity(batch.len());
        for record in batch {
            // A copy in: a failing record is dead-lettered as it was read.
            match self.transforms.apply(record.record.clone()) {
                // The original stays for the position (and would for a dead letter).
                Ok(Some(out)) => transformed.push(SinkRecord {
                    record: out,
                    kafka_partition: record.kafka_partition,
                    kafka_offset: record.kafka_offset,
                }),
                Ok(None) => self.metrics.filtered(),
                Err(failure) => {
                    // Settled before the next commit, like the task's own reports.
                    drop(self.errant.apply(
                        Stage::Transformation,
                        &failure.class,
                        &record,
                        failure.error,
                    ));
                    self.errant.check()?;
                }
            }
            self.positions.advance(
                &record.record.topic,
                record.kafka_partition,
                record.kafka_offset,
            );
            self.uncommitted += 1;
        }
        Ok(transformed)
    }

    /// Puts a batch, retrying retriable failures while the task runs.
    async fn put(&mut self, transformed: Vec<SinkRecord>) -> ConnectResult<()> {
        let count = transformed.len() as u64;
        let mut backoff = self.errors.policy.backoff(true);
        // A retried `put` gets the same batch again (cheap clones: payloads are shared), so a
        // sink's `put` must be idempotent for a batch it failed with a retriable error.
        let result = loop {
            let put = self.task.put(transformed.clone());
            match bounded("put", put, &self.stop, self.shutdown_timeout).await {
                Err(error) if backoff.retry_after(&error, &self.stop).await => continue,
                other => break other,
            }
        };
        match result {
            Ok(()) => {
                self.metrics.records_out(count);
                // A record the task reported errant that is not tolerated fails the task now.
                self.errant.check()
            }
            Err(error) => {
                self.metrics.error(Stage::TaskPut.as_str());
                Err(error)
            }
        }
    }

    /// Applies an assignment change the consumer handed over: the partitions are (un)assigned
    /// only here, once the task opened them or once what it accepted of them is committed
    /// (`commit`: not when the task already failed) and it closed them.
    pub(super) async fn rebalance(&mut self, event: Rebalance, commit: bool) -> ConnectResult<()> {
        match event {
            Rebalance::Assign(partitions) => {
                tracing::debug!(connector = %self.connector, ?partitions, protocol = protocol_name(self.consumer.as_ref()), "partitions assigned");
                assign(
                    self.consumer.as_ref(),
                    &ConsumerPartitions::list(&partitions),
                )
                .map_err(|e| {
                    ConnectError::fatal(format!("cannot assign partitions {partitions:?}: {e}"))
                })?;
                // Paused before the first read: the connector's target state, or the task's own
                // pause of a partition it had before this rebalance.
                let held = lock(&self.partitions.paused_by_task).clone();
                let pause: Vec<TopicPartition> = partitions
                    .iter()
                    .filter(|p| self.paused || held.contains(p))
                    .cloned()
                    .collect();
                if !pause.is_empty()
                    && let Err(error) = self.consumer.pause(&ConsumerPartitions::list(&pause))
                {
                    tracing::warn!(connector = %self.connector, %error, "cannot pause newly assigned partitions");
                }
                let opening: Vec<TopicPartition> = partitions
                    .into_iter()
                    .filter(|p| self.open.insert(p.clone()))
                    .collect();
                if opening.is_empty() {
                    return Ok(());
                }
                let open = self.task.open(&opening);
                bounded("open", open, &self.stop, self.shutdown_timeout).await
            }
            Rebalance::Revoke(partitions) => {
                tracing::debug!(connector = %self.connector, ?partitions, protocol = protocol_name(self.consumer.as_ref()), "partitions revoked");
                // A lost assignment (the member was expired) may already be another task's:
                // nothing is committed for it, as in Connect.
                let lost = self.consumer.assignment_lost();
                let committed = if commit && !lost {
                    self.flush_and_commit().await
                } else {
                    Ok(())
                };
                let closing: Vec<TopicPartition> = partitions
                    .iter()
                    .filter(|p| self.open.remove(p))
                    .cloned()
                    .collect();
                let closed = self.close(&closing).await;
                // What was not committed is read again by the next owner, from the last commit.
                for partition in &partitions {
                    self.positions.remove(&partition.topic, partition.partition);
                }
                if self.positions.is_empty() {
                    self.uncommitted = 0;
                    self.metrics.set_commit_lag(0);
                }
                // Always, even after a failure: the group waits for this call.
                if let Err(error) = unassign(
                    self.consumer.as_ref(),
                    &ConsumerPartitions::list(&partitions),
                ) {
                    tracing::warn!(connector = %self.connector, %error, "cannot unassign revoked partitions");
                }
                committed.and(closed)
            }
        }
    }

    /// Tells the task it no longer has these partitions.
    pub(super) async fn close(&mut self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        if partitions.is_empty() {
            return Ok(());
        }
        let close = self.task.close(partitions);
        bounded("close", close, &self.stop, self.shutdown_timeout).await
    }

    /// Asks the sink what is safe to commit (`pre_commit`, which flushes by default), waits
    /// until every errant record reported so far (from `put`, `flush` or transforms) is in
    /// the dead-letter topic, then commits those positions, never past what was put.
    pub(super) async fn flush_and_commit(&mut self) -> ConnectResult<()> {
        if self.positions.is_empty() {
            return self.errant.settle().await;
        }
        let consumed: SinkOffsets = self
            .positions
            .iter()
            .map(|(topic, partition, next)| (TopicPartition::new(topic, partition), next))
            .collect();
        let mut backoff = self.errors.policy.backoff(false);
        let unstoppable = CancellationToken::new();
        let accepted = loop {
            let pre_commit = self.task.pre_commit(&consumed);
            match bounded("pre_commit", pre_commit, &self.stop, self.shutdown_timeout).await {
                Err(error) if backoff.retry_after(&error, &unstoppable).await => continue,
                other => break other?,
            }
        };
        self.errant.settle().await?;
        let mut offsets = TopicPartitionList::new();
        let mut committing = Vec::new();
        for (partition, offset) in accepted {
            let Some(&next) = consumed.get(&partition) else {
                continue;
            };
            let offset = offset.min(next);
            offsets
                .add_partition_offset(
                    &partition.topic,
                    partition.partition,
                    Offset::Offset(offset),
                )
                .map_err(|e| ConnectError::fatal(e.to_string()))?;
            committing.push((partition, offset, next));
        }
        if committing.is_empty() {
            return Ok(());
        }
        let consumer = self.consumer.clone();
        let committed =
            tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync))
                .await
                .map_err(|e| ConnectError::fatal(e.to_string()))?;
        match committed {
            Ok(()) => {
                // A partition stays pending until the sink accepted everything put from it.
                for (partition, offset, next) in committing {
                    if offset >= next {
                        self.positions.remove(&partition.topic, partition.partition);
                    }
                }
                self.uncommitted = if self.positions.is_empty() {
                    0
                } else {
                    self.uncommitted
                };
                self.metrics.set_commit_lag(self.uncommitted);
                self.metrics.committed();
            }
            // The records are flushed; if the commit is lost they are delivered again (at least once).
            Err(error) => {
                tracing::warn!(connector = %self.connector, %error, "offset commit failed; will retry")
            }
        }
        Ok(())
    }

    /// Pauses or resumes the whole assignment for the connector's target state; partitions
    /// the task paused itself stay paused on resume.
    fn pause(&self, paused: bool) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let result = if paused {
            self.consumer.pause(&assignment)
        } else {
            let held = lock(&self.partitions.paused_by_task).clone();
            let mut resume = TopicPartitionList::new();
            for element in assignment.elements() {
                let partition = TopicPartition::new(element.topic(), element.partition());
                if !held.contains(&partition) {
                    resume.add_partition(element.topic(), element.partition());
                }
            }
            self.consumer.resume(&resume)
        };
        if let Err(error) = result {
            tracing::warn!(connector = %self.connector, %error, paused, "cannot change consumption state");
        }
    }

    fn hold(&self, message: &BorrowedMessage<'_>) {
        let mut partition = TopicPartitionList::new();
        partition.add_partition(message.topic(), message.partition());
        let _ = self.consumer.pause(&partition);
        let _ = self.consumer.seek(
            message.topic(),
            message.partition(),
            Offset::Offset(message.offset()),
            std::time::Duration::from_secs(5),
        );
    }
}

/// Next offset to commit per topic and partition, looked up by `&str`: advancing a partition
/// the task already has allocates nothing (this runs for every record).
#[derive(Debug, Default)]
pub(super) struct Positions(HashMap<String, HashMap<i32, i64>>);

impl Positions {
    /// Past `offset`; never back.
    pub(super) fn advance(&mut self, topic: &str, partition: i32, offset: i64) {
        let partitions = match self.0.get_mut(topic) {
            Some(partitions) => partitions,
            None => self.0.entry(topic.to_string()).or_default(),
        };
        let next = partitions.entry(partition).or_insert(0);
        *next = (*next).max(offset + 1);
    }

    /// Past every record of a batch: one lookup per run of records from one partition (a
    /// batch is mostly one run), not one per record.
    pub(super) fn advance_past(&mut self, batch: &[SinkRecord]) {
        let mut run: Option<(&str, i32, i64)> = None;
        for record in batch {
            let (topic, partition) = (record.record.topic.as_str(), record.kafka_partition);
            match &mut run {
                Some((t, p, last)) if *p == partition && *t == topic => {
                    *last = (*last).max(record.kafka_offset);
                }
                _ => {
                    if let Some((t, p, last)) = run {
                        self.advance(t, p, last);
                    }
                    run = Some((topic, partition, record.kafka_offset));
                }
            }
        }
        if let Some((topic, partition, last)) = run {
            self.advance(topic, partition, last);
        }
    }

    pub(super) fn remove(&mut self, topic: &str, partition: i32) {
        if let Some(partitions) = self.0.get_mut(topic) {
            partitions.remove(&partition);
            if partitions.is_empty() {
                self.0.remove(topic);
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, i32, i64)> {
        self.0.iter().flat_map(|(topic, partitions)| {
            partitions
                .iter()
                .map(move |(&partition, &next)| (topic.as_str(), partition, next))
        })
    }
}

/// A consumed message as the sink gets it: [`record_of`] shares one copy of its bytes, so the
/// copy of a batch kept for a retried `put` costs reference counts, not allocations.
pub(super) fn to_sink_record(message: &impl Message) -> SinkRecord {
    SinkRecord {
        record: record_of(message),
        kafka_partition: message.partition(),
        kafka_offset: message.offset(),
    }
}

#[cfg(test)]
mod tests {
    use medconnect_api::Record;
    use rdkafka::Timestamp;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};

    use super::*;

    fn message(
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> OwnedMessage {
        OwnedMessage::new(
            value.map(<[u8]>::to_vec),
            key.map(<[u8]>::to_vec),
            "vitals".into(),
            Timestamp::CreateTime(1_700_000_000_000),
            3,
            41,
            headers,
        )
    }

    #[test]
    fn a_consumed_message_keeps_its_key_value_headers_and_place() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            })
            .insert(Header::<&[u8]> {
                key: "trace",
                value: None,
            })
            .insert(Header {
                key: "empty",
                value: Some(""),
            })
            .insert(Header {
                key: "content-type",
                value: Some("text/plain"),
            });
        let record = to_sink_record(&message(
            Some(b"patient-7"),
            Some(b"{\"hr\":71}"),
            Some(headers),
        ));
        assert_eq!((record.kafka_partition, record.kafka_offset), (3, 41));
        let record = record.record;
        assert_eq!(
            (record.topic.as_str(), record.partition, record.timestamp),
            ("vitals", Some(3), Some(1_700_000_000_000))
        );
        assert_eq!(record.key.as_deref(), Some(&b"patient-7"[..]));
        assert_eq!(record.value.as_deref(), Some(&b"{\"hr\":71}"[..]));
        assert_eq!(record.headers.len(), 4);
        assert_eq!(record.headers.last_str("content-type"), Some("text/plain"));
        assert_eq!(record.headers.last_str("empty"), Some(""));
        assert!(
            record
                .headers
                .iter()
                .any(|(name, value)| name == "trace" && value.is_none())
        );

        // A tombstone with an empty key and no headers; an empty value.
        let tombstone = to_sink_record(&message(Some(b""), None, None)).record;
        assert_eq!(
            (tombstone.key.as_deref(), tombstone.value),
            (Some(&b""[..]), None)
        );
        assert!(tombstone.headers.is_empty());
        let empty = to_sink_record(&message(None, Some(b""), Some(OwnedHeaders::new()))).record;
        assert_eq!((empty.key, empty.value.as_deref()), (None, Some(&b""[..])));
    }

    #[test]
    fn a_record_and_its_copy_share_their_bytes() {
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some("application/json"),
        });
        let record = to_sink_record(&message(Some(b"k"), Some(b"value"), Some(headers)));
        let copy = record.clone();
        let (Some(value), Some(copied)) = (&record.record.value, &copy.record.value) else {
            panic!("no value");
        };
        assert_eq!(value.as_ptr(), copied.as_ptr());
        // The parts are cut from one buffer, in order.
        let key = record.record.key.as_ref().map(|k| k.as_ptr());
        assert_eq!(key.map(|k| k.wrapping_add(1)), Some(value.as_ptr()));
    }

    #[test]
    fn positions_move_forward_per_topic_and_partition() {
        let mut positions = Positions::default();
        assert!(positions.is_empty());
        positions.advance("a", 0, 9);
        positions.advance("a", 0, 4);
        positions.advance("a", 1, 0);
        positions.advance("b", 0, 100);
        let mut all: Vec<_> = positions.iter().collect();
        all.sort();
        assert_eq!(all, [("a", 0, 10), ("a", 1, 1), ("b", 0, 101)]);
        positions.remove("a", 0);
        positions.remove("b", 0);
        positions.remove("c", 0);
        assert_eq!(positions.iter().collect::<Vec<_>>(), [("a", 1, 1)]);
        positions.remove("a", 1);
        assert!(positions.is_empty());

        // A batch: runs of partitions, offsets in order within each, as a consumer reads.
        let record = |topic: &str, partition, offset| SinkRecord {
            record: Record::new(topic),
            kafka_partition: partition,
            kafka_offset: offset,
        };
        positions.advance("a", 0, 50);
        positions.advance_past(&[
            record("a", 0, 7),
            record("a", 0, 8),
            record("a", 1, 3),
            record("b", 1, 5),
            record("b", 1, 6),
            record("a", 1, 4),
        ]);
        let mut all: Vec<_> = positions.iter().collect();
        all.sort();
        assert_eq!(all, [("a", 0, 51), ("a", 1, 5), ("b", 1, 7)]);
        positions.advance_past(&[]);
        assert_eq!(positions.iter().count(), 3);
    }
}
