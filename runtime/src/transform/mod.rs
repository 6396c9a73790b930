//! The single-message transform chain, configured with Kafka Connect's syntax:
//! `transforms=a,b`, `transforms.a.type=<class>`, `transforms.a.<setting>=...`, and predicates:
//! `predicates=p`, `predicates.p.type=<class>`, `transforms.a.predicate=p`,
//! `transforms.a.negate=true`. Connect's class names are accepted, so existing configs work.

mod drop_headers;
mod extract_field;
mod filter;
mod header_from;
mod insert_field;
mod insert_header;
mod json;
mod mask_field;
mod predicate;
#[cfg(test)]
mod predicate_tests;
mod regex_router;
mod replace_field;
mod timestamp_router;
mod value_to_key;
mod wasm;

use medconnect_api::{
    ConfigDef, ConfigValue, ConnectError, ConnectResult, Props, Record, Transform,
};

pub use predicate::Predicate;

/// A transform or predicate implementation known to the worker.
pub struct TransformPlugin {
    pub class: &'static str,
    pub aliases: &'static [&'static str],
    pub config_def: fn() -> ConfigDef,
    pub create: fn(&Props) -> ConnectResult<Box<dyn Transform>>,
}

pub struct PredicatePlugin {
    pub class: &'static str,
    pub aliases: &'static [&'static str],
    pub config_def: fn() -> ConfigDef,
    pub create: fn(&Props) -> ConnectResult<Box<dyn Predicate>>,
}

/// The built-in transforms.
pub fn transform_plugins() -> Vec<TransformPlugin> {
    vec![
        insert_field::value_plugin(),
        insert_field::key_plugin(),
        filter::plugin(),
        wasm::plugin(),
        replace_field::value_plugin(),
        replace_field::key_plugin(),
        mask_field::value_plugin(),
        mask_field::key_plugin(),
        value_to_key::plugin(),
        extract_field::value_plugin(),
        extract_field::key_plugin(),
        regex_router::plugin(),
        timestamp_router::plugin(),
        header_from::value_plugin(),
        header_from::key_plugin(),
        insert_header::plugin(),
        drop_headers::plugin(),
    ]
}

pub fn predicate_plugins() -> Vec<PredicatePlugin> {
    predicate::plugins()
}

fn find_transform(class: &str) -> Option<TransformPlugin> {
    transform_plugins()
        .into_iter()
        .find(|p| p.class == class || p.aliases.contains(&class))
}

fn find_predicate(class: &str) -> Option<PredicatePlugin> {
    predicate_plugins()
        .into_iter()
        .find(|p| p.class == class || p.aliases.contains(&class))
}

/// The settings under `prefix`, prefix removed (`transforms.mask.fields` -> `fields`).
fn scoped(props: &Props, prefix: &str) -> Props {
    props
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
        .collect()
}

struct Stage {
    alias: String,
    class: String,
    transform: Box<dyn Transform>,
    predicate: Option<Box<dyn Predicate>>,
    negate: bool,
}

/// A failure inside the chain: which transform, and why.
#[derive(Debug)]
pub struct StageError {
    pub class: String,
    pub error: ConnectError,
}

/// The transforms of one task, applied in order.
#[derive(Default)]
pub struct TransformChain {
    stages: Vec<Stage>,
}

