//! What C-FIND, C-MOVE and C-GET share (PS3.4 C): the Patient Root and Study Root information
//! models, Query/Retrieve levels, the request as the association hands it over, statuses, and the
//! translation of identifier keys into the matching engine's query.

use std::net::SocketAddr;

use dicom_core::header::{HasLength, Header};
use dicom_core::value::Value;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::command::{elem, Command, CommandBuilder, DATA_SET_PRESENT, NO_DATA_SET};
use crate::index::query::{Level, Query};

pub const PATIENT_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.1.1";
pub const PATIENT_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.1.2";
pub const PATIENT_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.1.3";
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
pub const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";
pub const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";

/// Statuses of C-FIND, C-MOVE and C-GET (PS3.4 C.4, PS3.7 C).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const NOT_AUTHORIZED: u16 = 0x0124;
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    pub const UNABLE_TO_PERFORM_SUB_OPERATIONS: u16 = 0xA702;
    pub const MOVE_DESTINATION_UNKNOWN: u16 = 0xA801;
    pub const IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    pub const UNABLE_TO_PROCESS: u16 = 0xC000;
    pub const CANCEL: u16 = 0xFE00;
    pub const SUB_OPERATIONS_WITH_FAILURES: u16 = 0xB000;
    pub const PENDING: u16 = 0xFF00;
    /// C-FIND pending: some optional keys were not supported for matching.
    pub const PENDING_OPTIONAL_KEYS_UNSUPPORTED: u16 = 0xFF01;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    PatientRoot,
    StudyRoot,
}

/// The information model of a FIND / MOVE / GET SOP class.
pub fn model_of(sop_class: &str) -> Option<Model> {
    match sop_class {
        PATIENT_ROOT_FIND | PATIENT_ROOT_MOVE | PATIENT_ROOT_GET => Some(Model::PatientRoot),
        STUDY_ROOT_FIND | STUDY_ROOT_MOVE | STUDY_ROOT_GET => Some(Model::StudyRoot),
        _ => None,
    }
}

/// The request command field a FIND / MOVE / GET SOP class is used with.
pub fn operation_of(sop_class: &str) -> Option<u16> {
    use super::command::field;
    match sop_class {
        PATIENT_ROOT_FIND | STUDY_ROOT_FIND => Some(field::C_FIND_RQ),
        PATIENT_ROOT_MOVE | STUDY_ROOT_MOVE => Some(field::C_MOVE_RQ),
        PATIENT_ROOT_GET | STUDY_ROOT_GET => Some(field::C_GET_RQ),
        _ => None,
    }
}

/// Query/Retrieve Level (0008,0052).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QrLevel {
    Patient,
    Study,
    Series,
    Image,
}

impl QrLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            QrLevel::Patient => "PATIENT",
            QrLevel::Study => "STUDY",
            QrLevel::Series => "SERIES",
            QrLevel::Image => "IMAGE",
        }
    }

    /// The engine level whose rows this level is read from (patients are grouped studies).
    pub fn engine_level(self) -> Level {
        match self {
            QrLevel::Patient | QrLevel::Study => Level::Study,
            QrLevel::Series => Level::Series,
            QrLevel::Image => Level::Instance,
        }
    }

    /// Reads the level of an identifier; the Study Root model has no PATIENT level.
    pub fn of(model: Model, identifier: &InMemDicomObject) -> Result<QrLevel, Failure> {
        let value = identifier
            .get(tags::QUERY_RETRIEVE_LEVEL)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' ').to_string())
            .unwrap_or_default();
        let level = match value.as_str() {
            "PATIENT" if model == Model::PatientRoot => QrLevel::Patient,
            "STUDY" => QrLevel::Study,
            "SERIES" => QrLevel::Series,
            "IMAGE" => QrLevel::Image,
            _ => {
                return Err(Failure::new(
                    status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                    format!("Query/Retrieve Level {value:?} is not valid for this model"),
                ))
            }
        };
        Ok(level)
    }
}

/// A refused request: status and Error Comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub comment: String,
}

impl Failure {
    pub fn new(status: u16, comment: impl Into<String>) -> Failure {
        Failure {
            status,
            comment: comment.into(),
        }
    }
}

/// A C-FIND / C-MOVE / C-GET request with its identifier, as the association received it.
pub struct Request {
    pub pc: u8,
    pub transfer_syntax: String,
    pub cmd: Command,
    pub identifier: Vec<u8>,
    pub calling_ae: String,
    pub peer: SocketAddr,
    /// For every message written back on this association.
    pub write_timeout: std::time::Duration,
}

impl Request {
    /// Who sent it, as the policy sees them.
    pub fn identity(&self) -> crate::security::Identity {
        crate::security::Identity::dimse_peer(&self.calling_ae, self.peer.ip(), None)
    }

    /// The studies the policy lets the caller do `action` on; `Err` (0124) when none.
    pub fn scope(
        &self,
        policy: &crate::security::policy::Policy,
        action: crate::security::Action,
    ) -> Result<crate::security::policy::Scope, Failure> {
        match policy.scope(&self.identity(), action) {
            crate::security::policy::Scope::Nothing => {
                tracing::warn!(target: "audit", calling_ae = %self.calling_ae, peer = %self.peer, ?action, "refused by the policy");
                Err(Failure::new(
                    status::NOT_AUTHORIZED,
                    "not authorized by the policy",
                ))
            }
            scope => Ok(scope),
        }
    }

