//! Credentials the gateway keeps itself: API keys (`[[auth.api_keys]]`, stored as the SHA-256 of the
//! key) and HTTP basic users (`[auth] users_file`, one `user:hash:scopes` line each, the password hashed
//! with PBKDF2-HMAC-SHA256 and a random salt; `dicom-gateway hash-password` makes the hash).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aws_lc_rs::{constant_time, digest, pbkdf2, rand};
use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};

use super::Scopes;
use crate::config::ApiKeyConfig;

/// PBKDF2 iterations of new password hashes (OWASP's figure for PBKDF2-HMAC-SHA256).
pub const PBKDF2_ITERATIONS: u32 = 600_000;
const HASH_PREFIX: &str = "$pbkdf2-sha256$";
/// How long a verified basic password is remembered, so that a client sending it with every request
/// does not pay for PBKDF2 each time.
const BASIC_CACHE: Duration = Duration::from_secs(300);

struct ApiKey {
    name: String,
    sha256: Vec<u8>,
    scopes: Scopes,
    expires: Option<DateTime<Utc>>,
}

pub struct ApiKeys(Vec<ApiKey>);

impl ApiKeys {
    pub fn new(config: &[ApiKeyConfig]) -> anyhow::Result<ApiKeys> {
        let keys = config
            .iter()
            .map(|key| {
                let sha256 = hex(&key.sha256)
                    .filter(|h| h.len() == 32)
                    .with_context(|| {
                        format!("auth.api_keys {:?}: sha256 must be 64 hex digits", key.name)
                    })?;
                let expires = match key.expires.as_str() {
                    "" => None,
                    text => Some(
                        DateTime::parse_from_rfc3339(text)
                            .with_context(|| {
                                format!("auth.api_keys {:?}: expires is not RFC 3339", key.name)
                            })?
                            .with_timezone(&Utc),
                    ),
                };
                Ok(ApiKey {
                    name: key.name.clone(),
                    sha256,
                    scopes: Scopes::parse(key.scopes.iter().map(String::as_str)),
                    expires,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(ApiKeys(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name and scopes of `presented`, unless it is unknown or expired.
    pub fn find(
        &self,
        presented: &str,
        now: DateTime<Utc>,
    ) -> Result<(&str, &Scopes), &'static str> {
        let hash = digest::digest(&digest::SHA256, presented.as_bytes());
        let key = self
            .0
            .iter()
            .find(|key| constant_time::verify_slices_are_equal(&key.sha256, hash.as_ref()).is_ok())
            .ok_or("unknown API key")?;
        if key.expires.is_some_and(|expires| expires <= now) {
            return Err("API key expired");
        }
        Ok((&key.name, &key.scopes))
    }
}

struct User {
    iterations: NonZeroU32,
    salt: Vec<u8>,
    hash: Vec<u8>,
    scopes: Scopes,
}

/// The basic-auth users, read once at start.
pub struct Users {
    users: HashMap<String, User>,
    /// User -> SHA-256 of the password last verified, and when.
    verified: Mutex<HashMap<String, (digest::Digest, Instant)>>,
}

impl Users {
    pub fn load(path: &str) -> anyhow::Result<Users> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let mut users = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.splitn(3, ':');
            let (Some(name), Some(hash), scopes) = (fields.next(), fields.next(), fields.next())
            else {
                bail!("{path} line {}: expected user:hash:scopes", number + 1);
            };
            let (iterations, salt, hash) = parse_hash(hash)
                .with_context(|| format!("{path} line {}: not a {HASH_PREFIX} hash", number + 1))?;
            let scopes = scopes
                .unwrap_or("")
                .split([' ', ','])
                .filter(|s| !s.is_empty());
            users.insert(
                name.to_string(),
                User {
                    iterations,
                    salt,
                    hash,
                    scopes: Scopes::parse(scopes),
                },
            );
        }
        Ok(Users {
            users,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// The scopes of `user` if `password` is theirs. Runs PBKDF2 (call it off the async threads).
    pub fn verify(&self, user: &str, password: &str) -> Option<Scopes> {
        let entry = self.users.get(user)?;
        let presented = digest::digest(&digest::SHA256, password.as_bytes());
        let remembered = self
            .verified
            .lock()
            .unwrap()
            .get(user)
            .is_some_and(|(known, at)| {
                at.elapsed() < BASIC_CACHE
                    && constant_time::verify_slices_are_equal(known.as_ref(), presented.as_ref())
                        .is_ok()
            });
        if !remembered {
            pbkdf2::verify(
                pbkdf2::PBKDF2_HMAC_SHA256,
                entry.iterations,
                &entry.salt,
                password.as_bytes(),
                &entry.hash,
            )
            .ok()?;
            self.verified
                .lock()
                .unwrap()
                .insert(user.to_string(), (presented, Instant::now()));
        }
        Some(entry.scopes.clone())
    }
}

/// A users-file hash of `password`: `$pbkdf2-sha256$<iterations>$<salt>$<hash>` (base64, no padding).
pub fn hash_password(password: &str, iterations: NonZeroU32) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    rand::fill(&mut salt).map_err(|_| anyhow::anyhow!("no random bytes"))?;
    let mut hash = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        &salt,
        password.as_bytes(),
        &mut hash,
    );
    Ok(format!(
        "{HASH_PREFIX}{iterations}${}${}",
        STANDARD_NO_PAD.encode(salt),
        STANDARD_NO_PAD.encode(hash)
    ))
}

fn parse_hash(text: &str) -> Option<(NonZeroU32, Vec<u8>, Vec<u8>)> {
    let mut parts = text.strip_prefix(HASH_PREFIX)?.split('$');
    let iterations = parts.next()?.parse().ok()?;
    let salt = STANDARD_NO_PAD.decode(parts.next()?).ok()?;
    let hash = STANDARD_NO_PAD.decode(parts.next()?).ok()?;
    (parts.next().is_none() && !hash.is_empty()).then_some((iterations, salt, hash))
}

fn hex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
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
    use crate::security::Action;

    #[test]
    fn api_key_found_by_its_hash_until_it_expires() {
        // sha256("secret-key")
        let sha256 = digest::digest(&digest::SHA256, b"secret-key")
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let keys = ApiKeys::new(&[ApiKeyConfig {
            name: "robot".into(),
            sha256,
            scopes: vec!["store".into()],
            expires: "2030-01-01T00:00:00Z".into(),
        }])
        .unwrap();
        let now = Utc::now();
        let (name, scopes) = keys.find("secret-key", now).unwrap();
        assert_eq!(name, "robot");
        assert!(scopes.allows(Action::Store, None));
        assert!(keys.find("other-key", now).is_err());
        let later = DateTime::parse_from_rfc3339("2031-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            keys.find("secret-key", later).err(),
            Some("API key expired")
        );
    }

    #[test]
    fn users_file_entry_made_by_hash_password_verifies() {
        let hash = hash_password("correct horse", NonZeroU32::new(1000).unwrap()).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), format!("# users\nalice:{hash}:read search\n")).unwrap();
        let users = Users::load(file.path().to_str().unwrap()).unwrap();
        let scopes = users.verify("alice", "correct horse").unwrap();
        assert!(scopes.allows(Action::Search, None) && !scopes.allows(Action::Store, None));
        assert!(users.verify("alice", "wrong").is_none());
        assert!(users.verify("bob", "correct horse").is_none());
        // Remembered now, and still only for the right password.
        assert!(users.verify("alice", "correct horse").is_some());
        assert!(users.verify("alice", "wrong").is_none());
    }
}
