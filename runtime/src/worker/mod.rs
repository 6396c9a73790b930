//! A worker's parts: its settings, the connector plugins it knows, how connector configs are
//! read and checked, and the herder that runs their tasks. [`crate::server`] puts them
//! together with the stores and the REST API into a running process.

pub mod cluster;
pub mod cluster_watch;
pub mod config;
pub mod config_providers;
pub mod connector_config;
pub mod connector_name;
pub mod herder;
pub mod plugins;
pub mod redact;
pub mod secrets;

pub use config::WorkerConfig;
pub use herder::{Assignment, EveryTaskHere, Herder, HerderError};
pub use plugins::Plugins;
