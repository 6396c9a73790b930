//! Crash honesty: a worker killed with SIGKILL mid-stream — its own process, the broker in
//! another — and started again with the same config loses nothing it vouched for: no record
//! whose source offset it stored, no HL7 message it answered `AA`. What it may do is deliver
//! some records twice; each test counts the duplicates and prints them in one `crash:` line.
//!
//! Processes: `medconnect broker`, `medconnect worker <toml>` (killed, then started again), and
//! in the MLLP test python `hl7`'s `mllp_send` as the sender (a peer we did not write). Their
//! output goes to files in the test's temp dir; a failing test prints their tails and keeps
//! the directory. Every child is killed on every exit path ([`Processes`]'s `Drop`).
//!
//! Duplicates of a polling source are bounded by what was produced since the last offset
//! flush (`[tasks] offset_flush_interval_ms`, rate x interval); the sink re-writes what it
//! consumed since its last commit (same interval). The datagen test runs with a short and
//! with the default interval to show it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use medconnect_e2e::crash::{
    OFFSETS_TOPIC, Processes, Read, eventually_blocking, free_port, partitions_of, python_bin,
    read_all, read_answers, reader, report_line, start_broker, start_senders, start_worker,
    wait_for_senders, wait_out_session, write_worker_config,
};
use medconnect_e2e::{QUIET, Rest, eventually, json};
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

const DATAGEN: &str = "crash-datagen";
const FILE_SINK: &str = "crash-file";
const VITALS: &str = "crash.vitals";
const DATAGEN_RECORDS: u64 = 20_000;
/// One task: one producer. Two source tasks writing one partition at once hit a race in the
/// embedded broker (tansu 0.6's storage raises a partition's high watermark before it stores
/// the batch; a fetch in between is answered with the batches after it, and the consumer
/// never reads that batch): with 2 tasks the file sink lost one whole batch (4-6 records) in 4
/// of ~40 runs, with or without a crash, while the topic held every record.
const DATAGEN_TASKS: u64 = 1;
/// Records per second: the stream lasts about 10 s.
const DATAGEN_RATE: u64 = 2_000;

