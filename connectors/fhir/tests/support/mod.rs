//! What the tests against a real Helios FHIR Server (`hfs`, see scripts/fhir-peers) share: one
//! server per test binary (each test writes resources of its own, told apart by identifier
//! system), tasks driven as the engine drives them, and FHIR requests to count what arrived.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use medconnect_api::{
    ConnectError, ErrantRecordReporter, Props, SinkPartitions, SinkRecord, SinkTask,
    SinkTaskContext, props_from,
};
use medconnect_fhir::FhirSinkTask;
use serde_json::Value;
use tokio::sync::mpsc;

pub const DEADLINE: Duration = Duration::from_secs(90);

fn cache() -> PathBuf {
    std::env::var_os("MEDCONNECT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/medconnect")
        })
}

/// The hfs binary and the R4 search parameters beside it; fails (never skips) when missing.
fn hfs_files() -> (PathBuf, PathBuf) {
    let binary = std::env::var_os("MEDCONNECT_HFS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache().join("hfs-0.2.7/bin/hfs"));
    let params = binary
        .parent()
        .and_then(|bin| bin.parent())
        .map(|root| root.join("search-parameters-r4.json"))
        .unwrap_or_default();
    assert!(
        binary.is_file() && params.is_file(),
        "hfs or its search parameters are not installed at {} / {}: run scripts/fhir-peers (and set MEDCONNECT_HFS_BIN to the path it prints if it is not the default)",
        binary.display(),
        params.display()
    );
    (binary, params)
}

/// A running hfs: SQLite in memory, the full R4 search parameters, its own data directory.
pub struct Hfs {
    pub url: String,
    port: u16,
    /// The wrapper shell kills hfs when this pipe closes: when the guard drops, or when the
    /// test process ends in any way (statics are never dropped).
    lifeline: Option<ChildStdin>,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Hfs {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Self::start_on(port)
    }

    pub fn start_on(port: u16) -> Self {
        let (binary, params) = hfs_files();
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        std::fs::copy(&params, data.join("search-parameters-r4.json")).expect("search parameters");
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
            .env("HFS_SUBSCRIPTIONS_ENABLED", "true")
            .env("HFS_SUBSCRIPTION_ALLOW_PRIVATE_ENDPOINTS", "true")
            .env("HFS_UI_ENABLED", "false")
            // It writes exports under its working directory.
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hfs");
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
        let hfs = Self {
            url,
            port,
            lifeline: Some(lifeline),
            child,
            _dir: dir,
        };
        hfs.wait_ready();
        hfs
    }

    fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + DEADLINE;
        let address = format!("127.0.0.1:{}", self.port);
        loop {
            if let Ok(mut stream) = std::net::TcpStream::connect(&address) {
                use std::io::{Read, Write};
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let request = format!(
                    "GET /metadata HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
                );
                let mut answer = String::new();
                if stream.write_all(request.as_bytes()).is_ok()
                    && stream.read_to_string(&mut answer).is_ok()
                    && answer.starts_with("HTTP/1.1 200")
                {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "hfs did not answer /metadata within {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .get(format!("{}/{path}", self.url))
            .header("Accept", "application/fhir+json")
            .send()
            .await
            .expect("hfs answers");
        let status = response.status().as_u16();
        let body = response.bytes().await.expect("body");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// Resources of `kind` with an identifier of `system`.
    pub async fn count(&self, kind: &str, system: &str) -> u64 {
        let (status, body) = self
            .get(&format!("{kind}?identifier={system}|&_summary=count"))
            .await;
        assert_eq!(status, 200, "count: {body}");
        body["total"].as_u64().expect("total")
    }

    /// A transaction Bundle posted directly (setting up what a test reads); sent again while
    /// hfs 0.2.7 answers "database table is locked" (a write meeting a concurrent read).
    pub async fn transaction(&self, entries: Vec<Value>) -> Value {
        let body =
            serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        for _ in 0..50 {
            let response = reqwest::Client::new()
                .post(&self.url)
                .header("Content-Type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .await
                .expect("hfs answers");
            let status = response.status().as_u16();
            let body: Value = response.json().await.expect("JSON");
            if status == 200 {
                return body;
            }
            assert!(
                body.to_string().contains("is locked") || status >= 500,
                "transaction: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("transaction: hfs stayed locked")
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

/// The server this test binary shares.
pub fn shared() -> &'static Hfs {
    static HFS: OnceLock<Hfs> = OnceLock::new();
    static STARTING: Mutex<()> = Mutex::new(());
    let _guard = STARTING.lock().unwrap_or_else(|e| e.into_inner());
    HFS.get_or_init(Hfs::start)
}

pub type Errant = mpsc::UnboundedReceiver<(SinkRecord, ConnectError)>;

pub fn sink_props(url: &str, pairs: &[(&str, &str)]) -> Props {
    let mut config = props_from(&[("fhir.url", url)]);
    config.extend(props_from(pairs));
    config
}

/// A started sink task with its errant records collected.
pub async fn sink_task(
    url: &str,
    pairs: &[(&str, &str)],
    partitions: SinkPartitions,
) -> (FhirSinkTask, Errant) {
    let (errant_tx, errant_rx) = mpsc::unbounded_channel();
    let mut task = FhirSinkTask::new(SinkTaskContext {
        connector_name: "fhir-test".into(),
        task_id: 0,
        config: sink_props(url, pairs),
        errant_records: ErrantRecordReporter::collecting(errant_tx),
        partitions,
        peers: medconnect_api::relay::alone(),
    })
    .expect("a valid task config");
    task.start().await.expect("start");
    (task, errant_rx)
}

/// Puts records in batches as the engine would, then flushes within the deadline.
pub async fn put_all(task: &mut FhirSinkTask, records: &[SinkRecord], batch: usize) {
    for chunk in records.chunks(batch) {
        tokio::time::timeout(DEADLINE, task.put(chunk.to_vec()))
            .await
            .expect("put returns")
            .expect("put");
    }
    tokio::time::timeout(DEADLINE, task.flush())
        .await
        .expect("flush within the deadline")
        .expect("flush");
}