    pub fn message_id(&self) -> u16 {
        self.cmd.message_id().unwrap_or(0)
    }

    pub fn sop_class(&self) -> String {
        self.cmd
            .string(elem::AFFECTED_SOP_CLASS_UID)
            .unwrap_or_default()
    }
}

/// The common part of a response command set.
pub fn response(req: &Request, field: u16, status: u16, has_data: bool) -> CommandBuilder {
    CommandBuilder::new()
        .uid(elem::AFFECTED_SOP_CLASS_UID, &req.sop_class())
        .u16(elem::COMMAND_FIELD, field)
        .u16(elem::MESSAGE_ID_BEING_RESPONDED_TO, req.message_id())
        .u16(
            elem::COMMAND_DATA_SET_TYPE,
            if has_data {
                DATA_SET_PRESENT
            } else {
                NO_DATA_SET
            },
        )
        .u16(elem::STATUS, status)
}

/// How the keys of an identifier were taken into a query.
#[derive(Debug, Default)]
pub struct KeyReport {
    /// Keys with a value that the engine cannot match on (C-FIND answers FF01).
    pub unsupported: Vec<dicom_core::Tag>,
}

/// Adds the matching keys of an identifier to `query`. `allowed` narrows which attributes may match
/// (the patient level matches only patient attributes). Keys the engine cannot match on (no column,
/// a sequence not kept at the level, nested sequences) are reported as unsupported; an invalid value
/// refuses the request.
pub fn add_keys(
    query: &mut Query,
    identifier: &InMemDicomObject,
    allowed: impl Fn(dicom_core::Tag) -> bool,
) -> Result<KeyReport, Failure> {
    let mut report = KeyReport::default();
    for element in identifier.iter() {
        let tag = element.tag();
        if tag == tags::SPECIFIC_CHARACTER_SET || tag == tags::QUERY_RETRIEVE_LEVEL {
            continue;
        }
        let value = match element.value() {
            Value::Sequence(seq) => {
                // Sequence matching uses the one item of the key; an empty item (or none) only
                // asks for the sequence back.
                let Some(item) = seq.items().first() else {
                    continue;
                };
                if item.iter().all(|e| e.is_empty()) {
                    continue;
                }
                let values: Option<Vec<(dicom_core::Tag, String)>> = item
                    .iter()
                    .map(|e| match e.value() {
                        Value::Primitive(p) => Some((e.tag(), p.to_str().to_string())),
                        _ => None, // nested sequences are not matched
                    })
                    .collect();
                let pairs: Vec<(dicom_core::Tag, &str)> = values
                    .iter()
                    .flatten()
                    .map(|(t, v)| (*t, v.as_str()))
                    .collect();
                let matched = values.is_some()
                    && seq.items().len() == 1
                    && allowed(tag)
                    && query.add_sequence_match(tag, &pairs);
                if !matched {
                    report.unsupported.push(tag);
                }
                continue;
            }
            Value::Primitive(p) => p.to_str().to_string(),
            Value::PixelSequence(_) => {
                report.unsupported.push(tag);
                continue;
            }
        };
        if value.trim_end_matches(['\0', ' ']).is_empty() {
            continue;
        }
        let matched = allowed(tag)
            && query.add_match(tag, &value).map_err(|e| {
                Failure::new(status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, e.to_string())
            })?;
        if !matched {
            report.unsupported.push(tag);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, VR};

    fn identifier(level: &str) -> InMemDicomObject {
        InMemDicomObject::from_element_iter([
            DataElement::new(tags::QUERY_RETRIEVE_LEVEL, VR::CS, level),
            DataElement::new(tags::PATIENT_ID, VR::LO, "P1"),
            DataElement::new(tags::PATIENT_AGE, VR::AS, "030Y"),
            DataElement::new(tags::STUDY_DESCRIPTION, VR::LO, ""),
        ])
    }

    #[test]
    fn study_root_has_no_patient_level() {
        assert_eq!(
            QrLevel::of(Model::PatientRoot, &identifier("PATIENT")),
            Ok(QrLevel::Patient)
        );
        let e = QrLevel::of(Model::StudyRoot, &identifier("PATIENT")).unwrap_err();
        assert_eq!(e.status, status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS);
        assert!(QrLevel::of(Model::StudyRoot, &identifier("")).is_err());
    }

    #[test]
    fn keys_go_through_the_matching_engine_and_unknown_ones_are_reported() {
        let mut q = Query::new(Level::Study);
        let report = add_keys(&mut q, &identifier("STUDY"), |_| true).unwrap();
        assert_eq!(report.unsupported, vec![tags::PATIENT_AGE]);
        let (sql, _) = q.where_clause();
        assert_eq!(sql, "st.patient_id = ?");
        let bad = InMemDicomObject::from_element_iter([DataElement::new(
            tags::STUDY_DATE,
            VR::DA,
            "2020",
        )]);
        let e = add_keys(&mut Query::new(Level::Study), &bad, |_| true).unwrap_err();
        assert_eq!(e.status, status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS);
    }
}
