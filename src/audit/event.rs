//! The audit event model: who ([`Origin`]: the caller's [`Identity`] and the protocol), what
//! ([`Action`], the study / patient / instances concerned, the query), the [`Outcome`], and when.
//! The same event is stored in the index (`audit_events`) and served as a FHIR AuditEvent; its DICOM
//! codes (PS3.16 DCM, as PS3.15 A.5 uses them) are here so that every rendering agrees.

use crate::security::{Credential, Identity};

/// What was done. Each maps to a DICOM audit EventID (and, where PS3.15 gives one, an EventTypeCode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// An object stored (C-STORE, STOW-RS).
    Store,
    /// A search (C-FIND, QIDO-RS, FHIR search).
    Query,
    /// Instances read (WADO-RS, WADO-URI, C-MOVE, C-GET, rendered, FHIR read).
    Retrieve,
    /// Instances deleted (DICOMweb DELETE).
    Delete,
    /// A study taken out of the gateway as a file (the ZIP download).
    Export,
    /// Credentials refused (HTTP 401).
    LoginFailure,
    /// The policy refused the caller (HTTP 403, a DIMSE peer not allowed to query or retrieve).
    PolicyDenial,
    ApplicationStart,
    ApplicationStop,
}

/// A code of DICOM's controlled terminology (PS3.16, coding scheme "DCM").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DcmCode {
    pub code: &'static str,
    pub display: &'static str,
}

const fn dcm(code: &'static str, display: &'static str) -> DcmCode {
    DcmCode { code, display }
}

pub const ALL_ACTIONS: [Action; 9] = [
    Action::Store,
    Action::Query,
    Action::Retrieve,
    Action::Delete,
    Action::Export,
    Action::LoginFailure,
    Action::PolicyDenial,
    Action::ApplicationStart,
    Action::ApplicationStop,
];

impl Action {
    /// The name stored in the index.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Store => "store",
            Action::Query => "query",
            Action::Retrieve => "retrieve",
            Action::Delete => "delete",
            Action::Export => "export",
            Action::LoginFailure => "login-failure",
            Action::PolicyDenial => "policy-denial",
            Action::ApplicationStart => "application-start",
            Action::ApplicationStop => "application-stop",
        }
    }

    pub fn parse(name: &str) -> Option<Action> {
        ALL_ACTIONS.into_iter().find(|a| a.as_str() == name)
    }

    /// PS3.15 A.5.3 EventID.
    pub fn event_id(self) -> DcmCode {
        match self {
            Action::Store => dcm("110104", "DICOM Instances Transferred"),
            Action::Query => dcm("110112", "Query"),
            Action::Retrieve => dcm("110103", "DICOM Instances Accessed"),
            Action::Delete => dcm("110105", "DICOM Study Deleted"),
            Action::Export => dcm("110106", "Export"),
            Action::LoginFailure => dcm("110114", "User Authentication"),
            Action::PolicyDenial => dcm("110113", "Security Alert"),
            Action::ApplicationStart | Action::ApplicationStop => {
                dcm("110100", "Application Activity")
            }
        }
    }

    /// PS3.15 A.5.3 EventTypeCode, for the events that have one.
    pub fn event_type(self) -> Option<DcmCode> {
        match self {
            Action::LoginFailure => Some(dcm("110122", "Login")),
            Action::PolicyDenial => Some(dcm("110132", "Use of a restricted function")),
            Action::ApplicationStart => Some(dcm("110120", "Application Start")),
            Action::ApplicationStop => Some(dcm("110121", "Application Stop")),
            _ => None,
        }
    }

    /// EventActionCode: C(reate), R(ead), U(pdate), D(elete), E(xecute).
    pub fn action_code(self) -> &'static str {
        match self {
            Action::Store => "C",
            Action::Retrieve | Action::Export => "R",
            Action::Delete => "D",
            Action::Query
            | Action::LoginFailure
            | Action::PolicyDenial
            | Action::ApplicationStart
            | Action::ApplicationStop => "E",
        }
    }
}

