//! Settings of the PostgreSQL sources (query mode and CDC), declared once and read into typed
//! structs. The connection settings are the sink's.

use std::time::Duration;

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, ParsedConfig, Props, Validator,
};

use crate::config::{
    CONNECTION_PASSWORD, CONNECTION_TIMEOUT_MS, CONNECTION_URL, CONNECTION_USER, ConnectionConfig,
};

pub const MODE: &str = "mode";
pub const TABLE_WHITELIST: &str = "table.whitelist";
pub const TABLE_INCLUDE: &str = "table.include";
pub const QUERY: &str = "query";
pub const INCREMENTING_COLUMN: &str = "incrementing.column.name";
pub const TIMESTAMP_COLUMN: &str = "timestamp.column.name";
pub const TIMESTAMP_DELAY_MS: &str = "timestamp.delay.interval.ms";
pub const TOPIC_PREFIX: &str = "topic.prefix";
pub const POLL_INTERVAL_MS: &str = "poll.interval.ms";
pub const BATCH_MAX_ROWS: &str = "batch.max.rows";

pub const SLOT_NAME: &str = "slot.name";
pub const SLOT_CREATE: &str = "slot.create";
pub const PUBLICATION_NAME: &str = "publication.name";
pub const PUBLICATION_CREATE: &str = "publication.create";
pub const SNAPSHOT_MODE: &str = "snapshot.mode";
pub const TOMBSTONES_ON_DELETE: &str = "tombstones.on.delete";
pub const HEARTBEAT_INTERVAL_MS: &str = "heartbeat.interval.ms";
pub const HEARTBEAT_TOPIC: &str = "heartbeat.topic";
pub const STATUS_INTERVAL_MS: &str = "status.interval.ms";

/// The longest interval accepted: a day. Longer ones are surely typos.
const MAX_MS: f64 = 86_400_000.0;

/// What a query-mode table is read by (Confluent's JDBC source modes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryMode {
    /// The whole table every `poll.interval.ms`; no offsets.
    Bulk,
    /// Rows whose strictly increasing column is above the stored value (new rows only).
    Incrementing { column: String },
    /// Rows whose timestamp column is after the stored one (new and updated rows).
    Timestamp { column: String },
    /// Ordered by (timestamp, incrementing): new and updated rows, resumable inside a group of
    /// equal timestamps.
    TimestampIncrementing {
        timestamp: String,
        incrementing: String,
    },
}

impl QueryMode {
    pub fn incrementing(&self) -> Option<&str> {
        match self {
            Self::Incrementing { column } => Some(column),
            Self::TimestampIncrementing { incrementing, .. } => Some(incrementing),
            _ => None,
        }
    }

    pub fn timestamp(&self) -> Option<&str> {
        match self {
            Self::Timestamp { column } => Some(column),
            Self::TimestampIncrementing { timestamp, .. } => Some(timestamp),
            _ => None,
        }
    }
}

/// What the query source reads: tables or one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sources {
    Tables(Vec<String>),
    Query(String),
}

#[derive(Debug, Clone)]
pub struct QuerySourceConfig {
    pub connection: ConnectionConfig,
    pub mode: QueryMode,
    pub sources: Sources,
    pub topic_prefix: String,
    pub poll_interval: Duration,
    pub batch_max_rows: usize,
    pub timestamp_delay: Duration,
}

fn connection_def() -> ConfigDef {
    ConfigDef::new()
        .define_required(CONNECTION_URL, ConfigType::String, Importance::High, "postgres://host:5432/database (libpq URL parameters such as sslmode=verify-full&sslrootcert=/ca.pem apply). Put no password here: use connection.password.")
        .with_validator(Validator::custom(|v| {
            let v = v.trim();
            if v.starts_with("postgres://") || v.starts_with("postgresql://") {
                Ok(())
            } else {
                Err("not a postgres:// or postgresql:// URL".into())
            }
        }))
        .define(CONNECTION_USER, ConfigType::String, "", Importance::High, "Database user (empty: the URL's).")
        .define(CONNECTION_PASSWORD, ConfigType::Password, "", Importance::High, "Password of connection.user; use ${env:...} or ${file:...}.")
        .define(CONNECTION_TIMEOUT_MS, ConfigType::Long, "10000", Importance::Low, "How long connecting may take before the attempt is retried.")
        .with_validator(Validator::between(1.0, MAX_MS))
        .in_group("Connection")
}

