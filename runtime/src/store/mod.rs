//! Config, offset and status stores, each a compacted Kafka topic in Kafka Connect's formats.

mod config;
mod log;
mod offset;
mod status;

use rdkafka::error::KafkaError;
use thiserror::Error;

pub use config::{ConfigChange, ConfigSnapshot, ConfigStore, ConnectorEntry, TargetState};
pub use log::KafkaLog;
pub use offset::OffsetStore;
pub use status::{ConnectorState, StatusStore, TaskStatus};

use crate::kafka::KafkaSetupError;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("Kafka error on {topic}: {source}")]
    Kafka {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error(transparent)]
    Setup(#[from] KafkaSetupError),
    #[error("timed out on {topic} while {what}")]
    Timeout { topic: String, what: String },
    #[error("{0}")]
    Internal(String),
}

impl StoreError {
    pub fn kafka(topic: &str, source: KafkaError) -> Self {
        Self::Kafka {
            topic: topic.to_string(),
            source: crate::kafka::secret_hidden(source),
        }
    }
}
