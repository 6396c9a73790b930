//! The medconnect engine: workers, stores, task runners, transforms and the REST API.

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod kafka;
pub mod metrics;
pub mod rest;
pub mod server;
pub mod store;
pub mod task;
pub mod transform;
pub mod worker;

pub use server::{Worker, WorkerError};
pub use worker::{Plugins, WorkerConfig};
