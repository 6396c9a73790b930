//! Properties of the framing and the parsers over arbitrary input: they never panic, and
//! framing survives any split of the byte stream into reads.

use bytes::{Bytes, BytesMut};
use medconnect_hl7::ack::parse_reply;
use medconnect_hl7::message::{Rules, TopicTemplate, parse, rejected_record};
use medconnect_hl7::mllp::MllpCodec;
use proptest::prelude::*;
use tokio_util::codec::Decoder;

/// Bytes biased towards what matters: MLLP control bytes, HL7 delimiters, segment names.
fn hl7ish() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just(b"\x0b".to_vec()),
        Just(b"\x1c".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"MSH".to_vec()),
        Just(b"MSH|^~\\&|".to_vec()),
        Just(b"PID|".to_vec()),
        Just(b"MSA|AA|".to_vec()),
        Just(b"|".to_vec()),
        Just(b"^".to_vec()),
        Just(b"~".to_vec()),
        Just(b"\\".to_vec()),
        Just(b"&".to_vec()),
        Just(b"2.5".to_vec()),
        Just("é€".as_bytes().to_vec()),
        proptest::collection::vec(any::<u8>(), 0..8),
    ];
    proptest::collection::vec(token, 0..40).prop_map(|parts| parts.concat())
}

fn decode_in_chunks(input: &[u8], chunk: usize, max: usize) -> Vec<Bytes> {
    let mut codec = MllpCodec::new(max);
    let mut buffer = BytesMut::new();
    let mut frames = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        buffer.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= max, "a frame above the maximum got through");
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(_) => return frames,
            }
        }
        assert!(
            buffer.len() <= max + chunk + 2,
            "the decoder buffered without bound"
        );
    }
    let _ = codec.decode_eof(&mut buffer);
    frames
}

fn check_message(bytes: &[u8]) {
    let rules = Rules::default();
    match parse(bytes, &rules) {
        Ok(message) => {
            let record = message.to_record(&TopicTemplate::new("hl7.${message.type}"));
            assert!(
                TopicTemplate::check(&record.topic).is_ok(),
                "illegal topic {:?}",
                record.topic
            );
            assert!(!message.key.is_empty());
        }
        Err(rejection) => {
            let raw = Bytes::copy_from_slice(bytes);
            let record =
                rejected_record(&raw, &rejection, &TopicTemplate::new("hl7.${message.type}"));
            assert!(
                TopicTemplate::check(&record.topic).is_ok(),
                "illegal topic {:?}",
                record.topic
            );
        }
    }
    let _ = parse_reply(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(input in proptest::collection::vec(any::<u8>(), 0..2048), chunk in 1usize..64, max in 1usize..512) {
        decode_in_chunks(&input, chunk, max);
    }

    #[test]
    fn hl7_like_bytes_never_panic_the_decoder_or_the_parsers(input in hl7ish(), chunk in 1usize..32) {
        for frame in decode_in_chunks(&input, chunk, 4096) {
            check_message(&frame);
        }
        check_message(&input);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parsers(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_message(&input);
        let mut prefixed = b"MSH|^~\\&|".to_vec();
        prefixed.extend_from_slice(&input);
        check_message(&prefixed);
    }

    #[test]
    fn framed_payloads_come_back_whole_under_any_split(
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>().prop_filter("no start block", |b| *b != 0x0b), 0..200), 1..6),
        junk in proptest::collection::vec(any::<u8>().prop_filter("no start block", |b| *b != 0x0b), 0..20),
        chunk in 1usize..50,
    ) {
        // A payload cannot carry the end sequence; MLLP has no escaping for it.
        let payloads: Vec<Vec<u8>> = payloads
            .into_iter()
            .map(|p| {
                let mut out: Vec<u8> = Vec::with_capacity(p.len());
                for b in p {
                    if !(b == 0x0d && out.last() == Some(&0x1c)) {
                        out.push(b);
                    }
                }
                if out.last() == Some(&0x1c) {
                    out.pop();
                }
                out
            })
            .collect();
        let mut stream = Vec::new();
        for payload in &payloads {
            stream.extend_from_slice(&junk);
            stream.extend_from_slice(&MllpCodec::frame(payload));
        }
        let frames = decode_in_chunks(&stream, chunk, 1024);
        let expected: Vec<Bytes> = payloads.into_iter().map(Bytes::from).collect();
        prop_assert_eq!(frames, expected);
    }
}
