//! `file`: a source that tails a file line by line, and a sink that appends records to a file.

pub mod config;
mod sink;
mod source;

pub use config::{BATCH_SIZE, FILE, FileSinkConfig, FileSourceConfig, POLL_INTERVAL_MS, TOPIC};
pub use sink::{FileSinkConnector, FileSinkTask};
pub use source::{FileSourceConnector, FileSourceTask};
