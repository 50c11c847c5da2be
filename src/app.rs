//! Wiring: opens storage and index, recovers from an interrupted previous run, and serves DIMSE and
//! HTTP until SIGINT/SIGTERM; then closes the listeners and lets the work in progress finish within
//! `[runtime] shutdown_grace_secs`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::header::CONTENT_TYPE;
use axum::http::{Extensions, HeaderMap, HeaderName, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::TryStreamExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;
use tower_http::CompressionLevel;

use crate::audit::{Action, AuditEvent, Origin, Outcome};
use crate::config::{Config, HttpConfig};
use crate::dicomweb::{self, WebState};
use crate::dimse;
use crate::http_server;
use crate::index::Index;
use crate::ingest::{spool, Ingestor};
use crate::storage::{self, ObjectStore};
use crate::viewer::{self, Viewer};

pub fn init_logging(level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour codes only on a terminal: a log file or the journal gets plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Opens storage and index, and tells the storage how to make the index's commits durable.
pub async fn open_store_and_index(
    config: &Config,
) -> anyhow::Result<(Arc<dyn ObjectStore>, Index)> {
    let store = storage::open(&config.storage).await?;
    let index = Index::open(&config.index.url, config.index.max_connections)
        .await
        .with_context(|| format!("opening index {}", config.index.url))?;
    let synced = index.clone();
    store.set_index_sync(Box::new(move || synced.sync_blocking()));
    Ok((store, index))
}

/// `dicom-gateway reconcile`: the full reconcile (every stored key against the index) that start-up
/// no longer runs when the storage records what may be unindexed; run while no gateway serves.
pub async fn reconcile_all(config: Config) -> anyhow::Result<()> {
    let (store, index) = open_store_and_index(&config).await?;
    let spool_dir = config.spool_path();
    std::fs::create_dir_all(&spool_dir)?;
    let ingestor = Arc::new(Ingestor::new(
        store.clone(),
        index.clone(),
        config.dimse.on_duplicate,
        spool_dir,
    )?);
    if let Some(keys) = store.unsettled() {
        reconcile_unsettled(&index, &ingestor, keys).await;
    }
    reconcile(store, index, ingestor).await;
    Ok(())
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    let (store, index) = open_store_and_index(&config).await?;
    crate::audit::set_source_id(&config.audit.source_id);
    let spool_dir = config.spool_path();
    std::fs::create_dir_all(&spool_dir)?;
    let stale = spool::clear_stale(&spool_dir)?;
    if stale > 0 {
        tracing::info!(stale, "removed spool files of objects never acknowledged");
    }
    let ingestor = Arc::new(Ingestor::new(
        store.clone(),
        index.clone(),
        config.dimse.on_duplicate,
        spool_dir,
    )?);
    // Before any listener opens, so that no new object can be mistaken for an orphan.
    match store.unsettled() {
        Some(keys) => reconcile_unsettled(&index, &ingestor, keys).await,
        None => reconcile(store.clone(), index.clone(), ingestor.clone()).await,
    }

    let uses_tls = !config.dimse.tls_bind.is_empty()
        || config.http.tls
        || config.dimse.peers.iter().any(|p| p.tls);
    let certificates = match uses_tls {
        true => Some(crate::tls::Certificates::load(&config.tls).context("loading [tls]")?),
        false => None,
    };
    let dimse_listener = bind("DIMSE", &config.dimse.bind).await?;
    let dimse_tls_listener = bind("DICOM TLS", &config.dimse.tls_bind).await?;
    let http_listener = bind("HTTP", &config.http.bind)
        .await?
        .context("http.bind is empty")?;
    let dimse_addrs = [&dimse_listener, &dimse_tls_listener]
        .into_iter()
        .flatten()
        .map(TcpListener::local_addr)
        .collect::<Result<Vec<_>, _>>()?;
    crate::exposure::check(&config, http_listener.local_addr()?, &dimse_addrs)?;
    let (stop, stopping) = tokio::sync::watch::channel(false);
    if let Some(certificates) = &certificates {
        tokio::spawn(certificates.clone().watch(stopping.clone()));
    }
    let store_for_close = store.clone();
    let policy = Arc::new(crate::security::policy::Policy::new(&config.policy.rules)?);
    let index_for_stop = index.clone();
    let activity = |action| AuditEvent::new(action, Origin::application(), Outcome::Success);
    crate::audit::record_now(&index, activity(Action::ApplicationStart)).await;
    let dimse_ctx = Arc::new(dimse::Context {
        config: config.dimse.clone(),
        ingestor: ingestor.clone(),
        index: index.clone(),
        store: store.clone(),
        shutdown: stopping.clone(),
        tls: certificates.clone(),
        policy: policy.clone(),
    });
    let web = Arc::new(WebState {
        index,
        store,
        ingestor,
        allow_delete: config.http.allow_delete,
        public_url: config.http.public_url.clone(),
        listen_port: http_listener.local_addr()?.port(),
        https: config.http.tls,
        stow: dicomweb::stow::StowConfig {
            max_request_size: config.http.max_stow_size,
            max_object_size: config.dimse.max_object_size,
            accept_private_sop_classes: config.dimse.accept_private_sop_classes,
        },
        qido_default_limit: config.http.qido_default_limit,
        qido_max_limit: config.http.qido_max_limit,
        renderer: Arc::new(crate::render::Renderer::new(
            config.render.concurrency(),
            config.render.thumbnail_size,
        )),
    });
    let fhir = crate::fhir::start(&config.fhir, &config.http.bind, web.clone())?;
    // The viewer reads from this gateway's DICOMweb: the configured public URL, else the page's origin.
    let public_root = (!config.http.public_url.is_empty()).then(|| {
        format!(
            "{}{}",
            config.http.public_url.trim_end_matches('/'),
            dicomweb::ROOT
        )
    });
    let ohif = Arc::new(Viewer::new(
        config.viewer.dir.clone(),
        viewer::PREFIX,
        public_root.as_deref(),
    ));
    let auth = crate::security::authenticate::Authenticator::from_config(&config.auth)?;
    if auth.is_none() {
        tracing::warn!("no [auth] configured: HTTP callers are not authenticated");
    }
    let gate = Arc::new(crate::security::http::Gate {
        auth,
        policy,
        index: web.index.clone(),
    });
    let router = http_server::with_limits(
        http_router(web, fhir, ohif, gate, &config.http),
        &config.http,
    );
    tracing::info!(addr = %http_listener.local_addr()?, https = config.http.tls, "HTTP listening");

    // Every association holds a slot until it ends: on shutdown, all slots back means all done.
    let slots = Arc::new(Semaphore::new(config.dimse.max_associations));
    // The plain and the TLS listener share the association cap.
    let listeners = [
        (dimse_listener, None),
        (dimse_tls_listener, certificates.clone()),
    ];
    let serving = listeners.into_iter().filter_map(|(listener, tls)| {
        let listener = listener?;
        Some(dimse::serve(
            listener,
            dimse_ctx.clone(),
            slots.clone(),
            tls,
        ))
    });
    let mut dimse_task = tokio::spawn(futures::future::try_join_all(serving));
    let http_config = config.http.clone();
    let http_tls = certificates.filter(|_| config.http.tls);
    let mut http_task = tokio::spawn(async move {
        http_server::serve(http_listener, router, &http_config, stopping, http_tls).await
    });
    tokio::select! {
        r = &mut dimse_task => return r?.map(drop),
        r = &mut http_task => return r?,
        _ = shutdown_signal() => {}
    }
    // Drain: no new associations or connections; what is in progress finishes within the grace
    // period (a C-STORE being received is received, stored and answered; an association between
    // messages is aborted, a keep-alive connection between requests closed).
    let grace = Duration::from_secs(config.runtime.shutdown_grace_secs);
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: finishing work in progress"
    );
    let _ = stop.send(true);
    let all_slots = u32::try_from(config.dimse.max_associations).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(grace, async {
        let _ = dimse_task.await;
        let _ = slots.acquire_many(all_slots).await;
        let _ = http_task.await;
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("shut down: all associations and requests finished"),
        Err(_) => tracing::warn!(
            grace_secs = grace.as_secs(),
            "shut down: work still in progress after the grace period was cut off"
        ),
    }
    crate::audit::record_now(&index_for_stop, activity(Action::ApplicationStop)).await;
    // A clean stop leaves the next start nothing to reconcile (if no store is still in flight).
    let closed = tokio::task::spawn_blocking(move || store_for_close.close()).await;
    if let Ok(Err(e)) = closed {
        tracing::warn!(error = %e, "storage not closed cleanly: the next start reconciles");
    }
    Ok(())
}

/// A listener on `addr`; none when `addr` is empty.
async fn bind(what: &str, addr: &str) -> anyhow::Result<Option<TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} to {addr}"))?;
    Ok(Some(listener))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn http_router(
    web: Arc<WebState>,
    fhir: Option<Arc<crate::fhir::FhirState>>,
    ohif: Arc<Viewer>,
    gate: Arc<crate::security::http::Gate>,
    http: &HttpConfig,
) -> Router {
    let cors_origins = &http.cors_allowed_origins;
    let health_state = web.clone();
    let (pages, download) = viewer::routers(web.clone(), ohif);
    let index = web.index.clone();
    let wado_uri = dicomweb::wado_uri_router(web.clone());
    let mut dicomweb = dicomweb::router(web);
    if http.compression {
        dicomweb = dicomweb.layer(
            CompressionLayer::new()
                .quality(CompressionLevel::Fastest)
                .compress_when(is_json),
        );
    }
    let mut router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let state = health_state.clone();
                async move { readiness(&state).await }
            }),
        )
        .merge(wado_uri)
        .nest(dicomweb::ROOT, dicomweb)
        .merge(download)
        .merge(pages);
    if let Some(fhir) = fhir {
        router = router.merge(crate::fhir::routes(fhir));
    }
    // Outside every route: each request is authenticated and its scopes checked, and the policy and the
    // audit trail find the caller in it (the audit layer runs inside `authenticate`, which sets it).
    router = router
        .layer(axum::middleware::from_fn_with_state(
            index,
            crate::audit::http::audit,
        ))
        .layer(axum::middleware::from_fn_with_state(
            gate,
            crate::security::http::authenticate,
        ))
        .layer(TraceLayer::new_for_http());
    if !cors_origins.is_empty() {
        let origins = if cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(cors_origins.iter().filter_map(|o| o.parse().ok()))
        };
        router = router.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([
                    Method::GET,
                    Method::HEAD,
                    Method::OPTIONS,
                    Method::POST,
                    Method::DELETE,
                ])
                .allow_headers([
                    HeaderName::from_static("authorization"),
                    HeaderName::from_static("accept"),
                    HeaderName::from_static("content-type"),
                ])
                .expose_headers([
                    HeaderName::from_static("warning"),
                    HeaderName::from_static("content-location"),
                ]),
        );
    }
    router
}

