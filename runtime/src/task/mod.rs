//! Source and sink task runners: they drive a connector's task, its transforms, Kafka, offset
//! commits and error handling, and report the task's state.

pub mod errors;
pub(crate) mod lifecycle;
pub mod sink;
mod source;
mod status;

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use sink::{SinkRunner, SinkTaskSpec};
pub use source::{SourceRunner, SourceTaskSpec};
pub use status::StatusReporter;

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

/// What the herder holds of a running task.
pub struct TaskHandle {
    pub run_state: watch::Sender<RunState>,
    pub stop: CancellationToken,
    pub join: tokio::task::JoinHandle<()>,
    /// The task config generation this task was started with.
    pub generation: u64,
    pub config: medconnect_api::Props,
}

impl TaskHandle {
    pub fn set_state(&self, state: RunState) {
        self.run_state.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
    }

    /// Asks the task to stop and waits until it delivered what it had (bounded by the
    /// runner's shutdown timeout).
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(error) = self.join.await {
            tracing::error!(%error, "task runner ended abnormally");
        }
    }
}
