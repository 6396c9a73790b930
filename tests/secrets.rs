//! Secrets stay secret: `${env:...}` / `${file:...}` references resolve only through the
//! config providers a worker enables, within their allowlists, and only in settings that hold
//! secrets; resolved values and the worker's own Kafka secrets reach no log line, status trace
//! or REST answer; a peer's refusal text (an HL7 ACK's MSA-3) stays out of status traces and
//! dead-letter headers unless the connector consents.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, ErrantRecordReporter, Importance,
    SinkConnector, SinkRecord, SinkTask, SinkTaskContext, SourceConnector, SourceRecord,
    SourceTask, SourceTaskContext,
};
use medconnect_e2e::crash::{Processes, free_port, start_broker, write_worker_config};
use medconnect_e2e::{DEADLINE, Rest, TestCluster, TestWorker, eventually, json, test_connector};
use medconnect_runtime::WorkerConfig;
use medconnect_runtime::worker::config_providers::{ConfigProviders, EnvProvider, FileProvider};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Env variables of this test binary: set once, before any worker starts.
const ENV_PASSWORD: &str = "MEDCONNECT_SECRET_E2E_PASSWORD";
const ENV_PASSWORD_VALUE: &str = "planted-env-7f3a9c";
const ENV_NOT_ALLOWED: &str = "MEDCONNECT_E2E_NOT_ALLOWED";
const ENV_NOT_ALLOWED_VALUE: &str = "planted-not-allowed-51d2";

fn set_env() {
    // SAFETY: every test of this binary sets the same values before its workers start; no
    // thread reads these variables concurrently with a write of a different value.
    unsafe {
        std::env::set_var(ENV_PASSWORD, ENV_PASSWORD_VALUE);
        std::env::set_var(ENV_NOT_ALLOWED, ENV_NOT_ALLOWED_VALUE);
    }
}

/// `secrets/` (allowed) and `other/` (not) in the cluster's scratch directory, each with a
/// properties file; `secrets/link` points at the one outside.
fn secret_files(cluster: &TestCluster) -> anyhow::Result<(PathBuf, PathBuf)> {
    let allowed = cluster.path("secrets");
    let other = cluster.path("other");
    std::fs::create_dir_all(&allowed)?;
    std::fs::create_dir_all(&other)?;
    std::fs::write(
        allowed.join("peer.properties"),
        "password=planted-file-c41e\n",
    )?;
    std::fs::write(
        other.join("outside.properties"),
        "password=planted-outside-9b07\n",
    )?;
    std::os::unix::fs::symlink(other.join("outside.properties"), allowed.join("link"))?;
    Ok((allowed, other))
}

fn providers(allowed_dir: &Path) -> ConfigProviders {
    ConfigProviders {
        env: Some(EnvProvider {
            allowed: vec!["MEDCONNECT_SECRET_E2E_*".into()],
        }),
        file: Some(FileProvider {
            allowed_dirs: vec![allowed_dir.to_path_buf()],
        }),
    }
}

async fn worker(cluster: &TestCluster, providers: ConfigProviders) -> anyhow::Result<TestWorker> {
    let mut config: WorkerConfig = cluster.worker_config();
    config.config_providers = providers;
    let plugins = medconnect::builtin_plugins()
        .with_source(std::sync::Arc::new(PeerLogin))
        .with_sink(std::sync::Arc::new(RefusingSink));
    cluster.start_worker_with_plugins(config, plugins).await
}

/// Asserts that no `planted` value occurs in `text`.
fn assert_none_of(planted: &[&str], text: &str, what: &str) {
    for value in planted {
        assert_eq!(
            text.matches(value).count(),
            0,
            "{what} holds the planted value {value}:\n{text}"
        );
    }
}

// ---- a source that hands its password to its peer, as a real connector does ---------------

/// Connects to `peer.address` and sends `peer.password` and a newline, as a login; then polls
/// nothing. A peer that cannot be reached fails the task with a message that quotes the
/// password, as a careless connector might: the engine must take it out of the trace.
struct PeerLogin;

test_connector!(
    PeerLogin,
    "test.PeerLogin",
    Source,
    ConfigDef::new()
        .define_required(
            "peer.address",
            ConfigType::String,
            Importance::High,
            "host:port"
        )
        .define(
            "peer.password",
            ConfigType::Password,
            "",
            Importance::High,
            "sent to the peer"
        )
        .define("topic", ConfigType::String, "unused", Importance::Low, "")
);

