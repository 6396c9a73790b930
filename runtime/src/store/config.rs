//! Connector configs, task configs and target states, in Kafka Connect's config-topic format:
//! `connector-<name>` `{"properties":{..}}`, `task-<name>-<n>` `{"properties":{..}}`,
//! `commit-<name>` `{"tasks":N}`, `target-state-<name>` `{"state":"STARTED"}`.
//! Task configs take effect only with their commit record, so a reader never sees half a set.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use medconnect_api::{Props, SecretsHidden};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{KafkaLog, StoreError};
use crate::kafka::KafkaSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetState {
    #[default]
    Started,
    Paused,
    Stopped,
}

impl TargetState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "STARTED",
            Self::Paused => "PAUSED",
            Self::Stopped => "STOPPED",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "STARTED" => Some(Self::Started),
            "PAUSED" => Some(Self::Paused),
            "STOPPED" => Some(Self::Stopped),
            _ => None,
        }
    }
}

/// What the config topic says of one connector.
#[derive(Clone, PartialEq, Default)]
pub struct ConnectorEntry {
    pub config: Props,
    pub target_state: TargetState,
    /// The committed task configs.
    pub tasks: Vec<Props>,
    /// Counts task-config commits, so runners know when their config is outdated.
    pub task_generation: u64,
}

/// Stored configs hold secrets written inline: hidden.
impl std::fmt::Debug for ConnectorEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorEntry")
            .field("config", &SecretsHidden(&self.config))
            .field("target_state", &self.target_state)
            .field(
                "tasks",
                &self.tasks.iter().map(SecretsHidden).collect::<Vec<_>>(),
            )
            .field("task_generation", &self.task_generation)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConfigSnapshot {
    pub connectors: BTreeMap<String, ConnectorEntry>,
}

#[derive(Debug, Default)]
struct State {
    snapshot: ConfigSnapshot,
    /// Task configs read but not yet committed.
    pending_tasks: HashMap<String, BTreeMap<usize, Props>>,
    /// Target states read before their connector's config.
    pending_targets: HashMap<String, TargetState>,
}

pub struct ConfigStore {
    log: KafkaLog,
    state: Arc<Mutex<State>>,
    changes: watch::Receiver<u64>,
}

impl ConfigStore {
    pub async fn open(settings: &KafkaSettings, topic: &str) -> Result<Self, StoreError> {
        let state = Arc::new(Mutex::new(State::default()));
        let (change_tx, changes) = watch::channel(0u64);
        let apply_state = state.clone();
        let log = KafkaLog::open(
            settings,
            topic,
            Box::new(move |key, value| {
                if let Ok(key) = std::str::from_utf8(key) {
                    let mut state = apply_state.lock().unwrap_or_else(PoisonError::into_inner);
                    apply(&mut state, key, value);
                    change_tx.send_modify(|version| *version += 1);
                }
            }),
        )
        .await?;
        Ok(Self {
            log,
            state,
            changes,
        })
    }

    pub fn snapshot(&self) -> ConfigSnapshot {
        self.lock().snapshot.clone()
    }

    pub fn connector(&self, name: &str) -> Option<ConnectorEntry> {
        self.lock().snapshot.connectors.get(name).cloned()
    }

    /// Changes whenever a record of the config topic was applied (by this worker or another).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// How far this worker read the config topic (its one partition): workers of a cluster
    /// compare it, so the leader assigns from a snapshot at least as new as every member's.
    pub fn position(&self) -> i64 {
        self.log.position(0)
    }

    /// Waits until the config topic was read up to `offset` (exclusive).
    pub async fn read_to(&self, offset: i64) -> Result<(), StoreError> {
        self.log.wait_for(0, offset).await
    }

    pub async fn put_connector(&self, name: &str, config: &Props) -> Result<(), StoreError> {
        self.write(ConfigChange::default().connector(name, config))
            .await
    }

    pub async fn remove_connector(&self, name: &str) -> Result<(), StoreError> {
        let change = ConfigChange {
            records: vec![
                (format!("connector-{name}").into_bytes(), None),
                (format!("target-state-{name}").into_bytes(), None),
            ],
        };
        self.write(change).await
    }

    pub async fn put_target_state(&self, name: &str, state: TargetState) -> Result<(), StoreError> {
        self.write(ConfigChange::default().target_state(name, state))
            .await
    }

    /// Writes every task config, then the commit record that makes them current.
    pub async fn put_task_configs(&self, name: &str, tasks: &[Props]) -> Result<(), StoreError> {
        self.write(ConfigChange::default().task_configs(name, tasks))
            .await
    }

    /// Writes the records of `change` in order and returns once this worker has read them
    /// all back (one read-back for the whole change).
    pub async fn write(&self, change: ConfigChange) -> Result<(), StoreError> {
        self.log.write_all(&change.records).await
    }

