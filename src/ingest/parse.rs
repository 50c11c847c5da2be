//! The parse of a spooled object (blocking): its meta group and data set walked by [`crate::dicom`]
//! (every declared length checked, what dicom-rs would misread refused), its header (the elements
//! before the pixel data, large values left out, see [`super::bulk`]) parsed by dicom-rs, its UIDs
//! validated, its frames located and its index record built.

use std::io::{Read, Seek};

use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{InMemDicomObject, OpenFileOptions};

use super::early::Forecast;
use super::extract::{self, build_record, geometry, object_uids, ObjectUids};
use super::{bulk, IngestError};
use crate::dicom::{self, locate_frames, read_meta_extent, Layout};

/// The result of parsing a spooled object, before anything is stored.
pub(super) struct Parsed {
    pub(super) uids: ObjectUids,
    pub(super) record: crate::index::InstanceRecord,
}

/// An object's header: every element before its pixel data, parsed, with its UIDs validated.
pub(super) struct Header {
    pub(super) dataset_start: u64,
    pub(super) ts_uid: String,
    pub(super) obj: InMemDicomObject,
    pub(super) uids: ObjectUids,
    /// The values served as bulk data, and those left out of `obj`.
    pub(super) bulk: bulk::BulkPlan,
}

/// Parses a whole object (blocking): its header, then its pixel data's layout.
pub(super) fn parse<R: Read + Seek>(
    reader: &mut R,
    size: u64,
    key_for: impl FnOnce(&ObjectUids) -> String,
) -> Result<Parsed, IngestError> {
    let header = read_header(reader)?;
    complete(header, reader, size, key_for, None)
}

fn unparseable(e: &dyn std::fmt::Display) -> IngestError {
    IngestError::Unparseable(e.to_string())
}

/// The transfer syntax named by the file meta group, and where the data set starts.
pub(super) fn read_meta<R: Read + Seek>(reader: &mut R) -> Result<(u64, String), IngestError> {
    let (dataset_start, ts_uid) = read_meta_extent(reader).map_err(|e| unparseable(&e))?;
    let ts_uid = ts_uid.trim_end_matches(['\0', ' ']).to_string();
    if dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(&ts_uid)
        .is_none()
    {
        return Err(IngestError::Invalid(format!(
            "unknown transfer syntax {ts_uid}"
        )));
    }
    Ok((dataset_start, ts_uid))
}

/// Reads and checks the header of a whole object.
pub(super) fn read_header<R: Read + Seek>(reader: &mut R) -> Result<Header, IngestError> {
    let (dataset_start, ts_uid) = read_meta(reader)?;
    // Walk the encoded elements first (a deflated data set inflated): it checks every declared
    // length against the object's size, so the parser below never allocates for lengths a hostile
    // or truncated object only claims.
    dicom::check_before_parse(reader, dataset_start, &ts_uid)
        .map_err(|e| IngestError::Unparseable(e.to_string()))?;
    decode_header(reader, dataset_start, ts_uid)
}

/// Decodes the elements before the pixel data (their lengths already checked) and the UIDs.
pub(super) fn decode_header<R: Read + Seek>(
    reader: &mut R,
    dataset_start: u64,
    ts_uid: String,
) -> Result<Header, IngestError> {
    // Large values are left out of what dicom-rs parses (see `bulk`).
    let bulk = bulk::plan(reader, dataset_start, &ts_uid).map_err(|e| unparseable(&e))?;
    let obj = if bulk.leaves_out_nothing() {
        parse_elements(reader, dataset_start, &ts_uid)?
    } else {
        let mut view = bulk.view(reader).map_err(|e| unparseable(&e))?;
        parse_elements(&mut view, dataset_start, &ts_uid)?
    };
    let uids = object_uids(&obj).map_err(IngestError::Invalid)?;
    Ok(Header {
        dataset_start,
        ts_uid,
        obj,
        uids,
        bulk,
    })
}

/// Parses the elements before the pixel data with dicom-rs, their text decoded.
fn parse_elements<R: Read + Seek>(
    reader: &mut R,
    dataset_start: u64,
    ts_uid: &str,
) -> Result<InMemDicomObject, IngestError> {
    reader.rewind().map_err(|e| unparseable(&e))?;
    let mut obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .read_preamble(ReadPreamble::Always)
        .from_reader(&mut *reader)
        .map_err(|e| unparseable(&e))?
        .into_inner();
    extract::resolve_unknown_vrs(&mut obj);
    crate::model::charset::fix_text_encoding(&mut obj, reader, dataset_start, ts_uid)
        .map_err(|e| unparseable(&e))?;
    Ok(obj)
}

/// Completes the parse of a whole object whose header is read: locates its frames (checking every
/// length against its size again, those of the elements after the pixel data included) and builds
/// its index record.
pub(super) fn complete<R: Read + Seek>(
    header: Header,
    reader: &mut R,
    size: u64,
    key_for: impl FnOnce(&ObjectUids) -> String,
    forecast: Option<Forecast>,
) -> Result<Parsed, IngestError> {
    let Header {
        dataset_start,
        ts_uid,
        obj,
        uids,
        bulk,
    } = header;
    let layout = locate_frames(reader, dataset_start, &ts_uid, &geometry(&obj))
        .map_err(|e| IngestError::Unparseable(format!("pixel data: {e}")))?;
    check_extents(&layout, size)?;
    let key = key_for(&uids);
    // The forecast used this header and key suffix: only the layout can differ.
    let record = match forecast {
        Some(Forecast {
            layout: l,
            mut record,
        }) if l == layout => {
            record.instance.size_bytes = size;
            record
        }
        _ => build_record(&obj, &uids, &layout, &ts_uid, &key, size, &bulk),
    };
    Ok(Parsed { uids, record })
}

/// Pixel data that would run past the end of the object means the object was truncated.
fn check_extents(layout: &Layout, size: u64) -> Result<(), IngestError> {
    let end = match layout {
        Layout::Native { value, .. } => value.offset + value.length,
        Layout::Encapsulated { frames } => frames
            .iter()
            .flatten()
            .map(|e| e.offset + e.length)
            .max()
            .unwrap_or(0),
        Layout::NoPixelData | Layout::Unavailable => 0,
    };
    if end > size {
        return Err(IngestError::Unparseable(format!(
            "object truncated: pixel data ends at byte {end} of {size}"
        )));
    }
    Ok(())
}
