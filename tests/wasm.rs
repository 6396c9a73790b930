//! WASM transforms end to end: a real worker, the embedded broker, guests loaded from files.
//!
//! Misbehaving guests are the host's `.wat` fixtures (no toolchain needed). The example guests
//! (`plugins/examples/*.wasm`) are built by `scripts/build-plugins`, which `scripts/test` runs
//! through `scripts/wasm-peers`; the tests that need them fail, saying so, when they are missing.

use std::path::{Path, PathBuf};

use medconnect_e2e::{Received, TestCluster, TestWorker, json, lines, wait_for_lines};
use serde_json::Value;

const WASM_CLASS: &str = "io.medconnect.transforms.Wasm";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A host fixture: `runtime/src/transform/wasm/fixtures/<name>.wat`.
fn fixture(name: &str) -> String {
    repo()
        .join(format!("runtime/src/transform/wasm/fixtures/{name}.wat"))
        .to_string_lossy()
        .into_owned()
}

/// An example guest built by `scripts/build-plugins`; a clear failure when it was not built.
fn guest(name: &str) -> anyhow::Result<String> {
    let path = repo().join(format!("plugins/examples/{name}.wasm"));
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build the example guests with scripts/build-plugins (scripts/test does it through scripts/wasm-peers)",
        path.display()
    );
    Ok(path.to_string_lossy().into_owned())
}

/// A file sink on `topic` whose records pass through one WASM transform.
fn wasm_sink(
    topic: &str,
    file: &Path,
    module: &str,
    extra: &[(&str, &str)],
    dlq: Option<&str>,
) -> Value {
    let mut config = json!({
        "connector.class": "FileSink", "topics": topic, "file": file.to_str().unwrap(),
        "transforms": "guest", "transforms.guest.type": "wasm", "transforms.guest.module": module,
    });
    if let Some(dlq) = dlq {
        config["errors.tolerance"] = json!("all");
        config["errors.deadletterqueue.topic.name"] = json!(dlq);
        config["errors.deadletterqueue.context.headers.enable"] = json!("true");
    }
    for (key, value) in extra {
        config[format!("transforms.guest.{key}")] = json!(value);
    }
    config
}

fn assert_transformation_failure(record: &Received, connector: &str, cause: &str) {
    assert_eq!(
        record.header("__connect.errors.stage"),
        Some("TRANSFORMATION"),
        "{record:?}"
    );
    assert_eq!(
        record.header("__connect.errors.class.name"),
        Some(WASM_CLASS)
    );
    assert_eq!(
        record.header("__connect.errors.exception.class.name"),
        Some("DataException")
    );
    assert_eq!(
        record.header("__connect.errors.connector.name"),
        Some(connector)
    );
    assert_eq!(record.header("__connect.errors.topic"), Some("labs"));
    let message = record
        .header("__connect.errors.exception.message")
        .unwrap_or_default();
    assert!(
        message.contains(cause),
        "expected '{cause}' in the error message: {message}"
    );
}

