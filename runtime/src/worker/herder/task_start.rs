//! Task construction: one task's runner built from its config (secrets resolved, error
//! policy, transforms, producer or consumer) and started under supervision, with a run number
//! above every earlier run of the task.

use futures::FutureExt;
use futures::future::BoxFuture;
use medconnect_api::{ConnectError, Props, SourceTaskContext};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::offsets::sink;
use super::{Herder, cc};
use crate::kafka::{TopicSpec, ensure_topics, overrides_with_prefix};
use crate::metrics::TaskMetrics;
use crate::store::ConnectorEntry;
use crate::task::errors::{ErrorPolicy, ErrorReporter};
use crate::task::sink::Subscription;
use crate::task::{
    RunId, RunState, SinkRunner, SinkTaskSpec, SourceRunner, SourceTaskSpec, StatusReporter,
    TaskHandle, supervise,
};
use crate::transform::TransformChain;
use crate::worker::plugins::ConnectorPlugin;
use crate::worker::secrets::{self, Resolved};

impl Herder {
    /// A run number above every earlier run of the task: above the last one given here and the
    /// one stored (which a previous process of this worker may have written).
    pub(super) fn next_run(&self, name: &str, id: u32) -> u64 {
        let stored = self.statuses.task(name, id).map_or(0, |s| s.run);
        let mut runs = self
            .runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let last = runs.entry((name.to_string(), id)).or_default();
        *last = (*last).max(stored) + 1;
        *last
    }

    pub(super) async fn start_task(
        &self,
        name: &str,
        id: u32,
        config: &Props,
        entry: &ConnectorEntry,
        run_state: RunState,
    ) {
        let key = (name.to_string(), id);
        let (state_tx, state_rx) = watch::channel(run_state);
        let resolution = self.resolve(config);
        // What the task reports (its traces) is built from the resolved config.
        let scrubber = resolution
            .as_ref()
            .map(|resolved| resolved.scrubber.clone())
            .unwrap_or_default();
        let status = StatusReporter::new(
            self.statuses.clone(),
            RunId {
                connector: name,
                task_id: id,
                worker_id: &self.worker_id,
                generation: entry.task_generation,
                run: self.next_run(name, id),
                assignment_generation: self.assignment.generation(),
            },
            state_rx.clone(),
            scrubber,
        );
        let stop = CancellationToken::new();
        let runner = match self
            .spawn_task(name, id, resolution, status.clone(), state_rx, stop.clone())
            .await
        {
            Ok(runner) => runner,
            // Kept as a run that failed: it stays FAILED until restarted or reconfigured.
            Err(error) => {
                let status = status.clone();
                async move { status.failed(&error).await }.boxed()
            }
        };
        let previous = self.stopping_runs().remove(&key);
        let join = tokio::spawn(supervise(runner, previous, status.clone(), stop.clone()));
        self.tasks.lock().await.insert(
            key,
            TaskHandle {
                run_state: state_tx,
                stop,
                join,
                generation: entry.task_generation,
                config: config.clone(),
                status,
            },
        );
    }

    /// A task config with its references resolved through this worker's config providers.
    pub(super) fn resolve(&self, config: &Props) -> std::result::Result<Resolved, ConnectError> {
        let plugin = self
            .plugins
            .find(config.get(cc::CLASS).map_or("", String::as_str))
            .ok_or_else(|| ConnectError::config(cc::CLASS, "unknown connector class"))?;
        secrets::resolve(
            &self.runner.config_providers,
            &cc::full_def(&plugin),
            config,
        )
    }

    async fn spawn_task(
        &self,
        name: &str,
        id: u32,
        resolution: std::result::Result<Resolved, ConnectError>,
        status: StatusReporter,
        run_state: watch::Receiver<RunState>,
        stop: CancellationToken,
    ) -> std::result::Result<BoxFuture<'static, ()>, ConnectError> {
        let Resolved {
            props: resolved,
            scrubber,
        } = resolution?;
        let plugin = self
            .plugins
            .find(resolved.get(cc::CLASS).map_or("", String::as_str))
            .ok_or_else(|| ConnectError::config(cc::CLASS, "unknown connector class"))?;
        let common = cc::parse_common(plugin.kind(), &resolved)?;
        let policy = ErrorPolicy::from_config(&common)?;
        if let Some(topic) = &policy.dlq_topic {
            ensure_topics(
                &self.kafka,
                &[TopicSpec::regular(topic, 1, policy.dlq_replication_factor)],
            )
            .await
            .map_err(|e| ConnectError::retriable(e.to_string()))?;
        }
        let transforms = TransformChain::from_config(&resolved)?;
        let metrics = TaskMetrics::new(&self.metrics, name, id);
        let errors = ErrorReporter::new(
            policy,
            name,
            id,
            self.dlq_producer.clone(),
            metrics.clone(),
            scrubber,
        );
        let runner = self.runner.clone();
        let join = match plugin {
            ConnectorPlugin::Source(connector) => {
                let overrides = overrides_with_prefix(&resolved, cc::PRODUCER_OVERRIDE);
                let producer = self
                    .producers
                    .get(&self.kafka, &overrides)
                    .map_err(|e| ConnectError::fatal(e.to_string()))?;
                let spec = SourceTaskSpec {
                    connector: name.to_string(),
                    connector_class: connector.class().to_string(),
                    task_id: id,
                    plugin: connector.clone(),
                    context: SourceTaskContext {
                        connector_name: name.to_string(),
                        task_id: id,
                        config: resolved.clone(),
                        offsets: self.offsets.reader(name),
                        listener_budget: self.listener_budget.clone(),
                    },
                    transforms,
                    errors,
                    producer,
                    offsets: self.offsets.clone(),
                    kafka: self.kafka.clone(),
                    new_topic: (
                        common.int(cc::NEW_TOPIC_PARTITIONS)? as i32,
                        common.int(cc::NEW_TOPIC_REPLICATION)? as i32,
                    ),
                    status,
                    metrics,
                    settings: runner,
                };
                SourceRunner::run(spec, run_state, stop).boxed()
            }
            ConnectorPlugin::Sink(connector) => {
                let overrides = overrides_with_prefix(&resolved, cc::CONSUMER_OVERRIDE);
                let consumer = crate::task::sink::SinkConsumer::create(
                    &self.kafka,
                    Some(&sink::group_id(name)),
                    &overrides,
                )
                .map_err(|e| ConnectError::fatal(e.to_string()))?;
                let subscription = match common.optional_string(cc::TOPICS_REGEX) {
                    Some(regex) => Subscription::Regex(regex),
                    None => Subscription::Topics(common.list(cc::TOPICS)?),
                };
                let spec = SinkTaskSpec {
                    connector: name.to_string(),
                    task_id: id,
                    plugin: connector,
                    config: resolved.clone(),
                    subscription,
                    consumer,
                    transforms,
                    errors,
                    status,
                    metrics,
                    settings: runner,
                    peers: self.peers.clone(),
                };
                SinkRunner::run(spec, run_state, stop).boxed()
            }
        };
        Ok(join)
    }
}
