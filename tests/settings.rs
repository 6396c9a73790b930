//! Settings validation through the REST API of a real worker: numeric settings that would
//! panic or overflow a task, `tasks.max` beyond the worker's limit or beyond what a connector
//! can run. Each is a 400 naming the setting (and an error on it at the validate endpoint),
//! never a task that panics or a worker that exhausts its memory.

use medconnect_e2e::{TestCluster, TestWorker, json};
use serde_json::Value;

/// The errors the validate endpoint reports on one setting.
async fn validate_errors(
    worker: &TestWorker,
    plugin: &str,
    config: &Value,
    field: &str,
) -> anyhow::Result<Vec<String>> {
    let (code, body) = worker
        .rest
        .put(
            &format!("/connector-plugins/{plugin}/config/validate"),
            config,
        )
        .await?;
    anyhow::ensure!(code == 200, "validate answered {code}: {body}");
    Ok(body["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["value"]["name"] == field)
        .flat_map(|c| c["value"]["errors"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect())
}

/// Creating the connector answers 400 with a message naming `field`.
async fn refused(
    worker: &TestWorker,
    name: &str,
    config: &Value,
    field: &str,
) -> anyhow::Result<String> {
    let (code, body) = worker
        .rest
        .post("/connectors", &json!({"name": name, "config": config}))
        .await?;
    let message = body["message"].as_str().unwrap_or_default().to_string();
    let shown: String = body.to_string().chars().take(400).collect();
    anyhow::ensure!(
        code == 400 && message.contains(&format!("{field}:")),
        "{name}: expected a 400 naming {field}, got {code}: {shown}"
    );
    Ok(message)
}

fn datagen(extra: Value) -> Value {
    let mut config = json!({"connector.class": "DatagenSource", "topic": "vitals", "rate": "10"});
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_settings_that_would_panic_or_overflow_are_a_400_naming_the_setting()
-> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;

    // 1e-300 passed validation and panicked the task in Duration::from_secs_f64.
    for (field, value) in [
        ("rate", "1e-300"),
        ("rate", "NaN"),
        ("rate", "inf"),
        ("rate", "-inf"),
        ("rate", "1e400"),
        ("max.records", "9223372036854775808"),
        ("batch.size", "NaN"),
        ("tasks.max", "2147483648"),
        ("seed", "1e3"),
    ] {
        let config = datagen(json!({ field: value }));
        refused(&worker, "gen", &config, field).await?;
        let errors = validate_errors(&worker, "DatagenSource", &config, field).await?;
        assert_eq!(errors.len(), 1, "{field}={value}: {errors:?}");
    }
    let (code, listed) = worker.rest.get("/connectors").await?;
    assert_eq!((code, listed), (200, json!([])), "nothing was created");

    // The slowest rate accepted runs, and sends its first record at once.
    worker
        .rest
        .create(
            "slow",
            datagen(json!({"rate": "0.000001", "tasks.max": "3"})),
        )
        .await?;
    worker.wait_for_state("slow", "RUNNING", 3).await?;
    assert_eq!(
        cluster.count_records("vitals").await?,
        3,
        "one record per task, the next ones in 35 days"
    );
    worker.wait_for_state("slow", "RUNNING", 3).await?;
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_max_above_the_workers_limit_is_a_400_and_never_materialised() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    // Just above the default limit (1000) first: before the limit this was created (201).
    let message = refused(
        &worker,
        "many",
        &datagen(json!({"tasks.max": "1001"})),
        "tasks.max",
    )
    .await?;
    assert!(message.contains("1000"), "{message}");
    // The request that used to grow the worker's memory until the kernel killed it.
    refused(
        &worker,
        "many",
        &datagen(json!({"tasks.max": "1000000000"})),
        "tasks.max",
    )
    .await?;
    let errors = validate_errors(
        &worker,
        "DatagenSource",
        &datagen(json!({"tasks.max": "1000000000"})),
        "tasks.max",
    )
    .await?;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(worker.rest.get("/connectors").await?.1, json!([]));
    worker.shutdown().await;

    // A worker with a lower limit: at the limit is fine, above it is not.
    let mut config = cluster.worker_config();
    config.tasks.tasks_max_limit = 3;
    let worker = cluster.start_worker_with(config).await?;
    refused(
        &worker,
        "four",
        &datagen(json!({"tasks.max": "4"})),
        "tasks.max",
    )
    .await?;
    worker
        .rest
        .create("three", datagen(json!({"tasks.max": "3"})))
        .await?;
    worker.wait_for_state("three", "RUNNING", 3).await?;
    // A PATCH above the limit is refused too, and the connector keeps its tasks.
    let (code, body) = worker
        .rest
        .patch("/connectors/three/config", &json!({"tasks.max": "50"}))
        .await?;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("tasks.max:")),
        "{body}"
    );
    worker.wait_for_state("three", "RUNNING", 3).await?;
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_that_run_one_task_report_a_larger_tasks_max() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let file = cluster.path("lines.txt");
    let file = file.to_str().unwrap_or_default();
    let cases = [
        (
            "FileSource",
            json!({"connector.class": "FileSource", "file": file, "topic": "lines", "tasks.max": "2"}),
        ),
        (
            "FileSink",
            json!({"connector.class": "FileSink", "file": file, "topics": "lines", "tasks.max": "2"}),
        ),
        (
            "MllpSource",
            json!({"connector.class": "MllpSource", "mllp.bind": "127.0.0.1", "mllp.port": "0", "tasks.max": "2"}),
        ),
    ];
    for (plugin, config) in &cases {
        // Before, the extra tasks were silently dropped.
        let message = refused(&worker, "one", config, "tasks.max").await?;
        assert!(message.contains("at most 1 task"), "{plugin}: {message}");
        let errors = validate_errors(&worker, plugin, config, "tasks.max").await?;
        assert_eq!(errors.len(), 1, "{plugin}: {errors:?}");
    }
    assert_eq!(worker.rest.get("/connectors").await?.1, json!([]));
    let mut one = cases[0].1.clone();
    one["tasks.max"] = json!("1");
    worker.rest.create("one", one).await?;
    worker.wait_for_state("one", "RUNNING", 1).await?;
    worker.shutdown().await;
    Ok(())
}
