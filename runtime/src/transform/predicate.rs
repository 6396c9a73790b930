//! Predicates that select the records a transform applies to: Connect's TopicNameMatches,
//! HasHeaderKey and RecordIsTombstone.

use medconnect_api::{ConfigDef, ConfigType, ConnectError, Importance, Record, Validator};
use regex::Regex;

use super::PredicatePlugin;

pub trait Predicate: Send {
    fn test(&self, record: &Record) -> bool;
}

pub fn plugins() -> Vec<PredicatePlugin> {
    vec![
        PredicatePlugin {
            class: "org.apache.kafka.connect.transforms.predicates.TopicNameMatches",
            aliases: &["TopicNameMatches"],
            config_def: || {
                ConfigDef::new()
                    .define_required(
                        "pattern",
                        ConfigType::String,
                        Importance::Medium,
                        "Regular expression the whole topic name must match.",
                    )
                    .with_validator(Validator::custom(|v| {
                        Regex::new(v)
                            .map(|_| ())
                            .map_err(|e| format!("not a regular expression: {e}"))
                    }))
            },
            create: |props| {
                let pattern = props.get("pattern").map_or("", String::as_str);
                let regex = Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
                    ConnectError::config("pattern", format!("not a regular expression: {e}"))
                })?;
                Ok(Box::new(TopicNameMatches(regex)))
            },
        },
        PredicatePlugin {
            class: "org.apache.kafka.connect.transforms.predicates.HasHeaderKey",
            aliases: &["HasHeaderKey"],
            config_def: || {
                ConfigDef::new()
                    .define_required(
                        "name",
                        ConfigType::String,
                        Importance::Medium,
                        "Header name.",
                    )
                    .with_validator(Validator::NonEmpty)
            },
            create: |props| {
                Ok(Box::new(HasHeaderKey(
                    props.get("name").cloned().unwrap_or_default(),
                )))
            },
        },
        PredicatePlugin {
            class: "org.apache.kafka.connect.transforms.predicates.RecordIsTombstone",
            aliases: &["RecordIsTombstone"],
            config_def: ConfigDef::new,
            create: |_| Ok(Box::new(RecordIsTombstone)),
        },
    ]
}

struct TopicNameMatches(Regex);

impl Predicate for TopicNameMatches {
    fn test(&self, record: &Record) -> bool {
        self.0.is_match(&record.topic)
    }
}

struct HasHeaderKey(String);

impl Predicate for HasHeaderKey {
    fn test(&self, record: &Record) -> bool {
        record.headers.contains(&self.0)
    }
}

struct RecordIsTombstone;

impl Predicate for RecordIsTombstone {
    fn test(&self, record: &Record) -> bool {
        record.value.is_none()
    }
}
