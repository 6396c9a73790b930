//! The listener source with `mqtt.transport=websocket`: devices on python's paho-mqtt with
//! `transport="websockets"` (ws:// and wss://, MQTT 3.1.1 and 5), raw HTTP for upgrades the
//! listener must refuse, and tungstenite's client for frames cut across and between MQTT
//! packets. The test plays the engine: it polls the task and settles each record's
//! `AckHandle` — or, to prove no acknowledgement goes out before durability, does not.
//! `scripts/mqtt-peers` installs paho-mqtt into the venv under `$MEDCONNECT_CACHE`.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::Pki;
use common::listener::{DEADLINE, QUIET, next_records, within_worker_budget, written};
use futures::{SinkExt, StreamExt};
use medconnect_api::{SourceRecord, SourceTask};
use medconnect_mqtt::listener::{HEADER_CERT_CN, HEADER_USERNAME};
use medconnect_mqtt::{HEADER_CLIENT_ID, HEADER_QOS, MqttListenerSourceTask};
use rumqttc::QoS;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The venv's python with paho-mqtt; fails (never skips) when it is missing.
fn python() -> PathBuf {
    let cache = std::env::var_os("MEDCONNECT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/medconnect")
        });
    let venv = std::env::var_os("MEDCONNECT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("venv"));
    let python = venv.join("bin/python");
    let ok = std::process::Command::new(&python)
        .args(["-c", "import paho.mqtt"])
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        ok,
        "paho-mqtt missing in {}: run scripts/mqtt-peers",
        venv.display()
    );
    python
}

/// A paho device over WebSocket (`tests/peers/ws_device.py`): its output lines as they come.
struct Device {
    child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Device {
    fn spawn(port: u16, args: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(python())
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/peers/ws_device.py"
            ))
            .args(["--port", &port.to_string()])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python runs");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// Lets a device started with `--wait-for-go` publish.
    async fn go(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").await.expect("write to the device");
        stdin.flush().await.expect("flush");
    }

    /// The lines printed within `within`.
    async fn lines_within(&mut self, within: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + within;
        let mut lines = Vec::new();
        while let Ok(Some(line)) = tokio::time::timeout_at(deadline, self.lines.recv()).await {
            lines.push(line);
        }
        lines
    }

    /// The next line, within the deadline.
    async fn next_line(&mut self) -> String {
        tokio::time::timeout(DEADLINE, self.lines.recv())
            .await
            .expect("a line from the device in time")
            .expect("the device printed a line")
    }

    /// Waits for the exit; its code and every line not read yet.
    async fn finish(mut self) -> (i32, Vec<String>) {
        let status = tokio::time::timeout(DEADLINE + DEADLINE, self.child.wait())
            .await
            .expect("the device exits in time")
            .expect("wait");
        let mut rest = Vec::new();
        while let Some(line) = self.lines.recv().await {
            rest.push(line);
        }
        (status.code().unwrap_or(-1), rest)
    }
}

/// The readings an output acknowledged ("ACK <n>").
fn acked(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|line| line.strip_prefix("ACK ")?.trim().parse().ok())
        .collect()
}

/// The shared test listener, over WebSocket.
async fn listener(extra: &[(&str, &str)]) -> (MqttListenerSourceTask, u16) {
    let mut pairs = vec![("mqtt.transport", "websocket")];
    pairs.extend_from_slice(extra);
    common::listener::listener(&pairs).await
}

async fn nothing_more(task: &mut MqttListenerSourceTask) {
    assert!(
        tokio::time::timeout(QUIET, task.poll()).await.is_err(),
        "a record beyond those published"
    );
}

/// The reading number in a device's payload.
fn reading(record: &SourceRecord) -> u64 {
    let value: serde_json::Value =
        serde_json::from_slice(record.record.value.as_deref().expect("a payload")).expect("JSON");
    value["n"].as_u64().expect("n")
}

