//! Settings of the Elasticsearch sink, declared once and read into a typed struct.

use std::time::Duration;

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, ParsedConfig, Props, Validator,
};

use crate::index::IndexTemplate;

pub const CONNECTION_URL: &str = "connection.url";
pub const CONNECTION_USERNAME: &str = "connection.username";
pub const CONNECTION_PASSWORD: &str = "connection.password";
pub const CONNECTION_API_KEY: &str = "connection.api.key";
pub const CONNECTION_TIMEOUT_MS: &str = "connection.timeout.ms";
pub const CONNECTION_TLS_CA_FILE: &str = "connection.tls.ca.file";
pub const CONNECTION_COMPRESSION: &str = "connection.compression";
pub const READ_TIMEOUT_MS: &str = "read.timeout.ms";
pub const INDEX: &str = "index";
pub const INDEX_TEMPLATE_NAME: &str = "index.template.name";
pub const INDEX_TEMPLATE_FILE: &str = "index.template.file";
pub const INDEX_TEMPLATE_JSON: &str = "index.template.json";
pub const DATA_STREAM_TYPE: &str = "data.stream.type";
pub const DATA_STREAM_DATASET: &str = "data.stream.dataset";
pub const DATA_STREAM_NAMESPACE: &str = "data.stream.namespace";
pub const KEY_IGNORE: &str = "key.ignore";
pub const WRITE_METHOD: &str = "write.method";
pub const BEHAVIOR_ON_NULL_VALUES: &str = "behavior.on.null.values";
pub const BEHAVIOR_ON_MALFORMED_DOCUMENTS: &str = "behavior.on.malformed.documents";
pub const BATCH_SIZE: &str = "batch.size";
pub const BULK_SIZE_BYTES: &str = "bulk.size.bytes";
pub const MAX_IN_FLIGHT_REQUESTS: &str = "max.in.flight.requests";
pub const LINGER_MS: &str = "linger.ms";
pub const MAX_RETRIES: &str = "max.retries";
pub const RETRY_BACKOFF_MS: &str = "retry.backoff.ms";

/// Prefixes of this connector's own settings. A setting under one of them that the connector
/// does not declare is a typo (`behaviour.on.null.values`), refused by name instead of
/// silently falling back to a default. Connect's common settings (`topics`, `errors.*`,
/// `transforms.*`, ...) are under none of them.
const OWN_PREFIXES: &[&str] = &[
    "connection.",
    "behavior.",
    "write.",
    "bulk.",
    "batch.",
    "linger.",
    "max.in.flight",
    "max.retries",
    "retry.",
    "read.",
    "index.",
    "data.stream.",
];

/// The longest timeout or backoff accepted: a day. Longer ones are surely typos, and deadlines
/// computed from them must stay within what a clock can represent.
const MAX_TIMEOUT_MS: f64 = 86_400_000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMethod {
    /// `index` (key ids: the latest record wins) or `create` (position ids: a document once
    /// written never changes, and a conflict means it is already there).
    Insert,
    /// `update` with `doc_as_upsert`: fields of the record are merged into the document.
    Upsert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NullValues {
    Ignore,
    /// A tombstone deletes the document with the record key's id.
    Delete,
    /// Reported as errant (dead-letter topic or task failure per `errors.tolerance`).
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MalformedDocuments {
    Ignore,
    Warn,
    /// Reported as errant with the cluster's error type and reason.
    Fail,
}

/// A secret that never shows in `Debug` output (configs and clients get logged and printed).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[hidden]")
    }
}

/// How the cluster is reached.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    pub urls: Vec<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Sent as `Authorization: ApiKey <value>` (the encoded key the cluster hands out).
    pub api_key: Option<Secret>,
    /// PEM file of the CA(s) that signed the cluster's certificate, trusted besides the
    /// system's roots for `https://` URLs.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// gzip the bodies of `_bulk` requests (`Content-Encoding: gzip`).
    pub compression: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

/// An index template (`PUT _index_template/<name>`) put before the first write.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateSetup {
    pub name: String,
    /// The template's body: `index_patterns`, `template.settings`/`mappings`, ...
    pub body: serde_json::Value,
}

