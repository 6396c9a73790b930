//! HeaderFrom: copies or moves fields of a JSON key or value into headers, so routing and
//! filtering (`HasHeaderKey`) can see them without parsing the payload. Connect's names
//! (`HeaderFrom$Value`, `HeaderFrom$Key`) and settings: `fields`, `headers` (the same count,
//! pairwise), `operation` (`copy` | `move`).
//!
//! Header values are bytes: a string field becomes its raw text, any other value its JSON text,
//! a `null` or missing field a null header, as Connect does. Headers are appended, as in Connect.

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, Props, Record, Transform,
    Validator,
};

use super::TransformPlugin;
use super::json::{JsonPart, list, non_empty_list, raw_bytes};

fn config_def() -> ConfigDef {
    ConfigDef::new()
        .define_required(
            "fields",
            ConfigType::List,
            Importance::High,
            "Fields whose values are copied or moved to headers.",
        )
        .with_validator(non_empty_list())
        .define_required(
            "headers",
            ConfigType::List,
            Importance::High,
            "Header names, in the order of `fields`.",
        )
        .with_validator(non_empty_list())
        .define_required(
            "operation",
            ConfigType::String,
            Importance::High,
            "`move` removes the fields from the record; `copy` keeps them.",
        )
        .with_validator(Validator::OneOf(vec!["move", "copy"]))
}

pub fn value_plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.HeaderFrom$Value",
        aliases: &["HeaderFrom$Value", "HeaderFrom"],
        config_def,
        create: |props| {
            HeaderFrom::new(props, JsonPart::Value).map(|t| Box::new(t) as Box<dyn Transform>)
        },
    }
}

pub fn key_plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.HeaderFrom$Key",
        aliases: &["HeaderFrom$Key"],
        config_def,
        create: |props| {
            HeaderFrom::new(props, JsonPart::Key).map(|t| Box::new(t) as Box<dyn Transform>)
        },
    }
}

#[derive(Debug)]
struct HeaderFrom {
    part: JsonPart,
    /// (field, header) pairs.
    pairs: Vec<(String, String)>,
    remove: bool,
}

impl HeaderFrom {
    fn new(props: &Props, part: JsonPart) -> ConnectResult<Self> {
        let fields = list(props, "fields");
        let headers = list(props, "headers");
        if fields.is_empty() {
            return Err(ConnectError::config(
                "fields",
                "must name at least one field",
            ));
        }
        if headers.len() != fields.len() {
            return Err(ConnectError::config(
                "headers",
                format!(
                    "'fields' has {} elements and 'headers' {}: they must pair up",
                    fields.len(),
                    headers.len()
                ),
            ));
        }
        let remove = match props.get("operation").map(String::as_str) {
            Some("move") => true,
            Some("copy") => false,
            _ => {
                return Err(ConnectError::config(
                    "operation",
                    "must be one of move, copy",
                ));
            }
        };
        Ok(Self {
            part,
            pairs: fields.into_iter().zip(headers).collect(),
            remove,
        })
    }
}

impl Transform for HeaderFrom {
    fn apply(&mut self, mut record: Record) -> ConnectResult<Option<Record>> {
        let mut object = self.part.object(&record)?;
        for (field, header) in &self.pairs {
            let value = if self.remove {
                object.remove(field)
            } else {
                object.get(field).cloned()
            };
            match value.as_ref().and_then(raw_bytes) {
                Some(bytes) => record.headers.add(header.clone(), bytes),
                None => record.headers.add_null(header.clone()),
            }
        }
        if self.remove {
            self.part.set_object(&mut record, object);
        }
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::json::{build, config_field};
    use serde_json::{Value, json};

    /// A header as a consumer reads it.
    fn header(record: &Record, name: &str) -> Option<String> {
        record.headers.last_str(name).map(str::to_string)
    }

    fn obs() -> Record {
        Record::new("obs")
            .with_key(r#"{"mrn":"M1"}"#)
            .with_value(r#"{"site":"ICU","device":{"id":7},"hr":72,"bed":null}"#)
    }

    #[test]
    fn copies_fields_to_headers_strings_raw_others_as_json() {
        let mut t = build(
            &value_plugin(),
            &[
                ("fields", "site,device,hr,bed,absent"),
                ("headers", "s,d,h,b,a"),
                ("operation", "copy"),
            ],
        )
        .unwrap();
        let out = t.apply(obs()).unwrap().unwrap();
        assert_eq!(header(&out, "s").as_deref(), Some("ICU"));
        assert_eq!(header(&out, "d").as_deref(), Some(r#"{"id":7}"#));
        assert_eq!(header(&out, "h").as_deref(), Some("72"));
        assert!(
            out.headers.contains("b") && out.headers.last("b").is_none(),
            "null gives a null header"
        );
        assert!(out.headers.contains("a") && out.headers.last("a").is_none());
        assert_eq!(out.value, obs().value, "copy leaves the value");
    }

    #[test]
    fn move_removes_the_fields() {
        let mut t = build(
            &value_plugin(),
            &[
                ("fields", "site"),
                ("headers", "ward"),
                ("operation", "move"),
            ],
        )
        .unwrap();
        let out = t.apply(obs()).unwrap().unwrap();
        assert_eq!(header(&out, "ward").as_deref(), Some("ICU"));
        let value: Value = serde_json::from_slice(out.value.as_ref().unwrap()).unwrap();
        assert_eq!(value, json!({"device": {"id": 7}, "hr": 72, "bed": null}));
    }

    #[test]
    fn the_key_variant_reads_the_key() {
        let mut t = build(
            &key_plugin(),
            &[
                ("fields", "mrn"),
                ("headers", "patient"),
                ("operation", "move"),
            ],
        )
        .unwrap();
        let out = t.apply(obs()).unwrap().unwrap();
        assert_eq!(header(&out, "patient").as_deref(), Some("M1"));
        assert_eq!(out.key.as_deref(), Some(b"{}".as_slice()));
        assert_eq!(out.value, obs().value);
    }

    #[test]
    fn a_non_json_record_is_a_data_error() {
        let mut t = build(
            &value_plugin(),
            &[("fields", "a"), ("headers", "a"), ("operation", "copy")],
        )
        .unwrap();
        assert!(
            t.apply(Record::new("t").with_value("PID|1"))
                .unwrap_err()
                .is_record_error()
        );
        assert!(
            t.apply(Record::new("t")).unwrap_err().is_record_error(),
            "a tombstone has no fields"
        );
    }

    #[test]
    fn config_errors_name_the_setting() {
        assert_eq!(
            config_field(build(
                &value_plugin(),
                &[("headers", "a"), ("operation", "copy")]
            )),
            "fields"
        );
        assert_eq!(
            config_field(build(
                &value_plugin(),
                &[("fields", "a"), ("operation", "copy")]
            )),
            "headers"
        );
        assert_eq!(
            config_field(build(
                &value_plugin(),
                &[("fields", "a,b"), ("headers", "a"), ("operation", "copy")]
            )),
            "headers"
        );
        assert_eq!(
            config_field(build(
                &value_plugin(),
                &[("fields", "a"), ("headers", "a"), ("operation", "cut")]
            )),
            "operation"
        );
        assert_eq!(
            config_field(build(&value_plugin(), &[("fields", "a"), ("headers", "a")])),
            "operation"
        );
    }
}
