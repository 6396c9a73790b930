//! route-by-type: sends each record to a topic named after its message type.
//!
//! Settings (`transforms.<alias>.config.*`):
//! - `topic.format`: the new topic; `${topic}` is the current topic, `${type}` the type
//!   (default `${topic}.${type}`).
//! - `json.field`: for JSON values, the field holding the type (default `resourceType`, as in
//!   FHIR); dotted paths allowed.
//!
//! HL7 v2 values take their type from MSH-9 (`ADT^A01` becomes `ADT_A01`). A record without a
//! type keeps its topic. Types are reduced to characters Kafka allows in topic names.

use medconnect_guest::hl7::Message;
use medconnect_guest::json;
use medconnect_guest::{export_transform, Config, Error, Record, Transform};

struct RouteByType {
    format: String,
    json_field: String,
}

/// Kafka topic names allow `[a-zA-Z0-9._-]`; everything else becomes `_`.
fn topic_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
        .collect()
}

impl RouteByType {
    fn message_type(&self, record: &Record) -> Result<Option<String>, Error> {
        let text = match record.value_str() {
            Some(text) => text,
            None => return Ok(None),
        };
        if record.is_hl7() {
            let message = Message::parse(text)?;
            return Ok(message.get("MSH", 9).filter(|t| !t.is_empty()).map(topic_safe));
        }
        let value = match json::parse(text) {
            Ok(value) => value,
            Err(_) => return Ok(None),
        };
        Ok(value
            .pointer(&self.json_field)
            .and_then(|v| v.as_str())
            .filter(|t| !t.is_empty())
            .map(topic_safe))
    }
}

impl Transform for RouteByType {
    fn configure(config: &Config) -> Result<Self, Error> {
        let format = config
            .get("topic.format")
            .cloned()
            .unwrap_or_else(|| "${topic}.${type}".to_string());
        if !format.contains("${type}") {
            return Err(Error::new("topic.format must contain ${type}"));
        }
        Ok(RouteByType {
            format,
            json_field: config.get("json.field").cloned().unwrap_or_else(|| "resourceType".to_string()),
        })
    }

    fn transform(&mut self, mut record: Record) -> Result<Option<Record>, Error> {
        if let Some(kind) = self.message_type(&record)? {
            record.topic = self.format.replace("${topic}", &record.topic).replace("${type}", &kind);
            // The partition was chosen for the old topic; the new one may have fewer.
            record.partition = None;
        }
        Ok(Some(record))
    }
}

export_transform!(configured RouteByType);
