//! What the tests against osmem-server share: the server itself (started per test on a free
//! port, killed when the guard drops), a task driven as the engine drives it, records, and
//! queries that count documents.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use medconnect_api::{
    ConnectError, ErrantRecordReporter, Props, Record, SinkPartitions, SinkRecord, SinkTask,
    SinkTaskContext,
};
use medconnect_elasticsearch::ElasticsearchSinkTask;
use serde_json::Value;
use tokio::sync::mpsc;

pub const DEADLINE: Duration = Duration::from_secs(60);

/// The osmem-server binary; fails (never skips) when it is not installed.
fn osmem_binary() -> PathBuf {
    let binary = std::env::var_os("MEDCONNECT_OSMEM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let venv = std::env::var_os("MEDCONNECT_VENV")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    std::env::var_os("MEDCONNECT_CACHE")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| {
                            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                                .join(".cache/medconnect")
                        })
                        .join("venv")
                });
            venv.join("bin/osmem-server")
        });
    assert!(
        binary.is_file(),
        "osmem-server is not installed at {}: run scripts/elasticsearch-peers (and set MEDCONNECT_OSMEM_BIN to the path it prints if it is not the default)",
        binary.display()
    );
    binary
}

/// An osmem-server of this test's own, on a port it picked; killed on drop.
pub struct Osmem {
    child: Child,
    pub url: String,
}

impl Osmem {
    pub fn start() -> Self {
        Self::start_at("127.0.0.1:0")
    }

    /// On a given address (a port a task already points at).
    pub fn start_at(address: &str) -> Self {
        let mut child = Command::new(osmem_binary())
            .args(["-addr", address, "-no-stdin-watch", "-no-ja"])
            // Gone with the test process even if it dies before the guard drops.
            .args(["-parent-pid", &std::process::id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start osmem-server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        // Its first line says where it listens: {"url":"http://127.0.0.1:PORT",...}.
        let line = rx
            .recv_timeout(DEADLINE)
            .expect("osmem-server says where it listens");
        let started: Value = serde_json::from_str(&line).expect("a JSON line");
        let url = started["url"].as_str().expect("url").to_string();
        Self { child, url }
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = reqwest::Client::new().request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("osmem-server answers");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Documents in the indexes matching `pattern`, once everything written is searchable.
    pub async fn count(&self, pattern: &str) -> u64 {
        let (status, _) = self.request(reqwest::Method::POST, "/_refresh", None).await;
        assert_eq!(status, 200, "refresh");
        let (status, body) = self
            .request(reqwest::Method::GET, &format!("/{pattern}/_count"), None)
            .await;
        assert_eq!(status, 200, "count: {body}");
        body["count"].as_u64().expect("count")
    }
}

impl Drop for Osmem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn props(pairs: &[(&str, &str)]) -> Props {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub type Errant = mpsc::UnboundedReceiver<(SinkRecord, ConnectError)>;

/// A started task with the engine's side collected as the tests need it.
pub async fn task(
    url: &str,
    pairs: &[(&str, &str)],
    partitions: SinkPartitions,
) -> (ElasticsearchSinkTask, Errant) {
    let mut config = props(&[("connection.url", url)]);
    config.extend(props(pairs));
    let (errant_tx, errant_rx) = mpsc::unbounded_channel();
    let mut task = ElasticsearchSinkTask::new(SinkTaskContext {
        connector_name: "es-test".into(),
        task_id: 0,
        config,
        errant_records: ErrantRecordReporter::collecting(errant_tx),
        partitions,
        peers: medconnect_api::relay::alone(),
    })
    .expect("a valid task config");
    task.start().await.expect("start");
    (task, errant_rx)
}

/// `count` vitals records over three partitions of `topic`, one document each.
pub fn vitals(topic: &str, count: usize) -> Vec<SinkRecord> {
    (0..count)
        .map(|i| {
            let value = serde_json::json!({
                "patient": format!("p{}", i % 97),
                "hr": 60 + (i % 40),
                "spo2": 90 + (i % 10),
                "seq": i,
            });
            SinkRecord {
                record: Record::new(topic)
                    .with_key(format!("p{}", i % 97))
                    .with_value(value.to_string())
                    .with_timestamp(1_704_164_645_000 + i as i64),
                kafka_partition: (i % 3) as i32,
                kafka_offset: (i / 3) as i64,
            }
        })
        .collect()
}

/// Puts records in batches as the engine would, then waits (within the deadline) until the
/// cluster acknowledged all of them.
pub async fn put_all(task: &mut ElasticsearchSinkTask, records: &[SinkRecord], batch: usize) {
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
