//! Supervision of task runners, in one place: a runner that panics anywhere it unwinds
//! through (a task's start, put, flush, poll, stop, a transform) makes its task FAILED with the
//! panic as trace; a runner that ends without being asked to is a failure too; a runner that
//! does not stop in time is abandoned; and a task's next run starts only once the previous one
//! is over, so two runs of one task never run at once.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use medconnect_api::Props;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::RunState;
use super::lifecycle::panic_text;
use super::status::{AfterStop, StatusReporter};

/// A run being stopped; completes once it is over (ended or abandoned). Cheap to clone.
pub type Stopping = Shared<BoxFuture<'static, ()>>;

/// Runs a task's runner: after `previous` (the task's last run) is over, unless stopped
/// meanwhile; reports a panic or an unexpected end as a failure of the task.
pub async fn supervise(
    runner: BoxFuture<'static, ()>,
    previous: Option<Stopping>,
    status: StatusReporter,
    stop: CancellationToken,
) {
    if let Some(previous) = previous {
        previous.await;
    }
    if !stop.is_cancelled() {
        match caught(runner).await {
            Err(panic) => status.failed(&format!("task panicked: {panic}")).await,
            Ok(()) if !stop.is_cancelled() => status.ended_unexpectedly().await,
            Ok(()) => {}
        }
    }
    status.finished().await;
}

/// Runs `runner`, catching a panic that unwinds through it: `Err` with the panic's text.
async fn caught(runner: BoxFuture<'static, ()>) -> Result<(), String> {
    AssertUnwindSafe(runner)
        .catch_unwind()
        .await
        .map_err(|payload| panic_text(payload.as_ref()))
}

/// What the herder holds of a task's current run.
pub struct TaskHandle {
    pub run_state: watch::Sender<RunState>,
    pub stop: CancellationToken,
    /// The supervised runner.
    pub join: JoinHandle<()>,
    /// The task config generation this run was started with.
    pub generation: u64,
    pub config: Props,
    pub status: StatusReporter,
}

impl TaskHandle {
    /// Sets the wanted run state; `true` when it changed.
    pub fn set_state(&self, state: RunState) -> bool {
        self.run_state.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        })
    }

    /// Asks the run to stop and waits until it delivered what it had, then closes its status
    /// with `after`. The runner bounds each of its stopping steps (delivering what it holds,
    /// the task's `stop`) by the shutdown timeout; a runner still going after twice that is
    /// stuck beyond what it bounds itself, and is abandoned.
    pub async fn stop(mut self, shutdown_timeout: Duration, after: AfterStop) {
        self.stop.cancel();
        let limit = shutdown_timeout.saturating_mul(2);
        match tokio::time::timeout(limit, &mut self.join).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(connector = %self.status.connector(), task = self.status.task_id(), %error, "task runner ended abnormally")
            }
            Err(_) => {
                tracing::error!(connector = %self.status.connector(), task = self.status.task_id(), limit_ms = limit.as_millis() as u64, "task did not stop in time; abandoning it");
                // Dropped at its next await; nothing it does any more is reported (below).
                self.join.abort();
            }
        }
        self.status.close(after).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn put_panics() {
        tokio::task::yield_now().await;
        panic!("put went wrong");
    }

    async fn poll_panics(task: u32) {
        panic!("task {task} failed");
    }

    #[tokio::test]
    async fn a_panic_in_a_runner_is_caught_with_its_message() {
        assert_eq!(
            caught(put_panics().boxed()).await,
            Err("put went wrong".into())
        );
        assert_eq!(
            caught(poll_panics(3).boxed()).await,
            Err("task 3 failed".into())
        );
        assert_eq!(caught(async {}.boxed()).await, Ok(()));
    }
}
