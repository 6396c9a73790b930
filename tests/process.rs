//! The process as a whole: what `medconnect` does when a part of it cannot start or its Kafka
//! state disappears. A process that cannot do its job ends with one clear message and a
//! non-zero exit, promptly, for a supervisor to see; it never runs half-started.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use medconnect_e2e::{DEADLINE, eventually, medconnect_bin};
use medconnect_runtime::broker::EmbeddedBroker;
use medconnect_runtime::kafka::{KafkaSettings, TopicSpec, ensure_topics};
use medconnect_runtime::worker::cluster_watch;
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
        let mut child = Command::new(medconnect_bin()?)
            .args(args)
            .env("MEDCONNECT_LOG", "info,rdkafka=warn,tansu=warn")
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

fn worker_toml(dir: &tempfile::TempDir, bootstrap: &str) -> anyhow::Result<String> {
    let path = dir.path().join("worker.toml");
    std::fs::write(
        &path,
        format!(
            "bootstrap_servers = \"{bootstrap}\"\nstartup_timeout_ms = 3000\n\
             [rest]\nlisten = \"127.0.0.1:0\"\n\
             [consumer]\n\"fetch.wait.max.ms\" = 25\n"
        ),
    )?;
    Ok(path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_exits_when_kafka_is_unreachable() -> anyhow::Result<()> {
    let nobody = free_port()?.to_string();
    let dir = tempfile::tempdir()?;
    let mut worker = Process::start(&["worker", &worker_toml(&dir, &nobody)?])?;
    let status = worker.exit_within(PROMPTLY).await?;
    let stderr = worker.stderr();
    assert!(!status.success(), "{status}; stderr:\n{stderr}");
    assert!(stderr.contains(&nobody), "names {nobody}:\n{stderr}");
    Ok(())
}

/// A broker killed and restarted without its data: the worker says so and exits non-zero,
/// for a supervisor to restart it (it used to log ~10 errors a second, forever).
///
/// Ignored: against the embedded broker the worker never gets to say it. tansu 0.6 answers a
/// fetch for a topic it does not know with a zero topic id and a current-leader tag, and
/// librdkafka 2.12.1 then looks that topic up by its (NULL) name: SIGSEGV in
/// `rd_kafka_metadata_update_op`, within milliseconds of the empty broker answering, before
/// any check can run (the process does end non-zero, without a message). Real Kafka answers
/// UNKNOWN_TOPIC_ID instead. Run it (`--ignored`) once either side is fixed.
#[ignore = "librdkafka 2.12.1 crashes on tansu's fetch answer for an unknown topic"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_exits_when_its_broker_comes_back_empty() -> anyhow::Result<()> {
    let kafka = free_port()?.to_string();
    let mut first = Process::start(&["broker", "--listen", &kafka])?;
    first.line_with("broker listening").await?;
    let dir = tempfile::tempdir()?;
    let mut worker = Process::start(&["worker", &worker_toml(&dir, &kafka)?])?;
    worker.line_with("worker started").await?;

    first.child.kill().await?;
    let second = Process::start(&["broker", "--listen", &kafka])?;
    second.line_with("broker listening").await?;

    let status = worker.exit_within(DEADLINE).await?;
    let stderr = worker.stderr();
    assert!(!status.success(), "{status}; stderr:\n{stderr}");
    assert!(stderr.contains("internal topics"), "says why:\n{stderr}");
    Ok(())
}

/// The watcher behind `/health`, `Worker::failed` and the exit above, against the embedded
/// broker: it reports internal topics gone once an empty broker answers at the same address.
/// (A whole worker cannot be shown here: see the ignored test above.)
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
