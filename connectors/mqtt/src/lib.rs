//! MQTT.
//!
//! - [`MqttBrokerSourceConnector`]: subscribes to an existing broker (Mosquitto, EMQX, HiveMQ)
//!   with a persistent session and manual acknowledgements: each PUBLISH becomes a record, and
//!   its PUBACK is sent only once the engine reports the record durable in Kafka.
//!
//! - [`MqttSinkConnector`]: publishes each record to a topic built from its key, headers and
//!   Kafka topic — to a broker (offsets committed only after its PUBACK, or PUBCOMP at QoS 2)
//!   or to the devices connected to a listener source, on any worker of the cluster, that
//!   subscribed to it (committed only after each device's PUBACK).
//!
//! - [`MqttListenerSourceConnector`]: devices connect to medconnect (MQTT 3.1.1 and 5) and get
//!   their PUBACK / PUBREC only once the record is durable in Kafka.

pub mod config;
pub mod listener;
pub mod mapping;
mod relay;
mod sink;
pub mod sink_topic;
mod source;

pub use listener::{MqttListenerSourceConnector, MqttListenerSourceTask};
pub use sink::{MqttSinkConnector, MqttSinkTask};

pub use source::{
    HEADER_CLIENT_ID, HEADER_DUP, HEADER_QOS, HEADER_RETAIN, HEADER_TOPIC,
    MqttBrokerSourceConnector, MqttBrokerSourceTask, acknowledges,
};
