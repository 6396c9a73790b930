//! PostgreSQL sources: query mode ([`PostgresSourceConnector`], Confluent's JDBC source modes
//! with a safe bound so late commits are never skipped) and change data capture
//! ([`PostgresCdcSourceConnector`], logical replication with `pgoutput`).

mod cdc;
pub mod config;
pub mod pgoutput;
mod query;

pub use cdc::{PostgresCdcSourceConnector, PostgresCdcSourceTask};

pub use query::{PostgresSourceConnector, PostgresSourceTask};
