//! The REST API against a real worker and broker: Kafka Connect's paths, JSON shapes and
//! status codes.

use medconnect_e2e::{TestCluster, json};

fn datagen(topic: &str) -> serde_json::Value {
    json!({"connector.class": "DatagenSource", "topic": topic, "rate": "50"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_health_metrics_and_plugins() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let rest = &worker.rest;

    let (code, root) = rest.get("/").await?;
    assert_eq!(code, 200);
    assert!(root["version"].is_string());
    assert_eq!(root["kafka_cluster_id"], "medconnect-dev");

    let (code, health) = rest.get("/health").await?;
    assert_eq!((code, health["status"].as_str()), (200, Some("healthy")));

    let (code, plugins) = rest.get("/connector-plugins").await?;
    assert_eq!(code, 200);
    let classes: Vec<(&str, &str)> = plugins
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["class"].as_str().unwrap(), p["type"].as_str().unwrap()))
        .collect();
    assert!(classes.contains(&(
        "io.medconnect.connectors.datagen.DatagenSourceConnector",
        "source"
    )));
    assert!(classes.contains(&("io.medconnect.connectors.file.FileSinkConnector", "sink")));
    assert!(classes.iter().all(|(_, t)| *t == "source" || *t == "sink"));

    let (_, all) = rest.get("/connector-plugins?connectorsOnly=false").await?;
    let types: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"transformation") && types.contains(&"predicate"));

    let (code, definition) = rest.get("/connector-plugins/DatagenSource/config").await?;
    assert_eq!(code, 200);
    let topic = definition
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "topic")
        .unwrap();
    assert_eq!(topic["required"], true);
    assert_eq!(topic["type"], "STRING");
    assert_eq!(topic["importance"], "HIGH");

    let (code, error) = rest
        .get("/connector-plugins/NoSuchConnector/config")
        .await?;
    assert_eq!((code, error["error_code"].as_u64()), (404, Some(404)));

    let (code, text) = rest.get_text("/metrics").await?;
    assert_eq!(code, 200);
    assert!(text.is_empty() || text.contains("medconnect_"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_reports_each_invalid_field() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let rest = &worker.rest;

    let (code, good) = rest
        .put(
            "/connector-plugins/DatagenSource/config/validate",
            &json!({"connector.class": "DatagenSource", "name": "x", "topic": "t"}),
        )
        .await?;
    assert_eq!(code, 200);
    assert_eq!(good["error_count"], 0, "{good}");
    assert_eq!(
        good["name"],
        "io.medconnect.connectors.datagen.DatagenSourceConnector"
    );
    assert!(
        good["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g == "Common")
    );

    let (code, bad) = rest
        .put(
            "/connector-plugins/DatagenSource/config/validate",
            &json!({"name": "x", "rate": "-3", "schema": "labs", "tasks.max": "zero",
                    "transforms": "t", "transforms.t.type": "NoSuchTransform"}),
        )
        .await?;
    assert_eq!(code, 200);
    let errors = |field: &str| -> Vec<String> {
        bad["configs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["value"]["name"] == field)
            .map(|c| {
                c["value"]["errors"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e.as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(errors("rate"), vec!["must be at least 0"]);
    assert!(errors("topic")[0].contains("Missing required configuration"));
    assert!(errors("schema")[0].contains("vitals"));
    assert!(errors("tasks.max")[0].contains("expected a 32-bit integer"));
    assert!(errors("transforms.t.type")[0].contains("NoSuchTransform"));
    assert_eq!(bad["error_count"], 5, "{bad}");

    let (code, sink) = rest
        .put(
            "/connector-plugins/FileSink/config/validate",
            &json!({"name": "s", "file": "/tmp/x", "topics": "a", "topics.regex": "b.*"}),
        )
        .await?;
    assert_eq!(code, 200);
    assert_eq!(sink["error_count"], 1, "{sink}");

    let (code, error) = rest
        .put(
            "/connector-plugins/DatagenSource/config/validate",
            &json!({"connector.class": "FileSink"}),
        )
        .await?;
    assert_eq!(code, 400, "{error}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_lifecycle_through_every_endpoint() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let rest = &worker.rest;

    let (code, created) = rest
        .post(
            "/connectors",
            &json!({"name": "adt", "config": datagen("adt-events")}),
        )
        .await?;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["name"], "adt");
    assert_eq!(created["type"], "source");
    assert_eq!(created["tasks"], json!([{"connector": "adt", "task": 0}]));
    assert_eq!(created["config"]["name"], "adt");

    let (code, conflict) = rest
        .post(
            "/connectors",
            &json!({"name": "adt", "config": datagen("adt-events")}),
        )
        .await?;
    assert_eq!((code, conflict["error_code"].as_u64()), (409, Some(409)));

    assert_eq!(rest.get("/connectors").await?, (200, json!(["adt"])));
    let (code, info) = rest.get("/connectors/adt").await?;
    assert_eq!(
        (code, &info["config"]["topic"]),
        (200, &json!("adt-events"))
    );
    assert_eq!(rest.get("/connectors/adt/config").await?.1["rate"], "50");

    worker.wait_for_state("adt", "RUNNING", 1).await?;
    let (code, status) = rest.get("/connectors/adt/status").await?;
    assert_eq!(code, 200);
    assert_eq!(status["type"], "source");
    assert!(status["connector"]["worker_id"].is_string());
    let (code, task) = rest.get("/connectors/adt/tasks/0/status").await?;
    assert_eq!(
        (code, &task["id"], &task["state"]),
        (200, &json!(0), &json!("RUNNING"))
    );
    assert_eq!(rest.get("/connectors/adt/tasks/7/status").await?.0, 404);

    let (code, tasks) = rest.get("/connectors/adt/tasks").await?;
    assert_eq!(code, 200);
    assert_eq!(tasks[0]["id"], json!({"connector": "adt", "task": 0}));
    assert_eq!(tasks[0]["config"]["topic"], "adt-events");

    // PUT replaces the config (200), PUT on a new name creates (201).
    let mut updated = datagen("adt-events");
    updated["tasks.max"] = json!("2");
    let (code, info) = rest.put("/connectors/adt/config", &updated).await?;
    assert_eq!(code, 200, "{info}");
    assert_eq!(info["tasks"].as_array().unwrap().len(), 2);
    worker.wait_for_state("adt", "RUNNING", 2).await?;
    let (code, _) = rest
        .put("/connectors/labs/config", &datagen("labs"))
        .await?;
    assert_eq!(code, 201);

    // PATCH changes one key and removes another with null.
    let (code, patched) = rest
        .patch(
            "/connectors/adt/config",
            &json!({"rate": "5", "tasks.max": null}),
        )
        .await?;
    assert_eq!(code, 200, "{patched}");
    assert_eq!(patched["config"]["rate"], "5");
    assert!(patched["config"].get("tasks.max").is_none());
    assert_eq!(patched["tasks"].as_array().unwrap().len(), 1);

    let (code, expanded) = rest.get("/connectors?expand=status&expand=info").await?;
    assert_eq!(code, 200);
    assert_eq!(expanded["adt"]["info"]["name"], "adt");
    assert!(expanded["labs"]["status"]["connector"]["state"].is_string());

    let (code, topics) = rest.get("/connectors/adt/topics").await?;
    assert_eq!(code, 200);
    assert!(topics["adt"]["topics"].is_array());
    assert_eq!(rest.put_empty("/connectors/adt/topics/reset").await?.0, 202);

    assert_eq!(
        rest.post_empty("/connectors/adt/tasks/0/restart").await?.0,
        204
    );
    assert_eq!(
        rest.post_empty("/connectors/adt/tasks/9/restart").await?.0,
        404
    );
    assert_eq!(rest.post_empty("/connectors/adt/restart").await?.0, 204);
    let (code, restarted) = rest
        .post_empty("/connectors/adt/restart?includeTasks=true")
        .await?;
    assert_eq!(code, 202);
    assert_eq!(restarted["name"], "adt");
    worker.wait_for_state("adt", "RUNNING", 1).await?;

    assert_eq!(rest.delete("/connectors/adt").await?.0, 204);
    assert_eq!(rest.get("/connectors").await?.1, json!(["labs"]));
    let (code, missing) = rest.delete("/connectors/adt").await?;
    assert_eq!(code, 404);
    assert_eq!(
        missing,
        json!({"error_code": 404, "message": "Connector adt not found"})
    );
    for path in [
        "/connectors/adt",
        "/connectors/adt/config",
        "/connectors/adt/status",
        "/connectors/adt/tasks",
        "/connectors/adt/offsets",
        "/connectors/adt/topics",
    ] {
        assert_eq!(rest.get(path).await?.0, 404, "{path}");
    }
    for path in [
        "/connectors/adt/pause",
        "/connectors/adt/resume",
        "/connectors/adt/stop",
    ] {
        assert_eq!(rest.put_empty(path).await?.0, 404, "{path}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_naming_the_field() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let rest = &worker.rest;

    let mut bad_rate = datagen("t");
    bad_rate["rate"] = json!("-5");
    let (code, error) = rest
        .post("/connectors", &json!({"name": "bad", "config": bad_rate}))
        .await?;
    assert_eq!(code, 400);
    assert_eq!(error["error_code"], 400);
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("1 error(s)") && message.contains("rate: must be at least 0"),
        "{message}"
    );

    let (code, error) = rest
        .post(
            "/connectors",
            &json!({"name": "bad", "config": {"topic": "t"}}),
        )
        .await?;
    assert_eq!(code, 400);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("connector.class"),
        "{error}"
    );

    let (code, error) = rest
        .post(
            "/connectors",
            &json!({"name": "bad", "config": {"connector.class": "Nope"}}),
        )
        .await?;
    assert_eq!(code, 400);
    assert!(error["message"].as_str().unwrap().contains("Nope"));

    let (code, error) = rest
        .raw(reqwest::Method::POST, "/connectors", "{not json")
        .await?;
    assert_eq!((code, error["error_code"].as_u64()), (400, Some(400)));

    let (code, _) = rest
        .put(
            "/connectors/a/config",
            &json!({"name": "b", "connector.class": "DatagenSource", "topic": "t"}),
        )
        .await?;
    assert_eq!(code, 400);

    let mut secret = datagen("t");
    secret["db.password"] = json!("${env:MEDCONNECT_E2E_SURELY_UNSET}");
    let (code, error) = rest
        .post("/connectors", &json!({"name": "bad", "config": secret}))
        .await?;
    assert_eq!(code, 400);
    assert!(
        error["message"].as_str().unwrap().contains("db.password"),
        "{error}"
    );

    let (code, error) = rest
        .post(
            "/connectors",
            &json!({"name": "bad", "config": {"connector.class": "FileSink", "file": "/tmp/x"}}),
        )
        .await?;
    assert_eq!(code, 400);
    assert!(
        error["message"].as_str().unwrap().contains("topics"),
        "{error}"
    );

    assert_eq!(
        rest.get("/connectors").await?.1,
        json!([]),
        "nothing invalid was created"
    );
    let (code, error) = rest.get("/no/such/path").await?;
    assert_eq!((code, error["error_code"].as_u64()), (404, Some(404)));
    let (code, error) = rest.delete("/connector-plugins").await?;
    assert_eq!((code, error["error_code"].as_u64()), (405, Some(405)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_hidden_in_answers_and_kept_when_written_back() -> anyhow::Result<()> {
    // References (`${env:...}`) and the worker's config providers: tests/secrets.rs.
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let rest = &worker.rest;

    let config = json!({
        "connector.class": "DatagenSource",
        "topic": "secretive-topic",
        "max.records": "3",
        "db.password": "hunter2",
    });
    let created = rest.create("secretive", config).await?;
    assert_eq!(created["config"]["db.password"], "[hidden]");
    let (_, tasks) = rest.get("/connectors/secretive/tasks").await?;
    assert_eq!(tasks[0]["config"]["db.password"], "[hidden]");
    let records = cluster.read_topic("secretive-topic", 3).await?;
    assert_eq!(records.len(), 3);

    // A config read from the API and written back keeps its secret.
    let (_, shown) = rest.get("/connectors/secretive/config").await?;
    assert_eq!(
        rest.put("/connectors/secretive/config", &shown).await?.0,
        200
    );
    let configs = cluster.read_all("medconnect-configs").await?;
    let last_config = configs
        .iter()
        .rev()
        .find(|r| r.key.as_deref() == Some("connector-secretive"))
        .map(|r| r.json())
        .unwrap();
    assert_eq!(last_config["properties"]["db.password"], "hunter2");
    Ok(())
}

/// A request with any body and Content-Type: (status, JSON body or the text as a string).
async fn send_raw(
    rest: &medconnect_e2e::Rest,
    method: reqwest::Method,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let response = reqwest::Client::new()
        .request(method, rest.url(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await?;
    let code = response.status().as_u16();
    let text = response.text().await?;
    Ok((
        code,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    ))
}

/// Whether an answer is Connect's error shape with the same code as the HTTP status.
fn connect_error(code: u16, body: &serde_json::Value) -> bool {
    body["error_code"].as_u64() == Some(u64::from(code)) && body["message"].is_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_names_are_checked_like_connect_before_anything_is_written() -> anyhow::Result<()>
{
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let rest = &worker.rest;

    for bad in [
        "line\nbreak",
        "tab\there",
        "nul\u{0}in",
        "c1\u{85}",
        "",
        " \n ",
        "a/b",
    ] {
        let (code, error) = rest
            .post("/connectors", &json!({"name": bad, "config": datagen("t")}))
            .await?;
        assert_eq!(code, 400, "{bad:?}: {error}");
        assert!(connect_error(code, &error), "{bad:?}: {error}");
    }
    let (code, error) = rest
        .post(
            "/connectors",
            &json!({"name": "line\nbreak", "config": datagen("t")}),
        )
        .await?;
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("control"), "{code} {message}");
    // The same name in the URL of PUT .../config.
    let (code, error) = rest
        .put("/connectors/line%0Abreak/config", &datagen("t"))
        .await?;
    assert_eq!(code, 400, "{error}");
    assert!(connect_error(code, &error), "{error}");
    assert_eq!(
        rest.get("/connectors").await?.1,
        json!([]),
        "nothing created"
    );

    // As Connect: surrounding blanks are trimmed, then the name is fine.
    let (code, created) = rest
        .post(
            "/connectors",
            &json!({"name": "  padded  ", "config": datagen("t")}),
        )
        .await?;
    assert_eq!((code, created["name"].as_str()), (201, Some("padded")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_must_be_json_and_fit_with_connect_style_errors() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let rest = &worker.rest;
    let create = json!({"name": "typed", "config": datagen("t")}).to_string();

    // A JSON body declared as something else: Connect answers 415.
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let (code, error) = send_raw(
            rest,
            reqwest::Method::POST,
            "/connectors",
            content_type,
            create.clone(),
        )
        .await?;
        assert_eq!(code, 415, "{content_type}: {error}");
        assert!(connect_error(code, &error), "{error}");
    }
    let (code, error) = send_raw(
        rest,
        reqwest::Method::PUT,
        "/connectors/typed/config",
        "text/plain",
        datagen("t").to_string(),
    )
    .await?;
    assert_eq!(code, 415, "{error}");
    assert_eq!(
        rest.get("/connectors").await?.1,
        json!([]),
        "nothing created"
    );
    let (code, _) = send_raw(
        rest,
        reqwest::Method::POST,
        "/connectors",
        "application/json; charset=utf-8",
        create,
    )
    .await?;
    assert_eq!(code, 201);

    // A body past the size limit: JSON, not axum's plain text.
    let huge = format!(
        r#"{{"name": "huge", "config": {{"x": "{}"}}}}"#,
        "a".repeat(3 << 20)
    );
    let (code, error) = send_raw(
        rest,
        reqwest::Method::POST,
        "/connectors",
        "application/json",
        huge,
    )
    .await?;
    assert_eq!(code, 413, "{error}");
    assert!(connect_error(code, &error), "{error}");

    // A config of 1-2 MB fits the body limit but not one record of the config topic: refused
    // before anything is written, naming the limit (it was a 500 MessageSizeTooLarge).
    let mut big = datagen("t");
    big["padding"] = json!("p".repeat(1_500_000));
    let (code, error) = rest
        .post("/connectors", &json!({"name": "big", "config": big}))
        .await?;
    assert!((400..500).contains(&code), "{code}: {error}");
    assert!(connect_error(code, &error), "{error}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("limit"), "{message}");
    let (code, error) = rest.put("/connectors/big/config", &big).await?;
    assert!(
        (400..500).contains(&code) && connect_error(code, &error),
        "{code}: {error}"
    );
    let (code, error) = rest
        .patch(
            "/connectors/typed/config",
            &json!({"padding": "p".repeat(1_500_000)}),
        )
        .await?;
    assert!(
        (400..500).contains(&code) && connect_error(code, &error),
        "{code}: {error}"
    );
    assert_eq!(rest.get("/connectors").await?.1, json!(["typed"]));
    let (_, config) = rest.get("/connectors/typed/config").await?;
    assert!(config.get("padding").is_none(), "the patch was not written");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_with_a_trailing_slash_answer_like_without() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let rest = &worker.rest;

    let (code, _) = rest
        .post(
            "/connectors/",
            &json!({"name": "slash", "config": datagen("t")}),
        )
        .await?;
    assert_eq!(code, 201);
    for path in [
        "/connectors",
        "/connectors/slash",
        "/connectors/slash/config",
        "/connectors/slash/status",
        "/connectors/slash/tasks",
        "/connectors/slash/topics",
        "/connector-plugins",
        "/connector-plugins/DatagenSource/config",
        "/admin/loggers",
    ] {
        let without = rest.get(path).await?;
        let with = rest.get(&format!("{path}/")).await?;
        assert_eq!(without.0, 200, "{path}: {without:?}");
        assert_eq!(with.0, 200, "{path}/: {with:?}");
        // Statuses and topics change as tasks run; the rest is the same answer.
        if !(path.ends_with("status") || path.ends_with("topics")) {
            assert_eq!(with, without, "{path}");
        }
    }
    let (code, _) = rest.get("/connectors/?expand=status&expand=info").await?;
    assert_eq!(code, 200);
    let (code, _) = rest.put_empty("/connectors/slash/pause/").await?;
    assert_eq!(code, 202);
    let (code, _) = rest.put_empty("/connectors/slash/stop//").await?;
    assert_eq!(code, 204);
    let (code, error) = rest.get("/connectors/nope/").await?;
    assert_eq!((code, error["error_code"].as_u64()), (404, Some(404)));
    // axum's own rejections (a query it cannot read) are Connect's JSON too.
    let (code, error) = rest
        .post_empty("/connectors/slash/restart?includeTasks=maybe")
        .await?;
    assert_eq!(code, 400, "{error}");
    assert!(connect_error(code, &error), "{error}");
    let (code, _) = rest.delete("/connectors/slash/").await?;
    assert_eq!(code, 204);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_levels_are_read_and_changed_at_run_time() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let rest = &worker.rest;

    let (code, loggers) = rest.get("/admin/loggers").await?;
    assert_eq!(code, 200, "{loggers}");
    assert_eq!(loggers["root"]["level"], "INFO", "{loggers}");

    let (code, affected) = rest
        .put(
            "/admin/loggers/medconnect_runtime::task",
            &json!({"level": "DEBUG"}),
        )
        .await?;
    assert_eq!((code, affected), (200, json!(["medconnect_runtime::task"])));
    let (_, level) = rest.get("/admin/loggers/medconnect_runtime::task").await?;
    assert_eq!(level, json!({"level": "DEBUG"}));
    // A logger below it has its level; one beside it has root's.
    let (_, level) = rest
        .get("/admin/loggers/medconnect_runtime::task::source")
        .await?;
    assert_eq!(level["level"], "DEBUG");
    let (_, level) = rest.get("/admin/loggers/medconnect_runtime::rest").await?;
    assert_eq!(level["level"], "INFO");
    let (_, loggers) = rest.get("/admin/loggers").await?;
    assert_eq!(loggers["medconnect_runtime::task"]["level"], "DEBUG");
    assert!(loggers["medconnect_runtime::task"]["last_modified"].is_u64());

    // Setting a logger sets those below it, and says which (Connect's answer).
    let (code, affected) = rest
        .put(
            "/admin/loggers/medconnect_runtime",
            &json!({"level": "warn"}),
        )
        .await?;
    assert_eq!(code, 200);
    assert_eq!(
        affected,
        json!(["medconnect_runtime", "medconnect_runtime::task"])
    );
    let (_, level) = rest.get("/admin/loggers/medconnect_runtime::task").await?;
    assert_eq!(level["level"], "WARN");
    let (code, _) = rest
        .put(
            "/admin/loggers/medconnect_runtime?scope=cluster",
            &json!({"level": "INFO"}),
        )
        .await?;
    assert_eq!(code, 204);

    for bad in [json!({"level": "VERBOSE"}), json!({}), json!({"level": 3})] {
        let (code, error) = rest.put("/admin/loggers/root", &bad).await?;
        assert_eq!(code, 400, "{bad}: {error}");
        assert!(connect_error(code, &error), "{error}");
    }
    let (_, loggers) = rest.get("/admin/loggers").await?;
    assert_eq!(
        loggers["root"]["level"], "INFO",
        "a refused change changed nothing"
    );
    Ok(())
}
