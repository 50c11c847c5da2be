//! WADO-RS retrieve (PS3.18 10.4): instances, frames and bulk data as `multipart/related`, streamed
//! from storage one part at a time.
//!
//! Objects go out as stored when the client accepts that transfer syntax (`transfer-syntax=*`, or the
//! stored one). The default, Explicit VR Little Endian, is produced from other native encodings by
//! re-encoding one instance at a time; encapsulated objects cannot be decoded yet and get 406.
//! Frames are cut out of the stored object with the byte ranges recorded at ingest.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use dicom_object::file::ReadPreamble;
use dicom_object::OpenFileOptions;
use futures::TryStreamExt;

use super::error::ApiError;
use super::media::{
    frame_media_type, is_native, media_matches, parse_accept, Acceptable, EXPLICIT_VR_BE,
    EXPLICIT_VR_LE, IMPLICIT_VR_LE,
};
use super::multipart::MultipartWriter;
use super::{check_uids, WebState};
use crate::index::StoredInstance;
use crate::ingest::layout::{locate_frames, read_meta_extent, Extent, Layout};
use crate::model::transcode::to_explicit_le;
use crate::storage::{read_all, ObjectStore};

/// Native frames and pixel data are read from storage in pieces of at most this size.
const READ_PIECE: u64 = 1 << 20;

/// Answers 406 unless the Accept header allows `media_type` (used by JSON resources).
pub fn reject_unless_acceptable(headers: &HeaderMap, media_type: &str) -> Option<ApiError> {
    let accept = headers.get("accept").and_then(|h| h.to_str().ok());
    let ok = parse_accept(accept).iter().any(|a| {
        !a.multipart
            && (media_matches(&a.media_type, media_type) || a.media_type == "application/json")
    });
    (!ok).then(|| ApiError::NotAcceptable(format!("only {media_type} is available")))
}

pub async fn study(
    State(state): State<Arc<WebState>>,
    Path(study): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_uids(&[&study])?;
    retrieve(state, &headers, &study, None, None).await
}

pub async fn series(
    State(state): State<Arc<WebState>>,
    Path((study, series)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_uids(&[&study, &series])?;
    retrieve(state, &headers, &study, Some(&series), None).await
}

pub async fn instance(
    State(state): State<Arc<WebState>>,
    Path((study, series, instance)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_uids(&[&study, &series, &instance])?;
    retrieve(state, &headers, &study, Some(&series), Some(&instance)).await
}

/// How one instance is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    AsStored,
    /// Re-encoded as Explicit VR Little Endian (from another native encoding).
    ExplicitLe,
}

/// Picks the encoding of an instance for what the client accepts, if any.
fn encoding_for(stored_ts: &str, requested: Option<&str>) -> Option<Encoding> {
    // Implicit VR and Big Endian are never sent over DICOMweb (PS3.18 8.7.3.5.2).
    let legacy = matches!(stored_ts, IMPLICIT_VR_LE | EXPLICIT_VR_BE);
    match requested {
        Some("*") if legacy => Some(Encoding::ExplicitLe),
        Some("*") => Some(Encoding::AsStored),
        None | Some(EXPLICIT_VR_LE) if stored_ts == EXPLICIT_VR_LE => Some(Encoding::AsStored),
        None | Some(EXPLICIT_VR_LE) if is_native(stored_ts) => Some(Encoding::ExplicitLe),
        Some(ts) if ts == stored_ts && !legacy => Some(Encoding::AsStored),
        _ => None,
    }
}

fn dicom_acceptables(headers: &HeaderMap, single: bool) -> Vec<Acceptable> {
    let accept = headers.get("accept").and_then(|h| h.to_str().ok());
    parse_accept(accept)
        .into_iter()
        .filter(|a| {
            (a.multipart && media_matches(&a.media_type, "application/dicom"))
                || (single && !a.multipart && a.media_type == "application/dicom")
                || (!a.multipart && a.media_type == "*/*")
        })
        .collect()
}

async fn retrieve(
    state: Arc<WebState>,
    headers: &HeaderMap,
    study: &str,
    series: Option<&str>,
    instance: Option<&str>,
) -> Result<Response, ApiError> {
    let acceptables = dicom_acceptables(headers, instance.is_some());
    if acceptables.is_empty() {
        return Err(ApiError::NotAcceptable(
            "instances are available as multipart/related; type=\"application/dicom\"".into(),
        ));
    }
    let instances = state
        .index
        .stored_instances(study, series, instance)
        .await?;
    if instances.is_empty() {
        return Err(ApiError::NotFound(
            "no such study, series or instance".into(),
        ));
    }
    // The first acceptable representation that every instance can be sent in.
    let plan = acceptables.iter().find_map(|a| {
        instances
            .iter()
            .map(|i| encoding_for(&i.transfer_syntax_uid, a.transfer_syntax.as_deref()))
            .collect::<Option<Vec<Encoding>>>()
    });
    let Some(encodings) = plan else {
        return Err(ApiError::NotAcceptable(
            "the requested transfer syntax is not available for these instances (compressed \
             objects are served with transfer-syntax=* or their stored transfer syntax)"
                .into(),
        ));
    };

    let (writer, body, boundary) = MultipartWriter::new();
    let store = state.store.clone();
    tokio::spawn(async move {
        for (inst, encoding) in instances.iter().zip(encodings) {
            if let Err(e) = send_instance(&writer, store.as_ref(), inst, encoding).await {
                tracing::error!(key = %inst.storage_key, error = %e, "retrieve aborted");
                writer.fail(e).await;
                return;
            }
        }
        writer.finish().await;
    });
    Ok(multipart_response(body, &boundary, "application/dicom"))
}

fn multipart_response(body: axum::body::Body, boundary: &str, part_type: &str) -> Response {
    let mut resp = Response::new(body);
    let ct = format!("multipart/related; type=\"{part_type}\"; boundary={boundary}");
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_str(&ct).expect("valid header"),
    );
    resp
}

