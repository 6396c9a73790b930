//! Settings of the listener source (devices connect to medconnect), declared once and read
//! into a typed struct.

use std::path::PathBuf;
use std::time::Duration;

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, Props, Validator,
};

use super::auth::Users;
use super::subscriptions::AllowedFilters;
use crate::config::{
    CONTENT_TYPE, KAFKA_KEY, KAFKA_TOPIC, KAFKA_TOPIC_MAX_DISTINCT, POLL_BATCH_MAX, QUEUE_CAPACITY,
    TOPIC_CAP_DOC, TOPIC_PATTERN, TopicMapping,
};
use crate::mapping::TopicPattern;

pub const BIND: &str = "mqtt.bind";
pub const PORT: &str = "mqtt.port";
pub const SHARE_PORT: &str = "mqtt.share.port";
pub const USERS: &str = "mqtt.users";
pub const ALLOW_ANONYMOUS: &str = "mqtt.allow.anonymous";
pub const MAX_CONNECTIONS: &str = "mqtt.max.connections";
pub const MAX_PACKET_BYTES: &str = "mqtt.max.packet.bytes";
pub const MAX_INFLIGHT: &str = "mqtt.max.inflight";
pub const MAX_QOS: &str = "mqtt.max.qos";
pub const KEEP_ALIVE_MAX_S: &str = "mqtt.keep.alive.max.s";
pub const CONNECT_TIMEOUT_MS: &str = "mqtt.connect.timeout.ms";
pub const CONNECT_RATE: &str = "mqtt.connect.rate";
pub const PAYLOAD_FORMAT: &str = "payload.format";
pub const TLS_CERT_FILE: &str = "mqtt.tls.cert.file";
pub const TLS_KEY_FILE: &str = "mqtt.tls.key.file";
pub const TLS_CLIENT_CA_FILE: &str = "mqtt.tls.client.ca.file";
pub const SUBSCRIBE_ALLOWED: &str = "mqtt.subscribe.allowed";
pub const COMMANDS_INFLIGHT: &str = "mqtt.commands.inflight";
pub const BUDGET_BYTES: &str = "mqtt.budget.bytes";
pub const MAX_CONNECTIONS_PER_PEER: &str = "mqtt.max.connections.per.peer";
pub const TRANSPORT: &str = "mqtt.transport";
pub const WEBSOCKET_PATH: &str = "mqtt.websocket.path";
const DEFAULT_WEBSOCKET_PATH: &str = "/mqtt";

/// Bytes a connection reads at once: the budget is taken for them before the read.
pub const READ_CHUNK: usize = 4 * 1024;

/// What a payload must be to be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// Anything: kept as bytes.
    Bytes,
    /// A JSON document; anything else goes to the dead-letter topic.
    Json,
}

impl PayloadFormat {
    /// Why `payload` is not of this format (never quoting it: it may hold patient data).
    pub fn problem(self, payload: &[u8]) -> Option<String> {
        match self {
            Self::Bytes => None,
            Self::Json => serde_json::from_slice::<serde::de::IgnoredAny>(payload)
                .err()
                .map(|e| {
                    format!(
                        "{PAYLOAD_FORMAT}=json: the payload is not JSON ({} at line {} column {})",
                        json_error_kind(&e),
                        e.line(),
                        e.column()
                    )
                }),
        }
    }
}

/// What carries the MQTT byte stream, inside TLS when the listener has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// MQTT straight on the TCP (or TLS) connection.
    Tcp,
    /// MQTT in WebSocket binary frames (subprotocol `mqtt`), upgraded from an HTTP request
    /// for `path`.
    WebSocket { path: String },
}

/// Why `path` cannot be the WebSocket endpoint: it is compared with the request's path as
/// is, so it must look like one.
fn check_websocket_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} does not start with '/'"));
    }
    if path.len() > 256 {
        return Err("longer than 256 characters".into());
    }
    if let Some(bad) = path
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '?' | '#'))
    {
        return Err(format!(
            "{bad:?} is not allowed (a path only: no query, fragment, space or non-ASCII)"
        ));
    }
    Ok(())
}

fn json_error_kind(error: &serde_json::Error) -> &'static str {
    match error.classify() {
        serde_json::error::Category::Eof => "it ends early",
        serde_json::error::Category::Syntax => "a syntax error",
        serde_json::error::Category::Data | serde_json::error::Category::Io => "not readable",
    }
}

