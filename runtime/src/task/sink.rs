//! The sink task runner: consumer group `connect-<name>` -> transforms -> `put` -> `flush`
//! -> commit consumer offsets. Offsets are committed only after the sink flushed the records
//! (and any dead-letter writes were acknowledged), so a crash redelivers, never loses.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use medconnect_api::{
    ConnectError, ConnectResult, ErrantRecordReporter, Headers, Record, SinkRecord, SinkTask,
    SinkTaskContext,
};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers as _, Message};
use rdkafka::producer::DeliveryFuture;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::errors::{ErrorReporter, Origin, Stage, Verdict};
use super::{RunState, RunnerSettings, StatusReporter};
use crate::metrics::TaskMetrics;
use crate::store::ConnectorState;
use crate::transform::TransformChain;

/// What a sink reads: a topic list or a regular expression (`topics` / `topics.regex`).
#[derive(Debug, Clone)]
pub enum Subscription {
    Topics(Vec<String>),
    Regex(String),
}

pub struct SinkTaskSpec {
    pub connector: String,
    pub task_id: u32,
    pub task: Box<dyn SinkTask>,
    pub context: SinkTaskContext,
    pub errant_records: mpsc::UnboundedReceiver<(SinkRecord, ConnectError)>,
    pub subscription: Subscription,
    pub consumer: StreamConsumer,
    pub transforms: TransformChain,
    pub errors: ErrorReporter,
    pub status: StatusReporter,
    pub metrics: TaskMetrics,
    pub settings: RunnerSettings,
}

impl SinkTaskSpec {
    /// The channel a sink task reports failed records through.
    pub fn errant_channel() -> (
        ErrantRecordReporter,
        mpsc::UnboundedReceiver<(SinkRecord, ConnectError)>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        (ErrantRecordReporter::new(tx), rx)
    }
}

pub struct SinkRunner;

impl SinkRunner {
    pub async fn run(
        spec: SinkTaskSpec,
        run_state: watch::Receiver<RunState>,
        stop: CancellationToken,
    ) {
        let SinkTaskSpec {
            connector,
            task_id,
            mut task,
            context,
            errant_records,
            subscription,
            consumer,
            transforms,
            errors,
            status,
            metrics,
            settings,
        } = spec;
        if let Err(error) = task.start(context).await {
            status.failed(&error).await;
            return;
        }
        let subscribed = match &subscription {
            Subscription::Topics(topics) => {
                let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                consumer.subscribe(&names)
            }
            Subscription::Regex(regex) => consumer.subscribe(&[&format!("^{regex}")]),
        };
        if let Err(error) = subscribed {
            status.failed(&format!("cannot subscribe: {error}")).await;
            let _ = task.stop().await;
            return;
        }
        if let Subscription::Topics(topics) = &subscription {
            for topic in topics {
                status.topic(topic).await;
            }
        }
        status.report(ConnectorState::Running, None).await;
        let mut sink = Sink {
            connector,
            task,
            consumer: Arc::new(consumer),
            transforms,
            errors,
            metrics,
            positions: HashMap::new(),
            dead_letters: Vec::new(),
            uncommitted: 0,
            stop: stop.clone(),
        };
        let failure = sink.run(errant_records, run_state, &settings).await;
        if failure.is_none()
            && let Err(error) = sink.flush_and_commit().await
        {
            tracing::warn!(connector = %sink.connector, task = task_id, %error, "final flush failed; records will be redelivered");
        }
        if let Err(error) = sink.task.stop().await {
            tracing::warn!(connector = %sink.connector, task = task_id, %error, "sink task did not stop cleanly");
        }
        sink.transforms.close();
        sink.consumer.unsubscribe();
        if let Some(error) = failure {
            status.failed(&error).await;
        }
        sink.metrics.remove();
    }
}

struct Sink {
    connector: String,
    task: Box<dyn SinkTask>,
    consumer: Arc<StreamConsumer>,
    transforms: TransformChain,
    errors: ErrorReporter,
    metrics: TaskMetrics,
    /// Next offset to commit per (topic, partition): past every record put, filtered or dead-lettered.
    positions: HashMap<(String, i32), i64>,
    dead_letters: Vec<DeliveryFuture>,
    uncommitted: i64,
    stop: CancellationToken,
}

