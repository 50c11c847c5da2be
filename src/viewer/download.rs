//! `GET /download/studies/{study}`: the study as a ZIP of its Part-10 files, as stored, streamed.
//!
//! The archive's layout and length come from the index before the first byte is sent (object sizes
//! are known, entries are stored uncompressed: [`super::zip`]), so the browser shows real progress.
//! Objects are streamed from storage one at a time through a small bounded channel: memory stays a
//! few chunks whatever the study's size. An object whose length differs from what the index says
//! aborts the response, so the client sees a broken download instead of a corrupt archive.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use futures::TryStreamExt;
use tokio::sync::mpsc;

use super::zip::{Archive, Entry};
use crate::dicomweb::{ApiError, WebState};
use crate::index::StoredInstance;

/// Chunks buffered between storage and the client.
const CHANNEL_DEPTH: usize = 8;

pub async fn study(
    State(state): State<Arc<WebState>>,
    Path(study): Path<String>,
) -> Result<Response, ApiError> {
    if !crate::index::query::is_valid_uid(&study) {
        return Err(ApiError::BadRequest(format!(
            "{study:?} is not a valid UID"
        )));
    }
    let instances = state.index.stored_instances(&study, None, None).await?;
    if instances.is_empty() {
        return Err(ApiError::NotFound("no such study".into()));
    }
    let archive = Archive::plan(
        instances.iter().map(entry).collect(),
        std::time::SystemTime::now(),
    );
    let length = archive.total_len();
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(CHANNEL_DEPTH);
    let store = state.store.clone();
    tokio::spawn(async move {
        if let Err(e) = send(&archive, &instances, store.as_ref(), &tx).await {
            tracing::warn!(error = %e, "study download aborted");
            let _ = tx.send(Err(e)).await;
        }
    });
    let mut response = Response::new(Body::from_stream(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
    })));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zip"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    // The study UID is digits and dots (checked above): safe in the header as it is.
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{study}.zip\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

/// `series/instance.dcm` under a folder named after the study.
fn entry(instance: &StoredInstance) -> Entry {
    Entry {
        name: format!(
            "{}/{}/{}.dcm",
            instance.study_uid, instance.series_uid, instance.sop_instance_uid
        ),
        size: instance.size_bytes,
    }
}

async fn send(
    archive: &Archive,
    instances: &[StoredInstance],
    store: &dyn crate::storage::ObjectStore,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) -> std::io::Result<()> {
    let gone = || std::io::Error::other("client disconnected");
    let mut crcs = Vec::with_capacity(archive.len());
    for (index, instance) in instances.iter().enumerate() {
        tx.send(Ok(archive.local_header(index).into()))
            .await
            .map_err(|_| gone())?;
        let (_, mut stream) = store
            .get(&instance.storage_key)
            .await
            .map_err(std::io::Error::other)?;
        let mut crc = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32IsoHdlc);
        let mut sent = 0u64;
        while let Some(chunk) = stream.try_next().await? {
            crc.update(&chunk);
            sent += chunk.len() as u64;
            tx.send(Ok(chunk)).await.map_err(|_| gone())?;
        }
        if sent != archive.size(index) {
            return Err(std::io::Error::other(format!(
                "object {} has {sent} bytes, the index says {}",
                instance.storage_key,
                archive.size(index)
            )));
        }
        let crc = crc.finalize() as u32;
        crcs.push(crc);
        tx.send(Ok(archive.data_descriptor(index, crc).into()))
            .await
            .map_err(|_| gone())?;
    }
    tx.send(Ok(archive.central_directory(&crcs).into()))
        .await
        .map_err(|_| gone())
}
