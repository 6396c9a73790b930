//! The per-item results of `_bulk`, and what each means for its document.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::document::Operation;

#[derive(Debug, Deserialize)]
pub struct BulkResponse {
    #[serde(default)]
    pub errors: bool,
    /// One entry per item, in request order: `{"<operation>": {...}}`.
    pub items: Vec<BTreeMap<String, BulkItem>>,
}

#[derive(Debug, Deserialize)]
pub struct BulkItem {
    pub status: u16,
    #[serde(default)]
    pub error: Option<ItemError>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ItemError {
    #[serde(rename = "type", default)]
    pub kind: String,
    /// May quote part of the document (a field's value): never logged, only sent with the
    /// record to the dead-letter topic.
    #[serde(default)]
    pub reason: String,
}

/// What became of one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    Written,
    /// The cluster pushed back (429, `es_rejected_execution_exception`, 5xx): send it again.
    Retry,
    /// The document does not fit the index's mapping: `behavior.on.malformed.documents`.
    Malformed(ItemError),
    /// Refused for another reason that sending it again will not cure (a closed index, an id
    /// too long): reported as errant.
    Refused(ItemError),
}

const MAPPING_ERRORS: &[&str] = &[
    "mapper_parsing_exception",
    "strict_dynamic_mapping_exception",
    "illegal_argument_exception",
    "document_parsing_exception",
    "mapper_exception",
];

impl BulkItem {
    pub fn outcome(&self, operation: Operation) -> ItemOutcome {
        let error = self.error.clone().unwrap_or_else(|| ItemError {
            kind: String::new(),
            reason: format!("status {}", self.status),
        });
        match self.status {
            200..=299 => ItemOutcome::Written,
            // Deleting what is not there (no document, or no index any more: a daily index
            // dropped by retention) leaves it not there.
            404 if operation == Operation::Delete => ItemOutcome::Written,
            // A create with a deterministic id found its document: written before (a batch
            // sent again after a lost answer, or a record delivered again after a crash).
            409 if operation == Operation::Create => ItemOutcome::Written,
            429 => ItemOutcome::Retry,
            500..=599 => ItemOutcome::Retry,
            _ if error.kind == "es_rejected_execution_exception" => ItemOutcome::Retry,
            _ if MAPPING_ERRORS.contains(&error.kind.as_str()) => ItemOutcome::Malformed(error),
            _ => ItemOutcome::Refused(error),
        }
    }
}

impl BulkResponse {
    /// The item for each document in request order, or `None` if the answer does not have
    /// one per document.
    pub fn items(&self, expected: usize) -> Option<Vec<&BulkItem>> {
        if self.items.len() != expected {
            return None;
        }
        self.items
            .iter()
            .map(|entry| entry.values().next())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer osmem-server gave to a mixed bulk (trimmed).
    const ANSWER: &str = r#"{"errors":true,"items":[
        {"create":{"_id":"1","status":201,"result":"created"}},
        {"create":{"_id":"1","status":409,"error":{"type":"version_conflict_engine_exception","reason":"[1]: version conflict, document already exists"}}},
        {"index":{"_id":"2","status":400,"error":{"type":"strict_dynamic_mapping_exception","reason":"mapping set to strict"}}},
        {"index":{"_id":"3","status":400,"error":{"type":"mapper_parsing_exception","reason":"failed to parse field [a]"}}},
        {"delete":{"_id":"9","status":404,"result":"not_found"}},
        {"index":{"_id":"4","status":429,"error":{"type":"es_rejected_execution_exception","reason":"queue full"}}},
        {"index":{"_id":"5","status":400,"error":{"type":"es_rejected_execution_exception","reason":"rejected"}}},
        {"index":{"_id":"6","status":503,"error":{"type":"unavailable_shards_exception","reason":"primary not active"}}},
        {"delete":{"_id":"7","status":404,"error":{"type":"index_not_found_exception","reason":"no such index"}}}
    ],"took":1}"#;

    #[test]
    fn each_item_is_classified_by_status_and_error_type() {
        let response: BulkResponse = serde_json::from_str(ANSWER).expect("parses");
        let operations = [
            Operation::Create,
            Operation::Create,
            Operation::Index,
            Operation::Index,
            Operation::Delete,
            Operation::Index,
            Operation::Index,
            Operation::Index,
            Operation::Delete,
        ];
        let items = response.items(operations.len()).expect("one per document");
        let outcomes: Vec<ItemOutcome> = items
            .iter()
            .zip(operations)
            .map(|(item, operation)| item.outcome(operation))
            .collect();
        assert_eq!(outcomes[0], ItemOutcome::Written);
        assert_eq!(
            outcomes[1],
            ItemOutcome::Written,
            "a create that conflicts was written before"
        );
        assert!(
            matches!(&outcomes[2], ItemOutcome::Malformed(e) if e.kind == "strict_dynamic_mapping_exception")
        );
        assert!(
            matches!(&outcomes[3], ItemOutcome::Malformed(e) if e.kind == "mapper_parsing_exception")
        );
        assert_eq!(outcomes[4], ItemOutcome::Written);
        assert_eq!(outcomes[5], ItemOutcome::Retry);
        assert_eq!(outcomes[6], ItemOutcome::Retry);
        assert_eq!(outcomes[7], ItemOutcome::Retry);
        assert_eq!(
            outcomes[8],
            ItemOutcome::Written,
            "no index, no document to delete"
        );
        assert!(response.items(3).is_none());
    }

    #[test]
    fn a_missing_index_is_refused_for_writes() {
        let item = BulkItem {
            status: 404,
            error: Some(ItemError {
                kind: "index_not_found_exception".into(),
                reason: String::new(),
            }),
        };
        assert!(matches!(
            item.outcome(Operation::Index),
            ItemOutcome::Refused(_)
        ));
    }

    #[test]
    fn a_conflict_on_index_or_update_is_not_taken_for_written() {
        let item = BulkItem {
            status: 409,
            error: Some(ItemError {
                kind: "version_conflict_engine_exception".into(),
                reason: String::new(),
            }),
        };
        assert!(matches!(
            item.outcome(Operation::Upsert),
            ItemOutcome::Refused(_)
        ));
    }
}
