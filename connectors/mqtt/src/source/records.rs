//! One MQTT PUBLISH as one record: the payload as is, the key and topic from the mapping, and
//! headers saying where it came from. Payloads are never logged.

use medconnect_api::{AckHandle, ConnectError, Record, SourceRecord, content_type};
use rumqttc::{Publish, QoS};

use crate::config::SourceConfig;

pub const HEADER_TOPIC: &str = "mqtt.topic";
pub const HEADER_QOS: &str = "mqtt.qos";
/// The client id medconnect subscribed with (MQTT 3.1.1 does not carry the publisher's).
pub const HEADER_CLIENT_ID: &str = "mqtt.client.id";
/// Present ("true") on a message the broker marked as retained.
pub const HEADER_RETAIN: &str = "mqtt.retain";
/// Present ("true") on a message the broker sent again (DUP): possibly a duplicate.
pub const HEADER_DUP: &str = "mqtt.dup";

/// Where records that match no mapping are put for the dead-letter topic (the engine sends a
/// rejected record there, never to this topic).
const UNMAPPED_TOPIC: &str = "mqtt.unmapped";

fn qos_number(qos: QoS) -> &'static str {
    match qos {
        QoS::AtMostOnce => "0",
        QoS::AtLeastOnce => "1",
        QoS::ExactlyOnce => "2",
    }
}

/// The record for `publish`, rejected (for the dead-letter topic) when its MQTT topic fits no
/// mapping.
pub fn to_record(config: &SourceConfig, publish: &Publish, ack: AckHandle) -> SourceRecord {
    let mut record = Record::new(UNMAPPED_TOPIC).with_value(publish.payload.clone());
    record.headers.add(HEADER_TOPIC, publish.topic.clone());
    record.headers.add(HEADER_QOS, qos_number(publish.qos));
    record
        .headers
        .add(HEADER_CLIENT_ID, config.client_id.clone());
    if publish.retain {
        record.headers.add(HEADER_RETAIN, "true");
    }
    if publish.dup {
        record.headers.add(HEADER_DUP, "true");
    }
    record
        .headers
        .add(content_type::HEADER, config.content_type.clone());

    match config.mapping.route(&publish.topic) {
        Ok((topic, key)) => {
            record.topic = topic;
            record.key = key.map(Into::into);
        }
        Err(reason) => {
            return SourceRecord::rejected(
                record,
                ConnectError::data(reason.to_string()),
                Some(ack),
            );
        }
    }
    SourceRecord::acknowledged(record, ack)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CLIENT_ID, KAFKA_KEY, KAFKA_TOPIC, TOPIC_PATTERN, TOPICS};
    use medconnect_api::props_from;

    fn config(pattern: &str) -> SourceConfig {
        SourceConfig::parse(&props_from(&[
            (CLIENT_ID, "bridge"),
            (TOPICS, "devices/#"),
            (TOPIC_PATTERN, pattern),
            (KAFKA_TOPIC, "device.vitals"),
            (KAFKA_KEY, "${device}"),
        ]))
        .unwrap()
    }

    #[test]
    fn maps_topic_key_and_headers() {
        let publish = Publish::new(
            "devices/pump-3/vitals",
            QoS::AtLeastOnce,
            b"{\"hr\":72}".to_vec(),
        );
        let (ack, _) = AckHandle::channel();
        let record = to_record(&config("devices/+device/vitals"), &publish, ack);
        assert!(record.rejected.is_none());
        assert_eq!(record.record.topic, "device.vitals");
        assert_eq!(record.record.key.as_deref(), Some(&b"pump-3"[..]));
        assert_eq!(
            record.record.headers.last_str(HEADER_TOPIC),
            Some("devices/pump-3/vitals")
        );
        assert_eq!(record.record.headers.last_str(HEADER_QOS), Some("1"));
        assert_eq!(
            record.record.headers.last_str(HEADER_CLIENT_ID),
            Some("bridge")
        );
        assert!(record.ack.is_some());
    }

    #[test]
    fn a_topic_outside_the_pattern_is_rejected_not_dropped() {
        let publish = Publish::new("devices/pump-3/alarms", QoS::AtLeastOnce, b"x".to_vec());
        let (ack, _) = AckHandle::channel();
        let record = to_record(&config("devices/+device/vitals"), &publish, ack);
        assert!(record.rejected.is_some());
        assert!(record.ack.is_some());
    }
}
