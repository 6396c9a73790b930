//! The sink when the cluster pushes back or is away: a fault-injecting HTTP proxy in front of
//! a real osmem-server (which still answers everything the proxy forwards), and a cluster that
//! comes up only after the task started writing.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use medconnect_api::{
    ConnectResult, PartitionControl, SinkOffsets, SinkPartitions, SinkRecord, SinkTask,
    TopicPartition,
};
use serde_json::{Value, json};
use support::{DEADLINE, Osmem, put_all, task, vitals};

/// Answers 429 to every third `_bulk`; of the others, every fifth is forwarded but its
/// first item is reported back as rejected (the document is written all the same, as when
/// an answer is lost), so it is sent again and found already there.
#[derive(Clone)]
struct Proxy {
    upstream: String,
    client: reqwest::Client,
    bulks: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    items_rejected: Arc<AtomicUsize>,
    /// Faults only before this moment (`None`: always); afterwards everything is forwarded.
    faulty_until: Option<std::time::Instant>,
    /// Also report the first item of every fifth forwarded `_bulk` as rejected.
    reject_items: bool,
}

impl Proxy {
    fn new(upstream: &str, faulty_until: Option<std::time::Instant>, reject_items: bool) -> Self {
        Self {
            upstream: upstream.to_string(),
            client: reqwest::Client::new(),
            bulks: Arc::default(),
            refused: Arc::default(),
            items_rejected: Arc::default(),
            faulty_until,
            reject_items,
        }
    }

    fn faulty(&self) -> bool {
        self.faulty_until
            .is_none_or(|until| std::time::Instant::now() < until)
    }
}

/// Serves `app` (a proxy in front of osmem-server) on a free port: its URL and its task.
async fn serve(app: axum::Router) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    (
        url,
        tokio::spawn(async move { axum::serve(listener, app).await }),
    )
}

async fn forward(
    State(proxy): State<Proxy>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bulk = uri.path().ends_with("/_bulk");
    let n = if bulk {
        proxy.bulks.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        0
    };
    let faulty = proxy.faulty();
    if bulk && faulty && n % 3 == 0 {
        proxy.refused.fetch_add(1, Ordering::SeqCst);
        let error = json!({"error": {"type": "es_rejected_execution_exception", "reason": "rejected by the test proxy"}, "status": 429});
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::CONTENT_TYPE, "application/json")],
            error.to_string(),
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
    let Ok(answer) = request.send().await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let status = answer.status();
    let mut text = answer.bytes().await.unwrap_or_default().to_vec();
    if bulk && faulty && proxy.reject_items && n % 5 == 0 && status.is_success() {
        let mut parsed: Value = serde_json::from_slice(&text).expect("a _bulk answer");
        if let Some(item) = parsed["items"][0]
            .as_object_mut()
            .and_then(|i| i.values_mut().next())
        {
            item["status"] = json!(429);
            item["error"] = json!({"type": "es_rejected_execution_exception", "reason": "rejected by the test proxy"});
            parsed["errors"] = json!(true);
            proxy.items_rejected.fetch_add(1, Ordering::SeqCst);
        }
        text = parsed.to_string().into_bytes();
    }
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

/// Partition control that records what the task asked for.
#[derive(Default)]
struct Recorder {
    paused: AtomicBool,
    pauses: AtomicUsize,
    resumes: AtomicUsize,
}

