//! The worker config file (`medconnect worker worker.toml`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use super::cluster::ClusterConfig;
use super::config_providers::ConfigProviders;
use super::redact::ClientSettings;
use crate::kafka::KafkaSettings;
use crate::rest::auth::{AuthMode, AuthSettings, JwtConfig};
use crate::rest::tls::RestTls;
use crate::task::RunnerSettings;

#[derive(Debug, Error)]
pub enum WorkerConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid worker config {path}: {message}")]
    Parse { path: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Workers with the same group id and internal topics form one cluster.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Shown in task statuses; defaults to the REST address.
    #[serde(default)]
    pub worker_id: Option<String>,
    pub bootstrap_servers: String,
    /// How long start-up waits for Kafka to answer (and to create the internal topics) before
    /// the worker gives up with an error, instead of retrying an unreachable cluster forever.
    #[serde(default = "default_startup_timeout_ms")]
    pub startup_timeout_ms: u64,
    #[serde(default = "RestConfig::in_file")]
    pub rest: RestConfig,
    #[serde(default)]
    pub internal_topics: InternalTopics,
    #[serde(default)]
    pub tasks: TaskSettings,
    /// Group membership with the other workers of `group_id` (on unless `enabled = false`).
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Which `${env:...}` / `${file:...}` references connector configs may use (none unless set).
    #[serde(default)]
    pub config_providers: ConfigProviders,
    /// Settings for every Kafka client (security.protocol, sasl.*, ssl.*, ...); `Debug` hides
    /// the secret ones, as every client section does.
    #[serde(default)]
    pub kafka: ClientSettings,
    #[serde(default)]
    pub producer: ClientSettings,
    #[serde(default)]
    pub consumer: ClientSettings,
    #[serde(default)]
    pub admin: ClientSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The URL other workers reach this one's REST API at (forwarded writes); default
    /// `http://<listen address>` (`https://` with `[rest.tls]`). Needed when `listen` is
    /// `0.0.0.0` or behind NAT.
    #[serde(default)]
    pub advertised_url: Option<String>,
    /// `"required"` (what a worker config file gets once it names credentials) or `"none"`
    /// (open: every caller an anonymous admin). Unset and no credentials configured: the
    /// worker refuses to start.
    #[serde(default)]
    pub auth: Option<AuthMode>,
    /// Static bearer tokens: name, role and SHA-256 of each (TOML, or JSON if `.json`).
    #[serde(default)]
    pub tokens_file: Option<PathBuf>,
    /// Basic-auth users: name, role and Argon2id hash of each (`medconnect hash-password`).
    #[serde(default)]
    pub users_file: Option<PathBuf>,
    /// JWT bearer tokens checked against a JWKS file.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Client certificates (mTLS, `[rest.tls] client_ca`) as credentials: name, role and
    /// SHA-256 fingerprint of each.
    #[serde(default)]
    pub certificates_file: Option<PathBuf>,
    /// `/metrics` needs a viewer's credentials (false: open to anyone who reaches it).
    #[serde(default = "yes")]
    pub metrics_auth: bool,
    /// TLS for the REST listener (and https between workers).
    #[serde(default)]
    pub tls: Option<RestTls>,
}

impl Default for RestConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            advertised_url: None,
            // Built in code (tests, `medconnect dev`): open unless told otherwise; a config
            // file must say so (see `auth`).
            auth: Some(AuthMode::None),
            tokens_file: None,
            users_file: None,
            jwt: None,
            certificates_file: None,
            metrics_auth: true,
            tls: None,
        }
    }
}

impl RestConfig {
    /// What a worker config file without `[rest]` gets: authentication not chosen (the
    /// worker refuses to start until it is).
    fn in_file() -> Self {
        Self {
            auth: None,
            ..Self::default()
        }
    }