/// Only JSON answers are compressed: DICOM JSON is repetitive text that gzip's fastest level shrinks
/// well, while pixel data is either compressed already or served as it is stored (ranged reads).
fn is_json(_: StatusCode, _: axum::http::Version, headers: &HeaderMap, _: &Extensions) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.starts_with("application/dicom+json") || ct.starts_with("application/json")
        })
}

async fn readiness(state: &WebState) -> impl IntoResponse {
    let storage = state.store.health().await;
    let index = state.index.health().await;
    match (storage, index) {
        (Ok(()), Ok(())) => (StatusCode::OK, "ready".to_string()),
        (s, i) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "storage: {}\nindex: {}",
                s.err().map_or("ok".into(), |e| e.to_string()),
                i.err().map_or("ok".into(), |e| e.to_string())
            ),
        ),
    }
}

/// Start-up reconcile from what the storage says an interrupted run may have left unindexed (the
/// keys its write-ahead log holds since the last checkpoint): each one still stored and not indexed
/// under that key goes through ingest; then every key is settled. A clean shutdown leaves none.
async fn reconcile_unsettled(index: &Index, ingestor: &Ingestor, keys: Vec<String>) {
    let (mut recovered, mut failed) = (0usize, 0usize);
    let total = keys.len();
    for key in keys {
        let indexed = match storage::sop_instance_uid_of_key(&key) {
            Some(uid) => index.storage_key_of(uid).await.ok().flatten(),
            None => None,
        };
        if indexed.as_deref() != Some(key.as_str()) {
            match ingestor.store().exists(&key).await {
                Ok(false) => {}
                Ok(true) => match ingestor.index_stored_object(&key).await {
                    Ok(outcome) => {
                        recovered += 1;
                        tracing::info!(
                            key,
                            ?outcome,
                            "reconcile: indexed object stored by an interrupted run"
                        );
                    }
                    Err(e) => {
                        failed += 1;
                        tracing::error!(key, error = %e, "reconcile: cannot index stored object");
                    }
                },
                Err(e) => {
                    failed += 1;
                    tracing::error!(key, error = %e, "reconcile: cannot read storage");
                }
            }
        }
        ingestor.store().settle(&key);
    }
    tracing::info!(keys = total, recovered, failed, "reconcile finished");
}

