//! The HTTP gate: one layer around every route that finds out who is calling (an [`Identity`] put into
//! the request's extensions, read by handlers, the policy and the audit trail with
//! `Extension<Identity>`) and, with `[auth]` configured, answers 401 to a request for patient data
//! without valid credentials and 403 to one whose scopes lack the action it asks for.
//!
//! What each request asks for is read from its method and path ([`need`]), in one table, so that no
//! route can be added without being decided here.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::WWW_AUTHENTICATE;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::authenticate::Authenticator;
use super::policy::{Policy, Scope};
use super::{Action, Identity};
use crate::index::Index;

/// The layer's state: the authenticator (`None` when `[auth]` configures no credentials: every caller
/// is anonymous and its scopes are not checked), the policy, and the index it scopes reads with.
pub struct Gate {
    pub auth: Option<Authenticator>,
    pub policy: Arc<Policy>,
    pub index: Index,
}

/// What a request asks to do, and on which FHIR resource type (for SMART scopes).
#[derive(Debug, PartialEq, Eq)]
pub struct Need<'a> {
    pub action: Action,
    pub fhir_type: Option<&'a str>,
}

/// What `method` on `path` asks for; `None` for what holds no patient data (health, the study
/// browser's page, the viewer's files, the FHIR CapabilityStatement).
pub fn need<'a>(method: &Method, path: &'a str) -> Option<Need<'a>> {
    let open = ["/", "/healthz", "/readyz", "/viewer", "/fhir/metadata"];
    if open.contains(&path) || path.starts_with("/viewer/") {
        return None;
    }
    let writing = match *method {
        Method::POST | Method::PUT | Method::PATCH => Some(Action::Store),
        Method::DELETE => Some(Action::Delete),
        _ => None,
    };
    let dicom = |action| {
        Some(Need {
            action,
            fhir_type: None,
        })
    };
    if path == "/fhir-push/status" {
        return dicom(Action::Admin);
    }
    if let Some(rest) = path.strip_prefix("/fhir/") {
        let mut segments = rest.split('/');
        let fhir_type = segments.next().filter(|t| !t.is_empty());
        let has_id = segments.next().is_some_and(|id| !id.is_empty());
        let action = writing.unwrap_or(if has_id { Action::Read } else { Action::Search });
        return Some(Need { action, fhir_type });
    }
    if let Some(rest) = path.strip_prefix(crate::dicomweb::ROOT) {
        // QIDO-RS paths end in a collection (`/studies`, `.../series`, `.../instances`); UIDs are digits.
        let last = rest.rsplit('/').next().unwrap_or("");
        let searching = matches!(last, "studies" | "series" | "instances");
        return dicom(writing.unwrap_or(if searching {
            Action::Search
        } else {
            Action::Read
        }));
    }
    // WADO-URI, the ZIP download, the IHE Invoke Image Display redirect, and unknown paths.
    dicom(writing.unwrap_or(Action::Read))
}

