//! Devices publishing over MQTT into Kafka through the listener source: N devices (rumqttc
//! clients), each publishing at QoS 1 and waiting for its PUBACK — which the listener sends only
//! once Kafka has the reading — against a raw rdkafka producer awaiting each delivery with the
//! same concurrency, in the same run.
//!
//!   cargo run -p medconnect-bench --bin mqtt -- [devices] [seconds] [linger.ms] [rounds]
//!
//! The raw producer sends the records the listener makes (key, value, and the `mqtt.*` and
//! content-type headers); it runs once more with the key and value alone ("no headers").
//! Two loads for both contenders: a fixed 5,000 messages/s (latency without queueing) and the
//! maximum rate. Prints messages/s and PUBACK (or delivery) latency p50/p99/max, and the ratio.
//!
//! Two device fleets in this process (on the cores and runtime threads the worker uses):
//! rumqttc clients (a client task, its event loop task and a channel between them per device)
//! and lean devices (one task and one socket each: a PUBLISH written, its PUBACK read —
//! what a device does — with packets encoded and decoded by rumqttc's codec). The lean fleet
//! takes less of the shared CPU, so its figure is nearer what the listener itself costs. The
//! lean fleet runs once more in a process of its own (this program again), as real devices
//! are apart from the worker: same two cores, but not the worker's runtime threads.
//! Each load runs `[rounds]` rounds (default 3), each fleet and the raw producer once per round,
//! each round starting with the next one; the summary gives the medians over rounds and the
//! median of the ratios each round measured (with every round's).
//! Each contender's CPU time per message is measured too (this process, the broker's, the
//! devices' own when apart; see `paced.rs`): unlike the rate, it hardly moves with the
//! machine's other load, and it says what each message costs beyond the raw producer's.

mod paced;
mod process;
mod stats;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use paced::{ListenerBench, Load, Outcome, RawHeaders, Rounds, Senders, drive, in_child, raw_run};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{Mutex, mpsc};

fn reading(device: usize, seq: u64) -> String {
    format!(
        "{{\"device\":\"monitor-{device}\",\"seq\":{seq},\"hr\":72,\"spo2\":97,\"observed_at\":\"2026-11-30T07:00:00Z\"}}"
    )
}

/// A connected device: its client, and the PUBACKs its event loop receives.
struct Device {
    client: AsyncClient,
    acks: mpsc::UnboundedReceiver<u16>,
}

async fn connect(port: u16, device: usize) -> anyhow::Result<Device> {
    let id = format!("monitor-{device}");
    let mut options = MqttOptions::new(&id, "127.0.0.1", port);
    options
        .set_credentials(&id, "bench")
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let (acks_in, acks) = mpsc::unbounded_channel();
    let (connected_in, connected) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut connected_in = Some(connected_in);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = connected_in.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if acks_in.send(ack.pkid).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), connected)
        .await
        .context("CONNACK in time")??;
    Ok(Device { client, acks })
}

/// A lean device: its socket, read buffer and next packet id.
struct LeanDevice {
    stream: tokio::net::TcpStream,
    inbound: bytes::BytesMut,
    topic: String,
    pkid: u16,
}

async fn lean_connect(port: u16, device: usize) -> anyhow::Result<LeanDevice> {
    use tokio::io::AsyncWriteExt;
    let id = format!("monitor-{device}");
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let mut connect = rumqttc::Connect::new(&id);
    connect.set_login(&id, "bench");
    connect.keep_alive = 30;
    let mut lean = LeanDevice {
        stream,
        inbound: Default::default(),
        topic: format!("devices/{id}/vitals"),
        pkid: 0,
    };
    let mut out = bytes::BytesMut::new();
    rumqttc::Packet::Connect(connect).write(&mut out, usize::MAX)?;
    lean.stream.write_all(&out).await?;
    match tokio::time::timeout(Duration::from_secs(10), lean.next_packet()).await?? {
        rumqttc::Packet::ConnAck(ack) if ack.code == rumqttc::ConnectReturnCode::Success => {
            Ok(lean)
        }
        other => bail!("device {device}: no CONNACK but {other:?}"),
    }
}

impl LeanDevice {
    async fn next_packet(&mut self) -> anyhow::Result<rumqttc::Packet> {
        use tokio::io::AsyncReadExt;
        loop {
            match rumqttc::Packet::read(&mut self.inbound, usize::MAX) {
                Ok(packet) => return Ok(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    if self.stream.read_buf(&mut self.inbound).await? == 0 {
                        bail!("the listener closed the connection");
                    }
                }
                Err(error) => bail!("{error}"),
            }
        }
    }

    /// One reading at QoS 1; returns once its PUBACK is in.
    async fn publish(&mut self, payload: String) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.pkid = self.pkid % u16::MAX + 1;
        let mut publish = rumqttc::Publish::new(&self.topic, QoS::AtLeastOnce, payload);
        publish.pkid = self.pkid;
        let mut out = bytes::BytesMut::new();
        rumqttc::Packet::Publish(publish).write(&mut out, usize::MAX)?;
        self.stream.write_all(&out).await?;
        loop {
            if let rumqttc::Packet::PubAck(ack) = self.next_packet().await?
                && ack.pkid == self.pkid
            {
                return Ok(());
            }
        }
    }
}

