//! `ConfigDef`: the declaration of a component's settings.
//!
//! One declaration drives validation (`PUT /connector-plugins/{type}/config/validate`, connector
//! creation), the plugin description (`GET /connector-plugins/{type}/config`) and typed access
//! in the task. Settings travel as strings, as in Kafka Connect's JSON configs.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use crate::ConnectError;

/// A connector's or task's settings: names to string values.
pub type Props = BTreeMap<String, String>;

/// Settings from literal pairs, for configs written in code (tests, examples, benches).
pub fn props_from(pairs: &[(&str, &str)]) -> Props {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Whether a setting's name says it holds a secret: the one rule for every place a setting may
/// be shown (REST answers of connector configs, the worker's `[kafka]` sections and connector
/// configs in `Debug` output). Settings declared [`ConfigType::Password`] are secrets whatever
/// their name.
pub fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "credentials",
        "sasl.jaas.config",
        "api.key",
        "apikey",
        // Key material inline (librdkafka's PEM settings), not a path to it.
        "ssl.key.pem",
        "ssl.keystore.key",
    ]
    .iter()
    .any(|marker| lower.contains(marker))
}

/// Shows a map of settings in `Debug` output with the values of secret-named settings
/// ([`is_secret_name`]) replaced by `[hidden]`: how every struct holding a config prints it.
pub struct SecretsHidden<'a, V>(pub &'a BTreeMap<String, V>);

impl<V: fmt::Debug> fmt::Debug for SecretsHidden<'_, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (key, value) in self.0 {
            if is_secret_name(key) {
                map.entry(key, &"[hidden]");
            } else {
                map.entry(key, value);
            }
        }
        map.finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ConfigType {
    String,
    Int,
    Long,
    Double,
    Boolean,
    /// Comma-separated values.
    List,
    /// Never returned by the API in clear.
    Password,
    Class,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Importance {
    High,
    Medium,
    Low,
}

type CheckFn = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// A rule a value must follow beyond its type.
#[derive(Clone)]
pub enum Validator {
    /// Inclusive numeric range.
    Range {
        min: Option<f64>,
        max: Option<f64>,
    },
    /// One of these values (case-sensitive).
    OneOf(Vec<&'static str>),
    NonEmpty,
    Custom(Arc<CheckFn>),
}

impl fmt::Debug for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Range { min, max } => write!(f, "Range({min:?}, {max:?})"),
            Self::OneOf(values) => write!(f, "OneOf({values:?})"),
            Self::NonEmpty => write!(f, "NonEmpty"),
            Self::Custom(_) => write!(f, "Custom"),
        }
    }
}

impl Validator {
    pub fn at_least(min: f64) -> Self {
        Self::Range {
            min: Some(min),
            max: None,
        }
    }

    pub fn between(min: f64, max: f64) -> Self {
        Self::Range {
            min: Some(min),
            max: Some(max),
        }
    }

    pub fn custom(check: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static) -> Self {
        Self::Custom(Arc::new(check))
    }

    fn check(&self, value: &str) -> Result<(), String> {
        match self {
            Self::Range { min, max } => {
                let number = finite(value)?;
                if min.is_some_and(|m| number < m) || max.is_some_and(|m| number > m) {
                    return Err(match (min, max) {
                        (Some(lo), Some(hi)) => format!("must be between {lo} and {hi}"),
                        (Some(lo), None) => format!("must be at least {lo}"),
                        (None, Some(hi)) => format!("must be at most {hi}"),
                        (None, None) => unreachable!("a range without bounds never fails"),
                    });
                }
                Ok(())
            }
            Self::OneOf(allowed) => {
                if allowed.contains(&value) {
                    Ok(())
                } else {
                    Err(format!("must be one of {}", allowed.join(", ")))
                }
            }
            Self::NonEmpty => {
                if value.trim().is_empty() {
                    Err("must not be empty".into())
                } else {
                    Ok(())
                }
            }
            Self::Custom(check) => check(value),
        }
    }

    fn recommended(&self) -> Vec<String> {
        match self {
            Self::OneOf(values) => values.iter().map(|v| v.to_string()).collect(),
            _ => Vec::new(),
        }
    }
}

