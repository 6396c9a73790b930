//! How the group coordinator connection is secured: TLS and SASL from the same Kafka client
//! settings (librdkafka's names, `[kafka]` in the worker config) the worker's producers and
//! consumers use, so a cluster on a secured Kafka needs nothing more.
//!
//! Supported: `security.protocol` PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL; TLS with
//! `ssl.ca.location` (PEM; default the system's bundle), a client certificate from
//! `ssl.certificate.location` + `ssl.key.location` (PEM, unencrypted), host name verification;
//! SASL PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 with `sasl.username`/`sasl.password`. Anything
//! else the connection cannot honour is refused at start-up, naming the setting, rather than
//! connecting with less security than the settings ask for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medconnect_api::tls::{self, TlsError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::scram::ScramHash;

/// The system's CA bundle on Debian and its derivatives, as librdkafka probes it.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("{setting} = {value:?} is not supported by the cluster connection: {reason}")]
    Unsupported {
        setting: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{setting} must be set for {protocol}")]
    Missing {
        setting: &'static str,
        protocol: String,
    },
    #[error("TLS for the cluster connection: {0}")]
    Tls(#[from] TlsError),
}

/// SASL credentials; `Debug` leaves the password out.
#[derive(Clone)]
pub struct Sasl {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Sasl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sasl")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    Scram(ScramHash),
}

impl SaslMechanism {
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::Scram(hash) => hash.mechanism(),
        }
    }
}

/// The coordinator connection's security.
#[derive(Clone, Default)]
pub struct Security {
    tls: Option<TlsConnector>,
    pub sasl: Option<Sasl>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("tls", &self.tls.is_some())
            .field("sasl", &self.sasl)
            .finish()
    }
}

/// A byte stream to a broker, plain or TLS.
pub trait BrokerStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> BrokerStream for T {}

impl Security {
    /// From the Kafka client settings every client of the worker shares.
    pub fn from_settings(settings: &BTreeMap<String, String>) -> Result<Self, SecurityError> {
        let get = |name: &str| {
            settings
                .get(name)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        };
        let protocol = get("security.protocol")
            .unwrap_or("PLAINTEXT")
            .to_ascii_uppercase();
        let (tls, sasl) = match protocol.as_str() {
            "PLAINTEXT" => (false, false),
            "SSL" => (true, false),
            "SASL_PLAINTEXT" => (false, true),
            "SASL_SSL" => (true, true),
            _ => {
                return Err(SecurityError::Unsupported {
                    setting: "security.protocol",
                    value: protocol,
                    reason: "expected PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
                });
            }
        };
        Ok(Self {
            tls: tls.then(|| tls_connector(&get)).transpose()?,
            sasl: sasl.then(|| sasl_settings(&get, &protocol)).transpose()?,
        })
    }

    /// Connects to `address` (`host:port`), with TLS when the settings ask for it.
    pub async fn connect(&self, address: &str) -> std::io::Result<Box<dyn BrokerStream>> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let Some(connector) = &self.tls else {
            return Ok(Box::new(stream));
        };
        let host = address
            .rsplit_once(':')
            .map_or(address, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = tls::server_name(host)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        Ok(Box::new(connector.connect(name, stream).await?))
    }
}

fn refuse(setting: &'static str, value: &str, reason: &'static str) -> SecurityError {
    SecurityError::Unsupported {
        setting,
        value: value.to_string(),
        reason,
    }
}

