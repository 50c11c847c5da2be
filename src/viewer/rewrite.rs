//! Rewrites OHIF's prebuilt files for the prefix the gateway serves them under.
//!
//! `npm pack @ohif/app` ships a `dist/` built to be served at `/`: `index.html` sets
//! `window.PUBLIC_URL="/"` and names its scripts, styles and icons by absolute paths, every webpack
//! runtime (the app bundle and each worker bundle) sets its public path, from which chunks, workers and
//! `.wasm` codecs load, to `"/"`, the stylesheets load fonts from `url(/…)`, and the web manifest and
//! the service worker list absolute URLs. Each of these is rewritten to start with the prefix; nothing
//! else is touched, and a file none of the patterns match is served byte for byte from disk.

/// How a file of the viewer is rewritten, decided by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `index.html`: `window.PUBLIC_URL` and absolute `src`, `href`, `content` attributes.
    IndexHtml,
    /// JavaScript: the webpack public path (`__webpack_require__.p = "/"`).
    Script,
    /// The service worker `sw.js`: its precache list of absolute `"url":"/…"` entries as well.
    ServiceWorker,
    /// Stylesheets: `url(/…)` references (fonts).
    Stylesheet,
    /// `manifest.json`: absolute icon and start URLs.
    Manifest,
    /// Everything else (images, `.wasm`, fonts, …): served as is.
    Verbatim,
}

impl Kind {
    /// The kind of the file at `path` (relative to the viewer directory, `/`-separated).
    pub fn of(path: &str) -> Kind {
        let name = path.rsplit('/').next().unwrap_or(path);
        if path == "index.html" {
            Kind::IndexHtml
        } else if path == "sw.js" {
            Kind::ServiceWorker
        } else if path == "manifest.json" {
            Kind::Manifest
        } else if name.ends_with(".js") {
            Kind::Script
        } else if name.ends_with(".css") {
            Kind::Stylesheet
        } else {
            Kind::Verbatim
        }
    }
}

/// `content` rewritten for `prefix` (which starts and ends with `/`, e.g. `/viewer/`), or `None` when
/// no pattern occurs in it (the file is then served from disk as it is).
pub fn rewrite(kind: Kind, content: &str, prefix: &str) -> Option<String> {
    debug_assert!(prefix.starts_with('/') && prefix.ends_with('/'));
    let rewritten = match kind {
        Kind::IndexHtml => {
            let out = content.replace(
                "window.PUBLIC_URL=\"/\"",
                &format!("window.PUBLIC_URL=\"{prefix}\""),
            );
            ["src=\"", "href=\"", "content=\""]
                .iter()
                .fold(out, |out, attr| prefix_absolute(&out, attr, prefix))
        }
        Kind::Script => webpack_public_path(content, prefix),
        Kind::ServiceWorker => {
            prefix_absolute(&webpack_public_path(content, prefix), "\"url\":\"", prefix)
        }
        Kind::Stylesheet => ["url(", "url(\"", "url('"]
            .iter()
            .fold(content.to_string(), |out, opener| {
                prefix_absolute(&out, opener, prefix)
            }),
        Kind::Manifest => ["\"src\": \"", "\"start_url\": \"", "\"scope\": \""]
            .iter()
            .fold(content.to_string(), |out, key| {
                prefix_absolute(&out, key, prefix)
            }),
        Kind::Verbatim => return None,
    };
    (rewritten != content).then_some(rewritten)
}

/// The webpack runtime's `__webpack_require__.p = "/";` (unminified in OHIF's build) set to `prefix`.
fn webpack_public_path(content: &str, prefix: &str) -> String {
    content.replace(
        "__webpack_require__.p = \"/\";",
        &format!("__webpack_require__.p = \"{prefix}\";"),
    )
}

/// Every `opener` followed by an absolute path (`/x`, not a protocol-relative `//host`) gets the
/// prefix in front of that path: `src="/app.js"` becomes `src="/viewer/app.js"`.
fn prefix_absolute(content: &str, opener: &str, prefix: &str) -> String {
    let mut out = String::with_capacity(content.len() + 64);
    let mut rest = content;
    while let Some(at) = rest.find(opener) {
        let (before, after) = rest.split_at(at + opener.len());
        out.push_str(before);
        let bytes = after.as_bytes();
        if bytes.first() == Some(&b'/') && bytes.get(1) != Some(&b'/') {
            out.push_str(prefix);
            rest = &after[1..];
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// OHIF's `app-config.js`: a study list at the root of the prefix, and one DICOMweb data source, the
/// gateway's own. `dicomweb_root` is the configured public DICOMweb URL; `None` builds it in the
/// browser from `window.location.origin`, so that the viewer stays same-origin (no CORS) whatever host
/// name the user reached the gateway by.
pub fn app_config(prefix: &str, dicomweb_root: Option<&str>) -> String {
    let root = match dicomweb_root {
        Some(root) => js_string(root.trim_end_matches('/')),
        None => "window.location.origin + '/dicomweb'".to_string(),
    };
    let wado_uri = match dicomweb_root {
        // WADO-URI is served beside the DICOMweb root, at /wado.
        Some(root) => js_string(&format!(
            "{}/wado",
            root.trim_end_matches('/').trim_end_matches("/dicomweb")
        )),
        None => "window.location.origin + '/wado'".to_string(),
    };
    let basename = js_string(prefix.trim_end_matches('/'));
    format!(
        r#"/* Generated by dicom-gateway: OHIF reads studies from this gateway's DICOMweb. */
window.config = {{
  routerBasename: {basename},
  showStudyList: true,
  extensions: [],
  modes: [],
  customizationService: {{}},
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  maxNumRequests: {{ interaction: 100, thumbnail: 5, prefetch: 25 }},
  defaultDataSourceName: 'dicom-gateway',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicom-gateway',
      configuration: {{
        friendlyName: 'dicom-gateway',
        name: 'dicom-gateway',
        qidoRoot: {root},
        wadoRoot: {root},
        wadoUriRoot: {wado_uri},
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: {{ enabled: true }},
      }},
    }},
  ],
}};
"#
    )
}

