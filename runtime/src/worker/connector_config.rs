//! Settings every connector has (Connect's names), validation of a whole connector config,
//! and redaction of secrets in configs the API returns.

use std::time::Duration;

use medconnect_api::{
    ConfigDef, ConfigType, ConfigValue, ConnectError, ConnectResult, ConnectorKind, Importance,
    ParsedConfig, Props, Validator,
};

use super::plugins::ConnectorPlugin;
use super::secrets;
use crate::task::{RunnerSettings, errors};
use crate::transform::TransformChain;

pub const NAME: &str = "name";
pub const CLASS: &str = "connector.class";
pub const TASKS_MAX: &str = "tasks.max";
pub const TOPICS: &str = "topics";
pub const TOPICS_REGEX: &str = "topics.regex";
pub const TRANSFORMS: &str = "transforms";
pub const PREDICATES: &str = "predicates";
pub const NEW_TOPIC_PARTITIONS: &str = "topic.creation.default.partitions";
pub const NEW_TOPIC_REPLICATION: &str = "topic.creation.default.replication.factor";
pub const PRODUCER_OVERRIDE: &str = "producer.override.";
pub const CONSUMER_OVERRIDE: &str = "consumer.override.";

/// The value shown instead of a secret.
pub const HIDDEN: &str = "[hidden]";

/// The settings shared by every connector of this kind.
pub fn common_def(kind: ConnectorKind) -> ConfigDef {
    let common = ConfigDef::new()
        .define_required(NAME, ConfigType::String, Importance::High, "Globally unique name of the connector.")
        .with_validator(Validator::NonEmpty)
        .define_required(CLASS, ConfigType::Class, Importance::High, "Class or alias of the connector.")
        .define(TASKS_MAX, ConfigType::Int, "1", Importance::High, "Maximum number of tasks.")
        .with_validator(Validator::at_least(1.0))
        .define(TRANSFORMS, ConfigType::List, "", Importance::Low, "Aliases of the transforms applied to records, in order.")
        .define(PREDICATES, ConfigType::List, "", Importance::Low, "Aliases of the predicates transforms can use.")
        .in_group("Common")
        .define(errors::TOLERANCE, ConfigType::String, "none", Importance::Medium, "`none`: an error fails the task; `all`: failed records are skipped (and written to the dead-letter topic, if set).")
        .with_validator(Validator::OneOf(vec!["none", "all"]))
        .define(errors::RETRY_TIMEOUT, ConfigType::Long, "0", Importance::Medium, "How long a retriable failure is retried, in ms; 0 means no retries, -1 forever.")
        .with_validator(Validator::at_least(-1.0))
        .define(errors::RETRY_DELAY_MAX, ConfigType::Long, "60000", Importance::Medium, "Longest wait between retries, in ms.")
        .with_validator(Validator::at_least(1.0))
        .define(errors::LOG_ENABLE, ConfigType::Boolean, "false", Importance::Medium, "Log every tolerated error.")
        .define(errors::LOG_INCLUDE_MESSAGES, ConfigType::Boolean, "false", Importance::Medium, "Include record contents in error logs. Records carry patient data: keep off in production.")
        .define(errors::DLQ_TOPIC, ConfigType::String, "", Importance::Medium, "Dead-letter topic for failed records (sources and sinks); empty: none.")
        .define(errors::DLQ_REPLICATION, ConfigType::Int, "1", Importance::Medium, "Replication factor of the dead-letter topic when medconnect creates it.")
        .with_validator(Validator::at_least(1.0))
        .define(errors::DLQ_CONTEXT_HEADERS, ConfigType::Boolean, "false", Importance::Medium, "Add `__connect.errors.*` headers saying where and why a record failed.")
        .in_group("Error Handling");
    match kind {
        ConnectorKind::Source => common
            .define(
                NEW_TOPIC_PARTITIONS,
                ConfigType::Int,
                "1",
                Importance::Low,
                "Partitions of topics created for this connector.",
            )
            .with_validator(Validator::at_least(1.0))
            .define(
                NEW_TOPIC_REPLICATION,
                ConfigType::Int,
                "1",
                Importance::Low,
                "Replication factor of topics created for this connector.",
            )
            .with_validator(Validator::at_least(1.0))
            .in_group("Topic Creation"),
        ConnectorKind::Sink => common
            .define(
                TOPICS,
                ConfigType::List,
                "",
                Importance::High,
                "Topics to consume (or use topics.regex).",
            )
            .define(
                TOPICS_REGEX,
                ConfigType::String,
                "",
                Importance::High,
                "Regular expression of topics to consume (or use topics).",
            )
            .with_validator(Validator::custom(|v| {
                if v.is_empty() {
                    return Ok(());
                }
                regex::Regex::new(v)
                    .map(|_| ())
                    .map_err(|e| format!("not a regular expression: {e}"))
            }))
            .in_group("Common"),
    }
}

