//! Known application entities (`[[dimse.peers]]`): who may query and retrieve, and where C-MOVE
//! destinations live. C-STORE and C-ECHO do not consult this list.

use std::net::IpAddr;

use crate::config::PeerConfig;

/// What a request asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    Query,
    Retrieve,
}

/// Whether `calling_ae`, connected from `from`, may use `right`: it must be a configured peer with
/// that right and, when the peer is pinned to an address, come from that address.
pub fn allowed(peers: &[PeerConfig], calling_ae: &str, from: IpAddr, right: Right) -> bool {
    peers.iter().any(|p| {
        p.ae_title.trim() == calling_ae.trim()
            && p.address.is_none_or(|a| a == from)
            && match right {
                Right::Query => p.query,
                Right::Retrieve => p.retrieve,
            }
    })
}

/// Whether an association from `calling_ae` presenting the TLS client certificate `certificate`
/// (its subject) may go on: when peer entries for this AE title pin certificates, it must present
/// one of them.
pub fn certificate_matches(
    peers: &[PeerConfig],
    calling_ae: &str,
    certificate: Option<&str>,
) -> bool {
    let mut pinned = peers
        .iter()
        .filter(|p| p.ae_title.trim() == calling_ae.trim())
        .filter_map(|p| p.certificate.as_deref())
        .peekable();
    pinned.peek().is_none() || pinned.any(|pin| Some(pin.trim()) == certificate)
}

/// The configured peer a C-MOVE destination AE title names.
pub fn destination<'a>(peers: &'a [PeerConfig], ae_title: &str) -> Option<&'a PeerConfig> {
    peers.iter().find(|p| p.ae_title.trim() == ae_title.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ae: &str, address: Option<&str>, query: bool, retrieve: bool) -> PeerConfig {
        PeerConfig {
            ae_title: ae.into(),
            host: "127.0.0.1".into(),
            port: 104,
            address: address.map(|a| a.parse().unwrap()),
            query,
            retrieve,
            certificate: None,
            tls: false,
        }
    }

    #[test]
    fn callers_need_a_peer_entry_with_the_right_and_address() {
        let peers = [
            peer("WS", None, true, false),
            peer("PINNED", Some("10.0.0.5"), true, true),
        ];
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(allowed(&peers, "WS", local, Right::Query));
        assert!(!allowed(&peers, "WS", local, Right::Retrieve));
        assert!(!allowed(&peers, "OTHER", local, Right::Query));
        assert!(!allowed(&peers, "PINNED", local, Right::Query));
        assert!(allowed(
            &peers,
            "PINNED ",
            "10.0.0.5".parse().unwrap(),
            Right::Retrieve
        ));
        assert_eq!(destination(&peers, "PINNED").unwrap().port, 104);
        assert!(destination(&peers, "NOPE").is_none());
    }

    #[test]
    fn a_pinned_certificate_must_be_the_one_presented() {
        let mut pinned = peer("MOD", None, true, true);
        pinned.certificate = Some("CN=mod1".into());
        let peers = [pinned, peer("WS", None, true, true)];
        assert!(certificate_matches(&peers, "MOD", Some("CN=mod1")));
        assert!(!certificate_matches(&peers, "MOD", Some("CN=other")));
        assert!(!certificate_matches(&peers, "MOD", None));
        assert!(certificate_matches(&peers, "WS", None));
        assert!(certificate_matches(&peers, "UNKNOWN", Some("CN=x")));
    }
}
