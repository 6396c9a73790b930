//! From a sink record to a `_bulk` item: its operation, index, deterministic id and source,
//! and the NDJSON lines that carry it.

use bytes::Bytes;
use medconnect_api::{ConnectError, SinkRecord, TopicPartition};
use serde::de::IgnoredAny;
use serde_json::json;

use crate::config::{MalformedDocuments, NullValues, SinkConfig, WriteMethod};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Writes the document, replacing one of the same id.
    Index,
    /// Writes the document unless one of the same id exists (then: already written).
    Create,
    /// Merges the source into the document of the same id, creating it if missing.
    Upsert,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Index => "index",
            Self::Create => "create",
            Self::Upsert => "update",
            Self::Delete => "delete",
        }
    }
}

/// One `_bulk` item, with the record it came from (for the dead-letter topic).
#[derive(Debug, Clone)]
pub struct Document {
    pub record: SinkRecord,
    /// The record's topic partition, kept to mark it acknowledged.
    pub partition: TopicPartition,
    pub operation: Operation,
    pub index: String,
    pub id: String,
    /// The JSON object on one line; `None` for a delete.
    pub source: Option<Bytes>,
}

/// What a record becomes.
#[derive(Debug)]
pub enum Prepared {
    Write(Box<Document>),
    /// Nothing to write (a tombstone or malformed value the settings say to ignore).
    Skip {
        reason: &'static str,
    },
    /// Reported as errant: the dead-letter topic or task failure, per `errors.tolerance`.
    Errant(ConnectError),
}

/// The document id: the record key (UTF-8), or its Kafka position when `key.ignore=true`.
fn document_id(record: &SinkRecord, key_ignore: bool) -> Result<String, ConnectError> {
    if key_ignore {
        return Ok(format!(
            "{}+{}+{}",
            record.record.topic, record.kafka_partition, record.kafka_offset
        ));
    }
    match record.record.key.as_deref() {
        None | Some(b"") => Err(ConnectError::data(
            "the record has no key to use as document id (key.ignore=false)",
        )),
        Some(key) => std::str::from_utf8(key)
            .map(str::to_string)
            .map_err(|_| ConnectError::data("the record key is not UTF-8 text")),
    }
}

/// The value as a one-line JSON object, or why it is not one. NDJSON takes one document per
/// line; a raw line break can only be whitespace between JSON tokens, so it becomes a space.
fn one_line_object(value: &Bytes) -> Result<Bytes, &'static str> {
    let first = value.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err("the record value is not a JSON object");
    }
    serde_json::from_slice::<IgnoredAny>(value)
        .map_err(|_| "the record value is not valid JSON")?;
    if value.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        let flat: Vec<u8> = value
            .iter()
            .map(|b| if matches!(b, b'\n' | b'\r') { b' ' } else { *b })
            .collect();
        return Ok(Bytes::from(flat));
    }
    Ok(value.clone())
}

/// The source with `@timestamp` (the record's timestamp) first, unless it has one: what a
/// data stream needs of every document.
fn with_timestamp(source: Bytes, timestamp_ms: Option<i64>) -> Result<Bytes, &'static str> {
    let fields: std::collections::BTreeMap<String, IgnoredAny> =
        serde_json::from_slice(&source).map_err(|_| "the record value is not a JSON object")?;
    if fields.contains_key("@timestamp") {
        return Ok(source);
    }
    let timestamp = timestamp_ms
        .ok_or("the record has no timestamp for @timestamp (data.stream.type is set)")?;
    let start = source
        .iter()
        .position(|b| *b == b'{')
        .ok_or("the record value is not a JSON object")?;
    let mut out = Vec::with_capacity(source.len() + 40);
    out.extend_from_slice(b"{\"@timestamp\":\"");
    out.extend_from_slice(crate::index::rfc3339_millis(timestamp).as_bytes());
    out.push(b'"');
    if !fields.is_empty() {
        out.push(b',');
    }
    out.extend_from_slice(&source[start + 1..]);
    Ok(Bytes::from(out))
}