#[tokio::test]
async fn paho_over_websocket_gets_each_puback_only_once_its_record_is_settled() {
    let (mut task, port) = listener(&[]).await;
    let mut device = Device::spawn(
        port,
        &[
            "--client-id",
            "pump-3",
            "--username",
            "pump-3",
            "--password",
            "s3cret-pump",
            "--count",
            "20",
        ],
    );
    assert_eq!(device.next_line().await, "CONNACK 0 Success");
    let mut records = next_records(&mut task, 20).await;
    for record in &records {
        assert_eq!(record.record.topic, "device.vitals");
        assert_eq!(record.record.key.as_deref(), Some(&b"pump-3"[..]));
        assert_eq!(
            record.record.headers.last_str(HEADER_USERNAME),
            Some("pump-3")
        );
        assert_eq!(
            record.record.headers.last_str(HEADER_CLIENT_ID),
            Some("pump-3")
        );
        assert_eq!(record.record.headers.last_str(HEADER_QOS), Some("1"));
    }
    let numbers: BTreeSet<u64> = records.iter().map(reading).collect();
    assert_eq!(numbers, (0..20).collect());
    assert_eq!(
        acked(&device.lines_within(QUIET).await),
        Vec::<u64>::new(),
        "a PUBACK before Kafka had the record"
    );

    // The first ten settled: exactly their ten PUBACKs, none for the others.
    for record in &mut records[..10] {
        written(record);
    }
    let mut first = Vec::new();
    while first.len() < 10 {
        first.extend(acked(&[device.next_line().await]));
    }
    assert_eq!(first, records[..10].iter().map(reading).collect::<Vec<_>>());
    assert_eq!(acked(&device.lines_within(QUIET).await), Vec::<u64>::new());

    for record in &mut records[10..] {
        written(record);
    }
    let (code, rest) = device.finish().await;
    assert_eq!(code, 0, "the device did not get every PUBACK: {rest:?}");
    assert_eq!(
        acked(&rest),
        records[10..].iter().map(reading).collect::<Vec<_>>()
    );
    nothing_more(&mut task).await;
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn mqtt_5_over_websocket_at_qos_2_completes_only_once_stored() {
    let (mut task, port) = listener(&[]).await;
    let mut device = Device::spawn(
        port,
        &[
            "--mqtt5",
            "--qos",
            "2",
            "--client-id",
            "monitor-7",
            "--username",
            "monitor-7",
            "--password",
            "s3cret-monitor",
            "--count",
            "10",
        ],
    );
    assert_eq!(device.next_line().await, "CONNACK 0 Success");
    let mut records = next_records(&mut task, 10).await;
    for record in &records {
        assert_eq!(record.record.headers.last_str(HEADER_QOS), Some("2"));
        assert_eq!(record.record.key.as_deref(), Some(&b"monitor-7"[..]));
    }
    assert_eq!(
        acked(&device.lines_within(QUIET).await),
        Vec::<u64>::new(),
        "QoS 2 completed before the record was stored"
    );
    for record in &mut records {
        written(record);
    }
    let (code, rest) = device.finish().await;
    assert_eq!(code, 0, "{rest:?}");
    assert_eq!(acked(&rest).len(), 10, "{rest:?}");
    nothing_more(&mut task).await;
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn wrong_or_missing_credentials_over_websocket_get_the_right_connack_and_store_nothing() {
    let (mut task, port) = listener(&[]).await;
    for version in [None, Some("--mqtt5")] {
        // paho reports 3.1.1's return codes as MQTT 5 reason codes: 4 (bad user name or
        // password) as 134, 5 (not authorised) as 135; MQTT 5 gets 0x86 and 0x87 on the wire.
        for (credentials, expected) in [
            (
                &["--username", "pump-3", "--password", "wrong"][..],
                "CONNACK 134 Bad user name or password",
            ),
            (&[][..], "CONNACK 135 Not authorized"),
        ] {
            let mut args = vec!["--client-id", "pump-3"];
            args.extend(version);
            args.extend_from_slice(credentials);
            let device = Device::spawn(port, &args);
            let (code, lines) = device.finish().await;
            assert_eq!(code, 2, "{version:?} {credentials:?}: {lines:?}");
            assert_eq!(lines, [expected], "{version:?} {credentials:?}");
        }
    }
    nothing_more(&mut task).await;
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn over_wss_a_device_certificate_is_its_identity_and_a_device_without_one_is_refused() {
    let pki = Pki::new();
    let (cert, key, ca) = (
        pki.path("server.crt"),
        pki.path("server.key"),
        pki.path("ca.crt"),
    );
    let (device_cert, device_key) = (pki.path("device.crt"), pki.path("device.key"));
    let (mut task, port) = listener(&[
        ("mqtt.tls.cert.file", &cert),
        ("mqtt.tls.key.file", &key),
        ("mqtt.tls.client.ca.file", &ca),
    ])
    .await;
    let tls = ["--host", "localhost", "--cafile", &ca];
    let with_cert = ["--cert", &device_cert, "--key", &device_key];

    // A device certificate and no password: authenticated by the certificate.
    let mut args = vec!["--client-id", "pump-3", "--count", "3"];
    args.extend(tls);
    args.extend(with_cert);
    let mut device = Device::spawn(port, &args);
    assert_eq!(device.next_line().await, "CONNACK 0 Success");
    let mut records = next_records(&mut task, 3).await;
    for record in &records {
        assert_eq!(
            record.record.headers.last_str(HEADER_CERT_CN),
            Some("pump-3")
        );
    }
    assert_eq!(acked(&device.lines_within(QUIET).await), Vec::<u64>::new());
    for record in &mut records {
        written(record);
    }
    let (code, rest) = device.finish().await;
    assert_eq!(code, 0, "{rest:?}");
    assert_eq!(acked(&rest), [0, 1, 2]);

    // No client certificate: the TLS handshake fails before any upgrade.
    let mut args = vec![
        "--client-id",
        "pump-3",
        "--username",
        "pump-3",
        "--password",
        "s3cret-pump",
    ];
    args.extend(tls);
    let (code, lines) = Device::spawn(port, &args).finish().await;
    assert_eq!(
        code, 3,
        "a device without a certificate connected: {lines:?}"
    );

    // A certificate, but a username with the wrong password: refused in the CONNACK.
    let mut args = vec![
        "--client-id",
        "pump-3",
        "--username",
        "pump-3",
        "--password",
        "wrong",
    ];
    args.extend(tls);
    args.extend(with_cert);
    let (code, lines) = Device::spawn(port, &args).finish().await;
    assert_eq!(code, 2, "{lines:?}");
    assert_eq!(lines, ["CONNACK 134 Bad user name or password"]);
    nothing_more(&mut task).await;
    task.stop().await.expect("stop");
}

/// Sends `request` on a new connection; the listener's status line, and how long it took
/// to answer and close.
async fn http_status(port: u16, request: &[u8]) -> (String, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("answered and closed in time")
        .expect("read");
    let text = String::from_utf8_lossy(&answer);
    let status = text.lines().next().unwrap_or_default().to_string();
    (status, started.elapsed())
}

fn upgrade(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn an_upgrade_the_listener_does_not_serve_is_answered_4xx_and_others_still_connect() {
    let (mut task, port) = listener(&[
        ("mqtt.websocket.path", "/devices/mqtt"),
        ("mqtt.connect.timeout.ms", "2000"),
    ])
    .await;
    let version = "Sec-WebSocket-Version: 13\r\n";
    let mqtt = "Sec-WebSocket-Protocol: mqtt\r\n";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "the default path, not the configured one",
            upgrade("/mqtt", &format!("{version}{mqtt}")),
            "HTTP/1.1 404 Not Found",
        ),
        (
            "a plain GET",
            b"GET /devices/mqtt HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
            "HTTP/1.1 400 Bad Request",
        ),
        (
            "no mqtt subprotocol",
            upgrade(
                "/devices/mqtt",
                &format!("{version}Sec-WebSocket-Protocol: chat\r\n"),
            ),
            "HTTP/1.1 400 Bad Request",
        ),
        (
            "another WebSocket version",
            upgrade(
                "/devices/mqtt",
                &format!("Sec-WebSocket-Version: 8\r\n{mqtt}"),
            ),
            "HTTP/1.1 426 Upgrade Required",
        ),
        (
            "a POST",
            format!("POST /devices/mqtt HTTP/1.1\r\nHost: localhost\r\n{version}{mqtt}\r\n")
                .into_bytes(),
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (
            "MQTT straight on the WebSocket port",
            vec![
                0x10, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 4, b'p', b'l', b'a', b'n',
            ],
            "HTTP/1.1 400 Bad Request",
        ),
        (
            "a request over 8 KiB",
            upgrade(
                "/devices/mqtt",
                &format!("{version}{mqtt}X-Padding: {}\r\n", "p".repeat(9000)),
            ),
            "HTTP/1.1 431 Request Header Fields Too Large",
        ),
    ];
    for (what, request, expected) in cases {
        let (status, _) = http_status(port, &request).await;
        assert_eq!(status, expected, "{what}");
    }
    // An upgrade that never completes: answered once the CONNECT timeout passed.
    let (status, waited) = http_status(port, b"GET /devices/mqtt HTTP/1.1\r\n").await;
    assert_eq!(status, "HTTP/1.1 408 Request Timeout");
    assert!(
        waited >= Duration::from_millis(1900) && waited < DEADLINE,
        "answered after {waited:?}"
    );

    // paho at the wrong path: its upgrade fails.
    let (code, lines) = Device::spawn(port, &["--client-id", "pump-3", "--username", "pump-3"])
        .finish()
        .await;
    assert_eq!(code, 3, "{lines:?}");
    // At the right one it connects and publishes.
    let device = Device::spawn(
        port,
        &[
            "--path",
            "/devices/mqtt",
            "--client-id",
            "pump-3",
            "--username",
            "pump-3",
            "--password",
            "s3cret-pump",
        ],
    );
    let mut records = next_records(&mut task, 1).await;
    written(&mut records[0]);
    let (code, lines) = device.finish().await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(acked(&lines), [0]);
    nothing_more(&mut task).await;
    task.stop().await.expect("stop");
}

/// A WebSocket client (tungstenite's) offering the `mqtt` subprotocol.
async fn ws_connect(port: u16) -> WebSocketStream<TcpStream> {
    let mut request = format!("ws://127.0.0.1:{port}/mqtt")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("upgraded");
    assert_eq!(
        response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.as_bytes()),
        Some(&b"mqtt"[..])
    );
    ws
}

fn connect_packet(keep_alive_s: u16) -> Vec<u8> {
    let mut connect = rumqttc::mqttbytes::v4::Connect::new("raw-device");
    connect.keep_alive = keep_alive_s;
    connect.set_login("pump-3", "s3cret-pump");
    let mut bytes = BytesMut::new();
    rumqttc::mqttbytes::v4::Packet::Connect(connect)
        .write(&mut bytes, usize::MAX)
        .unwrap();
    bytes.to_vec()
}

fn publish_packet(pkid: u16, payload: &str) -> Vec<u8> {
    let mut publish =
        rumqttc::mqttbytes::v4::Publish::new("devices/pump-3/vitals", QoS::AtLeastOnce, payload);
    publish.pkid = pkid;
    let mut bytes = BytesMut::new();
    rumqttc::mqttbytes::v4::Packet::Publish(publish)
        .write(&mut bytes, usize::MAX)
        .unwrap();
    bytes.to_vec()
}

/// Reads binary frames until `count` bytes came, however they are cut into frames.
async fn read_bytes(ws: &mut WebSocketStream<TcpStream>, count: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    while bytes.len() < count {
        match tokio::time::timeout(DEADLINE, ws.next()).await {
            Ok(Some(Ok(Message::Binary(payload)))) => bytes.extend_from_slice(&payload),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            other => panic!("after {} of {count} bytes: {other:?}", bytes.len()),
        }
    }
    bytes
}

/// Waits until the listener closes the WebSocket connection; how long that took.
async fn ws_closed_after(ws: &mut WebSocketStream<TcpStream>) -> Duration {
    let started = Instant::now();
    loop {
        match tokio::time::timeout(DEADLINE, ws.next()).await {
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return started.elapsed(),
            Ok(Some(Ok(_))) => continue,
            Err(_) => panic!("the connection stayed open"),
        }
    }
}

#[tokio::test]
async fn packets_are_read_across_frames_and_several_from_one_frame_and_limits_still_apply() {
    let (mut task, port) = listener(&[
        ("mqtt.max.packet.bytes", "4096"),
        ("mqtt.max.connections", "2"),
    ])
    .await;
    let mut ws = ws_connect(port).await;
    // The CONNECT cut into three frames.
    let connect = connect_packet(60);
    for part in [&connect[..1], &connect[1..5], &connect[5..]] {
        ws.send(Message::Binary(part.to_vec().into()))
            .await
            .unwrap();
    }
    assert_eq!(read_bytes(&mut ws, 4).await, [0x20, 0x02, 0x00, 0x00]);

    // Three publishes and half of a fourth in one frame, the rest of the fourth in another.
    let mut frame = Vec::new();
    for (pkid, payload) in [(1, "{\"n\":1}"), (2, "{\"n\":2}"), (3, "{\"n\":3}")] {
        frame.extend(publish_packet(pkid, payload));
    }
    let fourth = publish_packet(4, "{\"n\":4}");
    frame.extend_from_slice(&fourth[..10]);
    ws.send(Message::Binary(frame.into())).await.unwrap();
    ws.send(Message::Binary(fourth[10..].to_vec().into()))
        .await
        .unwrap();
    let mut records = next_records(&mut task, 4).await;
    assert_eq!(
        records.iter().map(reading).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    // Settled out of order, acknowledged in publish order.
    for index in [2, 0, 3, 1] {
        written(&mut records[index]);
    }
    assert_eq!(
        read_bytes(&mut ws, 16).await,
        [0x40, 2, 0, 1, 0x40, 2, 0, 2, 0x40, 2, 0, 3, 0x40, 2, 0, 4]
    );

    // Two connections at once at most: a third is closed before its upgrade is read.
    let mut second = ws_connect(port).await;
    let mut third = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(DEADLINE, third.read_to_end(&mut sink))
        .await
        .expect("closed in time");
    assert!(read.is_err() || sink.is_empty(), "the third got an answer");

    // A frame larger than the largest packet: closed from its header.
    ws.send(Message::Binary(vec![0u8; 5000].into()))
        .await
        .unwrap();
    ws_closed_after(&mut ws).await;

    // Keep-alive 1 s and then silence: closed after 1.5 s, not before.
    second
        .send(Message::Binary(connect_packet(1).into()))
        .await
        .unwrap();
    assert_eq!(read_bytes(&mut second, 4).await, [0x20, 0x02, 0x00, 0x00]);
    let waited = ws_closed_after(&mut second).await;
    assert!(
        waited >= Duration::from_millis(1400),
        "closed after {waited:?}"
    );
    nothing_more(&mut task).await;
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn websocket_devices_together_stay_within_the_worker_budget_and_read_again_as_kafka_settles()
{
    // The worker's budget, shared by every listener, is 64 KiB: the bound here.
    let (mut task, port, worker) =
        within_worker_budget(65_536, &[("mqtt.transport", "websocket")]).await;

    // Three devices publish 10 readings of 10,000 bytes each at QoS 1: 300,000 bytes.
    const DEVICES: usize = 3;
    const READINGS: usize = 10;
    // All connected first: a new connection finds no room once the others' readings fill
    // the budget, and is turned away (paho here does not retry).
    let mut devices: Vec<Device> = (0..DEVICES)
        .map(|d| {
            Device::spawn(
                port,
                &[
                    "--client-id",
                    &format!("bed-{d}"),
                    "--count",
                    &READINGS.to_string(),
                    "--payload-size",
                    "10000",
                    "--wait-for-go",
                ],
            )
        })
        .collect();
    for device in &mut devices {
        assert_eq!(device.next_line().await, "CONNACK 0 Success");
    }
    for device in &mut devices {
        device.go().await;
    }

    // Nothing settled: at most what fits in 64 KiB reaches the engine, never all 30.
    let mut held = Vec::new();
    while let Ok(batch) = tokio::time::timeout(QUIET + QUIET, task.poll()).await {
        held.extend(batch.expect("poll"));
    }
    assert!(
        !held.is_empty() && held.len() <= 6,
        "{} readings of 10,000 bytes held within a 65,536-byte budget",
        held.len()
    );
    assert!(worker.peak() <= 65_536, "peak {}", worker.peak());

    // As Kafka settles, the budget comes back and the rest is read: every reading once.
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + DEADLINE + DEADLINE;
    loop {
        for mut record in held.drain(..) {
            let client = record
                .record
                .headers
                .last_str(HEADER_CLIENT_ID)
                .expect("client id")
                .to_string();
            assert!(seen.insert((client, reading(&record))), "a reading twice");
            written(&mut record);
        }
        if seen.len() == DEVICES * READINGS {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = tokio::time::timeout(left, task.poll())
            .await
            .unwrap_or_else(|_| panic!("only {} of 30 readings arrived", seen.len()))
            .expect("poll");
        held.extend(batch);
    }
    for device in devices {
        let (code, lines) = device.finish().await;
        assert_eq!(code, 0, "{lines:?}");
        assert_eq!(acked(&lines).len(), READINGS, "{lines:?}");
    }
    assert!(worker.peak() <= 65_536, "peak {}", worker.peak());
    task.stop().await.expect("stop");
    assert_eq!(worker.used(), 0, "everything given back");
}

#[tokio::test]
async fn an_mqtt_5_device_whose_frame_is_larger_than_any_packet_hears_packet_too_large() {
    use rumqttc::v5::mqttbytes::v5::{Connect, Login, Packet};
    let (mut task, port) = listener(&[("mqtt.max.packet.bytes", "4096")]).await;
    let mut ws = ws_connect(port).await;
    let connect = Connect {
        keep_alive: 60,
        client_id: "ws-5".into(),
        clean_start: true,
        properties: None,
    };
    let mut bytes = BytesMut::new();
    Packet::Connect(connect, None, Some(Login::new("pump-3", "s3cret-pump")))
        .write(&mut bytes, None)
        .unwrap();
    ws.send(Message::Binary(bytes.to_vec().into()))
        .await
        .unwrap();
    let connack = read_bytes(&mut ws, 2).await;
    assert_eq!(connack[0], 0x20, "CONNACK");
    // The frame is refused from its header, as a packet announcing too much is on TCP: the
    // device is told 0x95 (packet too large) before the close.
    ws.send(Message::Binary(vec![0u8; 5000].into()))
        .await
        .unwrap();
    let mut after = Vec::new();
    loop {
        match tokio::time::timeout(DEADLINE, ws.next()).await {
            Ok(Some(Ok(Message::Binary(payload)))) => after.extend_from_slice(&payload),
            Ok(Some(Ok(_))) => continue,
            Ok(None | Some(Err(_))) => break,
            Err(_) => panic!("the connection stayed open"),
        }
    }
    // Whatever of the CONNACK was not read yet, then DISCONNECT (0xE0) with reason 0x95.
    let disconnect = after.windows(3).position(|w| w[0] == 0xE0 && w[2] == 0x95);
    assert!(disconnect.is_some(), "no DISCONNECT 0x95 in {after:02x?}");
    nothing_more(&mut task).await;
    task.stop().await.expect("stop");
}
