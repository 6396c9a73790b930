//! The herder: turns the config topic into running tasks.
//!
//! REST operations write to the config topic (through the store, which reads its own writes)
//! and then reconcile: every connector's committed task configs and target state are compared
//! with the tasks running here, which are started, paused, resumed or stopped to match. The
//! same reconcile runs when another process changes the config topic, so nothing here assumes
//! a single worker; which worker runs which task is decided by the [`Assignment`].
//!
//! One job per module: `reads` answers questions, `commands` changes the config topic,
//! `task_generation` asks a connector for its task configs, `offsets` reads and alters source
//! and sink offsets, `reconcile` matches the running tasks to the config topic, and
//! `task_start` builds and starts one task's runner.

mod assignment;
mod commands;
mod offsets;
mod reads;
mod reconcile;
mod task_generation;
mod task_start;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::join_all;
use medconnect_api::Props;
use medconnect_api::limits::ByteBudget;
use medconnect_api::relay::Peers;
use thiserror::Error;
use tokio::sync::Mutex;

pub use assignment::{Assignment, EveryTaskHere};
pub use offsets::OffsetChanges;
pub use reads::{ConnectorInfo, ConnectorStatus, Validation};

use super::connector_config as cc;
use super::plugins::{ConnectorPlugin, Plugins};
use crate::kafka::{KafkaSettings, Producer, ProducerPool};
use crate::metrics::Metrics;
use crate::store::{ConfigStore, ConnectorEntry, OffsetStore, StatusStore, StoreError};
use crate::task::{RunnerSettings, Stopping, TaskHandle};

#[derive(Debug, Error)]
pub enum HerderError {
    #[error("Connector {0} not found")]
    NotFound(String),
    #[error("Connector {0} already exists")]
    AlreadyExists(String),
    #[error("Task {1} not found for connector {0}")]
    TaskNotFound(String, u32),
    #[error("{0}")]
    BadRequest(String),
    /// Connect's wording: the count, then one line per invalid setting.
    #[error("Connector configuration is invalid and contains the following {} error(s):\n{}", .0.len(), .0.iter().map(|(f, r)| format!("{f}: {r}")).collect::<Vec<_>>().join("\n"))]
    InvalidConfig(Vec<(String, String)>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

type Result<T> = std::result::Result<T, HerderError>;

pub struct HerderParts {
    pub worker_id: String,
    pub plugins: Plugins,
    pub configs: Arc<ConfigStore>,
    pub offsets: Arc<OffsetStore>,
    pub statuses: Arc<StatusStore>,
    pub kafka: KafkaSettings,
    pub runner: RunnerSettings,
    pub metrics: Metrics,
    /// Which of the connectors' tasks run on this worker.
    pub assignment: Arc<dyn Assignment>,
    /// The other workers of the cluster, for sink tasks' contexts.
    pub peers: Arc<dyn Peers>,
}

pub struct Herder {
    worker_id: String,
    plugins: Plugins,
    configs: Arc<ConfigStore>,
    offsets: Arc<OffsetStore>,
    statuses: Arc<StatusStore>,
    kafka: KafkaSettings,
    runner: RunnerSettings,
    metrics: Metrics,
    assignment: Arc<dyn Assignment>,
    /// Shared by dead-letter writes of every task.
    dlq_producer: Producer,
    /// Source tasks' producers, shared among tasks with the same client settings.
    producers: ProducerPool,
    /// Bytes remote senders may make the worker hold, shared by every listener source.
    listener_budget: Arc<ByteBudget>,
    /// The other workers of the cluster, for sink tasks' contexts.
    peers: Arc<dyn Peers>,
    tasks: Mutex<BTreeMap<(String, u32), TaskHandle>>,
    /// Runs being stopped, by task: a task's next run starts only once its last one is over.
    stopping: std::sync::Mutex<BTreeMap<(String, u32), Stopping>>,
    /// The last run number given to each task (see `next_run`).
    runs: std::sync::Mutex<BTreeMap<(String, u32), u64>>,
    /// Serialises writes and reconciles, so a REST call sees the result of the ones before it.
    /// Never held while a task stops: a stuck task must not freeze every other call.
    operations: Mutex<()>,
}

impl Herder {
    pub fn new(parts: HerderParts) -> Result<Self> {
        let dlq_producer = parts
            .kafka
            .producer(&Default::default())
            .map_err(|e| HerderError::Internal(e.to_string()))?;
        let listener_budget = ByteBudget::new(parts.runner.listener_budget_bytes);
        parts.metrics.watch_listener_budget(listener_budget.clone());
        Ok(Self {
            worker_id: parts.worker_id,
            plugins: parts.plugins,
            configs: parts.configs,
            offsets: parts.offsets,
            statuses: parts.statuses,
            kafka: parts.kafka,
            runner: parts.runner,
            metrics: parts.metrics,
            assignment: parts.assignment,
            dlq_producer,
            producers: ProducerPool::default(),
            listener_budget,
            peers: parts.peers,
            tasks: Mutex::new(BTreeMap::new()),
            stopping: Default::default(),
            runs: Default::default(),
            operations: Mutex::new(()),
        })
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    pub fn plugins(&self) -> &Plugins {
        &self.plugins
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn entry(&self, name: &str) -> Result<ConnectorEntry> {
        self.configs
            .connector(name)
            .ok_or_else(|| HerderError::NotFound(name.to_string()))
    }

    /// The plugin a config's `connector.class` names.
    fn plugin_for(&self, config: &Props) -> Result<ConnectorPlugin> {
        self.plugin_named(config.get(cc::CLASS).map_or("", String::as_str))
    }

    fn plugin_named(&self, class: &str) -> Result<ConnectorPlugin> {
        self.plugins.find(class).ok_or_else(|| {
            HerderError::BadRequest(format!(
                "Failed to find any class that implements Connector and which name matches {class}"
            ))
        })
    }
}

/// Waits for runs an operation stopped, once it released the operations lock: a stuck task
/// holds up the call that stopped it (bounded by the shutdown timeout), never the others.
async fn settle(stops: Vec<Stopping>) {
    join_all(stops).await;
}
