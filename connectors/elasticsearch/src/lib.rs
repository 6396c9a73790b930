//! Elasticsearch / OpenSearch sink.
//!
//! [`ElasticsearchSinkConnector`] writes each record's JSON value as a document through the
//! `_bulk` API: ids are deterministic (the record key, or topic+partition+offset), so a record
//! delivered again overwrites its document instead of duplicating it; items the cluster
//! pushes back on (429, `es_rejected_execution_exception`, 5xx) are retried with backoff
//! while the task pauses its partitions; documents the cluster refuses (mapping errors) go to
//! the dead-letter topic; and only offsets of acknowledged documents are committed.

pub mod bulk;
pub mod config;
pub mod document;
pub mod index;
mod sink;
mod writer;

pub use sink::{ElasticsearchSinkConnector, ElasticsearchSinkTask};
