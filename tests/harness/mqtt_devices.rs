//! Devices for the MQTT tests: python paho-mqtt (PyPI, installed by `scripts/mqtt-peers`)
//! running `peers/mqtt_subscriber.py`, a device that subscribes to its commands.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// The listener from `configs/mqtt-device-source.json` on 127.0.0.1:`port` for `users`
/// (`name:password,...`): its name and config.
pub fn example_listener(port: u16, users: &str) -> anyhow::Result<(String, serde_json::Value)> {
    let (name, mut config) = crate::example_connector("mqtt-device-source.json")?;
    config["mqtt.bind"] = "127.0.0.1".into();
    config["mqtt.port"] = port.to_string().into();
    config["mqtt.users"] = users.into();
    Ok((name, config))
}

/// `device-0:pw,...` for `count` devices.
pub fn device_users(count: usize) -> String {
    (0..count)
        .map(|d| format!("device-{d}:pw"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A device's output, line by line.
pub type DeviceLines = Lines<BufReader<ChildStdout>>;

/// The venv's python with paho-mqtt (scripts/mqtt-peers installs it); missing, the test fails.
pub fn paho_python() -> anyhow::Result<PathBuf> {
    let python = crate::crash::python_bin()?.join("python");
    let ok = Command::new(&python)
        .args(["-c", "import paho.mqtt"])
        .status()?
        .success();
    anyhow::ensure!(
        ok,
        "paho-mqtt missing in {}: run scripts/mqtt-peers",
        python.display()
    );
    Ok(python)
}

pub fn subscriber_script() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/peers/mqtt_subscriber.py"
    ))
}

/// A subscribing device: `mqtt_subscriber.py` with `args`, its output piped.
pub fn spawn_subscriber(python: &Path, args: &[&str]) -> anyhow::Result<(Child, DeviceLines)> {
    let mut device = tokio::process::Command::new(python)
        .arg(subscriber_script())
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let lines = stdout_lines(&mut device)?;
    Ok((device, lines))
}

pub fn stdout_lines(device: &mut Child) -> anyhow::Result<DeviceLines> {
    let stdout = device
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("the device's stdout is not piped"))?;
    Ok(BufReader::new(stdout).lines())
}

/// Reads a device's output lines until one starts with `prefix` (within 30 s).
pub async fn line_starting(lines: &mut DeviceLines, prefix: &str) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .map_err(|_| anyhow::anyhow!("no '{prefix}' line within 30 s"))??
            .ok_or_else(|| anyhow::anyhow!("the device exited before '{prefix}'"))?;
        if line.starts_with(prefix) {
            return Ok(line);
        }
    }
}

/// The commands a subscriber printed ("MSG <qos> <topic> <payload>" -> "<qos> <topic>
/// <payload>") once it exited 0 (it got all it expected).
pub async fn received_commands(
    mut device: Child,
    mut lines: DeviceLines,
) -> anyhow::Result<Vec<String>> {
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Some(line) = tokio::time::timeout_at(deadline, lines.next_line()).await?? {
        if let Some(message) = line.strip_prefix("MSG ") {
            received.push(message.to_string());
        }
    }
    let status = tokio::time::timeout_at(deadline, device.wait()).await??;
    anyhow::ensure!(
        status.success(),
        "the device did not get its commands: {received:?}"
    );
    Ok(received)
}