impl PartitionControl for Recorder {
    fn assignment(&self) -> Vec<TopicPartition> {
        (0..3).map(|p| TopicPartition::new("vitals", p)).collect()
    }
    fn pause(&self, _: &[TopicPartition]) -> ConnectResult<()> {
        self.paused.store(true, Ordering::SeqCst);
        self.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self, _: &[TopicPartition]) -> ConnectResult<()> {
        self.paused.store(false, Ordering::SeqCst);
        self.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn positions(records: &[SinkRecord]) -> SinkOffsets {
    let mut offsets = SinkOffsets::new();
    for record in records {
        let next = offsets
            .entry(TopicPartition::new(
                record.record.topic.clone(),
                record.kafka_partition,
            ))
            .or_insert(0);
        *next = (*next).max(record.kafka_offset + 1);
    }
    offsets
}

#[tokio::test]
async fn pushed_back_bulks_are_retried_with_partitions_paused_and_nothing_is_lost() {
    let osmem = Osmem::start();
    let proxy = Proxy::new(&osmem.url, None, true);
    let (url, server) = serve(
        axum::Router::new()
            .fallback(forward)
            .with_state(proxy.clone()),
    )
    .await;

    let recorder = Arc::new(Recorder::default());
    let (mut sink, mut errant) = task(
        &url,
        &[
            ("key.ignore", "true"),
            ("index", "vitals-${yyyy.MM.dd}"),
            ("batch.size", "200"),
            ("max.in.flight.requests", "2"),
            ("max.retries", "2"),
            ("retry.backoff.ms", "10"),
        ],
        SinkPartitions::new(recorder.clone()),
    )
    .await;
    let records = vitals("vitals", 10_000);
    // The task never fails: every put, the flush and pre_commit succeed.
    put_all(&mut sink, &records, 1_000).await;
    assert_eq!(osmem.count("vitals-*").await, 10_000);
    let put = positions(&records);
    assert_eq!(sink.pre_commit(&put).await.expect("pre_commit"), put);
    assert!(errant.try_recv().is_err(), "nothing errant");

    let bulks = proxy.bulks.load(Ordering::SeqCst);
    let refused = proxy.refused.load(Ordering::SeqCst);
    assert!(
        refused >= 10 && refused == bulks / 3,
        "{refused} of {bulks} bulks answered 429"
    );
    assert!(proxy.items_rejected.load(Ordering::SeqCst) >= 5);
    assert!(
        recorder.pauses.load(Ordering::SeqCst) >= 1,
        "paused while the cluster lagged"
    );
    assert!(
        !recorder.paused.load(Ordering::SeqCst),
        "resumed once it caught up"
    );
    sink.stop().await.expect("stop");
    server.abort();
}

#[tokio::test]
async fn a_cluster_that_comes_up_late_gets_everything_and_nothing_is_committed_before() {
    // A port nothing listens on yet.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let (mut sink, mut errant) = task(
        &format!("http://{address}"),
        &[
            ("key.ignore", "true"),
            ("batch.size", "100"),
            ("max.retries", "3"),
            ("retry.backoff.ms", "20"),
            ("connection.timeout.ms", "200"),
        ],
        SinkPartitions::detached(),
    )
    .await;
    let records = vitals("vitals", 2_000);
    for chunk in records.chunks(500) {
        sink.put(chunk.to_vec())
            .await
            .expect("put does not fail while the cluster is away");
    }
    let put = positions(&records);
    let committable = sink.pre_commit(&put).await.expect("pre_commit");
    assert!(
        committable.values().all(|offset| *offset == 0),
        "nothing acknowledged, nothing committable: {committable:?}"
    );

    let osmem = Osmem::start_at(&address.to_string());
    tokio::time::timeout(DEADLINE, sink.flush())
        .await
        .expect("caught up within the deadline")
        .expect("flush");
    assert_eq!(osmem.count("vitals").await, 2_000);
    assert_eq!(sink.pre_commit(&put).await.expect("pre_commit"), put);
    assert!(errant.try_recv().is_err());
    sink.stop().await.expect("stop");
}

/// A `_bulk` body's `Content-Encoding` and its bytes once decoded.
type SeenBody = (Option<String>, Vec<u8>);

/// Forwards everything, keeping the `Authorization` header of every `_bulk`, and its
/// `Content-Encoding` with the body as the cluster would decode it.
#[derive(Clone)]
struct Recording {
    upstream: String,
    client: reqwest::Client,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    bodies: Arc<std::sync::Mutex<Vec<SeenBody>>>,
}

impl Recording {
    fn new(upstream: &str) -> Self {
        Self {
            upstream: upstream.to_string(),
            client: reqwest::Client::new(),
            seen: Arc::default(),
            bodies: Arc::default(),
        }
    }
}

async fn record_authorization(
    State(proxy): State<Recording>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if uri.path().ends_with("/_bulk") {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string();
        proxy
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(authorization);
        let encoding = headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let decoded = if encoding.as_deref() == Some("gzip") {
            use std::io::Read;
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_end(&mut plain)
                .expect("a gzip body");
            plain
        } else {
            body.to_vec()
        };
        proxy
            .bodies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((encoding, decoded));
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = proxy
        .client
        .request(method, format!("{}{path}", proxy.upstream))
        .body(body);
    for name in [header::CONTENT_TYPE, header::CONTENT_ENCODING] {
        if let Some(value) = headers.get(&name) {
            request = request.header(name, value);
        }
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

#[tokio::test]
async fn requests_carry_the_configured_api_key_or_basic_credentials() {
    let osmem = Osmem::start();
    let proxy = Recording::new(&osmem.url);
    let (url, server) = serve(
        axum::Router::new()
            .fallback(record_authorization)
            .with_state(proxy.clone()),
    )
    .await;

    let records = vitals("vitals", 10);
    let (mut keyed, _) = task(
        &url,
        &[
            ("key.ignore", "true"),
            ("connection.api.key", "a2V5aWQ6c2VjcmV0"),
        ],
        SinkPartitions::detached(),
    )
    .await;
    put_all(&mut keyed, &records, 10).await;
    keyed.stop().await.expect("stop");
    let (mut basic, _) = task(
        &url,
        &[
            ("key.ignore", "true"),
            ("connection.username", "medconnect"),
            ("connection.password", "hunter2"),
        ],
        SinkPartitions::detached(),
    )
    .await;
    put_all(&mut basic, &records, 10).await;
    basic.stop().await.expect("stop");

    let seen = proxy.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // base64("medconnect:hunter2")
    assert_eq!(
        seen,
        vec![
            "ApiKey a2V5aWQ6c2VjcmV0".to_string(),
            "Basic bWVkY29ubmVjdDpodW50ZXIy".to_string()
        ]
    );
    server.abort();
}

/// How long the timed faults of the issue last.
const FAULT_WINDOW: std::time::Duration = std::time::Duration::from_secs(20);
/// How often the test hands the task a chunk of records while a fault lasts.
const PUT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Everything acknowledged (`pre_commit` of what was put equals it): what an engine would see.
async fn assert_running(
    sink: &mut medconnect_elasticsearch::ElasticsearchSinkTask,
    put: &SinkOffsets,
) -> SinkOffsets {
    tokio::time::timeout(DEADLINE, sink.pre_commit(put))
        .await
        .expect("pre_commit returns")
        .expect("pre_commit never fails while the cluster pushes back or is away")
}

#[tokio::test]
async fn a_429_on_every_third_bulk_for_20_s_loses_nothing_and_the_task_keeps_running() {
    let osmem = Osmem::start();
    let proxy = Proxy::new(
        &osmem.url,
        Some(std::time::Instant::now() + FAULT_WINDOW),
        false,
    );
    let (url, server) = serve(
        axum::Router::new()
            .fallback(forward)
            .with_state(proxy.clone()),
    )
    .await;

    let (mut sink, mut errant) = task(
        &url,
        &[
            ("key.ignore", "true"),
            ("index", "vitals-${yyyy.MM.dd}"),
            ("batch.size", "200"),
            ("max.in.flight.requests", "2"),
            ("max.retries", "3"),
            ("retry.backoff.ms", "20"),
        ],
        SinkPartitions::detached(),
    )
    .await;
    // Records keep coming while the proxy pushes back: a chunk every PUT_EVERY.
    let records = vitals("vitals", 20_000);
    let mut sent = 0;
    let mut ticks = tokio::time::interval(PUT_EVERY);
    while proxy.faulty() && sent < records.len() {
        ticks.tick().await;
        let chunk = &records[sent..(sent + 100).min(records.len())];
        tokio::time::timeout(DEADLINE, sink.put(chunk.to_vec()))
            .await
            .expect("put returns")
            .expect("put never fails while the cluster pushes back");
        sent += chunk.len();
        assert_running(&mut sink, &positions(&records[..sent])).await;
    }
    assert!(
        !proxy.faulty(),
        "the 20 s window ended before the records did"
    );
    let refused_in_window = proxy.refused.load(Ordering::SeqCst);
    assert!(
        refused_in_window >= 10,
        "{refused_in_window} bulks answered 429 in the window"
    );
    tokio::time::timeout(DEADLINE, sink.flush())
        .await
        .expect("caught up within the deadline")
        .expect("flush");
    assert_eq!(osmem.count("vitals-*").await, sent as u64);
    let put = positions(&records[..sent]);
    assert_eq!(assert_running(&mut sink, &put).await, put);
    assert!(errant.try_recv().is_err(), "nothing errant");
    sink.stop().await.expect("stop");
    server.abort();
}

/// A TCP proxy that can be taken down: while down it closes every connection it accepts and
/// cuts the ones open (a node gone, its kept-alive connections with it); up, it relays bytes.
struct Outage {
    url: String,
    down: tokio::sync::watch::Sender<bool>,
    closed: Arc<AtomicUsize>,
    relay: tokio::task::JoinHandle<()>,
}

impl Outage {
    async fn start(upstream: &str) -> Self {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let (down, watching) = tokio::sync::watch::channel(false);
        let closed = Arc::new(AtomicUsize::new(0));
        let counter = closed.clone();
        let relay = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *watching.borrow() {
                    counter.fetch_add(1, Ordering::SeqCst);
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let mut watching = watching.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watching.wait_for(|down| *down) => {}
                    }
                });
            }
        });
        Self {
            url,
            down,
            closed,
            relay,
        }
    }

    fn is_down(&self) -> bool {
        *self.down.borrow()
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        self.relay.abort();
    }
}

