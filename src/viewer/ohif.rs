//! Serves the OHIF viewer's built files under `/viewer/`.
//!
//! The files stay on disk where `scripts/fetch-viewer` put them (`[viewer] dir`). The few that must be
//! rewritten for the prefix ([`super::rewrite`]: `index.html`, the webpack runtimes, stylesheets, the
//! manifest) are rewritten the first time they are asked for and kept in memory from then on (about
//! 30 MB for OHIF 3.13, once per process, not per request); every other file is streamed from disk.
//! `app-config.js` is generated, not read. A path that names no file and has no extension is one of
//! OHIF's client-side routes (`/viewer/viewer?StudyInstanceUIDs=…`) and gets `index.html`.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use bytes::Bytes;
use tokio_util::io::ReaderStream;

use super::rewrite::{self, Kind};

/// Content-hashed names (`app.bundle.0f6159c501addfe9.js`, `0ddf166f7a343eda.wasm`) never change
/// content: browsers may keep them for a year without asking again.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Everything else is revalidated (by ETag) on each use, so a new viewer build is seen at once.
const REVALIDATE: &str = "no-cache";

/// A file as it is served, decided on its first request.
enum Served {
    /// The rewritten content, kept in memory.
    Rewritten(Bytes),
    /// Served from disk byte for byte.
    AsIs,
}

pub struct Viewer {
    dir: PathBuf,
    /// `/viewer/`: where the files are served.
    prefix: String,
    app_config: Bytes,
    /// Per path: the ETag of the file it was decided for (a new fetch of the viewer changes it) and how
    /// it is served.
    served: Mutex<HashMap<String, (String, Arc<Served>)>>,
}

impl Viewer {
    /// `dicomweb_root`: the configured public DICOMweb URL, or `None` for the page's own origin.
    pub fn new(dir: PathBuf, prefix: &str, dicomweb_root: Option<&str>) -> Viewer {
        Viewer {
            dir,
            prefix: prefix.to_string(),
            app_config: Bytes::from(rewrite::app_config(prefix, dicomweb_root)),
            served: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the viewer's files are there (checked per request, so that fetching them needs no restart).
    fn installed(&self) -> bool {
        self.dir.join("index.html").is_file()
    }

    /// The answer to `GET {prefix}{path}` (`path` already percent-decoded by the router).
    pub async fn get(&self, path: &str, headers: &HeaderMap) -> Response {
        if !self.installed() {
            return not_installed(&self.dir);
        }
        let Some(path) = clean(path) else {
            return (StatusCode::NOT_FOUND, "no such file").into_response();
        };
        if path == "app-config.js" {
            return with_cache(
                bytes_response(self.app_config.clone(), "text/javascript; charset=utf-8"),
                REVALIDATE,
            );
        }
        let file = self.dir.join(&path);
        let path = match tokio::fs::metadata(&file).await {
            Ok(meta) if meta.is_file() => path,
            _ if path.is_empty() || !last_segment(&path).contains('.') => "index.html".to_string(),
            _ => return (StatusCode::NOT_FOUND, "no such file in the viewer").into_response(),
        };
        match self.serve_file(&path, headers).await {
            Ok(response) => response,
            Err(e) => {
                tracing::error!(path, error = %e, "viewer: cannot read file");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot read the viewer's file",
                )
                    .into_response()
            }
        }
    }

    async fn serve_file(&self, path: &str, headers: &HeaderMap) -> std::io::Result<Response> {
        let file = self.dir.join(path);
        let meta = tokio::fs::metadata(&file).await?;
        let cache = if is_content_hashed(last_segment(path)) {
            IMMUTABLE
        } else {
            REVALIDATE
        };
        // Size and modification time: a new fetch of the viewer changes both.
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let etag = format!("\"{:x}-{:x}\"", meta.len(), mtime);
        if headers
            .get(header::IF_NONE_MATCH)
            .is_some_and(|v| v.as_bytes() == etag.as_bytes())
        {
            let mut response = StatusCode::NOT_MODIFIED.into_response();
            set_header(&mut response, header::ETAG, &etag);
            return Ok(with_cache(response, cache));
        }
        let media_type = media_type(path);
        let served = self.served(path, &file, &etag).await?;
        let mut response = match &*served {
            Served::Rewritten(bytes) => bytes_response(bytes.clone(), media_type),
            Served::AsIs => {
                let f = tokio::fs::File::open(&file).await?;
                let mut response = Response::new(Body::from_stream(ReaderStream::with_capacity(
                    f,
                    256 * 1024,
                )));
                set_header(&mut response, header::CONTENT_TYPE, media_type);
                set_header(
                    &mut response,
                    header::CONTENT_LENGTH,
                    &meta.len().to_string(),
                );
                response
            }
        };
        set_header(&mut response, header::ETAG, &etag);
        Ok(with_cache(response, cache))
    }

    /// How `path` is served: looked up, or decided now by reading and rewriting it once.
    async fn served(&self, path: &str, file: &Path, etag: &str) -> std::io::Result<Arc<Served>> {
        if let Some((seen, served)) = self.served.lock().expect("viewer cache").get(path) {
            if seen == etag {
                return Ok(served.clone());
            }
        }
        let kind = Kind::of(path);
        let served = if kind == Kind::Verbatim {
            Served::AsIs
        } else {
            let bytes = tokio::fs::read(file).await?;
            let text = String::from_utf8_lossy(&bytes);
            match rewrite::rewrite(kind, &text, &self.prefix) {
                Some(rewritten) => Served::Rewritten(Bytes::from(rewritten)),
                None => Served::AsIs,
            }
        };
        let served = Arc::new(served);
        self.served
            .lock()
            .expect("viewer cache")
            .insert(path.to_string(), (etag.to_string(), served.clone()));
        Ok(served)
    }
}

/// `path` as a relative path of plain components joined by `/`, or `None` when it tries to leave the
/// viewer's directory (`..`, an absolute path, a Windows prefix).
fn clean(path: &str) -> Option<String> {
    let mut parts = Vec::new();
    for component in Path::new(path.trim_start_matches('/')).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(parts.join("/"))
}

fn last_segment(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Whether a file name carries a webpack content hash: a dot-separated part of 16 or more hex digits.
fn is_content_hashed(name: &str) -> bool {
    name.split('.')
        .any(|part| part.len() >= 16 && part.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Media types of what OHIF's build contains; `.wasm` must be `application/wasm` for the browser to
/// compile it while it streams, and workers must be JavaScript.
fn media_type(path: &str) -> &'static str {
    let ext = last_segment(path).rsplit_once('.').map_or("", |(_, e)| e);
    match ext.to_ascii_lowercase().as_str() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "wasm" => "application/wasm",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "ttf" => "font/ttf",
        "xml" => "application/xml",
        "txt" => "text/plain; charset=utf-8",
        "onnx" => "application/octet-stream",
        _ => "application/octet-stream",
    }
}

fn bytes_response(bytes: Bytes, media_type: &str) -> Response {
    let mut response = Response::new(Body::from(bytes));
    set_header(&mut response, header::CONTENT_TYPE, media_type);
    response
}

fn with_cache(mut response: Response, cache: &'static str) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    response
}

fn set_header(response: &mut Response, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}

/// What `/viewer/` says when the viewer has not been fetched.
fn not_installed(dir: &Path) -> Response {
    let dir = escape_html(&dir.display().to_string());
    let page = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Viewer not installed</title></head>
<body style="font-family:sans-serif;max-width:48em;margin:2em auto">
<h1>The OHIF viewer is not installed</h1>
<p>The gateway serves the OHIF viewer from <code>{dir}</code> (<code>[viewer] dir</code> in the
configuration), which holds no <code>index.html</code>. Fetch the viewer there with</p>
<pre>scripts/fetch-viewer {dir}</pre>
<p>(it needs <code>npm</code>; it downloads the built <code>@ohif/app</code> package, about 60 MB) and reload
this page: no restart is needed.</p>
<p>The <a href="/">study browser</a> works without the viewer.</p>
</body></html>"#
    );
    (StatusCode::NOT_FOUND, Html(page)).into_response()
}

/// Text made safe to put in HTML (element content or a quoted attribute).
fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_leave_the_viewer_directory() {
        assert_eq!(clean("assets/a.png").as_deref(), Some("assets/a.png"));
        assert_eq!(clean("/./index.html").as_deref(), Some("index.html"));
        assert_eq!(clean("").as_deref(), Some(""));
        assert_eq!(clean("../etc/passwd"), None);
        assert_eq!(clean("assets/../../x"), None);
    }

