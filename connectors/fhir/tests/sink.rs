//! The sink against a real FHIR R4 server (hfs): Bundles of records written and read back,
//! redelivery without duplicates, conditional writes, deletes, refused entries with their
//! OperationOutcome, and a fault-injecting proxy answering 429/503 in front of the server.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use medconnect_api::{
    ConnectResult, PartitionControl, Record, SinkOffsets, SinkPartitions, SinkRecord, SinkTask,
    TopicPartition,
};
use serde_json::{Value, json};
use support::{DEADLINE, put_all, shared, sink_task};

/// `count` Observations keyed `Observation/<prefix>-<i>`, with an identifier of `system`,
/// over three partitions of `topic`.
fn observations(topic: &str, prefix: &str, system: &str, count: usize) -> Vec<SinkRecord> {
    (0..count)
        .map(|i| {
            let value = json!({
                "resourceType": "Observation",
                "status": "final",
                "identifier": [{"system": system, "value": format!("{prefix}-{i}")}],
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": format!("Patient/p{}", i % 97)},
                "valueQuantity": {"value": 60 + (i % 40), "unit": "/min"},
            });
            SinkRecord {
                record: Record::new(topic)
                    .with_key(format!("Observation/{prefix}-{i}"))
                    .with_value(value.to_string()),
                kafka_partition: (i % 3) as i32,
                kafka_offset: (i / 3) as i64,
            }
        })
        .collect()
}

#[tokio::test]
async fn bundles_of_100_are_readable_and_redelivery_leaves_no_duplicates() {
    let hfs = shared();
    let system = "urn:test:bundles";
    let records = observations("obs", "bundles", system, 1_000);
    let (mut task, mut errant) = sink_task(
        &hfs.url,
        &[("fhir.bundle.size", "100")],
        SinkPartitions::detached(),
    )
    .await;
    put_all(&mut task, &records, 250).await;
    assert_eq!(hfs.count("Observation", system).await, 1_000);
    let (status, one) = hfs.get("Observation/bundles-7").await;
    assert_eq!(status, 200);
    assert_eq!(one["identifier"][0]["value"], "bundles-7");
    assert_eq!(one["meta"]["versionId"], "1");
    let put: SinkOffsets = (0..3)
        .map(|p| (TopicPartition::new("obs", p), 334))
        .collect();
    let committable = task.pre_commit(&put).await.expect("pre_commit");
    assert_eq!(committable, put, "everything acknowledged is committable");
    task.stop().await.expect("stop");

    // Delivered again, as after a crash before the commit: same resources, a new version.
    let (mut again, _) = sink_task(
        &hfs.url,
        &[("fhir.bundle.size", "100")],
        SinkPartitions::detached(),
    )
    .await;
    put_all(&mut again, &records, 250).await;
    assert_eq!(hfs.count("Observation", system).await, 1_000);
    let (_, one) = hfs.get("Observation/bundles-7").await;
    assert_eq!(one["meta"]["versionId"], "2");

    // Tombstones delete, and a delete delivered again (404 from the server) is not an error.
    let tombstones: Vec<SinkRecord> = (0..100)
        .map(|i| SinkRecord {
            record: Record::new("obs").with_key(format!("Observation/bundles-{i}")),
            kafka_partition: 0,
            kafka_offset: 1_000 + i,
        })
        .collect();
    put_all(&mut again, &tombstones, 100).await;
    let (mut third, mut errant_third) = sink_task(
        &hfs.url,
        &[("fhir.bundle.size", "100")],
        SinkPartitions::detached(),
    )
    .await;
    put_all(&mut third, &tombstones, 100).await;
    assert_eq!(hfs.count("Observation", system).await, 900);
    assert_eq!(hfs.get("Observation/bundles-7").await.0, 410, "deleted");
    assert!(
        errant.try_recv().is_err() && errant_third.try_recv().is_err(),
        "nothing refused"
    );
}

