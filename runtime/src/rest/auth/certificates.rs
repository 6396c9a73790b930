//! Client certificates as credentials (mTLS): a client whose certificate the TLS handshake
//! verified against `[rest.tls] client_ca` and whose SHA-256 fingerprint is listed here is
//! that principal, without an `Authorization` header (a service calling with its certificate
//! only). Fingerprints, not subject names: nothing to parse, and a certificate re-issued with the
//! same name is not let in until it is listed.
//!
//! ```toml
//! [[certificates]]
//! name = "deploy-pipeline"
//! role = "admin"
//! sha256 = "3F:1A:..."   # openssl x509 -in client.crt -noout -fingerprint -sha256
//! ```

use std::path::Path;

use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::tokens::decode_hex32;
use super::{AuthError, Role, read_file};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificatesFile {
    #[serde(default)]
    certificates: Vec<CertificateEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateEntry {
    name: String,
    role: Role,
    sha256: String,
}

pub struct Certificates {
    entries: Vec<([u8; 32], String, Role)>,
}

impl Certificates {
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let file: CertificatesFile = read_file(path)?;
        let mut entries = Vec::with_capacity(file.certificates.len());
        for entry in file.certificates {
            // openssl prints the fingerprint as colon-separated upper-case hex.
            let hex: String = entry.sha256.chars().filter(|c| *c != ':').collect();
            let digest = decode_hex32(&hex).ok_or_else(|| AuthError::File {
                path: path.display().to_string(),
                reason: format!(
                    "certificate '{}': sha256 must be the certificate's SHA-256 fingerprint (openssl x509 -noout -fingerprint -sha256)",
                    entry.name
                ),
            })?;
            entries.push((digest, entry.name, entry.role));
        }
        if entries.is_empty() {
            return Err(AuthError::File {
                path: path.display().to_string(),
                reason: "no [[certificates]] in it".into(),
            });
        }
        Ok(Self { entries })
    }

    /// The name and role of the certificate with this fingerprint, if it is listed.
    pub fn check(&self, fingerprint: &[u8; 32]) -> Option<(String, Role)> {
        let mut found = None;
        for (known, name, role) in &self.entries {
            if bool::from(known.ct_eq(fingerprint)) && found.is_none() {
                found = Some((name.clone(), *role));
            }
        }
        found
    }
}