    #[test]
    fn only_content_hashed_names_are_immutable() {
        assert!(is_content_hashed("app.bundle.0f6159c501addfe9.js"));
        assert!(is_content_hashed("0ddf166f7a343eda.wasm"));
        assert!(!is_content_hashed("app.bundle.css"));
        assert!(!is_content_hashed("index.html"));
        assert!(!is_content_hashed("app-config.js"));
    }

    #[tokio::test]
    async fn files_are_rewritten_once_spa_routes_get_index_html_and_app_config_is_generated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("index.html"),
            r#"<script>window.PUBLIC_URL="/"</script><script src="/app.bundle.0123456789abcdef.js"></script>"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("app.bundle.0123456789abcdef.js"),
            "__webpack_require__.p = \"/\";",
        )
        .unwrap();
        std::fs::write(dir.path().join("0123456789abcdef.wasm"), b"\0asm").unwrap();
        let viewer = Viewer::new(dir.path().to_path_buf(), "/viewer/", None);
        let none = HeaderMap::new();
        let body = |r: Response| async move {
            axum::body::to_bytes(r.into_body(), usize::MAX)
                .await
                .unwrap()
        };

        for route in ["", "viewer", "viewer/dicomweb"] {
            let r = viewer.get(route, &none).await;
            assert_eq!(r.status(), StatusCode::OK, "{route}");
            assert_eq!(r.headers()[header::CACHE_CONTROL], REVALIDATE);
            assert!(String::from_utf8(body(r).await.to_vec())
                .unwrap()
                .contains(r#"src="/viewer/app.bundle.0123456789abcdef.js""#));
        }
        let r = viewer.get("app.bundle.0123456789abcdef.js", &none).await;
        assert_eq!(r.headers()[header::CACHE_CONTROL], IMMUTABLE);
        assert_eq!(&body(r).await[..], b"__webpack_require__.p = \"/viewer/\";");

        let r = viewer.get("0123456789abcdef.wasm", &none).await;
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/wasm");
        let etag = r.headers()[header::ETAG].clone();
        assert_eq!(&body(r).await[..], b"\0asm");
        let mut conditional = HeaderMap::new();
        conditional.insert(header::IF_NONE_MATCH, etag);
        let r = viewer.get("0123456789abcdef.wasm", &conditional).await;
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);

        let r = viewer.get("app-config.js", &none).await;
        assert!(String::from_utf8(body(r).await.to_vec())
            .unwrap()
            .contains("routerBasename: \"/viewer\""));

        // A missing asset is a 404, not index.html passed off as a script.
        let r = viewer.get("missing.0123456789abcdef.js", &none).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = viewer.get("../secret", &none).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);

        std::fs::remove_file(dir.path().join("index.html")).unwrap();
        let r = viewer.get("", &none).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(String::from_utf8(body(r).await.to_vec())
            .unwrap()
            .contains("scripts/fetch-viewer"));
    }
}