fn connection(parsed: &ParsedConfig) -> ConnectResult<ConnectionConfig> {
    Ok(ConnectionConfig {
        url: parsed.string(CONNECTION_URL)?.trim().to_string(),
        user: parsed.optional_string(CONNECTION_USER),
        password: parsed.optional_string(CONNECTION_PASSWORD),
        timeout: parsed.millis(CONNECTION_TIMEOUT_MS)?,
    })
}

fn undeclared(props: &Props, def: &ConfigDef, prefixes: &[&str], what: &str) -> ConnectResult<()> {
    match def.undeclared(props, prefixes) {
        Some(name) => Err(ConnectError::config(
            name,
            format!("not a setting of the {what} (misspelled?)"),
        )),
        None => Ok(()),
    }
}

fn identifier_check(value: &str) -> Result<(), String> {
    if value.contains('\0') {
        Err("must not contain a NUL character".into())
    } else {
        Ok(())
    }
}

pub fn query_def() -> ConfigDef {
    connection_def()
        .define_required(MODE, ConfigType::String, Importance::High, "bulk: the whole table at every poll; incrementing: new rows by a strictly increasing column; timestamp: new and updated rows by a timestamp column; timestamp+incrementing: both (resumable inside equal timestamps).")
        .with_validator(Validator::OneOf(vec!["bulk", "incrementing", "timestamp", "timestamp+incrementing"]))
        .define(TABLE_WHITELIST, ConfigType::List, "", Importance::High, "Tables to read ([schema.]table, case kept); each is a source partition with its own offset. Tasks share them. Or use query.")
        .with_validator(Validator::custom(identifier_check))
        .define(TABLE_INCLUDE, ConfigType::List, "", Importance::High, "Same as table.whitelist (the name the issue tracker uses); set one of them.")
        .with_validator(Validator::custom(identifier_check))
        .define(QUERY, ConfigType::String, "", Importance::High, "A SELECT to read instead of tables; the mode's columns must be among its result columns (it is wrapped as a subquery). One task.")
        .define(INCREMENTING_COLUMN, ConfigType::String, "", Importance::High, "The strictly increasing column (bigint, integer, a sequence) of incrementing modes; also the record key.")
        .with_validator(Validator::custom(identifier_check))
        .define(TIMESTAMP_COLUMN, ConfigType::String, "", Importance::High, "The timestamp column (timestamptz or timestamp) of timestamp modes. It must be set at or after its writing transaction's start: now(), CURRENT_TIMESTAMP, clock_timestamp() or a trigger.")
        .with_validator(Validator::custom(identifier_check))
        .define(TIMESTAMP_DELAY_MS, ConfigType::Long, "0", Importance::Low, "Extra lag for timestamp modes: rows newer than this are left for a later poll (for timestamps set by clients whose clocks run ahead). Never needed for correctness with server-set timestamps.")
        .with_validator(Validator::between(0.0, MAX_MS))
        .in_group("Query")
        .define_required(TOPIC_PREFIX, ConfigType::String, Importance::High, "Topic of a table: this prefix followed by the table name as configured; with query, the topic itself.")
        .with_validator(Validator::NonEmpty)
        .define(POLL_INTERVAL_MS, ConfigType::Long, "5000", Importance::Medium, "How often a table with nothing new is queried again.")
        .with_validator(Validator::between(1.0, MAX_MS))
        .define(BATCH_MAX_ROWS, ConfigType::Int, "100", Importance::Medium, "Rows per query at most (timestamp mode takes a whole group of equal timestamps, which may exceed it).")
        .with_validator(Validator::between(1.0, 1_000_000.0))
        .in_group("Output")
}

/// Prefixes of the query source's own settings.
const QUERY_PREFIXES: &[&str] = &[
    "connection.",
    "table.",
    "query",
    "mode",
    "incrementing.",
    "timestamp.",
    "topic.prefix",
    "poll.",
    "batch.",
];

