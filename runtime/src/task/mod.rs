//! Source and sink task runners: they drive a connector's task, its transforms, Kafka, offset
//! commits and error handling, and report the task's state.

pub mod errors;
pub(crate) mod lifecycle;
pub mod sink;
mod source;
mod status;
mod supervisor;

use std::time::Duration;

use crate::worker::config_providers::ConfigProviders;

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
    /// How long a stopping task may take to deliver what it already has. The runner bounds
    /// each of its stopping steps by it; the herder abandons a runner still going after twice
    /// this (see `TaskHandle::stop`).
    pub shutdown_timeout: Duration,
    /// Records handed to a sink's `put` at most at once.
    pub sink_batch_max: usize,
    /// The largest `tasks.max` a connector may ask for (`[tasks] tasks_max_limit`).
    pub tasks_max_limit: u32,
    /// How long a connector's own `validate` or `task_configs` may take (`[tasks]
    /// connector_call_timeout_ms`): they may wait on a peer (a FHIR server's
    /// CapabilityStatement), which must fail the call, not hold the REST request forever.
    pub connector_call_timeout: Duration,
    /// Which `${env:...}` / `${file:...}` references connector configs may use
    /// (`[config_providers]`); none by default.
    pub config_providers: ConfigProviders,
    /// Bytes remote senders may make this worker hold, over all its listener sources
    /// (`[tasks] listener_budget_bytes`); each listener's own budget lies within it.
    pub listener_budget_bytes: usize,
}

/// The default of `[tasks] tasks_max_limit`. Every task holds its own Kafka client (threads,
/// buffers) and its own config and status records, and today every worker runs every task: a
/// typo such as `tasks.max=1000000000` must be a 400, not a worker that materialises task
/// configs until the kernel kills it. 1,000 is far above what one connector can use (a sink
/// gains nothing from more tasks than its topics have partitions; Connect deployments rarely
/// run more than a few hundred per connector), yet a bounded amount of work.
pub const DEFAULT_TASKS_MAX_LIMIT: u32 = 1000;

/// The default of `[tasks] connector_call_timeout_ms`: below the 90 s after which Connect's
/// REST clients give up, so the answer still reaches them.
pub const DEFAULT_CONNECTOR_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The default of `[tasks] listener_budget_bytes`: four MLLP listeners at their default
/// 64 MiB each. Without a worker-wide bound, k listener connectors could hold k times their
/// own budget.
pub const DEFAULT_LISTENER_BUDGET_BYTES: usize = 256 << 20;

impl Default for RunnerSettings {
    fn default() -> Self {
        Self {
            offset_flush_interval: Duration::from_secs(5),
            max_in_flight: 10_000,
            shutdown_timeout: Duration::from_secs(10),
            sink_batch_max: 500,
            tasks_max_limit: DEFAULT_TASKS_MAX_LIMIT,
            connector_call_timeout: DEFAULT_CONNECTOR_CALL_TIMEOUT,
            config_providers: ConfigProviders::default(),
            listener_budget_bytes: DEFAULT_LISTENER_BUDGET_BYTES,
        }
    }
}
