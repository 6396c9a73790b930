//! Config providers: `${env:VAR}` and `${file:/path/to/file.properties:key}` (or
//! `${file:/path}` for a whole file) in connector configs. Configs are stored and returned
//! with the references; values are resolved only when a task starts (and checked when a
//! config is validated), so secrets never reach the config topic or the API.

use std::sync::LazyLock;

use medconnect_api::{ConnectError, Props};
use regex::Regex;

static REFERENCE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\$\{(env|file):([^}]*)\}")
        .unwrap_or_else(|e| unreachable!("the reference pattern is valid: {e}"))
});

pub fn is_reference(value: &str) -> bool {
    REFERENCE.is_match(value)
}

/// Replaces every reference in every value; an unresolvable one is an error naming its setting.
pub fn resolve(props: &Props) -> Result<Props, ConnectError> {
    props
        .iter()
        .map(|(key, value)| {
            resolve_value(value)
                .map(|v| (key.clone(), v))
                .map_err(|reason| ConnectError::config(key, reason))
        })
        .collect()
}

fn resolve_value(value: &str) -> Result<String, String> {
    if !is_reference(value) {
        return Ok(value.to_string());
    }
    let mut failure = None;
    let resolved = REFERENCE.replace_all(value, |captures: &regex::Captures<'_>| {
        let (provider, argument) = (&captures[1], &captures[2]);
        let result = match provider {
            "env" => std::env::var(argument)
                .map_err(|_| format!("environment variable {argument} is not set")),
            _ => from_file(argument),
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
fn from_file(argument: &str) -> Result<String, String> {
    let (path, key) = match argument.rsplit_once(':') {
        Some((path, key)) if !path.is_empty() && !key.contains('/') => (path, Some(key)),
        _ => (argument, None),
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_file_references_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.properties");
        std::fs::write(&path, "# creds\nuser=phi_reader\npassword = s3cret\n").unwrap();
        // SAFETY: tests in this module are the only readers of this variable.
        unsafe { std::env::set_var("MEDCONNECT_TEST_HOST", "db.local") };
        let props: Props = [
            (
                "host".to_string(),
                "${env:MEDCONNECT_TEST_HOST}:5432".to_string(),
            ),
            (
                "password".to_string(),
                format!("${{file:{}:password}}", path.display()),
            ),
            ("plain".to_string(), "x".to_string()),
        ]
        .into();
        let resolved = resolve(&props).unwrap();
        assert_eq!(resolved["host"], "db.local:5432");
        assert_eq!(resolved["password"], "s3cret");
        assert_eq!(resolved["plain"], "x");
    }

    #[test]
    fn an_unresolvable_reference_names_its_setting() {
        let props: Props = [(
            "password".to_string(),
            "${env:MEDCONNECT_SURELY_UNSET}".to_string(),
        )]
        .into();
        let error = resolve(&props).unwrap_err();
        assert!(
            matches!(error, ConnectError::Config { ref field, ref reason } if field == "password" && reason.contains("MEDCONNECT_SURELY_UNSET"))
        );
    }
}