/// One declared setting.
#[derive(Debug, Clone)]
pub struct ConfigKey {
    pub name: String,
    pub ty: ConfigType,
    /// `None`: the setting is required.
    pub default: Option<String>,
    pub importance: Importance,
    pub documentation: String,
    pub group: Option<String>,
    pub validator: Option<Validator>,
}

impl ConfigKey {
    pub fn required(&self) -> bool {
        self.default.is_none()
    }

    /// The definition as Kafka Connect's REST API shows it.
    pub fn definition_json(&self, order: usize) -> Value {
        let default_value = match (&self.default, self.ty) {
            (Some(_), ConfigType::Password) => Value::String("[hidden]".into()),
            (Some(d), _) => Value::String(d.clone()),
            (None, _) => Value::Null,
        };
        json!({
            "name": self.name,
            "type": self.ty,
            "required": self.required(),
            "default_value": default_value,
            "importance": self.importance,
            "documentation": self.documentation,
            "group": self.group,
            "width": "NONE",
            "display_name": self.name,
            "dependents": [],
            "order": order,
        })
    }
}

/// The result of validating one setting, as Connect's validate endpoint reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigValue {
    pub name: String,
    pub value: Option<String>,
    pub recommended_values: Vec<String>,
    pub errors: Vec<String>,
    pub visible: bool,
}

/// The declared settings of a component.
#[derive(Debug, Clone, Default)]
pub struct ConfigDef {
    keys: Vec<ConfigKey>,
}

impl ConfigDef {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a setting with a default value.
    pub fn define(
        mut self,
        name: &str,
        ty: ConfigType,
        default: impl Into<String>,
        importance: Importance,
        documentation: &str,
    ) -> Self {
        self.push(name, ty, Some(default.into()), importance, documentation);
        self
    }

    /// Declares a setting without default: validation fails when it is missing.
    pub fn define_required(
        mut self,
        name: &str,
        ty: ConfigType,
        importance: Importance,
        documentation: &str,
    ) -> Self {
        self.push(name, ty, None, importance, documentation);
        self
    }

    /// Adds a validator to the setting declared last.
    pub fn with_validator(mut self, validator: Validator) -> Self {
        if let Some(key) = self.keys.last_mut() {
            key.validator = Some(validator);
        }
        self
    }

    /// Puts the settings declared so far without a group into this group.
    pub fn in_group(mut self, group: &str) -> Self {
        for key in self.keys.iter_mut().filter(|k| k.group.is_none()) {
            key.group = Some(group.to_string());
        }
        self
    }

    /// Appends another definition's settings (a connector's own after the common ones).
    pub fn merge(mut self, other: ConfigDef) -> Self {
        for key in other.keys {
            if !self.keys.iter().any(|k| k.name == key.name) {
                self.keys.push(key);
            }
        }
        self
    }

    fn push(
        &mut self,
        name: &str,
        ty: ConfigType,
        default: Option<String>,
        importance: Importance,
        documentation: &str,
    ) {
        self.keys.retain(|k| k.name != name);
        self.keys.push(ConfigKey {
            name: name.to_string(),
            ty,
            default,
            importance,
            documentation: documentation.to_string(),
            group: None,
            validator: None,
        });
    }

    pub fn keys(&self) -> &[ConfigKey] {
        &self.keys
    }