/// The layer: identifies the caller, lets the request through or answers 401 / 403 / 404, and puts
/// the caller's [`Scope`] for the request's action into its extensions (searches apply it in the SQL).
pub async fn authenticate(State(gate): State<Arc<Gate>>, request: Request, next: Next) -> Response {
    let mut request = request;
    let address = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip());
    let result = match &gate.auth {
        Some(auth) => auth.authenticate(request.headers(), address).await,
        None => Ok(None),
    };
    let Some(need) = need(request.method(), request.uri().path()) else {
        // Open paths: credentials are optional there, and passed on when valid.
        let identity = result.ok().flatten();
        let identity = identity.unwrap_or_else(|| Identity::anonymous(address));
        request.extensions_mut().insert(identity);
        request.extensions_mut().insert(Scope::Nothing);
        return next.run(request).await;
    };
    let identity = match (&gate.auth, result) {
        (None, _) => Identity::anonymous(address),
        (Some(_), Ok(Some(identity))) if identity.scopes.allows(need.action, need.fhir_type) => {
            identity
        }
        (Some(auth), Ok(Some(identity))) => {
            tracing::info!(
                target: "audit",
                subject = %identity.subject,
                action = ?need.action,
                path = request.uri().path(),
                "refused: scope lacks the action"
            );
            return forbidden(auth, need.action);
        }
        (Some(auth), Ok(None)) => return refusal(StatusCode::UNAUTHORIZED, auth, None, ""),
        (Some(auth), Err(reason)) => {
            tracing::info!(
                target: "audit",
                address = ?address,
                path = request.uri().path(),
                %reason,
                "refused: invalid credentials"
            );
            let error = Some(("invalid_token", reason.as_str()));
            return refusal(StatusCode::UNAUTHORIZED, auth, error, "");
        }
    };
    let scope = gate.policy.scope(&identity, need.action);
    if let Scope::Studies(filters) = &scope {
        let path = request.uri().path();
        // A store names the study it adds to, which need not exist yet: not a read of it.
        let named =
            study_named(path, request.uri().query()).filter(|_| need.action != Action::Store);
        match named {
            // A study outside the scope is answered as a missing one, whatever the action.
            Some(study) => match gate.index.study_within(&study, filters).await {
                Ok(true) => {}
                Ok(false) => return not_found(path, &study),
                Err(e) => {
                    tracing::error!(error = %e, "policy: study scope not read");
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
            },
            // Searches of studies apply the scope in their SQL; other requests without a study
            // (STOW-RS, Patient resources) cannot be scoped yet, so a study-scoped caller is refused.
            None if scoped_search(need.action, need.fhir_type) => {}
            None if need.fhir_type == Some("Endpoint") => {}
            None => {
                tracing::info!(target: "audit", subject = %identity.subject, path, "refused by the policy");
                return policy_refusal(&gate, need.action);
            }
        }
    } else if scope == Scope::Nothing {
        tracing::info!(
            target: "audit",
            subject = %identity.subject,
            path = request.uri().path(),
            "refused by the policy"
        );
        return policy_refusal(&gate, need.action);
    }
    request.extensions_mut().insert(identity);
    request.extensions_mut().insert(scope);
    next.run(request).await
}

/// Whether a request of `action` on `fhir_type` is a search that applies the study scope in its SQL.
fn scoped_search(action: Action, fhir_type: Option<&str>) -> bool {
    action == Action::Search && matches!(fhir_type, None | Some("ImagingStudy"))
}

/// The study a request names: `/dicomweb/studies/{uid}...`, `/download/studies/{uid}`,
/// `/fhir/ImagingStudy/{uid}`, `/wado?studyUID=`.
pub fn study_named(path: &str, query: Option<&str>) -> Option<String> {
    let prefixes = [
        "/dicomweb/studies/",
        "/download/studies/",
        "/fhir/ImagingStudy/",
    ];
    for prefix in prefixes {
        if let Some(rest) = path.strip_prefix(prefix) {
            let uid = rest.split('/').next().unwrap_or("");
            return (!uid.is_empty()).then(|| uid.to_string());
        }
    }
    if path == "/wado" {
        return form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .find(|(k, _)| k == "studyUID")
            .map(|(_, v)| v.into_owned());
    }
    None
}

/// The 404 the handlers give for a missing study (DICOMweb's text, FHIR's OperationOutcome).
fn not_found(path: &str, study: &str) -> Response {
    if path.starts_with("/fhir/") {
        return crate::fhir::outcome::FhirError::NotFound(format!("no ImagingStudy {study}"))
            .into_response();
    }
    crate::dicomweb::error::ApiError::NotFound("no such study, series or instance".into())
        .into_response()
}

/// A refusal by the policy: 403 (with the Bearer challenge when `[auth]` is configured).
fn policy_refusal(gate: &Gate, action: Action) -> Response {
    match &gate.auth {
        Some(auth) => forbidden(auth, action),
        None => (StatusCode::FORBIDDEN, "forbidden\n").into_response(),
    }
}

fn forbidden(auth: &Authenticator, action: Action) -> Response {
    let scope = format!("{action:?}").to_lowercase();
    refusal(
        StatusCode::FORBIDDEN,
        auth,
        Some(("insufficient_scope", &format!("needs scope {scope}"))),
        &format!(", scope=\"{scope}\""),
    )
}

