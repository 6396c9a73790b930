//! `table.name.format`: which table a record goes to.

/// A table name with `${topic}` standing for the record's topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableTemplate(String);

const TOPIC: &str = "${topic}";

/// PostgreSQL truncates longer identifiers (NAMEDATALEN - 1), which would make two long names
/// one table.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

impl TableTemplate {
    pub fn parse(format: &str) -> Result<Self, String> {
        let format = format.trim();
        if format.is_empty() {
            return Err("must not be empty".into());
        }
        let rest = format.replace(TOPIC, "");
        if rest.contains("${") {
            return Err(format!("'{format}': only ${{topic}} can be substituted"));
        }
        if format.contains('\0') {
            return Err("must not contain a NUL character".into());
        }
        Ok(Self(format.to_string()))
    }

    /// The table of a record of this topic.
    pub fn resolve(&self, topic: &str) -> String {
        self.0.replace(TOPIC, topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topic_is_substituted_and_other_placeholders_refused() {
        let template = TableTemplate::parse("kafka_${topic}").expect("valid");
        assert_eq!(template.resolve("hl7.adt"), "kafka_hl7.adt");
        assert!(TableTemplate::parse("${topic}_${date}").is_err());
        assert!(TableTemplate::parse("  ").is_err());
        assert_eq!(
            TableTemplate::parse("patients")
                .expect("valid")
                .resolve("x"),
            "patients"
        );
    }
}
