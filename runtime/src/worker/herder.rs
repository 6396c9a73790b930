//! The herder: turns the config topic into running tasks.
//!
//! REST operations write to the config topic (through the store, which reads its own writes)
//! and then reconcile: every connector's committed task configs and target state are compared
//! with the tasks running here, which are started, paused, resumed or stopped to match. The
//! same reconcile runs when another process changes the config topic, so nothing here assumes
//! a single worker; which worker runs which task is decided by `assignment`.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::{BoxFuture, join_all};
use medconnect_api::{
    ConfigValue, ConnectError, ConnectorContext, ConnectorKind, Props, SourceTaskContext,
};
use rdkafka::producer::FutureProducer;
use serde_json::{Map, Value};
use thiserror::Error;
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use super::connector_config::{self as cc, restore_hidden};
use super::plugins::{ConnectorPlugin, Plugins};
use super::{secrets, sink_offsets};
use crate::kafka::{KafkaSettings, TopicSpec, ensure_topics, overrides_with_prefix};
use crate::metrics::{Metrics, TaskMetrics};
use crate::store::{
    ConfigStore, ConnectorEntry, ConnectorState, OffsetStore, StatusStore, StoreError, TargetState,
    TaskStatus,
};
use crate::task::errors::{ErrorPolicy, ErrorReporter};
use crate::task::sink::Subscription;
use crate::task::{
    AfterStop, RunId, RunState, RunnerSettings, SinkRunner, SinkTaskSpec, SourceRunner,
    SourceTaskSpec, StatusReporter, Stopping, TaskHandle, supervise,
};
use crate::transform::TransformChain;

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

/// Offsets to set (`Some`) or delete (`None`), by partition, as `PATCH .../offsets` gives them.
pub type OffsetChanges = Vec<(Map<String, Value>, Option<Map<String, Value>>)>;

/// A connector as the REST API shows it.
#[derive(Debug, Clone)]
pub struct ConnectorInfo {
    pub name: String,
    pub config: Props,
    pub tasks: Vec<u32>,
    pub kind: ConnectorKind,
}

#[derive(Debug, Clone)]
pub struct ConnectorStatus {
    pub name: String,
    pub connector: TaskStatus,
    pub tasks: Vec<(u32, TaskStatus)>,
    pub kind: ConnectorKind,
}

/// The result of validating a connector config.
#[derive(Debug, Clone)]
pub struct Validation {
    pub class: String,
    pub groups: Vec<String>,
    pub definitions: Vec<Value>,
    pub values: Vec<ConfigValue>,
}

impl Validation {
    pub fn error_count(&self) -> usize {
        self.values.iter().map(|v| v.errors.len()).sum()
    }
}

