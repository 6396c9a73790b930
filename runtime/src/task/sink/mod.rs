//! The sink task runner: consumer group `connect-<name>` -> transforms -> `put` -> `flush`
//! -> commit consumer offsets. Offsets are committed only after the sink flushed the records
//! (and any dead-letter writes were acknowledged), so a crash redelivers, never loses.
//!
//! Partition assignment is the runner's, not the consumer's: all tasks of a sink share the
//! group `connect-<name>`, so a partition revoked from one task is read next by another from
//! the last committed offset. The consumer's rebalance callback (run inside `recv`) therefore
//! does not (un)assign; it hands the change to the runner, which commits what the task
//! accepted for revoked partitions, calls the task's `close`, and only then unassigns them
//! (librdkafka waits for that call before the group moves on); for assigned partitions it
//! assigns them and calls the task's `open` before any of their records is read.

mod consumer;
mod lent;
mod pipeline;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use medconnect_api::{
    ConnectError, ConnectResult, ErrantRecordReporter, SinkConnector, SinkPartitions,
    SinkTaskContext, TaskConfig, TopicPartition,
};
use rdkafka::consumer::Consumer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::errors::ErrorReporter;
use super::lifecycle::{created_and_started, stop_in_time};
use super::{RunState, RunnerSettings, StatusReporter};
use crate::metrics::TaskMetrics;
use crate::store::ConnectorState;
use crate::transform::TransformChain;

use consumer::{Detach, Rebalance, assign};
use lent::{ConsumerPartitions, ErrantRecords};
use pipeline::{Positions, Sink};

pub use consumer::{RebalanceContext, SinkConsumer};

/// What a sink reads: a topic list or a regular expression (`topics` / `topics.regex`).
#[derive(Debug, Clone)]
pub enum Subscription {
    Topics(Vec<String>),
    Regex(String),
}

pub struct SinkTaskSpec {
    pub connector: String,
    pub task_id: u32,
    /// Creates the task when the runner starts, from a context the runner builds.
    pub plugin: Arc<dyn SinkConnector>,
    /// The task's resolved settings; the runner builds the task's context around them.
    pub config: TaskConfig,
    pub subscription: Subscription,
    pub consumer: SinkConsumer,
    pub transforms: TransformChain,
    pub errors: ErrorReporter,
    pub status: StatusReporter,
    pub metrics: TaskMetrics,
    pub settings: RunnerSettings,
    /// The other workers, for the task's context.
    pub peers: Arc<dyn medconnect_api::relay::Peers>,
}

pub struct SinkRunner;

impl SinkRunner {
    pub async fn run(
        spec: SinkTaskSpec,
        run_state: watch::Receiver<RunState>,
        stop: CancellationToken,
    ) {
        let SinkTaskSpec {
            connector,
            task_id,
            plugin,
            config,
            subscription,
            consumer,
            transforms,
            errors,
            status,
            metrics,
            settings,
            peers,
        } = spec;
        let errors = Arc::new(errors);
        let errant = Arc::new(ErrantRecords::new(errors.clone()));
        let SinkConsumer {
            consumer,
            rebalances,
        } = consumer;
        let consumer = Arc::new(consumer);
        // Locals drop in reverse order, so this one before `consumer` (the last reference to
        // the consumer until `Sink` owns it; there it is the first field, dropped first).
        let detach = Detach(consumer.context().clone());
        let partitions = Arc::new(ConsumerPartitions {
            consumer: consumer.clone(),
            paused_by_task: Mutex::new(BTreeSet::new()),
        });
        let context = SinkTaskContext {
            connector_name: connector.clone(),
            task_id,
            config,
            errant_records: ErrantRecordReporter::new(errant.clone()),
            partitions: SinkPartitions::new(partitions.clone()),
            peers,
        };
        let started = created_and_started(plugin.create_task(context), &errors.policy, &stop).await;
        let mut task = match started {
            Ok(task) => task,
            Err(error) => {
                status.failed(&error).await;
                return;
            }
        };
        let subscribed = match &subscription {
            Subscription::Topics(topics) => {
                let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                consumer.subscribe(&names)
            }
            Subscription::Regex(regex) => consumer.subscribe(&[&format!("^{regex}")]),
        };
        if let Err(error) = subscribed {
            consumer.context().detach();
            status.failed(&format!("cannot subscribe: {error}")).await;
            stop_in_time(
                task.as_mut(),
                &connector,
                task_id,
                settings.shutdown_timeout,
            )
            .await;
            return;
        }
        if let Subscription::Topics(topics) = &subscription {
            for topic in topics {
                status.topic(topic).await;
            }
        }
        status.report(ConnectorState::Running, None).await;
        let mut sink = Sink {
            _detach: detach,
            connector,
            task,
            consumer,
            partitions,
            transforms,
            errors,
            errant,
            metrics,
            positions: Positions::default(),
            uncommitted: 0,
            stop: stop.clone(),
            shutdown_timeout: settings.shutdown_timeout,
            rebalances,
            open: BTreeSet::new(),
            paused: false,
        };
        let mut failure = sink.run(run_state, &settings).await;
        // Rebalances from here on (the consumer's close revokes everything) are applied by the
        // consumer itself; those already handed over are handled here, since librdkafka waits
        // for their (un)assignment.
        sink.consumer.context().detach();
        while let Ok(event) = sink.rebalances.try_recv() {
            let handled = match event {
                // Partitions the task would close at once: assigned for the group's sake only.
                Rebalance::Assign(partitions) => assign(
                    sink.consumer.as_ref(),
                    &ConsumerPartitions::list(&partitions),
                )
                .map_err(|e| ConnectError::fatal(format!("cannot assign partitions: {e}"))),
                revoke => sink.rebalance(revoke, failure.is_none()).await,
            };
            if let Err(error) = handled {
                failure.get_or_insert(error);
            }
        }
        if failure.is_none()
            && let Err(error) = sink.flush_and_commit().await
        {
            tracing::warn!(connector = %sink.connector, task = task_id, %error, "final flush failed; records will be redelivered");
            failure = Some(error);
        }
        let open: Vec<TopicPartition> = std::mem::take(&mut sink.open).into_iter().collect();
        if let Err(error) = sink.close(&open).await {
            tracing::warn!(connector = %sink.connector, task = task_id, %error, "sink task did not close its partitions cleanly");
        }
        stop_in_time(
            sink.task.as_mut(),
            &sink.connector,
            task_id,
            settings.shutdown_timeout,
        )
        .await;
        sink.transforms.close();
        sink.consumer.unsubscribe();
        if let Some(error) = failure {
            status.failed(&error).await;
        }
        sink.metrics.remove();
    }
}

/// Runs one of the task's calls (`put`, `flush`) for as long as it takes while the task runs,
/// and for at most `grace` once it is asked to stop: a stuck peer cannot hold a stopping task.
pub(super) async fn bounded<T>(
    what: &str,
    call: impl Future<Output = ConnectResult<T>>,
    stop: &CancellationToken,
    grace: Duration,
) -> ConnectResult<T> {
    tokio::pin!(call);
    tokio::select! {
        result = &mut call => return result,
        _ = stop.cancelled() => {}
    }
    tokio::time::timeout(grace, call).await.unwrap_or_else(|_| {
        Err(ConnectError::fatal(format!(
            "the sink task's {what} did not return within {grace:?} of the request to stop; its records will be redelivered"
        )))
    })
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
