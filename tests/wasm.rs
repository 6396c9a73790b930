//! WASM transforms end to end: a real worker, the embedded broker, guests loaded from files.
//!
//! Misbehaving guests are the host's `.wat` fixtures (no toolchain needed). The example guests
//! (`plugins/examples/*.wasm`) are built by `scripts/build-plugins`, which `scripts/test` runs
//! through `scripts/wasm-peers`; the tests that need them fail, saying so, when they are missing.

use std::path::{Path, PathBuf};

use medconnect_api::{Props, Record};
use medconnect_e2e::{Received, TestCluster, TestWorker, json, lines, wait_for_lines};
use medconnect_runtime::transform::TransformChain;
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
    let written = match wait_for_lines(&trapped, 2).await {
        Ok(written) => written,
        // Say where the records went: the dead-letter topic, or nowhere (a stalled task).
        Err(error) => {
            let dead: Vec<_> = cluster
                .read_all("trap.dlq")
                .await?
                .into_iter()
                .map(|r| {
                    let cause = r
                        .header("__connect.errors.exception.message")
                        .map(str::to_owned);
                    (r.value, cause)
                })
                .collect();
            let (_, status) = rest.get("/connectors/trapping/status").await?;
            anyhow::bail!("{error:#}; trap.dlq holds {dead:?}; status {status}");
        }
    };
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
    let garbage = cluster.path("garbage.wasm");
    std::fs::write(&garbage, b"\0asm but not a module")?;
    let garbage = garbage.to_string_lossy().into_owned();

    let cases = [
        (missing.as_str(), "cannot read WASM module"),
        (garbage.as_str(), "is not a valid WebAssembly module"),
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

// ---- The example guests (plugins/examples), through the real host ---------------------

/// A one-stage chain running `module` with `config.*` settings, as a connector would.
fn chain(module: &str, config: &[(&str, &str)]) -> anyhow::Result<TransformChain> {
    let mut props: Props = [("transforms", "t"), ("transforms.t.type", "wasm")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    props.insert("transforms.t.module".into(), module.to_string());
    for (key, value) in config {
        props.insert(format!("transforms.t.config.{key}"), value.to_string());
    }
    Ok(TransformChain::from_config(&props)?)
}

fn apply(chain: &mut TransformChain, record: Record) -> Record {
    match chain.apply(record) {
        Ok(Some(record)) => record,
        Ok(None) => panic!("the record was dropped"),
        Err(failure) => panic!("the transform failed: {:?}", failure.error),
    }
}

fn value_json(record: &Record) -> Value {
    serde_json::from_slice(record.value.as_deref().unwrap_or_default()).unwrap_or(Value::Null)
}

const ADT: &str = "MSH|^~\\&|EPIC|ICU|LAB|HOSP|20240101120000||ADT^A01|MSG0001|P|2.5\r\
EVN|A01|20240101120000\r\
PID|1||MRN12345^^^HOSP^MR||DOE^JANE^Q||19800101|F|||1 MAIN ST^^BOSTON^MA^02110||555-0100|||||ACCT1|123-45-6789\r\
PV1|1|I|ICU^101^A\r";

fn hl7(value: &str) -> Record {
    Record::new("adt")
        .with_value(value.to_string())
        .with_header("content-type", "application/hl7-v2")
}

#[test]
fn mask_phi_masks_json_fields_and_hl7_pid_fields() -> anyhow::Result<()> {
    let mut mask = chain(&guest("mask-phi")?, &[("fields", "ssn,patient.birthDate")])?;
    let record = Record::new("patients")
        .with_key("MRN1")
        .with_value(r#"{"mrn":"MRN1","ssn":"123-45-6789","patient":{"birthDate":"1980-01-01","name":"Jane"},"hr":80}"#)
        .with_header("content-type", "application/json");
    let out = apply(&mut mask, record.clone());
    assert_eq!(
        value_json(&out),
        json!({"mrn":"MRN1","ssn":"***","patient":{"birthDate":"***","name":"Jane"},"hr":80})
    );
    assert_eq!(
        (out.key, out.headers, out.topic),
        (record.key, record.headers, record.topic),
        "only the value changes"
    );

    let out = apply(&mut mask, hl7(ADT));
    let text = String::from_utf8(out.value.unwrap_or_default().to_vec())?;
    let pid = text
        .split('\r')
        .find(|s| s.starts_with("PID|"))
        .unwrap_or_default();
    assert_eq!(
        pid,
        "PID|1||MRN12345^^^HOSP^MR||***^***^***||***|F|||1 MAIN ST^^BOSTON^MA^02110||555-0100|||||ACCT1|***"
    );
    assert!(
        text.starts_with("MSH|^~\\&|EPIC|ICU|LAB|HOSP|20240101120000||ADT^A01|MSG0001|P|2.5\rEVN|"),
        "{text:?}"
    );
    assert!(text.ends_with("PV1|1|I|ICU^101^A\r"));

    // Hashing pseudonymises: the same SSN hashes alike, so records stay linkable.
    let mut hash = chain(
        &guest("mask-phi")?,
        &[("fields", "ssn"), ("mode", "hash"), ("salt", "s3cret")],
    )?;
    let first = value_json(&apply(
        &mut hash,
        Record::new("p").with_value(r#"{"ssn":"123-45-6789"}"#),
    ));
    let second = value_json(&apply(
        &mut hash,
        Record::new("p").with_value(r#"{"ssn":"123-45-6789","x":1}"#),
    ));
    let hashed = first["ssn"].as_str().unwrap_or_default();
    assert_eq!(hashed.len(), 64, "{first}");
    assert_ne!(hashed, "123-45-6789");
    assert_eq!(first["ssn"], second["ssn"]);

    // A value it cannot read fails the record rather than leaking it unmasked.
    let failure = mask
        .apply(Record::new("p").with_value("ssn=123-45-6789"))
        .err();
    let message = failure.map(|f| f.error.to_string()).unwrap_or_default();
    assert!(
        message.contains("not JSON") && !message.contains("123-45"),
        "{message}"
    );

    // Its settings are checked when the connector is validated.
    let refused = chain(
        &guest("mask-phi")?,
        &[("fields", "ssn"), ("mode", "scramble")],
    )
    .err();
    assert!(refused.is_some_and(|e| e.to_string().contains("mode must be mask or hash")));
    Ok(())
}

#[test]
fn route_by_type_sets_the_topic_in_rust_and_in_assemblyscript() -> anyhow::Result<()> {
    for module in [guest("route-by-type")?, guest("route-by-type-as")?] {
        let mut route = chain(&module, &[])?;
        let mut record = hl7(ADT);
        record.partition = Some(2);
        let out = apply(&mut route, record);
        assert_eq!(out.topic, "adt.ADT_A01", "{module}");
        assert_eq!(
            out.partition, None,
            "{module}: the old topic's partition does not apply"
        );
        assert_eq!(
            out.value.as_deref(),
            Some(ADT.as_bytes()),
            "{module}: the message is untouched"
        );

        let fhir = Record::new("fhir").with_value(
            r#"{"meta":{"resourceType":"nested"},"resourceType":"Observation","id":"1"}"#,
        );
        assert_eq!(
            apply(&mut route, fhir).topic,
            "fhir.Observation",
            "{module}"
        );
        let untyped = Record::new("fhir").with_value(r#"{"id":"1"}"#);
        assert_eq!(
            apply(&mut route, untyped).topic,
            "fhir",
            "{module}: no type, same topic"
        );

        let mut custom = chain(
            &module,
            &[("topic.format", "hl7-${type}"), ("json.field", "kind")],
        )?;
        assert_eq!(
            apply(&mut custom, hl7(ADT)).topic,
            "hl7-ADT_A01",
            "{module}"
        );
        assert_eq!(
            apply(
                &mut custom,
                Record::new("x").with_value(r#"{"kind":"lab result"}"#)
            )
            .topic,
            "hl7-lab_result"
        );

        let refused = chain(&module, &[("topic.format", "fixed")]).err();
        assert!(
            refused.is_some_and(|e| e.to_string().contains("must contain ${type}")),
            "{module}"
        );
    }
    Ok(())
}

#[test]
fn vitals_units_converts_fahrenheit_and_pounds() -> anyhow::Result<()> {
    let mut units = chain(&guest("vitals-units")?, &[])?;
    let record = Record::new("vitals")
        .with_value(r#"{"device":"M1","temp":{"value":98.6,"unit":"F"},"weight":{"value":154,"unit":"[lb_av]"},"hr":{"value":72,"unit":"/min"}}"#);
    assert_eq!(
        value_json(&apply(&mut units, record)),
        json!({"device":"M1","temp":{"value":37,"unit":"Cel"},"weight":{"value":69.9,"unit":"kg"},"hr":{"value":72,"unit":"/min"}})
    );
    let mut precise = chain(&guest("vitals-units")?, &[("decimals", "2")])?;
    let out = apply(
        &mut precise,
        Record::new("v").with_value(r#"{"t":{"value":98.7,"unit":"degF"}}"#),
    );
    assert_eq!(value_json(&out), json!({"t":{"value":37.06,"unit":"Cel"}}));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_and_wasm_chain_is_applied_to_what_lands_in_kafka() -> anyhow::Result<()> {
    let mask = guest("mask-phi")?;
    let route = guest("route-by-type-as")?;
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let input = cluster.path("patients.jsonl");
    std::fs::write(
        &input,
        "{\"resourceType\":\"Patient\",\"id\":\"p1\",\"ssn\":\"123-45-6789\",\"birthDate\":\"1980-01-01\"}\n\
         {\"resourceType\":\"Patient\",\"id\":\"p2\",\"ssn\":\"987-65-4321\",\"birthDate\":\"1975-05-05\"}\n",
    )?;
    worker
        .rest
        .create(
            "patients-in",
            json!({
                "connector.class": "FileSource", "file": input.to_str().unwrap(), "topic": "patients",
                "poll.interval.ms": "20",
                "transforms": "tag,mask,route",
                "transforms.tag.type": "org.apache.kafka.connect.transforms.InsertField$Value",
                "transforms.tag.static.field": "ward", "transforms.tag.static.value": "icu",
                "transforms.mask.type": "wasm", "transforms.mask.module": mask,
                "transforms.mask.config.fields": "ssn,birthDate",
                "transforms.route.type": "io.medconnect.transforms.Wasm", "transforms.route.module": route,
            }),
        )
        .await?;

    let records = cluster.read_topic("patients.Patient", 2).await?;
    let values: Vec<Value> = records.iter().map(Received::json).collect();
    assert_eq!(
        values,
        vec![
            json!({"resourceType":"Patient","id":"p1","ssn":"***","birthDate":"***","ward":"icu"}),
            json!({"resourceType":"Patient","id":"p2","ssn":"***","birthDate":"***","ward":"icu"}),
        ]
    );
    worker.wait_for_state("patients-in", "RUNNING", 1).await?;
    worker.shutdown().await;
    Ok(())
}
