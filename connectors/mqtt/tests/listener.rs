//! The listener source (devices connect to medconnect) over real sockets, with devices written
//! by others: `mosquitto_pub` (MQTT 3.1.1 and 5, QoS 1 and 2) and rumqttc's client. The test
//! plays the engine: it polls the task and settles each record's `AckHandle` — or, to prove no
//! PUBACK goes out before durability, does not.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::Pki;
use common::listener::{DEADLINE, QUIET, listener, next_records, within_worker_budget, written};
use medconnect_api::{Delivery, SourceTask};
use medconnect_mqtt::listener::HEADER_USERNAME;
use medconnect_mqtt::{HEADER_CLIENT_ID, HEADER_QOS, HEADER_TOPIC};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A device on rumqttc: its events go to a channel the test reads.
fn device(
    port: u16,
    client_id: &str,
    password: &str,
) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Event>) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options
        .set_credentials(client_id, password)
        .set_clean_session(false)
        .set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let (events, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(event) => {
                    if events.send(event).is_err() {
                        return;
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    (client, received)
}

/// The next PUBACK the device receives within `within`, if any.
async fn puback(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
    within: Duration,
) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Incoming(Packet::PubAck(ack)))) => return Some(ack.pkid),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn a_puback_goes_out_only_once_the_record_is_settled() {
    let (mut task, port) = listener(&[]).await;
    let (client, mut events) = device(port, "pump-3", "s3cret-pump");
    client
        .publish(
            "devices/pump-3/vitals",
            QoS::AtLeastOnce,
            false,
            "{\"hr\":72}",
        )
        .await
        .unwrap();
    let mut records = next_records(&mut task, 1).await;
    let headers = &records[0].record.headers;
    assert_eq!(records[0].record.topic, "device.vitals");
    assert_eq!(records[0].record.key.as_deref(), Some(&b"pump-3"[..]));
    assert_eq!(
        headers.last_str(HEADER_TOPIC),
        Some("devices/pump-3/vitals")
    );
    assert_eq!(headers.last_str(HEADER_CLIENT_ID), Some("pump-3"));
    assert_eq!(headers.last_str(HEADER_USERNAME), Some("pump-3"));
    assert_eq!(headers.last_str(HEADER_QOS), Some("1"));

    assert_eq!(
        puback(&mut events, QUIET).await,
        None,
        "a PUBACK before Kafka had the record"
    );
    written(&mut records[0]);
    assert!(
        puback(&mut events, DEADLINE).await.is_some(),
        "no PUBACK once written"
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn a_record_kafka_failed_to_take_closes_the_connection_and_the_device_sends_it_again() {
    let (mut task, port) = listener(&[]).await;
    let (client, mut events) = device(port, "monitor-7", "s3cret-monitor");
    client
        .publish(
            "devices/monitor-7/vitals",
            QoS::AtLeastOnce,
            false,
            "{\"spo2\":97}",
        )
        .await
        .unwrap();
    let mut first = next_records(&mut task, 1).await;
    first[0].complete(Delivery::Failed {
        reason: "broker unreachable".into(),
    });
    // rumqttc reconnects, is told its session is present, and resends what was not
    // acknowledged (rumqttc 0.25 without the DUP flag; clients that set it get `mqtt.dup`).
    let mut again = next_records(&mut task, 1).await;
    assert_eq!(again[0].record.value, first[0].record.value);
    written(&mut again[0]);
    assert!(puback(&mut events, DEADLINE).await.is_some());
    // Stored twice at most: once failed (not in Kafka), once written.
    task.stop().await.expect("stop");
}

/// `mosquitto_pub` with the given arguments; its exit status and stderr.
async fn mosquitto_pub(port: u16, args: &[&str]) -> (bool, String) {
    let child = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (scripts/mqtt-peers installs it)");
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("mosquitto_pub finishes")
        .expect("mosquitto_pub runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `mosquitto_pub` as pump-3 with its password: one message at QoS 1 over MQTT 5.
async fn pump_publishes_over_mqtt_5(port: u16, topic: &str, message: &str) -> (bool, String) {
    mosquitto_pub(
        port,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-i",
            "pump-3",
            "-u",
            "pump-3",
            "-P",
            "s3cret-pump",
            "-t",
            topic,
            "-m",
            message,
        ],
    )
    .await
}

#[tokio::test]
async fn mosquitto_pub_qos_2_over_mqtt_5_with_user_properties_completes_once_stored() {
    let (mut task, port) = listener(&[]).await;
    let publisher = tokio::spawn(async move {
        mosquitto_pub(
            port,
            &[
                "-V",
                "mqttv5",
                "-q",
                "2",
                "-i",
                "pump-3",
                "-u",
                "pump-3",
                "-P",
                "s3cret-pump",
                "-t",
                "devices/pump-3/vitals",
                "-m",
                "{\"rate\":12.5}",
                "-D",
                "publish",
                "user-property",
                "unit",
                "ml/h",
                "-D",
                "publish",
                "content-type",
                "application/vnd.pump+json",
            ],
        )
        .await
    });
    let mut records = next_records(&mut task, 1).await;
    let headers = &records[0].record.headers;
    assert_eq!(headers.last_str(HEADER_QOS), Some("2"));
    assert_eq!(headers.last_str("unit"), Some("ml/h"));
    assert_eq!(
        records[0].record.content_type(),
        Some("application/vnd.pump+json")
    );
    // mosquitto_pub waits for PUBREC and PUBCOMP: not finished while the record is unsettled.
    tokio::time::sleep(QUIET).await;
    assert!(
        !publisher.is_finished(),
        "QoS 2 completed before the record was stored"
    );
    written(&mut records[0]);
    let (ok, stderr) = publisher.await.unwrap();
    assert!(ok, "mosquitto_pub failed: {stderr}");

    // MQTT 3.1.1, QoS 1, many lines on one connection: each one record.
    let lines: Vec<String> = (0..200).map(|n| format!("{{\"n\":{n}}}")).collect();
    let publisher = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-q",
                "1",
                "-i",
                "monitor-7",
            ])
            .args([
                "-u",
                "monitor-7",
                "-P",
                "s3cret-monitor",
                "-t",
                "devices/monitor-7/vitals",
                "-l",
            ])
            .stdin(Stdio::piped())
            .spawn()
            .expect("mosquitto_pub");
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all((lines.join("\n") + "\n").as_bytes())
            .await
            .unwrap();
        drop(stdin);
        child.wait().await.unwrap().success()
    });
    let deadline = Instant::now() + DEADLINE;
    let mut stored = 0;
    while stored < 200 {
        assert!(Instant::now() < deadline, "only {stored} of 200 records");
        for mut record in tokio::time::timeout(DEADLINE, task.poll())
            .await
            .unwrap()
            .unwrap()
        {
            written(&mut record);
            stored += 1;
        }
    }
    assert!(publisher.await.unwrap(), "mosquitto_pub -l failed");
    assert!(
        tokio::time::timeout(QUIET, task.poll()).await.is_err(),
        "records beyond the 200 published"
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_refused_and_store_nothing() {
    let (mut task, port) = listener(&[]).await;
    for version in ["mqttv311", "mqttv5"] {
        let (ok, stderr) = mosquitto_pub(
            port,
            &[
                "-V",
                version,
                "-q",
                "1",
                "-u",
                "pump-3",
                "-P",
                "wrong",
                "-t",
                "devices/pump-3/vitals",
                "-m",
                "x",
            ],
        )
        .await;
        assert!(!ok);
        assert!(
            stderr.to_lowercase().contains("bad user name or password"),
            "{version}: {stderr}"
        );
        let (ok, stderr) = mosquitto_pub(
            port,
            &[
                "-V",
                version,
                "-q",
                "1",
                "-t",
                "devices/x/vitals",
                "-m",
                "x",
            ],
        )
        .await;
        assert!(!ok);
        assert!(
            stderr.to_lowercase().contains("not authori"),
            "{version}: {stderr}"
        );
    }
    assert!(
        tokio::time::timeout(QUIET, task.poll()).await.is_err(),
        "a refused device's publish was stored"
    );
    task.stop().await.expect("stop");
}

/// A CONNECT as rumqttc encodes it, sent on a raw socket; returns the socket after CONNACK.
async fn raw_connect(port: u16, keep_alive_s: u16) -> TcpStream {
    let (stream, connack) = try_raw_connect(port, keep_alive_s)
        .await
        .expect("CONNACK in time");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
    stream
}

/// A 3.1.1 CONNECT as pump-3 written by hand; the connection and its CONNACK, or `None` when
/// the listener closed it or did not answer within the deadline.
async fn try_raw_connect(port: u16, keep_alive_s: u16) -> Option<(TcpStream, [u8; 4])> {
    let mut connect = rumqttc::mqttbytes::v4::Connect::new("raw-device");
    connect.keep_alive = keep_alive_s;
    connect.set_login("pump-3", "s3cret-pump");
    let mut bytes = BytesMut::new();
    rumqttc::mqttbytes::v4::Packet::Connect(connect)
        .write(&mut bytes, usize::MAX)
        .unwrap();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(&bytes).await.ok()?;
    let mut connack = [0u8; 4];
    match tokio::time::timeout(DEADLINE, stream.read_exact(&mut connack)).await {
        Ok(Ok(_)) => Some((stream, connack)),
        _ => None,
    }
}

/// Reads until the listener closes the connection; how long that took.
async fn closed_after(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut sink = [0u8; 64];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the connection stayed open"),
        }
    }
}

