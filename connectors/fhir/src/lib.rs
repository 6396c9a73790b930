//! FHIR R4 source and sink.
//!
//! [`FhirSourceConnector`] reads each resource type's `_history` (`_since` the latest change
//! seen, minus an overlap window; versions already emitted recognised by (id, versionId)) and
//! writes every version as a record keyed `Type/id` (deletions as tombstones), with offsets per
//! resource type. [`FhirSinkConnector`] writes records as batch or transaction Bundles
//! (`PUT Type/id` upserts, conditional updates and creates by identifier, deletes for
//! tombstones): idempotent on redelivery, retrying 429/503/5xx with `Retry-After` while its
//! partitions pause, and dead-lettering what the server refuses with the OperationOutcome in
//! the record's headers.
//!
//! Resources are handled as `serde_json` values, not `fhir-sdk` types: see the README
//! (build time, and R4B models for an R4 server).

pub mod client;
pub mod config;
pub mod entry;
pub mod hook;
pub mod outcome;
mod sink;
pub mod smart;
mod source;
pub mod time;
mod writer;

pub use sink::{FhirSinkConnector, FhirSinkTask};
pub use source::{FhirSourceConnector, FhirSourceTask, FhirSubscriptionSourceConnector};
pub use writer::{HEADER_CODE, HEADER_DIAGNOSTICS, HEADER_SEVERITY, HEADER_STATUS};
