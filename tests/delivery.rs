//! Delivery guarantees of the task runners, with connectors of the test's own that fail on
//! purpose: a source offset never passes a record Kafka did not take; errant sink records reach
//! the dead-letter topic before the offsets past them are committed; a stuck sink cannot hold
//! a stopping task; retriable start failures are retried per `errors.retry.timeout`; a panic
//! in a task's poll fails the task; a listener's first answer goes out before the runner
//! settles the rest of a batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use medconnect_api::{
    AckHandle, ConnectError, ConnectResult, ErrantRecordReporter, Record, SinkConnector,
    SinkRecord, SinkTask, SinkTaskContext, SourceConnector, SourceRecord, SourceTask,
    SourceTaskContext,
};
use medconnect_e2e::{TestCluster, TestWorker, eventually, json, test_connector};
use medconnect_runtime::WorkerConfig;
use serde_json::{Map, Value};

/// Records the scripted source emits.
const RECORDS: u64 = 20;
/// The record of the scripted source that goes to a partition its topic does not have.
const BAD: u64 = 7;

// ---- a source with one record Kafka refuses ----------------------------------------------

/// Emits `RECORDS` records in one batch (or `records`); record `BAD` (none with `bad=none`)
/// names partition 99 of a one-partition topic, which Kafka refuses when it delivers it (the
/// producer has no metadata for the new topic yet), while the records after it are written.
struct ScriptedSource;

test_connector!(ScriptedSource, "test.ScriptedSource", Source);

impl SourceConnector for ScriptedSource {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        let number = |key: &str| context.config.get(key).and_then(|v| v.parse().ok());
        Ok(Box::new(ScriptedSourceTask {
            topic: context.config.get("topic").cloned().unwrap_or_default(),
            records: number("records").unwrap_or(RECORDS),
            bad: match context.config.get("bad").map(String::as_str) {
                Some("none") => None,
                _ => Some(BAD),
            },
            emitted: false,
        }))
    }
}

struct ScriptedSourceTask {
    topic: String,
    records: u64,
    bad: Option<u64>,
    emitted: bool,
}

#[async_trait]
impl SourceTask for ScriptedSourceTask {
    async fn start(&mut self) -> ConnectResult<()> {
        Ok(())
    }

    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        if self.emitted {
            std::future::pending::<()>().await;
        }
        self.emitted = true;
        Ok((0..self.records)
            .map(|seq| {
                let mut record = Record::new(self.topic.clone());
                record.value = Some(Bytes::from(seq.to_string()));
                record.partition = Some(if Some(seq) == self.bad { 99 } else { 0 });
                SourceRecord::new(
                    record,
                    map("source", json!("script")),
                    map("seq", json!(seq)),
                )
            })
            .collect())
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        Ok(())
    }
}

fn map(key: &str, value: Value) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert(key.to_string(), value);
    map
}

async fn worker_with(cluster: &TestCluster, config: WorkerConfig) -> anyhow::Result<TestWorker> {
    let plugins = medconnect::builtin_plugins()
        .with_source(Arc::new(ScriptedSource))
        .with_source(Arc::new(AnsweringSource))
        .with_source(Arc::new(FlakySource::default()))
        .with_sink(Arc::new(ReportingSink));
    cluster.start_worker_with_plugins(config, plugins).await
}

