//! The sink connector and its task: records become Bundle entries handed to the [`Writer`];
//! `put` returns at once (pausing the partitions while too much is outstanding), `flush`
//! waits for the server's answers, and `pre_commit` commits only what the server
//! acknowledged or what went to the dead-letter topic.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind,
    ErrantRecordReporter, Props, SinkConnector, SinkOffsets, SinkPartitions, SinkRecord, SinkTask,
    SinkTaskContext, TaskConfig, TopicPartition,
};

use crate::client::{FhirClient, FhirError};
use crate::config::{AUTH_PRIVATE_KEY_FILE, SinkConfig, TLS_CA_FILE, URL, sink_def};
use crate::entry::{Prepared, prepare};
use crate::writer::{Wiring, Writer};
use medconnect_api::acknowledgements::Tracker;

/// A client that cannot be built is a configuration error: of the CA file, or of the URL.
pub(crate) fn client_error(error: FhirError) -> ConnectError {
    match error {
        FhirError::CaFile(reason) => ConnectError::config(TLS_CA_FILE, reason),
        FhirError::Key(reason) => ConnectError::config(AUTH_PRIVATE_KEY_FILE, reason),
        other => ConnectError::config(URL, other.to_string()),
    }
}

/// `GET /metadata`: the server must answer, and be FHIR R4 (4.0.x).
pub(crate) async fn check_server(client: &FhirClient) -> ConnectResult<String> {
    let metadata = client.metadata().await.map_err(|e| {
        ConnectError::config(
            URL,
            format!("cannot read the server's CapabilityStatement: {e}"),
        )
    })?;
    let version = metadata["fhirVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !version.starts_with("4.0") {
        return Err(ConnectError::config(
            URL,
            format!(
                "the server is not FHIR R4: its CapabilityStatement says fhirVersion '{version}' (4.0.x needed)"
            ),
        ));
    }
    let software = metadata["software"]["name"]
        .as_str()
        .unwrap_or("unknown")
        .to_string();
    Ok(format!("{software} (FHIR {version})"))
}

#[derive(Debug, Default)]
pub struct FhirSinkConnector;

#[async_trait]
impl Connector for FhirSinkConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.fhir.FhirSinkConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["FhirSink"]
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

    async fn validate(&self, config: &Props) -> ConnectResult<()> {
        let config = SinkConfig::parse(config)?;
        let client = FhirClient::new(&config.connection).map_err(client_error)?;
        let server = check_server(&client).await?;
        tracing::info!(%server, "FHIR sink validated against the server");
        Ok(())
    }

    async fn task_configs(
        &self,
        context: &ConnectorContext,
        max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        Ok(vec![context.config.clone(); max_tasks.max(1)])
    }
}

impl SinkConnector for FhirSinkConnector {
    fn create_task(&self, context: SinkTaskContext) -> ConnectResult<Box<dyn SinkTask>> {
        Ok(Box::new(FhirSinkTask::new(context)?))
    }
}

pub struct FhirSinkTask {
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

impl std::fmt::Debug for FhirSinkTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FhirSinkTask")
            .field("connector", &self.connector)
            .field("url", &self.config.connection.base)
            .field("started", &self.writer.is_some())
            .finish()
    }
}

impl FhirSinkTask {
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

    /// Pauses the partitions while the server lags; beyond four times that (records the
    /// engine had already read, or a context that cannot pause), `put` waits for room.
    async fn apply_backpressure(&self) -> ConnectResult<()> {
        let pause_at = self.config.max_buffered;
        {
            let mut state = self.tracker.lock();
            if !state.paused && state.count() >= pause_at {
                let assignment = self.partitions.assignment();
                match self.partitions.pause(&assignment) {
                    Ok(()) => {
                        state.paused = true;
                        tracing::info!(connector = %self.connector, outstanding = state.count(), "FHIR server lagging; partitions paused");
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
impl SinkTask for FhirSinkTask {
    /// Starts the writer. A server that does not answer yet does not fail the start: the
    /// writer retries, and the partitions pause until it answers.
    async fn start(&mut self) -> ConnectResult<()> {
        let client = Arc::new(FhirClient::new(&self.config.connection).map_err(client_error)?);
        match check_server(&client).await {
            Ok(server) => tracing::info!(connector = %self.connector, %server, "FHIR sink started"),
            Err(ConnectError::Config { reason, .. }) if reason.contains("not FHIR R4") => {
                return Err(ConnectError::config(URL, reason));
            }
            Err(error) => {
                tracing::warn!(connector = %self.connector, %error, "FHIR sink started; the server does not answer yet")
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
                resume_at: self.config.max_buffered / 2,
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
        if let (Some(first), Some(last)) = (records.first(), records.last()) {
            tracing::debug!(connector = %self.connector, records = records.len(), first_partition = first.kafka_partition, first_offset = first.kafka_offset, last_partition = last.kafka_partition, last_offset = last.kafka_offset, "put");
        }
        for record in records {
            let partition =
                TopicPartition::new(record.record.topic.clone(), record.kafka_partition);
            if let Some(next) = self.next.get(&partition)
                && record.kafka_offset < *next
            {
                tracing::debug!(connector = %self.connector, partition = partition.partition, offset = record.kafka_offset, next, "record put again: already queued");
                continue;
            }
            self.next.insert(partition.clone(), record.kafka_offset + 1);
            match prepare(&record, &self.config) {
                Prepared::Write(entry) => {
                    self.tracker.add(partition, record.kafka_offset);
                    writer.write(entry)?;
                }
                Prepared::Skip(reason) => {
                    tracing::debug!(connector = %self.connector, topic = %partition.topic, partition = partition.partition, offset = record.kafka_offset, reason, "record skipped");
                }
                Prepared::Errant(error) => self.errant.report(record, error).await?,
            }
        }
        self.apply_backpressure().await
    }

    async fn flush(&mut self) -> ConnectResult<()> {
        if let Some(writer) = &self.writer {
            writer.flush()?;
        }
        self.tracker.wait_until(|state| state.count() == 0).await
    }

    async fn pre_commit(&mut self, offsets: &SinkOffsets) -> ConnectResult<SinkOffsets> {
        self.tracker.check()?;
        if let Some(writer) = &self.writer {
            writer.flush()?;
        }
        let committable = self.tracker.lock().committable(offsets);
        tracing::debug!(connector = %self.connector, put = ?offsets, committable = ?committable, "pre_commit");
        Ok(committable)
    }

    async fn open(&mut self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        tracing::debug!(connector = %self.connector, partitions = ?partitions, "partitions opened");
        Ok(())
    }

    async fn close(&mut self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        // Queued records of these partitions are still written (their next owner may write
        // them again: idempotent); only their bookkeeping goes.
        tracing::debug!(connector = %self.connector, partitions = ?partitions, "partitions closed");
        self.tracker.forget(partitions);
        for partition in partitions {
            self.next.remove(partition);
        }
        Ok(())
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        self.writer = None;
        Ok(())
    }
}
