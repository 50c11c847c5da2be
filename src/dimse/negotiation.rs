//! Association negotiation: what we answer an A-ASSOCIATE-RQ.
//!
//! dicom-ul negotiates (called AE title, transfer syntaxes, PDU size, roles), but it can only accept a
//! fixed list of abstract syntaxes or all of them, and it does not look at presentation context IDs.
//! So the request is first read without being consumed ([`peek_request`]) and checked here:
//!
//! - an even (or zero) presentation context ID makes the PDU invalid (PS3.8 9.3.2.2: odd integers
//!   1-255). In state Sta2 an invalid PDU is answered with A-ABORT (Evt19 -> AA-1, service-user
//!   source) and the ARTIM timer, never with an association;
//! - each proposed abstract syntax we do not serve is answered "abstract syntax not supported"
//!   (result 3): the options handed to dicom-ul list exactly the proposed syntaxes we serve
//!   (Verification, the Patient / Study Root Q/R models, the standard Storage SOP classes, and, with
//!   `accept_private_sop_classes`, a UID the standard does not define).

use std::borrow::Cow;
use std::io::Cursor;
use std::time::Duration;

use dicom_dictionary_std::uids;
use dicom_ul::association::server::{AccessControl, Negotiation, ServerAssociationOptions};
use dicom_ul::pdu::{AssociationRJServiceUserReason, AssociationRQ};
use dicom_ul::pdu::{RequestorRoles, UserIdentity};
use dicom_ul::Pdu;
use tokio::net::TcpStream;

use super::{peers, qr, store, TRANSFER_SYNTAXES};
use crate::config::{DimseConfig, PeerConfig};

/// Accepts associations only when they call our AE title (if so configured); with
/// `require_known_peers`, only from a `[[dimse.peers]]` AE title (from its address, when pinned);
/// and from an AE title whose peer entries pin a TLS client certificate only with that certificate.
pub struct AeCheck {
    enforce_called: bool,
    /// The peers a calling AE title must be one of (`None`: any caller), and where it connects from.
    known_peers: Option<(Vec<PeerConfig>, Option<std::net::IpAddr>)>,
    peers: Vec<PeerConfig>,
    /// The subject of the verified TLS client certificate of this connection.
    certificate: Option<String>,
}

impl AccessControl for AeCheck {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if self.enforce_called && called_ae_title.trim() != this_ae_title.trim() {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if let Some((peers, from)) = &self.known_peers {
            let known = peers.iter().any(|p| {
                p.ae_title.trim() == calling_ae_title.trim()
                    && p.address.is_none_or(|a| Some(a) == *from)
            });
            if !known {
                tracing::warn!(target: "audit", calling_ae = calling_ae_title.trim(), from = ?from, "association rejected: unknown peer");
                return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
            }
        }
        if !peers::certificate_matches(&self.peers, calling_ae_title, self.certificate.as_deref()) {
            tracing::warn!(target: "audit", calling_ae = calling_ae_title.trim(), certificate = self.certificate.as_deref(), "association rejected: not the certificate pinned for this AE title");
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        Ok(())
    }
}

/// SCU/SCP role selection: a C-GET requester proposes the SCP role for the Storage SOP classes it
/// wants to receive; the roles it asks for are granted as asked.
pub struct Roles;

impl Negotiation for Roles {
    fn negotiate_roles(&self, _sop_class: &str, scu: bool, scp: bool) -> Option<RequestorRoles> {
        Some(RequestorRoles { scu, scp })
    }
}

pub type Options = ServerAssociationOptions<'static, AeCheck, Roles>;

/// What the peer proposed, as far as it matters before dicom-ul negotiates.
pub enum Proposal {
    /// A well-formed request: the abstract syntaxes it proposes that we serve.
    Acceptable(Vec<String>),
    /// A request that must be answered with A-ABORT (the reason, for the log).
    Invalid(String),
    /// Not an A-ASSOCIATE-RQ we could read: dicom-ul reads it and answers as it does.
    Unread,
}

/// The options for one association: dicom-ul accepts exactly `abstract_syntaxes` (and Verification);
/// `from` is the peer's address, `certificate` the subject of its TLS client certificate.
pub fn options(
    config: &DimseConfig,
    abstract_syntaxes: Vec<String>,
    from: Option<std::net::IpAddr>,
    certificate: Option<&str>,
) -> Options {
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(AeCheck {
            enforce_called: config.check_called_ae,
            known_peers: config
                .require_known_peers
                .then(|| (config.peers.clone(), from)),
            peers: config.peers.clone(),
            certificate: certificate.map(str::to_string),
        })
        .ae_title(config.ae_title.clone())
        .max_pdu_length(config.max_pdu_length)
        .strict(true)
        .read_timeout(Duration::from_secs(config.read_timeout_secs))
        .write_timeout(config.write_timeout())
        .with_negotiation(Roles)
        .with_abstract_syntax(super::echo::VERIFICATION);
    for uid in abstract_syntaxes {
        options = options.with_abstract_syntax(Cow::Owned(uid));
    }
    for ts in TRANSFER_SYNTAXES {
        options = options.with_transfer_syntax(*ts);
    }
    options
}

/// Whether we provide a service for SOP class `uid` (as SCP, or as SCU of C-GET's sub-operations).
pub fn serves_abstract_syntax(uid: &str, config: &DimseConfig) -> bool {
    uid == uids::VERIFICATION
        || qr::model_of(uid).is_some()
        || store::is_standard_storage_class(uid)
        || (config.accept_private_sop_classes
            && crate::index::query::is_valid_uid(uid)
            && !is_standard_uid(uid))
}

/// A UID under the DICOM root (SOP classes, meta SOP classes, transfer syntaxes, ...) is defined
/// by the standard: never a private SOP class.
fn is_standard_uid(uid: &str) -> bool {
    uid.starts_with("1.2.840.10008.")
}

/// Checks a decoded A-ASSOCIATE-RQ.
pub fn check(rq: &AssociationRQ, config: &DimseConfig) -> Proposal {
    if let Some(pc) = rq
        .presentation_contexts
        .iter()
        .find(|pc| pc.id.is_multiple_of(2))
    {
        return Proposal::Invalid(format!(
            "presentation context ID {} is not an odd number (PS3.8 9.3.2.2)",
            pc.id
        ));
    }
    let mut served: Vec<String> = rq
        .presentation_contexts
        .iter()
        .map(|pc| pc.abstract_syntax.trim_end_matches(['\0', ' ']).to_string())
        .filter(|uid| serves_abstract_syntax(uid, config))
        .collect();
    served.sort();
    served.dedup();
    Proposal::Acceptable(served)
}

/// PDU type of A-ASSOCIATE-RQ, and the PDU header's length.
const ASSOCIATE_RQ: u8 = 0x01;
const PDU_HEADER: usize = 6;
/// How often a request that arrived only in part is looked at again.
const PEEK_INTERVAL: Duration = Duration::from_millis(5);

/// Reads the A-ASSOCIATE-RQ at the start of `socket` without consuming it (dicom-ul reads it next).
/// Anything else, or a request longer than `max_len`, is left to dicom-ul to refuse.
pub async fn peek_request(socket: &TcpStream, max_len: u32, config: &DimseConfig) -> Proposal {
    let mut buf = vec![0u8; PDU_HEADER];
    if !peek_full(socket, &mut buf).await {
        return Proposal::Unread;
    }
    let len = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]);
    if buf[0] != ASSOCIATE_RQ || len > max_len {
        return Proposal::Unread;
    }
    buf.resize(PDU_HEADER + len as usize, 0);
    if !peek_full(socket, &mut buf).await {
        return Proposal::Unread;
    }
    proposal(&buf, max_len, config)
}

