//! MaskField: replaces the values of named fields of a JSON key or value, the usual way to keep
//! PHI (names, SSNs, addresses) out of a topic. Connect's names (`MaskField$Value`,
//! `MaskField$Key`) and settings: `fields`, `replacement`, `field.syntax.version`.
//!
//! Without `replacement` a value becomes its type's empty value, as in Connect: `""`, `0`,
//! `false`, `[]`, `{}`. With `replacement`, strings become it and numbers become it parsed as a
//! number; other types cannot take a replacement and fail the record, as in Connect, rather
//! than pass unmasked. `null` stays `null`.

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, Props, Record, Transform,
};
use serde_json::Value;

use super::TransformPlugin;
use super::json::{
    FIELD_SYNTAX, FIELD_SYNTAX_DOC, FieldSyntax, JsonPart, get_path_mut, list, non_empty_list,
};

fn config_def() -> ConfigDef {
    ConfigDef::new()
        .define_required(
            "fields",
            ConfigType::List,
            Importance::High,
            "Names of the fields to mask.",
        )
        .with_validator(non_empty_list())
        .define(
            "replacement",
            ConfigType::String,
            "",
            Importance::Low,
            "Value masked strings and numbers get instead of their type's empty value.",
        )
        .define(
            FIELD_SYNTAX,
            ConfigType::String,
            "V1",
            Importance::Low,
            FIELD_SYNTAX_DOC,
        )
        .with_validator(FieldSyntax::validator())
}

pub fn value_plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.MaskField$Value",
        aliases: &["MaskField$Value", "MaskField"],
        config_def,
        create: |props| {
            MaskField::new(props, JsonPart::Value).map(|t| Box::new(t) as Box<dyn Transform>)
        },
    }
}

pub fn key_plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.MaskField$Key",
        aliases: &["MaskField$Key"],
        config_def,
        create: |props| {
            MaskField::new(props, JsonPart::Key).map(|t| Box::new(t) as Box<dyn Transform>)
        },
    }
}

#[derive(Debug)]
struct MaskField {
    part: JsonPart,
    paths: Vec<Vec<String>>,
    replacement: Option<String>,
}

impl MaskField {
    fn new(props: &Props, part: JsonPart) -> ConnectResult<Self> {
        let syntax = FieldSyntax::parse(props.get(FIELD_SYNTAX).map_or("V1", String::as_str))
            .map_err(|reason| ConnectError::config(FIELD_SYNTAX, reason))?;
        let fields = list(props, "fields");
        if fields.is_empty() {
            return Err(ConnectError::config(
                "fields",
                "must name at least one field to mask",
            ));
        }
        let paths = fields
            .iter()
            .map(|f| {
                syntax
                    .path(f)
                    .map_err(|reason| ConnectError::config("fields", reason))
            })
            .collect::<ConnectResult<_>>()?;
        Ok(Self {
            part,
            paths,
            replacement: props.get("replacement").filter(|r| !r.is_empty()).cloned(),
        })
    }

    fn masked(&self, value: &Value) -> ConnectResult<Value> {
        // The errors name the type only: the value itself may be PHI.
        Ok(match (value, &self.replacement) {
            (Value::Null, _) => Value::Null,
            (Value::String(_), None) => Value::String(String::new()),
            (Value::Number(n), None) if n.is_f64() => Value::from(0.0),
            (Value::Number(_), None) => Value::from(0),
            (Value::Bool(_), None) => Value::Bool(false),
            (Value::Array(_), None) => Value::Array(Vec::new()),
            (Value::Object(_), None) => Value::Object(serde_json::Map::new()),
            (Value::String(_), Some(r)) => Value::String(r.clone()),
            (Value::Number(n), Some(r)) => {
                let parsed = if n.is_f64() {
                    r.trim()
                        .parse::<f64>()
                        .ok()
                        .and_then(serde_json::Number::from_f64)
                } else {
                    r.trim().parse::<i64>().ok().map(serde_json::Number::from)
                };
                Value::Number(parsed.ok_or_else(|| {
                    ConnectError::data(format!(
                        "cannot mask a number with replacement '{r}': not a number of that kind"
                    ))
                })?)
            }
            (Value::Bool(_), Some(_)) => {
                return Err(ConnectError::data(
                    "cannot mask a boolean with a custom replacement",
                ));
            }
            (Value::Array(_) | Value::Object(_), Some(_)) => {
                return Err(ConnectError::data(
                    "cannot mask an array or object with a custom replacement",
                ));
            }
        })
    }
}

