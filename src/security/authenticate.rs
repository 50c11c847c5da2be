//! Who is calling an HTTP endpoint: the request's credentials (bearer JWT, API key, HTTP basic)
//! checked against `[auth]`, giving an [`Identity`] with its scopes.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::credentials::{ApiKeys, Users};
use super::jwks::Jwks;
use super::jwt::{Expected, Token};
use super::{Credential, Identity, Scopes};
use crate::config::AuthConfig;

struct Oidc {
    jwks: Jwks,
    issuer: String,
    audience: String,
    clock_skew_secs: i64,
}

pub struct Authenticator {
    pub realm: String,
    oidc: Option<Oidc>,
    api_keys: ApiKeys,
    users: Option<Arc<Users>>,
}

impl Authenticator {
    /// The authenticator `[auth]` describes, or `None` when it configures no credentials at all.
    pub fn from_config(config: &AuthConfig) -> anyhow::Result<Option<Authenticator>> {
        let oidc = if config.jwks.is_empty() {
            None
        } else {
            if config.issuer.is_empty() || config.audience.is_empty() {
                bail!("auth.jwks needs auth.issuer and auth.audience (tokens of any issuer or audience would pass)");
            }
            Some(Oidc {
                jwks: Jwks::new(
                    &config.jwks,
                    Duration::from_secs(config.jwks_cache_secs),
                    Duration::from_secs(config.jwks_min_refetch_secs),
                )?,
                issuer: config.issuer.clone(),
                audience: config.audience.clone(),
                clock_skew_secs: i64::try_from(config.clock_skew_secs).unwrap_or(i64::MAX / 2),
            })
        };
        let api_keys = ApiKeys::new(&config.api_keys)?;
        let users = match config.users_file.as_str() {
            "" => None,
            path => Some(Arc::new(Users::load(path).context("auth.users_file")?)),
        };
        if oidc.is_none() && api_keys.is_empty() && users.is_none() {
            return Ok(None);
        }
        Ok(Some(Authenticator {
            realm: config.realm.clone(),
            oidc,
            api_keys,
            users,
        }))
    }

    /// Whether HTTP basic is offered (so a 401 names it too).
    pub fn offers_basic(&self) -> bool {
        self.users.is_some()
    }

    /// The caller, `Ok(None)` when the request carries no credentials, `Err` with the reason when the
    /// ones it carries are not valid.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        address: Option<IpAddr>,
    ) -> Result<Option<Identity>, String> {
        let authorization = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        let api_key_header = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        let (scheme, value) = match (authorization, api_key_header) {
            (Some(header), _) => header.split_once(' ').unwrap_or((header, "")),
            (None, Some(key)) => ("ApiKey", key),
            (None, None) => return Ok(None),
        };
        let value = value.trim();
        let identity = |credential, subject: &str, scopes: Scopes, groups| Identity {
            credential,
            subject: subject.to_string(),
            scopes,
            groups,
            ..Identity::anonymous(address)
        };
        if scheme.eq_ignore_ascii_case("bearer") {
            let Some(oidc) = &self.oidc else {
                return Err("bearer tokens are not accepted".into());
            };
            let token = Token::parse(value).map_err(|e| e.to_string())?;
            let keys = oidc.jwks.keys_for(token.kid.as_deref(), token.alg).await;
            let expected = Expected {
                issuer: &oidc.issuer,
                audience: &oidc.audience,
                clock_skew_secs: oidc.clock_skew_secs,
            };
            let claims = token
                .verify(&keys)
                .and_then(|payload| payload.check(&expected, chrono::Utc::now().timestamp()))
                .map_err(|e| e.to_string())?;
            let scopes = Scopes::parse(claims.scopes.iter().map(String::as_str));
            Ok(Some(identity(
                Credential::Bearer,
                &claims.subject,
                scopes,
                claims.groups,
            )))
        } else if scheme.eq_ignore_ascii_case("apikey") {
            let (name, scopes) = self.api_keys.find(value, chrono::Utc::now())?;
            Ok(Some(identity(
                Credential::ApiKey,
                name,
                scopes.clone(),
                Vec::new(),
            )))
        } else if scheme.eq_ignore_ascii_case("basic") {
            let Some(users) = self.users.clone() else {
                return Err("basic authentication is not accepted".into());
            };
            let decoded = STANDARD
                .decode(value)
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .ok_or("malformed basic credentials")?;
            let (user, password) = decoded
                .split_once(':')
                .ok_or("malformed basic credentials")?;
            let (user, password) = (user.to_string(), password.to_string());
            // PBKDF2 is slow by design: off the async threads.
            let checked_user = user.clone();
            let scopes =
                tokio::task::spawn_blocking(move || users.verify(&checked_user, &password))
                    .await
                    .map_err(|_| "password check failed")?
                    .ok_or("wrong user name or password")?;
            Ok(Some(identity(Credential::Basic, &user, scopes, Vec::new())))
        } else {
            Err(format!("unsupported authorization scheme {scheme:?}"))
        }
    }
}

/// `dicom-gateway hash-password`: a users-file hash of the password read from standard input.
pub fn hash_password_from_stdin() -> anyhow::Result<()> {
    let mut password = String::new();
    std::io::stdin()
        .read_line(&mut password)
        .context("reading the password from standard input")?;
    let password = password.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        bail!("empty password");
    }
    let iterations = NonZeroU32::new(super::credentials::PBKDF2_ITERATIONS).expect("non-zero");
    println!(
        "{}",
        super::credentials::hash_password(password, iterations)?
    );
    Ok(())
}
