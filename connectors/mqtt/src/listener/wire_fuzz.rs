//! Fuzz target `mqtt_packet` (tests/fuzz/engine.rs): the listener's packet reading, fed what a
//! device could send. No panic, no packet that consumes nothing (a connection would spin), no
//! packet over the limit, and every packet the listener answers encodes within bounds.

#[path = "../../../../tests/fuzz/engine.rs"]
mod engine;

use bytes::BytesMut;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::*;

/// The first byte picks the version (bit 0) and the packet limit; the rest is the stream, fed
/// in reads of up to 64 bytes as a connection receives it.
fn mqtt_packet(input: &[u8]) -> Result<(), TestCaseError> {
    packets(input).map(|_| ())
}

/// The packets read from `input` (see [`mqtt_packet`]).
fn packets(input: &[u8]) -> Result<usize, TestCaseError> {
    let mut count = 0;
    let (version, max, stream) = match input {
        [first, rest @ ..] => (
            if first & 1 == 0 {
                Version::V311
            } else {
                Version::V5
            },
            usize::from(first >> 1) * 64 + 16,
            rest,
        ),
        [] => (Version::V311, 16, input),
    };
    let mut buffer = BytesMut::new();
    let mut connected = false;
    for piece in stream.chunks(64) {
        buffer.extend_from_slice(piece);
        loop {
            if !connected {
                match connect_version(&buffer, max) {
                    Ok(Some(_)) => connected = true,
                    Ok(None) => break,
                    Err(_) => return Ok(count),
                }
            }
            let before = buffer.len();
            match read(&mut buffer, version, max) {
                Ok(Some(packet)) => {
                    prop_assert!(buffer.len() < before, "a packet that consumed nothing");
                    prop_assert!(before - buffer.len() <= max, "a packet over the limit");
                    let _ = format!("{packet:?}");
                    count += 1;
                }
                Ok(None) => break,
                Err(_) => return Ok(count),
            }
        }
        prop_assert!(buffer.len() <= max + 64, "{} bytes buffered", buffer.len());
    }
    Ok(count)
}

#[test]
fn fuzz_mqtt_packet() {
    // CONNECT (3.1.1, client id "d1"), PUBLISH QoS 1 "v/1" "42", PINGREQ, SUBSCRIBE, DISCONNECT.
    let v311: &[u8] = b"\x20\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02d1\x32\x09\x00\x03v/1\x00\x01\x34\x32\xc0\x00\x82\x08\x00\x02\x00\x03c/#\x01\xe0\x00";
    // The same in MQTT 5 (empty properties).
    let v5: &[u8] = b"\x21\x10\x0f\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x02d1\x32\x0a\x00\x03v/1\x00\x01\x00\x34\x32\xc0\x00\xe0\x00";
    // The seeds reach past CONNECT, or mutating them would test little.
    assert_eq!(packets(v311).ok(), Some(5), "the 3.1.1 seed");
    assert_eq!(packets(v5).ok(), Some(4), "the MQTT 5 seed");
    let target = engine::Target::new("mqtt_packet", env!("CARGO_MANIFEST_DIR"))
        .seed(v311)
        .seed(v5)
        .tokens([
            &b"\x10"[..],
            b"\x30",
            b"\x32",
            b"\x34",
            b"\x62",
            b"\x82",
            b"\xa2",
            b"\xc0",
            b"\xe0",
            b"\xf0",
            b"\xff\xff\xff\x7f",
            b"\x80\x80\x80\x80\x01",
            b"\x00\x04MQTT",
            b"\x04",
            b"\x05",
            b"\x00\x00",
            b"\xff\xff",
            b"#",
            b"+",
            b"$share/",
        ])
        .max_len(8192);
    engine::run(target, mqtt_packet);
}
