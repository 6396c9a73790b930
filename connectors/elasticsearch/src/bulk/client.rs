//! An HTTP client for one cluster: its node URLs taken in turn, basic auth, timeouts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::{Response, StatusCode};
use serde::Deserialize;

use super::error::BulkError;
use super::response::BulkResponse;
use crate::config::{ConnectionConfig, Secret, TemplateSetup};

/// What the cluster's root says about it.
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterInfo {
    #[serde(default)]
    pub cluster_name: String,
    pub version: Version,
    /// `You Know, for Search` (Elasticsearch), `The OpenSearch Project: ...` (OpenSearch).
    #[serde(default)]
    pub tagline: Option<String>,
}

/// The media types the cluster is spoken to with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `application/json` and `application/x-ndjson`: OpenSearch (which answers 406 to the
    /// vendor types) and Elasticsearch 7.
    Plain,
    /// `application/vnd.elasticsearch+json; compatible-with=8` (and `+x-ndjson` for `_bulk`):
    /// Elasticsearch 8 and 9, whose REST API compatibility keeps the 8 behaviour the sink
    /// relies on.
    Compatible8,
}

impl Dialect {
    pub const COMPAT_JSON: &'static str = "application/vnd.elasticsearch+json; compatible-with=8";
    pub const COMPAT_NDJSON: &'static str =
        "application/vnd.elasticsearch+x-ndjson; compatible-with=8";

    /// `Content-Type` of a JSON body, or of an NDJSON one (`_bulk`).
    pub fn content_type(self, ndjson: bool) -> &'static str {
        match (self, ndjson) {
            (Self::Plain, false) => "application/json",
            (Self::Plain, true) => "application/x-ndjson",
            (Self::Compatible8, false) => Self::COMPAT_JSON,
            (Self::Compatible8, true) => Self::COMPAT_NDJSON,
        }
    }

    pub fn accept(self) -> &'static str {
        match self {
            Self::Plain => "application/json",
            Self::Compatible8 => Self::COMPAT_JSON,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Version {
    pub number: String,
    /// `opensearch` on OpenSearch; absent on Elasticsearch.
    #[serde(default)]
    pub distribution: Option<String>,
}

impl ClusterInfo {
    /// Elasticsearch rather than OpenSearch (or another speaker of the API): no
    /// `distribution` other than `elasticsearch`, and no OpenSearch tagline.
    pub fn is_elasticsearch(&self) -> bool {
        let distribution = self
            .version
            .distribution
            .as_deref()
            .unwrap_or("elasticsearch");
        let tagline = self.tagline.as_deref().unwrap_or_default();
        distribution.eq_ignore_ascii_case("elasticsearch") && !tagline.contains("OpenSearch")
    }

    /// The major version, when `version.number` starts with one.
    pub fn major(&self) -> Option<u32> {
        self.version.number.split('.').next()?.trim().parse().ok()
    }

    /// How to speak to this cluster: the compatibility media types for Elasticsearch 8+.
    pub fn dialect(&self) -> Dialect {
        match self.major() {
            Some(major) if major >= 8 && self.is_elasticsearch() => Dialect::Compatible8,
            _ => Dialect::Plain,
        }
    }

    /// `elasticsearch 8.15.0`, `opensearch 2.17.1`.
    pub fn describe(&self) -> String {
        let distribution = self
            .version
            .distribution
            .as_deref()
            .unwrap_or("elasticsearch");
        format!("{distribution} {}", self.version.number)
    }
}

/// How requests authenticate.
#[derive(Debug)]
enum Credentials {
    None,
    Basic {
        user: String,
        password: Option<Secret>,
    },
    ApiKey(Secret),
}

#[derive(Debug)]
pub struct EsClient {
    http: reqwest::Client,
    urls: Vec<String>,
    next: AtomicUsize,
    credentials: Credentials,
    compression: bool,
    /// Put before the first `_bulk`.
    template: Option<TemplateSetup>,
    /// Set once what has to happen before the first `_bulk` happened: the dialect known.
    ready: tokio::sync::OnceCell<Dialect>,
}

/// A `_bulk` body gzipped (the fast level: NDJSON of similar documents compresses well even so).
fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(body);
    encoder.finish().unwrap_or_default()
}

