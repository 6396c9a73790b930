//! The source task runner: poll -> transforms -> produce -> on Kafka's acknowledgement,
//! store the source offset or complete the listener's acknowledgement.
//!
//! Polling runs in its own tokio task so a slow `poll` is never cancelled mid-way (polls are
//! not cancel-safe); backpressure stops polling while `max_in_flight` records await Kafka.
//! Deliveries are awaited in the order records were polled, so a stored offset never runs
//! ahead of an unacknowledged record.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use medconnect_api::{
    AckHandle, ConnectError, ConnectResult, Delivery, Record, SourceConnector, SourceOffset,
    SourcePartition, SourceRecord, SourceTask, SourceTaskContext,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::errors::{
    DeadLetterResult, ErrorReporter, Origin, Stage, Verdict, dead_letter_result, refuses_the_record,
};
use super::lifecycle::{panic_message, start_with_retries, stop_in_time};
use super::{RunState, RunnerSettings, StatusReporter};
use crate::kafka::{KafkaSettings, TopicSpec, ensure_topics, record_of};
use crate::metrics::TaskMetrics;
use crate::store::{ConnectorState, OffsetStore};
use crate::transform::TransformChain;

/// Everything a source task runner needs, assembled by the herder.
pub struct SourceTaskSpec {
    pub connector: String,
    pub connector_class: String,
    pub task_id: u32,
    /// Creates the task from `context` when the runner starts.
    pub plugin: Arc<dyn SourceConnector>,
    pub context: SourceTaskContext,
    pub transforms: TransformChain,
    pub errors: ErrorReporter,
    pub producer: FutureProducer,
    pub offsets: Arc<OffsetStore>,
    pub kafka: KafkaSettings,
    /// Partitions and replication factor of topics the task creates.
    pub new_topic: (i32, i32),
    pub status: StatusReporter,
    pub metrics: TaskMetrics,
    pub settings: RunnerSettings,
}

/// How a record in flight will be settled. No boxed future per record: this is the hot path.
enum Outcome {
    /// Settled already (filtered, skipped); taken once.
    Ready(Option<ConnectResult<Delivery>>),
    /// Awaiting Kafka's acknowledgement; the topic is kept only when a listener awaits the ack.
    Produced {
        delivery: DeliveryFuture,
        topic: Option<String>,
    },
    /// Awaiting the dead-letter write of a rejected record.
    DeadLettered {
        delivery: DeliveryFuture,
        reason: String,
    },
}

/// A record in flight; resolves to its fate. Kept in poll order by `FuturesOrdered`.
struct InFlight {
    position: Option<(SourcePartition, SourceOffset)>,
    ack: Option<AckHandle>,
    outcome: Outcome,
    /// When Kafka first refused this record, for retries within `errors.retry.timeout`.
    first_failure: Option<tokio::time::Instant>,
}

impl Future for InFlight {
    type Output = Completed;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completed> {
        let this = self.get_mut();
        let mut refused = None;
        let outcome = match &mut this.outcome {
            Outcome::Ready(result) => result
                .take()
                .unwrap_or_else(|| Err(ConnectError::fatal("a settled record was polled again"))),
            Outcome::Produced { delivery, topic } => match Pin::new(delivery).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Ok(d))) => Ok(Delivery::Written {
                    topic: topic.take().unwrap_or_default(),
                    partition: d.partition,
                    offset: d.offset,
                }),
                Poll::Ready(Ok(Err((error, message)))) => {
                    refused = Some(message);
                    Err(produce_error(&error))
                }
                Poll::Ready(Err(_)) => Err(ConnectError::retriable("the producer was closed")),
            },
            Outcome::DeadLettered { delivery, reason } => match Pin::new(delivery).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(answer) => dead_lettered(answer, std::mem::take(reason)),
            },
        };
        Poll::Ready(Completed {
            position: this.position.take(),
            ack: this.ack.take(),
            outcome,
            refused,
            first_failure: this.first_failure,
        })
    }
}

/// A record whose fate is known, in poll order.
struct Completed {
    position: Option<(SourcePartition, SourceOffset)>,
    ack: Option<AckHandle>,
    outcome: Result<Delivery, ConnectError>,
    /// The record as Kafka gave it back when it refused it: to retry or dead-letter it.
    refused: Option<OwnedMessage>,
    first_failure: Option<tokio::time::Instant>,
}

