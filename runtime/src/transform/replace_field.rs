//! ReplaceField: drops and renames top-level fields of a JSON key or value. Connect's names
//! (`ReplaceField$Value`, `ReplaceField$Key`) and settings: `exclude`, `include`, `renames`
//! (`old:new,...`), and the deprecated `blacklist` / `whitelist` still found in older configs.
//! Filtering looks at the original names; renaming applies to the fields kept.

use std::collections::{HashMap, HashSet};

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, Props, Record, Transform,
    Validator,
};

use super::TransformPlugin;
use super::json::{JsonPart, list};

fn config_def() -> ConfigDef {
    ConfigDef::new()
        .define(
            "exclude",
            ConfigType::List,
            "",
            Importance::Medium,
            "Fields to drop. Takes precedence over `include`.",
        )
        .define(
            "include",
            ConfigType::List,
            "",
            Importance::Medium,
            "Fields to keep; when set, every other field is dropped.",
        )
        .define(
            "renames",
            ConfigType::List,
            "",
            Importance::Medium,
            "Field renames, `old:new` pairs separated by commas.",
        )
        .with_validator(Validator::custom(|item| parse_rename(item).map(|_| ())))
        .define(
            "blacklist",
            ConfigType::List,
            "",
            Importance::Low,
            "Deprecated name of `exclude`.",
        )
        .define(
            "whitelist",
            ConfigType::List,
            "",
            Importance::Low,
            "Deprecated name of `include`.",
        )
}

pub fn value_plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.ReplaceField$Value",
        aliases: &["ReplaceField$Value", "ReplaceField"],
        config_def,
        create: |props| {
            ReplaceField::new(props, JsonPart::Value).map(|t| Box::new(t) as Box<dyn Transform>)
        },
    }
}

pub fn key_plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.ReplaceField$Key",
        aliases: &["ReplaceField$Key"],
        config_def,
        create: |props| {
            ReplaceField::new(props, JsonPart::Key).map(|t| Box::new(t) as Box<dyn Transform>)
        },
    }
}

fn parse_rename(item: &str) -> Result<(String, String), String> {
    match item.split(':').collect::<Vec<_>>().as_slice() {
        [old, new] if !old.trim().is_empty() && !new.trim().is_empty() => {
            Ok((old.trim().to_string(), new.trim().to_string()))
        }
        _ => Err(format!("invalid rename mapping '{item}': expected old:new")),
    }
}

#[derive(Debug)]
struct ReplaceField {
    part: JsonPart,
    exclude: HashSet<String>,
    include: HashSet<String>,
    renames: HashMap<String, String>,
}

/// The current setting, or its deprecated name when only that one is given (as Connect did).
fn current_or_deprecated(props: &Props, current: &str, deprecated: &str) -> HashSet<String> {
    let values = list(props, current);
    if values.is_empty() {
        list(props, deprecated)
    } else {
        values
    }
    .into_iter()
    .collect()
}

impl ReplaceField {
    fn new(props: &Props, part: JsonPart) -> ConnectResult<Self> {
        let renames = list(props, "renames")
            .iter()
            .map(|item| {
                parse_rename(item).map_err(|reason| ConnectError::config("renames", reason))
            })
            .collect::<ConnectResult<_>>()?;
        Ok(Self {
            part,
            exclude: current_or_deprecated(props, "exclude", "blacklist"),
            include: current_or_deprecated(props, "include", "whitelist"),
            renames,
        })
    }

    fn keeps(&self, field: &str) -> bool {
        !self.exclude.contains(field) && (self.include.is_empty() || self.include.contains(field))
    }
}

impl Transform for ReplaceField {
    fn apply(&mut self, mut record: Record) -> ConnectResult<Option<Record>> {
        // A tombstone has no fields to replace and must stay a tombstone (Connect does the same).
        if self.part.bytes(&record).is_none() {
            return Ok(Some(record));
        }
        let object = self.part.object(&record)?;
        let replaced = object
            .into_iter()
            .filter(|(field, _)| self.keeps(field))
            .map(|(field, value)| match self.renames.get(&field) {
                Some(new) => (new.clone(), value),
                None => (field, value),
            })
            .collect();
        self.part.set_object(&mut record, replaced);
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::json::{build, config_field};
    use serde_json::{Value, json};

    fn value_of(record: &Record) -> Value {
        serde_json::from_slice(record.value.as_ref().unwrap()).unwrap()
    }

    fn vitals() -> Record {
        Record::new("vitals")
            .with_value(r#"{"mrn":"M1","name":"Jane Doe","hr":72,"ssn":"123-45-6789"}"#)
    }

    #[test]
    fn excludes_and_renames_fields() {
        let mut t = build(
            &value_plugin(),
            &[
                ("exclude", "ssn"),
                ("renames", "hr:heart_rate,mrn:patient_id"),
            ],
        )
        .unwrap();
        let out = t.apply(vitals()).unwrap().unwrap();
        assert_eq!(
            value_of(&out),
            json!({"patient_id": "M1", "name": "Jane Doe", "heart_rate": 72})
        );
    }

    #[test]
    fn include_keeps_only_the_named_fields_and_exclude_wins() {
        let mut t = build(
            &value_plugin(),
            &[("include", "mrn,hr,ssn"), ("exclude", "ssn")],
        )
        .unwrap();
        let out = t.apply(vitals()).unwrap().unwrap();
        assert_eq!(value_of(&out), json!({"mrn": "M1", "hr": 72}));
    }

    #[test]
    fn the_deprecated_names_still_work() {
        let mut t = build(
            &value_plugin(),
            &[("blacklist", "ssn,name"), ("whitelist", "mrn,name,ssn")],
        )
        .unwrap();
        let out = t.apply(vitals()).unwrap().unwrap();
        assert_eq!(value_of(&out), json!({"mrn": "M1"}));
    }

    #[test]
    fn the_key_variant_changes_only_the_key() {
        let mut t = build(&key_plugin(), &[("renames", "id:mrn")]).unwrap();
        let out = t
            .apply(vitals().with_key(r#"{"id":"M1"}"#))
            .unwrap()
            .unwrap();
        assert_eq!(out.key.as_deref(), Some(br#"{"mrn":"M1"}"#.as_slice()));
        assert_eq!(out.value, vitals().value, "the value is untouched");
    }

    #[test]
    fn a_non_json_record_is_a_data_error_and_a_tombstone_passes() {
        let mut t = build(&value_plugin(), &[("exclude", "ssn")]).unwrap();
        let error = t
            .apply(Record::new("t").with_value("PID|1||M1"))
            .unwrap_err();
        assert!(error.is_record_error(), "{error}");
        let error = t.apply(Record::new("t").with_value("[1,2]")).unwrap_err();
        assert!(error.is_record_error(), "{error}");
        let tombstone = Record::new("t").with_key("k");
        assert_eq!(t.apply(tombstone.clone()).unwrap(), Some(tombstone));
    }

    #[test]
    fn a_malformed_rename_names_the_renames_setting() {
        assert_eq!(
            config_field(build(&value_plugin(), &[("renames", "a:b,c")])),
            "renames"
        );
        assert_eq!(
            config_field(build(&value_plugin(), &[("renames", "a:b:c")])),
            "renames"
        );
        assert_eq!(
            config_field((value_plugin().create)(&crate::transform::json::props(&[
                ("renames", ":b")
            ]))),
            "renames"
        );
    }
}
