//! The MQTT broker source in a real worker against the embedded Kafka-API broker: devices
//! (`mosquitto_pub`, QoS 1) publish to a real Mosquitto (`scripts/mqtt-peers` installs both),
//! the connector from `configs/mqtt-broker-source.json` subscribes, and exactly what was
//! published lands in Kafka, keyed by device. And the listener source from
//! `configs/mqtt-device-source.json`: devices publish to the worker itself.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use medconnect_e2e::TestCluster;
use tokio::io::AsyncWriteExt;

/// Mosquitto on a free port with its config in a temporary directory; killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start() -> anyhow::Result<Self> {
        let binary = std::env::var_os("MEDCONNECT_MOSQUITTO")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/sbin/mosquitto"));
        anyhow::ensure!(
            binary.is_file(),
            "mosquitto missing at {}: run scripts/mqtt-peers",
            binary.display()
        );
        let dir = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.path().join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n"
            ),
        )?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let broker = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "mosquitto did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(broker)
    }

    /// One QoS 1 message per line, sent by `mosquitto_pub -l` as a device would.
    async fn publish_lines(&self, topic: &str, lines: &[String]) -> anyhow::Result<()> {
        publish_lines(self.port, topic, lines, &[]).await
    }
}

/// One QoS 1 message per line to port `port`, sent by `mosquitto_pub -l` (with `extra`
/// arguments) as a device would; succeeds once every line was acknowledged.
async fn publish_lines(
    port: u16,
    topic: &str,
    lines: &[String],
    extra: &[&str],
) -> anyhow::Result<()> {
    let mut child = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-l",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(format!("{}\n", lines.join("\n")).as_bytes())
        .await?;
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await??;
    anyhow::ensure!(status.success(), "mosquitto_pub failed: {status}");
    Ok(())
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_readings_published_to_mosquitto_land_in_kafka_exactly() -> anyhow::Result<()> {
    let mosquitto = Mosquitto::start()?;
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;

    let example: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/mqtt-broker-source.json"
    ))?)?;
    let mut config = example["config"].clone();
    config["mqtt.server.uri"] = format!("tcp://127.0.0.1:{}", mosquitto.port).into();
    let name = example["name"].as_str().expect("a name");
    worker.rest.create(name, config).await?;
    worker.wait_for_state(name, "RUNNING", 1).await?;

    let devices = ["monitor-7", "pump-3"];
    let mut published = BTreeSet::new();
    for device in devices {
        let lines: Vec<String> = (0..250)
            .map(|n| format!("{{\"device\":\"{device}\",\"n\":{n}}}"))
            .collect();
        published.extend(lines.iter().cloned());
        mosquitto
            .publish_lines(&format!("devices/{device}/vitals"), &lines)
            .await?;
    }

    cluster.read_topic("device.vitals", 500).await?;
    let records = cluster.read_all("device.vitals").await?;
    assert_eq!(records.len(), 500, "exactly the 500 published readings");
    let mut values = BTreeSet::new();
    for record in &records {
        let value = record.json();
        let device = value["device"].as_str().expect("a device").to_string();
        assert_eq!(record.key.as_deref(), Some(device.as_str()));
        assert_eq!(
            record.header("mqtt.topic"),
            Some(format!("devices/{device}/vitals").as_str())
        );
        assert_eq!(record.header("mqtt.qos"), Some("1"));
        values.insert(value.to_string());
    }
    let expected: BTreeSet<String> = published
        .iter()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).map(|v| v.to_string()))
        .collect::<Result<_, _>>()?;
    assert_eq!(values, expected);
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_on_an_unmapped_topic_goes_to_the_dead_letter_topic_and_is_acknowledged()
-> anyhow::Result<()> {
    let mosquitto = Mosquitto::start()?;
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let config = serde_json::json!({
        "connector.class": "MqttBrokerSource",
        "mqtt.server.uri": format!("tcp://127.0.0.1:{}", mosquitto.port),
        "mqtt.client.id": "medconnect-dlq",
        "mqtt.topics": "devices/#",
        "mqtt.topic.pattern": "devices/+device/vitals",
        "kafka.topic": "device.vitals",
        "kafka.key": "${device}",
        "errors.tolerance": "all",
        "errors.deadletterqueue.topic.name": "device.dlq",
        "errors.deadletterqueue.context.headers.enable": "true",
    });
    worker.rest.create("devices-dlq", config).await?;
    worker.wait_for_state("devices-dlq", "RUNNING", 1).await?;

    let readings: Vec<String> = (0..10).map(|n| format!("{{\"n\":{n}}}")).collect();
    let alarms: Vec<String> = (0..5).map(|n| format!("{{\"alarm\":{n}}}")).collect();
    // mosquitto_pub exits successfully only once every message was PUBACKed: the dead-lettered
    // alarms too, since they are durable in the dead-letter topic.
    mosquitto
        .publish_lines("devices/monitor-1/vitals", &readings)
        .await?;
    mosquitto
        .publish_lines("devices/monitor-1/alarms", &alarms)
        .await?;

    cluster.read_topic("device.vitals", 10).await?;
    assert_eq!(cluster.count_records("device.vitals").await?, 10);
    cluster.read_topic("device.dlq", 5).await?;
    let dead = cluster.read_all("device.dlq").await?;
    assert_eq!(dead.len(), 5, "exactly the 5 unmapped messages");
    for record in &dead {
        assert_eq!(
            record.header("mqtt.topic"),
            Some("devices/monitor-1/alarms")
        );
        assert!(
            record
                .header("__connect.errors.exception.message")
                .is_some_and(|m| m.contains("does not match mqtt.topic.pattern")),
            "{:?}",
            record.headers
        );
    }
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_publishing_to_the_worker_itself_land_in_kafka_exactly_and_bad_topics_in_the_dlq()
-> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let example: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/mqtt-device-source.json"
    ))?)?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut config = example["config"].clone();
    config["mqtt.bind"] = "127.0.0.1".into();
    config["mqtt.port"] = port.to_string().into();
    config["mqtt.users"] = "monitor-7:pw-monitor,pump-3:pw-pump".into();
    let name = example["name"].as_str().expect("a name");
    worker.rest.create(name, config).await?;
    worker.wait_for_state(name, "RUNNING", 1).await?;

    // The password is hidden in every answer about the connector.
    let (_, shown) = worker.rest.get(&format!("/connectors/{name}")).await?;
    assert!(!shown.to_string().contains("pw-monitor"), "{shown}");

    let mut published = BTreeSet::new();
    for (device, password) in [("monitor-7", "pw-monitor"), ("pump-3", "pw-pump")] {
        let lines: Vec<String> = (0..250)
            .map(|n| format!("{{\"device\":\"{device}\",\"n\":{n}}}"))
            .collect();
        published.extend(lines.iter().cloned());
        publish_lines(
            port,
            &format!("devices/{device}/vitals"),
            &lines,
            &["-i", device, "-u", device, "-P", password],
        )
        .await?;
    }
    // A publish outside the pattern: acknowledged once it is durable in the dead-letter topic.
    publish_lines(
        port,
        "devices/pump-3/alarms",
        &["{\"alarm\":\"occlusion\"}".to_string()],
        &["-i", "pump-3", "-u", "pump-3", "-P", "pw-pump"],
    )
    .await?;

    cluster.read_topic("device.vitals", 500).await?;
    let records = cluster.read_all("device.vitals").await?;
    assert_eq!(records.len(), 500, "exactly the 500 published readings");
    let mut values = BTreeSet::new();
    for record in &records {
        let value = record.json();
        let device = value["device"].as_str().expect("a device").to_string();
        assert_eq!(record.key.as_deref(), Some(device.as_str()));
        assert_eq!(record.header("mqtt.client.id"), Some(device.as_str()));
        assert_eq!(record.header("mqtt.username"), Some(device.as_str()));
        values.insert(value.to_string());
    }
    let expected: BTreeSet<String> = published
        .iter()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).map(|v| v.to_string()))
        .collect::<Result<_, _>>()?;
    assert_eq!(values, expected);
    cluster.read_topic("device.dlq", 1).await?;
    let dead = cluster.read_all("device.dlq").await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].header("mqtt.topic"), Some("devices/pump-3/alarms"));
    assert!(
        dead[0]
            .header("__connect.errors.exception.message")
            .is_some_and(|m| m.contains("does not match mqtt.topic.pattern"))
    );
    worker.shutdown().await;
    Ok(())
}
