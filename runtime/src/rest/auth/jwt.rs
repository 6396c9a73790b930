//! JWT bearer tokens from an identity provider, checked against its public keys (a JWKS file):
//! signature, issuer, audience and expiry; the caller's role is a claim.
//!
//! Only asymmetric algorithms are taken (RS*, PS*, ES256/384, EdDSA): with a shared secret
//! anyone who can check a token could also make one.

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use super::{AuthError, Role};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The identity provider's public keys (`{"keys": [...]}`), e.g. saved from its
    /// `/.well-known/jwks.json` (read at start-up).
    pub jwks_file: PathBuf,
    /// The `iss` every token must carry.
    pub issuer: String,
    /// The `aud` every token must carry (one of them).
    pub audience: String,
    /// The claim holding the role (`viewer`, `operator`, `admin`): a string, or a list of
    /// which the highest known role counts.
    #[serde(default = "default_role_claim")]
    pub role_claim: String,
    /// The claim naming the caller in the audit trail.
    #[serde(default = "default_name_claim")]
    pub name_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
}

fn default_role_claim() -> String {
    "medconnect_role".into()
}
fn default_name_claim() -> String {
    "sub".into()
}
fn default_leeway() -> u64 {
    30
}

const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

pub struct Jwt {
    config: JwtConfig,
    keys: JwkSet,
}

impl Jwt {
    pub fn load(config: &JwtConfig) -> Result<Self, AuthError> {
        let path: &Path = &config.jwks_file;
        let text = std::fs::read_to_string(path).map_err(|e| AuthError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let keys: JwkSet = serde_json::from_str(&text).map_err(|e| AuthError::File {
            path: path.display().to_string(),
            reason: format!("not a JWKS ({{\"keys\": [...]}}): {e}"),
        })?;
        if keys.keys.is_empty() {
            return Err(AuthError::File {
                path: path.display().to_string(),
                reason: "the JWKS holds no key".into(),
            });
        }
        Ok(Self {
            config: config.clone(),
            keys,
        })
    }

    /// The caller's name and role, or why the token is refused (said to the log, not to the
    /// caller).
    pub fn check(&self, token: &str) -> Result<(String, Role), String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        if !ASYMMETRIC.contains(&header.alg) {
            return Err(format!("algorithm {:?} is not taken", header.alg));
        }
        let jwk = match &header.kid {
            Some(kid) => self.keys.find(kid),
            // Without a key id, only a JWKS of one key is unambiguous.
            None if self.keys.keys.len() == 1 => self.keys.keys.first(),
            None => None,
        }
        .ok_or("no key of the JWKS matches the token's kid")?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.config.leeway_s;
        let claims = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| e.to_string())?
            .claims;
        let name = claims
            .get(&self.config.name_claim)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("no '{}' claim", self.config.name_claim))?
            .to_string();
        let role = match claims.get(&self.config.role_claim) {
            Some(Value::String(role)) => Role::parse(role),
            Some(Value::Array(roles)) => roles
                .iter()
                .filter_map(|r| r.as_str().and_then(Role::parse))
                .max(),
            _ => None,
        }
        .ok_or_else(|| format!("no known role in the '{}' claim", self.config.role_claim))?;
        Ok((name, role))
    }
}
