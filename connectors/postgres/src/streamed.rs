//! The steady state of the direct path, streamed: a batch whose records all go to one
//! existing table, as objects of one shape whose columns the table has, is one
//! `COPY` sent in chunks while its records are read, so the server inserts the first rows
//! while the client reads the next. Planned first (as [`crate::writer`] does), the client's
//! reading and the server's `COPY` took turns, each idle while the other worked. Anything
//! else (another shape, a record the direct path does not read, a column to add, a table to
//! create) aborts the `COPY` before anything is written and leaves the batch to the planned
//! statements; a refused row too, which they then isolate.

use medconnect_api::{SinkRecord, content_type};

use crate::config::{FieldFilter, SinkConfig};
use crate::direct::{self, Field};
use crate::error::{Failure, WriteError, classify};
use crate::link::Link;
use crate::row::check_identifier;
use crate::schema::Catalog;
use crate::sql;

/// What became of a batch offered to this path.
#[derive(Debug, PartialEq, Eq)]
pub enum Streamed {
    /// Committed, this many rows.
    Written(u64),
    /// The server refused a row; nothing is written.
    Refused,
    /// Not this path's batch; nothing is written.
    Other,
}

/// COPY text sent at a time: the server starts on a chunk while the next is read (a few
/// hundred rows; a send is a system call and a copy into sqlx's buffer; 16 to 128 KiB made
/// no difference measurable in the bench).
const CHUNK: usize = 32 * 1024;

/// The first chunk is sent sooner: until it arrives the server has nothing to do.
const FIRST_CHUNK: usize = 4 * 1024;

/// The rows of one shape as COPY text, rendered record by record.
pub struct Rows<'r> {
    filter: &'r FieldFilter,
    key: &'static [&'static str],
    /// The fields' column names, sorted, as [`direct::read_row`] gives them.
    shape: Vec<String>,
    /// Whether each column (the key's, then the shape's) is `json`/`jsonb`.
    json: Vec<bool>,
    /// Field names in the order they were last read in, and where each column of the shape
    /// is among them: a producer writes its fields in one order, so a record in that order
    /// is neither filtered nor sorted again.
    order: Vec<String>,
    at: Vec<usize>,
    fields: Vec<Field<'r>>,
    sorted: Vec<Field<'r>>,
}

impl<'r> Rows<'r> {
    /// The shape of `record`'s row, when the direct path reads it.
    pub fn shape_of(
        record: &'r SinkRecord,
        filter: &FieldFilter,
        key: &[&str],
    ) -> Option<Vec<String>> {
        let bytes = record.record.value.as_deref()?;
        if record.record.content_type() == Some(content_type::HL7_V2) {
            return None;
        }
        let mut fields = Vec::new();
        direct::read_row(bytes, filter, key, &mut fields)
            .then(|| fields.iter().map(|(name, _)| name.to_string()).collect())
    }

    pub fn new(
        filter: &'r FieldFilter,
        key: &'static [&'static str],
        shape: Vec<String>,
        json: Vec<bool>,
    ) -> Self {
        Self {
            filter,
            key,
            shape,
            json,
            order: Vec::new(),
            at: Vec::new(),
            fields: Vec::new(),
            sorted: Vec::new(),
        }
    }

    /// Appends `record`'s row to `out`; `false` when the record is not one of the shape the
    /// direct path reads (then `out` holds part of a row, to be thrown away).
    pub fn push(&mut self, out: &mut Vec<u8>, record: &'r SinkRecord) -> bool {
        let Some(bytes) = record.record.value.as_deref() else {
            return false;
        };
        if record.record.content_type() == Some(content_type::HL7_V2) {
            return false;
        }
        self.fields.clear();
        if direct::fields(bytes, &mut self.fields).is_none() {
            return false;
        }
        let known_order = self.fields.len() == self.order.len()
            && self
                .fields
                .iter()
                .zip(&self.order)
                .all(|((name, _), known)| name == known);
        if !known_order && !self.learn_order() {
            return false;
        }
        if self.at.iter().any(|at| *at >= self.fields.len()) {
            return false;
        }
        let values = self
            .at
            .iter()
            .filter_map(|at| self.fields.get(*at).map(|(_, raw)| *raw));
        direct::render_row(out, record, !self.key.is_empty(), values, &self.json).is_ok()
    }

    /// Whether the fields just read, in an order not seen before, make the shape; if so,
    /// their order is the one remembered.
    fn learn_order(&mut self) -> bool {
        self.sorted.clear();
        self.sorted.extend(self.fields.iter().cloned());
        if !direct::columns(&mut self.sorted, self.filter, self.key)
            || self.sorted.len() != self.shape.len()
            || self
                .sorted
                .iter()
                .zip(&self.shape)
                .any(|((name, _), column)| name != column)
        {
            return false;
        }
        // The last of a repeated name, as the general path keeps.
        let at: Option<Vec<usize>> = self
            .shape
            .iter()
            .map(|column| self.fields.iter().rposition(|(name, _)| name == column))
            .collect();
        let Some(at) = at else {
            return false;
        };
        self.at = at;
        self.order = self
            .fields
            .iter()
            .map(|(name, _)| name.to_string())
            .collect();
        true
    }
}

