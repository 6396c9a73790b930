//! Creates topics that are missing: the internal topics (compacted) and connector topics.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use super::{KafkaSettings, KafkaSetupError};

#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub compacted: bool,
}

impl TopicSpec {
    pub fn compacted(name: &str, partitions: i32, replication_factor: i32) -> Self {
        Self {
            name: name.to_string(),
            partitions,
            replication_factor,
            compacted: true,
        }
    }

    pub fn regular(name: &str, partitions: i32, replication_factor: i32) -> Self {
        Self {
            compacted: false,
            ..Self::compacted(name, partitions, replication_factor)
        }
    }
}

/// Creates each topic unless it exists already.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    topics: &[TopicSpec],
) -> Result<(), KafkaSetupError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = settings
        .admin_config()
        .create()
        .map_err(|e| KafkaSetupError::client("admin client", e))?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|spec| {
            let topic = NewTopic::new(
                &spec.name,
                spec.partitions,
                TopicReplication::Fixed(spec.replication_factor),
            );
            if spec.compacted {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new_topics.iter(), &options)
        .await
        .map_err(|e| KafkaSetupError::Unreachable {
            servers: settings.bootstrap_servers().to_string(),
            reason: e.to_string(),
        })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaSetupError::CreateTopic {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(())
}
