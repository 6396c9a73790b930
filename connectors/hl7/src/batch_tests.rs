use bytes::Bytes;

use super::*;
use crate::ack::{Ack, AckCode, build};
use crate::message::{Rules, parse};
use crate::samples::{ADT_A01, ORU_R01, adt};

fn batch_of(payload: &str) -> Batch {
    match split(&Bytes::from(payload.to_string()), true) {
        Frame::Batch(batch) => *batch,
        Frame::Single => panic!("not read as a batch: {payload:?}"),
    }
}

const FHS: &str = "FHS|^~\\&|EPIC|HOSP|MEDCONNECT|DC|20240101120000||||FILE1\r";
const BHS: &str = "BHS|^~\\&|EPIC|HOSP|MEDCONNECT|DC|20240101120000||||BATCH1\r";

#[test]
fn a_single_message_is_not_a_batch() {
    for single in [ADT_A01, ORU_R01, "not hl7 at all", ""] {
        assert_eq!(split(&Bytes::from(single), true), Frame::Single);
    }
}

#[test]
fn a_file_of_one_batch_splits_into_its_messages_in_order() {
    let messages = [adt("B1", "P1"), adt("B2", "P2"), adt("B3", "P3")];
    let payload = format!("{FHS}{BHS}{}BTS|3\rFTS|1\r", messages.concat());
    let batch = batch_of(&payload);
    assert_eq!(batch.invalid, None);
    let got: Vec<&[u8]> = batch.messages().map(|m| m.as_ref()).collect();
    let want: Vec<&[u8]> = messages.iter().map(|m| m.as_bytes()).collect();
    assert_eq!(got, want, "each message exactly as sent");
    assert_eq!(
        batch.file.as_ref().map(|f| f.control_id.as_str()),
        Some("FILE1")
    );
    assert_eq!(
        batch.groups[0]
            .header
            .as_ref()
            .map(|h| h.control_id.as_str()),
        Some("BATCH1")
    );
}

#[test]
fn two_messages_without_an_envelope_are_a_batch_of_two() {
    let payload = format!("{}{}", adt("M1", "P1"), ORU_R01);
    let batch = batch_of(&payload);
    assert_eq!(batch.invalid, None);
    assert_eq!(batch.message_count(), 2);
    assert!(batch.file.is_none() && batch.groups[0].header.is_none());
}

#[test]
fn broken_batches_are_invalid_as_a_whole() {
    let m = adt("B1", "P1");
    for (payload, why) in [
        (format!("{BHS}{m}BTS|2\r"), "BTS-1"),
        (format!("{FHS}{BHS}{m}BTS|1\rFTS|2\r"), "FTS-1"),
        (format!("{BHS}PID|1\r{m}BTS|1\r"), "outside"),
        (format!("{BHS}{m}BTS|1\r{FHS}"), "FHS"),
        (format!("{BHS}{m}BTS|1\rFTS|1\r{m}"), "after FTS"),
        (format!("BHS|^^\r{m}"), "BHS-1"),
    ] {
        let batch = batch_of(&payload);
        let invalid = batch.invalid.unwrap_or_default();
        assert!(invalid.contains(why), "{payload:?}: {invalid:?}");
    }
}

#[test]
fn the_reply_is_a_batch_of_one_ack_per_message_in_the_original_envelope() {
    let messages = [adt("B1", "P1"), adt("B2", "P2")];
    let payload = format!("{FHS}{BHS}{}BTS|2\rFTS|1\r", messages.concat());
    let batch = batch_of(&payload);
    let acks: Vec<Bytes> = batch
        .messages()
        .map(|m| {
            let header = parse(m, &Rules::default()).expect("valid").header;
            build(
                Some(&header),
                &Ack {
                    code: AckCode::Accept,
                    text: "",
                    error: None,
                },
            )
        })
        .collect();
    let reply = reply(&batch, first_header(&batch).as_ref(), &acks, "");
    let text = String::from_utf8(reply.to_vec()).expect("text");
    let segments: Vec<&str> = text.split('\r').filter(|s| !s.is_empty()).collect();
    let names: Vec<&str> = segments.iter().map(|s| &s[..3]).collect();
    assert_eq!(
        names,
        vec!["FHS", "BHS", "MSH", "MSA", "MSH", "MSA", "BTS", "FTS"]
    );
    let fhs: Vec<&str> = segments[0].split('|').collect();
    assert_eq!(
        (fhs[2], fhs[3], fhs[4], fhs[5]),
        ("MEDCONNECT", "DC", "EPIC", "HOSP")
    );
    assert_eq!(fhs[11], "FILE1", "FHS-12 refers to the file: {fhs:?}");
    let bhs: Vec<&str> = segments[1].split('|').collect();
    assert_eq!(bhs[11], "BATCH1", "BHS-12 refers to the batch: {bhs:?}");
    assert!(!bhs[10].is_empty() && bhs[10] != "BATCH1");
    assert_eq!(segments[3], "MSA|AA|B1|");
    assert_eq!(segments[5], "MSA|AA|B2|");
    assert_eq!(segments[6], "BTS|2|");
    assert_eq!(segments[7], "FTS|1");
}
