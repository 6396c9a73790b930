//! The predicates through the chain, as a connector config uses them: each selects the records
//! it should, and `negate` inverts the selection.

use medconnect_api::Record;

use super::TransformChain;
use super::json::props;

/// A chain that drops the records the predicate selects (or, negated, the others).
fn dropping(predicate: &[(&str, &str)], negate: bool) -> TransformChain {
    let mut pairs = vec![
        ("transforms", "drop"),
        (
            "transforms.drop.type",
            "org.apache.kafka.connect.transforms.Filter",
        ),
        ("transforms.drop.predicate", "p"),
        ("predicates", "p"),
    ];
    if negate {
        pairs.push(("transforms.drop.negate", "true"));
    }
    let scoped: Vec<(String, String)> = predicate
        .iter()
        .map(|(k, v)| (format!("predicates.p.{k}"), v.to_string()))
        .collect();
    let mut settings = props(&pairs);
    settings.extend(scoped);
    TransformChain::from_config(&settings).unwrap()
}

fn kept(chain: &mut TransformChain, record: Record) -> bool {
    chain.apply(record).unwrap().is_some()
}

#[test]
fn topic_name_matches_selects_whole_names_and_negate_inverts() {
    let predicate = [("type", "TopicNameMatches"), ("pattern", "test-.*")];
    let mut chain = dropping(&predicate, false);
    assert!(!kept(&mut chain, Record::new("test-vitals")));
    assert!(
        kept(&mut chain, Record::new("vitals-test-x")),
        "the whole name must match"
    );
    let mut chain = dropping(&predicate, true);
    assert!(kept(&mut chain, Record::new("test-vitals")));
    assert!(!kept(&mut chain, Record::new("vitals")));
}

#[test]
fn has_header_key_and_negate() {
    let predicate = [
        (
            "type",
            "org.apache.kafka.connect.transforms.predicates.HasHeaderKey",
        ),
        ("name", "phi"),
    ];
    let mut chain = dropping(&predicate, false);
    assert!(!kept(
        &mut chain,
        Record::new("t").with_header("phi", "yes")
    ));
    assert!(kept(&mut chain, Record::new("t").with_header("other", "x")));
    let mut chain = dropping(&predicate, true);
    assert!(kept(&mut chain, Record::new("t").with_header("phi", "yes")));
    assert!(!kept(&mut chain, Record::new("t")));
}

#[test]
fn record_is_tombstone_and_negate() {
    let predicate = [("type", "RecordIsTombstone")];
    let mut chain = dropping(&predicate, false);
    assert!(!kept(&mut chain, Record::new("t").with_key("k")));
    assert!(kept(&mut chain, Record::new("t").with_value("{}")));
    let mut chain = dropping(&predicate, true);
    assert!(kept(&mut chain, Record::new("t").with_key("k")));
    assert!(!kept(&mut chain, Record::new("t").with_value("{}")));
}

#[test]
fn a_negated_predicate_guards_a_json_transform_from_tombstones() {
    // The usual Connect idiom: apply a field transform only to records that have a value.
    let mut chain = TransformChain::from_config(&props(&[
        ("transforms", "mask"),
        ("transforms.mask.type", "MaskField$Value"),
        ("transforms.mask.fields", "name"),
        ("transforms.mask.predicate", "tomb"),
        ("transforms.mask.negate", "true"),
        ("predicates", "tomb"),
        ("predicates.tomb.type", "RecordIsTombstone"),
    ]))
    .unwrap();
    let masked = chain
        .apply(Record::new("t").with_value(r#"{"name":"Jane"}"#))
        .unwrap()
        .unwrap();
    assert_eq!(masked.value.as_deref(), Some(br#"{"name":""}"#.as_slice()));
    assert!(
        chain
            .apply(Record::new("t").with_key("k"))
            .unwrap()
            .is_some()
    );
}