#[tokio::test]
async fn limits_a_packet_announcing_too_much_a_silent_device_and_too_many_connections() {
    let (mut task, port) = listener(&[
        ("mqtt.max.packet.bytes", "4096"),
        ("mqtt.max.connections", "2"),
    ])
    .await;

    // A PUBLISH whose header announces 1 MiB: closed from the header alone.
    let mut big = raw_connect(port, 60).await;
    big.write_all(&[0x32, 0x80, 0x80, 0x40]).await.unwrap();
    closed_after(&mut big).await;

    // Keep-alive 1 s and then silence: closed after 1.5 s, not before.
    let mut silent = raw_connect(port, 1).await;
    let waited = closed_after(&mut silent).await;
    assert!(
        waited >= Duration::from_millis(1400),
        "closed after {waited:?}"
    );

    // Two connections at once at most: the third is closed at once.
    let _first = raw_connect(port, 60).await;
    let _second = raw_connect(port, 60).await;
    let mut third = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    closed_after(&mut third).await;
    assert!(tokio::time::timeout(QUIET, task.poll()).await.is_err());
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn a_publish_outside_the_topic_pattern_is_rejected_for_the_dead_letter_topic() {
    let (mut task, port) = listener(&[]).await;
    let (ok, stderr) = tokio::join!(
        mosquitto_pub(
            port,
            &[
                "-q",
                "1",
                "-u",
                "pump-3",
                "-P",
                "s3cret-pump",
                "-t",
                "devices/pump-3/alarms",
                "-m",
                "x"
            ]
        ),
        async {
            let mut records = next_records(&mut task, 1).await;
            assert!(records[0].rejected.is_some());
            records[0].complete(Delivery::DeadLettered {
                reason: "no mapping".into(),
            });
        }
    )
    .0;
    assert!(ok, "a dead-lettered publish is acknowledged: {stderr}");
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn bad_publishes_go_to_the_dead_letter_topic_and_mqtt_5_devices_hear_why() {
    let (mut task, port) = listener(&[("payload.format", "json")]).await;

    // MQTT 5, a payload that is not JSON: rejected for the dead-letter topic, and once it is
    // there the device gets PUBACK 0x99 (payload format invalid).
    let publisher = tokio::spawn(async move {
        pump_publishes_over_mqtt_5(port, "devices/pump-3/vitals", "{\"rate\":").await
    });
    let mut records = next_records(&mut task, 1).await;
    let reason = records[0].rejected.as_ref().expect("rejected").to_string();
    assert!(reason.contains("payload.format=json"), "{reason}");
    assert!(!reason.contains("rate"), "the payload is quoted: {reason}");
    records[0].complete(Delivery::DeadLettered { reason });
    let (_, stderr) = publisher.await.unwrap();
    assert!(
        stderr.to_lowercase().contains("payload format invalid"),
        "mosquitto_pub was not told: {stderr}"
    );

    // MQTT 3.1.1, a wildcard in the PUBLISH topic (mosquitto_pub and rumqttc refuse to send
    // one, so the packet is written by hand with rumqttc's encoder): rejected, acknowledged
    // once it is in the dead-letter topic (3.1.1 has no negative acknowledgement).
    let mut device = raw_connect(port, 60).await;
    let mut publish =
        rumqttc::mqttbytes::v4::Publish::new("devices/+/vitals", QoS::AtLeastOnce, "{}");
    publish.pkid = 9;
    let mut bytes = BytesMut::new();
    rumqttc::mqttbytes::v4::Packet::Publish(publish)
        .write(&mut bytes, usize::MAX)
        .unwrap();
    device.write_all(&bytes).await.unwrap();
    let mut records = next_records(&mut task, 1).await;
    let reason = records[0].rejected.as_ref().expect("rejected").to_string();
    assert!(reason.contains("wildcard"), "{reason}");
    records[0].complete(Delivery::DeadLettered { reason });
    let mut puback = [0u8; 4];
    tokio::time::timeout(DEADLINE, device.read_exact(&mut puback))
        .await
        .expect("PUBACK in time")
        .unwrap();
    assert_eq!(puback, [0x40, 0x02, 0x00, 0x09]);
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn over_tls_a_device_certificate_is_its_identity_and_a_device_without_one_is_refused() {
    let pki = Pki::new();
    let (cert, key, ca) = (
        pki.path("server.crt"),
        pki.path("server.key"),
        pki.path("ca.crt"),
    );
    let (mut task, port) = listener(&[
        ("mqtt.tls.cert.file", &cert),
        ("mqtt.tls.key.file", &key),
        ("mqtt.tls.client.ca.file", &ca),
    ])
    .await;
    let tls_args = |with_cert: bool| {
        let mut args = vec![
            "-h".to_string(),
            "localhost".into(),
            "--cafile".into(),
            pki.path("ca.crt"),
        ];
        if with_cert {
            args.extend([
                "--cert".into(),
                pki.path("device.crt"),
                "--key".into(),
                pki.path("device.key"),
            ]);
        }
        args
    };

    // A device certificate and no password: authenticated by the certificate.
    let mut args = tls_args(true);
    args.extend(
        [
            "-q",
            "1",
            "-i",
            "pump-3",
            "-t",
            "devices/pump-3/vitals",
            "-m",
            "{\"rate\":4}",
        ]
        .map(String::from),
    );
    let publisher = tokio::spawn(async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        mosquitto_pub(port, &args).await
    });
    let mut records = next_records(&mut task, 1).await;
    assert_eq!(
        records[0]
            .record
            .headers
            .last_str(medconnect_mqtt::listener::HEADER_CERT_CN),
        Some("pump-3")
    );
    written(&mut records[0]);
    let (ok, stderr) = publisher.await.unwrap();
    assert!(ok, "mosquitto_pub over TLS failed: {stderr}");

    // No client certificate: the handshake fails, nothing is stored.
    let mut args = tls_args(false);
    args.extend(
        [
            "-q",
            "1",
            "-u",
            "pump-3",
            "-P",
            "s3cret-pump",
            "-t",
            "devices/pump-3/vitals",
            "-m",
            "x",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _) = mosquitto_pub(port, &args).await;
    assert!(!ok, "a device without a certificate connected");
    // A certificate, but a username with the wrong password: refused.
    let mut args = tls_args(true);
    args.extend(
        [
            "-q",
            "1",
            "-u",
            "pump-3",
            "-P",
            "wrong",
            "-t",
            "devices/pump-3/vitals",
            "-m",
            "x",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, stderr) = mosquitto_pub(port, &args).await;
    assert!(
        !ok && stderr.to_lowercase().contains("bad user name or password"),
        "{stderr}"
    );
    // Plain TCP to a TLS listener: no CONNACK, closed.
    let mut plain = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    plain
        .write_all(&[
            0x10, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 4, b'p', b'l', b'a', b'n',
        ])
        .await
        .unwrap();
    closed_after(&mut plain).await;
    assert!(
        tokio::time::timeout(QUIET, task.poll()).await.is_err(),
        "a refused device's publish was stored"
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn a_topic_chosen_by_publishers_beyond_the_cap_is_dead_lettered_and_mqtt_5_hears_quota_exceeded()
 {
    // kafka.topic is the MQTT topic itself: whoever publishes picks the Kafka topic.
    let (mut task, port) = listener(&[
        ("mqtt.topic.pattern", ""),
        ("kafka.topic", "${mqtt.topic}"),
        ("kafka.key", ""),
        ("kafka.topic.max.distinct", "2"),
    ])
    .await;
    let publish =
        |topic: &'static str| tokio::spawn(pump_publishes_over_mqtt_5(port, topic, "{\"hr\":72}"));
    for (topic, kafka_topic) in [("wards/icu", "wards.icu"), ("wards/er", "wards.er")] {
        let publisher = publish(topic);
        let mut records = next_records(&mut task, 1).await;
        assert!(records[0].rejected.is_none(), "{topic} within the cap");
        assert_eq!(records[0].record.topic, kafka_topic);
        written(&mut records[0]);
        let (succeeded, stderr) = publisher.await.unwrap();
        assert!(succeeded, "{stderr}");
    }

    // A third distinct topic: no topic is created, the reading goes to the dead-letter topic
    // and the device is told 0x97 once it is there.
    let publisher = publish("wards/anything-a-device-likes");
    let mut records = next_records(&mut task, 1).await;
    let reason = records[0].rejected.as_ref().expect("rejected").to_string();
    assert!(reason.contains("kafka.topic.max.distinct"), "{reason}");
    records[0].complete(Delivery::DeadLettered { reason });
    let (_, stderr) = publisher.await.unwrap();
    assert!(
        stderr.to_lowercase().contains("quota exceeded"),
        "mosquitto_pub was not told: {stderr}"
    );

    // A topic already admitted still is.
    let publisher = publish("wards/icu");
    let mut records = next_records(&mut task, 1).await;
    assert!(records[0].rejected.is_none());
    written(&mut records[0]);
    assert!(publisher.await.unwrap().0);
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn devices_together_cannot_hold_more_than_the_worker_budget_and_read_again_as_kafka_settles()
{
    // The listener's own budget is the default 64 MiB; the worker's, shared by every
    // listener, is 64 KiB: it is the bound here.
    let (mut task, port, worker) = within_worker_budget(65_536, &[]).await;

    // Three devices publish 10 readings of 10,000 bytes each at QoS 1: 300,000 bytes.
    const DEVICES: usize = 3;
    const READINGS: usize = 10;
    let mut fleet = Vec::new();
    for d in 0..DEVICES {
        let mut options = MqttOptions::new(format!("bed-{d}"), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        for r in 0..READINGS {
            let mut payload = format!("bed-{d}/{r}/").into_bytes();
            payload.resize(10_000, b'x');
            client
                .publish("beds/vitals", QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        let acked = tokio::spawn(async move {
            let mut pubacks = 0;
            while pubacks < READINGS {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => pubacks += 1,
                    Ok(_) => {}
                    Err(error) => panic!("device connection: {error}"),
                }
            }
            pubacks
        });
        fleet.push((client, acked));
    }

    // Nothing settled: at most what fits in 64 KiB reaches the engine, never all 30.
    let mut held = Vec::new();
    while let Ok(batch) = tokio::time::timeout(QUIET, task.poll()).await {
        held.extend(batch.expect("poll"));
    }
    assert!(
        !held.is_empty() && held.len() <= 6,
        "{} readings of 10,000 bytes held within a 65,536-byte budget",
        held.len()
    );
    assert!(worker.peak() <= 65_536, "peak {}", worker.peak());
    assert!(worker.used() >= held.len() * 10_000);

    // As Kafka settles, the budget comes back and the rest is read: every reading once.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + DEADLINE;
    loop {
        for mut record in held.drain(..) {
            let value = record.record.value.clone().expect("a payload");
            let id =
                String::from_utf8_lossy(&value[..value.iter().position(|b| *b == b'x').unwrap()])
                    .into_owned();
            assert!(seen.insert(id.clone()), "{id} twice");
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
    for (client, acked) in fleet {
        let pubacks = tokio::time::timeout(DEADLINE, acked)
            .await
            .expect("every PUBACK in time")
            .unwrap();
        assert_eq!(pubacks, READINGS);
        client.disconnect().await.ok();
    }
    assert!(worker.peak() <= 65_536, "peak {}", worker.peak());
    task.stop().await.expect("stop");
    assert_eq!(worker.used(), 0, "everything given back");
}

#[tokio::test]
async fn one_address_cannot_take_more_than_its_connections() {
    // A connection that sends nothing would be closed after the CONNECT timeout anyway: a
    // long one shows the third is closed for the cap.
    let (mut task, port) = listener(&[
        ("mqtt.max.connections.per.peer", "2"),
        ("mqtt.connect.timeout.ms", "120000"),
    ])
    .await;
    let _first = raw_connect(port, 60).await;
    let _second = raw_connect(port, 60).await;
    let mut third = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    closed_after(&mut third).await;
    drop(_first);
    // Its slot comes back once the listener has seen it close.
    let deadline = Instant::now() + DEADLINE;
    loop {
        match try_raw_connect(port, 60).await {
            Some((_, connack)) => {
                assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
                break;
            }
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            None => panic!("the first connection's slot never came back"),
        }
    }
    task.stop().await.expect("stop");
}
