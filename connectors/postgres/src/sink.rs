//! The connector and its task: records are buffered up to `batch.size` rows or
//! `batch.max.bytes` and written by [`writer::write`], each batch in one transaction; `flush`
//! writes the rest.

use std::collections::HashMap;
use std::str::FromStr;

use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind,
    ErrantRecordReporter, Props, SinkConnector, SinkRecord, SinkTask, SinkTaskContext, TaskConfig,
    TopicPartition,
};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{Connection, PgPool};

use crate::config::{
    CONNECTION_PASSWORD, CONNECTION_URL, CONNECTION_USER, ConnectionConfig, SinkConfig,
    redacted_url, sink_def,
};
use crate::error::{Failure, classify};
use crate::link::Link;
use crate::schema::Catalog;
use crate::writer;

pub(crate) fn connect_options(connection: &ConnectionConfig) -> ConnectResult<PgConnectOptions> {
    let mut options = PgConnectOptions::from_str(&connection.url)
        .map_err(|e| ConnectError::config(CONNECTION_URL, e.to_string()))?;
    if let Some(user) = &connection.user {
        options = options.username(user);
    }
    if let Some(password) = &connection.password {
        options = options.password(password);
    }
    Ok(options.application_name("medconnect-postgres"))
}

/// The pool of one task: one connection, as a task writes one batch at a time. Created lazily:
/// a database that goes down makes writes retriable instead of failing the task.
fn pool(connection: &ConnectionConfig) -> ConnectResult<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(connection.timeout)
        .connect_lazy_with(connect_options(connection)?))
}

/// Connects once and asks the server's version. A direct connection, not the pool, so that a
/// failure says why (refused, unknown database, bad password) instead of "pool timed out".
pub(crate) async fn server_version(
    connection: &ConnectionConfig,
) -> ConnectResult<Result<String, sqlx::Error>> {
    let options = connect_options(connection)?;
    let attempt = async {
        let mut connection = PgConnection::connect_with(&options).await?;
        let version = sqlx::query_scalar("SELECT version()")
            .fetch_one(&mut connection)
            .await;
        let _ = connection.close().await;
        version
    };
    Ok(tokio::time::timeout(connection.timeout, attempt)
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut)))
}

/// Where a failure to reach the server points in the config.
pub(crate) fn connection_field(error: &sqlx::Error) -> &'static str {
    match error {
        // invalid_authorization_specification / invalid_password
        sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("28")) => {
            if db.code().as_deref() == Some("28P01") {
                CONNECTION_PASSWORD
            } else {
                CONNECTION_USER
            }
        }
        _ => CONNECTION_URL,
    }
}

/// What a buffered record counts for against `batch.max.bytes`: its key, value and headers,
/// the parts whose size the producer chose (the rest is a fixed ~250 bytes per record).
fn weight(record: &SinkRecord) -> usize {
    let record = &record.record;
    record.key.as_ref().map_or(0, |k| k.len())
        + record.value.as_ref().map_or(0, |v| v.len())
        + record
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.map_or(0, |v| v.len()))
            .sum::<usize>()
}

#[derive(Debug, Default)]
pub struct PostgresSinkConnector;

#[async_trait]
impl Connector for PostgresSinkConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.postgres.PostgresSinkConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["PostgresSink"]
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

    /// Parses the settings, then connects and asks the server's version: an unreachable
    /// server or refused credentials are an error on the setting at fault.
    async fn validate(&self, config: &Props) -> ConnectResult<()> {
        let config = SinkConfig::parse(config)?;
        match server_version(&config.connection).await? {
            Ok(version) => {
                tracing::info!(server = %redacted_url(&config.connection.url), %version, "PostgreSQL sink validated against the server");
                Ok(())
            }
            Err(error) => Err(ConnectError::config(
                connection_field(&error),
                format!("cannot connect to PostgreSQL: {error}"),
            )),
        }
    }

    async fn task_configs(
        &self,
        context: &ConnectorContext,
        max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        // Tasks share the topics' partitions through the consumer group; each has its pool.
        Ok(vec![context.config.clone(); max_tasks.max(1)])
    }
}

impl SinkConnector for PostgresSinkConnector {
    fn create_task(&self, context: SinkTaskContext) -> ConnectResult<Box<dyn SinkTask>> {
        Ok(Box::new(PostgresSinkTask::new(context)?))
    }
}

pub struct PostgresSinkTask {
    connector: String,
    config: SinkConfig,
    errant: ErrantRecordReporter,
    /// The connection, through the pool (see [`Link`]).
    link: Option<Link>,
    catalog: Catalog,
    /// Records put and not yet written, in the order they were put.
    buffer: Vec<SinkRecord>,
    /// Their [`weight`]s, summed: with `batch.max.bytes` it bounds the buffer's memory.
    buffered_bytes: usize,
    /// Per partition, the offset after the last record taken into the buffer: a batch put
    /// again after a retriable error is not taken twice.
    next: HashMap<TopicPartition, i64>,
}

impl std::fmt::Debug for PostgresSinkTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSinkTask")
            .field("connector", &self.connector)
            .field("server", &redacted_url(&self.config.connection.url))
            .field("buffered", &self.buffer.len())
            .finish()
    }
}

