//! Fuzz target `wasm_abi` (tests/fuzz/engine.rs): the host's decoder of what a WASM guest
//! answers. A guest controls every byte of it, so decoding must never panic, never allocate
//! beyond the bytes returned, and what it accepts must encode back to itself.

// Both runtime targets include the engine; a copy each keeps them independent test modules.
#[allow(clippy::duplicate_mod)]
#[path = "../../../../tests/fuzz/engine.rs"]
mod engine;

use medconnect_api::Record;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::*;

fn answer(record: &Record) -> Vec<u8> {
    let mut bytes = vec![STATUS_RECORD];
    bytes.extend(encode_record(record));
    bytes
}

/// Bytes a decoded record holds: at most what the guest returned.
fn held(record: &Record) -> usize {
    record.topic.len()
        + record.key.as_ref().map_or(0, Bytes::len)
        + record.value.as_ref().map_or(0, Bytes::len)
        + record
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.map_or(0, Bytes::len))
            .sum::<usize>()
}

fn wasm_abi(input: &[u8]) -> Result<(), TestCaseError> {
    match decode_outcome(input) {
        Ok(Outcome::Record(record)) => {
            prop_assert!(held(&record) <= input.len());
            // Encoded again it is no longer than what the guest wrote (the decoder read every
            // byte), and decodes to the same record.
            prop_assert!(answer(&record).len() <= input.len());
            prop_assert_eq!(
                decode_outcome(&answer(&record)),
                Ok(Outcome::Record(record))
            );
        }
        Ok(Outcome::Error(message)) => prop_assert!(message.len() < input.len()),
        Ok(Outcome::Drop) => prop_assert_eq!(input, &[STATUS_DROP][..]),
        Err(Malformed(reason)) => prop_assert!(reason.len() < 256, "{}", reason),
    }
    match decode_configured(input) {
        Ok(Some(message)) => prop_assert!(message.len() < input.len()),
        Ok(None) => prop_assert_eq!(input, &[STATUS_OK][..]),
        Err(Malformed(reason)) => prop_assert!(reason.len() < 256, "{}", reason),
    }
    Ok(())
}

#[test]
fn fuzz_wasm_abi() {
    let mut record = Record::new("hl7.adt")
        .with_key("MRN1")
        .with_value("MSH|^~\\&|")
        .with_header("content-type", "application/hl7-v2");
    record.headers.add_null("tombstone");
    record.timestamp = Some(1_700_000_000_000);
    record.partition = Some(3);
    let target = engine::Target::new("wasm_abi", env!("CARGO_MANIFEST_DIR"))
        .seed(answer(&record))
        .seed(answer(&Record::new("")))
        .seed([STATUS_DROP])
        .seed([&[STATUS_ERROR, 5, 0, 0, 0][..], b"nope!"].concat())
        .tokens([
            &[0xff, 0xff, 0xff, 0xff][..],
            &[0, 0, 0, 0x80],
            &[0, 0, 0, 0],
            &[1, 0, 0, 0],
            &[STATUS_RECORD],
            &[STATUS_DROP],
            &[STATUS_ERROR],
            &[0xff, 0xff, 0xff, 0x7f],
        ])
        .max_len(8192);
    engine::run(target, wasm_abi);
}
