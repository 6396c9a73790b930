//! The worker: internal topics, stores, herder and REST API in one process.

pub mod config;
pub mod connector_config;
pub mod herder;
pub mod plugins;
pub mod secrets;
pub mod sink_offsets;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::WorkerConfig;
pub use herder::{Herder, HerderError};
pub use plugins::Plugins;

use crate::kafka::{KafkaSetupError, TopicSpec, ensure_topics};
use crate::metrics::Metrics;
use crate::rest::{self, RestState};
use crate::store::{ConfigStore, OffsetStore, StatusStore, StoreError};

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Herder(#[from] HerderError),
}

/// A running worker. Dropping it without `shutdown` abandons its tasks.
pub struct Worker {
    herder: Arc<Herder>,
    rest_addr: SocketAddr,
    shutdown: CancellationToken,
    background: Vec<JoinHandle<()>>,
}

impl Worker {
    /// Starts a worker: creates missing internal topics, reads them, starts the connectors
    /// they hold and serves the REST API.
    pub async fn start(config: WorkerConfig, plugins: Plugins) -> Result<Self, WorkerError> {
        let kafka = config.kafka_settings();
        let topics = &config.internal_topics;
        ensure_topics(
            &kafka,
            &[
                TopicSpec::compacted(&topics.config, 1, topics.replication_factor),
                TopicSpec::compacted(
                    &topics.offsets,
                    topics.offsets_partitions,
                    topics.replication_factor,
                ),
                TopicSpec::compacted(
                    &topics.status,
                    topics.status_partitions,
                    topics.replication_factor,
                ),
            ],
        )
        .await?;
        let (configs, offsets, statuses) = tokio::try_join!(
            ConfigStore::open(&kafka, &topics.config),
            OffsetStore::open(&kafka, &topics.offsets),
            StatusStore::open(&kafka, &topics.status),
        )?;
        let listener = TcpListener::bind(config.rest.listen)
            .await
            .map_err(|source| WorkerError::Listen {
                addr: config.rest.listen,
                source,
            })?;
        let rest_addr = listener
            .local_addr()
            .map_err(|source| WorkerError::Listen {
                addr: config.rest.listen,
                source,
            })?;
        let worker_id = config
            .worker_id
            .clone()
            .unwrap_or_else(|| rest_addr.to_string());
        let configs = Arc::new(configs);
        let metrics = Metrics::default();
        let herder = Arc::new(Herder::new(herder::HerderParts {
            worker_id,
            plugins,
            configs: configs.clone(),
            offsets: Arc::new(offsets),
            statuses: Arc::new(statuses),
            kafka: kafka.clone(),
            runner: config.runner_settings(),
            metrics,
        })?);
        let shutdown = CancellationToken::new();
        let cluster_id = cluster_id(&kafka).await;
        let rest = tokio::spawn(rest::serve(
            listener,
            RestState {
                herder: herder.clone(),
                kafka_cluster_id: cluster_id,
            },
            shutdown.clone(),
        ));
        herder.reconcile().await;
        let watcher = tokio::spawn(follow_config_topic(
            herder.clone(),
            configs,
            shutdown.clone(),
        ));
        tracing::info!(rest = %rest_addr, worker = herder.worker_id(), "worker started");
        Ok(Self {
            herder,
            rest_addr,
            shutdown,
            background: vec![rest, watcher],
        })
    }

    pub fn rest_addr(&self) -> SocketAddr {
        self.rest_addr
    }

    pub fn herder(&self) -> &Arc<Herder> {
        &self.herder
    }

    /// Stops serving, then stops every task after it delivered and committed what it holds.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for handle in self.background {
            let _ = handle.await;
        }
        self.herder.shutdown().await;
        tracing::info!("worker stopped");
    }
}

/// Reconciles whenever the config topic changes, including changes made by other processes.
async fn follow_config_topic(
    herder: Arc<Herder>,
    configs: Arc<ConfigStore>,
    shutdown: CancellationToken,
) {
    let mut changes = configs.changes();
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                // Let a burst of records (task configs + commit) arrive before acting on them.
                tokio::time::sleep(Duration::from_millis(50)).await;
                changes.borrow_and_update();
                herder.reconcile().await;
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn cluster_id(kafka: &crate::kafka::KafkaSettings) -> Option<String> {
    let config = kafka.consumer_config(None, &Default::default());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().ok()?;
        consumer.client().fetch_cluster_id(Duration::from_secs(5))
    })
    .await
    .ok()
    .flatten()
}
