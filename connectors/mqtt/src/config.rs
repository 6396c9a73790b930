//! Settings of the MQTT broker source, declared once and read into a typed struct.

use std::time::Duration;

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, ParsedConfig, Props, Validator,
};

use std::sync::Arc;

use medconnect_api::limits::TopicCap;

use crate::mapping::{Template, TopicPattern, kafka_topic_name};

pub const SERVER_URI: &str = "mqtt.server.uri";
pub const HOST: &str = "mqtt.host";
pub const PORT: &str = "mqtt.port";
pub const CLIENT_ID: &str = "mqtt.client.id";
pub const USERNAME: &str = "mqtt.username";
pub const PASSWORD: &str = "mqtt.password";
pub const TOPICS: &str = "mqtt.topics";
pub const QOS: &str = "mqtt.qos";
pub const CLEAN_SESSION: &str = "mqtt.clean.session";
pub const KEEP_ALIVE_S: &str = "mqtt.keep.alive.s";
pub const MAX_PACKET_BYTES: &str = "mqtt.max.packet.bytes";
pub const TOPIC_PATTERN: &str = "mqtt.topic.pattern";
pub const KAFKA_TOPIC: &str = "kafka.topic";
pub const KAFKA_KEY: &str = "kafka.key";
pub const KAFKA_TOPIC_MAX_DISTINCT: &str = "kafka.topic.max.distinct";
pub const CONTENT_TYPE: &str = "payload.content.type";
pub const QUEUE_CAPACITY: &str = "queue.capacity";
pub const POLL_BATCH_MAX: &str = "poll.batch.max";
pub const RECONNECT_BACKOFF_MS: &str = "mqtt.reconnect.backoff.ms";
pub const RECONNECT_BACKOFF_MAX_MS: &str = "mqtt.reconnect.backoff.max.ms";
pub const CONNECT_TIMEOUT_MS: &str = "mqtt.connect.timeout.ms";

/// The longest timeout or backoff accepted: a day (longer ones are surely typos).
const MAX_TIMEOUT_MS: f64 = 86_400_000.0;

fn check_filter(filter: &str) -> Result<(), String> {
    let filter = filter.trim();
    let plain = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, plain)) if !group.is_empty() && !group.contains(['+', '#']) => plain,
            _ => return Err(format!("'{filter}' is not $share/<group>/<filter>")),
        },
        None => filter,
    };
    if plain.is_empty() {
        return Err("an empty topic filter".into());
    }
    TopicPattern::parse(plain).map(|_| ())
}

fn check_filters(value: &str) -> Result<(), String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .try_for_each(check_filter)
}

fn check_uri(value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Ok(());
    }
    parse_uri(value).map(|_| ())
}

/// `tcp://host:port` or `mqtt://host:port` (port 1883 when left out). TLS is not built yet.
fn parse_uri(value: &str) -> Result<(String, u16), String> {
    let value = value.trim();
    let Some((scheme, rest)) = value.split_once("://") else {
        return Err(format!("'{value}' is not a URI such as tcp://broker:1883"));
    };
    if !matches!(scheme, "tcp" | "mqtt") {
        return Err(format!(
            "scheme '{scheme}' is not supported: use tcp:// or mqtt:// (TLS is not built yet)"
        ));
    }
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => {
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("'{port}' is not a port"))?;
            (host, port)
        }
        None => (rest, 1883),
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("'{value}' names no host"));
    }
    Ok((host.to_string(), port))
}

/// The broker's host and port: `mqtt.server.uri` when set, else `mqtt.host` and `mqtt.port`
/// (the source and the sink connect alike).
fn broker_address(parsed: &ParsedConfig) -> ConnectResult<(String, u16)> {
    match parsed.optional_string(SERVER_URI) {
        Some(uri) => parse_uri(&uri).map_err(|reason| ConnectError::config(SERVER_URI, reason)),
        None => Ok((
            parsed.string(HOST)?.trim().to_string(),
            parsed.int_as(PORT)?,
        )),
    }
}

/// The CONNECT's username and password, when a username is set.
fn credentials(parsed: &ParsedConfig) -> Option<Credentials> {
    parsed
        .optional_string(USERNAME)
        .map(|username| Credentials {
            username,
            password: parsed.optional_string(PASSWORD).unwrap_or_default(),
        })
}

