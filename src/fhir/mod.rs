//! FHIR R4, mounted under `/fhir`: ImagingStudy (read, search), Patient and Endpoint answered from the
//! index, the CapabilityStatement, and the push of ImagingStudy to an EHR.
//!
//! - [`mapping`]: the one DICOM -> FHIR mapping, used for serving and pushing;
//! - [`search`]: search parameters -> an index filter; [`rest`]: the handlers; [`capability`]: what
//!   `/fhir/metadata` declares (the parameter table [`search`] implements);
//! - [`outcome`]: errors as OperationOutcome; [`subject`]: patient linking (identifier, local,
//!   external server); [`iid`]: the IHE Invoke Image Display launch link;
//! - [`push`]: the outbox worker that pushes stable studies, its [`auth`] to the server, and the
//!   [`http`] client both use.
//!
//! Architecture invariant: answers come from the index, never from object storage; pushes are
//! claimed through the index (no node-local job list).

pub mod auth;
mod capability;
pub mod http;
pub mod iid;
pub mod mapping;
pub mod outcome;
pub mod push;
mod rest;
mod search;
pub mod subject;

use std::sync::Arc;

use axum::http::HeaderMap;
use axum::routing::get;
use axum::Router;

use crate::config::FhirConfig;
use crate::dicomweb::WebState;
pub use outcome::FhirError;

pub const ROOT: &str = "/fhir";
pub const CONTENT_TYPE: &str = "application/fhir+json; charset=utf-8";

pub struct FhirState {
    pub web: Arc<WebState>,
    pub config: FhirConfig,
    pub subjects: Arc<subject::Linker>,
    /// The push worker's counters, when a push is configured.
    pub push: Option<Arc<push::Counters>>,
}

impl FhirState {
    /// The DICOMweb root clients reach, e.g. `http://host:8080/dicomweb`.
    pub fn dicomweb_root(&self, headers: &HeaderMap) -> String {
        self.web.base_url(headers)
    }

    /// The gateway's HTTP root, e.g. `http://host:8080`.
    pub fn http_root(&self, headers: &HeaderMap) -> String {
        let dicomweb = self.dicomweb_root(headers);
        dicomweb
            .strip_suffix(crate::dicomweb::ROOT)
            .unwrap_or(&dicomweb)
            .to_string()
    }

    /// The FHIR base, e.g. `http://host:8080/fhir`.
    pub fn fhir_base(&self, headers: &HeaderMap) -> String {
        format!("{}{ROOT}", self.http_root(headers))
    }
}

fn router() -> Router<Arc<FhirState>> {
    Router::new()
        .route("/metadata", get(rest::metadata))
        .route("/ImagingStudy", get(rest::search_studies))
        .route("/ImagingStudy/{id}", get(rest::read_study))
        .route("/Patient", get(rest::search_patients))
        .route("/Patient/{id}", get(rest::read_patient))
        .route("/Endpoint", get(rest::search_endpoints))
        .route("/Endpoint/{id}", get(rest::read_endpoint))
        .route("/AuditEvent", get(rest::search_audit_events))
        .route("/AuditEvent/{id}", get(rest::read_audit_event))
        .fallback(rest::unknown)
}

/// The FHIR routes (`/fhir`, `/IHEInvokeImageDisplay`, `/fhir-push/status`), to merge into the
/// gateway's router.
pub fn routes(state: Arc<FhirState>) -> Router {
    Router::new()
        .nest(ROOT, router())
        .route("/IHEInvokeImageDisplay", get(iid::invoke))
        .route("/fhir-push/status", get(push::status))
        .with_state(state)
}

/// Builds the FHIR state when `[fhir] enabled`, and starts the push worker when `[fhir.push] url`
/// is set.
pub fn start(
    config: &FhirConfig,
    http_bind: &str,
    web: Arc<WebState>,
) -> anyhow::Result<Option<Arc<FhirState>>> {
    if !config.enabled {
        return Ok(None);
    }
    let client = http::Client::new()?;
    let auth = Arc::new(auth::Auth::new(&config.push.auth, client.clone())?);
    let subjects = Arc::new(subject::Linker::new(
        config,
        client.clone(),
        Some(auth.clone()),
    ));
    let push = if config.push.url.is_empty() {
        None
    } else {
        let counters = Arc::new(push::Counters::default());
        // Pushed resources leave the gateway: their endpoints need an address others can reach.
        let dicomweb_root = if web.public_url.is_empty() {
            let host = match http_bind.rsplit_once(':').map(|(h, _)| h) {
                Some("0.0.0.0") | Some("[::]") | None => hostname(),
                Some(h) => h.to_string(),
            };
            let scheme = if web.https { "https" } else { "http" };
            let root = format!(
                "{scheme}://{host}:{}{}",
                web.listen_port,
                crate::dicomweb::ROOT
            );
            tracing::warn!(
                dicomweb_root = root,
                "FHIR push without http.public_url: pushed endpoints name this address"
            );
            root
        } else {
            web.base_url(&HeaderMap::new())
        };
        let http_root = dicomweb_root
            .strip_suffix(crate::dicomweb::ROOT)
            .unwrap_or(&dicomweb_root)
            .to_string();
        let pusher = Arc::new(push::Pusher {
            index: web.index.clone(),
            config: config.clone(),
            client,
            auth,
            subjects: subjects.clone(),
            owner: format!("{}-{}", hostname(), uuid::Uuid::new_v4()),
            counters: counters.clone(),
            dicomweb_root,
            http_root,
        });
        tokio::spawn(pusher.run());
        Some(counters)
    };
    Ok(Some(Arc::new(FhirState {
        web,
        config: config.clone(),
        subjects,
        push,
    })))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "gateway".into())
}
