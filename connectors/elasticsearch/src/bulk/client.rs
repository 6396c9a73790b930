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
}

#[derive(Debug, Clone, Deserialize)]
pub struct Version {
    pub number: String,
    /// `opensearch` on OpenSearch; absent on Elasticsearch.
    #[serde(default)]
    pub distribution: Option<String>,
}

impl ClusterInfo {
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
    /// Set once what has to happen before the first `_bulk` happened.
    ready: tokio::sync::OnceCell<()>,
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
    async fn prepare(&self) -> Result<(), BulkError> {
        self.ready
            .get_or_try_init(|| async {
                if let Some(template) = &self.template {
                    self.put_template(template).await?;
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// `PUT _index_template/<name>`.
    async fn put_template(&self, template: &TemplateSetup) -> Result<(), BulkError> {
        let url = self.url().to_string();
        let request = self
            .http
            .put(format!("{url}/_index_template/{}", template.name))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
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
        self.prepare().await?;
        let url = self.url().to_string();
        let mut request = self
            .http
            .post(format!("{url}/_bulk"))
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson");
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
