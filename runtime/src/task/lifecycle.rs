//! What both runners do around a task: start it (retrying what is retriable), and tell why a
//! tokio task ended abnormally.

use medconnect_api::{ConnectResult, SinkTask, SourceTask};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::errors::ErrorPolicy;

/// Takes the task its connector created (or the reason it could not) and starts it, retrying
/// what is retriable: the one way both runners get a running task.
pub(super) async fn created_and_started<T: TaskLifecycle + ?Sized>(
    created: ConnectResult<Box<T>>,
    policy: &ErrorPolicy,
    stop: &CancellationToken,
) -> ConnectResult<Box<T>> {
    let mut task = created?;
    start_with_retries(task.as_mut(), policy, stop).await?;
    Ok(task)
}

/// Starts the task, retrying retriable failures (a listener's port still held by its previous
/// run) with backoff within `errors.retry.timeout`, until `stop`.
async fn start_with_retries<T: TaskLifecycle + ?Sized>(
    task: &mut T,
    policy: &ErrorPolicy,
    stop: &CancellationToken,
) -> ConnectResult<()> {
    let mut backoff = policy.backoff(false);
    loop {
        match task.start_task().await {
            Err(error) if backoff.retry_after(&error, stop).await => {
                tracing::warn!(%error, "task start failed; retrying");
            }
            other => return other,
        }
    }
}

/// A task's `start` and `stop`, for [`start_with_retries`] and [`stop_in_time`] over sources
/// and sinks alike.
#[async_trait::async_trait]
pub(super) trait TaskLifecycle {
    async fn start_task(&mut self) -> ConnectResult<()>;
    async fn stop_task(&mut self) -> ConnectResult<()>;
}

#[async_trait::async_trait]
impl TaskLifecycle for dyn SourceTask {
    async fn start_task(&mut self) -> ConnectResult<()> {
        self.start().await
    }
    async fn stop_task(&mut self) -> ConnectResult<()> {
        self.stop().await
    }
}

#[async_trait::async_trait]
impl TaskLifecycle for dyn SinkTask {
    async fn start_task(&mut self) -> ConnectResult<()> {
        self.start().await
    }
    async fn stop_task(&mut self) -> ConnectResult<()> {
        self.stop().await
    }
}

/// Calls the task's `stop`, bounded by the shutdown timeout: a stuck task must not hold its
/// runner (and the worker's shutdown) forever.
pub(super) async fn stop_in_time<T: TaskLifecycle + ?Sized>(
    task: &mut T,
    connector: &str,
    task_id: u32,
    timeout: Duration,
) {
    match tokio::time::timeout(timeout, task.stop_task()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%connector, task = task_id, %error, "task did not stop cleanly")
        }
        Err(_) => {
            tracing::warn!(%connector, task = task_id, ?timeout, "task did not stop in time; abandoned")
        }
    }
}

/// The message of a panicked tokio task, for the task's status trace.
pub(crate) fn panic_message(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => panic_text(payload.as_ref()),
        Err(error) => error.to_string(),
    }
}

/// The text a panic was raised with (`panic!("...")` gives a `&str` or a `String`).
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-text payload".to_string())
}
