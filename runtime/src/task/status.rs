//! Writes a task's state to the status topic.

use std::sync::Arc;

use crate::store::{ConnectorState, StatusStore, TaskStatus};

#[derive(Clone)]
pub struct StatusReporter {
    store: Arc<StatusStore>,
    connector: String,
    task_id: u32,
    worker_id: String,
    generation: u64,
}

impl StatusReporter {
    pub fn new(
        store: Arc<StatusStore>,
        connector: &str,
        task_id: u32,
        worker_id: &str,
        generation: u64,
    ) -> Self {
        Self {
            store,
            connector: connector.to_string(),
            task_id,
            worker_id: worker_id.to_string(),
            generation,
        }
    }

    pub async fn report(&self, state: ConnectorState, trace: Option<String>) {
        let status = TaskStatus {
            state,
            trace,
            worker_id: self.worker_id.clone(),
            generation: self.generation,
        };
        if let Err(error) = self
            .store
            .put_task(&self.connector, self.task_id, &status)
            .await
        {
            tracing::warn!(connector = %self.connector, task = self.task_id, %error, "cannot record task status");
        }
    }

    pub async fn failed(&self, error: &impl std::fmt::Display) {
        tracing::error!(connector = %self.connector, task = self.task_id, %error, "task failed");
        self.report(ConnectorState::Failed, Some(error.to_string()))
            .await;
    }

    pub async fn topic(&self, topic: &str) {
        if let Err(error) = self
            .store
            .add_topic(&self.connector, topic, self.task_id)
            .await
        {
            tracing::warn!(connector = %self.connector, %topic, %error, "cannot record active topic");
        }
    }
}
