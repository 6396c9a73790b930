//! The pipeline: records from `poll` through the transforms to the producer, settled in poll
//! order; offsets stored beside it, never past a record that failed without being tolerated.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use futures::FutureExt;

use medconnect_api::{
    AckHandle, ConnectError, ConnectResult, Delivery, Record, SourceOffset, SourcePartition,
    SourceRecord,
};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::kafka::{
    DeliveryFuture, KafkaSettings, Producer, Topic, TopicSpec, ensure_topics, record_of,
};
use crate::metrics::TaskMetrics;
use crate::store::OffsetStore;
use crate::task::errors::{ErrorReporter, Origin, Stage, Verdict};
use crate::task::{RunnerSettings, StatusReporter};
use crate::transform::TransformChain;

use super::in_flight::{AfterFailure, Completed, InFlight, Outcome, Refusal, produce_error};
use super::offset_writes::{OffsetWrite, offset_write};
use super::{Batch, Capacity, StoredOffsets};

/// Waits for the oldest record in flight to settle and takes it.
pub(super) fn next_settled(
    in_flight: &mut VecDeque<InFlight>,
) -> impl Future<Output = Option<Completed>> + '_ {
    std::future::poll_fn(move |cx| match in_flight.front_mut() {
        None => Poll::Ready(None),
        Some(oldest) => match Pin::new(oldest).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(done) => {
                in_flight.pop_front();
                Poll::Ready(Some(done))
            }
        },
    })
}

/// The topics this task has made sure exist, with their producer handles, and the last one a
/// record went to: a source sends most records to the topic of the one before, and comparing
/// two short strings costs less than hashing one for every record.
#[derive(Default)]
pub(super) struct KnownTopics {
    all: HashMap<String, Topic>,
    last: Option<Topic>,
}

impl KnownTopics {
    /// The handle of topic `name`, if this task made sure it exists.
    fn get(&mut self, name: &str) -> Option<&Topic> {
        if self.last.as_ref().is_none_or(|last| last.name() != name) {
            self.last = Some(self.all.get(name)?.clone());
        }
        self.last.as_ref()
    }

    fn insert(&mut self, topic: Topic) {
        self.all.insert(topic.name().to_string(), topic);
    }
}

/// A record that may have to wait before it is sent (see [`Pipeline::process_now`]).
struct Waiting {
    record: Record,
    position: Option<(SourcePartition, SourceOffset)>,
    ack: Option<AckHandle>,
}

/// At most this many records are settled before the main loop looks at its other work again
/// (newly polled records, the offset flush, stopping).
const SETTLED_IN_A_ROW: usize = 256;

pub(super) struct Pipeline {
    pub(super) connector: String,
    /// Named in dead-letter headers for input the source itself rejected.
    pub(super) connector_class: String,
    pub(super) transforms: TransformChain,
    pub(super) errors: ErrorReporter,
    pub(super) producer: Arc<Producer>,
    pub(super) offsets: Arc<OffsetStore>,
    pub(super) kafka: KafkaSettings,
    pub(super) new_topic: (i32, i32),
    pub(super) status: StatusReporter,
    pub(super) metrics: TaskMetrics,
    pub(super) capacity: Arc<Capacity>,
    /// Records in poll order. Only the oldest is awaited: Kafka acknowledges a partition's
    /// records in order, and offsets must be stored in poll order anyway.
    pub(super) in_flight: VecDeque<InFlight>,
    /// Offsets acknowledged and not yet stored, one per partition (sources have few).
    pub(super) pending_offsets: Vec<(SourcePartition, SourceOffset)>,
    pub(super) uncommitted: i64,
    /// The offset write under way, if any. It runs beside the pipeline: the offset topic
    /// being slow or unreachable must not stop records from being settled (a listener's
    /// sender waits for its answer meanwhile).
    pub(super) committing: Option<tokio::task::JoinHandle<OffsetWrite>>,
    pub(super) known_topics: KnownTopics,
    /// Set once a record with a source position failed without being tolerated: no offset
    /// is stored past it, even for later records Kafka did take, so a restart polls it again.
    pub(super) held: bool,
    /// Records settled as durable (written to Kafka, or to the dead-letter topic) since
    /// [`Self::publish_counts`] last added them to the metrics.
    pub(super) durable_unpublished: u64,
}

