//! Settings of the MLLP source and sink, declared once and read into typed structs.

use std::path::PathBuf;
use std::time::Duration;

use hl7_parser::query::LocationQuery;
use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, ParsedConfig, Props, Validator,
};

use crate::message::{DEFAULT_VERSIONS, Rules, TopicTemplate};

pub const MLLP_BIND: &str = "mllp.bind";
pub const MLLP_HOST: &str = "mllp.host";
pub const MLLP_PORT: &str = "mllp.port";
pub const MLLP_SHARE_PORT: &str = "mllp.share.port";
pub const LISTENER_ADDRESS_FILE: &str = "listener.address.file";
pub const TOPIC: &str = "topic";
pub const KEY_FIELD: &str = "key.field";
pub const HL7_VERSIONS: &str = "hl7.versions";
pub const HL7_MESSAGE_TYPES: &str = "hl7.message.types";
pub const HL7_LENIENT_NEWLINES: &str = "hl7.lenient.newlines";
pub const ACK_MODE: &str = "ack.mode";
pub const ACK_TIMEOUT_MS: &str = "ack.timeout.ms";
pub const MAX_MESSAGE_BYTES: &str = "mllp.max.message.bytes";
pub const MAX_CONNECTIONS: &str = "mllp.max.connections";
pub const MAX_CONNECTIONS_PER_PEER: &str = "mllp.max.connections.per.peer";
pub const FRAME_BUDGET_BYTES: &str = "mllp.frame.budget.bytes";
pub const TOPIC_MAX_DISTINCT: &str = "topic.max.distinct";
pub const IDLE_TIMEOUT_MS: &str = "mllp.idle.timeout.ms";
pub const READ_TIMEOUT_MS: &str = "mllp.read.timeout.ms";
pub const CONNECT_TIMEOUT_MS: &str = "mllp.connect.timeout.ms";
pub const QUEUE_CAPACITY: &str = "queue.capacity";
pub const POLL_BATCH_MAX: &str = "poll.batch.max";
pub const RETRY_MAX_ATTEMPTS: &str = "retry.max.attempts";
pub const RETRY_BACKOFF_MS: &str = "retry.backoff.ms";
pub const RETRY_BACKOFF_MAX_MS: &str = "retry.backoff.max.ms";
pub const TLS_ENABLED: &str = "mllp.tls.enabled";
pub const TLS_CERT_FILE: &str = "mllp.tls.cert.file";
pub const TLS_KEY_FILE: &str = "mllp.tls.key.file";
pub const TLS_CLIENT_CA_FILE: &str = "mllp.tls.client.ca.file";
pub const TLS_CA_FILE: &str = "mllp.tls.ca.file";
pub const TLS_SERVER_NAME: &str = "mllp.tls.server.name";

/// The connector's override of its producer's `message.max.bytes` (Connect's
/// `producer.override.*`), read at validation to check `mllp.max.message.bytes` against it.
pub const PRODUCER_MESSAGE_MAX_BYTES: &str = "producer.override.message.max.bytes";
/// The producer's `message.max.bytes` when the connector does not override it: librdkafka's
/// and Kafka's default.
pub const KAFKA_DEFAULT_MESSAGE_MAX_BYTES: u64 = 1_000_000;
/// Room a record needs beyond the HL7 message: its key (a field of the message) and the
/// `hl7.*` headers (MSH fields), plus Kafka's framing. Generous: MSH fields and patient ids
/// are short.
pub const RECORD_HEADROOM_BYTES: u64 = 64 * 1024;
/// The default `mllp.max.message.bytes`: within Kafka's default 1,000,000-byte limit with
/// the headroom to spare.
pub const DEFAULT_MAX_MESSAGE_BYTES: &str = "900000";

pub const ACK_AFTER_COMMIT: &str = "after-commit";
pub const ACK_IMMEDIATE: &str = "immediate";

/// When a listener answers `AA`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// After Kafka acknowledged the record (`acks=all`): nothing acknowledged is ever lost.
    AfterCommit,
    /// As soon as the record is queued for Kafka. Unsafe: a crash loses acknowledged messages.
    Immediate,
}

/// The most digits of one index in `key.field`.
const MAX_INDEX_DIGITS: usize = 6;

