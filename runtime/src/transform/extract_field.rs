//! ExtractField: replaces a JSON key or value with one of its fields. Connect's names
//! (`ExtractField$Value`, `ExtractField$Key`) and settings: `field`, `field.syntax.version`
//! (`V2` reads `a.b` as the field `b` inside `a`).
//!
//! Records are bytes here, so the extracted value is written as bytes: a string as its raw text
//! (what Connect writes with the `StringConverter`, the usual choice for an extracted ID key:
//! `MRN123`, not `"MRN123"`); objects, arrays, numbers and booleans as their JSON text; `null` or
//! a missing field as no bytes (a null key, or a tombstone value), as Connect does. When a value
//! becomes raw text, a `content-type` header that said JSON would lie, so it becomes
//! `text/plain`.

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, Props, Record, Transform,
    Validator, content_type,
};
use serde_json::Value;

use super::TransformPlugin;
use super::json::{FIELD_SYNTAX, FIELD_SYNTAX_DOC, FieldSyntax, JsonPart, get_path, raw_bytes};

fn config_def() -> ConfigDef {
    ConfigDef::new()
        .define_required(
            "field",
            ConfigType::String,
            Importance::Medium,
            "Field to extract.",
        )
        .with_validator(Validator::NonEmpty)
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
        class: "org.apache.kafka.connect.transforms.ExtractField$Value",
        aliases: &["ExtractField$Value", "ExtractField"],
        config_def,
        create: |props| {
            ExtractField::new(props, JsonPart::Value).map(|t| Box::new(t) as Box<dyn Transform>)
        },
    }
}

pub fn key_plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.ExtractField$Key",
        aliases: &["ExtractField$Key"],
        config_def,
        create: |props| {
            ExtractField::new(props, JsonPart::Key).map(|t| Box::new(t) as Box<dyn Transform>)
        },
    }
}

#[derive(Debug)]
struct ExtractField {
    part: JsonPart,
    path: Vec<String>,
}

impl ExtractField {
    fn new(props: &Props, part: JsonPart) -> ConnectResult<Self> {
        let syntax = FieldSyntax::parse(props.get(FIELD_SYNTAX).map_or("V1", String::as_str))
            .map_err(|reason| ConnectError::config(FIELD_SYNTAX, reason))?;
        let field = props
            .get("field")
            .map(|f| f.trim())
            .filter(|f| !f.is_empty());
        let field =
            field.ok_or_else(|| ConnectError::config("field", "must name the field to extract"))?;
        let path = syntax
            .path(field)
            .map_err(|reason| ConnectError::config("field", reason))?;
        Ok(Self { part, path })
    }
}

impl Transform for ExtractField {
    fn apply(&mut self, mut record: Record) -> ConnectResult<Option<Record>> {
        if self.part.bytes(&record).is_none() {
            return Ok(Some(record));
        }
        let object = self.part.object(&record)?;
        let extracted = get_path(&object, &self.path).unwrap_or(&Value::Null);
        if self.part == JsonPart::Value
            && extracted.is_string()
            && record.headers.contains(content_type::HEADER)
        {
            record.headers.set(content_type::HEADER, content_type::TEXT);
        }
        let bytes = raw_bytes(extracted);
        self.part.set(&mut record, bytes);
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::json::{build, config_field};

    fn observation() -> Record {
        Record::new("fhir")
            .with_key(r#"{"mrn":"M1","site":"ICU"}"#)
            .with_value(r#"{"resourceType":"Observation","subject":{"reference":"Patient/1"},"value":98.6,"tags":["a"]}"#)
            .with_header(content_type::HEADER, content_type::FHIR_JSON)
    }

    #[test]
    fn extracts_a_field_as_json_or_raw_text() {
        let mut t = build(&value_plugin(), &[("field", "subject")]).unwrap();
        let out = t.apply(observation()).unwrap().unwrap();
        assert_eq!(
            out.value.as_deref(),
            Some(br#"{"reference":"Patient/1"}"#.as_slice())
        );
        assert_eq!(
            out.content_type(),
            Some(content_type::FHIR_JSON),
            "still JSON"
        );

        let mut t = build(&value_plugin(), &[("field", "value")]).unwrap();
        assert_eq!(
            t.apply(observation()).unwrap().unwrap().value.as_deref(),
            Some(b"98.6".as_slice())
        );

        let mut t = build(&value_plugin(), &[("field", "resourceType")]).unwrap();
        let out = t.apply(observation()).unwrap().unwrap();
        assert_eq!(out.value.as_deref(), Some(b"Observation".as_slice()));
        assert_eq!(out.content_type(), Some(content_type::TEXT));
    }

    #[test]
    fn a_missing_field_gives_no_bytes() {
        let mut t = build(&value_plugin(), &[("field", "nope")]).unwrap();
        assert_eq!(t.apply(observation()).unwrap().unwrap().value, None);
    }

    #[test]
    fn v2_paths_extract_nested_fields() {
        let mut t = build(
            &value_plugin(),
            &[
                ("field", "subject.reference"),
                ("field.syntax.version", "v2"),
            ],
        )
        .unwrap();
        assert_eq!(
            t.apply(observation()).unwrap().unwrap().value.as_deref(),
            Some(b"Patient/1".as_slice())
        );
    }

    #[test]
    fn the_key_variant_extracts_from_the_key() {
        let mut t = build(&key_plugin(), &[("field", "mrn")]).unwrap();
        let out = t.apply(observation()).unwrap().unwrap();
        assert_eq!(out.key.as_deref(), Some(b"M1".as_slice()));
        assert_eq!(out.value, observation().value);
        assert_eq!(
            out.content_type(),
            Some(content_type::FHIR_JSON),
            "the key variant leaves the value's type"
        );
    }

    #[test]
    fn a_non_json_record_is_a_data_error_and_a_tombstone_passes() {
        let mut t = build(&value_plugin(), &[("field", "a")]).unwrap();
        assert!(
            t.apply(Record::new("t").with_value("PID|1"))
                .unwrap_err()
                .is_record_error()
        );
        assert_eq!(t.apply(Record::new("t")).unwrap(), Some(Record::new("t")));
    }

    #[test]
    fn config_errors_name_the_setting() {
        assert_eq!(config_field(build(&value_plugin(), &[])), "field");
        assert_eq!(
            config_field(build(&value_plugin(), &[("field", " ")])),
            "field"
        );
        assert_eq!(
            config_field(build(
                &value_plugin(),
                &[("field", "a."), ("field.syntax.version", "V2")]
            )),
            "field"
        );
        assert_eq!(
            config_field(build(
                &value_plugin(),
                &[("field", "a"), ("field.syntax.version", "V3")]
            )),
            "field.syntax.version"
        );
    }
}
