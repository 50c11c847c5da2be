//! STOW-RS (PS3.18 10.5): `POST /studies` and `POST /studies/{study}` with a
//! `multipart/related; type="application/dicom"` body, one Part-10 object per part.
//!
//! - [`multipart_reader`]: the body, read as a stream: part headers, then content chunks.
//! - [`response`]: the Store Instances Response in the DICOM JSON model.
//!
//! Each part streams into an ingest spool file as it arrives, then goes through
//! [`Ingestor::ingest_identified`], the path C-STORE takes: same validation, same durability order,
//! same duplicate rule. A few parts are ingested while the next ones arrive ([`IN_FLIGHT`]), so
//! memory stays bounded by that number of objects' buffers however large the request. A part is
//! handed to ingest only once the delimiter that closes it has arrived: a part cut short by a
//! truncated body is never stored. Parts that arrived whole before the body broke off are stored
//! (each part is a unit of its own, as a C-STORE is), and the 400 answer says how many.

pub mod multipart_reader;
mod response;

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use dicom_object::FileMetaTable;
use tokio::task::JoinHandle;

use super::{check_uids, ApiError, WebState};
use crate::audit::{Origin, Protocol};
use crate::dimse::store::is_standard_storage_class;
use crate::ingest::{EarlyHeader, Expected, IngestError, Outcome, SpoolWriter};
use crate::security::Identity;
use multipart_reader::{parse_related, ContentTypeError, MultipartError, MultipartReader};
use response::{reason, PartResult};

/// Limits and rules of STOW-RS (from `[http]` and `[dimse]`).
#[derive(Debug, Clone)]
pub struct StowConfig {
    /// Largest request body, in bytes (413 above).
    pub max_request_size: u64,
    /// Largest object (part), in bytes: larger ones fail with A700, as C-STORE's do.
    pub max_object_size: u64,
    /// Store SOP classes that are not in the standard (as C-STORE does).
    pub accept_private_sop_classes: bool,
}

/// Parts being ingested while the next ones arrive. Each holds at most ingest's buffers (1.25 MB),
/// and several in flight let the index writer commit them in one group.
const IN_FLIGHT: usize = 8;

/// Largest file meta information group read from a part (it is a few hundred bytes in practice).
const MAX_META: usize = 64 * 1024;

/// `POST /studies`.
pub async fn store(
    State(state): State<Arc<WebState>>,
    Extension(who): Extension<Identity>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let by = Origin::new(who, Protocol::DicomWeb);
    receive(state, by, None, headers, body).await
}

/// `POST /studies/{study}`: every instance must belong to that study.
pub async fn store_in_study(
    State(state): State<Arc<WebState>>,
    Extension(who): Extension<Identity>,
    Path(study): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_uids(&[&study])?;
    let by = Origin::new(who, Protocol::DicomWeb);
    receive(state, by, Some(study), headers, body).await
}

