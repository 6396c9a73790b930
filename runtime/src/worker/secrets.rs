//! Config references: `${env:VAR}` and `${file:/path/to/file.properties:key}` (or
//! `${file:/path}` for a whole file) in connector configs. Configs are stored and returned
//! with the references; values are resolved only when a task starts (and checked when a
//! config is validated), so secrets never reach the config topic or the API.
//!
//! Anyone who can write a connector config could otherwise read the worker's environment and
//! files through it, so a reference resolves only
//! - through a provider the worker config enables, within its allowlist
//!   ([`ConfigProviders`]), and
//! - in a setting that holds a secret (declared a password, or named like one: the rule that
//!   hides values in REST answers). Such values are hidden wherever a config is shown and only
//!   ever handed to the connector's peer; elsewhere a resolved value would become a topic
//!   name, a record's content or a status trace.
//!
//! The values of secret settings, once resolved, are known to a [`Scrubber`], which takes
//! them out of error texts before those become status traces or REST answers.

use std::sync::{Arc, LazyLock};

use medconnect_api::{ConfigDef, ConnectError, Props};
use regex::Regex;

use super::config_providers::ConfigProviders;
use super::connector_config::{HIDDEN, is_secret};

static REFERENCE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\$\{(env|file):([^}]*)\}")
        .unwrap_or_else(|e| unreachable!("the reference pattern is valid: {e}"))
});

pub fn is_reference(value: &str) -> bool {
    REFERENCE.is_match(value)
}

/// A config with its references replaced, and what must not be shown of it.
#[derive(Clone)]
pub struct Resolved {
    pub props: Props,
    pub scrubber: Scrubber,
}

/// Says which settings there are, never their values.
impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved")
            .field("settings", &self.props.keys().collect::<Vec<_>>())
            .field("scrubber", &self.scrubber)
            .finish()
    }
}

/// Replaces every reference in every value. A reference in a setting that does not hold a
/// secret, through a provider this worker does not enable or outside its allowlist, or that
/// cannot be read, is a config error naming its setting; no error ever holds a resolved value.
pub fn resolve(
    providers: &ConfigProviders,
    def: &ConfigDef,
    props: &Props,
) -> Result<Resolved, ConnectError> {
    let mut resolved = Props::new();
    let mut hidden = Vec::new();
    let mut from_providers = Vec::new();
    for (key, value) in props {
        let secret = is_secret(def, key);
        if !secret && is_reference(value) {
            return Err(ConnectError::config(
                key,
                "a ${...} reference may only be used in a setting that holds a secret (a password, \
                 token or credentials setting): its value would be shown or copied into topic \
                 names and records",
            ));
        }
        let referenced = is_reference(value);
        let value =
            resolve_value(providers, value).map_err(|reason| ConnectError::config(key, reason))?;
        if secret {
            hidden.push(value.clone());
        }
        if referenced {
            from_providers.push(value.clone());
        }
        resolved.insert(key.clone(), value);
    }
    // Every log line is scrubbed of what the providers gave (values of the worker's own
    // environment and files); not of values written inline, which anyone who may write a
    // config chooses: registering "INFO" or a peer's address would garble or hide log lines.
    super::redact::remember(from_providers.iter().map(String::as_str));
    Ok(Resolved {
        props: resolved,
        scrubber: Scrubber::new(hidden),
    })
}

fn resolve_value(providers: &ConfigProviders, value: &str) -> Result<String, String> {
    if !is_reference(value) {
        return Ok(value.to_string());
    }
    let mut failure = None;
    let resolved = REFERENCE.replace_all(value, |captures: &regex::Captures<'_>| {
        let (provider, argument) = (&captures[1], &captures[2]);
        let result = match provider {
            "env" => providers.env(argument),
            _ => from_file(providers, argument),
        };
        result.unwrap_or_else(|reason| {
            failure.get_or_insert(format!("cannot resolve ${{{provider}:...}}: {reason}"));
            String::new()
        })
    });
    match failure {
        Some(reason) => Err(reason),
        None => Ok(resolved.into_owned()),
    }
}

/// `path:key` reads `key` from a properties file; a bare `path` reads the whole file.
fn from_file(providers: &ConfigProviders, argument: &str) -> Result<String, String> {
    let (path, key) = match argument.rsplit_once(':') {
        Some((path, key)) if !path.is_empty() && !key.contains('/') => (path, Some(key)),
        _ => (argument, None),
    };
    let canonical = providers.file(path)?;
    // Errors name the path as written, never the file's content.
    let text =
        std::fs::read_to_string(&canonical).map_err(|e| format!("cannot read {path}: {e}"))?;
    let Some(key) = key else {
        return Ok(text.trim_end_matches(['\n', '\r']).to_string());
    };
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && !line.starts_with('!'))
        .filter_map(|line| line.split_once(['=', ':']))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
        .ok_or_else(|| format!("{path} has no key {key}"))
}

/// The values of a config's secret settings, to be taken out of texts a connector or the
/// engine built from the resolved config (a connector's error may quote what it was given)
/// before they become status traces, logs or REST answers.
#[derive(Clone, Default)]
pub struct Scrubber {
    /// Longest first, so that a value containing another is replaced whole.
    values: Arc<[String]>,
}

/// Values shorter than this are not replaced: no secret is that short, and replacing a one-
/// or two-character value would garble every trace it occurs in.
const SHORTEST_SCRUBBED: usize = 3;

impl Scrubber {
    fn new(mut values: Vec<String>) -> Self {
        values.retain(|v| v.len() >= SHORTEST_SCRUBBED && v != HIDDEN);
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Self {
            values: values.into(),
        }
    }