impl QuerySourceConfig {
    pub fn parse(props: &Props) -> ConnectResult<Self> {
        let def = query_def();
        undeclared(props, &def, QUERY_PREFIXES, "PostgreSQL query source")?;
        let parsed = def.parse(props)?;
        let column = |name: &str| -> ConnectResult<String> {
            parsed
                .optional_string(name)
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .ok_or_else(|| ConnectError::config(name, "this mode needs the column"))
        };
        let mode = match parsed.string(MODE)?.trim() {
            "incrementing" => QueryMode::Incrementing {
                column: column(INCREMENTING_COLUMN)?,
            },
            "timestamp" => QueryMode::Timestamp {
                column: column(TIMESTAMP_COLUMN)?,
            },
            "timestamp+incrementing" => QueryMode::TimestampIncrementing {
                timestamp: column(TIMESTAMP_COLUMN)?,
                incrementing: column(INCREMENTING_COLUMN)?,
            },
            _ => QueryMode::Bulk,
        };
        let whitelist = parsed.list(TABLE_WHITELIST)?;
        let include = parsed.list(TABLE_INCLUDE)?;
        let query = parsed
            .optional_string(QUERY)
            .map(|q| q.trim().trim_end_matches(';').trim().to_string())
            .filter(|q| !q.is_empty());
        let sources = match (whitelist.is_empty(), include.is_empty(), query) {
            (true, true, Some(query)) => Sources::Query(query),
            (false, true, None) => Sources::Tables(whitelist),
            (true, false, None) => Sources::Tables(include),
            (true, true, None) => {
                return Err(ConnectError::config(
                    TABLE_WHITELIST,
                    "name the tables to read (table.whitelist) or a query",
                ));
            }
            (_, _, Some(_)) => {
                return Err(ConnectError::config(
                    QUERY,
                    "set either query or table.whitelist/table.include, not both",
                ));
            }
            (false, false, None) => {
                return Err(ConnectError::config(
                    TABLE_INCLUDE,
                    "table.include and table.whitelist are the same setting: set one",
                ));
            }
        };
        Ok(Self {
            connection: connection(&parsed)?,
            mode,
            sources,
            topic_prefix: parsed.string(TOPIC_PREFIX)?.trim().to_string(),
            poll_interval: parsed.millis(POLL_INTERVAL_MS)?,
            batch_max_rows: parsed.int_as(BATCH_MAX_ROWS)?,
            timestamp_delay: parsed.millis(TIMESTAMP_DELAY_MS)?,
        })
    }
}

/// What the CDC source does before streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Every row of the published tables as a read (`op: r`) when the slot is created.
    Initial,
    /// Changes only, from the slot's creation on.
    Never,
}

#[derive(Debug, Clone)]
pub struct CdcSourceConfig {
    pub connection: ConnectionConfig,
    pub slot: String,
    pub slot_create: bool,
    pub publication: String,
    pub publication_create: bool,
    /// Tables of the publication it creates; empty: `FOR ALL TABLES`.
    pub tables: Vec<String>,
    pub snapshot: SnapshotMode,
    pub topic_prefix: String,
    pub tombstones: bool,
    pub heartbeat_interval: Duration,
    pub heartbeat_topic: String,
    pub status_interval: Duration,
    pub batch_max_rows: usize,
}

fn slot_name_check(value: &str) -> Result<(), String> {
    let value = value.trim();
    if !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(())
    } else {
        Err(
            "lower-case letters, digits and _ only, at most 63 (PostgreSQL's rule for slot names)"
                .into(),
        )
    }
}