fn tls_connector<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
) -> Result<TlsConnector, SecurityError> {
    if let Some(value) =
        get("enable.ssl.certificate.verification").filter(|v| !v.eq_ignore_ascii_case("true"))
    {
        return Err(refuse(
            "enable.ssl.certificate.verification",
            value,
            "the cluster connection always verifies the broker's certificate",
        ));
    }
    if let Some(value) =
        get("ssl.endpoint.identification.algorithm").filter(|v| !v.eq_ignore_ascii_case("https"))
    {
        return Err(refuse(
            "ssl.endpoint.identification.algorithm",
            value,
            "the cluster connection always checks the broker's host name",
        ));
    }
    for setting in [
        "ssl.keystore.location",
        "ssl.key.password",
        "ssl.ca.pem",
        "ssl.key.pem",
    ] {
        if let Some(value) = get(setting) {
            return Err(refuse(
                setting,
                // A password is never echoed, even a wrong one.
                if setting == "ssl.key.password" {
                    "(hidden)"
                } else {
                    value
                },
                "use PEM files without a password: ssl.ca.location, ssl.certificate.location, ssl.key.location",
            ));
        }
    }
    let ca = get("ssl.ca.location").map_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE), PathBuf::from);
    let client = match (get("ssl.certificate.location"), get("ssl.key.location")) {
        (Some(cert), Some(key)) => Some((Path::new(cert), Path::new(key))),
        (None, None) => None,
        (Some(_), None) => {
            return Err(SecurityError::Missing {
                setting: "ssl.key.location",
                protocol: "a client certificate".into(),
            });
        }
        (None, Some(_)) => {
            return Err(SecurityError::Missing {
                setting: "ssl.certificate.location",
                protocol: "a client key".into(),
            });
        }
    };
    Ok(tls::connector(&ca, client)?)
}

fn sasl_settings<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
    protocol: &str,
) -> Result<Sasl, SecurityError> {
    // librdkafka takes either name; its default is GSSAPI, which needs Kerberos.
    let mechanism = get("sasl.mechanism")
        .or_else(|| get("sasl.mechanisms"))
        .unwrap_or("GSSAPI");
    let mechanism = match mechanism.to_ascii_uppercase().as_str() {
        "PLAIN" => SaslMechanism::Plain,
        "SCRAM-SHA-256" => SaslMechanism::Scram(ScramHash::Sha256),
        "SCRAM-SHA-512" => SaslMechanism::Scram(ScramHash::Sha512),
        _ => {
            return Err(refuse(
                "sasl.mechanism",
                mechanism,
                "expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
            ));
        }
    };
    let required = |setting: &'static str| {
        get(setting)
            .map(str::to_string)
            .ok_or_else(|| SecurityError::Missing {
                setting,
                protocol: format!("{protocol} with {}", mechanism.name()),
            })
    };
    Ok(Sasl {
        mechanism,
        username: required("sasl.username")?,
        password: required("sasl.password")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn plaintext_by_default_and_sasl_plaintext_with_scram() {
        let security = Security::from_settings(&settings(&[])).unwrap_or_default();
        assert!(security.tls.is_none() && security.sasl.is_none());
        let security = Security::from_settings(&settings(&[
            ("security.protocol", "sasl_plaintext"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.username", "medconnect"),
            ("sasl.password", "s3cret-planted"),
        ]));
        let sasl = security.map(|s| s.sasl);
        assert!(
            matches!(&sasl, Ok(Some(s)) if s.mechanism == SaslMechanism::Scram(ScramHash::Sha512) && s.username == "medconnect"),
            "{sasl:?}"
        );
        assert!(!format!("{sasl:?}").contains("s3cret-planted"));
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_naming_the_setting() {
        let refused = |pairs: &[(&str, &str)]| {
            Security::from_settings(&settings(pairs))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(
            refused(&[("security.protocol", "SASL_PLAINTEXT")])
                .starts_with("sasl.mechanism = \"GSSAPI\"")
        );
        assert!(
            refused(&[
                ("security.protocol", "SASL_PLAINTEXT"),
                ("sasl.mechanism", "PLAIN")
            ])
            .starts_with("sasl.username must be set")
        );
        assert!(
            refused(&[
                ("security.protocol", "SSL"),
                ("enable.ssl.certificate.verification", "false")
            ])
            .starts_with("enable.ssl.certificate.verification")
        );
        assert!(
            refused(&[
                ("security.protocol", "SSL"),
                ("ssl.key.password", "pw-planted")
            ])
            .contains("(hidden)")
        );
        assert!(
            !refused(&[
                ("security.protocol", "SSL"),
                ("ssl.key.password", "pw-planted")
            ])
            .contains("pw-planted")
        );
        assert!(
            refused(&[
                ("security.protocol", "SSL"),
                ("ssl.ca.location", "/nonexistent/ca.pem")
            ])
            .contains("/nonexistent/ca.pem")
        );
        assert!(refused(&[("security.protocol", "KERBEROS")]).starts_with("security.protocol"));
    }
}
