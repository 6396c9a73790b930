//! The query-mode source (Confluent's JDBC source modes): each table (or one query) is read
//! in batches past its stored offset, and never past a *safe bound*, so rows committed late or
//! out of order are not skipped.
//!
//! # The safe bound
//!
//! A row can become visible after the source read past it when its transaction was still open
//! (the JDBC source's bug: kafka-connect-jdbc #172, #1015). Every poll of a table first asks the
//! server, in one statement, for `clock_timestamp()`, the start of the oldest transaction still
//! open (`pg_stat_activity.xact_start` of every other backend that can write, and whether any
//! prepared transaction exists), and in incrementing mode `max(column)`. That answer becomes a
//! *candidate* `(τ, H)`. A candidate is *confirmed* at a later poll once every transaction open
//! now started after τ (and no prepared transaction exists): every transaction that was open at
//! τ has ended, committed or not, so
//! - incrementing: any row with a value at most `H` that will ever be visible is visible now
//!   (values are taken from a sequence after H's snapshot only by transactions that start
//!   later, and those get larger values); rows up to `H` are read;
//! - timestamp: a row whose timestamp is before `min(τ, oldest open start, now - delay)` was
//!   written by a transaction that started before it (the column is set at or after its
//!   transaction's start) and is no longer open: rows before that bound are read, and within
//!   it rows with equal timestamps are all there, so a timestamp offset never passes one.
//!
//! The bound lags a table by about one `poll.interval.ms` (and by the longest open
//! transaction); an idle-in-transaction session holds it back, never makes it skip.

use std::collections::VecDeque;

use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind,
    OffsetReader, Props, Record, SourceConnector, SourceOffset, SourcePartition, SourceRecord,
    SourceTask, SourceTaskContext, TaskConfig, content_type,
};
use serde_json::{Map, Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use tokio::time::Instant;

/// How long an open transaction may hold reads back before a warning.
const HELD_WARNING: std::time::Duration = std::time::Duration::from_secs(60);

use super::config::{
    QueryMode, QuerySourceConfig, Sources, TABLE_WHITELIST, query_def, quoted_table,
};
use crate::config::redacted_url;
use crate::error::{Failure, classify};
use crate::sink::{connect_options, connection_field, server_version};
use crate::sql::quote_ident;

#[derive(Debug, Default)]
pub struct PostgresSourceConnector;

#[async_trait]
impl Connector for PostgresSourceConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.postgres.PostgresSourceConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["PostgresSource", "PostgresQuerySource"]
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Source
    }

    fn config_def(&self) -> ConfigDef {
        query_def()
    }

    async fn validate(&self, config: &Props) -> ConnectResult<()> {
        let config = QuerySourceConfig::parse(config)?;
        match server_version(&config.connection).await? {
            Ok(version) => {
                tracing::info!(server = %redacted_url(&config.connection.url), %version, "PostgreSQL query source validated against the server");
                Ok(())
            }
            Err(error) => Err(ConnectError::config(
                connection_field(&error),
                format!("cannot connect to PostgreSQL: {error}"),
            )),
        }
    }

    /// Tables are dealt to tasks round robin; a query is one task.
    async fn task_configs(
        &self,
        context: &ConnectorContext,
        max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        let config = QuerySourceConfig::parse(&context.config)?;
        let tables = match config.sources {
            Sources::Query(_) => return Ok(vec![context.config.clone()]),
            Sources::Tables(tables) => tables,
        };
        let tasks = max_tasks.clamp(1, tables.len().max(1));
        Ok((0..tasks)
            .map(|task| {
                let mine: Vec<&str> = tables
                    .iter()
                    .skip(task)
                    .step_by(tasks)
                    .map(String::as_str)
                    .collect();
                let mut props = context.config.clone();
                props.remove(super::config::TABLE_INCLUDE);
                props.insert(TABLE_WHITELIST.into(), mine.join(","));
                props
            })
            .collect())
    }
}

impl SourceConnector for PostgresSourceConnector {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        Ok(Box::new(PostgresSourceTask::new(context)?))
    }
}