#[tokio::test]
async fn a_cluster_down_for_20_s_gets_everything_once_it_is_back() {
    let osmem = Osmem::start();
    let outage = Outage::start(&osmem.url).await;
    let recorder = Arc::new(Recorder::default());
    let (mut sink, mut errant) = task(
        &outage.url,
        &[
            ("key.ignore", "true"),
            ("batch.size", "250"),
            ("max.in.flight.requests", "2"),
            ("max.retries", "3"),
            ("retry.backoff.ms", "50"),
            ("connection.timeout.ms", "500"),
            ("read.timeout.ms", "2000"),
        ],
        SinkPartitions::new(recorder.clone()),
    )
    .await;
    let records = vitals("vitals", 12_000);
    let before = 1_000;
    put_all(&mut sink, &records[..before], 250).await;
    assert_eq!(osmem.count("vitals").await, before as u64);
    let acknowledged = positions(&records[..before]);

    // Down for 20 s: a timed fault; records keep coming meanwhile.
    outage.down.send_replace(true);
    let back = outage.down.clone();
    let outage_over = tokio::spawn(async move {
        tokio::time::sleep(FAULT_WINDOW).await;
        back.send_replace(false);
    });
    let mut sent = before;
    let mut ticks = tokio::time::interval(PUT_EVERY);
    while outage.is_down() && sent < records.len() {
        ticks.tick().await;
        let chunk = &records[sent..(sent + 100).min(records.len())];
        tokio::time::timeout(DEADLINE, sink.put(chunk.to_vec()))
            .await
            .expect("put returns")
            .expect("put never fails while the cluster is away");
        sent += chunk.len();
        let committable = assert_running(&mut sink, &positions(&records[..sent])).await;
        if outage.is_down() {
            // Nothing written while the cluster is away is committable.
            for (partition, offset) in &committable {
                assert!(
                    *offset <= acknowledged.get(partition).copied().unwrap_or(0),
                    "{partition:?} committable at {offset} while the cluster is down"
                );
            }
        }
    }
    outage_over.await.expect("outage over");
    // Past 4 × 2 × batch.size × max.in.flight.requests (4,000) outstanding documents, `put`
    // itself waits for room: the engine's backpressure, not an error.
    assert!(
        sent >= before + 3_000,
        "records kept coming in the outage: {sent}"
    );
    assert!(
        outage.closed.load(Ordering::SeqCst) >= 3,
        "the task kept trying while the cluster was down"
    );
    assert!(
        recorder.pauses.load(Ordering::SeqCst) >= 1,
        "paused while the cluster was away"
    );
    // The rest, now that it is back.
    for chunk in records[sent..].chunks(500) {
        tokio::time::timeout(DEADLINE, sink.put(chunk.to_vec()))
            .await
            .expect("put returns")
            .expect("put");
    }
    tokio::time::timeout(DEADLINE, sink.flush())
        .await
        .expect("caught up within the deadline")
        .expect("flush");
    assert_eq!(osmem.count("vitals").await, records.len() as u64);
    let put = positions(&records);
    assert_eq!(assert_running(&mut sink, &put).await, put);
    assert!(
        !recorder.paused.load(Ordering::SeqCst),
        "resumed once it caught up"
    );
    assert!(errant.try_recv().is_err(), "nothing errant");
    sink.stop().await.expect("stop");
}

