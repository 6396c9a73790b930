//! A sink record as one entry of a batch/transaction Bundle: the request (method, URL,
//! conditions) per `fhir.write.mode`, the resource, and the target it writes (two entries of
//! one target never share a Bundle, so writes to one resource keep their order).

use medconnect_api::{ConnectError, SinkRecord, TopicPartition};
use serde_json::{Value, json};

use crate::config::{OnTombstone, SinkConfig, WriteMode, resource_type_check};

/// One record ready to be written.
#[derive(Debug, Clone)]
pub struct Entry {
    pub record: SinkRecord,
    pub partition: TopicPartition,
    /// What the entry writes (`Patient/123`, `Observation?identifier=...`).
    pub target: String,
    pub method: &'static str,
    /// The Bundle entry (`request`, and `resource` except for a DELETE).
    pub entry: Value,
    /// 409/412 answers so far.
    pub conflicts: u32,
    /// Sent with `If-Match` (versioned mode): a 412 is checked by reading the resource.
    pub if_match: bool,
}

#[derive(Debug)]
pub enum Prepared {
    Write(Box<Entry>),
    Skip(&'static str),
    Errant(ConnectError),
}

/// A FHIR id: 1 to 64 of `A-Z a-z 0-9 - .`.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A record key `Type/id`.
fn key_reference(record: &SinkRecord) -> Option<(String, String)> {
    let key = std::str::from_utf8(record.record.key.as_deref()?).ok()?;
    let key = key.trim().trim_matches('"');
    let (kind, id) = key.split_once('/')?;
    (resource_type_check(kind).is_ok() && valid_id(id)).then(|| (kind.to_string(), id.to_string()))
}

/// Percent-encodes a search value, leaving what FHIR search syntax needs readable.
fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~:/|".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `identifier=system|value` of the resource (the identifier of `system`, else the first).
fn identifier_query(resource: &Value, system: Option<&str>) -> Result<String, &'static str> {
    let identifiers = resource["identifier"]
        .as_array()
        .ok_or("the resource has no identifier to match on")?;
    let identifier = match system {
        Some(system) => identifiers
            .iter()
            .find(|i| i["system"].as_str() == Some(system))
            .ok_or("the resource has no identifier of fhir.identifier.system")?,
        None => identifiers
            .first()
            .ok_or("the resource has no identifier to match on")?,
    };
    let value = identifier["value"]
        .as_str()
        .filter(|v| !v.is_empty())
        .ok_or("the identifier has no value")?;
    Ok(match identifier["system"].as_str() {
        Some(system) => format!("identifier={}", encode_query(&format!("{system}|{value}"))),
        None => format!("identifier={}", encode_query(value)),
    })
}

fn errant(reason: impl Into<String>) -> Prepared {
    Prepared::Errant(ConnectError::data(reason.into()))
}