/// The parser stops at the first character it does not understand ("PID.0" reads as "PID"),
/// so a query must print back as written to be taken as meant.
fn parse_key_field(value: &str) -> Result<LocationQuery, String> {
    let value = value.trim();
    // hl7-parser 0.3 panics (`todo!()`) on an index that does not fit a usize, so indexes are
    // bounded first (found by the hl7_config fuzz target); HL7 indexes are small.
    if value
        .split(|c: char| !c.is_ascii_digit())
        .any(|digits| digits.len() > MAX_INDEX_DIGITS)
    {
        return Err(format!(
            "an index in '{value}' has more than {MAX_INDEX_DIGITS} digits"
        ));
    }
    let query = LocationQuery::parse(value)
        .map_err(|e| format!("not an HL7 location such as PID.3.1: {e}"))?;
    if query.to_string() != value || query.field.is_none() {
        return Err(format!(
            "'{value}' is not an HL7 field location such as PID.3.1 (indexes start at 1)"
        ));
    }
    Ok(query)
}

fn key_field_check(value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Ok(());
    }
    parse_key_field(value).map(|_| ())
}

/// The longest timeout or backoff accepted: a day. Longer ones are surely typos, and deadlines
/// computed from them must stay within what a clock can represent.
const MAX_TIMEOUT_MS: f64 = 86_400_000.0;

fn tls_def(def: ConfigDef) -> ConfigDef {
    def.define(TLS_ENABLED, ConfigType::Boolean, "false", Importance::Medium, "Use TLS on the MLLP connection.")
        .define(TLS_CERT_FILE, ConfigType::String, "", Importance::Medium, "PEM certificate chain presented to the peer (required for a TLS listener; optional client certificate for the sink).")
        .define(TLS_KEY_FILE, ConfigType::String, "", Importance::Medium, "PEM private key of mllp.tls.cert.file.")
}