/// A record's delivery once its dead-letter write was answered.
fn dead_lettered(
    answer: Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
    reason: String,
) -> ConnectResult<Delivery> {
    Ok(match dead_letter_result(answer)? {
        DeadLetterResult::Written => Delivery::DeadLettered { reason },
        DeadLetterResult::Refused(why) => Delivery::Rejected {
            reason: format!("{reason}; the dead-letter topic refused it too: {why}"),
        },
    })
}

/// What Kafka's refusal of a record means. A record too large or invalid for its topic is bad
/// data (that record fails: dead-letter topic, or a negative acknowledgement to its sender);
/// anything else (broker unreachable past `delivery.timeout.ms`, ...) is not the record's fault
/// and is never skipped silently.
fn produce_error(error: &KafkaError) -> ConnectError {
    if refuses_the_record(error) {
        ConnectError::data(format!("Kafka refused the record: {error}"))
    } else {
        ConnectError::retriable(format!("Kafka did not take the record: {error}"))
    }
}

/// In-flight count shared with the poller, which waits while it is at the limit.
struct Capacity {
    in_flight: AtomicUsize,
    max: usize,
    freed: Notify,
}

impl Capacity {
    async fn wait(&self) {
        loop {
            let freed = self.freed.notified();
            if self.in_flight.load(Ordering::Acquire) < self.max {
                return;
            }
            freed.await;
        }
    }
}

type Batch = ConnectResult<Vec<SourceRecord>>;

pub struct SourceRunner;

impl SourceRunner {
    /// Runs until `stop` is cancelled or the task fails; then delivers what it holds, stores
    /// offsets, and stops the task.
    pub async fn run(
        spec: SourceTaskSpec,
        run_state: watch::Receiver<RunState>,
        stop: CancellationToken,
    ) {
        let SourceTaskSpec {
            connector,
            connector_class,
            task_id,
            plugin,
            context,
            transforms,
            errors,
            producer,
            offsets,
            kafka,
            new_topic,
            status,
            metrics,
            settings,
        } = spec;
        let mut task = match plugin.create_task(context) {
            Ok(task) => task,
            Err(error) => {
                status.failed(&error).await;
                return;
            }
        };
        if let Err(error) = start_with_retries(task.as_mut(), &errors.policy, &stop).await {
            status.failed(&error).await;
            return;
        }
        if stop.is_cancelled() {
            stop_in_time(
                task.as_mut(),
                &connector,
                task_id,
                settings.shutdown_timeout,
            )
            .await;
            return;
        }
        status.report(ConnectorState::Running, None).await;
        let capacity = Arc::new(Capacity {
            in_flight: AtomicUsize::new(0),
            max: settings.max_in_flight.max(1),
            freed: Notify::new(),
        });
        let (batches_tx, batches) = mpsc::channel::<Batch>(1);
        let stop_polling = stop.child_token();
        let stored = Arc::new(StoredOffsets::default());
        let poller = tokio::spawn(poll_loop(
            task,
            batches_tx,
            run_state,
            capacity.clone(),
            stop_polling.clone(),
            stored.clone(),
            errors.policy.clone(),
        ));
        let mut pipeline = Pipeline {
            connector,
            connector_class,
            transforms,
            errors,
            producer,
            offsets,
            kafka,
            new_topic,
            status: status.clone(),
            metrics,
            capacity,
            in_flight: VecDeque::new(),
            pending_offsets: Vec::new(),
            uncommitted: 0,
            committing: None,
            known_topics: HashSet::new(),
            held: false,
        };
        let mut failure = pipeline.run(batches, &stop, &stored, &settings).await;

        // Stop polling, then deliver what was already polled and store its offsets (never
        // past a record that failed: `held`).
        stop_polling.cancel();
        let task = poller.await;
        if let Err(error) = pipeline.drain(&settings).await {
            failure.get_or_insert(error);
        }
        pipeline.store_offsets_now(&stored, &settings).await;
        match task {
            Ok(mut task) => {
                let last = stored.take();
                if !last.is_empty()
                    && let Err(error) = task.commit(&last).await
                {
                    tracing::warn!(connector = %pipeline.connector, task = task_id, %error, "commit failed while stopping");
                }
                stop_in_time(
                    task.as_mut(),
                    &pipeline.connector,
                    task_id,
                    settings.shutdown_timeout,
                )
                .await;
            }
            Err(error) => {
                // The poller panicked (or was aborted): the task is dead, whatever else happened.
                tracing::error!(connector = %pipeline.connector, task = task_id, %error, "poller ended abnormally");
                failure.get_or_insert(ConnectError::fatal(format!(
                    "the source task's poll ended abnormally: {}",
                    panic_message(error)
                )));
            }
        }
        pipeline.transforms.close();
        if let Some(error) = failure {
            status.failed(&error).await;
        }
        pipeline.metrics.remove();
    }
}