    pub async fn refresh(&self) -> Result<(), StoreError> {
        self.log.read_to_end().await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn properties(value: &Value) -> Props {
    value
        .get("properties")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_string),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn apply(state: &mut State, key: &str, value: Option<&[u8]>) {
    let parsed: Option<Value> = value.and_then(|v| serde_json::from_slice(v).ok());
    if let Some(name) = key.strip_prefix("connector-") {
        match parsed {
            Some(value) => {
                let pending_target = state.pending_targets.remove(name);
                let entry = state
                    .snapshot
                    .connectors
                    .entry(name.to_string())
                    .or_default();
                entry.config = properties(&value);
                if let Some(target) = pending_target {
                    entry.target_state = target;
                }
            }
            None => {
                state.snapshot.connectors.remove(name);
                state.pending_tasks.remove(name);
            }
        }
    } else if let Some(name) = key.strip_prefix("target-state-") {
        let target = parsed
            .as_ref()
            .and_then(|v| v.get("state.v2").or_else(|| v.get("state")))
            .and_then(Value::as_str)
            .and_then(TargetState::parse);
        match (target, state.snapshot.connectors.get_mut(name)) {
            (Some(target), Some(entry)) => entry.target_state = target,
            (Some(target), None) => {
                state.pending_targets.insert(name.to_string(), target);
            }
            (None, _) => {
                state.pending_targets.remove(name);
            }
        }
    } else if let Some(rest) = key.strip_prefix("task-") {
        if let (Some((name, index)), Some(value)) = (rest.rsplit_once('-'), parsed)
            && let Ok(index) = index.parse::<usize>()
        {
            state
                .pending_tasks
                .entry(name.to_string())
                .or_default()
                .insert(index, properties(&value));
        }
    } else if let Some(name) = key.strip_prefix("commit-") {
        let count = parsed
            .as_ref()
            .and_then(|v| v.get("tasks"))
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let pending = state.pending_tasks.remove(name).unwrap_or_default();
        if let Some(entry) = state.snapshot.connectors.get_mut(name) {
            entry.tasks = (0..count)
                .filter_map(|i| pending.get(&i).cloned())
                .collect();
            entry.task_generation += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(state: &mut State, key: &str, value: Value) {
        apply(state, key, Some(value.to_string().as_bytes()));
    }

    #[test]
    fn task_configs_count_only_once_committed() {
        let mut state = State::default();
        put(
            &mut state,
            "connector-adt-in",
            json!({"properties": {"topic": "a"}}),
        );
        put(
            &mut state,
            "task-adt-in-0",
            json!({"properties": {"k": "0"}}),
        );
        put(
            &mut state,
            "task-adt-in-1",
            json!({"properties": {"k": "1"}}),
        );
        assert!(state.snapshot.connectors["adt-in"].tasks.is_empty());
        put(&mut state, "commit-adt-in", json!({"tasks": 2}));
        let entry = &state.snapshot.connectors["adt-in"];
        assert_eq!(entry.tasks.len(), 2);
        assert_eq!(entry.tasks[1]["k"], "1");
        assert_eq!(entry.task_generation, 1);
    }

    #[test]
    fn target_state_and_deletion_follow_the_log() {
        let mut state = State::default();
        put(&mut state, "target-state-x", json!({"state": "PAUSED"}));
        put(&mut state, "connector-x", json!({"properties": {}}));
        assert_eq!(
            state.snapshot.connectors["x"].target_state,
            TargetState::Paused
        );
        put(
            &mut state,
            "target-state-x",
            json!({"state": "PAUSED", "state.v2": "STOPPED"}),
        );
        assert_eq!(
            state.snapshot.connectors["x"].target_state,
            TargetState::Stopped
        );
        apply(&mut state, "connector-x", None);
        assert!(!state.snapshot.connectors.contains_key("x"));
    }
}

/// Records for the config topic, written together by [`ConfigStore::write`]: a create writes
/// the target state, the connector and its task configs with one read-back instead of one each.
#[derive(Debug, Default)]
#[must_use]
pub struct ConfigChange {
    records: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl ConfigChange {
    fn record(mut self, key: String, value: serde_json::Value) -> Self {
        self.records
            .push((key.into_bytes(), Some(value.to_string().into_bytes())));
        self
    }

    pub fn connector(self, name: &str, config: &Props) -> Self {
        self.record(format!("connector-{name}"), json!({ "properties": config }))
    }

    pub fn target_state(self, name: &str, state: TargetState) -> Self {
        self.record(
            format!("target-state-{name}"),
            json!({ "state": state.as_str(), "state.v2": state.as_str() }),
        )
    }

    /// Every task config, then the commit record that makes them current.
    pub fn task_configs(self, name: &str, tasks: &[Props]) -> Self {
        let change = tasks
            .iter()
            .enumerate()
            .fold(self, |change, (index, config)| {
                change.record(
                    format!("task-{name}-{index}"),
                    json!({ "properties": config }),
                )
            });
        change.record(format!("commit-{name}"), json!({ "tasks": tasks.len() }))
    }
}