async fn receive(
    state: Arc<WebState>,
    by: Origin,
    study: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let related = parse_related(content_type).map_err(|e| match e {
        ContentTypeError::NotRelated(media) => ApiError::UnsupportedMediaType(format!(
            "STOW-RS takes multipart/related; type=\"application/dicom\", not {media:?}"
        )),
        ContentTypeError::NoBoundary => ApiError::BadRequest(
            "multipart/related without a boundary parameter (1 to 70 characters)".into(),
        ),
    })?;
    match related.root_type.as_deref() {
        None | Some("application/dicom") => {}
        Some(t @ ("application/dicom+json" | "application/dicom+xml")) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "STOW-RS of {t} metadata with bulk data parts is not supported: send each \
                 instance as a Part-10 file, multipart/related; type=\"application/dicom\""
            )))
        }
        Some(other) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "STOW-RS parts of type {other:?} are not supported; use application/dicom"
            )))
        }
    }
    let config = &state.stow;
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > config.max_request_size) {
        return Err(too_large(config.max_request_size));
    }

    let mut reader = MultipartReader::new(
        body.into_data_stream(),
        &related.boundary,
        config.max_request_size,
    );
    let mut results: Vec<Option<PartResult>> = Vec::new();
    let mut ingesting: VecDeque<(usize, JoinHandle<PartResult>)> = VecDeque::new();
    let outcome = loop {
        let part = match reader.next_part().await {
            Ok(Some(part)) => part,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let slot = results.len();
        results.push(None);
        let part_type = part.get("content-type").map(media_type);
        if let Some(other) = part_type.filter(|t| t != "application/dicom") {
            results[slot] = Some(failed(
                None,
                reason::CANNOT_UNDERSTAND,
                format!("part of type {other:?}, not application/dicom"),
            ));
            continue;
        }
        match receive_part(&state, &mut reader, study.as_deref()).await {
            Ok(Received::Refused(result)) => results[slot] = Some(result),
            Ok(Received::Whole(part)) => {
                if ingesting.len() >= IN_FLIGHT {
                    let (at, task) = ingesting.pop_front().expect("tasks in flight");
                    results[at] = Some(task.await.expect("ingest task panicked"));
                }
                let task = tokio::spawn(ingest(state.clone(), *part, by.clone()));
                ingesting.push_back((slot, task));
            }
            Err(e) => {
                results.pop();
                break Err(e);
            }
        }
    };
    // Parts handed to ingest are finished in any case: success is only ever reported (or
    // withheld) once an object's fate is known.
    for (at, task) in ingesting {
        results[at] = Some(task.await.expect("ingest task panicked"));
    }
    let results: Vec<PartResult> = results.into_iter().flatten().collect();
    for result in &results {
        if let PartResult::Failed {
            sop_instance_uid,
            reason,
            comment,
            ..
        } = result
        {
            tracing::warn!(
                peer = ?by.who.address,
                sop_instance_uid,
                reason = format!("{reason:04X}"),
                comment,
                "STOW-RS part refused"
            );
        }
    }
    if let Err(e) = outcome {
        let stored = results.iter().filter(|r| r.is_stored()).count();
        let note = format!(
            "{e}; {stored} instance(s) received whole before that were stored, the rest was not"
        );
        return Err(match e {
            MultipartError::TooLarge(limit) => {
                ApiError::PayloadTooLarge(format!("{note} (limit {limit} bytes)"))
            }
            _ => ApiError::BadRequest(note),
        });
    }
    if results.is_empty() {
        return Err(ApiError::BadRequest(
            "the multipart body holds no part".into(),
        ));
    }
    let stored = results.iter().filter(|r| r.is_stored()).count();
    let warned = results.iter().any(|r| {
        matches!(
            r,
            PartResult::Stored {
                warning: Some(_),
                ..
            }
        )
    });
    // PS3.18 Table 10.5.3-1: 200 all stored, 202 some failed or with warnings, 409 none stored.
    let status = if stored == 0 {
        StatusCode::CONFLICT
    } else if stored < results.len() || warned {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let body = response::build(&results, &state.base_url(&headers), study.as_deref());
    let mut response = (
        status,
        [("content-type", "application/dicom+json")],
        serde_json::Value::Object(body).to_string(),
    )
        .into_response();
    // The first refusal's reason in words (PS3.18 8.4.4: Warning 299), for people reading logs.
    let first_failure = results.iter().find_map(|r| match r {
        PartResult::Failed { comment, .. } => Some(comment),
        PartResult::Stored { .. } => None,
    });
    if let Some(comment) = first_failure {
        let text = format!(
            "299 dicom-gateway \"{}\"",
            comment.replace(['"', '\\'], "'")
        );
        if let Ok(value) = HeaderValue::from_str(&text) {
            response.headers_mut().insert("warning", value);
        }
    }
    Ok(response)
}

fn too_large(limit: u64) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the request body is larger than the {limit} byte limit ([http] max_stow_size)"
    ))
}

/// The media type of a Content-Type value, without parameters, lower case.
fn media_type(value: &str) -> String {
    let media = value.split(';').next().unwrap_or("");
    media.trim().to_ascii_lowercase()
}

fn failed(meta: Option<&Meta>, reason: u16, comment: impl Into<String>) -> PartResult {
    PartResult::Failed {
        sop_class_uid: meta.map(|m| m.sop_class_uid.clone()).unwrap_or_default(),
        sop_instance_uid: meta.map(|m| m.sop_instance_uid.clone()).unwrap_or_default(),
        reason,
        comment: comment.into(),
    }
}

/// The UIDs a part's file meta information names.
struct Meta {
    sop_class_uid: String,
    sop_instance_uid: String,
}

/// A part received whole, ready for ingest.
struct WholePart {
    spool: SpoolWriter,
    early: Option<EarlyHeader>,
    expected: Expected,
}

enum Received {
    Whole(Box<WholePart>),
    /// Refused before ingest (its content was read and dropped).
    Refused(PartResult),
}