    /// The credential settings, for [`crate::rest::auth::Authenticator::load`].
    pub fn auth_settings(&self) -> AuthSettings<'_> {
        AuthSettings {
            mode: self.auth,
            tokens_file: self.tokens_file.as_deref(),
            users_file: self.users_file.as_deref(),
            jwt: self.jwt.as_ref(),
            certificates_file: self.certificates_file.as_deref(),
            client_certificates: self.tls.as_ref().is_some_and(|tls| tls.client_ca.is_some()),
            metrics_auth: self.metrics_auth,
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalTopics {
    #[serde(default = "default_config_topic")]
    pub config: String,
    #[serde(default = "default_offset_topic")]
    pub offsets: String,
    #[serde(default = "default_status_topic")]
    pub status: String,
    /// Replication of the internal topics and of topics medconnect creates; use 3 in production.
    #[serde(default = "one")]
    pub replication_factor: i32,
    #[serde(default = "default_offset_partitions")]
    pub offsets_partitions: i32,
    #[serde(default = "default_status_partitions")]
    pub status_partitions: i32,
    /// The audit trail of REST changes: append-only (cleanup.policy=delete), one partition
    /// (one order of changes), kept `audit_retention_ms`.
    #[serde(default = "default_audit_topic")]
    pub audit: String,
    /// How long audit records are kept (the topic's retention.ms when medconnect creates it;
    /// default 6 years, HIPAA's retention of documentation; -1 forever).
    #[serde(default = "default_audit_retention_ms")]
    pub audit_retention_ms: i64,
}

impl Default for InternalTopics {
    fn default() -> Self {
        Self {
            config: default_config_topic(),
            offsets: default_offset_topic(),
            status: default_status_topic(),
            replication_factor: 1,
            offsets_partitions: default_offset_partitions(),
            status_partitions: default_status_partitions(),
            audit: default_audit_topic(),
            audit_retention_ms: default_audit_retention_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSettings {
    #[serde(default = "default_flush_ms")]
    pub offset_flush_interval_ms: u64,
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    #[serde(default = "default_shutdown_ms")]
    pub shutdown_timeout_ms: u64,
    #[serde(default = "default_sink_batch")]
    pub sink_batch_max: usize,
    /// The largest `tasks.max` a connector may ask for; above it, creating or updating the
    /// connector is a 400 naming `tasks.max`.
    #[serde(default = "default_tasks_max_limit")]
    pub tasks_max_limit: u32,
    /// How long a connector's own validation or task-config generation may take (they may
    /// wait on the connector's peer); past it, the REST call answers with the timeout.
    #[serde(default = "default_connector_call_timeout_ms")]
    pub connector_call_timeout_ms: u64,
    /// Bytes remote senders may make the worker hold at once, over all its listener sources
    /// (MLLP frames being received or awaiting their ACK, MQTT publishes awaiting Kafka).
    #[serde(default = "default_listener_budget_bytes")]
    pub listener_budget_bytes: usize,
}

impl Default for TaskSettings {
    fn default() -> Self {
        Self {
            offset_flush_interval_ms: default_flush_ms(),
            max_in_flight: default_max_in_flight(),
            shutdown_timeout_ms: default_shutdown_ms(),
            sink_batch_max: default_sink_batch(),
            tasks_max_limit: default_tasks_max_limit(),
            connector_call_timeout_ms: default_connector_call_timeout_ms(),
            listener_budget_bytes: default_listener_budget_bytes(),
        }
    }
}

fn default_group_id() -> String {
    "medconnect".into()
}
fn default_startup_timeout_ms() -> u64 {
    30_000
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8083))
}
fn default_config_topic() -> String {
    "medconnect-configs".into()
}
fn default_offset_topic() -> String {
    "medconnect-offsets".into()
}
fn default_status_topic() -> String {
    "medconnect-status".into()
}
fn default_audit_topic() -> String {
    "medconnect-audit".into()
}
fn default_audit_retention_ms() -> i64 {
    6 * 365 * 24 * 60 * 60 * 1000
}
fn one() -> i32 {
    1
}
fn default_offset_partitions() -> i32 {
    5
}
fn default_status_partitions() -> i32 {
    3
}
fn default_flush_ms() -> u64 {
    5_000
}
fn default_max_in_flight() -> usize {
    10_000
}
fn default_shutdown_ms() -> u64 {
    10_000
}
fn default_sink_batch() -> usize {
    500
}
fn default_listener_budget_bytes() -> usize {
    crate::task::DEFAULT_LISTENER_BUDGET_BYTES
}
fn default_connector_call_timeout_ms() -> u64 {
    crate::task::DEFAULT_CONNECTOR_CALL_TIMEOUT
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}
fn default_tasks_max_limit() -> u32 {
    crate::task::DEFAULT_TASKS_MAX_LIMIT
}

fn to_strings(values: &BTreeMap<String, toml::Value>) -> BTreeMap<String, String> {
    values
        .iter()
        .map(|(k, v)| {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect()
}

impl WorkerConfig {
    /// A config for a worker talking to `bootstrap_servers`, everything else default.
    pub fn new(bootstrap_servers: &str) -> Self {
        Self {
            group_id: default_group_id(),
            worker_id: None,
            bootstrap_servers: bootstrap_servers.to_string(),
            startup_timeout_ms: default_startup_timeout_ms(),
            rest: RestConfig::default(),
            internal_topics: InternalTopics::default(),
            tasks: TaskSettings::default(),
            // A worker built in code (tests, `medconnect dev`) runs alone unless told otherwise;
            // a worker config file joins its cluster by default.
            cluster: ClusterConfig {
                enabled: false,
                ..ClusterConfig::default()
            },
            config_providers: ConfigProviders::default(),
            kafka: ClientSettings::default(),
            producer: ClientSettings::default(),
            consumer: ClientSettings::default(),
            admin: ClientSettings::default(),
        }
    }

    /// Adds `[consumer]` settings, as if the file had them.
    pub fn with_consumer_settings(mut self, settings: &[(&str, &str)]) -> Self {
        self.consumer.extend(
            settings
                .iter()
                .map(|(key, value)| (key.to_string(), toml::Value::from(*value))),
        );
        self
    }

    pub fn from_file(path: &Path) -> Result<Self, WorkerConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkerConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| WorkerConfigError::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn kafka_settings(&self) -> KafkaSettings {
        let mut settings = KafkaSettings::new(&self.bootstrap_servers);
        settings.common.extend(to_strings(&self.kafka));
        settings.producer = to_strings(&self.producer);
        settings.consumer = to_strings(&self.consumer);
        settings.admin = to_strings(&self.admin);
        settings
    }

    pub fn startup_timeout(&self) -> Duration {
        Duration::from_millis(self.startup_timeout_ms.max(1))
    }

    pub fn runner_settings(&self) -> RunnerSettings {
        RunnerSettings {
            offset_flush_interval: Duration::from_millis(
                self.tasks.offset_flush_interval_ms.max(10),
            ),
            max_in_flight: self.tasks.max_in_flight.max(1),
            shutdown_timeout: Duration::from_millis(self.tasks.shutdown_timeout_ms),
            sink_batch_max: self.tasks.sink_batch_max.max(1),
            tasks_max_limit: self.tasks.tasks_max_limit.max(1),
            connector_call_timeout: Duration::from_millis(
                self.tasks.connector_call_timeout_ms.max(1),
            ),
            config_providers: self.config_providers.clone(),
            listener_budget_bytes: self.tasks.listener_budget_bytes.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_sections_pass_through_as_strings() {
        let config = WorkerConfig::from_toml(
            r#"
            bootstrap_servers = "k:9092"
            [kafka]
            "security.protocol" = "SASL_SSL"
            [producer]
            "linger.ms" = 20
            "#,
        )
        .unwrap();
        let settings = config.kafka_settings();
        assert_eq!(settings.common["security.protocol"], "SASL_SSL");
        assert_eq!(settings.producer["linger.ms"], "20");
        let producer = settings.producer_config(&Default::default());
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(producer.get("linger.ms"), Some("20"));
    }

    #[test]
    fn a_config_file_must_choose_its_rest_authentication() {
        let bare = WorkerConfig::from_toml("bootstrap_servers = \"k\"").unwrap();
        assert_eq!(bare.rest.auth, None);
        let with_rest =
            WorkerConfig::from_toml("bootstrap_servers = \"k\"\n[rest]\nlisten = \"127.0.0.1:1\"")
                .unwrap();
        assert_eq!(with_rest.rest.auth, None);
        let open =
            WorkerConfig::from_toml("bootstrap_servers = \"k\"\n[rest]\nauth = \"none\"").unwrap();
        assert_eq!(open.rest.auth, Some(AuthMode::None));
        assert_eq!(WorkerConfig::new("k").rest.auth, Some(AuthMode::None));
    }

    #[test]
    fn unknown_settings_are_rejected_by_name() {
        let error = WorkerConfig::from_toml("bootstrap_servers = \"k\"\nbootstrap_server = \"x\"")
            .unwrap_err();
        assert!(error.contains("bootstrap_server"), "{error}");
    }
}
