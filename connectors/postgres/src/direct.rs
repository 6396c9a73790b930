//! The common case's row path: a record's top-level JSON object read field by field as
//! borrowed raw text, and each value written straight into COPY's text format, without a
//! `serde_json::Value` per cell. The text written is the same as [`crate::sql::param_owned`]
//! then [`crate::sql::copy_rows`] give (tested below against them), so COPY gets the same rows
//! as by the general path.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Number, Value};

use std::io::Write as _;

use medconnect_api::SinkRecord;

use crate::config::{
    FieldFilter, InsertMode, KAFKA_OFFSET_COLUMN, KAFKA_PARTITION_COLUMN, KAFKA_TOPIC_COLUMN,
    PkMode, SinkConfig, ValueMode,
};
use crate::row::check_identifier;
use crate::scan;
use crate::schema::{ColumnType, is_timestamp};

/// One field of a record's object: its name (borrowed unless it had escapes) and its value's
/// JSON text, as in the record.
pub type Field<'a> = (Cow<'a, str>, &'a str);

/// Reads `bytes` as one JSON object, appending its fields to `out` in their order. `None`
/// when they are not one (or not UTF-8): the general path then says what is wrong (its
/// messages name the JSON kind).
pub fn fields<'a>(bytes: &'a [u8], out: &mut Vec<Field<'a>>) -> Option<()> {
    // UTF-8 checked once for the whole record: reading from a `str`, serde_json checks
    // neither each string nor each raw value again.
    let text = std::str::from_utf8(bytes).ok()?;
    let start = out.len();
    if scan::flat_object(text, out).is_some() {
        return Some(());
    }
    out.truncate(start);
    serde_fields(text, out)
}

/// [`fields`] by serde_json, for any object.
pub fn serde_fields<'a>(text: &'a str, out: &mut Vec<Field<'a>>) -> Option<()> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    Fields(out).deserialize(&mut deserializer).ok()?;
    deserializer.end().ok()
}

struct Fields<'a, 'o>(&'o mut Vec<Field<'a>>);

impl<'de> DeserializeSeed<'de> for Fields<'de, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Fields<'de, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key_seed(Name)? {
            let value: &'de RawValue = map.next_value()?;
            self.0.push((name, value.get()));
        }
        Ok(())
    }
}

/// A field name, borrowed from the input when it has no escapes.
struct Name;

impl<'de> DeserializeSeed<'de> for Name {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Name {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(name))
    }

    fn visit_str<E>(self, name: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(name.to_string()))
    }

    fn visit_string<E>(self, name: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(name))
    }
}

/// The key columns of the configurations the direct path writes: columns mode, `insert` or
/// `upsert`, no key or the `kafka` key (the rows go by COPY first). `None` for the others.
pub fn key_columns(config: &SinkConfig) -> Option<&'static [&'static str]> {
    if config.value_mode != ValueMode::Columns || config.insert_mode == InsertMode::Update {
        return None;
    }
    match config.pk_mode {
        PkMode::None => Some(&[]),
        PkMode::Kafka => Some(&[
            KAFKA_TOPIC_COLUMN,
            KAFKA_PARTITION_COLUMN,
            KAFKA_OFFSET_COLUMN,
        ]),
        _ => None,
    }
}

/// Reads a record's value as the general path makes its columns: the fields of its object
/// kept by `filter`, without the `key`'s columns, sorted by name, the last of a repeated
/// name. `false` when the general path must say what is wrong (not one object, no column at
/// all, a name PostgreSQL cannot take).
pub fn read_row<'a>(
    bytes: &'a [u8],
    filter: &FieldFilter,
    key: &[&str],
    out: &mut Vec<Field<'a>>,
) -> bool {
    out.clear();
    let readable = fields(bytes, out).is_some();
    columns(out, filter, key) && readable
}

