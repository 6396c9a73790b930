//! Records moving source -> Kafka -> sink through real workers and a real broker, with exact
//! counts, restarts that resume from stored offsets, and pause / resume / stop / offsets.

use std::collections::BTreeSet;

use medconnect_e2e::{TestCluster, eventually, json, lines, wait_for_lines};

/// (task, seq) of each generated event in a file written by the file sink.
fn events(lines: &[String]) -> Vec<(u64, u64)> {
    lines
        .iter()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"));
            (v["task"].as_u64().unwrap(), v["seq"].as_u64().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagen_to_kafka_to_file_delivers_every_record_once() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let output = cluster.path("vitals.jsonl");
    worker
        .rest
        .create(
            "vitals-in",
            json!({"connector.class": "DatagenSource", "topic": "vitals", "tasks.max": "2", "rate": "0",
                   "max.records": "2000", "topic.creation.default.partitions": "3",
                   "transforms": "site", "transforms.site.type": "org.apache.kafka.connect.transforms.InsertField$Value",
                   "transforms.site.static.field": "site", "transforms.site.static.value": "icu-1"}),
        )
        .await?;
    worker
        .rest
        .create("vitals-out", json!({"connector.class": "FileSink", "topics": "vitals", "file": output.to_str().unwrap()}))
        .await?;

    let written = wait_for_lines(&output, 2000).await?;
    // Stop the sink so nothing more can be appended, then count exactly.
    assert_eq!(
        worker
            .rest
            .put_empty("/connectors/vitals-out/stop")
            .await?
            .0,
        204
    );
    worker.wait_for_state("vitals-out", "STOPPED", 0).await?;
    let written = if written.len() == 2000 {
        written
    } else {
        lines(&output)
    };
    let events = events(&written);
    assert_eq!(events.len(), 2000, "exactly the generated records");
    let distinct: BTreeSet<_> = events.iter().collect();
    assert_eq!(distinct.len(), 2000, "no duplicates");
    assert_eq!(
        events.iter().filter(|(task, _)| *task == 0).count(),
        1000,
        "tasks.max=2 splits max.records"
    );
    assert!(
        written.iter().all(|l| l.contains("\"site\":\"icu-1\"")),
        "the transform ran on every record"
    );

    // Any Kafka client reads the same records, with their headers.
    let records = cluster.read_topic("vitals", 2000).await?;
    assert_eq!(records.len(), 2000);
    assert_eq!(
        cluster.count_records("vitals").await?,
        2000,
        "nothing more than the generated records"
    );
    assert!(
        records
            .iter()
            .all(|r| r.header("content-type") == Some("application/json"))
    );
    assert!(
        records
            .iter()
            .all(|r| r.key.as_deref().is_some_and(|k| k.starts_with("MRN")))
    );
    assert_eq!(
        records
            .iter()
            .map(|r| r.partition)
            .collect::<BTreeSet<_>>()
            .len(),
        3,
        "spread over the 3 partitions"
    );

    let (_, offsets) = worker.rest.get("/connectors/vitals-in/offsets").await?;
    let mut stored: Vec<(u64, u64)> = offsets["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["partition"]["task"].as_u64().unwrap(),
                o["offset"]["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    stored.sort();
    assert_eq!(
        stored,
        vec![(0, 999), (1, 999)],
        "offsets of the last record of each task"
    );

    let (_, metrics) = worker.rest.get_text("/metrics").await?;
    assert!(
        metrics.contains("medconnect_records_out_total{connector=\"vitals-in\",task=\"0\"} 1000"),
        "{metrics}"
    );
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_resumes_from_stored_offsets_without_loss() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let output = cluster.path("adt.jsonl");
    let first = cluster.start_worker().await?;
    first
        .rest
        .create("adt-in", json!({"connector.class": "DatagenSource", "schema": "adt", "topic": "adt", "rate": "2000", "max.records": "4000"}))
        .await?;
    first
        .rest
        .create("adt-out", json!({"connector.class": "FileSink", "topics": "adt", "file": output.to_str().unwrap()}))
        .await?;
    // Stop the worker in the middle of the stream.
    wait_for_lines(&output, 500).await?;
    first.shutdown().await;
    let at_restart = lines(&output).len();
    assert!(
        at_restart < 4000,
        "the worker stopped before the end ({at_restart} lines)"
    );

    // A new worker on the same internal topics picks up both connectors where they stopped.
    let second = cluster.start_worker().await?;
    assert_eq!(
        second.rest.get("/connectors").await?.1,
        json!(["adt-in", "adt-out"])
    );
    let written = wait_for_lines(&output, 4000).await?;
    assert_eq!(
        second.rest.put_empty("/connectors/adt-out/stop").await?.0,
        204
    );
    second.wait_for_state("adt-out", "STOPPED", 0).await?;
    let written = if written.len() == 4000 {
        written
    } else {
        lines(&output)
    };
    let seqs: Vec<u64> = events(&written).into_iter().map(|(_, seq)| seq).collect();
    assert_eq!(
        seqs.len(),
        4000,
        "a graceful restart neither loses nor repeats a record"
    );
    assert_eq!(seqs.iter().collect::<BTreeSet<_>>().len(), 4000);
    assert_eq!(
        cluster.count_records("adt").await?,
        4000,
        "the source did not produce a record twice"
    );
    second.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_source_tails_and_resumes_after_restart() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let input = cluster.path("in.txt");
    let output = cluster.path("out.txt");
    std::fs::write(&input, "MSH|1\nMSH|2\n")?;
    let worker = cluster.start_worker().await?;
    worker
        .rest
        .create("tail", json!({"connector.class": "FileSource", "file": input.to_str().unwrap(), "topic": "lines", "poll.interval.ms": "20"}))
        .await?;
    worker
        .rest
        .create("copy", json!({"connector.class": "FileSink", "topics": "lines", "file": output.to_str().unwrap()}))
        .await?;
    wait_for_lines(&output, 2).await?;
    // A partial line is not read until it is complete.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&input)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"MSH|3\nMSH|4"))?;
    wait_for_lines(&output, 3).await?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&input)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"-done\n"))?;
    wait_for_lines(&output, 4).await?;
    worker.shutdown().await;

    std::fs::OpenOptions::new()
        .append(true)
        .open(&input)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"MSH|5\n"))?;
    let worker = cluster.start_worker().await?;
    let written = wait_for_lines(&output, 5).await?;
    assert_eq!(
        written,
        vec!["MSH|1", "MSH|2", "MSH|3", "MSH|4-done", "MSH|5"]
    );
    assert_eq!(worker.rest.put_empty("/connectors/copy/stop").await?.0, 204);
    worker.wait_for_state("copy", "STOPPED", 0).await?;
    assert_eq!(
        lines(&output).len(),
        5,
        "no line read twice after the restart"
    );
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_stop_and_offsets_reset() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let rest = &worker.rest;
    rest.create("gen", json!({"connector.class": "DatagenSource", "topic": "gen", "rate": "500", "batch.size": "10"}))
        .await?;
    worker.wait_for_state("gen", "RUNNING", 1).await?;
    let seq = async || -> Option<u64> {
        let (_, offsets) = rest.get("/connectors/gen/offsets").await.ok()?;
        offsets["offsets"][0]["offset"]["seq"].as_u64()
    };
    eventually("records to flow", async || {
        (seq().await? > 20).then_some(())
    })
    .await?;

    assert_eq!(rest.put_empty("/connectors/gen/pause").await?.0, 202);
    worker.wait_for_state("gen", "PAUSED", 1).await?;
    // Once in-flight records settled, a paused connector produces nothing.
    let mut last = None;
    let settled = eventually("the stored offset to settle", async || {
        let now = seq().await;
        let stable = now.is_some() && now == last;
        last = now;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        stable.then_some(now?)
    })
    .await?;
    let before_wait = cluster.count_records("gen").await?;
    assert_eq!(
        before_wait as u64,
        settled + 1,
        "every produced record's offset is stored"
    );
    assert_eq!(seq().await, Some(settled), "paused: no new records");

    assert_eq!(rest.put_empty("/connectors/gen/resume").await?.0, 202);
    worker.wait_for_state("gen", "RUNNING", 1).await?;
    eventually("records to flow again", async || {
        (seq().await? > settled + 20).then_some(())
    })
    .await?;

    // Offsets can only be changed when STOPPED (KIP-875).
    let (code, error) = rest.delete("/connectors/gen/offsets").await?;
    assert_eq!(code, 400);
    assert!(error["message"].as_str().unwrap().contains("STOPPED"));
    assert_eq!(rest.put_empty("/connectors/gen/stop").await?.0, 204);
    let stopped = worker.wait_for_state("gen", "STOPPED", 0).await?;
    assert_eq!(stopped["tasks"], json!([]));
    assert!(
        rest.get("/connectors/gen/tasks")
            .await?
            .1
            .as_array()
            .unwrap()
            .is_empty()
    );

    let (_, offsets) = rest.get("/connectors/gen/offsets").await?;
    let seq = offsets["offsets"][0]["offset"]["seq"].as_u64().unwrap();
    assert!(seq > 40, "offset {seq}");

    // Rewind to seq 10: the restarted task produces seq 11 again.
    let partition = offsets["offsets"][0]["partition"].clone();
    let (code, altered) = rest
        .patch(
            "/connectors/gen/offsets",
            &json!({"offsets": [{"partition": partition, "offset": {"seq": 10}}]}),
        )
        .await?;
    assert_eq!(code, 200, "{altered}");
    assert_eq!(
        altered["message"],
        "The offsets for this connector have been altered successfully"
    );
    assert_eq!(
        rest.get("/connectors/gen/offsets").await?.1["offsets"][0]["offset"]["seq"],
        10
    );

    // Reset: nothing stored, so the next start begins at seq 0.
    let (code, reset) = rest.delete("/connectors/gen/offsets").await?;
    assert_eq!(code, 200);
    assert_eq!(
        reset["message"],
        "The offsets for this connector have been reset successfully"
    );
    assert_eq!(
        rest.get("/connectors/gen/offsets").await?.1["offsets"],
        json!([])
    );
    let before = cluster.count_records("gen").await?;
    assert_eq!(rest.put_empty("/connectors/gen/resume").await?.0, 202);
    worker.wait_for_state("gen", "RUNNING", 1).await?;
    let records = cluster.read_topic("gen", before + 5).await?;
    let zeros = records.iter().filter(|r| r.json()["seq"] == 0).count();
    assert_eq!(zeros, 2, "after the reset the stream starts again at seq 0");
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_offsets_are_the_consumer_group_offsets() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let rest = &worker.rest;
    let output = cluster.path("orders.txt");
    let records: Vec<(Option<&str>, &str)> = (0..10).map(|_| (None, "ORM^O01")).collect();
    cluster.produce("orders", &records).await?;
    rest.create("orders-out", json!({"connector.class": "FileSink", "topics": "orders", "file": output.to_str().unwrap()}))
        .await?;
    wait_for_lines(&output, 10).await?;
    assert_eq!(rest.put_empty("/connectors/orders-out/stop").await?.0, 204);
    worker.wait_for_state("orders-out", "STOPPED", 0).await?;
    let (_, offsets) = rest.get("/connectors/orders-out/offsets").await?;
    assert_eq!(
        offsets["offsets"],
        json!([{"partition": {"kafka_topic": "orders", "kafka_partition": 0}, "offset": {"kafka_offset": 10}}])
    );
    // Rewind the group to offset 7: three records are delivered again on resume.
    let (code, _) = rest
        .patch("/connectors/orders-out/offsets", &json!({"offsets": [{"partition": {"kafka_topic": "orders", "kafka_partition": 0}, "offset": {"kafka_offset": 7}}]}))
        .await?;
    assert_eq!(code, 200);
    assert_eq!(
        rest.put_empty("/connectors/orders-out/resume").await?.0,
        202
    );
    wait_for_lines(&output, 13).await?;
    worker.shutdown().await;
    Ok(())
}

/// A sink created before its topic exists — a source and its sink created together, the
/// source's topic made by its first record — reads the topic once it appears, within seconds:
/// librdkafka would look for it again only at its 5-minute metadata refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_created_before_its_topic_reads_it_once_it_appears() -> anyhow::Result<()> {
    const RECORDS: usize = 100;
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let output = cluster.path("late.jsonl");
    worker
        .rest
        .create(
            "late-out",
            json!({"connector.class": "FileSink", "topics": "late.vitals", "file": output.to_str().unwrap()}),
        )
        .await?;
    // Its consumer has subscribed and found no such topic.
    eventually("the sink to report its topic missing", async || {
        worker.rest.error_counted("late-out", "KAFKA_CONSUME").await
    })
    .await?;
    let values: Vec<String> = (0..RECORDS).map(|n| format!("{{\"n\":{n}}}")).collect();
    let records: Vec<(Option<&str>, &str)> = values.iter().map(|v| (None, v.as_str())).collect();
    cluster.produce("late.vitals", &records).await?;
    let written = wait_for_lines(&output, RECORDS).await?;
    assert_eq!(written, values, "every record once, in order");
    worker.shutdown().await;
    Ok(())
}
