//! The connector and its task: records become documents, handed to the [`Writer`]; `put`
//! returns at once (pausing the partitions while too much is outstanding), and `pre_commit`
//! tells the engine what the cluster acknowledged.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind,
    ErrantRecordReporter, Props, SinkConnector, SinkOffsets, SinkPartitions, SinkRecord, SinkTask,
    SinkTaskContext, TaskConfig, TopicPartition,
};

use crate::bulk::{BulkError, EsClient};
use crate::config::{CONNECTION_TLS_CA_FILE, CONNECTION_URL, SinkConfig, TemplateSpec, sink_def};
use crate::document::{Prepared, prepare};
use crate::writer::{Wiring, Writer};
use medconnect_api::acknowledgements::Tracker;

/// A client that cannot be built is a configuration error: of the CA file, or of the URLs.
fn client_error(error: BulkError) -> ConnectError {
    match error {
        BulkError::CaFile(reason) => ConnectError::config(CONNECTION_TLS_CA_FILE, reason),
        other => ConnectError::config(CONNECTION_URL, other.to_string()),
    }
}

#[derive(Debug, Default)]
pub struct ElasticsearchSinkConnector;

#[async_trait]
impl Connector for ElasticsearchSinkConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.elasticsearch.ElasticsearchSinkConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["ElasticsearchSink", "OpenSearchSink"]
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Sink
    }

    fn config_def(&self) -> ConfigDef {
        sink_def()
    }

    /// Parses the settings, then asks the cluster's root who it is: an unreachable cluster
    /// or refused credentials are an error on `connection.url`.
    async fn validate(&self, config: &Props) -> ConnectResult<()> {
        let config = SinkConfig::parse(config)?;
        if let Some(template) = &config.template {
            template.load()?;
        }
        let client = EsClient::new(&config.connection).map_err(client_error)?;
        let info = client.info().await.map_err(|e| {
            ConnectError::config(CONNECTION_URL, format!("cannot reach the cluster: {e}"))
        })?;
        tracing::info!(cluster = %info.cluster_name, version = %info.describe(), dialect = ?info.dialect(), "Elasticsearch sink validated against the cluster");
        Ok(())
    }

    async fn task_configs(
        &self,
        context: &ConnectorContext,
        max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        // Tasks share the topics' partitions through the consumer group; each has its writer.
        Ok(vec![context.config.clone(); max_tasks.max(1)])
    }
}

impl SinkConnector for ElasticsearchSinkConnector {
    fn create_task(&self, context: SinkTaskContext) -> ConnectResult<Box<dyn SinkTask>> {
        Ok(Box::new(ElasticsearchSinkTask::new(context)?))
    }
}

pub struct ElasticsearchSinkTask {
    connector: String,
    config: SinkConfig,
    errant: ErrantRecordReporter,
    partitions: SinkPartitions,
    tracker: Arc<Tracker>,
    writer: Option<Writer>,
    /// Per partition, the offset after the last record queued: a batch put again is not
    /// queued twice.
    next: HashMap<TopicPartition, i64>,
}

impl std::fmt::Debug for ElasticsearchSinkTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElasticsearchSinkTask")
            .field("connector", &self.connector)
            .field("urls", &self.config.connection.urls)
            .field("started", &self.writer.is_some())
            .finish()
    }
}

impl ElasticsearchSinkTask {
    pub fn new(context: SinkTaskContext) -> ConnectResult<Self> {
        Ok(Self {
            config: SinkConfig::parse(&context.config)?,
            connector: context.connector_name,
            errant: context.errant_records,
            partitions: context.partitions,
            tracker: Arc::new(Tracker::default()),
            writer: None,
            next: HashMap::new(),
        })
    }

    /// Documents queued or in flight past which the task pauses its partitions: enough to
    /// keep every request slot busy with a full batch twice over.
    fn pause_at(&self) -> usize {
        self.config
            .batch_size
            .saturating_mul(self.config.max_in_flight)
            .saturating_mul(2)
    }