#[tokio::test]
async fn conditional_writes_by_identifier_in_transactions_are_idempotent() {
    let hfs = shared();
    for (mode, system) in [
        ("conditional-update", "urn:test:cond-update"),
        ("conditional-create", "urn:test:cond-create"),
    ] {
        // No key: the identifier alone says which resource a record is.
        let records: Vec<SinkRecord> = observations("cond", mode, system, 300)
            .into_iter()
            .map(|mut r| {
                r.record.key = None;
                r
            })
            .collect();
        let settings = [
            ("fhir.write.mode", mode),
            ("fhir.identifier.system", system),
            ("fhir.bundle.type", "transaction"),
            ("fhir.bundle.size", "50"),
        ];
        for _ in 0..2 {
            let (mut task, mut errant) =
                sink_task(&hfs.url, &settings, SinkPartitions::detached()).await;
            put_all(&mut task, &records, 100).await;
            assert!(errant.try_recv().is_err(), "{mode}: nothing refused");
        }
        assert_eq!(hfs.count("Observation", system).await, 300, "{mode}");
        let (_, found) = hfs
            .get(&format!("Observation?identifier={system}|{mode}-5"))
            .await;
        assert_eq!(found["entry"].as_array().map(Vec::len), Some(1), "{mode}");
        let version = &found["entry"][0]["resource"]["meta"]["versionId"];
        let expected = if mode == "conditional-create" {
            "1"
        } else {
            "2"
        };
        assert_eq!(
            version,
            expected,
            "{mode}: created once, then {}",
            if expected == "1" {
                "left alone"
            } else {
                "updated"
            }
        );
    }
}

#[tokio::test]
async fn refused_entries_go_to_the_dead_letter_topic_with_their_outcome_alone() {
    let hfs = shared();
    for bundle_type in ["batch", "transaction"] {
        let system = format!("urn:test:refused-{bundle_type}");
        let mut records = observations("refused", &format!("refused-{bundle_type}"), &system, 50);
        // A key naming an Observation with a Patient in the value: the server refuses it (400).
        records[17].record.value = Some(
            json!({"resourceType": "Patient", "identifier": [{"system": system, "value": "x"}],
                   "name": [{"family": "Doe", "given": ["Jane"]}]})
            .to_string()
            .into(),
        );
        // A value that is no FHIR resource: refused before any request.
        records[33].record.value = Some(json!({"hello": "world"}).to_string().into());
        let (mut task, mut errant) = sink_task(
            &hfs.url,
            &[
                ("fhir.bundle.type", bundle_type),
                ("fhir.bundle.size", "20"),
            ],
            SinkPartitions::detached(),
        )
        .await;
        put_all(&mut task, &records, 50).await;
        assert_eq!(hfs.count("Observation", &system).await, 48, "{bundle_type}");
        let mut refused = Vec::new();
        while let Ok(report) = errant.try_recv() {
            refused.push(report);
        }
        let positions: Vec<(i32, i64)> = refused
            .iter()
            .map(|(r, _)| (r.kafka_partition, r.kafka_offset))
            .collect();
        assert_eq!(positions.len(), 2, "{bundle_type}: {positions:?}");
        assert!(positions.contains(&(records[17].kafka_partition, records[17].kafka_offset)));
        assert!(positions.contains(&(records[33].kafka_partition, records[33].kafka_offset)));
        let (record, error) = refused
            .iter()
            .find(|(r, _)| {
                r.kafka_offset == records[17].kafka_offset
                    && r.kafka_partition == records[17].kafka_partition
            })
            .expect("the Patient");
        let headers = &record.record.headers;
        assert_eq!(
            headers.last_str("fhir.outcome.status"),
            Some("400"),
            "{bundle_type}"
        );
        assert_eq!(headers.last_str("fhir.outcome.severity"), Some("error"));
        assert_eq!(headers.last_str("fhir.outcome.code"), Some("invalid"));
        // The diagnostics are the error's peer text: the engine adds them to the dead-letter
        // record only with the connector's consent (errors.log.include.messages).
        assert_eq!(headers.last_str("fhir.outcome.diagnostics"), None);
        let peer = error.peer_text().expect("the diagnostics are kept");
        assert_eq!(peer.header(), "fhir.outcome.diagnostics");
        assert!(
            peer.text().contains("does not match URL"),
            "{}",
            peer.text()
        );
        // The error (status traces, logs) names the status and code, not the diagnostics.
        let message = error.to_string();
        assert!(
            message.contains("HTTP 400") && message.contains("error/invalid"),
            "{message}"
        );
        assert!(!message.contains("does not match"), "{message}");
        assert!(error.is_record_error());
    }
}

