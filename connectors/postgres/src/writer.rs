//! Writes one batch of records in one transaction: per table, the deletes then one statement
//! per row shape. A statement the database refuses for a row is split in halves (each under a
//! savepoint) until the row is found; that row alone is errant, the others are written.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use medconnect_api::{ConnectError, SinkRecord, content_type};
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

use crate::config::{InsertMode, SinkConfig};
use crate::direct;
use crate::error::{Failure, WriteError, classify};
use crate::link::Link;
use crate::row::{Cell, Change, Row, change_of, check_identifier};
use crate::schema::{Catalog, ColumnType, Columns, Needed, Prepared};
use crate::sql::{self, OnConflict};
use crate::streamed::{self, Streamed};

/// What became of a batch that was committed.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Records the database refused or that cannot be rows, by index in the batch.
    pub errant: Vec<(usize, ConnectError)>,
    pub rows_written: usize,
    pub rows_deleted: usize,
    /// Tombstones without `delete.enabled`, and records superseded by a later record of the
    /// same key in the batch.
    pub skipped: usize,
}

/// One statement and its rows, column by column (each column is bound as one array; a range
/// of rows binds slices of them, with no copy).
struct Statement {
    table: String,
    action: &'static str,
    sql: String,
    /// The same rows by `COPY`, tried first when nothing is to be done on a key conflict (a
    /// refused row makes it fall back to `sql`, which isolates the row).
    copy: Option<String>,
    /// Each row's record, by index in the batch.
    records: Vec<usize>,
    columns: Vec<Vec<Option<String>>>,
    /// The rows already as COPY text, read straight from the records ([`direct`]); `columns`
    /// is then empty, and made from the records only if the COPY is refused.
    text: Option<Vec<u8>>,
    /// Whether each column is `json`/`jsonb`, for making `columns` from the records.
    json: Vec<bool>,
}

impl Statement {
    fn new(table: &str, action: &'static str, sql: String) -> Self {
        Self {
            table: table.to_string(),
            action,
            sql,
            copy: None,
            records: Vec::new(),
            columns: Vec::new(),
            text: None,
            json: Vec::new(),
        }
    }

    /// The rows of a statement read by [`direct`], column by column as the general path has
    /// them, for the statement that isolates a refused row. A record the general path cannot
    /// read (never expected: both read the same JSON) is errant.
    fn columns_again(
        &self,
        records: &[SinkRecord],
        config: &SinkConfig,
        errant: &mut Vec<(usize, ConnectError)>,
    ) -> (Vec<usize>, Vec<Vec<Option<String>>>) {
        let mut again = Statement::new(&self.table, self.action, String::new());
        for index in &self.records {
            let Some(record) = records.get(*index) else {
                continue;
            };
            match change_of(record, config) {
                Ok(Change::Write(row)) => again.push(
                    *index,
                    row.key
                        .into_iter()
                        .chain(row.others)
                        .zip(self.json.iter())
                        .map(|(cell, json)| sql::param_owned(cell.value, *json)),
                ),
                Ok(_) => errant.push((
                    *index,
                    ConnectError::data("the record changed between two readings"),
                )),
                Err(error) => errant.push((*index, error)),
            }
        }
        (again.records, again.columns)
    }

    fn push(&mut self, index: usize, values: impl Iterator<Item = Option<String>>) {
        for (n, value) in values.enumerate() {
            if n == self.columns.len() {
                self.columns.push(Vec::new());
            }
            if let Some(column) = self.columns.get_mut(n) {
                column.push(value);
            }
        }
        self.records.push(index);
    }
}

/// The changes of one table after the batch's later records of a key replaced earlier ones.
#[derive(Default)]
struct Settled {
    /// Keys with a tombstone in the batch; deleted before the writes, so a key deleted then
    /// written again ends with the write.
    deletes: Vec<(usize, Vec<Cell>)>,
    writes: Vec<(usize, Row)>,
    superseded: usize,
}

