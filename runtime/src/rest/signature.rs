//! Requests between workers are signed (Kafka Connect's KIP-507): the leader hands every member
//! a fresh random session key in each generation's assignment, a worker forwarding a request
//! signs it with HMAC-SHA256 under that key, and the receiver refuses a request that claims to
//! be forwarded without a valid signature (403). Only members of the current generation hold
//! the key; it is never logged or shown. The signature covers the caller the forwarding worker
//! authenticated (its principal header), so the receiver can trust who asked without seeing
//! the caller's credentials.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;

/// The signature of a forwarded request, hex.
pub const SIGNATURE: &str = "x-medconnect-signature";

/// The cluster's session key for one generation.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SessionKey(Vec<u8>);

impl SessionKey {
    pub fn random() -> Self {
        Self(rand::random::<[u8; 32]>().to_vec())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn mac(
        &self,
        method: &str,
        path: &str,
        forwarded_by: &str,
        principal: &str,
        body: &[u8],
    ) -> Option<Hmac<Sha256>> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).ok()?;
        for part in [
            method.as_bytes(),
            path.as_bytes(),
            forwarded_by.as_bytes(),
            principal.as_bytes(),
        ] {
            mac.update(part);
            mac.update(b"\n");
        }
        mac.update(body);
        Some(mac)
    }

    /// The hex signature of a request.
    pub fn sign(
        &self,
        method: &str,
        path: &str,
        forwarded_by: &str,
        principal: &str,
        body: &[u8],
    ) -> String {
        self.mac(method, path, forwarded_by, principal, body)
            .map(|mac| hex(&mac.finalize().into_bytes()))
            .unwrap_or_default()
    }

    /// Whether `signature` signs the request under this key (compared in constant time).
    pub fn verify(
        &self,
        method: &str,
        path: &str,
        forwarded_by: &str,
        principal: &str,
        body: &[u8],
        signature: &str,
    ) -> bool {
        match (
            self.mac(method, path, forwarded_by, principal, body),
            unhex(signature),
        ) {
            (Some(mac), Some(signature)) if !self.is_empty() => {
                mac.verify_slice(&signature).is_ok()
            }
            _ => false,
        }
    }
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey([hidden])")
    }
}

impl Serialize for SessionKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for SessionKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        unhex(&text)
            .map(Self)
            .ok_or_else(|| serde::de::Error::custom("a session key is hex"))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_request_and_key_only() {
        let key = SessionKey::random();
        let signature = key.sign("POST", "/connectors", "w2", "alice", b"{}");
        assert!(key.verify("POST", "/connectors", "w2", "alice", b"{}", &signature));
        assert!(!key.verify("POST", "/connectors", "w2", "alice", b"{ }", &signature));
        assert!(!key.verify("PUT", "/connectors", "w2", "alice", b"{}", &signature));
        assert!(!key.verify("POST", "/connectors", "w3", "alice", b"{}", &signature));
        // Another caller named in the same request breaks the signature.
        assert!(!key.verify("POST", "/connectors", "w2", "mallory", b"{}", &signature));
        assert!(!SessionKey::random().verify(
            "POST",
            "/connectors",
            "w2",
            "alice",
            b"{}",
            &signature
        ));
        assert!(!SessionKey::default().verify("POST", "/connectors", "w2", "alice", b"{}", ""));
        assert!(!key.verify("POST", "/connectors", "w2", "alice", b"{}", "zz"));
    }

    #[test]
    fn the_key_is_never_printed() {
        assert_eq!(
            format!("{:?}", SessionKey::random()),
            "SessionKey([hidden])"
        );
    }
}
