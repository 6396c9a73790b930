//! Device credentials: `username:password` entries, compared without revealing by timing how
//! much of a password matched. Secrets never appear in `Debug`.

use std::collections::HashMap;

#[derive(Clone, Default)]
pub struct Users(HashMap<String, Vec<u8>>);

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.0.keys().collect();
        names.sort();
        f.debug_struct("Users")
            .field("usernames", &names)
            .field("passwords", &"[hidden]")
            .finish()
    }
}

/// The outcome of a CONNECT's credentials.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Accepted,
    /// A username and password that do not match an entry.
    BadCredentials,
    /// No username, and anonymous devices are not allowed.
    NotAuthorized,
}

impl Users {
    /// Entries separated by newlines or commas; blank ones and `#` comments are skipped. The
    /// error never quotes an entry (it holds a password).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut users = HashMap::new();
        for (index, entry) in text
            .split(['\n', ','])
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with('#'))
            .enumerate()
        {
            let Some((name, password)) = entry.split_once(':') else {
                return Err(format!("entry {} is not username:password", index + 1));
            };
            if name.is_empty() || password.is_empty() {
                return Err(format!(
                    "entry {} has an empty username or password",
                    index + 1
                ));
            }
            users.insert(name.to_string(), password.as_bytes().to_vec());
        }
        Ok(Self(users))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn check(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
        allow_anonymous: bool,
    ) -> Admission {
        let Some(username) = username.filter(|u| !u.is_empty()) else {
            return if allow_anonymous {
                Admission::Accepted
            } else {
                Admission::NotAuthorized
            };
        };
        let given = password.unwrap_or_default();
        match self.0.get(username) {
            Some(expected) if constant_time_eq(expected, given) => Admission::Accepted,
            _ => Admission::BadCredentials,
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut difference = a.len() ^ b.len();
    for (index, byte) in a.iter().enumerate() {
        difference |= usize::from(byte ^ b.get(index).copied().unwrap_or_default());
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_credentials() {
        let users = Users::parse("pump-3:s3cret, # comment\n monitor-7:x").unwrap();
        assert_eq!(
            users.check(Some("pump-3"), Some(b"s3cret"), false),
            Admission::Accepted
        );
        assert_eq!(
            users.check(Some("pump-3"), Some(b"s3cre"), false),
            Admission::BadCredentials
        );
        assert_eq!(
            users.check(Some("pump-3"), Some(b"s3cretX"), false),
            Admission::BadCredentials
        );
        assert_eq!(
            users.check(Some("nobody"), Some(b"x"), true),
            Admission::BadCredentials
        );
        assert_eq!(users.check(None, None, false), Admission::NotAuthorized);
        assert_eq!(users.check(None, None, true), Admission::Accepted);
        assert!(!format!("{users:?}").contains("s3cret"));
        let error = Users::parse("a:b,secret-without-colon").unwrap_err();
        assert!(!error.contains("secret"), "{error}");
    }
}