/// What the A-ASSOCIATE-RQ in `pdu` (the whole PDU) proposes; `Unread` if it is not one.
pub fn proposal(pdu: &[u8], max_len: u32, config: &DimseConfig) -> Proposal {
    match dicom_ul::pdu::read_pdu(&mut Cursor::new(pdu), max_len, true) {
        Ok(Some(Pdu::AssociationRQ(rq))) => check(&rq, config),
        _ => Proposal::Unread,
    }
}

/// Fills `buf` from the socket's receive queue without consuming it; false if the peer closed the
/// connection first (or the socket failed). The caller bounds the wait.
async fn peek_full(socket: &TcpStream, buf: &mut [u8]) -> bool {
    loop {
        match socket.peek(buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if n == buf.len() => return true,
            // Part of it is there: peeking again returns at once, so wait a little in between.
            Ok(_) => tokio::time::sleep(PEEK_INTERVAL).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::PresentationContextProposed;

    fn request(contexts: &[(u8, &str)]) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "SCU".into(),
            called_ae_title: "DICOMGW".into(),
            application_context_name: "1.2.840.10008.3.1.1.1".into(),
            presentation_contexts: contexts
                .iter()
                .map(|(id, uid)| PresentationContextProposed {
                    id: *id,
                    abstract_syntax: uid.to_string(),
                    transfer_syntaxes: vec!["1.2.840.10008.1.2".into()],
                })
                .collect(),
            user_variables: vec![],
        }
    }

    #[test]
    fn even_presentation_context_ids_are_invalid() {
        let config = DimseConfig::default();
        let rq = request(&[(1, uids::VERIFICATION), (2, uids::CT_IMAGE_STORAGE)]);
        assert!(matches!(check(&rq, &config), Proposal::Invalid(_)));
    }

    #[test]
    fn only_served_abstract_syntaxes_are_offered_to_dicom_ul() {
        let mut config = DimseConfig::default();
        let private = "1.2.826.0.1.3680043.9.9999.1";
        let rq = request(&[
            (1, uids::CT_IMAGE_STORAGE),
            (3, uids::MODALITY_WORKLIST_INFORMATION_MODEL_FIND),
            (5, uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_MOVE),
            (7, uids::STORAGE_COMMITMENT_PUSH_MODEL),
            (9, private),
            (11, uids::EXPLICIT_VR_LITTLE_ENDIAN),
        ]);
        let Proposal::Acceptable(served) = check(&rq, &config) else {
            panic!("refused");
        };
        assert_eq!(
            served,
            [
                uids::CT_IMAGE_STORAGE,
                uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_MOVE
            ]
        );
        config.accept_private_sop_classes = true;
        let Proposal::Acceptable(served) = check(&rq, &config) else {
            panic!("refused");
        };
        assert!(served.iter().any(|s| s == private));
        assert!(!served
            .iter()
            .any(|s| s == uids::EXPLICIT_VR_LITTLE_ENDIAN
                || s == uids::STORAGE_COMMITMENT_PUSH_MODEL));
    }
}
