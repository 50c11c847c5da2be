//! The CapabilityStatement of `/fhir/metadata`: exactly the resources, interactions, search
//! parameters (the tables of [`super::search`]) and formats this server supports.

use serde_json::{json, Value};

use super::search::{
    Param, AUDIT_EVENT_PARAMS, IMAGING_STUDY_PARAMS, INCLUDES, PATIENT_PARAMS, SORTS,
};

fn params(list: &[Param]) -> Value {
    Value::Array(
        list.iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "definition": p.definition,
                    "type": p.kind,
                    "documentation": p.doc,
                })
            })
            .collect(),
    )
}

pub fn statement(base: &str) -> Value {
    json!({
        "resourceType": "CapabilityStatement",
        "id": "dicom-gateway",
        "status": "active",
        "date": "2026-12-07",
        "publisher": "dicom-gateway",
        "kind": "instance",
        "software": {"name": "dicom-gateway", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {
            "description": "DICOM gateway: ImagingStudy served from its index",
            "url": base,
        },
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json", "application/json"],
        "rest": [{
            "mode": "server",
            "documentation": "Read-only. Unknown search parameters are ignored under Prefer: handling=lenient \
                (the default) and refused with 400 under handling=strict. Paging: _count and _offset \
                (the Bundle's next/previous links). _summary=count, _elements.",
            "resource": [
                {
                    "type": "ImagingStudy",
                    "profile": "http://hl7.org/fhir/StructureDefinition/ImagingStudy",
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "versioning": "versioned",
                    "readHistory": false,
                    "updateCreate": false,
                    "searchInclude": INCLUDES,
                    "searchParam": params(IMAGING_STUDY_PARAMS),
                    "documentation": format!("_sort: {}", SORTS.join(", ")),
                },
                {
                    "type": "Patient",
                    "profile": "http://hl7.org/fhir/StructureDefinition/Patient",
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": params(PATIENT_PARAMS),
                },
                {
                    "type": "Endpoint",
                    "profile": "http://hl7.org/fhir/StructureDefinition/Endpoint",
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                },
                {
                    "type": "AuditEvent",
                    "profile": "http://hl7.org/fhir/StructureDefinition/AuditEvent",
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": params(AUDIT_EVENT_PARAMS),
                    "documentation": "The gateway's audit trail (stores, queries, retrieves, \
                        deletions, exports, refusals, start and stop), newest first.",
                },
            ],
        }],
    })
}