pub fn cdc_def() -> ConfigDef {
    connection_def()
        .define_required(SLOT_NAME, ConfigType::String, Importance::High, "The logical replication slot (pgoutput). Its confirmed position advances only to changes whose offsets are stored.")
        .with_validator(Validator::custom(slot_name_check))
        .define(SLOT_CREATE, ConfigType::Boolean, "true", Importance::Medium, "Create the slot when it does not exist and no offset is stored (needs the REPLICATION attribute). A slot missing while offsets are stored is an error, never silently re-created.")
        .define_required(PUBLICATION_NAME, ConfigType::String, Importance::High, "The publication whose tables are streamed.")
        .with_validator(Validator::custom(slot_name_check))
        .define(PUBLICATION_CREATE, ConfigType::Boolean, "true", Importance::Medium, "Create the publication when it does not exist: FOR TABLE table.include, or FOR ALL TABLES without it (needs superuser).")
        .define(TABLE_INCLUDE, ConfigType::List, "", Importance::High, "Tables ([schema.]table) of a publication this connector creates.")
        .with_validator(Validator::custom(identifier_check))
        .define(SNAPSHOT_MODE, ConfigType::String, "initial", Importance::Medium, "initial: when the slot is created, every row of the published tables is read (op r) from the slot's own snapshot, then changes stream from exactly there; never: changes only.")
        .with_validator(Validator::OneOf(vec!["initial", "never"]))
        .in_group("Replication")
        .define_required(TOPIC_PREFIX, ConfigType::String, Importance::High, "Topic of a table's changes: <topic.prefix>.<schema>.<table>.")
        .with_validator(Validator::NonEmpty)
        .define(TOMBSTONES_ON_DELETE, ConfigType::Boolean, "true", Importance::Medium, "After a delete, a record with the same key and a null value, so compacted topics forget the row.")
        .define(HEARTBEAT_INTERVAL_MS, ConfigType::Long, "10000", Importance::Medium, "While no change is pending, a heartbeat record with the server's WAL position is written this often, and once stored the slot is confirmed there: an idle slot does not hold WAL. 0: never (an idle slot then holds WAL written for other tables and databases).")
        .with_validator(Validator::between(0.0, MAX_MS))
        .define(HEARTBEAT_TOPIC, ConfigType::String, "", Importance::Low, "Topic of heartbeat records (empty: __medconnect-heartbeat.<topic.prefix>).")
        .define(STATUS_INTERVAL_MS, ConfigType::Long, "1000", Importance::Low, "How soon a stored position is reported to the server (standby status updates).")
        .with_validator(Validator::between(10.0, MAX_MS))
        .define(BATCH_MAX_ROWS, ConfigType::Int, "2048", Importance::Low, "Records per poll at most.")
        .with_validator(Validator::between(1.0, 1_000_000.0))
        .in_group("Output")
}

const CDC_PREFIXES: &[&str] = &[
    "connection.",
    "slot.",
    "publication.",
    "table.",
    "snapshot.",
    "topic.prefix",
    "tombstones.",
    "heartbeat.",
    "status.",
    "batch.",
];

impl CdcSourceConfig {
    pub fn parse(props: &Props) -> ConnectResult<Self> {
        let def = cdc_def();
        undeclared(props, &def, CDC_PREFIXES, "PostgreSQL CDC source")?;
        let parsed = def.parse(props)?;
        let topic_prefix = parsed.string(TOPIC_PREFIX)?.trim().to_string();
        let heartbeat_topic = parsed
            .optional_string(HEARTBEAT_TOPIC)
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| format!("__medconnect-heartbeat.{topic_prefix}"));
        Ok(Self {
            connection: connection(&parsed)?,
            slot: parsed.string(SLOT_NAME)?.trim().to_string(),
            slot_create: parsed.boolean(SLOT_CREATE)?,
            publication: parsed.string(PUBLICATION_NAME)?.trim().to_string(),
            publication_create: parsed.boolean(PUBLICATION_CREATE)?,
            tables: parsed.list(TABLE_INCLUDE)?,
            snapshot: if parsed.string(SNAPSHOT_MODE)?.trim() == "never" {
                SnapshotMode::Never
            } else {
                SnapshotMode::Initial
            },
            topic_prefix,
            tombstones: parsed.boolean(TOMBSTONES_ON_DELETE)?,
            heartbeat_interval: parsed.millis(HEARTBEAT_INTERVAL_MS)?,
            heartbeat_topic,
            status_interval: parsed.millis(STATUS_INTERVAL_MS)?,
            batch_max_rows: parsed.int_as(BATCH_MAX_ROWS)?,
        })
    }
}