async fn send_instance(
    writer: &MultipartWriter,
    store: &dyn ObjectStore,
    inst: &StoredInstance,
    encoding: Encoding,
) -> std::io::Result<()> {
    let gone = || std::io::Error::other("client disconnected");
    match encoding {
        Encoding::AsStored => {
            let (_, mut stream) = store
                .get(&inst.storage_key)
                .await
                .map_err(std::io::Error::other)?;
            let ct = format!(
                "application/dicom; transfer-syntax={}",
                inst.transfer_syntax_uid
            );
            if !writer.start_part(&ct, None).await {
                return Err(gone());
            }
            while let Some(chunk) = stream.try_next().await? {
                if !writer.send(chunk).await {
                    return Err(gone());
                }
            }
        }
        Encoding::ExplicitLe => {
            let bytes = read_all(store, &inst.storage_key)
                .await
                .map_err(std::io::Error::other)?;
            let converted = tokio::task::spawn_blocking(move || to_explicit_le(&bytes))
                .await
                .map_err(std::io::Error::other)??;
            let ct = format!("application/dicom; transfer-syntax={EXPLICIT_VR_LE}");
            if !writer.start_part(&ct, None).await || !writer.send(converted.into()).await {
                return Err(gone());
            }
        }
    }
    if !writer.end_part().await {
        return Err(gone());
    }
    Ok(())
}

/// Parses a 1-based frame list ("1,3,5").
fn parse_frame_list(list: &str) -> Result<Vec<u32>, ApiError> {
    list.split(',')
        .map(|f| match f.trim().parse::<u32>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(ApiError::BadRequest(format!(
                "invalid frame number {f:?} (frames are numbered from 1)"
            ))),
        })
        .collect()
}