/// Documents go to the data stream `<type>-<dataset>-<namespace>` instead of `index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataStream {
    pub kind: String,
    /// `None`: the record's topic, made a valid dataset name.
    pub dataset: Option<String>,
    pub namespace: String,
}

impl DataStream {
    pub fn name(&self, topic: &str) -> String {
        let dataset = match &self.dataset {
            Some(dataset) => dataset.clone(),
            None => dataset_of_topic(topic),
        };
        format!("{}-{dataset}-{}", self.kind, self.namespace)
    }
}

/// A topic as a dataset: lower case, and `_` for what a dataset may not contain (`-`, and
/// anything but letters, digits, `_` and `.`).
fn dataset_of_topic(topic: &str) -> String {
    let dataset: String = topic
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dataset.trim_start_matches(['_', '.']).to_string()
}

/// A dataset or namespace: lower-case letters, digits, `_` and `.`, at most 100 characters.
fn data_stream_part(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 100 {
        return Err(format!("'{value}' must have 1 to 100 characters"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
        || value.starts_with(['_', '.'])
    {
        return Err(format!(
            "'{value}' may have only lower-case letters, digits, _ and . (no -), and not start with _ or ."
        ));
    }
    Ok(())
}

/// Where the body of the index template comes from: read at `start`/`validate`, not while
/// the task's settings are parsed (no I/O in `create_task`).
#[derive(Debug, Clone, PartialEq)]
pub enum TemplateSource {
    File(std::path::PathBuf),
    Inline(serde_json::Value),
}

/// The settings `index.template.*`.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateSpec {
    pub name: String,
    pub source: TemplateSource,
}

impl TemplateSpec {
    /// The template with its body, the file read (an error on `index.template.file`).
    pub fn load(&self) -> ConnectResult<TemplateSetup> {
        let body = match &self.source {
            TemplateSource::Inline(body) => body.clone(),
            TemplateSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConnectError::config(
                        INDEX_TEMPLATE_FILE,
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                template_body(&text, INDEX_TEMPLATE_FILE)?
            }
        };
        Ok(TemplateSetup {
            name: self.name.clone(),
            body,
        })
    }
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub connection: ConnectionConfig,
    pub index: IndexTemplate,
    pub template: Option<TemplateSpec>,
    pub data_stream: Option<DataStream>,
    /// Document ids from topic+partition+offset instead of the record key.
    pub key_ignore: bool,
    pub write_method: WriteMethod,
    pub null_values: NullValues,
    pub malformed: MalformedDocuments,
    pub batch_size: usize,
    pub bulk_size_bytes: usize,
    pub max_in_flight: usize,
    pub linger: Duration,
    pub max_retries: u32,
    pub retry_backoff: Duration,
}

fn url_check(value: &str) -> Result<(), String> {
    let value = value.trim();
    if value.starts_with("http://") || value.starts_with("https://") {
        Ok(())
    } else {
        Err(format!("'{value}' is not an http:// or https:// URL"))
    }
}

pub fn sink_def() -> ConfigDef {
    ConfigDef::new()
        .define_required(CONNECTION_URL, ConfigType::List, Importance::High, "URLs of the cluster's nodes (http://host:9200), comma-separated; requests go round-robin, and a retry goes to the next.")
        .with_validator(Validator::custom(url_check))
        .define(CONNECTION_USERNAME, ConfigType::String, "", Importance::Medium, "User for HTTP basic authentication (empty: none).")
        .define(CONNECTION_PASSWORD, ConfigType::Password, "", Importance::Medium, "Password for HTTP basic authentication; use ${env:...} or ${file:...}.")
        .define(CONNECTION_API_KEY, ConfigType::Password, "", Importance::Medium, "API key (the encoded form: base64 of id:key) sent as Authorization: ApiKey; instead of a user and password. Use ${env:...} or ${file:...}.")
        .define(CONNECTION_TLS_CA_FILE, ConfigType::String, "", Importance::Medium, "PEM file with the CA certificate(s) that signed the cluster's certificate (https:// URLs); trusted besides the system's roots. Empty: the system's roots only.")
        .define(CONNECTION_COMPRESSION, ConfigType::Boolean, "false", Importance::Low, "true: gzip the bodies of _bulk requests (Content-Encoding: gzip), trading the task's CPU for less network.")
        .define(CONNECTION_TIMEOUT_MS, ConfigType::Long, "1000", Importance::Low, "How long establishing a connection may take.")
        .with_validator(Validator::between(1.0, MAX_TIMEOUT_MS))
        .define(READ_TIMEOUT_MS, ConfigType::Long, "15000", Importance::Low, "How long a request may wait for the cluster's answer; then it is retried.")
        .with_validator(Validator::between(1.0, MAX_TIMEOUT_MS))
        .in_group("Connection")
        .define(INDEX, ConfigType::String, "${topic}", Importance::High, "Index of the documents: ${topic} stands for the record's topic (lower-cased), ${yyyy.MM.dd} (any of yyyy, MM, dd, HH with separators) for the record's timestamp in UTC, e.g. vitals-${yyyy.MM.dd}.")
        .with_validator(Validator::custom(|v| IndexTemplate::parse(v).map(|_| ())))
        .define(INDEX_TEMPLATE_NAME, ConfigType::String, "", Importance::Medium, "Name of an index template put (PUT _index_template/<name>, replacing one of that name) before the first write; its body from index.template.file or index.template.json. Empty: none.")
        .define(INDEX_TEMPLATE_FILE, ConfigType::String, "", Importance::Medium, "JSON file with the index template's body (index_patterns, template.mappings, ...); needs index.template.name.")
        .define(INDEX_TEMPLATE_JSON, ConfigType::String, "", Importance::Medium, "The index template's body inline, instead of index.template.file.")
        .define(DATA_STREAM_TYPE, ConfigType::String, "", Importance::Medium, "logs, metrics, traces or synthetics: write to the data stream <type>-<dataset>-<namespace> (op_type create, @timestamp from the record's timestamp) instead of index. Empty: no data stream. Needs key.ignore=true and write.method=insert.")
        .with_validator(Validator::OneOf(vec!["", "logs", "metrics", "traces", "synthetics"]))
        .define(DATA_STREAM_DATASET, ConfigType::String, "", Importance::Medium, "The data stream's dataset (lower case, no -); empty: the record's topic (lower-cased, - and other characters as _).")
        .define(DATA_STREAM_NAMESPACE, ConfigType::String, "default", Importance::Low, "The data stream's namespace (lower case, no -).")
        .define(KEY_IGNORE, ConfigType::Boolean, "false", Importance::High, "true: document id topic+partition+offset (each record its own document); false: the record key (the latest record of a key wins).")
        .define(WRITE_METHOD, ConfigType::String, "insert", Importance::Medium, "insert: the record value is the document; upsert: its fields are merged into the document of the same id.")
        .with_validator(Validator::OneOf(vec!["insert", "upsert"]))
        .define(BEHAVIOR_ON_NULL_VALUES, ConfigType::String, "fail", Importance::Medium, "A record with a null value (tombstone): ignore it, delete the document of its key (needs key.ignore=false), or fail (reported as errant: dead-letter topic or task failure per errors.tolerance).")
        .with_validator(Validator::OneOf(vec!["ignore", "delete", "fail"]))
        .define(BEHAVIOR_ON_MALFORMED_DOCUMENTS, ConfigType::String, "fail", Importance::Medium, "A document the cluster refuses (mapping errors) or a value that is not a JSON object: ignore it, warn (logged without its content) or fail (reported as errant with the error type and reason).")
        .with_validator(Validator::OneOf(vec!["ignore", "warn", "fail"]))
        .in_group("Data")
        .define(BATCH_SIZE, ConfigType::Int, "1000", Importance::Medium, "Documents per _bulk request at most.")
        .with_validator(Validator::between(1.0, 1_000_000.0))
        .define(BULK_SIZE_BYTES, ConfigType::Long, "5242880", Importance::Low, "Bytes of NDJSON per _bulk request at most (a larger single document is sent alone).")
        .with_validator(Validator::between(1024.0, 2_147_483_647.0))
        .define(MAX_IN_FLIGHT_REQUESTS, ConfigType::Int, "5", Importance::Medium, "_bulk requests in flight at once per task.")
        .with_validator(Validator::between(1.0, 1000.0))
        .define(LINGER_MS, ConfigType::Long, "1", Importance::Low, "How long a partial batch waits for more documents before it is sent.")
        .with_validator(Validator::between(0.0, MAX_TIMEOUT_MS))
        .define(MAX_RETRIES, ConfigType::Int, "5", Importance::Medium, "Retries of a request the cluster pushes back on (429, es_rejected_execution_exception, 5xx, unreachable) before its documents wait in the queue, with the task's partitions paused, for the next round. The task does not fail for this.")
        .with_validator(Validator::between(0.0, 30.0))
        .define(RETRY_BACKOFF_MS, ConfigType::Long, "100", Importance::Low, "Wait before the first retry, doubled at each one (a longer Retry-After from the cluster is honoured).")
        .with_validator(Validator::between(1.0, MAX_TIMEOUT_MS))
        .in_group("Bulk")
}

fn unknown_settings(props: &Props, def: &ConfigDef) -> ConnectResult<()> {
    match def.undeclared(props, OWN_PREFIXES) {
        Some(name) => Err(ConnectError::config(
            name,
            "not a setting of the Elasticsearch sink (misspelled?)",
        )),
        None => Ok(()),
    }
}

/// The index template of `index.template.*`: a name and a JSON object, from a file or inline.
fn template_setup(parsed: &ParsedConfig) -> ConnectResult<Option<TemplateSpec>> {
    let name = parsed.optional_string(INDEX_TEMPLATE_NAME);
    let file = parsed.optional_string(INDEX_TEMPLATE_FILE);
    let inline = parsed.optional_string(INDEX_TEMPLATE_JSON);
    let (source, setting) = match (file, inline) {
        (None, None) => {
            return match name {
                Some(_) => Err(ConnectError::config(
                    INDEX_TEMPLATE_NAME,
                    "needs index.template.file or index.template.json",
                )),
                None => Ok(None),
            };
        }
        (Some(_), Some(_)) => {
            return Err(ConnectError::config(
                INDEX_TEMPLATE_JSON,
                "either index.template.file or index.template.json, not both",
            ));
        }
        (Some(path), None) => (
            TemplateSource::File(std::path::PathBuf::from(path)),
            INDEX_TEMPLATE_FILE,
        ),
        (None, Some(inline)) => (
            TemplateSource::Inline(template_body(&inline, INDEX_TEMPLATE_JSON)?),
            INDEX_TEMPLATE_JSON,
        ),
    };
    let Some(name) = name else {
        return Err(ConnectError::config(
            INDEX_TEMPLATE_NAME,
            format!("required with {setting}"),
        ));
    };
    if let Err(reason) = IndexTemplate::parse(&name) {
        return Err(ConnectError::config(INDEX_TEMPLATE_NAME, reason));
    }
    Ok(Some(TemplateSpec { name, source }))
}

/// A template's body: a JSON object with `index_patterns`.
fn template_body(text: &str, setting: &str) -> ConnectResult<serde_json::Value> {
    let body: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ConnectError::config(setting, format!("not JSON: {e}")))?;
    if !body.is_object() {
        return Err(ConnectError::config(setting, "not a JSON object"));
    }
    if body.get("index_patterns").is_none() {
        return Err(ConnectError::config(
            setting,
            "an index template needs index_patterns",
        ));
    }
    Ok(body)
}

/// The data stream of `data.stream.*`, or `None` without a type.
fn data_stream(parsed: &ParsedConfig) -> ConnectResult<Option<DataStream>> {
    let Some(kind) = parsed.optional_string(DATA_STREAM_TYPE) else {
        return Ok(None);
    };
    let dataset = parsed.optional_string(DATA_STREAM_DATASET);
    if let Some(dataset) = &dataset {
        data_stream_part(dataset).map_err(|r| ConnectError::config(DATA_STREAM_DATASET, r))?;
    }
    let namespace = parsed.string(DATA_STREAM_NAMESPACE)?.trim().to_string();
    data_stream_part(&namespace).map_err(|r| ConnectError::config(DATA_STREAM_NAMESPACE, r))?;
    Ok(Some(DataStream {
        kind: kind.trim().to_string(),
        dataset,
        namespace,
    }))
}

fn one_of<T: Copy>(parsed: &ParsedConfig, name: &str, values: &[(&str, T)]) -> ConnectResult<T> {
    let given = parsed.string(name)?;
    values
        .iter()
        .find(|(text, _)| *text == given.trim())
        .map(|(_, value)| *value)
        .ok_or_else(|| ConnectError::config(name, format!("'{given}' is not a known value")))
}

impl SinkConfig {
    /// Parses a task's or connector's settings; refuses undeclared settings of its own and
    /// combinations that cannot work.
    pub fn parse(props: &Props) -> ConnectResult<Self> {
        let def = sink_def();
        unknown_settings(props, &def)?;
        let parsed = def.parse(props)?;
        let urls: Vec<String> = parsed
            .list(CONNECTION_URL)?
            .into_iter()
            .map(|url| url.trim_end_matches('/').to_string())
            .collect();
        if urls.is_empty() {
            return Err(ConnectError::config(
                CONNECTION_URL,
                "at least one URL is required",
            ));
        }
        let username = parsed.optional_string(CONNECTION_USERNAME);
        let password = parsed.optional_string(CONNECTION_PASSWORD).map(Secret);
        let api_key = parsed.optional_string(CONNECTION_API_KEY).map(Secret);
        if api_key.is_some() && username.is_some() {
            return Err(ConnectError::config(
                CONNECTION_API_KEY,
                "either an API key or connection.username/connection.password, not both",
            ));
        }
        if password.is_some() && username.is_none() {
            return Err(ConnectError::config(
                CONNECTION_USERNAME,
                "required with connection.password",
            ));
        }
        let index = IndexTemplate::parse(&parsed.string(INDEX)?)
            .map_err(|reason| ConnectError::config(INDEX, reason))?;
        let key_ignore = parsed.boolean(KEY_IGNORE)?;
        let null_values = one_of(
            &parsed,
            BEHAVIOR_ON_NULL_VALUES,
            &[
                ("ignore", NullValues::Ignore),
                ("delete", NullValues::Delete),
                ("fail", NullValues::Fail),
            ],
        )?;
        // With position ids a tombstone names no earlier document: it would delete nothing.
        if null_values == NullValues::Delete && key_ignore {
            return Err(ConnectError::config(
                BEHAVIOR_ON_NULL_VALUES,
                "delete needs document ids from the record key (key.ignore=false)",
            ));
        }
        let data_stream = data_stream(&parsed)?;
        let write_method = one_of(
            &parsed,
            WRITE_METHOD,
            &[
                ("insert", WriteMethod::Insert),
                ("upsert", WriteMethod::Upsert),
            ],
        )?;
        // A data stream takes only creates: no updates, no deletes, and an id per record (a
        // key id would make the second record of a key a conflict, taken for written).
        if data_stream.is_some() {
            if props.contains_key(INDEX) {
                return Err(ConnectError::config(
                    INDEX,
                    "not with data.stream.type: the data stream names the target",
                ));
            }
            if !key_ignore {
                return Err(ConnectError::config(
                    KEY_IGNORE,
                    "a data stream needs key.ignore=true (a data stream only creates documents: a second record of a key could not replace the first)",
                ));
            }
            if write_method == WriteMethod::Upsert {
                return Err(ConnectError::config(
                    WRITE_METHOD,
                    "a data stream only creates documents: upsert is not possible",
                ));
            }
        }
        Ok(Self {
            connection: ConnectionConfig {
                urls,
                username,
                password,
                api_key,
                tls_ca_file: parsed
                    .optional_string(CONNECTION_TLS_CA_FILE)
                    .map(std::path::PathBuf::from),
                compression: parsed.boolean(CONNECTION_COMPRESSION)?,
                connect_timeout: parsed.millis(CONNECTION_TIMEOUT_MS)?,
                read_timeout: parsed.millis(READ_TIMEOUT_MS)?,
            },
            index,
            template: template_setup(&parsed)?,
            data_stream,
            key_ignore,
            write_method,
            null_values,
            malformed: one_of(
                &parsed,
                BEHAVIOR_ON_MALFORMED_DOCUMENTS,
                &[
                    ("ignore", MalformedDocuments::Ignore),
                    ("warn", MalformedDocuments::Warn),
                    ("fail", MalformedDocuments::Fail),
                ],
            )?,
            batch_size: parsed.int_as(BATCH_SIZE)?,
            bulk_size_bytes: parsed.int_as(BULK_SIZE_BYTES)?,
            max_in_flight: parsed.int_as(MAX_IN_FLIGHT_REQUESTS)?,
            linger: parsed.millis(LINGER_MS)?,
            max_retries: parsed.int_as(MAX_RETRIES)?,
            retry_backoff: parsed.millis(RETRY_BACKOFF_MS)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> Props {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn field_of(pairs: &[(&str, &str)]) -> String {
        match SinkConfig::parse(&props(pairs)) {
            Err(ConnectError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_with_a_url_are_valid() {
        let config =
            SinkConfig::parse(&props(&[(CONNECTION_URL, "http://a:9200/, http://b:9200")]))
                .expect("valid");
        assert_eq!(
            config.connection.urls,
            vec!["http://a:9200", "http://b:9200"]
        );
        assert!(!config.key_ignore);
        assert_eq!(config.write_method, WriteMethod::Insert);
        assert_eq!(config.null_values, NullValues::Fail);
        assert_eq!(config.malformed, MalformedDocuments::Fail);
        assert_eq!(config.batch_size, 1000);
        assert_eq!(config.max_in_flight, 5);
    }

    #[test]
    fn errors_name_the_setting() {
        assert_eq!(field_of(&[]), CONNECTION_URL);
        assert_eq!(field_of(&[(CONNECTION_URL, "a:9200")]), CONNECTION_URL);
        let url = (CONNECTION_URL, "http://a:9200");
        assert_eq!(field_of(&[url, (INDEX, "Vitals")]), INDEX);
        assert_eq!(field_of(&[url, (INDEX, "v-${yyyy.QQ}")]), INDEX);
        assert_eq!(field_of(&[url, (WRITE_METHOD, "append")]), WRITE_METHOD);
        assert_eq!(field_of(&[url, (BATCH_SIZE, "0")]), BATCH_SIZE);
        assert_eq!(
            field_of(&[url, (CONNECTION_PASSWORD, "secret")]),
            CONNECTION_USERNAME
        );
        assert_eq!(
            field_of(&[
                url,
                (KEY_IGNORE, "true"),
                (BEHAVIOR_ON_NULL_VALUES, "delete")
            ]),
            BEHAVIOR_ON_NULL_VALUES
        );
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let config = SinkConfig::parse(&props(&[
            (CONNECTION_URL, "http://a:9200"),
            (CONNECTION_USERNAME, "medconnect"),
            (CONNECTION_PASSWORD, "hunter2"),
        ]))
        .expect("valid");
        assert_eq!(
            config.connection.password.as_ref().map(Secret::expose),
            Some("hunter2")
        );
        assert!(!format!("{config:?}").contains("hunter2"));
        let keyed = SinkConfig::parse(&props(&[
            (CONNECTION_URL, "http://a:9200"),
            (CONNECTION_API_KEY, "a2V5aWQ6c2VjcmV0"),
        ]))
        .expect("valid");
        assert!(!format!("{keyed:?}").contains("a2V5aWQ6c2VjcmV0"));
        assert_eq!(
            field_of(&[
                (CONNECTION_URL, "http://a:9200"),
                (CONNECTION_USERNAME, "u"),
                (CONNECTION_API_KEY, "k"),
            ]),
            CONNECTION_API_KEY
        );
    }

    #[test]
    fn an_index_template_needs_a_name_and_one_json_object_with_index_patterns() {
        let url = (CONNECTION_URL, "http://a:9200");
        let body =
            r#"{"index_patterns":["vitals-*"],"template":{"mappings":{"dynamic":"strict"}}}"#;
        let config = SinkConfig::parse(&props(&[
            url,
            (INDEX_TEMPLATE_NAME, "vitals"),
            (INDEX_TEMPLATE_JSON, body),
        ]))
        .expect("valid");
        let template = config.template.expect("a template").load().expect("inline");
        assert_eq!(template.name, "vitals");
        assert_eq!(template.body["template"]["mappings"]["dynamic"], "strict");
        assert!(
            SinkConfig::parse(&props(&[url]))
                .expect("valid")
                .template
                .is_none()
        );
        assert_eq!(
            field_of(&[url, (INDEX_TEMPLATE_JSON, body)]),
            INDEX_TEMPLATE_NAME
        );
        assert_eq!(
            field_of(&[url, (INDEX_TEMPLATE_NAME, "vitals")]),
            INDEX_TEMPLATE_NAME
        );
        assert_eq!(
            field_of(&[url, (INDEX_TEMPLATE_NAME, "v"), (INDEX_TEMPLATE_JSON, "{")]),
            INDEX_TEMPLATE_JSON
        );
        assert_eq!(
            field_of(&[url, (INDEX_TEMPLATE_NAME, "v"), (INDEX_TEMPLATE_JSON, "{}")]),
            INDEX_TEMPLATE_JSON
        );
        // The file is read at start, not while the settings are parsed.
        let missing = SinkConfig::parse(&props(&[
            url,
            (INDEX_TEMPLATE_NAME, "v"),
            (INDEX_TEMPLATE_FILE, "/nonexistent/template.json"),
        ]))
        .expect("valid settings");
        match missing.template.expect("a template").load() {
            Err(ConnectError::Config { field, .. }) => assert_eq!(field, INDEX_TEMPLATE_FILE),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn data_streams_are_named_by_type_dataset_and_namespace_and_only_create() {
        let url = (CONNECTION_URL, "http://a:9200");
        let ids = (KEY_IGNORE, "true");
        let config =
            SinkConfig::parse(&props(&[url, ids, (DATA_STREAM_TYPE, "logs")])).expect("valid");
        let stream = config.data_stream.expect("a data stream");
        assert_eq!(stream.name("vitals"), "logs-vitals-default");
        assert_eq!(stream.name("ICU-Vitals.v2"), "logs-icu_vitals.v2-default");
        let config = SinkConfig::parse(&props(&[
            url,
            ids,
            (DATA_STREAM_TYPE, "metrics"),
            (DATA_STREAM_DATASET, "vitals"),
            (DATA_STREAM_NAMESPACE, "ward7"),
        ]))
        .expect("valid");
        assert_eq!(
            config.data_stream.expect("a data stream").name("any"),
            "metrics-vitals-ward7"
        );
        let stream = (DATA_STREAM_TYPE, "logs");
        assert_eq!(
            field_of(&[url, ids, (DATA_STREAM_TYPE, "events")]),
            DATA_STREAM_TYPE
        );
        assert_eq!(field_of(&[url, stream]), KEY_IGNORE);
        assert_eq!(
            field_of(&[url, ids, stream, (WRITE_METHOD, "upsert")]),
            WRITE_METHOD
        );
        assert_eq!(field_of(&[url, ids, stream, (INDEX, "vitals")]), INDEX);
        assert_eq!(
            field_of(&[url, ids, stream, (DATA_STREAM_DATASET, "icu-vitals")]),
            DATA_STREAM_DATASET
        );
        assert_eq!(
            field_of(&[url, ids, stream, (DATA_STREAM_NAMESPACE, "Ward")]),
            DATA_STREAM_NAMESPACE
        );
        assert_eq!(
            field_of(&[url, ids, ("data.stream.typ", "logs")]),
            "data.stream.typ"
        );
    }

    #[test]
    fn misspelled_settings_of_its_own_are_refused_by_name() {
        let url = (CONNECTION_URL, "http://a:9200");
        assert_eq!(
            field_of(&[url, ("behavior.on.null.value", "ignore")]),
            "behavior.on.null.value"
        );
        assert_eq!(
            field_of(&[url, ("connection.user", "u")]),
            "connection.user"
        );
        // Connect's common settings pass.
        let common = SinkConfig::parse(&props(&[
            url,
            ("topics", "vitals"),
            ("errors.tolerance", "all"),
            ("transforms.a.type", "x"),
            ("consumer.override.max.poll.records", "10"),
        ]));
        assert!(common.is_ok(), "{common:?}");
    }

    #[test]
    fn the_example_connector_config_is_valid() {
        let json: serde_json::Value =
            serde_json::from_str(include_str!("../../../configs/elasticsearch-sink.json"))
                .expect("JSON");
        let props: Props = json["config"]
            .as_object()
            .expect("config object")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("string values").to_string()))
            .collect();
        let config = SinkConfig::parse(&props).expect("valid");
        assert!(config.key_ignore);
        // 2024-01-02T03:04:05Z
        assert_eq!(
            config.index.resolve("vitals", Some(1_704_164_645_000)),
            "vitals-2024.01.02"
        );
    }
}
