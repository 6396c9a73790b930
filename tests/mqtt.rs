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

use medconnect_e2e::mqtt_devices::{
    DeviceLines, device_users, example_listener, line_starting, paho_python, received_commands,
    spawn_subscriber,
};
use medconnect_e2e::{TestCluster, example_connector};
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

    let (name, mut config) = example_connector("mqtt-broker-source.json")?;
    config["mqtt.server.uri"] = format!("tcp://127.0.0.1:{}", mosquitto.port).into();
    worker.rest.create(&name, config).await?;
    worker.wait_for_state(&name, "RUNNING", 1).await?;

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
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let (name, config) = example_listener(port, "monitor-7:pw-monitor,pump-3:pw-pump")?;
    worker.rest.create(&name, config).await?;
    worker.wait_for_state(&name, "RUNNING", 1).await?;

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

/// The listener from `configs/mqtt-device-source.json` with `mqtt.transport=websocket`,
/// created through the worker's REST API: two paho devices over WebSocket publish 100 QoS 1
/// readings each; every one is acknowledged and exactly those 200 are in Kafka, keyed by
/// device. A bad transport is refused at create with a 400 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_over_websocket_land_in_kafka_exactly() -> anyhow::Result<()> {
    const READINGS: usize = 100;
    let python = paho_python()?;
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let (name, mut config) = example_listener(port, "monitor-7:pw-monitor,pump-3:pw-pump")?;

    let mut wrong = config.clone();
    wrong["mqtt.transport"] = "websockets".into();
    let (code, body) = worker
        .rest
        .post(
            "/connectors",
            &serde_json::json!({"name": name, "config": wrong}),
        )
        .await?;
    assert_eq!(code, 400, "{body}");
    assert!(body.to_string().contains("mqtt.transport"), "{body}");

    config["mqtt.transport"] = "websocket".into();
    worker.rest.create(&name, config).await?;
    worker.wait_for_state(&name, "RUNNING", 1).await?;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../connectors/mqtt/tests/peers/ws_device.py"
    );
    let mut devices = Vec::new();
    for (device, password) in [("monitor-7", "pw-monitor"), ("pump-3", "pw-pump")] {
        let child = tokio::process::Command::new(&python)
            .arg(script)
            .args(["--port", &port.to_string(), "--client-id", device])
            .args(["--username", device, "--password", password])
            .args(["--count", &READINGS.to_string()])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        devices.push((device, child));
    }
    for (device, child) in devices {
        let output =
            tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await??;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{device}: {stdout}");
        assert_eq!(acked(&stdout).len(), READINGS, "{device}: {stdout}");
    }

    cluster.read_topic("device.vitals", 2 * READINGS).await?;
    let records = cluster.read_all("device.vitals").await?;
    assert_eq!(
        records.len(),
        2 * READINGS,
        "exactly the readings published"
    );
    let mut seen = BTreeSet::new();
    for record in &records {
        let value = record.json();
        let device = value["device"].as_str().expect("a device").to_string();
        assert_eq!(record.key.as_deref(), Some(device.as_str()));
        assert_eq!(record.header("mqtt.client.id"), Some(device.as_str()));
        seen.insert((device, value["n"].as_u64().expect("n")));
    }
    assert_eq!(seen.len(), 2 * READINGS, "no reading twice, none missing");
    worker.shutdown().await;
    Ok(())
}

fn device_script() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/peers/mqtt_device.py"))
}

/// The readings (n) a device's output says were acknowledged.
fn acked(output: &str) -> BTreeSet<u64> {
    output
        .lines()
        .filter_map(|line| line.strip_prefix("ACK ")?.trim().parse().ok())
        .collect()
}