/// Reads one part's content into a spool file. The file meta information is read from its first
/// bytes, so a part of another SOP class or over the size limit is refused (and its content
/// dropped as it arrives) without spooling it.
async fn receive_part<S, E>(
    state: &WebState,
    reader: &mut MultipartReader<S>,
    study: Option<&str>,
) -> Result<Received, MultipartError>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let config = &state.stow;
    let mut head: Vec<u8> = Vec::new();
    let mut meta: Option<Meta> = None;
    let mut refused: Option<PartResult> = None;
    let mut spool = None;
    let mut early = None;
    let mut size = 0u64;
    while let Some(chunk) = reader.next_chunk().await? {
        if refused.is_some() {
            continue;
        }
        size += chunk.len() as u64;
        if size > config.max_object_size {
            refused = Some(failed(
                meta.as_ref(),
                reason::OUT_OF_RESOURCES,
                format!(
                    "object larger than the {} byte limit",
                    config.max_object_size
                ),
            ));
            spool = None; // dropping the writer removes its file
            continue;
        }
        if meta.is_none() {
            let wanted = MAX_META.saturating_sub(head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..wanted]);
            match read_meta(&head) {
                MetaRead::NeedMore => {}
                MetaRead::Bad(why) => {
                    refused = Some(failed(None, reason::CANNOT_UNDERSTAND, why));
                    continue;
                }
                MetaRead::Read(m) => {
                    if let Some(refusal) = check_sop_class(config, &m) {
                        refused = Some(refusal);
                        continue;
                    }
                    meta = Some(m);
                    head = Vec::new();
                }
            }
        }
        if spool.is_none() {
            match SpoolWriter::create_received(state.ingestor.spool()).await {
                Ok(writer) => spool = Some(writer),
                Err(e) => {
                    tracing::error!(error = %e, "cannot create spool file");
                    refused = Some(failed(
                        meta.as_ref(),
                        reason::OUT_OF_RESOURCES,
                        "cannot spool the object",
                    ));
                    continue;
                }
            }
        }
        let writer = spool.as_mut().expect("spool file created above");
        if let Err(e) = writer.write(&chunk).await {
            tracing::error!(error = %e, "spool write failed");
            refused = Some(failed(
                meta.as_ref(),
                reason::OUT_OF_RESOURCES,
                "cannot spool the object",
            ));
            spool = None;
            continue;
        }
        if let Some(prefix) = writer.take_prefix() {
            early = Some(state.ingestor.read_header_early(prefix));
        }
    }
    if let Some(refused) = refused {
        return Ok(Received::Refused(refused));
    }
    let (Some(meta), Some(spool)) = (meta, spool) else {
        return Ok(Received::Refused(failed(
            None,
            reason::CANNOT_UNDERSTAND,
            "part too short to be a DICOM Part-10 file (no complete file meta information)",
        )));
    };
    let expected = Expected {
        sop_class_uid: meta.sop_class_uid,
        sop_instance_uid: meta.sop_instance_uid,
        study_instance_uid: study.map(String::from),
    };
    Ok(Received::Whole(Box::new(WholePart {
        spool,
        early,
        expected,
    })))
}

enum MetaRead {
    NeedMore,
    Bad(String),
    Read(Meta),
}

/// Reads the file meta information (PS3.10 7.1) from a part's first bytes, once they hold it: its
/// group length (the first element, required) says how many bytes that takes.
fn read_meta(head: &[u8]) -> MetaRead {
    const GROUP_START: usize = 132;
    const FIRST_VALUE: usize = GROUP_START + 12;
    if head.len() >= GROUP_START && &head[128..GROUP_START] != b"DICM" {
        return MetaRead::Bad(
            "not a DICOM Part-10 file (no DICM prefix after the preamble)".into(),
        );
    }
    if head.len() < FIRST_VALUE {
        return MetaRead::NeedMore;
    }
    let group_length = &head[GROUP_START..FIRST_VALUE];
    if group_length[..8] != [0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0] {
        return MetaRead::Bad(
            "file meta information does not start with its group length (0002,0000)".into(),
        );
    }
    let length = u32::from_le_bytes(group_length[8..12].try_into().expect("4 bytes")) as usize;
    let end = FIRST_VALUE.saturating_add(length);
    if end > MAX_META {
        return MetaRead::Bad(format!(
            "file meta information of {length} bytes (at most {MAX_META} accepted)"
        ));
    }
    if head.len() < end {
        return MetaRead::NeedMore;
    }
    match FileMetaTable::from_reader(&head[128..end]) {
        Ok(table) => MetaRead::Read(Meta {
            sop_class_uid: trim_uid(&table.media_storage_sop_class_uid),
            sop_instance_uid: trim_uid(&table.media_storage_sop_instance_uid),
        }),
        Err(e) => MetaRead::Bad(format!("unreadable file meta information: {e}")),
    }
}

