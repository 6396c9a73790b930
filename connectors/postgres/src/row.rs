//! A sink record read as a change to a table: a row to write, or a key to delete.

use medconnect_api::{ConnectError, SinkRecord, content_type};
use serde_json::{Map, Value};

use crate::config::{
    KAFKA_OFFSET_COLUMN, KAFKA_PARTITION_COLUMN, KAFKA_TOPIC_COLUMN, PkMode, SinkConfig, ValueMode,
};
use crate::schema::ColumnType;
use crate::table::MAX_IDENTIFIER_BYTES;

/// One column's value, with the type the column would be created with.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub column: String,
    pub value: Value,
    pub ty: ColumnType,
}

impl Cell {
    fn inferred(column: impl Into<String>, value: Value) -> Self {
        let ty = ColumnType::infer(&value);
        Self {
            column: column.into(),
            value,
            ty,
        }
    }

    /// With ISO-8601 strings typed `timestamptz` when `timestamps`.
    fn inferred_with(column: impl Into<String>, value: Value, timestamps: bool) -> Self {
        let ty = ColumnType::infer_with(&value, timestamps);
        Self {
            column: column.into(),
            value,
            ty,
        }
    }
}

/// A row: its key columns (in `pk.fields` order, empty with `pk.mode=none`) and the others
/// (sorted by name, so records of one shape share one statement).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: Vec<Cell>,
    pub others: Vec<Cell>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Write(Row),
    /// A tombstone with `delete.enabled`: the key of the row to delete.
    Delete(Vec<Cell>),
    /// Nothing to do (a tombstone without `delete.enabled`).
    Skip(&'static str),
}

fn data(message: impl Into<String>) -> ConnectError {
    ConnectError::data(message)
}

/// A name PostgreSQL takes as is: not empty, no NUL, not truncated.
pub fn check_identifier(what: &str, name: &str) -> Result<(), ConnectError> {
    if name.is_empty() {
        return Err(data(format!("{what} name is empty")));
    }
    if name.contains('\0') {
        return Err(data(format!("{what} name contains a NUL character")));
    }
    if name.len() > MAX_IDENTIFIER_BYTES {
        return Err(data(format!(
            "{what} name is longer than PostgreSQL's {MAX_IDENTIFIER_BYTES} bytes"
        )));
    }
    Ok(())
}

fn parse_json(bytes: &[u8], what: &str) -> Result<Value, ConnectError> {
    // serde_json's messages give a line and column, never the input.
    serde_json::from_slice(bytes).map_err(|e| data(format!("the {what} is not JSON: {e}")))
}