#[tokio::test]
async fn compressed_bulks_are_gzipped_and_the_cluster_takes_them() {
    let osmem = Osmem::start();
    let proxy = Recording::new(&osmem.url);
    let (url, server) = serve(
        axum::Router::new()
            .fallback(record_authorization)
            .with_state(proxy.clone()),
    )
    .await;

    let records = vitals("vitals", 1_000);
    let (mut sink, mut errant) = task(
        &url,
        &[
            ("key.ignore", "true"),
            ("batch.size", "250"),
            ("connection.compression", "true"),
        ],
        SinkPartitions::detached(),
    )
    .await;
    put_all(&mut sink, &records, 250).await;
    sink.stop().await.expect("stop");
    // osmem-server decodes a gzip body itself: the proxy forwarded the compressed bytes.
    assert_eq!(osmem.count("vitals").await, 1_000);
    assert!(errant.try_recv().is_err());

    let bodies = proxy
        .bodies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    assert!(!bodies.is_empty());
    let mut lines = 0;
    for (encoding, body) in &bodies {
        assert_eq!(encoding.as_deref(), Some("gzip"));
        let text = std::str::from_utf8(body).expect("NDJSON");
        for line in text.lines() {
            serde_json::from_str::<Value>(line).expect("a JSON line");
            lines += 1;
        }
    }
    assert_eq!(lines, 2_000, "an action and a source line per document");

    // Without the setting, plain bodies.
    let (mut plain, _) = task(&url, &[("key.ignore", "true")], SinkPartitions::detached()).await;
    put_all(&mut plain, &vitals("other", 10), 10).await;
    plain.stop().await.expect("stop");
    let last = proxy.bodies.lock().unwrap_or_else(|e| e.into_inner()).pop();
    assert!(matches!(last, Some((None, _))), "no Content-Encoding");
    server.abort();
}