/// A listener connector (the example config) on a free port, RUNNING, for devices
/// `device-0..` with password `pw`.
async fn start_listener(
    rest: &medconnect_e2e::Rest,
    devices: usize,
    overrides: &[(&str, &str)],
) -> anyhow::Result<u16> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let (name, mut config) = example_listener(port, &device_users(devices))?;
    for (key, value) in overrides {
        config[*key] = (*value).into();
    }
    rest.create(&name, config).await?;
    medconnect_e2e::eventually("the MQTT listener to accept", async || {
        let (_, status) = rest.get(&format!("/connectors/{name}/status")).await.ok()?;
        if status["tasks"][0]["state"] != "RUNNING" {
            return None;
        }
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .await?;
    Ok(port)
}

/// (device, n) of every reading in the topic, with how often each occurs.
fn readings(
    records: &[medconnect_e2e::Received],
) -> anyhow::Result<std::collections::BTreeMap<(String, u64), usize>> {
    let mut counts = std::collections::BTreeMap::new();
    for record in records {
        let value = record.json();
        let device = value["device"].as_str().unwrap_or_default().to_string();
        anyhow::ensure!(
            record.key.as_deref() == Some(device.as_str()),
            "keyed by device"
        );
        let n = value["n"].as_u64().unwrap_or(u64::MAX);
        *counts.entry((device, n)).or_default() += 1;
    }
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_paho_devices_publish_a_thousand_readings_and_each_acknowledged_one_is_in_kafka()
-> anyhow::Result<()> {
    let python = paho_python()?;
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let port = start_listener(&worker.rest, 10, &[]).await?;
    let devices: Vec<_> = (0..10)
        .map(|d| {
            tokio::process::Command::new(&python)
                .arg(device_script())
                .args([
                    "--port",
                    &port.to_string(),
                    "--client-id",
                    &format!("device-{d}"),
                ])
                .args([
                    "--username",
                    &format!("device-{d}"),
                    "--password",
                    "pw",
                    "--count",
                    "100",
                ])
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut acknowledged = BTreeSet::new();
    for (d, device) in devices.into_iter().enumerate() {
        let output =
            tokio::time::timeout(Duration::from_secs(120), device.wait_with_output()).await??;
        anyhow::ensure!(
            output.status.success(),
            "device-{d} did not get every acknowledgement"
        );
        for n in acked(&String::from_utf8_lossy(&output.stdout)) {
            acknowledged.insert((format!("device-{d}"), n));
        }
    }
    assert_eq!(acknowledged.len(), 1000);
    cluster.read_topic("device.vitals", 1000).await?;
    let counts = readings(&cluster.read_all("device.vitals").await?)?;
    let missing = acknowledged
        .iter()
        .filter(|r| !counts.contains_key(*r))
        .count();
    assert_eq!(missing, 0, "acknowledged readings missing from Kafka");
    assert_eq!(counts.len(), 1000);
    assert_eq!(
        counts.values().sum::<usize>(),
        1000,
        "no duplicates without a failure"
    );
    worker.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_puback_while_kafka_is_unreachable_and_the_readings_arrive_once_it_is_back()
-> anyhow::Result<()> {
    let python = paho_python()?;
    let (cluster, network) = TestCluster::start_behind_proxy().await?;
    let worker = cluster.start_worker().await?;
    let port = start_listener(&worker.rest, 1, &[]).await?;
    let run_device = |first: u64| {
        tokio::process::Command::new(&python)
            .arg(device_script())
            .args(["--port", &port.to_string(), "--client-id", "device-0"])
            .args([
                "--username",
                "device-0",
                "--password",
                "pw",
                "--count",
                "20",
            ])
            .args(["--first", &first.to_string()])
            .stdout(Stdio::piped())
            .spawn()
    };
    // Before the cut: acknowledged as usual.
    let before = run_device(0)?.wait_with_output().await?;
    anyhow::ensure!(
        before.status.success(),
        "no acknowledgements before the cut"
    );

    network.cut();
    let mut during = run_device(100)?;
    let mut stdout = during.stdout.take().expect("piped stdout");
    let mut seen = Vec::new();
    // Nothing acknowledged while the broker is cut off: the device waits.
    let read = tokio::time::timeout(Duration::from_secs(3), async {
        use tokio::io::AsyncReadExt;
        let mut buffer = [0u8; 256];
        loop {
            let n = stdout.read(&mut buffer).await?;
            if n == 0 {
                return anyhow::Ok(());
            }
            seen.extend_from_slice(&buffer[..n]);
        }
    })
    .await;
    assert!(
        read.is_err() && acked(&String::from_utf8_lossy(&seen)).is_empty(),
        "acknowledged while Kafka was unreachable: {}",
        String::from_utf8_lossy(&seen)
    );

    network.restore();
    let mut rest = Vec::new();
    {
        use tokio::io::AsyncReadExt;
        tokio::time::timeout(Duration::from_secs(120), stdout.read_to_end(&mut rest)).await??;
    }
    seen.extend_from_slice(&rest);
    let status = during.wait().await?;
    anyhow::ensure!(
        status.success(),
        "not every reading acknowledged after Kafka returned"
    );
    assert_eq!(acked(&String::from_utf8_lossy(&seen)).len(), 20);

    cluster.read_topic("device.vitals", 40).await?;
    let counts = readings(&cluster.read_all("device.vitals").await?)?;
    let wanted: Vec<(String, u64)> = (0..20)
        .chain(100..120)
        .map(|n| ("device-0".to_string(), n))
        .collect();
    let missing = wanted.iter().filter(|r| !counts.contains_key(*r)).count();
    assert_eq!(missing, 0, "readings missing after Kafka returned");
    eprintln!(
        "mqtt cut: 40 readings, {} records ({} duplicates from resends)",
        counts.values().sum::<usize>(),
        counts.values().sum::<usize>() - counts.len()
    );
    worker.shutdown().await;
    Ok(())
}

const CRASH_DEVICES: usize = 4;
const CRASH_READINGS: u64 = 500;

/// Crash honesty for the listener: 4 paho devices (separate processes, persistent sessions)
/// publish 500 readings each at QoS 1 to a worker *process*, which is SIGKILLed once 30 % are
/// acknowledged and started again on the same port; the devices reconnect and resend what was
/// not acknowledged. Every reading acknowledged before the kill is in Kafka; duplicates (a
/// reading stored whose PUBACK died with the worker) are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_acknowledged_before_a_sigkill_is_in_kafka() -> anyhow::Result<()> {
    let mut processes = medconnect_e2e::crash::Processes::new()?;
    let outcome = listener_crash(&mut processes).await;
    processes.report(outcome)
}

async fn listener_crash(processes: &mut medconnect_e2e::crash::Processes) -> anyhow::Result<()> {
    use medconnect_e2e::crash::{
        read_all, report_line, start_broker, start_worker, write_worker_config,
    };
    let started = Instant::now();
    let python = paho_python()?;
    let bootstrap = start_broker(processes).await?;
    let worker_toml = write_worker_config(processes, &bootstrap, 200)?;
    let rest = start_worker(processes, "worker-1", &worker_toml).await?;
    // Records wait 200 ms in the producer before they are sent: a listener that acknowledged
    // on receipt would have acknowledged readings that die with the worker (this test then
    // finds them missing; checked).
    let port = start_listener(
        &rest,
        CRASH_DEVICES,
        &[("producer.override.linger.ms", "200")],
    )
    .await?;

    let script = device_script();
    let script = script.to_str().unwrap_or_default();
    let names: Vec<String> = (0..CRASH_DEVICES).map(|d| format!("device-{d}")).collect();
    for name in &names {
        processes.spawn(
            name,
            &python,
            &[
                script,
                "--port",
                &port.to_string(),
                "--client-id",
                name,
                "--username",
                name,
                "--password",
                "pw",
                "--count",
                &CRASH_READINGS.to_string(),
                "--deadline",
                "180",
            ],
            &[("PYTHONUNBUFFERED", "1")],
        )?;
    }
    let total = CRASH_DEVICES as u64 * CRASH_READINGS;
    let kill_at = total * 3 / 10;
    medconnect_e2e::eventually(&format!("{kill_at} readings acknowledged"), async || {
        let count: usize = names
            .iter()
            .map(|n| acked(&processes.stdout(n)).len())
            .sum();
        (count as u64 >= kill_at).then_some(())
    })
    .await?;
    processes.kill("worker-1")?;
    let killed_after = started.elapsed();
    let before_kill: BTreeSet<(String, u64)> = names
        .iter()
        .flat_map(|name| {
            acked(&processes.stdout(name))
                .into_iter()
                .map(move |n| (name.clone(), n))
        })
        .collect();
    anyhow::ensure!(
        (before_kill.len() as u64) < total,
        "every reading was acknowledged before the kill"
    );

    let _rest = start_worker(processes, "worker-2", &worker_toml).await?;
    let deadline = Instant::now() + Duration::from_secs(180);
    while !names.iter().all(|n| processes.exited(n)) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "devices still running after 180 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acknowledged: BTreeSet<(String, u64)> = names
        .iter()
        .flat_map(|name| {
            acked(&processes.stdout(name))
                .into_iter()
                .map(move |n| (name.clone(), n))
        })
        .collect();
    anyhow::ensure!(
        acknowledged.len() as u64 == total,
        "only {} of {total} readings acknowledged in the end",
        acknowledged.len()
    );

    let records = read_all(&bootstrap, "device.vitals", move |records| {
        let distinct: BTreeSet<(String, u64)> = records
            .iter()
            .filter_map(|r| serde_json::from_slice::<serde_json::Value>(r.value.as_deref()?).ok())
            .filter_map(|v| Some((v["device"].as_str()?.to_string(), v["n"].as_u64()?)))
            .collect();
        distinct.len() as u64 >= total
    })
    .await?;
    let mut counts: std::collections::BTreeMap<(String, u64), usize> = Default::default();
    for record in &records {
        let value: serde_json::Value =
            serde_json::from_slice(record.value.as_deref().unwrap_or_default())?;
        let key = (
            value["device"].as_str().unwrap_or_default().to_string(),
            value["n"].as_u64().unwrap_or(u64::MAX),
        );
        *counts.entry(key).or_default() += 1;
    }
    let lost = before_kill
        .iter()
        .filter(|r| !counts.contains_key(*r))
        .count();
    let missing = acknowledged
        .iter()
        .filter(|r| !counts.contains_key(*r))
        .count();
    report_line(format!(
        "crash: mqtt listener {total} readings from {CRASH_DEVICES} paho devices, {} acknowledged before the kill (after {:.1}s); topic {} records, {lost} acknowledged before the kill missing, {missing} missing in all, {} duplicates; {:.1}s in all",
        before_kill.len(),
        killed_after.as_secs_f64(),
        records.len(),
        records.len() - counts.len(),
        started.elapsed().as_secs_f64()
    ));
    anyhow::ensure!(
        lost == 0,
        "{lost} readings acknowledged before the kill are not in Kafka"
    );
    anyhow::ensure!(
        missing == 0,
        "{missing} acknowledged readings are not in Kafka"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_delivers_commands_to_a_subscribed_paho_device_at_qos_1() -> anyhow::Result<()> {
    let python = paho_python()?;
    let mosquitto = Mosquitto::start()?;
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;

    let port = mosquitto.port.to_string();
    let (device, mut lines) = spawn_subscriber(
        &python,
        &[
            "--port",
            &port,
            "--client-id",
            "pump-3",
            "--topic",
            "devices/pump-3/commands",
            "--expect",
            "10",
        ],
    )?;
    line_starting(&mut lines, "SUBSCRIBED").await?;

    let commands: Vec<String> = (0..10)
        .map(|n| format!("{{\"command\":\"set-rate\",\"rate\":{n}}}"))
        .collect();
    let records: Vec<(Option<&str>, &str)> = commands
        .iter()
        .map(|c| (Some("pump-3"), c.as_str()))
        .collect();
    cluster.produce("device.commands", &records).await?;
    worker
        .rest
        .create(
            "pump-commands",
            serde_json::json!({
                "connector.class": "MqttSink", "topics": "device.commands",
                "mqtt.server.uri": format!("tcp://127.0.0.1:{}", mosquitto.port),
                "mqtt.client.id": "medconnect-commands", "mqtt.topic": "devices/${key}/commands",
                "mqtt.qos": "1",
            }),
        )
        .await?;

    let received: Vec<String> = received_commands(device, lines)
        .await?
        .into_iter()
        .filter_map(|l| {
            l.strip_prefix("1 devices/pump-3/commands ")
                .map(String::from)
        })
        .collect();
    assert_eq!(received, commands, "every command once, in order, at QoS 1");
    worker.shutdown().await;
    Ok(())
}

/// A paho device `device-<d>` (password `pw`) subscribing through the listener on `port` to
/// `topic`, expecting `expect` messages; `extra` arguments (e.g. `--mqtt5`) for the script.
fn subscriber(
    python: &std::path::Path,
    port: u16,
    device: usize,
    topic: &str,
    expect: usize,
    extra: &[&str],
) -> anyhow::Result<(tokio::process::Child, DeviceLines)> {
    let device = format!("device-{device}");
    let (port, expect) = (port.to_string(), expect.to_string());
    let mut args = vec!["--port", &port, "--client-id", &device];
    args.extend(["--username", &device, "--password", "pw", "--topic", topic]);
    args.extend(["--expect", &expect]);
    args.extend(extra);
    spawn_subscriber(python, &args)
}

/// The sink from `configs/mqtt-device-commands.json` sends commands straight to devices
/// connected to the listener (`mqtt.sink.target=listener`), at QoS 1, committing only after
/// each device's PUBACK: a subscribed device gets its 10 in order; one that connects after
/// the records were read gets its 5 (they wait for it); one killed after subscribing and one
/// never connected get nothing, and their 5 records land in the dead-letter topic with
/// `__connect.errors.*` headers once `mqtt.delivery.timeout.ms` passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_delivers_commands_to_devices_connected_to_the_listener_and_absent_ones_to_the_dlq()
-> anyhow::Result<()> {
    let python = paho_python()?;
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let port = start_listener(&worker.rest, 4, &[]).await?;
    let commands_of = |d: usize| format!("devices/device-{d}/commands");

    let (present, mut present_lines) = subscriber(&python, port, 0, &commands_of(0), 10, &[])?;
    line_starting(&mut present_lines, "SUBSCRIBED").await?;
    // Subscribed, then killed: its subscription goes with its connection.
    let (mut killed, mut killed_lines) = subscriber(&python, port, 2, &commands_of(2), 1, &[])?;
    line_starting(&mut killed_lines, "SUBSCRIBED").await?;
    killed.kill().await?;

    let mut records: Vec<(String, String)> = Vec::new();
    for n in 0..10 {
        records.push(("device-0".into(), format!("{{\"set-rate\":{n}}}")));
        if n < 5 {
            records.push(("device-1".into(), format!("{{\"alarm-ack\":{n}}}")));
        }
        if n < 3 {
            records.push(("device-2".into(), format!("{{\"stop\":{n}}}")));
        }
        if n < 2 {
            records.push(("device-3".into(), format!("{{\"bolus\":{n}}}")));
        }
    }
    let produced: Vec<(Option<&str>, &str)> = records
        .iter()
        .map(|(k, v)| (Some(k.as_str()), v.as_str()))
        .collect();
    cluster.produce("device.commands", &produced).await?;

    let (name, mut config) = example_connector("mqtt-device-commands.json")?;
    config["mqtt.delivery.timeout.ms"] = "8000".into();
    worker.rest.create(&name, config).await?;
    // Connects after the sink started: its commands wait for it.
    let (late, late_lines) = subscriber(&python, port, 1, &commands_of(1), 5, &["--mqtt5"])?;

    let expected = |device: usize, count: usize| -> Vec<String> {
        records
            .iter()
            .filter(|(k, _)| *k == format!("device-{device}"))
            .take(count)
            .map(|(_, v)| format!("1 devices/device-{device}/commands {v}"))
            .collect()
    };
    assert_eq!(
        received_commands(present, present_lines).await?,
        expected(0, 10),
        "device-0: each command once, in order, at QoS 1"
    );
    assert_eq!(
        received_commands(late, late_lines).await?,
        expected(1, 5),
        "device-1 (connected late, MQTT 5): each command once, in order"
    );

    cluster.read_topic("device.commands.dlq", 5).await?;
    let dead = cluster.read_all("device.commands.dlq").await?;
    let mut dead_values: Vec<(String, String)> = dead
        .iter()
        .map(|r| {
            (
                r.key.clone().unwrap_or_default(),
                r.value.clone().unwrap_or_default(),
            )
        })
        .collect();
    dead_values.sort();
    let mut absent: Vec<(String, String)> = records
        .iter()
        .filter(|(k, _)| k == "device-2" || k == "device-3")
        .cloned()
        .collect();
    absent.sort();
    assert_eq!(
        dead_values, absent,
        "exactly the commands of the absent devices"
    );
    for record in &dead {
        let message = record
            .header("__connect.errors.exception.message")
            .unwrap_or_default();
        assert!(
            message.contains("acknowledged the message within"),
            "{message}"
        );
        assert_eq!(
            record.header("__connect.errors.topic"),
            Some("device.commands")
        );
    }
    worker.shutdown().await;
    Ok(())
}

/// A SUBSCRIBE outside `mqtt.subscribe.allowed` (another device's commands) is refused:
/// SUBACK 0x80 over MQTT 3.1.1, 0x87 (not authorised) over MQTT 5; the device's own is
/// granted at QoS 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_outside_the_allowed_filters_gets_a_suback_failure() -> anyhow::Result<()> {
    let python = paho_python()?;
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let port = start_listener(&worker.rest, 1, &[]).await?;
    for (topic, extra, expected) in [
        ("devices/device-1/commands", &[][..], "SUBACK 128"),
        ("devices/device-1/commands", &["--mqtt5"][..], "SUBACK 135"),
        ("devices/+/commands", &["--mqtt5"][..], "SUBACK 135"),
        ("devices/device-0/commands", &[][..], "SUBACK 1"),
        (
            "devices/device-0/commands",
            &["--mqtt5", "--qos", "2"][..],
            "SUBACK 1",
        ),
    ] {
        let (mut device, mut lines) = subscriber(&python, port, 0, topic, 0, extra)?;
        let answer = line_starting(&mut lines, "SUBACK").await?;
        assert_eq!(answer, expected, "{topic} {extra:?}");
        let status = tokio::time::timeout(Duration::from_secs(30), device.wait()).await??;
        assert!(status.success());
    }
    worker.shutdown().await;
    Ok(())
}

/// A device that crashes after receiving a command and before its PUBACK gets that command
/// again when it reconnects and subscribes: the record is settled (and its offset committed)
/// only on the PUBACK, and the commands behind it wait, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_a_device_did_not_acknowledge_is_sent_again_when_it_is_back() -> anyhow::Result<()>
{
    let python = paho_python()?;
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    let port = start_listener(&worker.rest, 1, &[]).await?;
    let topic = "devices/device-0/commands";
    let (crashing, crashing_lines) =
        subscriber(&python, port, 0, topic, 1, &["--crash-before-ack"])?;
    let commands: Vec<String> = (0..5).map(|n| format!("{{\"set-rate\":{n}}}")).collect();
    let produced: Vec<(Option<&str>, &str)> = commands
        .iter()
        .map(|c| (Some("device-0"), c.as_str()))
        .collect();
    cluster.produce("device.commands", &produced).await?;
    let (name, config) = example_connector("mqtt-device-commands.json")?;
    worker.rest.create(&name, config).await?;

    let before_crash = received_commands(crashing, crashing_lines).await?;
    assert_eq!(before_crash, vec![format!("1 {topic} {}", commands[0])]);
    let (back, back_lines) = subscriber(&python, port, 0, topic, 5, &[])?;
    let after = received_commands(back, back_lines).await?;
    let expected: Vec<String> = commands.iter().map(|c| format!("1 {topic} {c}")).collect();
    assert_eq!(
        after, expected,
        "the unacknowledged command again, then the rest, in order"
    );
    assert_eq!(
        cluster
            .count_records("device.commands.dlq")
            .await
            .unwrap_or(0),
        0
    );
    worker.shutdown().await;
    Ok(())
}
