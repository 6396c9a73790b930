//! Fuzz targets of what MLLP senders and connector configs feed this crate (see
//! tests/fuzz/engine.rs): the MLLP frame decoder, the HL7 message parser with the ACK and
//! batch-ACK builders, and connector-config validation (ConfigDef parsing). Each runs
//! `MEDCONNECT_FUZZ_SECONDS` (3 by default); `scripts/fuzz` runs them longer with the counts.

#[path = "../../../tests/fuzz/engine.rs"]
mod engine;

use bytes::{Bytes, BytesMut};
use engine::{Counting, Target, peak_allocation};
use medconnect_api::{ConfigDef, ConfigType, Importance, Props, Validator};
use medconnect_hl7::ack::{self, Ack, AckCode, AckError, ErrorCondition, parse_reply};
use medconnect_hl7::batch::{self, Frame};
use medconnect_hl7::config::{SinkConfig, SourceConfig, sink_def, source_def};
use medconnect_hl7::message::{Rules, TopicTemplate, parse, rejected_record};
use medconnect_hl7::mllp::MllpCodec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tokio_util::codec::Decoder;

#[global_allocator]
static ALLOC: Counting = Counting;

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

const ADT: &str = "MSH|^~\\&|EPIC|HOSP|MEDCONNECT|DC|20240101120000||ADT^A01^ADT_A01|MSG00001|P|2.5.1\rEVN|A01|20240101120000\rPID|1||PAT123^^^HOSP^MR||DOE^JOHN\rPV1|1|I\r";

fn hl7_tokens() -> Vec<&'static [u8]> {
    vec![
        b"\x0b",
        b"\x1c",
        b"\x1c\r",
        b"\r",
        b"\n",
        b"MSH|^~\\&|",
        b"MSH",
        b"FHS|^~\\&|",
        b"BHS|^~\\&|",
        b"BTS|",
        b"FTS|",
        b"PID|1||",
        b"MSA|AA|",
        b"EVN|",
        b"OBX|",
        b"|",
        b"^",
        b"~",
        b"\\",
        b"&",
        b"#",
        b"ADT^A01",
        b"ORU^R01",
        b"|P|2.5\r",
        b"2.5.1",
        b"||",
        "é€".as_bytes(),
        b"\xff\xfe",
        b"\0",
    ]
}

/// Decodes `stream` fed in reads of `chunk` bytes; the frames, or where the decoder failed.
fn decode(stream: &[u8], chunk: usize, max: usize) -> Result<Vec<Bytes>, TestCaseError> {
    let mut codec = MllpCodec::new(max);
    let mut buffer = BytesMut::new();
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        buffer.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(frame)) => {
                    prop_assert!(frame.len() <= max, "a frame above the maximum got through");
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(_) => return Ok(frames),
            }
        }
        prop_assert!(
            buffer.len() <= max + chunk + 2,
            "the decoder buffered {} bytes with a maximum of {max}",
            buffer.len()
        );
    }
    let _ = codec.decode_eof(&mut buffer);
    Ok(frames)
}

/// The first two bytes choose the read size and the frame limit; the rest is the stream.
fn mllp_codec(input: &[u8]) -> Result<(), TestCaseError> {
    let (chunk, max, stream) = match input {
        [c, m, rest @ ..] => (usize::from(*c % 64) + 1, usize::from(*m) * 16 + 1, rest),
        _ => (1, 16, input),
    };
    let (frames, peak) = peak_allocation(|| decode(stream, chunk, max));
    let frames = frames?;
    prop_assert!(
        peak <= 4 * stream.len() + 64 * 1024,
        "{peak} bytes allocated for {} bytes of input",
        stream.len()
    );
    // However the stream is cut into reads, the same frames come out.
    let whole = decode(stream, stream.len().max(1), max)?;
    prop_assert_eq!(&frames, &whole);
    // Framed again, they decode to themselves (the round trip an ACK takes).
    let mut again = Vec::new();
    for frame in &frames {
        again.extend_from_slice(&MllpCodec::frame(frame));
    }
    prop_assert_eq!(decode(&again, 7, max)?, frames);
    Ok(())
}

#[test]
fn fuzz_mllp_codec() {
    let target = Target::new("mllp_codec", MANIFEST)
        .seed([&[16u8, 64][..], &MllpCodec::frame(ADT.as_bytes())[..]].concat())
        .tokens(hl7_tokens());
    engine::run(target, mllp_codec);
}

fn accept() -> Ack<'static> {
    Ack {
        code: AckCode::Accept,
        text: "",
        error: None,
    }
}

