//! Crash-test machinery: the processes of one test (`medconnect broker`, `medconnect worker`,
//! peers), killed with SIGKILL on demand and on every exit path, and plain Kafka consumers that
//! read back what a topic holds. Connector crash tests (`crash.rs`, `elasticsearch.rs`, ...)
//! share it: each kills a worker mid-stream and counts what it vouched for against what is
//! stored.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use medconnect_runtime::broker::CONSUMER_SETTINGS;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::{QUIET, Rest, eventually, medconnect_bin};

/// How long one read of a topic, or one wait of a crash test, may take.
pub const LONG: Duration = Duration::from_secs(60);

/// The worker config's offset topic ([`write_worker_config`]).
pub const OFFSETS_TOPIC: &str = "crash-offsets";

/// The sink consumers' session timeout: how long a killed worker's consumer stays a member of
/// its group. A sink consumer of the restarted worker that joins before then gets no partition
/// from the embedded broker (tansu 0.6) — not now, not after the dead member expired (JoinGroup
/// still names the dead leader, SyncGroup answers an empty assignment, heartbeats succeed): the
/// sink reads nothing, for good. So a test restarts a worker with a sink only this long after
/// the kill ([`wait_out_session`]); librdkafka's default (45 s) would make it wait that long.
pub const SESSION_TIMEOUT_MS: u64 = 6_000;

/// Waits until a consumer of a worker killed at `killed_at` is past its session (its last
/// heartbeat was before the kill, so this bound is exact): see [`SESSION_TIMEOUT_MS`].
pub async fn wait_out_session(killed_at: Instant) {
    tokio::time::sleep_until(
        (killed_at + Duration::from_millis(SESSION_TIMEOUT_MS + 1_000)).into(),
    )
    .await;
}

