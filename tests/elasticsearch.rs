//! The Elasticsearch sink in a real worker against a real broker: datagen vitals through
//! Kafka into osmem-server (an OpenSearch-API emulator; `scripts/elasticsearch-peers` installs
//! it), behind an HTTP proxy that answers 429 to every third `_bulk`. Every record arrives
//! once, the task stays RUNNING throughout, and the committed offsets reach the end.
//!
//! The sink's settings keep it below its pause threshold (2 x batch.size x in-flight =
//! 4,000 documents): the embedded broker (tansu 0.6) answers nothing to a fetch that starts
//! inside a record batch, which is where librdkafka resumes a partition paused mid-batch, so
//! a paused partition never delivers again here. Pausing is tested at the task level
//! (connectors/elasticsearch/tests/faults.rs).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use medconnect_e2e::{TestCluster, eventually, json};

/// osmem-server on a free port, killed on drop.
struct Osmem {
    child: Child,
    url: String,
}

impl Osmem {
    fn start() -> Self {
        let binary = std::env::var_os("MEDCONNECT_OSMEM_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let cache = std::env::var_os("MEDCONNECT_CACHE")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                            .join(".cache/medconnect")
                    });
                cache.join("venv/bin/osmem-server")
            });
        assert!(
            binary.is_file(),
            "osmem-server missing at {}: run scripts/elasticsearch-peers",
            binary.display()
        );
        let mut child = Command::new(binary)
            .args(["-addr", "127.0.0.1:0", "-no-stdin-watch", "-no-ja"])
            .args(["-parent-pid", &std::process::id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start osmem-server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("osmem-server says where it listens");
        let started: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        let url = started["url"].as_str().expect("url").to_string();
        Self { child, url }
    }

    async fn count(&self, pattern: &str) -> Option<u64> {
        let client = reqwest::Client::new();
        client
            .post(format!("{}/_refresh", self.url))
            .send()
            .await
            .ok()?;
        let answer: serde_json::Value = client
            .get(format!("{}/{pattern}/_count", self.url))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        answer["count"].as_u64()
    }
}

impl Drop for Osmem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone)]
struct Proxy {
    upstream: String,
    client: reqwest::Client,
    bulks: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

/// Forwards everything to osmem-server except every third `_bulk`, answered 429.
async fn forward(
    State(proxy): State<Proxy>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if uri.path().ends_with("/_bulk") && (proxy.bulks.fetch_add(1, Ordering::SeqCst) + 1) % 3 == 0 {
        proxy.refused.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"error":{"type":"es_rejected_execution_exception","reason":"rejected by the test proxy"},"status":429}"#,
        )
            .into_response();
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = proxy
        .client
        .request(method, format!("{}{path}", proxy.upstream))
        .body(body);
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    match request.send().await {
        Ok(answer) => {
            let status = answer.status();
            let body = answer.bytes().await.unwrap_or_default();
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vitals_reach_the_index_once_each_through_429s_with_the_task_running_throughout()
-> anyhow::Result<()> {
    let osmem = Osmem::start();
    let proxy = Proxy {
        upstream: osmem.url.clone(),
        client: reqwest::Client::new(),
        bulks: Arc::default(),
        refused: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy_url = format!("http://{}", listener.local_addr()?);
    let app = axum::Router::new()
        .fallback(forward)
        .with_state(proxy.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    worker
        .rest
        .create(
            "vitals-in",
            json!({"connector.class": "DatagenSource", "topic": "vitals", "rate": "0",
                   "max.records": "3000", "topic.creation.default.partitions": "3"}),
        )
        .await?;
    worker
        .rest
        .create(
            "vitals-search",
            json!({"connector.class": "ElasticsearchSink", "topics": "vitals",
                   "connection.url": proxy_url, "index": "vitals-${yyyy.MM.dd}",
                   "key.ignore": "true", "batch.size": "500", "max.in.flight.requests": "4",
                   "max.retries": "1", "retry.backoff.ms": "20"}),
        )
        .await?;
    worker.wait_for_state("vitals-search", "RUNNING", 1).await?;

    // Until every document is in, the sink's task is RUNNING at every look.
    let mut states = Vec::new();
    let counted = eventually("3,000 documents in vitals-*", async || {
        let (_, status) = worker
            .rest
            .get("/connectors/vitals-search/status")
            .await
            .ok()?;
        states.push(
            status["tasks"][0]["state"]
                .as_str()
                .unwrap_or("none")
                .to_string(),
        );
        osmem.count("vitals-*").await.filter(|n| *n >= 3000)
    })
    .await?;
    assert_eq!(counted, 3000, "each record once");
    assert!(
        states.iter().all(|s| s == "RUNNING"),
        "task states seen: {states:?}"
    );
    assert!(
        proxy.refused.load(Ordering::SeqCst) >= 2,
        "the proxy pushed back"
    );

    // The committed offsets reach the end of every partition: 3,000 records in all.
    eventually("offsets committed up to the end", async || {
        let (_, offsets) = worker
            .rest
            .get("/connectors/vitals-search/offsets")
            .await
            .ok()?;
        let total: i64 = offsets["offsets"]
            .as_array()?
            .iter()
            .filter_map(|o| o["offset"]["kafka_offset"].as_i64())
            .sum();
        (total == 3000).then_some(())
    })
    .await?;
    worker.shutdown().await;
    server.abort();
    Ok(())
}