impl Pipeline {
    /// The main loop; returns the error that failed the task, if any.
    pub(super) async fn run(
        &mut self,
        mut batches: mpsc::Receiver<Batch>,
        stop: &CancellationToken,
        stored: &StoredOffsets,
        settings: &RunnerSettings,
    ) -> Option<ConnectError> {
        let mut flush = tokio::time::interval(settings.offset_flush_interval);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if stop.is_cancelled() {
                return None;
            }
            // Records polled already go to the producer before older ones are settled: a
            // listener's sender sends its next message once it has its answer, and that
            // message should join the batch the producer is filling (`linger.ms` runs from
            // its first record) instead of waiting for the whole last batch to be settled.
            if let Ok(batch) = batches.try_recv() {
                if let Err(end) = self.take(Some(batch)).await {
                    return end;
                }
                continue;
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                Some(done) = next_settled(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    if let Err(error) = self.settle_ready(done).await {
                        return Some(error);
                    }
                }
                batch = batches.recv() => if let Err(end) = self.take(batch).await {
                    return end;
                },
                _ = flush.tick() => self.start_offset_write(),
                written = offset_write(&mut self.committing), if self.committing.is_some() => {
                    self.committing = None;
                    self.finish_offset_write(written, stored);
                }
            }
        }
    }

    /// Settles `done` and, while no sender waits for an answer, the records behind it that
    /// Kafka has acknowledged already: Kafka acknowledges a whole batch at once, and settling
    /// it in one go spares a turn of the main loop's `select!` per record.
    async fn settle_ready(&mut self, mut done: Completed) -> ConnectResult<()> {
        let mut settled = 0;
        let result = loop {
            let answers_a_sender = done.ack.is_some();
            if let Err(error) = self.complete(done).await {
                break Err(error);
            }
            settled += 1;
            if answers_a_sender {
                self.publish_counts();
                // Its listener's connection now answers the sender, who sends the next
                // message: let that run (the worker polls for I/O before this task resumes)
                // before settling the next record. Otherwise the answers of a whole delivered
                // batch queue behind its settlement, and the senders' next messages reach the
                // producer only after all of them.
                tokio::task::yield_now().await;
                return Ok(());
            }
            if settled == SETTLED_IN_A_ROW {
                break Ok(());
            }
            // A record not yet acknowledged is polled again, with this task's waker, by the
            // main loop's `select!`.
            match next_settled(&mut self.in_flight).now_or_never() {
                Some(Some(next)) => done = next,
                _ => break Ok(()),
            }
        };
        self.publish_counts();
        result
    }

    /// Tells the poller how many records are in flight (waking it if records were settled)
    /// and updates the task's metrics. Called once per batch polled or run of records
    /// settled, not per record: each is an atomic operation on memory another thread reads
    /// (the poller's capacity, the metrics registry).
    fn publish_counts(&mut self) {
        let in_flight = self.in_flight.len();
        if self.capacity.in_flight.swap(in_flight, Ordering::AcqRel) > in_flight {
            self.capacity.freed.notify_one();
        }
        let durable = std::mem::take(&mut self.durable_unpublished);
        if durable > 0 {
            self.metrics.records_out(durable);
        }
        self.metrics.set_in_flight(in_flight as i64);
        self.metrics.set_commit_lag(self.uncommitted);
    }

    /// Processes what the poller sent; `Err` ends the main loop, with the task's failure if any.
    async fn take(&mut self, batch: Option<Batch>) -> Result<(), Option<ConnectError>> {
        match batch {
            Some(Ok(records)) => self.process(records).await.map_err(Some),
            Some(Err(error)) => {
                self.metrics.error(Stage::TaskPoll.as_str());
                Err(Some(error))
            }
            // The poller stopped without an error: the worker is stopping.
            None => Err(None),
        }
    }

    async fn process(&mut self, records: Vec<SourceRecord>) -> ConnectResult<()> {
        self.metrics.records_in(records.len() as u64);
        let processed = self.process_each(records).await;
        self.publish_counts();
        processed
    }

    async fn process_each(&mut self, records: Vec<SourceRecord>) -> ConnectResult<()> {
        for source in records {
            // Most records are sent without waiting, and a record's work is then a plain call:
            // the waiting path's future (creating a topic, settling for room) is large, and
            // building it for every record cost a copy of it per record.
            if let Some(waiting) = self.process_now(source)? {
                Box::pin(self.send_when_ready(waiting)).await?;
            }
        }
        Ok(())
    }

    /// Transforms `source` and sends it, or settles it at once (filtered, dead-lettered,
    /// rejected). Returns the record if it must wait first: its topic is new, or the
    /// producer refused it (its queue is full, or the record itself is at fault).
    fn process_now(&mut self, source: SourceRecord) -> ConnectResult<Option<Waiting>> {
        let SourceRecord {
            record,
            source_partition,
            source_offset,
            ack,
            rejected,
        } = source;
        if let Some(reason) = rejected {
            let position =
                (!source_partition.is_empty()).then_some((source_partition, source_offset));
            return self
                .reject_input(record, reason, position, ack)
                .map(|()| None);
        }
        let original = (!self.transforms.is_empty() && self.errors.policy.dlq_topic.is_some())
            .then(|| record.clone());
        let transformed = self.transforms.apply(record);
        let position = (!source_partition.is_empty()).then_some((source_partition, source_offset));
        let record = match transformed {
            Ok(Some(record)) => record,
            Ok(None) => {
                self.metrics.filtered();
                self.enqueue(position, ack, Outcome::Ready(Some(Ok(Delivery::Filtered))));
                return Ok(None);
            }
            Err(failure) => {
                let record = original.unwrap_or_else(|| Record::new(""));
                let verdict = self.errors.report(
                    Stage::Transformation,
                    &failure.class,
                    &record,
                    Origin::Source(position.as_ref()),
                    failure.error.clone(),
                );
                return self
                    .dead_letter(verdict, position, ack, failure.error)
                    .map(|()| None);
            }
        };
        let Some(topic) = self.known_topics.get(&record.topic) else {
            return Ok(Some(Waiting {
                record,
                position,
                ack,
            }));
        };
        match topic.send(&record) {
            Ok(delivery) => {
                self.enqueue_produced(record, position, ack, delivery);
                Ok(None)
            }
            // Sent again on the waiting path, which waits for room or applies the error
            // policy (a refused record is handed back untouched, so sending it twice is safe).
            Err(_) => Ok(Some(Waiting {
                record,
                position,
                ack,
            })),
        }
    }

    /// The rest of [`Self::process_now`] for a record that may have to wait.
    async fn send_when_ready(&mut self, waiting: Waiting) -> ConnectResult<()> {
        let Waiting {
            record,
            position,
            ack,
        } = waiting;
        if self.known_topics.get(&record.topic).is_none() {
            self.discover_topic(&record.topic).await?;
        }
        match self.produce(&record).await? {
            Ok(delivery) => self.enqueue_produced(record, position, ack, delivery),
            // Refused before it was sent (too large for the producer): settled in poll order
            // like any other refusal.
            Err(error) => {
                let refused = self.refuse(record, error, position.as_ref(), ack.is_some());
                let settled = refused.await_dead_letter().await;
                self.enqueue(position, ack, Outcome::Ready(Some(settled)));
            }
        }
        Ok(())
    }

    fn enqueue_produced(
        &mut self,
        record: Record,
        position: Option<(SourcePartition, SourceOffset)>,
        ack: Option<AckHandle>,
        delivery: DeliveryFuture,
    ) {
        // A listener's acknowledgement names the topic; other records need not keep it.
        let topic = ack.is_some().then_some(record.topic);
        self.enqueue(position, ack, Outcome::Produced { delivery, topic });
    }

    /// Input the source rejected: to the dead-letter topic when there is one, never a task failure.
    fn reject_input(
        &mut self,
        record: Record,
        reason: ConnectError,
        position: Option<(SourcePartition, SourceOffset)>,
        ack: Option<AckHandle>,
    ) -> ConnectResult<()> {
        let verdict = self.errors.reject(
            Stage::TaskPoll,
            &self.connector_class,
            &record,
            Origin::Source(position.as_ref()),
            reason.clone(),
        );
        self.dead_letter(verdict, position, ack, reason)
    }

    fn dead_letter(
        &mut self,
        verdict: Verdict,
        position: Option<(SourcePartition, SourceOffset)>,
        ack: Option<AckHandle>,
        error: ConnectError,
    ) -> ConnectResult<()> {
        match verdict {
            Verdict::Fail(error) => {
                if let Some(ack) = ack {
                    ack.complete(Delivery::Failed {
                        reason: error.to_string(),
                    });
                }
                Err(error)
            }
            Verdict::Skipped => {
                let reason = error.to_string();
                self.enqueue(
                    position,
                    ack,
                    Outcome::Ready(Some(Ok(Delivery::Rejected { reason }))),
                );
                Ok(())
            }
            Verdict::DeadLettered(delivery) => {
                let reason = error.to_string();
                self.enqueue(position, ack, Outcome::DeadLettered { delivery, reason });
                Ok(())
            }
        }
    }

    fn enqueue(
        &mut self,
        position: Option<(SourcePartition, SourceOffset)>,
        ack: Option<AckHandle>,
        outcome: Outcome,
    ) {
        self.in_flight.push_back(InFlight {
            position,
            ack,
            outcome,
            first_failure: None,
        });
    }

    /// Hands a record to the producer, waiting for room when its queue is full. The inner
    /// error is a refusal of this record (too large for the producer); the outer one fails
    /// the task.
    async fn produce(
        &mut self,
        record: &Record,
    ) -> ConnectResult<Result<DeliveryFuture, ConnectError>> {
        loop {
            match self.send(record) {
                Ok(delivery) => return Ok(Ok(delivery)),
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                    // Make room by settling the oldest record in flight.
                    match next_settled(&mut self.in_flight).await {
                        Some(done) => {
                            let settled = Box::pin(self.complete(done)).await;
                            self.publish_counts();
                            settled?
                        }
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err(error) => {
                    let error = produce_error(&error);
                    if error.is_record_error() {
                        return Ok(Err(error));
                    }
                    self.metrics.error(Stage::KafkaProduce.as_str());
                    return Err(ConnectError::fatal(format!(
                        "cannot produce to {}: {error}",
                        record.topic
                    )));
                }
            }
        }
    }

    /// Hands `record` to the producer through its topic's handle. Every record sent was on
    /// a topic this task made sure exists first (a record sent again was sent before).
    fn send(&mut self, record: &Record) -> Result<DeliveryFuture, KafkaError> {
        match self.known_topics.get(&record.topic) {
            Some(topic) => topic.send(record),
            None => Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::UnknownTopic,
            )),
        }
    }

    /// Applies the error policy to a record Kafka refused as bad data (too large, invalid for
    /// its topic). A listener's record never fails the task: its sender is told (dead-letter
    /// topic if there is one, else a rejection). A polling source's record follows
    /// `errors.tolerance`.
    fn refuse(
        &mut self,
        record: Record,
        error: ConnectError,
        position: Option<&(SourcePartition, SourceOffset)>,
        listener: bool,
    ) -> Refusal {
        self.metrics.error(Stage::KafkaProduce.as_str());
        let origin = Origin::Source(position);
        let verdict = if listener {
            self.errors.reject(
                Stage::KafkaProduce,
                "KafkaProducer",
                &record,
                origin,
                error.clone(),
            )
        } else {
            self.errors.report(
                Stage::KafkaProduce,
                "KafkaProducer",
                &record,
                origin,
                error.clone(),
            )
        };
        Refusal { verdict, error }
    }

    async fn discover_topic(&mut self, topic: &str) -> ConnectResult<()> {
        let (partitions, replication) = self.new_topic;
        ensure_topics(
            &self.kafka,
            &[TopicSpec::regular(topic, partitions, replication)],
        )
        .await
        .map_err(|e| ConnectError::retriable(e.to_string()))?;
        let handle = self
            .producer
            .topic(topic)
            .map_err(|e| ConnectError::retriable(format!("cannot produce to {topic}: {e}")))?;
        self.status.topic(topic).await;
        self.known_topics.insert(handle);
        Ok(())
    }

    /// Settles one record in poll order: completes its acknowledgement and, unless an
    /// earlier record failed (`held`), advances its source offset.
    /// Its counts are published by the caller ([`Self::publish_counts`]).
    async fn complete(&mut self, done: Completed) -> ConnectResult<()> {
        let Completed {
            position,
            ack,
            outcome,
            refused,
            first_failure,
        } = done;
        let delivery = match outcome {
            Ok(delivery) => delivery,
            Err(error) => {
                match self
                    .after_failure(
                        error,
                        refused,
                        position.as_ref(),
                        ack.is_some(),
                        first_failure,
                    )
                    .await
                {
                    AfterFailure::Retry(outcome, first_failure) => {
                        // Back in front: nothing behind it settles before it does.
                        self.in_flight.push_front(InFlight {
                            position,
                            ack,
                            outcome,
                            first_failure: Some(first_failure),
                        });
                        return Ok(());
                    }
                    AfterFailure::Settled(delivery) => delivery,
                    AfterFailure::Fail(error) => {
                        self.held = true;
                        if let Some(ack) = ack {
                            ack.complete(Delivery::Failed {
                                reason: error.to_string(),
                            });
                        }
                        return Err(error);
                    }
                }
            }
        };
        if delivery.is_durable() {
            self.durable_unpublished += 1;
        }
        if let Some(ack) = ack {
            ack.complete(delivery);
        }
        if let Some((partition, offset)) = position
            && !self.held
        {
            match self
                .pending_offsets
                .iter_mut()
                .find(|(p, _)| *p == partition)
            {
                Some(entry) => entry.1 = offset,
                None => self.pending_offsets.push((partition, offset)),
            }
            self.uncommitted += 1;
        }
        Ok(())
    }

    /// Decides the fate of a record that was not written.
    async fn after_failure(
        &mut self,
        error: ConnectError,
        refused: Option<OwnedMessage>,
        position: Option<&(SourcePartition, SourceOffset)>,
        listener: bool,
        first_failure: Option<tokio::time::Instant>,
    ) -> AfterFailure {
        if error.is_record_error()
            && let Some(message) = &refused
        {
            let record = record_of(message);
            return match self
                .refuse(record, error, position, listener)
                .await_dead_letter()
                .await
            {
                Ok(delivery) => AfterFailure::Settled(delivery),
                Err(error) => AfterFailure::Fail(error),
            };
        }
        if !error.is_retriable() {
            self.metrics.error(Stage::KafkaProduce.as_str());
            return AfterFailure::Fail(error);
        }
        // Not the record's fault (broker unreachable past `delivery.timeout.ms`): send it again
        // within `errors.retry.timeout`, in its place.
        let first_failure = first_failure.unwrap_or_else(tokio::time::Instant::now);
        let in_time = self
            .errors
            .policy
            .retry_timeout
            .is_none_or(|timeout| first_failure.elapsed() < timeout);
        if in_time && let Some(message) = &refused {
            let record = record_of(message);
            if let Ok(delivery) = self.send(&record) {
                tracing::warn!(connector = %self.connector, %error, "Kafka did not take a record; sending it again");
                let topic = listener.then_some(record.topic);
                return AfterFailure::Retry(Outcome::Produced { delivery, topic }, first_failure);
            }
        }
        self.metrics.error(Stage::KafkaProduce.as_str());
        if listener {
            // The sender gets no positive acknowledgement and sends again; the listener stays.
            tracing::warn!(connector = %self.connector, %error, "record not stored; its sender is told to retry");
            return AfterFailure::Settled(Delivery::Failed {
                reason: error.to_string(),
            });
        }
        // A polling source must not skip it: the task fails with its offset held before it.
        AfterFailure::Fail(error)
    }

    /// Waits (bounded) for every record in flight, settling each. Returns the first failure:
    /// records after it may still be acknowledged to their senders, but no offset passes it.
    pub(super) async fn drain(&mut self, settings: &RunnerSettings) -> ConnectResult<()> {
        let deadline = tokio::time::Instant::now() + settings.shutdown_timeout;
        let mut failure = None;
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, next_settled(&mut self.in_flight)).await {
                Ok(Some(done)) => {
                    let settled = self.complete(done).await;
                    self.publish_counts();
                    if let Err(error) = settled {
                        tracing::warn!(connector = %self.connector, %error, "record not delivered while stopping");
                        failure.get_or_insert(error);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(connector = %self.connector, in_flight = self.in_flight.len(), "stopping before Kafka acknowledged every record; they will be sent again");
                    break;
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }
}