/// A `Retry-After` in seconds (the HTTP-date form is not used by Elasticsearch or OpenSearch).
fn retry_after(response: &Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The error type and reason of a whole-request error body, without echoing anything else.
fn error_reason(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Body {
        error: serde_json::Value,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(Body { error }) => match (error.get("type"), error.get("reason")) {
            (Some(kind), Some(reason)) => format!(
                "{}: {}",
                kind.as_str().unwrap_or_default(),
                reason.as_str().unwrap_or_default()
            ),
            _ => error.as_str().unwrap_or("no reason given").to_string(),
        },
        Err(_) => "no reason given".to_string(),
    }
}

/// The certificates of a PEM file (one CA or a bundle).
fn ca_certificates(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, BulkError> {
    let pem = std::fs::read(path)
        .map_err(|e| BulkError::CaFile(format!("cannot read {}: {e}", path.display())))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        BulkError::CaFile(format!("{} is not a PEM certificate: {e}", path.display()))
    })?;
    if certificates.is_empty() {
        return Err(BulkError::CaFile(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certificates)
}

impl EsClient {
    pub fn new(config: &ConnectionConfig) -> Result<Self, BulkError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.read_timeout);
        if let Some(path) = &config.tls_ca_file {
            for certificate in ca_certificates(path)? {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder.build().map_err(BulkError::Client)?;
        Ok(Self {
            http,
            urls: config.urls.clone(),
            next: AtomicUsize::new(0),
            compression: config.compression,
            template: None,
            ready: tokio::sync::OnceCell::new(),
            credentials: match (&config.api_key, &config.username) {
                (Some(key), _) => Credentials::ApiKey(key.clone()),
                (None, Some(user)) => Credentials::Basic {
                    user: user.clone(),
                    password: config.password.clone(),
                },
                (None, None) => Credentials::None,
            },
        })
    }

    /// An index template to put before the first `_bulk`.
    pub fn with_template(mut self, template: Option<TemplateSetup>) -> Self {
        self.template = template;
        self
    }

    /// What has to happen before the first `_bulk`: the index template put. Done once; a
    /// failure is returned (retriable or not) and tried again at the next `_bulk`.
    async fn prepare(&self) -> Result<Dialect, BulkError> {
        self.ready
            .get_or_try_init(|| async {
                let dialect = match self.info().await {
                    Ok(info) => info.dialect(),
                    // The root needs a privilege (monitor) that a writer's key may lack.
                    Err(BulkError::Refused { status, .. }) => {
                        tracing::warn!(
                            status,
                            "the cluster's root is refused; speaking plain JSON"
                        );
                        Dialect::Plain
                    }
                    Err(error) => return Err(error),
                };
                if let Some(template) = &self.template {
                    self.put_template(template, dialect).await?;
                }
                Ok(dialect)
            })
            .await
            .copied()
    }

    /// `PUT _index_template/<name>`.
    async fn put_template(
        &self,
        template: &TemplateSetup,
        dialect: Dialect,
    ) -> Result<(), BulkError> {
        let url = self.url().to_string();
        let request = self
            .http
            .put(format!("{url}/_index_template/{}", template.name))
            .header(reqwest::header::CONTENT_TYPE, dialect.content_type(false))
            .header(reqwest::header::ACCEPT, dialect.accept())
            .body(template.body.to_string());
        let response =
            self.authorised(request)
                .send()
                .await
                .map_err(|source| BulkError::Unreachable {
                    url: url.clone(),
                    source,
                })?;
        Self::check(&url, response)
            .await
            .map_err(|error| match error {
                BulkError::Refused {
                    url,
                    status,
                    reason,
                } => BulkError::Refused {
                    url,
                    status,
                    reason: format!("index template {}: {reason}", template.name),
                },
                other => other,
            })?;
        tracing::info!(template = %template.name, "index template put");
        Ok(())
    }

    /// The node to ask next: requests (and so retries) go round the list.
    fn url(&self) -> &str {
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.urls.len().max(1);
        self.urls.get(at).map_or("", String::as_str)
    }

    fn authorised(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.credentials {
            Credentials::None => request,
            Credentials::Basic { user, password } => {
                request.basic_auth(user, password.as_ref().map(Secret::expose))
            }
            Credentials::ApiKey(key) => request.header(
                reqwest::header::AUTHORIZATION,
                format!("ApiKey {}", key.expose()),
            ),
        }
    }

    /// Turns a non-2xx answer into the error that says what to do next.
    async fn check(url: &str, response: Response) -> Result<Response, BulkError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(BulkError::Busy {
                url: url.to_string(),
                status: status.as_u16(),
                retry_after: retry_after(&response),
            });
        }
        let body = response.bytes().await.unwrap_or_default();
        Err(BulkError::Refused {
            url: url.to_string(),
            status: status.as_u16(),
            reason: error_reason(&body),
        })
    }

    /// `GET /` on each node in turn until one answers.
    pub async fn info(&self) -> Result<ClusterInfo, BulkError> {
        let mut last = None;
        for _ in 0..self.urls.len() {
            let url = self.url().to_string();
            let sent = self
                .authorised(self.http.get(format!("{url}/")))
                .send()
                .await;
            let answer = match sent {
                Ok(response) => Self::check(&url, response).await,
                Err(source) => Err(BulkError::Unreachable {
                    url: url.clone(),
                    source,
                }),
            };
            match answer {
                Ok(response) => {
                    let body = response
                        .bytes()
                        .await
                        .map_err(|source| BulkError::Unreachable {
                            url: url.clone(),
                            source,
                        })?;
                    return serde_json::from_slice(&body).map_err(|e| BulkError::Unreadable {
                        url,
                        reason: format!("not a cluster's root answer: {e}"),
                    });
                }
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| BulkError::Unreadable {
            url: String::new(),
            reason: "no URL configured".into(),
        }))
    }

    /// `POST /_bulk` with an NDJSON body.
    pub async fn bulk(&self, body: Vec<u8>) -> Result<BulkResponse, BulkError> {
        let dialect = self.prepare().await?;
        let url = self.url().to_string();
        let mut request = self
            .http
            .post(format!("{url}/_bulk"))
            .header(reqwest::header::CONTENT_TYPE, dialect.content_type(true))
            .header(reqwest::header::ACCEPT, dialect.accept());
        request = if self.compression {
            request
                .header(reqwest::header::CONTENT_ENCODING, "gzip")
                .body(gzip(&body))
        } else {
            request.body(body)
        };
        let unreachable = |source| BulkError::Unreachable {
            url: url.clone(),
            source,
        };
        let response = self.authorised(request).send().await.map_err(unreachable)?;
        let response = Self::check(&url, response).await?;
        let body = response.bytes().await.map_err(unreachable)?;
        serde_json::from_slice(&body).map_err(|e| BulkError::Unreadable {
            url: url.clone(),
            reason: format!("not a _bulk answer: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(root: &str) -> ClusterInfo {
        serde_json::from_str(root).expect("a root answer")
    }

    #[test]
    fn the_dialect_follows_the_distribution_and_version_of_the_root_answer() {
        let es9 = info(
            r#"{"name":"n","cluster_name":"c","version":{"number":"9.1.0","build_flavor":"default","lucene_version":"10.2.2"},"tagline":"You Know, for Search"}"#,
        );
        let es8 = info(
            r#"{"name":"n","cluster_name":"c","version":{"number":"8.15.0","build_flavor":"default","build_type":"docker"},"tagline":"You Know, for Search"}"#,
        );
        let es7 = info(
            r#"{"name":"n","cluster_name":"c","version":{"number":"7.17.24","build_flavor":"default"},"tagline":"You Know, for Search"}"#,
        );
        let os2 = info(
            r#"{"name":"n","cluster_name":"c","version":{"distribution":"opensearch","number":"2.17.1"},"tagline":"The OpenSearch Project: https://opensearch.org/"}"#,
        );
        // osmem-server's answer (trimmed).
        let osmem = info(
            r#"{"cluster_name":"osmem","name":"osmem-node","tagline":"The OpenSearch Project: https://opensearch.org/","version":{"distribution":"opensearch","number":"3.8.0"}}"#,
        );
        // OpenSearch in compatibility mode reports 7.10.2 and keeps its distribution.
        let os_compat = info(
            r#"{"cluster_name":"c","version":{"distribution":"opensearch","number":"7.10.2"},"tagline":"The OpenSearch Project: https://opensearch.org/"}"#,
        );
        // A distribution not named, but an OpenSearch tagline, is still OpenSearch.
        let os_untagged = info(
            r#"{"cluster_name":"c","version":{"number":"8.0.0"},"tagline":"The OpenSearch Project: https://opensearch.org/"}"#,
        );
        assert_eq!(es9.dialect(), Dialect::Compatible8);
        assert_eq!(es8.dialect(), Dialect::Compatible8);
        assert_eq!(es7.dialect(), Dialect::Plain);
        assert_eq!(os2.dialect(), Dialect::Plain);
        assert_eq!(osmem.dialect(), Dialect::Plain);
        assert_eq!(os_compat.dialect(), Dialect::Plain);
        assert_eq!(os_untagged.dialect(), Dialect::Plain);
        assert_eq!(es8.describe(), "elasticsearch 8.15.0");
        assert_eq!(osmem.describe(), "opensearch 3.8.0");
    }

    #[test]
    fn the_headers_of_each_dialect() {
        assert_eq!(Dialect::Plain.content_type(true), "application/x-ndjson");
        assert_eq!(Dialect::Plain.content_type(false), "application/json");
        assert_eq!(Dialect::Plain.accept(), "application/json");
        assert_eq!(
            Dialect::Compatible8.content_type(true),
            "application/vnd.elasticsearch+x-ndjson; compatible-with=8"
        );
        assert_eq!(
            Dialect::Compatible8.content_type(false),
            "application/vnd.elasticsearch+json; compatible-with=8"
        );
        assert_eq!(
            Dialect::Compatible8.accept(),
            "application/vnd.elasticsearch+json; compatible-with=8"
        );
    }
}
