//! Shared plumbing of the field-level transforms: which part of the record they work on, reading
//! and writing that part as a JSON object, Connect's `field.syntax.version` paths, and the
//! byte form of a JSON value in a header or a key.

use bytes::Bytes;
use medconnect_api::{ConnectResult, Record, Validator};
use serde_json::{Map, Value};

use super::json_object;

/// The part of the record a `$Key` / `$Value` transform works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JsonPart {
    Key,
    Value,
}

impl JsonPart {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Value => "value",
        }
    }

    pub(crate) fn bytes(self, record: &Record) -> Option<&Bytes> {
        match self {
            Self::Key => record.key.as_ref(),
            Self::Value => record.value.as_ref(),
        }
    }

    pub(crate) fn set(self, record: &mut Record, bytes: Option<Bytes>) {
        match self {
            Self::Key => record.key = bytes,
            Self::Value => record.value = bytes,
        }
    }

    /// The part as a JSON object; anything else is a data error for this one record.
    pub(crate) fn object(self, record: &Record) -> ConnectResult<Map<String, Value>> {
        json_object(self.bytes(record), self.name())
    }

    pub(crate) fn set_object(self, record: &mut Record, object: Map<String, Value>) {
        self.set(record, Some(Bytes::from(Value::Object(object).to_string())));
    }
}

/// The byte form of a JSON value where Kafka wants bytes (a header, an extracted key): strings
/// as their raw text, so `MRN123` stays readable and comparable by other Kafka tools; `null` as
/// no bytes at all; anything else as its JSON text.
pub(crate) fn raw_bytes(value: &Value) -> Option<Bytes> {
    match value {
        Value::Null => None,
        Value::String(text) => Some(Bytes::from(text.clone())),
        other => Some(Bytes::from(other.to_string())),
    }
}

/// Connect's `field.syntax.version` (KIP-821): `V1` reads a field name as is, `V2` reads dots as
/// nesting, with backticks quoting a name that contains dots (`` `a.b`.c ``).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldSyntax {
    V1,
    V2,
}

pub(crate) const FIELD_SYNTAX: &str = "field.syntax.version";
pub(crate) const FIELD_SYNTAX_DOC: &str = "V1: field names are plain names; V2: dots address nested fields, backticks quote names with dots.";

impl FieldSyntax {
    pub(crate) fn validator() -> Validator {
        Validator::custom(|v| Self::parse(v).map(|_| ()))
    }

    /// Case-insensitive, as in Connect.
    pub(crate) fn parse(value: &str) -> Result<Self, String> {
        match value.trim().to_ascii_uppercase().as_str() {
            "V1" => Ok(Self::V1),
            "V2" => Ok(Self::V2),
            _ => Err(format!("must be V1 or V2, not '{value}'")),
        }
    }

    /// Splits a field reference into its path segments; errors are reasons for a config error.
    pub(crate) fn path(self, field: &str) -> Result<Vec<String>, String> {
        match self {
            Self::V1 => Ok(vec![field.to_string()]),
            Self::V2 => v2_path(field),
        }
    }
}

fn v2_path(field: &str) -> Result<Vec<String>, String> {
    let mut segments = Vec::new();
    let mut current = String::new();
    let mut chars = field.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '`' if !quoted && current.is_empty() => quoted = true,
            '`' if quoted => {
                quoted = false;
                // A closing backtick must end the segment, as in Connect.
                if chars.peek().is_some_and(|n| *n != '.') {
                    return Err(format!(
                        "'{field}': a quoted name must be followed by '.' or the end"
                    ));
                }
            }
            '\\' if quoted && chars.peek() == Some(&'`') => {
                current.push('`');
                chars.next();
            }
            '.' if !quoted => segments.push(std::mem::take(&mut current)),
            other => current.push(other),
        }
    }
    if quoted {
        return Err(format!("'{field}': unclosed backtick"));
    }
    segments.push(current);
    if segments.iter().any(String::is_empty) {
        return Err(format!("'{field}': empty field name in path"));
    }
    Ok(segments)
}

/// The value at a path, if every segment but the last names an object.
pub(crate) fn get_path<'a>(object: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (last, parents) = path.split_last()?;
    let mut current = object;
    for segment in parents {
        current = current.get(segment)?.as_object()?;
    }
    current.get(last)
}

pub(crate) fn get_path_mut<'a>(
    object: &'a mut Map<String, Value>,
    path: &[String],
) -> Option<&'a mut Value> {
    let (last, parents) = path.split_last()?;
    let mut current = object;
    for segment in parents {
        current = current.get_mut(segment)?.as_object_mut()?;
    }
    current.get_mut(last)
}

/// A comma-separated list setting, trimmed, empty items dropped.
pub(crate) fn list(props: &medconnect_api::Props, name: &str) -> Vec<String> {
    props
        .get(name)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Connect's `NonEmptyListValidator`, for required list settings.
pub(crate) fn non_empty_list() -> Validator {
    Validator::custom(|v| {
        if v.split(',').any(|s| !s.trim().is_empty()) {
            Ok(())
        } else {
            Err("must name at least one item".to_string())
        }
    })
}

#[cfg(test)]
pub(crate) use medconnect_api::props_from as props;

/// Validates settings and builds the transform, as the chain does.
#[cfg(test)]
pub(crate) fn build(
    plugin: &super::TransformPlugin,
    pairs: &[(&str, &str)],
) -> ConnectResult<Box<dyn medconnect_api::Transform>> {
    let settings = props(pairs);
    (plugin.config_def)().parse(&settings)?;
    (plugin.create)(&settings)
}

/// The field a config error names, for the transforms' tests.
#[cfg(test)]
pub(crate) fn config_field(result: ConnectResult<Box<dyn medconnect_api::Transform>>) -> String {
    match result {
        Err(medconnect_api::ConnectError::Config { field, .. }) => field,
        Err(other) => panic!("expected a config error, got {other}"),
        Ok(_) => panic!("expected a config error, got a transform"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_paths_split_on_dots_and_honour_backticks() {
        assert_eq!(FieldSyntax::V2.path("a.b.c").unwrap(), vec!["a", "b", "c"]);
        assert_eq!(FieldSyntax::V2.path("`a.b`.c").unwrap(), vec!["a.b", "c"]);
        assert_eq!(FieldSyntax::V2.path("`x\\`y`").unwrap(), vec!["x`y"]);
        assert_eq!(FieldSyntax::V1.path("a.b").unwrap(), vec!["a.b"]);
        assert!(FieldSyntax::V2.path("a..b").is_err());
        assert!(FieldSyntax::V2.path("`a.b").is_err());
        assert!(FieldSyntax::V2.path("`a`b").is_err());
    }

    #[test]
    fn field_syntax_is_case_insensitive_and_closed() {
        assert_eq!(FieldSyntax::parse("v2"), Ok(FieldSyntax::V2));
        assert!(FieldSyntax::parse("V3").is_err());
    }

    #[test]
    fn raw_bytes_keep_strings_raw_and_serialize_the_rest() {
        assert_eq!(raw_bytes(&Value::from("MRN1")).unwrap(), "MRN1");
        assert_eq!(raw_bytes(&Value::from(72)).unwrap(), "72");
        assert_eq!(
            raw_bytes(&serde_json::json!({"a": [1]})).unwrap(),
            r#"{"a":[1]}"#
        );
        assert!(raw_bytes(&Value::Null).is_none());
    }
}
