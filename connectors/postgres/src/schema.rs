//! Column types inferred from JSON values, and what the sink knows of each table's columns.
//!
//! Inference rules (documented in the README): an integer that fits 64 bits -> `bigint`, a
//! larger one -> `numeric`, any other number -> `double precision`, a string -> `text`, a
//! boolean -> `boolean`, an object or array -> `jsonb`, null -> `text` (nothing better is
//! known; a later number still converts).

use std::collections::HashMap;

use serde_json::Value;
use sqlx::postgres::PgConnection;

use crate::error::{Failure, WriteError, classify};
use crate::sql::quote_ident;

/// A type the sink gives a column it creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    BigInt,
    Integer,
    Numeric,
    Double,
    Text,
    Boolean,
    Jsonb,
    Timestamptz,
}

/// An ISO-8601 / RFC 3339 date and time with a zone: `YYYY-MM-DD`, `T` or a space,
/// `HH:MM:SS`, an optional fraction, then `Z` or `+HH:MM` / `-HH:MM`. Without a zone the
/// instant would depend on the server's time zone, so such strings stay text.
pub fn is_timestamp(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |from: usize, to: usize| {
        b.get(from..to)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    let at = |i: usize, c: &[u8]| b.get(i).is_some_and(|x| c.contains(x));
    if !(digits(0, 4)
        && at(4, b"-")
        && digits(5, 7)
        && at(7, b"-")
        && digits(8, 10)
        && at(10, b"T ")
        && digits(11, 13)
        && at(13, b":")
        && digits(14, 16)
        && at(16, b":")
        && digits(17, 19))
    {
        return false;
    }
    let mut rest = b.get(19..).unwrap_or_default();
    if let Some(fraction) = rest.strip_prefix(b".") {
        let n = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return false;
        }
        rest = fraction.get(n..).unwrap_or_default();
    }
    match rest {
        b"Z" => true,
        [sign, h1, h2, b':', m1, m2] => {
            (*sign == b'+' || *sign == b'-') && [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit())
        }
        _ => false,
    }
}

impl ColumnType {
    /// As [`ColumnType::infer`], with ISO-8601 strings as `timestamptz` when `timestamps`.
    pub fn infer_with(value: &Value, timestamps: bool) -> Self {
        match value {
            Value::String(text) if timestamps && is_timestamp(text) => Self::Timestamptz,
            other => Self::infer(other),
        }
    }

    pub fn infer(value: &Value) -> Self {
        match value {
            Value::Number(n) if n.is_i64() => Self::BigInt,
            Value::Number(n) if n.is_u64() => Self::Numeric,
            Value::Number(_) => Self::Double,
            Value::Bool(_) => Self::Boolean,
            Value::Object(_) | Value::Array(_) => Self::Jsonb,
            Value::String(_) | Value::Null => Self::Text,
        }
    }

    pub fn sql(self) -> &'static str {
        match self {
            Self::BigInt => "bigint",
            Self::Integer => "integer",
            Self::Numeric => "numeric",
            Self::Double => "double precision",
            Self::Text => "text",
            Self::Boolean => "boolean",
            Self::Jsonb => "jsonb",
            Self::Timestamptz => "timestamp with time zone",
        }
    }
}

/// A table's columns: name -> type as `format_type` prints it without its modifier (`bigint`,
/// `character varying`, `jsonb`, a quoted user type): values are cast to it, and the column's
/// modifier is checked on assignment (an explicit cast to `varchar(20)` would silently
/// truncate; the assignment refuses with 22001 instead).
#[derive(Debug, Clone, Default)]
pub struct Columns(HashMap<String, String>);

impl Columns {
    pub fn sql_type(&self, column: &str) -> Option<&str> {
        self.0.get(column).map(String::as_str)
    }

    pub fn contains(&self, column: &str) -> bool {
        self.0.contains_key(column)
    }
}

