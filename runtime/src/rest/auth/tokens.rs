//! Static bearer tokens from a file. The file holds the SHA-256 of each token, never the
//! token: a leaked file (a Kubernetes secret read by the wrong pod, a backup) gives no
//! credential. Tokens are long random strings, so a fast hash is enough (unlike passwords).
//!
//! ```toml
//! [[tokens]]
//! name = "ci-deployer"       # shown in the audit trail
//! role = "admin"             # viewer | operator | admin
//! sha256 = "9f86d081..."     # printf %s "$TOKEN" | sha256sum
//! ```

use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{AuthError, Role, read_file};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    role: Role,
    sha256: String,
}

/// The known tokens' digests, each with its name and role.
pub struct Tokens {
    entries: Vec<([u8; 32], String, Role)>,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let file: TokensFile = read_file(path)?;
        let mut entries = Vec::with_capacity(file.tokens.len());
        for token in file.tokens {
            let digest = decode_hex32(&token.sha256).ok_or_else(|| AuthError::File {
                path: path.display().to_string(),
                reason: format!(
                    "token '{}': sha256 must be 64 hex digits (printf %s \"$TOKEN\" | sha256sum)",
                    token.name
                ),
            })?;
            entries.push((digest, token.name, token.role));
        }
        if entries.is_empty() {
            return Err(AuthError::File {
                path: path.display().to_string(),
                reason: "no [[tokens]] in it".into(),
            });
        }
        Ok(Self { entries })
    }

    /// The name and role of `token`, if it is one of ours. Every entry is compared, in
    /// constant time, so the time taken says nothing about which one matched.
    pub fn check(&self, token: &str) -> Option<(String, Role)> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (known, name, role) in &self.entries {
            if bool::from(known.ct_eq(&digest)) && found.is_none() {
                found = Some((name.clone(), *role));
            }
        }
        found
    }
}

pub(super) fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_known_by_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let digest: String = Sha256::digest(b"s3cret-token")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(
            &path,
            format!("[[tokens]]\nname = \"ci\"\nrole = \"operator\"\nsha256 = \"{digest}\"\n"),
        )
        .unwrap();
        let tokens = Tokens::load(&path).unwrap();
        assert_eq!(
            tokens.check("s3cret-token"),
            Some(("ci".to_string(), Role::Operator))
        );
        assert_eq!(tokens.check("s3cret-token "), None);
        assert_eq!(tokens.check(""), None);
    }
}
