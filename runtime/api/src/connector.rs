//! Connector and task traits.
//!
//! A connector is a factory: it declares its settings, splits its work into task configs and
//! creates tasks. Tasks do the I/O. Two kinds of sources are served by one trait:
//! - *polling* sources (datagen, files, FHIR, PostgreSQL) return records with a source
//!   partition and offset; the engine stores the offset once Kafka acknowledged the record
//!   and gives it back through [`OffsetReader`] when the task starts again;
//! - *listener* sources (MLLP, MQTT) attach an [`AckHandle`](crate::AckHandle) to each record
//!   and answer their sender only when the engine completes it with a durable delivery.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::{
    ConfigDef, ConnectError, ConnectResult, Props, SinkRecord, SourceOffset, SourcePartition,
    SourceRecord,
};

/// The settings of one task, derived by its connector.
pub type TaskConfig = Props;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectorKind {
    Source,
    Sink,
}

impl ConnectorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Sink => "sink",
        }
    }
}

/// Where a connector's tasks run in a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// `tasks.max` tasks spread over live workers, moved when a worker leaves.
    #[default]
    Distributed,
    /// One task on every worker (listeners bound to the same port behind a load balancer).
    EveryWorker,
}

/// What a connector gets to compute its task configs.
#[derive(Clone)]
pub struct ConnectorContext {
    pub connector_name: String,
    pub config: Props,
}

/// The config's secrets hidden: a connector may log its context.
impl std::fmt::Debug for ConnectorContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorContext")
            .field("connector_name", &self.connector_name)
            .field("config", &crate::SecretsHidden(&self.config))
            .finish()
    }
}

/// Behaviour shared by source and sink connectors.
///
/// `validate` and `task_configs` may do I/O (a FHIR server's CapabilityStatement, a database's
/// table list); the engine bounds each call in time, so a peer that does not answer fails the
/// call instead of holding the REST request.
#[async_trait]
pub trait Connector: Send + Sync {
    /// The fully qualified class name, e.g. `io.medconnect.connectors.file.FileSourceConnector`.
    fn class(&self) -> &'static str;

    /// Short names accepted in `connector.class` besides the class name.
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }

    fn version(&self) -> &'static str;

    fn kind(&self) -> ConnectorKind;

    /// The connector's own settings (the engine adds the common ones: name, tasks.max, ...).
    fn config_def(&self) -> ConfigDef;

    /// Checks that span several settings or need I/O; field errors come back as
    /// `ConnectError::Config`. Single-setting rules belong in the `ConfigDef`. Called only for
    /// a config every single setting of which is valid, with references (`${env:...}`)
    /// resolved.
    async fn validate(&self, _config: &Props) -> ConnectResult<()> {
        Ok(())
    }

    /// Splits the work into at most `max_tasks` task configs.
    async fn task_configs(
        &self,
        context: &ConnectorContext,
        max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>>;

    fn placement(&self) -> Placement {
        Placement::Distributed
    }

    /// The most tasks this connector can run (`None`: no limit of its own). A `tasks.max`
    /// above it is reported at validation, not silently ignored.
    fn max_tasks(&self) -> Option<u32> {
        None
    }
}

pub trait SourceConnector: Connector {
    /// Creates the task for one task config, with everything it is given. The task parses its
    /// settings here into its own typed config and keeps it: a task config it cannot run is a
    /// `ConnectError::Config`, and the task fails without starting. No I/O here: that belongs
    /// in [`SourceTask::start`], which is retried.
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>>;
}

pub trait SinkConnector: Connector {
    /// As [`SourceConnector::create_task`], for a sink task.
    fn create_task(&self, context: SinkTaskContext) -> ConnectResult<Box<dyn SinkTask>>;
}

/// Gives a source task the offsets stored for its partitions.
pub trait OffsetReader: Send + Sync {
    fn offset(&self, partition: &SourcePartition) -> Option<SourceOffset>;

    /// Every source partition the connector has an offset stored for (the tables a database
    /// source has read, the files a file source has seen). Empty for a reader of nothing.
    fn partitions(&self) -> Vec<SourcePartition> {
        Vec::new()
    }
}

