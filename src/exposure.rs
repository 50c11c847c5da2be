//! Secure by default: who can reach the listeners, said at start, and refused where it would expose
//! patient data to the network without authentication.
//!
//! - every listener on a loopback address: only callers on this machine connect (the embedded
//!   defaults), said once at start;
//! - HTTP on any other address needs authentication (`[auth]`) or an explicit
//!   `[http] allow_anonymous = true`, else the gateway does not start;
//! - DIMSE on any other address is the norm (modalities call in), but without `[[dimse.peers]]`
//!   and without `[tls] client_ca` any AE title is trusted: a warning.

use std::net::SocketAddr;

use anyhow::bail;

use crate::config::Config;

/// Checks the bound addresses of the HTTP listener and the DIMSE listeners against `config`.
pub fn check(config: &Config, http: SocketAddr, dimse: &[SocketAddr]) -> anyhow::Result<()> {
    let http_open = !http.ip().is_loopback();
    if http_open && !config.http_auth_configured() {
        if !config.http.allow_anonymous {
            bail!(
                "HTTP would listen on {http}, which other machines reach, with no authentication \
                 configured: bind [http] bind to 127.0.0.1, configure [auth], or set \
                 [http] allow_anonymous = true to serve anyone who connects"
            );
        }
        tracing::warn!(%http, "HTTP serves anyone who reaches it: no authentication (allow_anonymous = true)");
    }
    let dimse_open: Vec<&SocketAddr> = dimse.iter().filter(|a| !a.ip().is_loopback()).collect();
    if !dimse_open.is_empty() && config.dimse.peers.is_empty() && config.tls.client_ca.is_empty() {
        tracing::warn!(
            addresses = ?dimse_open,
            "DIMSE reachable from other machines with no [[dimse.peers]] and no [tls] client_ca: \
             any caller may store objects under any AE title"
        );
    }
    if !http_open && dimse_open.is_empty() {
        tracing::info!(
            "listening on loopback addresses only: only callers on this machine can connect \
             (see docs/security.md to open the gateway to the network)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn open_http_without_authentication_needs_allow_anonymous() {
        let mut config = Config::default();
        let local = [addr("127.0.0.1:11112")];
        assert!(check(&config, addr("127.0.0.1:8080"), &local).is_ok());
        assert!(check(&config, addr("[::1]:8080"), &local).is_ok());
        let refused = check(&config, addr("0.0.0.0:8080"), &local).unwrap_err();
        assert!(refused.to_string().contains("allow_anonymous"), "{refused}");
        assert!(check(&config, addr("10.1.2.3:8080"), &local).is_err());
        config.http.allow_anonymous = true;
        assert!(check(&config, addr("0.0.0.0:8080"), &local).is_ok());
    }

    #[test]
    fn open_dimse_is_allowed() {
        let config = Config::default();
        let open = [addr("0.0.0.0:11112"), addr("0.0.0.0:2762")];
        assert!(check(&config, addr("127.0.0.1:8080"), &open).is_ok());
    }
}
