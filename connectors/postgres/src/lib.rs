//! PostgreSQL sink and sources.
//!
//! [`PostgresSinkConnector`] writes records to tables: the top-level fields of a JSON object
//! value as columns (types inferred, tables created and evolved on demand), or the whole value
//! in one `jsonb` column. Each batch is one transaction of one statement per table shape
//! (`UNNEST` of one array per column), as insert, upsert (`ON CONFLICT DO UPDATE`) or update;
//! tombstones delete. Upserts and the `kafka` key make redelivery harmless. A row the database
//! refuses is found by splitting its statement and reported alone as errant; a lost connection
//! is retriable.

pub mod config;
mod direct;
pub mod error;
mod link;
pub mod row;
mod scan;
pub mod schema;
mod sink;
pub mod source;
pub mod sql;
mod streamed;
pub mod table;
mod writer;

pub use sink::{PostgresSinkConnector, PostgresSinkTask};
pub use source::{
    PostgresCdcSourceConnector, PostgresCdcSourceTask, PostgresSourceConnector, PostgresSourceTask,
};