async fn all_running(worker: &TestWorker, connectors: &[&str]) -> anyhow::Result<()> {
    for connector in connectors {
        worker.wait_for_state(connector, "RUNNING", 1).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_guests_fail_their_records_and_nothing_else() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    cluster
        .produce(
            "labs",
            &[
                (Some("MRN1"), r#"{"test":"K"}"#),
                (Some("MRN2"), "boom!"),
                (Some("MRN3"), r#"{"test":"Na"}"#),
            ],
        )
        .await?;

    let healthy = cluster.path("healthy.jsonl");
    let trapped = cluster.path("trapped.jsonl");
    let rest = &worker.rest;
    rest.create(
        "healthy",
        wasm_sink("labs", &healthy, &fixture("identity"), &[], None),
    )
    .await?;
    rest.create(
        "trapping",
        wasm_sink("labs", &trapped, &fixture("trap"), &[], Some("trap.dlq")),
    )
    .await?;
    rest.create(
        "looping",
        wasm_sink(
            "labs",
            &cluster.path("loop.jsonl"),
            &fixture("infinite-loop"),
            &[("timeout.ms", "50")],
            Some("loop.dlq"),
        ),
    )
    .await?;
    rest.create(
        "bomb",
        wasm_sink(
            "labs",
            &cluster.path("bomb.jsonl"),
            &fixture("memory-bomb"),
            &[("memory.max.bytes", "1048576")],
            Some("bomb.dlq"),
        ),
    )
    .await?;

    // The trapping guest fails only the record that makes it trap; its rebuilt instance
    // handles the next one.
    let written = wait_for_lines(&trapped, 2).await?;
    assert_eq!(written, vec![r#"{"test":"K"}"#, r#"{"test":"Na"}"#]);
    let dead = cluster.read_topic("trap.dlq", 1).await?;
    assert_eq!(
        dead[0].value.as_deref(),
        Some("boom!"),
        "the original record"
    );
    assert_eq!(dead[0].key.as_deref(), Some("MRN2"));
    assert_eq!(dead[0].header("__connect.errors.offset"), Some("1"));
    assert_transformation_failure(
        &dead[0],
        "trapping",
        "trapped: wasm `unreachable` instruction executed",
    );

    // Endless loops and memory bombs are stopped at their limits, every record dead-lettered.
    let dead = cluster.read_topic("loop.dlq", 3).await?;
    assert_eq!(dead.len(), 3);
    dead.iter().for_each(|r| {
        assert_transformation_failure(r, "looping", "exceeded its time limit of 50 ms")
    });
    let dead = cluster.read_topic("bomb.dlq", 3).await?;
    assert_eq!(dead.len(), 3);
    dead.iter().for_each(|r| {
        assert_transformation_failure(r, "bomb", "exceeded its memory limit of 1048576 bytes")
    });

    // The worker and its other connectors go on: REST answers, every task runs, and the
    // healthy connector keeps delivering.
    assert_eq!(wait_for_lines(&healthy, 3).await?.len(), 3);
    let (code, listed) = rest.get("/connectors").await?;
    assert_eq!(code, 200);
    assert_eq!(listed.as_array().map(Vec::len), Some(4), "{listed}");
    all_running(&worker, &["healthy", "trapping", "looping", "bomb"]).await?;
    cluster
        .produce("labs", &[(Some("MRN4"), r#"{"test":"Cl"}"#)])
        .await?;
    assert_eq!(wait_for_lines(&healthy, 4).await?[3], r#"{"test":"Cl"}"#);
    assert_eq!(wait_for_lines(&trapped, 3).await?[2], r#"{"test":"Cl"}"#);
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tolerance_a_looping_guest_fails_its_task_visibly() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    cluster
        .produce("labs", &[(None, r#"{"test":"K"}"#)])
        .await?;
    let output = cluster.path("out.jsonl");
    worker
        .rest
        .create(
            "strict",
            wasm_sink(
                "labs",
                &output,
                &fixture("infinite-loop"),
                &[("timeout.ms", "50")],
                None,
            ),
        )
        .await?;

    let failed = worker.wait_for_task("strict", 0, "FAILED").await?;
    let trace = failed["trace"].as_str().unwrap_or_default();
    assert!(
        trace.contains("exceeded its time limit of 50 ms"),
        "{failed}"
    );
    assert!(lines(&output).is_empty());
    assert_eq!(
        worker.rest.get("/connectors").await?.0,
        200,
        "the worker is still serving"
    );
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_modules_are_config_errors_on_the_module_setting() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let rest = &worker.rest;
    let output = cluster.path("out.jsonl");
    let missing = cluster
        .path("no-such-module.wasm")
        .to_string_lossy()
        .into_owned();

    let cases = [
        (missing.as_str(), "cannot read WASM module"),
        (
            &fixture("wrong-abi"),
            "speaks medconnect ABI version 99; this worker speaks version 1",
        ),
        (
            &fixture("imports-wasi"),
            "imports wasi_snapshot_preview1.fd_write",
        ),
    ];
    for (module, expected) in cases {
        let mut config = wasm_sink("labs", &output, module, &[], None);
        config["name"] = json!("bad");
        let (code, report) = rest
            .put("/connector-plugins/FileSink/config/validate", &config)
            .await?;
        assert_eq!(code, 200);
        assert_eq!(report["error_count"], 1, "{report}");
        let entry = report["configs"]
            .as_array()
            .and_then(|c| {
                c.iter()
                    .find(|c| c["value"]["name"] == "transforms.guest.module")
            })
            .cloned()
            .unwrap_or(Value::Null);
        let errors = entry["value"]["errors"].to_string();
        assert!(
            errors.contains(expected),
            "expected '{expected}' on transforms.guest.module: {report}"
        );

        let (code, refused) = rest
            .post("/connectors", &json!({"name": "bad", "config": config}))
            .await?;
        assert_eq!(code, 400, "{refused}");
        let message = refused["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("transforms.guest.module") && message.contains(expected),
            "{message}"
        );
    }
    let (_, listed) = rest.get("/connectors").await?;
    assert_eq!(listed, json!([]), "no invalid connector was created");

    // The guest's own configuration check is reported too.
    let mut config = wasm_sink(
        "labs",
        &output,
        &fixture("strict-config"),
        &[("config.colour", "blue")],
        None,
    );
    config["name"] = json!("bad");
    let (_, report) = rest
        .put("/connector-plugins/FileSink/config/validate", &config)
        .await?;
    assert!(
        report
            .to_string()
            .contains("the module rejected its configuration: unknown setting"),
        "{report}"
    );
    worker.shutdown().await;
    Ok(())
}
