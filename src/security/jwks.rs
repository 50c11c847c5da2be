//! The identity provider's signing keys (a JWK Set, RFC 7517), from a URL or a file, cached.
//!
//! Keys are read when first needed, again once `jwks_cache_secs` have passed, and at once when a token
//! names a key id the cache lacks (the provider rotated its keys), but not more often than every
//! `jwks_min_refetch_secs`, so tokens with made-up key ids cannot make the gateway hammer the provider.
//! A failed fetch keeps the keys known so far.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hyper::Method;
use serde_json::Value;

use super::jwt::{Alg, PublicKey};
use crate::fhir::http::Client;

enum Source {
    // Boxed: the client is large, the file variant a path.
    Url(String, Box<Client>),
    File(std::path::PathBuf),
}

struct Cached {
    /// (key id, key); keys meant for encryption or of other types are left out.
    keys: Vec<(Option<String>, PublicKey)>,
    fetched: Option<Instant>,
}

pub struct Jwks {
    source: Source,
    max_age: Duration,
    min_refetch: Duration,
    // An async lock: a refetch is awaited by the requests that need it, once.
    cache: tokio::sync::Mutex<Cached>,
}

impl Jwks {
    /// `location`: an `http(s)://` URL or a file path.
    pub fn new(location: &str, max_age: Duration, min_refetch: Duration) -> anyhow::Result<Jwks> {
        let source = if location.starts_with("https://") || location.starts_with("http://") {
            Source::Url(location.to_string(), Box::new(Client::new()?))
        } else {
            Source::File(location.into())
        };
        Ok(Jwks {
            source,
            max_age,
            min_refetch,
            cache: tokio::sync::Mutex::new(Cached {
                keys: Vec::new(),
                fetched: None,
            }),
        })
    }

    /// The keys a token with `kid` and `alg` may be signed with (all keys of that type when the token
    /// names no key id).
    pub async fn keys_for(&self, kid: Option<&str>, alg: Alg) -> Vec<PublicKey> {
        let mut cache = self.cache.lock().await;
        let age = cache.fetched.map(|at| at.elapsed());
        if age.is_none_or(|age| age >= self.max_age) {
            self.refresh(&mut cache).await;
        }
        let matching = |cache: &Cached| -> Vec<PublicKey> {
            cache
                .keys
                .iter()
                .filter(|(id, key)| key.alg() == alg && (kid.is_none() || id.as_deref() == kid))
                .map(|(_, key)| key.clone())
                .collect()
        };
        let found = matching(&cache);
        let may_refetch = cache
            .fetched
            .is_none_or(|at| at.elapsed() >= self.min_refetch);
        if found.is_empty() && may_refetch {
            self.refresh(&mut cache).await;
            return matching(&cache);
        }
        found
    }

    async fn refresh(&self, cache: &mut Cached) {
        cache.fetched = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "JWKS loaded");
                cache.keys = keys;
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "JWKS not loaded; keeping the keys known")
            }
        }
    }

    async fn fetch(&self) -> anyhow::Result<Vec<(Option<String>, PublicKey)>> {
        let body = match &self.source {
            Source::Url(url, client) => {
                let response = client
                    .send(
                        Method::GET,
                        url,
                        &[("accept", "application/json".into())],
                        None,
                        Duration::from_secs(10),
                    )
                    .await?;
                if !response.status.is_success() {
                    bail!("{url}: HTTP {}", response.status);
                }
                response.body.to_vec()
            }
            Source::File(path) => tokio::fs::read(path)
                .await
                .with_context(|| format!("reading {}", path.display()))?,
        };
        parse(&body)
    }
}

/// The usable keys of a JWK Set document.
pub fn parse(document: &[u8]) -> anyhow::Result<Vec<(Option<String>, PublicKey)>> {
    let set: Value = serde_json::from_slice(document).context("JWKS is not JSON")?;
    let Some(keys) = set.get("keys").and_then(Value::as_array) else {
        bail!("JWKS has no \"keys\" array");
    };
    Ok(keys
        .iter()
        .filter(|jwk| jwk.get("use").and_then(Value::as_str).unwrap_or("sig") == "sig")
        .filter_map(|jwk| {
            let key = public_key(jwk)?;
            // A key bound to another algorithm must not verify tokens of this one.
            let bound = jwk.get("alg").and_then(Value::as_str);
            if bound.is_some_and(|alg| alg != key.alg().name()) {
                return None;
            }
            let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_string);
            Some((kid, key))
        })
        .collect())
}

fn public_key(jwk: &Value) -> Option<PublicKey> {
    let bytes = |name: &str| {
        jwk.get(name)
            .and_then(Value::as_str)
            .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
    };
    match jwk.get("kty").and_then(Value::as_str)? {
        "RSA" => {
            // Big-endian integers; some encoders keep a leading zero that aws-lc refuses.
            let unsigned = |v: Vec<u8>| v.into_iter().skip_while(|&b| b == 0).collect::<Vec<_>>();
            Some(PublicKey::Rsa {
                n: unsigned(bytes("n")?),
                e: unsigned(bytes("e")?),
            })
        }
        "EC" if jwk.get("crv").and_then(Value::as_str) == Some("P-256") => {
            let (x, y) = (bytes("x")?, bytes("y")?);
            if x.len() != 32 || y.len() != 32 {
                return None;
            }
            let mut point = vec![4];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Some(PublicKey::P256 { point })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_and_p256_keys_are_read_others_skipped() {
        let doc = br#"{"keys":[
            {"kty":"RSA","kid":"r","n":"AMs","e":"AQAB"},
            {"kty":"EC","kid":"e","crv":"P-256","x":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","y":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
            {"kty":"EC","crv":"P-384","x":"AA","y":"AA"},
            {"kty":"RSA","use":"enc","n":"AQ","e":"AQAB"},
            {"kty":"RSA","alg":"ES256","n":"AQ","e":"AQAB"},
            {"kty":"oct","k":"c2VjcmV0"}]}"#;
        let keys = parse(doc).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].0.as_deref(), Some("r"));
        assert_eq!(
            keys[0].1,
            PublicKey::Rsa {
                n: vec![0xcb],
                e: vec![1, 0, 1]
            }
        );
        assert!(matches!(&keys[1].1, PublicKey::P256 { point } if point.len() == 65));
    }
}