fn failed(catalog: &mut Catalog, table: &str, source: sqlx::Error) -> WriteError {
    match classify(&source) {
        Failure::Transient => WriteError::Connection(source),
        Failure::SchemaChanged => {
            catalog.forget(table);
            WriteError::SchemaChanged {
                table: table.to_string(),
                source,
            }
        }
        Failure::Row(_) | Failure::Other => WriteError::Statement {
            action: "INSERT",
            table: table.to_string(),
            source,
        },
    }
}

/// Writes `records` as one `COPY` streamed while they are read, when they are this path's
/// batch (see the module's comment).
pub async fn write(
    link: &mut Link,
    catalog: &mut Catalog,
    config: &SinkConfig,
    records: &[SinkRecord],
) -> Result<Streamed, WriteError> {
    let (Some(key), Some(first)) = (direct::key_columns(config), records.first()) else {
        return Ok(Streamed::Other);
    };
    let topic = first.record.topic.as_str();
    let table = config.table.resolve(topic);
    let one_table = records
        .iter()
        .all(|r| r.record.topic == topic || config.table.resolve(&r.record.topic) == table);
    if !one_table || check_identifier("table", &table).is_err() {
        return Ok(Streamed::Other);
    }
    let Some(shape) = Rows::shape_of(first, &config.fields, key) else {
        return Ok(Streamed::Other);
    };
    // A table not read yet (a task's first batch) is read here rather than by the planned
    // path, so that the first batch into an existing table is streamed too: planned, its
    // reading and its COPY took turns (the no-key sink alone, 20,000-row batches, best of
    // six: 1.31-1.34 M rows/s planned, 1.39-1.41 M streamed, three alternated pairs at load
    // 2). A missing table is left to the planned path, which creates it.
    let Some(types) = catalog.read(link.get().await?, &table).await? else {
        return Ok(Streamed::Other);
    };
    let columns: Vec<&str> = key
        .iter()
        .copied()
        .chain(shape.iter().map(String::as_str))
        .collect();
    if !columns.iter().all(|column| types.contains(column)) {
        return Ok(Streamed::Other);
    }
    let json = columns
        .iter()
        .map(|column| sql::is_json(types.sql_type(column).unwrap_or("text")))
        .collect();
    let statement = sql::copy(&table, &columns);
    let mut rows = Rows::new(&config.fields, key, shape, json);

    let mut stream = match link.get().await?.copy_in_raw(&statement).await {
        Ok(stream) => stream,
        Err(error) if matches!(classify(&error), Failure::SchemaChanged) => {
            // Altered or dropped since it was read: the planned path reads it again.
            catalog.forget(&table);
            return Ok(Streamed::Other);
        }
        Err(error) => return Err(failed(catalog, &table, error)),
    };
    let mut out = Vec::with_capacity(CHUNK + CHUNK / 4);
    let mut chunk = FIRST_CHUNK;
    for (n, record) in records.iter().enumerate() {
        if !rows.push(&mut out, record) {
            tracing::debug!(%table, row = n, "batch not of one shape: planned instead");
            let Err(error) = stream.abort("medconnect: planned instead").await else {
                return Ok(Streamed::Other);
            };
            // The server had already failed the COPY; sqlx then leaves its ReadyForQuery
            // unread, so the connection is not used again.
            link.discard();
            return match classify(&error) {
                Failure::Row(_) => Ok(Streamed::Refused),
                _ => Err(failed(catalog, &table, error)),
            };
        }
        if out.len() >= chunk {
            chunk = CHUNK;
            if let Err(error) = stream.send(out.as_slice()).await {
                let _ = stream.abort("medconnect: sending the rows failed").await;
                return Err(failed(catalog, &table, error));
            }
            out.clear();
        }
    }
    if let Err(error) = stream.send(out.as_slice()).await {
        let _ = stream.abort("medconnect: sending the rows failed").await;
        return Err(failed(catalog, &table, error));
    }
    match stream.finish().await {
        Ok(written) => Ok(Streamed::Written(written)),
        Err(error) if matches!(classify(&error), Failure::Row(_)) => Ok(Streamed::Refused),
        Err(error) => Err(failed(catalog, &table, error)),
    }
}