pub fn source_def() -> ConfigDef {
    ConfigDef::new()
        .define(SERVER_URI, ConfigType::String, "", Importance::High, "Broker to subscribe to, tcp://host:port (mqtt:// also accepted); overrides mqtt.host and mqtt.port.")
        .with_validator(Validator::custom(check_uri))
        .define(HOST, ConfigType::String, "localhost", Importance::High, "Broker host, when mqtt.server.uri is not set.")
        .with_validator(Validator::NonEmpty)
        .define(PORT, ConfigType::Int, "1883", Importance::High, "Broker port, when mqtt.server.uri is not set.")
        .with_validator(Validator::between(1.0, 65535.0))
        .define_required(CLIENT_ID, ConfigType::String, Importance::High, "MQTT client id. Keep it stable: the broker keeps the session (subscriptions and unacknowledged messages) under it. With several tasks, task n uses <id>-<n>.")
        .with_validator(Validator::NonEmpty)
        .define(USERNAME, ConfigType::String, "", Importance::Medium, "Username of the CONNECT (none when empty).")
        .define(PASSWORD, ConfigType::Password, "", Importance::Medium, "Password of the CONNECT.")
        .define_required(TOPICS, ConfigType::List, Importance::High, "Topic filters to subscribe to (+ and # allowed); $share/<group>/<filter> lets several tasks or workers split one stream.")
        .with_validator(Validator::custom(check_filters))
        .define(QOS, ConfigType::Int, "1", Importance::High, "QoS of the subscriptions: 1 (PUBACK only once Kafka has the record) or 0 (no acknowledgement at all: a message in flight at a crash is lost).")
        .with_validator(Validator::between(0.0, 1.0))
        .define(CLEAN_SESSION, ConfigType::Boolean, "false", Importance::Medium, "Start a new session at each connection. false (default): the broker keeps the subscriptions and queues messages while the task is away, and resends unacknowledged ones.")
        .define(KEEP_ALIVE_S, ConfigType::Int, "30", Importance::Low, "Keep-alive interval in seconds.")
        .with_validator(Validator::between(5.0, 65535.0))
        .define(MAX_PACKET_BYTES, ConfigType::Int, "1048576", Importance::Medium, "Largest packet accepted from the broker; a larger one drops the connection (and the broker resends it): keep it within what Kafka accepts.")
        .with_validator(Validator::between(1024.0, 268_435_455.0))
        .define(TOPIC_PATTERN, ConfigType::String, "", Importance::Medium, "Pattern naming levels of the MQTT topic, e.g. devices/+device/vitals, for use as ${device} in kafka.topic and kafka.key (empty: no captures).")
        .with_validator(Validator::custom(TopicPattern::check))
        .define(KAFKA_TOPIC, ConfigType::String, "${mqtt.topic}", Importance::High, "Kafka topic template: ${mqtt.topic} and captures of mqtt.topic.pattern; '/' becomes '.', other characters Kafka refuses become '_'.")
        .with_validator(Validator::NonEmpty)
        .define(KAFKA_KEY, ConfigType::String, "${mqtt.topic}", Importance::Medium, "Record key template (e.g. ${device}); empty: no key.")
        .define(KAFKA_TOPIC_MAX_DISTINCT, ConfigType::Int, "50", Importance::Medium, TOPIC_CAP_DOC)
        .with_validator(Validator::between(1.0, 100_000.0))
        .define(CONTENT_TYPE, ConfigType::String, "application/json", Importance::Low, "content-type header of the records (the payload is kept as bytes).")
        .define(QUEUE_CAPACITY, ConfigType::Int, "256", Importance::Low, "Messages received and not yet polled; beyond it the task stops reading from the broker (which then holds further messages).")
        .with_validator(Validator::between(1.0, 65_535.0))
        .define(POLL_BATCH_MAX, ConfigType::Int, "500", Importance::Low, "Records returned per poll at most.")
        .with_validator(Validator::between(1.0, 1_000_000.0))
        .define(CONNECT_TIMEOUT_MS, ConfigType::Long, "10000", Importance::Low, "How long start() waits for the broker's CONNACK and SUBACK before it reports a retriable error.")
        .with_validator(Validator::between(1.0, MAX_TIMEOUT_MS))
        .define(RECONNECT_BACKOFF_MS, ConfigType::Long, "500", Importance::Low, "Wait before reconnecting after the connection is lost; doubled each failed attempt.")
        .with_validator(Validator::between(1.0, MAX_TIMEOUT_MS))
        .define(RECONNECT_BACKOFF_MAX_MS, ConfigType::Long, "30000", Importance::Low, "Longest wait between reconnection attempts.")
        .with_validator(Validator::between(1.0, MAX_TIMEOUT_MS))
        .in_group("MQTT")
}