/// Brings index and storage back in agreement after an interrupted run: objects stored but never
/// indexed (the process died between the two steps) are indexed now; index rows whose object is
/// missing (only possible if storage was altered behind our back) are reported.
async fn reconcile(store: Arc<dyn ObjectStore>, index: Index, ingestor: Arc<Ingestor>) {
    let indexed: HashSet<String> = match index.all_storage_keys().await {
        Ok(keys) => keys.into_iter().collect(),
        Err(e) => {
            tracing::error!(error = %e, "reconcile: cannot read index");
            return;
        }
    };
    let mut seen = HashSet::with_capacity(indexed.len());
    let mut recovered = 0usize;
    let mut keys = store.list();
    loop {
        let key = match keys.try_next().await {
            Ok(Some(key)) => key,
            Ok(None) => break,
            Err(e) => {
                tracing::error!(error = %e, "reconcile: cannot list storage");
                return;
            }
        };
        if indexed.contains(&key) {
            seen.insert(key);
            continue;
        }
        match ingestor.index_stored_object(&key).await {
            Ok(outcome) => {
                recovered += 1;
                tracing::info!(
                    key,
                    ?outcome,
                    "reconcile: indexed object stored by an interrupted run"
                );
            }
            Err(e) => tracing::error!(key, error = %e, "reconcile: cannot index stored object"),
        }
    }
    let missing: Vec<&String> = indexed.difference(&seen).collect();
    for key in &missing {
        tracing::error!(key = %key, "reconcile: index row without object in storage");
    }
    tracing::info!(
        objects = seen.len() + recovered,
        recovered,
        missing = missing.len(),
        "reconcile finished"
    );
}