#[cfg(test)]
mod tests {
    use medconnect_api::{Record, props_from};

    use super::*;
    use crate::row::{Change, change_of};
    use crate::sql::{copy_rows, param_owned};

    fn config(pairs: &[(&str, &str)]) -> SinkConfig {
        let mut all = vec![("connection.url", "postgres://db:5432/clinic")];
        all.extend_from_slice(pairs);
        SinkConfig::parse(&props_from(&all)).expect("a valid config")
    }

    fn record(offset: i64, value: &str) -> SinkRecord {
        SinkRecord {
            record: Record::new("vitals\tward").with_value(value.to_string()),
            kafka_partition: 2,
            kafka_offset: offset,
        }
    }

    /// The general path's COPY text of `records`: each record's change, its cells' values as
    /// `param_owned` and `copy_rows` make them (what the statement that isolates a row binds).
    fn general(
        records: &[SinkRecord],
        config: &SinkConfig,
        columns: &[&str],
        json: &[bool],
    ) -> String {
        let mut values: Vec<Vec<Option<String>>> = vec![Vec::new(); columns.len()];
        for record in records {
            let Ok(Change::Write(row)) = change_of(record, config) else {
                panic!("the general path writes {:?}", record.record.value);
            };
            let cells: Vec<_> = row.key.into_iter().chain(row.others).collect();
            let names: Vec<&str> = cells.iter().map(|c| c.column.as_str()).collect();
            assert_eq!(names, columns);
            for ((cell, column), json) in cells.into_iter().zip(&mut values).zip(json) {
                column.push(param_owned(cell.value, *json));
            }
        }
        String::from_utf8(copy_rows(&values, records.len())).expect("UTF-8")
    }

    /// Each record through [`Rows`], with the first one's shape.
    fn streamed(records: &[SinkRecord], config: &SinkConfig, json: Vec<bool>) -> Option<String> {
        let key = direct::key_columns(config).expect("a direct path config");
        let shape = Rows::shape_of(records.first()?, &config.fields, key)?;
        let mut rows = Rows::new(&config.fields, key, shape, json);
        let mut out = Vec::new();
        for record in records {
            if !rows.push(&mut out, record) {
                return None;
            }
        }
        Some(String::from_utf8(out).expect("UTF-8"))
    }

