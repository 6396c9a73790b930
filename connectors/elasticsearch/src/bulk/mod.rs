//! The cluster's HTTP API as the sink uses it: `GET /` and `POST /_bulk`, with plain `reqwest`.

mod client;
mod error;
mod response;

pub use client::{ClusterInfo, Dialect, EsClient};
pub use error::BulkError;
pub use response::{BulkResponse, ItemError, ItemOutcome};