    /// The first setting under one of `prefixes` (a connector's own namespaces, e.g.
    /// `connection.`) that this definition does not declare: a misspelled setting, which would
    /// otherwise fall back to its default without a word.
    pub fn undeclared<'a>(&self, props: &'a Props, prefixes: &[&str]) -> Option<&'a str> {
        props.keys().map(String::as_str).find(|name| {
            prefixes.iter().any(|prefix| name.starts_with(prefix)) && self.key(name).is_none()
        })
    }

    pub fn key(&self, name: &str) -> Option<&ConfigKey> {
        self.keys.iter().find(|k| k.name == name)
    }

    pub fn groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = Vec::new();
        for group in self.keys.iter().filter_map(|k| k.group.clone()) {
            if !groups.contains(&group) {
                groups.push(group);
            }
        }
        groups
    }

    /// Validates every declared setting against `props`; one entry per declared setting.
    pub fn validate(&self, props: &Props) -> Vec<ConfigValue> {
        self.keys
            .iter()
            .map(|key| {
                let given = props.get(&key.name);
                let effective = given.or(key.default.as_ref());
                let mut errors = Vec::new();
                match effective {
                    None => errors.push(format!(
                        "Missing required configuration \"{}\" which has no default value.",
                        key.name
                    )),
                    Some(value) => {
                        if let Err(reason) = check_type(key.ty, value) {
                            errors.push(reason);
                        } else if let Some(Err(reason)) =
                            key.validator.as_ref().map(|v| check_with(v, key.ty, value))
                        {
                            errors.push(reason);
                        }
                    }
                }
                let shown = given.map(|v| {
                    if key.ty == ConfigType::Password {
                        "[hidden]".to_string()
                    } else {
                        v.clone()
                    }
                });
                ConfigValue {
                    name: key.name.clone(),
                    value: shown,
                    recommended_values: key
                        .validator
                        .as_ref()
                        .map(Validator::recommended)
                        .unwrap_or_default(),
                    errors,
                    visible: true,
                }
            })
            .collect()
    }

    /// Validates and returns typed access, or the first invalid setting as a config error.
    pub fn parse(&self, props: &Props) -> Result<ParsedConfig, ConnectError> {
        if let Some(bad) = self
            .validate(props)
            .into_iter()
            .find(|v| !v.errors.is_empty())
        {
            return Err(ConnectError::config(bad.name, bad.errors.join("; ")));
        }
        let mut values = props.clone();
        for key in &self.keys {
            if let Some(default) = &key.default {
                values
                    .entry(key.name.clone())
                    .or_insert_with(|| default.clone());
            }
        }
        Ok(ParsedConfig { values })
    }

    /// The names of the settings of type `Password`, whose values the API never shows.
    pub fn password_names(&self) -> impl Iterator<Item = &str> {
        self.keys
            .iter()
            .filter(|k| k.ty == ConfigType::Password)
            .map(|k| k.name.as_str())
    }
}

fn check_with(validator: &Validator, ty: ConfigType, value: &str) -> Result<(), String> {
    if ty == ConfigType::List {
        return split_list(value).try_for_each(|item| validator.check(item));
    }
    validator.check(value)
}

/// A number a range can be checked against. `f64` parses "NaN" and "inf", which compare false
/// with every bound and would pass any range.
fn finite(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(number) if number.is_finite() => Ok(number),
        Ok(_) => Err(format!("'{value}' is not a finite number")),
        Err(_) => Err(format!("'{value}' is not a number")),
    }
}

fn check_type(ty: ConfigType, value: &str) -> Result<(), String> {
    let trimmed = value.trim();
    let ok = match ty {
        // Parsing into the declared width rejects values that would overflow it.
        ConfigType::Int => trimmed.parse::<i32>().is_ok(),
        ConfigType::Long => trimmed.parse::<i64>().is_ok(),
        ConfigType::Double => match trimmed.parse::<f64>() {
            Ok(number) if !number.is_finite() => {
                return Err(format!(
                    "Invalid value {value} for configuration: expected a finite number"
                ));
            }
            parsed => parsed.is_ok(),
        },
        ConfigType::Boolean => {
            trimmed.eq_ignore_ascii_case("true") || trimmed.eq_ignore_ascii_case("false")
        }
        ConfigType::String | ConfigType::List | ConfigType::Password | ConfigType::Class => true,
    };
    if ok {
        Ok(())
    } else {
        let expected = match ty {
            ConfigType::Int => "a 32-bit integer",
            ConfigType::Long => "a 64-bit integer",
            ConfigType::Double => "a number",
            ConfigType::Boolean => "true or false",
            _ => "a string",
        };
        Err(format!(
            "Invalid value {value} for configuration: expected {expected}"
        ))
    }
}

fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Settings that passed validation, with defaults filled in, read by type.
#[derive(Clone, Default)]
pub struct ParsedConfig {
    values: Props,
}

impl fmt::Debug for ParsedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedConfig")
            .field("values", &SecretsHidden(&self.values))
            .finish()
    }
}