impl SourceConnector for PeerLogin {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        let setting = |name: &str| context.config.get(name).cloned().unwrap_or_default();
        Ok(Box::new(PeerLoginTask {
            address: setting("peer.address"),
            password: setting("peer.password"),
        }))
    }
}

struct PeerLoginTask {
    address: String,
    password: String,
}

#[async_trait]
impl SourceTask for PeerLoginTask {
    async fn start(&mut self) -> ConnectResult<()> {
        let mut stream = TcpStream::connect(&self.address).await.map_err(|e| {
            ConnectError::fatal(format!(
                "cannot log in to {} with password {}: {e}",
                self.address, self.password
            ))
        })?;
        stream
            .write_all(format!("{}\n", self.password).as_bytes())
            .await?;
        Ok(())
    }

    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        std::future::pending().await
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        Ok(())
    }
}

/// Reports every record as errant with an error that quotes its password, as a careless
/// connector might: the engine must take it out of the dead-letter headers and logs.
struct RefusingSink;

test_connector!(
    RefusingSink,
    "test.RefusingSink",
    Sink,
    ConfigDef::new().define(
        "peer.password",
        ConfigType::Password,
        "",
        Importance::High,
        ""
    )
);

impl SinkConnector for RefusingSink {
    fn create_task(&self, context: SinkTaskContext) -> ConnectResult<Box<dyn SinkTask>> {
        Ok(Box::new(RefusingSinkTask {
            password: context
                .config
                .get("peer.password")
                .cloned()
                .unwrap_or_default(),
            reporter: context.errant_records,
        }))
    }
}

struct RefusingSinkTask {
    password: String,
    reporter: ErrantRecordReporter,
}

