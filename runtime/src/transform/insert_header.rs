//! InsertHeader: adds a header with a fixed value to every record (a source system, a
//! pipeline tag), Connect's `InsertHeader` with its settings `header` and `value.literal`.
//! The header is appended, as in Connect; the literal's text is its value's bytes.

use bytes::Bytes;
use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, Props, Record, Transform,
    Validator,
};

use super::TransformPlugin;

fn config_def() -> ConfigDef {
    ConfigDef::new()
        .define_required(
            "header",
            ConfigType::String,
            Importance::High,
            "Name of the header.",
        )
        .with_validator(Validator::NonEmpty)
        .define_required(
            "value.literal",
            ConfigType::String,
            Importance::High,
            "Value of the header.",
        )
}

pub fn plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.InsertHeader",
        aliases: &["InsertHeader"],
        config_def,
        create: |props| InsertHeader::new(props).map(|t| Box::new(t) as Box<dyn Transform>),
    }
}

#[derive(Debug)]
struct InsertHeader {
    header: String,
    value: Bytes,
}

impl InsertHeader {
    fn new(props: &Props) -> ConnectResult<Self> {
        let header = props
            .get("header")
            .filter(|h| !h.trim().is_empty())
            .ok_or_else(|| ConnectError::config("header", "must name the header"))?;
        let value = props
            .get("value.literal")
            .ok_or_else(|| ConnectError::config("value.literal", "must give the header's value"))?;
        Ok(Self {
            header: header.clone(),
            value: Bytes::from(value.clone()),
        })
    }
}

impl Transform for InsertHeader {
    fn apply(&mut self, mut record: Record) -> ConnectResult<Option<Record>> {
        record.headers.add(self.header.clone(), self.value.clone());
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::json::{build, config_field};

    #[test]
    fn appends_the_header_to_any_record() {
        let mut t = build(
            &plugin(),
            &[("header", "source"), ("value.literal", "icu-monitors")],
        )
        .unwrap();
        let out = t
            .apply(
                Record::new("t")
                    .with_value("MSH|not json")
                    .with_header("source", "old"),
            )
            .unwrap()
            .unwrap();
        assert_eq!(out.headers.last_str("source"), Some("icu-monitors"));
        assert_eq!(
            out.headers.iter().filter(|(n, _)| *n == "source").count(),
            2,
            "appended, as in Connect"
        );
        let tombstone = t.apply(Record::new("t")).unwrap().unwrap();
        assert_eq!(tombstone.headers.last_str("source"), Some("icu-monitors"));
    }

    #[test]
    fn an_empty_literal_is_an_empty_header() {
        let mut t = build(&plugin(), &[("header", "h"), ("value.literal", "")]).unwrap();
        assert_eq!(
            t.apply(Record::new("t"))
                .unwrap()
                .unwrap()
                .headers
                .last_str("h"),
            Some("")
        );
    }

    #[test]
    fn config_errors_name_the_setting() {
        assert_eq!(
            config_field(build(&plugin(), &[("value.literal", "x")])),
            "header"
        );
        assert_eq!(
            config_field(build(&plugin(), &[("header", " "), ("value.literal", "x")])),
            "header"
        );
        assert_eq!(
            config_field(build(&plugin(), &[("header", "h")])),
            "value.literal"
        );
    }
}
