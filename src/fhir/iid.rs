//! IHE Invoke Image Display (IID), the image display side: `GET /IHEInvokeImageDisplay` with
//! `requestType=STUDY&studyUID=...` (a comma list: the first) or `requestType=PATIENT&patientID=...`
//! redirects (303) to the configured viewer URL for that study or patient, or to the study's
//! DICOMweb series / the patient's QIDO-RS studies when no viewer is configured. ImagingStudy
//! names each study's link as a contained Endpoint of connection type `ihe-iid`.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::FhirState;
use crate::index::query::is_valid_uid;

fn refuse(status: StatusCode, message: String) -> Response {
    (
        status,
        [("content-type", "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub async fn invoke(
    State(state): State<Arc<FhirState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let params: Vec<(String, String)> = form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .into_owned()
        .collect();
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let dicomweb = state.dicomweb_root(&headers);
    let config = &state.config;
    let target = match get("requestType").as_deref() {
        Some("STUDY") => {
            let Some(study) = get("studyUID").and_then(|s| s.split(',').next().map(str::to_string))
            else {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "requestType=STUDY needs studyUID".into(),
                );
            };
            if !is_valid_uid(&study) {
                return refuse(StatusCode::BAD_REQUEST, format!("{study:?} is not a UID"));
            }
            let pool = state.web.index.read_pool();
            let patient = match crate::index::fhir::study(pool, &study).await {
                Ok(Some(doc)) => doc.patient_id,
                Ok(None) => {
                    return refuse(StatusCode::NOT_FOUND, format!("no study {study}"));
                }
                Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            };
            if config.viewer_url.is_empty() {
                format!("{dicomweb}/studies/{study}/series")
            } else {
                config
                    .viewer_url
                    .replace("{study}", &study)
                    .replace("{patient}", &encode(&patient))
                    .replace("{dicomweb}", &dicomweb)
            }
        }
        Some("PATIENT") => {
            let Some(patient) = get("patientID").filter(|p| !p.is_empty()) else {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "requestType=PATIENT needs patientID".into(),
                );
            };
            // IID sends patientID as CX (`id^^^issuer`): the ID is its first component.
            let patient = patient.split('^').next().unwrap_or("").to_string();
            if config.viewer_patient_url.is_empty() {
                format!("{dicomweb}/studies?PatientID={}", encode(&patient))
            } else {
                config
                    .viewer_patient_url
                    .replace("{patient}", &encode(&patient))
                    .replace("{dicomweb}", &dicomweb)
            }
        }
        other => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("requestType {other:?} is not supported (STUDY, PATIENT)"),
            )
        }
    };
    (StatusCode::SEE_OTHER, [("location", target)]).into_response()
}
