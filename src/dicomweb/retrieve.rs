//! WADO-RS retrieve (PS3.18 10.4): instances, frames and bulk data as `multipart/related`, streamed
//! from storage one part at a time.
//!
//! Objects go out as stored when the client accepts that transfer syntax (`transfer-syntax=*`, or the
//! stored one). Any other syntax the transcoder can make (the default, Explicit VR Little Endian,
//! from every decodable syntax; JPEG-LS lossless from lossless sources) is made one instance at a
//! time, streamed frame by frame; what it cannot make gets 406 with the reason. Frames are cut out
//! of the stored object with the byte ranges recorded at ingest: as stored, zero-copy ranged reads;
//! transcoded, the header and that frame's bytes only.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use dicom_object::file::ReadPreamble;
use dicom_object::OpenFileOptions;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc::Receiver;

use super::error::ApiError;
use super::media::{
    frame_media_type, is_native, media_matches, parse_accept, Acceptable, EXPLICIT_VR_BE,
    EXPLICIT_VR_LE, IMPLICIT_VR_LE,
};
use super::multipart::MultipartWriter;
use super::{check_uids, WebState};
use crate::dicom::{locate_frames, read_meta_extent, Extent, Layout};
use crate::index::StoredInstance;
use crate::ingest::bulk::{swap_words, BulkValue};
use crate::model::explicit_le::to_explicit_le_streamed;
use crate::model::transcode::to_explicit_le;
use crate::storage::{read_all, ObjectStore};
use crate::transcode::{self, Form, TranscodeError, JPEG_LS_LOSSLESS};

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
#[derive(Debug, Clone, PartialEq, Eq)]
enum Encoding {
    AsStored,
    /// Re-encoded by the transcoder into this transfer syntax.
    Transcoded(String),
}

