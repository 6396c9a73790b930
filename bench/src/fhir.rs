//! The FHIR sink against a direct client posting the same transaction Bundles, and the FHIR
//! source against a direct reader of the same `_history` pages, both against one Helios FHIR
//! Server (hfs, SQLite in memory; `scripts/fhir-peers` installs it), in the same run.
//!
//!   cargo run -p medconnect-bench --bin fhir -- [resources] [bundle.size]
//!
//! The sink task is driven as the engine drives it (`put` in batches of 500, then `flush`),
//! without Kafka: this measures the sink itself. Sink and direct client each run three times,
//! alternately (who goes first too), with resources of their own (new ids each run); the better run counts. Both
//! send one Bundle at a time (the sink keeps writes to a resource in order that way). Then the
//! source reads every version of those resources from scratch, and a direct client reads the
//! same `_history` pages (`_count` 500), parsing each page. Prints rates and ratios, and checks
//! that every resource arrived and every version was read.

use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use medconnect_api::{
    ErrantRecordReporter, OffsetReader, Record, SinkPartitions, SinkRecord, SinkTask,
    SinkTaskContext, SourceOffset, SourcePartition, SourceTask, SourceTaskContext, props_from,
};
use medconnect_fhir::{FhirSinkTask, FhirSourceTask};
use serde_json::{Value, json};

const PUT_BATCH: usize = 500;
const PAGE: usize = 500;

struct Hfs {
    url: String,
    child: Child,
    lifeline: Option<ChildStdin>,
    _dir: tempfile::TempDir,
}

impl Drop for Hfs {
    fn drop(&mut self) {
        drop(self.lifeline.take());
        let _ = self.child.wait();
    }
}

fn start_hfs() -> anyhow::Result<Hfs> {
    let binary = std::env::var_os("MEDCONNECT_HFS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("MEDCONNECT_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/medconnect")
                })
                .join("hfs-0.2.7/bin/hfs")
        });
    let params = binary
        .parent()
        .and_then(|b| b.parent())
        .map(|root| root.join("search-parameters-r4.json"))
        .unwrap_or_default();
    ensure!(
        binary.is_file() && params.is_file(),
        "hfs missing at {}: run scripts/fhir-peers",
        binary.display()
    );
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::copy(&params, data.join("search-parameters-r4.json"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#""$0" "$@" & child=$!; read _ || true; kill $child 2>/dev/null; wait $child"#)
        .arg(&binary)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--database-url", ":memory:", "--log-level", "warn"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--base-url", &url])
        .env("HFS_UI_ENABLED", "false")
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let lifeline = child.stdin.take();
    Ok(Hfs {
        url,
        child,
        lifeline,
        _dir: dir,
    })
}