pub fn prepare(record: &SinkRecord, config: &SinkConfig) -> Prepared {
    let id = match document_id(record, config.key_ignore) {
        Ok(id) => id,
        Err(error) => return Prepared::Errant(error),
    };
    let index = match &config.data_stream {
        Some(stream) => stream.name(&record.record.topic),
        None => config
            .index
            .resolve(&record.record.topic, record.record.timestamp),
    };
    let (operation, source) = match &record.record.value {
        None => match config.null_values {
            NullValues::Ignore => {
                return Prepared::Skip {
                    reason: "null value",
                };
            }
            NullValues::Fail => {
                return Prepared::Errant(ConnectError::data(
                    "the record value is null (behavior.on.null.values=fail)",
                ));
            }
            NullValues::Delete => (Operation::Delete, None),
        },
        Some(value) => match one_line_object(value).and_then(|source| {
            if config.data_stream.is_some() {
                with_timestamp(source, record.record.timestamp)
            } else {
                Ok(source)
            }
        }) {
            Ok(source) => {
                let operation = match (config.write_method, config.key_ignore) {
                    (WriteMethod::Upsert, _) => Operation::Upsert,
                    // A position id names one record: a document there is this record.
                    (WriteMethod::Insert, true) => Operation::Create,
                    (WriteMethod::Insert, false) => Operation::Index,
                };
                (operation, Some(source))
            }
            Err(reason) => {
                return match config.malformed {
                    MalformedDocuments::Fail => Prepared::Errant(ConnectError::data(reason)),
                    MalformedDocuments::Warn | MalformedDocuments::Ignore => {
                        Prepared::Skip { reason }
                    }
                };
            }
        },
    };
    Prepared::Write(Box::new(Document {
        partition: TopicPartition::new(record.record.topic.clone(), record.kafka_partition),
        record: record.clone(),
        operation,
        index,
        id,
        source,
    }))
}

impl Document {
    /// Appends this item's NDJSON lines to a `_bulk` body.
    pub fn encode(&self, body: &mut Vec<u8>) {
        let meta = match self.operation {
            // Two writers of one key upserting at once retry inside the cluster.
            Operation::Upsert => json!({ "update": {
                "_index": self.index, "_id": self.id, "retry_on_conflict": 3
            }}),
            operation => {
                let mut meta = serde_json::Map::new();
                meta.insert(
                    operation.as_str().to_string(),
                    json!({ "_index": self.index, "_id": self.id }),
                );
                serde_json::Value::Object(meta)
            }
        };
        // Serialising a `Value` into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *body, &meta);
        body.push(b'\n');
        if let Some(source) = &self.source {
            if self.operation == Operation::Upsert {
                body.extend_from_slice(b"{\"doc\":");
                body.extend_from_slice(source);
                body.extend_from_slice(b",\"doc_as_upsert\":true}");
            } else {
                body.extend_from_slice(source);
            }
            body.push(b'\n');
        }
    }