/// A confirmed or candidate bound: the server's clock when it was read, and in incrementing
/// mode the largest value then visible.
#[derive(Debug, Clone)]
struct Horizon {
    at: String,
    high: Option<i64>,
}

/// One table (or the query) and how far it has been read.
#[derive(Debug)]
struct Table {
    /// As configured: the source partition and the topic suffix.
    name: String,
    /// `(SELECT ...)` or `"schema"."table"`, to read from as `q`.
    from: String,
    topic: String,
    partition: SourcePartition,
    /// Last incrementing value read.
    incrementing: Option<i64>,
    /// Last timestamp read, as PostgreSQL's text of a timestamptz.
    timestamp: Option<String>,
    candidate: Option<Horizon>,
    due: Instant,
    /// When a held-back bound was last warned about.
    warned: Option<Instant>,
}

pub struct PostgresSourceTask {
    connector: String,
    config: QuerySourceConfig,
    offsets: std::sync::Arc<dyn OffsetReader>,
    pool: Option<PgPool>,
    tables: Vec<Table>,
    /// Rows of a bulk read not yet returned.
    pending: VecDeque<SourceRecord>,
}

impl std::fmt::Debug for PostgresSourceTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSourceTask")
            .field("connector", &self.connector)
            .field("server", &redacted_url(&self.config.connection.url))
            .field("tables", &self.tables.len())
            .finish()
    }
}

fn sql_failure(error: sqlx::Error, what: &str) -> ConnectError {
    let message = format!("{what}: {error}");
    match classify(&error) {
        Failure::Transient => ConnectError::retriable(message).caused_by(error),
        _ => ConnectError::fatal(message).caused_by(error),
    }
}

impl PostgresSourceTask {
    pub fn new(context: SourceTaskContext) -> ConnectResult<Self> {
        let config = QuerySourceConfig::parse(&context.config)?;
        let now = Instant::now();
        let tables = match &config.sources {
            Sources::Query(query) => vec![Table {
                name: query.clone(),
                from: format!("({query})"),
                topic: config.topic_prefix.clone(),
                partition: SourcePartition::from_iter([("query".to_string(), json!(query))]),
                incrementing: None,
                timestamp: None,
                candidate: None,
                due: now,
                warned: None,
            }],
            Sources::Tables(tables) => tables
                .iter()
                .map(|name| Table {
                    name: name.clone(),
                    from: quoted_table(name),
                    topic: format!("{}{name}", config.topic_prefix),
                    partition: SourcePartition::from_iter([("table".to_string(), json!(name))]),
                    incrementing: None,
                    timestamp: None,
                    candidate: None,
                    due: now,
                    warned: None,
                })
                .collect(),
        };
        Ok(Self {
            connector: context.connector_name,
            config,
            offsets: context.offsets,
            pool: None,
            tables,
            pending: VecDeque::new(),
        })
    }

    fn pool(&self) -> ConnectResult<&PgPool> {
        self.pool
            .as_ref()
            .ok_or_else(|| ConnectError::fatal("poll before start"))
    }