impl PostgresSinkTask {
    pub fn new(context: SinkTaskContext) -> ConnectResult<Self> {
        Ok(Self {
            config: SinkConfig::parse(&context.config)?,
            connector: context.connector_name,
            errant: context.errant_records,
            link: None,
            catalog: Catalog::default(),
            buffer: Vec::new(),
            buffered_bytes: 0,
            next: HashMap::new(),
        })
    }

    /// How many of the first buffered records make the next batch: as many as fit both
    /// `batch.size` and `batch.max.bytes`, at least one (a record larger than
    /// `batch.max.bytes` goes alone). `None` while the buffer holds less than a full batch
    /// and `all` is false (`flush` writes what is there).
    fn next_batch(&self, all: bool) -> Option<usize> {
        let full = self.buffer.len() >= self.config.batch_size
            || self.buffered_bytes >= self.config.batch_max_bytes;
        if self.buffer.is_empty() || !(full || all) {
            return None;
        }
        let mut bytes = 0usize;
        let mut count = 0;
        for record in self.buffer.iter().take(self.config.batch_size) {
            bytes = bytes.saturating_add(weight(record));
            if count > 0 && bytes > self.config.batch_max_bytes {
                break;
            }
            count += 1;
        }
        Some(count)
    }

    /// Writes the first `count` buffered records in one transaction, reports the rows the
    /// database refused, then drops them from the buffer. On an error they stay buffered, and
    /// the next `put` or `flush` writes them again.
    async fn write_first(&mut self, count: usize) -> ConnectResult<()> {
        let link = self
            .link
            .as_mut()
            .ok_or_else(|| ConnectError::fatal("write before start"))?;
        let count = count.min(self.buffer.len());
        let batch = &self.buffer[..count];
        let outcome = match writer::write(link, &mut self.catalog, &self.config, batch).await {
            Ok(outcome) => outcome,
            Err(error) => {
                link.discard();
                tracing::warn!(connector = %self.connector, records = count, %error, "batch not written");
                return Err(error.into());
            }
        };
        tracing::debug!(
            connector = %self.connector,
            records = count,
            rows_written = outcome.rows_written,
            rows_deleted = outcome.rows_deleted,
            skipped = outcome.skipped,
            errant = outcome.errant.len(),
            "batch committed"
        );
        for (index, error) in outcome.errant {
            if let Some(record) = batch.get(index) {
                tracing::warn!(connector = %self.connector, topic = %record.record.topic, partition = record.kafka_partition, offset = record.kafka_offset, %error, "record not written");
                self.errant.report(record.clone(), error).await?;
            }
        }
        let written: usize = self.buffer.drain(..count).map(|r| weight(&r)).sum();
        self.buffered_bytes = self.buffered_bytes.saturating_sub(written);
        Ok(())
    }
}

#[async_trait]
impl SinkTask for PostgresSinkTask {
    /// Opens the pool and checks the server answers; one that does not is retried by the
    /// engine (a retriable error).
    async fn start(&mut self) -> ConnectResult<()> {
        let version =
            server_version(&self.config.connection)
                .await?
                .map_err(|error| match classify(&error) {
                    Failure::Transient => {
                        ConnectError::retriable(format!("PostgreSQL does not answer yet: {error}"))
                            .caused_by(error)
                    }
                    _ => ConnectError::config(
                        connection_field(&error),
                        format!("cannot connect to PostgreSQL: {error}"),
                    ),
                })?;
        tracing::info!(connector = %self.connector, server = %redacted_url(&self.config.connection.url), %version, "PostgreSQL sink started");
        self.link = Some(Link::new(pool(&self.config.connection)?));
        Ok(())
    }

    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()> {
        // The partition's next offset is looked up and stored once per run of its records,
        // not per record (a topic name copied and hashed per record showed in profiles).
        let mut run: Option<(TopicPartition, i64)> = None;
        for record in records {
            let same = run.as_ref().is_some_and(|(partition, _)| {
                partition.partition == record.kafka_partition
                    && partition.topic == record.record.topic
            });
            if !same {
                if let Some((partition, next)) = run.take() {
                    self.next.insert(partition, next);
                }
                let partition =
                    TopicPartition::new(record.record.topic.clone(), record.kafka_partition);
                let next = self.next.get(&partition).copied().unwrap_or(i64::MIN);
                run = Some((partition, next));
            }
            let Some((_, next)) = run.as_mut() else {
                continue;
            };
            if record.kafka_offset < *next {
                continue;
            }
            *next = record.kafka_offset + 1;
            self.buffered_bytes += weight(&record);
            self.buffer.push(record);
        }
        if let Some((partition, next)) = run {
            self.next.insert(partition, next);
        }
        while let Some(count) = self.next_batch(false) {
            self.write_first(count).await?;
        }
        Ok(())
    }

    /// Writes what is buffered: once this returns, every record put is committed in the
    /// database or reported errant.
    async fn flush(&mut self) -> ConnectResult<()> {
        while let Some(count) = self.next_batch(true) {
            self.write_first(count).await?;
        }
        Ok(())
    }

    async fn close(&mut self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        // Their records not yet written are read again by the partitions' next owner.
        self.buffer.retain(|record| {
            !partitions
                .iter()
                .any(|p| p.topic == record.record.topic && p.partition == record.kafka_partition)
        });
        self.buffered_bytes = self.buffer.iter().map(weight).sum();
        for partition in partitions {
            self.next.remove(partition);
        }
        Ok(())
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        if let Some(link) = self.link.take() {
            link.close().await;
        }
        Ok(())
    }
}