fn trim_uid(uid: &str) -> String {
    uid.trim_end_matches(['\0', ' ']).to_string()
}

/// The refusal of a part whose SOP class is not stored, by C-STORE's rule.
fn check_sop_class(config: &StowConfig, meta: &Meta) -> Option<PartResult> {
    let class = &meta.sop_class_uid;
    let valid = crate::index::query::is_valid_uid;
    if !valid(&meta.sop_instance_uid) {
        return Some(failed(
            Some(meta),
            reason::DATA_SET_DOES_NOT_MATCH,
            "Media Storage SOP Instance UID is missing or invalid",
        ));
    }
    let supported =
        is_standard_storage_class(class) || (config.accept_private_sop_classes && valid(class));
    (!supported).then(|| {
        failed(
            Some(meta),
            reason::SOP_CLASS_NOT_SUPPORTED,
            format!("SOP class {class} is not a supported Storage SOP class"),
        )
    })
}

/// Ingests one whole part (its own task, so that it completes even if the client goes away); its
/// audit event is recorded by ingest, as C-STORE's is.
async fn ingest(state: Arc<WebState>, part: WholePart, by: Origin) -> PartResult {
    let WholePart {
        spool,
        early,
        expected,
    } = part;
    let meta = Meta {
        sop_class_uid: expected.sop_class_uid.clone(),
        sop_instance_uid: expected.sop_instance_uid.clone(),
    };
    let result = state
        .ingestor
        .ingest_identified(spool.finish(), Some(&expected), early, &by)
        .await;
    match result {
        Ok((outcome, uids)) => PartResult::Stored {
            sop_class_uid: uids.sop_class_uid,
            sop_instance_uid: uids.sop_instance_uid,
            study_uid: uids.study_uid,
            series_uid: uids.series_uid,
            warning: (outcome == Outcome::DuplicateKept).then_some(reason::COERCED),
        },
        Err(IngestError::Unparseable(m)) => failed(Some(&meta), reason::CANNOT_UNDERSTAND, m),
        Err(IngestError::Invalid(m)) => failed(Some(&meta), reason::DATA_SET_DOES_NOT_MATCH, m),
        Err(e @ (IngestError::Storage(_) | IngestError::Index(_))) => {
            tracing::error!(error = %e, "object not stored");
            failed(Some(&meta), reason::OUT_OF_RESOURCES, e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part10(class: &str, instance: &str) -> Vec<u8> {
        let meta = dicom_object::meta::FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(class)
            .media_storage_sop_instance_uid(instance)
            .transfer_syntax("1.2.840.10008.1.2.1")
            .build()
            .unwrap();
        let mut bytes = vec![0u8; 128];
        bytes.extend_from_slice(b"DICM");
        meta.write(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn file_meta_is_read_once_its_bytes_are_there() {
        let bytes = part10("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4");
        for n in 0..bytes.len() {
            assert!(matches!(read_meta(&bytes[..n]), MetaRead::NeedMore), "{n}");
        }
        match read_meta(&bytes) {
            MetaRead::Read(m) => {
                assert_eq!(m.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2");
                assert_eq!(m.sop_instance_uid, "1.2.3.4");
            }
            _ => panic!("meta not read"),
        }
        let mut not_dicom = bytes.clone();
        not_dicom[129] = b'X';
        assert!(matches!(read_meta(&not_dicom), MetaRead::Bad(_)));
    }

    #[test]
    fn only_storage_classes_are_accepted() {
        let config = |private| StowConfig {
            max_request_size: 1,
            max_object_size: 1,
            accept_private_sop_classes: private,
        };
        let meta = |class: &str| Meta {
            sop_class_uid: class.into(),
            sop_instance_uid: "1.2.3".into(),
        };
        assert!(check_sop_class(&config(false), &meta("1.2.840.10008.5.1.4.1.1.2")).is_none());
        let refused = check_sop_class(&config(false), &meta("1.2.840.10008.1.1"));
        assert!(matches!(
            refused,
            Some(PartResult::Failed {
                reason: reason::SOP_CLASS_NOT_SUPPORTED,
                ..
            })
        ));
        assert!(check_sop_class(&config(false), &meta("1.2.3.4")).is_some());
        assert!(check_sop_class(&config(true), &meta("1.2.3.4")).is_none());
    }
}
