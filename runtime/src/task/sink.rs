//! The sink task runner: consumer group `connect-<name>` -> transforms -> `put` -> `flush`
//! -> commit consumer offsets. Offsets are committed only after the sink flushed the records
//! (and any dead-letter writes were acknowledged), so a crash redelivers, never loses.
//!
//! Partition assignment is the runner's, not the consumer's: all tasks of a sink share the
//! group `connect-<name>`, so a partition revoked from one task is read next by another from
//! the last committed offset. The consumer's rebalance callback (run inside `recv`) therefore
//! does not (un)assign; it hands the change to the runner, which commits what the task
//! accepted for revoked partitions, calls the task's `close`, and only then unassigns them
//! (librdkafka waits for that call before the group moves on); for assigned partitions it
//! assigns them and calls the task's `open` before any of their records is read.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use futures::future::Shared;
use medconnect_api::{
    ConnectError, ConnectResult, ErrantRecordHandler, ErrantRecordReporter, ErrantReport,
    PartitionControl, SinkConnector, SinkOffsets, SinkPartitions, SinkRecord, SinkTask,
    SinkTaskContext, TaskConfig, TopicPartition,
};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::errors::{ErrorReporter, Origin, Stage, Verdict, dead_letter_result};
use super::lifecycle::{start_with_retries, stop_in_time};
use super::{RunState, RunnerSettings, StatusReporter};
use crate::kafka::record_of;
use crate::kafka::{KafkaSettings, KafkaSetupError};
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
    /// Creates the task when the runner starts, from a context the runner builds.
    pub plugin: Arc<dyn SinkConnector>,
    /// The task's resolved settings; the runner builds the task's context around them.
    pub config: TaskConfig,
    pub subscription: Subscription,
    pub consumer: SinkConsumer,
    pub transforms: TransformChain,
    pub errors: ErrorReporter,
    pub status: StatusReporter,
    pub metrics: TaskMetrics,
    pub settings: RunnerSettings,
}

/// A change of the task's partitions, handed from the consumer's rebalance callback to the
/// runner, which (un)assigns them once it dealt with them.
#[derive(Debug)]
enum Rebalance {
    Assign(Vec<TopicPartition>),
    Revoke(Vec<TopicPartition>),
}

/// The consumer's context: forwards rebalances to the runner while it handles them, and
/// applies them itself (as rdkafka's default does) once the runner stopped listening, e.g.
/// while the consumer closes.
pub struct RebalanceContext {
    runner: Mutex<Option<mpsc::UnboundedSender<Rebalance>>>,
}

impl RebalanceContext {
    /// From now on rebalances are applied at once, without the runner.
    fn detach(&self) {
        lock(&self.runner).take();
    }
}

impl ClientContext for RebalanceContext {}

/// Detaches the runner from the consumer's rebalances when dropped: a runner dropped midway
/// (a panic, a run abandoned at shutdown) must not leave the consumer's close waiting for an
/// unassignment nobody will make (`BaseConsumer`'s drop polls until the group is left).
struct Detach(Arc<RebalanceContext>);

impl Drop for Detach {
    fn drop(&mut self) {
        self.0.detach();
    }
}

impl ConsumerContext for RebalanceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions = partitions_of(tpl);
        let event = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(partitions),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(partitions),
            other => {
                // rdkafka calls this only for assignments and revocations.
                tracing::warn!(error = ?other, "unexpected rebalance event");
                return;
            }
        };
        let event = match lock(&self.runner).as_ref() {
            Some(runner) => match runner.send(event) {
                Ok(()) => return,
                Err(mpsc::error::SendError(event)) => event,
            },
            None => event,
        };
        let applied = match event {
            Rebalance::Assign(_) => assign(consumer, tpl),
            Rebalance::Revoke(_) => unassign(consumer, tpl),
        };
        if let Err(error) = applied {
            tracing::warn!(%error, "cannot apply a rebalance");
        }
    }
}

