//! A small HTTP(S) client for the FHIR push, its token endpoint and patient lookups: hyper-util's
//! pooled client over hyper-rustls (native roots), one deadline per request, bodies read up to a
//! bound.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as Pool;
use hyper_util::rt::TokioExecutor;

/// Largest response body read (an OperationOutcome, a token, a search Bundle).
const MAX_BODY: usize = 4 << 20;

#[derive(Clone)]
pub struct Client {
    pool: Pool<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_slice(&self.body).context("response body is not the JSON expected")
    }
}

impl Client {
    pub fn new() -> anyhow::Result<Client> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::aws_lc_rs::default_provider())
            .context("loading the system's root certificates")?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Client {
            pool: Pool::builder(TokioExecutor::new()).build(https),
        })
    }

    /// Sends one request and reads the answer, all within `timeout`.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Option<Bytes>,
        timeout: Duration,
    ) -> anyhow::Result<Response> {
        let mut request = Request::builder().method(method).uri(url).header(
            "user-agent",
            concat!("dicom-gateway/", env!("CARGO_PKG_VERSION")),
        );
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| anyhow!("request to {url}: {e}"))?;
        let exchange = async {
            let response = self.pool.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| anyhow!("reading the answer: {e}"))?
                .to_bytes();
            anyhow::Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result.with_context(|| url.to_string()),
            Err(_) => bail!("{url}: no answer within {} s", timeout.as_secs_f32()),
        }
    }
}

/// `application/x-www-form-urlencoded` of `pairs`.
pub fn form(pairs: &[(&str, &str)]) -> Bytes {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    Bytes::from(s.finish())
}