    pub fn text(&self, text: &str) -> String {
        self.values.iter().fold(text.to_string(), |text, value| {
            text.replace(value.as_str(), HIDDEN)
        })
    }

    pub fn error(&self, error: ConnectError) -> ConnectError {
        if self.values.is_empty() {
            return error;
        }
        error.map_message(|message| self.text(message))
    }
}

/// Says how many values it hides, never which.
impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrubber({} values)", self.values.len())
    }
}

#[cfg(test)]
mod tests {
    use medconnect_api::{ConfigType, Importance};

    use super::*;
    use crate::worker::config_providers::{EnvProvider, FileProvider};

    fn def() -> ConfigDef {
        ConfigDef::new()
            .define("topic", ConfigType::String, "", Importance::High, "")
            .define("host", ConfigType::String, "", Importance::High, "")
            .define("users", ConfigType::Password, "", Importance::High, "")
    }

    fn providers(dir: &std::path::Path) -> ConfigProviders {
        ConfigProviders {
            env: Some(EnvProvider {
                allowed: vec!["MEDCONNECT_TEST_SECRET_*".into()],
            }),
            file: Some(FileProvider {
                allowed_dirs: vec![dir.to_path_buf()],
            }),
        }
    }

    fn props(pairs: &[(&str, &str)]) -> Props {
        medconnect_api::props_from(pairs)
    }

    #[test]
    fn references_in_secret_settings_resolve_through_enabled_providers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.properties");
        std::fs::write(&path, "# creds\nuser=phi_reader\npassword = s3cret\n").unwrap();
        // SAFETY: tests in this module are the only readers of this variable.
        unsafe { std::env::set_var("MEDCONNECT_TEST_SECRET_PW", "from-env") };
        let config = props(&[
            ("db.password", "${env:MEDCONNECT_TEST_SECRET_PW}!"),
            ("users", &format!("${{file:{}:password}}", path.display())),
            ("plain", "x"),
        ]);
        let resolved = resolve(&providers(dir.path()), &def(), &config).unwrap();
        assert_eq!(resolved.props["db.password"], "from-env!");
        assert_eq!(resolved.props["users"], "s3cret");
        assert_eq!(resolved.props["plain"], "x");
        assert_eq!(
            resolved
                .scrubber
                .text("login with s3cret and from-env! failed"),
            "login with [hidden] and [hidden] failed"
        );
        assert!(!format!("{resolved:?}").contains("s3cret"));
    }

    #[test]
    fn a_reference_outside_a_secret_setting_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        for key in ["topic", "host", "transforms.x.static.value"] {
            let error = resolve(
                &providers(dir.path()),
                &def(),
                &props(&[(key, "${env:MEDCONNECT_TEST_SECRET_PW}")]),
            )
            .unwrap_err();
            assert!(
                matches!(&error, ConnectError::Config { field, reason } if field == key && reason.contains("only be used in a setting that holds a secret")),
                "{error}"
            );
        }
    }

    #[test]
    fn refusals_name_the_setting_and_never_a_value() {
        let dir = tempfile::tempdir().unwrap();
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        for (providers, reference, says) in [
            (providers(dir.path()), "${env:HOME}", "HOME is not allowed"),
            (
                ConfigProviders::default(),
                "${env:HOME}",
                "env config provider is not enabled",
            ),
            (
                providers(dir.path()),
                "${file:/etc/hostname}",
                "not in a directory this worker allows",
            ),
            (
                ConfigProviders::default(),
                "${file:/etc/hostname}",
                "file config provider is not enabled",
            ),
            (
                providers(dir.path()),
                "${env:MEDCONNECT_TEST_SECRET_SURELY_UNSET}",
                "is not set",
            ),
        ] {
            let error =
                resolve(&providers, &def(), &props(&[("db.password", reference)])).unwrap_err();
            let ConnectError::Config { field, reason } = &error else {
                panic!("{error}")
            };
            assert_eq!(field, "db.password");
            assert!(reason.contains(says), "{reason}");
            assert!(!reason.contains(&home), "{reason}");
        }
    }

    #[test]
    fn only_values_from_providers_are_scrubbed_from_every_log_line() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: tests in this module are the only readers of this variable.
        unsafe { std::env::set_var("MEDCONNECT_TEST_SECRET_LOG", "from-env-for-logs") };
        let config = props(&[
            ("db.password", "inline-chosen-by-a-caller"),
            ("users", "${env:MEDCONNECT_TEST_SECRET_LOG}"),
        ]);
        let resolved = resolve(&providers(dir.path()), &def(), &config).unwrap();
        // The task's own errors are scrubbed of both...
        assert_eq!(
            resolved
                .scrubber
                .text("inline-chosen-by-a-caller from-env-for-logs"),
            "[hidden] [hidden]"
        );
        // ...every log line only of what the worker's environment gave: a caller choosing a
        // "password" such as INFO must not garble or hide the worker's log.
        use crate::worker::redact::scrubbed;
        assert_eq!(scrubbed("inline-chosen-by-a-caller"), None);
        assert_eq!(
            scrubbed("x from-env-for-logs").as_deref(),
            Some("x [hidden]")
        );
    }

    #[test]
    fn the_scrubber_replaces_long_values_whole_and_leaves_short_ones() {
        let scrubber = Scrubber::new(vec!["ab".into(), "secret".into(), "secret-2".into()]);
        assert_eq!(scrubber.text("secret-2 secret ab"), "[hidden] [hidden] ab");
        let error = scrubber.error(ConnectError::retriable("login secret refused"));
        assert_eq!(error.to_string(), "retriable: login [hidden] refused");
        assert!(error.is_retriable());
    }
}
