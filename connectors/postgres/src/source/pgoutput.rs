//! Decoding of `pgoutput` (protocol version 1) change messages, and of PostgreSQL's text
//! output of a value into JSON. `Begin` and `Commit` are decoded by `pgwire-replication`; this
//! module reads what it hands over raw: relations, inserts, updates, deletes, truncates.

use serde_json::{Map, Number, Value};

/// A malformed message: the stream cannot be trusted past it.
#[derive(Debug, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(pub String);

/// A column of a relation, as the `Relation` message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    /// Part of the replica identity (the primary key by default).
    pub key: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub table: String,
    pub columns: Vec<Column>,
}

/// One column of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// A TOASTed value the update did not change: pgoutput does not send it.
    Unchanged,
    Text(String),
}

/// The old row of an update or delete: its replica identity columns (`K`) or all of them
/// (`O`, `REPLICA IDENTITY FULL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldRow {
    Key(Vec<Datum>),
    Full(Vec<Datum>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Datum>,
    },
    Update {
        relation: u32,
        old: Option<OldRow>,
        new: Vec<Datum>,
    },
    Delete {
        relation: u32,
        old: OldRow,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Type, origin and other messages the source has no use for.
    Other(u8),
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError(format!(
                "{n} bytes wanted, {} left",
                self.0.len()
            )));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let end = self
            .0
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| DecodeError("unterminated string".into()))?;
        let text = std::str::from_utf8(&self.0[..end])
            .map_err(|_| DecodeError("a name that is not UTF-8".into()))?
            .to_string();
        self.0 = &self.0[end + 1..];
        Ok(text)
    }

    fn tuple(&mut self) -> Result<Vec<Datum>, DecodeError> {
        let count = self.u16()?;
        (0..count)
            .map(|_| match self.u8()? {
                b'n' => Ok(Datum::Null),
                b'u' => Ok(Datum::Unchanged),
                b't' => {
                    let len = self.u32()? as usize;
                    let bytes = self.take(len)?;
                    String::from_utf8(bytes.to_vec())
                        .map(Datum::Text)
                        .map_err(|_| DecodeError("a text value that is not UTF-8".into()))
                }
                other => Err(DecodeError(format!(
                    "tuple column kind {:?} (binary values are not requested)",
                    other as char
                ))),
            })
            .collect()
    }
}

/// Decodes one `XLogData` payload that is not a `Begin`/`Commit`.
pub fn decode(payload: &[u8]) -> Result<Change, DecodeError> {
    let mut r = Reader(payload);
    let tag = r.u8()?;
    Ok(match tag {
        b'R' => {
            let id = r.u32()?;
            let schema = r.cstr()?;
            let table = r.cstr()?;
            let _replica_identity = r.u8()?;
            let count = r.u16()?;
            let columns = (0..count)
                .map(|_| {
                    let flags = r.u8()?;
                    let name = r.cstr()?;
                    let type_oid = r.u32()?;
                    let _typmod = r.u32()?;
                    Ok(Column {
                        name,
                        type_oid,
                        key: flags & 1 == 1,
                    })
                })
                .collect::<Result<Vec<_>, DecodeError>>()?;
            Change::Relation(Relation {
                id,
                schema,
                table,
                columns,
            })
        }
        b'I' => {
            let relation = r.u32()?;
            expect(&mut r, b'N')?;
            Change::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let (old, new) = match r.u8()? {
                b'K' => {
                    let old = OldRow::Key(r.tuple()?);
                    expect(&mut r, b'N')?;
                    (Some(old), r.tuple()?)
                }
                b'O' => {
                    let old = OldRow::Full(r.tuple()?);
                    expect(&mut r, b'N')?;
                    (Some(old), r.tuple()?)
                }
                b'N' => (None, r.tuple()?),
                other => return Err(DecodeError(format!("update kind {:?}", other as char))),
            };
            Change::Update { relation, old, new }
        }
        b'D' => {
            let relation = r.u32()?;
            let old = match r.u8()? {
                b'K' => OldRow::Key(r.tuple()?),
                b'O' => OldRow::Full(r.tuple()?),
                other => return Err(DecodeError(format!("delete kind {:?}", other as char))),
            };
            Change::Delete { relation, old }
        }
        b'T' => {
            let count = r.u32()?;
            let _options = r.u8()?;
            let relations = (0..count).map(|_| r.u32()).collect::<Result<_, _>>()?;
            Change::Truncate { relations }
        }
        other => Change::Other(other),
    })
}

fn expect(r: &mut Reader<'_>, tag: u8) -> Result<(), DecodeError> {
    match r.u8()? {
        t if t == tag => Ok(()),
        other => Err(DecodeError(format!(
            "expected {:?}, found {:?}",
            tag as char, other as char
        ))),
    }
}

