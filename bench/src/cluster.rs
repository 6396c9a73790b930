//! Worker cluster: how long work takes to move between `medconnect worker` processes.
//!
//!   cargo build -p medconnect --bin medconnect && cargo run -p medconnect-bench --bin cluster -- [runs] [--broker mock|nisshi]
//!
//! Each run starts `medconnect mock-broker` (librdkafka's mock cluster: its group coordinator
//! expires members that stop heartbeating, the embedded broker's does not) and three workers
//! w1..w3 as separate processes, creates 6 datagen connectors of 2 tasks and waits until the 12
//! tasks run 4/4/4. Then, each timed from the signal or the start to the moment the status API
//! shows every task RUNNING where it should be:
//!   (a) SIGKILL of w3: its 4 tasks RUNNING on w1 and w2 (6/6);
//!   (b) a fresh worker w4 started: 4/4/4 over w1, w2, w4 (w1 and w2 first give 2 tasks each
//!       up, then w4 gets them in the next generation: cooperative rebalancing);
//!   (c) SIGTERM of w1 (graceful: it stops its tasks and leaves the group): its 4 tasks RUNNING
//!       on w2 and w4 (6/6).
//!
//! With the default session timeout (6 s, heartbeat 1 s), then (a) alone with 3 s / 500 ms.
//!
//! `--broker nisshi` runs the same against the stand-alone nisshi 0.8.1 broker (`scripts/nisshi`
//! builds it once and prints its path, read from `MEDCONNECT_NISSHI_BIN` or the cache): its group
//! coordinator ends a rebalance as soon as the live members rejoined, as Kafka's does, where the
//! mock waits `session timeout - 1 s` in every rebalance.

mod process;
use process::{free_port, medconnect_binary};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use medconnect_runtime::kafka::{KafkaSettings, TopicSpec, ensure_topics};
use serde_json::{Value, json};

const INTERNAL_TOPICS: [&str; 4] = [
    "cluster-configs:1",
    "cluster-offsets:5",
    "cluster-status:3",
    "cluster-audit:1",
];
const CONNECTORS: usize = 6;
const TASKS_EACH: usize = 2;
/// How long any one step may take before the run fails (a step takes seconds here).
const DEADLINE: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(50);

/// The broker program a run starts.
#[derive(Clone, Copy, PartialEq)]
enum Broker {
    /// `medconnect mock-broker`: librdkafka's mock cluster.
    Mock,
    /// The stand-alone nisshi 0.8.1 broker (`scripts/nisshi`).
    Nisshi,
}

impl Broker {
    fn describe(self) -> &'static str {
        match self {
            Self::Mock => "librdkafka's mock broker",
            Self::Nisshi => "the nisshi 0.8.1 broker",
        }
    }
}

/// The nisshi binary: `MEDCONNECT_NISSHI_BIN`, else where `scripts/nisshi` puts it.
fn nisshi_binary() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("MEDCONNECT_NISSHI_BIN") {
        Some(path) => PathBuf::from(path),
        None => std::env::var_os("MEDCONNECT_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/medconnect")))
            .context("neither MEDCONNECT_CACHE nor HOME is set")?
            .join("nisshi-0.8.1/bin/nisshi-broker"),
    };
    ensure!(
        path.exists(),
        "{} not found: run scripts/nisshi first",
        path.display()
    );
    Ok(path)
}

/// The session settings a cluster runs with, and its broker.
#[derive(Clone, Copy)]
struct Session {
    timeout_ms: u64,
    heartbeat_ms: u64,
    broker: Broker,
}

/// The processes of one run, each logging to a file; all killed when dropped.
struct Processes {
    binary: PathBuf,
    dir: tempfile::TempDir,
    children: BTreeMap<String, Child>,
}

