//! [`crate::structure`] against hl7-parser's full parse (what `message::parse` used before):
//! on generated messages both must accept and reject the same ones, stop reading at the same
//! byte and find the same key.

use hl7_parser::query::LocationQuery;
use proptest::prelude::*;

use crate::message::{Rules, parse};

/// Pieces a message is made of: segment starts (valid and not), both field separators used
/// below, the other delimiters, every segment separator, non-ASCII alphanumerics. (Not a
/// non-ASCII letter alone: see `a_segment_name_is_three_alphanumeric_characters`.)
const PIECES: &[&str] = &[
    "\r", "\n", "\r\n", "\n\r", "PID|", "PID", "OBX|", "ZZ1|", "MSH|", "É1ß|", "pid|", "PI", "D",
    "|", "#", "^", "~", "&", "\\", "a", "1", " ", "x^y~z&w", "\t", "PID#", "OBX#", "12^34",
];

const SEGMENTS: &[&str] = &["PID", "OBX", "MSH", "ZZ1", "É1ß", "pid"];

/// The message control id, the key when the queried value is absent or empty.
const CONTROL_ID: &str = "CID1";

fn message(field: char, pieces: &[&str]) -> String {
    let msh = format!(
        "MSH{field}^~\\&{field}A{field}B{field}C{field}D{field}20240101{field}{field}ADT^A01{field}{CONTROL_ID}{field}P{field}2.5.1{field}"
    );
    let tail: String = pieces.concat();
    msh + &tail.replace('|', &field.to_string())
}

fn query() -> impl Strategy<Value = LocationQuery> {
    let position = || proptest::option::of(1usize..4);
    (
        prop::sample::select(SEGMENTS),
        position(),
        proptest::option::of(1usize..6),
        position(),
        position(),
        position(),
    )
        .prop_map(
            |(segment, segment_index, field, repeat, component, subcomponent)| LocationQuery {
                segment: segment.to_string(),
                segment_index,
                field,
                repeat,
                component,
                subcomponent,
            },
        )
}

/// What hl7-parser's full parse says: the key (the queried raw value, or the control id), or
/// the byte where its reading stopped before something other than separators.
fn reference(body: &str, lenient_newlines: bool, query: &LocationQuery) -> Result<String, usize> {
    let message = hl7_parser::Message::parse_with_lenient_newlines(body, lenient_newlines)
        .map_err(|_| usize::MAX)?;
    let parsed_len = message.raw_value().len();
    if !body[parsed_len..].trim_matches(['\r', '\n']).is_empty() {
        return Err(parsed_len);
    }
    Ok(message
        .query(query.clone())
        .map(|value| value.raw_value().to_string())
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| CONTROL_ID.to_string()))
}

fn ours(body: &str, lenient_newlines: bool, query: &LocationQuery) -> Result<String, String> {
    let rules = Rules {
        lenient_newlines,
        key_field: Some(query.clone()),
        ..Rules::default()
    };
    parse(body.as_bytes(), &rules)
        .map(|message| message.key)
        .map_err(|rejection| rejection.reason)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn structure_and_key_match_hl7_parser(
        pieces in prop::collection::vec(prop::sample::select(PIECES), 0..40),
        field in prop::sample::select(&['|', '#'][..]),
        lenient in any::<bool>(),
        query in query(),
    ) {
        let body = message(field, &pieces);
        match (reference(&body, lenient, &query), ours(&body, lenient, &query)) {
            (Ok(expected), Ok(key)) => prop_assert_eq!(key, expected),
            (Err(at), Err(reason)) => prop_assert_eq!(
                reason,
                format!("the message structure is invalid (unreadable segment at byte {at})")
            ),
            (expected, got) => prop_assert!(false, "hl7-parser: {expected:?}, ours: {got:?}"),
        }
    }
}

#[test]
fn a_segment_or_field_numbered_zero_points_at_nothing() {
    let body = message('|', &["\rPID|1||PAT9"]);
    let at = |segment_index, field| LocationQuery {
        segment: "PID".to_string(),
        segment_index,
        field,
        repeat: None,
        component: None,
        subcomponent: None,
    };
    assert_eq!(
        ours(&body, true, &at(Some(1), Some(3))),
        Ok("PAT9".to_string())
    );
    for query in [at(Some(0), Some(3)), at(Some(1), Some(0))] {
        assert_eq!(ours(&body, true, &query), Ok(CONTROL_ID.to_string()));
    }
}

#[test]
fn the_key_is_read_from_the_queried_occurrence_of_its_segment() {
    let body = message('|', &["\rOBX|1|A\rOBX|2|B^b\rOBX|3|C"]);
    let key = |query: &str| ours(&body, true, &LocationQuery::parse(query).expect("a query"));
    assert_eq!(key("OBX.2"), Ok("A".to_string()));
    assert_eq!(key("OBX[2].2.2"), Ok("b".to_string()));
    assert_eq!(key("OBX[3].2"), Ok("C".to_string()));
    assert_eq!(key("OBX[4].2"), Ok(CONTROL_ID.to_string()));
    assert_eq!(key("MSH.10"), Ok(CONTROL_ID.to_string()));
    assert_eq!(key("MSH.9.2"), Ok("A01".to_string()));
    // A second MSH is a segment like any other: its field 1 follows its name.
    let twice = message('|', &["\rMSH|PID|x"]);
    let query = LocationQuery::parse("MSH[2].1").expect("a query");
    assert_eq!(ours(&twice, true, &query), Ok("PID".to_string()));
    assert_eq!(reference(&twice, true, &query), Ok("PID".to_string()));
}

/// The one place this reading differs from hl7-parser 0.3's: nom's `take_while_m_n` there
/// measures the name in bytes but takes it in characters, so `aé|` (two letters and the field
/// separator, four bytes) passed for a segment name. Here a name is three alphanumerics.
#[test]
fn a_segment_name_is_three_alphanumeric_characters() {
    let query = LocationQuery::parse("PID.3").expect("a query");
    let short_name = message('|', &["\raé||x"]);
    assert!(reference(&short_name, true, &query).is_ok());
    assert!(ours(&short_name, true, &query).is_err());
    let non_ascii = message('|', &["\rÉ1ß|x"]);
    assert!(ours(&non_ascii, true, &query).is_ok());
}
