//! ValueToKey: replaces the key with a JSON object of fields copied from the JSON value, so
//! records of one patient share a key (and a partition, and a compacted entry). Connect's name
//! and setting: `ValueToKey`, `fields`. A field the value lacks becomes `null` in the key, as in
//! Connect's schemaless mode.

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, Props, Record, Transform,
};
use serde_json::{Map, Value};

use super::TransformPlugin;
use super::json::{JsonPart, list, non_empty_list};

fn config_def() -> ConfigDef {
    ConfigDef::new()
        .define_required(
            "fields",
            ConfigType::List,
            Importance::High,
            "Fields of the value that make up the new key.",
        )
        .with_validator(non_empty_list())
}

pub fn plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.ValueToKey",
        aliases: &["ValueToKey"],
        config_def,
        create: |props| ValueToKey::new(props).map(|t| Box::new(t) as Box<dyn Transform>),
    }
}

#[derive(Debug)]
struct ValueToKey {
    fields: Vec<String>,
}

impl ValueToKey {
    fn new(props: &Props) -> ConnectResult<Self> {
        let fields = list(props, "fields");
        if fields.is_empty() {
            return Err(ConnectError::config(
                "fields",
                "must name at least one field",
            ));
        }
        Ok(Self { fields })
    }
}

impl Transform for ValueToKey {
    fn apply(&mut self, mut record: Record) -> ConnectResult<Option<Record>> {
        // A tombstone has no value to take the key from: a data error, as in Connect.
        let value = JsonPart::Value.object(&record)?;
        let key: Map<String, Value> = self
            .fields
            .iter()
            .map(|f| (f.clone(), value.get(f).cloned().unwrap_or(Value::Null)))
            .collect();
        JsonPart::Key.set_object(&mut record, key);
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::json::{build, config_field};
    use serde_json::json;

    #[test]
    fn the_key_becomes_the_named_fields_of_the_value() {
        let mut t = build(&plugin(), &[("fields", "mrn, site")]).unwrap();
        let record = Record::new("vitals")
            .with_key("old")
            .with_value(r#"{"mrn":"M1","site":"ICU","hr":72}"#);
        let out = t.apply(record.clone()).unwrap().unwrap();
        let key: Value = serde_json::from_slice(out.key.as_ref().unwrap()).unwrap();
        assert_eq!(key, json!({"mrn": "M1", "site": "ICU"}));
        assert_eq!(out.value, record.value, "the value is untouched");
    }

    #[test]
    fn a_missing_field_is_null_in_the_key() {
        let mut t = build(&plugin(), &[("fields", "mrn,bed")]).unwrap();
        let out = t
            .apply(Record::new("t").with_value(r#"{"mrn":"M1"}"#))
            .unwrap()
            .unwrap();
        assert_eq!(
            out.key.as_deref(),
            Some(br#"{"bed":null,"mrn":"M1"}"#.as_slice())
        );
    }

    #[test]
    fn a_non_json_or_missing_value_is_a_data_error() {
        let mut t = build(&plugin(), &[("fields", "mrn")]).unwrap();
        assert!(
            t.apply(Record::new("t").with_value("OBX|1"))
                .unwrap_err()
                .is_record_error()
        );
        assert!(
            t.apply(Record::new("t").with_key("k"))
                .unwrap_err()
                .is_record_error()
        );
    }

    #[test]
    fn fields_are_required() {
        assert_eq!(config_field(build(&plugin(), &[])), "fields");
        assert_eq!(config_field(build(&plugin(), &[("fields", "")])), "fields");
    }
}
