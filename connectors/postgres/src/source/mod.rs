//! PostgreSQL sources: query mode ([`PostgresSourceConnector`], Confluent's JDBC source modes
//! with a safe bound so late commits are never skipped) and change data capture
//! ([`PostgresCdcSourceConnector`], logical replication with `pgoutput`).

pub mod config;
mod query;

pub use query::{PostgresSourceConnector, PostgresSourceTask};
