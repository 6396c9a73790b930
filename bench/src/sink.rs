//! Sink runner throughput against a raw rdkafka consumer writing to the same sink.
//!
//!   cargo run -p medconnect-bench --bin sink -- [records] [--sink file|null] [--rounds N] [--only raw|runner]
//!
//! `--only` runs one contender (to profile it: `perf record -g`); no ratio then.
//!
//! One process, embedded broker. The records (datagen vital signs: a key and a ~250-byte JSON
//! value with a content-type header) are produced once to a one-partition topic. Then, alternating
//! for a few rounds, each with a fresh consumer group and a fresh output:
//!
//! (a) a raw rdkafka `StreamConsumer` with the worker's consumer settings reads all of them and
//!     hands them, in batches of up to `sink_batch_max` (500, the runner's default), to the same
//!     sink task the runner drives (`FileSink` writing a temporary file, or a null sink),
//!     committing as a well-written client does: every `COMMIT_INTERVAL` it flushes the sink and
//!     then commits asynchronously what it put; after the last record, one flush and a
//!     synchronous commit;
//! (b) a medconnect worker's sink runner (consumer -> transforms -> `put` -> `pre_commit` ->
//!     commit) running that connector, with `offset_flush_interval` = `COMMIT_INTERVAL`.
//!
//! Both read with `broker::CONSUMER_SETTINGS` (`fetch.wait.max.ms=25`, as `medconnect dev`: the
//! embedded broker holds a fetch for half of it), all other consumer settings the worker's
//! defaults. The rate is records from the first one read to the last one put, so neither side's
//! group join nor the phase of its last commit tick counts; the time until all of them were
//! committed is printed beside it. Every run is checked: N lines in the file (or N records in the
//! null sink) and the group's committed offset = N.

#[allow(dead_code)] // only its CPU reading: this bench starts no medconnect process
mod process;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConnectResult, Connector, ConnectorContext, ConnectorKind, ErrantRecordReporter,
    Props, SinkConnector, SinkPartitions, SinkRecord, SinkTask, SinkTaskContext, TaskConfig,
    content_type,
};
use medconnect_datagen::{Schema, generate};
use medconnect_runtime::broker::{self, EmbeddedBroker};
use medconnect_runtime::kafka::{KafkaSettings, TopicSpec, ensure_topics, record_of};
use medconnect_runtime::worker::plugins::ConnectorPlugin;
use medconnect_runtime::{Plugins, Worker, WorkerConfig};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

const TOPIC: &str = "sink-bench";
/// The runner's default `sink_batch_max`: the raw client hands batches of the same size.
const BATCH: usize = 500;
/// Both contenders flush and commit this often (the worker's default is 5 s, which would
/// leave a run of a few seconds with one commit or none).
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
const NULL_SINK: &str = "bench.NullSink";

#[derive(Clone, Copy, PartialEq)]
enum SinkKind {
    File,
    Null,
}

/// Records the null sink took, over every task of it (one runs at a time).
static NULL_RECORDS: AtomicU64 = AtomicU64::new(0);

/// A sink that only counts: the runner's own cost, without the file's.
struct NullSinkConnector;

#[async_trait]
impl Connector for NullSinkConnector {
    fn class(&self) -> &'static str {
        NULL_SINK
    }
    fn version(&self) -> &'static str {
        "0"
    }
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Sink
    }
    fn config_def(&self) -> ConfigDef {
        ConfigDef::new()
    }
    async fn task_configs(
        &self,
        context: &ConnectorContext,
        _max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        Ok(vec![context.config.clone()])
    }
}

impl SinkConnector for NullSinkConnector {
    fn create_task(&self, _context: SinkTaskContext) -> ConnectResult<Box<dyn SinkTask>> {
        Ok(Box::new(NullSinkTask))
    }
}

struct NullSinkTask;

