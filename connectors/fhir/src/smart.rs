//! SMART Backend Services (client credentials with a `private_key_jwt` assertion): the
//! token endpoint from `[base]/.well-known/smart-configuration` (or configured), an assertion
//! signed RS384 or ES384 with the client's key (ring, already built for rustls), the access
//! token cached and fetched again before it expires or when the server answers 401.

use std::path::Path;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, RsaKeyPair};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::client::FhirError;
use crate::config::SmartSettings;

/// A token is fetched again this long before the server said it expires.
const EARLY: Duration = Duration::from_secs(30);
/// An assertion is valid this long (the SMART spec allows at most five minutes).
const ASSERTION_LIFETIME_S: u64 = 300;

enum Key {
    Rs384(RsaKeyPair),
    Es384(EcdsaKeyPair),
}

/// The client's private key, and the `alg` it signs with.
pub struct Signer {
    key: Key,
    rng: SystemRandom,
}

impl Signer {
    /// A PEM file with an RSA (PKCS#8 or PKCS#1) or P-384 (PKCS#8) private key.
    pub fn load(path: &Path) -> Result<Self, String> {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let der = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| format!("{}: no PEM private key ({e})", path.display()))?;
        let rng = SystemRandom::new();
        let key = match &der {
            PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der())
                .map(Key::Rs384)
                .ok(),
            PrivateKeyDer::Pkcs8(der) => RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
                .map(Key::Rs384)
                .ok()
                .or_else(|| {
                    EcdsaKeyPair::from_pkcs8(
                        &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                        der.secret_pkcs8_der(),
                        &rng,
                    )
                    .map(Key::Es384)
                    .ok()
                }),
            _ => None,
        };
        let key = key.ok_or_else(|| {
            format!(
                "{}: not an RSA or P-384 private key (PKCS#8, or PKCS#1 for RSA)",
                path.display()
            )
        })?;
        Ok(Self { key, rng })
    }

    pub fn algorithm(&self) -> &'static str {
        match self.key {
            Key::Rs384(_) => "RS384",
            Key::Es384(_) => "ES384",
        }
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        match &self.key {
            Key::Rs384(key) => {
                let mut signature = vec![0; key.public().modulus_len()];
                key.sign(
                    &signature::RSA_PKCS1_SHA384,
                    &self.rng,
                    message,
                    &mut signature,
                )
                .map_err(|_| "RSA signing failed".to_string())?;
                Ok(signature)
            }
            Key::Es384(key) => key
                .sign(&self.rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| "ECDSA signing failed".to_string()),
        }
    }

    /// A signed JWT (JWS compact serialization) of `claims`.
    pub fn jwt(&self, key_id: Option<&str>, claims: &Value) -> Result<String, String> {
        let mut header = json!({"alg": self.algorithm(), "typ": "JWT"});
        if let Some(kid) = key_id {
            header["kid"] = Value::String(kid.to_string());
        }
        let signing_input = format!(
            "{}.{}",
            base64url(header.to_string().as_bytes()),
            base64url(claims.to_string().as_bytes())
        );
        let signature = self.sign(signing_input.as_bytes())?;
        Ok(format!("{signing_input}.{}", base64url(&signature)))
    }

    fn jti(&self) -> String {
        let mut bytes = [0u8; 16];
        // SystemRandom fails only without an OS random source; a time-based id is still unique
        // enough for replay protection then.
        if self.rng.fill(&mut bytes).is_err() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            bytes = now.to_le_bytes();
        }
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Base64url without padding (JWS).
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Fetches, caches and refreshes the access token.
pub struct TokenSource {
    http: reqwest::Client,
    base: String,
    settings: SmartSettings,
    signer: Signer,
    state: Mutex<TokenState>,
}

/// The token endpoint (discovered once) and the current token with its expiry.
#[derive(Default)]
struct TokenState {
    endpoint: Option<String>,
    token: Option<(String, Instant)>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("client_id", &self.settings.client_id)
            .field("algorithm", &self.signer.algorithm())
            .finish()
    }
}

fn auth_error(status: u16, what: &str) -> FhirError {
    if crate::client::is_retriable_status(status) {
        FhirError::Transport(format!("{what} answered HTTP {status}"))
    } else {
        FhirError::Auth(format!("{what} answered HTTP {status}"))
    }
}

impl TokenSource {
    pub fn new(
        http: reqwest::Client,
        base: String,
        settings: SmartSettings,
        signer: Signer,
    ) -> Self {
        Self {
            http,
            base,
            state: Mutex::new(TokenState {
                endpoint: settings.token_url.clone(),
                token: None,
            }),
            settings,
            signer,
        }
    }

    /// The current token, fetched when there is none or it is about to expire.
    pub async fn token(&self) -> Result<String, FhirError> {
        let mut state = self.state.lock().await;
        if let Some((token, expires)) = &state.token
            && Instant::now() + EARLY < *expires
        {
            return Ok(token.clone());
        }
        let endpoint = match &state.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => {
                let endpoint = self.discover().await?;
                state.endpoint = Some(endpoint.clone());
                endpoint
            }
        };
        let (token, lifetime) = self.fetch(&endpoint).await?;
        state.token = Some((token.clone(), Instant::now() + lifetime));
        Ok(token)
    }

    /// Forgets the token (the server answered 401 to it).
    pub async fn invalidate(&self) {
        self.state.lock().await.token = None;
    }

    async fn discover(&self) -> Result<String, FhirError> {
        let url = format!("{}/.well-known/smart-configuration", self.base);
        let response = self
            .http
            .get(&url)
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(|e| FhirError::Transport(format!("SMART configuration: {e}")))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(auth_error(status, "the SMART configuration"));
        }
        let body: Value = response
            .json()
            .await
            .map_err(|_| FhirError::Decode("a SMART configuration"))?;
        body["token_endpoint"]
            .as_str()
            .map(str::to_string)
            .ok_or(FhirError::Decode(
                "a SMART configuration with a token_endpoint",
            ))
    }

    async fn fetch(&self, endpoint: &str) -> Result<(String, Duration), FhirError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = json!({
            "iss": self.settings.client_id,
            "sub": self.settings.client_id,
            "aud": endpoint,
            "exp": now + ASSERTION_LIFETIME_S,
            "iat": now,
            "jti": self.signer.jti(),
        });
        let assertion = self
            .signer
            .jwt(self.settings.key_id.as_deref(), &claims)
            .map_err(FhirError::Auth)?;
        let body = format!(
            "grant_type=client_credentials&scope={}&client_assertion_type={}&client_assertion={}",
            form_encode(&self.settings.scope),
            form_encode("urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
            form_encode(&assertion)
        );
        let response = self
            .http
            .post(endpoint)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| FhirError::Transport(format!("token endpoint: {e}")))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(auth_error(status, "the token endpoint"));
        }
        let body: Value = response
            .json()
            .await
            .map_err(|_| FhirError::Decode("a token response"))?;
        let token = body["access_token"]
            .as_str()
            .ok_or(FhirError::Decode("a token response with an access_token"))?;
        let lifetime = Duration::from_secs(body["expires_in"].as_u64().unwrap_or(300));
        tracing::debug!(client_id = %self.settings.client_id, expires_in_s = lifetime.as_secs(), "SMART access token fetched");
        Ok((token.to_string(), lifetime))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_has_no_padding_and_url_safe_characters() {
        assert_eq!(base64url(b"ab"), "YWI");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url(b"abc"), "YWJj");
    }
}
