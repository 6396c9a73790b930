//! Source pipeline throughput against a raw rdkafka producer, worker memory and start time.
//!
//!   cargo run -p medconnect-bench --bin pipeline -- [records] [rounds]
//!
//! With `PIPELINE_ONLY=1` set, only the pipeline's rounds run (for a profiler).
//!
//! 1. Throughput, the broker in a process of its own as Kafka is to a worker: the same
//!    pre-generated datagen records (~250-byte JSON vital signs) are sent (a) by a raw rdkafka
//!    producer with the worker's producer settings, awaiting every delivery, (b) by the same
//!    loop on the engine's own producer (`medconnect_runtime::kafka::Producer`, which polls
//!    without rdkafka's spinning thread), and (c) through a medconnect source task (poll ->
//!    transforms -> produce -> acknowledgement -> offsets). Prints records/s of each and the
//!    pipeline's ratio to both (to (b): what the runner costs beyond its client), and the CPU
//!    time this process and the broker spent per record. (When the broker ran in this process,
//!    its tasks shared the worker's runtime threads with the pipeline's, but not the main
//!    thread the raw loops run on.) The three run back to back in each round, in turns (a b c, then
//!    c b a), for `rounds` rounds (default 11). The headline is the median of the rounds'
//!    ratios, printed with their middle half: the machine's own speed drifts between rounds
//!    (the raw loop alone has varied 4x in one run), and a ratio within a round compares the
//!    contenders at one speed. The best of each contender over all rounds is printed too.
//! 2. The `medconnect` binary as separate processes (`medconnect broker`, `medconnect worker`):
//!    start-to-REST-ready time, worker RSS idle and under load (datagen at full speed into a
//!    file sink, 30 s: the peak of each 10 s window shows whether it stays bounded), beside the
//!    broker process's RSS.

mod process;
mod stats;
use process::{
    BrokerProcess, ChildProcess, CpuMark, create_connector, free_port, medconnect_binary,
};
use stats::{median, quantile};

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use bytes::Bytes;
use medconnect_api::{
    ConfigDef, ConnectResult, Connector, ConnectorContext, ConnectorKind, Record, SourceConnector,
    SourcePartition, SourceRecord, SourceTask, SourceTaskContext, TaskConfig, content_type,
};
use medconnect_datagen::{Schema, generate};
use medconnect_runtime::broker;
use medconnect_runtime::kafka::{KafkaSettings, TopicSpec, ensure_topics};
use medconnect_runtime::kafka::{OwnedDeliveryResult, Producer};
use medconnect_runtime::{Worker, WorkerConfig};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Map, json};

const BATCH: usize = 1000;
const ROUNDS: usize = 11;

/// The records both contenders send: key and value.
type Dataset = Arc<Vec<(Bytes, Bytes)>>;

/// The records, kept for the life of the program: the replaying source hands out static
/// bytes, which cost nothing to clone or drop, as the raw loops borrow them. Reference-counted
/// buffers shared by every round made each record's key and value two atomic operations on
/// memory shared between the poller's and the runner's threads, which neither a real source
/// (its bytes are its own) nor the raw loops pay.
fn dataset(count: usize) -> Dataset {
    let leak = |bytes: Vec<u8>| Bytes::from_static(Box::leak(bytes.into_boxed_slice()));
    Arc::new(
        (0..count as u64)
            .map(|seq| {
                let event = generate(Schema::Vitals, 42, 0, seq);
                (leak(event.key.into()), leak(event.value))
            })
            .collect(),
    )
}

/// A source that replays the dataset once, so the pipeline pays no generation cost.
struct ReplayConnector {
    data: Dataset,
}

#[async_trait]
impl Connector for ReplayConnector {
    fn class(&self) -> &'static str {
        "bench.ReplaySource"
    }
    fn version(&self) -> &'static str {
        "0"
    }
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Source
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

impl SourceConnector for ReplayConnector {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        Ok(Box::new(ReplayTask {
            data: self.data.clone(),
            next: 0,
            topic: context.config.get("topic").cloned().unwrap_or_default(),
            partition: SourcePartition::from_iter([("replay".to_string(), json!(0))]),
        }))
    }
}

struct ReplayTask {
    data: Dataset,
    next: usize,
    topic: String,
    /// Built once, as a source with a fixed partition does; every record gets a clone.
    partition: SourcePartition,
}

