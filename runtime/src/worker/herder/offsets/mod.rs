//! Offsets as KIP-875 shows and alters them: a source connector's are in the offset topic, a
//! sink connector's are its consumer group's committed offsets (see [`sink`]).

pub(super) mod sink;

use medconnect_api::ConnectorKind;
use serde_json::{Map, Value};

use super::{Herder, HerderError, Result};
use crate::store::{ConnectorEntry, TargetState};

/// Offsets to set (`Some`) or delete (`None`), by partition, as `PATCH .../offsets` gives them.
pub type OffsetChanges = Vec<(Map<String, Value>, Option<Map<String, Value>>)>;

impl Herder {
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
                    .map(|(p, o)| (Value::Object(p.into_map()), Value::Object(o)))
                    .collect())
            }
            ConnectorKind::Sink => sink::read(&self.kafka, name, &entry.config)
                .await
                .map_err(HerderError::Internal),
        }
    }

    /// Alters offsets; `None` deletes a partition's offset. The connector must be STOPPED.
    pub async fn alter_offsets(&self, name: &str, offsets: OffsetChanges) -> Result<()> {
        let _guard = self.operations.lock().await;
        let entry = self.require_stopped(name)?;
        match self.plugin_for(&entry.config)?.kind() {
            ConnectorKind::Source => Ok(self
                .offsets
                .write(name, offsets.into_iter().map(|(p, o)| (p.into(), o)))
                .await?),
            ConnectorKind::Sink => sink::alter(&self.kafka, name, &offsets)
                .await
                .map_err(HerderError::BadRequest),
        }
    }

    pub async fn reset_offsets(&self, name: &str) -> Result<()> {
        let _guard = self.operations.lock().await;
        let entry = self.require_stopped(name)?;
        match self.plugin_for(&entry.config)?.kind() {
            ConnectorKind::Source => Ok(self.offsets.reset(name).await?),
            ConnectorKind::Sink => sink::reset(&self.kafka, name, &entry.config)
                .await
                .map_err(HerderError::Internal),
        }
    }
}
