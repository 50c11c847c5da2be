//! DICOMweb out (PS3.18), mounted under `/dicomweb`:
//!
//! - [`qido`]: QIDO-RS search over the index;
//! - [`metadata`]: WADO-RS metadata, served from the DICOM JSON kept in the index;
//! - [`retrieve`]: WADO-RS instances, frames and bulk data, streamed from storage;
//! - [`delete`]: DELETE of studies, series and instances (off unless configured);
//! - [`stow`]: STOW-RS, instances stored through ingest (the path C-STORE takes);
//! - [`rendered`]: rendered images and thumbnails (JPEG, PNG, GIF) of studies, series, instances
//!   and frames; [`wado_uri`]: WADO-URI, mounted at the server root (`/wado`);
//! - [`media`], [`multipart`], [`error`]: content negotiation, streamed multipart bodies, errors.
//!
//! Architecture invariant: QIDO and metadata never touch object storage.

mod delete;
pub mod error;
mod media;
mod metadata;
mod multipart;
mod qido;
#[cfg(fuzzing)]
pub use qido::sql_for_fuzzing as qido_sql_for_fuzzing;
mod rendered;
mod retrieve;
pub mod stow;
mod wado_uri;

use std::sync::Arc;

use axum::http::HeaderMap;
use axum::routing::get;
use axum::Router;

use crate::index::Index;
use crate::ingest::Ingestor;
use crate::render::Renderer;
use crate::storage::ObjectStore;
pub use error::ApiError;

pub const ROOT: &str = "/dicomweb";

pub struct WebState {
    pub index: Index,
    pub store: Arc<dyn ObjectStore>,
    /// Deletions go through ingest, the one writer of storage and index.
    pub ingestor: Arc<Ingestor>,
    pub allow_delete: bool,
    /// Configured public URL (without trailing slash), or empty to use the Host header.
    pub public_url: String,
    /// The port we listen on, for a Host header that names no port (some clients omit it).
    pub listen_port: u16,
    /// The HTTP listener speaks HTTPS (the scheme of URLs built from the Host header).
    pub https: bool,
    pub stow: stow::StowConfig,
    /// QIDO-RS page size without `limit`, and the largest `limit` honoured.
    pub qido_default_limit: u64,
    pub qido_max_limit: u64,
    /// Rendered images, thumbnails and WADO-URI images.
    pub renderer: Arc<Renderer>,
}

impl WebState {
    /// The DICOMweb base URL clients should use, e.g. `http://host:8080/dicomweb`.
    pub fn base_url(&self, headers: &HeaderMap) -> String {
        base_url(&self.public_url, self.listen_port, self.https, headers)
    }
}

/// The base URL from the configured public URL, else the forwarding headers of a reverse proxy, else
/// the Host header (completed with our port when it names none).
fn base_url(public_url: &str, listen_port: u16, https: bool, headers: &HeaderMap) -> String {
    if !public_url.is_empty() {
        return format!("{}{ROOT}", public_url.trim_end_matches('/'));
    }
    let forwarded = headers
        .get("x-forwarded-host")
        .and_then(|h| h.to_str().ok());
    let host = match forwarded {
        Some(host) => host.to_string(),
        None => {
            let host = headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost");
            // "host", "1.2.3.4" or "[::1]" without a port: the client reached us directly.
            let has_port = host.rsplit_once(':').is_some_and(|(h, p)| {
                !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':')
            });
            if has_port {
                host.to_string()
            } else {
                format!("{host}:{}", listen_port)
            }
        }
    };
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .unwrap_or(if https { "https" } else { "http" });
    format!("{scheme}://{host}{ROOT}")
}

pub fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/studies", get(qido::studies).post(stow::store))
        .route("/series", get(qido::series))
        .route("/instances", get(qido::instances))
        .route(
            "/studies/{study}",
            get(retrieve::study)
                .post(stow::store_in_study)
                .delete(delete::study),
        )
        .route("/studies/{study}/metadata", get(metadata::study))
        .route("/studies/{study}/series", get(qido::study_series))
        .route("/studies/{study}/instances", get(qido::study_instances))
        .route(
            "/studies/{study}/series/{series}",
            get(retrieve::series).delete(delete::series),
        )
        .route(
            "/studies/{study}/series/{series}/metadata",
            get(metadata::series),
        )
        .route(
            "/studies/{study}/series/{series}/instances",
            get(qido::series_instances),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}",
            get(retrieve::instance).delete(delete::instance),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/metadata",
            get(metadata::instance),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
            get(retrieve::frames),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/bulk/{*path}",
            get(retrieve::bulk),
        )
        .route("/studies/{study}/rendered", get(rendered::study))
        .route("/studies/{study}/thumbnail", get(rendered::study_thumbnail))
        .route(
            "/studies/{study}/series/{series}/rendered",
            get(rendered::series),
        )
        .route(
            "/studies/{study}/series/{series}/thumbnail",
            get(rendered::series_thumbnail),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/rendered",
            get(rendered::instance),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
            get(rendered::instance_thumbnail),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
            get(rendered::frames),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/thumbnail",
            get(rendered::frames_thumbnail),
        )
        .with_state(state)
}

/// WADO-URI, mounted at the server root: `GET /wado?requestType=WADO&...`.
pub fn wado_uri_router(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/wado", get(wado_uri::wado))
        .with_state(state)
}

/// Rejects path UIDs that are not UIDs (400) before they reach the index.
fn check_uids(uids: &[&str]) -> Result<(), ApiError> {
    for uid in uids {
        if !crate::index::query::is_valid_uid(uid) {
            return Err(ApiError::BadRequest(format!("{uid:?} is not a valid UID")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn base_url_comes_from_config_then_forwarding_headers_then_host() {
        let url = |h: &[(&'static str, &'static str)]| base_url("", 8080, false, &headers(h));
        assert_eq!(url(&[("host", "pacs:9000")]), "http://pacs:9000/dicomweb");
        // A Host header without a port (some clients send one) means our own port.
        assert_eq!(
            url(&[("host", "127.0.0.1")]),
            "http://127.0.0.1:8080/dicomweb"
        );
        assert_eq!(url(&[("host", "[::1]")]), "http://[::1]:8080/dicomweb");
        assert_eq!(
            base_url("", 8443, true, &headers(&[("host", "pacs:8443")])),
            "https://pacs:8443/dicomweb"
        );
        assert_eq!(
            url(&[
                ("host", "internal:8080"),
                ("x-forwarded-host", "pacs.example.org"),
                ("x-forwarded-proto", "https")
            ]),
            "https://pacs.example.org/dicomweb"
        );
        assert_eq!(
            base_url(
                "https://imaging.example.org/",
                8080,
                false,
                &headers(&[("host", "x:1")])
            ),
            "https://imaging.example.org/dicomweb"
        );
    }
}
