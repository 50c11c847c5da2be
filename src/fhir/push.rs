//! The push of ImagingStudy to the EHR's FHIR server (`[fhir.push]`), from the outbox in the index.
//!
//! The index writer bumps a study's version in the same transaction as every insert or deletion
//! (`index::outbox`), so no change can be lost to a crash or an unreachable server. This worker
//! claims pending studies that have been stable for `stability_ms` (a lease in the index: gateways
//! sharing the database never push the same study at once), builds each one as it is now (so the
//! latest state wins, however many changes it went through) and sends it as a conditional update
//! `PUT ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>`. A fully deleted study is sent with
//! status `entered-in-error`, or conditionally deleted (`on_delete`).
//!
//! Failures: network errors, 5xx, 408 and 429 are retried with exponential backoff and jitter
//! (Retry-After honoured); 401 drops the cached token and retries; any other 4xx parks the study
//! (reported, not retried until it changes again).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::Method;
use serde_json::json;

use super::auth::{truncate, Auth};
use super::http::Client;
use super::mapping::{self, Context, Endpoints};
use super::subject::Linker;
use crate::config::{FhirConfig, OnDelete};
use crate::index::outbox::{self, Claimed, OutboxOp};
use crate::index::Index;

/// What this gateway's worker did since it started.
#[derive(Default)]
pub struct Counters {
    pub pushed: AtomicU64,
    pub failed: AtomicU64,
    pub parked: AtomicU64,
    pub last_error: std::sync::Mutex<Option<String>>,
}

pub struct Pusher {
    pub index: Index,
    pub config: FhirConfig,
    pub client: Client,
    pub auth: Arc<Auth>,
    pub subjects: Arc<Linker>,
    /// This process's claim owner id.
    pub owner: String,
    pub counters: Arc<Counters>,
    pub dicomweb_root: String,
    pub http_root: String,
}

/// How one push ended.
enum Outcome {
    Done(u16),
    Retry {
        error: String,
        after: Option<Duration>,
    },
    Park(String),
}