    /// Asks the server for a new candidate and whether the table's previous one is
    /// confirmed. Returns the confirmed bound: the largest incrementing value, or the timestamp
    /// rows must be before, to be read now (`None`: nothing can be read yet).
    async fn bound(&mut self, index: usize) -> ConnectResult<(Option<Horizon>, Option<Bound>)> {
        let table = &self.tables[index];
        let high = match self.config.mode.incrementing() {
            Some(column) if self.config.mode.timestamp().is_none() => format!(
                "(SELECT max(q.{}) FROM {} AS q)::bigint",
                quote_ident(column),
                table.from
            ),
            _ => "NULL::bigint".to_string(),
        };
        // Every other backend that may write: client backends, background and replication
        // apply workers; not WAL senders or autovacuum. Prepared transactions count as open
        // since their start is unknown.
        let sql = format!(
            "WITH open AS (SELECT min(xact_start) AS oldest, \
               (array_agg(pid ORDER BY xact_start))[1] AS oldest_pid FROM pg_stat_activity \
               WHERE pid <> pg_backend_pid() AND xact_start IS NOT NULL \
               AND backend_type NOT IN ('walsender', 'autovacuum worker', 'autovacuum launcher')), \
             prepared AS (SELECT count(*) AS n FROM pg_prepared_xacts) \
             SELECT clock_timestamp()::text AS now, \
               ($1::timestamptz IS NOT NULL AND prepared.n = 0 \
                 AND (open.oldest IS NULL OR open.oldest > $1::timestamptz)) AS confirmed, \
               CASE WHEN $1::timestamptz IS NULL OR prepared.n > 0 THEN NULL \
                 ELSE least($1::timestamptz, open.oldest, clock_timestamp() - make_interval(secs => $2))::text END AS upper, \
               {high} AS high, open.oldest_pid, \
               extract(epoch FROM clock_timestamp() - open.oldest)::float8 AS open_for, \
               prepared.n AS prepared \
             FROM open, prepared"
        );
        let delay = self.config.timestamp_delay.as_secs_f64();
        let row = sqlx::query(&sql)
            .bind(table.candidate.as_ref().map(|c| c.at.clone()))
            .bind(delay)
            .fetch_one(self.pool()?)
            .await
            .map_err(|e| sql_failure(e, "reading the open transactions"))?;
        let now: String = row.try_get("now").map_err(|e| sql_failure(e, "bound"))?;
        let confirmed: bool = row
            .try_get("confirmed")
            .map_err(|e| sql_failure(e, "bound"))?;
        let upper: Option<String> = row.try_get("upper").map_err(|e| sql_failure(e, "bound"))?;
        let high: Option<i64> = row.try_get("high").map_err(|e| sql_failure(e, "bound"))?;
        let oldest_pid: Option<i32> = row
            .try_get("oldest_pid")
            .map_err(|e| sql_failure(e, "bound"))?;
        let open_for: Option<f64> = row
            .try_get("open_for")
            .map_err(|e| sql_failure(e, "bound"))?;
        let prepared: i64 = row
            .try_get("prepared")
            .map_err(|e| sql_failure(e, "bound"))?;
        self.warn_if_held(index, oldest_pid, open_for, prepared);
        let fresh = Horizon { at: now, high };
        Ok(match &self.config.mode {
            QueryMode::Incrementing { .. } => {
                match self.tables[index].candidate.clone() {
                    // A confirmed candidate: read up to its H, and take a new one.
                    Some(previous) if confirmed => {
                        (Some(fresh), previous.high.map(Bound::Incrementing))
                    }
                    // Wait for the transactions open at the candidate to end.
                    Some(previous) => (Some(previous), None),
                    None => (Some(fresh), None),
                }
            }
            _ => (Some(fresh), upper.map(Bound::Timestamp)),
        })
    }

    /// A transaction open for long (an idle-in-transaction session) or a prepared one holds
    /// every table's bound back: said once a minute per table, never silently.
    fn warn_if_held(
        &mut self,
        index: usize,
        oldest_pid: Option<i32>,
        open_for: Option<f64>,
        prepared: i64,
    ) {
        let held = prepared > 0 || open_for.is_some_and(|s| s >= HELD_WARNING.as_secs_f64());
        let table = &mut self.tables[index];
        if !held || table.warned.is_some_and(|at| at.elapsed() < HELD_WARNING) {
            return;
        }
        table.warned = Some(Instant::now());
        tracing::warn!(
            connector = %self.connector,
            table = %table.name,
            oldest_open_pid = ?oldest_pid,
            open_for_s = ?open_for.map(|s| s.round()),
            prepared_transactions = prepared,
            "an open or prepared transaction holds this table's reads back (rows it may still commit must not be skipped)"
        );
    }

