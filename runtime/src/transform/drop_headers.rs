//! DropHeaders: removes every header of the named names, e.g. internal or identifying headers
//! before records leave the hospital network. Connect's `DropHeaders` with its setting `headers`.

use std::collections::HashSet;

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, Props, Record, Transform,
};

use super::TransformPlugin;
use super::json::{list, non_empty_list};

fn config_def() -> ConfigDef {
    ConfigDef::new()
        .define_required(
            "headers",
            ConfigType::List,
            Importance::High,
            "Names of the headers to remove.",
        )
        .with_validator(non_empty_list())
}

pub fn plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.DropHeaders",
        aliases: &["DropHeaders"],
        config_def,
        create: |props| DropHeaders::new(props).map(|t| Box::new(t) as Box<dyn Transform>),
    }
}

#[derive(Debug)]
struct DropHeaders {
    names: HashSet<String>,
}

impl DropHeaders {
    fn new(props: &Props) -> ConnectResult<Self> {
        let names: HashSet<String> = list(props, "headers").into_iter().collect();
        if names.is_empty() {
            return Err(ConnectError::config(
                "headers",
                "must name at least one header",
            ));
        }
        Ok(Self { names })
    }
}

impl Transform for DropHeaders {
    fn apply(&mut self, mut record: Record) -> ConnectResult<Option<Record>> {
        if record
            .headers
            .iter()
            .any(|(name, _)| self.names.contains(name))
        {
            record.headers = std::mem::take(&mut record.headers)
                .iter()
                .filter(|(name, _)| !self.names.contains(*name))
                .map(|(name, value)| (name.to_string(), value.cloned()))
                .collect();
        }
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::json::{build, config_field};

    #[test]
    fn drops_every_header_of_the_names_and_keeps_the_rest_in_order() {
        let mut t = build(&plugin(), &[("headers", "patient-name, trace")]).unwrap();
        let mut record = Record::new("t")
            .with_value("not json")
            .with_header("a", "1")
            .with_header("patient-name", "Jane")
            .with_header("trace", "x")
            .with_header("patient-name", "Doe");
        record.headers.add_null("b");
        let out = t.apply(record).unwrap().unwrap();
        let names: Vec<_> = out
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.cloned()))
            .collect();
        assert_eq!(
            names,
            vec![("a".to_string(), Some("1".into())), ("b".to_string(), None)]
        );
    }

    #[test]
    fn headers_are_required() {
        assert_eq!(config_field(build(&plugin(), &[])), "headers");
        assert_eq!(
            config_field(build(&plugin(), &[("headers", ",")])),
            "headers"
        );
    }
}
