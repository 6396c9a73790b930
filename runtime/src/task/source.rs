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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use medconnect_api::{
    AckHandle, ConnectError, ConnectResult, Delivery, Record, SourceOffset, SourcePartition,
    SourceRecord, SourceTask, SourceTaskContext,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::errors::{ErrorReporter, Origin, Stage, Verdict};
use super::{RunState, RunnerSettings, StatusReporter};
use crate::kafka::{KafkaSettings, TopicSpec, ensure_topics};
use crate::metrics::TaskMetrics;
use crate::store::{ConnectorState, OffsetStore};
use crate::transform::TransformChain;

/// Everything a source task runner needs, assembled by the herder.
pub struct SourceTaskSpec {
    pub connector: String,
    pub connector_class: String,
    pub task_id: u32,
    pub task: Box<dyn SourceTask>,
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
}

impl Future for InFlight {
    type Output = Completed;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completed> {
        let this = self.get_mut();
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
                Poll::Ready(Ok(Err((error, _)))) => Err(ConnectError::retriable(format!(
                    "Kafka did not take the record: {error}"
                ))),
                Poll::Ready(Err(_)) => Err(ConnectError::retriable("the producer was closed")),
            },
            Outcome::DeadLettered { delivery, reason } => match Pin::new(delivery).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Ok(_))) => Ok(Delivery::DeadLettered {
                    reason: std::mem::take(reason),
                }),
                Poll::Ready(_) => Err(ConnectError::fatal(format!(
                    "dead-letter write failed for a record rejected with: {reason}"
                ))),
            },
        };
        Poll::Ready(Completed {
            position: this.position.take(),
            ack: this.ack.take(),
            outcome,
        })
    }
}

/// A record whose fate is known, in poll order.
struct Completed {
    position: Option<(SourcePartition, SourceOffset)>,
    ack: Option<AckHandle>,
    outcome: Result<Delivery, ConnectError>,
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
            mut task,
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
        if let Err(error) = task.start(context).await {
            status.failed(&error).await;
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
        let commit_requested = Arc::new(AtomicBool::new(false));
        let poller = tokio::spawn(poll_loop(
            task,
            batches_tx,
            run_state,
            capacity.clone(),
            stop_polling.clone(),
            commit_requested.clone(),
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
            known_topics: HashSet::new(),
        };
        let failure = pipeline
            .run(batches, &stop, &commit_requested, &settings)
            .await;

        // Stop polling, then deliver what was already polled and store its offsets.
        stop_polling.cancel();
        let task = poller.await;
        pipeline.drain(&settings).await;
        pipeline.commit_offsets().await;
        match task {
            Ok(mut task) => {
                if failure.is_none()
                    && let Err(error) = task.commit().await
                {
                    tracing::warn!(connector = %pipeline.connector, task = task_id, %error, "commit failed while stopping");
                }
                if let Err(error) = task.stop().await {
                    tracing::warn!(connector = %pipeline.connector, task = task_id, %error, "task did not stop cleanly");
                }
            }
            Err(error) => {
                tracing::error!(connector = %pipeline.connector, task = task_id, %error, "poller ended abnormally")
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
    commit_requested: Arc<AtomicBool>,
    policy: super::errors::ErrorPolicy,
) -> Box<dyn SourceTask> {
    let mut backoff = Duration::from_millis(100);
    loop {
        if stop.is_cancelled() {
            break;
        }
        if commit_requested.swap(false, Ordering::AcqRel)
            && let Err(error) = task.commit().await
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
    known_topics: HashSet<String>,
}

impl Pipeline {
    /// The main loop; returns the error that failed the task, if any.
    async fn run(
        &mut self,
        mut batches: mpsc::Receiver<Batch>,
        stop: &CancellationToken,
        commit_requested: &AtomicBool,
        settings: &RunnerSettings,
    ) -> Option<ConnectError> {
        let mut flush = tokio::time::interval(settings.offset_flush_interval);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                Some(done) = next_settled(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    if let Err(error) = self.complete(done) {
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
                _ = flush.tick() => {
                    if self.commit_offsets().await {
                        commit_requested.store(true, Ordering::Release);
                    }
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
        let delivery = self.produce(&record).await?;
        let topic = ack.is_some().then_some(record.topic);
        self.enqueue(position, ack, Outcome::Produced { delivery, topic });
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
                    Outcome::Ready(Some(Ok(Delivery::Failed { reason }))),
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
        });
    }

    /// Hands a record to the producer, waiting for room when its queue is full.
    async fn produce(&mut self, record: &Record) -> ConnectResult<DeliveryFuture> {
        loop {
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
            match self.producer.send_result(message) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Make room by settling the oldest record in flight.
                    match next_settled(&mut self.in_flight).await {
                        Some(done) => self.complete(done)?,
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((error, _)) => {
                    self.metrics.error(Stage::KafkaProduce.as_str());
                    return Err(ConnectError::fatal(format!(
                        "cannot produce to {}: {error}",
                        record.topic
                    )));
                }
            }
        }
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

    /// Settles one record in poll order.
    fn complete(&mut self, done: Completed) -> ConnectResult<()> {
        self.capacity.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.capacity.freed.notify_one();
        let Completed {
            position,
            ack,
            outcome,
        } = done;
        let delivery = match outcome {
            Ok(delivery) => delivery,
            Err(error)
                if self.errors.policy.tolerate_all && !matches!(error, ConnectError::Fatal(_)) =>
            {
                // Tolerated (KIP-779): the record is skipped; a listener's sender is not
                // acknowledged and will retransmit.
                self.metrics.error(Stage::KafkaProduce.as_str());
                tracing::warn!(connector = %self.connector, %error, "record not delivered; skipped per errors.tolerance=all");
                Delivery::Failed {
                    reason: error.to_string(),
                }
            }
            Err(error) => {
                self.metrics.error(Stage::KafkaProduce.as_str());
                if let Some(ack) = ack {
                    ack.complete(Delivery::Failed {
                        reason: error.to_string(),
                    });
                }
                return Err(error);
            }
        };
        if delivery.is_durable() {
            self.metrics.records_out(1);
        }
        self.metrics.set_in_flight(self.in_flight.len() as i64);
        if let Some(ack) = ack {
            ack.complete(delivery);
        }
        if let Some((partition, offset)) = position {
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

    /// Waits (bounded) for every record in flight, settling each.
    async fn drain(&mut self, settings: &RunnerSettings) {
        let deadline = tokio::time::Instant::now() + settings.shutdown_timeout;
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, next_settled(&mut self.in_flight)).await {
                Ok(Some(done)) => {
                    if let Err(error) = self.complete(done) {
                        tracing::warn!(connector = %self.connector, %error, "record not delivered while stopping");
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(connector = %self.connector, in_flight = self.in_flight.len(), "stopping before Kafka acknowledged every record; they will be sent again");
                    break;
                }
            }
        }
    }

    /// Stores acknowledged offsets; returns whether anything was stored.
    async fn commit_offsets(&mut self) -> bool {
        if self.pending_offsets.is_empty() {
            return false;
        }
        let batch: Vec<_> = self
            .pending_offsets
            .iter()
            .map(|(p, o)| (p.clone(), Some(o.clone())))
            .collect();
        match self.offsets.write(&self.connector, batch).await {
            Ok(()) => {
                self.pending_offsets.clear();
                self.uncommitted = 0;
                self.metrics.set_commit_lag(0);
                self.metrics.committed();
                true
            }
            Err(error) => {
                tracing::warn!(connector = %self.connector, %error, "cannot store offsets; will retry");
                false
            }
        }
    }
}