    /// Reads the next batch of one table: its records, and whether the batch was full.
    async fn read(&mut self, index: usize) -> ConnectResult<(Vec<SourceRecord>, bool)> {
        if self.config.mode == QueryMode::Bulk {
            return self.read_bulk(index).await;
        }
        let (candidate, bound) = self.bound(index).await?;
        self.tables[index].candidate = candidate;
        let Some(bound) = bound else {
            return Ok((Vec::new(), false));
        };
        let limit = i64::try_from(self.config.batch_max_rows).unwrap_or(i64::MAX);
        let table = &self.tables[index];
        let q = |c: &str| format!("q.{}", quote_ident(c));
        let pool = self.pool()?;
        let rows = match (&self.config.mode, bound) {
            (QueryMode::Incrementing { column }, Bound::Incrementing(high)) => {
                let sql = format!(
                    "SELECT row_to_json(q)::text AS row, {c}::bigint AS inc, NULL::text AS ts FROM {from} AS q \
                     WHERE ($1::bigint IS NULL OR {c} > $1) AND {c} <= $2 ORDER BY {c} LIMIT $3",
                    c = q(column),
                    from = table.from
                );
                sqlx::query(&sql)
                    .bind(table.incrementing)
                    .bind(high)
                    .bind(limit)
                    .fetch_all(pool)
                    .await
            }
            (
                QueryMode::TimestampIncrementing {
                    timestamp,
                    incrementing,
                },
                Bound::Timestamp(upper),
            ) => {
                let sql = format!(
                    "SELECT row_to_json(q)::text AS row, {i}::bigint AS inc, {t}::timestamptz::text AS ts FROM {from} AS q \
                     WHERE {t}::timestamptz < $3::timestamptz \
                     AND ($1::timestamptz IS NULL OR ({t}::timestamptz, {i}::bigint) > ($1::timestamptz, $2::bigint)) \
                     ORDER BY {t}::timestamptz, {i}::bigint LIMIT $4",
                    t = q(timestamp),
                    i = q(incrementing),
                    from = table.from
                );
                sqlx::query(&sql)
                    .bind(table.timestamp.clone())
                    .bind(table.incrementing)
                    .bind(upper)
                    .bind(limit)
                    .fetch_all(pool)
                    .await
            }
            (QueryMode::Timestamp { column }, Bound::Timestamp(upper)) => {
                // A batch ends after a whole group of equal timestamps: find the timestamp of
                // the batch's last row, then read every row up to and including it.
                let t = q(column);
                let cut_sql = format!(
                    "SELECT {t}::timestamptz::text FROM {from} AS q \
                     WHERE {t}::timestamptz < $2::timestamptz AND ($1::timestamptz IS NULL OR {t}::timestamptz > $1::timestamptz) \
                     ORDER BY {t}::timestamptz OFFSET $3 LIMIT 1",
                    from = table.from
                );
                let cut: Option<String> = sqlx::query_scalar(&cut_sql)
                    .bind(table.timestamp.clone())
                    .bind(&upper)
                    .bind(limit - 1)
                    .fetch_optional(pool)
                    .await
                    .map_err(|e| sql_failure(e, "reading a batch"))?;
                let (until, inclusive) = match cut {
                    Some(cut) => (cut, "<="),
                    None => (upper, "<"),
                };
                let sql = format!(
                    "SELECT row_to_json(q)::text AS row, NULL::bigint AS inc, {t}::timestamptz::text AS ts FROM {from} AS q \
                     WHERE {t}::timestamptz {inclusive} $2::timestamptz AND ($1::timestamptz IS NULL OR {t}::timestamptz > $1::timestamptz) \
                     ORDER BY {t}::timestamptz",
                    from = table.from
                );
                sqlx::query(&sql)
                    .bind(table.timestamp.clone())
                    .bind(until)
                    .fetch_all(pool)
                    .await
            }
            _ => return Err(ConnectError::fatal("mode and bound disagree")),
        }
        .map_err(|e| sql_failure(e, "reading a batch"))?;
        let full = rows.len() >= self.config.batch_max_rows;
        let mut records = Vec::with_capacity(rows.len());
        let table = &mut self.tables[index];
        for row in rows {
            let value: String = row.try_get("row").map_err(|e| sql_failure(e, "row"))?;
            let inc: Option<i64> = row.try_get("inc").map_err(|e| sql_failure(e, "row"))?;
            let ts: Option<String> = row.try_get("ts").map_err(|e| sql_failure(e, "row"))?;
            let mut offset = SourceOffset::new();
            let mut record = Record::new(table.topic.clone())
                .with_value(value)
                .with_header(content_type::HEADER, content_type::JSON);
            if let Some(inc) = inc {
                table.incrementing = Some(inc);
                offset.insert("incrementing".into(), json!(inc));
                if let Some(column) = self.config.mode.incrementing() {
                    let key = Value::Object(Map::from_iter([(column.to_string(), json!(inc))]));
                    record = record.with_key(key.to_string());
                }
            }
            if let Some(ts) = ts {
                offset.insert("timestamp".into(), json!(ts));
                table.timestamp = Some(ts);
            }
            records.push(SourceRecord::new(record, table.partition.clone(), offset));
        }
        Ok((records, full))
    }

