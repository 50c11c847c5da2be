//! DELETE of a study, a series or an instance (not part of PS3.18; the form dcm4chee and Orthanc
//! offer). Off unless `[http] allow_delete = true`: deleting patient data must be a deliberate choice.
//! Rows and objects are removed by ingest, rows first; a deletion's audit event commits with the
//! rows' removal.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Extension;

use super::error::ApiError;
use super::{check_uids, WebState};
use crate::audit::{Origin, Protocol};
use crate::index::Scope;
use crate::security::Identity;

pub async fn study(
    state: State<Arc<WebState>>,
    who: Extension<Identity>,
    Path(study): Path<String>,
) -> Result<StatusCode, ApiError> {
    delete(state, who, &[&study]).await
}

pub async fn series(
    state: State<Arc<WebState>>,
    who: Extension<Identity>,
    Path((study, series)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    delete(state, who, &[&study, &series]).await
}

pub async fn instance(
    state: State<Arc<WebState>>,
    who: Extension<Identity>,
    Path((study, series, instance)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    delete(state, who, &[&study, &series, &instance]).await
}

/// `uids`: study, then optionally series and instance.
async fn delete(
    State(state): State<Arc<WebState>>,
    Extension(who): Extension<Identity>,
    uids: &[&str],
) -> Result<StatusCode, ApiError> {
    if !state.allow_delete {
        return Err(ApiError::MethodNotAllowed(
            "DELETE is disabled on this gateway ([http] allow_delete = false)".into(),
        ));
    }
    check_uids(uids)?;
    let scope = Scope {
        study_uid: uids[0].to_string(),
        series_uid: uids.get(1).map(|s| s.to_string()),
        sop_instance_uid: uids.get(2).map(|s| s.to_string()),
    };
    let removal = state
        .ingestor
        .delete(scope.clone(), Origin::new(who.clone(), Protocol::DicomWeb))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    tracing::info!(
        peer = ?who.address,
        study = %scope.study_uid,
        series = ?scope.series_uid,
        instance = ?scope.sop_instance_uid,
        instances = removal.instances,
        objects_left = removal.objects_left,
        "deleted"
    );
    if removal.instances == 0 {
        return Err(ApiError::NotFound(
            "no such study, series or instance".into(),
        ));
    }
    if removal.objects_left > 0 {
        return Err(ApiError::Unavailable(format!(
            "{} instances removed from the index, but storage failed to delete {} of their objects; \
             they will reappear after the next restart unless deleted again then",
            removal.instances, removal.objects_left
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}
