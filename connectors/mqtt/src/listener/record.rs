//! One device PUBLISH as one record: the payload as is (never parsed, never logged), the key
//! and topic from the mapping, headers saying who sent it and how.

use medconnect_api::{AckHandle, ConnectError, Record, SourceRecord, content_type};
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

/// The record for `publish` and what its acknowledgement is to say; rejected (for the
/// dead-letter topic) when its topic holds a wildcard or fits no mapping, or its payload fails
/// `payload.format`. `ack` is `None` for QoS 0.
pub fn to_record(
    config: &ListenerConfig,
    device: &Device,
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
    let mut record = Record::new(UNMAPPED_TOPIC).with_value(payload);
    record.headers.add(HEADER_TOPIC, mqtt_topic.clone());
    record.headers.add(HEADER_QOS, qos_number(qos));
    record
        .headers
        .add(HEADER_CLIENT_ID, device.client_id.clone());
    if let Some(username) = &device.username {
        record.headers.add(HEADER_USERNAME, username.clone());
    }
    if let Some(common_name) = &device.certificate_cn {
        record.headers.add(HEADER_CERT_CN, common_name.clone());
    }
    if retain {
        record.headers.add(HEADER_RETAIN, "true");
    }
    if dup {
        record.headers.add(HEADER_DUP, "true");
    }
    record.headers.add(
        content_type::HEADER,
        publish_content_type.unwrap_or_else(|| config.content_type.clone()),
    );
    for (name, value) in user_properties {
        let reserved = name.starts_with("mqtt.") || name == content_type::HEADER;
        let name = if reserved {
            format!("{USER_PROPERTY_PREFIX}{name}")
        } else {
            name
        };
        record.headers.add(name, value);
    }

    match route(config, &mqtt_topic, &mut record) {
        Ok(()) => {
            let record = match ack {
                Some(ack) => SourceRecord::acknowledged(record, ack),
                None => SourceRecord::new(record, Default::default(), Default::default()),
            };
            (record, Verdict::Stored)
        }
        Err((reason, verdict)) => (
            SourceRecord::rejected(record, ConnectError::data(reason), ack),
            verdict,
        ),
    }
}

/// Sets the record's Kafka topic and key from the MQTT topic; or why it cannot be stored.
fn route(
    config: &ListenerConfig,
    mqtt_topic: &str,
    record: &mut Record,
) -> Result<(), (String, Verdict)> {
    if mqtt_topic.is_empty() || mqtt_topic.contains(['+', '#', '\0']) {
        return Err((
            format!(
                "MQTT topic '{mqtt_topic}' is empty, not UTF-8, or holds a wildcard or NUL: not a topic name a PUBLISH may carry"
            ),
            Verdict::TopicInvalid,
        ));
    }
    if let Some(problem) = config
        .payload_format
        .problem(record.value.as_deref().unwrap_or_default())
    {
        return Err((problem, Verdict::PayloadInvalid));
    }
    let (topic, key) = config
        .mapping
        .route(mqtt_topic)
        .map_err(|error| match error {
            RouteError::Unmapped(reason) => (reason, Verdict::TopicInvalid),
            RouteError::TopicCap(reason) => (reason, Verdict::QuotaExceeded),
        })?;
    record.topic = topic;
    record.key = key.map(Into::into);
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
        let (ack, _) = AckHandle::channel();
        let (record, verdict) = to_record(
            &config,
            &device,
            publish("devices/pump-3/vitals"),
            Some(ack),
        );
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
        let (record, verdict) = to_record(
            &config,
            &device,
            publish("devices/pump-3/alarms"),
            Some(ack),
        );
        assert_eq!(verdict, Verdict::TopicInvalid);
        assert!(record.rejected.is_some());
        assert!(record.ack.is_some());
        for topic in ["devices/+/vitals", "devices/#", "", "devices/a\0/vitals"] {
            let (ack, _) = AckHandle::channel();
            let (record, verdict) = to_record(&config, &device, publish(topic), Some(ack));
            assert_eq!(verdict, Verdict::TopicInvalid, "{topic:?}");
            assert!(record.rejected.is_some());
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
        let mut bad = publish("devices/pump-3/vitals");
        bad.payload = "{\"hr\":".into();
        let (record, verdict) = to_record(&config, &device, bad, None);
        assert_eq!(verdict, Verdict::PayloadInvalid);
        let reason = record.rejected.expect("rejected").to_string();
        assert!(reason.contains("payload.format"), "{reason}");
        assert!(
            !reason.contains("hr"),
            "the payload is not quoted: {reason}"
        );
        let (record, verdict) = to_record(&config, &device, publish("devices/pump-3/vitals"), None);
        assert_eq!(verdict, Verdict::Stored);
        assert!(record.rejected.is_none());
    }
}