/// PostgreSQL's text output of a value of type `oid` as JSON: booleans and numbers as JSON
/// booleans and numbers (a `numeric` only when a double holds it exactly, else its text),
/// `json`/`jsonb` as the JSON itself, everything else (timestamps, text, uuid, arrays) as the
/// server's text. The snapshot and the stream use this one conversion.
pub fn to_json(oid: u32, text: &str) -> Value {
    match oid {
        // bool
        16 => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => Value::String(text.to_string()),
        },
        // int8, int2, int4, oid
        20 | 21 | 23 | 26 => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.to_string())),
        // float4, float8: NaN and infinities stay text
        700 | 701 => text
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(text.to_string())),
        // numeric
        1700 => numeric(text),
        // json, jsonb
        114 | 3802 => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
        }
        _ => Value::String(text.to_string()),
    }
}

fn numeric(text: &str) -> Value {
    if let Ok(integer) = text.parse::<i64>() {
        return Value::from(integer);
    }
    let exact = text.parse::<f64>().ok().filter(|double| {
        // The double's shortest form must be the same decimal (trailing zeros aside).
        let trimmed = if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.')
        } else {
            text
        };
        double.is_finite() && double.to_string() == trimmed
    });
    match exact.and_then(Number::from_f64) {
        Some(number) => Value::Number(number),
        None => Value::String(text.to_string()),
    }
}

/// The columns of a tuple as a JSON object. `only_keys`: the columns of a `K` old row (the
/// others are sent as nulls that mean nothing). Unchanged TOAST values are left out.
pub fn row_json(columns: &[Column], datums: &[Datum], only_keys: bool) -> Map<String, Value> {
    columns
        .iter()
        .zip(datums)
        .filter(|(column, _)| !only_keys || column.key)
        .filter_map(|(column, datum)| {
            let value = match datum {
                Datum::Null => Value::Null,
                Datum::Unchanged => return None,
                Datum::Text(text) => to_json(column.type_oid, text),
            };
            Some((column.name.clone(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_become_json_by_type() {
        assert_eq!(to_json(16, "t"), json!(true));
        assert_eq!(to_json(20, "-42"), json!(-42));
        assert_eq!(to_json(701, "36.6"), json!(36.6));
        assert_eq!(to_json(701, "NaN"), json!("NaN"));
        assert_eq!(to_json(1700, "120.50"), json!(120.5));
        assert_eq!(
            to_json(1700, "12345678901234567890.123456789"),
            json!("12345678901234567890.123456789")
        );
        assert_eq!(to_json(3802, "{\"a\": [1]}"), json!({"a": [1]}));
        assert_eq!(
            to_json(1184, "2024-01-01 12:00:00+00"),
            json!("2024-01-01 12:00:00+00")
        );
    }

    #[test]
    fn relation_insert_update_delete_decode() {
        let mut relation = vec![b'R'];
        relation.extend(7u32.to_be_bytes());
        relation.extend(b"public\0obs\0d");
        relation.extend(2u16.to_be_bytes());
        relation.extend([1u8]);
        relation.extend(b"id\0");
        relation.extend(20u32.to_be_bytes());
        relation.extend((-1i32).to_be_bytes());
        relation.extend([0u8]);
        relation.extend(b"v\0");
        relation.extend(25u32.to_be_bytes());
        relation.extend((-1i32).to_be_bytes());
        let Change::Relation(decoded) = decode(&relation).expect("relation") else {
            panic!("not a relation");
        };
        assert_eq!(decoded.table, "obs");
        assert!(decoded.columns[0].key && !decoded.columns[1].key);

        let mut insert = vec![b'I'];
        insert.extend(7u32.to_be_bytes());
        insert.push(b'N');
        insert.extend(2u16.to_be_bytes());
        insert.push(b't');
        insert.extend(1u32.to_be_bytes());
        insert.push(b'5');
        insert.push(b'u');
        let change = decode(&insert).expect("insert");
        let Change::Insert { new, .. } = &change else {
            panic!("not an insert");
        };
        assert_eq!(
            Value::Object(row_json(&decoded.columns, new, false)),
            json!({"id": 5})
        );

        let mut delete = vec![b'D'];
        delete.extend(7u32.to_be_bytes());
        delete.push(b'K');
        delete.extend(2u16.to_be_bytes());
        delete.push(b't');
        delete.extend(1u32.to_be_bytes());
        delete.push(b'5');
        delete.push(b'n');
        let Change::Delete {
            old: OldRow::Key(old),
            ..
        } = decode(&delete).expect("delete")
        else {
            panic!("not a delete by key");
        };
        assert_eq!(
            Value::Object(row_json(&decoded.columns, &old, true)),
            json!({"id": 5})
        );
        assert!(decode(&[b'I', 0, 0]).is_err(), "truncated");
    }
}