/// A 401 / 403 with its RFC 6750 challenge (`error` only when credentials were presented, as that RFC
/// asks) and, when basic is offered, a basic challenge too.
fn refusal(
    status: StatusCode,
    auth: &Authenticator,
    error: Option<(&str, &str)>,
    extra: &str,
) -> Response {
    let realm = auth.realm.replace(['"', '\\'], "");
    let mut challenge = format!("Bearer realm=\"{realm}\"");
    if let Some((code, description)) = error {
        let description = description.replace(['"', '\\'], "'");
        challenge.push_str(&format!(
            ", error=\"{code}\", error_description=\"{description}\""
        ));
    }
    challenge.push_str(extra);
    let body = match status {
        StatusCode::FORBIDDEN => "forbidden\n",
        _ => "authentication required\n",
    };
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    // Printable ASCII only (a reason may quote a header's bytes).
    let challenge: String = challenge
        .chars()
        .filter(|c| (' '..='~').contains(c))
        .collect();
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        headers.append(WWW_AUTHENTICATE, value);
    }
    if auth.offers_basic() && status == StatusCode::UNAUTHORIZED {
        if let Ok(value) = HeaderValue::from_str(&format!("Basic realm=\"{realm}\"")) {
            headers.append(WWW_AUTHENTICATE, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asks(method: Method, path: &str) -> Option<(Action, Option<&str>)> {
        need(&method, path).map(|n| (n.action, n.fhir_type))
    }

    #[test]
    fn every_route_asks_for_its_action() {
        use Action::*;
        assert_eq!(asks(Method::GET, "/healthz"), None);
        assert_eq!(asks(Method::GET, "/viewer/index.html"), None);
        assert_eq!(asks(Method::GET, "/fhir/metadata"), None);
        assert_eq!(asks(Method::GET, "/dicomweb/studies"), Some((Search, None)));
        assert_eq!(
            asks(Method::GET, "/dicomweb/studies/1.2/series/3.4/instances"),
            Some((Search, None))
        );
        assert_eq!(
            asks(Method::GET, "/dicomweb/studies/1.2"),
            Some((Read, None))
        );
        assert_eq!(
            asks(Method::GET, "/dicomweb/studies/1.2/metadata"),
            Some((Read, None))
        );
        assert_eq!(
            asks(Method::GET, "/dicomweb/studies/1.2/thumbnail"),
            Some((Read, None))
        );
        assert_eq!(asks(Method::POST, "/dicomweb/studies"), Some((Store, None)));
        assert_eq!(
            asks(Method::DELETE, "/dicomweb/studies/1.2"),
            Some((Delete, None))
        );
        assert_eq!(asks(Method::GET, "/wado"), Some((Read, None)));
        assert_eq!(
            asks(Method::GET, "/download/studies/1.2"),
            Some((Read, None))
        );
        assert_eq!(
            asks(Method::GET, "/fhir/ImagingStudy"),
            Some((Search, Some("ImagingStudy")))
        );
        assert_eq!(
            asks(Method::GET, "/fhir/Patient/p1"),
            Some((Read, Some("Patient")))
        );
        assert_eq!(asks(Method::GET, "/fhir-push/status"), Some((Admin, None)));
        assert_eq!(asks(Method::GET, "/anything-else"), Some((Read, None)));
    }

    #[test]
    fn the_study_a_request_names() {
        assert_eq!(
            study_named("/dicomweb/studies/1.2/series/3", None).as_deref(),
            Some("1.2")
        );
        assert_eq!(study_named("/dicomweb/studies", None), None);
        assert_eq!(
            study_named("/download/studies/1.5", None).as_deref(),
            Some("1.5")
        );
        assert_eq!(
            study_named("/fhir/ImagingStudy/1.6", None).as_deref(),
            Some("1.6")
        );
        let wado = Some("requestType=WADO&studyUID=1.7&seriesUID=8");
        assert_eq!(study_named("/wado", wado).as_deref(), Some("1.7"));
    }
}
