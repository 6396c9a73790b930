//! The worker cluster: separate `medconnect worker` processes sharing a group, against a broker
//! whose group coordinator expires dead members.
//!
//! The broker is librdkafka's mock cluster (`medconnect mock-broker`) unless
//! `MEDCONNECT_CLUSTER_BROKER=nisshi` (see `cluster_broker`): the embedded broker (tansu 0.6)
//! never rebalances a group after a member died (see `crash::SESSION_TIMEOUT_MS`). The mock
//! waits `session timeout - 1 s` for members to rejoin in every rebalance (Kafka waits only
//! until every member rejoined), so each rebalance here takes ~5 s with the default 6 s session
//! timeout; the figures in the `cluster:` lines include that.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use medconnect_e2e::cluster_broker::ClusterBroker;
use medconnect_e2e::crash::{
    Processes, free_port, read_all, report_line, start_worker, start_worker_with_env,
};
use medconnect_e2e::pki::Pki;
use medconnect_e2e::{Rest, eventually, medconnect_bin};
use serde_json::{Value, json};

const INTERNAL_TOPICS: [&str; 4] = [
    "cluster-configs:1",
    "cluster-offsets:5",
    "cluster-status:3",
    "cluster-audit:1",
];
/// How long a failover or a rebalance may take here before the test gives up (the bench
/// measures the figures; this only bounds a test that would otherwise wait for ever).
const MOVE_DEADLINE: Duration = Duration::from_secs(45);
/// The environment variable holding a worker's own address (see `Cluster::addresses`).
const WORKER_ADDRESS: &str = "CLUSTER_TEST_ADDRESS";

fn write_config(
    processes: &Processes,
    bootstrap: &str,
    worker: &str,
    cluster_settings: &str,
) -> anyhow::Result<PathBuf> {
    let path = processes.path(&format!("{worker}.toml"));
    let port = free_port()?;
    std::fs::write(
        &path,
        format!(
            r#"group_id = "cluster-test"
bootstrap_servers = "{bootstrap}"
worker_id = "{worker}"

[rest]
listen = "127.0.0.1:{port}"
# Open REST API: tests/rest_security.rs tests authentication, also in a cluster.
auth = "none"

[internal_topics]
config = "cluster-configs"
offsets = "cluster-offsets"
status = "cluster-status"
audit = "cluster-audit"

[cluster]
# The mock cluster ends a sync once the leader's assignments arrive (see ClusterConfig).
leader_sync_delay_ms = 200
{cluster_settings}

[tasks]
offset_flush_interval_ms = 500

[consumer]
"fetch.wait.max.ms" = 100
"#
        ),
    )?;
    Ok(path)
}

struct Cluster {
    processes: Processes,
    bootstrap: String,
    workers: BTreeMap<String, Rest>,
    /// Each worker's own loopback address (127.0.0.1, .2, ...), in its environment as
    /// [`WORKER_ADDRESS`]: a listener bound to `${env:CLUSTER_TEST_ADDRESS}` is reachable on
    /// one worker, where one on a shared port (SO_REUSEPORT) lets the kernel pick.
    addresses: BTreeMap<String, String>,
    /// Extra settings of every worker, at the end of its `[cluster]` table (later tables may
    /// follow).
    cluster_settings: String,
}

impl Cluster {
    async fn start(workers: &[&str], topics: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(workers, topics, "").await
    }

    async fn start_with(
        workers: &[&str],
        topics: &[&str],
        cluster_settings: &str,
    ) -> anyhow::Result<Self> {
        let mut processes = Processes::new()?;
        let bootstrap = ClusterBroker::from_env()?
            .start(&mut processes, &INTERNAL_TOPICS, topics)
            .await?;
        Self::on(processes, bootstrap, workers, cluster_settings).await
    }

    /// Workers against a broker already started by `processes`.
    async fn on(
        processes: Processes,
        bootstrap: String,
        workers: &[&str],
        cluster_settings: &str,
    ) -> anyhow::Result<Self> {
        let mut cluster = Self {
            processes,
            bootstrap,
            workers: BTreeMap::new(),
            addresses: BTreeMap::new(),
            cluster_settings: cluster_settings.to_string(),
        };
        for worker in workers {
            cluster.add(worker).await?;
        }
        cluster.wait_for_members(workers.len()).await?;
        Ok(cluster)
    }

    async fn add(&mut self, worker: &str) -> anyhow::Result<()> {
        let config = write_config(
            &self.processes,
            &self.bootstrap,
            worker,
            &self.cluster_settings,
        )?;
        let address = format!("127.0.0.{}", self.addresses.len() + 1);
        let rest = start_worker_with_env(
            &mut self.processes,
            worker,
            &config,
            &[(WORKER_ADDRESS, &address)],
        )
        .await?;
        self.workers.insert(worker.to_string(), rest);
        self.addresses.insert(worker.to_string(), address);
        Ok(())
    }

    fn rest(&self, worker: &str) -> anyhow::Result<&Rest> {
        self.workers
            .get(worker)
            .with_context(|| format!("no worker {worker}"))
    }

