//! Bearer JWTs (RFC 7519, JWS compact form): the header read, the RS256 or ES256 signature checked with
//! aws-lc-rs against a key from the JWKS, then the claims: issuer, audience, expiry and not-before
//! (with a clock skew), subject, scopes and groups.
//!
//! aws-lc-rs rather than a JWT crate: it is the crypto rustls already builds here (`jsonwebtoken`
//! would add `ring`), and the part a crate would add, reading three base64url segments and a few
//! claims, is short and tested below. Only RS256 and ES256 are accepted, so `alg: none` or an HMAC
//! algorithm keyed with a public key can never pass.

use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;

/// The signature algorithms accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
}

impl Alg {
    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }
}

/// A public key from the JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// Modulus and exponent, big-endian without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// An uncompressed P-256 point (0x04 || x || y).
    P256 { point: Vec<u8> },
}

impl PublicKey {
    pub fn alg(&self) -> Alg {
        match self {
            PublicKey::Rsa { .. } => Alg::Rs256,
            PublicKey::P256 { .. } => Alg::Es256,
        }
    }

    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            PublicKey::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok(),
            PublicKey::P256 { point } => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, signature)
                    .is_ok()
            }
        }
    }
}

/// Why a token was refused (said in `WWW-Authenticate`'s `error_description`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("unsupported algorithm {0:?} (RS256 and ES256 are accepted)")]
    Algorithm(String),
    #[error("no key in the JWKS for this token")]
    UnknownKey,
    #[error("bad signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
}

/// A token split and its header read; the signature not checked yet.
pub struct Token<'a> {
    pub alg: Alg,
    pub kid: Option<String>,
    signed: &'a str,
    payload: Vec<u8>,
    signature: Vec<u8>,
}

impl<'a> Token<'a> {
    pub fn parse(token: &'a str) -> Result<Token<'a>, JwtError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed("not three segments"));
        };
        let decode = |segment: &str| {
            URL_SAFE_NO_PAD
                .decode(segment)
                .map_err(|_| JwtError::Malformed("not base64url"))
        };
        let header: Value = serde_json::from_slice(&decode(header)?)
            .map_err(|_| JwtError::Malformed("header is not JSON"))?;
        let alg = match header.get("alg").and_then(Value::as_str) {
            Some("RS256") => Alg::Rs256,
            Some("ES256") => Alg::Es256,
            other => return Err(JwtError::Algorithm(other.unwrap_or("").to_string())),
        };
        Ok(Token {
            alg,
            kid: header
                .get("kid")
                .and_then(Value::as_str)
                .map(str::to_string),
            signed: &token[..token.len() - signature.len() - 1],
            payload: decode(payload)?,
            signature: decode(signature)?,
        })
    }

    /// Checks the signature against the first of `keys` (of this token's algorithm) that verifies it.
    pub fn verify(self, keys: &[PublicKey]) -> Result<Payload, JwtError> {
        let candidates: Vec<_> = keys.iter().filter(|k| k.alg() == self.alg).collect();
        if candidates.is_empty() {
            return Err(JwtError::UnknownKey);
        }
        if !candidates
            .iter()
            .any(|key| key.verifies(self.signed.as_bytes(), &self.signature))
        {
            return Err(JwtError::Signature);
        }
        serde_json::from_slice(&self.payload)
            .map(Payload)
            .map_err(|_| JwtError::Malformed("payload is not JSON"))
    }
}

/// A verified token's claims, not yet checked.
pub struct Payload(Value);

/// What a token must say to be accepted.
pub struct Expected<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    pub clock_skew_secs: i64,
}

/// The claims the gateway uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub subject: String,
    pub scopes: Vec<String>,
    pub groups: Vec<String>,
}