/// One frame's payload: parsed as the listener does (a single message or a batch), records and
/// ACKs built, and the ACKs read back.
fn hl7_message(input: &[u8]) -> Result<(), TestCaseError> {
    let rules = Rules::default();
    let template = TopicTemplate::new("hl7.${message.type}");
    let payload = Bytes::copy_from_slice(input);
    match batch::split(&payload, rules.lenient_newlines) {
        Frame::Single => single(&payload, &rules, &template)?,
        Frame::Batch(batch) => batch_frame(&batch, &payload, &rules)?,
    }
    let ((), peak) = peak_allocation(|| {
        let _ = parse(&payload, &rules);
    });
    prop_assert!(
        peak <= 64 * input.len() + 256 * 1024,
        "{peak} bytes allocated to parse {} bytes",
        input.len()
    );
    let _ = parse_reply(input);
    Ok(())
}

fn single(payload: &Bytes, rules: &Rules, template: &TopicTemplate) -> Result<(), TestCaseError> {
    match parse(payload, rules) {
        Ok(message) => {
            let record = message.to_record(template);
            // An AA'd frame is stored exactly as received.
            prop_assert_eq!(record.value.as_ref(), Some(payload));
            prop_assert!(
                TopicTemplate::check(&record.topic).is_ok(),
                "topic {:?}",
                record.topic
            );
            prop_assert!(!message.key.is_empty());
            let reply = ack::build(Some(&message.header), &accept());
            prop_assert!(
                reply.len() <= 2 * payload.len() + 512,
                "ACK of {} bytes",
                reply.len()
            );
            let read = parse_reply(&reply);
            prop_assert!(read.is_ok(), "our own ACK does not read back: {:?}", read);
            if let Ok(read) = read {
                prop_assert_eq!(read.code, AckCode::Accept);
                prop_assert_eq!(&read.control_id, &message.header.control_id_raw);
            }
        }
        Err(rejection) => {
            let record = rejected_record(payload, &rejection, template);
            prop_assert_eq!(record.value.as_ref(), Some(payload));
            prop_assert!(
                TopicTemplate::check(&record.topic).is_ok(),
                "topic {:?}",
                record.topic
            );
            // The NACK carries the reason, escaped, and reads back with its code.
            let reply = ack::build(
                rejection.header.as_deref(),
                &Ack {
                    code: rejection.code,
                    text: &rejection.reason,
                    error: Some(AckError {
                        condition: rejection.condition,
                        location: rejection.location,
                    }),
                },
            );
            prop_assert!(
                reply.len() <= 2 * payload.len() + 1024,
                "NACK of {} bytes",
                reply.len()
            );
            let read = parse_reply(&reply);
            prop_assert!(read.is_ok(), "our own NACK does not read back: {:?}", read);
            if let Ok(read) = read {
                prop_assert_eq!(read.code, rejection.code);
            }
        }
    }
    Ok(())
}

fn batch_frame(batch: &batch::Batch, payload: &Bytes, rules: &Rules) -> Result<(), TestCaseError> {
    // Messages are disjoint slices of the frame, in order, each starting with its MSH.
    let mut at = 0usize;
    for message in batch.messages() {
        let offset = message.as_ptr() as usize - payload.as_ptr() as usize;
        prop_assert!(offset >= at && offset + message.len() <= payload.len());
        prop_assert!(message.starts_with(b"MSH"));
        at = offset + message.len();
    }
    let acks: Vec<Bytes> = batch
        .messages()
        .map(|m| match parse(m, rules) {
            Ok(message) => ack::build(Some(&message.header), &accept()),
            Err(rejection) => ack::build(
                rejection.header.as_deref(),
                &Ack {
                    code: AckCode::Reject,
                    text: &rejection.reason,
                    error: Some(AckError {
                        condition: ErrorCondition::ApplicationInternal,
                        location: None,
                    }),
                },
            ),
        })
        .collect();
    let reply = batch::reply(
        batch,
        batch::first_header(batch).as_ref(),
        &acks,
        "comment | ^~\\&",
    );
    let text = String::from_utf8_lossy(&reply);
    let answered = text.split('\r').filter(|s| s.starts_with("MSH")).count();
    prop_assert_eq!(
        answered,
        batch.message_count(),
        "one ACK per message: {:?}",
        text
    );
    let valid = batch.invalid.is_none() && batch.messages().all(|m| parse(m, rules).is_ok());
    if valid && batch.message_count() >= 2 {
        // What would be AA'd reads back as the same messages, without the envelope too.
        let bare: Vec<u8> = batch.messages().flat_map(|m| m.iter().copied()).collect();
        match batch::split(&Bytes::from(bare), rules.lenient_newlines) {
            Frame::Batch(again) => {
                let left: Vec<&Bytes> = again.messages().collect();
                let right: Vec<&Bytes> = batch.messages().collect();
                prop_assert_eq!(left, right);
            }
            Frame::Single => prop_assert!(false, "two messages read as one"),
        }
    }
    Ok(())
}