/// The complete definition of a plugin's config: common settings, then the connector's own.
pub fn full_def(plugin: &ConnectorPlugin) -> ConfigDef {
    common_def(plugin.kind()).merge(plugin.connector().config_def())
}

/// The number of tasks a connector config asks for, within the connector's own limit and
/// the worker's: what task configs are generated for, even from a config that was written to
/// the config topic before the limit existed (validation reports the excess; this bounds it).
pub fn task_count(plugin: &ConnectorPlugin, props: &Props, tasks_max_limit: u32) -> usize {
    let asked = props
        .get(TASKS_MAX)
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(1);
    let own = plugin.connector().max_tasks().unwrap_or(u32::MAX);
    let count = asked.min(own).min(tasks_max_limit).max(1);
    usize::try_from(count).unwrap_or(1)
}

/// Why `tasks.max` cannot be honoured: above the connector's own limit or the worker's.
fn tasks_max_error(
    plugin: &ConnectorPlugin,
    props: &Props,
    tasks_max_limit: u32,
) -> Option<String> {
    let asked: i64 = props.get(TASKS_MAX)?.trim().parse().ok()?;
    if let Some(own) = plugin.connector().max_tasks()
        && asked > i64::from(own)
    {
        return Some(format!(
            "{} runs at most {own} task{}; tasks.max={asked} cannot be honoured",
            plugin.simple_name(),
            if own == 1 { "" } else { "s" },
        ));
    }
    (asked > i64::from(tasks_max_limit)).then(|| {
        format!(
            "must be at most {tasks_max_limit}, this worker's limit (tasks_max_limit in [tasks] of the worker config)"
        )
    })
}

/// Runs one of the connector's own calls (`validate`, `task_configs`), which may wait on its
/// peer, within `timeout` (the worker's `connector_call_timeout_ms`).
pub async fn within_call_timeout<T>(
    timeout: Duration,
    what: &str,
    call: impl Future<Output = ConnectResult<T>>,
) -> ConnectResult<T> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::retriable(format!(
                "the connector did not finish {what} within {} ms (connector_call_timeout_ms)",
                timeout.as_millis()
            )))
        })
}

