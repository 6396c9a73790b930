//! Task status you can trust, and a herder that never freezes (issue #8, defects 3 and 5):
//! a failed task stays FAILED, a panicking task becomes FAILED with the panic as its trace,
//! a deleted connector leaves no status behind, and one stuck task holds up neither other
//! REST writes nor the worker's shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConfigType, ConnectResult, Importance, SinkConnector, SinkRecord, SinkTask,
    SinkTaskContext, SourceConnector, SourceRecord, SourceTask, SourceTaskContext, TaskConfig,
};
use medconnect_e2e::{DEADLINE, Rest, TestCluster, TestWorker, eventually, json, test_connector};
use serde_json::Value;
use tokio::sync::watch;

/// What a test task does, from its connector config's `behaviour`.
const BEHAVIOUR: &str = "behaviour";

/// What the tests watch and control of the misbehaving tasks of one worker.
struct Hooks {
    /// Set once a task's `stop` has started blocking.
    stuck: watch::Sender<bool>,
    /// Set by the test to let blocked `stop`s return.
    release: watch::Sender<bool>,
    /// Set when a blocked `stop` was abandoned (its future dropped) before being released.
    abandoned: AtomicBool,
    /// How many times a task was started.
    starts: AtomicUsize,
}

impl Hooks {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            stuck: watch::channel(false).0,
            release: watch::channel(false).0,
            abandoned: AtomicBool::new(false),
            starts: AtomicUsize::new(0),
        })
    }

    async fn wait_until_stuck(&self) -> anyhow::Result<()> {
        let mut stuck = self.stuck.subscribe();
        tokio::time::timeout(DEADLINE, stuck.wait_for(|s| *s))
            .await
            .map_err(|_| anyhow::anyhow!("no task's stop ever blocked"))??;
        Ok(())
    }

    fn still_stuck(&self) -> bool {
        *self.stuck.borrow() && !*self.release.borrow() && !self.abandoned.load(Ordering::SeqCst)
    }
}

/// Marks a blocked `stop` as abandoned if its future is dropped before it returns.
struct AbandonGuard(Arc<Hooks>, bool);

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.abandoned.store(true, Ordering::SeqCst);
        }
    }
}

fn behaviour_def() -> ConfigDef {
    ConfigDef::new().define(
        BEHAVIOUR,
        ConfigType::String,
        "ok",
        Importance::High,
        "ok, fail-start, panic-start, panic-put, panic-poll or block-stop.",
    )
}

/// A sink whose tasks misbehave as `behaviour` says, `tasks.max` of them.
struct MisbehavingSink(Arc<Hooks>);

test_connector!(
    MisbehavingSink,
    "test.MisbehavingSink",
    Sink,
    behaviour_def()
);

impl SinkConnector for MisbehavingSink {
    fn create_task(&self, context: SinkTaskContext) -> ConnectResult<Box<dyn SinkTask>> {
        Ok(Box::new(MisbehavingTask::new(
            self.0.clone(),
            &context.config,
        )))
    }
}

/// A source whose tasks misbehave as `behaviour` says.
struct MisbehavingSource(Arc<Hooks>);

test_connector!(
    MisbehavingSource,
    "test.MisbehavingSource",
    Source,
    behaviour_def()
);

impl SourceConnector for MisbehavingSource {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        Ok(Box::new(MisbehavingTask::new(
            self.0.clone(),
            &context.config,
        )))
    }
}

struct MisbehavingTask {
    hooks: Arc<Hooks>,
    behaviour: String,
}

impl MisbehavingTask {
    fn new(hooks: Arc<Hooks>, config: &TaskConfig) -> Self {
        Self {
            hooks,
            behaviour: config.get(BEHAVIOUR).cloned().unwrap_or_default(),
        }
    }

    fn start(&mut self) -> ConnectResult<()> {
        self.hooks.starts.fetch_add(1, Ordering::SeqCst);
        match self.behaviour.as_str() {
            "fail-start" => Err(medconnect_api::ConnectError::fatal(
                "cannot start on purpose",
            )),
            "panic-start" => panic!("start panicked on purpose"),
            _ => Ok(()),
        }
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        if self.behaviour == "block-stop" {
            let mut guard = AbandonGuard(self.hooks.clone(), false);
            let mut release = self.hooks.release.subscribe();
            self.hooks.stuck.send_replace(true);
            let _ = release.wait_for(|r| *r).await;
            guard.1 = true;
        }
        Ok(())
    }
}

