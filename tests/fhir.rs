//! The FHIR connectors in a real worker against a real broker and a real FHIR R4 server
//! (Helios hfs; `scripts/fhir-peers` installs it):
//! - sink: 1,000 Observations produced to Kafka land in the server once each, one record the
//!   server refuses lands in the dead-letter topic with its OperationOutcome and Connect's
//!   context headers, and the committed offsets reach the end;
//! - source: every version of Patients created, updated and deleted in the server lands in
//!   `fhir.Patient` once, deletions as tombstones;
//! - subscription: FhirSubscriptionSource (one receiver on the worker) puts its rest-hook
//!   Subscription; each Patient written afterwards is a record in `fhir.Patient` within a
//!   second, although the connector polls only once a minute;
//! - crash: a worker process running the sink, killed with SIGKILL mid-stream, loses nothing
//!   it committed, and after its restart the server holds exactly one resource per record.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};

use std::time::Instant;

use anyhow::{Context, ensure};
use medconnect_e2e::crash::{
    Processes, committed_offsets, report_line, start_broker, start_worker, wait_out_session,
    write_worker_config,
};
use medconnect_e2e::{TestCluster, eventually, json};
use medconnect_runtime::kafka::{KafkaSettings, TopicSpec, ensure_topics};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

/// hfs on a free port with the full R4 search parameters; killed on drop or with the test
/// process (its wrapper shell watches a pipe from us).
struct Hfs {
    url: String,
    child: Child,
    lifeline: Option<ChildStdin>,
    _dir: tempfile::TempDir,
}