/// Validates a connector config like Connect's validate endpoint: one entry per setting,
/// within the worker's limits (`tasks_max_limit`, `connector_call_timeout`).
pub async fn validate(
    plugin: &ConnectorPlugin,
    props: &Props,
    settings: &RunnerSettings,
) -> Vec<ConfigValue> {
    let tasks_max_limit = settings.tasks_max_limit;
    let def = full_def(plugin);
    let mut values = def.validate(props);
    values.extend(TransformChain::validate(props));
    let mut extra: Vec<(String, String)> = Vec::new();
    let tasks_max_ok = values
        .iter()
        .any(|v| v.name == TASKS_MAX && v.errors.is_empty());
    if tasks_max_ok && let Some(reason) = tasks_max_error(plugin, props, tasks_max_limit) {
        extra.push((TASKS_MAX.into(), reason));
    }
    if plugin.kind() == ConnectorKind::Sink {
        let topics = props.get(TOPICS).is_some_and(|v| !v.trim().is_empty());
        let regex = props
            .get(TOPICS_REGEX)
            .is_some_and(|v| !v.trim().is_empty());
        match (topics, regex) {
            (true, true) => extra.push((
                TOPICS.into(),
                "topics and topics.regex are mutually exclusive".into(),
            )),
            (false, false) => extra.push((
                TOPICS.into(),
                "Must configure one of topics or topics.regex".into(),
            )),
            _ => {}
        }
        if let (Some(dlq), Some(list)) = (props.get(errors::DLQ_TOPIC), props.get(TOPICS))
            && !dlq.is_empty()
            && list.split(',').any(|t| t.trim() == dlq)
        {
            extra.push((
                errors::DLQ_TOPIC.into(),
                "the dead-letter topic cannot be one of the topics the sink consumes".into(),
            ));
        }
    }
    let resolved = secrets::resolve(&settings.config_providers, &def, props);
    let scrubber = match &resolved {
        Ok(resolved) => resolved.scrubber.clone(),
        Err(error) => {
            extra.push(field_and_reason(error.clone()));
            secrets::Scrubber::default()
        }
    };
    let cross_checks_apply = extra.is_empty() && values.iter().all(|v| v.errors.is_empty());
    if cross_checks_apply
        && let Ok(resolved) = &resolved
        && let Err(error) = within_call_timeout(
            settings.connector_call_timeout,
            "validating",
            plugin.connector().validate(&resolved.props),
        )
        .await
    {
        // The connector saw resolved values and may quote them.
        extra.push(field_and_reason(scrubber.error(error)));
    }
    for (name, reason) in extra {
        match values.iter_mut().find(|v| v.name == name) {
            Some(value) => value.errors.push(reason),
            None => values.push(ConfigValue {
                name: name.clone(),
                value: props.get(&name).cloned(),
                recommended_values: Vec::new(),
                errors: vec![reason],
                visible: true,
            }),
        }
    }
    // Validation answers echo what was given: a secret setting's value only as a reference.
    for value in &mut values {
        value.errors = value.errors.iter().map(|e| scrubber.text(e)).collect();
        if is_secret(&def, &value.name)
            && let Some(given) = value.value.as_mut()
            && !secrets::is_reference(given)
        {
            *given = HIDDEN.to_string();
        }
    }
    values
}

/// The setting a config error is about, and why; other errors are put on `connector.class`.
pub fn field_and_reason(error: medconnect_api::ConnectError) -> (String, String) {
    match error {
        medconnect_api::ConnectError::Config { field, reason } => (field, reason),
        other => (CLASS.to_string(), other.to_string()),
    }
}

/// Parses the common settings of a (resolved) connector or task config.
pub fn parse_common(
    kind: ConnectorKind,
    props: &Props,
) -> Result<ParsedConfig, medconnect_api::ConnectError> {
    common_def(kind).parse(props)
}

/// Whether a setting holds a secret: declared as a password, or named like one
/// ([`medconnect_api::is_secret_name`], the rule for every place a setting may be shown).
pub fn is_secret(def: &ConfigDef, name: &str) -> bool {
    def.password_names().any(|p| p == name) || medconnect_api::is_secret_name(name)
}

/// The config as the API shows it: secrets hidden, references (`${env:..}`) shown as written.
pub fn redact(def: &ConfigDef, props: &Props) -> Props {
    props
        .iter()
        .map(|(k, v)| {
            let shown = if is_secret(def, k) && !secrets::is_reference(v) {
                HIDDEN.to_string()
            } else {
                v.clone()
            };
            (k.clone(), shown)
        })
        .collect()
}

/// Puts back stored secrets where a client sent the hidden marker (a config read from the API
/// and written back unchanged keeps its secrets).
pub fn restore_hidden(def: &ConfigDef, new: &mut Props, stored: Option<&Props>) {
    let Some(stored) = stored else { return };
    for (key, value) in new.iter_mut() {
        if value == HIDDEN
            && is_secret(def, key)
            && let Some(previous) = stored.get(key)
        {
            value.clone_from(previous);
        }
    }
}