#[async_trait]
impl SinkTask for MisbehavingTask {
    async fn start(&mut self) -> ConnectResult<()> {
        MisbehavingTask::start(self)
    }

    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()> {
        if self.behaviour == "panic-put" && !records.is_empty() {
            panic!("put panicked on purpose");
        }
        Ok(())
    }

    async fn flush(&mut self) -> ConnectResult<()> {
        Ok(())
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        MisbehavingTask::stop(self).await
    }
}

#[async_trait]
impl SourceTask for MisbehavingTask {
    async fn start(&mut self) -> ConnectResult<()> {
        MisbehavingTask::start(self)
    }

    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        if self.behaviour == "panic-poll" {
            panic!("poll panicked on purpose");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        Ok(Vec::new())
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        MisbehavingTask::stop(self).await
    }
}

async fn worker_with_test_connectors(
    cluster: &TestCluster,
    shutdown_timeout_ms: u64,
) -> anyhow::Result<(TestWorker, Arc<Hooks>)> {
    let hooks = Hooks::new();
    let plugins = medconnect::builtin_plugins()
        .with_sink(Arc::new(MisbehavingSink(hooks.clone())))
        .with_source(Arc::new(MisbehavingSource(hooks.clone())));
    let mut config = cluster.worker_config();
    config.tasks.shutdown_timeout_ms = shutdown_timeout_ms;
    let worker = cluster.start_worker_with_plugins(config, plugins).await?;
    Ok((worker, hooks))
}

fn sink(behaviour: &str, topic: &str, tasks: u32) -> Value {
    json!({
        "connector.class": "test.MisbehavingSink", "topics": topic,
        "behaviour": behaviour, "tasks.max": tasks.to_string(),
    })
}

fn source(behaviour: &str) -> Value {
    json!({ "connector.class": "test.MisbehavingSource", "behaviour": behaviour })
}

async fn task_state(rest: &Rest, connector: &str, task: u32) -> anyhow::Result<Value> {
    let (code, status) = rest
        .get(&format!("/connectors/{connector}/tasks/{task}/status"))
        .await?;
    anyhow::ensure!(code == 200, "status of {connector}/{task}: {code} {status}");
    Ok(status)
}

/// The report: a FileSink whose file cannot be opened showed RUNNING for good in 4 of
/// 9 tries, because a reconcile wrote RUNNING over the runner's FAILED. Ten tries here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_cannot_open_its_file_is_failed_and_stays_failed() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let (worker, _hooks) = worker_with_test_connectors(&cluster, 10_000).await?;
    let unopenable = cluster.path("no-such-directory/out.jsonl");
    let names: Vec<String> = (0..10).map(|i| format!("archive-{i}")).collect();
    for name in &names {
        worker
            .rest
            .create(
                name,
                json!({
                    "connector.class": "FileSink", "topics": "labs",
                    "file": unopenable.to_str().unwrap_or_default(),
                }),
            )
            .await?;
    }
    let check_all_failed = async || -> anyhow::Result<()> {
        for name in &names {
            let status = worker.wait_for_task(name, 0, "FAILED").await?;
            let trace = status["trace"].as_str().unwrap_or_default();
            assert!(trace.contains("cannot open"), "{name}: {status}");
        }
        Ok(())
    };
    check_all_failed().await?;

    // Later reconciles (each write reconciles, so does the config-topic watcher) keep them so.
    worker.rest.create("fine", sink("ok", "labs", 1)).await?;
    worker.wait_for_state("fine", "RUNNING", 1).await?;
    assert_eq!(
        worker.rest.put_empty("/connectors/fine/pause").await?.0,
        202
    );
    worker.wait_for_state("fine", "PAUSED", 1).await?;
    for name in &names {
        let status = task_state(&worker.rest, name, 0).await?;
        assert_eq!(
            status["state"], "FAILED",
            "{name} after later reconciles: {status}"
        );
    }
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_whose_put_panics_is_failed_with_the_panic_as_trace() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let (worker, _hooks) = worker_with_test_connectors(&cluster, 10_000).await?;
    cluster.produce("panics", &[(None, "boom")]).await?;
    worker
        .rest
        .create("panicky", sink("panic-put", "panics", 1))
        .await?;
    let status = worker.wait_for_task("panicky", 0, "FAILED").await?;
    assert!(
        status["trace"]
            .as_str()
            .is_some_and(|t| t.contains("put panicked on purpose")),
        "{status}"
    );

    // The worker lives on, and the task can be restarted (it fails again, visibly).
    assert_eq!(
        worker
            .rest
            .post_empty("/connectors/panicky/tasks/0/restart")
            .await?
            .0,
        204
    );
    let status = worker.wait_for_task("panicky", 0, "FAILED").await?;
    assert!(
        status["trace"]
            .as_str()
            .is_some_and(|t| t.contains("panicked"))
    );
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_whose_start_panics_is_failed_with_the_panic_as_trace() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let (worker, _hooks) = worker_with_test_connectors(&cluster, 10_000).await?;
    worker
        .rest
        .create("panicky-source", source("panic-start"))
        .await?;
    let status = worker.wait_for_task("panicky-source", 0, "FAILED").await?;
    assert!(
        status["trace"]
            .as_str()
            .is_some_and(|t| t.contains("start panicked on purpose")),
        "{status}"
    );
    worker.shutdown().await;
    Ok(())
}

