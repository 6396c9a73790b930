//! One device PUBLISH as one record: the payload as is (never parsed, never logged), the key
//! and topic from the mapping, headers saying who sent it and how.

use bytes::Bytes;
use medconnect_api::{
    AckHandle, ConnectError, HeaderName, Record, SourcePartition, SourceRecord, content_type,
};
use rumqttc::QoS;

use super::config::ListenerConfig;
use super::wire::{Publish, Verdict};
use crate::config::RouteError;
use crate::source::{HEADER_CLIENT_ID, HEADER_DUP, HEADER_QOS, HEADER_RETAIN, HEADER_TOPIC};

/// The username the device authenticated with.
pub const HEADER_USERNAME: &str = "mqtt.username";
/// The common name of the device's TLS client certificate (mTLS).
pub const HEADER_CERT_CN: &str = "mqtt.cert.cn";
/// The prefix of an MQTT 5 user property whose name would shadow one of the listener's
/// headers (`mqtt.*`, `content-type`).
pub const USER_PROPERTY_PREFIX: &str = "mqtt.user.";

const UNMAPPED_TOPIC: &str = "mqtt.unmapped";

/// Who sent a publish: fixed for a connection once its CONNECT was accepted.
#[derive(Debug, Clone)]
pub struct Device {
    pub client_id: String,
    pub username: Option<String>,
    pub certificate_cn: Option<String>,
}

fn qos_number(qos: QoS) -> &'static str {
    match qos {
        QoS::AtMostOnce => "0",
        QoS::AtLeastOnce => "1",
        QoS::ExactlyOnce => "2",
    }
}

/// What every record from one connection shares, built once for it rather than per record:
/// the header values its identity and the configuration give, and the route of the MQTT topic
/// it last published to (a device publishes to the same few topics again and again).
pub struct Stamp {
    client_id: Bytes,
    username: Option<Bytes>,
    certificate_cn: Option<Bytes>,
    content_type: Bytes,
    /// The last MQTT topic routed, its `mqtt.topic` header value, Kafka topic and key. Only a
    /// route that succeeded is kept: the same topic routes the same way again (the mapping is
    /// fixed for the task, and a Kafka topic admitted under the distinct-topic cap stays so).
    last_route: Option<(String, Bytes, String, Option<Bytes>)>,
}

impl Stamp {
    pub fn new(config: &ListenerConfig, device: &Device) -> Self {
        let bytes = |value: &String| Bytes::copy_from_slice(value.as_bytes());
        Self {
            client_id: bytes(&device.client_id),
            username: device.username.as_ref().map(bytes),
            certificate_cn: device.certificate_cn.as_ref().map(bytes),
            content_type: bytes(&config.content_type),
            last_route: None,
        }
    }
}