    /// Every worker ready, in a generation of `count` members.
    async fn wait_for_members(&self, count: usize) -> anyhow::Result<()> {
        for (name, rest) in &self.workers {
            eventually(
                &format!("{name} ready in a cluster of {count}"),
                async || match rest.get("/health/ready").await {
                    Ok((200, body)) if body["members"] == json!(count) => Some(()),
                    _ => None,
                },
            )
            .await?;
        }
        Ok(())
    }

    async fn create_datagen(&self, via: &str, name: &str, tasks: u32) -> anyhow::Result<()> {
        let (code, body) = self
            .rest(via)?
            .post(
                "/connectors",
                &json!({"name": name, "config": {
                    "connector.class": "DatagenSource",
                    "topic": "vitals",
                    "schema": "vitals",
                    "rate": "5",
                    "tasks.max": tasks.to_string(),
                }}),
            )
            .await?;
        ensure!(code == 201, "creating {name} via {via}: {code} {body}");
        Ok(())
    }

    /// RUNNING tasks by worker id, as `via` reports them; `None` while a task is not RUNNING.
    async fn running_tasks(
        &self,
        via: &str,
        connectors: &[&str],
        tasks_each: usize,
    ) -> Option<BTreeMap<String, usize>> {
        let rest = self.rest(via).ok()?;
        let mut by_worker = BTreeMap::new();
        for connector in connectors {
            let (code, status) = rest
                .get(&format!("/connectors/{connector}/status"))
                .await
                .ok()?;
            let tasks = status["tasks"].as_array()?;
            if code != 200 || tasks.len() != tasks_each {
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

    /// Waits until every task runs, on the workers named only, spread `expected`; returns when.
    async fn wait_for_spread(
        &self,
        via: &str,
        connectors: &[&str],
        tasks_each: usize,
        expected: &[(&str, usize)],
    ) -> anyhow::Result<Instant> {
        let expected: BTreeMap<String, usize> =
            expected.iter().map(|(w, n)| (w.to_string(), *n)).collect();
        let deadline = Instant::now() + MOVE_DEADLINE;
        let mut last = None;
        while Instant::now() < deadline {
            let seen = self.running_tasks(via, connectors, tasks_each).await;
            if seen.as_ref() == Some(&expected) {
                return Ok(Instant::now());
            }
            last = seen;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("tasks never spread {expected:?} within {MOVE_DEADLINE:?}; last seen {last:?}")
    }

    async fn status(&self, via: &str, connector: &str) -> anyhow::Result<Value> {
        let (code, body) = self
            .rest(via)?
            .get(&format!("/connectors/{connector}/status"))
            .await?;
        ensure!(
            code == 200,
            "status of {connector} via {via}: {code} {body}"
        );
        Ok(body)
    }
}

const SIX: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

/// Three workers, six connectors of two tasks: 4/4/4, and every worker reports the same.
async fn spread_six(cluster: &Cluster) -> anyhow::Result<()> {
    for (i, name) in SIX.iter().enumerate() {
        // Any worker takes a create.
        let via = ["w1", "w2", "w3"][i % 3];
        cluster.create_datagen(via, name, 2).await?;
    }
    cluster
        .wait_for_spread("w1", &SIX, 2, &[("w1", 4), ("w2", 4), ("w3", 4)])
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_spread_twelve_tasks_four_four_four_and_agree_on_status() -> anyhow::Result<()>
{
    let cluster = Cluster::start(&["w1", "w2", "w3"], &["vitals:3"]).await?;
    let outcome = async {
        spread_six(&cluster).await?;
        for name in SIX {
            let reference = cluster.status("w1", name).await?;
            // Each worker reads the status topic on its own: it agrees once it read as far.
            for worker in ["w2", "w3"] {
                eventually(
                    &format!("{worker} to report {name} as w1 does"),
                    async || {
                        let seen = cluster.status(worker, name).await.ok()?;
                        (seen == reference).then_some(())
                    },
                )
                .await?;
            }
            // A connector is owned by one worker, which records it RUNNING.
            ensure!(reference["connector"]["state"] == "RUNNING", "{reference}");
        }
        assignments_recorded(&cluster).await
    }
    .await;
    cluster.processes.report(outcome)
}

/// Each of the twelve tasks' last status record names the worker the status API shows it on
/// and the cluster generation whose assignment put it there (at most the current one).
async fn assignments_recorded(cluster: &Cluster) -> anyhow::Result<()> {
    let (_, ready) = cluster.rest("w1")?.get("/health/ready").await?;
    let current = ready["generation"]
        .as_i64()
        .context("no generation in /health/ready")?;
    let keys: Vec<String> = SIX
        .iter()
        .flat_map(|name| (0..2).map(move |id| format!("status-task-{name}-{id}")))
        .collect();
    let wanted = keys.clone();
    let records = read_all(&cluster.bootstrap, "cluster-status", move |records| {
        wanted.iter().all(|key| {
            records
                .iter()
                .any(|r| r.key.as_deref() == Some(key.as_bytes()))
        })
    })
    .await?;
    for name in SIX {
        let status = cluster.status("w1", name).await?;
        for task in status["tasks"].as_array().context("no tasks")? {
            let key = format!("status-task-{name}-{}", task["id"]);
            let last: Value = records
                .iter()
                .rev()
                .find(|r| r.key.as_deref() == Some(key.as_bytes()))
                .and_then(|r| serde_json::from_slice(r.value.as_deref()?).ok())
                .with_context(|| format!("no status record {key}"))?;
            ensure!(
                last["worker_id"] == task["worker_id"],
                "{key}: {last} vs {task}"
            );
            let generation = last["assignment_generation"]
                .as_i64()
                .with_context(|| format!("{key} records no assignment generation: {last}"))?;
            ensure!(
                (1..=current).contains(&generation),
                "{key}: generation {generation}, current {current}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_workers_tasks_run_on_the_others() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(&["w1", "w2", "w3"], &["vitals:3"]).await?;
    let outcome = async {
        spread_six(&cluster).await?;
        let killed = Instant::now();
        cluster.processes.kill("w3")?;
        let moved = cluster
            .wait_for_spread("w1", &SIX, 2, &[("w1", 6), ("w2", 6)])
            .await?;
        report_line(format!(
            "cluster: SIGKILL of 1 of 3 workers -> its 4 tasks RUNNING elsewhere after {:.1} s (session timeout 6 s, {})",
            (moved - killed).as_secs_f64(),
            ClusterBroker::from_env()?.name()
        ));
        Ok(())
    }
    .await;
    cluster.processes.report(outcome)
}

/// A process's stdout and stderr.
fn output(processes: &Processes, name: &str) -> String {
    processes.stdout(name) + processes.stderr(name).as_str()
}

/// How many times each task started in a worker's log (datagen logs each start).
fn starts(processes: &Processes, worker: &str) -> BTreeMap<(String, u32), usize> {
    let mut starts = BTreeMap::new();
    let log = output(processes, worker);
    for line in log.lines().filter(|l| l.contains("datagen task started")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
        };
        if let (Some(connector), Some(Ok(task))) =
            (field("connector"), field("task").map(|t| t.parse::<u32>()))
        {
            *starts.entry((connector, task)).or_insert(0) += 1;
        }
    }
    starts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_worker_takes_a_share_and_nothing_that_stays_restarts() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(&["w1", "w2", "w3"], &["vitals:3"]).await?;
    let outcome = async {
        spread_six(&cluster).await?;
        let before: BTreeMap<&str, _> = ["w1", "w2", "w3"]
            .into_iter()
            .map(|w| (w, starts(&cluster.processes, w)))
            .collect();
        let joined = Instant::now();
        cluster.add("w4").await?;
        let balanced = cluster
            .wait_for_spread("w1", &SIX, 2, &[("w1", 3), ("w2", 3), ("w3", 3), ("w4", 3)])
            .await?;
        for (worker, started) in &before {
            let after = starts(&cluster.processes, worker);
            for (task, count) in started {
                ensure!(
                    after.get(task) == Some(count),
                    "{worker} restarted {task:?}: started {count} time(s) before w4 joined, {:?} after",
                    after.get(task)
                );
            }
        }
        report_line(format!(
            "cluster: a 4th worker joined -> 3/3/3/3 after {:.1} s, no task restarted where it stayed ({})",
            (balanced - joined).as_secs_f64(),
            ClusterBroker::from_env()?.name()
        ));
        Ok(())
    }
    .await;
    cluster.processes.report(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gracefully_stopped_worker_hands_its_tasks_over() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(&["w1", "w2", "w3"], &["vitals:3"]).await?;
    let outcome = async {
        spread_six(&cluster).await?;
        let stopped = Instant::now();
        cluster.processes.signal("w3", "TERM")?;
        let moved = cluster
            .wait_for_spread("w1", &SIX, 2, &[("w1", 6), ("w2", 6)])
            .await?;
        let log = output(&cluster.processes, "w3");
        ensure!(log.contains("left the cluster"), "w3 did not leave its group");
        report_line(format!(
            "cluster: SIGTERM of 1 of 3 workers -> its 4 tasks RUNNING elsewhere after {:.1} s (it left the group; {})",
            (moved - stopped).as_secs_f64(),
            ClusterBroker::from_env()?.name()
        ));
        Ok(())
    }
    .await;
    cluster.processes.report(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_past_its_session_stops_its_tasks_when_it_wakes() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(&["w1", "w2", "w3"], &["vitals:3"]).await?;
    let outcome = async {
        spread_six(&cluster).await?;
        cluster.processes.signal("w3", "STOP")?;
        cluster
            .wait_for_spread("w1", &SIX, 2, &[("w1", 6), ("w2", 6)])
            .await?;
        let log_before = output(&cluster.processes, "w3");
        cluster.processes.signal("w3", "CONT")?;
        // The first thing it does awake: stop everything, before rejoining.
        let log = eventually("w3 to report its lost membership", async || {
            let log = output(&cluster.processes, "w3");
            log.contains("lost cluster membership").then_some(log)
        })
        .await?;
        let woke = &log[log_before.len().min(log.len())..];
        let lost = woke.find("lost cluster membership").context("no loss")?;
        ensure!(
            !woke[..lost].contains("joined the cluster")
                && !woke[..lost].contains("datagen task started"),
            "w3 did something before stopping its tasks:\n{}",
            &woke[..lost]
        );
        // It rejoins, and the work spreads over the three again.
        cluster
            .wait_for_spread("w1", &SIX, 2, &[("w1", 4), ("w2", 4), ("w3", 4)])
            .await?;
        Ok(())
    }
    .await;
    cluster.processes.report(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_of_one_name_through_every_worker_at_once_make_one_connector() -> anyhow::Result<()>
{
    let cluster = Cluster::start(&["w1", "w2", "w3"], &["vitals:3"]).await?;
    let outcome = async {
        let config = json!({"name": "once", "config": {
            "connector.class": "DatagenSource", "topic": "vitals", "schema": "vitals",
            "rate": "1", "tasks.max": "1",
        }});
        let mut attempts = tokio::task::JoinSet::new();
        for worker in ["w1", "w2", "w3", "w1", "w2", "w3"] {
            let rest = cluster.rest(worker)?.clone();
            let config = config.clone();
            attempts.spawn(async move { rest.post("/connectors", &config).await });
        }
        let mut codes: Vec<u16> = Vec::new();
        for answer in attempts.join_all().await {
            codes.push(answer?.0);
        }
        codes.sort();
        ensure!(
            codes == [201, 409, 409, 409, 409, 409],
            "six creates of one name through three workers answered {codes:?}"
        );
        // A request claiming to come from another worker, without the session key's signature.
        let forged = json!({"name": "forged", "config": {
            "connector.class": "DatagenSource", "topic": "vitals", "schema": "vitals",
        }});
        for signature in [None, Some("00ff")] {
            let mut request = reqwest::Client::new()
                .post(cluster.rest("w2")?.url("/connectors"))
                .header("x-medconnect-forwarded-by", "w1")
                .json(&forged);
            if let Some(signature) = signature {
                request = request.header("x-medconnect-signature", signature);
            }
            let answer = request.send().await?;
            let status = answer.status().as_u16();
            let body: Value = answer.json().await?;
            ensure!(
                status == 403,
                "a forged forwarded request answered {status} {body}"
            );
            ensure!(body["error_code"] == 403, "{body}");
        }
        let (code, _) = cluster.rest("w1")?.get("/connectors/forged").await?;
        ensure!(
            code == 404,
            "the forged request created a connector ({code})"
        );
        Ok(())
    }
    .await;
    cluster.processes.report(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_to_join_with_kafka_security_it_cannot_honour() -> anyhow::Result<()> {
    let mut processes = Processes::new()?;
    let config = processes.path("secure.toml");
    std::fs::write(
        &config,
        format!(
            "bootstrap_servers = \"127.0.0.1:{}\"\n[rest]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\n[kafka]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"GSSAPI\"\n",
            free_port()?
        ),
    )?;
    let config_path = config.to_str().context("temp path")?.to_string();
    processes.spawn("worker", &medconnect_bin()?, &["worker", &config_path], &[])?;
    let outcome = async {
        eventually("the worker to exit", async || {
            processes.exited("worker").then_some(())
        })
        .await?;
        let log = output(&processes, "worker");
        ensure!(
            log.contains("[kafka] for cluster membership: sasl.mechanism = \"GSSAPI\" is not supported by the cluster connection"),
            "{log}"
        );
        Ok(())
    }
    .await;
    processes.report(outcome)
}

/// Workers whose every Kafka connection is TLS (the broker's certificate checked against a CA
/// of the test's): producers, consumers and admin (librdkafka with OpenSSL) and the group
/// membership (our coordinator client with rustls) form a cluster and run tasks. Needs the
/// nisshi broker (the mock cluster has no TLS listener): skipped, saying so, without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_on_a_tls_kafka_forms_and_runs_tasks() -> anyhow::Result<()> {
    let ClusterBroker::Nisshi(nisshi) = ClusterBroker::from_env()? else {
        report_line("cluster: TLS test skipped: it needs MEDCONNECT_CLUSTER_BROKER=nisshi".into());
        return Ok(());
    };
    let mut processes = Processes::new()?;
    let pki = Pki::write(processes.dir(), "medconnect Kafka test CA")?;
    let bootstrap = ClusterBroker::start_tls(
        &mut processes,
        &nisshi,
        &pki,
        &INTERNAL_TOPICS,
        &["vitals:3"],
    )
    .await?;
    let kafka = format!(
        "\n[kafka]\n\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"{}\"\n",
        pki.path("ca.crt").display()
    );
    let mut cluster = Cluster::on(processes, bootstrap, &["w1", "w2"], &kafka).await?;
    let outcome = async {
        for name in ["a", "b"] {
            cluster.create_datagen("w1", name, 2).await?;
        }
        cluster
            .wait_for_spread("w2", &["a", "b"], 2, &[("w1", 2), ("w2", 2)])
            .await?;
        for worker in ["w1", "w2"] {
            let log = output(&cluster.processes, worker);
            ensure!(!log.contains("cannot take part"), "{worker}: {log}");
        }
        // A worker trusting another CA does not get in: the broker's certificate is checked.
        let dir = cluster.processes.path("stranger");
        std::fs::create_dir_all(&dir)?;
        let stranger = Pki::write(&dir, "another CA")?;
        let kafka = format!(
            "\n[kafka]\n\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"{}\"\n",
            stranger.path("ca.crt").display()
        );
        let config = write_config(&cluster.processes, &cluster.bootstrap, "w3", &kafka)?;
        let config = config.to_str().context("temp path")?.to_string();
        cluster
            .processes
            .spawn("w3", &medconnect_bin()?, &["worker", &config], &[])?;
        // It gives up after its start-up timeout (30 s), within the wait's deadline.
        eventually("w3 to give up", async || {
            cluster.processes.exited("w3").then_some(())
        })
        .await?;
        // It differs from w1 and w2 in its CA only: the handshake is what failed.
        let log = output(&cluster.processes, "w3");
        ensure!(
            log.contains("the worker did not start: Kafka at") && log.contains("did not answer"),
            "{log}"
        );
        Ok(())
    }
    .await;
    cluster.processes.report(outcome)
}

/// (task, seq) of each datagen record in `values`, with how often each occurs.
fn datagen_counts<'a>(values: impl Iterator<Item = &'a [u8]>) -> BTreeMap<(u64, u64), usize> {
    let mut counts = BTreeMap::new();
    for value in values {
        if let Ok(value) = serde_json::from_slice::<Value>(value)
            && let (Some(task), Some(seq)) = (value["task"].as_u64(), value["seq"].as_u64())
        {
            *counts.entry((task, seq)).or_insert(0) += 1;
        }
    }
    counts
}

/// The file sink's lines as datagen records (a line torn by the kill is not counted).
fn file_counts(path: &std::path::Path) -> BTreeMap<(u64, u64), usize> {
    let text = std::fs::read(path).unwrap_or_default();
    datagen_counts(text.split(|b| *b == b'\n'))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_loses_nothing_when_the_worker_running_its_sink_is_sigkilled()
-> anyhow::Result<()> {
    pipeline_across_a_stop(Stop::Kill).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_hands_a_pipeline_over_without_duplicates() -> anyhow::Result<()> {
    pipeline_across_a_stop(Stop::Term).await
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Stop {
    Kill,
    Term,
}

/// Datagen -> topic -> file sink on three workers; the worker running the sink is stopped
/// mid-stream (SIGKILL or SIGTERM), and the two others finish the work.
async fn pipeline_across_a_stop(stop: Stop) -> anyhow::Result<()> {
    const TASKS: u64 = 3;
    const RECORDS: u64 = 6_000;
    let mut cluster = Cluster::start(&["w1", "w2", "w3"], &["vitals:3"]).await?;
    let output = cluster.processes.path("vitals.jsonl");
    let outcome = async {
        let rest = cluster.rest("w1")?.clone();
        let (code, body) = rest
            .post(
                "/connectors",
                &json!({"name": "gen", "config": {
                    "connector.class": "DatagenSource", "topic": "vitals", "schema": "vitals",
                    "tasks.max": TASKS.to_string(), "max.records": RECORDS.to_string(), "rate": "600",
                }}),
            )
            .await?;
        ensure!(code == 201, "{code} {body}");
        let (code, body) = rest
            .post(
                "/connectors",
                &json!({"name": "out", "config": {
                    "connector.class": "FileStreamSink", "topics": "vitals",
                    "file": output.to_str().context("temp path")?,
                }}),
            )
            .await?;
        ensure!(code == 201, "{code} {body}");
        // Mid-stream: a third of the records in the file.
        eventually("a third of the records in the file", async || {
            (file_counts(&output).len() as u64 >= RECORDS / 3).then_some(())
        })
        .await?;
        let sink_worker = cluster.status("w1", "out").await?["tasks"][0]["worker_id"]
            .as_str()
            .context("the sink task runs nowhere")?
            .to_string();
        let in_file_at_kill = file_counts(&output).len();
        match stop {
            Stop::Kill => cluster.processes.kill(&sink_worker)?,
            Stop::Term => cluster.processes.signal(&sink_worker, "TERM")?,
        }
        let survivor = ["w1", "w2", "w3"]
            .into_iter()
            .find(|w| *w != sink_worker)
            .context("no survivor")?;
        // Everything datagen makes reaches the topic and then the file, through the other two.
        let topic = medconnect_e2e::crash::read_all(&cluster.bootstrap, "vitals", |records| {
            datagen_counts(records.iter().filter_map(|r| r.value.as_deref())).len() as u64
                >= RECORDS
        })
        .await?;
        let topic = datagen_counts(topic.iter().filter_map(|r| r.value.as_deref()));
        let deadline = Instant::now() + Duration::from_secs(120);
        while (file_counts(&output).len() as u64) < RECORDS && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let file = file_counts(&output);
        let expected: Vec<(u64, u64)> = (0..TASKS)
            .flat_map(|t| (0..RECORDS / TASKS).map(move |s| (t, s)))
            .collect();
        let topic_missing = expected.iter().filter(|k| !topic.contains_key(k)).count();
        let file_missing = expected.iter().filter(|k| !file.contains_key(k)).count();
        let duplicates = |counts: &BTreeMap<(u64, u64), usize>| -> usize {
            counts.values().map(|n| n - 1).sum()
        };
        let (topic_duplicates, file_duplicates) = (duplicates(&topic), duplicates(&file));
        report_line(format!(
            "cluster crash: datagen ({TASKS} tasks, {RECORDS} records) -> file sink; {stop:?} of {sink_worker} (ran the sink) with {in_file_at_kill} records in the file; topic: {topic_missing} missing, {topic_duplicates} duplicates; file: {file_missing} missing, {file_duplicates} duplicates; {survivor} and one more finished"
        ));
        ensure!(
            topic_missing == 0 && file_missing == 0,
            "records lost: {topic_missing} from the topic, {file_missing} from the file"
        );
        // A graceful stop stores every offset and commits every flushed record first.
        if stop == Stop::Term {
            ensure!(
                topic_duplicates == 0 && file_duplicates == 0,
                "a graceful handover duplicated {topic_duplicates} record(s) in the topic, {file_duplicates} in the file"
            );
        }
        Ok(())
    }
    .await;
    cluster.processes.report(outcome)
}

/// Creates `adt-in`, an MLLP source on a free port shared by every worker, through `via`;
/// returns the port once a task of it is RUNNING on each of w1, w2 and w3.
async fn every_worker_mllp(cluster: &Cluster, via: &str) -> anyhow::Result<u16> {
    let port = free_port()?;
    let (code, body) = cluster
        .rest(via)?
        .post(
            "/connectors",
            &json!({"name": "adt-in", "config": {
                "connector.class": "MllpSource", "mllp.bind": "127.0.0.1",
                "mllp.port": port.to_string(), "mllp.share.port": "true",
            }}),
        )
        .await?;
    ensure!(code == 201, "{code} {body}");
    // One task per worker, each bound to the same port.
    let mut workers = eventually("an MLLP task RUNNING on every worker", async || {
        let status = cluster.status("w1", "adt-in").await.ok()?;
        let workers: Vec<String> = status["tasks"]
            .as_array()?
            .iter()
            .filter(|t| t["state"] == "RUNNING")
            .filter_map(|t| t["worker_id"].as_str().map(str::to_string))
            .collect();
        (workers.len() == 3).then_some(workers)
    })
    .await?;
    workers.sort();
    ensure!(workers == ["w1", "w2", "w3"], "MLLP tasks on {workers:?}");
    Ok(port)
}

/// What a worker's `/metrics` counts as delivered by the connector's tasks there.
async fn records_out(rest: &Rest, connector: &str) -> anyhow::Result<u64> {
    let (code, text) = rest.get_text("/metrics").await?;
    ensure!(code == 200, "/metrics answered {code}");
    let label = format!("connector=\"{connector}\"");
    Ok(text
        .lines()
        .filter(|l| l.starts_with("medconnect_records_out_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_every_worker_mllp_source_listens_and_acknowledges_on_every_worker() -> anyhow::Result<()>
{
    const SENDERS: usize = 24;
    const PER_SENDER: usize = 10;
    let python = medconnect_e2e::crash::python_bin()?;
    let mut cluster = Cluster::start(&["w1", "w2", "w3"], &["hl7.adt:1"]).await?;
    let outcome = async {
        let port = every_worker_mllp(&cluster, "w2").await?;
        let mut senders = Vec::new();
        for n in 0..SENDERS {
            let name = format!("mllp_send-{n}");
            let file = cluster.processes.path(&format!("{name}.hl7"));
            let messages: Vec<String> = (0..PER_SENDER)
                .map(|i| format!(
                    "MSH|^~\\&|EPIC|GENHOSP|MEDCONNECT|DC|20261130120000||ADT^A01^ADT_A01|C{n}-{i}|P|2.5.1\rPID|1||P{i:04}^^^GENHOSP^MR||DOE^JANE\r"
                ))
                .collect();
            std::fs::write(&file, messages.join("\n"))?;
            let file = file.to_str().context("temp path")?.to_string();
            cluster.processes.spawn(
                &name,
                &python.join("mllp_send"),
                &["--loose", "--file", &file, "--port", &port.to_string(), "127.0.0.1"],
                &[("PYTHONUNBUFFERED", "1")],
            )?;
            senders.push(name);
        }
        eventually("every mllp_send to finish", async || {
            senders.iter().all(|s| cluster.processes.exited(s)).then_some(())
        })
        .await?;
        let acked: usize = senders
            .iter()
            .map(|s| cluster.processes.stdout(s).matches("MSA|AA|").count())
            .sum();
        ensure!(acked == SENDERS * PER_SENDER, "{acked} of {} messages got AA", SENDERS * PER_SENDER);
        let mut per_worker = BTreeMap::new();
        for (name, rest) in &cluster.workers {
            per_worker.insert(name.clone(), records_out(rest, "adt-in").await?);
        }
        let total: u64 = per_worker.values().sum();
        report_line(format!(
            "cluster: every-worker MLLP on one port (SO_REUSEPORT), {SENDERS} mllp_send connections: {acked} AA, records per worker {per_worker:?}"
        ));
        ensure!(total == acked as u64, "workers delivered {total} records for {acked} AAs");
        ensure!(per_worker.values().all(|n| *n > 0), "a worker took no connection: {per_worker:?}");
        Ok(())
    }
    .await;
    cluster.processes.report(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_mllp_message_acknowledged_before_a_worker_is_sigkilled_is_lost() -> anyhow::Result<()> {
    use medconnect_e2e::crash::{read_all, read_answers, start_senders, wait_for_senders};
    const MESSAGES: usize = 1_500;
    const SENDERS: usize = 12;
    let python = medconnect_e2e::crash::python_bin()?;
    let mut cluster = Cluster::start(&["w1", "w2", "w3"], &["hl7.adt:1"]).await?;
    let outcome = async {
        let port = every_worker_mllp(&cluster, "w1").await?;
        let ids: Vec<String> = (0..MESSAGES).map(|i| format!("CL{i:05}")).collect();
        let first = start_senders(&mut cluster.processes, &python, port, &ids, 1, SENDERS)?;
        let kill_at = MESSAGES * 3 / 10;
        eventually(&format!("{kill_at} messages acknowledged"), async || {
            (read_answers(&cluster.processes, &first).acked.len() >= kill_at).then_some(())
        })
        .await?;
        cluster.processes.kill("w3")?;
        // Senders on w3's connections fail and exit; the others finish on w1 and w2.
        wait_for_senders(&mut cluster.processes, &first).await?;
        let before_kill = read_answers(&cluster.processes, &first);
        let mut acked = before_kill.acked.clone();
        let mut round = 1;
        while acked.len() < MESSAGES {
            round += 1;
            ensure!(round <= 6, "{} message(s) without AA after 5 rounds", MESSAGES - acked.len());
            let left: Vec<String> = ids.iter().filter(|id| !acked.contains(*id)).cloned().collect();
            let senders = start_senders(&mut cluster.processes, &python, port, &left, round, 4)?;
            wait_for_senders(&mut cluster.processes, &senders).await?;
            acked.extend(read_answers(&cluster.processes, &senders).acked);
        }
        let records = read_all(&cluster.bootstrap, "hl7.adt", |records| {
            let ids: std::collections::HashSet<String> =
                records.iter().filter_map(|r| r.header("hl7.control.id")).collect();
            ids.len() >= MESSAGES
        })
        .await?;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for record in &records {
            *counts
                .entry(record.header("hl7.control.id").context("no control id")?)
                .or_insert(0) += 1;
        }
        let lost = before_kill.acked.iter().filter(|id| !counts.contains_key(*id)).count();
        let missing = ids.iter().filter(|id| !counts.contains_key(*id)).count();
        report_line(format!(
            "cluster crash: every-worker MLLP, {MESSAGES} messages over {SENDERS} mllp_send connections, SIGKILL of 1 of 3 workers after {} AA; resent in {} round(s); topic {} records, {lost} AA'd before the kill missing, {missing} missing, {} duplicates",
            before_kill.acked.len(),
            round - 1,
            records.len(),
            records.len() - counts.len()
        ));
        ensure!(lost == 0 && missing == 0, "{lost} AA'd before the kill and {missing} in all missing");
        Ok(())
    }
    .await;
    cluster.processes.report(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_rebalance_delay_a_restarted_worker_gets_its_own_tasks_back() -> anyhow::Result<()> {
    let mut cluster = Cluster::start_with(
        &["w1", "w2", "w3"],
        &["vitals:3"],
        "scheduled_rebalance_max_delay_ms = 60000",
    )
    .await?;
    let outcome = async {
        spread_six(&cluster).await?;
        let mine_before: Vec<String> = tasks_of(&cluster, "w3").await?;
        let started_before: BTreeMap<&str, _> = ["w1", "w2"]
            .into_iter()
            .map(|w| (w, starts(&cluster.processes, w)))
            .collect();
        cluster.processes.kill("w3")?;
        // The two others form a generation without w3 and hold its work back.
        for worker in ["w1", "w2"] {
            eventually(
                &format!("{worker} in a generation of 2"),
                async || match cluster.rest(worker).ok()?.get("/health/ready").await {
                    Ok((200, body)) if body["members"] == json!(2) => Some(()),
                    _ => None,
                },
            )
            .await?;
        }
        let held = output(&cluster.processes, "w1") + output(&cluster.processes, "w2").as_str();
        ensure!(
            held.contains("holding the work of workers that left"),
            "no worker held w3's work"
        );
        // w3 comes back (same worker id) within the delay: its own tasks go back to it.
        let config = cluster.processes.path("w3.toml");
        let rest = start_worker(&mut cluster.processes, "w3-again", &config).await?;
        cluster.workers.insert("w3".to_string(), rest);
        cluster
            .wait_for_spread("w1", &SIX, 2, &[("w1", 4), ("w2", 4), ("w3", 4)])
            .await?;
        let mine_after = tasks_of(&cluster, "w3").await?;
        ensure!(
            mine_after == mine_before,
            "w3 ran {mine_before:?}, now {mine_after:?}"
        );
        for (worker, before) in started_before {
            ensure!(
                starts(&cluster.processes, worker) == before,
                "{worker} started a task while w3 was away"
            );
        }
        Ok(())
    }
    .await;
    cluster.processes.report(outcome)
}

/// The tasks (connector-task) a worker runs, as w1 reports them, sorted.
async fn tasks_of(cluster: &Cluster, worker: &str) -> anyhow::Result<Vec<String>> {
    let mut tasks = Vec::new();
    for name in SIX {
        let status = cluster.status("w1", name).await?;
        for task in status["tasks"].as_array().context("no tasks")? {
            if task["worker_id"] == worker {
                tasks.push(format!("{name}-{}", task["id"]));
            }
        }
    }
    tasks.sort();
    Ok(tasks)
}

/// The listener runs on every worker and a load balancer spreads the devices over them (here
/// the kernel, with one port shared by SO_REUSEPORT), while the device-commands sink runs one
/// task on one worker: a device connected to another worker's listener still gets its
/// commands, in order and once each (the sink asks every worker's listener through signed
/// worker-to-worker calls), and the sink commits only once every device acknowledged
/// everything. Devices connect one after another until both workers hold one; each worker's
/// log says which devices subscribed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_a_device_connected_to_another_workers_listener() -> anyhow::Result<()> {
    use medconnect_e2e::mqtt_devices::{
        device_users, example_listener, line_starting, paho_python, received_commands,
        spawn_subscriber,
    };
    const COMMANDS: usize = 5;
    const MAX_DEVICES: usize = 16;
    let python = paho_python()?;
    // Every topic the two example configs name (the mock broker creates none on first use).
    let topics = [
        "device.commands:1",
        "device.commands.dlq:1",
        "device.vitals:1",
        "device.dlq:1",
    ];
    let cluster = Cluster::start(&["w1", "w2"], &topics).await?;
    let outcome = async {
        let port = free_port()?;
        let (listener_name, mut config) = example_listener(port, &device_users(MAX_DEVICES))?;
        config["mqtt.share.port"] = "true".into();
        let (code, body) = cluster
            .rest("w1")?
            .post("/connectors", &json!({"name": listener_name, "config": config}))
            .await?;
        ensure!(code == 201, "creating the listener: {code} {body}");
        eventually("the listener RUNNING on both workers", async || {
            let status = cluster.status("w1", &listener_name).await.ok()?;
            let running = status["tasks"]
                .as_array()?
                .iter()
                .filter(|t| t["state"] == "RUNNING")
                .count();
            (running == 2).then_some(())
        })
        .await?;

        let (sink_name, sink_config) = medconnect_e2e::example_connector("mqtt-device-commands.json")?;
        let (code, body) = cluster
            .rest("w1")?
            .post("/connectors", &json!({"name": sink_name, "config": sink_config}))
            .await?;
        ensure!(code == 201, "creating the sink: {code} {body}");
        let sink_worker = eventually("the sink's task RUNNING", async || {
            let status = cluster.status("w1", &sink_name).await.ok()?;
            let task = &status["tasks"][0];
            (task["state"] == "RUNNING").then(|| task["worker_id"].as_str().map(str::to_string))?
        })
        .await?;

        // Devices until one is on each worker.
        let mut devices = Vec::new();
        let mut on_worker: BTreeMap<String, Vec<String>> = BTreeMap::new();
        while on_worker.len() < 2 {
            ensure!(
                devices.len() < MAX_DEVICES,
                "{MAX_DEVICES} devices all landed on one worker: {on_worker:?}"
            );
            let client_id = format!("device-{}", devices.len());
            let (process, mut lines) = spawn_subscriber(
                &python,
                &[
                    "--port", &port.to_string(), "--client-id", &client_id,
                    "--username", &client_id, "--password", "pw",
                    "--topic", &format!("devices/{client_id}/commands"),
                    "--expect", &COMMANDS.to_string(),
                ],
            )?;
            line_starting(&mut lines, "SUBSCRIBED").await?;
            let field = format!("client_id={client_id} ");
            let worker = eventually(&format!("a worker's log to name {client_id}"), async || {
                cluster.workers.keys().find(|worker| {
                    cluster.processes.stderr(worker).lines().any(|line| {
                        line.contains("MQTT device subscribed") && line.contains(&field)
                    })
                }).cloned()
            })
            .await?;
            on_worker.entry(worker).or_default().push(client_id.clone());
            devices.push((client_id, process, lines));
        }

        let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &cluster.bootstrap)
            .create()?;
        for n in 0..COMMANDS {
            for (client_id, _, _) in &devices {
                producer
                    .send(
                        rdkafka::producer::FutureRecord::to("device.commands")
                            .key(client_id)
                            .payload(&format!("{{\"set-rate\":{n}}}")),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| anyhow::anyhow!("produce failed: {e}"))?;
            }
        }

        let started = Instant::now();
        let count = devices.len();
        for (client_id, process, lines) in devices {
            let expected: Vec<String> = (0..COMMANDS)
                .map(|n| format!("1 devices/{client_id}/commands {{\"set-rate\":{n}}}"))
                .collect();
            let received = received_commands(process, lines).await?;
            ensure!(received == expected, "{client_id} got {received:?}, not {expected:?}");
        }
        let delivered_in = started.elapsed();
        let group = format!("connect-{sink_name}");
        let all = (count * COMMANDS) as i64;
        eventually("the sink to commit past every command", async || {
            let committed = medconnect_e2e::crash::committed_offsets(
                &cluster.bootstrap,
                &group,
                "device.commands",
            )
            .await
            .ok()?;
            (committed.get(&0) == Some(&all)).then_some(())
        })
        .await?;
        report_line(format!(
            "cluster: MQTT sink task on {sink_worker}; devices by worker {on_worker:?}; each got {COMMANDS} of {COMMANDS} commands in order, the last {delivered_in:.1?} after they were produced (the sink consumer's group join included); {all} committed"
        ));
        Ok(())
    }
    .await;
    cluster.processes.report(outcome)
}