impl Sink {
    async fn run(
        &mut self,
        mut errant: mpsc::UnboundedReceiver<(SinkRecord, ConnectError)>,
        mut run_state: watch::Receiver<RunState>,
        settings: &RunnerSettings,
    ) -> Option<ConnectError> {
        let mut flush = tokio::time::interval(settings.offset_flush_interval);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut paused = false;
        loop {
            let consumer = self.consumer.clone();
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                Some((record, error)) = errant.recv() => {
                    if let Err(error) = self.reject(Stage::TaskPut, "SinkTask", record, error) {
                        return Some(error);
                    }
                }
                changed = run_state.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    paused = *run_state.borrow_and_update() == RunState::Paused;
                    self.pause(paused);
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
                    if paused {
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
        let mut transformed = Vec::with_capacity(batch.len());
        for record in batch {
            let position = (
                record.record.topic.clone(),
                record.kafka_partition,
                record.kafka_offset,
            );
            match self.transforms.apply(record.record.clone()) {
                Ok(Some(out)) => transformed.push(SinkRecord {
                    record: out,
                    ..record
                }),
                Ok(None) => self.metrics.filtered(),
                Err(failure) => {
                    self.reject(Stage::Transformation, &failure.class, record, failure.error)?
                }
            }
            self.advance(&position.0, position.1, position.2);
        }
        if transformed.is_empty() {
            return Ok(());
        }
        let count = transformed.len() as u64;
        let mut backoff = self.errors.policy.backoff(true);
        // A retried `put` gets the same batch again (cheap clones: payloads are shared).
        let result = loop {
            match self.task.put(transformed.clone()).await {
                Err(error) if backoff.retry_after(&error, &self.stop).await => continue,
                other => break other,
            }
        };
        match result {
            Ok(()) => {
                self.metrics.records_out(count);
                Ok(())
            }
            Err(error) => {
                self.metrics.error(Stage::TaskPut.as_str());
                Err(error)
            }
        }
    }

    /// Applies the error policy to one failed record.
    fn reject(
        &mut self,
        stage: Stage,
        class: &str,
        record: SinkRecord,
        error: ConnectError,
    ) -> ConnectResult<()> {
        let origin = Origin::Kafka {
            topic: &record.record.topic,
            partition: record.kafka_partition,
            offset: record.kafka_offset,
        };
        match self
            .errors
            .report(stage, class, &record.record, origin, error)
        {
            Verdict::Fail(error) => Err(error),
            Verdict::Skipped => Ok(()),
            Verdict::DeadLettered(delivery) => {
                self.dead_letters.push(delivery);
                Ok(())
            }
        }
    }

    fn advance(&mut self, topic: &str, partition: i32, offset: i64) {
        let next = self
            .positions
            .entry((topic.to_string(), partition))
            .or_insert(0);
        *next = (*next).max(offset + 1);
        self.uncommitted += 1;
        self.metrics.set_commit_lag(self.uncommitted);
    }

    /// Flushes the sink, waits for dead-letter writes, then commits the consumed positions.
    async fn flush_and_commit(&mut self) -> ConnectResult<()> {
        if self.positions.is_empty() {
            return Ok(());
        }
        let mut backoff = self.errors.policy.backoff(false);
        let unstoppable = CancellationToken::new();
        loop {
            match self.task.flush().await {
                Err(error) if backoff.retry_after(&error, &unstoppable).await => continue,
                other => break other?,
            }
        }
        for delivery in self.dead_letters.drain(..) {
            match delivery.await {
                Ok(Ok(_)) => {}
                _ => {
                    return Err(ConnectError::fatal(
                        "a dead-letter record was not acknowledged by Kafka",
                    ));
                }
            }
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), next) in &self.positions {
            offsets
                .add_partition_offset(topic, *partition, Offset::Offset(*next))
                .map_err(|e| ConnectError::fatal(e.to_string()))?;
        }
        let consumer = self.consumer.clone();
        let committed =
            tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync))
                .await
                .map_err(|e| ConnectError::fatal(e.to_string()))?;
        match committed {
            Ok(()) => {
                self.positions.clear();
                self.uncommitted = 0;
                self.metrics.set_commit_lag(0);
                self.metrics.committed();
            }
            // The records are flushed; if the commit is lost they are delivered again (at least once).
            Err(error) => {
                tracing::warn!(connector = %self.connector, %error, "offset commit failed; will retry")
            }
        }
        Ok(())
    }

    fn pause(&self, paused: bool) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let result = if paused {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
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

fn to_sink_record(message: &BorrowedMessage<'_>) -> SinkRecord {
    let headers: Headers = message
        .headers()
        .map(|h| {
            h.iter()
                .map(|header| {
                    (
                        header.key.to_string(),
                        header.value.map(Bytes::copy_from_slice),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    SinkRecord {
        record: Record {
            topic: message.topic().to_string(),
            partition: Some(message.partition()),
            key: message.key().map(Bytes::copy_from_slice),
            value: message.payload().map(Bytes::copy_from_slice),
            headers,
            timestamp: message.timestamp().to_millis(),
        },
        kafka_partition: message.partition(),
        kafka_offset: message.offset(),
    }
}