pub struct HerderParts {
    pub worker_id: String,
    pub plugins: Plugins,
    pub configs: Arc<ConfigStore>,
    pub offsets: Arc<OffsetStore>,
    pub statuses: Arc<StatusStore>,
    pub kafka: KafkaSettings,
    pub runner: RunnerSettings,
    pub metrics: Metrics,
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
    /// Shared by dead-letter writes of every task.
    dlq_producer: FutureProducer,
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
        Ok(Self {
            worker_id: parts.worker_id,
            plugins: parts.plugins,
            configs: parts.configs,
            offsets: parts.offsets,
            statuses: parts.statuses,
            kafka: parts.kafka,
            runner: parts.runner,
            metrics: parts.metrics,
            dlq_producer,
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

    // ---- reads -------------------------------------------------------------------------

    pub fn connector_names(&self) -> Vec<String> {
        self.configs.snapshot().connectors.into_keys().collect()
    }

    fn entry(&self, name: &str) -> Result<ConnectorEntry> {
        self.configs
            .connector(name)
            .ok_or_else(|| HerderError::NotFound(name.to_string()))
    }

    fn plugin_for(&self, config: &Props) -> Result<ConnectorPlugin> {
        let class = config.get(cc::CLASS).map_or("", String::as_str);
        self.plugins.find(class).ok_or_else(|| {
            HerderError::BadRequest(format!(
                "Failed to find any class that implements Connector and which name matches {class}"
            ))
        })
    }

    pub fn info(&self, name: &str) -> Result<ConnectorInfo> {
        let entry = self.entry(name)?;
        let plugin = self.plugin_for(&entry.config)?;
        Ok(ConnectorInfo {
            name: name.to_string(),
            config: cc::redact(&cc::full_def(&plugin), &entry.config),
            tasks: (0..entry.tasks.len() as u32).collect(),
            kind: plugin.kind(),
        })
    }

    pub fn config(&self, name: &str) -> Result<Props> {
        Ok(self.info(name)?.config)
    }

    pub fn task_configs(&self, name: &str) -> Result<Vec<(u32, Props)>> {
        let entry = self.entry(name)?;
        let def = cc::full_def(&self.plugin_for(&entry.config)?);
        Ok(entry
            .tasks
            .iter()
            .enumerate()
            .map(|(id, config)| (id as u32, cc::redact(&def, config)))
            .collect())
    }

    pub fn status(&self, name: &str) -> Result<ConnectorStatus> {
        let entry = self.entry(name)?;
        let kind = self.plugin_for(&entry.config)?.kind();
        let connector = self
            .statuses
            .connector(name)
            .unwrap_or_else(|| self.unassigned());
        let tasks = self
            .statuses
            .tasks(name)
            .into_iter()
            .filter(|(id, _)| (*id as usize) < entry.tasks.len())
            .collect();
        Ok(ConnectorStatus {
            name: name.to_string(),
            connector,
            tasks,
            kind,
        })
    }

    pub fn task_status(&self, name: &str, task: u32) -> Result<TaskStatus> {
        let entry = self.entry(name)?;
        if task as usize >= entry.tasks.len() {
            return Err(HerderError::TaskNotFound(name.to_string(), task));
        }
        Ok(self
            .statuses
            .task(name, task)
            .unwrap_or_else(|| self.unassigned()))
    }

    fn unassigned(&self) -> TaskStatus {
        TaskStatus {
            state: ConnectorState::Unassigned,
            trace: None,
            worker_id: self.worker_id.clone(),
            generation: 0,
            run: 0,
        }
    }

    pub fn topics(&self, name: &str) -> Result<Vec<String>> {
        self.entry(name)?;
        Ok(self.statuses.topics(name))
    }

    pub async fn reset_topics(&self, name: &str) -> Result<()> {
        self.entry(name)?;
        let topics = self.statuses.topics(name);
        Ok(self.statuses.reset_topics(name, &topics).await?)
    }

    pub fn validate(&self, class: &str, config: &Props) -> Result<Validation> {
        let plugin = self.plugins.find(class).ok_or_else(|| {
            HerderError::BadRequest(format!(
                "Failed to find any class that implements Connector and which name matches {class}"
            ))
        })?;
        let mut with_class = config.clone();
        with_class
            .entry(cc::CLASS.to_string())
            .or_insert_with(|| class.to_string());
        let def = cc::full_def(&plugin);
        Ok(Validation {
            class: plugin.connector().class().to_string(),
            groups: def.groups(),
            definitions: def
                .keys()
                .iter()
                .enumerate()
                .map(|(i, k)| k.definition_json(i))
                .collect(),
            values: cc::validate(&plugin, &with_class, self.runner.tasks_max_limit),
        })
    }

    // ---- writes ------------------------------------------------------------------------

    /// Sets `name` in the config, refusing a different one already there.
    fn named(name: &str, mut config: Props) -> Result<Props> {
        if let Some(given) = config.get(cc::NAME).filter(|n| *n != name) {
            return Err(HerderError::BadRequest(format!(
                "Connector name configuration ({given}) doesn't match connector name in the URL ({name})"
            )));
        }
        config.insert(cc::NAME.into(), name.to_string());
        Ok(config)
    }

    fn check(&self, name: &str, config: &Props) -> Result<ConnectorPlugin> {
        if name.trim().is_empty() || name.contains('/') {
            return Err(HerderError::BadRequest(
                "Connector name must not be empty or contain '/'".into(),
            ));
        }
        if !config.contains_key(cc::CLASS) {
            return Err(HerderError::InvalidConfig(vec![(
                cc::CLASS.into(),
                "Missing required configuration \"connector.class\" which has no default value."
                    .into(),
            )]));
        }
        let plugin = self.plugin_for(config)?;
        let errors: Vec<(String, String)> =
            cc::validate(&plugin, config, self.runner.tasks_max_limit)
                .into_iter()
                .flat_map(|v| v.errors.into_iter().map(move |e| (v.name.clone(), e)))
                .collect();
        if errors.is_empty() {
            Ok(plugin)
        } else {
            Err(HerderError::InvalidConfig(errors))
        }
    }

    pub async fn create(
        &self,
        name: &str,
        config: Props,
        initial: Option<TargetState>,
    ) -> Result<ConnectorInfo> {
        let guard = self.operations.lock().await;
        if self.configs.connector(name).is_some() {
            return Err(HerderError::AlreadyExists(name.to_string()));
        }
        let config = Self::named(name, config)?;
        self.check(name, &config)?;
        self.write_new_config(name, &config, initial.unwrap_or_default())
            .await?;
        let stops = self.reconcile_locked().await;
        let info = self.info(name);
        drop(guard);
        settle(stops).await;
        info
    }

    /// `PUT /connectors/{name}/config`: creates or replaces; `true` when created.
    pub async fn put_config(&self, name: &str, config: Props) -> Result<(bool, ConnectorInfo)> {
        let guard = self.operations.lock().await;
        let mut config = Self::named(name, config)?;
        let existing = self.configs.connector(name);
        if let Some(existing) = &existing {
            let def = cc::full_def(&self.plugin_for(&config)?);
            restore_hidden(&def, &mut config, Some(&existing.config));
        }
        self.check(name, &config)?;
        let created = existing.is_none();
        match existing {
            None => {
                self.write_new_config(name, &config, TargetState::Started)
                    .await?
            }
            Some(existing) => {
                self.configs.put_connector(name, &config).await?;
                if existing.target_state != TargetState::Stopped {
                    self.generate_tasks(name, &config).await?;
                }
            }
        }
        let stops = self.reconcile_locked().await;
        let info = self.info(name);
        drop(guard);
        settle(stops).await;
        Ok((created, info?))
    }

    pub async fn patch_config(
        &self,
        name: &str,
        patch: BTreeMap<String, Option<String>>,
    ) -> Result<ConnectorInfo> {
        let guard = self.operations.lock().await;
        let existing = self.entry(name)?;
        let mut config = existing.config.clone();
        for (key, value) in patch {
            match value {
                Some(value) => config.insert(key, value),
                None => config.remove(&key),
            };
        }
        config.insert(cc::NAME.into(), name.to_string());
        let def = cc::full_def(&self.plugin_for(&config)?);
        restore_hidden(&def, &mut config, Some(&existing.config));
        self.check(name, &config)?;
        self.configs.put_connector(name, &config).await?;
        if existing.target_state != TargetState::Stopped {
            self.generate_tasks(name, &config).await?;
        }
        let stops = self.reconcile_locked().await;
        let info = self.info(name);
        drop(guard);
        settle(stops).await;
        info
    }

    async fn write_new_config(
        &self,
        name: &str,
        config: &Props,
        initial: TargetState,
    ) -> Result<()> {
        self.configs.put_target_state(name, initial).await?;
        self.configs.put_connector(name, config).await?;
        if initial != TargetState::Stopped {
            self.generate_tasks(name, config).await?;
        }
        Ok(())
    }

    /// Asks the connector for its task configs and commits them to the config topic.
    async fn generate_tasks(&self, name: &str, config: &Props) -> Result<()> {
        let plugin = self.plugin_for(config)?;
        // Bounded even for a config stored before the worker's limit existed.
        let max_tasks = cc::task_count(&plugin, config, self.runner.tasks_max_limit);
        // Task configs keep `${...}` references: they are resolved when each task starts.
        let context = ConnectorContext {
            connector_name: name.to_string(),
            config: config.clone(),
        };
        let resolved_context = ConnectorContext {
            config: secrets::resolve(config)
                .map_err(|e| HerderError::InvalidConfig(vec![cc::field_and_reason(e)]))?,
            ..context.clone()
        };
        match plugin
            .connector()
            .task_configs(&resolved_context, max_tasks)
        {
            Ok(resolved_tasks) => {
                // Store the unresolved values of settings the connector copied through.
                let tasks: Vec<Props> = resolved_tasks
                    .into_iter()
                    .map(|task| {
                        task.into_iter()
                            .map(|(k, v)| match context.config.get(&k) {
                                Some(original) if resolved_context.config.get(&k) == Some(&v) => {
                                    (k, original.clone())
                                }
                                _ => (k, v),
                            })
                            .collect()
                    })
                    .collect();
                self.configs.put_task_configs(name, &tasks).await?;
                Ok(())
            }
            Err(error) => {
                self.put_connector_status(name, ConnectorState::Failed, Some(error.to_string()))
                    .await;
                Err(HerderError::BadRequest(format!(
                    "Connector {name} could not generate task configs: {error}"
                )))
            }
        }
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        let guard = self.operations.lock().await;
        self.entry(name)?;
        self.configs.remove_connector(name).await?;
        // The stopped runs are closed: nothing they still do can outlive these tombstones.
        let stops = self.reconcile_locked().await;
        let removed = self.statuses.remove(name).await;
        drop(guard);
        settle(stops).await;
        Ok(removed?)
    }

    pub async fn set_target_state(&self, name: &str, state: TargetState) -> Result<()> {
        let guard = self.operations.lock().await;
        let entry = self.entry(name)?;
        if entry.target_state == TargetState::Stopped && state != TargetState::Stopped {
            // Stopped connectors have no task configs; make them anew.
            self.configs.put_target_state(name, state).await?;
            self.generate_tasks(name, &entry.config).await?;
        } else {
            self.configs.put_target_state(name, state).await?;
            if state == TargetState::Stopped {
                self.configs.put_task_configs(name, &[]).await?;
            }
        }
        let stops = self.reconcile_locked().await;
        drop(guard);
        settle(stops).await;
        Ok(())
    }

    /// `POST /connectors/{name}/restart`: restarts the connector and, with `include_tasks`,
    /// its tasks (only failed ones with `only_failed`). Returns the tasks restarted.
    pub async fn restart(
        &self,
        name: &str,
        include_tasks: bool,
        only_failed: bool,
    ) -> Result<Vec<u32>> {
        let guard = self.operations.lock().await;
        let entry = self.entry(name)?;
        let connector_failed = self
            .statuses
            .connector(name)
            .is_some_and(|s| s.state == ConnectorState::Failed);
        if !only_failed || connector_failed {
            self.put_connector_status(name, ConnectorState::Restarting, None)
                .await;
            if entry.target_state != TargetState::Stopped {
                self.generate_tasks(name, &entry.config).await?;
            }
        }
        let mut restarted = Vec::new();
        let mut stops = Vec::new();
        if include_tasks {
            for id in 0..entry.tasks.len() as u32 {
                let failed = self
                    .statuses
                    .task(name, id)
                    .is_some_and(|s| s.state == ConnectorState::Failed);
                if !only_failed || failed {
                    stops.extend(self.stop_task(name, id, AfterStop::Restarting).await);
                    restarted.push(id);
                }
            }
        }
        stops.extend(self.reconcile_locked().await);
        drop(guard);
        settle(stops).await;
        Ok(restarted)
    }

    pub async fn restart_task(&self, name: &str, task: u32) -> Result<()> {
        let guard = self.operations.lock().await;
        let entry = self.entry(name)?;
        if task as usize >= entry.tasks.len() {
            return Err(HerderError::TaskNotFound(name.to_string(), task));
        }
        let mut stops: Vec<Stopping> = self
            .stop_task(name, task, AfterStop::Restarting)
            .await
            .into_iter()
            .collect();
        stops.extend(self.reconcile_locked().await);
        drop(guard);
        settle(stops).await;
        Ok(())
    }

    // ---- offsets (KIP-875) -------------------------------------------------------------

    fn require_stopped(&self, name: &str) -> Result<ConnectorEntry> {
        let entry = self.entry(name)?;
        if entry.target_state != TargetState::Stopped {
            return Err(HerderError::BadRequest(format!(
                "Connectors must be in the STOPPED state before their offsets can be modified. This can be done for the specified connector by issuing a 'PUT' request to the '/connectors/{name}/stop' endpoint"
            )));
        }
        Ok(entry)
    }

    pub async fn offsets(&self, name: &str) -> Result<Vec<(Value, Value)>> {
        let entry = self.entry(name)?;
        match self.plugin_for(&entry.config)?.kind() {
            ConnectorKind::Source => {
                self.offsets.refresh().await?;
                Ok(self
                    .offsets
                    .offsets(name)
                    .into_iter()
                    .map(|(p, o)| (Value::Object(p), Value::Object(o)))
                    .collect())
            }
            ConnectorKind::Sink => sink_offsets::read(&self.kafka, name, &entry.config)
                .await
                .map_err(HerderError::Internal),
        }
    }

    /// Alters offsets; `None` deletes a partition's offset. The connector must be STOPPED.
    pub async fn alter_offsets(&self, name: &str, offsets: OffsetChanges) -> Result<()> {
        let _guard = self.operations.lock().await;
        let entry = self.require_stopped(name)?;
        match self.plugin_for(&entry.config)?.kind() {
            ConnectorKind::Source => Ok(self.offsets.write(name, offsets).await?),
            ConnectorKind::Sink => sink_offsets::alter(&self.kafka, name, offsets)
                .await
                .map_err(HerderError::BadRequest),
        }
    }

    pub async fn reset_offsets(&self, name: &str) -> Result<()> {
        let _guard = self.operations.lock().await;
        let entry = self.require_stopped(name)?;
        match self.plugin_for(&entry.config)?.kind() {
            ConnectorKind::Source => Ok(self.offsets.reset(name).await?),
            ConnectorKind::Sink => sink_offsets::reset(&self.kafka, name, &entry.config)
                .await
                .map_err(HerderError::Internal),
        }
    }

    // ---- reconcile ---------------------------------------------------------------------

    /// Makes the tasks running here match the config topic. Does not wait for the runs it
    /// stopped: they stop in their own tokio tasks, and a task's next run waits for its last
    /// one, so the caller (the config-topic watcher) stays free to follow further changes.
    pub async fn reconcile(&self) {
        let _guard = self.operations.lock().await;
        let _stopping = self.reconcile_locked().await;
    }

    /// Starts, pauses, resumes and stops tasks to match the config topic. Returns the runs it
    /// stopped, for the caller to await once it released the operations lock.
    async fn reconcile_locked(&self) -> Vec<Stopping> {
        let snapshot = self.configs.snapshot();
        let mut stops = Vec::new();
        // Tasks of deleted connectors, or beyond the current task count, stop first.
        let obsolete: Vec<(String, u32)> = {
            let tasks = self.tasks.lock().await;
            tasks
                .keys()
                .filter(|(name, id)| {
                    snapshot.connectors.get(name).is_none_or(|e| {
                        e.target_state == TargetState::Stopped || *id as usize >= e.tasks.len()
                    })
                })
                .cloned()
                .collect()
        };
        for (name, id) in obsolete {
            stops.extend(self.stop_task(&name, id, AfterStop::Nothing).await);
            if snapshot.connectors.contains_key(&name)
                && let Err(error) = self.statuses.remove_task(&name, id).await
            {
                tracing::warn!(connector = %name, task = id, %error, "cannot remove task status");
            }
        }
        for (name, entry) in &snapshot.connectors {
            stops.extend(self.reconcile_connector(name, entry).await);
        }
        stops
    }

    async fn reconcile_connector(&self, name: &str, entry: &ConnectorEntry) -> Vec<Stopping> {
        let state = match entry.target_state {
            TargetState::Stopped => ConnectorState::Stopped,
            TargetState::Paused => ConnectorState::Paused,
            TargetState::Started => ConnectorState::Running,
        };
        let current = self.statuses.connector(name);
        let failed_generating = current
            .as_ref()
            .is_some_and(|s| s.state == ConnectorState::Failed)
            && entry.tasks.is_empty();
        if !failed_generating && current.as_ref().is_none_or(|s| s.state != state) {
            self.put_connector_status(name, state, None).await;
        }
        let mut stops = Vec::new();
        if entry.target_state == TargetState::Stopped {
            return stops;
        }
        let run_state = if entry.target_state == TargetState::Paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        for (id, config) in entry.tasks.iter().enumerate() {
            let id = id as u32;
            if !self.assigned_here(name, id) {
                continue;
            }
            let tasks = self.tasks.lock().await;
            match tasks.get(&(name.to_string(), id)) {
                // Same config: keep it (a failed one stays failed until restarted). Only the
                // run's reporter writes its state, so a run that failed or ended stays so.
                Some(handle) if handle.config == *config => {
                    if handle.set_state(run_state) {
                        let status = handle.status.clone();
                        drop(tasks);
                        status.run_state_changed().await;
                    }
                }
                _ => {
                    drop(tasks);
                    stops.extend(self.stop_task(name, id, AfterStop::Restarting).await);
                    self.start_task(name, id, config, entry, run_state).await;
                }
            }
        }
        stops
    }

    /// Which worker runs a task. One worker runs everything until the cluster issue brings
    /// group membership; the rest of the herder already goes through this decision.
    fn assigned_here(&self, _connector: &str, _task: u32) -> bool {
        true
    }

    async fn put_connector_status(&self, name: &str, state: ConnectorState, trace: Option<String>) {
        let status = TaskStatus {
            state,
            trace,
            worker_id: self.worker_id.clone(),
            generation: self
                .configs
                .connector(name)
                .map_or(0, |e| e.task_generation),
            run: 0,
        };
        if let Err(error) = self.statuses.put_connector(name, &status).await {
            tracing::warn!(connector = %name, %error, "cannot record connector status");
        }
    }

    /// Takes a task's run out of the running set, closes its status with `after` (so nothing
    /// the runner still does is recorded after it) and starts stopping it, without waiting.
    async fn stop_task(&self, name: &str, id: u32, after: AfterStop) -> Option<Stopping> {
        let key = (name.to_string(), id);
        let handle = self.tasks.lock().await.remove(&key)?;
        handle.status.close(after).await;
        Some(self.begin_stop(key, handle, AfterStop::Nothing))
    }

    /// Stops a run in its own tokio task (so it goes on even if no caller waits) and records it
    /// as stopping until it is over, for the task's next run to wait on.
    fn begin_stop(&self, key: (String, u32), handle: TaskHandle, after: AfterStop) -> Stopping {
        let stopping = handle
            .stop(self.runner.shutdown_timeout, after)
            .boxed()
            .shared();
        tokio::spawn(stopping.clone());
        self.stopping_runs().insert(key, stopping.clone());
        stopping
    }

    fn stopping_runs(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, u32), Stopping>> {
        self.stopping
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A run number above every earlier run of the task: above the last one given here and the
    /// one stored (which a previous process of this worker may have written).
    fn next_run(&self, name: &str, id: u32) -> u64 {
        let stored = self.statuses.task(name, id).map_or(0, |s| s.run);
        let mut runs = self
            .runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let last = runs.entry((name.to_string(), id)).or_default();
        *last = (*last).max(stored) + 1;
        *last
    }

    async fn start_task(
        &self,
        name: &str,
        id: u32,
        config: &Props,
        entry: &ConnectorEntry,
        run_state: RunState,
    ) {
        let key = (name.to_string(), id);
        let (state_tx, state_rx) = watch::channel(run_state);
        let status = StatusReporter::new(
            self.statuses.clone(),
            RunId {
                connector: name,
                task_id: id,
                worker_id: &self.worker_id,
                generation: entry.task_generation,
                run: self.next_run(name, id),
            },
            state_rx.clone(),
        );
        let stop = CancellationToken::new();
        let runner = match self
            .spawn_task(name, id, config, status.clone(), state_rx, stop.clone())
            .await
        {
            Ok(runner) => runner,
            // Kept as a run that failed: it stays FAILED until restarted or reconfigured.
            Err(error) => {
                let status = status.clone();
                async move { status.failed(&error).await }.boxed()
            }
        };
        let previous = self.stopping_runs().remove(&key);
        let join = tokio::spawn(supervise(runner, previous, status.clone(), stop.clone()));
        self.tasks.lock().await.insert(
            key,
            TaskHandle {
                run_state: state_tx,
                stop,
                join,
                generation: entry.task_generation,
                config: config.clone(),
                status,
            },
        );
    }

    async fn spawn_task(
        &self,
        name: &str,
        id: u32,
        config: &Props,
        status: StatusReporter,
        run_state: watch::Receiver<RunState>,
        stop: CancellationToken,
    ) -> std::result::Result<BoxFuture<'static, ()>, ConnectError> {
        let resolved = secrets::resolve(config)?;
        let plugin = self
            .plugins
            .find(resolved.get(cc::CLASS).map_or("", String::as_str))
            .ok_or_else(|| ConnectError::config(cc::CLASS, "unknown connector class"))?;
        let common = cc::parse_common(plugin.kind(), &resolved)?;
        let policy = ErrorPolicy::from_config(&common)?;
        if let Some(topic) = &policy.dlq_topic {
            ensure_topics(
                &self.kafka,
                &[TopicSpec::regular(topic, 1, policy.dlq_replication_factor)],
            )
            .await
            .map_err(|e| ConnectError::retriable(e.to_string()))?;
        }
        let transforms = TransformChain::from_config(&resolved)?;
        let metrics = TaskMetrics::new(&self.metrics, name, id);
        let errors =
            ErrorReporter::new(policy, name, id, self.dlq_producer.clone(), metrics.clone());
        let runner = self.runner.clone();
        let join = match plugin {
            ConnectorPlugin::Source(connector) => {
                let overrides = overrides_with_prefix(&resolved, cc::PRODUCER_OVERRIDE);
                let producer = self
                    .kafka
                    .producer(&overrides)
                    .map_err(|e| ConnectError::fatal(e.to_string()))?;
                let spec = SourceTaskSpec {
                    connector: name.to_string(),
                    connector_class: connector.class().to_string(),
                    task_id: id,
                    task: connector.create_task(),
                    context: SourceTaskContext {
                        connector_name: name.to_string(),
                        task_id: id,
                        config: resolved.clone(),
                        offsets: self.offsets.reader(name),
                    },
                    transforms,
                    errors,
                    producer,
                    offsets: self.offsets.clone(),
                    kafka: self.kafka.clone(),
                    new_topic: (
                        common.int(cc::NEW_TOPIC_PARTITIONS)? as i32,
                        common.int(cc::NEW_TOPIC_REPLICATION)? as i32,
                    ),
                    status,
                    metrics,
                    settings: runner,
                };
                SourceRunner::run(spec, run_state, stop).boxed()
            }
            ConnectorPlugin::Sink(connector) => {
                let overrides = overrides_with_prefix(&resolved, cc::CONSUMER_OVERRIDE);
                let consumer = crate::task::sink::SinkConsumer::create(
                    &self.kafka,
                    Some(&sink_offsets::group_id(name)),
                    &overrides,
                )
                .map_err(|e| ConnectError::fatal(e.to_string()))?;
                let subscription = match common.optional_string(cc::TOPICS_REGEX) {
                    Some(regex) => Subscription::Regex(regex),
                    None => Subscription::Topics(common.list(cc::TOPICS)?),
                };
                let spec = SinkTaskSpec {
                    connector: name.to_string(),
                    task_id: id,
                    task: connector.create_task(),
                    config: resolved.clone(),
                    subscription,
                    consumer,
                    transforms,
                    errors,
                    status,
                    metrics,
                    settings: runner,
                };
                SinkRunner::run(spec, run_state, stop).boxed()
            }
        };
        Ok(join)
    }

    /// Stops every task here at once, letting each deliver what it holds (each bounded by the
    /// shutdown timeout), and waits for runs stopped earlier that are still stopping.
    pub async fn shutdown(&self) {
        let stops = {
            let _guard = self.operations.lock().await;
            let handles = std::mem::take(&mut *self.tasks.lock().await);
            let mut stops: Vec<Stopping> = self.stopping_runs().values().cloned().collect();
            for (key, handle) in handles {
                // UNASSIGNED once stopped, unless the run failed (even while stopping).
                stops.push(self.begin_stop(key, handle, AfterStop::Unassigned));
            }
            stops
        };
        settle(stops).await;
    }
}

/// Waits for runs an operation stopped, once it released the operations lock: a stuck task
/// holds up the call that stopped it (bounded by the shutdown timeout), never the others.
async fn settle(stops: Vec<Stopping>) {
    join_all(stops).await;
}
