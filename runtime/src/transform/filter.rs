//! Filter: drops every record its predicate selects (Connect's `Filter`; with no predicate it
//! drops every record, as in Connect).

use medconnect_api::{ConfigDef, ConnectResult, Record, Transform};

use super::TransformPlugin;

pub fn plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.Filter",
        aliases: &["Filter"],
        config_def: ConfigDef::new,
        create: |_| Ok(Box::new(Filter)),
    }
}

struct Filter;

impl Transform for Filter {
    fn apply(&mut self, _record: Record) -> ConnectResult<Option<Record>> {
        Ok(None)
    }
}