/// The record for `publish` and what its acknowledgement is to say; rejected (for the
/// dead-letter topic) when its topic holds a wildcard or fits no mapping, or its payload fails
/// `payload.format`. `ack` is `None` for QoS 0.
pub fn to_record(
    config: &ListenerConfig,
    stamp: &mut Stamp,
    publish: Publish,
    ack: Option<AckHandle>,
) -> (SourceRecord, Verdict) {
    let Publish {
        topic: mqtt_topic,
        qos,
        dup,
        retain,
        payload,
        user_properties,
        content_type: publish_content_type,
        ..
    } = publish;
    let routed = route(config, stamp, &mqtt_topic, &payload);
    // Routed: the route kept for this very topic.
    let (topic_header, topic, key) = match (&routed, &stamp.last_route) {
        (Ok(()), Some((_, header, topic, key))) => (header.clone(), topic.clone(), key.clone()),
        _ => (Bytes::from(mqtt_topic), UNMAPPED_TOPIC.to_string(), None),
    };
    let mut headers: Vec<(HeaderName, Option<Bytes>)> = Vec::with_capacity(
        5 + usize::from(stamp.username.is_some())
            + usize::from(stamp.certificate_cn.is_some())
            + user_properties.len(),
    );
    let mut add = |name: &'static str, value: Bytes| headers.push((name.into(), Some(value)));
    add(HEADER_TOPIC, topic_header);
    add(HEADER_QOS, Bytes::from_static(qos_number(qos).as_bytes()));
    add(HEADER_CLIENT_ID, stamp.client_id.clone());
    if let Some(username) = &stamp.username {
        add(HEADER_USERNAME, username.clone());
    }
    if let Some(common_name) = &stamp.certificate_cn {
        add(HEADER_CERT_CN, common_name.clone());
    }
    if retain {
        add(HEADER_RETAIN, Bytes::from_static(b"true"));
    }
    if dup {
        add(HEADER_DUP, Bytes::from_static(b"true"));
    }
    add(
        content_type::HEADER,
        publish_content_type.map_or_else(|| stamp.content_type.clone(), Bytes::from),
    );
    for (name, value) in user_properties {
        let reserved = name.starts_with("mqtt.") || name == content_type::HEADER;
        let name = if reserved {
            format!("{USER_PROPERTY_PREFIX}{name}")
        } else {
            name
        };
        headers.push((name.into(), Some(Bytes::from(value))));
    }
    let mut record = Record::new(topic);
    record.key = key;
    record.value = Some(payload);
    record.headers = headers.into_iter().collect();

    match routed {
        Ok(()) => {
            let record = match ack {
                Some(ack) => SourceRecord::acknowledged(record, ack),
                None => SourceRecord::new(record, SourcePartition::new(), Default::default()),
            };
            (record, Verdict::Stored)
        }
        Err((reason, verdict)) => (
            SourceRecord::rejected(record, ConnectError::data(reason), ack),
            verdict,
        ),
    }
}

