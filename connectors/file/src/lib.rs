//! `file`: a source that tails a file line by line, and a sink that appends records to a file.

mod sink;
mod source;

pub use sink::{FileSinkConnector, FileSinkTask};
pub use source::{FileSourceConnector, FileSourceTask};

pub const FILE: &str = "file";
pub const TOPIC: &str = "topic";
pub const BATCH_SIZE: &str = "batch.size";
pub const POLL_INTERVAL_MS: &str = "poll.interval.ms";
