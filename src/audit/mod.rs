//! The audit trail: who did what to which study, when, from where, by which protocol, and how it
//! ended, kept in the index (`audit_events`) and served as FHIR AuditEvent.
//!
//! - [`event`]: the event model and its DICOM codes (PS3.15 A.5 EventIDs, action codes, outcomes);
//! - [`http`]: the layer that records every HTTP read, query, export and refusal (401, 403) from
//!   the route and the status;
//! - [`fhir`]: events as FHIR R4 AuditEvent resources and their search (`/fhir/AuditEvent`).
//!
//! Stores and deletions record their event in the index writer's transaction of the change
//! (`index::audit`), so an acknowledged C-STORE, STOW-RS or DELETE always has its event; every
//! other event is recorded with [`record`] right after the answer is produced, and a failure to
//! record it is logged, never held against the request.

pub mod event;
pub mod fhir;
pub mod http;

use std::sync::OnceLock;

pub use event::{credential_name, Action, AuditEvent, Origin, Outcome, Protocol};

use crate::index::Index;

static SOURCE_ID: OnceLock<String> = OnceLock::new();

/// Sets the Audit Source ID this gateway records its events under (`[audit] source_id`; the
/// host name when empty). Called once at start.
pub fn set_source_id(configured: &str) {
    let id = if configured.is_empty() {
        hostname()
    } else {
        configured.to_string()
    };
    let _ = SOURCE_ID.set(id);
}

/// The Audit Source ID: which gateway recorded an event (several may share one index).
pub fn source_id() -> &'static str {
    SOURCE_ID.get_or_init(hostname)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "dicom-gateway".into())
}

/// Records an event in the background: the answer it describes is not held up, and a failure is
/// logged (with the event, so the log keeps what the index lost).
pub fn record(index: &Index, event: AuditEvent) {
    let index = index.clone();
    tokio::spawn(async move {
        let action = event.action.as_str();
        let (study, subject) = (event.study_uid.clone(), event.origin.who.subject.clone());
        if let Err(e) = index.audit(event).await {
            tracing::error!(target: "audit", error = %e, action, study, subject, "audit event not recorded");
        }
    });
}

/// Records an event and waits for its commit (start and stop, where nothing else keeps the
/// process alive until the background write is done).
pub async fn record_now(index: &Index, event: AuditEvent) {
    let action = event.action.as_str();
    if let Err(e) = index.audit(event).await {
        tracing::error!(target: "audit", error = %e, action, "audit event not recorded");
    }
}