pub const TOPIC_CAP_DOC: &str = "Distinct Kafka topics kafka.topic may yield when it uses ${mqtt.topic} or a capture: whoever publishes chooses them, and each new one is a topic created in Kafka. A publish that would need one more goes to the dead-letter topic (MQTT 5: acknowledged with reason 0x97, quota exceeded). Not applied to a fixed kafka.topic.";

/// Why a publish has no Kafka topic (it goes to the dead-letter topic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The MQTT topic fits no mapping, or the template gives no usable Kafka topic.
    #[error("{0}")]
    Unmapped(String),
    /// A new Kafka topic beyond `kafka.topic.max.distinct`.
    #[error("{0}")]
    TopicCap(String),
}

/// Where a publish goes in Kafka (`mqtt.topic.pattern`, `kafka.topic`, `kafka.key`), read
/// and checked once for the broker source and the listener alike.
#[derive(Debug, Clone)]
pub struct TopicMapping {
    pub pattern: TopicPattern,
    pub kafka_topic: Template,
    pub kafka_key: Option<Template>,
    /// The topics a `kafka.topic` filled from the MQTT topic has yielded, within
    /// `kafka.topic.max.distinct` (none for a fixed topic). Shared by the clones of one task's
    /// config, so it lasts as long as the task.
    pub topics: Option<Arc<TopicCap>>,
}

impl TopicMapping {
    /// The three settings, the templates checked against the pattern's captures.
    pub fn parse(parsed: &ParsedConfig) -> ConnectResult<Self> {
        let pattern = TopicPattern::parse(&parsed.string(TOPIC_PATTERN)?)
            .map_err(|reason| ConnectError::config(TOPIC_PATTERN, reason))?;
        let kafka_topic = Template::new(parsed.string(KAFKA_TOPIC)?.trim());
        kafka_topic
            .check_against(&pattern)
            .map_err(|e| ConnectError::config(KAFKA_TOPIC, e.to_string()))?;
        let kafka_key = parsed.optional_string(KAFKA_KEY).map(|k| Template::new(&k));
        if let Some(key) = &kafka_key {
            key.check_against(&pattern)
                .map_err(|e| ConnectError::config(KAFKA_KEY, e.to_string()))?;
        }
        let topics = kafka_topic
            .has_variables()
            .then(|| parsed.int_as(KAFKA_TOPIC_MAX_DISTINCT))
            .transpose()?
            .map(|max| Arc::new(TopicCap::new(max)));
        Ok(Self {
            pattern,
            kafka_topic,
            kafka_key,
            topics,
        })
    }

    /// The Kafka topic and key (none when it renders empty) for `mqtt_topic`, or why it has
    /// none (for the dead-letter topic).
    pub fn route(&self, mqtt_topic: &str) -> Result<(String, Option<String>), RouteError> {
        let Some(captures) = self.pattern.captures(mqtt_topic) else {
            return Err(RouteError::Unmapped(format!(
                "MQTT topic '{mqtt_topic}' does not match {TOPIC_PATTERN}"
            )));
        };
        let rendered = self.kafka_topic.render(mqtt_topic, &captures);
        let Some(topic) = kafka_topic_name(&rendered) else {
            return Err(RouteError::Unmapped(format!(
                "{KAFKA_TOPIC} gives no usable Kafka topic for MQTT topic '{mqtt_topic}'"
            )));
        };
        if let Some(cap) = &self.topics
            && !cap.admit(&topic)
        {
            return Err(RouteError::TopicCap(format!(
                "MQTT topic '{mqtt_topic}' would create Kafka topic '{topic}', beyond the {} distinct topics {KAFKA_TOPIC_MAX_DISTINCT} allows",
                cap.max()
            )));
        }
        let key = self
            .kafka_key
            .as_ref()
            .map(|key| key.render(mqtt_topic, &captures))
            .filter(|key| !key.is_empty());
        Ok((topic, key))
    }
}

