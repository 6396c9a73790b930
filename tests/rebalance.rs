//! Sink tasks and consumer-group rebalances: every task of a sink reads with the group
//! `connect-<name>`, so a partition moves between tasks whenever one starts or stops. The
//! runner tells a task which partitions it gets (`open`) and loses (`close`), and commits what
//! the task took from a revoked partition before the next owner reads it, so nothing is read
//! twice even when offsets are otherwise committed only once an hour.
//!
//! The test restarts task 1 of a two-task sink on a two-partition topic, holding its next run
//! in `start` (outside the group) while more records are produced: task 0 gets both partitions
//! and reads them all. When task 1 joins again, task 0 gives up one of them, which it read with
//! no commit since (the periodic commit is an hour away): without the commit on revocation,
//! task 1 reads those records again from the last commit. Under the eager protocol
//! (librdkafka's default) each rebalance revokes everything; under the cooperative one only
//! the partition that moves is revoked; both are tested.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use medconnect_api::{
    ConnectResult, SinkConnector, SinkRecord, SinkTask, SinkTaskContext, TopicPartition,
};
use medconnect_e2e::{TestCluster, TestWorker, eventually, json, test_connector};
use medconnect_runtime::WorkerConfig;
use medconnect_runtime::kafka::{KafkaSettings, TopicSpec, ensure_topics};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const TOPIC: &str = "admissions";
/// Records produced per partition in each of three rounds: before the restart, while task 1
/// is away, after it came back.
const PER_PARTITION: usize = 25;

/// What the recording tasks did, in the order they did it (one log for every test).
#[derive(Debug, Clone)]
enum Call {
    Open(Vec<i32>),
    Close(Vec<i32>),
    /// (partition, offset) of each record put.
    Put(Vec<(i32, i64)>),
    Stop,
}

#[derive(Debug, Clone)]
struct Event {
    connector: String,
    task: u32,
    /// One per task object: a restarted task is a new run.
    run: u64,
    call: Call,
}

static LOG: Mutex<Vec<Event>> = Mutex::new(Vec::new());
static RUNS: AtomicU64 = AtomicU64::new(0);
/// Connectors whose task 1 waits in `start` (so out of the group) until the test lets it go.
static HELD: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn held(connector: &str) -> bool {
    HELD.lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(connector)
}

fn hold(connector: &str, hold: bool) {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    if hold {
        held.insert(connector.to_string());
    } else {
        held.remove(connector);
    }
}

fn events(connector: &str) -> Vec<Event> {
    LOG.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|e| e.connector == connector)
        .cloned()
        .collect()
}

/// Records every call into [`LOG`]; takes records as they come (the default `pre_commit`
/// flushes, which has nothing to do).
struct RecordingSink;

test_connector!(RecordingSink, "test.RecordingSink", Sink);

impl SinkConnector for RecordingSink {
    fn create_task(&self, context: SinkTaskContext) -> ConnectResult<Box<dyn SinkTask>> {
        Ok(Box::new(RecordingTask {
            connector: context.connector_name,
            task: context.task_id,
            run: RUNS.fetch_add(1, Ordering::SeqCst),
        }))
    }
}

struct RecordingTask {
    connector: String,
    task: u32,
    run: u64,
}

impl RecordingTask {
    fn log(&self, call: Call) {
        LOG.lock().unwrap_or_else(|e| e.into_inner()).push(Event {
            connector: self.connector.clone(),
            task: self.task,
            run: self.run,
            call,
        });
    }
}

fn numbers(partitions: &[TopicPartition]) -> Vec<i32> {
    let mut numbers: Vec<i32> = partitions.iter().map(|p| p.partition).collect();
    numbers.sort();
    numbers
}

