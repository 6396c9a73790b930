//! Task-config generation: the connector splits its work, and the task configs are committed
//! to the config topic with the `${...}` references the user wrote, resolved only when each
//! task starts.

use medconnect_api::{ConnectorContext, Props};

use super::{Herder, HerderError, Result, cc};
use crate::store::ConnectorState;
use crate::worker::secrets;

impl Herder {
    /// Asks the connector for its task configs and commits them to the config topic.
    pub(super) async fn generate_tasks(&self, name: &str, config: &Props) -> Result<()> {
        let tasks = self.task_configs_for(name, config).await?;
        self.configs.put_task_configs(name, &tasks).await?;
        Ok(())
    }

    /// The connector's task configs for `config`, not yet written. A connector that cannot
    /// make them is marked FAILED and the call is a 400.
    pub(super) async fn task_configs_for(&self, name: &str, config: &Props) -> Result<Vec<Props>> {
        let plugin = self.plugin_for(config)?;
        // Bounded even for a config stored before the worker's limit existed.
        let max_tasks = cc::task_count(&plugin, config, self.runner.tasks_max_limit);
        // Task configs keep `${...}` references: they are resolved when each task starts.
        let context = ConnectorContext {
            connector_name: name.to_string(),
            config: config.clone(),
        };
        let resolved = secrets::resolve(
            &self.runner.config_providers,
            &cc::full_def(&plugin),
            config,
        )
        .map_err(|e| HerderError::InvalidConfig(vec![cc::field_and_reason(e)]))?;
        let resolved_context = ConnectorContext {
            config: resolved.props.clone(),
            ..context.clone()
        };
        let generated = cc::within_call_timeout(
            self.runner.connector_call_timeout,
            "generating task configs",
            plugin
                .connector()
                .task_configs(&resolved_context, max_tasks),
        )
        .await
        // The connector saw resolved values and may quote them.
        .map_err(|e| resolved.scrubber.error(e));
        match generated {
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
                Ok(tasks)
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
}