fn observation(prefix: &str, i: usize) -> (String, Value) {
    let id = format!("{prefix}-{i}");
    let resource = json!({
        "resourceType": "Observation", "id": id, "status": "final",
        "identifier": [{"system": format!("urn:bench:{prefix}"), "value": i.to_string()}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": format!("Patient/p{}", i % 500)},
        "effectiveDateTime": "2026-11-30T06:00:00Z",
        "valueQuantity": {"value": 60 + i % 40, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    });
    (id, resource)
}

async fn count(client: &reqwest::Client, url: &str, prefix: &str) -> anyhow::Result<u64> {
    let body: Value = client
        .get(format!(
            "{url}/Observation?identifier=urn:bench:{prefix}|&_summary=count"
        ))
        .send()
        .await?
        .json()
        .await?;
    body["total"].as_u64().context("a count")
}

async fn run_sink(url: &str, prefix: &str, count_of: usize, bundle: usize) -> anyhow::Result<f64> {
    let records: Vec<SinkRecord> = (0..count_of)
        .map(|i| {
            let (id, resource) = observation(prefix, i);
            SinkRecord {
                record: Record::new("bench")
                    .with_key(format!("Observation/{id}"))
                    .with_value(resource.to_string()),
                kafka_partition: 0,
                kafka_offset: i as i64,
            }
        })
        .collect();
    let (errant_tx, mut errant_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut task = FhirSinkTask::new(SinkTaskContext {
        connector_name: "bench".into(),
        task_id: 0,
        config: props_from(&[
            ("fhir.url", url),
            ("fhir.bundle.type", "transaction"),
            ("fhir.bundle.size", &bundle.to_string()),
        ]),
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
    ensure!(errant_rx.try_recv().is_err(), "the sink refused resources");
    Ok(count_of as f64 / elapsed.as_secs_f64())
}

async fn run_direct(
    url: &str,
    prefix: &str,
    count_of: usize,
    bundle: usize,
) -> anyhow::Result<f64> {
    let client = reqwest::Client::new();
    let bodies: Vec<String> = (0..count_of)
        .collect::<Vec<_>>()
        .chunks(bundle)
        .map(|chunk| {
            let entries: Vec<Value> = chunk
                .iter()
                .map(|&i| {
                    let (id, resource) = observation(prefix, i);
                    json!({"resource": resource, "request": {"method": "PUT", "url": format!("Observation/{id}")}})
                })
                .collect();
            json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}).to_string()
        })
        .collect();
    let started = Instant::now();
    for body in bodies {
        let answer = client
            .post(url)
            .header("Content-Type", "application/fhir+json")
            .body(body)
            .send()
            .await?;
        if !answer.status().is_success() {
            bail!("direct Bundle answered {}", answer.status());
        }
        let response: Value = answer.json().await?;
        ensure!(
            response["entry"].as_array().map(Vec::len).unwrap_or(0) > 0,
            "an answer without entries"
        );
    }
    Ok(count_of as f64 / started.elapsed().as_secs_f64())
}

/// Offsets of nothing: the source reads every version from the start.
struct NoOffsets;

impl OffsetReader for NoOffsets {
    fn offset(&self, _: &SourcePartition) -> Option<SourceOffset> {
        None
    }
}

async fn run_source(url: &str, expected: usize) -> anyhow::Result<f64> {
    let mut task = FhirSourceTask::new(SourceTaskContext {
        connector_name: "bench".into(),
        task_id: 0,
        config: props_from(&[
            ("fhir.url", url),
            ("fhir.resource.types", "Observation"),
            ("fhir.page.size", &PAGE.to_string()),
        ]),
        offsets: Arc::new(NoOffsets),
        listener_budget: medconnect_api::limits::ByteBudget::unlimited(),
    })?;
    task.start().await?;
    let started = Instant::now();
    let mut read = 0;
    while read < expected {
        let records = tokio::time::timeout(Duration::from_secs(300), task.poll()).await??;
        read += records.len();
    }
    let elapsed = started.elapsed();
    ensure!(
        read == expected,
        "the source read {read} versions of {expected}"
    );
    task.stop().await?;
    Ok(read as f64 / elapsed.as_secs_f64())
}

async fn run_history_reader(url: &str, expected: usize) -> anyhow::Result<f64> {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut next = Some(format!("{url}/Observation/_history?_count={PAGE}"));
    let mut read = 0;
    while let Some(page_url) = next.take() {
        let page: Value = client.get(&page_url).send().await?.json().await?;
        read += page["entry"].as_array().map(Vec::len).unwrap_or(0);
        next = page["link"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
            .and_then(|l| l["url"].as_str())
            .map(str::to_string);
    }
    ensure!(
        read == expected,
        "the direct reader read {read} versions of {expected}"
    );
    Ok(read as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let resources: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5_000);
    let bundle: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100);
    let hfs = start_hfs()?;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client
        .get(format!("{}/metadata", hfs.url))
        .send()
        .await
        .is_err()
    {
        ensure!(Instant::now() < deadline, "hfs did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "fhir: {resources} Observations per run, transaction Bundles of {bundle}, one in flight, hfs 0.2.7 (SQLite in memory)"
    );
    let mut direct_best: f64 = 0.0;
    let mut sink_best: f64 = 0.0;
    for run in 1..=3 {
        // Alternating who goes first: the server slows as its database grows.
        let (direct, sink) = if run % 2 == 1 {
            let direct = run_direct(&hfs.url, &format!("direct{run}"), resources, bundle).await?;
            (
                direct,
                run_sink(&hfs.url, &format!("sink{run}"), resources, bundle).await?,
            )
        } else {
            let sink = run_sink(&hfs.url, &format!("sink{run}"), resources, bundle).await?;
            (
                run_direct(&hfs.url, &format!("direct{run}"), resources, bundle).await?,
                sink,
            )
        };
        for prefix in [format!("direct{run}"), format!("sink{run}")] {
            ensure!(
                count(&client, &hfs.url, &prefix).await? == resources as u64,
                "{prefix}: not every resource arrived"
            );
        }
        println!("  run {run}: direct {direct:.0} resources/s, sink {sink:.0} resources/s");
        direct_best = direct_best.max(direct);
        sink_best = sink_best.max(sink);
    }
    println!(
        "sink: {sink_best:.0} resources/s vs direct client {direct_best:.0} resources/s: ratio {:.2}",
        sink_best / direct_best
    );
    let versions = resources * 6;
    let reader = run_history_reader(&hfs.url, versions).await?;
    let source = run_source(&hfs.url, versions).await?;
    println!(
        "source: {source:.0} changes/s vs direct _history reader {reader:.0} changes/s ({versions} versions, pages of {PAGE}): ratio {:.2}",
        source / reader
    );
    Ok(())
}
