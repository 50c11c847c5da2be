//! Audit events as FHIR R4 AuditEvent resources, mapped as the DICOM audit messages are (PS3.15
//! A.5, as IHE BALP carries them into FHIR): `type` the DICOM EventID, `subtype` the EventTypeCode,
//! `action` C/R/U/D/E, `outcome` 0/4/8/12, the caller as the requesting agent (user or AE title,
//! network address), the gateway as the other agent and the `source`, the study, the patient and
//! the query (base64) as entities.

use base64::Engine;
use serde_json::{json, Value};

use super::{Action, Outcome};
use crate::index::audit::StoredEvent;

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";

/// An instant (ms since the epoch) as a FHIR instant, in UTC.
pub fn instant(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}

/// The DICOM roles of the caller and of the gateway (PS3.15 A.5.3: the source of a store or a
/// query, the destination of a retrieve or an export).
fn roles(action: Action) -> Option<(Value, Value)> {
    let source = coding(DCM, "110153", "Source Role ID");
    let destination = coding(DCM, "110152", "Destination Role ID");
    match action {
        Action::Store | Action::Query => Some((source, destination)),
        Action::Retrieve | Action::Export => Some((destination, source)),
        _ => None,
    }
}

pub fn resource(e: &StoredEvent) -> Value {
    let recorded = instant(e.recorded_at);
    let id = e.action.event_id();
    let (caller_role, gateway_role) = roles(e.action).unzip();
    let caller_name = [&e.subject, &e.ae_title, &e.address]
        .into_iter()
        .find(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| "anonymous".into());
    let mut caller = json!({
        "who": {"identifier": {"value": caller_name}, "display": caller_name},
        "requestor": true,
    });
    if let Some(role) = caller_role {
        caller["type"] = json!({"coding": [role]});
    }
    if !e.ae_title.is_empty() {
        caller["altId"] = json!(e.ae_title);
    }
    if !e.subject.is_empty() {
        caller["name"] = json!(e.subject);
    }
    if !e.address.is_empty() {
        caller["network"] = json!({"address": e.address, "type": "2"});
    }
    let mut gateway = json!({
        "who": {"display": e.source},
        "requestor": false,
    });
    if let Some(role) = gateway_role {
        gateway["type"] = json!({"coding": [role]});
    }

    let mut entities = Vec::new();
    if !e.study_uid.is_empty() {
        let mut details = vec![json!({
            "type": "NumberOfInstances",
            "valueString": e.instance_count.to_string(),
        })];
        if !e.sop_class_uid.is_empty() {
            details.push(json!({"type": "SOPClassUID", "valueString": e.sop_class_uid}));
        }
        for uid in &e.instances {
            details.push(json!({"type": "SOPInstanceUID", "valueString": uid}));
        }
        entities.push(json!({
            "what": {
                "reference": format!("ImagingStudy/{}", e.study_uid),
                "identifier": {"system": "urn:dicom:uid", "value": format!("urn:oid:{}", e.study_uid)},
            },
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "role": coding(OBJECT_ROLE, "3", "Report"),
            "detail": details,
        }));
    }
    if !e.patient_id.is_empty() {
        let patient =
            crate::fhir::mapping::patient_resource_id(&e.patient_id, &e.issuer_of_patient_id);
        entities.push(json!({
            "what": {
                "reference": format!("Patient/{patient}"),
                "identifier": {"value": e.patient_id},
            },
            "type": coding(ENTITY_TYPE, "1", "Person"),
            "role": coding(OBJECT_ROLE, "1", "Patient"),
        }));
    }
    if e.action == Action::Query && !e.query.is_empty() {
        entities.push(json!({
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "role": coding(OBJECT_ROLE, "24", "Query"),
            "query": base64::engine::general_purpose::STANDARD.encode(&e.query),
        }));
    }

    let mut resource = json!({
        "resourceType": "AuditEvent",
        "id": e.id.to_string(),
        "meta": {"lastUpdated": recorded},
        "type": coding(DCM, id.code, id.display),
        "action": e.action.action_code(),
        "recorded": recorded,
        "outcome": e.outcome.code().to_string(),
        "agent": [caller, gateway],
        "source": {
            "site": e.protocol,
            "observer": {"display": e.source},
            "type": [coding(
                "http://terminology.hl7.org/CodeSystem/security-source-type",
                "4",
                "Application Server",
            )],
        },
    });
    if let Some(subtype) = e.action.event_type() {
        resource["subtype"] = json!([coding(DCM, subtype.code, subtype.display)]);
    }
    if e.outcome != Outcome::Success || !e.outcome_description.is_empty() {
        resource["outcomeDesc"] = json!(e.outcome_description);
    }
    if !entities.is_empty() {
        resource["entity"] = Value::Array(entities);
    }
    resource
}