fn identity(key: &[Cell]) -> String {
    let parts: Vec<(&str, &serde_json::Value)> =
        key.iter().map(|c| (c.column.as_str(), &c.value)).collect();
    serde_json::to_string(&parts).unwrap_or_default()
}

/// One row per key: an upsert cannot touch a row twice in one statement (SQLSTATE 21000).
fn settle(changes: Vec<(usize, Change)>, keyed: bool) -> Settled {
    let mut settled = Settled::default();
    if !keyed {
        for (index, change) in changes {
            if let Change::Write(row) = change {
                settled.writes.push((index, row));
            }
        }
        return settled;
    }
    let mut writes: HashMap<String, (usize, Row)> = HashMap::new();
    let mut deletes: HashMap<String, (usize, Vec<Cell>)> = HashMap::new();
    let mut total = 0;
    for (index, change) in changes {
        total += 1;
        match change {
            Change::Write(row) => {
                writes.insert(identity(&row.key), (index, row));
            }
            Change::Delete(key) => {
                let id = identity(&key);
                writes.remove(&id);
                deletes.insert(id, (index, key));
            }
            Change::Skip(_) => {}
        }
    }
    settled.writes = writes.into_values().collect();
    settled.writes.sort_by_key(|(index, _)| *index);
    settled.deletes = deletes.into_values().collect();
    settled.deletes.sort_by_key(|(index, _)| *index);
    settled.superseded = total - settled.writes.len() - settled.deletes.len();
    settled
}

/// The columns the changes need, with the type of the first non-null value of each (text
/// when every value is null).
fn needed(writes: &[(usize, Row)], deletes: &[(usize, Vec<Cell>)]) -> Vec<Needed> {
    // Each column with whether its type so far came from a null.
    let mut order: Vec<(Needed, bool)> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let rows = writes
        .iter()
        .map(|(_, row)| (&row.key[..], &row.others[..]))
        .chain(deletes.iter().map(|(_, key)| (&key[..], &[][..])));
    for (key, others) in rows {
        for (position, cell) in key.iter().chain(others).enumerate() {
            // Rows of one shape have each column at the same position: no hashing for them.
            let at = match order.get(position) {
                Some((column, _)) if column.name == cell.column => Some(position),
                _ => seen.get(cell.column.as_str()).copied(),
            };
            match at {
                Some(at) => {
                    if let Some((column, from_null)) = order.get_mut(at)
                        && *from_null
                        && !cell.value.is_null()
                    {
                        column.ty = cell.ty;
                        *from_null = false;
                    }
                }
                None => {
                    seen.insert(&cell.column, order.len());
                    order.push((
                        Needed {
                            name: cell.column.clone(),
                            ty: cell.ty,
                        },
                        cell.value.is_null(),
                    ));
                }
            }
        }
    }
    order.into_iter().map(|(column, _)| column).collect()
}

fn columns_of(cells: &[Cell]) -> Vec<&str> {
    cells.iter().map(|c| c.column.as_str()).collect()
}

fn params<'a>(cells: &'a [Cell], types: &'a Columns) -> impl Iterator<Item = Option<String>> + 'a {
    cells
        .iter()
        .map(|c| sql::param(&c.value, types.sql_type(&c.column).unwrap_or("text")))
}

/// Whether each column of a shape is `json`/`jsonb`: looked up once per shape, not per cell.
fn json_columns(columns: &[&str], types: &Columns) -> Vec<bool> {
    columns
        .iter()
        .map(|c| sql::is_json(types.sql_type(c).unwrap_or("text")))
        .collect()
}

fn on_conflict(config: &SinkConfig) -> OnConflict {
    match config.insert_mode {
        InsertMode::Upsert => OnConflict::Update,
        // Only a redelivered record has its position: keep the row it wrote.
        InsertMode::Insert if config.pk_mode == crate::config::PkMode::Kafka => OnConflict::Ignore,
        _ => OnConflict::Refuse,
    }
}