impl ParsedConfig {
    pub fn raw(&self) -> &Props {
        &self.values
    }

    pub fn string(&self, name: &str) -> Result<String, ConnectError> {
        self.values
            .get(name)
            .cloned()
            .ok_or_else(|| ConnectError::config(name, "not declared or missing"))
    }

    pub fn optional_string(&self, name: &str) -> Option<String> {
        self.values.get(name).filter(|v| !v.is_empty()).cloned()
    }

    /// An `Int` or `Long` setting.
    pub fn int(&self, name: &str) -> Result<i64, ConnectError> {
        self.parse_as(name)
    }

    /// An integer setting converted to the type the code uses (`u16` for a port, `usize` for
    /// a size, ...): a value that does not fit is a config error naming the setting, never a
    /// silent wrap-around.
    pub fn int_as<T: TryFrom<i64>>(&self, name: &str) -> Result<T, ConnectError> {
        let value = self.int(name)?;
        T::try_from(value).map_err(|_| {
            ConnectError::config(name, format!("{value} is out of range for this setting"))
        })
    }

    /// A setting in milliseconds; negative values are config errors.
    pub fn millis(&self, name: &str) -> Result<Duration, ConnectError> {
        self.int_as::<u64>(name).map(Duration::from_millis)
    }

    /// A `Double` setting; NaN and infinities are config errors.
    pub fn double(&self, name: &str) -> Result<f64, ConnectError> {
        let raw = self.string(name)?;
        finite(&raw).map_err(|reason| ConnectError::config(name, reason))
    }

    pub fn boolean(&self, name: &str) -> Result<bool, ConnectError> {
        Ok(self.string(name)?.trim().eq_ignore_ascii_case("true"))
    }

    pub fn list(&self, name: &str) -> Result<Vec<String>, ConnectError> {
        Ok(split_list(&self.string(name)?)
            .map(str::to_string)
            .collect())
    }