#[async_trait]
impl SinkTask for RecordingTask {
    async fn start(&mut self) -> ConnectResult<()> {
        while self.task == 1 && held(&self.connector) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn open(&mut self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        self.log(Call::Open(numbers(partitions)));
        Ok(())
    }

    async fn close(&mut self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        self.log(Call::Close(numbers(partitions)));
        Ok(())
    }

    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()> {
        self.log(Call::Put(
            records
                .iter()
                .map(|r| (r.kafka_partition, r.kafka_offset))
                .collect(),
        ));
        Ok(())
    }

    async fn flush(&mut self) -> ConnectResult<()> {
        Ok(())
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        self.log(Call::Stop);
        Ok(())
    }
}

/// The log replayed: who had which partitions open, and what was put.
#[derive(Debug, Default)]
struct Replay {
    /// Open partitions per run (a run is listed from its first call).
    open: BTreeMap<u64, BTreeSet<i32>>,
    /// Task id of each run.
    task_of: BTreeMap<u64, u32>,
    /// Runs that stopped.
    stopped: BTreeSet<u64>,
    puts: usize,
    distinct: BTreeSet<(i32, i64)>,
    /// Everything that broke the rules of open/close, in words.
    violations: Vec<String>,
}

impl Replay {
    fn of(connector: &str) -> Self {
        let mut replay = Self::default();
        for event in events(connector) {
            replay.task_of.insert(event.run, event.task);
            let open = replay.open.entry(event.run).or_default().clone();
            let others: BTreeSet<i32> = replay
                .open
                .iter()
                .filter(|(run, _)| **run != event.run)
                .flat_map(|(_, partitions)| partitions.iter().copied())
                .collect();
            match &event.call {
                Call::Open(partitions) => {
                    for p in partitions {
                        if open.contains(p) {
                            replay
                                .violations
                                .push(format!("{event:?}: {p} already open"));
                        }
                        if others.contains(p) {
                            replay
                                .violations
                                .push(format!("{event:?}: {p} still open in another task"));
                        }
                    }
                    replay
                        .open
                        .entry(event.run)
                        .or_default()
                        .extend(partitions.iter().copied());
                }
                Call::Close(partitions) => {
                    let entry = replay.open.entry(event.run).or_default();
                    for p in partitions {
                        if !entry.remove(p) {
                            replay
                                .violations
                                .push(format!("{event:?}: {p} was not open"));
                        }
                    }
                }
                Call::Put(records) => {
                    for (partition, offset) in records {
                        if !open.contains(partition) {
                            replay
                                .violations
                                .push(format!("{event:?}: put from {partition}, not open"));
                        }
                        replay.puts += 1;
                        replay.distinct.insert((*partition, *offset));
                    }
                }
                Call::Stop => {
                    if !open.is_empty() {
                        replay
                            .violations
                            .push(format!("{event:?}: stopped with {open:?} open"));
                    }
                    replay.stopped.insert(event.run);
                }
            }
        }
        replay
    }

    /// The partitions each running task has open, by task id, when the assignment is complete
    /// (every partition open in exactly one running task, every running task with some).
    fn settled(&self, tasks: u32) -> Option<BTreeMap<u32, (u64, BTreeSet<i32>)>> {
        let running: BTreeMap<u32, (u64, BTreeSet<i32>)> = self
            .open
            .iter()
            .filter(|(run, _)| !self.stopped.contains(run))
            .map(|(run, open)| (self.task_of[run], (*run, open.clone())))
            .collect();
        let mut all: Vec<i32> = running
            .values()
            .flat_map(|(_, open)| open.iter().copied())
            .collect();
        all.sort();
        (running.len() == tasks as usize
            && running.values().all(|(_, open)| !open.is_empty())
            && all == [0, 1])
        .then_some(running)
    }
}

async fn produce(cluster: &TestCluster, round: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap())
        .create()?;
    for i in 0..PER_PARTITION {
        for partition in 0..2 {
            let value = format!("round {round} partition {partition} record {i}");
            producer
                .send(
                    FutureRecord::<(), _>::to(TOPIC)
                        .partition(partition)
                        .payload(&value),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| anyhow::anyhow!("produce failed: {e}"))?;
        }
    }
    Ok(())
}

async fn worker(cluster: &TestCluster) -> anyhow::Result<TestWorker> {
    let mut config: WorkerConfig = cluster.worker_config();
    // No periodic commit: only rebalances and stops commit.
    config.tasks.offset_flush_interval_ms = 3_600_000;
    let plugins = medconnect::builtin_plugins().with_sink(Arc::new(RecordingSink));
    cluster.start_worker_with_plugins(config, plugins).await
}

