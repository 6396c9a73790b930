//! Change data capture: logical replication with `pgoutput` through `pgwire-replication`.
//!
//! The task owns one logical replication slot. When it creates the slot (no offset stored) it
//! reads every row of the publication's tables from the slot's exported snapshot (`op: r`),
//! then streams from the slot's consistent point: inserts (`c`), updates (`u`), deletes (`d`,
//! and a tombstone). Each record's source offset says how far the slot may be confirmed once
//! that record is stored:
//! - a change that is not the last of its transaction: the transaction's commit LSN, which
//!   confirms every earlier transaction and makes the server send this one again (the offset's
//!   `txn` and `seq` then skip the changes already stored);
//! - the last change of a transaction: its commit's end LSN;
//! - a heartbeat (written while nothing is pending): the server's WAL position from a
//!   keepalive, past which it has sent everything.
//!
//! The slot is confirmed (`update_applied_lsn`, a standby status update) only in
//! [`SourceTask::commit`], with the offsets the engine stored: its `confirmed_flush_lsn` never
//! passes a change that is not in Kafka.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind,
    OffsetReader, Props, Record, SourceConnector, SourceOffset, SourcePartition, SourceRecord,
    SourceTask, SourceTaskContext, TaskConfig, content_type,
};
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, SslMode, TlsConfig,
};
use serde_json::{Map, Value, json};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection, PgPool, Row};
use tokio::time::Instant;

use super::config::{
    CdcSourceConfig, PUBLICATION_NAME, SLOT_NAME, SNAPSHOT_MODE, SnapshotMode, cdc_def,
    quoted_table,
};
use super::pgoutput::{self, Change, Column, OldRow, Relation};
use crate::config::{CONNECTION_PASSWORD, CONNECTION_URL, CONNECTION_USER, redacted_url};
use crate::error::{Failure, classify};
use crate::sink::{connect_options, connection_field, server_version};
use crate::sql::quote_ident;

/// PostgreSQL's epoch (2000-01-01) in Unix milliseconds.
const PG_EPOCH_MS: i64 = 946_684_800_000;

/// How long a poll waits for the first change before returning nothing, so the engine gets
/// to call `commit` with what it stored.
const IDLE_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
pub struct PostgresCdcSourceConnector;

#[async_trait]
impl Connector for PostgresCdcSourceConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.postgres.PostgresCdcSourceConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["PostgresCdcSource"]
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Source
    }

    fn config_def(&self) -> ConfigDef {
        cdc_def()
    }

    /// One slot is one stream: one task.
    fn max_tasks(&self) -> Option<u32> {
        Some(1)
    }

    /// Connects and checks `wal_level=logical`.
    async fn validate(&self, config: &Props) -> ConnectResult<()> {
        let config = CdcSourceConfig::parse(config)?;
        replication_config(&config)?;
        if let Err(error) = server_version(&config.connection).await? {
            return Err(ConnectError::config(
                connection_field(&error),
                format!("cannot connect to PostgreSQL: {error}"),
            ));
        }
        let mut connection = PgConnection::connect_with(&connect_options(&config.connection)?)
            .await
            .map_err(|e| ConnectError::config(CONNECTION_URL, e.to_string()))?;
        let level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
            .fetch_one(&mut connection)
            .await
            .map_err(|e| ConnectError::config(CONNECTION_URL, e.to_string()))?;
        let replication: bool = sqlx::query_scalar(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_one(&mut connection)
        .await
        .map_err(|e| ConnectError::config(CONNECTION_USER, e.to_string()))?;
        let _ = connection.close().await;
        if !replication {
            return Err(ConnectError::config(
                CONNECTION_USER,
                "the user needs the REPLICATION attribute (ALTER ROLE ... REPLICATION) to read a replication slot",
            ));
        }
        if level != "logical" {
            return Err(ConnectError::config(
                CONNECTION_URL,
                format!(
                    "the server runs with wal_level={level}; change data capture needs wal_level=logical (a restart)"
                ),
            ));
        }
        Ok(())
    }

    async fn task_configs(
        &self,
        context: &ConnectorContext,
        _max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        Ok(vec![context.config.clone()])
    }
}

impl SourceConnector for PostgresCdcSourceConnector {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        Ok(Box::new(PostgresCdcSourceTask::new(context)?))
    }
}

/// A table being read for the initial snapshot.
#[derive(Debug, Clone)]
struct SnapshotTable {
    schema: String,
    table: String,
    columns: Vec<Column>,
    key: Vec<String>,
}

struct Snapshot {
    /// The replication session that created the slot, waiting to start streaming.
    client: ReplicationClient,
    /// The transaction that imported the slot's snapshot.
    connection: PgConnection,
    tables: VecDeque<SnapshotTable>,
    /// The table whose cursor is open.
    current: Option<SnapshotTable>,
    consistent: u64,
}

enum Phase {
    NotStarted,
    Snapshot(Box<Snapshot>),
    Streaming(ReplicationClient),
    /// The stream ended: the next poll checks the slot and connects again.
    Broken,
}

/// A relation of the stream and what the records of its changes need.
#[derive(Debug, Clone)]
struct Table {
    relation: Relation,
    topic: String,
    key: Vec<String>,
    source_prefix: String,
}

#[derive(Debug, Clone, Copy)]
struct Txn {
    xid: u32,
    final_lsn: u64,
    commit_ms: i64,
    seq: u64,
}