pub fn prepare(record: &SinkRecord, config: &SinkConfig) -> Prepared {
    let partition = TopicPartition::new(record.record.topic.clone(), record.kafka_partition);
    let build = |target: String, method: &'static str, entry: Value| {
        Prepared::Write(Box::new(Entry {
            record: record.clone(),
            partition: partition.clone(),
            target,
            method,
            entry,
            conflicts: 0,
            if_match: false,
        }))
    };
    let Some(value) = record.record.value.as_deref() else {
        return match config.on_tombstone {
            OnTombstone::Ignore => Prepared::Skip("tombstone ignored"),
            OnTombstone::Fail => errant("a record with a null value (fhir.on.tombstone=fail)"),
            OnTombstone::Delete => match key_reference(record) {
                Some((kind, id)) => {
                    let target = format!("{kind}/{id}");
                    build(
                        target.clone(),
                        "DELETE",
                        json!({"request": {"method": "DELETE", "url": target}}),
                    )
                }
                None => errant("a tombstone whose key is not Type/id: nothing to delete"),
            },
        };
    };
    let mut resource: Value = match serde_json::from_slice(value) {
        Ok(Value::Object(map)) => Value::Object(map),
        Ok(_) => return errant("the value is not a JSON object"),
        Err(_) => return errant("the value is not JSON"),
    };
    let Some(kind) = resource["resourceType"].as_str().map(str::to_string) else {
        return errant("the value has no resourceType: not a FHIR resource");
    };
    if resource_type_check(&kind).is_err() {
        return errant("the resourceType is not a resource type name");
    }
    match config.write_mode {
        WriteMode::Versioned => {
            let (Some(id), Some(version)) = (
                resource["id"]
                    .as_str()
                    .filter(|id| valid_id(id))
                    .map(str::to_string),
                resource["meta"]["versionId"].as_str().map(str::to_string),
            ) else {
                return errant("versioned writes need the resource's id and meta.versionId");
            };
            let target = format!("{kind}/{id}");
            match build(
                target.clone(),
                "PUT",
                json!({"resource": resource, "request": {"method": "PUT", "url": target, "ifMatch": format!("W/\"{version}\"")}}),
            ) {
                Prepared::Write(mut entry) => {
                    entry.if_match = true;
                    Prepared::Write(entry)
                }
                other => other,
            }
        }
        WriteMode::Upsert => {
            // The key names the target; the resource gets the key's id when it has none. A
            // key that names another resource than the body is the server's to refuse.
            let body_id = resource["id"].as_str().map(str::to_string);
            let (url_kind, id) = match (key_reference(record), body_id) {
                (Some((key_kind, key_id)), body_id) => {
                    if body_id.is_none() {
                        resource["id"] = Value::String(key_id.clone());
                    }
                    (key_kind, key_id)
                }
                (None, Some(id)) if valid_id(&id) => (kind.clone(), id),
                (None, _) => {
                    return errant("upsert needs a key Type/id or a resource with a valid id");
                }
            };
            let target = format!("{url_kind}/{id}");
            build(
                target.clone(),
                "PUT",
                json!({"resource": resource, "request": {"method": "PUT", "url": target}}),
            )
        }
        WriteMode::ConditionalUpdate => {
            match identifier_query(&resource, config.identifier_system.as_deref()) {
                Ok(query) => {
                    let target = format!("{kind}?{query}");
                    build(
                        target.clone(),
                        "PUT",
                        json!({"resource": resource, "request": {"method": "PUT", "url": target}}),
                    )
                }
                Err(reason) => errant(reason),
            }
        }
        WriteMode::ConditionalCreate => {
            match identifier_query(&resource, config.identifier_system.as_deref()) {
                Ok(query) => build(
                    format!("{kind}?{query}"),
                    "POST",
                    json!({"resource": resource, "request": {"method": "POST", "url": kind, "ifNoneExist": query}}),
                ),
                Err(reason) => errant(reason),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medconnect_api::{Record, props_from};

    fn config(pairs: &[(&str, &str)]) -> SinkConfig {
        let mut props = props_from(&[("fhir.url", "http://h:1")]);
        props.extend(props_from(pairs));
        SinkConfig::parse(&props).expect("valid")
    }

    fn record(key: Option<&str>, value: Option<Value>) -> SinkRecord {
        let mut record = Record::new("obs");
        record.key = key.map(|k| k.to_string().into());
        record.value = value.map(|v| v.to_string().into());
        SinkRecord {
            record,
            kafka_partition: 0,
            kafka_offset: 7,
        }
    }

    fn entry(prepared: Prepared) -> Entry {
        match prepared {
            Prepared::Write(entry) => *entry,
            other => panic!("not a write: {other:?}"),
        }
    }

    #[test]
    fn upsert_puts_to_the_key_and_fills_a_missing_id() {
        let e = entry(prepare(
            &record(
                Some("Observation/o1"),
                Some(json!({"resourceType": "Observation"})),
            ),
            &config(&[]),
        ));
        assert_eq!(e.target, "Observation/o1");
        assert_eq!(
            e.entry["request"],
            json!({"method": "PUT", "url": "Observation/o1"})
        );
        assert_eq!(e.entry["resource"]["id"], "o1");
        let e = entry(prepare(
            &record(None, Some(json!({"resourceType": "Patient", "id": "p9"}))),
            &config(&[]),
        ));
        assert_eq!(e.target, "Patient/p9");
        assert!(matches!(
            prepare(
                &record(None, Some(json!({"resourceType": "Patient"}))),
                &config(&[])
            ),
            Prepared::Errant(_)
        ));
        assert!(matches!(
            prepare(&record(None, Some(json!([1]))), &config(&[])),
            Prepared::Errant(_)
        ));
    }

    #[test]
    fn conditional_modes_match_on_the_identifier() {
        let value = json!({"resourceType": "Observation", "identifier": [
            {"system": "urn:a", "value": "1"}, {"system": "urn:lab", "value": "x y"}]});
        let e = entry(prepare(
            &record(None, Some(value.clone())),
            &config(&[
                ("fhir.write.mode", "conditional-update"),
                ("fhir.identifier.system", "urn:lab"),
            ]),
        ));
        assert_eq!(
            e.entry["request"]["url"],
            "Observation?identifier=urn:lab|x%20y"
        );
        let e = entry(prepare(
            &record(None, Some(value)),
            &config(&[("fhir.write.mode", "conditional-create")]),
        ));
        assert_eq!(
            e.entry["request"],
            json!({"method": "POST", "url": "Observation", "ifNoneExist": "identifier=urn:a|1"})
        );
        assert!(matches!(
            prepare(
                &record(None, Some(json!({"resourceType": "Observation"}))),
                &config(&[("fhir.write.mode", "conditional-create")])
            ),
            Prepared::Errant(_)
        ));
    }

    #[test]
    fn versioned_writes_match_the_version() {
        let value = json!({"resourceType": "Patient", "id": "p1", "meta": {"versionId": "3"}});
        let e = entry(prepare(
            &record(None, Some(value)),
            &config(&[("fhir.write.mode", "versioned")]),
        ));
        assert_eq!(
            e.entry["request"],
            json!({"method": "PUT", "url": "Patient/p1", "ifMatch": "W/\"3\""})
        );
        assert!(e.if_match);
        assert!(matches!(
            prepare(
                &record(None, Some(json!({"resourceType": "Patient", "id": "p1"}))),
                &config(&[("fhir.write.mode", "versioned")])
            ),
            Prepared::Errant(_)
        ));
    }

    #[test]
    fn tombstones_delete_ignore_or_fail() {
        let e = entry(prepare(&record(Some("Patient/p1"), None), &config(&[])));
        assert_eq!(
            e.entry,
            json!({"request": {"method": "DELETE", "url": "Patient/p1"}})
        );
        assert!(matches!(
            prepare(&record(Some("p1"), None), &config(&[])),
            Prepared::Errant(_)
        ));
        assert!(matches!(
            prepare(
                &record(Some("Patient/p1"), None),
                &config(&[("fhir.on.tombstone", "ignore")])
            ),
            Prepared::Skip(_)
        ));
        assert!(matches!(
            prepare(
                &record(Some("Patient/p1"), None),
                &config(&[("fhir.on.tombstone", "fail")])
            ),
            Prepared::Errant(_)
        ));
    }
}