impl FromIterator<(String, String)> for Columns {
    fn from_iter<T: IntoIterator<Item = (String, String)>>(iter: T) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// The tables the sink has seen, read from the catalog once and again after it changed them
/// or a statement found them changed.
#[derive(Debug, Default)]
pub struct Catalog {
    tables: HashMap<String, Columns>,
}

/// A column a batch needs, with the type it would be created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needed {
    pub name: String,
    pub ty: ColumnType,
}

/// What a table can take after [`Catalog::prepare`].
#[derive(Debug)]
pub enum Prepared<'a> {
    Ready(&'a Columns),
    /// These columns are missing and `auto.evolve` is off: rows using them are errant.
    Missing(&'a Columns, Vec<String>),
}

fn statement_error(action: &'static str, table: &str, source: sqlx::Error) -> WriteError {
    match classify(&source) {
        Failure::Transient => WriteError::Connection(source),
        _ => WriteError::Statement {
            action,
            table: table.to_string(),
            source,
        },
    }
}

/// Errors of concurrent DDL that another task (or a previous run) won: the table or column
/// is there now, which is what was wanted.
fn lost_a_ddl_race(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            Some("42P07" | "42701" | "23505" | "42710")
        ),
        _ => false,
    }
}

impl Catalog {
    pub fn forget(&mut self, table: &str) {
        self.tables.remove(table);
    }

    /// The columns of a table already read, without asking the server.
    pub fn known(&self, table: &str) -> Option<&Columns> {
        self.tables.get(table)
    }

    /// The columns of a table, read from the server if not known yet; `None` when it does
    /// not exist (nothing is created: [`Catalog::prepare`] does that).
    pub async fn read(
        &mut self,
        connection: &mut PgConnection,
        table: &str,
    ) -> Result<Option<&Columns>, WriteError> {
        if !self.tables.contains_key(table) {
            let Some(columns) = Self::describe(connection, table).await? else {
                return Ok(None);
            };
            self.tables.insert(table.to_string(), columns);
        }
        Ok(self.tables.get(table))
    }

    async fn describe(
        connection: &mut PgConnection,
        table: &str,
    ) -> Result<Option<Columns>, WriteError> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass(quote_ident($1)) IS NOT NULL")
            .bind(table)
            .fetch_one(&mut *connection)
            .await
            .map_err(|e| statement_error("reading the catalog", table, e))?;
        if !exists {
            return Ok(None);
        }
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT a.attname::text, format_type(a.atttypid, NULL) \
             FROM pg_catalog.pg_attribute a \
             WHERE a.attrelid = to_regclass(quote_ident($1)) AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(table)
        .fetch_all(&mut *connection)
        .await
        .map_err(|e| statement_error("reading the catalog", table, e))?;
        Ok(Some(Columns(rows.into_iter().collect())))
    }

    /// Makes sure `table` exists with the `needed` columns, creating it (with `primary_key`)
    /// or adding nullable columns as allowed. DDL runs in its own transaction, before the
    /// rows: a table created for a batch that then fails stays, empty, which is harmless.
    pub async fn prepare(
        &mut self,
        connection: &mut PgConnection,
        table: &str,
        needed: &[Needed],
        primary_key: &[String],
        auto_create: bool,
        auto_evolve: bool,
    ) -> Result<Prepared<'_>, WriteError> {
        if !self.tables.contains_key(table) {
            let mut described = Self::describe(connection, table).await?;
            if described.is_none() {
                if !auto_create {
                    return Err(WriteError::MissingTable {
                        table: table.to_string(),
                    });
                }
                create_table(connection, table, needed, primary_key).await?;
                described = Self::describe(connection, table).await?;
            }
            let columns = described.ok_or_else(|| WriteError::MissingTable {
                table: table.to_string(),
            })?;
            self.tables.insert(table.to_string(), columns);
        }
        let missing: Vec<&Needed> = match self.tables.get(table) {
            Some(columns) => needed
                .iter()
                .filter(|n| !columns.contains(&n.name))
                .collect(),
            None => Vec::new(),
        };
        if !missing.is_empty() && auto_evolve {
            for column in &missing {
                add_column(connection, table, column).await?;
            }
            let columns = Self::describe(connection, table).await?.ok_or_else(|| {
                WriteError::MissingTable {
                    table: table.to_string(),
                }
            })?;
            self.tables.insert(table.to_string(), columns);
        }
        let columns = self
            .tables
            .get(table)
            .ok_or_else(|| WriteError::MissingTable {
                table: table.to_string(),
            })?;
        let still_missing: Vec<String> = needed
            .iter()
            .filter(|n| !columns.contains(&n.name))
            .map(|n| n.name.clone())
            .collect();
        Ok(if still_missing.is_empty() {
            Prepared::Ready(columns)
        } else {
            Prepared::Missing(columns, still_missing)
        })
    }
}

