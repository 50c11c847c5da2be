//! What a person opens in a browser:
//!
//! - [`browser`]: `/`, the gateway's own study browser (a static page searching with QIDO-RS);
//! - [`download`]: `/download/studies/{study}`, a study as a streamed ZIP of its Part-10 files
//!   (written by [`zip`]);
//! - [`ohif`]: `/viewer/`, the OHIF viewer's built files, rewritten for that prefix ([`rewrite`]) and
//!   given an `app-config.js` that reads from the gateway's own DICOMweb.
//!
//! Reads only: the index through the same queries as DICOMweb, objects through `ObjectStore::get`.

mod browser;
mod download;
mod ohif;
mod rewrite;
mod zip;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use crate::dicomweb::WebState;
pub use ohif::Viewer;

/// Where OHIF is served.
pub const PREFIX: &str = "/viewer/";

/// The routes of the study browser and the viewer. `download` is the ZIP route, returned apart so that
/// the caller can put it behind the same audit trail as DICOMweb reads.
pub fn routers(web: Arc<WebState>, viewer: Arc<Viewer>) -> (Router, Router) {
    let pages = Router::new()
        .route("/", get(browser::page))
        .route("/viewer", get(|| async { Redirect::permanent(PREFIX) }))
        .route("/viewer/", get(viewer_file))
        .route("/viewer/{*path}", get(viewer_file))
        .with_state(viewer);
    let download = Router::new()
        .route("/download/studies/{study}", get(download::study))
        .with_state(web);
    (pages, download)
}

async fn viewer_file(
    State(viewer): State<Arc<Viewer>>,
    path: Option<Path<String>>,
    headers: HeaderMap,
) -> Response {
    let path = path.map(|Path(p)| p).unwrap_or_default();
    viewer.get(&path, &headers).await.into_response()
}