pub fn source_def() -> ConfigDef {
    let def = ConfigDef::new()
        .define(MLLP_BIND, ConfigType::String, "", Importance::Medium, "Address the MLLP listener binds to. Empty: 0.0.0.0 (every interface) with mllp.tls.enabled, else 127.0.0.1, so a plain-text listener reaches the network only when this says so.")
        .define(MLLP_PORT, ConfigType::Int, "2575", Importance::High, "TCP port of the MLLP listener (0 picks a free port; see listener.address.file).")
        .with_validator(Validator::between(0.0, 65535.0))
        .define(MLLP_SHARE_PORT, ConfigType::Boolean, "false", Importance::Low, "Bind with SO_REUSEPORT, so the listener of this every-worker connector on several workers of one host can share mllp.port (the kernel spreads connections); not needed with one worker per host.")
        .define(LISTENER_ADDRESS_FILE, ConfigType::String, "", Importance::Low, "If set, the bound address (host:port) is written to this file once the listener is up.")
        .define(TOPIC, ConfigType::String, "hl7.${message.type}", Importance::High, "Topic of the records; ${message.type} and ${trigger.event} stand for MSH-9.1 and MSH-9.2 in lower case.")
        .with_validator(Validator::custom(TopicTemplate::check))
        .define(TOPIC_MAX_DISTINCT, ConfigType::Int, "50", Importance::Medium, "When topic names MSH-9 (${message.type}, ${trigger.event}): at most this many distinct topics per task; a message that would need another is answered AR (and dead-lettered), so senders cannot create topics without bound.")
        .with_validator(Validator::between(1.0, 100_000.0))
        .define(KEY_FIELD, ConfigType::String, "PID.3.1", Importance::Medium, "HL7 location of the record key (e.g. PID.3.1); MSH-10 when empty or absent from the message.")
        .with_validator(Validator::custom(key_field_check))
        .define(HL7_VERSIONS, ConfigType::List, DEFAULT_VERSIONS, Importance::Low, "Accepted MSH-12 versions; others are answered AR.")
        .with_validator(Validator::NonEmpty)
        .define(HL7_MESSAGE_TYPES, ConfigType::List, "", Importance::Low, "Accepted MSH-9.1 message types (empty: all); others are answered AR.")
        .define(HL7_LENIENT_NEWLINES, ConfigType::Boolean, "true", Importance::Low, "Accept \\n and \\r\\n between segments besides the standard \\r.")
        .define(ACK_MODE, ConfigType::String, ACK_AFTER_COMMIT, Importance::High, "after-commit: AA only once Kafka acknowledged the record. immediate: AA once queued (UNSAFE: a crash loses acknowledged messages).")
        .with_validator(Validator::OneOf(vec![ACK_AFTER_COMMIT, ACK_IMMEDIATE]))
        .define(MAX_MESSAGE_BYTES, ConfigType::Int, DEFAULT_MAX_MESSAGE_BYTES, Importance::Medium, "Largest accepted message; a larger one is answered AR and the connection closed. Must leave 65536 bytes for key and headers within the producer's message.max.bytes (1000000 unless producer.override.message.max.bytes raises it; the topic's max.message.bytes must allow as much).")
        .with_validator(Validator::between(1024.0, 268_435_456.0))
        .define(MAX_CONNECTIONS, ConfigType::Int, "256", Importance::Low, "Concurrent sender connections; when all are taken, the connection idle the longest is closed to admit a new one (none idle: the new one is closed at once).")
        .with_validator(Validator::between(1.0, 100_000.0))
        .define(MAX_CONNECTIONS_PER_PEER, ConfigType::Int, "32", Importance::Low, "Concurrent connections from one IP address (0: no limit besides mllp.max.connections); further ones are closed at once. Behind a load balancer that does not keep client addresses every sender shares one: raise it or use 0.")
        .with_validator(Validator::between(0.0, 100_000.0))
        .define(FRAME_BUDGET_BYTES, ConfigType::Long, "67108864", Importance::Low, "Bytes of messages being received or awaiting their ACK, shared by all connections of the listener; a connection whose message would exceed it is answered AR (busy) and closed. Must be at least mllp.max.message.bytes.")
        .with_validator(Validator::between(1024.0, 68_719_476_736.0))
        .define(IDLE_TIMEOUT_MS, ConfigType::Long, "600000", Importance::Low, "Close a connection that sends nothing for this long (0: never).")
        .with_validator(Validator::between(0.0, MAX_TIMEOUT_MS))
        .define(READ_TIMEOUT_MS, ConfigType::Long, "30000", Importance::Low, "A started message must be complete within this time, and an ACK written within it.")
        .with_validator(Validator::between(1.0, MAX_TIMEOUT_MS))
        .define(QUEUE_CAPACITY, ConfigType::Int, "1024", Importance::Low, "Messages waiting for the engine; beyond it senders are answered AR (busy).")
        .with_validator(Validator::between(1.0, 1_000_000.0))
        .define(POLL_BATCH_MAX, ConfigType::Int, "500", Importance::Low, "Records returned per poll at most.")
        .with_validator(Validator::between(1.0, 1_000_000.0));
    tls_def(def)
        .define(
            TLS_CLIENT_CA_FILE,
            ConfigType::String,
            "",
            Importance::Medium,
            "If set, senders must present a client certificate signed by this PEM CA.",
        )
        .in_group("MLLP")
}

pub fn sink_def() -> ConfigDef {
    let def = ConfigDef::new()
        .define_required(MLLP_HOST, ConfigType::String, Importance::High, "Host of the downstream MLLP receiver.")
        .with_validator(Validator::NonEmpty)
        .define_required(MLLP_PORT, ConfigType::Int, Importance::High, "Port of the downstream MLLP receiver.")
        .with_validator(Validator::between(1.0, 65535.0))
        .define(CONNECT_TIMEOUT_MS, ConfigType::Long, "5000", Importance::Low, "Connection timeout.")
        .with_validator(Validator::between(1.0, MAX_TIMEOUT_MS))
        .define(ACK_TIMEOUT_MS, ConfigType::Long, "10000", Importance::Medium, "How long the receiver may take to read one message and answer its ACK.")
        .with_validator(Validator::between(1.0, MAX_TIMEOUT_MS))
        .define(RETRY_MAX_ATTEMPTS, ConfigType::Int, "3", Importance::Medium, "Attempts per message answered AE/AR or not answered in time, before it is reported as errant (errors.tolerance decides).")
        .with_validator(Validator::between(1.0, 1000.0))
        .define(RETRY_BACKOFF_MS, ConfigType::Long, "500", Importance::Low, "Wait before the first retry; doubled each time (the engine waits, and stops waiting when the task stops).")
        .with_validator(Validator::between(0.0, MAX_TIMEOUT_MS))
        .define(RETRY_BACKOFF_MAX_MS, ConfigType::Long, "10000", Importance::Low, "Longest wait between retries.")
        .with_validator(Validator::between(0.0, MAX_TIMEOUT_MS))
        .define(MAX_MESSAGE_BYTES, ConfigType::Int, "1048576", Importance::Low, "Largest ACK accepted from the receiver.")
        .with_validator(Validator::between(1024.0, 268_435_456.0));
    tls_def(def)
        .define(
            TLS_CA_FILE,
            ConfigType::String,
            "",
            Importance::Medium,
            "PEM CA that signs the receiver's certificate (required with TLS).",
        )
        .define(
            TLS_SERVER_NAME,
            ConfigType::String,
            "",
            Importance::Low,
            "Name expected in the receiver's certificate (default: mllp.host).",
        )
        .in_group("MLLP")
}