pub struct PostgresCdcSourceTask {
    connector: String,
    config: CdcSourceConfig,
    offsets: Arc<dyn OffsetReader>,
    partition: SourcePartition,
    replication: ReplicationConfig,
    admin: Option<PgPool>,
    phase: Phase,
    tables: HashMap<u32, Arc<Table>>,
    txn: Option<Txn>,
    /// The latest change of the open transaction: whether it is the last is known only at
    /// the next message.
    held: Option<SourceRecord>,
    /// From the stored offset: changes of this transaction up to this sequence number are
    /// stored already (the slot was confirmed at its commit LSN, so it comes again).
    resume: Option<(u64, u64)>,
    /// The highest position a returned record lets the slot be confirmed to.
    emitted: u64,
    /// The server's WAL position from keepalives received while nothing was pending.
    idle_wal_end: u64,
    last_heartbeat: Instant,
    /// The position last given to the replication session as confirmed.
    confirmed: u64,
    /// The highest position of the offsets the engine stored.
    stored_lsn: u64,
}

impl std::fmt::Debug for PostgresCdcSourceTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresCdcSourceTask")
            .field("connector", &self.connector)
            .field("server", &redacted_url(&self.config.connection.url))
            .field("slot", &self.config.slot)
            .finish()
    }
}