/// The statements of one table: its deletes, then one statement per shape of row (the same
/// key and other columns). Records of a topic mostly share one shape, so shapes are found by
/// comparing names with the few seen, without allocating per row.
fn statements(
    table: &str,
    settled: Settled,
    types: &Columns,
    config: &SinkConfig,
) -> Vec<Statement> {
    let mut deletes: Vec<(Vec<String>, Statement)> = Vec::new();
    for (index, key) in settled.deletes {
        let names = columns_of(&key);
        let at = match deletes
            .iter()
            .position(|(shape, _)| shape.iter().eq(names.iter()))
        {
            Some(at) => at,
            None => {
                let text = sql::delete(table, &names, types);
                deletes.push((
                    names.iter().map(|n| n.to_string()).collect(),
                    Statement::new(table, "DELETE", text),
                ));
                deletes.len() - 1
            }
        };
        if let Some((_, statement)) = deletes.get_mut(at) {
            statement.push(index, params(&key, types));
        }
    }
    let mut writes: Vec<(Vec<String>, usize, Vec<bool>, Statement)> = Vec::new();
    for (index, row) in settled.writes {
        let key = columns_of(&row.key);
        let others = columns_of(&row.others);
        let found = writes.iter().position(|(shape, key_len, _, _)| {
            *key_len == key.len() && shape.iter().eq(key.iter().chain(&others))
        });
        let at = match found {
            Some(at) => at,
            None => {
                let (action, text) = match config.insert_mode {
                    InsertMode::Update => match sql::update(table, &key, &others, types) {
                        Some(text) => ("UPDATE", text),
                        None => continue,
                    },
                    _ => (
                        "INSERT",
                        sql::insert(table, &key, &others, types, on_conflict(config)),
                    ),
                };
                let all: Vec<&str> = key.iter().chain(&others).copied().collect();
                let mut statement = Statement::new(table, action, text);
                // COPY first where it does what the statement would: no key, a key whose
                // conflict refuses the row anyway, or the `kafka` key, which only a record
                // delivered again can have (a conflict fails the COPY, and the statement, with
                // its ON CONFLICT, writes the batch instead).
                if action == "INSERT"
                    && (key.is_empty()
                        || on_conflict(config) == OnConflict::Refuse
                        || config.pk_mode == crate::config::PkMode::Kafka)
                {
                    statement.copy = Some(sql::copy(table, &all));
                }
                writes.push((
                    all.iter().map(|n| n.to_string()).collect(),
                    key.len(),
                    json_columns(&all, types),
                    statement,
                ));
                writes.len() - 1
            }
        };
        if let Some((_, _, json, statement)) = writes.get_mut(at) {
            // The row's values move into the statement's columns (no copy of strings).
            let values = row.key.into_iter().chain(row.others).map(|c| c.value);
            statement.push(
                index,
                values
                    .zip(json.iter())
                    .map(|(value, json)| sql::param_owned(value, *json)),
            );
        }
    }
    deletes
        .into_iter()
        .map(|(_, statement)| statement)
        .chain(writes.into_iter().map(|(_, _, _, statement)| statement))
        .collect()
}

