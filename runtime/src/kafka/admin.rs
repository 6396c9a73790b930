//! Creates topics that are missing: the internal topics (compacted) and connector topics.

use std::sync::Arc;
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
    /// `retention.ms` of a topic that is not compacted (None: the broker's default).
    pub retention_ms: Option<i64>,
}

impl TopicSpec {
    pub fn compacted(name: &str, partitions: i32, replication_factor: i32) -> Self {
        Self {
            name: name.to_string(),
            partitions,
            replication_factor,
            compacted: true,
            retention_ms: None,
        }
    }

    pub fn regular(name: &str, partitions: i32, replication_factor: i32) -> Self {
        Self {
            compacted: false,
            ..Self::compacted(name, partitions, replication_factor)
        }
    }

    /// An append-only topic (cleanup.policy=delete) keeping records `retention_ms` (-1:
    /// forever).
    pub fn retained(
        name: &str,
        partitions: i32,
        replication_factor: i32,
        retention_ms: i64,
    ) -> Self {
        Self {
            retention_ms: Some(retention_ms),
            ..Self::regular(name, partitions, replication_factor)
        }
    }
}

/// The topics the cluster does not list. Asking first spares a CreateTopics where every topic
/// exists: a cluster whose ACLs deny this worker CreateTopics, or a broker without the API
/// (librdkafka's mock cluster), works with topics created beforehand. Every topic is listed
/// (no topic named), since a metadata request naming a missing topic may create it with the
/// broker's defaults: the config topic would then be neither compacted nor of one partition.
/// If the listing fails, every topic is taken as missing and CreateTopics decides.
async fn missing_topics<'a>(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topics: &'a [TopicSpec],
) -> Vec<&'a TopicSpec> {
    let admin = admin.clone();
    let listed = tokio::task::spawn_blocking(move || {
        admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|metadata| {
                metadata
                    .topics()
                    .iter()
                    .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                    .map(|t| t.name().to_string())
                    .collect::<std::collections::BTreeSet<_>>()
            })
    })
    .await;
    match listed {
        Ok(Ok(listed)) => topics
            .iter()
            .filter(|t| !listed.contains(&t.name))
            .collect(),
        _ => topics.iter().collect(),
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
    let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(
        settings
            .admin_config()
            .create()
            .map_err(|e| KafkaSetupError::client("admin client", e))?,
    );
    let missing = missing_topics(&admin, topics).await;
    if missing.is_empty() {
        return Ok(());
    }
    // NewTopic borrows its settings' text.
    let retention: Vec<Option<String>> = missing
        .iter()
        .map(|spec| spec.retention_ms.map(|ms| ms.to_string()))
        .collect();
    let new_topics: Vec<NewTopic<'_>> = missing
        .into_iter()
        .zip(&retention)
        .map(|(spec, retention)| {
            let topic = NewTopic::new(
                &spec.name,
                spec.partitions,
                TopicReplication::Fixed(spec.replication_factor),
            );
            match retention {
                _ if spec.compacted => topic.set("cleanup.policy", "compact"),
                Some(retention) => topic
                    .set("cleanup.policy", "delete")
                    .set("retention.ms", retention),
                None => topic,
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
