//! Connect's error handling against a real broker: poisoned records go to the dead-letter
//! topic with `__connect.errors.*` headers (sinks and sources), or fail the task visibly.

use medconnect_e2e::{TestCluster, json, lines, wait_for_lines};

/// A sink whose transform needs JSON: the non-JSON record is poison.
fn poisoned_sink(file: &str, tolerance: &str) -> serde_json::Value {
    json!({
        "connector.class": "FileSink", "topics": "labs", "file": file,
        "transforms": "tag", "transforms.tag.type": "InsertField$Value",
        "transforms.tag.static.field": "checked", "transforms.tag.static.value": "yes",
        "errors.tolerance": tolerance,
        "errors.deadletterqueue.topic.name": "labs.dlq",
        "errors.deadletterqueue.context.headers.enable": "true",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_record_goes_to_the_dead_letter_topic_with_context_headers() -> anyhow::Result<()>
{
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let output = cluster.path("labs.jsonl");
    cluster
        .produce(
            "labs",
            &[
                (Some("MRN1"), r#"{"test":"K","value":4.1}"#),
                (Some("MRN2"), "OBX|1|NM|K^Potassium"),
                (Some("MRN3"), r#"{"test":"Na","value":139}"#),
            ],
        )
        .await?;
    worker
        .rest
        .create("labs-out", poisoned_sink(output.to_str().unwrap(), "all"))
        .await?;

    let written = wait_for_lines(&output, 2).await?;
    assert_eq!(written.len(), 2);
    assert!(written.iter().all(|l| l.contains("\"checked\":\"yes\"")));

    let dead = cluster.read_topic("labs.dlq", 1).await?;
    let record = &dead[0];
    assert_eq!(
        record.value.as_deref(),
        Some("OBX|1|NM|K^Potassium"),
        "the original record, unchanged"
    );
    assert_eq!(record.key.as_deref(), Some("MRN2"));
    assert_eq!(record.header("__connect.errors.topic"), Some("labs"));
    assert_eq!(record.header("__connect.errors.partition"), Some("0"));
    assert_eq!(record.header("__connect.errors.offset"), Some("1"));
    assert_eq!(
        record.header("__connect.errors.connector.name"),
        Some("labs-out")
    );
    assert_eq!(record.header("__connect.errors.task.id"), Some("0"));
    assert_eq!(
        record.header("__connect.errors.stage"),
        Some("TRANSFORMATION")
    );
    assert_eq!(
        record.header("__connect.errors.class.name"),
        Some("org.apache.kafka.connect.transforms.InsertField$Value")
    );
    assert_eq!(
        record.header("__connect.errors.exception.class.name"),
        Some("DataException")
    );
    assert!(
        record
            .header("__connect.errors.exception.message")
            .is_some_and(|m| m.contains("not JSON"))
    );

    worker.wait_for_state("labs-out", "RUNNING", 1).await?;
    let (_, metrics) = worker.rest.get_text("/metrics").await?;
    assert!(
        metrics.contains("medconnect_dlq_records_total{connector=\"labs-out\",task=\"0\"} 1"),
        "{metrics}"
    );

    // The poisoned record's offset is committed too: a restart does not deliver it again.
    worker.shutdown().await;
    let worker = cluster.start_worker().await?;
    worker.wait_for_state("labs-out", "RUNNING", 1).await?;
    cluster
        .produce("labs", &[(None, r#"{"test":"Cl"}"#)])
        .await?;
    wait_for_lines(&output, 3).await?;
    assert_eq!(cluster.count_records("labs.dlq").await?, 1);
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tolerance_a_poisoned_record_fails_the_task_and_restart_retries_it()
-> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let output = cluster.path("labs.jsonl");
    cluster
        .produce("labs", &[(None, r#"{"a":1}"#), (None, "not json")])
        .await?;
    worker
        .rest
        .create("strict", poisoned_sink(output.to_str().unwrap(), "none"))
        .await?;

    let failed = worker.wait_for_task("strict", 0, "FAILED").await?;
    assert!(
        failed["trace"]
            .as_str()
            .is_some_and(|t| t.contains("not JSON")),
        "{failed}"
    );
    let (_, status) = worker.rest.get("/connectors/strict/status").await?;
    assert_eq!(
        status["connector"]["state"], "RUNNING",
        "the connector is fine, its task failed"
    );
    assert_eq!(
        cluster.count_records("labs.dlq").await?,
        0,
        "nothing tolerated, nothing dead-lettered"
    );
    // The worker is still serving.
    assert_eq!(worker.rest.get("/connectors").await?.0, 200);

    let (code, restarted) = worker
        .rest
        .post_empty("/connectors/strict/restart?includeTasks=true&onlyFailed=true")
        .await?;
    assert_eq!(code, 202, "{restarted}");
    // The record is still poison: the restarted task fails again on it, having lost nothing.
    worker.wait_for_task("strict", 0, "FAILED").await?;
    assert!(lines(&output).len() <= 1);

    // Tolerating the error lets the connector move on, the poison to the dead-letter topic.
    let (code, _) = worker
        .rest
        .patch(
            "/connectors/strict/config",
            &json!({"errors.tolerance": "all"}),
        )
        .await?;
    assert_eq!(code, 200);
    worker.wait_for_state("strict", "RUNNING", 1).await?;
    cluster.read_topic("labs.dlq", 1).await?;
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_dead_letter_records_their_transforms_reject() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let input = cluster.path("feed.txt");
    std::fs::write(&input, "{\"hr\":80}\nMSH|^~\\&|garbage\n{\"hr\":82}\n")?;
    worker
        .rest
        .create(
            "feed",
            json!({"connector.class": "FileSource", "file": input.to_str().unwrap(), "topic": "feed", "poll.interval.ms": "20",
                   "transforms": "tag", "transforms.tag.type": "InsertField$Value",
                   "transforms.tag.static.field": "unit", "transforms.tag.static.value": "ICU",
                   "errors.tolerance": "all", "errors.deadletterqueue.topic.name": "feed.dlq",
                   "errors.deadletterqueue.context.headers.enable": "true"}),
        )
        .await?;
    let good = cluster.read_topic("feed", 2).await?;
    assert_eq!(
        good.iter()
            .map(|r| r.json()["hr"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![80, 82]
    );
    let dead = cluster.read_topic("feed.dlq", 1).await?;
    assert_eq!(dead[0].value.as_deref(), Some("MSH|^~\\&|garbage"));
    assert_eq!(
        dead[0].header("__connect.errors.stage"),
        Some("TRANSFORMATION")
    );
    assert_eq!(dead[0].header("__connect.errors.topic"), Some("feed"));
    let source_offset: serde_json::Value =
        serde_json::from_str(dead[0].header("__connect.errors.source.offset").unwrap())?;
    assert_eq!(
        source_offset["position"], 27,
        "where the rejected line ends in the file"
    );
    worker.wait_for_state("feed", "RUNNING", 1).await?;
    worker.shutdown().await;
    Ok(())
}
