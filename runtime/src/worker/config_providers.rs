//! `[config_providers]` of the worker config: which `${provider:...}` references connector
//! configs may use, and within which allowlist (Kafka Connect's `config.providers`). Anyone
//! who can reach the REST API can write a connector config, so a reference is a read of the
//! worker's environment or files on their behalf: only what the operator listed here resolves.

use std::path::PathBuf;

use serde::Deserialize;

/// The providers this worker enables; a provider that is absent resolves nothing.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigProviders {
    /// `${env:VAR}`: environment variables of the worker process.
    #[serde(default)]
    pub env: Option<EnvProvider>,
    /// `${file:/path:key}` / `${file:/path}`: files under the allowed directories.
    #[serde(default)]
    pub file: Option<FileProvider>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnvProvider {
    /// Variable names a reference may read: an exact name (`DB_PASSWORD`) or a prefix ending
    /// in `*` (`MEDCONNECT_SECRET_*`).
    #[serde(default)]
    pub allowed: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileProvider {
    /// Directories whose files (at any depth) a reference may read; paths are compared after
    /// canonicalisation, so `..` and symlinks cannot leave them.
    #[serde(default)]
    pub allowed_dirs: Vec<PathBuf>,
}
