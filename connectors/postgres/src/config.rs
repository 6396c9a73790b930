//! Settings of the PostgreSQL sink, declared once and read into a typed struct.

use std::time::Duration;

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, ParsedConfig, Props, Validator,
};

use crate::table::TableTemplate;

pub const CONNECTION_URL: &str = "connection.url";
pub const CONNECTION_USER: &str = "connection.user";
pub const CONNECTION_PASSWORD: &str = "connection.password";
pub const CONNECTION_TIMEOUT_MS: &str = "connection.timeout.ms";
pub const TABLE_NAME_FORMAT: &str = "table.name.format";
pub const INSERT_MODE: &str = "insert.mode";
pub const PK_MODE: &str = "pk.mode";
pub const PK_FIELDS: &str = "pk.fields";
pub const DELETE_ENABLED: &str = "delete.enabled";
pub const AUTO_CREATE: &str = "auto.create";
pub const AUTO_EVOLVE: &str = "auto.evolve";
pub const AUTO_CREATE_TIMESTAMPTZ: &str = "auto.create.timestamptz";
pub const VALUE_MODE: &str = "value.mode";
pub const VALUE_COLUMN: &str = "value.column";
pub const FIELDS_INCLUDE: &str = "fields.include";
pub const FIELDS_EXCLUDE: &str = "fields.exclude";
pub const BATCH_SIZE: &str = "batch.size";
pub const BATCH_MAX_BYTES: &str = "batch.max.bytes";

/// Rows per batch (one `COPY` or statement, one transaction) by default. PostgreSQL 15 spends
/// about a millisecond of CPU per `COPY` and commit besides the rows' own work (the backend's
/// CPU time for 200,000 rows: 0.16 s in 67 COPYs of 3,000, 0.09 s in one), so with
/// Confluent's 3,000 the server alone, pre-rendered rows and no client work, reached only
/// 0.56-0.64 of one `COPY`; at 20,000, 0.91-1.0.
pub const DEFAULT_BATCH_SIZE: usize = 20_000;

/// Bytes of keys, values and headers per batch by default: with large records a batch ends
/// here long before `batch.size` rows, so a task's buffer stays bounded whatever the record
/// size (16 MiB of COPY text is ~100 ms of the server's work, against ~1 ms per batch).
pub const DEFAULT_BATCH_MAX_BYTES: usize = 16 * 1024 * 1024;

/// The columns of `pk.mode=kafka`: where the record was read, which makes each row's key
/// unique to its record, so a record delivered again lands on its own row.
pub const KAFKA_TOPIC_COLUMN: &str = "__connect_topic";
pub const KAFKA_PARTITION_COLUMN: &str = "__connect_partition";
pub const KAFKA_OFFSET_COLUMN: &str = "__connect_offset";

/// Prefixes of this connector's own settings: an undeclared setting under one of them is a
/// typo (`insert.mod`), refused by name instead of silently falling back to a default.
const OWN_PREFIXES: &[&str] = &[
    "connection.",
    "table.",
    "insert.",
    "pk.",
    "delete.",
    "auto.",
    "value.",
    "fields.",
    "batch.",
];