#[async_trait]
impl SinkTask for NullSinkTask {
    async fn start(&mut self) -> ConnectResult<()> {
        Ok(())
    }
    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()> {
        NULL_RECORDS.fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    async fn flush(&mut self) -> ConnectResult<()> {
        Ok(())
    }
    async fn stop(&mut self) -> ConnectResult<()> {
        Ok(())
    }
}

/// One contender's run.
struct Run {
    /// Records per second from the first record read to the last one put.
    rate: f64,
    /// From the last record put until all were committed.
    commit_after: Duration,
    /// CPU time of the whole process (the broker's included, the same for both) per record,
    /// from the start of the run until all were committed.
    cpu_per_record: Duration,
}

async fn produce(settings: &KafkaSettings, count: usize) -> anyhow::Result<usize> {
    ensure_topics(settings, &[TopicSpec::regular(TOPIC, 1, 1)]).await?;
    let producer = settings.producer(&Default::default())?;
    let mut pending = std::collections::VecDeque::with_capacity(10_000);
    let mut bytes = 0;
    for seq in 0..count as u64 {
        let event = generate(Schema::Vitals, 42, 0, seq);
        bytes += event.key.len() + event.value.len();
        loop {
            let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(TOPIC)
                .key(event.key.as_ref())
                .payload(event.value.as_ref())
                .headers(
                    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                        key: content_type::HEADER,
                        value: Some(content_type::JSON),
                    }),
                );
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                // The producer's queue is full: wait for the oldest delivery.
                Err(_) => match pending.pop_front() {
                    Some(delivery) => {
                        delivery.await?.map_err(|(e, _)| anyhow::anyhow!("{e}"))?;
                    }
                    None => tokio::time::sleep(Duration::from_millis(1)).await,
                },
            }
        }
    }
    for delivery in pending {
        delivery.await?.map_err(|(e, _)| anyhow::anyhow!("{e}"))?;
    }
    Ok(bytes / count.max(1))
}

/// The connector config both contenders' sink tasks get.
fn sink_config(kind: SinkKind, file: &Path) -> anyhow::Result<Props> {
    let class = match kind {
        SinkKind::File => "FileSink",
        SinkKind::Null => NULL_SINK,
    };
    Ok([
        ("connector.class", class),
        ("topics", TOPIC),
        (
            "file",
            file.to_str().context("temporary path is not UTF-8")?,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect())
}

/// The sink task the runner would create, created directly for the raw client.
fn sink_task(plugins: &Plugins, config: Props) -> anyhow::Result<Box<dyn SinkTask>> {
    let class = config.get("connector.class").context("no class")?;
    let Some(ConnectorPlugin::Sink(connector)) = plugins.find(class) else {
        bail!("{class} is not a sink");
    };
    // Errant records and partition control are the runner's: the raw client has neither.
    let (errant, _) = tokio::sync::mpsc::unbounded_channel();
    Ok(connector.create_task(SinkTaskContext {
        connector_name: "raw".into(),
        task_id: 0,
        config,
        errant_records: ErrantRecordReporter::collecting(errant),
        partitions: SinkPartitions::detached(),
        peers: medconnect_api::relay::alone(),
    })?)
}

/// What a raw client hands the sink: the message copied out of the client's buffer, as the
/// sink takes owned records, with the conversion the runner uses, so both pay the same copy.
fn sink_record(message: &BorrowedMessage<'_>) -> SinkRecord {
    SinkRecord {
        record: record_of(message),
        kafka_partition: message.partition(),
        kafka_offset: message.offset(),
    }
}

/// The future's output if it is ready at once (a message the client already fetched).
fn now_or_never<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// Flushes the sink, then commits what was put.
async fn flush_and_commit(
    task: &mut Box<dyn SinkTask>,
    consumer: &Arc<StreamConsumer>,
    positions: &BTreeMap<i32, i64>,
    mode: CommitMode,
) -> anyhow::Result<()> {
    if positions.is_empty() {
        return Ok(());
    }
    task.flush().await?;
    let mut offsets = TopicPartitionList::new();
    for (&partition, &next) in positions {
        offsets.add_partition_offset(TOPIC, partition, Offset::Offset(next))?;
    }
    match mode {
        // Queued: the read loop goes on while the broker answers.
        CommitMode::Async => consumer.commit(&offsets, CommitMode::Async)?,
        CommitMode::Sync => {
            let consumer = consumer.clone();
            tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync))
                .await??
        }
    }
    Ok(())
}