    const VALUES: [&str; 10] = [
        r#"{"hr":72,"note":"tab\there \\ \n","tags":{"b":1,"a":[1.50,null]},"ok":true,"x":null}"#,
        r#"{"tags":[],"hr":-0,"note":"é","ok":false,"x":1e2}"#,
        // Repeated names (the last counts), escapes in a name, the key's names (dropped).
        r#"{"ok":true,"hr":1,"note":"a","hr":2,"tags":null,"x":"\u0000"}"#,
        r#"{"x":18446744073709551615,"hr":3,"__connect_offset":9,"note":"","tags":"s","ok":true}"#,
        r#"{"hr":123456789012345678,"note":"\"quoted\"","ok":null,"tags":{},"x":0.1000000000000000055}"#,
        r#"{"hr":72,"note":"tab\there \\ \n","tags":{"b":1,"a":[1.50,null]},"ok":true,"x":null}"#,
        r#"  {"note" : "spaced", "hr" : 4 , "ok":true,"tags":[ 1 , 2 ],"x":"y"}  "#,
        r#"{"hr":5,"note":"n","ok":true,"tags":1,"x":2,"dropped":"by the filter"}"#,
        r#"{"hr":6,"n\u006fte":"escaped name","ok":true,"tags":1,"x":2}"#,
        r#"{"hr":7,"note":"n","ok":true,"tags":1,"x":2,"__connect_topic":"t"}"#,
    ];

    #[test]
    fn rows_are_the_general_paths_value_by_value_in_any_field_order() {
        let records: Vec<SinkRecord> = VALUES
            .iter()
            .enumerate()
            .map(|(n, value)| record(n as i64, value))
            .collect();
        for keyed in [false, true] {
            let pk = if keyed { "kafka" } else { "none" };
            let config = config(&[("pk.mode", pk), ("fields.exclude", "dropped")]);
            let key = direct::key_columns(&config).expect("direct");
            let mut columns: Vec<&str> = key.to_vec();
            columns.extend(["hr", "note", "ok", "tags", "x"]);
            // `tags` and, when keyed, the topic as JSON columns too.
            for json_topic in [false, true] {
                let json: Vec<bool> = columns
                    .iter()
                    .map(|c| *c == "tags" || (json_topic && *c == "__connect_topic"))
                    .collect();
                if keyed || !json_topic {
                    // The key columns' names were kept by the general path's change only.
                    let records: Vec<SinkRecord> = if keyed {
                        records.clone()
                    } else {
                        records
                            .iter()
                            .filter(|r| {
                                !r.record.value.as_deref().is_some_and(|v| {
                                    std::str::from_utf8(v).is_ok_and(|v| v.contains("__connect"))
                                })
                            })
                            .cloned()
                            .collect()
                    };
                    assert_eq!(
                        streamed(&records, &config, json.clone()).as_deref(),
                        Some(general(&records, &config, &columns, &json).as_str()),
                        "keyed={keyed} json_topic={json_topic}"
                    );
                }
            }
        }
    }

    #[test]
    fn anything_but_the_first_records_shape_is_refused() {
        let config = config(&[]);
        let first = record(0, r#"{"a":1,"b":"x"}"#);
        for other in [
            record(1, r#"{"a":1}"#),
            record(1, r#"{"a":1,"b":"x","c":2}"#),
            record(1, r#"{"a":1,"c":"x"}"#),
            record(1, r#"[1,2]"#),
            record(1, r#"{"a":1,"b":"x""#),
            record(1, "not json"),
            // A raw control character in a string, bytes that are not UTF-8.
            record(1, "{\"a\":1,\"b\":\"\u{1}\"}"),
            SinkRecord {
                record: Record::new("vitals").with_value(&b"{\"a\":1,\"b\":\"\xff\"}"[..]),
                kafka_partition: 0,
                kafka_offset: 1,
            },
            SinkRecord {
                record: Record::new("vitals"),
                kafka_partition: 0,
                kafka_offset: 1,
            },
            SinkRecord {
                record: Record::new("vitals")
                    .with_value(r#"{"a":1,"b":"x"}"#)
                    .with_header(content_type::HEADER, content_type::HL7_V2),
                kafka_partition: 0,
                kafka_offset: 1,
            },
        ] {
            let records = [first.clone(), other.clone()];
            assert_eq!(
                streamed(&records, &config, vec![false, false]),
                None,
                "{:?}",
                other.record.value
            );
        }
        let same = [first.clone(), record(1, r#"{"b":"y","a":2}"#)];
        assert_eq!(
            streamed(&same, &config, vec![false, false]).as_deref(),
            Some("1\tx\n2\ty\n")
        );
    }
}
