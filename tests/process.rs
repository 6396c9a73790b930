//! The process as a whole: what `medconnect` does when a part of it cannot start or its Kafka
//! state disappears. A process that cannot do its job ends with one clear message and a
//! non-zero exit, promptly, for a supervisor to see; it never runs half-started.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use medconnect_e2e::{DEADLINE, Rest, eventually, medconnect_bin};
use medconnect_runtime::broker::{self, EmbeddedBroker};
use medconnect_runtime::kafka::{KafkaSettings, TopicSpec, ensure_topics};
use medconnect_runtime::worker::cluster_watch;
use medconnect_runtime::{Worker, WorkerConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A `medconnect` process whose stderr is collected as it comes.
struct Process {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Process {
    fn start(args: &[&str]) -> anyhow::Result<Self> {
        Self::start_logging(args, "info,rdkafka=warn,tansu=warn")
    }

    /// With `MEDCONNECT_LOG` set to `filter`.
    fn start_logging(args: &[&str], filter: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(medconnect_bin()?)
            .args(args)
            .env("MEDCONNECT_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting medconnect")?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let reader = child.stderr.take().map(|pipe| {
            let lines = stderr.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().unwrap().push(line);
                }
            })
        });
        Ok(Self {
            child,
            stderr,
            reader,
        })
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits for the process to exit; fails (and kills it) if it is still running after `within`.
    async fn exit_within(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                // The pipe closes with the process: the reader then has every line.
                if let Some(reader) = self.reader.take() {
                    let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
                }
                Ok(status)
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("still running after {within:?}; stderr:\n{}", self.stderr())
            }
        }
    }

    /// The first stderr line that contains `text`, waiting for it.
    async fn line_with(&self, text: &str) -> anyhow::Result<String> {
        eventually(&format!("a log line with {text:?}"), async || {
            self.stderr
                .lock()
                .unwrap()
                .iter()
                .find(|line| line.contains(text))
                .cloned()
        })
        .await
        .with_context(|| format!("stderr:\n{}", self.stderr()))
    }
}

/// How long a start-up failure may take to end the process.
const PROMPTLY: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_exits_when_its_kafka_port_is_taken() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let mut dev = Process::start(&["dev", "--kafka", &addr, "--rest", "127.0.0.1:0"])?;
    let status = dev.exit_within(PROMPTLY).await?;
    let stderr = dev.stderr();
    assert!(!status.success(), "{status}; stderr:\n{stderr}");
    assert!(stderr.contains(&addr), "names {addr}:\n{stderr}");
    assert!(
        !stderr.contains("broker listening"),
        "never claims to listen:\n{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_exits_when_its_rest_port_is_taken() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let mut dev = Process::start(&["dev", "--kafka", "127.0.0.1:0", "--rest", &addr])?;
    let status = dev.exit_within(PROMPTLY).await?;
    let stderr = dev.stderr();
    assert!(!status.success(), "{status}; stderr:\n{stderr}");
    assert!(stderr.contains(&addr), "names {addr}:\n{stderr}");
    Ok(())
}

