//! Connector and task states in Kafka Connect's status-topic format:
//! `status-connector-<name>` / `status-task-<name>-<id>` with
//! `{"state","trace","worker_id","generation"}`, and the active topics of each connector
//! (`topic-<topic>-connector-<name>`).
//!
//! Task statuses are ordered by `run`, a per-task sequence that grows with every start of the
//! task: a record of an older run is neither written nor applied, so a runner that is still
//! finishing (or a slow writer elsewhere) cannot overwrite what a later run reported. Within a
//! run, writes are serialised by the run's `StatusReporter`, so the log order is their order.
//! `generation` stays the task-config generation Connect tools show; it cannot order records:
//! it restarts at 1 when a connector is re-created and when commits are compacted away.

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
    /// Which start of the task wrote this (0 for connector statuses and older records).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub run: u64,
    /// The cluster generation whose assignment put the task (or connector) on `worker_id`;
    /// absent for a worker alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment_generation: Option<i32>,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
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
                let mut statuses = apply_statuses
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                apply(&mut statuses, key, value);
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

    /// Writes a task's status; `false` (nothing written) when a later run of the task already
    /// reported.
    pub async fn put_task(
        &self,
        name: &str,
        task: u32,
        status: &TaskStatus,
    ) -> Result<bool, StoreError> {
        if let Some(stored) = self.task(name, task).filter(|s| s.run > status.run) {
            tracing::debug!(connector = %name, task, run = status.run, stored_run = stored.run, "not writing the status of an older run");
            return Ok(false);
        }
        let value = serde_json::to_vec(status).map_err(|e| StoreError::Internal(e.to_string()))?;
        self.log
            .write(
                format!("status-task-{name}-{task}").as_bytes(),
                Some(&value),
            )
            .await?;
        Ok(true)
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

    /// Waits until every status written before this call (by any worker) is read.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        self.log.read_to_end().await
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

/// Applies one record of the status topic, in log order.
fn apply(statuses: &mut Statuses, key: &[u8], value: Option<&[u8]>) {
    let Ok(key) = std::str::from_utf8(key) else {
        return;
    };
    let status = value.and_then(|v| serde_json::from_slice::<TaskStatus>(v).ok());
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
            Some(status) => apply_task(statuses, task, status),
            None => {
                statuses.tasks.remove(&task);
            }
        }
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
}

/// A task status replaces the stored one unless it comes from an older run.
fn apply_task(statuses: &mut Statuses, task: (String, u32), status: TaskStatus) {
    match statuses.tasks.get(&task) {
        Some(stored) if stored.run > status.run => {
            tracing::debug!(connector = %task.0, task = task.1, run = status.run, stored_run = stored.run, "ignoring the status of an older run");
        }
        _ => {
            statuses.tasks.insert(task, status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: ConnectorState, run: u64) -> Vec<u8> {
        let status = TaskStatus {
            state,
            trace: None,
            worker_id: "w".into(),
            generation: 1,
            run,
            assignment_generation: None,
        };
        serde_json::to_vec(&status).unwrap_or_default()
    }

    fn state_of(statuses: &Statuses) -> Option<(ConnectorState, u64)> {
        statuses
            .tasks
            .get(&("c".to_string(), 0))
            .map(|s| (s.state, s.run))
    }

    #[test]
    fn a_status_of_an_older_run_is_not_applied() {
        let mut statuses = Statuses::default();
        apply(
            &mut statuses,
            b"status-task-c-0",
            Some(&task(ConnectorState::Failed, 2)),
        );
        apply(
            &mut statuses,
            b"status-task-c-0",
            Some(&task(ConnectorState::Running, 1)),
        );
        assert_eq!(state_of(&statuses), Some((ConnectorState::Failed, 2)));
        apply(
            &mut statuses,
            b"status-task-c-0",
            Some(&task(ConnectorState::Running, 3)),
        );
        assert_eq!(state_of(&statuses), Some((ConnectorState::Running, 3)));
    }

    #[test]
    fn within_a_run_the_log_order_wins_and_a_tombstone_clears() {
        let mut statuses = Statuses::default();
        apply(
            &mut statuses,
            b"status-task-c-0",
            Some(&task(ConnectorState::Running, 4)),
        );
        apply(
            &mut statuses,
            b"status-task-c-0",
            Some(&task(ConnectorState::Failed, 4)),
        );
        assert_eq!(state_of(&statuses), Some((ConnectorState::Failed, 4)));
        apply(&mut statuses, b"status-task-c-0", None);
        assert_eq!(state_of(&statuses), None);
        // A re-created connector starts over.
        apply(
            &mut statuses,
            b"status-task-c-0",
            Some(&task(ConnectorState::Paused, 1)),
        );
        assert_eq!(state_of(&statuses), Some((ConnectorState::Paused, 1)));
    }

    #[test]
    fn records_without_a_run_are_read_as_run_zero() {
        let mut statuses = Statuses::default();
        let connect_record = br#"{"state":"RUNNING","trace":null,"worker_id":"w","generation":5}"#;
        apply(&mut statuses, b"status-task-c-0", Some(connect_record));
        assert_eq!(state_of(&statuses), Some((ConnectorState::Running, 0)));
        let written = task(ConnectorState::Running, 0);
        assert!(!String::from_utf8_lossy(&written).contains("run"));
    }
}