fn millis(parsed: &ParsedConfig, name: &str) -> ConnectResult<Duration> {
    parsed.millis(name)
}

/// The producer's `message.max.bytes` as the connector config sets it (else Kafka's default).
/// The worker's `[producer]` section is not visible here: a worker that raises the limit needs
/// the override in the connector config too, for validation to count on it.
fn producer_message_max_bytes(props: &Props) -> ConnectResult<u64> {
    match props.get(PRODUCER_MESSAGE_MAX_BYTES) {
        None => Ok(KAFKA_DEFAULT_MESSAGE_MAX_BYTES),
        Some(value) => value
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                ConnectError::config(
                    PRODUCER_MESSAGE_MAX_BYTES,
                    format!("'{value}' is not a size in bytes"),
                )
            }),
    }
}

/// A listener must not accept a message Kafka will refuse: that sender would be acknowledged
/// with nothing better than AR after the whole message was read, for every retransmission.
fn check_message_size(max_message_bytes: usize, props: &Props) -> ConnectResult<()> {
    let producer_max = producer_message_max_bytes(props)?;
    let fits = producer_max.saturating_sub(RECORD_HEADROOM_BYTES);
    if u64::try_from(max_message_bytes).unwrap_or(u64::MAX) > fits {
        let source = if props.contains_key(PRODUCER_MESSAGE_MAX_BYTES) {
            PRODUCER_MESSAGE_MAX_BYTES
        } else {
            "Kafka's default; raise it with producer.override.message.max.bytes (and the topic's max.message.bytes with it)"
        };
        return Err(ConnectError::config(
            MAX_MESSAGE_BYTES,
            format!(
                "{max_message_bytes} is more than Kafka accepts: the producer's message.max.bytes is {producer_max} ({source}), less {RECORD_HEADROOM_BYTES} bytes for the record's key and headers leaves {fits}"
            ),
        ));
    }
    Ok(())
}

fn path(parsed: &ParsedConfig, name: &str) -> Option<PathBuf> {
    parsed
        .optional_string(name)
        .map(|p| PathBuf::from(p.trim()))
}

fn required_path(parsed: &ParsedConfig, name: &str) -> ConnectResult<PathBuf> {
    path(parsed, name)
        .ok_or_else(|| ConnectError::config(name, format!("required when {TLS_ENABLED}=true")))
}

/// A TLS listener's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// A TLS sender's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub server_name: String,
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub bind: String,
    pub port: u16,
    /// `SO_REUSEPORT`: several workers of one host share the port.
    pub share_port: bool,
    pub address_file: Option<PathBuf>,
    pub topic: TopicTemplate,
    pub rules: Rules,
    pub ack_mode: AckMode,
    pub max_message_bytes: usize,
    pub max_connections: usize,
    /// 0: no limit per peer address.
    pub max_connections_per_peer: usize,
    pub frame_budget_bytes: usize,
    pub topic_max_distinct: usize,
    pub idle_timeout: Option<Duration>,
    pub read_timeout: Duration,
    pub queue_capacity: usize,
    pub poll_batch_max: usize,
    pub tls: Option<ServerTls>,
}