#[async_trait]
impl SourceTask for ReplayTask {
    async fn start(&mut self) -> ConnectResult<()> {
        Ok(())
    }

    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        if self.next >= self.data.len() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Ok(Vec::new());
        }
        let end = (self.next + BATCH).min(self.data.len());
        let records = self.data[self.next..end]
            .iter()
            .enumerate()
            .map(|(i, (key, value))| {
                let record = Record::new(self.topic.clone())
                    .with_key(key.clone())
                    .with_value(value.clone())
                    .with_header(content_type::HEADER, content_type::JSON);
                SourceRecord::new(
                    record,
                    self.partition.clone(),
                    Map::from_iter([("i".to_string(), json!(self.next + i))]),
                )
            })
            .collect();
        self.next = end;
        Ok(records)
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        Ok(())
    }
}

/// A record handed back with the reason it was not queued.
type NotQueued<'a> = (KafkaError, FutureRecord<'a, [u8], [u8]>);

/// A client the raw baseline drives: rdkafka's `FutureProducer`, or the engine's own producer
/// (the same loop without the runner, to show what the runner itself costs).
trait RawClient {
    type Delivery: std::future::Future<
            Output = Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
        >;
    #[allow(clippy::result_large_err)]
    fn send_record<'a>(
        &self,
        record: FutureRecord<'a, [u8], [u8]>,
    ) -> Result<Self::Delivery, NotQueued<'a>>;
}

impl RawClient for FutureProducer {
    type Delivery = rdkafka::producer::DeliveryFuture;
    fn send_record<'a>(
        &self,
        record: FutureRecord<'a, [u8], [u8]>,
    ) -> Result<Self::Delivery, NotQueued<'a>> {
        self.send_result(record)
    }
}

impl RawClient for Producer {
    type Delivery = medconnect_runtime::kafka::DeliveryFuture;
    fn send_record<'a>(
        &self,
        record: FutureRecord<'a, [u8], [u8]>,
    ) -> Result<Self::Delivery, NotQueued<'a>> {
        self.send_result(record)
    }
}

async fn raw_producer<C: RawClient>(
    settings: &KafkaSettings,
    producer: C,
    topic: &str,
    data: &Dataset,
    broker: u32,
) -> anyhow::Result<Run> {
    // One partition, as the pipeline's topic gets by default.
    ensure_topics(settings, &[TopicSpec::regular(topic, 1, 1)]).await?;
    let settled = |answer: Result<OwnedDeliveryResult, _>| -> anyhow::Result<()> {
        answer?.map_err(|(e, _)| anyhow::anyhow!("{e}"))?;
        Ok(())
    };
    // Warm the connection and metadata, as the worker's producer is warm when its task starts.
    let warm = FutureRecord::<[u8], [u8]>::to(topic).payload(b"warm-up");
    settled(producer.send_record(warm).map_err(|(e, _)| e)?.await)?;
    let (started, cpu) = (Instant::now(), CpuMark::now(Some(broker))?);
    let mut pending = std::collections::VecDeque::with_capacity(10_000);
    for (key, value) in data.iter() {
        loop {
            let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
                .key(key.as_ref())
                .payload(value.as_ref())
                .headers(
                    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                        key: content_type::HEADER,
                        value: Some(content_type::JSON),
                    }),
                );
            match producer.send_record(record) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                Err(_) => match pending.pop_front() {
                    Some(delivery) => settled(delivery.await)?,
                    None => tokio::time::sleep(Duration::from_millis(1)).await,
                },
            }
            // Same bound on records in flight as the worker's default backpressure.
            if pending.len() >= 10_000
                && let Some(delivery) = pending.pop_front()
            {
                settled(delivery.await)?;
            }
        }
    }
    for delivery in pending {
        settled(delivery.await)?;
    }
    Run::of(data.len(), started, cpu, broker)
}