/// The statements of one table by the direct path ([`direct`]) where it applies: columns
/// mode, `insert` or `upsert` with no key or the `kafka` key (the rows go by COPY first),
/// records that are JSON objects, no tombstones or HL7 values. `None` leaves the table to the
/// general path, which reads records into cells; the tables, types and rows are the same.
async fn plan_direct(
    link: &mut Link,
    catalog: &mut Catalog,
    config: &SinkConfig,
    table: &str,
    records: &[SinkRecord],
    indices: &[usize],
    outcome: &mut Outcome,
) -> Result<Option<Vec<Statement>>, WriteError> {
    let Some(key) = direct::key_columns(config) else {
        return Ok(None);
    };
    // Every row's fields, one after the other: no allocation per row.
    let mut fields: Vec<direct::Field> = Vec::new();
    let mut scratch: Vec<direct::Field> = Vec::new();
    // Each row: its record, its shape, its fields' range in `fields`.
    let mut rows: Vec<(usize, usize, Range<usize>)> = Vec::with_capacity(indices.len());
    let mut shapes: Vec<Vec<String>> = Vec::new();
    let mut errant: Vec<(usize, ConnectError)> = Vec::new();
    let mut last_shape = 0;
    for &index in indices {
        let Some(record) = records.get(index) else {
            continue;
        };
        let Some(bytes) = &record.record.value else {
            return Ok(None);
        };
        if record.record.content_type() == Some(content_type::HL7_V2) {
            return Ok(None);
        }
        let readable = direct::read_row(bytes, &config.fields, key, &mut scratch);
        if !readable {
            // The general path says what is wrong with the record.
            match change_of(record, config) {
                Err(error) => {
                    errant.push((index, error));
                    continue;
                }
                Ok(_) => return Ok(None),
            }
        }
        let same = |shape: &Vec<String>| {
            shape.len() == scratch.len() && shape.iter().zip(&scratch).all(|(a, (b, _))| a == b)
        };
        let shape = if shapes.get(last_shape).is_some_and(same) {
            last_shape
        } else if let Some(at) = shapes.iter().position(same) {
            at
        } else {
            shapes.push(scratch.iter().map(|(name, _)| name.to_string()).collect());
            shapes.len() - 1
        };
        last_shape = shape;
        let start = fields.len();
        fields.append(&mut scratch);
        rows.push((index, shape, start..fields.len()));
    }
    if rows.is_empty() {
        // Nothing to write: no table to prepare.
        outcome.errant.append(&mut errant);
        return Ok(Some(Vec::new()));
    }

    // The columns needed, as the general path finds them: the key's, then each shape's in
    // order of appearance, typed by their first non-null value.
    let key_types = [ColumnType::Text, ColumnType::Integer, ColumnType::BigInt];
    let mut needed: Vec<Needed> = key
        .iter()
        .zip(key_types)
        .map(|(name, ty)| Needed {
            name: name.to_string(),
            ty,
        })
        .collect();
    let mut from_null = vec![false; needed.len()];
    let mut slots: Vec<Vec<usize>> = Vec::with_capacity(shapes.len());
    for shape in &shapes {
        let mut slot = Vec::with_capacity(shape.len());
        for name in shape {
            match needed.iter().position(|n| &n.name == name) {
                Some(at) => slot.push(at),
                None => {
                    slot.push(needed.len());
                    needed.push(Needed {
                        name: name.clone(),
                        ty: ColumnType::Text,
                    });
                    from_null.push(true);
                }
            }
        }
        slots.push(slot);
    }
    for (_, shape, range) in &rows {
        let (Some(slot), Some(values)) = (slots.get(*shape), fields.get(range.clone())) else {
            continue;
        };
        for (at, (_, raw)) in slot.iter().zip(values) {
            if from_null.get(*at) == Some(&true) {
                let Ok(ty) = direct::infer(raw, config.timestamptz) else {
                    return Ok(None);
                };
                if let (Some(ty), Some(column), Some(null)) =
                    (ty, needed.get_mut(*at), from_null.get_mut(*at))
                {
                    column.ty = ty;
                    *null = false;
                }
            }
        }
    }
    let primary_key: Vec<String> = key.iter().map(|k| k.to_string()).collect();
    let prepared = catalog
        .prepare(
            link.get().await?,
            table,
            &needed,
            &primary_key,
            config.auto_create,
            config.auto_evolve,
        )
        .await?;
    let (types, missing) = match prepared {
        Prepared::Ready(types) => (types, Vec::new()),
        Prepared::Missing(types, missing) => (types, missing),
    };

    // One statement per shape, its rows rendered as COPY text.
    let mut statements: Vec<Result<Statement, String>> = Vec::with_capacity(shapes.len());
    for shape in &shapes {
        let others: Vec<&str> = shape.iter().map(String::as_str).collect();
        let all: Vec<&str> = key.iter().chain(&others).copied().collect();
        if let Some(column) = all.iter().find(|c| missing.iter().any(|m| m == *c)) {
            statements.push(Err(column.to_string()));
            continue;
        }
        let text = sql::insert(table, key, &others, types, on_conflict(config));
        let mut statement = Statement::new(table, "INSERT", text);
        statement.copy = Some(sql::copy(table, &all));
        statement.json = json_columns(&all, types);
        statement.text = Some(Vec::with_capacity(rows.len() * 16 * all.len()));
        statements.push(Ok(statement));
    }
    for (index, shape, range) in rows {
        let (Some(record), Some(values)) = (records.get(index), fields.get(range)) else {
            continue;
        };
        match statements.get_mut(shape) {
            Some(Ok(statement)) => {
                let Some(out) = statement.text.as_mut() else {
                    continue;
                };
                let values = values.iter().map(|(_, raw)| *raw);
                if direct::render_row(out, record, !key.is_empty(), values, &statement.json)
                    .is_err()
                {
                    return Ok(None);
                }
                statement.records.push(index);
            }
            Some(Err(column)) => errant.push((
                index,
                ConnectError::data(format!(
                    "table \"{table}\" has no column \"{column}\" and auto.evolve=false"
                )),
            )),
            None => {}
        }
    }
    outcome.errant.append(&mut errant);
    Ok(Some(
        statements
            .into_iter()
            .filter_map(Result::ok)
            .filter(|statement| !statement.records.is_empty())
            .collect(),
    ))
}