async fn restart_a_task_and_count_duplicates(
    connector: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    ensure_topics(
        &KafkaSettings::new(&cluster.bootstrap()),
        &[TopicSpec::regular(TOPIC, 2, 1)],
    )
    .await?;
    let worker = worker(&cluster).await?;
    produce(&cluster, 0).await?;
    let mut config =
        json!({"connector.class": "test.RecordingSink", "topics": TOPIC, "tasks.max": "2"});
    for (key, value) in extra {
        config[*key] = json!(value);
    }
    worker.rest.create(connector, config).await?;

    // Started: each task has one partition open and everything produced was put.
    let before = eventually(
        "both tasks to have a partition each and every record",
        async || {
            let replay = Replay::of(connector);
            let settled = replay.settled(2)?;
            (replay.distinct.len() == 2 * PER_PARTITION).then_some(settled)
        },
    )
    .await?;
    let first_task1_run = before[&1].0;

    hold(connector, true);
    let (code, body) = worker
        .rest
        .post_empty(&format!("/connectors/{connector}/tasks/1/restart"))
        .await?;
    assert_eq!(code, 204, "{body}");
    // Task 1 left the group: task 0 has both partitions and reads what comes next.
    eventually("task 0 alone to have both partitions", async || {
        let replay = Replay::of(connector);
        let settled = replay.settled(1)?;
        replay.stopped.contains(&first_task1_run).then_some(settled)
    })
    .await?;
    produce(&cluster, 1).await?;
    eventually("every record of the second round to be put", async || {
        (Replay::of(connector).distinct.len() == 4 * PER_PARTITION).then_some(())
    })
    .await?;
    hold(connector, false);
    // Task 1's new run has its partition once the group settled with it.
    eventually(
        "the restarted task 1 to have a partition again",
        async || {
            let settled = Replay::of(connector).settled(2)?;
            (settled[&1].0 != first_task1_run).then_some(())
        },
    )
    .await?;

    // Records after the rebalance: each partition's earlier records, if read again, came first.
    produce(&cluster, 2).await?;
    let replay = eventually("every record of the three rounds to be put", async || {
        let replay = Replay::of(connector);
        (replay.distinct.len() == 6 * PER_PARTITION).then_some(replay)
    })
    .await?;
    let log = events(connector);
    let calls: Vec<String> = log
        .iter()
        .filter(|e| !matches!(e.call, Call::Put(_)))
        .map(|e| format!("task {} run {}: {:?}", e.task, e.run, e.call))
        .collect();
    println!("{connector}: calls other than put:\n{}", calls.join("\n"));
    assert_eq!(
        replay.puts - replay.distinct.len(),
        0,
        "records put twice: a revoked partition was read again from an older commit"
    );
    assert!(
        replay.violations.is_empty(),
        "open/close out of order: {:#?}",
        replay.violations
    );
    // The restarted run closed what it had when it stopped.
    let first_run_calls: Vec<&Call> = log
        .iter()
        .filter(|e| e.run == first_task1_run)
        .map(|e| &e.call)
        .filter(|c| !matches!(c, Call::Put(_)))
        .collect();
    assert!(
        matches!(first_run_calls.as_slice(), [.., Call::Close(closed), Call::Stop] if *closed == before[&1].1.iter().copied().collect::<Vec<_>>()),
        "task 1's first run closes its partitions, then stops: {first_run_calls:?}"
    );

    // Stopping the connector closes every open partition before each task stops.
    let (code, _) = worker
        .rest
        .put_empty(&format!("/connectors/{connector}/stop"))
        .await?;
    assert_eq!(code, 204);
    worker.wait_for_state(connector, "STOPPED", 0).await?;
    let replay = eventually("every run to have stopped", async || {
        let replay = Replay::of(connector);
        (replay.stopped.len() == replay.open.len()).then_some(replay)
    })
    .await?;
    assert!(
        replay.violations.is_empty(),
        "open/close out of order: {:#?}",
        replay.violations
    );
    assert!(replay.open.values().all(BTreeSet::is_empty));
    // Nothing is read twice after a restart either: every record was committed.
    let (_, offsets) = worker
        .rest
        .get(&format!("/connectors/{connector}/offsets"))
        .await?;
    let mut committed: Vec<(i64, i64)> = offsets["offsets"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|o| {
                    (
                        o["partition"]["kafka_partition"].as_i64().unwrap_or(-1),
                        o["offset"]["kafka_offset"].as_i64().unwrap_or(-1),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    committed.sort();
    let end = 3 * PER_PARTITION as i64;
    assert_eq!(committed, [(0, end), (1, end)], "{offsets}");
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_partitions_are_committed_and_closed_eager() -> anyhow::Result<()> {
    restart_a_task_and_count_duplicates("recorder-eager", &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_partitions_are_committed_and_closed_cooperative() -> anyhow::Result<()> {
    restart_a_task_and_count_duplicates(
        "recorder-cooperative",
        &[(
            "consumer.override.partition.assignment.strategy",
            "cooperative-sticky",
        )],
    )
    .await
}