async fn stored_seq(worker: &TestWorker, connector: &str) -> anyhow::Result<Option<u64>> {
    let (_, offsets) = worker
        .rest
        .get(&format!("/connectors/{connector}/offsets"))
        .await?;
    Ok(offsets["offsets"][0]["offset"]["seq"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_holds_the_source_offset_before_it() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = worker_with(&cluster, cluster.worker_config()).await?;
    worker
        .rest
        .create(
            "script",
            json!({"connector.class": "test.ScriptedSource", "topic": "scripted"}),
        )
        .await?;
    let status = worker.wait_for_task("script", 0, "FAILED").await?;
    assert!(
        status["trace"]
            .as_str()
            .unwrap_or_default()
            .contains("refused"),
        "the trace says Kafka refused the record: {status}"
    );
    // The records after the failed one were written, yet the stored offset stays before it,
    // so a restart polls the failed record again.
    let written = cluster
        .read_topic("scripted", (RECORDS - 1) as usize)
        .await?;
    assert_eq!(
        written.len() as u64,
        RECORDS - 1,
        "every other record is in Kafka"
    );
    assert_eq!(stored_seq(&worker, "script").await?, Some(BAD - 1));
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_kafka_acknowledged_at_once_is_settled_whole() -> anyhow::Result<()> {
    // The runner settles records Kafka acknowledged together in runs of its own.
    bulk_is_delivered_whole("bulk", json!({})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_waits_for_room_and_loses_nothing() -> anyhow::Result<()> {
    // A producer queue of 10 messages refuses most of a 1,000-record poll at first: the runner
    // settles older records to make room and sends each refused one again, in its place.
    bulk_is_delivered_whole(
        "full",
        json!({"producer.override.queue.buffering.max.messages": "10"}),
    )
    .await
}

/// Creates a source that emits 1,000 records in one poll (with `config` added to its
/// config) and checks that every one is in Kafka in poll order, counted as delivered, its
/// offset stored, and none left in flight.
async fn bulk_is_delivered_whole(name: &str, config: Value) -> anyhow::Result<()> {
    const BULK: u64 = 1_000;
    let cluster = TestCluster::start().await?;
    let worker = worker_with(&cluster, cluster.worker_config()).await?;
    let mut body = json!({"connector.class": "test.ScriptedSource", "topic": name,
                          "records": BULK.to_string(), "bad": "none"});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), config.as_object()) {
        body.extend(extra.clone());
    }
    worker.rest.create(name, body).await?;
    let written = cluster.read_topic(name, BULK as usize).await?;
    let values: Vec<String> = written
        .iter()
        .map(|r| r.value.clone().unwrap_or_default())
        .collect();
    let expected: Vec<String> = (0..BULK).map(|seq| seq.to_string()).collect();
    assert_eq!(values, expected, "every record is in Kafka in poll order");
    assert_eq!(
        cluster.count_records(name).await?,
        BULK as usize,
        "and only once"
    );
    eventually("the last offset is stored", async || {
        (stored_seq(&worker, name).await.ok().flatten() == Some(BULK - 1)).then_some(())
    })
    .await?;
    eventually("every record is counted as delivered", async || {
        (worker
            .rest
            .task_metric("medconnect_records_out_total", name)
            .await
            == Some(BULK))
        .then_some(())
    })
    .await?;
    assert_eq!(
        worker
            .rest
            .task_metric("medconnect_records_in_flight", name)
            .await,
        Some(0),
        "nothing is left in flight"
    );
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_kafka_refuses_is_dead_lettered_with_tolerance_all() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = worker_with(&cluster, cluster.worker_config()).await?;
    worker
        .rest
        .create(
            "script",
            json!({"connector.class": "test.ScriptedSource", "topic": "scripted",
                   "errors.tolerance": "all", "errors.deadletterqueue.topic.name": "scripted.dlq",
                   "errors.deadletterqueue.context.headers.enable": "true"}),
        )
        .await?;
    let dead = cluster.read_topic("scripted.dlq", 1).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].value.as_deref(), Some(BAD.to_string().as_str()));
    assert_eq!(
        dead[0].header("__connect.errors.stage"),
        Some("KAFKA_PRODUCE")
    );
    assert_eq!(
        dead[0].header("__connect.errors.source.offset"),
        Some(r#"{"seq":7}"#)
    );
    // The bad record was dealt with, so the offset moves past it and the task runs on.
    eventually("the offset of the last record to be stored", async || {
        (stored_seq(&worker, "script").await.ok()?? == RECORDS - 1).then_some(())
    })
    .await?;
    worker.wait_for_task("script", 0, "RUNNING").await?;
    assert_eq!(cluster.count_records("scripted.dlq").await?, 1);
    worker.shutdown().await;
    Ok(())
}

// ---- a sink that reports errant records from flush ---------------------------------------

/// Buffers records in `put`; `flush` reports every buffered record whose value is `bad` as
/// errant (without awaiting the report) and forgets the rest. `put` blocks forever on a
/// record whose value is `stuck`.
struct ReportingSink;

test_connector!(ReportingSink, "test.ReportingSink", Sink);

impl SinkConnector for ReportingSink {
    fn create_task(&self, context: SinkTaskContext) -> ConnectResult<Box<dyn SinkTask>> {
        Ok(Box::new(ReportingSinkTask {
            buffer: Vec::new(),
            reporter: context.errant_records,
        }))
    }
}

struct ReportingSinkTask {
    buffer: Vec<SinkRecord>,
    reporter: ErrantRecordReporter,
}

#[async_trait]
impl SinkTask for ReportingSinkTask {
    async fn start(&mut self) -> ConnectResult<()> {
        Ok(())
    }

    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()> {
        if records
            .iter()
            .any(|r| r.record.value.as_deref() == Some(b"stuck"))
        {
            std::future::pending::<()>().await;
        }
        self.buffer.extend(records);
        Ok(())
    }

    async fn flush(&mut self) -> ConnectResult<()> {
        let reporter = &self.reporter;
        for record in self.buffer.drain(..) {
            if record.record.value.as_deref() == Some(b"bad") {
                // Not awaited: the engine must still have it in the dead-letter topic
                // before it commits past it.
                drop(reporter.report(record, ConnectError::data("the target refused it")));
            }
        }
        Ok(())
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reported_from_the_last_flush_reach_the_dead_letter_topic() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let mut config = cluster.worker_config();
    // No periodic flush: the only flush is the one when the connector stops.
    config.tasks.offset_flush_interval_ms = 3_600_000;
    let worker = worker_with(&cluster, config).await?;
    let values = ["a", "b", "bad", "c", "d"];
    let records: Vec<(Option<&str>, &str)> = values.iter().map(|v| (None, *v)).collect();
    cluster.produce("orders", &records).await?;
    worker
        .rest
        .create(
            "reporting",
            json!({"connector.class": "test.ReportingSink", "topics": "orders",
                   "errors.tolerance": "all", "errors.deadletterqueue.topic.name": "orders.dlq"}),
        )
        .await?;
    eventually("the sink to have taken 5 records", async || {
        worker_put_count(&worker).await.then_some(())
    })
    .await?;
    let (code, _) = worker.rest.put_empty("/connectors/reporting/stop").await?;
    assert_eq!(code, 204);
    worker.wait_for_state("reporting", "STOPPED", 0).await?;
    // The offsets were committed past the bad record only because it is in the DLQ.
    let (_, offsets) = worker.rest.get("/connectors/reporting/offsets").await?;
    assert_eq!(
        offsets["offsets"][0]["offset"]["kafka_offset"], 5,
        "{offsets}"
    );
    let dead = cluster.read_topic("orders.dlq", 1).await?;
    assert_eq!(
        dead.len(),
        1,
        "the record reported from the last flush is in the DLQ"
    );
    assert_eq!(dead[0].value.as_deref(), Some("bad"));
    worker.shutdown().await;
    Ok(())
}

/// Whether the running task's `put` has taken the five records (read through metrics, the
/// way an operator would see it).
async fn worker_put_count(worker: &TestWorker) -> bool {
    worker
        .rest
        .task_metric("medconnect_records_out_total", "reporting")
        .await
        == Some(5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_put_cannot_hold_a_stopping_task() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let mut config = cluster.worker_config();
    config.tasks.shutdown_timeout_ms = 500;
    let worker = worker_with(&cluster, config).await?;
    cluster.produce("jam", &[(None, "stuck")]).await?;
    worker
        .rest
        .create(
            "jammed",
            json!({"connector.class": "test.ReportingSink", "topics": "jam"}),
        )
        .await?;
    eventually("the put to be stuck", async || {
        worker
            .rest
            .task_metric("medconnect_records_in_total", "jammed")
            .await
            .map(|_| ())
    })
    .await?;
    // Stopping answers (the runner gives up on the put after the shutdown timeout) and the
    // task does not claim to have stopped cleanly with its record delivered.
    let (code, _) = worker.rest.put_empty("/connectors/jammed/stop").await?;
    assert_eq!(code, 204);
    worker.wait_for_state("jammed", "STOPPED", 0).await?;
    let (_, offsets) = worker.rest.get("/connectors/jammed/offsets").await?;
    assert!(
        offsets["offsets"].as_array().is_none_or(|o| o.is_empty()),
        "nothing committed for the record that was never put: {offsets}"
    );
    worker.shutdown().await;
    Ok(())
}

// ---- a source whose start fails, then panics ---------------------------------------------

/// `start` fails with a retriable error the first three times (a port still held); `poll`
/// panics when the config says so.
#[derive(Default)]
struct FlakySource {
    starts: Arc<AtomicUsize>,
}

test_connector!(FlakySource, "test.FlakySource", Source);

impl SourceConnector for FlakySource {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        Ok(Box::new(FlakySourceTask {
            starts: self.starts.clone(),
            panic: Arc::new(AtomicBool::new(context.config.contains_key("panic"))),
        }))
    }
}

struct FlakySourceTask {
    starts: Arc<AtomicUsize>,
    panic: Arc<AtomicBool>,
}

#[async_trait]
impl SourceTask for FlakySourceTask {
    async fn start(&mut self) -> ConnectResult<()> {
        if self.starts.fetch_add(1, Ordering::SeqCst) < 3 {
            return Err(ConnectError::retriable("address in use"));
        }
        Ok(())
    }

    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        if self.panic.load(Ordering::SeqCst) {
            panic!("the device driver fell over");
        }
        std::future::pending().await
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_start_failures_are_retried_forever_with_minus_one() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = worker_with(&cluster, cluster.worker_config()).await?;
    worker
        .rest
        .create(
            "flaky",
            json!({"connector.class": "test.FlakySource", "errors.retry.timeout": "-1",
                   "errors.retry.delay.max.ms": "50"}),
        )
        .await?;
    worker.wait_for_state("flaky", "RUNNING", 1).await?;
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_poll_fails_the_task_with_its_message() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = worker_with(&cluster, cluster.worker_config()).await?;
    worker
        .rest
        .create(
            "panicky",
            json!({"connector.class": "test.FlakySource", "panic": "yes",
                   "errors.retry.timeout": "-1", "errors.retry.delay.max.ms": "50"}),
        )
        .await?;
    let status = worker.wait_for_task("panicky", 0, "FAILED").await?;
    assert!(
        status["trace"]
            .as_str()
            .unwrap_or_default()
            .contains("the device driver fell over"),
        "{status}"
    );
    worker.shutdown().await;
    Ok(())
}

// ---- a broker outage is not bad data ------------------------------------------------------

/// With `errors.tolerance=all`, records Kafka could not take while it was unreachable used to
/// be skipped and their offsets stored: lost for good. They are not bad data: the task fails
/// with its offset held, and after a restart every record is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_a_tolerant_source_instead_of_skipping_records() -> anyhow::Result<()> {
    const TOTAL: u64 = 3000;
    let (cluster, network) = TestCluster::start_behind_proxy().await?;
    let worker = worker_with(&cluster, cluster.worker_config()).await?;
    worker
        .rest
        .create(
            "vitals",
            json!({"connector.class": "DatagenSource", "topic": "vitals", "rate": "300",
                   "max.records": TOTAL.to_string(), "errors.tolerance": "all",
                   "producer.override.message.timeout.ms": "1500"}),
        )
        .await?;
    eventually("some records to be stored", async || {
        (stored_seq(&worker, "vitals").await.ok()?? > 100).then_some(())
    })
    .await?;
    network.cut();
    eventually(
        "Kafka to refuse records while it is unreachable",
        async || worker.rest.error_counted("vitals", "KAFKA_PRODUCE").await,
    )
    .await?;
    network.restore();
    let status = worker.wait_for_task("vitals", 0, "FAILED").await?;
    assert!(
        status["trace"]
            .as_str()
            .unwrap_or_default()
            .contains("Kafka did not take the record"),
        "{status}"
    );
    let (code, _) = worker
        .rest
        .post_empty("/connectors/vitals/restart?includeTasks=true&onlyFailed=true")
        .await?;
    assert_eq!(code, 202);
    eventually("the last record's offset to be stored", async || {
        (stored_seq(&worker, "vitals").await.ok()?? == TOTAL - 1).then_some(())
    })
    .await?;
    let seqs: std::collections::BTreeSet<u64> = cluster
        .read_all("vitals")
        .await?
        .iter()
        .filter_map(|r| r.json()["seq"].as_u64())
        .collect();
    let missing: Vec<u64> = (0..TOTAL).filter(|seq| !seqs.contains(seq)).collect();
    assert!(
        missing.is_empty(),
        "records lost in the outage: {missing:?}"
    );
    worker.shutdown().await;
    Ok(())
}

// ---- asynchronous sinks: pre_commit and partition pause ----------------------------------

/// What the test sees of a [`PacedSink`] task.
#[derive(Default)]
struct Pace {
    /// Values put, in order.
    put: std::sync::Mutex<Vec<String>>,
    paused: AtomicBool,
    resumed: AtomicBool,
    /// Whether a record arrived while its partition was paused by the task.
    leaked: AtomicBool,
}

/// A sink that writes "asynchronously": `pre_commit` acknowledges only what `ack.below`
/// allows; a record `pause` makes it pause its partition and resume it 1.5 s later.
#[derive(Default)]
struct PacedSink(Arc<Pace>);

test_connector!(PacedSink, "test.PacedSink", Sink);

impl SinkConnector for PacedSink {
    fn create_task(&self, context: SinkTaskContext) -> ConnectResult<Box<dyn SinkTask>> {
        Ok(Box::new(PacedSinkTask {
            pace: self.0.clone(),
            ack_below: context
                .config
                .get("ack.below")
                .and_then(|below| below.parse().ok())
                .unwrap_or(i64::MAX),
            partitions: context.partitions,
        }))
    }
}

struct PacedSinkTask {
    pace: Arc<Pace>,
    ack_below: i64,
    partitions: medconnect_api::SinkPartitions,
}

#[async_trait]
impl SinkTask for PacedSinkTask {
    async fn start(&mut self) -> ConnectResult<()> {
        Ok(())
    }

    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()> {
        for record in records {
            let value = String::from_utf8_lossy(record.record.value.as_deref().unwrap_or_default())
                .to_string();
            if self.pace.paused.load(Ordering::SeqCst) && !self.pace.resumed.load(Ordering::SeqCst)
            {
                self.pace.leaked.store(true, Ordering::SeqCst);
            }
            if value == "pause" {
                let partitions = self.partitions.clone();
                let partition = medconnect_api::TopicPartition::new(
                    record.record.topic.clone(),
                    record.kafka_partition,
                );
                partitions.pause(std::slice::from_ref(&partition))?;
                self.pace.paused.store(true, Ordering::SeqCst);
                let pace = self.pace.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
                    pace.resumed.store(true, Ordering::SeqCst);
                    let _ = partitions.resume(&[partition]);
                });
            }
            self.pace
                .put
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(value);
        }
        Ok(())
    }

    async fn flush(&mut self) -> ConnectResult<()> {
        Ok(())
    }

    async fn pre_commit(
        &mut self,
        offsets: &medconnect_api::SinkOffsets,
    ) -> ConnectResult<medconnect_api::SinkOffsets> {
        Ok(offsets
            .iter()
            .map(|(partition, next)| (partition.clone(), (*next).min(self.ack_below)))
            .collect())
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        Ok(())
    }
}

