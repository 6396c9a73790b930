//! The HTTP side: a `reqwest` client that knows the server's base URL and credentials, asks
//! for FHIR JSON, and turns answers into [`FhirError`]s that say whether trying again helps
//! (429/503 with their `Retry-After`, 5xx, no answer) or not.

use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use serde_json::Value;

use crate::config::{Auth, ConnectionConfig};
use crate::outcome::Outcome;
use crate::time;

pub const FHIR_JSON: &str = "application/fhir+json";

#[derive(Debug, thiserror::Error)]
pub enum FhirError {
    #[error("cannot read the CA file: {0}")]
    CaFile(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("the SMART private key: {0}")]
    Key(String),
    /// The authorization server refused the client (a wrong key or client id).
    #[error("SMART authorization failed: {0}")]
    Auth(String),
    #[error("no answer from the FHIR server: {0}")]
    Transport(String),
    /// The server answered with an error status. `Display` names the status and the
    /// outcome's severity/code, never its diagnostics.
    #[error("the FHIR server answered HTTP {status}{}", outcome.as_ref().map(|o| format!(" ({o})")).unwrap_or_default())]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        outcome: Option<Outcome>,
    },
    #[error("the FHIR server's answer is not {0}")]
    Decode(&'static str),
}

impl FhirError {
    /// Whether the same request may succeed later: no answer, 408, 429, 5xx, or an
    /// OperationOutcome of the `transient` kind whatever the status.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Transport(_) => true,
            Self::Status {
                status, outcome, ..
            } => {
                is_retriable_status(*status)
                    || outcome.as_ref().is_some_and(|o| is_transient_code(&o.code))
            }
            _ => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// OperationOutcome issue types that say the failure is temporary (FHIR's `transient` and
/// its children): the same request may succeed later.
pub fn is_transient_code(code: &str) -> bool {
    matches!(
        code,
        "transient"
            | "lock-error"
            | "no-store"
            | "exception"
            | "timeout"
            | "incomplete"
            | "throttled"
    )
}

pub fn is_retriable_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

/// `Retry-After` as delta-seconds or an HTTP-date (`Wed, 21 Oct 2015 07:28:00 GMT`).
pub fn parse_retry_after(value: &str, now: time::Nanos) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    // IMF-fixdate: day-name, DD Mon YYYY HH:MM:SS GMT
    let mut parts = value.split_whitespace().skip(1);
    let day = parts.next()?;
    let month = parts.next()?;
    let year = parts.next()?;
    let clock = parts.next()?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? + 1;
    let at = time::parse(&format!("{year}-{month:02}-{day:0>2}T{clock}Z"))?;
    let wait = u64::try_from((at - now).max(0) / 1_000_000).ok()?;
    Some(Duration::from_millis(wait))
}

fn now() -> time::Nanos {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as time::Nanos)
}

#[derive(Clone)]
pub struct FhirClient {
    http: reqwest::Client,
    base: String,
    /// SMART Backend Services: the access token for each request.
    tokens: Option<std::sync::Arc<crate::smart::TokenSource>>,
}

impl std::fmt::Debug for FhirClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FhirClient")
            .field("base", &self.base)
            .finish()
    }
}