fn statement_error(
    statement: &Statement,
    source: sqlx::Error,
    catalog: &mut Catalog,
) -> WriteError {
    match classify(&source) {
        Failure::Transient => WriteError::Connection(source),
        Failure::SchemaChanged => {
            catalog.forget(&statement.table);
            WriteError::SchemaChanged {
                table: statement.table.clone(),
                source,
            }
        }
        Failure::Row(_) | Failure::Other => WriteError::Statement {
            action: statement.action,
            table: statement.table.clone(),
            source,
        },
    }
}

async fn run(
    connection: &mut PgConnection,
    statement: &Statement,
    columns: &[Vec<Option<String>>],
    range: Range<usize>,
) -> Result<u64, sqlx::Error> {
    let mut query = sqlx::query(&statement.sql);
    for column in columns {
        query = query.bind(column.get(range.clone()).unwrap_or_default());
    }
    Ok(query.execute(connection).await?.rows_affected())
}

/// `COPY` of every row of the statement.
async fn copy_all(
    connection: &mut PgConnection,
    statement: &Statement,
    copy: &str,
) -> Result<u64, sqlx::Error> {
    let rendered;
    let text: &[u8] = match &statement.text {
        Some(text) => text,
        None => {
            rendered = sql::copy_rows(&statement.columns, statement.records.len());
            &rendered
        }
    };
    let mut stream = connection.copy_in_raw(copy).await?;
    if let Err(error) = stream.send(text).await {
        let _ = stream.abort("medconnect: sending the rows failed").await;
        return Err(error);
    }
    stream.finish().await
}

async fn simple(connection: &mut PgConnection, text: &str) -> Result<(), sqlx::Error> {
    sqlx::query(text).execute(connection).await.map(|_| ())
}

