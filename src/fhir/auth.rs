//! Authentication to the EHR's FHIR server: none, a static bearer token, or OAuth 2.0 client
//! credentials (SMART Backend Services style: client secret by HTTP Basic, or a private-key JWT
//! assertion, RFC 7523), the token cached and refreshed before it expires.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, RsaKeyPair};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hyper::Method;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::http::{form, Client};
use crate::config::FhirAuthConfig;

/// The key that signs client assertions.
enum SigningKey {
    Rs384(RsaKeyPair),
    Es384(EcdsaKeyPair),
}

pub struct Auth {
    config: FhirAuthConfig,
    client: Client,
    key: Option<SigningKey>,
    token: Mutex<Option<(String, Instant)>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The DER bytes and label of the first PEM block of `pem`.
fn pem_block(pem: &str) -> anyhow::Result<(String, Vec<u8>)> {
    let begin = pem.find("-----BEGIN ").context("no PEM block")?;
    let rest = &pem[begin + 11..];
    let label_end = rest.find("-----").context("malformed PEM header")?;
    let label = rest[..label_end].to_string();
    let body_start = label_end + 5;
    let end = rest.find("-----END ").context("no PEM end line")?;
    let b64: String = rest[body_start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    Ok((
        label,
        STANDARD.decode(b64).context("PEM body is not base64")?,
    ))
}

fn load_key(path: &str, alg: &str) -> anyhow::Result<SigningKey> {
    let pem = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let (label, der) = pem_block(&pem).with_context(|| format!("reading {path}"))?;
    let key = match (alg, label.as_str()) {
        ("ES384", "PRIVATE KEY") => SigningKey::Es384(
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &der)
                .map_err(|e| anyhow!("{path}: not a P-384 key: {e}"))?,
        ),
        ("ES384", "EC PRIVATE KEY") => SigningKey::Es384(
            EcdsaKeyPair::from_private_key_der(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &der)
                .map_err(|e| anyhow!("{path}: not a P-384 key: {e}"))?,
        ),
        (_, "PRIVATE KEY") => SigningKey::Rs384(
            RsaKeyPair::from_pkcs8(&der).map_err(|e| anyhow!("{path}: not an RSA key: {e}"))?,
        ),
        (_, "RSA PRIVATE KEY") => SigningKey::Rs384(
            RsaKeyPair::from_der(&der).map_err(|e| anyhow!("{path}: not an RSA key: {e}"))?,
        ),
        (_, other) => bail!("{path}: a PEM {other:?} is not a private key"),
    };
    Ok(key)
}

impl Auth {
    pub fn new(config: &FhirAuthConfig, client: Client) -> anyhow::Result<Auth> {
        let key = if config.kind == "client_credentials" && !config.private_key_path.is_empty() {
            Some(load_key(&config.private_key_path, &config.jwt_alg)?)
        } else {
            None
        };
        Ok(Auth {
            config: config.clone(),
            client,
            key,
            token: Mutex::new(None),
        })
    }

    /// The Authorization header value to send, if any.
    pub async fn header(&self) -> anyhow::Result<Option<String>> {
        match self.config.kind.as_str() {
            "bearer" => Ok(Some(format!("Bearer {}", self.config.token))),
            "client_credentials" => {
                let mut token = self.token.lock().await;
                let margin = Duration::from_secs(self.config.refresh_before_secs);
                if let Some((t, expires)) = token.as_ref() {
                    if Instant::now() + margin < *expires {
                        return Ok(Some(format!("Bearer {t}")));
                    }
                }
                let (t, lifetime) = self.fetch().await?;
                tracing::info!(
                    expires_in_secs = lifetime.as_secs(),
                    "FHIR push: access token obtained"
                );
                *token = Some((t.clone(), Instant::now() + lifetime));
                Ok(Some(format!("Bearer {t}")))
            }
            _ => Ok(None),
        }
    }

    /// Forgets the cached token (the server answered 401).
    pub async fn invalidate(&self) {
        *self.token.lock().await = None;
    }

    async fn fetch(&self) -> anyhow::Result<(String, Duration)> {
        let c = &self.config;
        let assertion;
        let mut pairs = vec![("grant_type", "client_credentials")];
        if !c.scope.is_empty() {
            pairs.push(("scope", c.scope.as_str()));
        }
        let mut headers = vec![("content-type", "application/x-www-form-urlencoded".into())];
        match &self.key {
            Some(key) => {
                assertion = self.assertion(key)?;
                pairs.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ));
                pairs.push(("client_assertion", assertion.as_str()));
            }
            None => {
                let credentials = STANDARD.encode(format!("{}:{}", c.client_id, c.client_secret));
                headers.push(("authorization", format!("Basic {credentials}")));
            }
        }
        let response = self
            .client
            .send(
                Method::POST,
                &c.token_url,
                &headers,
                Some(form(&pairs)),
                Duration::from_secs(30),
            )
            .await
            .context("token request")?;
        if !response.status.is_success() {
            bail!(
                "token endpoint answered {}: {}",
                response.status,
                truncate(&response.text())
            );
        }
        let t: TokenResponse = response.json()?;
        Ok((
            t.access_token,
            Duration::from_secs(t.expires_in.unwrap_or(300)),
        ))
    }

    /// A client assertion JWT (RFC 7523, SMART Backend Services): five minutes valid, unique id.
    fn assertion(&self, key: &SigningKey) -> anyhow::Result<String> {
        let c = &self.config;
        let alg = match key {
            SigningKey::Rs384(_) => "RS384",
            SigningKey::Es384(_) => "ES384",
        };
        let mut header = serde_json::json!({"typ": "JWT", "alg": alg});
        if !c.jwt_kid.is_empty() {
            header["kid"] = c.jwt_kid.clone().into();
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let claims = serde_json::json!({
            "iss": c.client_id,
            "sub": c.client_id,
            "aud": c.token_url,
            "exp": now + 300,
            "iat": now,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let rng = SystemRandom::new();
        let signature = match key {
            SigningKey::Rs384(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(
                    &signature::RSA_PKCS1_SHA384,
                    &rng,
                    signed.as_bytes(),
                    &mut sig,
                )
                .map_err(|e| anyhow!("signing the assertion: {e}"))?;
                sig
            }
            SigningKey::Es384(k) => k
                .sign(&rng, signed.as_bytes())
                .map_err(|e| anyhow!("signing the assertion: {e}"))?
                .as_ref()
                .to_vec(),
        };
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// At most 300 characters of a response body, for logs and errors.
pub fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_blocks_are_read() {
        let pem = "junk\n-----BEGIN PRIVATE KEY-----\nAAEC\nAw==\n-----END PRIVATE KEY-----\n";
        let (label, der) = pem_block(pem).unwrap();
        assert_eq!((label.as_str(), der), ("PRIVATE KEY", vec![0, 1, 2, 3]));
        assert!(pem_block("nothing").is_err());
    }
}