/// What a source task is created with.
#[derive(Clone)]
pub struct SourceTaskContext {
    pub connector_name: String,
    pub task_id: u32,
    pub config: TaskConfig,
    pub offsets: Arc<dyn OffsetReader>,
    /// The worker's budget for bytes remote senders make it hold (frames being received,
    /// messages awaiting their acknowledgement): listener sources take theirs within it, so
    /// every listener of the worker together stays under one bound.
    pub listener_budget: Arc<crate::limits::ByteBudget>,
}

#[async_trait]
pub trait SourceTask: Send {
    /// Opens what the task needs (connections, a listener, the stored offsets). A retriable
    /// error (a port still held by the task's previous run, a peer not up yet) makes the
    /// engine call it again, with backoff, within `errors.retry.timeout`.
    async fn start(&mut self) -> ConnectResult<()>;

    /// Waits for the next records. May return an empty batch; the engine calls again. The
    /// engine stops calling while too many records are in flight (backpressure), and may
    /// cancel a pending poll only when the task is stopping.
    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>>;

    /// Called with the offsets that were stored since the last call (the latest per source
    /// partition): only records up to these are durable in Kafka. A source that acknowledges
    /// upstream (a database replication slot, an MQTT session) confirms exactly these, never
    /// what it merely returned from `poll`.
    async fn commit(&mut self, _stored: &[(SourcePartition, SourceOffset)]) -> ConnectResult<()> {
        Ok(())
    }

    async fn stop(&mut self) -> ConnectResult<()>;
}

/// The engine's side of [`ErrantRecordReporter`]: applies `errors.tolerance` to one record
/// (dead-letter topic, skip, or task failure).
pub trait ErrantRecordHandler: Send + Sync {
    fn report(&self, record: SinkRecord, error: ConnectError) -> ErrantReport;
}

/// The outcome of one errant-record report: `Ok` once the record is in the dead-letter topic
/// (or was skipped per `errors.tolerance=all`), `Err` when the error fails the task.
pub type ErrantReport = Pin<Box<dyn Future<Output = ConnectResult<()>> + Send>>;

/// Reports a record the sink could not write, so the engine applies `errors.tolerance`
/// (dead-letter topic or task failure) without failing the whole batch.
///
/// Awaiting the report is optional (as with Connect's `Future`): the engine waits for every
/// report made before it commits offsets, including reports made from `flush` and just
/// before a stop, so a committed offset never passes a record still on its way to the
/// dead-letter topic.
#[derive(Clone)]
pub struct ErrantRecordReporter {
    handler: Arc<dyn ErrantRecordHandler>,
}

impl std::fmt::Debug for ErrantRecordReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ErrantRecordReporter")
    }
}

impl ErrantRecordReporter {
    pub fn new(handler: Arc<dyn ErrantRecordHandler>) -> Self {
        Self { handler }
    }

    /// A reporter that only collects reports (each resolves at once), for a task's unit tests.
    pub fn collecting(sender: mpsc::UnboundedSender<(SinkRecord, ConnectError)>) -> Self {
        Self::new(Arc::new(Collecting(sender)))
    }

    pub fn report(&self, record: SinkRecord, error: ConnectError) -> ErrantReport {
        self.handler.report(record, error)
    }
}

struct Collecting(mpsc::UnboundedSender<(SinkRecord, ConnectError)>);

impl ErrantRecordHandler for Collecting {
    fn report(&self, record: SinkRecord, error: ConnectError) -> ErrantReport {
        let sent = self
            .0
            .send((record, error))
            .map_err(|_| ConnectError::fatal("the task's error handler has stopped"));
        Box::pin(std::future::ready(sent))
    }
}

/// A Kafka topic partition a sink task reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

/// Consumer positions per partition: the offset of the next record to read.
pub type SinkOffsets = BTreeMap<TopicPartition, i64>;

/// The engine's side of [`SinkPartitions`].
pub trait PartitionControl: Send + Sync {
    fn assignment(&self) -> Vec<TopicPartition>;
    fn pause(&self, partitions: &[TopicPartition]) -> ConnectResult<()>;
    fn resume(&self, partitions: &[TopicPartition]) -> ConnectResult<()>;
}

