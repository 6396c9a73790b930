//! Test harness: a real Kafka-API broker (the embedded tansu broker, over TCP), real workers
//! (started in-process, reached over HTTP), a Kafka client to read what landed in topics, and
//! waiting on conditions with deadlines.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use medconnect_runtime::broker::{self, EmbeddedBroker};
use medconnect_runtime::kafka::{KafkaSettings, TopicSpec, ensure_topics};
use medconnect_runtime::{Plugins, Worker, WorkerConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

pub use serde_json::json;

pub mod cluster_broker;
pub mod crash;
pub mod mqtt_devices;
pub mod pki;
mod process;
mod test_connector;
pub use async_trait::async_trait;
pub use process::medconnect_bin;

/// How long a condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A broker and a scratch directory; workers are started against it.
pub struct TestCluster {
    _broker: EmbeddedBroker,
    bootstrap: String,
    dir: tempfile::TempDir,
}

/// Sends the in-process workers' logs to the test's captured output, which libtest prints only
/// for a failing test. `MEDCONNECT_TEST_LOG` takes an `EnvFilter` directive to see more.
pub fn capture_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEDCONNECT_TEST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,medconnect_runtime=info"));
    // Only the first call per test binary installs it; later ones find it in place.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

impl TestCluster {
    pub async fn start() -> anyhow::Result<Self> {
        capture_logs();
        let broker = EmbeddedBroker::start("127.0.0.1:0".parse()?).await?;
        Ok(Self {
            bootstrap: broker.bootstrap_servers(),
            _broker: broker,
            dir: tempfile::tempdir()?,
        })
    }

    /// A cluster whose every client (workers and tests alike) reaches the broker through a
    /// proxy that can cut the network: a broker outage as clients see it, with the broker's
    /// data intact for when it "returns".
    pub async fn start_behind_proxy() -> anyhow::Result<(Self, TcpProxy)> {
        capture_logs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let proxy_addr = listener.local_addr()?;
        let broker =
            EmbeddedBroker::start_advertising("127.0.0.1:0".parse()?, Some(proxy_addr)).await?;
        let proxy = TcpProxy::serve(listener, broker.addr());
        Ok((
            Self {
                bootstrap: proxy_addr.to_string(),
                _broker: broker,
                dir: tempfile::tempdir()?,
            },
            proxy,
        ))
    }

    pub fn bootstrap(&self) -> String {
        self.bootstrap.clone()
    }

    /// A path in the cluster's scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A worker config with fast offset flushes, REST on a free port.
    pub fn worker_config(&self) -> WorkerConfig {
        // As `medconnect dev` configures its worker for the embedded broker.
        let mut config =
            WorkerConfig::new(&self.bootstrap()).with_consumer_settings(broker::CONSUMER_SETTINGS);
        config.rest.listen = "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!());
        config.tasks.offset_flush_interval_ms = 200;
        config
    }

    pub async fn start_worker(&self) -> anyhow::Result<TestWorker> {
        self.start_worker_with(self.worker_config()).await
    }

    pub async fn start_worker_with(&self, config: WorkerConfig) -> anyhow::Result<TestWorker> {
        self.start_worker_with_plugins(config, medconnect::builtin_plugins())
            .await
    }

    /// A worker that also knows the test's own connectors (e.g. ones that misbehave on purpose).
    pub async fn start_worker_with_plugins(
        &self,
        config: WorkerConfig,
        plugins: Plugins,
    ) -> anyhow::Result<TestWorker> {
        let worker = Worker::start(config, plugins).await?;
        let rest = Rest::new(&format!("http://{}", worker.rest_addr()));
        Ok(TestWorker { worker, rest })
    }

    /// Reads a topic from the beginning until `count` records arrived (or the deadline passed).
    pub async fn read_topic(&self, topic: &str, count: usize) -> anyhow::Result<Vec<Received>> {
        read_topic(&self.bootstrap(), topic, count).await
    }

    /// Every record of a topic. The end is where no record arrives for [`QUIET`]: the test
    /// broker (tansu 0.6) under-reports the end offset of partitions written in batches
    /// (ListOffsets answers the last batch's base offset + 1), so watermarks cannot be used.
    pub async fn read_all(&self, topic: &str) -> anyhow::Result<Vec<Received>> {
        read_topic_until(&self.bootstrap(), topic, usize::MAX, true).await
    }

    pub async fn count_records(&self, topic: &str) -> anyhow::Result<usize> {
        Ok(self.read_all(topic).await?.len())
    }

    /// Produces records (key, value) with a plain Kafka client, creating the topic (one
    /// partition) if needed: the test broker does not create topics on first use.
    pub async fn produce(
        &self,
        topic: &str,
        records: &[(Option<&str>, &str)],
    ) -> anyhow::Result<()> {
        ensure_topics(
            &KafkaSettings::new(&self.bootstrap()),
            &[TopicSpec::regular(topic, 1, 1)],
        )
        .await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()?;
        for (key, value) in records {
            let mut record = FutureRecord::to(topic).payload(*value);
            if let Some(key) = key {
                record = record.key(*key);
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| anyhow::anyhow!("produce failed: {e}"))?;
        }
        Ok(())
    }
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Received {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        self.value
            .as_deref()
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or(Value::Null)
    }
}

fn reader(bootstrap: &str) -> anyhow::Result<BaseConsumer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "medconnect-test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    for &(key, value) in broker::CONSUMER_SETTINGS {
        config.set(key, value);
    }
    Ok(config.create()?)
}

