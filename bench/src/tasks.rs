//! What slow tasks cost a worker as their number grows.
//!
//!   cargo build -p medconnect --bin medconnect && cargo run -p medconnect-bench --bin tasks -- [--fetch-wait-ms N] [counts...]
//!
//! `medconnect broker` and `medconnect worker` as separate processes. First the worker with no
//! connectors (the baseline), then, for each count N (default 100), N DatagenSource connectors
//! of one task at 1 record/s each: every `POST /connectors` is timed, and once all N tasks are
//! RUNNING and settled the worker's CPU (over 30 s, from /proc), threads and RSS are read.
//! Counts accumulate: `100 1000` measures 100, then adds 900 more. A create waits for the
//! worker to read its config back from the config topic, which the embedded broker answers
//! only after half of the consumer's `fetch.wait.max.ms` (500 ms by default; Kafka answers as
//! soon as records are there): `--fetch-wait-ms 25` sets it as `medconnect dev` does.

mod process;
mod stats;
use process::{
    BrokerProcess, ChildProcess, cpu_time, create_connector, free_port, medconnect_binary,
};
use stats::median;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::{Value, json};

const SAMPLE: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(10);
const DEADLINE: Duration = Duration::from_secs(600);

/// A `/proc/<pid>/status` line's number (`Threads`, `VmRSS` in kB).
fn status_field(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .context("no such field")?
        .parse()
        .map_err(Into::into)
}

/// CPU of `pid` over `SAMPLE`, in % of one core, with its threads and RSS (MB) at the end.
async fn sample(pid: u32) -> anyhow::Result<(f64, u64, f64)> {
    let before = cpu_time(pid)?;
    tokio::time::sleep(SAMPLE).await;
    let used = cpu_time(pid)? - before;
    Ok((
        100.0 * used.as_secs_f64() / SAMPLE.as_secs_f64(),
        status_field(pid, "Threads")?,
        status_field(pid, "VmRSS")? as f64 / 1024.0,
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut counts: Vec<usize> = Vec::new();
    let mut consumer = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--fetch-wait-ms" {
            let wait: u64 = args
                .next()
                .context("--fetch-wait-ms needs a value")?
                .parse()?;
            consumer = format!("[consumer]\n\"fetch.wait.max.ms\" = {wait}\n");
        } else {
            counts.push(arg.parse()?);
        }
    }
    if counts.is_empty() {
        counts.push(100);
    }
    let binary = medconnect_binary()?;
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::start()?;
    let kafka = broker.bootstrap_servers();
    let rest_port = free_port()?;
    let base = format!("http://127.0.0.1:{rest_port}");
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            r#"bootstrap_servers = "{kafka}"
[rest]
listen = "127.0.0.1:{rest_port}"
auth = "none"
[cluster]
enabled = false
[tasks]
tasks_max_limit = 10000
{consumer}"#
        ),
    )?;
    let log = |name: &str| -> anyhow::Result<Stdio> {
        Ok(std::fs::File::create(dir.path().join(name))?.into())
    };
    let worker_process = ChildProcess(
        Command::new(&binary)
            .arg("worker")
            .arg(&config)
            .stdout(log("worker.log")?)
            .stderr(log("worker.err")?)
            .spawn()?,
    );
    let worker = worker_process.0.id();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let started = Instant::now();
    while client.get(format!("{base}/")).send().await.is_err() {
        ensure!(started.elapsed() < DEADLINE, "the worker did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "== slow tasks on one worker: DatagenSource connectors of 1 task at 1 record/s each; worker and broker as separate processes; worker CPU over {} s",
        SAMPLE.as_secs()
    );
    tokio::time::sleep(SETTLE).await;
    let (idle_cpu, idle_threads, idle_rss) = sample(worker).await?;
    println!(
        "baseline, 0 tasks: CPU {idle_cpu:.2} % of a core, {idle_threads} threads, RSS {idle_rss:.1} MB"
    );
    let mut created = 0;
    for count in counts {
        let mut latencies = Vec::new();
        while created < count {
            let body = json!({
                "name": format!("slow-{created}"),
                "config": {
                    "connector.class": "DatagenSource",
                    "tasks.max": "1",
                    "topic": "slow",
                    "rate": "1",
                }
            });
            let took = create_connector(&client, &base, &body)
                .await
                .with_context(|| format!("create {created}"))?;
            latencies.push(took.as_secs_f64() * 1000.0);
            created += 1;
        }
        let waited = Instant::now();
        loop {
            let all: Value = client
                .get(format!("{base}/connectors?expand=status"))
                .send()
                .await?
                .json()
                .await?;
            let running = all
                .as_object()
                .map(|m| {
                    m.values()
                        .filter(|c| c["status"]["tasks"][0]["state"] == "RUNNING")
                        .count()
                })
                .unwrap_or(0);
            if running == count {
                break;
            }
            ensure!(
                waited.elapsed() < DEADLINE,
                "{running} of {count} tasks RUNNING"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(SETTLE).await;
        let (cpu, threads, rss) = sample(worker).await?;
        let max = latencies.iter().copied().fold(0.0, f64::max);
        println!(
            "{count} tasks: CPU {cpu:.2} % of a core ({:.3} % per task over the baseline), {threads} threads (+{}), RSS {rss:.1} MB (+{:.1}); POST /connectors median {:.1} ms, max {max:.1} ms",
            (cpu - idle_cpu) / count as f64,
            threads.saturating_sub(idle_threads),
            rss - idle_rss,
            median(latencies),
        );
    }
    Ok(())
}
