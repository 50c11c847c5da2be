//! The audit layer of the HTTP router: one place that records an event for every DICOMweb, WADO-URI
//! and FHIR read or query, every ZIP export, and every refusal (401: login failure, 403: policy
//! denial, whatever the route), from the request's route and the response's status. Stores and
//! deletions that succeed are recorded by the index writer with their change, so here only their
//! failures are.

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use super::{record, Action, AuditEvent, Origin, Outcome, Protocol};
use crate::index::Index;
use crate::security::Identity;

/// The layer (`axum::middleware::from_fn_with_state`); it must run inside the one that sets the
/// request's [`Identity`].
pub async fn audit(State(index): State<Index>, request: Request, next: Next) -> Response {
    let who = request.extensions().get::<Identity>().cloned();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    if let Some(event) = classify(&method, &path, &query, status) {
        let who = who.unwrap_or_else(|| Identity::anonymous(None));
        let (action, protocol, study) = event;
        let mut event = AuditEvent::new(
            action,
            Origin::new(who, protocol),
            Outcome::of_http_status(status),
        )
        .study(&study)
        .query(if query.is_empty() {
            format!("{method} {path}")
        } else {
            format!("{method} {path}?{query}")
        });
        if action == Action::Query {
            event.patient_id = patient_param(&query);
        }
        if status >= 400 {
            event.outcome_description = format!("HTTP {status}");
        }
        record(&index, event);
    }
    response
}

/// What a request did: (action, protocol, study UID or empty); None for routes not audited
/// (health, the viewer's files, capability statements) and for successful stores and deletions.
fn classify(
    method: &Method,
    path: &str,
    query: &str,
    status: u16,
) -> Option<(Action, Protocol, String)> {
    let protocol = protocol_of(path)?;
    match status {
        401 => return Some((Action::LoginFailure, protocol, String::new())),
        403 => return Some((Action::PolicyDenial, protocol, String::new())),
        _ => {}
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let study_at = |i: usize| segments.get(i).map_or(String::new(), |s| s.to_string());
    match protocol {
        Protocol::DicomWeb => {
            let (segments, study) = (&segments[1..], study_at(2));
            match *method {
                // Each STOW-RS part is recorded by ingest; a request refused whole is recorded here.
                Method::POST => {
                    (![200, 202, 409].contains(&status)).then_some((Action::Store, protocol, study))
                }
                Method::DELETE => (status >= 300).then_some((Action::Delete, protocol, study)),
                Method::GET | Method::HEAD => {
                    let searched = matches!(
                        segments,
                        ["studies" | "series" | "instances"]
                            | ["studies", _, "series" | "instances"]
                            | ["studies", _, "series", _, "instances"]
                    );
                    if searched {
                        Some((Action::Query, protocol, study))
                    } else if segments.first() == Some(&"studies") && segments.len() >= 2 {
                        Some((Action::Retrieve, protocol, study))
                    } else {
                        None
                    }
                }
                _ => None,
            }
        }
        Protocol::WadoUri => {
            let study = form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "studyUID")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            Some((Action::Retrieve, protocol, study))
        }
        Protocol::Fhir => match segments[1..] {
            ["metadata"] => None,
            [_] => Some((Action::Query, protocol, String::new())),
            ["ImagingStudy", id] => Some((Action::Retrieve, protocol, id.to_string())),
            [_, _] => Some((Action::Retrieve, protocol, String::new())),
            _ => None,
        },
        Protocol::Http => Some((Action::Export, protocol, study_at(2))),
        Protocol::Dimse | Protocol::Application => None,
    }
}

fn protocol_of(path: &str) -> Option<Protocol> {
    let under = |root: &str| path == root || path.starts_with(&format!("{root}/"));
    if under(crate::dicomweb::ROOT) {
        Some(Protocol::DicomWeb)
    } else if path == "/wado" {
        Some(Protocol::WadoUri)
    } else if under(crate::fhir::ROOT) {
        Some(Protocol::Fhir)
    } else if path.starts_with("/download/studies/") {
        Some(Protocol::Http)
    } else {
        None
    }
}

/// The Patient ID a QIDO-RS search names, if any.
fn patient_param(query: &str) -> String {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "PatientID" || k == "00100020")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, status: u16) -> Option<(Action, Protocol, String)> {
        classify(&Method::GET, path, "", status)
    }

    #[test]
    fn routes_map_to_actions() {
        let q = |s: &str| Some((Action::Query, Protocol::DicomWeb, s.to_string()));
        let r = |s: &str| Some((Action::Retrieve, Protocol::DicomWeb, s.to_string()));
        assert_eq!(get("/dicomweb/studies", 200), q(""));
        assert_eq!(get("/dicomweb/studies/1.2/series", 200), q("1.2"));
        assert_eq!(
            get("/dicomweb/studies/1.2/series/3/instances", 200),
            q("1.2")
        );
        assert_eq!(get("/dicomweb/studies/1.2", 200), r("1.2"));
        assert_eq!(get("/dicomweb/studies/1.2/metadata", 200), r("1.2"));
        assert_eq!(
            get("/dicomweb/studies/1.2/series/3/instances/4/frames/1", 200),
            r("1.2")
        );
        assert_eq!(get("/dicomweb/studies/1.2/thumbnail", 404), r("1.2"));
        assert_eq!(
            get("/download/studies/1.2", 200),
            Some((Action::Export, Protocol::Http, "1.2".into()))
        );
        assert_eq!(
            get("/fhir/ImagingStudy/1.2", 200),
            Some((Action::Retrieve, Protocol::Fhir, "1.2".into()))
        );
        assert_eq!(
            get("/fhir/AuditEvent", 200),
            Some((Action::Query, Protocol::Fhir, String::new()))
        );
        assert_eq!(get("/fhir/metadata", 200), None);
        assert_eq!(get("/healthz", 200), None);
        assert_eq!(get("/viewer/index.html", 200), None);
        assert_eq!(
            classify(&Method::GET, "/wado", "requestType=WADO&studyUID=1.2", 200),
            Some((Action::Retrieve, Protocol::WadoUri, "1.2".into()))
        );
    }

    #[test]
    fn refusals_are_audited_on_every_route_and_successful_writes_by_the_writer() {
        assert_eq!(
            get("/dicomweb/studies", 401),
            Some((Action::LoginFailure, Protocol::DicomWeb, String::new()))
        );
        assert_eq!(
            get("/fhir/ImagingStudy", 403),
            Some((Action::PolicyDenial, Protocol::Fhir, String::new()))
        );
        assert_eq!(classify(&Method::POST, "/dicomweb/studies", "", 200), None);
        assert_eq!(
            classify(&Method::DELETE, "/dicomweb/studies/1.2", "", 204),
            None
        );
        assert_eq!(
            classify(&Method::DELETE, "/dicomweb/studies/1.2", "", 404),
            Some((Action::Delete, Protocol::DicomWeb, "1.2".into()))
        );
    }

    #[test]
    fn a_qido_search_names_its_patient() {
        assert_eq!(patient_param("PatientID=P%201&limit=2"), "P 1");
        assert_eq!(patient_param("limit=2"), "");
    }
}