/// A port where nothing listens (bound, then released).
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A worker config for `bootstrap`, REST on a free port; `extra` adds top-level settings.
fn worker_toml(dir: &tempfile::TempDir, bootstrap: &str, extra: &str) -> anyhow::Result<String> {
    let path = dir.path().join("worker.toml");
    std::fs::write(
        &path,
        format!(
            "bootstrap_servers = \"{bootstrap}\"\n{extra}\n\
             [rest]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\n\
             [consumer]\n\"fetch.wait.max.ms\" = 25\n"
        ),
    )?;
    Ok(path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_exits_when_kafka_is_unreachable() -> anyhow::Result<()> {
    let nobody = free_port()?.to_string();
    let dir = tempfile::tempdir()?;
    let config = worker_toml(&dir, &nobody, "startup_timeout_ms = 3000")?;
    let mut worker = Process::start(&["worker", &config])?;
    let status = worker.exit_within(PROMPTLY).await?;
    let stderr = worker.stderr();
    assert!(!status.success(), "{status}; stderr:\n{stderr}");
    assert!(stderr.contains(&nobody), "names {nobody}:\n{stderr}");
    Ok(())
}

/// A broker that comes back without its data: the worker process says so and exits non-zero,
/// for a supervisor to restart it (it used to log ~10 errors a second, forever).
///
/// The broker "comes back" behind a proxy that holds Fetch requests: tansu 0.6 answers a fetch
/// for a topic it does not know with a zero topic id and a current-leader tag, and librdkafka
/// 2.12.1 looks that topic up by its (NULL) name: SIGSEGV in `rd_kafka_metadata_update_op`,
/// within milliseconds, before anything else can happen. Real Kafka answers UNKNOWN_TOPIC_ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_exits_when_its_broker_comes_back_empty() -> anyhow::Result<()> {
    let (proxy, listener) = SwitchingProxy::bind().await?;
    let first = EmbeddedBroker::start_advertising("127.0.0.1:0".parse()?, Some(proxy.addr)).await?;
    proxy.serve(listener, first.addr());
    let dir = tempfile::tempdir()?;
    let config = worker_toml(&dir, &proxy.addr.to_string(), "")?;
    let mut worker = Process::start(&["worker", &config])?;
    worker.line_with("worker started").await?;

    let empty = EmbeddedBroker::start_advertising("127.0.0.1:0".parse()?, Some(proxy.addr)).await?;
    proxy
        .hold_fetches
        .store(true, std::sync::atomic::Ordering::Relaxed);
    proxy.move_to(empty.addr());
    first.stop();

    let status = worker.exit_within(DEADLINE).await?;
    let stderr = worker.stderr();
    assert!(!status.success(), "{status}; stderr:\n{stderr}");
    assert!(stderr.contains("internal topics"), "says why:\n{stderr}");
    Ok(())
}

/// The watcher behind `/health`, `Worker::failed` and the exit above, against the embedded
/// broker: it reports internal topics gone once an empty broker answers at the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_watch_reports_a_broker_that_came_back_empty() -> anyhow::Result<()> {
    medconnect_e2e::capture_logs();
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse()?).await?;
    let addr = broker.addr();
    let kafka = KafkaSettings::new(&broker.bootstrap_servers());
    let topics = vec!["watched-configs".to_string(), "watched-status".to_string()];
    let specs: Vec<TopicSpec> = topics
        .iter()
        .map(|t| TopicSpec::compacted(t, 1, 1))
        .collect();
    ensure_topics(&kafka, &specs).await?;
    let first = cluster_watch::look(&kafka, &topics, Duration::from_secs(10)).await?;
    assert!(first.missing_topics.is_empty(), "{first:?}");
    let (failure_tx, mut failure) = watch::channel(None);
    let shutdown = CancellationToken::new();
    let watching = tokio::spawn(cluster_watch::watch(
        kafka.clone(),
        topics,
        first.cluster_id,
        failure_tx,
        shutdown.clone(),
    ));

    broker.stop();
    // The old listener closes as its task is dropped: retry until the port is free again.
    let _empty = eventually("an empty broker on the same port", async || {
        EmbeddedBroker::start(addr).await.ok()
    })
    .await?;
    let reason = tokio::time::timeout(DEADLINE, failure.wait_for(Option::is_some))
        .await??
        .clone()
        .unwrap_or_default();
    assert!(
        reason.contains("internal topics") && reason.contains("watched-configs"),
        "{reason}"
    );
    shutdown.cancel();
    watching.await?;
    Ok(())
}

/// A TCP proxy in front of a broker that can move to another broker (dropping every
/// connection, so clients reconnect there) and hold back Fetch requests. Holding fetches keeps
/// librdkafka from the tansu answer that crashes it (see
/// `worker_exits_when_its_broker_comes_back_empty`).
struct SwitchingProxy {
    addr: SocketAddr,
    target: watch::Sender<SocketAddr>,
    hold_fetches: Arc<std::sync::atomic::AtomicBool>,
}

/// Kafka's API key of Fetch requests.
const FETCH: i16 = 1;