/// Runs a statement over all its rows; a row-caused failure splits the rows in halves, each
/// tried under a savepoint, down to the single rows at fault.
async fn run_isolating(
    connection: &mut PgConnection,
    statement: &Statement,
    catalog: &mut Catalog,
    (records, config): (&[SinkRecord], &SinkConfig),
    errant: &mut Vec<(usize, ConnectError)>,
    copy_refused: bool,
) -> Result<u64, WriteError> {
    if let Some(copy) = statement.copy.as_ref().filter(|_| !copy_refused) {
        simple(connection, "SAVEPOINT medconnect_copy")
            .await
            .map_err(|e| statement_error(statement, e, catalog))?;
        match copy_all(connection, statement, copy).await {
            Ok(rows) => {
                simple(connection, "RELEASE SAVEPOINT medconnect_copy")
                    .await
                    .map_err(|e| statement_error(statement, e, catalog))?;
                return Ok(rows);
            }
            Err(error) => {
                if !matches!(classify(&error), Failure::Row(_)) {
                    return Err(statement_error(statement, error, catalog));
                }
                // A row is refused: the statement finds which.
                simple(connection, "ROLLBACK TO SAVEPOINT medconnect_copy")
                    .await
                    .map_err(|e| statement_error(statement, e, catalog))?;
            }
        }
    }
    let again;
    let (indices, columns) = match &statement.text {
        Some(_) => {
            again = statement.columns_again(records, config, errant);
            (&again.0, &again.1)
        }
        None => (&statement.records, &statement.columns),
    };
    let mut affected = 0;
    let mut pending: Vec<Range<usize>> = Vec::new();
    pending.push(0..indices.len());
    while let Some(range) = pending.pop() {
        if range.is_empty() {
            continue;
        }
        simple(connection, "SAVEPOINT medconnect_rows")
            .await
            .map_err(|e| statement_error(statement, e, catalog))?;
        match run(connection, statement, columns, range.clone()).await {
            Ok(rows) => {
                affected += rows;
                simple(connection, "RELEASE SAVEPOINT medconnect_rows")
                    .await
                    .map_err(|e| statement_error(statement, e, catalog))?;
            }
            Err(error) => {
                let Failure::Row(rejection) = classify(&error) else {
                    return Err(statement_error(statement, error, catalog));
                };
                simple(connection, "ROLLBACK TO SAVEPOINT medconnect_rows")
                    .await
                    .map_err(|e| statement_error(statement, e, catalog))?;
                simple(connection, "RELEASE SAVEPOINT medconnect_rows")
                    .await
                    .map_err(|e| statement_error(statement, e, catalog))?;
                if range.len() == 1 {
                    let index = indices.get(range.start).copied().unwrap_or_default();
                    tracing::debug!(table = %statement.table, sqlstate = %rejection.sqlstate, constraint = ?rejection.constraint, "row refused");
                    errant.push((index, rejection.into_error()));
                } else {
                    let middle = range.start + range.len() / 2;
                    // Popped first half first, so rows keep their order.
                    pending.push(middle..range.end);
                    pending.push(range.start..middle);
                }
            }
        }
    }
    Ok(affected)
}

