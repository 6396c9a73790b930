//! Changes to connectors: each writes the config topic, then reconciles, and waits for the
//! runs it stopped only once it released the operations lock.

use std::collections::BTreeMap;

use medconnect_api::Props;
use tokio::sync::MutexGuard;

use super::reads::ConnectorInfo;
use super::{ConnectorPlugin, Herder, HerderError, Result, cc, settle};
use crate::store::{ConfigChange, ConnectorState, TargetState};
use crate::task::{AfterStop, Stopping};
use crate::worker::connector_config::restore_hidden;
use crate::worker::connector_name;

impl Herder {
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

    /// Checks a config as validation does (the connector's own checks may do I/O).
    async fn check(&self, name: &str, config: &Props) -> Result<ConnectorPlugin> {
        // The REST API checks names as it reads them; this holds for every other caller.
        connector_name::check(name).map_err(HerderError::BadRequest)?;
        if !config.contains_key(cc::CLASS) {
            return Err(HerderError::InvalidConfig(vec![(
                cc::CLASS.into(),
                "Missing required configuration \"connector.class\" which has no default value."
                    .into(),
            )]));
        }
        let plugin = self.plugin_for(config)?;
        let errors: Vec<(String, String)> = cc::validate(&plugin, config, &self.runner)
            .await
            .into_iter()
            .flat_map(|v| v.errors.into_iter().map(move |e| (v.name.clone(), e)))
            .collect();
        if errors.is_empty() {
            Ok(plugin)
        } else {
            Err(HerderError::InvalidConfig(errors))
        }
    }

    /// Checks the config `propose` makes from the stored state before taking the operations
    /// lock (a connector's checks may wait on its peer, and must not hold up other writes),
    /// then again under the lock only if the stored state changed it meanwhile. Returns the
    /// lock and the config to write.
    async fn checked<F>(&self, name: &str, propose: F) -> Result<(MutexGuard<'_, ()>, Props)>
    where
        F: Fn(&Self) -> Result<Props>,
    {
        let config = propose(self)?;
        self.check(name, &config).await?;
        let guard = self.operations.lock().await;
        let now = propose(self)?;
        if now != config {
            self.check(name, &now).await?;
        }
        Ok((guard, now))
    }

    pub async fn create(
        &self,
        name: &str,
        config: Props,
        initial: Option<TargetState>,
    ) -> Result<ConnectorInfo> {
        let config = Self::named(name, config)?;
        let (guard, config) = self
            .checked(name, |herder| match herder.configs.connector(name) {
                Some(_) => Err(HerderError::AlreadyExists(name.to_string())),
                None => Ok(config.clone()),
            })
            .await?;
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
        let given = Self::named(name, config)?;
        let (guard, config) = self
            .checked(name, |herder| {
                let mut config = given.clone();
                if let Some(existing) = herder.configs.connector(name) {
                    let def = cc::full_def(&herder.plugin_for(&config)?);
                    restore_hidden(&def, &mut config, Some(&existing.config));
                }
                Ok(config)
            })
            .await?;
        let existing = self.configs.connector(name);
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
        let (guard, config) = self
            .checked(name, |herder| {
                let existing = herder.entry(name)?;
                let mut config = existing.config.clone();
                for (key, value) in &patch {
                    match value {
                        Some(value) => config.insert(key.clone(), value.clone()),
                        None => config.remove(key),
                    };
                }
                config.insert(cc::NAME.into(), name.to_string());
                let def = cc::full_def(&herder.plugin_for(&config)?);
                restore_hidden(&def, &mut config, Some(&existing.config));
                Ok(config)
            })
            .await?;
        self.configs.put_connector(name, &config).await?;
        if self.entry(name)?.target_state != TargetState::Stopped {
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
        // One read-back for the whole create: the records go out together, in order.
        let change = ConfigChange::default()
            .target_state(name, initial)
            .connector(name, config);
        if initial == TargetState::Stopped {
            return Ok(self.configs.write(change).await?);
        }
        match self.task_configs_for(name, config).await {
            Ok(tasks) => Ok(self
                .configs
                .write(change.task_configs(name, &tasks))
                .await?),
            Err(error) => {
                // The connector exists, FAILED, as when its tasks were generated apart.
                self.configs.write(change).await?;
                Err(error)
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
            // Only the connector's owner records its status (and records it RUNNING again
            // when it reconciles below); another worker only regenerates the task configs.
            if self.assignment.owns_connector(name) {
                self.put_connector_status(name, ConnectorState::Restarting, None)
                    .await;
            }
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

    pub async fn reset_topics(&self, name: &str) -> Result<()> {
        self.entry(name)?;
        let topics = self.statuses.topics(name);
        Ok(self.statuses.reset_topics(name, &topics).await?)
    }
}