/// A `crash:` line written to stderr directly, past libtest's capture, so the counts of
/// passing runs show in `scripts/test`'s log too.
pub fn report_line(line: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The child processes of one test, their stdout/stderr in files of a temp dir; every one is
/// killed (SIGKILL) and reaped when this drops.
pub struct Processes {
    dir: Option<tempfile::TempDir>,
    children: Vec<(String, Child)>,
}

impl Processes {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            dir: Some(
                tempfile::Builder::new()
                    .prefix("medconnect-crash-")
                    .tempdir()?,
            ),
            children: Vec::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("."), |d| d.path())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    pub fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let stdout = File::create(self.path(&format!("{name}.stdout")))?;
        let stderr = File::create(self.path(&format!("{name}.stderr")))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {}", program.display()))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    fn child(&mut self, name: &str) -> anyhow::Result<&mut Child> {
        self.children
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
            .with_context(|| format!("no process {name}"))
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reaps it.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let child = self.child(name)?;
        child.kill().with_context(|| format!("killing {name}"))?;
        child.wait()?;
        Ok(())
    }

    pub fn exited(&mut self, name: &str) -> bool {
        self.child(name)
            .map(|c| !matches!(c.try_wait(), Ok(None)))
            .unwrap_or(true)
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`) with `kill(1)`.
    pub fn signal(&mut self, name: &str, signal: &str) -> anyhow::Result<()> {
        let pid = self.child(name)?.id().to_string();
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid])
            .status()
            .context("running kill")?;
        ensure!(status.success(), "kill -{signal} {name} failed");
        Ok(())
    }

    pub fn stderr(&self, name: &str) -> String {
        std::fs::read(self.path(&format!("{name}.stderr")))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn stdout(&self, name: &str) -> String {
        std::fs::read(self.path(&format!("{name}.stdout")))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// On failure: the tail of every child's output, and the directory is kept.
    pub fn report(mut self, outcome: anyhow::Result<()>) -> anyhow::Result<()> {
        if outcome.is_err() {
            self.dump();
            if let Some(dir) = self.dir.take() {
                println!("crash test files kept in {}", dir.keep().display());
            }
        }
        outcome
    }

    fn dump(&self) {
        for (name, _) in &self.children {
            for stream in ["stdout", "stderr"] {
                let text = std::fs::read(self.path(&format!("{name}.{stream}")))
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                if text.trim().is_empty() {
                    continue;
                }
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(150)..];
                println!(
                    "----- {name} {stream} (last {} of {} lines) -----",
                    tail.len(),
                    lines.len()
                );
                for line in tail {
                    println!("{line}");
                }
            }
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `medconnect broker` on a free port; another try if the port was taken meanwhile.
pub async fn start_broker(processes: &mut Processes) -> anyhow::Result<String> {
    let bin = medconnect_bin()?;
    for attempt in 1..=3 {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let name = format!("broker-{attempt}");
        processes.spawn(&name, &bin, &["broker", "--listen", &addr], &[])?;
        let ready = eventually(&format!("{name} to listen on {addr}"), async || {
            if processes.stdout(&name).contains("medconnect broker: Kafka") {
                Some(true)
            } else {
                processes.exited(&name).then_some(false)
            }
        })
        .await?;
        if ready {
            return Ok(addr);
        }
    }
    bail!("the broker did not start in 3 tries")
}

/// The worker config both worker processes run with (the second is the first restarted).
pub fn write_worker_config(
    processes: &Processes,
    bootstrap: &str,
    flush_ms: u64,
) -> anyhow::Result<PathBuf> {
    let path = processes.path("worker.toml");
    let rest_port = free_port()?;
    std::fs::write(
        &path,
        format!(
            r#"group_id = "crash"
bootstrap_servers = "{bootstrap}"

[rest]
listen = "127.0.0.1:{rest_port}"
# Open REST API: these tests are about delivery; tests/rest_security.rs tests authentication.
auth = "none"

[internal_topics]
config = "crash-configs"
offsets = "{OFFSETS_TOPIC}"
status = "crash-status"

[tasks]
offset_flush_interval_ms = {flush_ms}

[cluster]
# One worker, killed and started again, against the embedded broker, whose group coordinator
# keeps a dead member (see SESSION_TIMEOUT_MS): the worker runs alone, outside any group.
enabled = false

[consumer]
# The embedded broker answers a fetch only after half of this wait (configs/worker.toml).
"fetch.wait.max.ms" = 25
# A killed worker's sink consumers stay members of their group until this passes (librdkafka's
# default: 45 s); the test restarts the worker only after it (see SESSION_TIMEOUT_MS).
"session.timeout.ms" = {SESSION_TIMEOUT_MS}
"#
        ),
    )?;
    Ok(path)
}

/// `medconnect worker <toml>`; ready when its REST API answers.
pub async fn start_worker(
    processes: &mut Processes,
    name: &str,
    config: &Path,
) -> anyhow::Result<Rest> {
    start_worker_with_env(processes, name, config, &[]).await
}

/// As [`start_worker`], with extra environment variables for the worker process.
pub async fn start_worker_with_env(
    processes: &mut Processes,
    name: &str,
    config: &Path,
    env: &[(&str, &str)],
) -> anyhow::Result<Rest> {
    let text = std::fs::read_to_string(config)?;
    let listen = text
        .lines()
        .find_map(|l| l.strip_prefix("listen = \""))
        .and_then(|l| l.strip_suffix('"'))
        .context("no REST listen address in the worker config")?;
    let rest = Rest::new(&format!("http://{listen}"));
    let config = config.to_str().context("temp path is not UTF-8")?;
    processes.spawn(name, &medconnect_bin()?, &["worker", config], env)?;
    let up = eventually(&format!("{name}'s REST API"), async || {
        if matches!(rest.get("/").await, Ok((200, _))) {
            Some(true)
        } else {
            processes.exited(name).then_some(false)
        }
    })
    .await?;
    ensure!(up, "{name} exited while starting");
    Ok(rest)
}

/// Polls a blocking `check` (every 250 ms, off the runtime's threads) until it returns `Some`.
pub async fn eventually_blocking<T: Send + 'static>(
    what: &str,
    check: impl Fn() -> Option<T> + Send + Sync + Clone + 'static,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + LONG;
    loop {
        let check = check.clone();
        if let Some(value) = tokio::task::spawn_blocking(check).await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The venv with python `hl7` (scripts/hl7-peers installs it); missing, the test fails.
pub fn python_bin() -> anyhow::Result<PathBuf> {
    let bin = std::env::var_os("MEDCONNECT_PY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("MEDCONNECT_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/medconnect")
                });
            cache.join("venv/bin")
        });
    ensure!(
        bin.join("mllp_send").is_file(),
        "python HL7 peers missing in {}: run scripts/hl7-peers",
        bin.display()
    );
    Ok(bin)
}

pub fn reader(bootstrap: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    for &(key, value) in CONSUMER_SETTINGS {
        config.set(key, value);
    }
    Ok(config.create()?)
}

/// The partitions of a topic, once it exists.
pub fn partitions_of(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<i32>> {
    let deadline = Instant::now() + LONG;
    loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let ids: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if !ids.is_empty() {
            return Ok(ids);
        }
        if Instant::now() > deadline {
            bail!("topic {topic} never appeared");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A record read back from a topic.
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Read {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Every record of a topic, from the beginning until `complete` holds for what was read and no
/// record arrived for [`QUIET`] (the embedded broker under-reports end offsets, so watermarks
/// cannot say where the end is). Past the deadline, what was read: the caller counts what is
/// missing.
pub async fn read_all(
    bootstrap: &str,
    topic: &str,
    complete: impl Fn(&[Read]) -> bool + Send + 'static,
) -> anyhow::Result<Vec<Read>> {
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || read_all_blocking(&bootstrap, &topic, complete)).await?
}

fn read_all_blocking(
    bootstrap: &str,
    topic: &str,
    complete: impl Fn(&[Read]) -> bool,
) -> anyhow::Result<Vec<Read>> {
    let consumer = reader(bootstrap, "crash-test-reader")?;
    let deadline = Instant::now() + LONG;
    let partitions = partitions_of(&consumer, topic)?;
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut records = Vec::new();
    let mut last_seen = Instant::now();
    let mut checked = 0;
    loop {
        if Instant::now() > deadline {
            return Ok(records);
        }
        if last_seen.elapsed() >= QUIET {
            // Quiet: done if complete; otherwise keep reading until the deadline.
            if checked != records.len() || records.is_empty() {
                checked = records.len();
                if complete(&records) {
                    return Ok(records);
                }
            }
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        last_seen = Instant::now();
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        records.push(Read {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers,
        });
    }
}

/// A consumer group's committed offsets on a topic's partitions (partition -> next offset to
/// read; partitions without a commit left out), as a plain consumer reads them: what a sink's
/// worker vouched for (`connect-<connector>`).
pub async fn committed_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let (bootstrap, group, topic) = (bootstrap.to_string(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer = reader(&bootstrap, &group)?;
        let mut list = TopicPartitionList::new();
        for partition in partitions_of(&consumer, &topic)? {
            list.add_partition(&topic, partition);
        }
        let committed = consumer.committed_offsets(list, Duration::from_secs(15))?;
        Ok(committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(next) => Some((e.partition(), next)),
                _ => None,
            })
            .collect())
    })
    .await?
}

// ---- MLLP senders: python hl7's `mllp_send` ----

/// An ADT^A01 with the control id `control_id`.
pub fn adt(control_id: &str, patient: usize) -> String {
    format!(
        "MSH|^~\\&|EPIC|GENHOSP|MEDCONNECT|DC|20261129120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\rEVN|A01|20261129120000\rPID|1||P{patient:04}^^^GENHOSP^MR||DOE^JANE||19800101|F\rPV1|1|I|ICU^101^A\r"
    )
}

/// `senders` `mllp_send` processes, each sending its share of `ids` in order on one
/// connection and printing every answer (unbuffered, so answers before a crash are kept).
pub fn start_senders(
    processes: &mut Processes,
    python: &Path,
    port: u16,
    ids: &[String],
    round: usize,
    senders: usize,
) -> anyhow::Result<Vec<String>> {
    let per_sender = ids.len().div_ceil(senders).max(1);
    let mut names = Vec::new();
    for (n, chunk) in ids.chunks(per_sender).enumerate() {
        let name = format!("mllp_send-{round}-{n}");
        let file = processes.path(&format!("{name}.hl7"));
        let messages: Vec<String> = chunk
            .iter()
            .enumerate()
            .map(|(i, id)| adt(id, i % 500))
            .collect();
        std::fs::write(&file, messages.join("\n"))?;
        let file = file.to_str().context("temp path is not UTF-8")?;
        let port = port.to_string();
        processes.spawn(
            &name,
            &python.join("mllp_send"),
            &["--loose", "--file", file, "--port", &port, "127.0.0.1"],
            &[("PYTHONUNBUFFERED", "1")],
        )?;
        names.push(name);
    }
    Ok(names)
}

pub async fn wait_for_senders(processes: &mut Processes, senders: &[String]) -> anyhow::Result<()> {
    let done = tokio::time::timeout(LONG, async {
        while !senders.iter().all(|s| processes.exited(s)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if done.is_err() {
        bail!("mllp_send still running after {LONG:?}");
    }
    Ok(())
}

#[derive(Default)]
pub struct Answers {
    pub acked: HashSet<String>,
    /// AE and AR answers.
    pub negative: usize,
}

/// The answers the senders printed: `MSA|<code>|<control id>` of every ACK they read.
pub fn read_answers(processes: &Processes, senders: &[String]) -> Answers {
    let mut answers = Answers::default();
    for sender in senders {
        let out = processes.stdout(sender);
        for (at, _) in out.match_indices("MSA|") {
            let mut fields = out[at + 4..].split(['|', '\r', '\n', '\x1c']);
            match (fields.next(), fields.next()) {
                (Some("AA"), Some(id)) => {
                    answers.acked.insert(id.to_string());
                }
                (Some(_), Some(_)) => answers.negative += 1,
                _ => {}
            }
        }
    }
    answers
}