/// The poller runs in a tokio task of its own: its panic must fail the task all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_whose_poll_panics_is_failed_with_the_panic_as_trace() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let (worker, _hooks) = worker_with_test_connectors(&cluster, 10_000).await?;
    worker
        .rest
        .create("panicky-poller", source("panic-poll"))
        .await?;
    let status = worker.wait_for_task("panicky-poller", 0, "FAILED").await?;
    assert!(
        status["trace"]
            .as_str()
            .is_some_and(|t| t.contains("poll panicked on purpose")),
        "{status}"
    );
    worker.shutdown().await;
    Ok(())
}

/// The last record of each key of the status topic: `None` for a tombstone.
async fn status_records(cluster: &TestCluster) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let mut last: Vec<(String, Option<String>)> = Vec::new();
    for record in cluster.read_all("medconnect-status").await? {
        let key = record.key.clone().unwrap_or_default();
        last.retain(|(k, _)| *k != key);
        last.push((key, record.value.clone()));
    }
    Ok(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_connector_leaves_no_status_for_its_successor() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let (worker, _hooks) = worker_with_test_connectors(&cluster, 10_000).await?;
    worker
        .rest
        .create("reused", sink("ok", "reused-in", 3))
        .await?;
    worker.wait_for_state("reused", "RUNNING", 3).await?;
    assert_eq!(worker.rest.delete("/connectors/reused").await?.0, 204);

    // Every status record of the deleted connector is tombstoned.
    let records = status_records(&cluster).await?;
    for key in [
        "status-connector-reused",
        "status-task-reused-0",
        "status-task-reused-1",
        "status-task-reused-2",
        "topic-reused-in-connector-reused",
    ] {
        let last = records.iter().find(|(k, _)| k == key);
        assert!(
            matches!(last, Some((_, None))),
            "{key} should end with a tombstone, found {last:?}"
        );
    }

    // Re-created with one task that cannot start: only that task, FAILED, shows.
    worker
        .rest
        .create("reused", sink("fail-start", "reused-in", 1))
        .await?;
    let status = worker.wait_for_task("reused", 0, "FAILED").await?;
    assert!(
        status["trace"]
            .as_str()
            .is_some_and(|t| t.contains("on purpose"))
    );
    let (_, status) = worker.rest.get("/connectors/reused/status").await?;
    assert_eq!(
        status["tasks"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    assert_eq!(status["connector"]["state"], "RUNNING", "{status}");
    assert_eq!(
        worker
            .rest
            .get("/connectors/reused/tasks/1/status")
            .await?
            .0,
        404
    );

    // Deleted again and re-created paused: PAUSED, never the FAILED of the one before.
    assert_eq!(worker.rest.delete("/connectors/reused").await?.0, 204);
    let (code, body) = worker
        .rest
        .post(
            "/connectors",
            &json!({"name": "reused", "config": sink("ok", "reused-in", 1), "initial_state": "PAUSED"}),
        )
        .await?;
    assert_eq!(code, 201, "{body}");
    let status = worker.wait_for_state("reused", "PAUSED", 1).await?;
    assert!(status["tasks"][0]["trace"].is_null(), "{status}");
    worker.shutdown().await;
    Ok(())
}

/// One task whose `stop` never returns must not freeze the herder: while it is stuck, REST
/// writes on other connectors answer. The worker's shutdown timeout is set far beyond the
/// test's deadline, so only a herder that does not wait on the stuck task can answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_task_stop_does_not_block_writes_on_other_connectors() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let (worker, hooks) = worker_with_test_connectors(&cluster, 3_600_000).await?;
    worker
        .rest
        .create("stuck", sink("block-stop", "stuck-in", 1))
        .await?;
    worker.wait_for_state("stuck", "RUNNING", 1).await?;

    let deleting = {
        let rest = Rest::new(&worker.rest.url(""));
        tokio::spawn(async move { rest.delete("/connectors/stuck").await })
    };
    hooks.wait_until_stuck().await?;

    let other = tokio::time::timeout(
        DEADLINE,
        worker.rest.create("other", sink("ok", "other-in", 1)),
    )
    .await;
    assert!(
        hooks.still_stuck(),
        "the check must happen while the stuck task still blocks"
    );
    other
        .map_err(|_| anyhow::anyhow!("creating another connector hung behind the stuck task"))??;
    let paused = tokio::time::timeout(DEADLINE, worker.rest.put_empty("/connectors/other/pause"))
        .await
        .map_err(|_| anyhow::anyhow!("pausing another connector hung behind the stuck task"))??;
    assert_eq!(paused.0, 202);
    assert!(hooks.still_stuck());
    worker.wait_for_state("other", "PAUSED", 1).await?;

    hooks.release.send_replace(true);
    let (code, _) = tokio::time::timeout(DEADLINE, deleting).await???;
    assert_eq!(code, 204);
    eventually("stuck to be gone", async || {
        let (code, _) = worker.rest.get("/connectors/stuck/status").await.ok()?;
        (code == 404).then_some(())
    })
    .await?;
    worker.shutdown().await;
    Ok(())
}

/// A restarted task's next run starts only once its last run is over, even when reconciles
/// happen meanwhile: two runs of one task never overlap (a listener's port, a sink's group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_restarts_only_once_its_last_run_is_over() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let (worker, hooks) = worker_with_test_connectors(&cluster, 3_600_000).await?;
    worker
        .rest
        .create("slow-stop", sink("block-stop", "slow-in", 1))
        .await?;
    worker.wait_for_state("slow-stop", "RUNNING", 1).await?;
    assert_eq!(hooks.starts.load(Ordering::SeqCst), 1);

    let restarting = {
        let rest = Rest::new(&worker.rest.url(""));
        tokio::spawn(async move {
            rest.post_empty("/connectors/slow-stop/tasks/0/restart")
                .await
        })
    };
    hooks.wait_until_stuck().await?;
    // Other writes reconcile every connector; none may start the task's next run yet.
    for name in ["other-1", "other-2"] {
        tokio::time::timeout(
            DEADLINE,
            worker.rest.create(name, sink("ok", "other-in", 1)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("creating {name} hung behind the stuck task"))??;
        worker.wait_for_state(name, "RUNNING", 1).await?;
    }
    assert!(hooks.still_stuck());
    assert_eq!(
        hooks.starts.load(Ordering::SeqCst),
        3,
        "only other-1 and other-2 started while slow-stop's last run was stopping"
    );

    hooks.release.send_replace(true);
    let (code, _) = tokio::time::timeout(DEADLINE, restarting).await???;
    assert_eq!(code, 204);
    worker.wait_for_state("slow-stop", "RUNNING", 1).await?;
    assert_eq!(hooks.starts.load(Ordering::SeqCst), 4);
    worker.shutdown().await;
    Ok(())
}

/// A task whose `stop` never returns is abandoned after the worker's shutdown timeout, so the
/// worker still shuts down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_shutdown_abandons_a_task_stuck_in_stop() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let (worker, hooks) = worker_with_test_connectors(&cluster, 500).await?;
    worker
        .rest
        .create("stuck", sink("block-stop", "stuck-in", 2))
        .await?;
    worker.wait_for_state("stuck", "RUNNING", 2).await?;
    tokio::time::timeout(DEADLINE, worker.shutdown())
        .await
        .map_err(|_| anyhow::anyhow!("the worker never shut down"))?;
    assert!(*hooks.stuck.borrow(), "the task's stop was called");
    // Abandoned (its future dropped), never released: an aborted tokio task is dropped by the
    // runtime shortly after the abort.
    eventually("the stuck stop to be abandoned", async || {
        hooks.abandoned.load(Ordering::SeqCst).then_some(())
    })
    .await?;
    assert!(!*hooks.release.borrow());
    Ok(())
}