fn object(value: Value, what: &str) -> Result<Map<String, Value>, ConnectError> {
    match value {
        Value::Object(map) => Ok(map),
        other => Err(data(format!(
            "the {what} is a JSON {}, not an object with one field per column",
            kind(&other)
        ))),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The named fields of `map` as key cells; each must be there and not null.
fn key_fields(
    map: &Map<String, Value>,
    fields: &[String],
    what: &str,
) -> Result<Vec<Cell>, ConnectError> {
    fields
        .iter()
        .map(|field| match map.get(field) {
            None | Some(Value::Null) => Err(data(format!(
                "the {what} has no value for the primary key field \"{field}\""
            ))),
            Some(value) => Ok(Cell::inferred(field.clone(), value.clone())),
        })
        .collect()
}

/// The key columns of a record under `pk.mode`; the value is needed for `record_value`.
fn key_of(
    record: &SinkRecord,
    mode: &PkMode,
    value: Option<&Map<String, Value>>,
) -> Result<Vec<Cell>, ConnectError> {
    match mode {
        PkMode::None => Ok(Vec::new()),
        PkMode::Kafka => Ok(vec![
            Cell::inferred(KAFKA_TOPIC_COLUMN, Value::from(record.record.topic.clone())),
            Cell {
                column: KAFKA_PARTITION_COLUMN.into(),
                value: Value::from(record.kafka_partition),
                ty: ColumnType::Integer,
            },
            Cell::inferred(KAFKA_OFFSET_COLUMN, Value::from(record.kafka_offset)),
        ]),
        PkMode::RecordValue { fields } => match value {
            Some(map) => key_fields(map, fields, "value"),
            None => Err(data("pk.mode=record_value needs a value")),
        },
        PkMode::RecordKey { fields } => {
            let bytes = record
                .record
                .key
                .as_ref()
                .ok_or_else(|| data("pk.mode=record_key needs a record key"))?;
            // A key that is not JSON is taken as a string (keys are often plain ids).
            let key = serde_json::from_slice::<Value>(bytes).or_else(|_| {
                std::str::from_utf8(bytes)
                    .map(|s| Value::String(s.to_string()))
                    .map_err(|_| data("the record key is neither JSON nor UTF-8 text"))
            })?;
            match key {
                Value::Object(map) if fields.is_empty() => {
                    let mut names: Vec<String> = map.keys().cloned().collect();
                    names.sort();
                    key_fields(&map, &names, "key")
                }
                Value::Object(map) => key_fields(&map, fields, "key"),
                Value::Null => Err(data("the record key is null")),
                primitive => match fields.as_slice() {
                    [column] => Ok(vec![Cell::inferred(column.clone(), primitive)]),
                    _ => Err(data(
                        "a primitive record key needs exactly one column name in pk.fields",
                    )),
                },
            }
        }
    }
}

/// The whole value as text in `value.column` (HL7 v2 messages, `value.mode=text`).
fn text_row(record: &SinkRecord, bytes: &[u8], config: &SinkConfig) -> Result<Row, ConnectError> {
    let text = std::str::from_utf8(bytes).map_err(|_| data("the value is not UTF-8 text"))?;
    Ok(Row {
        key: key_of(record, &config.pk_mode, None)?,
        others: vec![Cell {
            column: config.value_column.clone(),
            value: Value::String(text.to_string()),
            ty: ColumnType::Text,
        }],
    })
}

/// Reads a record as a change. An error concerns this record alone.
pub fn change_of(record: &SinkRecord, config: &SinkConfig) -> Result<Change, ConnectError> {
    let Some(bytes) = &record.record.value else {
        if !config.delete_enabled {
            return Ok(Change::Skip("tombstone and delete.enabled=false"));
        }
        let key = key_of(record, &config.pk_mode, None)?;
        for cell in &key {
            check_identifier("column", &cell.column)?;
        }
        return Ok(Change::Delete(key));
    };
    let hl7 = record.record.content_type() == Some(content_type::HL7_V2);
    let row = match config.value_mode {
        ValueMode::Text => text_row(record, bytes, config)?,
        ValueMode::Columns if hl7 => text_row(record, bytes, config)?,
        ValueMode::Jsonb => Row {
            key: key_of(record, &config.pk_mode, None)?,
            others: vec![Cell {
                column: config.value_column.clone(),
                value: parse_json(bytes, "value")?,
                ty: ColumnType::Jsonb,
            }],
        },
        ValueMode::Columns => {
            let map = object(parse_json(bytes, "value")?, "value")?;
            let key = key_of(record, &config.pk_mode, Some(&map))?;
            let mut others: Vec<Cell> = map
                .into_iter()
                .filter(|(field, _)| config.fields.keeps(field))
                .filter(|(field, _)| !key.iter().any(|k| &k.column == field))
                .map(|(field, value)| Cell::inferred_with(field, value, config.timestamptz))
                .collect();
            others.sort_by(|a, b| a.column.cmp(&b.column));
            Row { key, others }
        }
    };
    for cell in row.key.iter().chain(&row.others) {
        check_identifier("column", &cell.column)?;
    }
    Ok(Change::Write(row))
}

#[cfg(test)]
mod tests {
    use super::*;
    use medconnect_api::{Props, Record};
    use serde_json::json;

    fn config(pairs: &[(&str, &str)]) -> SinkConfig {
        let mut props: Props = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        props.insert("connection.url".into(), "postgres://db/x".into());
        SinkConfig::parse(&props).expect("valid")
    }

    fn record(key: Option<&str>, value: Option<&str>) -> SinkRecord {
        let mut record = Record::new("vitals");
        record.key = key.map(|k| k.to_string().into());
        record.value = value.map(|v| v.to_string().into());
        SinkRecord {
            record,
            kafka_partition: 2,
            kafka_offset: 7,
        }
    }

    fn columns(cells: &[Cell]) -> Vec<&str> {
        cells.iter().map(|c| c.column.as_str()).collect()
    }

    #[test]
    fn fields_become_sorted_columns_beside_the_key() {
        let config = config(&[("pk.mode", "record_value"), ("pk.fields", "id")]);
        let Ok(Change::Write(row)) =
            change_of(&record(None, Some(r#"{"z":1,"id":5,"a":"x"}"#)), &config)
        else {
            panic!("a row");
        };
        assert_eq!(columns(&row.key), ["id"]);
        assert_eq!(columns(&row.others), ["a", "z"]);
        let missing = change_of(&record(None, Some(r#"{"a":1}"#)), &config);
        assert!(matches!(missing, Err(ConnectError::Data(_))), "{missing:?}");
    }

    #[test]
    fn kafka_keys_name_the_records_position() {
        let config = config(&[("pk.mode", "kafka"), ("insert.mode", "upsert")]);
        let Ok(Change::Write(row)) = change_of(&record(None, Some(r#"{"a":1}"#)), &config) else {
            panic!("a row");
        };
        let values: Vec<&Value> = row.key.iter().map(|c| &c.value).collect();
        assert_eq!(values, [&json!("vitals"), &json!(2), &json!(7)]);
        assert_eq!(row.key[1].ty, ColumnType::Integer);
    }

    #[test]
    fn record_keys_object_or_primitive() {
        let by_object = config(&[("pk.mode", "record_key"), ("delete.enabled", "true")]);
        let Ok(Change::Delete(key)) =
            change_of(&record(Some(r#"{"b":1,"a":2}"#), None), &by_object)
        else {
            panic!("a delete");
        };
        assert_eq!(columns(&key), ["a", "b"]);
        let primitive = change_of(&record(Some("PAT123"), Some("{}")), &by_object);
        assert!(
            matches!(primitive, Err(ConnectError::Data(_))),
            "{primitive:?}"
        );
        let by_name = config(&[("pk.mode", "record_key"), ("pk.fields", "patient")]);
        let Ok(Change::Write(row)) = change_of(&record(Some("PAT123"), Some("{}")), &by_name)
        else {
            panic!("a row");
        };
        assert_eq!(row.key[0].value, json!("PAT123"));
        let skipped = change_of(&record(Some("PAT123"), None), &by_name);
        assert!(matches!(skipped, Ok(Change::Skip(_))), "{skipped:?}");
    }

    #[test]
    fn hl7_values_and_text_mode_go_to_a_text_column() {
        let columns = config(&[("pk.mode", "kafka"), ("insert.mode", "upsert")]);
        let mut hl7 = record(None, Some("MSH|^~\\&|EPIC\rPID|1||P1\r"));
        hl7.record
            .headers
            .add(content_type::HEADER, content_type::HL7_V2);
        let Ok(Change::Write(row)) = change_of(&hl7, &columns) else {
            panic!("a row");
        };
        assert_eq!(columns_of_row(&row), ["value"]);
        assert_eq!(row.others[0].ty, ColumnType::Text);
        let text = config(&[("value.mode", "text"), ("value.column", "line")]);
        let Ok(Change::Write(row)) = change_of(&record(None, Some("a,b,c")), &text) else {
            panic!("a row");
        };
        assert_eq!(row.others[0].column, "line");
        assert_eq!(row.others[0].value, json!("a,b,c"));
        let timestamps = config(&[("auto.create.timestamptz", "true")]);
        let Ok(Change::Write(row)) = change_of(
            &record(None, Some(r#"{"at":"2024-01-01T12:00:00Z"}"#)),
            &timestamps,
        ) else {
            panic!("a row");
        };
        assert_eq!(row.others[0].ty, ColumnType::Timestamptz);
    }

    fn columns_of_row(row: &Row) -> Vec<&str> {
        row.others.iter().map(|c| c.column.as_str()).collect()
    }

    #[test]
    fn jsonb_mode_keeps_the_whole_value_and_filters_apply_to_columns() {
        let jsonb = config(&[("value.mode", "jsonb")]);
        let Ok(Change::Write(row)) = change_of(&record(None, Some(r#"[1,2]"#)), &jsonb) else {
            panic!("a row");
        };
        assert_eq!(row.others[0].column, "value");
        assert_eq!(row.others[0].ty, ColumnType::Jsonb);
        let filtered = config(&[("fields.exclude", "ssn")]);
        let Ok(Change::Write(row)) =
            change_of(&record(None, Some(r#"{"ssn":"1","hr":80}"#)), &filtered)
        else {
            panic!("a row");
        };
        assert_eq!(columns(&row.others), ["hr"]);
        for bad in ["[1]", "not json", r#"{"":1}"#] {
            let error = change_of(&record(None, Some(bad)), &filtered);
            assert!(
                matches!(error, Err(ConnectError::Data(_))),
                "{bad}: {error:?}"
            );
        }
    }
}
