//! SMTP accounts: who may submit mail with AUTH.
//!
//! Passwords are stored only as argon2 PHC strings. Verification costs tens of milliseconds of
//! CPU by design, so it runs on the blocking pool, never on the reactor threads.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::config::AccountConfig;

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// The configured accounts, by user name.
#[derive(Debug, Default)]
pub struct Accounts {
    hashes: HashMap<String, String>,
}

impl Accounts {
    /// Builds the table from `[[account]]` entries (already validated by `config`).
    pub fn from_config(accounts: &[AccountConfig]) -> Accounts {
        Accounts {
            hashes: accounts
                .iter()
                .map(|a| (a.username.clone(), a.password_hash.clone()))
                .collect(),
        }
    }

    /// True when no account is configured (AUTH is then not offered).
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Checks a user name and password. An unknown user costs the same as a wrong password,
    /// so timing does not reveal which user names exist.
    pub async fn verify(self: &Arc<Self>, username: &str, password: &str) -> bool {
        let this = self.clone();
        let username = username.to_string();
        let password = password.to_string();
        tokio::task::spawn_blocking(move || this.verify_blocking(&username, &password))
            .await
            .unwrap_or(false)
    }

    fn verify_blocking(&self, username: &str, password: &str) -> bool {
        let (hash, known) = match self.hashes.get(username) {
            Some(h) => (h.as_str(), true),
            None => (DUMMY_HASH, false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        ok && known
    }
}

/// argon2id of a random string, with the default parameters: burnt for unknown users.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0CtxhiR3+SJEtPaPHzcnU8/S2nk5Ob6YgZ0HQNZ4U1I";

/// Hashes a password for `[[account]]` (argon2id, default parameters, random salt).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    crate::crypto::random_bytes(&mut salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verifies_only_the_right_password_of_a_known_user() {
        let hash = hash_password("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let accounts = Arc::new(Accounts::from_config(&[AccountConfig {
            username: "app".into(),
            password_hash: hash,
        }]));
        assert!(accounts.verify("app", "s3cret").await);
        assert!(!accounts.verify("app", "s3cret ").await);
        assert!(!accounts.verify("other", "s3cret").await);
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }

    /// User enumeration by timing: a login for a name that does not exist must cost what a
    /// wrong password for a real one costs (the dummy hash is verified in its place). Samples
    /// alternate and medians are compared, with bounds wide enough for a busy machine: skipping
    /// the hash makes the unknown user thousands of times cheaper, far outside them.
    #[test]
    fn an_unknown_user_costs_about_what_a_wrong_password_costs() {
        let accounts = Accounts::from_config(&[AccountConfig {
            username: "app".into(),
            password_hash: hash_password("s3cret").unwrap(),
        }]);
        let time = |user: &str| {
            let start = std::time::Instant::now();
            assert!(!accounts.verify_blocking(user, "wrong"));
            start.elapsed()
        };
        let (mut known, mut unknown) = (Vec::new(), Vec::new());
        for _ in 0..7 {
            known.push(time("app"));
            unknown.push(time("nobody"));
        }
        known.sort();
        unknown.sort();
        let ratio = unknown[3].as_secs_f64() / known[3].as_secs_f64();
        assert!(
            (0.33..3.0).contains(&ratio),
            "unknown user {:?} vs wrong password {:?} (median)",
            unknown[3],
            known[3]
        );
    }
}