async fn create_table(
    connection: &mut PgConnection,
    table: &str,
    needed: &[Needed],
    primary_key: &[String],
) -> Result<(), WriteError> {
    let mut definitions: Vec<String> = needed
        .iter()
        .map(|n| format!("{} {}", quote_ident(&n.name), n.ty.sql()))
        .collect();
    if !primary_key.is_empty() {
        let key: Vec<String> = primary_key.iter().map(|c| quote_ident(c)).collect();
        definitions.push(format!("PRIMARY KEY ({})", key.join(", ")));
    }
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {} ({})",
        quote_ident(table),
        definitions.join(", ")
    );
    match sqlx::query(&ddl).execute(&mut *connection).await {
        Ok(_) => {
            tracing::info!(table, columns = needed.len(), "table created");
            Ok(())
        }
        Err(error) if lost_a_ddl_race(&error) => Ok(()),
        Err(error) => Err(statement_error("CREATE TABLE", table, error)),
    }
}

async fn add_column(
    connection: &mut PgConnection,
    table: &str,
    column: &Needed,
) -> Result<(), WriteError> {
    let ddl = format!(
        "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}",
        quote_ident(table),
        quote_ident(&column.name),
        column.ty.sql()
    );
    match sqlx::query(&ddl).execute(&mut *connection).await {
        Ok(_) => {
            tracing::info!(table, column = %column.name, ty = column.ty.sql(), "column added");
            Ok(())
        }
        Err(error) if lost_a_ddl_race(&error) => Ok(()),
        Err(error) => Err(statement_error("ALTER TABLE ADD COLUMN", table, error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn types_follow_the_documented_rules() {
        assert_eq!(ColumnType::infer(&json!(42)), ColumnType::BigInt);
        assert_eq!(ColumnType::infer(&json!(-42)), ColumnType::BigInt);
        assert_eq!(ColumnType::infer(&json!(u64::MAX)), ColumnType::Numeric);
        assert_eq!(ColumnType::infer(&json!(36.6)), ColumnType::Double);
        assert_eq!(ColumnType::infer(&json!("x")), ColumnType::Text);
        assert_eq!(ColumnType::infer(&json!(true)), ColumnType::Boolean);
        assert_eq!(ColumnType::infer(&json!({"a": 1})), ColumnType::Jsonb);
        assert_eq!(ColumnType::infer(&json!([1])), ColumnType::Jsonb);
        assert_eq!(ColumnType::infer(&json!(null)), ColumnType::Text);
        let at = json!("2024-01-01T12:00:00Z");
        assert_eq!(ColumnType::infer(&at), ColumnType::Text);
        assert_eq!(ColumnType::infer_with(&at, true), ColumnType::Timestamptz);
    }

    #[test]
    fn only_timestamps_with_a_zone_are_timestamps() {
        for yes in [
            "2024-01-01T12:00:00Z",
            "2024-01-01 12:00:00.123456+01:00",
            "1999-12-31T23:59:59-05:30",
        ] {
            assert!(is_timestamp(yes), "{yes}");
        }
        for no in [
            "2024-01-01T12:00:00",
            "2024-01-01",
            "2024-01-01T12:00:00.Z",
            "2024-01-01T12:00:00+0100",
            "20240101T120000Z",
            "MRN2024-01-01T12:00:00Z",
            "",
        ] {
            assert!(!is_timestamp(no), "{no}");
        }
    }
}