/// The broker source's settings, typed.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// Username and password; secrets never appear in `Debug`.
    pub credentials: Option<Credentials>,
    pub topics: Vec<String>,
    pub qos: u8,
    pub clean_session: bool,
    pub keep_alive: Duration,
    pub max_packet_bytes: usize,
    pub mapping: TopicMapping,
    pub content_type: String,
    pub queue_capacity: usize,
    pub poll_batch_max: usize,
    pub connect_timeout: Duration,
    pub reconnect_backoff: Duration,
    pub reconnect_backoff_max: Duration,
}

#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"[hidden]")
            .finish()
    }
}

impl SourceConfig {
    pub fn parse(props: &Props) -> ConnectResult<Self> {
        let parsed = source_def().parse(props)?;
        let (host, port) = broker_address(&parsed)?;
        let credentials = credentials(&parsed);
        if credentials.is_none() && parsed.optional_string(PASSWORD).is_some() {
            return Err(ConnectError::config(
                PASSWORD,
                format!("set without {USERNAME}"),
            ));
        }
        let topics = parsed.list(TOPICS)?;
        if topics.is_empty() {
            return Err(ConnectError::config(TOPICS, "names no topic filter"));
        }
        let reconnect_backoff = parsed.millis(RECONNECT_BACKOFF_MS)?;
        let reconnect_backoff_max = parsed.millis(RECONNECT_BACKOFF_MAX_MS)?;
        if reconnect_backoff_max < reconnect_backoff {
            return Err(ConnectError::config(
                RECONNECT_BACKOFF_MAX_MS,
                format!("less than {RECONNECT_BACKOFF_MS}"),
            ));
        }
        Ok(Self {
            host,
            port,
            client_id: parsed.string(CLIENT_ID)?.trim().to_string(),
            credentials,
            topics,
            qos: parsed.int_as(QOS)?,
            clean_session: parsed.boolean(CLEAN_SESSION)?,
            keep_alive: Duration::from_secs(parsed.int_as(KEEP_ALIVE_S)?),
            max_packet_bytes: parsed.int_as(MAX_PACKET_BYTES)?,
            mapping: TopicMapping::parse(&parsed)?,
            content_type: parsed.string(CONTENT_TYPE)?.trim().to_string(),
            queue_capacity: parsed.int_as(QUEUE_CAPACITY)?,
            poll_batch_max: parsed.int_as(POLL_BATCH_MAX)?,
            connect_timeout: parsed.millis(CONNECT_TIMEOUT_MS)?,
            reconnect_backoff,
            reconnect_backoff_max,
        })
    }

