//! The audit events of DIMSE query / retrieve requests (C-FIND, C-MOVE, C-GET): who (calling AE
//! title and address), the study and patient the identifier names, its keys as the query. C-STORE's
//! events are recorded by ingest with the index row.

use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::dataset;
use super::qr::Request;
use super::Context;
use crate::audit::{self, Action, AuditEvent, Origin, Outcome, Protocol};
use crate::security::Identity;

/// Who is calling on this association, for its audit events.
pub fn origin(calling_ae: &str, peer: std::net::SocketAddr) -> Origin {
    Origin::new(
        Identity::dimse_peer(calling_ae, peer.ip(), None),
        Protocol::Dimse,
    )
}

/// Records the event of a query / retrieve request (in the background; `instances`: how many it
/// covers).
pub fn record(ctx: &Context, req: &Request, action: Action, outcome: Outcome, instances: usize) {
    let identifier = dataset::decode(&req.identifier, &req.transfer_syntax).ok();
    let text = |tag| {
        identifier
            .as_ref()
            .and_then(|o: &InMemDicomObject| {
                o.element(tag)
                    .ok()?
                    .to_str()
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_default()
    };
    let mut event = AuditEvent::new(action, origin(&req.calling_ae, req.peer), outcome)
        .study(&text(tags::STUDY_INSTANCE_UID))
        .query(identifier.as_ref().map(keys).unwrap_or_default())
        .instances(instances);
    event.patient_id = text(tags::PATIENT_ID);
    if outcome != Outcome::Success {
        event.outcome_description = "refused: not a peer allowed to do this".into();
    }
    audit::record(&ctx.index, event);
}

/// The identifier's keys that carry a value, as `(gggg,eeee)=value` pairs.
fn keys(identifier: &InMemDicomObject) -> String {
    identifier
        .iter()
        .filter_map(|e| {
            let value = e.to_str().ok()?;
            let value = value.trim_end_matches(['\0', ' ']);
            (!value.is_empty()).then(|| format!("{}={value}", e.header().tag))
        })
        .collect::<Vec<_>>()
        .join("&")
}