#[test]
fn fuzz_hl7_message() {
    let target = Target::new("hl7_message", MANIFEST)
        .seed(ADT)
        .tokens(hl7_tokens())
        .max_len(16 * 1024);
    engine::run(target, hl7_message);
}

/// `key=value` lines (as a properties file) into connector settings.
fn props(input: &[u8]) -> Props {
    String::from_utf8_lossy(input)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Connector-config validation: never a panic, and what the REST validate endpoint reports
/// (`ConfigDef::validate`) agrees with whether a task could parse the config.
fn hl7_config(input: &[u8]) -> Result<(), TestCaseError> {
    let props = props(input);
    for (def, parsed) in [
        (source_def(), SourceConfig::parse(&props).map(|_| ())),
        (sink_def(), SinkConfig::parse(&props).map(|_| ())),
    ] {
        let values = def.validate(&props);
        prop_assert_eq!(values.len(), def.keys().len());
        let clean = values.iter().all(|v| v.errors.is_empty());
        let typed = def.parse(&props);
        prop_assert_eq!(
            clean,
            typed.is_ok(),
            "validate and parse disagree on {:?}",
            props
        );
        if parsed.is_ok() {
            prop_assert!(
                clean,
                "a task config the endpoint calls invalid: {:?}",
                props
            );
        }
        for value in &values {
            for error in &value.errors {
                prop_assert!(error.len() < 4096, "an error of {} bytes", error.len());
            }
        }
    }
    let _ = SourceConfig::validate(&props);
    // Every ConfigType and validator kind, read through ParsedConfig's typed getters.
    let def = every_type();
    let clean = def.validate(&props).iter().all(|v| v.errors.is_empty());
    match def.parse(&props) {
        Ok(parsed) => {
            prop_assert!(clean, "validate and parse disagree on {:?}", props);
            let _ = (
                parsed.int("t.int"),
                parsed.int("t.long"),
                parsed.double("t.double"),
            );
            let _ = (
                parsed.boolean("t.boolean"),
                parsed.list("t.list"),
                parsed.string("t.class"),
            );
            let _ = (
                parsed.millis("t.long"),
                parsed.int_as::<u16>("t.int"),
                parsed.string("t.password"),
            );
        }
        Err(_) => prop_assert!(!clean, "validate and parse disagree on {:?}", props),
    }
    Ok(())
}

fn every_type() -> ConfigDef {
    ConfigDef::new()
        .define("t.int", ConfigType::Int, "1", Importance::Low, "")
        .with_validator(Validator::between(-5.0, 5.0))
        .define("t.long", ConfigType::Long, "0", Importance::Low, "")
        .define("t.double", ConfigType::Double, "0.5", Importance::Low, "")
        .with_validator(Validator::between(0.0, 1.0))
        .define(
            "t.boolean",
            ConfigType::Boolean,
            "false",
            Importance::Low,
            "",
        )
        .define("t.list", ConfigType::List, "a,b", Importance::Low, "")
        .with_validator(Validator::NonEmpty)
        .define("t.password", ConfigType::Password, "", Importance::Low, "")
        .define("t.class", ConfigType::Class, "x.Y", Importance::Low, "")
        .define("t.mode", ConfigType::String, "a", Importance::Low, "")
        .with_validator(Validator::OneOf(vec!["a", "b"]))
        .define_required("t.required", ConfigType::String, Importance::Low, "")
}

#[test]
fn fuzz_hl7_config() {
    let mut tokens: Vec<Vec<u8>> = source_def()
        .keys()
        .iter()
        .chain(sink_def().keys())
        .chain(every_type().keys())
        .map(|k| format!("\n{}=", k.name).into_bytes())
        .collect();
    for value in [
        "0",
        "-1",
        "1024",
        "65535",
        "65536",
        "true",
        "false",
        "9223372036854775807",
        "9223372036854775808",
        "1e3",
        " ",
        "",
        "NaN",
        "hl7.${message.type}",
        "${trigger.event}",
        "PID.3.1",
        "PID[1].3[2].1",
        "after-commit",
        "immediate",
        "127.0.0.1",
        "2.5,2.5.1",
        "é",
    ] {
        tokens.push(value.as_bytes().to_vec());
    }
    let target = Target::new("hl7_config", MANIFEST)
        .seed("mllp.port=0\nmllp.bind=127.0.0.1\n")
        .seed("mllp.host=h\nmllp.port=2575\nmllp.tls.enabled=true\n")
        .seed("t.required=x\nt.int=-5\nt.double=1\nt.list=,\nt.mode=b\nt.boolean=TRUE\n")
        .tokens(tokens)
        .max_len(4096);
    engine::run(target, hl7_config);
}