async fn lean_run(port: u16, devices: usize, seconds: u64, load: Load) -> anyhow::Result<Outcome> {
    let mut connected = Vec::new();
    for device in 0..devices {
        connected.push(Arc::new(Mutex::new(lean_connect(port, device).await?)));
    }
    let connected = Arc::new(connected);
    drive(devices, seconds, load, move |device, seq| {
        let connected = connected.clone();
        async move {
            let mut lean = connected[device].lock().await;
            tokio::time::timeout(Duration::from_secs(30), lean.publish(reading(device, seq)))
                .await
                .map_err(|_| anyhow::anyhow!("no PUBACK within 30 s"))?
        }
    })
    .await
}

async fn mqtt_run(port: u16, devices: usize, seconds: u64, load: Load) -> anyhow::Result<Outcome> {
    let mut connected = Vec::new();
    for device in 0..devices {
        connected.push(Arc::new(Mutex::new(connect(port, device).await?)));
    }
    let connected = Arc::new(connected);
    let outcome = drive(devices, seconds, load, {
        let connected = connected.clone();
        move |device, seq| {
            let connected = connected.clone();
            async move {
                let mut device_state = connected[device].lock().await;
                device_state
                    .client
                    .publish(
                        format!("devices/monitor-{device}/vitals"),
                        QoS::AtLeastOnce,
                        false,
                        reading(device, seq),
                    )
                    .await?;
                match tokio::time::timeout(Duration::from_secs(30), device_state.acks.recv()).await
                {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => bail!("device {device} disconnected"),
                    Err(_) => bail!("no PUBACK within 30 s"),
                }
            }
        }
    })
    .await?;
    for device in connected.iter() {
        let _ = device.lock().await.client.disconnect().await;
    }
    Ok(outcome)
}

/// A reading for the raw producer: keyed by device, as the listener keys it.
fn raw_message(device: usize, seq: u64) -> (String, Vec<u8>) {
    (
        format!("monitor-{device}"),
        reading(device, seq).into_bytes(),
    )
}

/// The headers the listener gives a reading's record (`connectors/mqtt/src/listener/record.rs`):
/// the key is the device's id, which is its client id and, as the bench's devices log in, its
/// user name.
fn raw_headers(_device: usize, _seq: u64, id: &str) -> Vec<(&'static str, Vec<u8>)> {
    use medconnect_api::record::content_type;
    vec![
        ("mqtt.topic", format!("devices/{id}/vitals").into_bytes()),
        ("mqtt.qos", b"1".to_vec()),
        ("mqtt.client.id", id.as_bytes().to_vec()),
        ("mqtt.username", id.as_bytes().to_vec()),
        (content_type::HEADER, content_type::JSON.as_bytes().to_vec()),
    ]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Some(child) = Senders::from_env()? {
        let outcome = Senders::measure(lean_run(
            child.port,
            child.senders,
            child.seconds,
            child.load,
        ))
        .await?;
        Senders::report(&outcome);
        return Ok(());
    }
    let paced::Args {
        senders: devices,
        seconds,
        linger,
        rounds,
    } = paced::args(64)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let users: Vec<String> = (0..devices).map(|d| format!("monitor-{d}:bench")).collect();
    let bench = ListenerBench::start(
        &["device.vitals", "raw.vitals"],
        "bench-mqtt",
        vec![
            ("connector.class", "MqttListenerSource".to_string()),
            ("mqtt.bind", "127.0.0.1".to_string()),
            ("mqtt.port", port.to_string()),
            ("mqtt.users", users.join(",")),
            ("mqtt.max.connections", (devices + 8).to_string()),
            ("mqtt.connect.rate", (devices + 8).to_string()),
            ("mqtt.topic.pattern", "devices/+device/vitals".to_string()),
            ("kafka.topic", "device.vitals".to_string()),
            ("kafka.key", "${device}".to_string()),
        ],
        port,
        &linger,
    )
    .await?;
    let raw = |devices, seconds, load, headers: bool| {
        raw_run(
            bench.producer.clone(),
            "raw.vitals",
            devices,
            seconds,
            load,
            raw_message,
            headers.then_some(raw_headers as RawHeaders),
        )
    };
    // Warm both paths (connections, metadata, first batch).
    mqtt_run(port, 1, 1, Load::Fixed(100.0)).await?;
    lean_run(port, 1, 1, Load::Fixed(100.0)).await?;
    raw(1, 1, Load::Fixed(100.0), true).await?;
    println!(
        "== JSON vitals (~110 bytes) over MQTT (QoS 1, PUBACK after Kafka) vs raw producer: {devices} devices, {seconds} s per run, linger.ms={linger}, {rounds} rounds, {}",
        bench.describe()
    );
    const RUMQTTC: &str = "MQTT, rumqttc devices";
    const LEAN: &str = "MQTT, lean devices";
    const APART: &str = "MQTT, lean apart";
    const RAW: &str = "raw producer";
    const RAW_BARE: &str = "raw, no headers";
    for (label, load) in [
        ("fixed 5000 msg/s", Load::Fixed(5000.0)),
        ("maximum rate", Load::Max),
    ] {
        println!("{label}:");
        let results = Rounds::run(
            rounds,
            &[RUMQTTC, LEAN, APART, RAW, RAW_BARE],
            bench.broker_pid(),
            |contender| {
                let raw = &raw;
                async move {
                    match contender {
                        0 => mqtt_run(port, devices, seconds, load).await,
                        1 => lean_run(port, devices, seconds, load).await,
                        2 => in_child(port, devices, seconds, load).await,
                        3 => raw(devices, seconds, load, true).await,
                        _ => raw(devices, seconds, load, false).await,
                    }
                }
            },
        )
        .await?;
        results.summarize(RAW);
    }
    bench.stop().await;
    Ok(())
}