impl Payload {
    /// Checks issuer, audience, `exp` (required) and `nbf` against `now` (seconds since the epoch).
    pub fn check(self, expected: &Expected, now: i64) -> Result<Claims, JwtError> {
        let claims = self.0;
        let text = |name: &str| claims.get(name).and_then(Value::as_str);
        if text("iss") != Some(expected.issuer) {
            return Err(JwtError::Issuer);
        }
        let audience_matches = match claims.get("aud") {
            Some(Value::String(aud)) => aud == expected.audience,
            Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(expected.audience)),
            _ => false,
        };
        if !audience_matches {
            return Err(JwtError::Audience);
        }
        let time = |name: &str| claims.get(name).and_then(Value::as_f64);
        let skew = expected.clock_skew_secs as f64;
        match time("exp") {
            Some(exp) if (now as f64) <= exp + skew => {}
            Some(_) => return Err(JwtError::Expired),
            None => return Err(JwtError::Malformed("no exp claim")),
        }
        if time("nbf").is_some_and(|nbf| (now as f64) + skew < nbf) {
            return Err(JwtError::NotYetValid);
        }
        let strings = |value: Option<&Value>| -> Vec<String> {
            match value {
                Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
                _ => Vec::new(),
            }
        };
        let mut scopes = strings(claims.get("scope"));
        scopes.extend(strings(claims.get("scp")));
        Ok(Claims {
            subject: text("sub").unwrap_or_default().to_string(),
            scopes,
            groups: strings(claims.get("groups")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn es256_token(pair: &EcdsaKeyPair, header: &str, claims: &Value) -> String {
        let signed = format!(
            "{}.{}",
            b64(header.as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = pair.sign(&SystemRandom::new(), signed.as_bytes()).unwrap();
        format!("{signed}.{}", b64(signature.as_ref()))
    }

    fn new_pair() -> (EcdsaKeyPair, PublicKey) {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let point = pair.public_key().as_ref().to_vec();
        (pair, PublicKey::P256 { point })
    }

    const EXPECTED: Expected = Expected {
        issuer: "https://idp",
        audience: "gw",
        clock_skew_secs: 30,
    };

    fn claims(exp: i64) -> Value {
        serde_json::json!({"iss": "https://idp", "aud": ["x", "gw"], "sub": "alice",
            "exp": exp, "scope": "read search", "groups": ["radiology"]})
    }

    #[test]
    fn es256_token_verifies_and_yields_its_claims() {
        let (pair, key) = new_pair();
        let token = es256_token(&pair, r#"{"alg":"ES256","kid":"k1"}"#, &claims(1000));
        let parsed = Token::parse(&token).unwrap();
        assert_eq!(parsed.kid.as_deref(), Some("k1"));
        let claims = parsed
            .verify(&[key])
            .unwrap()
            .check(&EXPECTED, 1020)
            .unwrap();
        assert_eq!(claims.subject, "alice");
        assert_eq!(claims.scopes, ["read", "search"]);
        assert_eq!(claims.groups, ["radiology"]);
    }

    #[test]
    fn expiry_issuer_audience_and_signature_are_checked() {
        let (pair, key) = new_pair();
        let (_, other_key) = new_pair();
        let token = es256_token(&pair, r#"{"alg":"ES256"}"#, &claims(1000));
        let check = |now| {
            Token::parse(&token)
                .unwrap()
                .verify(std::slice::from_ref(&key))
                .unwrap()
                .check(&EXPECTED, now)
        };
        assert_eq!(check(1031), Err(JwtError::Expired));
        let wrong_aud = Expected {
            audience: "other",
            ..EXPECTED
        };
        let payload = Token::parse(&token)
            .unwrap()
            .verify(std::slice::from_ref(&key))
            .unwrap();
        assert_eq!(payload.check(&wrong_aud, 0), Err(JwtError::Audience));
        let wrong_iss = Expected {
            issuer: "https://evil",
            ..EXPECTED
        };
        let payload = Token::parse(&token).unwrap().verify(&[key]).unwrap();
        assert_eq!(payload.check(&wrong_iss, 0), Err(JwtError::Issuer));
        let result = Token::parse(&token).unwrap().verify(&[other_key]);
        assert_eq!(result.err(), Some(JwtError::Signature));
    }

    #[test]
    fn alg_none_and_hmac_are_refused() {
        for alg in ["none", "HS256"] {
            let token = format!(
                "{}.{}.",
                b64(format!(r#"{{"alg":"{alg}"}}"#).as_bytes()),
                b64(b"{}")
            );
            assert!(matches!(Token::parse(&token), Err(JwtError::Algorithm(_))));
        }
        assert!(matches!(Token::parse("a.b"), Err(JwtError::Malformed(_))));
    }
}