/// Answers 429 (`Retry-After: 1`) to the 2nd, 4th and 6th Bundle and 503 to the 3rd; the
/// others go to the server. Records when each 429 was sent and when the next Bundle came.
#[derive(Clone)]
struct Proxy {
    upstream: String,
    client: reqwest::Client,
    bundles: Arc<AtomicUsize>,
    too_many: Arc<AtomicUsize>,
    unavailable: Arc<AtomicUsize>,
    gaps: Arc<std::sync::Mutex<Vec<Duration>>>,
    last_refusal: Arc<std::sync::Mutex<Option<Instant>>>,
}

async fn forward(
    State(proxy): State<Proxy>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bundle = method == Method::POST && uri.path() == "/";
    if bundle {
        let n = proxy.bundles.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(at) = proxy.last_refusal.lock().expect("lock").take() {
            proxy.gaps.lock().expect("lock").push(at.elapsed());
        }
        let outcome = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "throttled"}]});
        if matches!(n, 2 | 4 | 6) {
            proxy.too_many.fetch_add(1, Ordering::SeqCst);
            *proxy.last_refusal.lock().expect("lock") = Some(Instant::now());
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [
                    (header::CONTENT_TYPE, "application/fhir+json"),
                    (header::RETRY_AFTER, "1"),
                ],
                outcome.to_string(),
            )
                .into_response();
        }
        if n == 3 {
            proxy.unavailable.fetch_add(1, Ordering::SeqCst);
            *proxy.last_refusal.lock().expect("lock") = Some(Instant::now());
            return (StatusCode::SERVICE_UNAVAILABLE, outcome.to_string()).into_response();
        }
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
    let text = answer.bytes().await.unwrap_or_default();
    (
        status,
        [(header::CONTENT_TYPE, "application/fhir+json")],
        text,
    )
        .into_response()
}

/// Records pauses and resumes.
#[derive(Default)]
struct Recording {
    paused: AtomicUsize,
    resumed: AtomicUsize,
}

