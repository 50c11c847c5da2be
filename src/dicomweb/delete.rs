//! DELETE of a study, a series or an instance (not part of PS3.18; the form dcm4chee and Orthanc
//! offer). Off unless `[http] allow_delete = true`: deleting patient data must be a deliberate choice.
//! Rows and objects are removed by ingest, rows first; every deletion is audited (target `audit`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;

use super::error::ApiError;
use super::{check_uids, WebState};
use crate::index::Scope;

pub async fn study(
    state: State<Arc<WebState>>,
    peer: ConnectInfo<SocketAddr>,
    Path(study): Path<String>,
) -> Result<StatusCode, ApiError> {
    delete(state, peer, &[&study]).await
}

pub async fn series(
    state: State<Arc<WebState>>,
    peer: ConnectInfo<SocketAddr>,
    Path((study, series)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    delete(state, peer, &[&study, &series]).await
}

pub async fn instance(
    state: State<Arc<WebState>>,
    peer: ConnectInfo<SocketAddr>,
    Path((study, series, instance)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    delete(state, peer, &[&study, &series, &instance]).await
}

/// `uids`: study, then optionally series and instance.
async fn delete(
    State(state): State<Arc<WebState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
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
        .delete(scope.clone())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    tracing::info!(
        target: "audit",
        %peer,
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
