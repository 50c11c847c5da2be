//! Who is calling and what they may do, the same answer for every protocol.
//!
//! - this file: [`Identity`] (who, as the protocol that carried the request authenticated them) and
//!   [`Action`] (what a request asks to do);
//! - [`http`]: the layer that puts an [`Identity`] into every HTTP request's extensions, and answers
//!   401 / 403 when `[auth]` is configured; [`authenticate`] checks an HTTP request's credentials:
//!   bearer JWTs ([`jwt`], keys from [`jwks`]), API keys and basic users ([`credentials`]);
//! - [`scopes`]: what a credential allows (the gateway's scopes and SMART scopes);
//! - [`policy`]: the rules every protocol asks (decisions and study scopes for the SQL).

pub mod authenticate;
pub mod credentials;
pub mod http;
pub mod jwks;
pub mod jwt;
pub mod policy;
pub mod scopes;

pub use scopes::Scopes;

use std::net::IpAddr;

/// What a request asks to do, whatever the protocol (QIDO-RS and C-FIND search; WADO, C-MOVE and
/// C-GET read; STOW-RS and C-STORE store; DELETE deletes; configuration and status pages are admin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Search,
    Read,
    Store,
    Delete,
    Admin,
}

/// How the caller proved who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// Nothing: only allowed where the configuration says so.
    Anonymous,
    /// An OAuth 2.0 / OIDC bearer token (`subject` is its `sub` claim).
    Bearer,
    /// An API key (`subject` is the key's name).
    ApiKey,
    /// HTTP basic against the user file (`subject` is the user name).
    Basic,
    /// A DIMSE peer (`subject` is its calling AE title; `certificate` set over TLS with client
    /// certificates).
    DimsePeer,
}

/// Who is calling: set once per HTTP request or DIMSE association, read by the policy and the audit
/// trail.
#[derive(Debug, Clone)]
pub struct Identity {
    pub credential: Credential,
    /// User, key or AE title, as above; empty for anonymous callers.
    pub subject: String,
    /// Where the request came from (the TCP peer).
    pub address: Option<IpAddr>,
    /// The calling AE title of a DIMSE association.
    pub ae_title: Option<String>,
    /// The subject of the TLS client certificate, when one was verified.
    pub certificate: Option<String>,
    /// What the credential allows (HTTP; checked only when `[auth]` is configured).
    pub scopes: Scopes,
    /// The token's `groups` claim.
    pub groups: Vec<String>,
}

impl Identity {
    pub fn anonymous(address: Option<IpAddr>) -> Self {
        Identity {
            credential: Credential::Anonymous,
            subject: String::new(),
            address,
            ae_title: None,
            certificate: None,
            scopes: Scopes::default(),
            groups: Vec::new(),
        }
    }

    pub fn dimse_peer(ae_title: &str, address: IpAddr, certificate: Option<String>) -> Self {
        Identity {
            credential: Credential::DimsePeer,
            subject: ae_title.trim().to_string(),
            address: Some(address),
            ae_title: Some(ae_title.trim().to_string()),
            certificate,
            scopes: Scopes::default(),
            groups: Vec::new(),
        }
    }
}
