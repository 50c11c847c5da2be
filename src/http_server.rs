//! The HTTP server: connections accepted and served by hyper with the limits axum's own `serve` does
//! not offer (a deadline for a request's head, its largest size), the request limits as tower layers
//! (body size, concurrent requests, time to the response), and a graceful shutdown.
//!
//! A client that opens a connection and sends a request head slowly (slowloris) is cut off after
//! `header_read_timeout_secs`; a head larger than `max_header_size` is refused (431). Once a request
//! is read, `request_timeout_secs` bounds the time to its response's head (408): a response body
//! (a streamed study) may take longer, its pace set by the client. Beyond `max_concurrent_requests`
//! requests wait for a free slot; a body beyond `max_body_size` is refused (413), except STOW-RS's
//! (held to `max_stow_size` by STOW itself).
//!
//! With `[http] tls`, connections are HTTPS: the TLS handshake must end within
//! `header_read_timeout_secs`, and a client that offers HTTP/2 by ALPN gets it (headers held to
//! `max_header_size`, idle connections pinged); others get HTTP/1.1 with the limits above. Plain
//! HTTP is HTTP/1.1 only (plain-HTTP clients do not speak HTTP/2 without being told to).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tower::ServiceExt;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::config::HttpConfig;
use crate::dimse::stopped;
use crate::tls::Certificates;

/// The request limits of `config` around `router`. STOW-RS requests are exempt from the body size
/// and response-time limits: their bodies are studies (held to `max_stow_size` by STOW itself, streamed
/// to the spool, never in memory) and their response comes only once every part is stored.
pub fn with_limits(router: Router, config: &HttpConfig) -> Router {
    let slots = Arc::new(Semaphore::new(config.max_concurrent_requests));
    let limited = router
        .clone()
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(config.request_timeout_secs),
        ))
        .layer(RequestBodyLimitLayer::new(config.max_body_size));
    let dispatch = tower::service_fn(move |request: Request| {
        let service = if is_stow(&request) {
            router.clone()
        } else {
            limited.clone()
        };
        service.oneshot(request)
    });
    Router::new()
        .fallback_service(dispatch)
        .layer(axum::middleware::from_fn_with_state(
            slots,
            one_of_the_slots,
        ))
}

/// STOW-RS: a POST to the DICOMweb studies resource (the only requests with a body this size).
fn is_stow(request: &Request) -> bool {
    request.method() == Method::POST
        && request
            .uri()
            .path()
            .starts_with(&format!("{}/studies", crate::dicomweb::ROOT))
}

/// Runs a request once a slot is free (until its response head is ready).
async fn one_of_the_slots(
    State(slots): State<Arc<Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    let _slot = slots.acquire_owned().await;
    next.run(request).await
}

/// Serves a hyper connection (HTTP/1.1 or HTTP/2: the same methods, no common trait) until it
/// ends or `shutdown` fires; then finishes the response in progress and closes.
macro_rules! drive {
    ($conn:expr, $shutdown:expr) => {{
        let mut conn = std::pin::pin!($conn);
        tokio::select! {
            result = conn.as_mut() => result,
            _ = stopped($shutdown) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}

/// Serves `router` on `listener` until `shutdown` fires; then stops accepting and waits for the
/// connections' requests in progress to finish (idle keep-alive connections are closed at once).
/// The caller bounds that wait. With `tls`, connections are HTTPS.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: &HttpConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    tls: Option<Arc<Certificates>>,
) -> anyhow::Result<()> {
    let head_timeout = Duration::from_secs(config.header_read_timeout_secs);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(config.max_header_size);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_size).unwrap_or(u32::MAX))
        // HTTP/2 has no request-head deadline: a connection whose client stops answering pings
        // is closed instead.
        .keep_alive_interval(head_timeout)
        .keep_alive_timeout(head_timeout);
    // Every connection task holds a sender: once ours is dropped, `recv` ends when the last
    // connection has.
    let (alive, mut all_closed) = mpsc::channel::<()>(1);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::error!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        // Responses are written in pieces; without TCP_NODELAY the last piece waits for the
        // client's delayed ACK (~40 ms on Linux).
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone().map_request(
            move |request: hyper::Request<Incoming>| {
                let mut request = request.map(Body::new);
                with_host(&mut request);
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                request
            },
        ));
        let mut shutdown = shutdown.clone();
        let alive = alive.clone();
        let (h1, h2) = (builder.clone(), h2.clone());
        let tls = tls
            .as_ref()
            .map(|certificates| certificates.http_acceptor());
        tokio::spawn(async move {
            let result = match tls {
                None => drive!(
                    h1.serve_connection(TokioIo::new(tcp), service),
                    &mut shutdown
                ),
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(head_timeout, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "no TLS handshake in time");
                                return;
                            }
                        };
                    if stream.get_ref().1.alpn_protocol() == Some(&b"h2"[..]) {
                        drive!(
                            h2.serve_connection(TokioIo::new(stream), service),
                            &mut shutdown
                        )
                    } else {
                        drive!(
                            h1.serve_connection(TokioIo::new(stream), service),
                            &mut shutdown
                        )
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            drop(alive);
        });
    }
    tracing::info!("HTTP listener closed: finishing requests in progress");
    drop(alive);
    let _ = all_closed.recv().await;
    Ok(())
}

/// An HTTP/2 request names its host in the URI (`:authority`), not in a Host header: one is added,
/// so that URLs built from the Host header come out the same for HTTP/1.1 and HTTP/2.
fn with_host<B>(request: &mut hyper::Request<B>) {
    if request.headers().contains_key(hyper::header::HOST) {
        return;
    }
    let authority = request.uri().authority().map(|a| a.as_str().parse());
    if let Some(Ok(host)) = authority {
        request.headers_mut().insert(hyper::header::HOST, host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};

    fn limited(config: &HttpConfig) -> Router {
        let slow = || async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "late"
        };
        let echo = |body: axum::body::Bytes| async move { body.len().to_string() };
        with_limits(
            Router::new()
                .route("/slow", get(slow))
                .route("/echo", post(echo)),
            config,
        )
    }

    #[tokio::test]
    async fn a_request_answered_too_late_gets_408() {
        let config = HttpConfig {
            request_timeout_secs: 1,
            ..HttpConfig::default()
        };
        let request = Request::get("/slow").body(Body::empty()).unwrap();
        let started = std::time::Instant::now();
        let response = limited(&config).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_body_beyond_the_limit_gets_413() {
        let config = HttpConfig {
            max_body_size: 100,
            ..HttpConfig::default()
        };
        for (len, status) in [(100, StatusCode::OK), (101, StatusCode::PAYLOAD_TOO_LARGE)] {
            let request = Request::post("/echo")
                .body(Body::from(vec![0u8; len]))
                .unwrap();
            let response = limited(&config).oneshot(request).await.unwrap();
            assert_eq!(response.status(), status, "{len} bytes");
        }
    }
}