#[async_trait]
impl SinkTask for RefusingSinkTask {
    async fn start(&mut self) -> ConnectResult<()> {
        Ok(())
    }

    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()> {
        for record in records {
            let error =
                ConnectError::data(format!("the target refused password {}", self.password));
            self.reporter.report(record, error).await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> ConnectResult<()> {
        Ok(())
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        Ok(())
    }
}

/// The first line each of `count` connections to `listener` sends.
async fn logins(listener: &TcpListener, count: usize) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    for _ in 0..count {
        let (stream, _) = tokio::time::timeout(DEADLINE, listener.accept()).await??;
        let mut line = String::new();
        tokio::time::timeout(DEADLINE, BufReader::new(stream).read_line(&mut line)).await??;
        lines.push(line.trim_end().to_string());
    }
    lines.sort();
    Ok(lines)
}

/// Every answer the REST API gives about connectors, as one text.
async fn every_answer(rest: &Rest, names: &[&str]) -> anyhow::Result<String> {
    let mut paths = vec!["/connectors?expand=info&expand=status".to_string()];
    for name in names {
        for tail in [
            "",
            "/config",
            "/status",
            "/tasks",
            "/tasks/0/status",
            "/topics",
        ] {
            paths.push(format!("/connectors/{name}{tail}"));
        }
    }
    let mut text = String::new();
    for path in paths {
        let (code, body) = rest.get(&path).await?;
        text.push_str(&format!("GET {path} -> {code} {body}\n"));
    }
    Ok(text)
}

fn message(body: &Value) -> &str {
    body["message"].as_str().unwrap_or_default()
}

// ---- the tests -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_outside_secret_settings_or_the_allowlists_are_400s_without_the_value()
-> anyhow::Result<()> {
    set_env();
    let home = std::env::var("HOME").unwrap_or_default();
    let cluster = TestCluster::start().await?;
    let (allowed, other) = secret_files(&cluster)?;
    let worker = worker(&cluster, providers(&allowed)).await?;
    let rest = &worker.rest;
    let planted = [
        ENV_NOT_ALLOWED_VALUE,
        ENV_PASSWORD_VALUE,
        "planted-file-c41e",
        "planted-outside-9b07",
    ];
    let datagen = |topic: &str, password: &str| {
        json!({"connector.class": "DatagenSource", "topic": topic, "max.records": "1",
               "db.password": password})
    };
    let outside = other.join("outside.properties");
    let cases: Vec<(Value, &str, String)> = vec![
        // A resolved value must never become a topic name, whatever the allowlist says.
        (
            datagen("${env:HOME}", "x"),
            "topic",
            "only be used in a setting that holds a secret".into(),
        ),
        (
            datagen(&format!("${{env:{ENV_PASSWORD}}}"), "x"),
            "topic",
            "only be used in a setting that holds a secret".into(),
        ),
        (
            datagen("t", &format!("${{env:{ENV_NOT_ALLOWED}}}")),
            "db.password",
            format!("{ENV_NOT_ALLOWED} is not allowed"),
        ),
        (
            datagen("t", &format!("${{file:{}:password}}", outside.display())),
            "db.password",
            "not in a directory this worker allows".into(),
        ),
        (
            datagen(
                "t",
                &format!(
                    "${{file:{}/../other/outside.properties:password}}",
                    allowed.display()
                ),
            ),
            "db.password",
            "not in a directory this worker allows".into(),
        ),
        (
            datagen(
                "t",
                &format!("${{file:{}:password}}", allowed.join("link").display()),
            ),
            "db.password",
            "not in a directory this worker allows".into(),
        ),
    ];
    for (config, setting, reason) in &cases {
        let (code, body) = rest
            .post("/connectors", &json!({"name": "refused", "config": config}))
            .await?;
        assert_eq!(code, 400, "{config}: {body}");
        let text = message(&body);
        assert!(
            text.contains(&format!("{setting}: ")) && text.contains(reason.as_str()),
            "{config}: {body}"
        );
        assert_none_of(&planted, &body.to_string(), "the 400");
        if home.len() > 4 {
            assert!(!body.to_string().contains(&home), "{body}");
        }

        let (code, body) = rest.put("/connectors/refused/config", config).await?;
        assert_eq!(code, 400, "PUT {config}: {body}");
        assert!(message(&body).contains(reason.as_str()), "{body}");
        assert_none_of(&planted, &body.to_string(), "the PUT's 400");

        // Validation answers as Connect does (200, the error on the setting), naming the
        // setting, never the value.
        let (code, body) = rest
            .put("/connector-plugins/DatagenSource/config/validate", config)
            .await?;
        assert_eq!(code, 200, "{body}");
        assert!(body["error_count"].as_u64() >= Some(1), "{body}");
        let entry = body["configs"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["value"]["name"] == *setting))
            .cloned()
            .unwrap_or_default();
        assert!(
            entry["value"]["errors"]
                .to_string()
                .contains(reason.as_str()),
            "{setting}: {body}"
        );
        assert_none_of(&planted, &body.to_string(), "the validation");
    }
    assert_eq!(rest.get("/connectors").await?.1, json!([]), "none created");

