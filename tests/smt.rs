//! Connect's native SMTs in a real pipeline: a FileSource reads patient vitals (JSON lines)
//! through a chain MaskField -> ReplaceField -> ValueToKey -> RegexRouter -> InsertHeader, and
//! what lands in Kafka shows each step. Bad SMT settings are reported per setting by the
//! validate endpoint, as Connect does, and refused on creation.

use medconnect_e2e::{TestCluster, json};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_chain_masks_renames_keys_routes_and_tags_records() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let input = cluster.path("vitals.jsonl");
    std::fs::write(
        &input,
        concat!(
            r#"{"mrn":"M1","name":"Jane Doe","ssn":"123-45-6789","hr":72,"spo2":98}"#,
            "\n",
            r#"{"mrn":"M2","name":"John Roe","ssn":"987-65-4321","hr":110,"spo2":91}"#,
            "\n",
        ),
    )?;
    worker
        .rest
        .create(
            "ward3-vitals",
            json!({
                "connector.class": "FileSource", "file": input.to_str().unwrap(), "topic": "ward-3-raw",
                "poll.interval.ms": "20",
                "transforms": "mask,rename,key,route,tag",
                "transforms.mask.type": "org.apache.kafka.connect.transforms.MaskField$Value",
                "transforms.mask.fields": "name",
                "transforms.rename.type": "ReplaceField$Value",
                "transforms.rename.exclude": "ssn",
                "transforms.rename.renames": "hr:heart_rate",
                "transforms.key.type": "ValueToKey",
                "transforms.key.fields": "mrn",
                "transforms.route.type": "RegexRouter",
                "transforms.route.regex": "ward-(\\d+)-raw",
                "transforms.route.replacement": "ward$1.vitals",
                "transforms.tag.type": "InsertHeader",
                "transforms.tag.header": "pipeline",
                "transforms.tag.value.literal": "phi-masked",
            }),
        )
        .await?;

    let records = cluster.read_topic("ward3.vitals", 2).await?;
    let values: Vec<Value> = records.iter().map(|r| r.json()).collect();
    assert_eq!(
        values,
        vec![
            json!({"mrn": "M1", "name": "", "heart_rate": 72, "spo2": 98}),
            json!({"mrn": "M2", "name": "", "heart_rate": 110, "spo2": 91}),
        ],
        "name masked, ssn dropped, hr renamed"
    );
    let keys: Vec<Value> = records
        .iter()
        .map(|r| serde_json::from_str(r.key.as_deref().unwrap_or("null")).unwrap_or(Value::Null))
        .collect();
    assert_eq!(keys, vec![json!({"mrn": "M1"}), json!({"mrn": "M2"})]);
    for record in &records {
        assert_eq!(record.header("pipeline"), Some("phi-masked"));
        assert_eq!(
            record.header("content-type"),
            Some("text/plain"),
            "the source's own header is kept"
        );
        let raw = record.value.as_deref().unwrap_or_default();
        for phi in ["Jane", "John", "123-45-6789", "987-65-4321"] {
            assert!(!raw.contains(phi), "PHI reached Kafka in {raw}");
        }
    }
    worker.wait_for_state("ward3-vitals", "RUNNING", 1).await?;
    assert_eq!(
        cluster.count_records("ward3.vitals").await?,
        2,
        "each line once, nothing else routed there"
    );
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_smt_settings_are_reported_per_setting_and_refused() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let config = json!({
        "connector.class": "FileSource", "name": "v", "file": "/tmp/vitals.jsonl", "topic": "vitals",
        "transforms": "mask,route,badref,hdr,ok",
        // MaskField without `fields`.
        "transforms.mask.type": "MaskField$Value",
        "transforms.route.type": "RegexRouter",
        "transforms.route.regex": "ward-(\\d+",
        "transforms.route.replacement": "x",
        // A valid regex, but the replacement names a group it does not have.
        "transforms.badref.type": "org.apache.kafka.connect.transforms.RegexRouter",
        "transforms.badref.regex": "ward-(\\d+)",
        "transforms.badref.replacement": "ward$2",
        "transforms.hdr.type": "HeaderFrom$Value",
        "transforms.hdr.fields": "site",
        "transforms.hdr.headers": "ward",
        "transforms.hdr.operation": "cut",
        "transforms.ok.type": "ReplaceField$Value",
        "transforms.ok.renames": "hr:heart_rate",
    });
    let (code, result) = worker
        .rest
        .put("/connector-plugins/FileSource/config/validate", &config)
        .await?;
    assert_eq!(code, 200, "{result}");
    let errors = |field: &str| -> Vec<String> {
        let entry = result["configs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["value"]["name"] == field);
        let entry = entry.unwrap_or_else(|| panic!("no entry for {field} in {result}"));
        entry["value"]["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.as_str().map(str::to_string))
            .collect()
    };
    assert!(
        errors("transforms.mask.fields")
            .first()
            .is_some_and(|e| e.contains("Missing required configuration")),
        "{result}"
    );
    assert!(
        errors("transforms.route.regex")
            .first()
            .is_some_and(|e| e.contains("not a valid regular expression")),
        "{result}"
    );
    assert!(
        errors("transforms.badref.replacement")
            .first()
            .is_some_and(|e| e.contains("no group 2")),
        "{result}"
    );
    assert_eq!(
        errors("transforms.hdr.operation"),
        vec!["must be one of move, copy"]
    );
    assert!(errors("transforms.hdr.fields").is_empty());
    assert!(errors("transforms.ok.renames").is_empty());
    assert!(errors("transforms.ok.type").is_empty());
    assert_eq!(result["error_count"], 4, "{result}");

    let (code, refused) = worker
        .rest
        .post("/connectors", &json!({"name": "v", "config": config}))
        .await?;
    assert_eq!(code, 400, "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("contains the following 4 error(s)"),
        "{refused}"
    );
    for field in [
        "transforms.mask.fields",
        "transforms.route.regex",
        "transforms.badref.replacement",
        "transforms.hdr.operation",
    ] {
        assert!(
            message.contains(&format!("{field}: ")),
            "{field} not named in {message}"
        );
    }
    assert_eq!(
        worker.rest.get("/connectors").await?.1,
        json!([]),
        "nothing was created"
    );
    worker.shutdown().await;
    Ok(())
}