pub async fn frames(
    State(state): State<Arc<WebState>>,
    Path((study, series, instance, list)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_uids(&[&study, &series, &instance])?;
    let numbers = parse_frame_list(&list)?;
    let inst = one_instance(&state, &study, &series, &instance).await?;
    let ts = inst.transfer_syntax_uid.clone();
    let compressed_type = frame_media_type(&ts);

    let accept = headers.get("accept").and_then(|h| h.to_str().ok());
    let acceptables = parse_accept(accept);
    let part_type = acceptables.iter().find_map(|a| {
        let ts_ok = |wanted: &str| match a.transfer_syntax.as_deref() {
            None => wanted == EXPLICIT_VR_LE,
            Some(t) => t == "*" || t == wanted,
        };
        match compressed_type {
            None if media_matches(&a.media_type, "application/octet-stream")
                && ts_ok(EXPLICIT_VR_LE) =>
            {
                Some((
                    "application/octet-stream".to_string(),
                    EXPLICIT_VR_LE.to_string(),
                ))
            }
            Some(ct)
                if (media_matches(&a.media_type, ct) && a.media_type != "*/*" && ts_ok(&ts))
                    || (a.transfer_syntax.as_deref() == Some("*")
                        && (media_matches(&a.media_type, ct)
                            || a.media_type == "application/octet-stream"))
                    || a.transfer_syntax.as_deref() == Some(ts.as_str()) =>
            {
                Some((ct.to_string(), ts.clone()))
            }
            _ => None,
        }
    });
    let Some((part_type, part_ts)) = part_type else {
        return Err(ApiError::NotAcceptable(match compressed_type {
            Some(ct) => format!(
                "frames of this instance are available as {ct} (transfer-syntax={ts} or *); \
                 decompression is not supported"
            ),
            None => "frames of this instance are available as application/octet-stream".into(),
        }));
    };

    let source = FrameSource::prepare(&state, &inst).await?;
    let count = source.frame_count();
    if let Some(bad) = numbers.iter().find(|&&n| n as usize > count) {
        return Err(ApiError::NotFound(format!(
            "frame {bad} does not exist (the instance has {count})"
        )));
    }
    let (writer, body, boundary) = MultipartWriter::new();
    let store = state.store.clone();
    let content_type = format!("{part_type}; transfer-syntax={part_ts}");
    tokio::spawn(async move {
        for n in numbers {
            let result = async {
                if !writer.start_part(&content_type, None).await {
                    return Err(std::io::Error::other("client disconnected"));
                }
                source
                    .send_frame(&writer, store.as_ref(), n as usize - 1)
                    .await?;
                if !writer.end_part().await {
                    return Err(std::io::Error::other("client disconnected"));
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                writer.fail(e).await;
                return;
            }
        }
        writer.finish().await;
    });
    Ok(multipart_response(body, &boundary, &part_type))
}

async fn one_instance(
    state: &WebState,
    study: &str,
    series: &str,
    instance: &str,
) -> Result<StoredInstance, ApiError> {
    state
        .index
        .stored_instances(study, Some(series), Some(instance))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::NotFound("no such instance".into()))
}

/// Where frames are read from: the stored object through its recorded layout, or (for encodings
/// that cannot be addressed by offset: deflated, big endian) an in-memory Explicit VR LE copy.
enum FrameSource {
    Stored { key: String, layout: Layout },
    Converted { bytes: Bytes, layout: Layout },
}

impl FrameSource {
    async fn prepare(state: &WebState, inst: &StoredInstance) -> Result<FrameSource, ApiError> {
        let layout: Layout = serde_json::from_str(&inst.frame_layout)
            .map_err(|e| ApiError::Internal(format!("bad frame layout: {e}")))?;
        let addressable =
            !matches!(layout, Layout::Unavailable) && inst.transfer_syntax_uid != EXPLICIT_VR_BE;
        if addressable {
            return Ok(FrameSource::Stored {
                key: inst.storage_key.clone(),
                layout,
            });
        }
        let bytes = read_all(state.store.as_ref(), &inst.storage_key).await?;
        let (bytes, layout) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let converted = to_explicit_le(&bytes)?;
            let mut cursor = std::io::Cursor::new(&converted[..]);
            let (start, ts) = read_meta_extent(&mut cursor)?;
            let obj = OpenFileOptions::new()
                .read_preamble(ReadPreamble::Always)
                .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
                .from_reader(&converted[..])
                .map_err(std::io::Error::other)?;
            let geometry = crate::ingest::extract::geometry(&obj);
            let layout = locate_frames(&mut cursor, start, &ts, &geometry)?;
            Ok((Bytes::from(converted), layout))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(format!("cannot decode object: {e}")))?;
        Ok(FrameSource::Converted { bytes, layout })
    }

    fn layout(&self) -> &Layout {
        match self {
            FrameSource::Stored { layout, .. } | FrameSource::Converted { layout, .. } => layout,
        }
    }

    fn frame_count(&self) -> usize {
        match self.layout() {
            Layout::Native { frames, .. } => *frames as usize,
            Layout::Encapsulated { frames } => frames.len(),
            Layout::NoPixelData | Layout::Unavailable => 0,
        }
    }

    /// The extents making up frame `index` (0-based).
    fn extents(&self, index: usize) -> Vec<Extent> {
        match self.layout() {
            Layout::Native {
                value,
                frame_length,
                ..
            } => vec![Extent {
                offset: value.offset + index as u64 * frame_length,
                length: *frame_length,
            }],
            Layout::Encapsulated { frames } => frames[index].clone(),
            Layout::NoPixelData | Layout::Unavailable => Vec::new(),
        }
    }

    async fn send_frame(
        &self,
        writer: &MultipartWriter,
        store: &dyn ObjectStore,
        index: usize,
    ) -> std::io::Result<()> {
        for extent in self.extents(index) {
            send_extent(writer, self, store, extent).await?;
        }
        Ok(())
    }
}

/// Sends the bytes of one extent in pieces of at most READ_PIECE.
async fn send_extent(
    writer: &MultipartWriter,
    source: &FrameSource,
    store: &dyn ObjectStore,
    extent: Extent,
) -> std::io::Result<()> {
    let mut offset = extent.offset;
    let end = extent.offset + extent.length;
    while offset < end {
        let len = (end - offset).min(READ_PIECE);
        let piece = match source {
            FrameSource::Stored { key, .. } => store
                .get_range(key, offset, len)
                .await
                .map_err(std::io::Error::other)?,
            FrameSource::Converted { bytes, .. } => bytes
                .get(offset as usize..(offset + len) as usize)
                .map(|s| bytes.slice_ref(s))
                .ok_or_else(|| std::io::Error::other("frame outside object"))?,
        };
        if !writer.send(piece).await {
            return Err(std::io::Error::other("client disconnected"));
        }
        offset += len;
    }
    Ok(())
}