/// Makes a record's fields, as read, the columns of [`read_row`]; `false` as it says.
pub fn columns(out: &mut Vec<Field<'_>>, filter: &FieldFilter, key: &[&str]) -> bool {
    out.retain(|(name, _)| filter.keeps(name) && !key.contains(&name.as_ref()));
    out.sort_by(|a, b| a.0.cmp(&b.0));
    if out
        .windows(2)
        .any(|pair| matches!(pair, [a, b] if a.0 == b.0))
    {
        out.reverse();
        out.dedup_by(|later, earlier| later.0 == earlier.0);
        out.reverse();
    }
    (!key.is_empty() || !out.is_empty())
        && out
            .iter()
            .all(|(name, _)| check_identifier("column", name).is_ok())
}

/// Appends one row of COPY text: the `kafka` key's columns when `keyed` (topic, partition,
/// offset), then `values`; `json` says, column by column, which are `json`/`jsonb`.
pub fn render_row<'v>(
    out: &mut Vec<u8>,
    record: &SinkRecord,
    keyed: bool,
    values: impl Iterator<Item = &'v str>,
    json: &[bool],
) -> Result<(), serde_json::Error> {
    let mut json = json.iter().copied();
    if keyed {
        let topic = &record.record.topic;
        if json.next() == Some(true) {
            escape(out, &Value::from(topic.as_str()).to_string());
        } else {
            escape(out, topic);
        }
        json.next();
        json.next();
        // Writing into a Vec cannot fail.
        let _ = write!(out, "\t{}\t{}", record.kafka_partition, record.kafka_offset);
    }
    for (n, raw) in values.enumerate() {
        if n > 0 || keyed {
            out.push(b'\t');
        }
        render(out, raw, json.next() == Some(true))?;
    }
    out.push(b'\n');
    Ok(())
}

/// A string's text between its quotes when it has no escape (then it is the string itself).
fn unescaped(raw: &str) -> Option<&str> {
    // Bytes compared one by one: `strip_prefix('"')` and `contains('\\')` were library
    // calls per value in the dev profile (a sixth of the streamed rows' time in a profile).
    let bytes = raw.as_bytes();
    if bytes.len() < 2 || bytes.first() != Some(&b'"') || bytes.last() != Some(&b'"') {
        return None;
    }
    let inner = raw.get(1..raw.len() - 1)?;
    (!inner.bytes().any(|b| b == b'\\')).then_some(inner)
}

/// The type a column would be created with for this value ([`ColumnType::infer_with`]);
/// `None` for null, which says nothing.
pub fn infer(text: &str, timestamps: bool) -> Result<Option<ColumnType>, serde_json::Error> {
    Ok(match text.as_bytes().first() {
        Some(b'n') => None,
        Some(b't' | b'f') => Some(ColumnType::Boolean),
        Some(b'{' | b'[') => Some(ColumnType::Jsonb),
        Some(b'"') if !timestamps => Some(ColumnType::Text),
        Some(b'"') => {
            let string: Cow<str> = match unescaped(text) {
                Some(inner) => Cow::Borrowed(inner),
                None => Cow::Owned(serde_json::from_str::<String>(text)?),
            };
            Some(if is_timestamp(&string) {
                ColumnType::Timestamptz
            } else {
                ColumnType::Text
            })
        }
        _ => Some(ColumnType::infer(&Value::Number(serde_json::from_str::<
            Number,
        >(text)?))),
    })
}

/// An integer that serde_json reads as an `i64` and prints back unchanged (`-0` aside, which
/// it does not).
fn plain_integer(text: &str) -> bool {
    let bytes = text.as_bytes();
    let digits = match bytes.split_first() {
        Some((b'-', rest)) => rest,
        _ => bytes,
    };
    !digits.is_empty()
        && digits.len() <= 18
        && digits.iter().all(u8::is_ascii_digit)
        && bytes != b"-0"
}