/// The longest timeout accepted: a day. Longer ones are surely typos.
const MAX_TIMEOUT_MS: f64 = 86_400_000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertMode {
    /// `INSERT`; with `pk.mode=kafka` a row already there is left alone (`ON CONFLICT DO
    /// NOTHING`), as only a redelivered record can have its key.
    Insert,
    /// `INSERT ... ON CONFLICT (pk) DO UPDATE`: the latest record of a key wins.
    Upsert,
    /// `UPDATE` of the row with the record's key; a key with no row changes nothing.
    Update,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PkMode {
    /// No primary key: every record is a new row (redelivery duplicates rows).
    None,
    /// `__connect_topic`, `__connect_partition`, `__connect_offset`.
    Kafka,
    /// The record key: the fields of a JSON object key (`pk.fields` picks some), or a
    /// primitive key into the one column `pk.fields` names.
    RecordKey { fields: Vec<String> },
    /// These fields of the record value.
    RecordValue { fields: Vec<String> },
}

impl PkMode {
    pub fn has_key(&self) -> bool {
        !matches!(self, Self::None)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueMode {
    /// Each top-level field of a JSON object value is a column; an HL7 v2 value
    /// (`content-type: application/hl7-v2`) goes as text into `value.column`.
    Columns,
    /// The whole JSON value in the `jsonb` column `value.column`, beside the key columns.
    Jsonb,
    /// The whole value, as UTF-8 text, in the `text` column `value.column` (HL7 v2, CSV lines).
    Text,
}

/// Which top-level fields of a value become columns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldFilter {
    /// Empty: every field.
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl FieldFilter {
    pub fn keeps(&self, field: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|f| f == field))
            && !self.exclude.iter().any(|f| f == field)
    }
}

/// How the database is reached.
#[derive(Clone)]
pub struct ConnectionConfig {
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub timeout: Duration,
}

impl std::fmt::Debug for ConnectionConfig {
    /// The URL may carry a password (`postgres://u:secret@host`): only its host part is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionConfig")
            .field("host", &redacted_url(&self.url))
            .field("user", &self.user)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A URL without its user info, for logs.
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub connection: ConnectionConfig,
    pub table: TableTemplate,
    pub insert_mode: InsertMode,
    pub pk_mode: PkMode,
    pub delete_enabled: bool,
    pub auto_create: bool,
    pub auto_evolve: bool,
    /// New columns for ISO-8601 strings with a zone are `timestamptz` rather than `text`.
    pub timestamptz: bool,
    pub value_mode: ValueMode,
    pub value_column: String,
    pub fields: FieldFilter,
    pub batch_size: usize,
    /// Bytes of keys, values and headers per batch at most (a record larger than this is a
    /// batch alone).
    pub batch_max_bytes: usize,
}

fn url_check(value: &str) -> Result<(), String> {
    let value = value.trim();
    if value.starts_with("postgres://") || value.starts_with("postgresql://") {
        Ok(())
    } else {
        Err("not a postgres:// or postgresql:// URL".into())
    }
}

pub fn sink_def() -> ConfigDef {
    ConfigDef::new()
        .define_required(CONNECTION_URL, ConfigType::String, Importance::High, "postgres://host:5432/database (libpq URL parameters such as sslmode=verify-full&sslrootcert=/ca.pem apply). Put no password here: use connection.password.")
        .with_validator(Validator::custom(url_check))
        .define(CONNECTION_USER, ConfigType::String, "", Importance::High, "Database user (empty: the URL's).")
        .define(CONNECTION_PASSWORD, ConfigType::Password, "", Importance::High, "Password of connection.user; use ${env:...} or ${file:...}.")
        .define(CONNECTION_TIMEOUT_MS, ConfigType::Long, "10000", Importance::Low, "How long getting a connection may take before the write is retried.")
        .with_validator(Validator::between(1.0, MAX_TIMEOUT_MS))
        .in_group("Connection")
        .define(TABLE_NAME_FORMAT, ConfigType::String, "${topic}", Importance::Medium, "Table of a record; ${topic} stands for its topic. One identifier (always quoted, so dots and case are kept), in the connection's search_path.")
        .with_validator(Validator::custom(|v| TableTemplate::parse(v).map(|_| ())))
        .define(INSERT_MODE, ConfigType::String, "insert", Importance::High, "insert: INSERT (with pk.mode=kafka, a row already there is kept: a redelivery); upsert: INSERT ... ON CONFLICT (pk) DO UPDATE; update: UPDATE the row of the key.")
        .with_validator(Validator::OneOf(vec!["insert", "upsert", "update"]))
        .define(PK_MODE, ConfigType::String, "none", Importance::High, "none; kafka (__connect_topic, __connect_partition, __connect_offset); record_key (fields of a JSON object key, or a primitive key into the one column pk.fields names); record_value (pk.fields of the value).")
        .with_validator(Validator::OneOf(vec!["none", "kafka", "record_key", "record_value"]))
        .define(PK_FIELDS, ConfigType::List, "", Importance::Medium, "Primary key columns: for record_value required; for record_key the key's fields to use (empty: all), or the column of a primitive key.")
        .define(DELETE_ENABLED, ConfigType::Boolean, "false", Importance::Medium, "A record with a null value (tombstone) deletes the row of its key (needs pk.mode=record_key). Otherwise tombstones are skipped.")
        .define(AUTO_CREATE, ConfigType::Boolean, "false", Importance::Medium, "Create a missing table, with column types inferred from the first records and the primary key of pk.mode.")
        .define(AUTO_EVOLVE, ConfigType::Boolean, "false", Importance::Medium, "Add a nullable column for a field the table does not have. Otherwise such a record is reported as errant.")
        .define(AUTO_CREATE_TIMESTAMPTZ, ConfigType::Boolean, "false", Importance::Low, "With auto.create/auto.evolve, a string in ISO-8601 form with a zone (2024-01-01T12:00:00Z, 2024-01-01 12:00:00.5+01:00) makes a timestamptz column instead of text.")
        .define(VALUE_MODE, ConfigType::String, "columns", Importance::Medium, "columns: each top-level field of a JSON object value is a column (an HL7 v2 value, content-type application/hl7-v2, goes as text into value.column); jsonb: the whole JSON value in the value.column column beside the key columns; text: the whole value as UTF-8 text in value.column.")
        .with_validator(Validator::OneOf(vec!["columns", "jsonb", "text"]))
        .define(VALUE_COLUMN, ConfigType::String, "value", Importance::Low, "The column of a whole value (value.mode jsonb or text, HL7 v2 values).")
        .with_validator(Validator::NonEmpty)
        .define(FIELDS_INCLUDE, ConfigType::List, "", Importance::Low, "Value fields written as columns (empty: all). Key columns are always written.")
        .define(FIELDS_EXCLUDE, ConfigType::List, "", Importance::Low, "Value fields never written as columns.")
        .in_group("Data")
        .define(BATCH_SIZE, ConfigType::Int, DEFAULT_BATCH_SIZE.to_string(), Importance::Medium, "Rows per statement and transaction at most; records are buffered until this many, batch.max.bytes, or flush (the engine's offset flush). Larger batches commit less often: PostgreSQL pays about a millisecond per COPY and a WAL flush per commit.")
        .with_validator(Validator::between(1.0, 1_000_000.0))
        .define(BATCH_MAX_BYTES, ConfigType::Long, DEFAULT_BATCH_MAX_BYTES.to_string(), Importance::Low, "Bytes of record keys, values and headers per batch at most: a batch is written once this much is buffered even before batch.size rows, which bounds a task's memory with large records (a larger record is a batch alone).")
        .with_validator(Validator::between(1.0, 1_073_741_824.0))
        .in_group("Writes")
}

fn unknown_settings(props: &Props, def: &ConfigDef) -> ConnectResult<()> {
    match def.undeclared(props, OWN_PREFIXES) {
        Some(name) => Err(ConnectError::config(
            name,
            "not a setting of the PostgreSQL sink (misspelled?)",
        )),
        None => Ok(()),
    }
}

fn one_of<T: Clone>(parsed: &ParsedConfig, name: &str, values: &[(&str, T)]) -> ConnectResult<T> {
    let given = parsed.string(name)?;
    values
        .iter()
        .find(|(text, _)| *text == given.trim())
        .map(|(_, value)| value.clone())
        .ok_or_else(|| ConnectError::config(name, format!("'{given}' is not a known value")))
}

impl SinkConfig {
    /// Parses a task's or connector's settings; refuses undeclared settings of its own and
    /// combinations that cannot work.
    pub fn parse(props: &Props) -> ConnectResult<Self> {
        let def = sink_def();
        unknown_settings(props, &def)?;
        let parsed = def.parse(props)?;
        let pk_fields = parsed.list(PK_FIELDS)?;
        let pk_mode = match parsed.string(PK_MODE)?.trim() {
            "kafka" => PkMode::Kafka,
            "record_key" => PkMode::RecordKey { fields: pk_fields },
            "record_value" if pk_fields.is_empty() => {
                return Err(ConnectError::config(
                    PK_FIELDS,
                    "pk.mode=record_value needs the value fields of the key",
                ));
            }
            "record_value" => PkMode::RecordValue { fields: pk_fields },
            _ => PkMode::None,
        };
        let insert_mode = one_of(
            &parsed,
            INSERT_MODE,
            &[
                ("insert", InsertMode::Insert),
                ("upsert", InsertMode::Upsert),
                ("update", InsertMode::Update),
            ],
        )?;
        if insert_mode != InsertMode::Insert && !pk_mode.has_key() {
            return Err(ConnectError::config(
                PK_MODE,
                "insert.mode upsert and update need a key: pk.mode kafka, record_key or record_value",
            ));
        }
        let delete_enabled = parsed.boolean(DELETE_ENABLED)?;
        // Only the key of a tombstone says which row it deletes.
        if delete_enabled && !matches!(pk_mode, PkMode::RecordKey { .. }) {
            return Err(ConnectError::config(
                DELETE_ENABLED,
                "deleting on tombstones needs pk.mode=record_key",
            ));
        }
        let value_mode = match parsed.string(VALUE_MODE)?.trim() {
            "jsonb" => ValueMode::Jsonb,
            "text" => ValueMode::Text,
            _ => ValueMode::Columns,
        };
        if value_mode != ValueMode::Columns && matches!(pk_mode, PkMode::RecordValue { .. }) {
            return Err(ConnectError::config(
                PK_MODE,
                "value.mode jsonb and text have no value columns to key on: use record_key or kafka",
            ));
        }
        let table = TableTemplate::parse(&parsed.string(TABLE_NAME_FORMAT)?)
            .map_err(|reason| ConnectError::config(TABLE_NAME_FORMAT, reason))?;
        Ok(Self {
            connection: ConnectionConfig {
                url: parsed.string(CONNECTION_URL)?.trim().to_string(),
                user: parsed.optional_string(CONNECTION_USER),
                password: parsed.optional_string(CONNECTION_PASSWORD),
                timeout: parsed.millis(CONNECTION_TIMEOUT_MS)?,
            },
            table,
            insert_mode,
            pk_mode,
            delete_enabled,
            auto_create: parsed.boolean(AUTO_CREATE)?,
            auto_evolve: parsed.boolean(AUTO_EVOLVE)?,
            timestamptz: parsed.boolean(AUTO_CREATE_TIMESTAMPTZ)?,
            value_mode,
            value_column: parsed.string(VALUE_COLUMN)?.trim().to_string(),
            fields: FieldFilter {
                include: parsed.list(FIELDS_INCLUDE)?,
                exclude: parsed.list(FIELDS_EXCLUDE)?,
            },
            batch_size: parsed.int_as(BATCH_SIZE)?,
            batch_max_bytes: parsed.int_as(BATCH_MAX_BYTES)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use medconnect_api::props_from as props;

    fn field_of(pairs: &[(&str, &str)]) -> String {
        match SinkConfig::parse(&props(pairs)) {
            Err(ConnectError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    const URL: (&str, &str) = (CONNECTION_URL, "postgres://db:5432/clinic");

    #[test]
    fn defaults_with_a_url_are_valid() {
        let config = SinkConfig::parse(&props(&[URL])).expect("valid");
        assert_eq!(config.insert_mode, InsertMode::Insert);
        assert_eq!(config.pk_mode, PkMode::None);
        assert_eq!(config.value_mode, ValueMode::Columns);
        assert_eq!(config.table.resolve("vitals"), "vitals");
        assert_eq!(config.batch_size, 20_000);
        assert_eq!(config.batch_max_bytes, 16 * 1024 * 1024);
        assert!(!config.delete_enabled && !config.auto_create && !config.auto_evolve);
    }

    #[test]
    fn errors_name_the_setting() {
        assert_eq!(field_of(&[]), CONNECTION_URL);
        assert_eq!(field_of(&[(CONNECTION_URL, "http://db")]), CONNECTION_URL);
        assert_eq!(field_of(&[URL, (INSERT_MODE, "merge")]), INSERT_MODE);
        assert_eq!(field_of(&[URL, (INSERT_MODE, "upsert")]), PK_MODE);
        assert_eq!(field_of(&[URL, (PK_MODE, "record_value")]), PK_FIELDS);
        assert_eq!(field_of(&[URL, (DELETE_ENABLED, "true")]), DELETE_ENABLED);
        assert_eq!(field_of(&[URL, (BATCH_SIZE, "0")]), BATCH_SIZE);
        assert_eq!(field_of(&[URL, (BATCH_MAX_BYTES, "0")]), BATCH_MAX_BYTES);
        assert_eq!(field_of(&[URL, (TABLE_NAME_FORMAT, "")]), TABLE_NAME_FORMAT);
        assert_eq!(field_of(&[URL, ("insert.mod", "upsert")]), "insert.mod");
        assert_eq!(
            field_of(&[
                URL,
                (VALUE_MODE, "jsonb"),
                (PK_MODE, "record_value"),
                (PK_FIELDS, "id")
            ]),
            PK_MODE
        );
    }

    #[test]
    fn connect_settings_pass_and_passwords_stay_out_of_debug() {
        let config = SinkConfig::parse(&props(&[
            (CONNECTION_URL, "postgres://u:hunter2@db/clinic"),
            (CONNECTION_PASSWORD, "hunter3"),
            ("topics", "vitals"),
            ("errors.tolerance", "all"),
        ]))
        .expect("valid");
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "{shown}"
        );
    }

    #[test]
    fn the_example_connector_config_is_valid() {
        let json: serde_json::Value =
            serde_json::from_str(include_str!("../../../configs/postgres-sink.json"))
                .expect("JSON");
        let props: Props = json["config"]
            .as_object()
            .expect("config object")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("string values").to_string()))
            .collect();
        let config = SinkConfig::parse(&props).expect("valid");
        assert_eq!(config.insert_mode, InsertMode::Upsert);
        assert!(config.auto_create && config.auto_evolve);
    }
}
