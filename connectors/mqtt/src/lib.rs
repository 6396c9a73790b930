//! MQTT.
//!
//! - [`MqttBrokerSourceConnector`]: subscribes to an existing broker (Mosquitto, EMQX, HiveMQ)
//!   with a persistent session and manual acknowledgements: each PUBLISH becomes a record, and
//!   its PUBACK is sent only once the engine reports the record durable in Kafka.
//!
//! The listener source (devices connect to medconnect) and the sink are not built yet.

pub mod config;
pub mod mapping;
mod source;

pub use source::{
    HEADER_CLIENT_ID, HEADER_DUP, HEADER_QOS, HEADER_RETAIN, HEADER_TOPIC,
    MqttBrokerSourceConnector, MqttBrokerSourceTask, acknowledges,
};