    /// Whether every filter is a shared subscription, so that several tasks split the stream
    /// instead of each receiving every message.
    pub fn all_shared(&self) -> bool {
        self.topics.iter().all(|t| t.starts_with("$share/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medconnect_api::props_from;

    #[test]
    fn parses_a_uri_filters_and_templates() {
        let config = SourceConfig::parse(&props_from(&[
            (SERVER_URI, "tcp://broker:1884"),
            (CLIENT_ID, "medconnect-1"),
            (TOPICS, "$share/g/devices/+/vitals, alarms/#"),
            (TOPIC_PATTERN, "devices/+device/vitals"),
            (KAFKA_KEY, "${device}"),
        ]))
        .unwrap();
        assert_eq!((config.host.as_str(), config.port), ("broker", 1884));
        assert_eq!(config.topics.len(), 2);
        assert!(!config.clean_session);
        assert_eq!(config.qos, 1);
        assert!(!config.all_shared());
    }

    #[test]
    fn refuses_what_cannot_run() {
        let base = [(CLIENT_ID, "c"), (TOPICS, "a/b")];
        let with = |extra: (&str, &str)| {
            let mut pairs = base.to_vec();
            pairs.push(extra);
            SourceConfig::parse(&props_from(&pairs))
        };
        assert!(with((SERVER_URI, "ssl://b:8883")).is_err());
        assert!(with((QOS, "2")).is_err());
        assert!(with((TOPICS, "$share//a")).is_err());
        assert!(with((KAFKA_KEY, "${device}")).is_err());
        assert!(with((PASSWORD, "secret")).is_err());
        assert!(with((USERNAME, "u")).is_ok());
    }
}

pub const SINK_TOPIC: &str = "mqtt.topic";
pub const RETAIN: &str = "mqtt.retain";
pub const INFLIGHT: &str = "mqtt.inflight";
pub const ACK_TIMEOUT_MS: &str = "mqtt.ack.timeout.ms";
pub const SINK_TARGET: &str = "mqtt.sink.target";
pub const LISTENER_CONNECTOR: &str = "mqtt.listener.connector";
pub const DELIVERY_TIMEOUT_MS: &str = "mqtt.delivery.timeout.ms";
pub const DEVICE_MAX_QUEUED: &str = "mqtt.device.max.queued";

/// The sink's settings, declared once.
pub fn sink_def() -> ConfigDef {
    ConfigDef::new()
        .define(SERVER_URI, ConfigType::String, "", Importance::High, "Broker to publish to, tcp://host:port (mqtt:// also accepted); overrides mqtt.host and mqtt.port.")
        .with_validator(Validator::custom(check_uri))
        .define(HOST, ConfigType::String, "localhost", Importance::High, "Broker host, when mqtt.server.uri is not set.")
        .with_validator(Validator::NonEmpty)
        .define(PORT, ConfigType::Int, "1883", Importance::High, "Broker port, when mqtt.server.uri is not set.")
        .with_validator(Validator::between(1.0, 65535.0))
        .define(SINK_TARGET, ConfigType::String, "broker", Importance::High, "broker: publish to the MQTT broker at mqtt.server.uri (offsets committed after its PUBACK / PUBCOMP). listener: publish to the devices connected to the listener source mqtt.listener.connector on this worker that subscribed to the topic (offsets committed after each device's PUBACK).")
        .with_validator(Validator::OneOf(vec!["broker", "listener"]))
        .define(LISTENER_CONNECTOR, ConfigType::String, "", Importance::High, "With mqtt.sink.target=listener: the name of the MQTT listener source connector whose devices receive the messages.")
        .define(DELIVERY_TIMEOUT_MS, ConfigType::Long, "60000", Importance::Medium, "With mqtt.sink.target=listener: how long a record may wait for a subscribed device and its PUBACK (sent again when the device reconnects and subscribes) before it is reported as errant (dead-letter topic or task failure per errors.tolerance).")
        .with_validator(Validator::between(1.0, MAX_TIMEOUT_MS))
        .define(DEVICE_MAX_QUEUED, ConfigType::Int, "10", Importance::Low, "With mqtt.sink.target=listener: records waiting for one MQTT topic (one device) at most; one more is reported as errant at once, so a device that stays away holds little memory and does not stall the others.")
        .with_validator(Validator::between(1.0, 65_535.0))
        .define(CLIENT_ID, ConfigType::String, "", Importance::High, "MQTT client id at the broker (required with mqtt.sink.target=broker); task n uses <id>-<n>.")
        .define(USERNAME, ConfigType::String, "", Importance::Medium, "Username of the CONNECT (none when empty).")
        .define(PASSWORD, ConfigType::Password, "", Importance::Medium, "Password of the CONNECT.")
        .define(SINK_TOPIC, ConfigType::String, "devices/${key}/commands", Importance::High, "MQTT topic template: ${key}, ${topic} (the Kafka topic) and ${header.<name>}. A record missing a value it needs is reported as errant.")
        .with_validator(Validator::custom(crate::sink_topic::SinkTopic::check))
        .define(QOS, ConfigType::Int, "1", Importance::High, "1: offsets are committed only after the broker's PUBACK. 2: only after its PUBCOMP (exactly once between medconnect and the broker). 0: after the PUBLISH was handed to the connection (no acknowledgement).")
        .with_validator(Validator::between(0.0, 2.0))
        .define(RETAIN, ConfigType::Boolean, "false", Importance::Medium, "Publish with the retain flag (the broker keeps the last message per topic for new subscribers).")
        .define(CLEAN_SESSION, ConfigType::Boolean, "false", Importance::Low, "Start a new session at each connection. false: unacknowledged publishes survive a reconnect.")
        .define(KEEP_ALIVE_S, ConfigType::Int, "30", Importance::Low, "Keep-alive interval in seconds.")
        .with_validator(Validator::between(5.0, 65535.0))
        .define(MAX_PACKET_BYTES, ConfigType::Int, "1048576", Importance::Medium, "Largest packet sent; a larger record is reported as errant.")
        .with_validator(Validator::between(1024.0, 268_435_455.0))
        .define(INFLIGHT, ConfigType::Int, "100", Importance::Low, "Publishes awaiting their PUBACK at most; put waits beyond it.")
        .with_validator(Validator::between(1.0, 65_535.0))
        .define(ACK_TIMEOUT_MS, ConfigType::Long, "30000", Importance::Low, "How long flush waits for the PUBACKs of everything put before it reports a retriable error.")
        .with_validator(Validator::between(1.0, MAX_TIMEOUT_MS))
        .define(RECONNECT_BACKOFF_MS, ConfigType::Long, "500", Importance::Low, "Wait before reconnecting after the connection is lost; doubled each failed attempt.")
        .with_validator(Validator::between(1.0, MAX_TIMEOUT_MS))
        .define(RECONNECT_BACKOFF_MAX_MS, ConfigType::Long, "30000", Importance::Low, "Longest wait between reconnection attempts.")
        .with_validator(Validator::between(1.0, MAX_TIMEOUT_MS))
        .in_group("MQTT")
}

/// Where the sink publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkTarget {
    /// An MQTT broker (Mosquitto, EMQX, HiveMQ).
    Broker,
    /// The devices connected to the listener source of this name, on this worker.
    Listener { connector: String },
}

/// The sink's settings, typed.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub target: SinkTarget,
    pub delivery_timeout: Duration,
    pub device_max_queued: usize,
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub credentials: Option<Credentials>,
    pub topic: crate::sink_topic::SinkTopic,
    pub qos: u8,
    pub retain: bool,
    pub clean_session: bool,
    pub keep_alive: Duration,
    pub max_packet_bytes: usize,
    pub inflight: u16,
    pub ack_timeout: Duration,
    pub reconnect_backoff: Duration,
    pub reconnect_backoff_max: Duration,
}

impl SinkConfig {
    pub fn parse(props: &Props) -> ConnectResult<Self> {
        let parsed = sink_def().parse(props)?;
        let (host, port) = broker_address(&parsed)?;
        let credentials = credentials(&parsed);
        let topic = crate::sink_topic::SinkTopic::parse(&parsed.string(SINK_TOPIC)?)
            .map_err(|reason| ConnectError::config(SINK_TOPIC, reason))?;
        let client_id = parsed.string(CLIENT_ID)?.trim().to_string();
        let qos = parsed.int_as(QOS)?;
        let retain = parsed.boolean(RETAIN)?;
        let target = match parsed.string(SINK_TARGET)?.as_str() {
            "listener" => {
                let connector = parsed
                    .optional_string(LISTENER_CONNECTOR)
                    .map(|c| c.trim().to_string())
                    .ok_or_else(|| {
                        ConnectError::config(
                            LISTENER_CONNECTOR,
                            "needed with mqtt.sink.target=listener: the listener source's name",
                        )
                    })?;
                if qos > 1 {
                    return Err(ConnectError::config(
                        QOS,
                        "the listener sends to devices at QoS 0 or 1",
                    ));
                }
                if retain {
                    return Err(ConnectError::config(
                        RETAIN,
                        "the listener keeps no retained messages",
                    ));
                }
                SinkTarget::Listener { connector }
            }
            _ => {
                if client_id.is_empty() {
                    return Err(ConnectError::config(
                        CLIENT_ID,
                        "needed with mqtt.sink.target=broker",
                    ));
                }
                SinkTarget::Broker
            }
        };
        Ok(Self {
            target,
            delivery_timeout: parsed.millis(DELIVERY_TIMEOUT_MS)?,
            device_max_queued: parsed.int_as(DEVICE_MAX_QUEUED)?,
            host,
            port,
            client_id,
            credentials,
            topic,
            qos,
            retain,
            clean_session: parsed.boolean(CLEAN_SESSION)?,
            keep_alive: Duration::from_secs(parsed.int_as(KEEP_ALIVE_S)?),
            max_packet_bytes: parsed.int_as(MAX_PACKET_BYTES)?,
            inflight: parsed.int_as(INFLIGHT)?,
            ack_timeout: parsed.millis(ACK_TIMEOUT_MS)?,
            reconnect_backoff: parsed.millis(RECONNECT_BACKOFF_MS)?,
            reconnect_backoff_max: parsed.millis(RECONNECT_BACKOFF_MAX_MS)?,
        })
    }
}