    // No provider enabled: no reference resolves, and the answer says which setting to add.
    let closed = cluster.start_worker().await?;
    let (code, body) = closed
        .rest
        .post(
            "/connectors",
            &json!({"name": "refused", "config": datagen("t", &format!("${{env:{ENV_PASSWORD}}}"))}),
        )
        .await?;
    assert_eq!(code, 400, "{body}");
    assert!(
        message(&body).contains("db.password: ")
            && message(&body).contains("[config_providers.env]"),
        "{body}"
    );
    assert_none_of(&planted, &body.to_string(), "the 400");
    closed.shutdown().await;
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_references_in_password_settings_reach_the_peer_and_no_answer() -> anyhow::Result<()>
{
    set_env();
    let cluster = TestCluster::start().await?;
    let (allowed, _) = secret_files(&cluster)?;
    let worker = worker(&cluster, providers(&allowed)).await?;
    let rest = &worker.rest;
    let peer = TcpListener::bind("127.0.0.1:0").await?;
    let address = peer.local_addr()?.to_string();

    let from_env = format!("${{env:{ENV_PASSWORD}}}");
    let from_file = format!(
        "${{file:{}:password}}",
        allowed.join("peer.properties").display()
    );
    for (name, reference) in [("login-env", &from_env), ("login-file", &from_file)] {
        let created = rest
            .create(
                name,
                json!({"connector.class": "test.PeerLogin", "peer.address": address,
                       "peer.password": reference}),
            )
            .await?;
        // Stored and shown as written: the reference, not its value.
        assert_eq!(created["config"]["peer.password"], *reference);
    }
    // The tasks started with the resolved values and handed them to their peer.
    assert_eq!(
        logins(&peer, 2).await?,
        vec![
            ENV_PASSWORD_VALUE.to_string(),
            "planted-file-c41e".to_string()
        ]
    );
    worker.wait_for_state("login-env", "RUNNING", 1).await?;
    worker.wait_for_state("login-file", "RUNNING", 1).await?;

    // A peer that cannot be reached: the connector's error quotes the password; the trace
    // must not.
    let closed = free_port()?;
    rest.create(
        "login-unreachable",
        json!({"connector.class": "test.PeerLogin", "peer.address": format!("127.0.0.1:{closed}"),
               "peer.password": from_env}),
    )
    .await?;
    let failed = worker
        .wait_for_task("login-unreachable", 0, "FAILED")
        .await?;
    let trace = failed["trace"].as_str().unwrap_or_default();
    assert!(
        trace.contains("cannot log in to") && trace.contains("with password [hidden]"),
        "{trace}"
    );

    // A sink whose errors quote its password: the dead-letter headers do not.
    cluster.produce("refused.in", &[(None, "r1")]).await?;
    rest.create(
        "refusing",
        json!({"connector.class": "test.RefusingSink", "topics": "refused.in",
               "peer.password": from_env, "errors.tolerance": "all",
               "errors.deadletterqueue.topic.name": "refused.dlq",
               "errors.deadletterqueue.context.headers.enable": "true",
               "errors.log.enable": "true"}),
    )
    .await?;
    let dead = cluster.read_topic("refused.dlq", 1).await?;
    let exception = dead[0]
        .header("__connect.errors.exception.message")
        .unwrap_or_default();
    assert!(
        exception.contains("the target refused password [hidden]"),
        "{exception}"
    );
    let stacktrace = dead[0]
        .header("__connect.errors.exception.stacktrace")
        .unwrap_or_default();
    assert!(!stacktrace.contains(ENV_PASSWORD_VALUE), "{stacktrace}");

    let answers = every_answer(rest, &["login-env", "login-file", "login-unreachable"]).await?;
    assert!(
        answers.contains(&from_env),
        "references are shown as written"
    );
    assert_none_of(
        &[ENV_PASSWORD_VALUE, "planted-file-c41e"],
        &answers,
        "the REST answers",
    );
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_secret_is_in_no_log_line_and_no_rest_answer() -> anyhow::Result<()> {
    const KAFKA_PASSWORD: &str = "planted-kafka-d81f";
    const KAFKA_JAAS: &str = "planted-jaas-52aa";
    const DEVICE_PASSWORD: &str = "planted-device-e6c0";
    const INLINE_PASSWORD: &str = "planted-inline-0c93";
    const FHIR_TOKEN: &str = "planted-fhir-token-77e4";
    let planted = [
        KAFKA_PASSWORD,
        KAFKA_JAAS,
        DEVICE_PASSWORD,
        INLINE_PASSWORD,
        FHIR_TOKEN,
    ];
    let mut processes = Processes::new()?;
    let outcome = async {
        let bootstrap = start_broker(&mut processes).await?;
        let path = write_worker_config(&processes, &bootstrap, 500)?;
        // sasl.* settings are ignored with security.protocol PLAINTEXT: the broker still
        // answers, and the worker holds the secrets as a production worker would.
        let mut toml = std::fs::read_to_string(&path)?;
        toml.push_str(&format!(
            r#"
[kafka]
"sasl.username" = "medconnect"
"sasl.password" = "{KAFKA_PASSWORD}"


[config_providers.env]
allowed = ["MEDCONNECT_SECRET_*"]
"#
        ));
        std::fs::write(&path, &toml)?;
        let listen = toml
            .lines()
            .find_map(|l| l.strip_prefix("listen = \""))
            .and_then(|l| l.strip_suffix('"'))
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("no listen address"))?;
        let users = format!("device-1:{DEVICE_PASSWORD}");
        processes.spawn(
            "worker",
            &medconnect_e2e::medconnect_bin()?,
            &["worker", &path.display().to_string()],
            &[
                ("MEDCONNECT_LOG", "debug"),
                ("MEDCONNECT_SECRET_E2E_USERS", &users),
            ],
        )?;
        let rest = Rest::new(&format!("http://{listen}"));
        eventually("the worker's REST API", async || {
            matches!(rest.get("/").await, Ok((200, _))).then_some(())
        })
        .await?;

        // A listener whose device credentials come from the environment: it runs.
        let mqtt_port = free_port()?;
        let mqtt = json!({"connector.class": "MqttListenerSource", "mqtt.bind": "127.0.0.1",
                          "mqtt.port": mqtt_port.to_string(),
                          "mqtt.users": "${env:MEDCONNECT_SECRET_E2E_USERS}",
                          "mqtt.topic.pattern": "devices/+device/vitals", "kafka.topic": "vitals"});
        let (code, body) = rest
            .post("/connectors", &json!({"name": "devices", "config": mqtt}))
            .await?;
        anyhow::ensure!(code == 201, "{code} {body}");
        // A secret written inline.
        let datagen = json!({"connector.class": "DatagenSource", "topic": "t", "max.records": "5",
                             "db.password": INLINE_PASSWORD});
        let (code, body) = rest
            .post("/connectors", &json!({"name": "inline", "config": datagen}))
            .await?;
        anyhow::ensure!(code == 201, "{code} {body}");
        for name in ["devices", "inline"] {
            eventually(&format!("{name} RUNNING"), async || {
                let (_, status) = rest.get(&format!("/connectors/{name}/status")).await.ok()?;
                (status["tasks"][0]["state"] == "RUNNING").then_some(())
            })
            .await?;
        }

        // Error answers: a FHIR sink whose server cannot be reached (validation asks it),
        // a reference where no reference may be, the same configs validated.
        let fhir = json!({"connector.class": "FhirSink", "topics": "t",
                          "fhir.url": format!("http://127.0.0.1:{}/fhir", free_port()?),
                          "fhir.auth.type": "bearer", "fhir.auth.token": FHIR_TOKEN});
        let leaky_topic = json!({"connector.class": "DatagenSource",
                                 "topic": "${env:MEDCONNECT_SECRET_E2E_USERS}"});
        let mut answers = String::new();
        for (name, config) in [("fhir", &fhir), ("leaky", &leaky_topic)] {
            let (code, body) = rest
                .post("/connectors", &json!({"name": name, "config": config}))
                .await?;
            anyhow::ensure!(code == 400, "{name}: {code} {body}");
            answers.push_str(&format!("{body}\n"));
            let (_, body) = rest.put(&format!("/connectors/{name}/config"), config).await?;
            answers.push_str(&format!("{body}\n"));
        }
        for (plugin, config) in [
            ("FhirSink", &fhir),
            ("DatagenSource", &leaky_topic),
            ("MqttListenerSource", &mqtt),
            ("DatagenSource", &datagen),
        ] {
            let (_, body) = rest
                .put(&format!("/connector-plugins/{plugin}/config/validate"), config)
                .await?;
            answers.push_str(&format!("{body}\n"));
        }
        answers.push_str(&every_answer(&rest, &["devices", "inline"]).await?);
        assert_none_of(&planted, &answers, "the REST answers");
        assert!(
            answers.contains("${env:MEDCONNECT_SECRET_E2E_USERS}") && answers.contains("[hidden]"),
            "the answers show references and hide values:\n{answers}"
        );

        processes.signal("worker", "TERM")?;
        eventually("the worker to exit", async || {
            processes.exited("worker").then_some(())
        })
        .await?;
        let log = format!(
            "{}\n{}",
            processes.stderr("worker"),
            processes.stdout("worker")
        );
        assert!(
            log.lines().any(|l| l.contains(" DEBUG ")),
            "the worker logged at debug level:\n{log}"
        );
        assert_none_of(&planted, &log, "the worker's log");

        // librdkafka refuses Java's JAAS config, quoting it in its error: the worker exits
        // naming the setting, not its value.
        let jaas = path.with_file_name("worker-jaas.toml");
        std::fs::write(
            &jaas,
            format!(
                "{toml}\n[admin]\n\"sasl.jaas.config\" = \"org.apache.kafka.common.security.plain.PlainLoginModule required password=\\\"{KAFKA_JAAS}\\\";\"\n"
            ),
        )?;
        processes.spawn(
            "worker-jaas",
            &medconnect_e2e::medconnect_bin()?,
            &["worker", &jaas.display().to_string()],
            &[("MEDCONNECT_LOG", "debug")],
        )?;
        eventually("the JAAS worker to exit", async || {
            processes.exited("worker-jaas").then_some(())
        })
        .await?;
        let log = processes.stderr("worker-jaas");
        assert!(
            log.contains("sasl.jaas.config") && log.contains("cannot run"),
            "{log}"
        );
        assert_none_of(&planted, &log, "the JAAS worker's log");
        Ok(())
    }
    .await;
    processes.report(outcome)
}

/// A downstream receiver (hl7apy) that answers AE with MSA-3 "rejected by test peer" to
/// messages whose control id starts with REJECT; its port.
async fn hl7_receiver() -> anyhow::Result<(tokio::process::Child, String)> {
    let python = medconnect_e2e::crash::python_bin()?.join("python");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../connectors/hl7/tests/peers/hl7apy_receiver.py");
    let mut receiver = tokio::process::Command::new(python)
        .arg(&script)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = receiver
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let port = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await??
        .and_then(|l| l.strip_prefix("PORT ").map(str::to_string))
        .ok_or_else(|| anyhow::anyhow!("the receiver did not start"))?;
    // Keep reading, so the receiver never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((receiver, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hl7_sinks_nak_text_stays_out_of_traces_and_dead_letters_without_consent()
-> anyhow::Result<()> {
    const NAK_TEXT: &str = "rejected by test peer";
    let (_receiver, port) = hl7_receiver().await?;
    let cluster = TestCluster::start().await?;
    let message = "MSH|^~\\&|EPIC|GENHOSP|LIS|DC|20261122120000||ADT^A01^ADT_A01|REJECT1|P|2.5.1\rPID|1||PAT9^^^GENHOSP^MR||DOE^JANE\r";
    for topic in ["nak.fail", "nak.dlq", "nak.consent"] {
        cluster.produce(topic, &[(Some("PAT9"), message)]).await?;
    }
    let worker = cluster.start_worker().await?;
    let sink = |topic: &str| {
        json!({"connector.class": "MllpSink", "topics": topic, "mllp.host": "127.0.0.1",
               "mllp.port": port, "retry.max.attempts": "1"})
    };
    // errors.tolerance=none: the refusal fails the task.
    worker.rest.create("nak-fail", sink("nak.fail")).await?;
    // Dead-lettered without consent, and with it.
    let mut dlq = sink("nak.dlq");
    dlq["errors.tolerance"] = json!("all");
    dlq["errors.deadletterqueue.topic.name"] = json!("nak.dlq.dead");
    dlq["errors.deadletterqueue.context.headers.enable"] = json!("true");
    let mut consent = dlq.clone();
    consent["topics"] = json!("nak.consent");
    consent["errors.deadletterqueue.topic.name"] = json!("nak.consent.dead");
    consent["errors.log.include.messages"] = json!("true");
    worker.rest.create("nak-dlq", dlq).await?;
    worker.rest.create("nak-consent", consent).await?;

    let failed = worker.wait_for_task("nak-fail", 0, "FAILED").await?;
    let trace = failed["trace"].as_str().unwrap_or_default();
    assert!(trace.contains("the receiver answered AE"), "{trace}");
    assert!(!trace.contains(NAK_TEXT), "{trace}");

    let dead = cluster.read_topic("nak.dlq.dead", 1).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].header("hl7.ack.text"), None);
    let exception = dead[0]
        .header("__connect.errors.exception.message")
        .unwrap_or_default();
    assert!(
        exception.contains("the receiver answered AE"),
        "{exception}"
    );
    for header in [
        "__connect.errors.exception.message",
        "__connect.errors.exception.stacktrace",
    ] {
        assert!(
            !dead[0]
                .header(header)
                .unwrap_or_default()
                .contains(NAK_TEXT),
            "{header}"
        );
    }

    let consented = cluster.read_topic("nak.consent.dead", 1).await?;
    assert_eq!(consented.len(), 1);
    assert_eq!(consented[0].header("hl7.ack.text"), Some(NAK_TEXT));

    let (_, status) = worker
        .rest
        .get("/connectors?expand=status&expand=info")
        .await?;
    assert!(!status.to_string().contains(NAK_TEXT), "{status}");
    worker.shutdown().await;
    Ok(())
}
