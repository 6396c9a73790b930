//! Is the Kafka cluster the worker started against still there, with its internal topics?
//!
//! A broker that comes back without its data (an embedded broker restarted, a cluster rebuilt
//! behind the same address) leaves a worker whose stores describe topics that no longer
//! exist: every read and write fails, forever. Recreating the topics would silently forget
//! every connector, offset and status, so the worker does not try: it reports the loss (log,
//! `/health`, [`super::Worker::failed`]) and the `medconnect` binary exits non-zero for a
//! supervisor to restart it against whatever the cluster now holds. A cluster that cannot be
//! reached is an outage, not a loss: clients retry, nothing is reported.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::kafka::{KafkaSettings, KafkaSetupError};

/// How often the cluster is looked at. A loss is reported after two looks agree, so a broker
/// that answers metadata before it loaded its topics is not taken for an empty one.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(3);

/// What one look at the cluster found.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub cluster_id: Option<String>,
    /// The internal topics the cluster does not know.
    pub missing_topics: Vec<String>,
}

/// Asks the cluster for its id and for `topics`, waiting at most `timeout` for each answer.
pub async fn look(
    kafka: &KafkaSettings,
    topics: &[String],
    timeout: Duration,
) -> Result<ClusterView, KafkaSetupError> {
    let consumer = Arc::new(client(kafka)?);
    look_with(consumer, kafka.bootstrap_servers(), topics, timeout).await
}

fn client(kafka: &KafkaSettings) -> Result<BaseConsumer, KafkaSetupError> {
    kafka
        .consumer_config(None, &Default::default())
        .create()
        .map_err(|e| KafkaSetupError::client("consumer", e))
}

async fn look_with(
    consumer: Arc<BaseConsumer>,
    servers: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<ClusterView, KafkaSetupError> {
    let unreachable = |reason: String| KafkaSetupError::Unreachable {
        servers: servers.to_string(),
        reason,
    };
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        // Each topic on its own: listing every topic of a large cluster every few seconds
        // would cost it more. An answer proves a broker is there.
        let mut missing_topics = Vec::new();
        for topic in topics {
            let metadata = consumer
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| format!("no metadata within {timeout:?}: {e}"))?;
            let known = metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && !(t.error().is_some() && t.partitions().is_empty()));
            if !known {
                missing_topics.push(topic);
            }
        }
        let cluster_id = consumer.client().fetch_cluster_id(timeout);
        Ok(ClusterView {
            cluster_id,
            missing_topics,
        })
    })
    .await
    .map_err(|e| unreachable(e.to_string()))?
    .map_err(unreachable)
}

/// Looks at the cluster every [`CHECK_INTERVAL`] until `shutdown`; on a loss, sends the reason
/// to `failure` and stops looking.
pub async fn watch(
    kafka: KafkaSettings,
    topics: Vec<String>,
    started_with: Option<String>,
    failure: watch::Sender<Option<String>>,
    shutdown: CancellationToken,
) {
    let consumer = match client(&kafka) {
        Ok(consumer) => Arc::new(consumer),
        Err(error) => {
            tracing::warn!(%error, "cannot watch the Kafka cluster");
            return;
        }
    };
    let mut suspicion: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
        let looked = look_with(
            consumer.clone(),
            kafka.bootstrap_servers(),
            &topics,
            Duration::from_secs(10),
        );
        // An unreachable cluster holds a look for its timeouts: never a shutdown.
        let looked = tokio::select! {
            looked = looked => looked,
            _ = shutdown.cancelled() => return,
        };
        let view = match looked {
            Ok(view) => view,
            Err(error) => {
                tracing::debug!(%error, "cannot look at the Kafka cluster");
                suspicion = None;
                continue;
            }
        };
        let loss = lost(&view, started_with.as_deref());
        match (loss, suspicion.take()) {
            (Some(reason), Some(_)) => {
                tracing::error!(
                    servers = kafka.bootstrap_servers(),
                    reason = %reason,
                    "the Kafka cluster lost this worker's state; the worker cannot continue"
                );
                failure.send_replace(Some(reason));
                return;
            }
            (loss, _) => suspicion = loss,
        }
    }
}

/// Why `view` means the state the worker started with is gone, if it does.
fn lost(view: &ClusterView, started_with: Option<&str>) -> Option<String> {
    if let (Some(before), Some(now)) = (started_with, view.cluster_id.as_deref())
        && before != now
    {
        return Some(format!(
            "the Kafka cluster id changed from {before} to {now}: this is another cluster"
        ));
    }
    if !view.missing_topics.is_empty() {
        return Some(format!(
            "internal topics {} are gone (a broker restarted without its data?)",
            view.missing_topics.join(", ")
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(cluster_id: Option<&str>, missing: &[&str]) -> ClusterView {
        ClusterView {
            cluster_id: cluster_id.map(str::to_string),
            missing_topics: missing.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn a_loss_is_another_cluster_id_or_a_missing_internal_topic() {
        assert!(lost(&view(Some("a"), &[]), Some("a")).is_none());
        assert!(lost(&view(None, &[]), Some("a")).is_none());
        let changed = lost(&view(Some("b"), &[]), Some("a")).unwrap();
        assert!(changed.contains("from a to b"), "{changed}");
        let missing = lost(&view(Some("a"), &["configs"]), Some("a")).unwrap();
        assert!(missing.contains("configs"), "{missing}");
    }
}