/// A decimal that serde_json reads as an `f64` and prints back unchanged: `[-]I.F`, no
/// exponent, `F` not ending in 0, at most 15 significant digits (serde_json reads them with
/// one rounding, and the shortest text that reads back as that double is then this one)
/// and, below 1, at most four zeros after the point (from 1e-5 on it prints no exponent).
/// Parsing and printing such a number was a twentieth of the streamed rows' client time.
fn plain_decimal(text: &str) -> bool {
    let bytes = text.as_bytes();
    let unsigned = match bytes.split_first() {
        Some((b'-', rest)) => rest,
        _ => bytes,
    };
    let Some(point) = unsigned.iter().position(|b| *b == b'.') else {
        return false;
    };
    let (int, frac) = unsigned.split_at(point);
    let frac = frac.get(1..).unwrap_or_default();
    if int.is_empty()
        || frac.is_empty()
        || !int.iter().all(u8::is_ascii_digit)
        || !frac.iter().all(u8::is_ascii_digit)
        || frac.last() == Some(&b'0')
    {
        return false;
    }
    let significant = if int == b"0" {
        let zeros = frac.iter().take_while(|b| **b == b'0').count();
        if zeros > 4 {
            return false;
        }
        frac.len() - zeros
    } else if int.first() == Some(&b'0') {
        return false;
    } else {
        int.len() + frac.len()
    };
    significant <= 15
}

/// Appends `text` with COPY's escapes (backslash, tab, newline, carriage return).
pub fn escape(out: &mut Vec<u8>, text: &str) {
    if !text
        .bytes()
        .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
    {
        out.extend_from_slice(text.as_bytes());
        return;
    }
    for byte in text.bytes() {
        match byte {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            other => out.push(other),
        }
    }
}