async fn pipeline(worker: &Worker, name: &str, count: usize, broker: u32) -> anyhow::Result<Run> {
    let config = [("connector.class", "bench.ReplaySource"), ("topic", name)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    worker.herder().create(name, config, None).await?;
    let metrics = worker.herder().metrics();
    let delivered = || metrics.records_out.with_label_values(&[name, "0"]).get() as usize;
    // Time from the first record acknowledged to the last, sampled every millisecond.
    let deadline = Instant::now() + Duration::from_secs(600);
    while delivered() == 0 {
        if Instant::now() > deadline {
            bail!("the pipeline never delivered");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (started, cpu, first) = (Instant::now(), CpuMark::now(Some(broker))?, delivered());
    while delivered() < count {
        if Instant::now() > deadline {
            bail!("the pipeline delivered {} of {count}", delivered());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Run::of(count - first, started, cpu, broker)
}

/// One contender's run.
#[derive(Clone, Copy)]
struct Run {
    /// Records per second.
    rate: f64,
    /// CPU time of this process (the contender: client, runner, source) per record.
    cpu_per_record: Duration,
    /// CPU time of the broker process per record.
    broker_cpu_per_record: Duration,
}

impl Run {
    fn of(records: usize, started: Instant, cpu: CpuMark, broker: u32) -> anyhow::Result<Self> {
        let used = cpu.used(Some(broker))?;
        let records = records.max(1) as u32;
        Ok(Self {
            rate: records as f64 / started.elapsed().as_secs_f64(),
            cpu_per_record: used.own / records,
            broker_cpu_per_record: used.broker / records,
        })
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

async fn wait_ready(url: &str, deadline: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let client = reqwest::Client::new();
    loop {
        if client
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > deadline {
            bail!("{url} not ready after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// How many 10 s windows of load the RSS is watched over.
const LOAD_WINDOWS: usize = 3;

async fn processes() -> anyhow::Result<()> {
    let binary = medconnect_binary()?;
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::start()?;
    let rest_port = free_port()?;
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "bootstrap_servers = \"{}\"\n[rest]\nlisten = \"127.0.0.1:{rest_port}\"\nauth = \"none\"\n[consumer]\n{}\n",
            broker.bootstrap_servers(),
            broker::CONSUMER_SETTINGS
                .iter()
                .map(|(key, value)| format!("{key:?} = {value:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        ),
    )?;
    let base = format!("http://127.0.0.1:{rest_port}");
    let start_worker = || -> anyhow::Result<ChildProcess> {
        Ok(ChildProcess(
            Command::new(&binary)
                .arg("worker")
                .arg(&config)
                .env("MEDCONNECT_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ))
    };
    let mut ready = Vec::new();
    let mut worker = None;
    for _ in 0..5 {
        drop(worker.take());
        let process = start_worker()?;
        ready.push(wait_ready(&format!("{base}/health"), Duration::from_secs(30)).await?);
        worker = Some(process);
    }
    let worker = worker.context("no worker")?;
    let pid = worker.0.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_mb(pid)?;

    let client = reqwest::Client::new();
    let output = dir.path().join("out.jsonl");
    let mut created = Vec::new();
    for body in [
        json!({"name": "load-in", "config": {"connector.class": "DatagenSource", "topic": "load", "rate": "0"}}),
        json!({"name": "load-out", "config": {"connector.class": "FileSink", "topics": "load", "file": output.to_str().context("path")?}}),
    ] {
        created.push(ready_ms(create_connector(&client, &base, &body).await?));
    }
    // Peak RSS per 10 s window over 30 s of load: bounded memory shows as windows that stop
    // growing while the records keep flowing.
    let mut windows = [0.0f64; LOAD_WINDOWS];
    for window in &mut windows {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            *window = window.max(rss_mb(pid)?);
        }
    }
    let peak = windows.iter().copied().fold(0.0, f64::max);
    let lines = std::fs::read_to_string(&output)
        .map(|t| t.lines().count())
        .unwrap_or(0);
    // Seen once in five runs (2026-12-01): the connectors were created and nothing reached
    // the file. An RSS "under load" that was not is no figure.
    if lines == 0 {
        bail!(
            "no record reached the file sink in {} s: no load to measure",
            LOAD_WINDOWS * 10
        );
    }
    let cold = ready[0];
    let mut warm = ready[1..].to_vec();
    warm.sort();
    println!("\n== medconnect processes");
    println!(
        "start to REST ready: first start (creates the internal topics) {:.0} ms; restarts: median {:.0} ms, max {:.0} ms ({} runs)",
        ready_ms(cold),
        ready_ms(warm[warm.len() / 2]),
        ready_ms(warm[warm.len() - 1]),
        warm.len()
    );
    println!(
        "POST /connectors answered (config written and read back): {}",
        created
            .iter()
            .map(|ms| format!("{ms:.0} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "worker RSS: idle {idle:.1} MB, under load (datagen -> Kafka -> file sink, {lines} records in {} s) peak {peak:.1} MB; peak per 10 s window: {}",
        LOAD_WINDOWS * 10,
        windows
            .iter()
            .map(|mb| format!("{mb:.1} MB"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "broker process RSS (reference): {:.1} MB",
        rss_mb(broker.pid())?
    );
    drop(worker);
    drop(broker);
    Ok(())
}

fn ready_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let count: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200_000);
    let rounds: usize = std::env::args()
        .nth(2)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(ROUNDS)
        .max(1);
    let data = dataset(count);
    let bytes: usize = data.iter().map(|(k, v)| k.len() + v.len()).sum();
    println!(
        "== source pipeline vs raw rdkafka producer and the engine's producer alone: {count} records, {} bytes on average",
        bytes / count
    );
    let broker = BrokerProcess::start()?;
    let mut config = WorkerConfig::new(broker.bootstrap_servers())
        .with_consumer_settings(broker::CONSUMER_SETTINGS);
    config.rest.listen = "127.0.0.1:0".parse()?;
    let plugins =
        medconnect::builtin_plugins().with_source(Arc::new(ReplayConnector { data: data.clone() }));
    let worker = Worker::start(config, plugins).await?;
    let settings = KafkaSettings::new(broker.bootstrap_servers());
    if std::env::var_os("PIPELINE_ONLY").is_some() {
        // For a profiler: only the pipeline's rounds, so that every sample is of the pipeline.
        for n in 0..rounds {
            let piped = pipeline(&worker, &format!("pipe-{n}"), count, broker.pid()).await?;
            println!("round {}: pipeline {:>9.0} records/s", n + 1, piped.rate);
        }
        worker.shutdown().await;
        return Ok(());
    }
    let mut runs: Vec<[Run; 3]> = Vec::new();
    for n in 0..rounds {
        // Both raw clients with the worker's producer settings. The order turns every round,
        // so that no contender always runs first (or last) in a round.
        let mut round = [None; 3];
        let order: [usize; 3] = if n % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        for contender in order {
            round[contender] = Some(match contender {
                0 => {
                    let rdkafka: FutureProducer =
                        settings.producer_config(&Default::default()).create()?;
                    raw_producer(&settings, rdkafka, &format!("raw-{n}"), &data, broker.pid())
                        .await?
                }
                1 => {
                    let engine = settings.producer(&Default::default())?;
                    raw_producer(
                        &settings,
                        engine,
                        &format!("direct-{n}"),
                        &data,
                        broker.pid(),
                    )
                    .await?
                }
                _ => pipeline(&worker, &format!("pipe-{n}"), count, broker.pid()).await?,
            });
        }
        let [Some(raw), Some(direct), Some(piped)] = round else {
            bail!("a contender did not run");
        };
        println!(
            "round {}: raw FutureProducer {:>9.0} records/s, engine producer alone {:>9.0}, pipeline {:>9.0}; ratio to raw {:.2}, to the engine producer {:.2}; CPU per record {:.2} / {:.2} / {:.2} µs",
            n + 1,
            raw.rate,
            direct.rate,
            piped.rate,
            piped.rate / raw.rate,
            piped.rate / direct.rate,
            micros(raw.cpu_per_record),
            micros(direct.cpu_per_record),
            micros(piped.cpu_per_record),
        );
        runs.push([raw, direct, piped]);
    }
    let column =
        |i: usize, f: &dyn Fn(&Run) -> f64| runs.iter().map(|r| f(&r[i])).collect::<Vec<_>>();
    let best = |i: usize| column(i, &|r| r.rate).into_iter().fold(0.0, f64::max);
    let (best_raw, best_engine, best_pipeline) = (best(0), best(1), best(2));
    let ratios = |i: usize| {
        runs.iter()
            .map(|r| r[2].rate / r[i].rate)
            .collect::<Vec<_>>()
    };
    println!(
        "median of the {rounds} rounds' ratios (each round's contenders back to back): pipeline to raw {:.2}, to the engine producer {:.2}; middle half of the rounds: to raw {:.2}-{:.2}, to the engine producer {:.2}-{:.2}",
        median(ratios(0)),
        median(ratios(1)),
        quantile(ratios(0), 0.25),
        quantile(ratios(0), 0.75),
        quantile(ratios(1), 0.25),
        quantile(ratios(1), 0.75),
    );
    println!(
        "best of each: raw FutureProducer {best_raw:.0} records/s, engine producer alone {best_engine:.0}, pipeline {best_pipeline:.0}; ratio to raw {:.2}, to the engine producer {:.2}",
        best_pipeline / best_raw,
        best_pipeline / best_engine
    );
    let cpu = |i: usize| median(column(i, &|r| micros(r.cpu_per_record)));
    let broker_cpu = |i: usize| median(column(i, &|r| micros(r.broker_cpu_per_record)));
    println!(
        "CPU per record, this process (median of the rounds): raw FutureProducer {:.2} µs, engine producer alone {:.2} µs, pipeline {:.2} µs; pipeline/raw {:.2}; the broker process's: {:.2} / {:.2} / {:.2} µs",
        cpu(0),
        cpu(1),
        cpu(2),
        cpu(2) / cpu(0),
        broker_cpu(0),
        broker_cpu(1),
        broker_cpu(2),
    );
    worker.shutdown().await;
    drop(broker);
    processes().await
}