async fn raw_consumer(
    kafka: &KafkaSettings,
    group: &str,
    count: usize,
    mut task: Box<dyn SinkTask>,
) -> anyhow::Result<Run> {
    let cpu = process::own_cpu_time()?;
    let consumer = Arc::new(kafka.stream_consumer(Some(group), &BTreeMap::new())?);
    consumer.subscribe(&[TOPIC])?;
    task.start().await?;
    let mut commit = tokio::time::interval(COMMIT_INTERVAL);
    commit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut positions = BTreeMap::new();
    let (mut read, mut started) = (0, None);
    while read < count {
        tokio::select! {
            biased;
            _ = commit.tick() => {
                flush_and_commit(&mut task, &consumer, &positions, CommitMode::Async).await?;
            }
            message = consumer.recv() => {
                let message = message?;
                started.get_or_insert_with(Instant::now);
                let mut batch = Vec::with_capacity(BATCH);
                batch.push(sink_record(&message));
                drop(message);
                while batch.len() < BATCH {
                    match now_or_never(consumer.recv()) {
                        Some(message) => batch.push(sink_record(&message?)),
                        None => break,
                    }
                }
                for record in &batch {
                    positions.insert(record.kafka_partition, record.kafka_offset + 1);
                }
                read += batch.len();
                task.put(batch).await?;
            }
        }
    }
    let put_all = Instant::now();
    flush_and_commit(&mut task, &consumer, &positions, CommitMode::Sync).await?;
    let committed = Instant::now();
    let cpu = process::own_cpu_time()? - cpu;
    task.stop().await?;
    let started = started.context("nothing read")?;
    Ok(Run {
        rate: read as f64 / (put_all - started).as_secs_f64(),
        commit_after: committed - put_all,
        cpu_per_record: cpu / count as u32,
    })
}

async fn sink_runner(
    worker: &Worker,
    name: &str,
    count: usize,
    config: Props,
) -> anyhow::Result<Run> {
    let cpu = process::own_cpu_time()?;
    worker.herder().create(name, config, None).await?;
    let metrics = worker.herder().metrics();
    let labels = [name, "0"];
    let read = || metrics.records_in.with_label_values(&labels).get() as usize;
    let put = || metrics.records_out.with_label_values(&labels).get() as usize;
    let lag = || metrics.offset_commit_lag.with_label_values(&labels).get();
    let deadline = Instant::now() + Duration::from_secs(600);
    // Sampled every millisecond: the first record read, the last put, then the commit of all.
    let started = wait("read a record", deadline, || read() > 0).await?;
    let put_all = wait("put every record", deadline, || put() >= count).await?;
    // `put` counts after the batch's positions were recorded, so the lag is 0 only once a
    // commit covered them.
    let committed = wait("committed every record", deadline, || lag() == 0).await?;
    let cpu = process::own_cpu_time()? - cpu;
    Ok(Run {
        rate: put() as f64 / (put_all - started).as_secs_f64(),
        commit_after: committed - put_all,
        cpu_per_record: cpu / count as u32,
    })
}