impl TransformChain {
    /// Builds the chain from a connector config; errors name the offending setting.
    pub fn from_config(props: &Props) -> ConnectResult<Self> {
        let mut stages = Vec::new();
        for alias in json::list(props, "transforms") {
            let prefix = format!("transforms.{alias}.");
            let type_key = format!("{prefix}type");
            let class = props
                .get(&type_key)
                .ok_or_else(|| ConnectError::config(&type_key, "missing transform class"))?;
            let plugin = find_transform(class).ok_or_else(|| {
                ConnectError::config(&type_key, format!("unknown transform class '{class}'"))
            })?;
            let settings = scoped(props, &prefix);
            (plugin.config_def)()
                .parse(&settings)
                .map_err(|e| prefixed(e, &prefix))?;
            let transform = (plugin.create)(&settings).map_err(|e| prefixed(e, &prefix))?;
            let predicate = match settings.get("predicate").filter(|p| !p.is_empty()) {
                None => None,
                Some(name) => Some(build_predicate(props, name, &format!("{prefix}predicate"))?),
            };
            let negate = settings
                .get("negate")
                .is_some_and(|v| v.eq_ignore_ascii_case("true"));
            stages.push(Stage {
                alias,
                class: plugin.class.to_string(),
                transform,
                predicate,
                negate,
            });
        }
        Ok(Self { stages })
    }

    /// Validation entries for every `transforms.*` / `predicates.*` setting, for the validate endpoint.
    pub fn validate(props: &Props) -> Vec<ConfigValue> {
        let mut values = Vec::new();
        for alias in json::list(props, "transforms") {
            let prefix = format!("transforms.{alias}.");
            let type_key = format!("{prefix}type");
            let class = props.get(&type_key);
            let mut type_errors = Vec::new();
            match class.map(|c| (c, find_transform(c))) {
                None => type_errors
                    .push("Missing required configuration: the transform class".to_string()),
                Some((class, None)) => {
                    type_errors.push(format!("Class {class} could not be found."))
                }
                Some((_, Some(plugin))) => {
                    let settings = scoped(props, &prefix);
                    let mut own = (plugin.config_def)().validate(&settings);
                    // Building the transform only makes sense once its settings are valid; its
                    // config error goes on the setting it names, so users see which to fix.
                    if own.iter().all(|v| v.errors.is_empty())
                        && let Err(error) = (plugin.create)(&settings)
                    {
                        match error {
                            ConnectError::Config { field, reason }
                                if own.iter().any(|v| v.name == field) =>
                            {
                                own.iter_mut()
                                    .filter(|v| v.name == field)
                                    .for_each(|v| v.errors.push(reason.clone()));
                            }
                            other => type_errors.push(other.to_string()),
                        }
                    }
                    for mut value in own {
                        value.name = format!("{prefix}{}", value.name);
                        values.push(value);
                    }
                }
            }
            if let Some(name) = props
                .get(&format!("{prefix}predicate"))
                .filter(|p| !p.is_empty())
                && let Err(error) = build_predicate(props, name, &format!("{prefix}predicate"))
            {
                values.push(error_value(
                    &format!("{prefix}predicate"),
                    props,
                    error.to_string(),
                ));
            }
            values.push(ConfigValue {
                name: type_key.clone(),
                value: class.cloned(),
                recommended_values: Vec::new(),
                errors: type_errors,
                visible: true,
            });
        }
        values
    }

    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// Applies every stage; `Ok(None)` when a stage dropped the record.
    pub fn apply(&mut self, record: Record) -> Result<Option<Record>, StageError> {
        let mut current = record;
        for stage in &mut self.stages {
            let applies = stage
                .predicate
                .as_ref()
                .is_none_or(|p| p.test(&current) != stage.negate);
            if !applies {
                continue;
            }
            match stage.transform.apply(current) {
                Ok(Some(next)) => current = next,
                Ok(None) => return Ok(None),
                Err(error) => {
                    return Err(StageError {
                        class: stage.class.clone(),
                        error,
                    });
                }
            }
        }
        Ok(Some(current))
    }

    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.stages.iter().map(|s| s.alias.as_str())
    }

    pub fn close(&mut self) {
        for stage in &mut self.stages {
            stage.transform.close();
        }
    }
}