fn unix_ms(pg_micros: i64) -> i64 {
    pg_micros / 1000 + PG_EPOCH_MS
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn sqlstate(error: &PgWireError) -> Option<&str> {
    match error {
        PgWireError::Server(message) => message
            .rsplit_once("(SQLSTATE ")
            .and_then(|(_, rest)| rest.get(..5)),
        _ => None,
    }
}

fn sql_failure(error: sqlx::Error, what: &str) -> ConnectError {
    let message = format!("{what}: {error}");
    match classify(&error) {
        Failure::Transient => ConnectError::retriable(message).caused_by(error),
        _ => ConnectError::fatal(message).caused_by(error),
    }
}

/// The connection settings as the replication client takes them: host, port, database and
/// TLS from the URL (`sslmode`, `sslrootcert`), user and password from the settings or the URL.
fn replication_config(config: &CdcSourceConfig) -> ConnectResult<ReplicationConfig> {
    let url = url::Url::parse(&config.connection.url)
        .map_err(|e| ConnectError::config(CONNECTION_URL, e.to_string()))?;
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let host = url
        .host_str()
        .ok_or_else(|| ConnectError::config(CONNECTION_URL, "no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let user = config
        .connection
        .user
        .clone()
        .or_else(|| (!url.username().is_empty()).then(|| decode(url.username())))
        .ok_or_else(|| {
            ConnectError::config(CONNECTION_USER, "no user in the settings or the URL")
        })?;
    let password = config
        .connection
        .password
        .clone()
        .or_else(|| url.password().map(decode))
        .unwrap_or_default();
    let database = decode(url.path().trim_start_matches('/'));
    let database = if database.is_empty() {
        user.clone()
    } else {
        database
    };
    let query: HashMap<String, String> = url.query_pairs().into_owned().collect();
    let ca = query.get("sslrootcert").map(std::path::PathBuf::from);
    let tls = match query.get("sslmode").map(String::as_str) {
        Some("disable") => TlsConfig::disabled(),
        Some("require") => TlsConfig::require(),
        Some("verify-ca") => TlsConfig::verify_ca(ca),
        Some("verify-full") if host.parse::<std::net::IpAddr>().is_ok() => {
            return Err(ConnectError::config(
                CONNECTION_URL,
                "sslmode=verify-full with an IP address: the replication client (pgwire-replication) verifies host names only; use the DNS name of the server's certificate, or sslmode=verify-ca",
            ));
        }
        Some("verify-full") => TlsConfig::verify_full(ca),
        None | Some("prefer") | Some("allow") => {
            let mut tls = TlsConfig::disabled();
            tls.mode = SslMode::Prefer;
            tls
        }
        Some(other) => {
            return Err(ConnectError::config(
                CONNECTION_URL,
                format!(
                    "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ),
            ));
        }
    };
    let mut replication = ReplicationConfig::new(
        host,
        user,
        password,
        database,
        config.slot.clone(),
        config.publication.clone(),
    )
    .with_port(url.port().unwrap_or(5432))
    .with_tls(tls)
    .with_status_interval(config.status_interval)
    .with_wakeup_interval(config.status_interval)
    .with_application_name(format!("medconnect-cdc-{}", config.slot));
    replication.buffer_events = 4096;
    Ok(replication)
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug)]
struct SlotState {
    plugin: Option<String>,
    database: Option<String>,
    wal_status: Option<String>,
    confirmed_flush: Option<u64>,
    active_pid: Option<i32>,
}

impl PostgresCdcSourceTask {
    pub fn new(context: SourceTaskContext) -> ConnectResult<Self> {
        let config = CdcSourceConfig::parse(&context.config)?;
        let replication = replication_config(&config)?;
        Ok(Self {
            partition: SourcePartition::from_iter([("slot".to_string(), json!(config.slot))]),
            connector: context.connector_name,
            offsets: context.offsets,
            replication,
            config,
            admin: None,
            phase: Phase::NotStarted,
            tables: HashMap::new(),
            txn: None,
            held: None,
            resume: None,
            emitted: 0,
            idle_wal_end: 0,
            last_heartbeat: Instant::now(),
            confirmed: 0,
            stored_lsn: 0,
        })
    }

    fn admin(&self) -> ConnectResult<&PgPool> {
        self.admin
            .as_ref()
            .ok_or_else(|| ConnectError::fatal("used before start"))
    }

    async fn slot_state(&self) -> ConnectResult<Option<SlotState>> {
        let row = sqlx::query(
            "SELECT plugin::text, database::text, wal_status, \
               (confirmed_flush_lsn - '0/0'::pg_lsn)::text AS confirmed, active_pid \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.config.slot)
        .fetch_optional(self.admin()?)
        .await
        .map_err(|e| sql_failure(e, "reading the replication slot"))?;
        let Some(row) = row else { return Ok(None) };
        let get = |name: &str| -> ConnectResult<Option<String>> {
            row.try_get(name)
                .map_err(|e| sql_failure(e, "reading the replication slot"))
        };
        Ok(Some(SlotState {
            plugin: get("plugin")?,
            database: get("database")?,
            wal_status: get("wal_status")?,
            confirmed_flush: get("confirmed")?.and_then(|c| c.parse().ok()),
            active_pid: row
                .try_get("active_pid")
                .map_err(|e| sql_failure(e, "reading the replication slot"))?,
        }))
    }

    /// The slot, once no session holds it (a crashed worker's walsender may hold it until the
    /// server notices the connection is gone), waiting at most `connection.timeout.ms`.
    async fn slot_when_free(&self) -> ConnectResult<Option<SlotState>> {
        let until = Instant::now() + self.config.connection.timeout;
        loop {
            let slot = self.slot_state().await?;
            match slot.as_ref().and_then(|s| s.active_pid) {
                None => return Ok(slot),
                Some(pid) if Instant::now() >= until => {
                    return Err(ConnectError::retriable(format!(
                        "replication slot \"{}\" is in use by process {pid}",
                        self.config.slot
                    )));
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// A slot that cannot give the changes the stored offsets need is a task error, never
    /// silently replaced.
    fn check_slot(&self, slot: &SlotState) -> ConnectResult<()> {
        if slot.wal_status.as_deref() == Some("lost") {
            return Err(ConnectError::fatal(format!(
                "replication slot \"{}\" is invalidated (wal_status=lost: the server removed WAL it still needed, see max_slot_wal_keep_size); changes since its confirmed position are gone. Drop the slot and this connector's offsets to snapshot again",
                self.config.slot
            )));
        }
        if slot.plugin.as_deref() != Some("pgoutput") {
            return Err(ConnectError::config(
                SLOT_NAME,
                format!(
                    "slot \"{}\" exists but is not a logical slot of pgoutput (plugin {:?})",
                    self.config.slot, slot.plugin
                ),
            ));
        }
        if slot.database.as_deref() != Some(self.replication.database.as_str()) {
            return Err(ConnectError::config(
                SLOT_NAME,
                format!(
                    "slot \"{}\" belongs to database {:?}, not {}",
                    self.config.slot, slot.database, self.replication.database
                ),
            ));
        }
        if slot.wal_status.as_deref() == Some("unreserved") {
            tracing::warn!(connector = %self.connector, slot = %self.config.slot, "replication slot is about to lose WAL it needs (wal_status=unreserved)");
        }
        Ok(())
    }

    async fn ensure_publication(&self) -> ConnectResult<()> {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
                .bind(&self.config.publication)
                .fetch_one(self.admin()?)
                .await
                .map_err(|e| sql_failure(e, "reading the publication"))?;
        if exists {
            return Ok(());
        }
        if !self.config.publication_create {
            return Err(ConnectError::config(
                PUBLICATION_NAME,
                format!(
                    "publication \"{}\" does not exist and publication.create=false",
                    self.config.publication
                ),
            ));
        }
        // A published table without a replica identity refuses its UPDATEs and DELETEs to
        // every application: never create such a publication.
        let tables: Vec<String> = self.config.tables.iter().map(|t| quoted_table(t)).collect();
        let unidentified: Vec<String> = sqlx::query_scalar(
            "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%' \
               AND (c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS \
                 (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))) \
               AND (cardinality($1::text[]) = 0 \
                 OR c.oid = ANY (SELECT to_regclass(t) FROM unnest($1::text[]) t)) \
             ORDER BY 1",
        )
        .bind(&tables)
        .fetch_all(self.admin()?)
        .await
        .map_err(|e| sql_failure(e, "reading the tables' replica identities"))?;
        if !unidentified.is_empty() {
            return Err(ConnectError::config(
                crate::source::config::TABLE_INCLUDE,
                format!(
                    "table(s) {} have no primary key nor replica identity: once published, their UPDATEs and DELETEs would fail for every application. Add a primary key or ALTER TABLE ... REPLICA IDENTITY FULL, or leave them out of table.include",
                    unidentified.join(", ")
                ),
            ));
        }
        let target = if self.config.tables.is_empty() {
            "FOR ALL TABLES".to_string()
        } else {
            format!("FOR TABLE {}", tables.join(", "))
        };
        let sql = format!(
            "CREATE PUBLICATION {} {target}",
            quote_ident(&self.config.publication)
        );
        match sqlx::query(&sql).execute(self.admin()?).await {
            Ok(_) => {
                tracing::info!(connector = %self.connector, publication = %self.config.publication, %target, "publication created");
                Ok(())
            }
            // Created meanwhile by someone else.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42710") => Ok(()),
            Err(error) => Err(ConnectError::config(
                PUBLICATION_NAME,
                format!("cannot create the publication: {error}"),
            )),
        }
    }

    fn stored(&self) -> Option<SourceOffset> {
        self.offsets.offset(&self.partition)
    }

    fn server_error(&self, error: PgWireError, what: &str) -> ConnectError {
        let message = format!("{what}: {error}");
        match sqlstate(&error) {
            Some("42704") => ConnectError::fatal(format!(
                "replication slot \"{}\" does not exist ({what}): it was dropped while this connector used it; changes since its last confirmed position may be lost. Drop this connector's offsets to snapshot again",
                self.config.slot
            )),
            Some("55000") => ConnectError::fatal(format!(
                "replication slot \"{}\" can no longer be read ({error}); it was invalidated. Drop the slot and this connector's offsets to snapshot again",
                self.config.slot
            )),
            Some("28P01") => ConnectError::config(CONNECTION_PASSWORD, message),
            Some(code) if code.starts_with("28") || code == "42501" => ConnectError::config(
                CONNECTION_USER,
                format!("{message} (the user needs the REPLICATION attribute)"),
            ),
            // Still held by a previous session; the 57 class is a server shutting down.
            Some("55006") | Some("53300") => ConnectError::retriable(message),
            Some(code) if code.starts_with("57") || code.starts_with("08") => {
                ConnectError::retriable(message)
            }
            Some(_) => ConnectError::fatal(message),
            None if error.is_transient() => ConnectError::retriable(message),
            None => match error {
                PgWireError::Auth(_) => ConnectError::config(CONNECTION_PASSWORD, message),
                PgWireError::Tls(_) => ConnectError::config(CONNECTION_URL, message),
                _ => ConnectError::retriable(message),
            },
        }
    }

    /// Starts streaming from `start` (zero: the slot's confirmed position).
    async fn stream_from(&mut self, start: u64) -> ConnectResult<()> {
        let config = self
            .replication
            .clone()
            .with_start_lsn(Lsn::from_u64(start))
            .with_ack_lsn(Lsn::from_u64(self.confirmed.max(self.stored_lsn)));
        let mut client = ReplicationClient::connect(config)
            .await
            .map_err(|e| self.server_error(e, "connecting for replication"))?;
        client
            .wait_started()
            .await
            .map_err(|e| self.server_error(e, "starting replication"))?;
        self.txn = None;
        self.held = None;
        self.phase = Phase::Streaming(client);
        tracing::info!(connector = %self.connector, slot = %self.config.slot, start = %Lsn::from_u64(start), confirmed = %Lsn::from_u64(self.confirmed), "streaming changes");
        Ok(())
    }

    /// Checks the slot and streams from the stored position (or the slot's).
    async fn open_stream(&mut self) -> ConnectResult<()> {
        let slot = self.slot_state().await?.ok_or_else(|| {
            ConnectError::fatal(format!(
                "replication slot \"{}\" does not exist although offsets are stored (confirmed up to LSN {}): it was dropped, and changes since may be lost. Drop this connector's offsets to snapshot again",
                self.config.slot,
                Lsn::from_u64(self.confirmed.max(self.emitted))
            ))
        })?;
        self.check_slot(&slot)?;
        self.confirmed = self.confirmed.max(slot.confirmed_flush.unwrap_or(0));
        let start = self.emitted.max(self.confirmed);
        self.stream_from(start).await
    }

    /// Creates the slot with an exported snapshot and opens the snapshot transaction.
    async fn begin_snapshot(&mut self) -> ConnectResult<()> {
        if let Some(slot) = self.slot_state().await? {
            if !self.config.slot_create {
                return Err(ConnectError::config(
                    SNAPSHOT_MODE,
                    format!(
                        "slot \"{}\" exists but no snapshot was completed; an initial snapshot needs to create the slot (slot.create=true), or use snapshot.mode=never",
                        self.config.slot
                    ),
                ));
            }
            if let Some(pid) = slot.active_pid {
                return Err(ConnectError::retriable(format!(
                    "slot \"{}\" is in use by process {pid}",
                    self.config.slot
                )));
            }
            // Nothing of it was ever stored: dropping it loses nothing the snapshot will not
            // read again.
            sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(&self.config.slot)
                .execute(self.admin()?)
                .await
                .map_err(|e| sql_failure(e, "dropping the slot of an unfinished snapshot"))?;
            tracing::info!(connector = %self.connector, slot = %self.config.slot, "dropped the slot of a snapshot that never completed");
        } else if !self.config.slot_create {
            return Err(ConnectError::config(
                SLOT_NAME,
                format!(
                    "slot \"{}\" does not exist and slot.create=false",
                    self.config.slot
                ),
            ));
        }
        let mut client = ReplicationClient::connect_gated(self.replication.clone())
            .await
            .map_err(|e| self.server_error(e, "connecting for replication"))?;
        let rows = client
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
                self.config.slot
            ))
            .await
            .map_err(|e| self.server_error(e, "creating the replication slot"))?;
        let text = |i: usize| -> ConnectResult<String> {
            rows.first()
                .and_then(|row| row.get(i).cloned().flatten())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .ok_or_else(|| ConnectError::fatal("CREATE_REPLICATION_SLOT answered no row"))
        };
        let consistent = Lsn::parse(&text(1)?)
            .map_err(|e| ConnectError::fatal(format!("CREATE_REPLICATION_SLOT: {e}")))?
            .as_u64();
        let snapshot_name = text(2)?;
        let mut connection = PgConnection::connect_with(&connect_options(&self.config.connection)?)
            .await
            .map_err(|e| sql_failure(e, "connecting for the snapshot"))?;
        execute(
            &mut connection,
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".into(),
        )
        .await
        .map_err(|e| sql_failure(e, "beginning the snapshot"))?;
        execute(
            &mut connection,
            format!(
                "SET TRANSACTION SNAPSHOT '{}'",
                snapshot_name.replace('\'', "''")
            ),
        )
        .await
        .map_err(|e| sql_failure(e, "importing the slot's snapshot"))?;
        let names: Vec<(String, String)> = sqlx::query_as(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
        )
        .bind(&self.config.publication)
        .fetch_all(self.admin()?)
        .await
        .map_err(|e| sql_failure(e, "listing the publication's tables"))?;
        let mut tables = VecDeque::new();
        for (schema, table) in names {
            let columns: Vec<(String, i64)> = sqlx::query_as(
                "SELECT a.attname::text, a.atttypid::int8 FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass(quote_ident($1) || '.' || quote_ident($2)) \
                 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
            )
            .bind(&schema)
            .bind(&table)
            .fetch_all(self.admin()?)
            .await
            .map_err(|e| sql_failure(e, "reading a table's columns"))?;
            let oid: i64 = sqlx::query_scalar(
                "SELECT to_regclass(quote_ident($1) || '.' || quote_ident($2))::oid::int8",
            )
            .bind(&schema)
            .bind(&table)
            .fetch_one(self.admin()?)
            .await
            .map_err(|e| sql_failure(e, "reading a table's oid"))?;
            let key = primary_key(self.admin()?, oid).await?;
            tables.push_back(SnapshotTable {
                columns: columns
                    .into_iter()
                    .map(|(name, oid)| Column {
                        key: key.contains(&name),
                        name,
                        type_oid: u32::try_from(oid).unwrap_or(0),
                    })
                    .collect(),
                key,
                schema,
                table,
            });
        }
        tracing::info!(connector = %self.connector, slot = %self.config.slot, consistent = %Lsn::from_u64(consistent), tables = tables.len(), "slot created; snapshot begins");
        self.phase = Phase::Snapshot(Box::new(Snapshot {
            client,
            connection,
            tables,
            current: None,
            consistent,
        }));
        Ok(())
    }

    fn topic(&self, schema: &str, table: &str) -> String {
        format!("{}.{schema}.{table}", self.config.topic_prefix)
    }

    /// The fixed part of a table's `source` block, rendered once per table:
    /// `{"connector":...,"slot":...,` (the per-change fields follow).
    fn source_prefix(&self, schema: &str, table: &str) -> String {
        let text = |s: &str| Value::String(s.to_string()).to_string();
        format!(
            "{{\"connector\":\"postgresql\",\"name\":{},\"db\":{},\"schema\":{},\"table\":{},\"slot\":{},",
            text(&self.connector),
            text(&self.replication.database),
            text(schema),
            text(table),
            text(&self.config.slot)
        )
    }

    /// The next rows of the snapshot, or `None` when it is complete.
    async fn snapshot_batch(&mut self) -> ConnectResult<Option<Vec<SourceRecord>>> {
        let (table, rows, consistent) = {
            let Phase::Snapshot(snapshot) = &mut self.phase else {
                return Ok(Some(Vec::new()));
            };
            loop {
                let Some(table) = snapshot.current.clone() else {
                    let Some(next) = snapshot.tables.pop_front() else {
                        return Ok(None);
                    };
                    let columns: Vec<String> = next
                        .columns
                        .iter()
                        // The type's output function, as pgoutput sends it (`::text` differs
                        // for some types: bool gives true, not t; inet adds /32).
                        .map(|c| {
                            let c = quote_ident(&c.name);
                            format!("CASE WHEN {c} IS NULL THEN NULL ELSE format('%s', {c}) END")
                        })
                        .collect();
                    let sql = format!(
                        "DECLARE medconnect_snapshot NO SCROLL CURSOR FOR SELECT {} FROM {}.{}",
                        if columns.is_empty() {
                            "1".to_string()
                        } else {
                            columns.join(", ")
                        },
                        quote_ident(&next.schema),
                        quote_ident(&next.table)
                    );
                    execute(&mut snapshot.connection, sql)
                        .await
                        .map_err(|e| sql_failure(e, "opening the snapshot cursor"))?;
                    tracing::info!(connector = %self.connector, schema = %next.schema, table = %next.table, "snapshot of a table");
                    snapshot.current = Some(next);
                    continue;
                };
                let rows = fetch(
                    &mut snapshot.connection,
                    format!(
                        "FETCH {} FROM medconnect_snapshot",
                        self.config.batch_max_rows
                    ),
                )
                .await
                .map_err(|e| sql_failure(e, "reading the snapshot"))?;
                if rows.is_empty() {
                    execute(&mut snapshot.connection, "CLOSE medconnect_snapshot".into())
                        .await
                        .map_err(|e| sql_failure(e, "closing the snapshot cursor"))?;
                    snapshot.current = None;
                    continue;
                }
                break (table, rows, snapshot.consistent);
            }
        };
        let topic = self.topic(&table.schema, &table.table);
        let prefix = self.source_prefix(&table.schema, &table.table);
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            let mut after = Map::new();
            for (i, column) in table.columns.iter().enumerate() {
                let text: Option<String> = row
                    .try_get(i)
                    .map_err(|e| sql_failure(e, "reading the snapshot"))?;
                let value = text
                    .map(|t| pgoutput::to_json(column.type_oid, &t))
                    .unwrap_or(Value::Null);
                after.insert(column.name.clone(), value);
            }
            let key = key_of(&table.key, &after);
            let value = envelope("r", None, Some(&after), &prefix, consistent, None, true);
            let mut record = Record::new(topic.clone())
                .with_value(value)
                .with_header(content_type::HEADER, content_type::JSON);
            record.key = key.map(|k| k.to_string().into());
            let offset = Map::from_iter([("snapshot".to_string(), json!(true))]);
            records.push(SourceRecord::new(record, self.partition.clone(), offset));
        }
        Ok(Some(records))
    }

    /// Commits the snapshot transaction and starts streaming from the slot's consistent
    /// point; the heartbeat returned marks the snapshot complete once stored.
    async fn finish_snapshot(&mut self) -> ConnectResult<SourceRecord> {
        let Phase::Snapshot(snapshot) = std::mem::replace(&mut self.phase, Phase::Broken) else {
            return Err(ConnectError::fatal("no snapshot to finish"));
        };
        let Snapshot {
            mut client,
            mut connection,
            consistent,
            ..
        } = *snapshot;
        execute(&mut connection, "COMMIT".into())
            .await
            .map_err(|e| sql_failure(e, "ending the snapshot"))?;
        let _ = connection.close().await;
        client
            .start()
            .await
            .map_err(|e| self.server_error(e, "starting replication"))?;
        client
            .wait_started()
            .await
            .map_err(|e| self.server_error(e, "starting replication"))?;
        self.phase = Phase::Streaming(client);
        tracing::info!(connector = %self.connector, slot = %self.config.slot, consistent = %Lsn::from_u64(consistent), "snapshot complete; streaming changes");
        self.emitted = consistent;
        Ok(self.heartbeat(consistent))
    }

    fn heartbeat(&mut self, lsn: u64) -> SourceRecord {
        self.last_heartbeat = Instant::now();
        let key = json!({"slot": self.config.slot});
        let value = json!({"slot": self.config.slot, "lsn": lsn, "ts_ms": now_ms()});
        let record = Record::new(self.config.heartbeat_topic.clone())
            .with_key(key.to_string())
            .with_value(value.to_string())
            .with_header(content_type::HEADER, content_type::JSON);
        let offset = Map::from_iter([
            ("lsn".to_string(), json!(lsn)),
            ("txn".to_string(), json!(0)),
            ("seq".to_string(), json!(0)),
        ]);
        SourceRecord::new(record, self.partition.clone(), offset)
    }

    /// Looks up the primary key of a relation the stream describes.
    async fn learn(&mut self, relation: Relation) -> ConnectResult<()> {
        let mut key = primary_key(self.admin()?, i64::from(relation.id)).await?;
        if key.is_empty() {
            // No primary key: the replica identity's columns, if any.
            key = relation
                .columns
                .iter()
                .filter(|c| c.key)
                .map(|c| c.name.clone())
                .collect();
        }
        let topic = self.topic(&relation.schema, &relation.table);
        let source_prefix = self.source_prefix(&relation.schema, &relation.table);
        self.tables.insert(
            relation.id,
            Arc::new(Table {
                relation,
                topic,
                key,
                source_prefix,
            }),
        );
        Ok(())
    }

    /// Holds a change record; the one held before is not its transaction's last.
    fn hold(&mut self, record: Record, out: &mut Vec<SourceRecord>) {
        let Some(txn) = self.txn.as_mut() else { return };
        txn.seq += 1;
        let (final_lsn, seq) = (txn.final_lsn, txn.seq);
        if let Some((stored_txn, stored_seq)) = self.resume
            && stored_txn == final_lsn
            && seq <= stored_seq
        {
            return;
        }
        let offset = Map::from_iter([
            ("lsn".to_string(), json!(final_lsn)),
            ("txn".to_string(), json!(final_lsn)),
            ("seq".to_string(), json!(seq)),
        ]);
        if let Some(previous) =
            self.held
                .replace(SourceRecord::new(record, self.partition.clone(), offset))
        {
            out.push(previous);
        }
    }

    fn change(
        &mut self,
        lsn: u64,
        change: Change,
        out: &mut Vec<SourceRecord>,
    ) -> ConnectResult<()> {
        let (relation, op, before, after) = match change {
            // Learned by the caller (it needs the catalog).
            Change::Relation(_) => return Ok(()),
            Change::Insert { relation, new } => (relation, "c", None, Some(new)),
            Change::Update { relation, old, new } => (relation, "u", old, Some(new)),
            Change::Delete { relation, old } => (relation, "d", Some(old), None),
            Change::Truncate { relations } => {
                let names: Vec<String> = relations
                    .iter()
                    .filter_map(|id| self.tables.get(id))
                    .map(|t| format!("{}.{}", t.relation.schema, t.relation.table))
                    .collect();
                tracing::warn!(connector = %self.connector, tables = ?names, "TRUNCATE is not streamed as records");
                return Ok(());
            }
            Change::Other(_) => return Ok(()),
        };
        let table = self.tables.get(&relation).cloned().ok_or_else(|| {
            ConnectError::fatal(format!(
                "a change of relation {relation} before its description"
            ))
        })?;
        let columns = &table.relation.columns;
        let before = before.map(|old| match old {
            OldRow::Key(datums) => pgoutput::row_json(columns, &datums, true),
            OldRow::Full(datums) => pgoutput::row_json(columns, &datums, false),
        });
        let after = after.map(|new| pgoutput::row_json(columns, &new, false));
        let new_key = after.as_ref().and_then(|row| key_of(&table.key, row));
        let old_key = before
            .as_ref()
            .and_then(|row| key_of(&table.key, row))
            .filter(|key| {
                key.as_object()
                    .is_some_and(|k| k.values().all(|v| !v.is_null()))
            });
        match op {
            // A primary key changed: as Debezium, a delete of the old key (and its tombstone,
            // so compacted topics forget it), then a create under the new one.
            "u" if old_key.is_some() && old_key != new_key => {
                self.emit(&table, "d", before.as_ref(), None, old_key, lsn, out);
                self.emit(&table, "c", None, after.as_ref(), new_key, lsn, out);
            }
            "d" => self.emit(&table, op, before.as_ref(), None, old_key, lsn, out),
            _ => self.emit(
                &table,
                op,
                before.as_ref(),
                after.as_ref(),
                new_key,
                lsn,
                out,
            ),
        }
        Ok(())
    }

    /// Holds the record of one change, and after a delete its tombstone.
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        table: &Table,
        op: &str,
        before: Option<&Map<String, Value>>,
        after: Option<&Map<String, Value>>,
        key: Option<Value>,
        lsn: u64,
        out: &mut Vec<SourceRecord>,
    ) {
        let value = envelope(
            op,
            before,
            after,
            &table.source_prefix,
            lsn,
            self.txn,
            false,
        );
        let commit_ms = self.txn.map(|t| t.commit_ms);
        let mut record = Record::new(table.topic.clone())
            .with_value(value)
            .with_header(content_type::HEADER, content_type::JSON);
        record.key = key.as_ref().map(|k| k.to_string().into());
        record.timestamp = commit_ms;
        self.hold(record, out);
        if op == "d" && self.config.tombstones {
            let mut tombstone = Record::new(table.topic.clone());
            tombstone.key = key.map(|k| k.to_string().into());
            tombstone.timestamp = commit_ms;
            self.hold(tombstone, out);
        }
    }

    /// Handles one event of the stream.
    async fn event(
        &mut self,
        event: ReplicationEvent,
        out: &mut Vec<SourceRecord>,
    ) -> ConnectResult<()> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                if let Some(held) = self.held.take() {
                    // Cannot happen (a transaction ends with a commit); never lose it.
                    out.push(held);
                }
                self.txn = Some(Txn {
                    xid,
                    final_lsn: final_lsn.as_u64(),
                    commit_ms: unix_ms(commit_time_micros),
                    seq: 0,
                });
            }
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                let change = pgoutput::decode(&data).map_err(|e| {
                    ConnectError::fatal(format!("replication stream: {e}")).caused_by(e)
                })?;
                if let Change::Relation(relation) = &change {
                    self.learn(relation.clone()).await?;
                } else {
                    self.change(wal_start.as_u64(), change, out)?;
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                let end = end_lsn.as_u64();
                if let Some(mut last) = self.held.take() {
                    last.source_offset.insert("lsn".into(), json!(end));
                    out.push(last);
                    self.emitted = self.emitted.max(end);
                } else {
                    // Nothing of it to write (or all of it stored before): a heartbeat may
                    // confirm past it.
                    self.idle_wal_end = self.idle_wal_end.max(end);
                }
                if self
                    .resume
                    .is_some_and(|(txn, _)| self.txn.is_some_and(|t| t.final_lsn >= txn))
                {
                    self.resume = None;
                }
                self.txn = None;
            }
            ReplicationEvent::KeepAlive { wal_end, .. }
                if self.txn.is_none() && self.held.is_none() =>
            {
                self.idle_wal_end = self.idle_wal_end.max(wal_end.as_u64());
            }
            _ => {}
        }
        Ok(())
    }

    async fn poll_stream(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        let mut out = Vec::new();
        let deadline = Instant::now() + IDLE_POLL;
        while out.len() < self.config.batch_max_rows {
            if !self.config.heartbeat_interval.is_zero()
                && self.last_heartbeat.elapsed() >= self.config.heartbeat_interval
                && self.txn.is_none()
                && self.held.is_none()
                && self.idle_wal_end > self.emitted
            {
                let lsn = self.idle_wal_end;
                out.push(self.heartbeat(lsn));
                self.emitted = lsn;
            }
            let Phase::Streaming(client) = &mut self.phase else {
                return Ok(out);
            };
            let wait = if out.is_empty() {
                deadline.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            let received = match tokio::time::timeout(wait, client.recv()).await {
                Err(_) => break,
                Ok(received) => received,
            };
            match received {
                Ok(Some(event)) => self.event(event, &mut out).await?,
                Ok(None) => {
                    self.phase = Phase::Broken;
                    return Err(ConnectError::retriable(
                        "the replication stream ended; connecting again",
                    ));
                }
                Err(error) => {
                    self.phase = Phase::Broken;
                    let error = self.server_error(error, "replication stream");
                    tracing::warn!(connector = %self.connector, slot = %self.config.slot, %error, "replication stream lost");
                    return Err(error);
                }
            }
        }
        Ok(out)
    }
}

type SqlFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, sqlx::Error>> + Send + 'a>>;

/// Runs statements on the snapshot's connection. Boxed: sqlx's executor on a borrowed
/// connection inside `async_trait` methods trips the compiler's higher-ranked lifetime checks.
fn execute(connection: &mut PgConnection, sql: String) -> SqlFuture<'_, ()> {
    Box::pin(async move {
        sqlx::Executor::execute(connection, sql.as_str())
            .await
            .map(|_| ())
    })
}

fn fetch(connection: &mut PgConnection, sql: String) -> SqlFuture<'_, Vec<sqlx::postgres::PgRow>> {
    // Not cached: `FETCH` from the one cursor name returns each table's own columns, and a
    // cached statement would keep the first table's row description.
    Box::pin(async move {
        sqlx::query(&sql)
            .persistent(false)
            .fetch_all(connection)
            .await
    })
}