/// Media types of every `_bulk` and template request (`Content-Type`, `Accept`), and whether
/// the root answer is made to look like Elasticsearch 8's.
#[derive(Clone)]
struct Dialects {
    upstream: String,
    client: reqwest::Client,
    pretend_elasticsearch_8: bool,
    seen: Arc<std::sync::Mutex<Vec<(String, String, String)>>>,
}

const COMPAT_JSON: &str = "application/vnd.elasticsearch+json; compatible-with=8";
const COMPAT_NDJSON: &str = "application/vnd.elasticsearch+x-ndjson; compatible-with=8";

async fn record_dialect(
    State(proxy): State<Dialects>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
            .unwrap_or("none")
            .to_string()
    };
    if uri.path() == "/" && proxy.pretend_elasticsearch_8 {
        let root = json!({"name": "es01", "cluster_name": "docker-cluster", "version": {"number": "8.15.0", "build_flavor": "default"}, "tagline": "You Know, for Search"});
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            root.to_string(),
        )
            .into_response();
    }
    let content_type = text(header::CONTENT_TYPE);
    if uri.path() != "/" {
        proxy.seen.lock().unwrap_or_else(|e| e.into_inner()).push((
            uri.path().to_string(),
            content_type.clone(),
            text(header::ACCEPT),
        ));
    }
    // osmem-server, like OpenSearch, answers 406 to the vendor types: what an Elasticsearch 8
    // would take is handed on as plain JSON.
    let plain = match content_type.as_str() {
        COMPAT_NDJSON => "application/x-ndjson".to_string(),
        COMPAT_JSON => "application/json".to_string(),
        other => other.to_string(),
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = proxy
        .client
        .request(method, format!("{}{path}", proxy.upstream))
        .header(header::CONTENT_TYPE, plain)
        .body(body);
    match request.send().await {
        Ok(answer) => {
            let status = answer.status();
            let body = answer.bytes().await.unwrap_or_default();
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

async fn dialects_seen(pretend_elasticsearch_8: bool) -> Vec<(String, String, String)> {
    let osmem = Osmem::start();
    let proxy = Dialects {
        upstream: osmem.url.clone(),
        client: reqwest::Client::new(),
        pretend_elasticsearch_8,
        seen: Arc::default(),
    };
    let (url, server) = serve(
        axum::Router::new()
            .fallback(record_dialect)
            .with_state(proxy.clone()),
    )
    .await;
    let (mut sink, mut errant) = task(
        &url,
        &[
            ("key.ignore", "true"),
            ("index.template.name", "vitals"),
            ("index.template.json", r#"{"index_patterns":["vitals*"]}"#),
        ],
        SinkPartitions::detached(),
    )
    .await;
    put_all(&mut sink, &vitals("vitals", 100), 50).await;
    sink.stop().await.expect("stop");
    assert_eq!(osmem.count("vitals").await, 100);
    assert!(errant.try_recv().is_err());
    server.abort();
    proxy.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[tokio::test]
async fn opensearch_gets_plain_json_and_elasticsearch_8_the_compatibility_types() {
    let opensearch = dialects_seen(false).await;
    assert!(opensearch.len() >= 2, "{opensearch:?}");
    assert_eq!(
        opensearch[0],
        (
            "/_index_template/vitals".to_string(),
            "application/json".to_string(),
            "application/json".to_string()
        )
    );
    for (path, content_type, accept) in &opensearch[1..] {
        assert_eq!(path, "/_bulk");
        assert_eq!(content_type, "application/x-ndjson");
        assert_eq!(accept, "application/json");
    }

    let elasticsearch = dialects_seen(true).await;
    assert!(elasticsearch.len() >= 2, "{elasticsearch:?}");
    assert_eq!(
        elasticsearch[0],
        (
            "/_index_template/vitals".to_string(),
            COMPAT_JSON.to_string(),
            COMPAT_JSON.to_string()
        )
    );
    for (path, content_type, accept) in &elasticsearch[1..] {
        assert_eq!(path, "/_bulk");
        assert_eq!(content_type, COMPAT_NDJSON);
        assert_eq!(accept, COMPAT_JSON);
    }
}