    /// The whole table, returned `batch.max.rows` at a time; no offsets.
    async fn read_bulk(&mut self, index: usize) -> ConnectResult<(Vec<SourceRecord>, bool)> {
        if self.pending.is_empty() {
            let table = &self.tables[index];
            let sql = format!("SELECT row_to_json(q)::text FROM {} AS q", table.from);
            let rows: Vec<String> = sqlx::query_scalar(&sql)
                .fetch_all(self.pool()?)
                .await
                .map_err(|e| sql_failure(e, "reading the table"))?;
            for value in rows {
                let record = Record::new(table.topic.clone())
                    .with_value(value)
                    .with_header(content_type::HEADER, content_type::JSON);
                self.pending.push_back(SourceRecord::new(
                    record,
                    SourcePartition::new(),
                    SourceOffset::new(),
                ));
            }
        }
        let take = self.pending.len().min(self.config.batch_max_rows);
        let records: Vec<SourceRecord> = self.pending.drain(..take).collect();
        Ok((records, !self.pending.is_empty()))
    }
}

#[derive(Debug)]
enum Bound {
    Incrementing(i64),
    Timestamp(String),
}

#[async_trait]
impl SourceTask for PostgresSourceTask {
    /// Connects, checks that other sessions' transactions are visible (the safe bound needs
    /// them), and reads the stored offsets.
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
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.config.connection.timeout)
            .connect_lazy_with(connect_options(&self.config.connection)?);
        if self.config.mode != QueryMode::Bulk {
            let sees_all: bool = sqlx::query_scalar(
                "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) \
                 OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')",
            )
            .fetch_one(&pool)
            .await
            .map_err(|e| sql_failure(e, "checking the user's roles"))?;
            if !sees_all {
                return Err(ConnectError::config(
                    crate::config::CONNECTION_USER,
                    "the query source must see every session's open transaction (pg_stat_activity) to never skip a late commit: GRANT pg_read_all_stats (or pg_monitor) TO this user",
                ));
            }
        }
        for table in &mut self.tables {
            if let Some(offset) = self.offsets.offset(&table.partition) {
                table.incrementing = offset.get("incrementing").and_then(Value::as_i64);
                table.timestamp = offset
                    .get("timestamp")
                    .and_then(Value::as_str)
                    .map(str::to_string);
            }
            tracing::info!(connector = %self.connector, table = %table.name, incrementing = ?table.incrementing, timestamp = ?table.timestamp, "query source resumes");
        }
        tracing::info!(connector = %self.connector, server = %redacted_url(&self.config.connection.url), %version, tables = self.tables.len(), "PostgreSQL query source started");
        self.pool = Some(pool);
        Ok(())
    }

    /// Reads the table due first; returns its batch, or nothing once `poll.interval.ms` passed
    /// with nothing new. A full batch makes the table due again at once.
    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        let Some(index) = (0..self.tables.len()).min_by_key(|i| self.tables[*i].due) else {
            return Ok(Vec::new());
        };
        tokio::time::sleep_until(self.tables[index].due).await;
        let (records, full) = self.read(index).await?;
        let table = &mut self.tables[index];
        table.due = if full {
            Instant::now()
        } else {
            Instant::now() + self.config.poll_interval
        };
        if !records.is_empty() {
            tracing::debug!(connector = %self.connector, table = %table.name, records = records.len(), "rows read");
        }
        Ok(records)
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        if let Some(pool) = self.pool.take() {
            pool.close().await;
        }
        Ok(())
    }
}