/// How long a topic must stay silent to count as read to its end.
pub const QUIET: Duration = Duration::from_millis(1500);

async fn read_topic(bootstrap: &str, topic: &str, count: usize) -> anyhow::Result<Vec<Received>> {
    read_topic_until(bootstrap, topic, count, false).await
}

async fn read_topic_until(
    bootstrap: &str,
    topic: &str,
    count: usize,
    until_quiet: bool,
) -> anyhow::Result<Vec<Received>> {
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer = reader(&bootstrap)?;
        let deadline = std::time::Instant::now() + DEADLINE;
        let partitions = loop {
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let ids: Vec<i32> = metadata
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if !ids.is_empty() {
                break ids;
            }
            if std::time::Instant::now() > deadline {
                bail!("topic {topic} never appeared");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut assignment = TopicPartitionList::new();
        for p in partitions {
            assignment.add_partition_offset(&topic, p, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let mut records = Vec::new();
        let mut last_seen = std::time::Instant::now();
        while records.len() < count {
            if until_quiet && last_seen.elapsed() > QUIET {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "read {} of {count} records from {topic} before the deadline",
                    records.len()
                );
            }
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                last_seen = std::time::Instant::now();
                let message = message?;
                let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
                let headers = message
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), text(h.value).unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default();
                records.push(Received {
                    partition: message.partition(),
                    offset: message.offset(),
                    key: text(message.key()),
                    value: text(message.payload()),
                    headers,
                });
            }
        }
        Ok(records)
    })
    .await?
}

pub struct TestWorker {
    worker: Worker,
    pub rest: Rest,
}

impl TestWorker {
    pub async fn shutdown(self) {
        self.worker.shutdown().await;
    }

    /// Waits until a connector and all its tasks report `state`.
    pub async fn wait_for_state(
        &self,
        connector: &str,
        state: &str,
        tasks: usize,
    ) -> anyhow::Result<Value> {
        let path = format!("/connectors/{connector}/status");
        eventually(
            &format!("{connector} to be {state} with {tasks} task(s)"),
            async || {
                let (code, status) = self.rest.get(&path).await.ok()?;
                let task_states: Vec<&str> = status["tasks"]
                    .as_array()?
                    .iter()
                    .filter_map(|t| t["state"].as_str())
                    .collect();
                (code == 200
                    && status["connector"]["state"] == state
                    && task_states.len() == tasks
                    && task_states.iter().all(|s| *s == state))
                .then(|| status.clone())
            },
        )
        .await
    }