impl Hfs {
    fn start() -> anyhow::Result<Self> {
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
        anyhow::ensure!(
            binary.is_file() && params.is_file(),
            "hfs missing at {} (or its search parameters): run scripts/fhir-peers",
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
            .env("HFS_SUBSCRIPTIONS_ENABLED", "true")
            .env("HFS_SUBSCRIPTION_ALLOW_PRIVATE_ENDPOINTS", "true")
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let lifeline = child.stdin.take().expect("stdin");
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("ERROR") {
                        eprintln!("hfs: {line}");
                    }
                }
            });
        }
        Ok(Self {
            url,
            child,
            lifeline: Some(lifeline),
            _dir: dir,
        })
    }

    async fn get(&self, path: &str) -> Option<Value> {
        reqwest::Client::new()
            .get(format!("{}/{path}", self.url))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    async fn ready(&self) -> anyhow::Result<()> {
        eventually("hfs answering /metadata", async || {
            self.get("metadata").await.map(|_| ())
        })
        .await
    }

    /// Resources of `kind` with an identifier of `system`; asked again when hfs answers
    /// without a total (a search can fail while writes go on: "database table is locked").
    async fn count(&self, kind: &str, system: &str) -> Option<u64> {
        let path = format!("{kind}?identifier={system}|&_summary=count");
        for _ in 0..50 {
            if let Some(total) = self.get(&path).await.and_then(|v| v["total"].as_u64()) {
                return Some(total);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        None
    }

    /// A transaction, sent again while hfs 0.2.7 answers "database table is locked" (a write
    /// meeting a concurrent read; the transaction did nothing).
    async fn transaction(&self, entries: &[Value]) -> anyhow::Result<()> {
        let body = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        for _ in 0..50 {
            let answer = reqwest::Client::new()
                .post(&self.url)
                .header("Content-Type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .await?;
            let status = answer.status();
            let text = answer.text().await.unwrap_or_default();
            if status.is_success() {
                return Ok(());
            }
            // hfs 0.2.7's SQLite contention: "database table is locked", or a bare 500 on
            // another code path; the transaction was rolled back either way.
            anyhow::ensure!(
                text.contains("is locked") || status.is_server_error(),
                "transaction: {status}: {text}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        anyhow::bail!("transaction: hfs stayed locked")
    }
}

impl Drop for Hfs {
    fn drop(&mut self) {
        // Closing the pipe makes the wrapper shell stop hfs and wait for it; killing the
        // shell instead would leave hfs running.
        drop(self.lifeline.take());
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observations_from_kafka_land_in_the_server_once_and_a_refused_one_in_the_dead_letter_topic()
-> anyhow::Result<()> {
    let hfs = Hfs::start()?;
    hfs.ready().await?;
    let cluster = TestCluster::start().await?;
    let system = "urn:e2e:obs";
    let values: Vec<(String, String)> = (0..1_001)
        .map(|i| {
            let key = format!("Observation/e2e-{i}");
            let value = if i == 500 {
                // The key names an Observation, the value is a Patient: the server refuses it.
                json!({"resourceType": "Patient", "name": [{"family": "Refused"}]})
            } else {
                json!({"resourceType": "Observation", "status": "final",
                       "identifier": [{"system": system, "value": i.to_string()}],
                       "code": {"text": "heart rate"}, "valueQuantity": {"value": 60 + i % 40}})
            };
            (key, value.to_string())
        })
        .collect();
    let records: Vec<(Option<&str>, &str)> = values
        .iter()
        .map(|(k, v)| (Some(k.as_str()), v.as_str()))
        .collect();
    cluster.produce("obs.in", &records).await?;

    let worker = cluster.start_worker().await?;
    worker
        .rest
        .create(
            "fhir-out",
            json!({"connector.class": "FhirSink", "topics": "obs.in", "fhir.url": hfs.url,
                   "fhir.bundle.size": "100", "fhir.bundle.type": "transaction",
                   "errors.tolerance": "all", "errors.deadletterqueue.topic.name": "fhir.dlq",
                   "errors.deadletterqueue.context.headers.enable": "true",
                   // Consent to the server's diagnostics (they may quote the resource) in
                   // the dead-letter record: without it, no fhir.outcome.diagnostics header.
                   "errors.log.include.messages": "true"}),
        )
        .await?;
    worker.wait_for_state("fhir-out", "RUNNING", 1).await?;
    let written = eventually("1,000 Observations in the server", async || {
        hfs.count("Observation", system)
            .await
            .filter(|n| *n >= 1_000)
    })
    .await?;
    assert_eq!(written, 1_000);
    let dead = cluster.read_topic("fhir.dlq", 1).await?;
    assert_eq!(dead.len(), 1);
    let dead = &dead[0];
    assert_eq!(dead.key.as_deref(), Some("Observation/e2e-500"));
    assert_eq!(dead.header("fhir.outcome.status"), Some("400"));
    assert_eq!(dead.header("fhir.outcome.code"), Some("invalid"));
    assert!(
        dead.header("fhir.outcome.diagnostics")
            .is_some_and(|d| d.contains("does not match")),
        "{dead:?}"
    );
    assert_eq!(dead.header("__connect.errors.offset"), Some("500"));
    let message = dead
        .header("__connect.errors.exception.message")
        .unwrap_or_default();
    assert!(
        message.contains("HTTP 400") && !message.contains("does not match"),
        "{message}"
    );

    eventually("offsets committed up to the end", async || {
        let (_, offsets) = worker.rest.get("/connectors/fhir-out/offsets").await.ok()?;
        let total: i64 = offsets["offsets"]
            .as_array()?
            .iter()
            .filter_map(|o| o["offset"]["kafka_offset"].as_i64())
            .sum();
        (total == 1_001).then_some(())
    })
    .await?;
    let (_, status) = worker.rest.get("/connectors/fhir-out/status").await?;
    assert_eq!(status["tasks"][0]["state"], "RUNNING", "{status}");
    assert_eq!(
        cluster.count_records("fhir.dlq").await?,
        1,
        "only the refused record"
    );
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_changes_in_the_server_land_in_kafka_once_each() -> anyhow::Result<()> {
    let hfs = Hfs::start()?;
    hfs.ready().await?;
    let put = |i: usize, family: &str| {
        json!({"resource": {"resourceType": "Patient", "id": format!("p{i}"), "name": [{"family": family}]},
               "request": {"method": "PUT", "url": format!("Patient/p{i}")}})
    };
    let created: Vec<Value> = (0..200).map(|i| put(i, "Created")).collect();
    hfs.transaction(&created).await?;
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    worker
        .rest
        .create(
            "fhir-in",
            json!({"connector.class": "FhirSource", "fhir.url": hfs.url,
                   "fhir.resource.types": "Patient", "fhir.poll.interval.ms": "200",
                   "topic.creation.default.partitions": "1"}),
        )
        .await?;
    worker.wait_for_state("fhir-in", "RUNNING", 1).await?;
    // While it runs: 50 updates, 10 deletions.
    let updated: Vec<Value> = (0..50).map(|i| put(i, "Updated")).collect();
    hfs.transaction(&updated).await?;
    let deleted: Vec<Value> = (190..200)
        .map(|i| json!({"request": {"method": "DELETE", "url": format!("Patient/p{i}")}}))
        .collect();
    hfs.transaction(&deleted).await?;

    cluster.read_topic("fhir.Patient", 260).await?;
    let records = cluster.read_all("fhir.Patient").await?;
    assert_eq!(records.len(), 260, "every version once");
    let tombstones: Vec<_> = records.iter().filter(|r| r.value.is_none()).collect();
    assert_eq!(tombstones.len(), 10);
    assert!(
        tombstones
            .iter()
            .all(|r| r.header("fhir.version.id") == Some("2"))
    );
    let p7: Vec<_> = records
        .iter()
        .filter(|r| r.key.as_deref() == Some("Patient/p7"))
        .collect();
    assert_eq!(p7.len(), 2);
    assert_eq!(p7[0].header("fhir.version.id"), Some("1"));
    assert_eq!(p7[1].json()["name"][0]["family"], "Updated");
    assert_eq!(p7[1].header("content-type"), Some("application/fhir+json"));
    assert_eq!(p7[1].header("fhir.resource.type"), Some("Patient"));
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_brings_each_change_within_a_second() -> anyhow::Result<()> {
    let hfs = Hfs::start()?;
    hfs.ready().await?;
    let topic_url = "http://medconnect.test/topic/patient";
    // The R4 Backport IG's SubscriptionTopic: a Basic resource.
    hfs.transaction(&[json!({"resource": {
        "resourceType": "Basic", "id": "topic-patient",
        "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]},
        "extension": [
            {"url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.url", "valueUri": topic_url},
            {"url": "http://hl7.org/fhir/4.3/StructureDefinition/extension-SubscriptionTopic.resourceTrigger", "extension": [
                {"url": "resource", "valueUri": "http://hl7.org/fhir/StructureDefinition/Patient"},
                {"url": "supportedInteraction", "valueCode": "create"},
                {"url": "supportedInteraction", "valueCode": "update"}]}]},
        "request": {"method": "PUT", "url": "Basic/topic-patient"}})])
    .await?;
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    worker
        .rest
        .create(
            "fhir-hook",
            json!({"connector.class": "FhirSubscriptionSource", "fhir.url": hfs.url,
                   "fhir.resource.types": "Patient", "fhir.listener.host": "127.0.0.1",
                   "fhir.listener.port": port.to_string(),
                   "fhir.subscription.id": "medconnect-e2e",
                   "fhir.subscription.topic": topic_url,
                   "fhir.subscription.endpoint": format!("http://127.0.0.1:{port}/notify"),
                   "topic.creation.default.partitions": "1"}),
        )
        .await?;
    worker.wait_for_state("fhir-hook", "RUNNING", 1).await?;
    eventually("the Subscription active", async || {
        (hfs.get("Subscription/medconnect-e2e").await?["status"] == "active").then_some(())
    })
    .await?;
    let mut slowest = std::time::Duration::ZERO;
    for i in 0..10 {
        let written = Instant::now();
        hfs.transaction(&[
            json!({"resource": {"resourceType": "Patient", "id": format!("hook-{i}")},
                                 "request": {"method": "PUT", "url": format!("Patient/hook-{i}")}}),
        ])
        .await?;
        let records = cluster.read_topic("fhir.Patient", i + 1).await?;
        ensure!(
            records
                .iter()
                .any(|r| r.key.as_deref() == Some(&format!("Patient/hook-{i}"))),
            "hook-{i} not in fhir.Patient"
        );
        slowest = slowest.max(written.elapsed());
    }
    report_line(format!(
        "fhir subscription: 10 changes, each in Kafka within {slowest:?} of its write (polling once a minute)"
    ));
    ensure!(
        slowest < std::time::Duration::from_secs(1),
        "slowest {slowest:?}"
    );
    assert_eq!(
        cluster.count_records("fhir.Patient").await?,
        10,
        "each change once"
    );
    worker.shutdown().await;
    Ok(())
}

const CRASH_TOPIC: &str = "crash.fhir";
const CRASH_SINK: &str = "crash-fhir";
const CRASH_SYSTEM: &str = "urn:crash:obs";
const CRASH_PARTITIONS: i32 = 3;
const CRASH_PER_PARTITION: i64 = 5_000;

/// The id of the record at `offset` of `partition` (the topic is new: the n-th record produced
/// to a partition is at offset n).
fn crash_id(partition: i32, offset: i64) -> String {
    format!("crash-{partition}-{offset}")
}

/// Which of `ids` the server does not hold (`_id` searches of 200 at a time). A search hfs
/// 0.2.7 answers without a total (it can fail while the sink writes: "database table is
/// locked") is asked again.
async fn missing(hfs: &Hfs, ids: &[String]) -> anyhow::Result<usize> {
    let mut missing = 0;
    for chunk in ids.chunks(200) {
        let path = format!("Observation?_id={}&_summary=count", chunk.join(","));
        let mut found = None;
        let mut last = Value::Null;
        for _ in 0..50 {
            last = hfs.get(&path).await.unwrap_or(Value::Null);
            found = last["total"].as_u64();
            if found.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let found = found.with_context(|| format!("a count of {} ids: {last}", chunk.len()))?;
        missing += chunk.len() - found as usize;
    }
    Ok(missing)
}

/// Crash honesty for the sink: 15,000 Observations in 3 partitions -> the sink (upserts,
/// Bundles of 50) -> hfs, in a worker process killed with SIGKILL once 40 % are in the server
/// and it committed offsets, then started again. Every record below the committed offsets read
/// after the kill is in the server (0 lost), and in the end the server holds exactly one
/// resource per record: those written past the commit are delivered again and upserted (a new
/// versionId, not a new resource).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_committed_is_lost_and_nothing_is_written_twice_after_sigkill() -> anyhow::Result<()>
{
    let mut processes = Processes::new()?;
    let outcome = fhir_crash(&mut processes).await;
    processes.report(outcome)
}

async fn fhir_crash(processes: &mut Processes) -> anyhow::Result<()> {
    let started = Instant::now();
    let total = CRASH_PER_PARTITION as u64 * CRASH_PARTITIONS as u64;
    let hfs = Hfs::start()?;
    hfs.ready().await?;
    let bootstrap = start_broker(processes).await?;
    ensure_topics(
        &KafkaSettings::new(&bootstrap),
        &[TopicSpec::regular(CRASH_TOPIC, CRASH_PARTITIONS, 1)],
    )
    .await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        // One record per batch: the embedded broker (tansu 0.6) answers a fetch at an offset
        // inside a batch with the next batch, so a consumer resuming at a committed offset in
        // the middle of a batch skips the rest of it (seen: committed 1,101 in a batch of 333
        // records starting at 1,001, the restarted sink got records from 1,334 on).
        .set("batch.num.messages", "1")
        .create()?;
    let mut sends = Vec::new();
    for offset in 0..CRASH_PER_PARTITION {
        for partition in 0..CRASH_PARTITIONS {
            let id = crash_id(partition, offset);
            let value = json!({"resourceType": "Observation", "status": "final",
                "identifier": [{"system": CRASH_SYSTEM, "value": id}],
                "code": {"text": "heart rate"}, "valueQuantity": {"value": 60 + offset % 40}})
            .to_string();
            let key = format!("Observation/{id}");
            sends.push(
                producer
                    .send_result(
                        FutureRecord::to(CRASH_TOPIC)
                            .partition(partition)
                            .key(&key)
                            .payload(&value),
                    )
                    .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?,
            );
            if sends.len() >= 1_000 {
                for send in sends.drain(..) {
                    send.await?
                        .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
                }
            }
        }
    }
    for send in sends.drain(..) {
        send.await?
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    }

    let worker_toml = write_worker_config(processes, &bootstrap, 1_000)?;
    let rest = start_worker(processes, "worker-1", &worker_toml).await?;
    rest.create(
        CRASH_SINK,
        // Above the topic's size: the sink never pauses its partitions here, which the
        // embedded broker (tansu 0.6) may never serve again (see the README's known limits).
        json!({"connector.class": "FhirSink", "topics": CRASH_TOPIC, "fhir.url": hfs.url,
               "fhir.bundle.size": "50", "fhir.max.buffered.records": "20000"}),
    )
    .await?;
    let kill_at = total * 4 / 10;
    eventually(
        &format!("{kill_at} resources written and offsets committed"),
        async || {
            if hfs.count("Observation", CRASH_SYSTEM).await? < kill_at {
                return None;
            }
            let (_, offsets) = rest
                .get(&format!("/connectors/{CRASH_SINK}/offsets"))
                .await
                .ok()?;
            let committed: i64 = offsets["offsets"]
                .as_array()?
                .iter()
                .filter_map(|o| o["offset"]["kafka_offset"].as_i64())
                .sum();
            (committed > 0).then_some(())
        },
    )
    .await?;
    processes.kill("worker-1")?;
    let killed_at = Instant::now();
    let killed_after = started.elapsed();

    // What the killed worker vouched for: every record below its committed offsets.
    let committed =
        committed_offsets(&bootstrap, &format!("connect-{CRASH_SINK}"), CRASH_TOPIC).await?;
    let vouched: Vec<String> = committed
        .iter()
        .flat_map(|(partition, next)| (0..*next).map(move |offset| crash_id(*partition, offset)))
        .collect();
    let written_at_kill = hfs
        .count("Observation", CRASH_SYSTEM)
        .await
        .context("count at the kill")?;
    let lost = missing(&hfs, &vouched).await?;
    ensure!(
        lost == 0,
        "{lost} record(s) below the committed offsets {committed:?} are not in the server"
    );

    wait_out_session(killed_at).await;
    let rest = start_worker(processes, "worker-2", &worker_toml).await?;
    let written = match eventually(&format!("{total} resources: one per record"), async || {
        hfs.count("Observation", CRASH_SYSTEM)
            .await
            .filter(|n| *n >= total)
    })
    .await
    {
        Ok(written) => written,
        Err(error) => {
            // What the restarted worker says, for the failure's report.
            let status = rest
                .get(&format!("/connectors/{CRASH_SINK}/status"))
                .await
                .ok();
            let offsets = rest
                .get(&format!("/connectors/{CRASH_SINK}/offsets"))
                .await
                .ok();
            let count = hfs.count("Observation", CRASH_SYSTEM).await;
            let all: Vec<String> = (0..CRASH_PARTITIONS)
                .flat_map(|p| (0..CRASH_PER_PARTITION).map(move |o| crash_id(p, o)))
                .collect();
            let absent = missing(&hfs, &all).await.ok();
            let observations = hfs
                .get("Observation?_summary=count")
                .await
                .map(|v| v["total"].clone());
            anyhow::bail!(
                "{error}: the server holds {count:?} by identifier, {observations:?} Observations in all, {absent:?} ids absent; after the restart the sink's status is {status:?}, its offsets {offsets:?} (committed at the kill: {committed:?})"
            );
        }
    };
    let all: Vec<String> = (0..CRASH_PARTITIONS)
        .flat_map(|p| (0..CRASH_PER_PARTITION).map(move |o| crash_id(p, o)))
        .collect();
    let absent = missing(&hfs, &all).await?;
    let committed_total: i64 = committed.values().sum();
    report_line(format!(
        "crash: fhir sink killed after {:.1}s with {written_at_kill} resources written and {committed_total} records committed ({} written past the commit, delivered again after the restart as upserts); server {written} resources for {total} records, {absent} missing, {lost} lost below the commit; {:.1}s in all",
        killed_after.as_secs_f64(),
        written_at_kill.saturating_sub(committed_total as u64),
        started.elapsed().as_secs_f64()
    ));
    ensure!(absent == 0, "{absent} record(s) are not in the server");
    ensure!(
        written == total,
        "{written} resources for {total} records: some written twice"
    );
    Ok(())
}