impl SwitchingProxy {
    async fn bind() -> anyhow::Result<(Self, tokio::net::TcpListener)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (target, _) = watch::channel(listener.local_addr()?);
        Ok((
            Self {
                addr: listener.local_addr()?,
                target,
                hold_fetches: Arc::default(),
            },
            listener,
        ))
    }

    fn serve(&self, listener: tokio::net::TcpListener, target: SocketAddr) {
        self.target.send_replace(target);
        let targets = self.target.subscribe();
        let hold = self.hold_fetches.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut targets = targets.clone();
                let target = *targets.borrow_and_update();
                let hold = hold.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut from_client, to_client) = inbound.into_split();
                    let (from_broker, mut to_broker) = outbound.into_split();
                    let requests = forward_requests(&mut from_client, &mut to_broker, &hold);
                    let mut from_broker = from_broker;
                    let mut to_client = to_client;
                    let answers = tokio::io::copy(&mut from_broker, &mut to_client);
                    tokio::select! {
                        _ = requests => {}
                        _ = answers => {}
                        _ = targets.changed() => {}
                    }
                });
            }
        });
    }

    /// Every client is cut off and reconnects to `target`.
    fn move_to(&self, target: SocketAddr) {
        self.target.send_replace(target);
    }
}

/// Copies request frames (4-byte length, then api key first), leaving out held fetches.
async fn forward_requests(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    hold_fetches: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let mut length = [0u8; 4];
        from.read_exact(&mut length).await?;
        let mut frame = vec![0u8; usize::try_from(u32::from_be_bytes(length))?];
        from.read_exact(&mut frame).await?;
        let api_key = frame
            .get(..2)
            .map(|key| i16::from_be_bytes([key[0], key[1]]));
        if api_key == Some(FETCH) && hold_fetches.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        to.write_all(&length).await?;
        to.write_all(&frame).await?;
    }
}

/// A whole in-process worker meets a broker that came back empty: `/health` turns 500 with the
/// reason and `Worker::failed` resolves with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reports_a_broker_that_came_back_empty() -> anyhow::Result<()> {
    medconnect_e2e::capture_logs();
    let (proxy, listener) = SwitchingProxy::bind().await?;
    let first = EmbeddedBroker::start_advertising("127.0.0.1:0".parse()?, Some(proxy.addr)).await?;
    proxy.serve(listener, first.addr());
    let mut config = WorkerConfig::new(&proxy.addr.to_string())
        .with_consumer_settings(broker::CONSUMER_SETTINGS);
    config.rest.listen = "127.0.0.1:0".parse()?;
    let worker = Worker::start(config, medconnect::builtin_plugins()).await?;
    let rest = Rest::new(&format!("http://{}", worker.rest_addr()));
    let (code, health) = rest.get("/health").await?;
    assert_eq!(code, 200, "{health}");

    let empty = EmbeddedBroker::start_advertising("127.0.0.1:0".parse()?, Some(proxy.addr)).await?;
    proxy
        .hold_fetches
        .store(true, std::sync::atomic::Ordering::Relaxed);
    proxy.move_to(empty.addr());
    first.stop();

    let (code, health) = eventually("/health to report the loss", async || {
        let (code, health) = rest.get("/health").await.ok()?;
        (code != 200).then_some((code, health))
    })
    .await?;
    assert_eq!((code, health["status"].as_str()), (500, Some("unhealthy")));
    let message = health["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("internal topics"), "{message}");
    let reason = tokio::time::timeout(DEADLINE, worker.failed()).await?;
    assert_eq!(reason, message);
    tokio::time::timeout(DEADLINE, worker.shutdown()).await?;
    Ok(())
}

/// `PUT /admin/loggers/{logger}` changes what the binary logs, at once: started at `warn`, it
/// logs the change itself (an INFO line) only because the change let INFO through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_changes_its_log_level_at_run_time() -> anyhow::Result<()> {
    let rest_addr = free_port()?.to_string();
    let dev = Process::start_logging(
        &["dev", "--kafka", "127.0.0.1:0", "--rest", &rest_addr],
        "warn",
    )?;
    let rest = Rest::new(&format!("http://{rest_addr}"));
    eventually("the REST API", async || {
        rest.get("/health")
            .await
            .ok()
            .filter(|(code, _)| *code == 200)
    })
    .await
    .with_context(|| dev.stderr())?;
    let (_, loggers) = rest.get("/admin/loggers").await?;
    assert_eq!(loggers["root"]["level"], "WARN", "{loggers}");

    let (code, affected) = rest
        .put(
            "/admin/loggers/medconnect_runtime::rest",
            &serde_json::json!({"level": "INFO"}),
        )
        .await?;
    assert_eq!(code, 200, "{affected}");
    let line = dev.line_with("log level changed").await?;
    assert!(line.contains("INFO"), "{line}");
    Ok(())
}