impl SourceConfig {
    /// Parses a connector config at validation, with the checks that span settings: the
    /// listener's size limit against what the producer accepts. A task starts with `parse`
    /// alone, so a connector stored before the check existed keeps running (a record Kafka
    /// refuses is answered AR) instead of failing at its next restart.
    pub fn validate(props: &Props) -> ConnectResult<Self> {
        let config = Self::parse(props)?;
        check_message_size(config.max_message_bytes, props)?;
        if config.frame_budget_bytes < config.max_message_bytes {
            return Err(ConnectError::config(
                FRAME_BUDGET_BYTES,
                format!(
                    "{} is less than {MAX_MESSAGE_BYTES} ({}): a message of the largest accepted size could never be received",
                    config.frame_budget_bytes, config.max_message_bytes
                ),
            ));
        }
        Ok(config)
    }

    pub fn parse(props: &Props) -> ConnectResult<Self> {
        let parsed = source_def().parse(props)?;
        let key_field = parsed.string(KEY_FIELD)?;
        let key_field = match key_field.trim() {
            "" => None,
            field => Some(parse_key_field(field).map_err(|e| ConnectError::config(KEY_FIELD, e))?),
        };
        let tls = if parsed.boolean(TLS_ENABLED)? {
            Some(ServerTls {
                cert: required_path(&parsed, TLS_CERT_FILE)?,
                key: required_path(&parsed, TLS_KEY_FILE)?,
                client_ca: path(&parsed, TLS_CLIENT_CA_FILE),
            })
        } else {
            None
        };
        let idle = millis(&parsed, IDLE_TIMEOUT_MS)?;
        let max_message_bytes = parsed.int_as(MAX_MESSAGE_BYTES)?;
        // Every interface only when asked, or when senders must come over TLS anyway.
        let bind = match parsed.string(MLLP_BIND)?.trim() {
            "" if tls.is_some() => "0.0.0.0".to_string(),
            "" => "127.0.0.1".to_string(),
            bind => bind.to_string(),
        };
        let frame_budget: u64 = parsed.int_as(FRAME_BUDGET_BYTES)?;
        Ok(Self {
            bind,
            port: parsed.int_as(MLLP_PORT)?,
            share_port: parsed.boolean(MLLP_SHARE_PORT)?,
            address_file: path(&parsed, LISTENER_ADDRESS_FILE),
            topic: TopicTemplate::new(parsed.string(TOPIC)?),
            rules: Rules {
                versions: parsed.list(HL7_VERSIONS)?,
                message_types: parsed.list(HL7_MESSAGE_TYPES)?,
                lenient_newlines: parsed.boolean(HL7_LENIENT_NEWLINES)?,
                key_field,
            },
            ack_mode: if parsed.string(ACK_MODE)? == ACK_IMMEDIATE {
                AckMode::Immediate
            } else {
                AckMode::AfterCommit
            },
            max_message_bytes,
            max_connections: parsed.int_as(MAX_CONNECTIONS)?,
            max_connections_per_peer: parsed.int_as(MAX_CONNECTIONS_PER_PEER)?,
            frame_budget_bytes: usize::try_from(frame_budget).unwrap_or(usize::MAX),
            topic_max_distinct: parsed.int_as(TOPIC_MAX_DISTINCT)?,
            idle_timeout: (!idle.is_zero()).then_some(idle),
            read_timeout: millis(&parsed, READ_TIMEOUT_MS)?,
            queue_capacity: parsed.int_as(QUEUE_CAPACITY)?,
            poll_batch_max: parsed.int_as(POLL_BATCH_MAX)?,
            tls,
        })
    }
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub host: String,
    pub port: u16,
    pub connect_timeout: Duration,
    pub ack_timeout: Duration,
    pub max_attempts: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub max_message_bytes: usize,
    pub tls: Option<ClientTls>,
}

