//! Source offsets in Kafka Connect's offset-topic format: key `["<connector>", {partition}]`,
//! value the offset map, a tombstone for a deleted offset.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use medconnect_api::{OffsetReader, SourceOffset, SourcePartition};
use serde_json::{Value, json};

use super::{KafkaLog, StoreError};
use crate::kafka::KafkaSettings;

type Offsets = HashMap<String, BTreeMap<String, (SourcePartition, SourceOffset)>>;

pub struct OffsetStore {
    log: KafkaLog,
    offsets: Arc<Mutex<Offsets>>,
}

/// The canonical text of a partition map (serde_json sorts map keys).
fn partition_id(partition: &SourcePartition) -> String {
    Value::Object((**partition).clone()).to_string()
}

impl OffsetStore {
    pub async fn open(settings: &KafkaSettings, topic: &str) -> Result<Self, StoreError> {
        let offsets: Arc<Mutex<Offsets>> = Arc::default();
        let apply_offsets = offsets.clone();
        let log = KafkaLog::open(
            settings,
            topic,
            Box::new(move |key, value| {
                let Ok(Value::Array(parts)) = serde_json::from_slice::<Value>(key) else {
                    return;
                };
                let (Some(Value::String(connector)), Some(Value::Object(partition))) =
                    (parts.first(), parts.get(1))
                else {
                    return;
                };
                let partition = SourcePartition::from(partition.clone());
                let offset = value.and_then(|v| serde_json::from_slice::<Value>(v).ok());
                let mut offsets = apply_offsets.lock().unwrap_or_else(PoisonError::into_inner);
                let of_connector = offsets.entry(connector.clone()).or_default();
                match offset {
                    Some(Value::Object(offset)) => {
                        of_connector.insert(partition_id(&partition), (partition, offset));
                    }
                    _ => {
                        of_connector.remove(&partition_id(&partition));
                    }
                }
            }),
        )
        .await?;
        Ok(Self { log, offsets })
    }

    /// Stores offsets; `None` deletes the partition's offset.
    pub async fn write(
        &self,
        connector: &str,
        offsets: impl IntoIterator<Item = (SourcePartition, Option<SourceOffset>)>,
    ) -> Result<(), StoreError> {
        for (partition, offset) in offsets {
            let key = json!([connector, partition]).to_string();
            let value = offset.map(|o| Value::Object(o).to_string());
            self.log
                .write(key.as_bytes(), value.as_deref().map(str::as_bytes))
                .await?;
        }
        Ok(())
    }

    pub fn offsets(&self, connector: &str) -> Vec<(SourcePartition, SourceOffset)> {
        self.lock()
            .get(connector)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Deletes every stored offset of a connector.
    pub async fn reset(&self, connector: &str) -> Result<(), StoreError> {
        let partitions: Vec<_> = self
            .offsets(connector)
            .into_iter()
            .map(|(p, _)| (p, None))
            .collect();
        self.write(connector, partitions).await
    }

    /// A reader over one connector's offsets, handed to its source tasks.
    pub fn reader(self: &Arc<Self>, connector: &str) -> Arc<dyn OffsetReader> {
        Arc::new(ConnectorOffsets {
            store: self.clone(),
            connector: connector.to_string(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Offsets> {
        self.offsets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub async fn refresh(&self) -> Result<(), StoreError> {
        self.log.read_to_end().await
    }
}

struct ConnectorOffsets {
    store: Arc<OffsetStore>,
    connector: String,
}

impl OffsetReader for ConnectorOffsets {
    fn offset(&self, partition: &SourcePartition) -> Option<SourceOffset> {
        self.store
            .lock()
            .get(&self.connector)
            .and_then(|m| m.get(&partition_id(partition)))
            .map(|(_, offset)| offset.clone())
    }

    fn partitions(&self) -> Vec<SourcePartition> {
        self.store
            .lock()
            .get(&self.connector)
            .map(|m| m.values().map(|(partition, _)| partition.clone()).collect())
            .unwrap_or_default()
    }
}