/// Writes `records` in one transaction. Errors concern the whole batch (nothing of it is
/// committed); refused rows are in the outcome.
pub async fn write(
    link: &mut Link,
    catalog: &mut Catalog,
    config: &SinkConfig,
    records: &[SinkRecord],
) -> Result<Outcome, WriteError> {
    let mut copy_refused = false;
    match streamed::write(link, catalog, config, records).await? {
        Streamed::Written(rows) => {
            return Ok(Outcome {
                rows_written: usize::try_from(rows).unwrap_or(usize::MAX),
                ..Outcome::default()
            });
        }
        Streamed::Refused => copy_refused = true,
        Streamed::Other => {}
    }
    let mut outcome = Outcome::default();
    // The records of each table; a topic's table is resolved once per run of its records.
    let mut by_table: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut last: Option<(&str, String)> = None;
    for (index, record) in records.iter().enumerate() {
        let topic = record.record.topic.as_str();
        let table = match &last {
            Some((seen, table)) if *seen == topic => table,
            _ => &last.insert((topic, config.table.resolve(topic))).1,
        };
        match by_table.get_mut(table.as_str()) {
            Some(indices) => indices.push(index),
            None => {
                by_table.insert(table.clone(), vec![index]);
            }
        }
    }

    let mut planned: Vec<Statement> = Vec::new();
    for (table, indices) in by_table {
        if let Err(error) = check_identifier("table", &table) {
            for index in indices {
                outcome.errant.push((index, error.clone()));
            }
            continue;
        }
        if let Some(statements) = plan_direct(
            link,
            catalog,
            config,
            &table,
            records,
            &indices,
            &mut outcome,
        )
        .await?
        {
            planned.extend(statements);
            continue;
        }
        let mut changes = Vec::with_capacity(indices.len());
        for index in indices {
            let Some(record) = records.get(index) else {
                continue;
            };
            match change_of(record, config) {
                Ok(Change::Skip(reason)) => {
                    tracing::debug!(topic = %record.record.topic, partition = record.kafka_partition, offset = record.kafka_offset, reason, "record skipped");
                    outcome.skipped += 1;
                }
                Ok(change) => changes.push((index, change)),
                Err(error) => outcome.errant.push((index, error)),
            }
        }
        if changes.is_empty() {
            continue;
        }
        // Kafka positions are unique per record, and a record is never in a batch twice.
        let mut settled = settle(
            changes,
            config.pk_mode.has_key() && config.pk_mode != crate::config::PkMode::Kafka,
        );
        outcome.skipped += settled.superseded;
        let needed = needed(&settled.writes, &settled.deletes);
        let primary_key: Vec<String> = settled
            .writes
            .first()
            .map(|(_, row)| columns_of(&row.key))
            .or_else(|| settled.deletes.first().map(|(_, key)| columns_of(key)))
            .unwrap_or_default()
            .into_iter()
            .map(String::from)
            .collect();
        let prepared = catalog
            .prepare(
                link.get().await?,
                &table,
                &needed,
                &primary_key,
                config.auto_create,
                config.auto_evolve,
            )
            .await?;
        let types = match prepared {
            Prepared::Ready(types) => types,
            Prepared::Missing(types, missing) => {
                let lacks = |cells: &[Cell]| {
                    cells
                        .iter()
                        .find(|c| missing.contains(&c.column))
                        .map(|c| c.column.clone())
                };
                let mut kept = Vec::new();
                for (index, row) in settled.writes {
                    match lacks(&row.key).or_else(|| lacks(&row.others)) {
                        Some(column) => outcome.errant.push((
                            index,
                            ConnectError::data(format!(
                                "table \"{table}\" has no column \"{column}\" and auto.evolve=false"
                            )),
                        )),
                        None => kept.push((index, row)),
                    }
                }
                settled.writes = kept;
                settled.deletes.retain(|(index, key)| match lacks(key) {
                    Some(column) => {
                        outcome.errant.push((
                            *index,
                            ConnectError::data(format!(
                                "table \"{table}\" has no key column \"{column}\""
                            )),
                        ));
                        false
                    }
                    None => true,
                });
                types
            }
        };
        planned.extend(statements(&table, settled, types, config));
    }
    if planned.is_empty() {
        return Ok(outcome);
    }

    // A batch that is one COPY goes alone, outside a transaction block: a COPY is a
    // transaction by itself, so BEGIN, SAVEPOINT, RELEASE and COMMIT (four round trips per
    // batch, a third of the no-key path's time in a profile) add nothing. Refused, it
    // committed nothing, and the transaction below isolates the row without it.
    if !copy_refused
        && let [statement] = planned.as_slice()
        && let Some(copy) = &statement.copy
    {
        match copy_all(link.get().await?, statement, copy).await {
            Ok(rows) => {
                outcome.rows_written += usize::try_from(rows).unwrap_or(usize::MAX);
                outcome.errant.sort_by_key(|(index, _)| *index);
                return Ok(outcome);
            }
            Err(error) if matches!(classify(&error), Failure::Row(_)) => copy_refused = true,
            Err(error) => return Err(statement_error(statement, error, catalog)),
        }
    }
    let mut transaction = link
        .get()
        .await?
        .begin()
        .await
        .map_err(WriteError::Connection)?;
    for statement in &planned {
        let affected = run_isolating(
            &mut transaction,
            statement,
            catalog,
            (records, config),
            &mut outcome.errant,
            copy_refused,
        )
        .await?;
        let affected = usize::try_from(affected).unwrap_or(usize::MAX);
        if statement.action == "DELETE" {
            outcome.rows_deleted += affected;
        } else {
            outcome.rows_written += affected;
        }
    }
    transaction
        .commit()
        .await
        .map_err(|source| match classify(&source) {
            Failure::Row(_) | Failure::Other => WriteError::Statement {
                action: "COMMIT",
                table: String::new(),
                source,
            },
            _ => WriteError::Connection(source),
        })?;
    outcome.errant.sort_by_key(|(index, _)| *index);
    Ok(outcome)
}
