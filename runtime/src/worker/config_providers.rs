//! `[config_providers]` of the worker config: which `${provider:...}` references connector
//! configs may use, and within which allowlist (Kafka Connect's `config.providers`). Anyone
//! who can reach the REST API can write a connector config, so a reference is a read of the
//! worker's environment or files on their behalf: only what the operator listed here resolves.

use std::path::{Component, Path, PathBuf};

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

/// The variables `medconnect dev` lets references read: a prefix nothing else uses, so a
/// connector config on a developer's machine can keep its password out of the JSON without
/// exposing the rest of the environment (HOME, cloud credentials, tokens of other tools).
pub const DEV_ENV_PREFIX: &str = "MEDCONNECT_SECRET_*";

impl ConfigProviders {
    /// What `medconnect dev` enables: `${env:MEDCONNECT_SECRET_*}`, and no files (a dev
    /// worker has no directory of secrets to name; a worker config file can allow one).
    pub fn dev() -> Self {
        Self {
            env: Some(EnvProvider {
                allowed: vec![DEV_ENV_PREFIX.to_string()],
            }),
            file: None,
        }
    }

    /// `${env:name}`: the variable's value, if this worker allows it.
    pub fn env(&self, name: &str) -> Result<String, String> {
        let Some(provider) = &self.env else {
            return Err(not_enabled("env"));
        };
        if !provider.allows(name) {
            return Err(format!(
                "environment variable {name} is not allowed on this worker ([config_providers.env] allowed)"
            ));
        }
        std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))
    }

    /// `${file:path}`: the canonical path of `path`, if it is a file under an allowed directory.
    pub fn file(&self, path: &str) -> Result<PathBuf, String> {
        let Some(provider) = &self.file else {
            return Err(not_enabled("file"));
        };
        provider.check(Path::new(path))
    }
}

fn not_enabled(provider: &str) -> String {
    format!(
        "the {provider} config provider is not enabled on this worker ([config_providers.{provider}] in the worker config)"
    )
}

impl EnvProvider {
    pub fn allows(&self, name: &str) -> bool {
        !name.is_empty()
            && self
                .allowed
                .iter()
                .any(|allowed| match allowed.strip_suffix('*') {
                    // A bare `*` would hand out the whole environment: never taken.
                    Some(prefix) => !prefix.is_empty() && name.starts_with(prefix),
                    None => allowed == name,
                })
    }
}