/// Assigns partitions the way the group's rebalance protocol requires.
fn assign<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    partitions: &TopicPartitionList,
) -> KafkaResult<()> {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => consumer.incremental_assign(partitions),
        _ => consumer.assign(partitions),
    }
}

/// Unassigns revoked partitions: only those under the cooperative protocol, all of them under
/// the eager one (which always revokes the whole assignment).
fn unassign<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    partitions: &TopicPartitionList,
) -> KafkaResult<()> {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => consumer.incremental_unassign(partitions),
        _ => consumer.unassign(),
    }
}

fn protocol_name<C: ConsumerContext>(consumer: &impl Consumer<C>) -> &'static str {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => "cooperative",
        RebalanceProtocol::Eager => "eager",
        RebalanceProtocol::None => "none",
    }
}

fn partitions_of(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

type GroupConsumer = StreamConsumer<RebalanceContext>;

/// A sink task's group consumer, with the rebalances it hands to the runner.
pub struct SinkConsumer {
    consumer: GroupConsumer,
    rebalances: mpsc::UnboundedReceiver<Rebalance>,
}

impl SinkConsumer {
    pub fn create(
        kafka: &KafkaSettings,
        group_id: Option<&str>,
        overrides: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, KafkaSetupError> {
        let (runner, rebalances) = mpsc::unbounded_channel();
        let context = RebalanceContext {
            runner: Mutex::new(Some(runner)),
        };
        let consumer = kafka.stream_consumer_with(group_id, overrides, context)?;
        Ok(Self {
            consumer,
            rebalances,
        })
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
            plugin,
            config,
            subscription,
            consumer,
            transforms,
            errors,
            status,
            metrics,
            settings,
        } = spec;
        let errors = Arc::new(errors);
        let errant = Arc::new(ErrantRecords::new(errors.clone()));
        let SinkConsumer {
            consumer,
            rebalances,
        } = consumer;
        let consumer = Arc::new(consumer);
        // Locals drop in reverse order, so this one before `consumer` (the last reference to
        // the consumer until `Sink` owns it; there it is the first field, dropped first).
        let detach = Detach(consumer.context().clone());
        let partitions = Arc::new(ConsumerPartitions {
            consumer: consumer.clone(),
            paused_by_task: Mutex::new(BTreeSet::new()),
        });
        let context = SinkTaskContext {
            connector_name: connector.clone(),
            task_id,
            config,
            errant_records: ErrantRecordReporter::new(errant.clone()),
            partitions: SinkPartitions::new(partitions.clone()),
        };
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
        let subscribed = match &subscription {
            Subscription::Topics(topics) => {
                let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                consumer.subscribe(&names)
            }
            Subscription::Regex(regex) => consumer.subscribe(&[&format!("^{regex}")]),
        };
        if let Err(error) = subscribed {
            consumer.context().detach();
            status.failed(&format!("cannot subscribe: {error}")).await;
            stop_in_time(
                task.as_mut(),
                &connector,
                task_id,
                settings.shutdown_timeout,
            )
            .await;
            return;
        }
        if let Subscription::Topics(topics) = &subscription {
            for topic in topics {
                status.topic(topic).await;
            }
        }
        status.report(ConnectorState::Running, None).await;
        let mut sink = Sink {
            _detach: detach,
            connector,
            task,
            consumer,
            partitions,
            transforms,
            errors,
            errant,
            metrics,
            positions: HashMap::new(),
            uncommitted: 0,
            stop: stop.clone(),
            shutdown_timeout: settings.shutdown_timeout,
            rebalances,
            open: BTreeSet::new(),
            paused: false,
        };
        let mut failure = sink.run(run_state, &settings).await;
        // Rebalances from here on (the consumer's close revokes everything) are applied by the
        // consumer itself; those already handed over are handled here, since librdkafka waits
        // for their (un)assignment.
        sink.consumer.context().detach();
        while let Ok(event) = sink.rebalances.try_recv() {
            let handled = match event {
                // Partitions the task would close at once: assigned for the group's sake only.
                Rebalance::Assign(partitions) => assign(
                    sink.consumer.as_ref(),
                    &ConsumerPartitions::list(&partitions),
                )
                .map_err(|e| ConnectError::fatal(format!("cannot assign partitions: {e}"))),
                revoke => sink.rebalance(revoke, failure.is_none()).await,
            };
            if let Err(error) = handled {
                failure.get_or_insert(error);
            }
        }
        if failure.is_none()
            && let Err(error) = sink.flush_and_commit().await
        {
            tracing::warn!(connector = %sink.connector, task = task_id, %error, "final flush failed; records will be redelivered");
            failure = Some(error);
        }
        let open: Vec<TopicPartition> = std::mem::take(&mut sink.open).into_iter().collect();
        if let Err(error) = sink.close(&open).await {
            tracing::warn!(connector = %sink.connector, task = task_id, %error, "sink task did not close its partitions cleanly");
        }
        stop_in_time(
            sink.task.as_mut(),
            &sink.connector,
            task_id,
            settings.shutdown_timeout,
        )
        .await;
        sink.transforms.close();
        sink.consumer.unsubscribe();
        if let Some(error) = failure {
            status.failed(&error).await;
        }
        sink.metrics.remove();
    }
}

/// Runs one of the task's calls (`put`, `flush`) for as long as it takes while the task runs,
/// and for at most `grace` once it is asked to stop: a stuck peer cannot hold a stopping task.
async fn bounded<T>(
    what: &str,
    call: impl Future<Output = ConnectResult<T>>,
    stop: &CancellationToken,
    grace: Duration,
) -> ConnectResult<T> {
    tokio::pin!(call);
    tokio::select! {
        result = &mut call => return result,
        _ = stop.cancelled() => {}
    }
    tokio::time::timeout(grace, call).await.unwrap_or_else(|_| {
        Err(ConnectError::fatal(format!(
            "the sink task's {what} did not return within {grace:?} of the request to stop; its records will be redelivered"
        )))
    })
}

/// Errant records reported by the task or the runner: the error policy is applied when they
/// are reported, and every dead-letter write is awaited before offsets are committed.
struct ErrantRecords {
    errors: Arc<ErrorReporter>,
    /// Dead-letter writes not yet confirmed (shared: the reporting task may await them too).
    outstanding: Mutex<Vec<Shared<ErrantReport>>>,
    /// The first error that was not tolerated: the task fails with it.
    failure: Mutex<Option<ConnectError>>,
}

impl ErrantRecords {
    fn new(errors: Arc<ErrorReporter>) -> Self {
        Self {
            errors,
            outstanding: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
        }
    }

    fn apply(
        &self,
        stage: Stage,
        class: &str,
        record: &SinkRecord,
        error: ConnectError,
    ) -> ErrantReport {
        let origin = Origin::Kafka {
            topic: &record.record.topic,
            partition: record.kafka_partition,
            offset: record.kafka_offset,
        };
        let report: ErrantReport =
            match self
                .errors
                .report(stage, class, &record.record, origin, error)
            {
                Verdict::Fail(error) => {
                    lock(&self.failure).get_or_insert_with(|| error.clone());
                    Box::pin(std::future::ready(Err(error)))
                }
                Verdict::Skipped => return Box::pin(std::future::ready(Ok(()))),
                Verdict::DeadLettered(delivery) => {
                    Box::pin(async move { dead_letter_result(delivery.await).map(|_| ()) })
                }
            };
        let shared = report.shared();
        lock(&self.outstanding).push(shared.clone());
        Box::pin(shared)
    }

    /// Waits for every report made so far; the error that fails the task, if any.
    async fn settle(&self) -> ConnectResult<()> {
        let outstanding = std::mem::take(&mut *lock(&self.outstanding));
        for report in outstanding {
            if let Err(error) = report.await {
                lock(&self.failure).get_or_insert_with(|| error.clone());
            }
        }
        self.check()
    }

    /// The failure a report caused, if any.
    fn check(&self) -> ConnectResult<()> {
        match lock(&self.failure).clone() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

impl ErrantRecordHandler for ErrantRecords {
    fn report(&self, record: SinkRecord, error: ConnectError) -> ErrantReport {
        self.apply(Stage::TaskPut, "SinkTask", &record, error)
    }
}

/// Pausing and resuming partitions on behalf of the task ([`SinkPartitions`]).
struct ConsumerPartitions {
    consumer: Arc<GroupConsumer>,
    paused_by_task: Mutex<BTreeSet<TopicPartition>>,
}

impl ConsumerPartitions {
    fn list(partitions: &[TopicPartition]) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for partition in partitions {
            list.add_partition(&partition.topic, partition.partition);
        }
        list
    }
}

impl PartitionControl for ConsumerPartitions {
    fn assignment(&self) -> Vec<TopicPartition> {
        self.consumer
            .assignment()
            .map(|list| partitions_of(&list))
            .unwrap_or_default()
    }

    fn pause(&self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        lock(&self.paused_by_task).extend(partitions.iter().cloned());
        self.consumer
            .pause(&Self::list(partitions))
            .map_err(|e| ConnectError::retriable(format!("cannot pause partitions: {e}")))
    }

    fn resume(&self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        let mut paused = lock(&self.paused_by_task);
        for partition in partitions {
            paused.remove(partition);
        }
        drop(paused);
        self.consumer
            .resume(&Self::list(partitions))
            .map_err(|e| ConnectError::retriable(format!("cannot resume partitions: {e}")))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Sink {
    /// First, so dropped before the task and the consumer (fields drop in order).
    _detach: Detach,
    connector: String,
    task: Box<dyn SinkTask>,
    consumer: Arc<GroupConsumer>,
    partitions: Arc<ConsumerPartitions>,
    transforms: TransformChain,
    errors: Arc<ErrorReporter>,
    errant: Arc<ErrantRecords>,
    metrics: TaskMetrics,
    /// Next offset to commit per (topic, partition): past every record put, filtered or dead-lettered.
    positions: HashMap<(String, i32), i64>,
    uncommitted: i64,
    stop: CancellationToken,
    shutdown_timeout: Duration,
    /// Assignment changes from the consumer's rebalance callback, for the runner to apply.
    rebalances: mpsc::UnboundedReceiver<Rebalance>,
    /// The partitions the task was told of with `open` and not yet with `close`.
    open: BTreeSet<TopicPartition>,
    /// The connector is paused: partitions assigned now are paused at once.
    paused: bool,
}

impl Sink {
    async fn run(
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
            self.advance(&position.0, position.1, position.2);
        }
        if transformed.is_empty() {
            return Ok(());
        }
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
    async fn rebalance(&mut self, event: Rebalance, commit: bool) -> ConnectResult<()> {
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
                    self.positions
                        .remove(&(partition.topic.clone(), partition.partition));
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
    async fn close(&mut self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        if partitions.is_empty() {
            return Ok(());
        }
        let close = self.task.close(partitions);
        bounded("close", close, &self.stop, self.shutdown_timeout).await
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

    /// Asks the sink what is safe to commit (`pre_commit`, which flushes by default), waits
    /// until every errant record reported so far (from `put`, `flush` or transforms) is in
    /// the dead-letter topic, then commits those positions, never past what was put.
    async fn flush_and_commit(&mut self) -> ConnectResult<()> {
        if self.positions.is_empty() {
            return self.errant.settle().await;
        }
        let consumed: SinkOffsets = self
            .positions
            .iter()
            .map(|((topic, partition), next)| {
                (TopicPartition::new(topic.clone(), *partition), *next)
            })
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
                        self.positions
                            .remove(&(partition.topic, partition.partition));
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

fn to_sink_record(message: &BorrowedMessage<'_>) -> SinkRecord {
    SinkRecord {
        record: record_of(message),
        kafka_partition: message.partition(),
        kafka_offset: message.offset(),
    }
}