pub fn listener_def() -> ConfigDef {
    ConfigDef::new()
        .define(SHARE_PORT, ConfigType::Boolean, "false", Importance::Low, "Bind with SO_REUSEPORT, so the listener on several workers of one host can share mqtt.port (the kernel spreads connections); not needed with one worker per host.")
        .define(BIND, ConfigType::String, "127.0.0.1", Importance::High, "Address to listen on; 0.0.0.0 for devices on the network (say so explicitly: the default keeps the port local).")
        .with_validator(Validator::NonEmpty)
        .define(PORT, ConfigType::Int, "1883", Importance::High, "TCP port (0: any free port).")
        .with_validator(Validator::between(0.0, 65535.0))
        .define(TRANSPORT, ConfigType::String, "tcp", Importance::High, "tcp: MQTT straight over TCP (or TLS with mqtt.tls.cert.file). websocket: MQTT over WebSocket (binary frames, subprotocol mqtt) at mqtt.websocket.path, ws:// — or wss:// with mqtt.tls.cert.file —, for browser and firewall-bound devices; every limit, check and acknowledgement rule is the same.")
        .with_validator(Validator::OneOf(vec!["tcp", "websocket"]))
        .define(WEBSOCKET_PATH, ConfigType::String, DEFAULT_WEBSOCKET_PATH, Importance::Medium, "With mqtt.transport=websocket: the HTTP path devices upgrade at (ws://host:port/mqtt); any other path is answered 404.")
        .with_validator(Validator::custom(check_websocket_path))
        .define(TLS_CERT_FILE, ConfigType::String, "", Importance::High, "PEM certificate chain of the listener: set, devices connect over TLS (MQTT over TLS, port 8883 by convention); empty: plain TCP.")
        .define(TLS_KEY_FILE, ConfigType::String, "", Importance::High, "PEM private key of mqtt.tls.cert.file.")
        .define(TLS_CLIENT_CA_FILE, ConfigType::String, "", Importance::High, "PEM CA(s) that sign device certificates: set, every device must present one (mTLS), and its subject's common name is the device's identity (header mqtt.cert.cn); a device with a valid certificate needs no password unless mqtt.users names it.")
        .define(USERS, ConfigType::Password, "", Importance::High, "Devices allowed to connect: username:password entries separated by newlines or commas; use a secret reference such as ${file:/etc/medconnect/mqtt-users:users}. A CONNECT with other credentials is refused (bad username or password).")
        .define(ALLOW_ANONYMOUS, ConfigType::Boolean, "false", Importance::High, "Accept a CONNECT without a username. false (default): refused as not authorised.")
        .define(MAX_CONNECTIONS, ConfigType::Int, "1000", Importance::Medium, "Connections at once on this worker; one more is refused (server busy / unavailable) and closed.")
        .with_validator(Validator::between(1.0, 1_000_000.0))
        .define(MAX_PACKET_BYTES, ConfigType::Int, "262144", Importance::Medium, "Largest packet accepted; a larger one is refused from its header alone (MQTT 5: DISCONNECT packet too large) and the connection closed. Bounds memory per connection.")
        .with_validator(Validator::between(128.0, 268_435_455.0))
        .define(BUDGET_BYTES, ConfigType::Int, "67108864", Importance::Medium, "Bytes all devices together may make the listener hold: packets being read and publishes waiting for Kafka, over every connection (and within the worker's [tasks] listener_budget_bytes over all listeners). A connection that needs more is not read until others' publishes are settled; one that waits past 1.5 times its keep-alive is closed (MQTT 5: DISCONNECT quota exceeded). At least mqtt.max.packet.bytes + 4 KiB (each connection keeps 4 KiB for its next read); over WebSocket twice that (a frame being received besides a packet being read).")
        .with_validator(Validator::between(65_536.0, 68_719_476_736.0))
        .define(MAX_CONNECTIONS_PER_PEER, ConfigType::Int, "0", Importance::Low, "Connections at once from one IP address; one more is closed before its CONNECT is read. 0 (default): no limit, since devices behind one gateway or NAT share an address; set it when devices connect directly.")
        .with_validator(Validator::between(0.0, 1_000_000.0))
        .define(MAX_INFLIGHT, ConfigType::Int, "32", Importance::Medium, "QoS 1/2 publishes per connection waiting for Kafka at once (MQTT 5: the receive maximum in CONNACK); beyond it the listener stops reading that connection.")
        .with_validator(Validator::between(1.0, 65_535.0))
        .define(MAX_QOS, ConfigType::Int, "2", Importance::Low, "Highest QoS accepted; a publish above it closes the connection (MQTT 5: QoS not supported).")
        .with_validator(Validator::between(0.0, 2.0))
        .define(KEEP_ALIVE_MAX_S, ConfigType::Int, "300", Importance::Low, "Longest keep-alive allowed (a client asking for more or for none gets this, MQTT 5 in CONNACK); a connection silent for 1.5 times its keep-alive is closed.")
        .with_validator(Validator::between(1.0, 65_535.0))
        .define(CONNECT_TIMEOUT_MS, ConfigType::Long, "10000", Importance::Low, "How long a new connection may take to send its CONNECT.")
        .with_validator(Validator::between(1.0, 86_400_000.0))
        .define(CONNECT_RATE, ConfigType::Int, "200", Importance::Low, "CONNECTs accepted per second on this worker (a reconnect storm after an outage); beyond it refused (connection rate exceeded / server unavailable), the device retries.")
        .with_validator(Validator::between(1.0, 1_000_000.0))
        .define(TOPIC_PATTERN, ConfigType::String, "", Importance::Medium, "Pattern naming levels of the MQTT topic, e.g. devices/+device/vitals, for use as ${device} in kafka.topic and kafka.key. A publish whose topic does not match goes to the dead-letter topic.")
        .with_validator(Validator::custom(TopicPattern::check))
        .define(KAFKA_TOPIC, ConfigType::String, "${mqtt.topic}", Importance::High, "Kafka topic template: ${mqtt.topic} and captures of mqtt.topic.pattern; '/' becomes '.', other characters Kafka refuses become '_'.")
        .with_validator(Validator::NonEmpty)
        .define(KAFKA_KEY, ConfigType::String, "${mqtt.topic}", Importance::Medium, "Record key template (e.g. ${device}); empty: no key.")
        .define(KAFKA_TOPIC_MAX_DISTINCT, ConfigType::Int, "50", Importance::Medium, TOPIC_CAP_DOC)
        .with_validator(Validator::between(1.0, 100_000.0))
        .define(CONTENT_TYPE, ConfigType::String, "application/json", Importance::Low, "content-type header of the records, unless an MQTT 5 publish names its own.")
        .define(PAYLOAD_FORMAT, ConfigType::String, "bytes", Importance::Medium, "bytes: payloads are kept as they come. json: a payload that is not a JSON document goes to the dead-letter topic (MQTT 5: acknowledged with reason 0x99, payload format invalid).")
        .with_validator(Validator::OneOf(vec!["bytes", "json"]))
        .define(SUBSCRIBE_ALLOWED, ConfigType::List, "", Importance::Medium, "Topic filters devices may subscribe to, for commands from an MQTT sink with mqtt.sink.target=listener; ${client.id}, ${username} and ${cert.cn} stand for the device's identity, e.g. devices/${client.id}/commands. A SUBSCRIBE outside them is refused (SUBACK 0x80, MQTT 5 0x87 not authorised). Empty (default): no subscriptions.")
        .with_validator(Validator::custom(|v| AllowedFilters::parse(&v.split(',').map(String::from).collect::<Vec<_>>()).map(|_| ())))
        .define(COMMANDS_INFLIGHT, ConfigType::Int, "10", Importance::Low, "Messages to one device awaiting its PUBACK at once (less when an MQTT 5 device's receive maximum says so); more wait in the sink.")
        .with_validator(Validator::between(1.0, 65_535.0))
        .define(QUEUE_CAPACITY, ConfigType::Int, "1024", Importance::Low, "Publishes received and not yet polled, over all connections; while it is full, connections are not read.")
        .with_validator(Validator::between(1.0, 1_000_000.0))
        .define(POLL_BATCH_MAX, ConfigType::Int, "500", Importance::Low, "Records returned per poll at most.")
        .with_validator(Validator::between(1.0, 1_000_000.0))
        .in_group("MQTT listener")
}