fn build_predicate(props: &Props, name: &str, field: &str) -> ConnectResult<Box<dyn Predicate>> {
    if !json::list(props, "predicates").iter().any(|p| p == name) {
        return Err(ConnectError::config(
            field,
            format!("predicate '{name}' is not listed in 'predicates'"),
        ));
    }
    let prefix = format!("predicates.{name}.");
    let type_key = format!("{prefix}type");
    let class = props
        .get(&type_key)
        .ok_or_else(|| ConnectError::config(&type_key, "missing predicate class"))?;
    let plugin = find_predicate(class).ok_or_else(|| {
        ConnectError::config(&type_key, format!("unknown predicate class '{class}'"))
    })?;
    let settings = scoped(props, &prefix);
    (plugin.config_def)()
        .parse(&settings)
        .map_err(|e| prefixed(e, &prefix))?;
    (plugin.create)(&settings).map_err(|e| prefixed(e, &prefix))
}

fn prefixed(error: ConnectError, prefix: &str) -> ConnectError {
    match error {
        ConnectError::Config { field, reason } => {
            ConnectError::config(format!("{prefix}{field}"), reason)
        }
        other => other,
    }
}

fn error_value(name: &str, props: &Props, error: String) -> ConfigValue {
    ConfigValue {
        name: name.to_string(),
        value: props.get(name).cloned(),
        recommended_values: Vec::new(),
        errors: vec![error],
        visible: true,
    }
}

/// Parses a record value (or key) as a JSON object, for transforms that edit fields.
pub(crate) fn json_object(
    bytes: Option<&bytes::Bytes>,
    what: &str,
) -> ConnectResult<serde_json::Map<String, serde_json::Value>> {
    let bytes = bytes.ok_or_else(|| ConnectError::data(format!("record has no {what}")))?;
    match serde_json::from_slice(bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(ConnectError::data(format!(
            "record {what} is JSON but not an object"
        ))),
        Err(e) => Err(ConnectError::data(format!(
            "record {what} is not JSON: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use medconnect_api::props_from as props;

    #[test]
    fn chain_applies_in_order_and_predicates_select_records() {
        let mut chain = TransformChain::from_config(&props(&[
            ("transforms", "tag,dropTest"),
            (
                "transforms.tag.type",
                "org.apache.kafka.connect.transforms.InsertField$Value",
            ),
            ("transforms.tag.static.field", "source"),
            ("transforms.tag.static.value", "icu"),
            ("transforms.dropTest.type", "Filter"),
            ("transforms.dropTest.predicate", "isTest"),
            ("predicates", "isTest"),
            ("predicates.isTest.type", "TopicNameMatches"),
            ("predicates.isTest.pattern", "test-.*"),
        ]))
        .unwrap();
        let kept = chain
            .apply(Record::new("vitals").with_value(r#"{"hr":80}"#))
            .unwrap()
            .unwrap();
        let value: serde_json::Value =
            serde_json::from_slice(kept.value.as_ref().unwrap()).unwrap();
        assert_eq!(value["source"], "icu");
        assert!(
            chain
                .apply(Record::new("test-vitals").with_value("{}"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn an_unknown_class_names_the_type_setting() {
        let error = TransformChain::from_config(&props(&[
            ("transforms", "x"),
            ("transforms.x.type", "Nope"),
        ]))
        .err()
        .unwrap();
        assert!(
            matches!(error, ConnectError::Config { ref field, .. } if field == "transforms.x.type")
        );
        let values = TransformChain::validate(&props(&[
            ("transforms", "x"),
            ("transforms.x.type", "Nope"),
        ]));
        assert_eq!(values.iter().filter(|v| !v.errors.is_empty()).count(), 1);
    }

    #[test]
    fn a_bad_record_is_a_record_error_naming_the_transform() {
        let mut chain = TransformChain::from_config(&props(&[
            ("transforms", "tag"),
            ("transforms.tag.type", "InsertField$Value"),
            ("transforms.tag.static.field", "f"),
            ("transforms.tag.static.value", "v"),
        ]))
        .unwrap();
        let error = chain
            .apply(Record::new("t").with_value("not json"))
            .unwrap_err();
        assert!(error.error.is_record_error());
        assert!(error.class.contains("InsertField"));
    }
}
