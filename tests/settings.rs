//! Settings validation through the REST API of a real worker: numeric settings that would
//! panic or overflow a task, `tasks.max` beyond the worker's limit or beyond what a connector
//! can run. Each is a 400 naming the setting (and an error on it at the validate endpoint),
//! never a task that panics or a worker that exhausts its memory. A connector's own checks
//! may ask its peer (async `validate` and `task_configs`), bounded in time and never holding
//! other writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind, Props,
    SourceConnector, SourceRecord, SourceTask, SourceTaskContext, TaskConfig,
};
use medconnect_e2e::{DEADLINE, Rest, TestCluster, TestWorker, eventually, json};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

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

/// A source connector that asks its peer over TCP, as a FHIR or database connector would:
/// `validate` sends `validate` and takes the answer line (`ok`, or why the peer refuses), and
/// `task_configs` sends `tables` and makes one task per table of the comma-separated answer.
/// Each task holds its table, parsed when the task is created: an empty one is a config error.
struct PeerCheckedSource;

const PEER_ADDRESS: &str = "peer.address";
const TABLE: &str = "table";

async fn ask_peer(config: &Props, question: &str) -> ConnectResult<String> {
    let address = config
        .get(PEER_ADDRESS)
        .ok_or_else(|| ConnectError::config(PEER_ADDRESS, "missing"))?;
    let stream = TcpStream::connect(address).await?;
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{question}\n").as_bytes()).await?;
    let mut answer = String::new();
    BufReader::new(read).read_line(&mut answer).await?;
    Ok(answer.trim().to_string())
}

#[async_trait]
impl Connector for PeerCheckedSource {
    fn class(&self) -> &'static str {
        "test.PeerCheckedSource"
    }
    fn version(&self) -> &'static str {
        "0"
    }
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Source
    }
    fn config_def(&self) -> ConfigDef {
        ConfigDef::new()
    }
    async fn validate(&self, config: &Props) -> ConnectResult<()> {
        match ask_peer(config, "validate").await?.as_str() {
            "ok" => Ok(()),
            refusal => Err(ConnectError::config(PEER_ADDRESS, refusal)),
        }
    }
    async fn task_configs(
        &self,
        context: &ConnectorContext,
        max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        let tables = ask_peer(&context.config, "tables").await?;
        Ok(tables
            .split(',')
            .take(max_tasks)
            .map(|table| {
                let mut config = context.config.clone();
                config.insert(TABLE.into(), table.to_string());
                config
            })
            .collect())
    }
}

impl SourceConnector for PeerCheckedSource {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        match context.config.get(TABLE).filter(|t| !t.is_empty()) {
            Some(table) => Ok(Box::new(TableTask(table.clone()))),
            None => Err(ConnectError::config(TABLE, "no table to read")),
        }
    }
}

/// Reads nothing: only its creation and state matter here.
struct TableTask(#[allow(dead_code)] String);

#[async_trait]
impl SourceTask for TableTask {
    async fn start(&mut self) -> ConnectResult<()> {
        Ok(())
    }
    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Vec::new())
    }
    async fn stop(&mut self) -> ConnectResult<()> {
        Ok(())
    }
}

/// The connector's peer: answers `tables` at once, and `validate` only once the test gives
/// the answer (never, if it never does).
struct Peer {
    address: String,
    validations: Arc<AtomicUsize>,
    answer: watch::Sender<Option<String>>,
}

impl Peer {
    async fn start(tables: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let validations = Arc::new(AtomicUsize::new(0));
        let (answer, answers) = watch::channel(None::<String>);
        let (tables, counted) = (tables.to_string(), validations.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (tables, counted, mut answers) =
                    (tables.clone(), counted.clone(), answers.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut question = String::new();
                    BufReader::new(read).read_line(&mut question).await?;
                    let reply = if question.trim() == "validate" {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let given = answers.wait_for(Option::is_some).await?;
                        given.clone().unwrap_or_default()
                    } else {
                        tables
                    };
                    write.write_all(format!("{reply}\n").as_bytes()).await?;
                    anyhow::Ok(())
                });
            }
        });
        Ok(Self {
            address,
            validations,
            answer,
        })
    }

    fn config(&self) -> Value {
        json!({"connector.class": "test.PeerCheckedSource", PEER_ADDRESS: self.address, "tasks.max": "4"})
    }
}

