//! HTTP basic authentication against a users file of Argon2id password hashes (PHC strings,
//! as `medconnect hash-password` prints them).
//!
//! ```toml
//! [[users]]
//! name = "alice"
//! role = "operator"
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."
//! ```
//!
//! Argon2 is slow on purpose (tens of ms); a client sending basic credentials on every call
//! would pay that each time, so a successful check is remembered for the process's life as a
//! keyed SHA-256 of user and password (the key is random per process; the password itself is
//! never kept).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::{Argon2, PasswordHasher};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{AuthError, Role, read_file};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    users: Vec<UserEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    role: Role,
    password_hash: String,
}

/// Checks remembered at most; past it the memory starts again (a client guessing passwords
/// adds nothing to it: only successes are remembered).
const REMEMBERED: usize = 4096;

pub struct Users {
    users: HashMap<String, (String, Role)>,
    /// A hash checked when the user is unknown, so an unknown name costs what a wrong
    /// password costs (no telling which names exist by timing).
    decoy: String,
    cache_key: [u8; 32],
    verified: Mutex<HashSet<[u8; 32]>>,
}

impl Users {
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let file: UsersFile = read_file(path)?;
        let mut users = HashMap::new();
        for user in file.users {
            PasswordHash::new(&user.password_hash).map_err(|e| AuthError::File {
                path: path.display().to_string(),
                reason: format!(
                    "user '{}': password_hash is not a PHC string ({e}); make one with `medconnect hash-password`",
                    user.name
                ),
            })?;
            users.insert(user.name, (user.password_hash, user.role));
        }
        if users.is_empty() {
            return Err(AuthError::File {
                path: path.display().to_string(),
                reason: "no [[users]] in it".into(),
            });
        }
        // Its password does not matter: no user maps to it, so it never lets anyone in.
        let decoy = hash_password("decoy").map_err(|e| AuthError::Setup(e.to_string()))?;
        Ok(Self {
            users,
            decoy,
            cache_key: rand::random(),
            verified: Mutex::new(HashSet::new()),
        })
    }

    fn remembered_as(&self, user: &str, password: &str) -> [u8; 32] {
        let mut digest = Sha256::new();
        digest.update(self.cache_key);
        digest.update((user.len() as u64).to_be_bytes());
        digest.update(user.as_bytes());
        digest.update(password.as_bytes());
        digest.finalize().into()
    }

    /// The user's role if the password is theirs. Runs Argon2 off the async threads.
    pub async fn check(&self, user: &str, password: &str) -> Option<Role> {
        let (hash, role) = match self.users.get(user) {
            Some((hash, role)) => (hash.clone(), Some(*role)),
            None => (self.decoy.clone(), None),
        };
        let remembered = self.remembered_as(user, password);
        if role.is_some()
            && self
                .verified
                .lock()
                .is_ok_and(|verified| verified.contains(&remembered))
        {
            return role;
        }
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || verify_password(&hash, &password))
            .await
            .unwrap_or(false);
        let role = role.filter(|_| ok)?;
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= REMEMBERED {
                verified.clear();
            }
            verified.insert(remembered);
        }
        Some(role)
    }
}

fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|hash| {
        Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok()
    })
}

/// An Argon2id PHC string for `password` (the default parameters: OWASP's m=19 MiB, t=2).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = argon2::password_hash::SaltString::encode_b64(&salt_bytes)?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_password_checks_against_its_hash_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        let hash = hash_password("correct horse").unwrap();
        std::fs::write(
            &path,
            format!("[[users]]\nname = \"alice\"\nrole = \"admin\"\npassword_hash = \"{hash}\"\n"),
        )
        .unwrap();
        let users = Users::load(&path).unwrap();
        assert_eq!(
            users.check("alice", "correct horse").await,
            Some(Role::Admin)
        );
        // Again, from the memory of successes.
        assert_eq!(
            users.check("alice", "correct horse").await,
            Some(Role::Admin)
        );
        assert_eq!(users.check("alice", "correct horse ").await, None);
        assert_eq!(users.check("bob", "correct horse").await, None);
    }
}
