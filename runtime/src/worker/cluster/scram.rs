//! The client side of SASL SCRAM (RFC 5802, with SHA-256 and SHA-512 as Kafka offers them,
//! KIP-84) and of SASL PLAIN (RFC 4616), for the group coordinator connection. Pure functions
//! over the exchanged messages; the coordinator sends them in SaslAuthenticate requests.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};

/// Why an exchange failed. Never holds the password or anything derived from it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("the server's SCRAM message is malformed: {0}")]
    Malformed(&'static str),
    #[error("the server's nonce does not extend ours")]
    Nonce,
    #[error("the server asks for {0} iterations (at least 4096 expected)")]
    Iterations(u32),
    #[error("the server answered with error {0}")]
    Server(String),
    #[error("the server's signature is wrong: it does not know the password")]
    ServerSignature,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScramHash {
    Sha256,
    Sha512,
}

impl ScramHash {
    pub fn mechanism(self) -> &'static str {
        match self {
            Self::Sha256 => "SCRAM-SHA-256",
            Self::Sha512 => "SCRAM-SHA-512",
        }
    }

    fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        fn mac<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
            // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
            let Ok(mut mac) = <M as hmac::digest::KeyInit>::new_from_slice(key) else {
                return Vec::new();
            };
            for part in parts {
                mac.update(part);
            }
            mac.finalize().into_bytes().to_vec()
        }
        match self {
            Self::Sha256 => mac::<Hmac<Sha256>>(key, parts),
            Self::Sha512 => mac::<Hmac<Sha512>>(key, parts),
        }
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha256 => Sha256::digest(data).to_vec(),
            Self::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    /// `Hi(password, salt, i)`: PBKDF2 with this HMAC, one block.
    fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        let mut u = self.hmac(password, &[salt, &1u32.to_be_bytes()]);
        let mut result = u.clone();
        for _ in 1..iterations {
            u = self.hmac(password, &[&u]);
            for (r, x) in result.iter_mut().zip(&u) {
                *r ^= x;
            }
        }
        result
    }
}

/// PLAIN's one message: no authorisation identity, the user name and the password.
pub fn plain_message(username: &str, password: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(username.len() + password.len() + 2);
    message.push(0);
    message.extend_from_slice(username.as_bytes());
    message.push(0);
    message.extend_from_slice(password.as_bytes());
    message
}

/// One SCRAM exchange: `first`, then `reply` to the server's first message, then `verify` the
/// server's final message.
pub struct ScramClient {
    hash: ScramHash,
    nonce: String,
    client_first_bare: String,
    /// Kept until the server's final message is checked.
    server_signature: Option<Vec<u8>>,
}

impl ScramClient {
    pub fn new(hash: ScramHash, username: &str, nonce: String) -> Self {
        // RFC 5802 5.1: `=` and `,` in a name are escaped.
        let name = username.replace('=', "=3D").replace(',', "=2C");
        Self {
            hash,
            client_first_bare: format!("n={name},r={nonce}"),
            nonce,
            server_signature: None,
        }
    }

    /// A fresh random nonce (24 bytes, base64).
    pub fn random_nonce() -> String {
        let bytes: [u8; 24] = rand::random();
        STANDARD.encode(bytes)
    }

    /// The client-first message (no channel binding, no authorisation identity).
    pub fn first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// The client-final message answering the server-first message.
    pub fn reply(&mut self, password: &str, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let server_first =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attribute in server_first.split(',') {
            match attribute.split_once('=') {
                Some(("r", value)) => nonce = Some(value),
                Some(("s", value)) => salt = Some(value),
                Some(("i", value)) => iterations = Some(value),
                Some(("e", value)) => return Err(ScramError::Server(value.to_string())),
                _ => {}
            }
        }
        let nonce = nonce.ok_or(ScramError::Malformed("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salt = STANDARD
            .decode(salt.ok_or(ScramError::Malformed("no salt"))?)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        let iterations: u32 = iterations
            .ok_or(ScramError::Malformed("no iteration count"))?
            .parse()
            .map_err(|_| ScramError::Malformed("iteration count is not a number"))?;
        // Kafka's minimum; a server asking for fewer would make the proof cheap to attack.
        if iterations < 4096 {
            return Err(ScramError::Iterations(iterations));
        }
        let hash = self.hash;
        let salted = hash.salted_password(password.as_bytes(), &salt, iterations);
        let client_key = hash.hmac(&salted, &[b"Client Key"]);
        let stored_key = hash.hash(&client_key);
        // `biws` is base64 of `n,,`: the GS2 header of the first message.
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = hash.hmac(&stored_key, &[auth_message.as_bytes()]);
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hash.hmac(&salted, &[b"Server Key"]);
        self.server_signature = Some(hash.hmac(&server_key, &[auth_message.as_bytes()]));
        Ok(format!("{without_proof},p={}", STANDARD.encode(proof)).into_bytes())
    }

    /// Checks the server-final message: the server proves it knew the password too.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let server_final =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if let Some(error) = server_final.strip_prefix("e=") {
            return Err(ScramError::Server(error.to_string()));
        }
        let signature = server_final
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .ok_or(ScramError::Malformed("no verifier"))?;
        let signature = STANDARD
            .decode(signature)
            .map_err(|_| ScramError::Malformed("verifier is not base64"))?;
        match &self.server_signature {
            Some(expected) if *expected == signature => Ok(()),
            _ => Err(ScramError::ServerSignature),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3: the SCRAM-SHA-256 exchange of user `user`, password `pencil`.
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";

    fn rfc7677() -> ScramClient {
        ScramClient::new(ScramHash::Sha256, "user", "rOprNGfwEbeRWgbNEkqO".into())
    }

    #[test]
    fn sha256_exchange_matches_rfc_7677() {
        let mut client = rfc7677();
        assert_eq!(client.first(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let reply = client.reply("pencil", SERVER_FIRST.as_bytes());
        assert_eq!(
            String::from_utf8(reply.unwrap_or_default()).unwrap_or_default(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(
            client.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Ok(())
        );
    }

    #[test]
    fn a_server_without_the_password_is_caught() {
        let mut client = rfc7677();
        assert!(client.reply("pencil", SERVER_FIRST.as_bytes()).is_ok());
        assert_eq!(
            client.verify(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(ScramError::ServerSignature)
        );
    }

    #[test]
    fn a_foreign_nonce_or_few_iterations_are_refused() {
        let mut client = rfc7677();
        assert_eq!(
            client.reply("pencil", b"r=other,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"),
            Err(ScramError::Nonce)
        );
        assert_eq!(
            client.reply(
                "pencil",
                b"r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1"
            ),
            Err(ScramError::Iterations(1))
        );
        assert_eq!(
            client.reply("pencil", b"e=unknown-user"),
            Err(ScramError::Server("unknown-user".into()))
        );
    }

    #[test]
    fn names_are_escaped_and_plain_is_nul_separated() {
        let client = ScramClient::new(ScramHash::Sha512, "a=b,c", "n".into());
        assert_eq!(client.first(), b"n,,n=a=3Db=2Cc,r=n");
        assert_eq!(plain_message("u", "p"), b"\0u\0p");
    }
}