impl SinkConfig {
    pub fn parse(props: &Props) -> ConnectResult<Self> {
        let parsed = sink_def().parse(props)?;
        let host = parsed.string(MLLP_HOST)?.trim().to_string();
        let tls = if parsed.boolean(TLS_ENABLED)? {
            let client_cert = match (path(&parsed, TLS_CERT_FILE), path(&parsed, TLS_KEY_FILE)) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(ConnectError::config(
                        TLS_KEY_FILE,
                        "required with mllp.tls.cert.file",
                    ));
                }
                (None, Some(_)) => {
                    return Err(ConnectError::config(
                        TLS_CERT_FILE,
                        "required with mllp.tls.key.file",
                    ));
                }
            };
            Some(ClientTls {
                ca: required_path(&parsed, TLS_CA_FILE)?,
                server_name: parsed
                    .optional_string(TLS_SERVER_NAME)
                    .unwrap_or_else(|| host.clone()),
                client_cert,
            })
        } else {
            None
        };
        Ok(Self {
            port: parsed.int_as(MLLP_PORT)?,
            host,
            connect_timeout: millis(&parsed, CONNECT_TIMEOUT_MS)?,
            ack_timeout: millis(&parsed, ACK_TIMEOUT_MS)?,
            max_attempts: parsed.int_as(RETRY_MAX_ATTEMPTS)?,
            backoff: millis(&parsed, RETRY_BACKOFF_MS)?,
            backoff_max: millis(&parsed, RETRY_BACKOFF_MAX_MS)?,
            max_message_bytes: parsed.int_as(MAX_MESSAGE_BYTES)?,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use medconnect_api::props_from as props;

    #[test]
    fn source_defaults_are_safe() {
        let config = SourceConfig::parse(&props(&[])).expect("defaults are valid");
        assert_eq!(config.port, 2575);
        assert_eq!(config.ack_mode, AckMode::AfterCommit);
        assert!(config.tls.is_none());
        assert_eq!(config.topic.resolve(None), "hl7.unknown");
    }

    #[test]
    fn errors_name_the_setting() {
        let field = |p: &[(&str, &str)]| match SourceConfig::parse(&props(p)) {
            Err(ConnectError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(field(&[(ACK_MODE, "sometimes")]), ACK_MODE);
        assert_eq!(field(&[(MLLP_PORT, "70000")]), MLLP_PORT);
        assert_eq!(field(&[(TOPIC, "bad topic")]), TOPIC);
        assert_eq!(field(&[(KEY_FIELD, "PID.0")]), KEY_FIELD);
        assert_eq!(field(&[(KEY_FIELD, "PID")]), KEY_FIELD);
        // Used to panic inside hl7-parser (found by fuzzing): an index past usize.
        assert_eq!(
            field(&[(KEY_FIELD, "PID.3.19223372036854775807")]),
            KEY_FIELD
        );
        assert_eq!(
            field(&[(KEY_FIELD, "PID[99999999999999999999].3")]),
            KEY_FIELD
        );
        assert_eq!(field(&[(TLS_ENABLED, "true")]), TLS_CERT_FILE);
        let sink = SinkConfig::parse(&props(&[(MLLP_HOST, "h")]));
        assert!(matches!(sink, Err(ConnectError::Config { field, .. }) if field == MLLP_PORT));
        let sink = SinkConfig::parse(&props(&[
            (MLLP_HOST, "h"),
            (MLLP_PORT, "1"),
            (TLS_ENABLED, "true"),
        ]));
        assert!(matches!(sink, Err(ConnectError::Config { field, .. }) if field == TLS_CA_FILE));
    }

    #[test]
    fn the_message_size_limit_must_fit_what_the_producer_accepts() {
        let field = |p: &[(&str, &str)]| match SourceConfig::validate(&props(p)) {
            Err(ConnectError::Config { field, reason }) => (field, reason),
            other => panic!("expected a config error, got {other:?}"),
        };
        // The old default (4 MiB) against Kafka's default producer limit.
        let (name, reason) = field(&[(MAX_MESSAGE_BYTES, "4194304")]);
        assert_eq!(name, MAX_MESSAGE_BYTES);
        assert!(reason.contains("1000000"), "{reason}");
        assert!(reason.contains(PRODUCER_MESSAGE_MAX_BYTES), "{reason}");
        // Raised together with the producer's limit, it is fine.
        let raised = SourceConfig::validate(&props(&[
            (MAX_MESSAGE_BYTES, "4194304"),
            (PRODUCER_MESSAGE_MAX_BYTES, "4259840"),
        ]))
        .expect("within the override");
        assert_eq!(raised.max_message_bytes, 4_194_304);
        // An override too small for the key and headers is named on the listener's setting.
        let (name, _) = field(&[
            (MAX_MESSAGE_BYTES, "4194304"),
            (PRODUCER_MESSAGE_MAX_BYTES, "4194304"),
        ]);
        assert_eq!(name, MAX_MESSAGE_BYTES);
        let (name, _) = field(&[(PRODUCER_MESSAGE_MAX_BYTES, "lots")]);
        assert_eq!(name, PRODUCER_MESSAGE_MAX_BYTES);
        let defaults = SourceConfig::validate(&props(&[])).expect("defaults fit");
        assert_eq!(defaults.max_message_bytes, 900_000);
        // A task of a connector stored before the check still starts.
        let stored = SourceConfig::parse(&props(&[(MAX_MESSAGE_BYTES, "4194304")]));
        assert!(stored.is_ok(), "{stored:?}");
    }

    #[test]
    fn timeouts_that_would_overflow_a_deadline_are_refused_by_name() {
        for name in [IDLE_TIMEOUT_MS, READ_TIMEOUT_MS] {
            let error = SourceConfig::parse(&props(&[(name, "9223372036854775807")]));
            assert!(
                matches!(error, Err(ConnectError::Config { ref field, .. }) if field == name),
                "{name}: {error:?}"
            );
        }
        for name in [
            CONNECT_TIMEOUT_MS,
            ACK_TIMEOUT_MS,
            RETRY_BACKOFF_MS,
            RETRY_BACKOFF_MAX_MS,
        ] {
            let error = SinkConfig::parse(&props(&[
                (MLLP_HOST, "h"),
                (MLLP_PORT, "1"),
                (name, "9223372036854775807"),
            ]));
            assert!(
                matches!(error, Err(ConnectError::Config { ref field, .. }) if field == name),
                "{name}: {error:?}"
            );
        }
    }

    #[test]
    fn a_plain_listener_stays_local_unless_told_otherwise() {
        let bind = |p: &[(&str, &str)]| SourceConfig::parse(&props(p)).expect("valid").bind;
        assert_eq!(bind(&[]), "127.0.0.1");
        assert_eq!(bind(&[(MLLP_BIND, "0.0.0.0")]), "0.0.0.0");
        assert_eq!(
            bind(&[
                (TLS_ENABLED, "true"),
                (TLS_CERT_FILE, "c.pem"),
                (TLS_KEY_FILE, "k.pem")
            ]),
            "0.0.0.0",
            "with TLS every interface by default"
        );
    }

    #[test]
    fn the_listener_limits_have_small_defaults_and_a_consistent_budget() {
        let config = SourceConfig::validate(&props(&[])).expect("defaults");
        assert_eq!(config.topic_max_distinct, 50);
        assert_eq!(config.max_connections_per_peer, 32);
        assert_eq!(config.frame_budget_bytes, 64 << 20);
        let error = SourceConfig::validate(&props(&[(FRAME_BUDGET_BYTES, "100000")]));
        assert!(
            matches!(error, Err(ConnectError::Config { ref field, .. }) if field == FRAME_BUDGET_BYTES),
            "{error:?}"
        );
        assert!(
            SourceConfig::validate(&props(&[
                (FRAME_BUDGET_BYTES, "100000"),
                (MAX_MESSAGE_BYTES, "100000")
            ]))
            .is_ok()
        );
    }

    #[test]
    fn an_empty_key_field_keys_by_control_id() {
        let config = SourceConfig::parse(&props(&[(KEY_FIELD, "")])).expect("valid");
        assert!(config.rules.key_field.is_none());
        let config = SourceConfig::parse(&props(&[(KEY_FIELD, "PID[1].3[2].1")])).expect("valid");
        assert_eq!(
            config.rules.key_field.map(|q| q.to_string()).as_deref(),
            Some("PID[1].3[2].1")
        );
    }

    #[test]
    fn the_example_connector_config_is_valid() {
        let json: serde_json::Value =
            serde_json::from_str(include_str!("../../../configs/hl7-mllp-source.json"))
                .expect("JSON");
        let props: Props = json["config"]
            .as_object()
            .expect("config object")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("string values").to_string()))
            .collect();
        let config = SourceConfig::validate(&props).expect("valid");
        assert_eq!(config.port, 2575);
        assert_eq!(config.ack_mode, AckMode::AfterCommit);
        let adt = crate::message::parse(crate::samples::ADT_A01.as_bytes(), &config.rules)
            .expect("ADT accepted");
        assert_eq!(config.topic.resolve(Some(&adt.header)), "hl7.adt");
        let oru = crate::message::parse(crate::samples::ORU_R01.as_bytes(), &config.rules)
            .expect("ORU accepted");
        assert_eq!(config.topic.resolve(Some(&oru.header)), "hl7.oru");
    }
}
