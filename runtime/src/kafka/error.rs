use rdkafka::error::KafkaError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum KafkaSetupError {
    #[error("cannot create Kafka {client}: {source}")]
    Client {
        client: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("cannot create topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("Kafka at {servers} did not answer: {reason}")]
    Unreachable { servers: String, reason: String },
}

impl KafkaSetupError {
    pub fn client(client: &'static str, source: KafkaError) -> Self {
        Self::Client { client, source }
    }
}
