//! The record model: bytes plus metadata, as in Kafka.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::oneshot;

/// Values of the `content-type` header that name a payload's format.
pub mod content_type {
    pub const HEADER: &str = "content-type";
    pub const HL7_V2: &str = "application/hl7-v2";
    pub const FHIR_JSON: &str = "application/fhir+json";
    pub const JSON: &str = "application/json";
    pub const TEXT: &str = "text/plain";
}

/// A header's name. Sources name their headers with constants: a `&'static str` is kept as
/// is, so stamping a record's headers allocates nothing per name (an HL7 record has eleven).
pub type HeaderName = Cow<'static, str>;

/// Kafka record headers: ordered, a name may repeat, a value may be null.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(HeaderName, Option<Bytes>)>);

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a header, keeping any earlier one of the same name (Kafka semantics).
    pub fn add(&mut self, name: impl Into<HeaderName>, value: impl Into<Bytes>) {
        self.0.push((name.into(), Some(value.into())));
    }

    pub fn add_null(&mut self, name: impl Into<HeaderName>) {
        self.0.push((name.into(), None));
    }

    /// Replaces every header of this name with one value.
    pub fn set(&mut self, name: impl Into<HeaderName>, value: impl Into<Bytes>) {
        let name = name.into();
        self.remove(&name);
        self.0.push((name, Some(value.into())));
    }

    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(n, _)| n.as_ref() != name);
    }

    /// The last value of this name, as Kafka clients read it.
    pub fn last(&self, name: &str) -> Option<&Bytes> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| n.as_ref() == name)
            .and_then(|(_, v)| v.as_ref())
    }

    pub fn last_str(&self, name: &str) -> Option<&str> {
        self.last(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n.as_ref() == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&Bytes>)> {
        self.0.iter().map(|(n, v)| (n.as_ref(), v.as_ref()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, Option<Bytes>)> for Headers {
    fn from_iter<T: IntoIterator<Item = (String, Option<Bytes>)>>(iter: T) -> Self {
        Self(iter.into_iter().map(|(n, v)| (n.into(), v)).collect())
    }
}

impl FromIterator<(HeaderName, Option<Bytes>)> for Headers {
    fn from_iter<T: IntoIterator<Item = (HeaderName, Option<Bytes>)>>(iter: T) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// A record as Kafka knows it. Transforms work on this type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: Option<i32>,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Headers,
    /// Milliseconds since the epoch; `None` lets the producer stamp it.
    pub timestamp: Option<i64>,
}

impl Record {
    pub fn new(topic: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            ..Self::default()
        }
    }

    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn with_value(mut self, value: impl Into<Bytes>) -> Self {
        self.value = Some(value.into());
        self
    }

    pub fn with_header(mut self, name: impl Into<HeaderName>, value: impl Into<Bytes>) -> Self {
        self.headers.add(name, value);
        self
    }

    pub fn with_timestamp(mut self, timestamp_ms: i64) -> Self {
        self.timestamp = Some(timestamp_ms);
        self
    }

    pub fn content_type(&self) -> Option<&str> {
        self.headers.last_str(content_type::HEADER)
    }
}

/// Where a source record came from (a file name, a table, a device): a JSON map, as in Connect.
///
/// Shared: a source builds its partition once and gives every record of it a clone, which
/// counts a reference instead of copying the map; the engine compares a record's partition
/// with those of the offsets it holds by address before it compares the maps. Reads go
/// through `Deref` to the map; build one from a map with `From`/`into()` or from pairs with
/// `collect()`.
#[derive(Clone, Default)]
pub struct SourcePartition(Option<Arc<Map<String, Value>>>);

/// What an empty partition reads as: listener records have none, and need no allocation.
static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

impl SourcePartition {
    /// The empty partition (a listener's records have none).
    pub fn new() -> Self {
        Self::default()
    }

    /// The map itself, to change or keep (copied only if it is shared).
    pub fn into_map(self) -> Map<String, Value> {
        self.0.map(Arc::unwrap_or_clone).unwrap_or_default()
    }
}

impl std::ops::Deref for SourcePartition {
    type Target = Map<String, Value>;
    fn deref(&self) -> &Self::Target {
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl From<Map<String, Value>> for SourcePartition {
    fn from(map: Map<String, Value>) -> Self {
        Self((!map.is_empty()).then(|| Arc::new(map)))
    }
}

impl FromIterator<(String, Value)> for SourcePartition {
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(pairs: I) -> Self {
        Map::from_iter(pairs).into()
    }
}

impl PartialEq for SourcePartition {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
            (a, b) => a.is_none() && b.is_none(),
        }
    }
}

impl Eq for SourcePartition {}

impl std::fmt::Debug for SourcePartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl serde::Serialize for SourcePartition {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for SourcePartition {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Map::deserialize(deserializer).map(Self::from)
    }
}

/// How far the source has read within its partition: a JSON map, as in Connect.
pub type SourceOffset = Map<String, Value>;

/// What became of a source record, told to the task that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Kafka acknowledged the record (`acks=all`): it is durable.
    Written {
        topic: String,
        partition: i32,
        offset: i64,
    },
    /// A transform dropped the record on purpose.
    Filtered,
    /// The record was rejected and written to the dead-letter topic with this reason.
    DeadLettered { reason: String },
    /// The record was not written (Kafka unreachable, or the task stopped). The sender must
    /// not be acknowledged; a retransmission will be processed anew.
    Failed { reason: String },
    /// Kafka refused the record itself (too large, invalid for its topic) and there is no
    /// dead-letter topic: sending it again unchanged will not help.
    Rejected { reason: String },
}

impl Delivery {
    pub fn is_durable(&self) -> bool {
        matches!(self, Self::Written { .. })
    }
}

/// Per-record acknowledgement for listener sources (MLLP, MQTT): the engine completes it once
/// the record's fate is known. Dropping it unanswered reads as [`Delivery::Failed`] on the
/// receiving side, so a lost handle can never turn into a positive acknowledgement.
#[derive(Debug)]
pub struct AckHandle(oneshot::Sender<Delivery>);

impl AckHandle {
    /// A handle and the receiver the listener awaits before answering its sender.
    pub fn channel() -> (Self, oneshot::Receiver<Delivery>) {
        let (tx, rx) = oneshot::channel();
        (Self(tx), rx)
    }

    pub fn complete(self, delivery: Delivery) {
        // The listener may have gone (connection closed); nothing is owed to it then.
        let _ = self.0.send(delivery);
    }
}

/// A record produced by a source task.
#[derive(Debug)]
pub struct SourceRecord {
    pub record: Record,
    /// Empty for listener sources, whose position lives with their sender.
    pub source_partition: SourcePartition,
    pub source_offset: SourceOffset,
    /// Set by listener sources that must answer their sender once the record is durable.
    pub ack: Option<AckHandle>,
    /// Input the source could not accept (a malformed message): the engine writes it to the
    /// dead-letter topic, if the connector has one, instead of its topic, and completes the
    /// acknowledgement with `DeadLettered` (or `Rejected` without a dead-letter topic). Rejected
    /// input never fails the task: the source has already told its sender why.
    pub rejected: Option<crate::ConnectError>,
}

impl SourceRecord {
    /// `source_partition`: give every record of a partition a clone of one `SourcePartition`
    /// (a map given here is wrapped for this record alone).
    pub fn new(
        record: Record,
        source_partition: impl Into<SourcePartition>,
        source_offset: SourceOffset,
    ) -> Self {
        Self {
            record,
            source_partition: source_partition.into(),
            source_offset,
            ack: None,
            rejected: None,
        }
    }

    /// A record from a listener source: no stored offset, an acknowledgement instead.
    pub fn acknowledged(record: Record, ack: AckHandle) -> Self {
        Self {
            record,
            source_partition: SourcePartition::new(),
            source_offset: Map::new(),
            ack: Some(ack),
            rejected: None,
        }
    }

    /// Input the source rejects, kept for the dead-letter topic with the reason.
    pub fn rejected(record: Record, reason: crate::ConnectError, ack: Option<AckHandle>) -> Self {
        Self {
            record,
            source_partition: SourcePartition::new(),
            source_offset: Map::new(),
            ack,
            rejected: Some(reason),
        }
    }

    /// Tells the task what became of the record, if it asked to know.
    pub fn complete(&mut self, delivery: Delivery) {
        if let Some(ack) = self.ack.take() {
            ack.complete(delivery);
        }
    }
}

/// A record handed to a sink task, with the Kafka position it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkRecord {
    pub record: Record,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_keep_order_and_read_the_last_value() {
        let mut headers = Headers::new();
        headers.add("a", "1");
        headers.add("a", "2");
        headers.add_null("b");
        assert_eq!(headers.last_str("a"), Some("2"));
        assert_eq!(headers.last("b"), None);
        assert!(headers.contains("b"));
        headers.set("a", "3");
        assert_eq!(headers.iter().filter(|(n, _)| *n == "a").count(), 1);
        assert_eq!(headers.last_str("a"), Some("3"));
    }

    #[test]
    fn partitions_are_shared_and_compared_by_content() {
        let partition = SourcePartition::from_iter([("table".to_string(), "vitals".into())]);
        let shared = partition.clone();
        // A clone is the same map, not a copy.
        assert!(std::ptr::eq(&*partition, &*shared));
        assert_eq!(partition, shared);
        // Built apart, equal by content; different content, different partitions.
        let apart = SourcePartition::from_iter([("table".to_string(), "vitals".into())]);
        assert!(!std::ptr::eq(&*partition, &*apart));
        assert_eq!(partition, apart);
        let other = SourcePartition::from_iter([("table".to_string(), "orders".into())]);
        assert_ne!(partition, other);
        // An empty map is the empty partition.
        assert_eq!(SourcePartition::from(Map::new()), SourcePartition::new());
        assert_ne!(SourcePartition::new(), partition);
        assert!(SourcePartition::new().is_empty());
    }

    #[test]
    fn partitions_are_stored_as_plain_json_maps() -> Result<(), serde_json::Error> {
        // The offsets topic (and Connect's offsets API) keep a partition as a JSON object.
        let partition = SourcePartition::from_iter([("filename".to_string(), "a.jsonl".into())]);
        let text = serde_json::to_string(&partition)?;
        assert_eq!(text, r#"{"filename":"a.jsonl"}"#);
        assert_eq!(serde_json::from_str::<SourcePartition>(&text)?, partition);
        assert_eq!(serde_json::to_string(&SourcePartition::new())?, "{}");
        Ok(())
    }

    #[tokio::test]
    async fn a_dropped_ack_handle_is_never_a_positive_acknowledgement() {
        let (handle, receiver) = AckHandle::channel();
        let mut record = SourceRecord::acknowledged(Record::new("t"), handle);
        drop(record.ack.take());
        assert!(receiver.await.is_err());

        let (handle, receiver) = AckHandle::channel();
        let mut record = SourceRecord::acknowledged(Record::new("t"), handle);
        record.complete(Delivery::Written {
            topic: "t".into(),
            partition: 0,
            offset: 7,
        });
        assert!(receiver.await.is_ok_and(|d| d.is_durable()));
    }
}
