//! Who is calling, and may they: every REST call but the health probes carries credentials
//! (a static bearer token, a JWT, or HTTP basic), each credential maps to a name and a role,
//! and each call needs a role ([`roles::required`]). A call without valid credentials is a 401
//! with `WWW-Authenticate`; one whose role is too low a 403, in Connect's error shape.
//!
//! A request another worker forwarded (writes go to the leader) carries, in its signed headers,
//! the caller the forwarding worker authenticated: the leader trusts that principal because
//! the session-key signature covers it, and audits the change under the original caller.

pub mod basic;
pub mod certificates;
pub mod jwt;
pub mod roles;
pub mod tokens;

use std::path::Path;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use jwt::JwtConfig;
pub use roles::Role;

use super::tls::Peer;
use super::{ApiError, RestState};

/// Whether the REST API asks for credentials (`[rest] auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Open: every caller is an anonymous admin. Only for development on a closed host.
    None,
    /// Credentials from `tokens_file`, `users_file` or `[rest.jwt]` on every call.
    Required,
}

#[derive(Debug, Error)]
pub enum AuthError {
    #[error(
        "the REST API has no authentication configured: set [rest] tokens_file, users_file, certificates_file or [rest.jwt], or set rest.auth = \"none\" to run it open (anyone who reaches it may change connectors)"
    )]
    NotConfigured,
    #[error(
        "rest.auth = \"none\" but [rest] {0} is set: remove one (an open API would ignore the credentials)"
    )]
    Conflicting(&'static str),
    #[error("REST authentication file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("REST authentication: {0}")]
    Setup(String),
    #[error(
        "[rest] certificates_file needs [rest.tls] client_ca: without it no client presents a verified certificate"
    )]
    CertificatesWithoutClientCa,
}

/// Who made a call, as the audit trail names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// How the caller proved it: `token`, `basic`, `jwt`, `certificate`, `none` (authentication off), or
    /// `worker` (a worker acting for the cluster, e.g. the leader restarting a task elsewhere).
    pub via: String,
    /// Where the call came from, as the worker that took it saw it.
    pub peer: Option<String>,
}

/// How a worker acting for the cluster authenticates: with the session key's signature.
const VIA_WORKER: &str = "worker";

impl Principal {
    /// The leader acting on its own behalf (restarting tasks that run on other workers).
    pub fn worker(worker_id: &str) -> Self {
        Self {
            name: worker_id.to_string(),
            role: Role::Admin,
            via: VIA_WORKER.into(),
            peer: None,
        }
    }

    /// Whether this is a worker acting for the cluster, not a caller it forwarded.
    pub fn is_worker(&self) -> bool {
        self.via == VIA_WORKER
    }
}

/// The worker that forwarded a request, once its signature is verified.
#[derive(Debug, Clone)]
pub struct ForwardedBy(pub String);

/// What the REST API accepts as credentials.
pub struct Authenticator {
    mode: AuthMode,
    tokens: Option<tokens::Tokens>,
    users: Option<basic::Users>,
    jwt: Option<jwt::Jwt>,
    certificates: Option<certificates::Certificates>,
    /// `/metrics` needs a viewer's credentials (a Prometheus scrape can send a bearer token).
    pub metrics_auth: bool,
}

/// The credential settings of `[rest]`, as read from the worker config.
pub struct AuthSettings<'a> {
    pub mode: Option<AuthMode>,
    pub tokens_file: Option<&'a Path>,
    pub users_file: Option<&'a Path>,
    pub jwt: Option<&'a JwtConfig>,
    pub certificates_file: Option<&'a Path>,
    /// Whether the listener asks clients for certificates (`[rest.tls] client_ca`).
    pub client_certificates: bool,
    pub metrics_auth: bool,
}

impl Authenticator {
    /// Every call allowed, as an anonymous admin (`rest.auth = "none"`).
    pub fn open() -> Self {
        Self {
            mode: AuthMode::None,
            tokens: None,
            users: None,
            jwt: None,
            certificates: None,
            metrics_auth: false,
        }
    }

    pub fn is_open(&self) -> bool {
        self.mode == AuthMode::None
    }

    /// Loads the configured credential files; refuses a config that neither configures
    /// authentication nor says `auth = "none"`.
    pub fn load(settings: AuthSettings<'_>) -> Result<Self, AuthError> {
        let configured = [
            ("tokens_file", settings.tokens_file.is_some()),
            ("users_file", settings.users_file.is_some()),
            ("[rest.jwt]", settings.jwt.is_some()),
            ("certificates_file", settings.certificates_file.is_some()),
        ];
        match settings.mode {
            Some(AuthMode::None) => {
                if let Some((name, _)) = configured.iter().find(|(_, set)| *set) {
                    return Err(AuthError::Conflicting(name));
                }
                return Ok(Self::open());
            }
            _ if !configured.iter().any(|(_, set)| *set) => return Err(AuthError::NotConfigured),
            _ => {}
        }
        if settings.certificates_file.is_some() && !settings.client_certificates {
            return Err(AuthError::CertificatesWithoutClientCa);
        }
        Ok(Self {
            mode: AuthMode::Required,
            tokens: settings.tokens_file.map(tokens::Tokens::load).transpose()?,
            users: settings.users_file.map(basic::Users::load).transpose()?,
            jwt: settings.jwt.map(jwt::Jwt::load).transpose()?,
            certificates: settings
                .certificates_file
                .map(certificates::Certificates::load)
                .transpose()?,
            metrics_auth: settings.metrics_auth,
        })
    }