pub async fn bulk(
    State(state): State<Arc<WebState>>,
    Path((study, series, instance, path)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_uids(&[&study, &series, &instance])?;
    let accept = headers.get("accept").and_then(|h| h.to_str().ok());
    let ok = parse_accept(accept).iter().any(|a| {
        media_matches(&a.media_type, "application/octet-stream")
            && matches!(
                a.transfer_syntax.as_deref(),
                None | Some("*") | Some(EXPLICIT_VR_LE)
            )
    });
    if !ok {
        return Err(ApiError::NotAcceptable(
            "bulk data is available as multipart/related; type=\"application/octet-stream\"".into(),
        ));
    }
    let inst = one_instance(&state, &study, &series, &instance).await?;
    let location = format!(
        "{}/studies/{study}/series/{series}/instances/{instance}/bulk/{path}",
        state.base_url(&headers)
    );
    let (writer, body, boundary) = MultipartWriter::new();
    if path.eq_ignore_ascii_case("7FE00010") {
        let source = FrameSource::prepare(&state, &inst).await?;
        let (part_type, extents): (String, Vec<Vec<Extent>>) = match source.layout() {
            Layout::Native { value, .. } => (
                format!("application/octet-stream; transfer-syntax={EXPLICIT_VR_LE}"),
                vec![vec![*value]],
            ),
            Layout::Encapsulated { frames } => (
                format!(
                    "{}; transfer-syntax={}",
                    frame_media_type(&inst.transfer_syntax_uid)
                        .unwrap_or("application/octet-stream"),
                    inst.transfer_syntax_uid
                ),
                frames.clone(),
            ),
            _ => return Err(ApiError::NotFound("the instance has no pixel data".into())),
        };
        let store = state.store.clone();
        tokio::spawn(async move {
            for frame in extents {
                if !writer.start_part(&part_type, Some(&location)).await {
                    return;
                }
                for extent in frame {
                    if let Err(e) = send_extent(&writer, &source, store.as_ref(), extent).await {
                        writer.fail(e).await;
                        return;
                    }
                }
                if !writer.end_part().await {
                    return;
                }
            }
            writer.finish().await;
        });
    } else {
        let bytes = read_all(state.store.as_ref(), &inst.storage_key).await?;
        let path_owned = path.clone();
        let value = tokio::task::spawn_blocking(move || {
            let obj = OpenFileOptions::new()
                .read_preamble(ReadPreamble::Always)
                .from_reader(&bytes[..])
                .ok()?;
            crate::model::json::resolve_bulk_path(&obj, &path_owned)
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .ok_or_else(|| ApiError::NotFound(format!("no bulk data at {path}")))?;
        tokio::spawn(async move {
            let ct = "application/octet-stream";
            if writer.start_part(ct, Some(&location)).await
                && writer.send(value.into()).await
                && writer.end_part().await
            {
                writer.finish().await;
            }
        });
    }
    Ok(multipart_response(
        body,
        &boundary,
        "application/octet-stream",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_follow_the_requested_transfer_syntax() {
        const JPEG: &str = "1.2.840.10008.1.2.4.50";
        assert_eq!(encoding_for(EXPLICIT_VR_LE, None), Some(Encoding::AsStored));
        assert_eq!(
            encoding_for(IMPLICIT_VR_LE, None),
            Some(Encoding::ExplicitLe)
        );
        assert_eq!(
            encoding_for(IMPLICIT_VR_LE, Some("*")),
            Some(Encoding::ExplicitLe)
        );
        assert_eq!(
            encoding_for(EXPLICIT_VR_BE, Some("*")),
            Some(Encoding::ExplicitLe)
        );
        assert_eq!(encoding_for(JPEG, Some("*")), Some(Encoding::AsStored));
        assert_eq!(encoding_for(JPEG, Some(JPEG)), Some(Encoding::AsStored));
        assert_eq!(encoding_for(JPEG, None), None);
        assert_eq!(encoding_for(IMPLICIT_VR_LE, Some(IMPLICIT_VR_LE)), None);
    }

    #[test]
    fn frame_lists_are_one_based() {
        assert_eq!(parse_frame_list("1,3").unwrap(), vec![1, 3]);
        assert!(parse_frame_list("0").is_err());
        assert!(parse_frame_list("1,x").is_err());
        assert!(parse_frame_list("").is_err());
    }
}