/// Lets a sink task stop reading some partitions and read them again later: backpressure
/// when its target pushes back (an index answering 429) without failing or blocking the task.
/// Partitions a task paused stay paused across a connector pause/resume until it resumes them.
#[derive(Clone)]
pub struct SinkPartitions(Arc<dyn PartitionControl>);

impl std::fmt::Debug for SinkPartitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SinkPartitions")
            .field(&self.0.assignment())
            .finish()
    }
}

impl SinkPartitions {
    pub fn new(control: Arc<dyn PartitionControl>) -> Self {
        Self(control)
    }

    /// Controls nothing (a task driven by its own unit tests, with no consumer).
    pub fn detached() -> Self {
        Self(Arc::new(Detached))
    }

    /// The partitions assigned to this task now.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.0.assignment()
    }

    pub fn pause(&self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        self.0.pause(partitions)
    }

    pub fn resume(&self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        self.0.resume(partitions)
    }
}

struct Detached;

impl PartitionControl for Detached {
    fn assignment(&self) -> Vec<TopicPartition> {
        Vec::new()
    }
    fn pause(&self, _: &[TopicPartition]) -> ConnectResult<()> {
        Ok(())
    }
    fn resume(&self, _: &[TopicPartition]) -> ConnectResult<()> {
        Ok(())
    }
}

/// What a sink task is created with.
#[derive(Clone)]
pub struct SinkTaskContext {
    pub connector_name: String,
    pub task_id: u32,
    pub config: TaskConfig,
    pub errant_records: ErrantRecordReporter,
    pub partitions: SinkPartitions,
    /// The other workers of the cluster, to call a handler a task registered there
    /// ([`crate::relay`]); [`crate::relay::alone`] outside a cluster.
    pub peers: Arc<dyn crate::relay::Peers>,
}

#[async_trait]
pub trait SinkTask: Send {
    /// Opens what the task needs; retried as [`SourceTask::start`] is.
    async fn start(&mut self) -> ConnectResult<()>;

    /// Takes a batch. The task may buffer; only `flush` (or `pre_commit`) promises
    /// durability. A `put` that failed with a retriable error is called again with the same
    /// batch, so it must be idempotent for that batch (upsert by key, document id from
    /// topic/partition/offset, ...).
    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()>;

    /// Makes everything put so far durable in the target. The engine commits consumer
    /// offsets only after this returns `Ok`.
    async fn flush(&mut self) -> ConnectResult<()>;

    /// Before the engine commits consumer offsets (Connect's `preCommit`): `offsets` holds,
    /// per partition, the position after the last record handed to `put`. Returns the
    /// positions that are safe to commit. The default flushes and returns `offsets`. A sink
    /// that writes asynchronously (bulk requests in flight) returns, per partition, the
    /// position after the last record its target acknowledged, and leaves out partitions
    /// with nothing acknowledged. The engine never commits past what it handed to `put`.
    async fn pre_commit(&mut self, offsets: &SinkOffsets) -> ConnectResult<SinkOffsets> {
        self.flush().await?;
        Ok(offsets.clone())
    }

    /// Partitions newly assigned to this task (Connect's `open`): at its first assignment and
    /// at every consumer-group rebalance, before any of their records is put. A sink that keeps
    /// a writer per partition (a file, a transaction, a bulk buffer) opens it here.
    async fn open(&mut self, _partitions: &[TopicPartition]) -> ConnectResult<()> {
        Ok(())
    }

    /// Partitions taken from this task (Connect's `close`): revoked by a rebalance, or all of
    /// them when the task stops. Called after the engine committed what `pre_commit` accepted
    /// for them; records of these partitions put since the last commit the task accepted are
    /// read again by their next owner. A sink releases what it holds for these partitions here
    /// and puts nothing more for them. Not called for partitions the task never had opened.
    async fn close(&mut self, _partitions: &[TopicPartition]) -> ConnectResult<()> {
        Ok(())
    }

    async fn stop(&mut self) -> ConnectResult<()>;
}
