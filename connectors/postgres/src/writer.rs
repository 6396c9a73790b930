//! Writes one batch of records in one transaction: per table, the deletes then one statement
//! per row shape. A statement the database refuses for a row is split in halves (each under a
//! savepoint) until the row is found; that row alone is errant, the others are written.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use medconnect_api::{ConnectError, SinkRecord};
use sqlx::PgPool;
use sqlx::postgres::PgConnection;

use crate::config::{InsertMode, SinkConfig};
use crate::error::{Failure, WriteError, classify};
use crate::row::{Cell, Change, Row, change_of, check_identifier};
use crate::schema::{Catalog, Columns, Needed, Prepared};
use crate::sql::{self, OnConflict};

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

/// One statement's rows: each row's bound parameters, one per column, with its record's index.
struct Statement {
    table: String,
    action: &'static str,
    sql: String,
    rows: Vec<(usize, Vec<Option<String>>)>,
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
    let cells = writes
        .iter()
        .flat_map(|(_, row)| row.key.iter().chain(&row.others))
        .chain(deletes.iter().flat_map(|(_, key)| key));
    for cell in cells {
        match seen.get(cell.column.as_str()) {
            Some(&at) => {
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
    order.into_iter().map(|(column, _)| column).collect()
}

fn columns_of(cells: &[Cell]) -> Vec<&str> {
    cells.iter().map(|c| c.column.as_str()).collect()
}

fn params(cells: &[Cell], types: &Columns) -> Vec<Option<String>> {
    cells
        .iter()
        .map(|c| sql::param(&c.value, types.sql_type(&c.column).unwrap_or("text")))
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

/// The statements of one table: its deletes, then one statement per shape of row.
fn statements(
    table: &str,
    settled: Settled,
    types: &Columns,
    config: &SinkConfig,
) -> Vec<Statement> {
    let mut by_shape: BTreeMap<(Vec<String>, Vec<String>, bool), Statement> = BTreeMap::new();
    for (index, key) in settled.deletes {
        let shape = (
            columns_of(&key).into_iter().map(String::from).collect(),
            Vec::new(),
            true,
        );
        let statement = by_shape.entry(shape).or_insert_with(|| Statement {
            table: table.to_string(),
            action: "DELETE",
            sql: sql::delete(table, &columns_of(&key), types),
            rows: Vec::new(),
        });
        statement.rows.push((index, params(&key, types)));
    }
    let mut writes: BTreeMap<(Vec<String>, Vec<String>, bool), Statement> = BTreeMap::new();
    for (index, row) in settled.writes {
        let key = columns_of(&row.key);
        let others = columns_of(&row.others);
        let shape = (
            key.iter().map(|c| c.to_string()).collect(),
            others.iter().map(|c| c.to_string()).collect(),
            false,
        );
        let statement = match writes.get_mut(&shape) {
            Some(statement) => statement,
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
                writes.entry(shape).or_insert(Statement {
                    table: table.to_string(),
                    action,
                    sql: text,
                    rows: Vec::new(),
                })
            }
        };
        let mut values = params(&row.key, types);
        values.extend(params(&row.others, types));
        statement.rows.push((index, values));
    }
    by_shape.into_values().chain(writes.into_values()).collect()
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
    range: Range<usize>,
) -> Result<u64, sqlx::Error> {
    let rows = &statement.rows[range];
    let width = rows.first().map(|(_, values)| values.len()).unwrap_or(0);
    let mut query = sqlx::query(&statement.sql);
    for column in 0..width {
        let array: Vec<Option<String>> = rows
            .iter()
            .map(|(_, values)| values.get(column).cloned().flatten())
            .collect();
        query = query.bind(array);
    }
    Ok(query.execute(connection).await?.rows_affected())
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
    errant: &mut Vec<(usize, ConnectError)>,
) -> Result<u64, WriteError> {
    let mut affected = 0;
    let mut pending: Vec<Range<usize>> = Vec::new();
    pending.push(0..statement.rows.len());
    while let Some(range) = pending.pop() {
        if range.is_empty() {
            continue;
        }
        simple(connection, "SAVEPOINT medconnect_rows")
            .await
            .map_err(|e| statement_error(statement, e, catalog))?;
        match run(connection, statement, range.clone()).await {
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
                    let (index, _) = &statement.rows[range.start];
                    tracing::debug!(table = %statement.table, sqlstate = %rejection.sqlstate, constraint = ?rejection.constraint, "row refused");
                    errant.push((*index, rejection.into_error()));
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
    pool: &PgPool,
    catalog: &mut Catalog,
    config: &SinkConfig,
    records: &[SinkRecord],
) -> Result<Outcome, WriteError> {
    let mut outcome = Outcome::default();
    let mut by_table: BTreeMap<String, Vec<(usize, Change)>> = BTreeMap::new();
    for (index, record) in records.iter().enumerate() {
        let table = config.table.resolve(&record.record.topic);
        let change = check_identifier("table", &table).and_then(|()| change_of(record, config));
        match change {
            Ok(Change::Skip(reason)) => {
                tracing::debug!(topic = %record.record.topic, partition = record.kafka_partition, offset = record.kafka_offset, reason, "record skipped");
                outcome.skipped += 1;
            }
            Ok(change) => by_table.entry(table).or_default().push((index, change)),
            Err(error) => outcome.errant.push((index, error)),
        }
    }

    let mut planned: Vec<Statement> = Vec::new();
    for (table, changes) in by_table {
        let mut settled = settle(changes, config.pk_mode.has_key());
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
                pool,
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

    let mut transaction = pool.begin().await.map_err(WriteError::Connection)?;
    for statement in &planned {
        let affected =
            run_isolating(&mut transaction, statement, catalog, &mut outcome.errant).await?;
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