impl PartitionControl for Recording {
    fn assignment(&self) -> Vec<TopicPartition> {
        (0..3).map(|p| TopicPartition::new("busy", p)).collect()
    }
    fn pause(&self, _: &[TopicPartition]) -> ConnectResult<()> {
        self.paused.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self, _: &[TopicPartition]) -> ConnectResult<()> {
        self.resumed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn a_server_answering_429_and_503_gets_everything_honouring_retry_after() {
    let hfs = shared();
    let proxy = Proxy {
        upstream: hfs.url.clone(),
        client: reqwest::Client::new(),
        bundles: Arc::default(),
        too_many: Arc::default(),
        unavailable: Arc::default(),
        gaps: Arc::default(),
        last_refusal: Arc::default(),
    };
    let app = axum::Router::new()
        .fallback(forward)
        .with_state(proxy.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let system = "urn:test:busy";
    let records = observations("busy", "busy", system, 1_000);
    let control = Arc::new(Recording::default());
    let (mut task, mut errant) = sink_task(
        &url,
        &[
            ("fhir.bundle.size", "100"),
            ("fhir.max.buffered.records", "300"),
            ("fhir.retry.backoff.ms", "50"),
        ],
        SinkPartitions::new(control.clone()),
    )
    .await;
    let started = Instant::now();
    put_all(&mut task, &records, 500).await;
    assert!(started.elapsed() < DEADLINE);
    assert_eq!(hfs.count("Observation", system).await, 1_000);
    assert!(errant.try_recv().is_err(), "nothing refused");
    assert_eq!(proxy.too_many.load(Ordering::SeqCst), 3);
    assert_eq!(proxy.unavailable.load(Ordering::SeqCst), 1);
    // 10 Bundles written, 4 refused and sent again.
    assert_eq!(proxy.bundles.load(Ordering::SeqCst), 14);
    let gaps = proxy.gaps.lock().expect("lock").clone();
    assert_eq!(gaps.len(), 4, "{gaps:?}");
    // After each 429 the sink waited Retry-After (1 s), not its 50 ms backoff.
    for (i, gap) in gaps.iter().enumerate() {
        if i != 1 {
            assert!(
                *gap >= Duration::from_millis(950),
                "gap {i} after a 429: {gap:?}"
            );
        } else {
            assert!(
                *gap < Duration::from_millis(900),
                "after the 503 only the backoff: {gap:?}"
            );
        }
    }
    // The queue went past 300 records: partitions paused, then resumed as the server caught up.
    assert!(control.paused.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        control.paused.load(Ordering::SeqCst),
        control.resumed.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn a_server_that_is_not_r4_is_refused_at_validation() {
    use medconnect_api::{Connector, props_from};
    let hfs = shared();
    let connector = medconnect_fhir::FhirSinkConnector;
    connector
        .validate(&props_from(&[("fhir.url", &hfs.url)]))
        .await
        .expect("hfs is FHIR 4.0.1");
    // Something that answers /metadata with another FHIR version.
    let app = axum::Router::new().route(
        "/metadata",
        axum::routing::get(|| async {
            axum::Json(json!({"resourceType": "CapabilityStatement", "fhirVersion": "5.0.0"}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let error = connector
        .validate(&props_from(&[("fhir.url", &url)]))
        .await
        .expect_err("R5");
    assert!(error.to_string().contains("5.0.0"), "{error}");
    let unreachable = connector
        .validate(&props_from(&[("fhir.url", "http://127.0.0.1:9")]))
        .await
        .expect_err("nothing there");
    assert!(
        matches!(unreachable, medconnect_api::ConnectError::Config { ref field, .. } if field == "fhir.url")
    );
    let _: Option<Value> = None;
}

#[tokio::test]
async fn versioned_writes_update_only_the_version_they_name_and_redelivery_is_recognised() {
    let hfs = shared();
    let entries: Vec<Value> = (0..50)
        .map(|i| json!({"resource": {"resourceType": "Patient", "id": format!("vers-{i}"), "name": [{"family": "Before"}]},
                        "request": {"method": "PUT", "url": format!("Patient/vers-{i}")}}))
        .collect();
    hfs.transaction(entries).await;
    let updates: Vec<SinkRecord> = (0..50)
        .map(|i| SinkRecord {
            record: Record::new("vers").with_value(
                json!({"resourceType": "Patient", "id": format!("vers-{i}"), "meta": {"versionId": "1"},
                       "name": [{"family": "After"}]})
                .to_string(),
            ),
            kafka_partition: 0,
            kafka_offset: i,
        })
        .collect();
    let settings = [("fhir.write.mode", "versioned"), ("fhir.bundle.size", "20")];
    let (mut task, mut errant) = sink_task(&hfs.url, &settings, SinkPartitions::detached()).await;
    put_all(&mut task, &updates, 50).await;
    // Delivered again: If-Match W/"1" fails (412), the resource read back has this content.
    let (mut again, mut errant_again) =
        sink_task(&hfs.url, &settings, SinkPartitions::detached()).await;
    put_all(&mut again, &updates, 50).await;
    for i in [0, 17, 49] {
        let (_, patient) = hfs.get(&format!("Patient/vers-{i}")).await;
        assert_eq!(patient["meta"]["versionId"], "2", "vers-{i}: updated once");
        assert_eq!(patient["name"][0]["family"], "After");
    }
    assert!(
        errant.try_recv().is_err() && errant_again.try_recv().is_err(),
        "nothing refused"
    );

    // A record written over version 1 with other content: the server has version 2 now.
    let stale = SinkRecord {
        record: Record::new("vers").with_value(
            json!({"resourceType": "Patient", "id": "vers-3", "meta": {"versionId": "1"},
                   "name": [{"family": "Stale"}]})
            .to_string(),
        ),
        kafka_partition: 0,
        kafka_offset: 50,
    };
    put_all(&mut again, &[stale], 1).await;
    let (record, error) = errant_again.try_recv().expect("the stale record refused");
    assert_eq!(record.kafka_offset, 50);
    assert_eq!(
        record.record.headers.last_str("fhir.outcome.status"),
        Some("412")
    );
    assert!(error.to_string().contains("HTTP 412"), "{error}");
    let (_, patient) = hfs.get("Patient/vers-3").await;
    assert_eq!(
        (
            patient["meta"]["versionId"].as_str(),
            patient["name"][0]["family"].as_str()
        ),
        (Some("2"), Some("After"))
    );
}