impl Processes {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            binary: medconnect_binary()?,
            dir: tempfile::tempdir()?,
            children: BTreeMap::new(),
        })
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn spawn(&mut self, name: &str, args: &[&str]) -> anyhow::Result<()> {
        let binary = self.binary.clone();
        self.spawn_program(name, &binary, args)
    }

    fn spawn_program(&mut self, name: &str, program: &Path, args: &[&str]) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.path(&format!("{name}.log")))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.insert(name.to_string(), child);
        Ok(())
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    fn exited(&mut self, name: &str) -> bool {
        self.children
            .get_mut(name)
            .is_some_and(|c| !matches!(c.try_wait(), Ok(None)))
    }

    fn sigkill(&mut self, name: &str) -> anyhow::Result<()> {
        let child = self.children.get_mut(name).context("no such process")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    fn sigterm(&mut self, name: &str) -> anyhow::Result<()> {
        let child = self.children.get(name).context("no such process")?;
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill -TERM {name} failed");
        Ok(())
    }

    /// The last lines of every log, for a run that failed.
    fn tails(&self) -> String {
        self.children
            .keys()
            .map(|name| {
                let log = self.log(name);
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(12)..].join("\n");
                format!("== {name}.log\n{tail}\n")
            })
            .collect()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in self.children.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Cluster {
    processes: Processes,
    bootstrap: String,
    session: Session,
    client: reqwest::Client,
    /// REST base URL by worker id.
    workers: BTreeMap<String, String>,
}

impl Cluster {
    async fn start(session: Session) -> anyhow::Result<Self> {
        let mut processes = Processes::new()?;
        let bootstrap = match session.broker {
            Broker::Mock => start_mock_broker(&mut processes).await?,
            Broker::Nisshi => start_nisshi_broker(&mut processes).await?,
        };
        Ok(Self {
            processes,
            bootstrap,
            session,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            workers: BTreeMap::new(),
        })
    }
}

/// `medconnect mock-broker` with the topics of a run; its bootstrap.
async fn start_mock_broker(processes: &mut Processes) -> anyhow::Result<String> {
    let mut args = vec!["mock-broker"];
    for topic in INTERNAL_TOPICS.iter().chain(&["vitals:3"]) {
        args.extend(["--topic", topic]);
    }
    processes.spawn("broker", &args)?;
    let started = Instant::now();
    let bootstrap = loop {
        if let Some(b) = processes
            .log("broker")
            .lines()
            .find_map(|l| l.strip_prefix("medconnect mock-broker: Kafka "))
        {
            break b.trim().to_string();
        }
        ensure!(!processes.exited("broker"), "the mock broker exited");
        ensure!(
            started.elapsed() < DEADLINE,
            "the mock broker did not start"
        );
        tokio::time::sleep(POLL).await;
    };
    Ok(bootstrap)
}

/// The nisshi broker on a free port with the topics of a run (the internal ones compacted);
/// its bootstrap.
async fn start_nisshi_broker(processes: &mut Processes) -> anyhow::Result<String> {
    let bootstrap = format!("127.0.0.1:{}", free_port()?);
    processes.spawn_program("broker", &nisshi_binary()?, &["--listen", &bootstrap])?;
    let started = Instant::now();
    while tokio::net::TcpStream::connect(&bootstrap).await.is_err() {
        ensure!(!processes.exited("broker"), "the nisshi broker exited");
        ensure!(
            started.elapsed() < DEADLINE,
            "the nisshi broker did not start"
        );
        tokio::time::sleep(POLL).await;
    }
    let mut topics = Vec::new();
    for topic in INTERNAL_TOPICS {
        let (name, partitions) = topic.split_once(':').context("name:partitions")?;
        topics.push(TopicSpec::compacted(name, partitions.parse()?, 1));
    }
    topics.push(TopicSpec::regular("vitals", 3, 1));
    ensure_topics(&KafkaSettings::new(&bootstrap), &topics).await?;
    Ok(bootstrap)
}

impl Cluster {
    /// Starts worker `id` (a separate process); does not wait for it.
    fn add(&mut self, id: &str) -> anyhow::Result<()> {
        let port = free_port()?;
        let config = self.processes.path(&format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"group_id = "bench-cluster"
bootstrap_servers = "{bootstrap}"
worker_id = "{id}"

[rest]
listen = "127.0.0.1:{port}"
# Open REST API: a benchmark of failover on this machine.
auth = "none"

[internal_topics]
config = "cluster-configs"
offsets = "cluster-offsets"
status = "cluster-status"
audit = "cluster-audit"

[cluster]
session_timeout_ms = {timeout}
heartbeat_interval_ms = {heartbeat}
# librdkafka's mock cluster ends a sync once the leader's assignments arrive (see ClusterConfig).
leader_sync_delay_ms = 200

[tasks]
offset_flush_interval_ms = 1000

[consumer]
"fetch.wait.max.ms" = 100
"#,
                bootstrap = self.bootstrap,
                timeout = self.session.timeout_ms,
                heartbeat = self.session.heartbeat_ms,
            ),
        )?;
        let config = config
            .to_str()
            .context("temp path is not UTF-8")?
            .to_string();
        self.processes.spawn(id, &["worker", &config])?;
        self.workers
            .insert(id.to_string(), format!("http://127.0.0.1:{port}"));
        Ok(())
    }

    async fn get(&self, worker: &str, path: &str) -> Option<(u16, Value)> {
        let base = self.workers.get(worker)?;
        let response = self.client.get(format!("{base}{path}")).send().await.ok()?;
        let code = response.status().as_u16();
        Some((code, response.json().await.ok()?))
    }

    /// `/health/ready` of `worker` when it answers 200.
    async fn ready(&self, worker: &str) -> Option<Value> {
        match self.get(worker, "/health/ready").await {
            Some((200, body)) => Some(body),
            _ => None,
        }
    }

    /// Polls `check` every 50 ms until it returns `Some`; fails after [`DEADLINE`] or when a
    /// process of the run exited that should not have.
    async fn until<T>(
        &mut self,
        what: &str,
        gone: &[&str],
        mut check: impl AsyncFnMut(&Self) -> Option<T>,
    ) -> anyhow::Result<(T, Instant)> {
        let started = Instant::now();
        loop {
            if let Some(found) = check(self).await {
                return Ok((found, Instant::now()));
            }
            let names: Vec<String> = self.processes.children.keys().cloned().collect();
            for name in names {
                if !gone.contains(&name.as_str()) && self.processes.exited(&name) {
                    bail!("{name} exited while waiting for {what}");
                }
            }
            if started.elapsed() > DEADLINE {
                bail!("timed out after {DEADLINE:?} waiting for {what}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// RUNNING tasks by worker id, as `via` reports them, once all `connectors` exist and every
    /// task of each is RUNNING; `None` before.
    async fn running(&self, via: &str, connectors: usize) -> Option<BTreeMap<String, usize>> {
        let (code, all) = self.get(via, "/connectors?expand=status").await?;
        let all = all.as_object()?;
        if code != 200 || all.len() != connectors {
            return None;
        }
        let mut by_worker = BTreeMap::new();
        for entry in all.values() {
            let tasks = entry["status"]["tasks"].as_array()?;
            if tasks.len() != TASKS_EACH {
                return None;
            }
            for task in tasks {
                if task["state"] != "RUNNING" {
                    return None;
                }
                *by_worker
                    .entry(task["worker_id"].as_str()?.to_string())
                    .or_insert(0) += 1;
            }
        }
        Some(by_worker)
    }

    /// Every one of `live` ready in the same generation.
    async fn settled(&self, live: &[&str]) -> bool {
        let mut generations = Vec::new();
        for worker in live {
            match self.ready(worker).await {
                Some(body) => generations.push(body["generation"].clone()),
                None => return false,
            }
        }
        generations.windows(2).all(|w| w[0] == w[1])
    }

    /// Waits until every task runs spread exactly `expected` (worker id, tasks); returns when.
    async fn wait_for_spread(
        &mut self,
        via: &str,
        expected: &[(&str, usize)],
        gone: &[&str],
    ) -> anyhow::Result<Instant> {
        let expected: BTreeMap<String, usize> =
            expected.iter().map(|(w, n)| (w.to_string(), *n)).collect();
        let what = format!("the tasks spread {expected:?}");
        let (_, at) = self
            .until(&what, gone, async |c| {
                (c.running(via, CONNECTORS).await.as_ref() == Some(&expected)).then_some(())
            })
            .await?;
        Ok(at)
    }

    async fn create_datagen(&self, via: &str, name: &str) -> anyhow::Result<()> {
        let base = self.workers.get(via).context("no such worker")?;
        let response = self
            .client
            .post(format!("{base}/connectors"))
            .json(&json!({"name": name, "config": {
                "connector.class": "DatagenSource",
                "topic": "vitals",
                "schema": "vitals",
                "rate": "5",
                "tasks.max": TASKS_EACH.to_string(),
            }}))
            .send()
            .await?;
        let code = response.status().as_u16();
        ensure!(
            code == 201,
            "creating {name} via {via}: {code} {}",
            response.text().await?
        );
        Ok(())
    }
}

/// The three workers and the 12 tasks running 4/4/4.
async fn four_four_four(session: Session) -> anyhow::Result<Cluster> {
    let mut cluster = Cluster::start(session).await?;
    let outcome = async {
        for id in ["w1", "w2", "w3"] {
            cluster.add(id)?;
        }
        cluster
            .until("3 workers ready in one generation", &[], async |c| {
                let mut all = true;
                for id in ["w1", "w2", "w3"] {
                    all &= c.ready(id).await.is_some_and(|b| b["members"] == json!(3));
                }
                all.then_some(())
            })
            .await?;
        for i in 0..CONNECTORS {
            let via = ["w1", "w2", "w3"][i % 3];
            cluster.create_datagen(via, &format!("vitals-{i}")).await?;
            // One at a time, each running before the next: a connector whose task configs
            // land while the leader applies an assignment gets its tasks only at the next
            // rebalance (see the README's cluster section).
            let created = i + 1;
            cluster
                .until(
                    &format!("{created} connectors' tasks RUNNING"),
                    &[],
                    async |c| {
                        let seen = c.running("w1", created).await?;
                        (seen.values().sum::<usize>() == created * TASKS_EACH
                            && c.settled(&["w1", "w2", "w3"]).await)
                            .then_some(())
                    },
                )
                .await?;
        }
        cluster
            .wait_for_spread("w1", &[("w1", 4), ("w2", 4), ("w3", 4)], &[])
            .await?;
        anyhow::Ok(())
    }
    .await;
    match outcome {
        Ok(()) => Ok(cluster),
        Err(error) => Err(error.context(cluster.processes.tails())),
    }
}

struct Run {
    kill: Duration,
    killed_leader: bool,
    join_ready: Option<Duration>,
    join_balanced: Option<Duration>,
    term: Option<Duration>,
}

async fn run(session: Session, all_steps: bool) -> anyhow::Result<Run> {
    let mut cluster = four_four_four(session).await?;
    let outcome = async {
        // (a) SIGKILL of w3.
        let killed_leader = cluster
            .ready("w3")
            .await
            .is_some_and(|b| b["leader"] == json!(true));
        let killed = Instant::now();
        cluster.processes.sigkill("w3")?;
        let moved = cluster
            .wait_for_spread("w1", &[("w1", 6), ("w2", 6)], &["w3"])
            .await?;
        let mut run = Run {
            kill: moved - killed,
            killed_leader,
            join_ready: None,
            join_balanced: None,
            term: None,
        };
        if !all_steps {
            return Ok(run);
        }
        // (b) A fresh worker w4.
        let started = Instant::now();
        cluster.add("w4")?;
        let (_, ready) = cluster
            .until("w4 ready", &["w3"], async |c| c.ready("w4").await)
            .await?;
        let balanced = cluster
            .wait_for_spread("w1", &[("w1", 4), ("w2", 4), ("w4", 4)], &["w3"])
            .await?;
        run.join_ready = Some(ready - started);
        run.join_balanced = Some(balanced - started);
        // (c) SIGTERM of w1.
        let stopped = Instant::now();
        cluster.processes.sigterm("w1")?;
        let moved = cluster
            .wait_for_spread("w2", &[("w2", 6), ("w4", 6)], &["w3", "w1"])
            .await?;
        run.term = Some(moved - stopped);
        Ok(run)
    }
    .await;
    outcome.map_err(|error: anyhow::Error| error.context(cluster.processes.tails()))
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// "median X s, max Y s (each run: ...)".
fn summary(mut figures: Vec<Duration>) -> String {
    let each = figures
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ");
    figures.sort();
    format!(
        "median {}, max {} (runs: {each})",
        secs(figures[figures.len() / 2]),
        secs(figures[figures.len() - 1])
    )
}

async fn series(session: Session, runs: usize, all_steps: bool) -> anyhow::Result<Vec<Run>> {
    let mut results = Vec::new();
    for i in 1..=runs {
        let r = run(session, all_steps).await?;
        let mut line = format!("  run {i}/{runs}: (a) {}", secs(r.kill));
        if let (Some(b), Some(c)) = (r.join_balanced, r.term) {
            line.push_str(&format!(" (b) {} (c) {}", secs(b), secs(c)));
        }
        eprintln!("{line}");
        results.push(r);
    }
    Ok(results)
}

fn print_session(session: Session) {
    println!(
        "-- session timeout {} ms, heartbeat {} ms",
        session.timeout_ms, session.heartbeat_ms
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut runs = 5;
    let mut broker = Broker::Mock;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--broker" => {
                broker = match args.next().as_deref() {
                    Some("mock") => Broker::Mock,
                    Some("nisshi") => Broker::Nisshi,
                    other => bail!("--broker {other:?}: expected mock or nisshi"),
                }
            }
            runs_arg => runs = runs_arg.parse()?,
        }
    }
    ensure!(runs > 0, "runs must be at least 1");
    medconnect_binary()?;
    if broker == Broker::Nisshi {
        nisshi_binary()?;
    }
    println!(
        "== worker cluster on {}: 3 `medconnect worker` processes, {CONNECTORS} datagen connectors x {TASKS_EACH} tasks running 4/4/4, {runs} runs; times until the status API shows every task RUNNING where expected",
        broker.describe()
    );
    let default = Session {
        timeout_ms: 6000,
        heartbeat_ms: 1000,
        broker,
    };
    let results = series(default, runs, true).await?;
    print_session(default);
    let led = results.iter().filter(|r| r.killed_leader).count();
    println!(
        "  (a) SIGKILL of 1 of 3 workers (the leader in {led} of {runs} runs) -> its 4 tasks RUNNING on the 2 others (6/6): {}",
        summary(results.iter().map(|r| r.kill).collect())
    );
    println!(
        "  (b) a 4th worker started -> ready (joined): {}",
        summary(results.iter().filter_map(|r| r.join_ready).collect())
    );
    println!(
        "      -> 4/4/4 over it and the 2 left (2 generations: revoke, then assign): {}",
        summary(results.iter().filter_map(|r| r.join_balanced).collect())
    );
    println!(
        "  (c) SIGTERM of 1 of 3 (stops its tasks, leaves the group) -> its 4 tasks RUNNING on the 2 others: {}",
        summary(results.iter().filter_map(|r| r.term).collect())
    );
    let short = Session {
        timeout_ms: 3000,
        heartbeat_ms: 500,
        broker,
    };
    let results = series(short, runs, false).await?;
    print_session(short);
    println!(
        "  (a) SIGKILL of 1 of 3 workers -> its 4 tasks RUNNING on the 2 others: {}",
        summary(results.iter().map(|r| r.kill).collect())
    );
    if broker == Broker::Mock {
        println!(
            "The mock broker checks sessions every 1 s and then waits session timeout - 1 s in every rebalance for the members to rejoin (Kafka waits only until all have rejoined): a SIGKILL costs ~2 x the session timeout here, about session timeout + one heartbeat on Kafka (--broker nisshi shows it)."
        );
    }
    Ok(())
}
