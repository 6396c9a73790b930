//! Connector and task states in Kafka Connect's status-topic format:
//! `status-connector-<name>` / `status-task-<name>-<id>` with
//! `{"state","trace","worker_id","generation"}`, and the active topics of each connector
//! (`topic-<topic>-connector-<name>`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{KafkaLog, StoreError};
use crate::kafka::KafkaSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ConnectorState {
    Unassigned,
    Running,
    Paused,
    Stopped,
    Failed,
    Restarting,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub state: ConnectorState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    pub worker_id: String,
    #[serde(default)]
    pub generation: u64,
}

#[derive(Debug, Default)]
struct Statuses {
    connectors: BTreeMap<String, TaskStatus>,
    tasks: BTreeMap<(String, u32), TaskStatus>,
    topics: BTreeMap<String, BTreeSet<String>>,
}

pub struct StatusStore {
    log: KafkaLog,
    statuses: Arc<Mutex<Statuses>>,
}

impl StatusStore {
    pub async fn open(settings: &KafkaSettings, topic: &str) -> Result<Self, StoreError> {
        let statuses: Arc<Mutex<Statuses>> = Arc::default();
        let apply_statuses = statuses.clone();
        let log = KafkaLog::open(
            settings,
            topic,
            Box::new(move |key, value| {
                let Ok(key) = std::str::from_utf8(key) else {
                    return;
                };
                let status = value.and_then(|v| serde_json::from_slice::<TaskStatus>(v).ok());
                let mut statuses = apply_statuses
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if let Some(name) = key.strip_prefix("status-connector-") {
                    match status {
                        Some(status) => statuses.connectors.insert(name.to_string(), status),
                        None => statuses.connectors.remove(name),
                    };
                } else if let Some(rest) = key.strip_prefix("status-task-") {
                    let Some((name, id)) = rest.rsplit_once('-') else {
                        return;
                    };
                    let Ok(id) = id.parse::<u32>() else { return };
                    let task = (name.to_string(), id);
                    match status {
                        Some(status) => statuses.tasks.insert(task, status),
                        None => statuses.tasks.remove(&task),
                    };
                } else if let Some(rest) = key.strip_prefix("topic-") {
                    let Some((topic, connector)) = rest.split_once("-connector-") else {
                        return;
                    };
                    let topics = statuses.topics.entry(connector.to_string()).or_default();
                    if value.is_some() {
                        topics.insert(topic.to_string());
                    } else {
                        topics.remove(topic);
                    }
                }
            }),
        )
        .await?;
        Ok(Self { log, statuses })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Statuses> {
        self.statuses.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub async fn put_connector(&self, name: &str, status: &TaskStatus) -> Result<(), StoreError> {
        let value = serde_json::to_vec(status).map_err(|e| StoreError::Internal(e.to_string()))?;
        self.log
            .write(format!("status-connector-{name}").as_bytes(), Some(&value))
            .await
    }

    pub async fn put_task(
        &self,
        name: &str,
        task: u32,
        status: &TaskStatus,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_vec(status).map_err(|e| StoreError::Internal(e.to_string()))?;
        self.log
            .write(
                format!("status-task-{name}-{task}").as_bytes(),
                Some(&value),
            )
            .await
    }

    /// Removes a connector's statuses and active topics (after it was deleted).
    pub async fn remove(&self, name: &str) -> Result<(), StoreError> {
        let (tasks, topics) = {
            let statuses = self.lock();
            let tasks: Vec<u32> = statuses
                .tasks
                .keys()
                .filter(|(n, _)| n == name)
                .map(|(_, id)| *id)
                .collect();
            let topics: Vec<String> = statuses
                .topics
                .get(name)
                .map(|t| t.iter().cloned().collect())
                .unwrap_or_default();
            (tasks, topics)
        };
        for id in tasks {
            self.log
                .write(format!("status-task-{name}-{id}").as_bytes(), None)
                .await?;
        }
        self.log
            .write(format!("status-connector-{name}").as_bytes(), None)
            .await?;
        self.reset_topics(name, &topics).await
    }

    pub async fn remove_task(&self, name: &str, task: u32) -> Result<(), StoreError> {
        self.log
            .write(format!("status-task-{name}-{task}").as_bytes(), None)
            .await
    }

    pub fn connector(&self, name: &str) -> Option<TaskStatus> {
        self.lock().connectors.get(name).cloned()
    }

    pub fn tasks(&self, name: &str) -> Vec<(u32, TaskStatus)> {
        self.lock()
            .tasks
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, id), status)| (*id, status.clone()))
            .collect()
    }

    pub fn task(&self, name: &str, task: u32) -> Option<TaskStatus> {
        self.lock().tasks.get(&(name.to_string(), task)).cloned()
    }

    /// Records that a connector used a topic (KIP-558); a no-op when already known.
    pub async fn add_topic(
        &self,
        connector: &str,
        topic: &str,
        task: u32,
    ) -> Result<(), StoreError> {
        if self
            .lock()
            .topics
            .get(connector)
            .is_some_and(|t| t.contains(topic))
        {
            return Ok(());
        }
        let value = json!({ "topic": {
            "name": topic, "connector": connector, "task": task,
            "discoverTimestamp": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        }});
        let value = Value::to_string(&value);
        self.log
            .write(
                format!("topic-{topic}-connector-{connector}").as_bytes(),
                Some(value.as_bytes()),
            )
            .await
    }

    pub fn topics(&self, connector: &str) -> Vec<String> {
        self.lock()
            .topics
            .get(connector)
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub async fn reset_topics(&self, connector: &str, topics: &[String]) -> Result<(), StoreError> {
        for topic in topics {
            self.log
                .write(
                    format!("topic-{topic}-connector-{connector}").as_bytes(),
                    None,
                )
                .await?;
        }
        Ok(())
    }
}