/// A record's value: the envelope written straight into one string (no intermediate JSON
/// tree for the fixed parts).
fn envelope(
    op: &str,
    before: Option<&Map<String, Value>>,
    after: Option<&Map<String, Value>>,
    source_prefix: &str,
    lsn: u64,
    txn: Option<Txn>,
    snapshot: bool,
) -> String {
    let row = |row: Option<&Map<String, Value>>| {
        row.and_then(|r| serde_json::to_string(r).ok())
            .unwrap_or_else(|| "null".to_string())
    };
    let optional = |n: Option<String>| n.unwrap_or_else(|| "null".to_string());
    format!(
        "{{\"op\":\"{op}\",\"before\":{},\"after\":{},\"source\":{source_prefix}\"lsn\":{lsn},\"commit_lsn\":{},\"txId\":{},\"ts_ms\":{},\"snapshot\":{snapshot}}},\"ts_ms\":{}}}",
        row(before),
        row(after),
        optional(txn.map(|t| t.final_lsn.to_string())),
        optional(txn.map(|t| t.xid.to_string())),
        optional(txn.map(|t| t.commit_ms.to_string())),
        now_ms()
    )
}

/// The key columns of a row as a JSON object (`None` without key columns).
fn key_of(key: &[String], row: &Map<String, Value>) -> Option<Value> {
    if key.is_empty() {
        return None;
    }
    Some(Value::Object(
        key.iter()
            .map(|k| (k.clone(), row.get(k).cloned().unwrap_or(Value::Null)))
            .collect(),
    ))
}

