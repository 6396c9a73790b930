//! The Elasticsearch sink against a direct `_bulk` client, both writing the same documents to
//! the same osmem-server (an OpenSearch-API emulator; `scripts/elasticsearch-peers` installs
//! it) with the same batch size and concurrency, in the same run.
//!
//!   cargo run -p medconnect-bench --bin elasticsearch -- [documents] [batch.size] [in-flight]
//!
//! The sink task is driven as the engine drives it (`put` in batches of 500, then `flush`),
//! without Kafka: this measures the sink itself. Each contender runs twice into fresh indexes,
//! first and then second; the better run counts. Prints documents/s and the ratio, and checks
//! that every document arrived. The emulator bounds both rates: a ratio near 1 says the sink
//! adds no cost of its own at that rate, not what a real cluster would take.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use medconnect_api::{
    ErrantRecordReporter, Record, SinkPartitions, SinkRecord, SinkTask, SinkTaskContext,
};
use medconnect_elasticsearch::ElasticsearchSinkTask;
use tokio::task::JoinSet;

/// Records handed to one `put`, as the engine's sink batches.
const PUT_BATCH: usize = 500;

struct Osmem {
    child: Child,
    url: String,
}

impl Drop for Osmem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn osmem_binary() -> PathBuf {
    std::env::var_os("MEDCONNECT_OSMEM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("MEDCONNECT_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/medconnect")
                });
            cache.join("venv/bin/osmem-server")
        })
}

fn start_osmem() -> anyhow::Result<Osmem> {
    let binary = osmem_binary();
    let mut child = Command::new(&binary)
        .args(["-addr", "127.0.0.1:0", "-no-stdin-watch", "-no-ja"])
        .args(["-parent-pid", &std::process::id().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "start {} (run scripts/elasticsearch-peers)",
                binary.display()
            )
        })?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let started: serde_json::Value = serde_json::from_str(&line).context("osmem's first line")?;
    let url = started["url"].as_str().context("url")?.to_string();
    Ok(Osmem { child, url })
}

/// The same vitals documents for both contenders: (partition, offset, JSON value).
fn documents(count: usize) -> Vec<(i32, i64, Bytes)> {
    (0..count)
        .map(|i| {
            let value = serde_json::json!({
                "device_id": format!("monitor-{:03}", i % 120),
                "patient_id": format!("MRN{:06}", i % 5000),
                "observed_at": 1_796_000_000_000_i64 + i as i64,
                "heart_rate": 48 + i % 90,
                "spo2": 86 + i % 14,
                "resp_rate": 10 + i % 20,
                "temperature_c": 35.5 + (i % 45) as f64 / 10.0,
                "site": "icu-east",
            });
            (
                (i % 3) as i32,
                (i / 3) as i64,
                Bytes::from(value.to_string()),
            )
        })
        .collect()
}

async fn documents_in(client: &reqwest::Client, url: &str, index: &str) -> anyhow::Result<u64> {
    client.post(format!("{url}/_refresh")).send().await?;
    let answer: serde_json::Value = client
        .get(format!("{url}/{index}/_count"))
        .send()
        .await?
        .json()
        .await?;
    answer["count"].as_u64().context("count")
}

async fn run_sink(
    url: &str,
    index: &str,
    docs: &[(i32, i64, Bytes)],
    batch: usize,
    in_flight: usize,
) -> anyhow::Result<Duration> {
    let records: Vec<SinkRecord> = docs
        .iter()
        .map(|(partition, offset, value)| SinkRecord {
            record: Record::new("vitals").with_value(value.clone()),
            kafka_partition: *partition,
            kafka_offset: *offset,
        })
        .collect();
    let (errant_tx, _errant_rx) = tokio::sync::mpsc::unbounded_channel();
    let config = [
        ("connection.url", url.to_string()),
        ("index", index.to_string()),
        ("key.ignore", "true".into()),
        ("batch.size", batch.to_string()),
        ("max.in.flight.requests", in_flight.to_string()),
        ("linger.ms", "5".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut task = ElasticsearchSinkTask::new(SinkTaskContext {
        connector_name: "bench".into(),
        task_id: 0,
        config,
        errant_records: ErrantRecordReporter::collecting(errant_tx),
        partitions: SinkPartitions::detached(),
        peers: medconnect_api::relay::alone(),
    })?;
    task.start().await?;
    let started = Instant::now();
    for chunk in records.chunks(PUT_BATCH) {
        task.put(chunk.to_vec()).await?;
    }
    task.flush().await?;
    let elapsed = started.elapsed();
    task.stop().await?;
    Ok(elapsed)
}

/// A plain bulk client: the same NDJSON `create` items, `in_flight` requests at once.
async fn run_direct(
    url: &str,
    index: &str,
    docs: &[(i32, i64, Bytes)],
    batch: usize,
    in_flight: usize,
) -> anyhow::Result<Duration> {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut requests = JoinSet::new();
    for chunk in docs.chunks(batch) {
        if requests.len() >= in_flight
            && let Some(done) = requests.join_next().await
        {
            done??;
        }
        let mut body = Vec::with_capacity(chunk.len() * 256);
        for (partition, offset, value) in chunk {
            body.extend_from_slice(
                format!(
                    "{{\"create\":{{\"_index\":\"{index}\",\"_id\":\"vitals+{partition}+{offset}\"}}}}\n"
                )
                .as_bytes(),
            );
            body.extend_from_slice(value);
            body.push(b'\n');
        }
        let request = client
            .post(format!("{url}/_bulk"))
            .header("content-type", "application/x-ndjson")
            .body(body);
        requests.spawn(async move {
            let answer: serde_json::Value = request.send().await?.json().await?;
            if answer["errors"].as_bool() != Some(false) {
                bail!("the direct client's bulk had errors");
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = requests.join_next().await {
        done??;
    }
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let batch: usize = args.next().map_or(Ok(1_000), |a| a.parse())?;
    let in_flight: usize = args.next().map_or(Ok(4), |a| a.parse())?;
    let osmem = start_osmem()?;
    let client = reqwest::Client::new();
    let docs = documents(count);
    println!(
        "elasticsearch: {count} documents, batch {batch}, {in_flight} requests in flight, osmem-server at {}",
        osmem.url
    );
    let mut best = [Duration::MAX, Duration::MAX];
    for round in 0..2 {
        // Alternating who goes first: the emulator's state grows with every run.
        let order = if round == 0 {
            [("direct", 0), ("sink", 1)]
        } else {
            [("sink", 1), ("direct", 0)]
        };
        for (who, slot) in order {
            let index = format!("bench-{who}-{round}");
            let elapsed = if slot == 0 {
                run_direct(&osmem.url, &index, &docs, batch, in_flight).await?
            } else {
                run_sink(&osmem.url, &index, &docs, batch, in_flight).await?
            };
            let written = documents_in(&client, &osmem.url, &index).await?;
            if written != count as u64 {
                bail!("{who}: {written} documents of {count}");
            }
            best[slot] = best[slot].min(elapsed);
        }
    }
    let rate = |d: Duration| count as f64 / d.as_secs_f64();
    let (direct, sink) = (rate(best[0]), rate(best[1]));
    println!("  direct bulk client   {direct:>9.0} docs/s");
    println!("  medconnect sink      {sink:>9.0} docs/s");
    println!("  ratio sink/direct    {:>9.2}", sink / direct);
    Ok(())
}