impl FhirClient {
    pub fn new(config: &ConnectionConfig) -> Result<Self, FhirError> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(FHIR_JSON));
        let authorization = match &config.auth {
            Auth::None => None,
            Auth::Basic { username, password } => {
                let encoded = base64_encode(format!("{username}:{}", password.expose()).as_bytes());
                Some(format!("Basic {encoded}"))
            }
            Auth::Bearer(token) => Some(format!("Bearer {}", token.expose())),
            Auth::Smart(_) => None,
        };
        if let Some(value) = authorization {
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                FhirError::Client("credentials that cannot be sent in a header".into())
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .pool_idle_timeout(Duration::from_secs(30));
        if let Some(path) = &config.tls_ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| FhirError::CaFile(format!("{}: {e}", path.display())))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| FhirError::CaFile(format!("{}: {e}", path.display())))?;
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder
            .build()
            .map_err(|e| FhirError::Client(e.to_string()))?;
        let tokens = match &config.auth {
            Auth::Smart(settings) => {
                let signer =
                    crate::smart::Signer::load(&settings.key_file).map_err(FhirError::Key)?;
                Some(std::sync::Arc::new(crate::smart::TokenSource::new(
                    http.clone(),
                    config.base.clone(),
                    settings.clone(),
                    signer,
                )))
            }
            _ => None,
        };
        Ok(Self {
            http,
            base: config.base.clone(),
            tokens,
        })
    }

    /// Sends a request (built again for a retry), with the SMART access token when there is
    /// one; a 401 to a token makes one more attempt with a new token.
    async fn send(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, FhirError> {
        let Some(tokens) = &self.tokens else {
            return build()
                .send()
                .await
                .map_err(|e| FhirError::Transport(transport_reason(&e)));
        };
        for attempt in 0..2 {
            let token = tokens.token().await?;
            let mut authorization =
                HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    FhirError::Auth("an access token that cannot be sent in a header".into())
                })?;
            authorization.set_sensitive(true);
            let response = build()
                .header(AUTHORIZATION, authorization)
                .send()
                .await
                .map_err(|e| FhirError::Transport(transport_reason(&e)))?;
            if response.status().as_u16() != 401 || attempt == 1 {
                return Ok(response);
            }
            tokens.invalidate().await;
        }
        Err(FhirError::Auth("no access token accepted".into()))
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET [base]/metadata`: the CapabilityStatement.
    pub async fn metadata(&self) -> Result<Value, FhirError> {
        self.get(&format!("{}/metadata", self.base)).await
    }

    /// A GET of a URL on this server (a `_history` page).
    pub async fn get(&self, url: &str) -> Result<Value, FhirError> {
        let response = self.send(|| self.http.get(url)).await?;
        answer(response).await
    }

    /// `PUT [base]/<path>` of a resource: the stored resource.
    pub async fn put(&self, path: &str, resource: &Value) -> Result<Value, FhirError> {
        let url = format!("{}/{path}", self.base);
        let body = resource.to_string();
        let response = self
            .send(|| {
                self.http
                    .put(&url)
                    .header(CONTENT_TYPE, FHIR_JSON)
                    .body(body.clone())
            })
            .await?;
        answer(response).await
    }

    /// `POST [base]` of a batch or transaction Bundle: the response Bundle.
    pub async fn bundle(&self, body: Vec<u8>) -> Result<Value, FhirError> {
        let body = bytes::Bytes::from(body);
        let response = self
            .send(|| {
                self.http
                    .post(&self.base)
                    .header(CONTENT_TYPE, FHIR_JSON)
                    .body(body.clone())
            })
            .await?;
        answer(response).await
    }
}

/// The reason of a failed request without its URL (which may carry search parameters).
fn transport_reason(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut reason = kind.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        reason = format!("{reason}: {cause}");
        source = cause.source();
    }
    reason
}

async fn answer(response: reqwest::Response) -> Result<Value, FhirError> {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now()));
    let body = response
        .bytes()
        .await
        .map_err(|e| FhirError::Transport(transport_reason(&e)))?;
    if (200..300).contains(&status) {
        return serde_json::from_slice(&body).map_err(|_| FhirError::Decode("JSON"));
    }
    let outcome = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| Outcome::parse(&v));
    Err(FhirError::Status {
        status,
        retry_after,
        outcome,
    })
}

/// Standard base64 with padding (basic authentication), without a crate for 20 lines.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = time::parse("2015-10-21T07:27:50Z").expect("now");
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:20:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn basic_credentials_are_base64() {
        assert_eq!(
            base64_encode(b"Aladdin:open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_encode(b""), "");
    }

    #[test]
    fn errors_say_whether_to_retry_without_diagnostics() {
        let busy = FhirError::Status {
            status: 429,
            retry_after: Some(Duration::from_secs(2)),
            outcome: None,
        };
        assert!(busy.is_retriable());
        let refused = FhirError::Status {
            status: 400,
            retry_after: None,
            outcome: Some(Outcome {
                severity: "error".into(),
                code: "invalid".into(),
                diagnostics: "John Doe".into(),
            }),
        };
        assert!(!refused.is_retriable());
        let locked = FhirError::Status {
            status: 400,
            retry_after: None,
            outcome: Some(Outcome {
                severity: "error".into(),
                code: "lock-error".into(),
                diagnostics: String::new(),
            }),
        };
        assert!(
            locked.is_retriable(),
            "a transient OperationOutcome is retried whatever the status"
        );
        assert_eq!(
            refused.to_string(),
            "the FHIR server answered HTTP 400 (OperationOutcome error/invalid)"
        );
    }
}