async fn primary_key(pool: &PgPool, oid: i64) -> ConnectResult<Vec<String>> {
    sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey::int2[]) \
         WHERE i.indrelid = $1::int8::oid AND i.indisprimary \
         ORDER BY array_position(i.indkey::int2[], a.attnum)",
    )
    .bind(oid)
    .fetch_all(pool)
    .await
    .map_err(|e| sql_failure(e, "reading a table's primary key"))
}

#[async_trait]
impl SourceTask for PostgresCdcSourceTask {
    /// Connects, makes sure of the publication, checks the slot against the stored offsets,
    /// then either creates the slot and begins the snapshot, or streams from where the stored
    /// offsets say.
    async fn start(&mut self) -> ConnectResult<()> {
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
        self.admin = Some(
            PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(self.config.connection.timeout)
                .connect_lazy_with(connect_options(&self.config.connection)?),
        );
        self.ensure_publication().await?;
        let stored = self.stored();
        let streamed = stored.as_ref().is_some_and(|o| {
            o.get("snapshot") != Some(&Value::Bool(true)) && o.contains_key("lsn")
        });
        let slot = self.slot_when_free().await?;
        if let Some(slot) = &slot {
            self.check_slot(slot)?;
        }
        if streamed {
            let offset = stored.unwrap_or_default();
            let lsn = offset.get("lsn").and_then(Value::as_u64).unwrap_or(0);
            let txn = offset.get("txn").and_then(Value::as_u64).unwrap_or(0);
            let seq = offset.get("seq").and_then(Value::as_u64).unwrap_or(0);
            if txn != 0 && lsn == txn {
                self.resume = Some((txn, seq));
            }
            self.emitted = lsn;
            self.stored_lsn = lsn;
            self.confirmed = slot.as_ref().and_then(|s| s.confirmed_flush).unwrap_or(0);
            tracing::info!(connector = %self.connector, slot = %self.config.slot, stored = %Lsn::from_u64(lsn), resume = ?self.resume, "resuming from the stored offset");
            return self.open_stream().await;
        }
        match (self.config.snapshot, slot) {
            (SnapshotMode::Initial, _) => self.begin_snapshot().await,
            (SnapshotMode::Never, Some(slot)) => {
                self.confirmed = slot.confirmed_flush.unwrap_or(0);
                self.stream_from(0).await
            }
            (SnapshotMode::Never, None) => {
                if !self.config.slot_create {
                    return Err(ConnectError::config(
                        SLOT_NAME,
                        format!(
                            "slot \"{}\" does not exist and slot.create=false",
                            self.config.slot
                        ),
                    ));
                }
                sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
                    .bind(&self.config.slot)
                    .execute(self.admin()?)
                    .await
                    .map_err(|e| {
                        ConnectError::config(SLOT_NAME, format!("cannot create the slot: {e}"))
                    })?;
                tracing::info!(connector = %self.connector, slot = %self.config.slot, "slot created (no snapshot)");
                self.stream_from(0).await
            }
        }
    }

    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        match self.phase {
            Phase::NotStarted => Err(ConnectError::fatal("poll before start")),
            Phase::Snapshot(_) => match self.snapshot_batch().await? {
                Some(records) => Ok(records),
                None => Ok(vec![self.finish_snapshot().await?]),
            },
            Phase::Streaming(_) => self.poll_stream().await,
            Phase::Broken => {
                self.open_stream().await?;
                self.poll_stream().await
            }
        }
    }

    /// Confirms the slot up to the stored offsets (never further).
    async fn commit(&mut self, stored: &[(SourcePartition, SourceOffset)]) -> ConnectResult<()> {
        let Some(lsn) = stored
            .iter()
            .filter(|(partition, _)| *partition == self.partition)
            .filter_map(|(_, offset)| offset.get("lsn").and_then(Value::as_u64))
            .max()
        else {
            return Ok(());
        };
        self.stored_lsn = self.stored_lsn.max(lsn);
        if lsn <= self.confirmed {
            return Ok(());
        }
        if let Phase::Streaming(client) = &self.phase {
            client.update_applied_lsn(Lsn::from_u64(lsn));
            self.confirmed = lsn;
            tracing::debug!(connector = %self.connector, slot = %self.config.slot, confirmed = %Lsn::from_u64(lsn), "slot confirmed up to the stored offsets");
        }
        Ok(())
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        match std::mem::replace(&mut self.phase, Phase::NotStarted) {
            Phase::Streaming(mut client) => {
                let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
            }
            Phase::Snapshot(snapshot) => {
                let _ = snapshot.connection.close().await;
            }
            _ => {}
        }
        if let Some(pool) = self.admin.take() {
            pool.close().await;
        }
        Ok(())
    }
}