/// Routes the MQTT topic (the last one's route again when it is the same), keeping its route
/// in `stamp.last_route`; or why the record cannot be stored.
fn route(
    config: &ListenerConfig,
    stamp: &mut Stamp,
    mqtt_topic: &str,
    payload: &[u8],
) -> Result<(), (String, Verdict)> {
    if mqtt_topic.is_empty() || mqtt_topic.contains(['+', '#', '\0']) {
        return Err((
            format!(
                "MQTT topic '{mqtt_topic}' is empty, not UTF-8, or holds a wildcard or NUL: not a topic name a PUBLISH may carry"
            ),
            Verdict::TopicInvalid,
        ));
    }
    if let Some(problem) = config.payload_format.problem(payload) {
        return Err((problem, Verdict::PayloadInvalid));
    }
    if matches!(&stamp.last_route, Some((last, ..)) if last == mqtt_topic) {
        return Ok(());
    }
    let (topic, key) = config
        .mapping
        .route(mqtt_topic)
        .map_err(|error| match error {
            RouteError::Unmapped(reason) => (reason, Verdict::TopicInvalid),
            RouteError::TopicCap(reason) => (reason, Verdict::QuotaExceeded),
        })?;
    stamp.last_route = Some((
        mqtt_topic.to_string(),
        Bytes::copy_from_slice(mqtt_topic.as_bytes()),
        topic,
        key.map(Bytes::from),
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KAFKA_KEY, KAFKA_TOPIC, TOPIC_PATTERN};
    use crate::listener::config::ALLOW_ANONYMOUS;
    use medconnect_api::props_from;

    fn publish(topic: &str) -> Publish {
        Publish {
            topic: topic.into(),
            qos: QoS::AtLeastOnce,
            pkid: 1,
            dup: true,
            retain: false,
            payload: "{\"hr\":72}".into(),
            user_properties: vec![
                ("unit".into(), "bpm".into()),
                ("mqtt.qos".into(), "9".into()),
            ],
            content_type: None,
            topic_alias: None,
        }
    }

    #[test]
    fn maps_topic_key_and_headers_with_user_properties() {
        let config = ListenerConfig::parse(&props_from(&[
            (ALLOW_ANONYMOUS, "true"),
            (TOPIC_PATTERN, "devices/+device/vitals"),
            (KAFKA_TOPIC, "device.vitals"),
            (KAFKA_KEY, "${device}"),
        ]))
        .unwrap();
        let device = Device {
            client_id: "pump-3".into(),
            username: Some("ward-4".into()),
            certificate_cn: None,
        };
        let stamp = &mut Stamp::new(&config, &device);
        let (ack, _) = AckHandle::channel();
        let (record, verdict) =
            to_record(&config, stamp, publish("devices/pump-3/vitals"), Some(ack));
        assert_eq!(verdict, Verdict::Stored);
        assert!(record.rejected.is_none());
        let headers = &record.record.headers;
        assert_eq!(record.record.topic, "device.vitals");
        assert_eq!(record.record.key.as_deref(), Some(&b"pump-3"[..]));
        assert_eq!(headers.last_str(HEADER_CLIENT_ID), Some("pump-3"));
        assert_eq!(headers.last_str(HEADER_USERNAME), Some("ward-4"));
        assert_eq!(headers.last_str(HEADER_QOS), Some("1"));
        assert_eq!(headers.last_str(HEADER_DUP), Some("true"));
        assert_eq!(headers.last_str("unit"), Some("bpm"));
        assert_eq!(headers.last_str("mqtt.user.mqtt.qos"), Some("9"));

        let (ack, _) = AckHandle::channel();
        let (record, verdict) =
            to_record(&config, stamp, publish("devices/pump-3/alarms"), Some(ack));
        assert_eq!(verdict, Verdict::TopicInvalid);
        assert!(record.rejected.is_some());
        assert!(record.ack.is_some());
        for topic in ["devices/+/vitals", "devices/#", "", "devices/a\0/vitals"] {
            let (ack, _) = AckHandle::channel();
            let (record, verdict) = to_record(&config, stamp, publish(topic), Some(ack));
            assert_eq!(verdict, Verdict::TopicInvalid, "{topic:?}");
            assert!(record.rejected.is_some());
        }
        // A topic routed before (its route kept), then another: each its own topic and key.
        for device in ["pump-3", "pump-4", "pump-3"] {
            let topic = format!("devices/{device}/vitals");
            let (ack, _) = AckHandle::channel();
            let (record, verdict) = to_record(&config, stamp, publish(&topic), Some(ack));
            assert_eq!(verdict, Verdict::Stored);
            assert_eq!(record.record.topic, "device.vitals");
            assert_eq!(record.record.key.as_deref(), Some(device.as_bytes()));
            assert_eq!(
                record.record.headers.last_str(HEADER_TOPIC),
                Some(&topic[..])
            );
            assert_eq!(
                record.record.headers.last_str(HEADER_CLIENT_ID),
                Some("pump-3")
            );
        }
    }

    #[test]
    fn with_payload_format_json_a_payload_that_is_not_json_is_rejected() {
        let config = ListenerConfig::parse(&props_from(&[
            (ALLOW_ANONYMOUS, "true"),
            (crate::listener::config::PAYLOAD_FORMAT, "json"),
        ]))
        .unwrap();
        let device = Device {
            client_id: "pump-3".into(),
            username: None,
            certificate_cn: None,
        };
        let stamp = &mut Stamp::new(&config, &device);
        let mut bad = publish("devices/pump-3/vitals");
        bad.payload = "{\"hr\":".into();
        let (record, verdict) = to_record(&config, stamp, bad, None);
        assert_eq!(verdict, Verdict::PayloadInvalid);
        let reason = record.rejected.expect("rejected").to_string();
        assert!(reason.contains("payload.format"), "{reason}");
        assert!(
            !reason.contains("hr"),
            "the payload is not quoted: {reason}"
        );
        let (record, verdict) = to_record(&config, stamp, publish("devices/pump-3/vitals"), None);
        assert_eq!(verdict, Verdict::Stored);
        assert!(record.rejected.is_none());
    }
}
