//! What went wrong talking to PostgreSQL, and what the engine should do about it.
//!
//! A failure is one of: the connection (retriable: the same batch is written again), a row
//! the database refuses (that record alone is errant), the table changing under the sink
//! (retriable, after its description is read again), or anything else (the task fails).

use std::borrow::Cow;

use medconnect_api::ConnectError;
use sqlx::postgres::PgDatabaseError;

/// A write that did not happen, for a reason other than one bad row.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("PostgreSQL unreachable or the connection was lost: {0}")]
    Connection(#[source] sqlx::Error),
    #[error("table \"{table}\" changed while the sink wrote to it; its columns are read again")]
    SchemaChanged {
        table: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("table \"{table}\" does not exist and auto.create=false")]
    MissingTable { table: String },
    #[error("{action} on table \"{table}\" failed: {source}")]
    Statement {
        action: &'static str,
        table: String,
        #[source]
        source: sqlx::Error,
    },
}

impl From<WriteError> for ConnectError {
    fn from(error: WriteError) -> Self {
        let message = error.to_string();
        match error {
            WriteError::Connection(_) | WriteError::SchemaChanged { .. } => {
                ConnectError::retriable(message).caused_by(error)
            }
            WriteError::MissingTable { .. } | WriteError::Statement { .. } => {
                ConnectError::fatal(message).caused_by(error)
            }
        }
    }
}

/// Why the database refused a row, without the row's values: SQLSTATE, its meaning, and the
/// constraint, table and column it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowRejection {
    pub sqlstate: String,
    pub constraint: Option<String>,
    pub table: Option<String>,
    pub column: Option<String>,
    /// The server's message for constraint violations (they name the constraint, not the
    /// values); for data exceptions only a description of the SQLSTATE, as the server's
    /// message quotes the offending value.
    pub reason: String,
}

impl RowRejection {
    pub fn into_error(self) -> ConnectError {
        let mut message = format!(
            "PostgreSQL refused the row: SQLSTATE {} ({})",
            self.sqlstate, self.reason
        );
        if let Some(constraint) = &self.constraint {
            message.push_str(&format!(", constraint \"{constraint}\""));
        }
        if let Some(table) = &self.table {
            message.push_str(&format!(", table \"{table}\""));
        }
        if let Some(column) = &self.column {
            message.push_str(&format!(", column \"{column}\""));
        }
        ConnectError::data(message)
    }
}

/// What a failed statement means for the sink.
#[derive(Debug)]
pub enum Failure {
    /// Try the same work again later: the connection, the server shutting down, a deadlock.
    Transient,
    /// A row of the statement is at fault; with one row, that row.
    Row(RowRejection),
    /// A column or the table is not what the sink read from the catalog.
    SchemaChanged,
    Other,
}

fn sqlstate_of(error: &sqlx::Error) -> Option<Cow<'_, str>> {
    match error {
        sqlx::Error::Database(db) => db.code(),
        _ => None,
    }
}

pub fn classify(error: &sqlx::Error) -> Failure {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Failure::Transient,
        sqlx::Error::Database(db) => {
            let code = sqlstate_of(error).map(Cow::into_owned).unwrap_or_default();
            let class = code.get(..2).unwrap_or_default();
            match (class, code.as_str()) {
                // connection exception, insufficient resources, operator intervention
                // (admin shutdown, crash shutdown, cannot connect now), serialization failure,
                // deadlock, lock not available.
                ("08" | "53" | "57" | "40", _) | (_, "55P03") => Failure::Transient,
                // undefined column / table: someone altered or dropped it.
                (_, "42703" | "42P01") => Failure::SchemaChanged,
                // data exception, integrity constraint violation, program limit (row too big).
                ("22" | "23" | "54", _) => {
                    let pg = db.try_downcast_ref::<PgDatabaseError>();
                    let reason = if class == "23" {
                        db.message().to_string()
                    } else {
                        describe_sqlstate(&code).to_string()
                    };
                    Failure::Row(RowRejection {
                        sqlstate: code.clone(),
                        constraint: db.constraint().map(str::to_string),
                        table: db.table().map(str::to_string),
                        column: pg.and_then(|e| e.column()).map(str::to_string),
                        reason,
                    })
                }
                _ => Failure::Other,
            }
        }
        _ => Failure::Other,
    }
}

/// The condition names of PostgreSQL's data exceptions a sink meets (Appendix A).
fn describe_sqlstate(code: &str) -> &'static str {
    match code {
        "22P02" => "invalid_text_representation: a value does not fit the column's type",
        "22003" => "numeric_value_out_of_range",
        "22001" => "string_data_right_truncation: a value is longer than its column allows",
        "22007" | "22008" => "invalid_datetime_format or datetime_field_overflow",
        "22021" => "character_not_in_repertoire",
        "22P05" => "untranslatable_character (e.g. \\u0000 in text or jsonb)",
        "22030" | "22032" => "invalid JSON",
        "54000" => "program_limit_exceeded: the row is too large",
        _ => "data exception",
    }
}