/// `[schema.]table` as a quoted SQL name: each part quoted, so case and odd characters are kept.
pub fn quoted_table(name: &str) -> String {
    name.split('.')
        .map(crate::sql::quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use medconnect_api::props_from as props;

    fn field_of(result: ConnectResult<impl std::fmt::Debug>) -> String {
        match result {
            Err(ConnectError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    const URL: (&str, &str) = (CONNECTION_URL, "postgres://db/clinic");

    #[test]
    fn query_mode_settings_are_checked_by_name() {
        let q = |pairs: &[(&str, &str)]| QuerySourceConfig::parse(&props(pairs));
        let base = [URL, (TOPIC_PREFIX, "pg-"), (TABLE_WHITELIST, "obs")];
        assert_eq!(field_of(q(&base)), MODE);
        let with = |extra: &[(&str, &str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            q(&all)
        };
        assert_eq!(
            field_of(with(&[(MODE, "incrementing")])),
            INCREMENTING_COLUMN
        );
        assert_eq!(field_of(with(&[(MODE, "timestamp")])), TIMESTAMP_COLUMN);
        assert_eq!(field_of(with(&[(MODE, "bulk"), ("mode.x", "1")])), "mode.x");
        assert_eq!(
            field_of(with(&[(MODE, "bulk"), (QUERY, "SELECT 1")])),
            QUERY
        );
        assert_eq!(
            field_of(with(&[(MODE, "bulk"), ("batch.max.row", "3")])),
            "batch.max.row"
        );
        let config = with(&[
            (MODE, "timestamp+incrementing"),
            (TIMESTAMP_COLUMN, "updated_at"),
            (INCREMENTING_COLUMN, "id"),
        ])
        .expect("valid");
        assert_eq!(config.mode.timestamp(), Some("updated_at"));
        assert_eq!(config.mode.incrementing(), Some("id"));
        assert_eq!(config.sources, Sources::Tables(vec!["obs".into()]));
    }

    #[test]
    fn cdc_settings_are_checked_by_name() {
        let c = |pairs: &[(&str, &str)]| CdcSourceConfig::parse(&props(pairs));
        assert_eq!(
            field_of(c(&[
                URL,
                (SLOT_NAME, "Bad-Slot"),
                (PUBLICATION_NAME, "p"),
                (TOPIC_PREFIX, "t")
            ])),
            SLOT_NAME
        );
        assert_eq!(
            field_of(c(&[
                URL,
                (SLOT_NAME, "s"),
                (PUBLICATION_NAME, "p"),
                (TOPIC_PREFIX, "t"),
                ("heartbeat.interval", "5")
            ])),
            "heartbeat.interval"
        );
        let config = c(&[
            URL,
            (SLOT_NAME, "s"),
            (PUBLICATION_NAME, "p"),
            (TOPIC_PREFIX, "ehr"),
        ])
        .expect("valid");
        assert_eq!(config.heartbeat_topic, "__medconnect-heartbeat.ehr");
        assert!(config.tombstones && config.slot_create);
    }

    fn example(text: &str) -> Props {
        let json: serde_json::Value = serde_json::from_str(text).expect("JSON");
        json["config"]
            .as_object()
            .expect("config object")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("string values").to_string()))
            .collect()
    }

    #[test]
    fn the_example_connector_configs_are_valid() {
        let query = QuerySourceConfig::parse(&example(include_str!(
            "../../../../configs/postgres-query-source.json"
        )))
        .expect("valid query source");
        assert_eq!(query.mode.incrementing(), Some("id"));
        let cdc = CdcSourceConfig::parse(&example(include_str!(
            "../../../../configs/postgres-cdc-source.json"
        )))
        .expect("valid CDC source");
        assert_eq!(cdc.tables.len(), 2);
    }

    #[test]
    fn table_names_are_quoted_part_by_part() {
        assert_eq!(quoted_table("lab.Results"), "\"lab\".\"Results\"");
        assert_eq!(quoted_table("a\"b"), "\"a\"\"b\"");
    }
}