/// When `done` first holds, checked every millisecond.
async fn wait(what: &str, deadline: Instant, done: impl Fn() -> bool) -> anyhow::Result<Instant> {
    while !done() {
        if Instant::now() > deadline {
            bail!("the sink runner never {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(Instant::now())
}

/// The group's committed offset of the topic's partition, read from the broker.
fn committed(kafka: &KafkaSettings, group: &str) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = kafka
        .consumer_config(Some(group), &BTreeMap::new())
        .create()?;
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition(TOPIC, 0);
    let offsets = consumer.committed_offsets(partitions, Duration::from_secs(10))?;
    match offsets.find_partition(TOPIC, 0).map(|p| p.offset()) {
        Some(Offset::Offset(offset)) => Ok(offset),
        other => bail!("group {group}: no committed offset ({other:?})"),
    }
}

/// Checks a run delivered exactly `count` records and committed exactly them.
fn check(
    kafka: &KafkaSettings,
    group: &str,
    kind: SinkKind,
    file: &Path,
    count: usize,
    null_before: u64,
) -> anyhow::Result<()> {
    let delivered = match kind {
        SinkKind::File => std::fs::read(file)?.iter().filter(|&&b| b == b'\n').count(),
        SinkKind::Null => (NULL_RECORDS.load(Ordering::Relaxed) - null_before) as usize,
    };
    let offset = committed(kafka, group)?;
    if delivered != count || offset != count as i64 {
        bail!(
            "group {group}: {delivered} records delivered, offset {offset} committed; expected {count}"
        );
    }
    Ok(())
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Args {
    count: usize,
    kind: SinkKind,
    rounds: usize,
    raw: bool,
    runner: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut parsed = Args {
        count: 300_000,
        kind: SinkKind::File,
        rounds: 3,
        raw: true,
        runner: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--sink" => {
                parsed.kind = match args.next().as_deref() {
                    Some("file") => SinkKind::File,
                    Some("null") => SinkKind::Null,
                    other => bail!("--sink file|null, not {other:?}"),
                }
            }
            "--rounds" => {
                parsed.rounds = args.next().context("--rounds needs a value")?.parse()?;
            }
            "--only" => match args.next().as_deref() {
                Some("raw") => parsed.runner = false,
                Some("runner") => parsed.raw = false,
                other => bail!("--only raw|runner, not {other:?}"),
            },
            count => parsed.count = count.parse().context("records: a number")?,
        }
    }
    Ok(parsed)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        count,
        kind,
        rounds,
        raw: run_raw,
        runner: run_runner,
    } = args()?;
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse()?).await?;
    let mut kafka = KafkaSettings::new(&broker.bootstrap_servers());
    kafka.consumer.extend(
        broker::CONSUMER_SETTINGS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let average = produce(&kafka, count).await?;
    println!(
        "== sink runner vs raw rdkafka consumer: {count} records ({average} bytes of key and value on average), {} sink, commits every {} ms, {:?}",
        if kind == SinkKind::File {
            "file"
        } else {
            "null"
        },
        COMMIT_INTERVAL.as_millis(),
        broker::CONSUMER_SETTINGS,
    );
    let mut config = WorkerConfig::new(&broker.bootstrap_servers())
        .with_consumer_settings(broker::CONSUMER_SETTINGS);
    config.rest.listen = "127.0.0.1:0".parse()?;
    config.tasks.offset_flush_interval_ms = COMMIT_INTERVAL.as_millis() as u64;
    config.tasks.sink_batch_max = BATCH;
    let plugins = medconnect::builtin_plugins().with_sink(Arc::new(NullSinkConnector));
    let worker = Worker::start(config, plugins.clone()).await?;
    let dir = tempfile::tempdir()?;
    let (mut best_raw, mut best_runner) = (0.0f64, 0.0f64);
    for n in 1..=rounds {
        let raw = if run_raw {
            let file = dir.path().join(format!("raw-{n}.jsonl"));
            let group = format!("raw-{n}");
            let before = NULL_RECORDS.load(Ordering::Relaxed);
            let task = sink_task(&plugins, sink_config(kind, &file)?)?;
            let raw = raw_consumer(&kafka, &group, count, task).await?;
            check(&kafka, &group, kind, &file, count, before)?;
            println!(
                "round {n}: raw consumer {:>7.0} records/s, {:>5.2} µs CPU/record, all committed {:>3} ms after the last put",
                raw.rate,
                micros(raw.cpu_per_record),
                raw.commit_after.as_millis(),
            );
            Some(raw)
        } else {
            None
        };
        let runner = if run_runner {
            let file = dir.path().join(format!("runner-{n}.jsonl"));
            let name = format!("sink-{n}");
            let before = NULL_RECORDS.load(Ordering::Relaxed);
            let runner = sink_runner(&worker, &name, count, sink_config(kind, &file)?).await?;
            check(
                &kafka,
                &format!("connect-{name}"),
                kind,
                &file,
                count,
                before,
            )?;
            worker.herder().delete(&name).await?;
            println!(
                "round {n}: sink runner  {:>7.0} records/s, {:>5.2} µs CPU/record, all committed {:>3} ms after the last put",
                runner.rate,
                micros(runner.cpu_per_record),
                runner.commit_after.as_millis(),
            );
            Some(runner)
        } else {
            None
        };
        if let (Some(raw), Some(runner)) = (&raw, &runner) {
            println!("round {n}: ratio {:.2}", runner.rate / raw.rate);
        }
        best_raw = best_raw.max(raw.map_or(0.0, |r| r.rate));
        best_runner = best_runner.max(runner.map_or(0.0, |r| r.rate));
        // The deleted task stops in the background; let it go before the next raw run.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if run_raw && run_runner {
        println!(
            "best: raw consumer {best_raw:.0} records/s, sink runner {best_runner:.0} records/s, ratio {:.2}",
            best_runner / best_raw
        );
    }
    worker.shutdown().await;
    broker.stop();
    Ok(())
}