/// Picks the encoding of an instance for what the client accepts, or says why there is none.
fn encoding_for(stored_ts: &str, requested: Option<&str>) -> Result<Encoding, String> {
    // Implicit VR and Big Endian are never sent over DICOMweb (PS3.18 8.7.3.5.2).
    let legacy = matches!(stored_ts, IMPLICIT_VR_LE | EXPLICIT_VR_BE);
    let wanted = match requested {
        Some("*") if legacy => EXPLICIT_VR_LE,
        Some("*") => return Ok(Encoding::AsStored),
        None => EXPLICIT_VR_LE,
        Some(ts) => ts,
    };
    if wanted == stored_ts && !legacy {
        return Ok(Encoding::AsStored);
    }
    if matches!(wanted, IMPLICIT_VR_LE | EXPLICIT_VR_BE) {
        return Err(format!(
            "{wanted} is not used by DICOMweb (PS3.18 8.7.3.5.2)"
        ));
    }
    transcode::check(stored_ts, wanted)
        .map(|()| Encoding::Transcoded(wanted.to_string()))
        .map_err(|e| e.to_string())
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
    // The first acceptable representation that every instance can be sent in; else the reason
    // the first one cannot.
    let mut refusal = None;
    let plan = acceptables.iter().find_map(|a| {
        instances
            .iter()
            .map(|i| encoding_for(&i.transfer_syntax_uid, a.transfer_syntax.as_deref()))
            .collect::<Result<Vec<Encoding>, String>>()
            .map_err(|e| refusal.get_or_insert(e).clone())
            .ok()
    });
    let Some(encodings) = plan else {
        return Err(ApiError::NotAcceptable(format!(
            "the requested transfer syntax is not available for these instances: {}",
            refusal.unwrap_or_default()
        )));
    };

    // The first instance's transcoding is started before the response is: its refusal is a 406.
    let mut started = match &encodings[0] {
        Encoding::Transcoded(ts) => {
            Some(start_transcoding(state.store.as_ref(), &instances[0], ts).await?)
        }
        Encoding::AsStored => None,
    };

    let (writer, body, boundary) = MultipartWriter::new();
    let store = state.store.clone();
    tokio::spawn(async move {
        for (inst, encoding) in instances.iter().zip(encodings) {
            let started = started.take();
            if let Err(e) = send_instance(&writer, store.as_ref(), inst, encoding, started).await {
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

/// A transcoding under way: the rest of its output, and its first piece.
type Started = (Receiver<Result<Bytes, TranscodeError>>, Bytes);

/// Starts transcoding an instance and waits for its first piece, so that a refusal that only the
/// object itself shows (its Lossy Image Compression flag) comes before any part is sent.
async fn start_transcoding(
    store: &dyn ObjectStore,
    inst: &StoredInstance,
    ts: &str,
) -> Result<Started, TranscodeError> {
    let mut pieces = if ts == EXPLICIT_VR_LE && is_native(&inst.transfer_syntax_uid) {
        reencode_streamed(store, &inst.storage_key).await?
    } else {
        let layout = transcode::parse_layout(&inst.frame_layout)?;
        let bytes = read_all(store, &inst.storage_key).await?;
        transcode::stream(bytes, layout, ts.to_string(), Form::Part10)
    };
    match pieces.recv().await {
        Some(Ok(first)) => Ok((pieces, first)),
        Some(Err(e)) => Err(e),
        None => Err(TranscodeError::Failed("the transcoder stopped".into())),
    }
}

async fn send_instance(
    writer: &MultipartWriter,
    store: &dyn ObjectStore,
    inst: &StoredInstance,
    encoding: Encoding,
    started: Option<Started>,
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
        Encoding::Transcoded(ts) => {
            let (mut pieces, first) = match started {
                Some(started) => started,
                None => start_transcoding(store, inst, &ts)
                    .await
                    .map_err(std::io::Error::other)?,
            };
            let ct = format!("application/dicom; transfer-syntax={ts}");
            if !writer.start_part(&ct, None).await || !writer.send(first).await {
                return Err(gone());
            }
            while let Some(piece) = pieces.recv().await {
                if !writer.send(piece.map_err(std::io::Error::other)?).await {
                    return Err(gone());
                }
            }
        }
    }
    if !writer.end_part().await {
        return Err(gone());
    }
    Ok(())
}

/// Re-encodes a native object to Explicit VR LE on a blocking thread as it is read from storage,
/// a piece at a time (never the whole object in memory).
async fn reencode_streamed(
    store: &dyn ObjectStore,
    key: &str,
) -> Result<Receiver<Result<Bytes, TranscodeError>>, TranscodeError> {
    let (_, mut stream) = store.get(key).await?;
    let (in_tx, in_rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        while let Some(chunk) = stream.next().await {
            if in_tx.send(chunk).await.is_err() {
                break;
            }
        }
    });
    let input = ChannelReader {
        rx: in_rx,
        current: Bytes::new(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let gone = || std::io::Error::other("client disconnected");
        let result = to_explicit_le_streamed(input, &mut |piece| {
            tx.blocking_send(Ok(Bytes::from(piece))).map_err(|_| gone())
        });
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(TranscodeError::Failed(e.to_string())));
        }
    });
    Ok(rx)
}

/// A blocking reader over a storage stream whose chunks the async side pulls and hands over
/// through a small channel (for the re-encoding thread).
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
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
    let mut refusal = None;
    let plan = parse_accept(accept).iter().find_map(|a| {
        frame_plan(&ts, a)
            .map_err(|e| refusal.get_or_insert(e).clone())
            .ok()
    });
    let Some(plan) = plan else {
        return Err(ApiError::NotAcceptable(refusal.unwrap_or_else(|| {
            format!(
                "frames of this instance are available as application/octet-stream{}",
                compressed_type
                    .map(|ct| format!(" (decompressed) or {ct} (transfer-syntax={ts} or *)"))
                    .unwrap_or_default()
            )
        })));
    };

    let transcoded = matches!(plan, FramePlan::Transcoded { .. });
    let source = FrameSource::prepare(&state, &inst, transcoded).await?;
    let count = source.frame_count();
    if let Some(bad) = numbers.iter().find(|&&n| n as usize > count) {
        return Err(ApiError::NotFound(format!(
            "frame {bad} does not exist (the instance has {count})"
        )));
    }
    // Transcoded frames: the syntax they are made in, and the first frame, made before the
    // response so that a refusal only the object shows (its lossy flag, its bit depth) is a 406.
    let (part_type, part_ts, transcoding, mut first) = match plan {
        FramePlan::AsStored { media_type, ts } => (media_type, ts, None, None),
        FramePlan::Transcoded { media_type, ts } => {
            let index = numbers[0] as usize - 1;
            let first = source
                .transcoded_frame(state.store.as_ref(), &inst, index, &ts)
                .await?;
            (media_type, ts.clone(), Some(ts), Some(first))
        }
    };
    let (writer, body, boundary) = MultipartWriter::new();
    let store = state.store.clone();
    let content_type = format!("{part_type}; transfer-syntax={part_ts}");
    tokio::spawn(async move {
        for n in numbers {
            let result = async {
                if !writer.start_part(&content_type, None).await {
                    return Err(std::io::Error::other("client disconnected"));
                }
                let index = n as usize - 1;
                match &transcoding {
                    None => source.send_frame(&writer, store.as_ref(), index).await?,
                    Some(ts) => {
                        let data = match first.take() {
                            Some(data) => data,
                            None => source
                                .transcoded_frame(store.as_ref(), &inst, index, ts)
                                .await
                                .map_err(std::io::Error::other)?,
                        };
                        if !writer.send(data.into()).await {
                            return Err(std::io::Error::other("client disconnected"));
                        }
                    }
                }
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

/// How the frames of an instance are sent for one acceptable representation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FramePlan {
    AsStored { media_type: String, ts: String },
    Transcoded { media_type: String, ts: String },
}

/// The transfer syntax a frame media type means when the Accept header names none (PS3.18 Table
/// 8.7.3-5).
fn default_frame_syntax(media_type: &str) -> Option<&'static str> {
    Some(match media_type {
        "application/octet-stream" | "*/*" => EXPLICIT_VR_LE,
        "image/jpeg" => "1.2.840.10008.1.2.4.50",
        "image/jls" => JPEG_LS_LOSSLESS,
        "image/jp2" => "1.2.840.10008.1.2.4.90",
        "image/jpx" => "1.2.840.10008.1.2.4.92",
        "image/jphc" => "1.2.840.10008.1.2.4.201",
        "image/dicom-rle" => "1.2.840.10008.1.2.5",
        _ => return None,
    })
}

/// Picks how frames of an instance stored in `stored` are sent for `a`, or says why they cannot.
fn frame_plan(stored: &str, a: &Acceptable) -> Result<FramePlan, String> {
    let stored_type = frame_media_type(stored).unwrap_or("application/octet-stream");
    let as_stored = || {
        Ok(FramePlan::AsStored {
            media_type: stored_type.to_string(),
            ts: if is_native(stored) {
                EXPLICIT_VR_LE
            } else {
                stored
            }
            .to_string(),
        })
    };
    let octet_or_any = matches!(a.media_type.as_str(), "application/octet-stream" | "*/*");
    let requested = a.transfer_syntax.as_deref();
    if requested == Some("*") && (octet_or_any || media_matches(&a.media_type, stored_type)) {
        return as_stored();
    }
    let Some(wanted) = requested.or_else(|| default_frame_syntax(&a.media_type)) else {
        return Err(format!("frames are not available as {}", a.media_type));
    };
    // Native frames are little endian samples whatever the stored encoding.
    let native_wanted = wanted == EXPLICIT_VR_LE;
    if (wanted == stored || (native_wanted && is_native(stored)))
        && (octet_or_any || media_matches(&a.media_type, stored_type))
    {
        return as_stored();
    }
    let media_type = if native_wanted {
        "application/octet-stream"
    } else {
        frame_media_type(wanted).unwrap_or("application/octet-stream")
    };
    if !octet_or_any && !media_matches(&a.media_type, media_type) {
        return Err(format!(
            "{} frames are sent as {media_type}, not {}",
            wanted, a.media_type
        ));
    }
    transcode::check(stored, wanted).map_err(|e| e.to_string())?;
    Ok(FramePlan::Transcoded {
        media_type: media_type.to_string(),
        ts: wanted.to_string(),
    })
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

/// Where frames are read from: the stored object through its recorded layout (the words of big
/// endian pixel data swapped as they are read), or (for a deflated data set, which cannot be
/// addressed by offset, and 8-bit big endian pixel data) an in-memory Explicit VR LE copy.
enum FrameSource {
    Stored {
        key: String,
        layout: Layout,
        /// Size of the words to byte-swap (big endian pixel data), 0 for none.
        swap: u8,
    },
    Converted {
        bytes: Bytes,
        layout: Layout,
    },
}

impl FrameSource {
    /// `transcoded`: the frames are to be transcoded (the transcoder reads little endian frames, so a
    /// big endian object is then re-encoded first, as its one in-memory instance).
    async fn prepare(
        state: &WebState,
        inst: &StoredInstance,
        transcoded: bool,
    ) -> Result<FrameSource, ApiError> {
        let layout: Layout = serde_json::from_str(&inst.frame_layout)
            .map_err(|e| ApiError::Internal(format!("bad frame layout: {e}")))?;
        // Big endian pixel data of more than 8 bits allocated is OW, swapped per sample; with 8 bits
        // it may be OB (as stored) or OW (swapped in pairs), which the index does not tell: those
        // objects are re-encoded.
        let swap = match inst.bits_allocated {
            _ if inst.transfer_syntax_uid != EXPLICIT_VR_BE => Some(0),
            _ if transcoded => None,
            Some(16) => Some(2),
            Some(32) => Some(4),
            Some(64) => Some(8),
            _ => None,
        };
        if let (false, Some(swap)) = (matches!(layout, Layout::Unavailable), swap) {
            return Ok(FrameSource::Stored {
                key: inst.storage_key.clone(),
                layout,
                swap,
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

    /// Frame `index` (0-based) transcoded into `ts`.
    async fn transcoded_frame(
        &self,
        store: &dyn ObjectStore,
        inst: &StoredInstance,
        index: usize,
        ts: &str,
    ) -> Result<Vec<u8>, TranscodeError> {
        match self {
            FrameSource::Stored { layout, .. } => {
                transcode::frame(store, inst, layout, index, ts).await
            }
            FrameSource::Converted { bytes, layout } => {
                transcode::frame_of_copy(bytes.clone(), layout, index, ts).await
            }
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
            FrameSource::Stored { key, swap, .. } => {
                let piece = store
                    .get_range(key, offset, len)
                    .await
                    .map_err(std::io::Error::other)?;
                if *swap > 1 {
                    let mut words = piece.to_vec();
                    swap_words(&mut words, *swap);
                    Bytes::from(words)
                } else {
                    piece
                }
            }
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
        let source = FrameSource::prepare(&state, &inst, false).await?;
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
    } else if let Some(value) = recorded_value(&state, &inst, &path).await? {
        // Recorded at ingest: streamed from a ranged read, never the whole object.
        let (store, key) = (state.store.clone(), inst.storage_key.clone());
        tokio::spawn(async move {
            if !writer
                .start_part("application/octet-stream", Some(&location))
                .await
            {
                return;
            }
            let (mut offset, end) = (value.offset, value.offset + value.length);
            while offset < end {
                let len = (end - offset).min(READ_PIECE);
                let piece = match store.get_range(&key, offset, len).await {
                    Ok(piece) => piece,
                    Err(e) => return writer.fail(std::io::Error::other(e)).await,
                };
                let piece = if value.swap > 1 {
                    let mut words = piece.to_vec();
                    swap_words(&mut words, value.swap);
                    Bytes::from(words)
                } else {
                    piece
                };
                if !writer.send(piece).await {
                    return;
                }
                offset += len;
            }
            if writer.end_part().await {
                writer.finish().await;
            }
        });
    } else {
        // Not recorded (an instance indexed before bulk data was): the object is parsed.
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

/// Where the value at a bulk path lies in the stored object, if ingest recorded it.
async fn recorded_value(
    state: &WebState,
    inst: &StoredInstance,
    path: &str,
) -> Result<Option<BulkValue>, ApiError> {
    let path = path.to_ascii_uppercase();
    if !path.bytes().all(|b| b.is_ascii_hexdigit() || b == b'/') {
        return Ok(None);
    }
    let value = state
        .index
        .bulk_value(
            &inst.study_uid,
            &inst.series_uid,
            &inst.sop_instance_uid,
            &path,
        )
        .await?;
    Ok(value.flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_follow_the_requested_transfer_syntax() {
        const JPEG: &str = "1.2.840.10008.1.2.4.50";
        const J2K_LOSSLESS: &str = "1.2.840.10008.1.2.4.90";
        let explicit = || Ok(Encoding::Transcoded(EXPLICIT_VR_LE.into()));
        assert_eq!(encoding_for(EXPLICIT_VR_LE, None), Ok(Encoding::AsStored));
        assert_eq!(encoding_for(IMPLICIT_VR_LE, None), explicit());
        assert_eq!(encoding_for(IMPLICIT_VR_LE, Some("*")), explicit());
        assert_eq!(encoding_for(EXPLICIT_VR_BE, Some("*")), explicit());
        assert_eq!(encoding_for(JPEG, Some("*")), Ok(Encoding::AsStored));
        assert_eq!(encoding_for(JPEG, Some(JPEG)), Ok(Encoding::AsStored));
        assert_eq!(encoding_for(JPEG, None), explicit());
        assert_eq!(
            encoding_for(J2K_LOSSLESS, Some(JPEG_LS_LOSSLESS)),
            Ok(Encoding::Transcoded(JPEG_LS_LOSSLESS.into()))
        );
        assert!(encoding_for(JPEG, Some(JPEG_LS_LOSSLESS)).is_err());
        assert!(encoding_for(IMPLICIT_VR_LE, Some(IMPLICIT_VR_LE)).is_err());
    }

    #[test]
    fn frames_are_sent_as_stored_or_transcoded() {
        const J2K: &str = "1.2.840.10008.1.2.4.91";
        let accept = |h: &str| parse_accept(Some(h)).remove(0);
        let octet = accept("multipart/related; type=\"application/octet-stream\"");
        assert_eq!(
            frame_plan(J2K, &octet),
            Ok(FramePlan::Transcoded {
                media_type: "application/octet-stream".into(),
                ts: EXPLICIT_VR_LE.into()
            })
        );
        assert_eq!(
            frame_plan(EXPLICIT_VR_LE, &octet),
            Ok(FramePlan::AsStored {
                media_type: "application/octet-stream".into(),
                ts: EXPLICIT_VR_LE.into()
            })
        );
        let any = accept("multipart/related; type=\"application/octet-stream\"; transfer-syntax=*");
        assert_eq!(
            frame_plan(J2K, &any),
            Ok(FramePlan::AsStored {
                media_type: "image/jp2".into(),
                ts: J2K.into()
            })
        );
        let jls = accept("multipart/related; type=\"image/jls\"");
        assert_eq!(
            frame_plan(EXPLICIT_VR_LE, &jls),
            Ok(FramePlan::Transcoded {
                media_type: "image/jls".into(),
                ts: JPEG_LS_LOSSLESS.into()
            })
        );
        assert!(frame_plan(J2K, &jls).is_err(), "lossless from lossy");
        assert!(frame_plan(
            EXPLICIT_VR_LE,
            &accept("multipart/related; type=\"image/jp2\"")
        )
        .is_err());
    }

    #[test]
    fn frame_lists_are_one_based() {
        assert_eq!(parse_frame_list("1,3").unwrap(), vec![1, 3]);
        assert!(parse_frame_list("0").is_err());
        assert!(parse_frame_list("1,x").is_err());
        assert!(parse_frame_list("").is_err());
    }
}
