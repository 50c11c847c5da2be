//! `/`: the study browser, one static page (`browser.html`, compiled in) that searches with QIDO-RS
//! from the browser and links each study to the viewer and to its ZIP download. It needs nothing but
//! the gateway: no viewer installed, no third-party code.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("browser.html");

pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
