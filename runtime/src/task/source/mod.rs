//! The source task runner: poll -> transforms -> produce -> on Kafka's acknowledgement,
//! store the source offset or complete the listener's acknowledgement.
//!
//! Polling runs in its own tokio task so a slow `poll` is never cancelled mid-way (polls are
//! not cancel-safe); backpressure stops polling while `max_in_flight` records await Kafka.
//! Deliveries are awaited in the order records were polled, so a stored offset never runs
//! ahead of an unacknowledged record.

mod in_flight;
mod offset_writes;
mod pipeline;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use medconnect_api::{
    ConnectError, ConnectResult, SourceConnector, SourceOffset, SourcePartition, SourceRecord,
    SourceTask, SourceTaskContext,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::errors::ErrorReporter;
use super::lifecycle::{created_and_started, panic_message, stop_in_time};
use super::{RunState, RunnerSettings, StatusReporter};
use crate::kafka::{KafkaSettings, Producer};
use crate::metrics::TaskMetrics;
use crate::store::{ConnectorState, OffsetStore};
use crate::transform::TransformChain;

use pipeline::Pipeline;

/// Everything a source task runner needs, assembled by the herder.
pub struct SourceTaskSpec {
    pub connector: String,
    pub connector_class: String,
    pub task_id: u32,
    /// Creates the task from `context` when the runner starts.
    pub plugin: Arc<dyn SourceConnector>,
    pub context: SourceTaskContext,
    pub transforms: TransformChain,
    pub errors: ErrorReporter,
    /// Shared with other tasks of the same client settings ([`crate::kafka::ProducerPool`]).
    pub producer: Arc<Producer>,
    pub offsets: Arc<OffsetStore>,
    pub kafka: KafkaSettings,
    /// Partitions and replication factor of topics the task creates.
    pub new_topic: (i32, i32),
    pub status: StatusReporter,
    pub metrics: TaskMetrics,
    pub settings: RunnerSettings,
}

/// In-flight count shared with the poller, which waits while it is at the limit.
pub(super) struct Capacity {
    pub(super) in_flight: AtomicUsize,
    pub(super) max: usize,
    pub(super) freed: Notify,
}

impl Capacity {
    async fn wait(&self) {
        loop {
            let freed = self.freed.notified();
            if self.in_flight.load(Ordering::Acquire) < self.max {
                return;
            }
            freed.await;
        }
    }
}

pub(super) type Batch = ConnectResult<Vec<SourceRecord>>;

pub struct SourceRunner;

impl SourceRunner {
    /// Runs until `stop` is cancelled or the task fails; then delivers what it holds, stores
    /// offsets, and stops the task.
    pub async fn run(
        spec: SourceTaskSpec,
        run_state: watch::Receiver<RunState>,
        stop: CancellationToken,
    ) {
        let SourceTaskSpec {
            connector,
            connector_class,
            task_id,
            plugin,
            context,
            transforms,
            errors,
            producer,
            offsets,
            kafka,
            new_topic,
            status,
            metrics,
            settings,
        } = spec;
        let started = created_and_started(plugin.create_task(context), &errors.policy, &stop).await;
        let mut task = match started {
            Ok(task) => task,
            Err(error) => {
                status.failed(&error).await;
                return;
            }
        };
        if stop.is_cancelled() {
            stop_in_time(
                task.as_mut(),
                &connector,
                task_id,
                settings.shutdown_timeout,
            )
            .await;
            return;
        }
        status.report(ConnectorState::Running, None).await;
        let capacity = Arc::new(Capacity {
            in_flight: AtomicUsize::new(0),
            max: settings.max_in_flight.max(1),
            freed: Notify::new(),
        });
        let (batches_tx, batches) = mpsc::channel::<Batch>(1);
        let stop_polling = stop.child_token();
        let stored = Arc::new(StoredOffsets::default());
        let poller = tokio::spawn(poll_loop(
            task,
            batches_tx,
            run_state,
            capacity.clone(),
            stop_polling.clone(),
            stored.clone(),
            errors.policy.clone(),
        ));
        let mut pipeline = Pipeline {
            connector,
            connector_class,
            transforms,
            errors,
            producer,
            offsets,
            kafka,
            new_topic,
            status: status.clone(),
            metrics,
            capacity,
            in_flight: VecDeque::new(),
            pending_offsets: Vec::new(),
            uncommitted: 0,
            committing: None,
            known_topics: Default::default(),
            held: false,
            durable_unpublished: 0,
        };
        let mut failure = pipeline.run(batches, &stop, &stored, &settings).await;

        // Stop polling, then deliver what was already polled and store its offsets (never
        // past a record that failed: `held`).
        stop_polling.cancel();
        let task = poller.await;
        if let Err(error) = pipeline.drain(&settings).await {
            failure.get_or_insert(error);
        }
        pipeline.store_offsets_now(&stored, &settings).await;
        match task {
            Ok(mut task) => {
                let last = stored.take();
                if !last.is_empty()
                    && let Err(error) = task.commit(&last).await
                {
                    tracing::warn!(connector = %pipeline.connector, task = task_id, %error, "commit failed while stopping");
                }
                stop_in_time(
                    task.as_mut(),
                    &pipeline.connector,
                    task_id,
                    settings.shutdown_timeout,
                )
                .await;
            }
            Err(error) => {
                // The poller panicked (or was aborted): the task is dead, whatever else happened.
                tracing::error!(connector = %pipeline.connector, task = task_id, %error, "poller ended abnormally");
                failure.get_or_insert(ConnectError::fatal(format!(
                    "the source task's poll ended abnormally: {}",
                    panic_message(error)
                )));
            }
        }
        pipeline.transforms.close();
        if let Some(error) = failure {
            status.failed(&error).await;
        }
        pipeline.metrics.remove();
    }
}

pub(super) async fn poll_loop(
    mut task: Box<dyn SourceTask>,
    batches: mpsc::Sender<Batch>,
    mut run_state: watch::Receiver<RunState>,
    capacity: Arc<Capacity>,
    stop: CancellationToken,
    stored: Arc<StoredOffsets>,
    policy: super::errors::ErrorPolicy,
) -> Box<dyn SourceTask> {
    let mut backoff = Duration::from_millis(100);
    loop {
        if stop.is_cancelled() {
            break;
        }
        let newly_stored = stored.take();
        if !newly_stored.is_empty()
            && let Err(error) = task.commit(&newly_stored).await
        {
            tracing::warn!(%error, "source task commit failed");
        }
        if *run_state.borrow_and_update() == RunState::Paused {
            tokio::select! {
                _ = run_state.changed() => continue,
                _ = stop.cancelled() => break,
            }
        }
        tokio::select! {
            _ = capacity.wait() => {}
            _ = stop.cancelled() => break,
        }
        let polled = tokio::select! {
            polled = task.poll() => polled,
            _ = stop.cancelled() => break,
        };
        let batch = match polled {
            Ok(records) if records.is_empty() => continue,
            Ok(records) => {
                backoff = Duration::from_millis(100);
                Ok(records)
            }
            Err(error) if error.is_retriable() => {
                // A source that cannot reach its peer retries for as long as it runs.
                tracing::warn!(%error, ?backoff, "poll failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(policy.retry_delay_max);
                continue;
            }
            Err(error) => Err(error),
        };
        let failed = batch.is_err();
        tokio::select! {
            sent = batches.send(batch) => if sent.is_err() { break },
            _ = stop.cancelled() => break,
        }
        if failed {
            break;
        }
    }
    task
}

/// Offsets stored in the offset topic and not yet handed to the task's `commit`: the latest
/// per source partition. Shared with the poller, which owns the task.
#[derive(Default)]
pub(super) struct StoredOffsets(std::sync::Mutex<Vec<(SourcePartition, SourceOffset)>>);

impl StoredOffsets {
    fn add(&self, batch: Vec<(SourcePartition, SourceOffset)>) {
        let mut stored = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (partition, offset) in batch {
            match stored.iter_mut().find(|(p, _)| *p == partition) {
                Some(entry) => entry.1 = offset,
                None => stored.push((partition, offset)),
            }
        }
    }

    fn take(&self) -> Vec<(SourcePartition, SourceOffset)> {
        std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}