/// A JavaScript string literal (JSON's escaping is valid JavaScript).
fn js_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/viewer/";

    #[test]
    fn index_html_gets_the_public_url_and_prefixed_absolute_attributes() {
        let html = r#"<script>console.time("x"),window.PUBLIC_URL="/"</script><link rel="manifest" href="/manifest.json"><meta name="msapplication-TileImage" content="/assets/mstile.png"><meta name="viewport" content="width=device-width"><script src="/app.bundle.0f61.js"></script><script src="//cdn.example.org/x.js"></script><a href="https://ohif.org/">"#;
        let out = rewrite(Kind::IndexHtml, html, P).unwrap();
        assert_eq!(
            out,
            r#"<script>console.time("x"),window.PUBLIC_URL="/viewer/"</script><link rel="manifest" href="/viewer/manifest.json"><meta name="msapplication-TileImage" content="/viewer/assets/mstile.png"><meta name="viewport" content="width=device-width"><script src="/viewer/app.bundle.0f61.js"></script><script src="//cdn.example.org/x.js"></script><a href="https://ohif.org/">"#
        );
    }

    #[test]
    fn bundles_get_the_webpack_public_path() {
        let js = "// webpack/runtime/public_path\n(() => {\n__webpack_require__.p = \"/\";\n})();\nvar x = \"/\";";
        let out = rewrite(Kind::Script, js, P).unwrap();
        assert!(out.contains("__webpack_require__.p = \"/viewer/\";"));
        // Other string literals that happen to be "/" are left alone.
        assert!(out.ends_with("var x = \"/\";"));
        // A bundle without a webpack runtime is served from disk unchanged.
        assert_eq!(
            rewrite(Kind::Script, "(__webpack_require__.p = '')", P),
            None
        );
    }

    #[test]
    fn stylesheet_font_urls_are_prefixed_in_every_quoting() {
        let css = "@font-face{src:url(/a34f.woff2) format(\"woff2\")}.a{background:url(\"/img/x.png\")}.b{background:url('/y.svg')}.c{background:url(data:image/png;base64,AA)}.d{background:url(//cdn/x.png)}";
        assert_eq!(
            rewrite(Kind::Stylesheet, css, P).unwrap(),
            "@font-face{src:url(/viewer/a34f.woff2) format(\"woff2\")}.a{background:url(\"/viewer/img/x.png\")}.b{background:url('/viewer/y.svg')}.c{background:url(data:image/png;base64,AA)}.d{background:url(//cdn/x.png)}"
        );
        assert_eq!(rewrite(Kind::Stylesheet, ".x{color:red}", P), None);
    }

    #[test]
    fn manifest_and_service_worker_urls_are_prefixed() {
        let manifest =
            "{\n  \"start_url\": \"/\",\n  \"icons\": [{ \"src\": \"/assets/a.png\" }]\n}";
        assert_eq!(
            rewrite(Kind::Manifest, manifest, P).unwrap(),
            "{\n  \"start_url\": \"/viewer/\",\n  \"icons\": [{ \"src\": \"/viewer/assets/a.png\" }]\n}"
        );
        let sw = r#"precacheAndRoute([{"revision":"1","url":"/781.css"},{"url":"https://x/y"}])"#;
        assert_eq!(
            rewrite(Kind::ServiceWorker, sw, P).unwrap(),
            r#"precacheAndRoute([{"revision":"1","url":"/viewer/781.css"},{"url":"https://x/y"}])"#
        );
    }

    #[test]
    fn kinds_follow_the_file_name() {
        assert_eq!(Kind::of("index.html"), Kind::IndexHtml);
        assert_eq!(Kind::of("app.bundle.0f6159c501addfe9.js"), Kind::Script);
        assert_eq!(Kind::of("sw.js"), Kind::ServiceWorker);
        assert_eq!(Kind::of("app.bundle.css"), Kind::Stylesheet);
        assert_eq!(Kind::of("manifest.json"), Kind::Manifest);
        assert_eq!(Kind::of("0ddf166f7a343eda.wasm"), Kind::Verbatim);
        assert_eq!(Kind::of("assets/index.html"), Kind::Verbatim);
    }

    #[test]
    fn app_config_points_at_the_gateway_and_escapes_the_configured_root() {
        let same_origin = app_config(P, None);
        assert!(same_origin.contains("routerBasename: \"/viewer\""));
        assert!(same_origin.contains("qidoRoot: window.location.origin + '/dicomweb'"));
        assert!(same_origin.contains("omitQuotationForMultipartRequest: true"));
        let configured = app_config(P, Some("https://pacs.example.org/dicomweb"));
        assert!(configured.contains("wadoRoot: \"https://pacs.example.org/dicomweb\""));
        assert!(configured.contains("wadoUriRoot: \"https://pacs.example.org/wado\""));
        // A hostile configured value cannot break out of its string literal.
        let hostile = app_config(P, Some("https://x/\"};alert(1);x"));
        assert!(hostile.contains(r#"qidoRoot: "https://x/\"};alert(1);x""#));
    }
}