    /// The bytes this item adds to a `_bulk` body, near enough to bound a request's size.
    pub fn encoded_len(&self) -> usize {
        64 + self.index.len() + self.id.len() + self.source.as_ref().map_or(0, |s| s.len() + 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medconnect_api::{Props, Record};

    fn config(pairs: &[(&str, &str)]) -> SinkConfig {
        let mut props: Props = [("connection.url".to_string(), "http://es:9200".to_string())]
            .into_iter()
            .collect();
        props.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        SinkConfig::parse(&props).expect("valid config")
    }

    fn record(key: Option<&str>, value: Option<&str>) -> SinkRecord {
        let mut record = Record::new("vitals").with_timestamp(1_704_164_645_000);
        record.key = key.map(|k| Bytes::from(k.to_string()));
        record.value = value.map(|v| Bytes::from(v.to_string()));
        SinkRecord {
            record,
            kafka_partition: 2,
            kafka_offset: 41,
        }
    }

    fn encoded(prepared: Prepared) -> String {
        let Prepared::Write(document) = prepared else {
            panic!("expected a document, got {prepared:?}");
        };
        let mut body = Vec::new();
        document.encode(&mut body);
        String::from_utf8(body).expect("UTF-8")
    }

    #[test]
    fn data_streams_get_creates_with_a_timestamp_from_the_record() {
        let stream = config(&[("key.ignore", "true"), ("data.stream.type", "logs")]);
        assert_eq!(
            encoded(prepare(&record(None, Some("{\"hr\":80}")), &stream)),
            "{\"create\":{\"_id\":\"vitals+2+41\",\"_index\":\"logs-vitals-default\"}}\n{\"@timestamp\":\"2024-01-02T03:04:05.000Z\",\"hr\":80}\n"
        );
        // An empty object, and one with its own @timestamp (kept).
        assert_eq!(
            encoded(prepare(&record(None, Some(" { } ")), &stream)),
            "{\"create\":{\"_id\":\"vitals+2+41\",\"_index\":\"logs-vitals-default\"}}\n{\"@timestamp\":\"2024-01-02T03:04:05.000Z\" } \n"
        );
        assert_eq!(
            encoded(prepare(
                &record(
                    None,
                    Some("{\"@timestamp\":\"2020-01-01T00:00:00Z\",\"hr\":1}")
                ),
                &stream
            )),
            "{\"create\":{\"_id\":\"vitals+2+41\",\"_index\":\"logs-vitals-default\"}}\n{\"@timestamp\":\"2020-01-01T00:00:00Z\",\"hr\":1}\n"
        );
        let mut untimed = record(None, Some("{\"hr\":80}"));
        untimed.record.timestamp = None;
        assert!(matches!(prepare(&untimed, &stream), Prepared::Errant(_)));
        let metrics = config(&[
            ("key.ignore", "true"),
            ("data.stream.type", "metrics"),
            ("data.stream.dataset", "vitals"),
            ("data.stream.namespace", "icu"),
        ]);
        assert!(
            encoded(prepare(&record(None, Some("{}")), &metrics)).starts_with(
                "{\"create\":{\"_id\":\"vitals+2+41\",\"_index\":\"metrics-vitals-icu\"}}\n"
            )
        );
    }

    #[test]
    fn position_ids_create_and_key_ids_index() {
        let by_position = config(&[("key.ignore", "true"), ("index", "v-${yyyy.MM.dd}")]);
        assert_eq!(
            encoded(prepare(&record(None, Some("{\"hr\":\n 80}")), &by_position)),
            "{\"create\":{\"_id\":\"vitals+2+41\",\"_index\":\"v-2024.01.02\"}}\n{\"hr\":  80}\n"
        );
        let by_key = config(&[]);
        assert_eq!(
            encoded(prepare(&record(Some("p1"), Some("{}")), &by_key)),
            "{\"index\":{\"_id\":\"p1\",\"_index\":\"vitals\"}}\n{}\n"
        );
        let upsert = config(&[("write.method", "upsert")]);
        assert_eq!(
            encoded(prepare(&record(Some("p1"), Some("{\"a\":1}")), &upsert)),
            "{\"update\":{\"_id\":\"p1\",\"_index\":\"vitals\",\"retry_on_conflict\":3}}\n{\"doc\":{\"a\":1},\"doc_as_upsert\":true}\n"
        );
    }

    #[test]
    fn tombstones_follow_behavior_on_null_values() {
        let delete = config(&[("behavior.on.null.values", "delete")]);
        assert_eq!(
            encoded(prepare(&record(Some("p1"), None), &delete)),
            "{\"delete\":{\"_id\":\"p1\",\"_index\":\"vitals\"}}\n"
        );
        let ignore = config(&[("behavior.on.null.values", "ignore")]);
        assert!(matches!(
            prepare(&record(Some("p1"), None), &ignore),
            Prepared::Skip { .. }
        ));
        let fail = config(&[]);
        assert!(matches!(
            prepare(&record(Some("p1"), None), &fail),
            Prepared::Errant(_)
        ));
    }

    #[test]
    fn values_that_are_not_json_objects_are_malformed() {
        let fail = config(&[]);
        for bad in ["[1]", "42", "{\"a\":", "not json"] {
            let prepared = prepare(&record(Some("k"), Some(bad)), &fail);
            assert!(
                matches!(prepared, Prepared::Errant(ref e) if e.is_record_error()),
                "{bad}"
            );
        }
        let ignore = config(&[("behavior.on.malformed.documents", "ignore")]);
        assert!(matches!(
            prepare(&record(Some("k"), Some("[1]")), &ignore),
            Prepared::Skip { .. }
        ));
        // A missing key cannot name a document, whatever the settings.
        assert!(matches!(
            prepare(&record(None, Some("{}")), &ignore),
            Prepared::Errant(_)
        ));
    }
}