async fn poll_loop(
    mut task: Box<dyn SourceTask>,
    batches: mpsc::Sender<Batch>,
    mut run_state: watch::Receiver<RunState>,
    capacity: Arc<Capacity>,
    stop: CancellationToken,
    stored: Arc<StoredOffsets>,
    policy: super::errors::ErrorPolicy,
) -> Box<dyn SourceTask> {
    let mut backoff = Duration::from_millis(100);
    loop {
        if stop.is_cancelled() {
            break;
        }
        let newly_stored = stored.take();
        if !newly_stored.is_empty()
            && let Err(error) = task.commit(&newly_stored).await
        {
            tracing::warn!(%error, "source task commit failed");
        }
        if *run_state.borrow_and_update() == RunState::Paused {
            tokio::select! {
                _ = run_state.changed() => continue,
                _ = stop.cancelled() => break,
            }
        }
        tokio::select! {
            _ = capacity.wait() => {}
            _ = stop.cancelled() => break,
        }
        let polled = tokio::select! {
            polled = task.poll() => polled,
            _ = stop.cancelled() => break,
        };
        let batch = match polled {
            Ok(records) if records.is_empty() => continue,
            Ok(records) => {
                backoff = Duration::from_millis(100);
                Ok(records)
            }
            Err(error) if error.is_retriable() => {
                // A source that cannot reach its peer retries for as long as it runs.
                tracing::warn!(%error, ?backoff, "poll failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(policy.retry_delay_max);
                continue;
            }
            Err(error) => Err(error),
        };
        let failed = batch.is_err();
        tokio::select! {
            sent = batches.send(batch) => if sent.is_err() { break },
            _ = stop.cancelled() => break,
        }
        if failed {
            break;
        }
    }
    task
}

/// Waits for the oldest record in flight to settle and takes it.
fn next_settled(
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

/// Waits for the offset write under way (never ready when there is none).
fn offset_write(
    committing: &mut Option<tokio::task::JoinHandle<OffsetWrite>>,
) -> impl Future<Output = Result<OffsetWrite, tokio::task::JoinError>> + '_ {
    std::future::poll_fn(move |cx| match committing {
        Some(write) => Pin::new(write).poll(cx),
        None => Poll::Pending,
    })
}

struct Pipeline {
    connector: String,
    /// Named in dead-letter headers for input the source itself rejected.
    connector_class: String,
    transforms: TransformChain,
    errors: ErrorReporter,
    producer: FutureProducer,
    offsets: Arc<OffsetStore>,
    kafka: KafkaSettings,
    new_topic: (i32, i32),
    status: StatusReporter,
    metrics: TaskMetrics,
    capacity: Arc<Capacity>,
    /// Records in poll order. Only the oldest is awaited: Kafka acknowledges a partition's
    /// records in order, and offsets must be stored in poll order anyway.
    in_flight: VecDeque<InFlight>,
    /// Offsets acknowledged and not yet stored, one per partition (sources have few).
    pending_offsets: Vec<(SourcePartition, SourceOffset)>,
    uncommitted: i64,
    /// The offset write under way, if any. It runs beside the pipeline: the offset topic
    /// being slow or unreachable must not stop records from being settled (a listener's
    /// sender waits for its answer meanwhile).
    committing: Option<tokio::task::JoinHandle<OffsetWrite>>,
    known_topics: HashSet<String>,
    /// Set once a record with a source position failed without being tolerated: no offset
    /// is stored past it, even for later records Kafka did take, so a restart polls it again.
    held: bool,
}

impl Pipeline {
    /// The main loop; returns the error that failed the task, if any.
    async fn run(
        &mut self,
        mut batches: mpsc::Receiver<Batch>,
        stop: &CancellationToken,
        stored: &StoredOffsets,
        settings: &RunnerSettings,
    ) -> Option<ConnectError> {
        let mut flush = tokio::time::interval(settings.offset_flush_interval);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                Some(done) = next_settled(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    if let Err(error) = self.complete(done).await {
                        return Some(error);
                    }
                }
                batch = batches.recv() => match batch {
                    Some(Ok(records)) => {
                        if let Err(error) = self.process(records).await {
                            return Some(error);
                        }
                    }
                    Some(Err(error)) => {
                        self.metrics.error(Stage::TaskPoll.as_str());
                        return Some(error);
                    }
                    // The poller stopped without an error: the worker is stopping.
                    None => return None,
                },
                _ = flush.tick() => self.start_offset_write(),
                written = offset_write(&mut self.committing), if self.committing.is_some() => {
                    self.committing = None;
                    self.finish_offset_write(written, stored);
                }
            }
        }
    }

    async fn process(&mut self, records: Vec<SourceRecord>) -> ConnectResult<()> {
        self.metrics.records_in(records.len() as u64);
        for source in records {
            self.process_one(source).await?;
        }
        self.metrics.set_in_flight(self.in_flight.len() as i64);
        Ok(())
    }

    async fn process_one(&mut self, source: SourceRecord) -> ConnectResult<()> {
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
            return self.reject_input(record, reason, position, ack);
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
                return Ok(());
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
                return self.dead_letter(verdict, position, ack, failure.error);
            }
        };
        if !self.known_topics.contains(&record.topic) {
            self.discover_topic(&record.topic).await?;
        }
        match self.produce(&record).await? {
            Ok(delivery) => {
                let topic = ack.is_some().then_some(record.topic);
                self.enqueue(position, ack, Outcome::Produced { delivery, topic });
            }
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
        self.capacity.in_flight.fetch_add(1, Ordering::AcqRel);
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
                        Some(done) => Box::pin(self.complete(done)).await?,
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

    fn send(&self, record: &Record) -> Result<DeliveryFuture, KafkaError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in record.headers.iter() {
            headers = headers.insert(Header {
                key,
                value: value.map(|v| v.as_ref()),
            });
        }
        let mut message: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&record.topic).headers(headers);
        if let Some(key) = record.key.as_deref() {
            message = message.key(key);
        }
        if let Some(value) = record.value.as_deref() {
            message = message.payload(value);
        }
        if let Some(partition) = record.partition {
            message = message.partition(partition);
        }
        if let Some(timestamp) = record.timestamp {
            message = message.timestamp(timestamp);
        }
        self.producer
            .send_result(message)
            .map_err(|(error, _)| error)
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
        self.status.topic(topic).await;
        self.known_topics.insert(topic.to_string());
        Ok(())
    }

    /// Settles one record in poll order: completes its acknowledgement and, unless an
    /// earlier record failed (`held`), advances its source offset.
    async fn complete(&mut self, done: Completed) -> ConnectResult<()> {
        self.capacity.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.capacity.freed.notify_one();
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
                        self.capacity.in_flight.fetch_add(1, Ordering::AcqRel);
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
            self.metrics.records_out(1);
        }
        self.metrics.set_in_flight(self.in_flight.len() as i64);
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
            self.metrics.set_commit_lag(self.uncommitted);
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
    async fn drain(&mut self, settings: &RunnerSettings) -> ConnectResult<()> {
        let deadline = tokio::time::Instant::now() + settings.shutdown_timeout;
        let mut failure = None;
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, next_settled(&mut self.in_flight)).await {
                Ok(Some(done)) => {
                    if let Err(error) = self.complete(done).await {
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

    /// Starts storing the acknowledged offsets, unless a write is under way already.
    fn start_offset_write(&mut self) {
        if self.committing.is_some() || self.pending_offsets.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.pending_offsets);
        let settled = std::mem::take(&mut self.uncommitted);
        let offsets = self.offsets.clone();
        let connector = self.connector.clone();
        self.committing = Some(tokio::spawn(async move {
            let write: Vec<_> = batch
                .iter()
                .map(|(p, o)| (p.clone(), Some(o.clone())))
                .collect();
            let result = offsets.write(&connector, write).await;
            OffsetWrite {
                batch,
                settled,
                result,
            }
        }));
    }

    /// Hands what was stored to the task's next `commit`; a failed write is tried again
    /// with the next one (positions settled since then win).
    fn finish_offset_write(
        &mut self,
        written: Result<OffsetWrite, tokio::task::JoinError>,
        stored: &StoredOffsets,
    ) {
        match written {
            Ok(OffsetWrite {
                batch,
                result: Ok(()),
                ..
            }) => {
                stored.add(batch);
                self.metrics.committed();
            }
            Ok(OffsetWrite {
                batch,
                settled,
                result: Err(error),
            }) => {
                tracing::warn!(connector = %self.connector, %error, "cannot store offsets; will retry");
                for (partition, offset) in batch {
                    if !self.pending_offsets.iter().any(|(p, _)| *p == partition) {
                        self.pending_offsets.push((partition, offset));
                    }
                }
                self.uncommitted += settled;
            }
            // Its positions are settled again by later records, or polled again after a restart.
            Err(error) => {
                tracing::error!(connector = %self.connector, %error, "offset write ended abnormally")
            }
        }
        self.metrics.set_commit_lag(self.uncommitted);
    }

    /// Stores every acknowledged offset before the task stops (bounded by the shutdown
    /// timeout): the write under way, then what was settled since.
    async fn store_offsets_now(&mut self, stored: &StoredOffsets, settings: &RunnerSettings) {
        let deadline = tokio::time::Instant::now() + settings.shutdown_timeout;
        for _ in 0..2 {
            if self.committing.is_none() {
                self.start_offset_write();
            }
            let Some(write) = self.committing.take() else {
                return;
            };
            match tokio::time::timeout_at(deadline, write).await {
                Ok(written) => self.finish_offset_write(written, stored),
                Err(_) => {
                    tracing::warn!(connector = %self.connector, "offsets not stored before the shutdown timeout; their records will be sent again");
                    return;
                }
            }
        }
    }
}

/// The result of one offset write, with what it wrote.
struct OffsetWrite {
    batch: Vec<(SourcePartition, SourceOffset)>,
    /// Records settled into this batch, for the commit-lag metric.
    settled: i64,
    result: Result<(), crate::store::StoreError>,
}

/// What becomes of a record that was not written.
enum AfterFailure {
    /// Sent again; settles in the same place.
    Retry(Outcome, tokio::time::Instant),
    /// Settled without failing the task (dead-lettered, skipped, or its sender told).
    Settled(Delivery),
    /// The task fails; no offset passes this record.
    Fail(ConnectError),
}

/// The error policy's answer for a refused record, before its dead-letter write is confirmed.
struct Refusal {
    verdict: Verdict,
    error: ConnectError,
}

impl Refusal {
    /// The record's delivery once the dead-letter topic has it (or it was skipped), or the
    /// error that fails the task.
    async fn await_dead_letter(self) -> ConnectResult<Delivery> {
        let reason = self.error.to_string();
        match self.verdict {
            Verdict::Fail(error) => Err(error),
            Verdict::Skipped => Ok(Delivery::Rejected { reason }),
            Verdict::DeadLettered(delivery) => dead_lettered(delivery.await, reason),
        }
    }
}

/// Offsets stored in the offset topic and not yet handed to the task's `commit`: the latest
/// per source partition. Shared with the poller, which owns the task.
#[derive(Default)]
struct StoredOffsets(std::sync::Mutex<Vec<(SourcePartition, SourceOffset)>>);

impl StoredOffsets {
    fn add(&self, batch: Vec<(SourcePartition, SourceOffset)>) {
        let mut stored = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (partition, offset) in batch {
            match stored.iter_mut().find(|(p, _)| *p == partition) {
                Some(entry) => entry.1 = offset,
                None => stored.push((partition, offset)),
            }
        }
    }

    fn take(&self) -> Vec<(SourcePartition, SourceOffset)> {
        std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}