/// Appends one value as a COPY field for a column that is JSON (`json`) or not: null is
/// `\N`, a string for a non-JSON column its text, anything else its JSON text as serde_json
/// prints it.
pub fn render(out: &mut Vec<u8>, text: &str, json: bool) -> Result<(), serde_json::Error> {
    match text.as_bytes().first() {
        Some(b'n') => out.extend_from_slice(b"\\N"),
        // `true`/`false`, as printed.
        Some(b't' | b'f') => out.extend_from_slice(text.as_bytes()),
        Some(b'"') => match unescaped(text) {
            // No escape: nothing COPY reads specially either (JSON has no raw control
            // characters), and serde_json would print it back as it is.
            Some(inner) if !json => out.extend_from_slice(inner.as_bytes()),
            Some(_) => out.extend_from_slice(text.as_bytes()),
            None => {
                let string = serde_json::from_str::<String>(text)?;
                if json {
                    escape(out, &Value::String(string).to_string());
                } else {
                    escape(out, &string);
                }
            }
        },
        Some(b'{' | b'[') => escape(out, &serde_json::from_str::<Value>(text)?.to_string()),
        _ if plain_integer(text) || plain_decimal(text) => out.extend_from_slice(text.as_bytes()),
        _ => out.extend_from_slice(serde_json::from_str::<Number>(text)?.to_string().as_bytes()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::{copy_rows, param_owned};

    /// The general path's COPY field for a value.
    fn general(raw: &str, json: bool) -> String {
        let value: Value = serde_json::from_str(raw).expect("JSON");
        let rows = copy_rows(&[vec![param_owned(value, json)]], 1);
        String::from_utf8(rows)
            .expect("UTF-8")
            .trim_end_matches('\n')
            .to_string()
    }

    #[test]
    fn fields_render_as_the_general_path_renders_them() {
        let values = [
            "null",
            "true",
            "false",
            "0",
            "-0",
            "42",
            "-17",
            "123456789012345678",
            "9223372036854775807",
            "18446744073709551615",
            "123456789012345678901234567890",
            "36.6",
            "1.50",
            "1e2",
            "-2.5E-3",
            "0.1000000000000000055",
            r#""""#,
            r#""plain text""#,
            r#""tab\there""#,
            r#""line\nbreak\r\\ \" \/ \u00e9 \u0000""#,
            r#""é ünïcode""#,
            r#"{"b":1,"a":[1,"x\ty",null],"c":{"d":"\n"}}"#,
            r#"[ 1 , 2.50 , "a" ]"#,
            "[]",
            "{}",
        ];
        for raw in values {
            for json in [false, true] {
                let value: Box<RawValue> = serde_json::from_str(raw).expect("JSON");
                let mut out = Vec::new();
                render(&mut out, value.get(), json).expect("rendered");
                assert_eq!(
                    String::from_utf8(out).expect("UTF-8"),
                    general(raw, json),
                    "{raw} json={json}"
                );
            }
        }
    }

    #[test]
    fn decimals_printed_as_read_are_the_general_paths() {
        // Every length of integer and fraction part, zeros where they matter, other digits
        // from a fixed pseudo-random sequence.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut digit = |from: u8| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            char::from(b'0' + from + ((seed >> 33) % u64::from(10 - from)) as u8)
        };
        let mut texts = Vec::new();
        for int_len in 0..=17 {
            for frac_len in 1..=18 {
                for zeros in [0, 1, 4, 5, 7] {
                    for round in 0..6 {
                        let mut text = String::new();
                        if round % 2 == 1 {
                            text.push('-');
                        }
                        if int_len == 0 {
                            text.push('0');
                        } else {
                            text.push(digit(1));
                            (1..int_len).for_each(|_| text.push(digit(0)));
                        }
                        text.push('.');
                        if int_len == 0 {
                            (0..zeros).for_each(|_| text.push('0'));
                        }
                        (0..frac_len).for_each(|_| text.push(digit(0)));
                        if round >= 4 {
                            text.push('0');
                        }
                        texts.push(text);
                    }
                }
            }
        }
        let mut fast = 0;
        for text in &texts {
            let value: Box<RawValue> = serde_json::from_str(text).expect("JSON");
            let mut out = Vec::new();
            render(&mut out, value.get(), false).expect("rendered");
            assert_eq!(
                String::from_utf8(out).expect("UTF-8"),
                general(text, false),
                "{text}"
            );
            fast += usize::from(plain_decimal(text));
        }
        assert!(fast > texts.len() / 5, "{fast} of {}", texts.len());
    }

    #[test]
    fn types_are_inferred_as_from_values() {
        for raw in [
            "null",
            "true",
            "7",
            "-0",
            "18446744073709551615",
            "1e400",
            "2.5",
            r#""x""#,
            r#""2024-01-01T12:00:00Z""#,
            r#""2024-01-01T12:00:00\u005a""#,
            r#""2024-01-01T12:00:00""#,
            "[1]",
            r#"{"a":1}"#,
        ] {
            for timestamps in [false, true] {
                let value: Value = serde_json::from_str(raw).unwrap_or(Value::Null);
                let expected =
                    (!value.is_null()).then(|| ColumnType::infer_with(&value, timestamps));
                let parsed: Result<Box<RawValue>, _> = serde_json::from_str(raw);
                let Ok(parsed) = parsed else {
                    continue;
                };
                match infer(parsed.get(), timestamps) {
                    Ok(ty) => assert_eq!(ty, expected, "{raw}"),
                    // A number serde_json cannot read as a value is refused by both paths.
                    Err(_) => assert!(serde_json::from_str::<Value>(raw).is_err(), "{raw}"),
                }
            }
        }
    }

    #[test]
    fn objects_are_read_field_by_field_and_anything_else_refused() {
        let mut out = Vec::new();
        fields(br#" {"a":1, "b\"c":{"x":[1]}, "a":null} "#, &mut out).expect("an object");
        let read: Vec<(&str, &str)> = out.iter().map(|(n, v)| (n.as_ref(), *v)).collect();
        assert_eq!(read, [("a", "1"), ("b\"c", r#"{"x":[1]}"#), ("a", "null")]);
        assert!(matches!(out.first(), Some((Cow::Borrowed(_), _))));
        assert!(fields(b"{\"a\":\"\xff\"}", &mut out).is_none());
        for bad in ["[1]", "1", "\"x\"", "{\"a\":}", "{} {}", "not json", ""] {
            let mut out = Vec::new();
            assert!(fields(bad.as_bytes(), &mut out).is_none(), "{bad}");
        }
    }
}