    fn parse_as<T: std::str::FromStr>(&self, name: &str) -> Result<T, ConnectError> {
        let raw = self.string(name)?;
        raw.trim()
            .parse()
            .map_err(|_| ConnectError::config(name, format!("'{raw}' is not a number")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> ConfigDef {
        ConfigDef::new()
            .define_required(
                "topic",
                ConfigType::String,
                Importance::High,
                "Target topic.",
            )
            .with_validator(Validator::NonEmpty)
            .define(
                "rate",
                ConfigType::Double,
                "10",
                Importance::Medium,
                "Records per second.",
            )
            .with_validator(Validator::at_least(0.0))
            .define("mode", ConfigType::String, "a", Importance::Low, "Mode.")
            .with_validator(Validator::OneOf(vec!["a", "b"]))
            .define(
                "secret",
                ConfigType::Password,
                "",
                Importance::Low,
                "A secret.",
            )
    }

    use crate::props_from as props;

    #[test]
    fn a_missing_required_setting_is_reported_by_name() {
        let error = def().parse(&props(&[])).unwrap_err();
        assert!(matches!(error, ConnectError::Config { ref field, .. } if field == "topic"));
    }

    #[test]
    fn type_range_and_choice_errors_name_the_setting_and_reason() {
        let results = def().validate(&props(&[("topic", "t"), ("rate", "-1"), ("mode", "c")]));
        let errors = |n: &str| results.iter().find(|v| v.name == n).unwrap().errors.clone();
        assert_eq!(errors("rate"), vec!["must be at least 0".to_string()]);
        assert_eq!(errors("mode"), vec!["must be one of a, b".to_string()]);
        assert!(errors("topic").is_empty());
        let results = def().validate(&props(&[("topic", "t"), ("rate", "fast")]));
        assert!(results[1].errors[0].contains("expected a number"));
    }

    #[test]
    fn parsed_values_have_defaults_and_types() {
        let parsed = def().parse(&props(&[("topic", "vitals")])).unwrap();
        assert_eq!(parsed.string("topic").unwrap(), "vitals");
        assert_eq!(parsed.double("rate").unwrap(), 10.0);
    }

    fn errors_of(results: &[ConfigValue], name: &str) -> Vec<String> {
        results
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.errors.clone())
            .unwrap_or_default()
    }

    #[test]
    fn doubles_reject_nan_and_infinities_by_name() {
        for bad in ["NaN", "nan", "inf", "-inf", "infinity", "1e400", "-1e999"] {
            let results = def().validate(&props(&[("topic", "t"), ("rate", bad)]));
            let errors = errors_of(&results, "rate");
            assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
            assert!(errors[0].contains("finite number"), "{bad}: {errors:?}");
            let error = def()
                .parse(&props(&[("topic", "t"), ("rate", bad)]))
                .unwrap_err();
            assert!(
                matches!(error, ConnectError::Config { ref field, .. } if field == "rate"),
                "{bad}: {error:?}"
            );
        }
        for good in ["0", "1e-300", "1.5", " 3 "] {
            let results = def().validate(&props(&[("topic", "t"), ("rate", good)]));
            assert!(errors_of(&results, "rate").is_empty(), "{good}");
        }
    }

    #[test]
    fn ranges_reject_nan_and_infinities_whatever_the_declared_type() {
        // A range on a string-typed setting sees the raw text, NaN included.
        for bad in ["NaN", "inf", "-inf"] {
            assert!(Validator::at_least(0.0).check(bad).is_err(), "{bad}");
            assert!(Validator::between(0.0, 10.0).check(bad).is_err(), "{bad}");
        }
        let levels = ConfigDef::new()
            .define("level", ConfigType::String, "1", Importance::Low, "Level.")
            .with_validator(Validator::between(0.0, 10.0));
        let results = levels.validate(&props(&[("level", "NaN")]));
        assert_eq!(
            errors_of(&results, "level"),
            vec!["'NaN' is not a finite number".to_string()]
        );
        assert_eq!(Validator::between(0.0, 10.0).check("10"), Ok(()));
    }

    #[test]
    fn integers_that_overflow_their_width_are_rejected_by_name() {
        let widths = ConfigDef::new()
            .define("small", ConfigType::Int, "1", Importance::Low, "An int.")
            .define("big", ConfigType::Long, "1", Importance::Low, "A long.");
        let results = widths.validate(&props(&[
            ("small", "2147483648"),
            ("big", "9223372036854775808"),
        ]));
        assert!(errors_of(&results, "small")[0].contains("32-bit"));
        assert!(errors_of(&results, "big")[0].contains("64-bit"));
        for bad in ["1e3", "NaN", "1.5", "-2147483649"] {
            let results = widths.validate(&props(&[("small", bad)]));
            assert_eq!(errors_of(&results, "small").len(), 1, "{bad}");
        }
        let results = widths.validate(&props(&[("small", "2147483647"), ("big", "-1")]));
        assert!(results.iter().all(|v| v.errors.is_empty()));
    }

    #[test]
    fn typed_reads_never_wrap_around() {
        let widths = ConfigDef::new()
            .define("port", ConfigType::Int, "70000", Importance::Low, "A port.")
            .define(
                "wait.ms",
                ConfigType::Long,
                "-5",
                Importance::Low,
                "A wait.",
            )
            .define(
                "ok.ms",
                ConfigType::Long,
                "1500",
                Importance::Low,
                "A wait.",
            );
        let parsed = widths.parse(&props(&[])).unwrap();
        let port = parsed.int_as::<u16>("port").unwrap_err();
        assert!(matches!(port, ConnectError::Config { ref field, .. } if field == "port"));
        let wait = parsed.millis("wait.ms").unwrap_err();
        assert!(matches!(wait, ConnectError::Config { ref field, .. } if field == "wait.ms"));
        assert_eq!(parsed.millis("ok.ms").unwrap(), Duration::from_millis(1500));
        assert_eq!(parsed.int_as::<u32>("port").unwrap(), 70_000);
    }

    #[test]
    fn passwords_are_hidden_in_validation_results() {
        let results = def().validate(&props(&[("topic", "t"), ("secret", "hunter2")]));
        let secret = results.iter().find(|v| v.name == "secret").unwrap();
        assert_eq!(secret.value.as_deref(), Some("[hidden]"));
    }
}
