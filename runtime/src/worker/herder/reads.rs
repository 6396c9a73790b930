//! Answers about connectors: their configs, task configs, status, topics, and validation of a
//! config before it is written.

use medconnect_api::Placement;
use medconnect_api::{ConfigValue, ConnectorKind, Props};
use serde_json::Value;

use super::{Herder, HerderError, Result, cc};
use crate::store::{ConnectorState, TaskStatus};

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

impl Herder {
    /// Forgets the statuses of an every-worker connector's tasks numbered `count` and up: the
    /// leader calls it once a generation has fewer members than task ids were given out.
    pub async fn forget_tasks_from(&self, name: &str, count: u32) {
        for (id, _) in self.statuses.tasks(name) {
            if id >= count
                && let Err(error) = self.statuses.remove_task(name, id).await
            {
                tracing::warn!(connector = %name, task = id, %error, "cannot remove task status");
            }
        }
    }

    /// The worker running a task by its latest status, once every status written before the
    /// call is read: a worker that just started a task may have recorded it moments ago.
    pub async fn task_owner(&self, name: &str, task: u32) -> Option<String> {
        if let Err(error) = self.statuses.refresh().await {
            tracing::warn!(connector = %name, task, %error, "cannot read the status topic to its end; using what was read");
        }
        self.statuses.task(name, task).map(|s| s.worker_id)
    }

    pub fn connector_names(&self) -> Vec<String> {
        self.configs.snapshot().connectors.into_keys().collect()
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
        let every_worker = self.placement_of(&entry) == Placement::EveryWorker;
        // An every-worker connector has a task per worker, whatever its task-config count.
        let tasks = self
            .statuses
            .tasks(name)
            .into_iter()
            .filter(|(id, _)| every_worker || (*id as usize) < entry.tasks.len())
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
        let status = self.statuses.task(name, task);
        if self.placement_of(&entry) == Placement::EveryWorker {
            return status.ok_or_else(|| HerderError::TaskNotFound(name.to_string(), task));
        }
        if task as usize >= entry.tasks.len() {
            return Err(HerderError::TaskNotFound(name.to_string(), task));
        }
        Ok(status.unwrap_or_else(|| self.unassigned()))
    }

    fn unassigned(&self) -> TaskStatus {
        TaskStatus {
            state: ConnectorState::Unassigned,
            trace: None,
            worker_id: self.worker_id.clone(),
            generation: 0,
            run: 0,
            assignment_generation: None,
        }
    }

    pub fn topics(&self, name: &str) -> Result<Vec<String>> {
        self.entry(name)?;
        Ok(self.statuses.topics(name))
    }

    pub async fn validate(&self, class: &str, config: &Props) -> Result<Validation> {
        let plugin = self.plugin_named(class)?;
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
            values: cc::validate(&plugin, &with_class, &self.runner).await,
        })
    }
}