impl Transform for MaskField {
    fn apply(&mut self, mut record: Record) -> ConnectResult<Option<Record>> {
        // A tombstone holds nothing to mask and must stay a tombstone.
        if self.part.bytes(&record).is_none() {
            return Ok(Some(record));
        }
        let mut object = self.part.object(&record)?;
        for path in &self.paths {
            // A field the record does not have is nothing to hide; it is not added.
            if let Some(value) = get_path_mut(&mut object, path) {
                *value = self.masked(value)?;
            }
        }
        self.part.set_object(&mut record, object);
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::json::{build, config_field};
    use serde_json::json;

    fn patient() -> Record {
        Record::new("patients").with_value(
            r#"{"mrn":"M1","name":"Jane Doe","age":54,"temp":37.2,"deceased":true,"aliases":["JD"],"address":{"city":"Lyon","zip":"69001"},"note":null}"#,
        )
    }

    fn value_of(record: &Record) -> Value {
        serde_json::from_slice(record.value.as_ref().unwrap()).unwrap()
    }

    #[test]
    fn masks_each_type_to_its_empty_value() {
        let mut t = build(
            &value_plugin(),
            &[(
                "fields",
                "name,age,temp,deceased,aliases,address,note,absent",
            )],
        )
        .unwrap();
        let out = value_of(&t.apply(patient()).unwrap().unwrap());
        assert_eq!(
            out,
            json!({"mrn":"M1","name":"","age":0,"temp":0.0,"deceased":false,"aliases":[],"address":{},"note":null}),
            "absent fields are not added"
        );
    }

    #[test]
    fn a_replacement_applies_to_strings_and_numbers() {
        let mut t = build(
            &value_plugin(),
            &[("fields", "name,age"), ("replacement", "0")],
        )
        .unwrap();
        let out = value_of(&t.apply(patient()).unwrap().unwrap());
        assert_eq!(
            (out["name"].clone(), out["age"].clone()),
            (json!("0"), json!(0))
        );

        let mut t = build(
            &value_plugin(),
            &[("fields", "name"), ("replacement", "***")],
        )
        .unwrap();
        assert_eq!(
            value_of(&t.apply(patient()).unwrap().unwrap())["name"],
            "***"
        );
    }

    #[test]
    fn a_replacement_a_field_cannot_take_fails_the_record_without_quoting_it() {
        let mut t = build(
            &value_plugin(),
            &[("fields", "age"), ("replacement", "***")],
        )
        .unwrap();
        let error = t.apply(patient()).unwrap_err();
        assert!(error.is_record_error());
        assert!(!error.to_string().contains("54"));
        let mut t = build(
            &value_plugin(),
            &[("fields", "deceased"), ("replacement", "x")],
        )
        .unwrap();
        assert!(t.apply(patient()).unwrap_err().is_record_error());
    }

    #[test]
    fn v2_paths_mask_nested_fields() {
        let mut t = build(
            &value_plugin(),
            &[
                ("fields", "address.zip,name"),
                ("field.syntax.version", "V2"),
            ],
        )
        .unwrap();
        let out = value_of(&t.apply(patient()).unwrap().unwrap());
        assert_eq!(out["address"], json!({"city": "Lyon", "zip": ""}));
        assert_eq!(out["name"], "");
        // Without V2 the dotted name is a top-level name, absent here.
        let mut t = build(&value_plugin(), &[("fields", "address.zip")]).unwrap();
        assert_eq!(
            value_of(&t.apply(patient()).unwrap().unwrap())["address"]["zip"],
            "69001"
        );
    }

    #[test]
    fn the_key_variant_masks_the_key() {
        let mut t = build(&key_plugin(), &[("fields", "ssn")]).unwrap();
        let out = t
            .apply(patient().with_key(r#"{"ssn":"123-45-6789","mrn":"M1"}"#))
            .unwrap()
            .unwrap();
        assert_eq!(
            out.key.as_deref(),
            Some(br#"{"mrn":"M1","ssn":""}"#.as_slice())
        );
        assert_eq!(out.value, patient().value);
    }

    #[test]
    fn a_non_json_record_is_a_data_error_and_a_tombstone_passes() {
        let mut t = build(&value_plugin(), &[("fields", "name")]).unwrap();
        assert!(
            t.apply(Record::new("t").with_value("MSH|^~\\&|"))
                .unwrap_err()
                .is_record_error()
        );
        assert!(
            t.apply(Record::new("t").with_value("\"Jane\""))
                .unwrap_err()
                .is_record_error()
        );
        assert_eq!(t.apply(Record::new("t")).unwrap(), Some(Record::new("t")));
    }

    #[test]
    fn config_errors_name_the_setting() {
        assert_eq!(config_field(build(&value_plugin(), &[])), "fields");
        assert_eq!(
            config_field(build(&value_plugin(), &[("fields", " , ")])),
            "fields"
        );
        assert_eq!(
            config_field(build(
                &value_plugin(),
                &[("fields", "a"), ("field.syntax.version", "V9")]
            )),
            "field.syntax.version"
        );
        assert_eq!(
            config_field(build(
                &value_plugin(),
                &[("fields", "a..b"), ("field.syntax.version", "V2")]
            )),
            "fields"
        );
    }
}