impl Pusher {
    /// Runs until the process ends: claims stable pending studies, pushes them
    /// `concurrency` at a time, reports the outbox every 30 s.
    pub async fn run(self: Arc<Self>) {
        let push = &self.config.push;
        tracing::info!(url = %push.url, owner = %self.owner, stability_ms = push.stability_ms,
            "FHIR push started");
        let mut last_report = Instant::now();
        loop {
            let claimed = self
                .index
                .outbox(OutboxOp::Claim {
                    owner: self.owner.clone(),
                    limit: push.concurrency as i64,
                    stable_before: outbox::now_ms() - push.stability_ms as i64,
                    lease_ms: push.lease_secs as i64 * 1000,
                })
                .await;
            let claimed = match claimed {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "FHIR push: cannot claim from the outbox");
                    Vec::new()
                }
            };
            let full = claimed.len() >= push.concurrency;
            futures::future::join_all(claimed.into_iter().map(|c| self.clone().push(c))).await;
            if last_report.elapsed() >= Duration::from_secs(30) {
                last_report = Instant::now();
                self.report().await;
            }
            if !full {
                tokio::time::sleep(Duration::from_millis(push.poll_ms)).await;
            }
        }
    }

    async fn report(&self) {
        match outbox::status(self.index.read_pool()).await {
            Ok(s) => tracing::info!(
                pending = s.pending,
                oldest_pending_age_secs = s.oldest_pending_age_secs,
                retrying = s.retrying,
                parked = s.parked,
                pushed = self.counters.pushed.load(Ordering::Relaxed),
                failed = self.counters.failed.load(Ordering::Relaxed),
                "FHIR push outbox"
            ),
            Err(e) => tracing::warn!(error = %e, "FHIR push: cannot read the outbox"),
        }
    }

    async fn push(self: Arc<Self>, c: Claimed) {
        let started = Instant::now();
        let outcome = self.send(&c).await;
        let owner = self.owner.clone();
        let study_uid = c.study_uid.clone();
        let op = match outcome {
            Outcome::Done(status) => {
                self.counters.pushed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(study = %c.study_uid, version = c.version, deleted = c.deleted,
                    status, ms = started.elapsed().as_millis() as u64, "FHIR push: ImagingStudy sent");
                OutboxOp::Complete {
                    owner,
                    study_uid,
                    version: c.version,
                }
            }
            Outcome::Retry { error, after } => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                let delay = self.backoff(c.attempts).max(after.unwrap_or_default());
                tracing::warn!(study = %c.study_uid, attempt = c.attempts + 1, error = %error,
                    retry_in_ms = delay.as_millis() as u64, "FHIR push failed: will retry");
                *self.counters.last_error.lock().expect("lock") = Some(error.clone());
                OutboxOp::Retry {
                    owner,
                    study_uid,
                    next_attempt_at: outbox::now_ms() + delay.as_millis() as i64,
                    error,
                }
            }
            Outcome::Park(error) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                self.counters.parked.fetch_add(1, Ordering::Relaxed);
                tracing::error!(study = %c.study_uid, version = c.version, error = %error,
                    "FHIR push refused: study parked until it changes");
                *self.counters.last_error.lock().expect("lock") = Some(error.clone());
                OutboxOp::Park {
                    owner,
                    study_uid,
                    version: c.version,
                    error,
                }
            }
        };
        if let Err(e) = self.index.outbox(op).await {
            // The lease expires and the study is claimed again: pushed twice at worst, never lost.
            tracing::error!(study = %c.study_uid, error = %e, "FHIR push: cannot record the outcome");
        }
    }

    /// Exponential backoff with "equal jitter": half the doubled delay, plus up to as much again.
    fn backoff(&self, attempts: i64) -> Duration {
        let push = &self.config.push;
        let exp = push
            .initial_backoff_ms
            .saturating_mul(1u64 << attempts.clamp(0, 30))
            .min(push.max_backoff_ms)
            .max(1);
        let jitter = fastrand::u64(0..=exp / 2);
        Duration::from_millis(exp / 2 + jitter)
    }

    fn conditional_url(&self, study_uid: &str) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("identifier", &format!("urn:dicom:uid|urn:oid:{study_uid}"));
        format!(
            "{}/ImagingStudy?{}",
            self.config.push.url.trim_end_matches('/'),
            q.finish()
        )
    }

    /// The resource to send (None: a conditional delete).
    async fn resource(&self, c: &Claimed) -> Result<Option<serde_json::Value>, String> {
        let same_server = self.config.patient_server.is_empty();
        let fhir_base = format!("{}{}", self.http_root, super::ROOT);
        let doc = if c.deleted {
            None
        } else {
            crate::index::fhir::study(self.index.read_pool(), &c.study_uid)
                .await
                .map_err(|e| format!("index: {e}"))?
        };
        let Some(doc) = doc else {
            if self.config.push.on_delete == OnDelete::Delete {
                return Ok(None);
            }
            let subject = self
                .subjects
                .subject(
                    &c.patient_id,
                    &c.issuer_of_patient_id,
                    Some(&fhir_base),
                    same_server,
                )
                .await;
            let mut study = mapping::deleted_imaging_study(
                &self.config,
                &c.study_uid,
                &c.accession_number,
                subject,
                c.version,
                outbox::now_ms(),
            );
            strip_server_fields(&mut study);
            return Ok(Some(study));
        };
        let subject = self
            .subjects
            .subject(
                &doc.patient_id,
                &doc.issuer_of_patient_id,
                Some(&fhir_base),
                same_server,
            )
            .await;
        let ctx = Context {
            config: &self.config,
            dicomweb_root: &self.dicomweb_root,
            http_root: &self.http_root,
            endpoints: Endpoints::Contained,
        };
        let mut study = mapping::imaging_study(&doc, subject, &ctx);
        strip_server_fields(&mut study);
        Ok(Some(study))
    }

    async fn send(&self, c: &Claimed) -> Outcome {
        let resource = match self.resource(c).await {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Retry {
                    error: e,
                    after: None,
                }
            }
        };
        let url = self.conditional_url(&c.study_uid);
        let mut headers = vec![("accept", "application/fhir+json".to_string())];
        let (method, body) = match &resource {
            Some(r) => {
                headers.push(("content-type", "application/fhir+json".to_string()));
                (Method::PUT, Some(Bytes::from(r.to_string())))
            }
            None => (Method::DELETE, None),
        };
        match self.auth.header().await {
            Ok(Some(h)) => headers.push(("authorization", h)),
            Ok(None) => {}
            Err(e) => {
                return Outcome::Retry {
                    error: format!("authentication: {e:#}"),
                    after: None,
                }
            }
        }
        let timeout = Duration::from_secs(self.config.push.timeout_secs);
        let response = match self
            .client
            .send(method, &url, &headers, body, timeout)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Retry {
                    error: format!("{e:#}"),
                    after: None,
                }
            }
        };
        let status = response.status;
        let after = response
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if status.is_success() || (resource.is_none() && status.as_u16() == 404) {
            return Outcome::Done(status.as_u16());
        }
        let body = truncate(&response.text());
        let error = format!(
            "{} answered {status}: {body}",
            if resource.is_some() { "PUT" } else { "DELETE" }
        );
        match status.as_u16() {
            401 => {
                self.auth.invalidate().await;
                Outcome::Retry { error, after: None }
            }
            408 | 429 => Outcome::Retry { error, after },
            s if s >= 500 => Outcome::Retry { error, after },
            _ => Outcome::Park(error),
        }
    }
}

/// A pushed resource carries no id or meta of ours: the server assigns its own (a conditional
/// update with an id that differs from the matched resource's is refused).
fn strip_server_fields(resource: &mut serde_json::Value) {
    if let Some(obj) = resource.as_object_mut() {
        obj.remove("id");
        obj.remove("meta");
    }
}

/// `GET /fhir-push/status`: the outbox and this gateway's push counters, as JSON.
pub async fn status(State(state): State<Arc<super::FhirState>>) -> Response {
    let outbox = match outbox::status(state.web.index.read_pool()).await {
        Ok(s) => serde_json::to_value(s).unwrap_or_default(),
        Err(e) => json!({"error": e.to_string()}),
    };
    let worker = state.push.as_ref().map(|c| {
        json!({
            "pushed": c.pushed.load(Ordering::Relaxed),
            "failed": c.failed.load(Ordering::Relaxed),
            "parked": c.parked.load(Ordering::Relaxed),
            "last_error": c.last_error.lock().expect("lock").clone(),
        })
    });
    axum::Json(json!({
        "enabled": state.push.is_some(),
        "url": state.config.push.url,
        "stability_ms": state.config.push.stability_ms,
        "outbox": outbox,
        "worker": worker,
    }))
    .into_response()
}