const MLLP: &str = "crash-mllp";
const HL7_TOPIC: &str = "crash.hl7";
const MLLP_MESSAGES: usize = 2_000;
const MLLP_SENDERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagen_to_file_with_a_short_offset_flush_loses_nothing_after_sigkill()
-> anyhow::Result<()> {
    let mut processes = Processes::new()?;
    let outcome = datagen_crash(&mut processes, 200).await;
    processes.report(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagen_to_file_with_the_default_offset_flush_loses_nothing_after_sigkill()
-> anyhow::Result<()> {
    let mut processes = Processes::new()?;
    let outcome = datagen_crash(&mut processes, 5_000).await;
    processes.report(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mllp_loses_no_acknowledged_message_after_sigkill() -> anyhow::Result<()> {
    let mut processes = Processes::new()?;
    let outcome = mllp_crash(&mut processes).await;
    processes.report(outcome)
}

/// datagen -> topic -> FileStreamSink -> file; the worker is killed once 60% of the
/// stream is in the file and every task has stored an offset, then started again.
async fn datagen_crash(processes: &mut Processes, flush_ms: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let bootstrap = start_broker(processes).await?;
    let worker_toml = write_worker_config(processes, &bootstrap, flush_ms)?;
    let rest = start_worker(processes, "worker-1", &worker_toml).await?;
    // A plain consumer tailing the topic as the sink does: what the broker served it is
    // compared with what the topic holds in the end.
    let witness = Witness::start(&bootstrap, VITALS);
    let output = processes.path("vitals.jsonl");
    let output_text = output
        .to_str()
        .context("temp path is not UTF-8")?
        .to_string();

    rest.create(
        DATAGEN,
        json!({
            "connector.class": "DatagenSource", "topic": VITALS, "schema": "vitals",
            "tasks.max": DATAGEN_TASKS.to_string(), "max.records": DATAGEN_RECORDS.to_string(),
            "rate": DATAGEN_RATE.to_string(),
        }),
    )
    .await?;
    rest.create(
        FILE_SINK,
        json!({"connector.class": "FileStreamSink", "topics": VITALS, "file": output_text}),
    )
    .await?;

    // Mid-stream: 60% of the records are in the file, and every task has stored an offset (so
    // the claim checked below is not empty).
    let kill_at = DATAGEN_RECORDS * 6 / 10;
    eventually(
        &format!("{kill_at} lines in the file and a stored offset for every datagen task"),
        async || {
            if count_lines(&output) < kill_at {
                return None;
            }
            let stored = rest_offsets(&rest, DATAGEN).await?;
            (stored.len() as u64 == DATAGEN_TASKS).then_some(())
        },
    )
    .await?;
    processes.kill("worker-1")?;
    let killed_at = Instant::now();
    let killed_after = started.elapsed();
    let lines_at_kill = count_lines(&output);

    // What the killed worker vouched for: the offsets in the offset topic, read by a plain
    // consumer once nothing can write them any more.
    let stored = stored_datagen_offsets(&bootstrap, DATAGEN).await?;
    ensure!(
        stored.len() as u64 == DATAGEN_TASKS,
        "the offset topic holds offsets for tasks {:?} only, though the worker's REST API showed every task's",
        stored.keys().collect::<Vec<_>>()
    );
    // Read until every stored position is there (or the deadline passed), then until quiet.
    let wanted = stored.clone();
    let at_kill = datagen_counts(
        &read_all(&bootstrap, VITALS, move |records| {
            let Ok(counts) = datagen_counts(records) else {
                return true;
            };
            wanted
                .iter()
                .all(|(task, seq)| (0..=*seq).all(|s| counts.contains_key(&(*task, s))))
        })
        .await?,
    )?;
    let mut lost = Vec::new();
    for (&task, &seq) in &stored {
        lost.extend(
            (0..=seq)
                .filter(|s| !at_kill.contains_key(&(task, *s)))
                .map(|s| (task, s)),
        );
    }
    let past_stored = at_kill
        .keys()
        .filter(|(task, seq)| stored.get(task).is_none_or(|stored| seq > stored))
        .count();
    report_line(format!(
        "crash: datagen (offset flush {flush_ms} ms) killed after {:.1}s with {lines_at_kill} lines in the file; stored offsets {stored:?}; topic held {} distinct records, {past_stored} past the stored offsets",
        killed_after.as_secs_f64(),
        at_kill.len()
    ));
    ensure!(
        lost.is_empty(),
        "{} record(s) whose source offset was stored before the kill are not in {VITALS}: first {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );

    // The restarted worker's sink must join its group only once the killed one's member expired.
    wait_out_session(killed_at).await;
    let rest = start_worker(processes, "worker-2", &worker_toml).await?;
    // The source is done once it stored the offset of every task's last record.
    eventually(
        "datagen to store the offset of its last record",
        async || {
            let stored = rest_offsets(&rest, DATAGEN).await?;
            (0..DATAGEN_TASKS)
                .all(|task| stored.get(&task) == Some(&(TASK_SHARE - 1)))
                .then_some(())
        },
    )
    .await?;
    let records = read_all(&bootstrap, VITALS, |records| {
        // Unreadable records end the wait: the caller reports them.
        match datagen_counts(records) {
            Ok(counts) => counts.len() as u64 == DATAGEN_RECORDS,
            Err(_) => true,
        }
    })
    .await?;
    let topic = datagen_counts(&records)?;
    let served_differently = witness.mismatches(&records).await?;
    let expected: Vec<(u64, u64)> = (0..DATAGEN_TASKS)
        .flat_map(|task| (0..TASK_SHARE).map(move |seq| (task, seq)))
        .collect();
    let topic_missing = expected.iter().filter(|k| !topic.contains_key(k)).count();
    let topic_total: usize = topic.values().sum();

    // The sink has caught up when the file holds every record of the topic at least as often.
    let topic = Arc::new(topic);
    let wanted = topic.clone();
    let path = output.clone();
    let caught_up = eventually_blocking("the file to hold every record of the topic", move || {
        if count_lines(&path) < topic_total as u64 {
            return None;
        }
        let file = read_datagen_file(&path).ok()?;
        wanted
            .iter()
            .all(|(key, n)| file.counts.get(key).is_some_and(|m| m >= n))
            .then_some(())
    })
    .await;
    let file = read_datagen_file(&output)?;
    if let Err(error) = caught_up {
        // Say exactly what the sink left out, and where it is in the topic.
        let mut short = Vec::new();
        for record in &records {
            let value: Value = serde_json::from_slice(record.value.as_deref().unwrap_or_default())?;
            let key = datagen_key(&value)?;
            if topic
                .get(&key)
                .is_some_and(|n| file.counts.get(&key).is_none_or(|m| m < n))
            {
                short.push(format!(
                    "task {} seq {} at {VITALS}[{}]@{}",
                    key.0, key.1, record.partition, record.offset
                ));
            }
        }
        bail!(
            "{error}: the file ({} lines, {lines_at_kill} at the kill) lacks {} record(s) of the topic ({} missing from the file altogether): {}; a plain consumer tailing the topic was served {} record(s) other than the topic holds at their offsets, or none: {}",
            file.lines,
            short.len(),
            expected
                .iter()
                .filter(|k| !file.counts.contains_key(k))
                .count(),
            short[..short.len().min(20)].join(", "),
            served_differently.len(),
            served_differently[..served_differently.len().min(20)].join(", ")
        );
    }
    let file_missing = expected
        .iter()
        .filter(|k| !file.counts.contains_key(k))
        .count();
    let file_total: usize = file.counts.values().sum();
    report_line(format!(
        "crash: datagen topic {topic_total} records, {} duplicates, {topic_missing} missing; file {} lines ({file_total} records), {} duplicates, {file_missing} missing, {} torn line(s); offset flush interval {flush_ms} ms; a tailing consumer was served {} record(s) other than the topic holds or none; {:.1}s in all",
        topic_total - topic.len(),
        file.lines,
        file_total - file.counts.len(),
        file.torn,
        served_differently.len(),
        started.elapsed().as_secs_f64()
    ));
    ensure!(
        topic_missing == 0 && file_missing == 0,
        "records lost: {topic_missing} missing from {VITALS}, {file_missing} from the file"
    );
    Ok(())
}

/// Python `hl7`'s `mllp_send` (4 senders, 2,000 messages with unique control ids) into an MLLP
/// source; the worker is killed once 30% are acknowledged, started again, and every message
/// without an `AA` is sent again until all have one.
async fn mllp_crash(processes: &mut Processes) -> anyhow::Result<()> {
    let started = Instant::now();
    let python = python_bin()?;
    let bootstrap = start_broker(processes).await?;
    let worker_toml = write_worker_config(processes, &bootstrap, 200)?;
    let rest = start_worker(processes, "worker-1", &worker_toml).await?;
    let port = free_port()?;
    rest.create(
        MLLP,
        json!({
            "connector.class": "MllpSource", "mllp.bind": "127.0.0.1",
            "mllp.port": port.to_string(), "topic": HL7_TOPIC,
        }),
    )
    .await?;
    wait_for_listener(&rest, port).await?;

    let ids: Vec<String> = (0..MLLP_MESSAGES).map(|i| format!("CRASH{i:05}")).collect();
    let first = start_senders(processes, &python, port, &ids, 1, MLLP_SENDERS)?;
    let kill_at = MLLP_MESSAGES * 3 / 10;
    eventually(&format!("{kill_at} messages acknowledged"), async || {
        let answers = read_answers(processes, &first);
        (answers.acked.len() >= kill_at || first.iter().all(|s| processes.exited(s))).then_some(())
    })
    .await?;
    processes.kill("worker-1")?;
    let killed_after = started.elapsed();
    // Without a worker the senders fail (connection reset, broken pipe) and exit.
    wait_for_senders(processes, &first).await?;
    let before_kill = read_answers(processes, &first);
    ensure!(
        before_kill.acked.len() < MLLP_MESSAGES,
        "every message was acknowledged before the kill: nothing was mid-stream"
    );

    let rest = start_worker(processes, "worker-2", &worker_toml).await?;
    wait_for_listener(&rest, port).await?;
    let mut acked: HashSet<String> = before_kill.acked.clone();
    let mut negative = before_kill.negative;
    let mut round = 1;
    while acked.len() < MLLP_MESSAGES {
        round += 1;
        ensure!(
            round <= 6,
            "{} message(s) still without AA after {} rounds",
            MLLP_MESSAGES - acked.len(),
            round - 1
        );
        let left: Vec<String> = ids
            .iter()
            .filter(|id| !acked.contains(*id))
            .cloned()
            .collect();
        let senders = start_senders(processes, &python, port, &left, round, MLLP_SENDERS)?;
        wait_for_senders(processes, &senders).await?;
        let answers = read_answers(processes, &senders);
        negative += answers.negative;
        acked.extend(answers.acked);
    }

    let records = read_all(&bootstrap, HL7_TOPIC, |records| {
        let ids: HashSet<String> = records
            .iter()
            .filter_map(|r| r.header("hl7.control.id"))
            .collect();
        ids.len() >= MLLP_MESSAGES
    })
    .await?;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for record in &records {
        let id = record
            .header("hl7.control.id")
            .context("a record without an hl7.control.id header")?;
        *counts.entry(id).or_default() += 1;
    }
    let lost: Vec<&String> = before_kill
        .acked
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    let missing = ids.iter().filter(|id| !counts.contains_key(*id)).count();
    let duplicates = records.len() - counts.len();
    let acked_twice = before_kill
        .acked
        .iter()
        .filter(|id| counts.get(*id).is_some_and(|n| *n > 1))
        .count();
    report_line(format!(
        "crash: mllp {MLLP_MESSAGES} messages, {} AA'd before the kill (after {:.1}s), {} AA'd in all after {round} round(s), {negative} AE/AR; topic {} records, {} AA'd before the kill missing, {missing} missing, {duplicates} duplicates ({acked_twice} of messages AA'd before the kill); {:.1}s in all",
        before_kill.acked.len(),
        killed_after.as_secs_f64(),
        acked.len(),
        records.len(),
        lost.len(),
        started.elapsed().as_secs_f64()
    ));
    ensure!(
        lost.is_empty(),
        "{} message(s) answered AA before the kill are not in {HL7_TOPIC}: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    ensure!(missing == 0, "{missing} message(s) are not in {HL7_TOPIC}");
    Ok(())
}

// ---- datagen ----

/// Records per task: datagen splits `max.records` evenly (the remainder to the first tasks;
/// these constants leave none).
const TASK_SHARE: u64 = DATAGEN_RECORDS / DATAGEN_TASKS;
const _: () = assert!(DATAGEN_RECORDS.is_multiple_of(DATAGEN_TASKS));

/// The datagen offsets a worker reports (task -> last stored seq).
async fn rest_offsets(rest: &Rest, connector: &str) -> Option<BTreeMap<u64, u64>> {
    let (code, body) = rest
        .get(&format!("/connectors/{connector}/offsets"))
        .await
        .ok()?;
    if code != 200 {
        return None;
    }
    body["offsets"]
        .as_array()?
        .iter()
        .map(|o| {
            Some((
                o["partition"]["task"].as_u64()?,
                o["offset"]["seq"].as_u64()?,
            ))
        })
        .collect()
}

/// The datagen offsets in the offset topic, as a plain consumer reads them (task -> seq).
async fn stored_datagen_offsets(
    bootstrap: &str,
    connector: &str,
) -> anyhow::Result<BTreeMap<u64, u64>> {
    let mut stored = BTreeMap::new();
    // Within a partition of the offset topic, a later record for a key replaces an earlier one.
    // The worker's REST API showed an offset for every task: read until they are all there.
    let name = connector.to_string();
    let complete = move |records: &[Read]| {
        let tasks: HashSet<u64> = records
            .iter()
            .filter_map(|r| serde_json::from_slice::<Value>(r.key.as_deref()?).ok())
            .filter(|key| key[0] == name.as_str())
            .filter_map(|key| key[1]["task"].as_u64())
            .collect();
        tasks.len() as u64 >= DATAGEN_TASKS
    };
    for record in read_all(bootstrap, OFFSETS_TOPIC, complete).await? {
        let Some(key) = record.key.as_deref() else {
            continue;
        };
        let key: Value = serde_json::from_slice(key).context("offset key is not JSON")?;
        if key[0] != connector {
            continue;
        }
        let task = key[1]["task"]
            .as_u64()
            .with_context(|| format!("offset key without a task: {key}"))?;
        match record.value.as_deref() {
            Some(value) => {
                let value: Value = serde_json::from_slice(value)?;
                let seq = value["seq"]
                    .as_u64()
                    .with_context(|| format!("offset without a seq: {value}"))?;
                stored.insert(task, seq);
            }
            None => {
                stored.remove(&task);
            }
        }
    }
    Ok(stored)
}

/// How often each (task, seq) occurs.
fn datagen_counts(records: &[Read]) -> anyhow::Result<HashMap<(u64, u64), usize>> {
    let mut counts = HashMap::new();
    for record in records {
        let value = record
            .value
            .as_deref()
            .context("a record without a value")?;
        let value: Value = serde_json::from_slice(value).context("a record that is not JSON")?;
        *counts.entry(datagen_key(&value)?).or_default() += 1;
    }
    Ok(counts)
}

fn datagen_key(value: &Value) -> anyhow::Result<(u64, u64)> {
    match (value["task"].as_u64(), value["seq"].as_u64()) {
        (Some(task), Some(seq)) => Ok((task, seq)),
        _ => bail!("not a datagen record: {value}"),
    }
}

struct FileRecords {
    lines: usize,
    /// Lines that are not one JSON record: a line cut short by the kill (the sink's buffered
    /// writer had written part of it), followed by the first line written after the restart.
    torn: usize,
    counts: HashMap<(u64, u64), usize>,
}

/// The records in the sink's file. A torn line holds the end of a cut record and then a whole
/// one: the whole one is counted, from the first `{` from which the rest of the line parses.
fn read_datagen_file(path: &Path) -> anyhow::Result<FileRecords> {
    let text = std::fs::read(path)?;
    let text = String::from_utf8_lossy(&text);
    let mut file = FileRecords {
        lines: 0,
        torn: 0,
        counts: HashMap::new(),
    };
    // A last line without its newline is still being written.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    for line in complete.lines() {
        file.lines += 1;
        let value = match serde_json::from_str::<Value>(line) {
            Ok(value) => value,
            Err(_) => {
                file.torn += 1;
                let Some(value) = line
                    .match_indices('{')
                    .filter_map(|(at, _)| serde_json::from_str::<Value>(&line[at..]).ok())
                    .next()
                else {
                    continue;
                };
                value
            }
        };
        *file.counts.entry(datagen_key(&value)?).or_default() += 1;
    }
    Ok(file)
}

fn count_lines(path: &Path) -> u64 {
    std::fs::read(path)
        .map(|b| b.iter().filter(|c| **c == b'\n').count() as u64)
        .unwrap_or(0)
}

// ---- MLLP ----

/// The MLLP source task is RUNNING and its port accepts connections.
async fn wait_for_listener(rest: &Rest, port: u16) -> anyhow::Result<()> {
    eventually("the MLLP source to run and accept", async || {
        let (_, status) = rest.get(&format!("/connectors/{MLLP}/status")).await.ok()?;
        if status["tasks"][0]["state"] != "RUNNING" {
            return None;
        }
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
    })
    .await?;
    Ok(())
}

// ---- Kafka ----

/// (partition, offset, (task, seq)) of a record a consumer was served.
type Served = (i32, i64, (u64, u64));

/// A plain consumer reading a topic from the beginning while it is written, recording which
/// record the broker served at each offset.
struct Witness {
    stop: Arc<AtomicBool>,
    reading: Option<tokio::task::JoinHandle<anyhow::Result<Vec<Served>>>>,
}

/// Stops the reader on every exit path: the runtime waits for blocking tasks when it drops.
impl Drop for Witness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl Witness {
    fn start(bootstrap: &str, topic: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (bootstrap, topic, stopped) = (bootstrap.to_string(), topic.to_string(), stop.clone());
        let reading = tokio::task::spawn_blocking(move || {
            let consumer = reader(&bootstrap, "crash-test-witness")?;
            let partitions = partitions_of(&consumer, &topic)?;
            let mut assignment = TopicPartitionList::new();
            for partition in partitions {
                assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
            }
            consumer.assign(&assignment)?;
            let mut seen = Vec::new();
            let mut last_seen = Instant::now();
            while !(stopped.load(Ordering::Acquire) && last_seen.elapsed() >= QUIET) {
                let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let message = message?;
                last_seen = Instant::now();
                let value: Value = serde_json::from_slice(message.payload().unwrap_or_default())?;
                seen.push((message.partition(), message.offset(), datagen_key(&value)?));
            }
            Ok(seen)
        });
        Self {
            stop,
            reading: Some(reading),
        }
    }

    /// Where it was served another record than `records` (read afterwards) hold, or none.
    async fn mismatches(mut self, records: &[Read]) -> anyhow::Result<Vec<String>> {
        self.stop.store(true, Ordering::Release);
        let reading = self
            .reading
            .take()
            .context("the witness was read already")?;
        let seen = reading.await??;
        let mut held = HashMap::new();
        for record in records {
            let value: Value = serde_json::from_slice(record.value.as_deref().unwrap_or_default())?;
            held.insert((record.partition, record.offset), datagen_key(&value)?);
        }
        let mut differences: Vec<String> = seen
            .iter()
            .filter(|(p, o, key)| held.get(&(*p, *o)) != Some(key))
            .map(|(p, o, key)| {
                format!(
                    "[{p}]@{o} served task {} seq {}, holds {:?}",
                    key.0,
                    key.1,
                    held.get(&(*p, *o))
                )
            })
            .collect();
        // Offsets the topic holds that the witness was never served (it read past them).
        let served: HashSet<(i32, i64)> = seen.iter().map(|(p, o, _)| (*p, *o)).collect();
        let mut skipped: Vec<_> = held.iter().filter(|(at, _)| !served.contains(at)).collect();
        skipped.sort();
        differences.extend(
            skipped
                .into_iter()
                .map(|((p, o), key)| format!("[{p}]@{o} never served, holds {key:?}")),
        );
        Ok(differences)
    }
}