    /// Waits until a task reports `state`.
    pub async fn wait_for_task(
        &self,
        connector: &str,
        task: u32,
        state: &str,
    ) -> anyhow::Result<Value> {
        let path = format!("/connectors/{connector}/tasks/{task}/status");
        eventually(
            &format!("{connector} task {task} to be {state}"),
            async || {
                let (_, status) = self.rest.get(&path).await.ok()?;
                (status["state"] == state).then_some(status)
            },
        )
        .await
    }
}

/// A small client for the REST API: every call returns (status code, JSON body or Null).
#[derive(Clone)]
pub struct Rest {
    base: String,
    http: reqwest::Client,
}

impl Rest {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, body))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn get_text(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let response = self.http.get(self.url(path)).send().await?;
        Ok((response.status().as_u16(), response.text().await?))
    }

    /// Whether `/metrics` shows an error counted for `connector` at `stage` (`KAFKA_PRODUCE`,
    /// `KAFKA_CONSUME`, ...); `None` while not, for [`eventually`].
    pub async fn error_counted(&self, connector: &str, stage: &str) -> Option<()> {
        let (_, text) = self.get_text("/metrics").await.ok()?;
        let connector = format!("connector=\"{connector}\"");
        text.lines()
            .any(|l| {
                l.starts_with("medconnect_errors_total{")
                    && l.contains(&connector)
                    && l.contains(stage)
            })
            .then_some(())
    }

    /// The value `/metrics` shows for a metric of `connector`'s task (the first such line), if
    /// it is there.
    pub async fn task_metric(&self, name: &str, connector: &str) -> Option<u64> {
        let (_, text) = self.get_text("/metrics").await.ok()?;
        let connector = format!("connector=\"{connector}\"");
        let line = text
            .lines()
            .find(|line| line.starts_with(name) && line.contains(&connector))?;
        line.rsplit(' ').next()?.parse().ok()
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn post_empty(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.send(self.http.post(self.url(path))).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        self.send(self.http.put(self.url(path)).json(body)).await
    }

    pub async fn put_empty(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.send(self.http.put(self.url(path))).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        self.send(self.http.patch(self.url(path)).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.send(self.http.delete(self.url(path))).await
    }

    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &str,
    ) -> anyhow::Result<(u16, Value)> {
        self.send(
            self.http
                .request(method, self.url(path))
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    /// Creates a connector and insists on 201.
    pub async fn create(&self, name: &str, config: Value) -> anyhow::Result<Value> {
        let (code, body) = self
            .post("/connectors", &json!({"name": name, "config": config}))
            .await?;
        if code != 201 {
            bail!("creating {name} answered {code}: {body}");
        }
        Ok(body)
    }
}

/// Polls `check` until it returns `Some`, or fails after [`DEADLINE`] naming what was awaited.
pub async fn eventually<T>(
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The lines of a file, or none while it does not exist.
pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Waits until a file has at least `count` lines; returns them.
pub async fn wait_for_lines(path: &Path, count: usize) -> anyhow::Result<Vec<String>> {
    eventually(
        &format!("{} to have {count} lines", path.display()),
        async || {
            let found = lines(path);
            (found.len() >= count).then_some(found)
        },
    )
    .await
    .with_context(|| format!("{} has {} lines", path.display(), lines(path).len()))
}

/// A TCP proxy in front of the broker that can drop every connection and refuse new ones.
pub struct TcpProxy {
    open: tokio::sync::watch::Sender<bool>,
    _serving: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    fn serve(listener: tokio::net::TcpListener, target: std::net::SocketAddr) -> Self {
        let (open, state) = tokio::sync::watch::channel(true);
        let serving = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*state.borrow() {
                    continue; // refused: dropped at once
                }
                let mut state = state.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = state.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self {
            open,
            _serving: serving,
        }
    }

    /// The broker becomes unreachable: connections drop, new ones are refused.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

/// An example connector from `configs/<file>`: its name and its config.
pub fn example_connector(file: &str) -> anyhow::Result<(String, Value)> {
    let path = format!("{}/../configs/{file}", env!("CARGO_MANIFEST_DIR"));
    let example: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{path} is not JSON"))?;
    let name = example["name"]
        .as_str()
        .with_context(|| format!("{path} names no connector"))?;
    Ok((name.to_string(), example["config"].clone()))
}
