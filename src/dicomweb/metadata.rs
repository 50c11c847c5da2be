//! WADO-RS metadata (PS3.18 10.4.1.1.2): the DICOM JSON of each instance, stored at ingest, streamed
//! from the index as one array. Object storage is never read, so a large study answers as fast as the
//! index can stream rows, with memory independent of the study's size.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};

use super::error::ApiError;
use super::{check_uids, WebState};
use crate::index::INSTANCES_IN_SCOPE;
use crate::ingest::extract::BASE_PLACEHOLDER;

/// Rows are sent to the client in chunks of about this size.
const CHUNK: usize = 64 * 1024;

pub async fn study(
    State(state): State<Arc<WebState>>,
    Path(study): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_uids(&[&study])?;
    stream(state, &headers, study, None, None).await
}

pub async fn series(
    State(state): State<Arc<WebState>>,
    Path((study, series)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_uids(&[&study, &series])?;
    stream(state, &headers, study, Some(series), None).await
}

pub async fn instance(
    State(state): State<Arc<WebState>>,
    Path((study, series, instance)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_uids(&[&study, &series, &instance])?;
    stream(state, &headers, study, Some(series), Some(instance)).await
}

async fn stream(
    state: Arc<WebState>,
    headers: &HeaderMap,
    study: String,
    series: Option<String>,
    instance: Option<String>,
) -> Result<Response, ApiError> {
    if let Some(resp) = super::retrieve::reject_unless_acceptable(headers, "application/dicom+json")
    {
        return Err(resp);
    }
    let base = state.base_url(headers);
    let pool = state.index.read_pool().clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, sqlx::Error>>(4);
    tokio::spawn(async move {
        let sql = format!("SELECT i.metadata_json {INSTANCES_IN_SCOPE}");
        let mut rows = sqlx::query_scalar::<_, String>(&sql)
            .bind(&study)
            .bind(&series)
            .bind(&instance)
            .fetch(&pool);
        let mut buf = BytesMut::with_capacity(CHUNK * 2);
        let mut first = true;
        loop {
            match rows.try_next().await {
                Ok(Some(json)) => {
                    buf.extend_from_slice(if first { b"[" } else { b"," });
                    first = false;
                    append_with_base(&mut buf, &json, &base);
                    if buf.len() >= CHUNK && tx.send(Ok(buf.split().freeze())).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        if !buf.is_empty() {
            let _ = tx.send(Ok(buf.split().freeze())).await;
        }
    });
    let first = match rx.recv().await {
        None => {
            return Err(ApiError::NotFound(
                "no such study, series or instance".into(),
            ))
        }
        Some(Ok(b)) if b.is_empty() => {
            return Err(ApiError::NotFound(
                "no such study, series or instance".into(),
            ))
        }
        Some(Err(e)) => return Err(e.into()),
        Some(Ok(b)) => b,
    };
    let rest = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
        .map(|r| r.map_err(std::io::Error::other));
    let body = futures::stream::once(async move { Ok(first) })
        .chain(rest)
        .chain(futures::stream::once(async {
            Ok(Bytes::from_static(b"]"))
        }));
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/dicom+json"),
    );
    Ok(resp)
}

/// Appends stored JSON, turning the `{{BASE}}` placeholder of BulkDataURIs into the public base URL.
fn append_with_base(buf: &mut BytesMut, json: &str, base: &str) {
    let mut rest = json;
    while let Some(pos) = rest.find(BASE_PLACEHOLDER) {
        buf.extend_from_slice(&rest.as_bytes()[..pos]);
        buf.extend_from_slice(base.as_bytes());
        rest = &rest[pos + BASE_PLACEHOLDER.len()..];
    }
    buf.extend_from_slice(rest.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_is_replaced_everywhere() {
        let mut buf = BytesMut::new();
        append_with_base(
            &mut buf,
            r#"{"a":{"BulkDataURI":"{{BASE}}/x"},"b":{"BulkDataURI":"{{BASE}}/y"}}"#,
            "http://h/dicomweb",
        );
        assert_eq!(
            &buf[..],
            br#"{"a":{"BulkDataURI":"http://h/dicomweb/x"},"b":{"BulkDataURI":"http://h/dicomweb/y"}}"#
        );
    }
}
