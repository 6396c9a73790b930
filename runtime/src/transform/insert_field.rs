//! InsertField: adds fields to a JSON record value (or key): a static field, or the record's
//! topic, partition, offset or timestamp. Connect's names: `InsertField$Value`, `InsertField$Key`.

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, Props, Record, Transform,
};
use serde_json::{Value, json};

use super::{TransformPlugin, json_object};

const FIELDS: &[(&str, &str)] = &[
    ("static.field", "Name of a field set to `static.value`."),
    ("static.value", "Value of the static field."),
    ("topic.field", "Name of a field set to the record's topic."),
    (
        "partition.field",
        "Name of a field set to the record's Kafka partition.",
    ),
    (
        "timestamp.field",
        "Name of a field set to the record's timestamp (ms).",
    ),
];

fn config_def() -> ConfigDef {
    FIELDS.iter().fold(ConfigDef::new(), |def, (name, doc)| {
        def.define(name, ConfigType::String, "", Importance::Medium, doc)
    })
}

pub fn value_plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.InsertField$Value",
        aliases: &["InsertField$Value", "InsertField"],
        config_def,
        create: |props| {
            InsertField::new(props, Part::Value).map(|t| Box::new(t) as Box<dyn Transform>)
        },
    }
}

pub fn key_plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.InsertField$Key",
        aliases: &["InsertField$Key"],
        config_def,
        create: |props| {
            InsertField::new(props, Part::Key).map(|t| Box::new(t) as Box<dyn Transform>)
        },
    }
}

#[derive(Debug, Clone, Copy)]
enum Part {
    Key,
    Value,
}

#[derive(Debug)]
struct InsertField {
    part: Part,
    static_field: Option<(String, Value)>,
    topic_field: Option<String>,
    partition_field: Option<String>,
    timestamp_field: Option<String>,
}

fn non_empty(props: &Props, key: &str) -> Option<String> {
    props.get(key).filter(|v| !v.is_empty()).cloned()
}

impl InsertField {
    fn new(props: &Props, part: Part) -> ConnectResult<Self> {
        let static_field = match (non_empty(props, "static.field"), props.get("static.value")) {
            (Some(field), Some(value)) => Some((field, Value::String(value.clone()))),
            (Some(_), None) => {
                return Err(ConnectError::config(
                    "static.value",
                    "required when static.field is set",
                ));
            }
            (None, _) => None,
        };
        let transform = Self {
            part,
            static_field,
            topic_field: non_empty(props, "topic.field"),
            partition_field: non_empty(props, "partition.field"),
            timestamp_field: non_empty(props, "timestamp.field"),
        };
        if transform.static_field.is_none()
            && transform.topic_field.is_none()
            && transform.partition_field.is_none()
            && transform.timestamp_field.is_none()
        {
            return Err(ConnectError::config(
                "static.field",
                "InsertField needs at least one of static.field, topic.field, partition.field, timestamp.field",
            ));
        }
        Ok(transform)
    }
}

impl Transform for InsertField {
    fn apply(&mut self, mut record: Record) -> ConnectResult<Option<Record>> {
        let (bytes, what) = match self.part {
            Part::Key => (record.key.as_ref(), "key"),
            Part::Value => (record.value.as_ref(), "value"),
        };
        let mut object = json_object(bytes, what)?;
        if let Some((field, value)) = &self.static_field {
            object.insert(field.clone(), value.clone());
        }
        if let Some(field) = &self.topic_field {
            object.insert(field.clone(), json!(record.topic));
        }
        if let Some(field) = &self.partition_field {
            object.insert(field.clone(), json!(record.partition));
        }
        if let Some(field) = &self.timestamp_field {
            object.insert(field.clone(), json!(record.timestamp));
        }
        let bytes = Value::Object(object).to_string().into_bytes().into();
        match self.part {
            Part::Key => record.key = Some(bytes),
            Part::Value => record.value = Some(bytes),
        }
        Ok(Some(record))
    }
}