/// EventOutcomeIndicator (PS3.15 A.5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success = 0,
    /// The request was refused or failed on the caller's side (4xx, a DIMSE refusal).
    MinorFailure = 4,
    /// The gateway failed (5xx, storage or index errors).
    SeriousFailure = 8,
    MajorFailure = 12,
}

impl Outcome {
    pub fn code(self) -> i64 {
        self as i64
    }

    pub fn from_code(code: i64) -> Outcome {
        match code {
            0 => Outcome::Success,
            4 => Outcome::MinorFailure,
            8 => Outcome::SeriousFailure,
            _ => Outcome::MajorFailure,
        }
    }

    /// The outcome of an HTTP exchange by its status.
    pub fn of_http_status(status: u16) -> Outcome {
        match status {
            0..=399 => Outcome::Success,
            400..=499 => Outcome::MinorFailure,
            _ => Outcome::SeriousFailure,
        }
    }
}

/// The protocol a request came by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Dimse,
    DicomWeb,
    WadoUri,
    Fhir,
    /// Other HTTP routes (the ZIP download, the viewer).
    Http,
    /// The gateway itself (start, stop).
    Application,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Dimse => "DIMSE",
            Protocol::DicomWeb => "DICOMweb",
            Protocol::WadoUri => "WADO-URI",
            Protocol::Fhir => "FHIR",
            Protocol::Http => "HTTP",
            Protocol::Application => "application",
        }
    }
}

/// Who asked, and by which protocol.
#[derive(Debug, Clone)]
pub struct Origin {
    pub who: Identity,
    pub protocol: Protocol,
}

impl Origin {
    pub fn new(who: Identity, protocol: Protocol) -> Origin {
        Origin { who, protocol }
    }

    /// The gateway itself (start and stop events).
    pub fn application() -> Origin {
        Origin {
            who: Identity::anonymous(None),
            protocol: Protocol::Application,
        }
    }
}

/// The name of a credential as stored.
pub fn credential_name(credential: &Credential) -> &'static str {
    match credential {
        Credential::Anonymous => "anonymous",
        Credential::Bearer => "bearer",
        Credential::ApiKey => "api-key",
        Credential::Basic => "basic",
        Credential::DimsePeer => "dimse-peer",
    }
}

/// One audited event, as recorded. Identifiers left empty are filled from the index when it is
/// recorded (the patient of `study_uid`).
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub action: Action,
    pub outcome: Outcome,
    pub outcome_description: String,
    pub origin: Origin,
    pub study_uid: String,
    pub patient_id: String,
    pub sop_class_uid: String,
    /// SOP Instance UIDs concerned, when the request names them.
    pub instances: Vec<String>,
    /// How many instances the event covers (may exceed `instances`, e.g. a C-MOVE of a study).
    pub instance_count: i64,
    /// The query as the caller asked it (query string, C-FIND identifier keys, request path).
    pub query: String,
}

impl AuditEvent {
    /// An event with nothing but who, what and how it ended.
    pub fn new(action: Action, origin: Origin, outcome: Outcome) -> AuditEvent {
        AuditEvent {
            action,
            outcome,
            outcome_description: String::new(),
            origin,
            study_uid: String::new(),
            patient_id: String::new(),
            sop_class_uid: String::new(),
            instances: Vec::new(),
            instance_count: 0,
            query: String::new(),
        }
    }

    pub fn study(mut self, study_uid: &str) -> AuditEvent {
        self.study_uid = study_uid.to_string();
        self
    }

    pub fn query(mut self, query: impl Into<String>) -> AuditEvent {
        self.query = query.into();
        self
    }

    pub fn described(mut self, description: impl Into<String>) -> AuditEvent {
        self.outcome_description = description.into();
        self
    }

    pub fn instances(mut self, count: usize) -> AuditEvent {
        self.instance_count = count as i64;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_names_round_trip() {
        for a in ALL_ACTIONS {
            assert_eq!(Action::parse(a.as_str()), Some(a));
        }
    }

    #[test]
    fn http_statuses_map_to_outcomes() {
        assert_eq!(Outcome::of_http_status(200), Outcome::Success);
        assert_eq!(Outcome::of_http_status(403), Outcome::MinorFailure);
        assert_eq!(Outcome::of_http_status(503), Outcome::SeriousFailure);
    }
}