    /// Pauses the partitions while the cluster lags; beyond four times that (records the
    /// engine had already read, or a context that cannot pause), `put` waits for room.
    async fn apply_backpressure(&self) -> ConnectResult<()> {
        let pause_at = self.pause_at();
        {
            let mut state = self.tracker.lock();
            if !state.paused && state.count() >= pause_at {
                let assignment = self.partitions.assignment();
                // A pause that fails is not worth failing the task for: the wait below still
                // bounds what is held.
                match self.partitions.pause(&assignment) {
                    Ok(()) => {
                        state.paused = true;
                        tracing::info!(connector = %self.connector, outstanding = state.count(), "cluster lagging; partitions paused");
                    }
                    Err(error) => {
                        tracing::warn!(connector = %self.connector, %error, "cannot pause partitions")
                    }
                }
            }
        }
        let hard_limit = pause_at.saturating_mul(4);
        self.tracker
            .wait_until(|state| state.count() < hard_limit)
            .await
    }
}

#[async_trait]
impl SinkTask for ElasticsearchSinkTask {
    /// Starts the writer. An unreachable cluster does not fail the start: the writer retries,
    /// and the partitions pause until the cluster answers.
    async fn start(&mut self) -> ConnectResult<()> {
        let client = Arc::new(
            EsClient::new(&self.config.connection)
                .map_err(client_error)?
                .with_template(
                    self.config
                        .template
                        .as_ref()
                        .map(TemplateSpec::load)
                        .transpose()?,
                ),
        );
        match client.info().await {
            Ok(info) => {
                tracing::info!(connector = %self.connector, cluster = %info.cluster_name, version = %info.describe(), "Elasticsearch sink started")
            }
            Err(error) => {
                tracing::warn!(connector = %self.connector, %error, "Elasticsearch sink started; the cluster does not answer yet")
            }
        }
        self.writer = Some(Writer::start(
            &self.config,
            Wiring {
                connector: self.connector.clone(),
                client,
                tracker: self.tracker.clone(),
                errant: self.errant.clone(),
                partitions: self.partitions.clone(),
                resume_at: self.pause_at() / 2,
            },
        ));
        Ok(())
    }

    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()> {
        self.tracker.check()?;
        let writer = self
            .writer
            .as_ref()
            .ok_or_else(|| ConnectError::fatal("put before start"))?;
        for record in records {
            let partition =
                TopicPartition::new(record.record.topic.clone(), record.kafka_partition);
            if self
                .next
                .get(&partition)
                .is_some_and(|next| record.kafka_offset < *next)
            {
                continue;
            }
            self.next.insert(partition.clone(), record.kafka_offset + 1);
            match prepare(&record, &self.config) {
                Prepared::Write(document) => {
                    self.tracker.add(partition, record.kafka_offset);
                    writer.write(document)?;
                }
                Prepared::Skip { reason } => {
                    tracing::debug!(connector = %self.connector, topic = %partition.topic, partition = partition.partition, offset = record.kafka_offset, reason, "record skipped");
                }
                Prepared::Errant(error) => self.errant.report(record, error).await?,
            }
        }
        self.apply_backpressure().await
    }

    /// Sends what is queued and waits until the cluster acknowledged (or refused) all of it.
    async fn flush(&mut self) -> ConnectResult<()> {
        if let Some(writer) = &self.writer {
            writer.flush()?;
        }
        self.tracker.wait_until(|state| state.count() == 0).await
    }

    async fn pre_commit(&mut self, offsets: &SinkOffsets) -> ConnectResult<SinkOffsets> {
        self.tracker.check()?;
        Ok(self.tracker.lock().committable(offsets))
    }

    async fn close(&mut self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        self.tracker.forget(partitions);
        for partition in partitions {
            self.next.remove(partition);
        }
        Ok(())
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        // Requests in flight are abandoned: their records were not committed.
        self.writer = None;
        Ok(())
    }
}