async fn paced_worker(cluster: &TestCluster, pace: Arc<Pace>) -> anyhow::Result<TestWorker> {
    let plugins = medconnect::builtin_plugins().with_sink(Arc::new(PacedSink(pace)));
    cluster
        .start_worker_with_plugins(cluster.worker_config(), plugins)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_committed_only_as_far_as_pre_commit_allows() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let pace = Arc::new(Pace::default());
    let worker = paced_worker(&cluster, pace.clone()).await?;
    let records: Vec<(Option<&str>, &str)> = (0..5).map(|_| (None, "x")).collect();
    cluster.produce("bulk", &records).await?;
    worker
        .rest
        .create(
            "bulk-out",
            json!({"connector.class": "test.PacedSink", "topics": "bulk", "ack.below": "3"}),
        )
        .await?;
    eventually("5 records to be put", async || {
        (pace.put.lock().ok()?.len() == 5).then_some(())
    })
    .await?;
    let (code, _) = worker.rest.put_empty("/connectors/bulk-out/stop").await?;
    assert_eq!(code, 204);
    worker.wait_for_state("bulk-out", "STOPPED", 0).await?;
    // Records 3 and 4 were put but never acknowledged by the target: not committed.
    let (_, offsets) = worker.rest.get("/connectors/bulk-out/offsets").await?;
    assert_eq!(
        offsets["offsets"][0]["offset"]["kafka_offset"], 3,
        "{offsets}"
    );
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_task_can_pause_and_resume_its_partitions() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let pace = Arc::new(Pace::default());
    let worker = paced_worker(&cluster, pace.clone()).await?;
    cluster.produce("paced", &[(None, "pause")]).await?;
    worker
        .rest
        .create(
            "paced-out",
            json!({"connector.class": "test.PacedSink", "topics": "paced"}),
        )
        .await?;
    eventually("the task to pause its partition", async || {
        pace.paused.load(Ordering::SeqCst).then_some(())
    })
    .await?;
    cluster.produce("paced", &[(None, "after")]).await?;
    eventually("the record after the pause to be put", async || {
        (pace.put.lock().ok()?.len() == 2).then_some(())
    })
    .await?;
    assert!(
        !pace.leaked.load(Ordering::SeqCst),
        "a record was put while the task had its partition paused"
    );
    assert!(pace.resumed.load(Ordering::SeqCst));
    worker.shutdown().await;
    Ok(())
}