/// The listener's settings, typed.
/// The listener's TLS files.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set: a client certificate signed by this CA is required.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub bind: String,
    pub port: u16,
    /// `SO_REUSEPORT`: several workers of one host share the port.
    pub share_port: bool,
    pub tls: Option<ListenerTls>,
    pub transport: Transport,
    pub users: Users,
    pub allow_anonymous: bool,
    pub max_connections: usize,
    pub max_packet_bytes: usize,
    pub max_inflight: u16,
    pub max_qos: u8,
    pub keep_alive_max: u16,
    pub connect_timeout: Duration,
    pub connect_rate: u32,
    pub mapping: TopicMapping,
    pub content_type: String,
    pub payload_format: PayloadFormat,
    pub queue_capacity: usize,
    pub poll_batch_max: usize,
    pub subscribe_allowed: AllowedFilters,
    pub commands_inflight: u16,
    pub budget_bytes: usize,
    /// 0: no limit.
    pub max_connections_per_peer: usize,
}

impl ListenerConfig {
    pub fn parse(props: &Props) -> ConnectResult<Self> {
        let parsed = listener_def().parse(props)?;
        let users = Users::parse(&parsed.string(USERS)?)
            .map_err(|reason| ConnectError::config(USERS, reason))?;
        let allow_anonymous = parsed.boolean(ALLOW_ANONYMOUS)?;
        let file = |key: &str| parsed.optional_string(key).map(|p| PathBuf::from(p.trim()));
        let tls = match (file(TLS_CERT_FILE), file(TLS_KEY_FILE)) {
            (Some(cert), Some(key)) => Some(ListenerTls {
                cert,
                key,
                client_ca: file(TLS_CLIENT_CA_FILE),
            }),
            (None, None) if file(TLS_CLIENT_CA_FILE).is_some() => {
                return Err(ConnectError::config(
                    TLS_CLIENT_CA_FILE,
                    format!("set without {TLS_CERT_FILE} and {TLS_KEY_FILE}"),
                ));
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConnectError::config(
                    TLS_KEY_FILE,
                    format!("needed with {TLS_CERT_FILE}"),
                ));
            }
            (None, Some(_)) => {
                return Err(ConnectError::config(
                    TLS_CERT_FILE,
                    format!("needed with {TLS_KEY_FILE}"),
                ));
            }
        };
        let transport = match parsed.string(TRANSPORT)?.as_str() {
            "websocket" => Transport::WebSocket {
                path: parsed.string(WEBSOCKET_PATH)?,
            },
            // A path of its own says WebSocket was meant: a forgotten transport must not
            // silently mean plain MQTT (the default path, as tools that send every default
            // do, is no such sign).
            _ if props
                .get(WEBSOCKET_PATH)
                .is_some_and(|path| path != DEFAULT_WEBSOCKET_PATH) =>
            {
                return Err(ConnectError::config(
                    WEBSOCKET_PATH,
                    format!("set, but {TRANSPORT} is not websocket"),
                ));
            }
            _ => Transport::Tcp,
        };
        let max_packet_bytes: usize = parsed.int_as(MAX_PACKET_BYTES)?;
        let budget_bytes: usize = parsed.int_as(BUDGET_BYTES)?;
        if budget_bytes < max_packet_bytes.saturating_add(READ_CHUNK) {
            return Err(ConnectError::config(
                BUDGET_BYTES,
                format!(
                    "{budget_bytes} cannot hold one packet of {MAX_PACKET_BYTES} ({max_packet_bytes}) and a read of {READ_CHUNK} bytes"
                ),
            ));
        }
        // Over WebSocket a connection may hold a frame being received besides the packet being
        // read, and reads room for each.
        let websocket_needs = max_packet_bytes
            .saturating_add(READ_CHUNK)
            .saturating_mul(2);
        if matches!(transport, Transport::WebSocket { .. }) && budget_bytes < websocket_needs {
            return Err(ConnectError::config(
                BUDGET_BYTES,
                format!(
                    "{budget_bytes} cannot hold, with {TRANSPORT}=websocket, a frame and a packet of {MAX_PACKET_BYTES} ({max_packet_bytes}) and two reads of {READ_CHUNK} bytes ({websocket_needs})"
                ),
            ));
        }
        let certificates_identify = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if users.is_empty() && !allow_anonymous && !certificates_identify {
            return Err(ConnectError::config(
                USERS,
                format!(
                    "names no device, and neither {ALLOW_ANONYMOUS} nor {TLS_CLIENT_CA_FILE} is set: no device could connect"
                ),
            ));
        }
        Ok(Self {
            bind: parsed.string(BIND)?.trim().to_string(),
            port: parsed.int_as(PORT)?,
            share_port: parsed.boolean(SHARE_PORT)?,
            tls,
            transport,
            users,
            allow_anonymous,
            max_connections: parsed.int_as(MAX_CONNECTIONS)?,
            max_packet_bytes,
            budget_bytes,
            max_connections_per_peer: parsed.int_as(MAX_CONNECTIONS_PER_PEER)?,
            max_inflight: parsed.int_as(MAX_INFLIGHT)?,
            max_qos: parsed.int_as(MAX_QOS)?,
            keep_alive_max: parsed.int_as(KEEP_ALIVE_MAX_S)?,
            connect_timeout: parsed.millis(CONNECT_TIMEOUT_MS)?,
            connect_rate: parsed.int_as(CONNECT_RATE)?,
            mapping: TopicMapping::parse(&parsed)?,
            content_type: parsed.string(CONTENT_TYPE)?.trim().to_string(),
            payload_format: match parsed.string(PAYLOAD_FORMAT)?.as_str() {
                "json" => PayloadFormat::Json,
                _ => PayloadFormat::Bytes,
            },
            queue_capacity: parsed.int_as(QUEUE_CAPACITY)?,
            poll_batch_max: parsed.int_as(POLL_BATCH_MAX)?,
            subscribe_allowed: AllowedFilters::parse(&parsed.list(SUBSCRIBE_ALLOWED)?)
                .map_err(|reason| ConnectError::config(SUBSCRIBE_ALLOWED, reason))?,
            commands_inflight: parsed.int_as(COMMANDS_INFLIGHT)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medconnect_api::props_from;

    #[test]
    fn needs_users_unless_anonymous_is_allowed() {
        let error = ListenerConfig::parse(&props_from(&[])).unwrap_err();
        assert!(error.to_string().contains(USERS), "{error}");
        assert!(ListenerConfig::parse(&props_from(&[(ALLOW_ANONYMOUS, "true")])).is_ok());
        let config = ListenerConfig::parse(&props_from(&[
            (USERS, "pump-3:s3cret\nmonitor-7:other"),
            (TOPIC_PATTERN, "devices/+device/vitals"),
            (KAFKA_KEY, "${device}"),
        ]))
        .unwrap();
        assert_eq!(config.users.len(), 2);
        assert!(!format!("{config:?}").contains("s3cret"));
        assert!(ListenerConfig::parse(&props_from(&[(USERS, "no-colon")])).is_err());
    }

    #[test]
    fn the_transport_is_tcp_or_websocket_with_a_path() {
        let anonymous = (ALLOW_ANONYMOUS, "true");
        let parse = |pairs: &[(&str, &str)]| {
            let mut all = vec![anonymous];
            all.extend_from_slice(pairs);
            ListenerConfig::parse(&props_from(&all))
        };
        assert_eq!(parse(&[]).unwrap().transport, Transport::Tcp);
        assert_eq!(
            parse(&[(TRANSPORT, "websocket")]).unwrap().transport,
            Transport::WebSocket {
                path: "/mqtt".into()
            }
        );
        assert_eq!(
            parse(&[(TRANSPORT, "websocket"), (WEBSOCKET_PATH, "/devices/ws")])
                .unwrap()
                .transport,
            Transport::WebSocket {
                path: "/devices/ws".into()
            }
        );
        for (pairs, field) in [
            (&[(TRANSPORT, "ws")][..], TRANSPORT),
            (
                &[(TRANSPORT, "websocket"), (WEBSOCKET_PATH, "mqtt")][..],
                WEBSOCKET_PATH,
            ),
            (
                &[(TRANSPORT, "websocket"), (WEBSOCKET_PATH, "/mqtt?x=1")][..],
                WEBSOCKET_PATH,
            ),
            (&[(WEBSOCKET_PATH, "/devices/ws")][..], WEBSOCKET_PATH),
        ] {
            let error = parse(pairs).unwrap_err().to_string();
            assert!(error.contains(field), "{pairs:?}: {error}");
        }
        let error = parse(&[
            (TRANSPORT, "websocket"),
            (MAX_PACKET_BYTES, "65536"),
            (BUDGET_BYTES, "100000"),
        ])
        .unwrap_err()
        .to_string();
        assert!(error.contains(BUDGET_BYTES), "{error}");
        let defaults_spelled_out = parse(&[(TRANSPORT, "tcp"), (WEBSOCKET_PATH, "/mqtt")]);
        assert_eq!(defaults_spelled_out.unwrap().transport, Transport::Tcp);
    }
}
