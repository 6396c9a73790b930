//! Source and sink task runners: they drive a connector's task, its transforms, Kafka, offset
//! commits and error handling, and report the task's state.

pub mod errors;
pub(crate) mod lifecycle;
pub mod sink;
mod source;
mod status;
mod supervisor;

use std::time::Duration;

pub use sink::{SinkRunner, SinkTaskSpec};
pub use source::{SourceRunner, SourceTaskSpec};
pub use status::{AfterStop, RunId, StatusReporter};
pub use supervisor::{Stopping, TaskHandle, supervise};

/// Whether a running task should move records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

/// Runner settings from the worker config.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    pub offset_flush_interval: Duration,
    /// Records sent to Kafka and not yet acknowledged, per source task (backpressure).
    pub max_in_flight: usize,
    /// How long a stopping task may take to deliver what it already has.
    pub shutdown_timeout: Duration,
    /// Records handed to a sink's `put` at most at once.
    pub sink_batch_max: usize,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        Self {
            offset_flush_interval: Duration::from_secs(5),
            max_in_flight: 10_000,
            shutdown_timeout: Duration::from_secs(10),
            sink_batch_max: 500,
        }
    }
}