impl FileProvider {
    /// The canonical path of `path` if it is inside an allowed directory. Checked twice: as
    /// written (absolute, no `..`, under an allowed directory as configured or canonical), so
    /// that nothing outside is even looked at, then canonical (symlinks followed), so that a
    /// link inside an allowed directory cannot lead out of it. One message for "outside" and
    /// "missing outside": a caller learns nothing about files it may not read.
    pub fn check(&self, path: &Path) -> Result<PathBuf, String> {
        let outside = || {
            format!(
                "{} is not in a directory this worker allows ([config_providers.file] allowed_dirs)",
                path.display()
            )
        };
        let written_ok = path.is_absolute()
            && !path
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir));
        let dirs: Vec<(PathBuf, Option<PathBuf>)> = self
            .allowed_dirs
            .iter()
            .map(|dir| (dir.clone(), dir.canonicalize().ok()))
            .collect();
        let under = |candidate: &Path| {
            dirs.iter().any(|(dir, canonical)| {
                candidate.starts_with(dir)
                    || canonical.as_ref().is_some_and(|c| candidate.starts_with(c))
            })
        };
        if !written_ok || !under(path) {
            return Err(outside());
        }
        let canonical = path
            .canonicalize()
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        // Only the canonical directories count now: a configured path that is itself a link
        // is compared by where it leads.
        let inside = dirs
            .iter()
            .filter_map(|(_, canonical_dir)| canonical_dir.as_ref())
            .any(|dir| canonical.starts_with(dir));
        if !inside {
            return Err(outside());
        }
        Ok(canonical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(allowed: &[&str]) -> ConfigProviders {
        ConfigProviders {
            env: Some(EnvProvider {
                allowed: allowed.iter().map(|a| a.to_string()).collect(),
            }),
            file: None,
        }
    }

    #[test]
    fn env_names_match_exactly_or_by_prefix() {
        let provider = env(&["MEDCONNECT_SECRET_*", "DB_PASSWORD", "*"]);
        let allows = |name| provider.env.as_ref().unwrap().allows(name);
        assert!(allows("MEDCONNECT_SECRET_PG"));
        assert!(allows("DB_PASSWORD"));
        assert!(!allows("DB_PASSWORD2"), "exact means exact");
        assert!(!allows("HOME"), "a bare * allows nothing");
        assert!(
            !allows("MEDCONNECT_SECRET"),
            "the prefix includes the underscore"
        );
        assert!(!allows(""));
    }

    #[test]
    fn env_outside_the_allowlist_or_disabled_is_refused_without_reading_it() {
        // HOME is set in every test environment; its value must not be in any message.
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        let error = env(&["MEDCONNECT_SECRET_*"]).env("HOME").unwrap_err();
        assert!(error.contains("HOME is not allowed"), "{error}");
        assert!(!error.contains(&home), "{error}");
        let disabled = ConfigProviders::default().env("HOME").unwrap_err();
        assert!(disabled.contains("[config_providers.env]"), "{disabled}");
        assert!(!disabled.contains(&home), "{disabled}");
    }

    #[test]
    fn files_must_stay_inside_the_allowed_directories() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("secrets");
        let other = root.path().join("other");
        std::fs::create_dir_all(allowed.join("nested")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(allowed.join("db.properties"), "password=s3cret\n").unwrap();
        std::fs::write(allowed.join("nested/deep"), "x").unwrap();
        std::fs::write(other.join("outside.properties"), "password=nope\n").unwrap();
        std::os::unix::fs::symlink(other.join("outside.properties"), allowed.join("link")).unwrap();
        std::os::unix::fs::symlink(&other, allowed.join("dirlink")).unwrap();
        let providers = ConfigProviders {
            env: None,
            file: Some(FileProvider {
                allowed_dirs: vec![allowed.clone()],
            }),
        };
        let ok = |p: PathBuf| providers.file(&p.display().to_string());
        assert!(ok(allowed.join("db.properties")).is_ok());
        assert!(ok(allowed.join("nested/deep")).is_ok());
        for escape in [
            other.join("outside.properties"),
            allowed.join("../other/outside.properties"),
            allowed.join("nested/../../other/outside.properties"),
            allowed.join("link"),
            allowed.join("dirlink/outside.properties"),
            PathBuf::from("secrets/db.properties"),
            PathBuf::from("/etc/passwd"),
        ] {
            let error = ok(escape.clone()).unwrap_err();
            assert!(
                error.contains("not in a directory this worker allows"),
                "{}: {error}",
                escape.display()
            );
        }
        // A missing file inside says so; outside, the same answer as any other file.
        let missing = ok(allowed.join("missing")).unwrap_err();
        assert!(missing.contains("cannot read"), "{missing}");
        assert!(ConfigProviders::default().file("/etc/passwd").is_err());
    }

    #[test]
    fn an_allowed_directory_that_is_a_link_is_compared_by_its_target() {
        let root = tempfile::tempdir().unwrap();
        let real = root.path().join("real");
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("token"), "t").unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let file = FileProvider {
            allowed_dirs: vec![link.clone()],
        };
        assert!(file.check(&link.join("token")).is_ok());
        assert!(file.check(&real.join("token")).is_ok());
    }

    #[test]
    fn dev_allows_medconnect_secret_variables_and_no_files() {
        let dev = ConfigProviders::dev();
        assert!(dev.env("HOME").unwrap_err().contains("not allowed"));
        assert!(
            dev.env("MEDCONNECT_SECRET_SURELY_UNSET")
                .unwrap_err()
                .contains("is not set")
        );
        assert!(
            dev.file("/etc/hostname")
                .unwrap_err()
                .contains("not enabled")
        );
    }

    #[test]
    fn the_toml_table_reads_as_documented() {
        let providers: ConfigProviders = toml::from_str(
            r#"
            [env]
            allowed = ["MEDCONNECT_SECRET_*"]
            [file]
            allowed_dirs = ["/etc/medconnect/secrets"]
            "#,
        )
        .unwrap();
        assert_eq!(
            providers.env.unwrap().allowed,
            vec!["MEDCONNECT_SECRET_*".to_string()]
        );
        assert_eq!(
            providers.file.unwrap().allowed_dirs,
            vec![PathBuf::from("/etc/medconnect/secrets")]
        );
        assert!(toml::from_str::<ConfigProviders>("[vault]\nx = 1").is_err());
    }
}