    /// The caller, from the `Authorization` header, or without one from a listed client
    /// certificate; `Err` says why not (for the log only).
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        connection: Option<Peer>,
    ) -> Result<Principal, String> {
        let peer = connection.map(|c| c.addr.to_string());
        let principal = |name: String, role: Role, via: &str| Principal {
            name,
            role,
            via: via.into(),
            peer: peer.clone(),
        };
        if self.mode == AuthMode::None {
            return Ok(principal("anonymous".into(), Role::Admin, "none"));
        }
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            // Explicit credentials win; without them, the certificate of the connection.
            let listed = self
                .certificates
                .as_ref()
                .zip(connection.and_then(|c| c.certificate))
                .and_then(|(certificates, fingerprint)| certificates.check(&fingerprint));
            return match listed {
                Some((name, role)) => Ok(principal(name, role, "certificate")),
                None => Err("no credentials".into()),
            };
        };
        let value = value
            .to_str()
            .map_err(|_| "unreadable Authorization header")?;
        let (scheme, credentials) = value
            .split_once(' ')
            .ok_or("Authorization header without a scheme")?;
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            if let Some((name, role)) = self.tokens.as_ref().and_then(|t| t.check(credentials)) {
                return Ok(principal(name, role, "token"));
            }
            // A JWT is three base64url parts; anything else was meant as a static token.
            if let Some(jwt) = &self.jwt
                && credentials.split('.').count() == 3
            {
                let (name, role) = jwt.check(credentials).map_err(|e| format!("JWT: {e}"))?;
                return Ok(principal(name, role, "jwt"));
            }
            return Err("unknown bearer token".into());
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let users = self
                .users
                .as_ref()
                .ok_or("basic authentication is not configured")?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(credentials)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or("basic credentials are not base64 of UTF-8")?;
            let (user, password) = decoded
                .split_once(':')
                .ok_or("basic credentials without ':'")?;
            return match users.check(user, password).await {
                Some(role) => Ok(principal(user.to_string(), role, "basic")),
                None => Err(format!("wrong password or unknown user '{user}'")),
            };
        }
        Err(format!("unsupported authentication scheme '{scheme}'"))
    }

    /// The `WWW-Authenticate` challenges of a 401: the schemes configured.
    fn challenges(&self) -> Vec<HeaderValue> {
        let mut challenges = Vec::new();
        if self.tokens.is_some() || self.jwt.is_some() {
            challenges.push(HeaderValue::from_static("Bearer realm=\"medconnect\""));
        }
        if self.users.is_some() {
            challenges.push(HeaderValue::from_static(
                "Basic realm=\"medconnect\", charset=\"UTF-8\"",
            ));
        }
        challenges
    }
}

/// Reads a credentials file: JSON if its name ends in `.json`, else TOML.
pub(crate) fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, AuthError> {
    let failed = |reason: String| AuthError::File {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        serde_json::from_str(&text).map_err(|e| failed(e.to_string()))
    } else {
        toml::from_str(&text).map_err(|e| failed(e.to_string()))
    }
}

/// The connection a request came on.
pub fn connection_of(request: &Request) -> Option<Peer> {
    request
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|ConnectInfo(peer)| *peer)
}

/// Where a request came from (the TCP peer), as text.
pub fn peer_of(request: &Request) -> Option<String> {
    connection_of(request).map(|peer| peer.addr.to_string())
}

/// The middleware: authenticates the caller (or takes the principal a verified forwarded
/// request carries), checks the role the call needs, and hands the principal to what follows
/// (forwarding, the audit trail).
pub async fn check(State(state): State<RestState>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    if roles::is_open(&path) || (path == "/metrics" && !state.auth.metrics_auth) {
        return next.run(request).await;
    }
    let method = request.method().clone();
    let principal = match request.extensions().get::<Principal>() {
        // Put there by `forward::verify` from a request whose signature covers it.
        Some(principal) => principal.clone(),
        None => {
            let peer = peer_of(&request);
            match state
                .auth
                .authenticate(request.headers(), connection_of(&request))
                .await
            {
                Ok(principal) => principal,
                Err(reason) => {
                    tracing::warn!(%method, %path, peer = peer.as_deref().unwrap_or("unknown"), %reason, "REST call refused: not authenticated");
                    let mut response = ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "Authentication required: send valid credentials (Authorization: Bearer <token> or Basic)",
                    )
                    .into_response();
                    for challenge in state.auth.challenges() {
                        response
                            .headers_mut()
                            .append(header::WWW_AUTHENTICATE, challenge);
                    }
                    return response;
                }
            }
        }
    };
    let needed = roles::required(&method, &path);
    if principal.role < needed {
        let response = ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{} '{}' may not {method} {path}: it needs the role {} (has {})",
                principal.via,
                principal.name,
                needed.as_str(),
                principal.role.as_str()
            ),
        )
        .into_response();
        // A refused change is part of the trail too (who tried what); a refused read is not.
        if roles::change(&method, &path).is_some() {
            let forwarded_by = request.extensions().get::<ForwardedBy>().cloned();
            let query = request.uri().query().map(str::to_string);
            state
                .audit
                .record(super::audit::Entry::new(
                    &principal,
                    forwarded_by.map(|f| f.0),
                    &method,
                    &path,
                    query.as_deref(),
                    response.status(),
                    None,
                ))
                .await;
        } else {
            tracing::warn!(principal = %principal.name, role = principal.role.as_str(), %method, %path, "REST call refused: role too low");
        }
        return response;
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}