// ---- a listener whose senders wait for their answers --------------------------------------

/// Messages the answering source takes in at once, as a listener does from its connections.
const WAITING: usize = 8;

/// How many of the other messages were already answered when the first message's connection
/// got its answer; set once.
static ANSWERED_BEFORE_FIRST: std::sync::Mutex<Option<usize>> = std::sync::Mutex::new(None);

/// A listener-like source: its one poll returns `WAITING` records with acknowledgements, and
/// a "connection" task awaits the first one's answer, as the MLLP and MQTT listeners do.
struct AnsweringSource;

test_connector!(AnsweringSource, "test.AnsweringSource", Source);

impl SourceConnector for AnsweringSource {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        Ok(Box::new(AnsweringSourceTask {
            topic: context.config.get("topic").cloned().unwrap_or_default(),
            polled: false,
        }))
    }
}

struct AnsweringSourceTask {
    topic: String,
    polled: bool,
}

#[async_trait]
impl SourceTask for AnsweringSourceTask {
    async fn start(&mut self) -> ConnectResult<()> {
        Ok(())
    }

    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        if self.polled {
            std::future::pending::<()>().await;
        }
        self.polled = true;
        let mut records = Vec::new();
        let mut answers = Vec::new();
        for seq in 0..WAITING {
            let mut record = Record::new(self.topic.clone());
            record.value = Some(Bytes::from(seq.to_string()));
            let (ack, answer) = AckHandle::channel();
            records.push(SourceRecord::acknowledged(record, ack));
            answers.push(answer);
        }
        let mut others = answers.split_off(1);
        let first = answers.remove(0);
        tokio::spawn(async move {
            if first.await.is_ok() {
                let mut answered = 0;
                for answer in &mut others {
                    if answer.try_recv().is_ok() {
                        answered += 1;
                    }
                }
                *ANSWERED_BEFORE_FIRST
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(answered);
            }
        });
        Ok(records)
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        Ok(())
    }
}

/// The runner lets a listener's connection answer its sender as soon as its record is settled:
/// the sender's next message can then join the producer's open batch, instead of every answer
/// of a delivered batch waiting until the runner has settled all of it. On a one-thread
/// runtime the order is exact: the first connection runs before the second record is settled.
/// The records are filtered by a transform, so all of them are settled at once, without Kafka.
#[tokio::test]
async fn a_listeners_first_answer_goes_out_before_the_runner_settles_the_rest() -> anyhow::Result<()>
{
    let cluster = TestCluster::start().await?;
    let worker = worker_with(&cluster, cluster.worker_config()).await?;
    worker
        .rest
        .create(
            "answering",
            json!({
                "connector.class": "test.AnsweringSource",
                "topic": "answered",
                "transforms": "drop",
                "transforms.drop.type": "Filter",
            }),
        )
        .await?;
    let answered = eventually("the first connection's answer", async || {
        *ANSWERED_BEFORE_FIRST
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    })
    .await?;
    assert_eq!(
        answered,
        0,
        "the first sender was answered only after {answered} of the other {} records were settled",
        WAITING - 1
    );
    worker.shutdown().await;
    Ok(())
}