async fn worker_knowing_the_peer_checked_source(
    cluster: &TestCluster,
    call_timeout_ms: u64,
) -> anyhow::Result<TestWorker> {
    let mut config = cluster.worker_config();
    config.tasks.connector_call_timeout_ms = call_timeout_ms;
    let plugins = medconnect::builtin_plugins().with_source(Arc::new(PeerCheckedSource));
    cluster.start_worker_with_plugins(config, plugins).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_checks_its_peer_without_holding_other_writes_and_tasks_hold_typed_configs()
-> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    // Longer than the test's deadline: a write held by the slow check would time out.
    let worker = worker_knowing_the_peer_checked_source(&cluster, 300_000).await?;
    let peer = Peer::start("admissions,labs,,orders").await?;
    let creating = {
        let (rest, body) = (
            Rest::new(&worker.rest.url("")),
            json!({"name": "checked", "config": peer.config()}),
        );
        tokio::spawn(async move { rest.post("/connectors", &body).await })
    };
    eventually("the connector to ask its peer", async || {
        (peer.validations.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await?;

    // The peer has not answered yet: other connectors are still created (before, every
    // write waited behind the check, under the herder's lock).
    let other = json!({"name": "other", "config": datagen(json!({}))});
    let (code, body) = tokio::time::timeout(DEADLINE / 2, worker.rest.post("/connectors", &other))
        .await
        .map_err(|_| {
            anyhow::anyhow!("creating another connector waited for the peer's answer")
        })??;
    assert_eq!(code, 201, "{body}");
    assert!(!creating.is_finished());

    peer.answer.send_replace(Some("ok".into()));
    let (code, body) = creating.await??;
    assert_eq!(code, 201, "{body}");
    // One task per table the peer listed; the one with no table fails with the reason, from
    // its creation, and the others run.
    let status = eventually("three tasks RUNNING and one FAILED", async || {
        let (_, status) = worker.rest.get("/connectors/checked/status").await.ok()?;
        let states: Vec<&str> = status["tasks"]
            .as_array()?
            .iter()
            .filter_map(|t| t["state"].as_str())
            .collect();
        (states == ["RUNNING", "RUNNING", "FAILED", "RUNNING"]).then(|| status.clone())
    })
    .await?;
    let trace = status["tasks"][2]["trace"].as_str().unwrap_or_default();
    assert!(
        trace.contains("table") && trace.contains("no table to read"),
        "{trace}"
    );
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_refuses_or_never_answers_is_a_400() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = worker_knowing_the_peer_checked_source(&cluster, 1_000).await?;

    let refusing = Peer::start("admissions").await?;
    refusing
        .answer
        .send_replace(Some("certificate unknown".into()));
    let message = refused(&worker, "refused", &refusing.config(), PEER_ADDRESS).await?;
    assert!(message.contains("certificate unknown"), "{message}");

    let silent = Peer::start("admissions").await?;
    let message = refused(&worker, "silent", &silent.config(), "connector.class").await?;
    assert!(
        message.contains("within 1000 ms (connector_call_timeout_ms)"),
        "{message}"
    );
    // The connector's own checks run only once every single setting is valid, name included.
    let mut named = silent.config();
    named["name"] = json!("silent");
    let errors =
        validate_errors(&worker, "test.PeerCheckedSource", &named, "connector.class").await?;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(worker.rest.get("/connectors").await?.1, json!([]));
    worker.shutdown().await;
    Ok(())
}
