//! From a parsed object header to an index record: validated UIDs, normalised matching values, and
//! the DICOM JSON kept for QIDO-RS and WADO-RS metadata.

use dicom_core::header::Header;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::bulk::{BulkPlan, INLINE_MAX};
use crate::dicom::{ImageGeometry, Layout};
use crate::index::query::is_valid_uid;
use crate::index::record::{InstanceAttrs, InstanceRecord, SeriesAttrs, StudyAttrs};
use crate::index::temporal::{normalize_date, normalize_datetime, normalize_time, parse_offset};
use crate::model::json::{to_json_string, BulkPolicy};
use crate::model::levels::{SERIES_TAGS, STUDY_TAGS};

/// Placeholder that starts every stored BulkDataURI; replaced by the public base URL when served.
pub const BASE_PLACEHOLDER: &str = "{{BASE}}";

/// The identifying UIDs of an object, all validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUids {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_uid: String,
    pub series_uid: String,
}

/// Text value of an element, padding trimmed; empty when absent or not text.
// Elements are looked up with `get`: `element_opt` builds its not-found error with a captured
// backtrace, which cost a third of ingest's CPU.
pub fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| {
            e.to_str()
                .ok()
                .map(|s| s.trim_matches([' ', '\0']).to_string())
        })
        .unwrap_or_default()
}

fn integer(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    let e = obj.get(tag)?;
    e.to_int::<i64>().ok()
}

/// Decodes fixed-size little endian numbers (a trailing partial chunk is ignored).
fn le<const N: usize, T>(bytes: &[u8], from: fn([u8; N]) -> T) -> dicom_core::value::C<T> {
    bytes
        .chunks_exact(N)
        .map(|c| from(c.try_into().expect("chunk of N bytes")))
        .collect()
}

/// Re-types top-level elements stored with VR UN whose tag the standard dictionary knows (legal in
/// Explicit VR, PS3.5 6.2.2): their bytes are decoded with the dictionary's VR, so the UIDs, numbers
/// and names they hold are matched and returned like any other. UN values are little endian.
pub fn resolve_unknown_vrs(obj: &mut InMemDicomObject) {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    use dicom_core::value::{PrimitiveValue, C};
    use dicom_core::DataElement;
    let unknown: Vec<(Tag, VR, Vec<u8>)> = obj
        .iter()
        .filter(|e| e.vr() == VR::UN)
        .filter_map(|e| {
            let vr = dicom_dictionary_std::StandardDataDictionary
                .by_tag(e.tag())
                .and_then(|entry| entry.vr().exact())?;
            let bytes = e.value().to_bytes().ok()?.into_owned();
            // an empty value stays UN: it may be one left out as bulk data (see `bulk`)
            (!bytes.is_empty()).then_some((e.tag(), vr, bytes))
        })
        .collect();
    for (tag, vr, bytes) in unknown {
        let value = match vr {
            VR::SQ | VR::UN => continue,
            VR::US => PrimitiveValue::U16(le(&bytes, u16::from_le_bytes)),
            VR::SS => PrimitiveValue::I16(le(&bytes, i16::from_le_bytes)),
            VR::UL => PrimitiveValue::U32(le(&bytes, u32::from_le_bytes)),
            VR::SL => PrimitiveValue::I32(le(&bytes, i32::from_le_bytes)),
            VR::FL => PrimitiveValue::F32(le(&bytes, f32::from_le_bytes)),
            VR::FD => PrimitiveValue::F64(le(&bytes, f64::from_le_bytes)),
            VR::OB | VR::OW | VR::OF | VR::OD | VR::OL | VR::OV | VR::AT | VR::SV | VR::UV => {
                PrimitiveValue::U8(C::from_vec(bytes))
            }
            _ => {
                // Text: the default repertoire is a subset of Latin-1, which maps bytes 1:1.
                let text: String = bytes.iter().map(|&b| b as char).collect();
                let text = text.trim_end_matches(['\0', ' ']);
                let single = matches!(vr, VR::LT | VR::ST | VR::UT | VR::UR);
                let values: Vec<String> = if single {
                    vec![text.to_string()]
                } else {
                    text.split('\\').map(str::to_string).collect()
                };
                PrimitiveValue::Strs(C::from_vec(values))
            }
        };
        let vr = match vr {
            VR::AT | VR::SV | VR::UV => VR::UN,
            other => other,
        };
        obj.put(DataElement::new(tag, vr, value));
    }
}

/// The object's UIDs, or which one is missing or malformed.
pub fn object_uids(obj: &InMemDicomObject) -> Result<ObjectUids, String> {
    let uid = |tag: Tag, name: &str| {
        let v = text(obj, tag);
        if v.is_empty() {
            Err(format!("{name} is missing"))
        } else if !is_valid_uid(&v) {
            Err(format!("{name} {v:?} is not a valid UID"))
        } else {
            Ok(v)
        }
    };
    Ok(ObjectUids {
        sop_class_uid: uid(tags::SOP_CLASS_UID, "SOP Class UID")?,
        sop_instance_uid: uid(tags::SOP_INSTANCE_UID, "SOP Instance UID")?,
        study_uid: uid(tags::STUDY_INSTANCE_UID, "Study Instance UID")?,
        series_uid: uid(tags::SERIES_INSTANCE_UID, "Series Instance UID")?,
    })
}

pub fn geometry(obj: &InMemDicomObject) -> ImageGeometry {
    let small = |tag, default| {
        integer(obj, tag)
            .and_then(|v| u16::try_from(v).ok())
            .unwrap_or(default)
    };
    ImageGeometry {
        rows: small(tags::ROWS, 0),
        columns: small(tags::COLUMNS, 0),
        samples_per_pixel: small(tags::SAMPLES_PER_PIXEL, 1),
        bits_allocated: small(tags::BITS_ALLOCATED, 0),
        number_of_frames: integer(obj, tags::NUMBER_OF_FRAMES)
            .and_then(|v| u32::try_from(v).ok())
            .filter(|&v| v > 0)
            .unwrap_or(1),
    }
}

/// The pixel data element the header reader stopped at, as the JSON model needs to announce it.
fn pixel_data_element(layout: &Layout, geometry: &ImageGeometry) -> Option<(Tag, VR)> {
    match layout {
        Layout::NoPixelData => None,
        Layout::Native { .. } if geometry.bits_allocated > 8 => Some((tags::PIXEL_DATA, VR::OW)),
        _ => Some((tags::PIXEL_DATA, VR::OB)),
    }
}

/// A copy of the object restricted to `keep` (for the study and series JSON).
fn subset(obj: &InMemDicomObject, keep: &[Tag]) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(
        obj.iter()
            .filter(|e| keep.contains(&e.header().tag))
            .cloned(),
    )
}

/// Builds the index record of a stored object; `bulk` says where its bulk data lies and which
/// values were left out of `obj`.
pub fn build_record(
    obj: &InMemDicomObject,
    uids: &ObjectUids,
    layout: &Layout,
    transfer_syntax_uid: &str,
    storage_key: &str,
    size_bytes: u64,
    bulk: &BulkPlan,
) -> InstanceRecord {
    let geometry = geometry(obj);
    let prefix = format!(
        "{BASE_PLACEHOLDER}/studies/{}/series/{}/instances/{}/bulk",
        uids.study_uid, uids.series_uid, uids.sop_instance_uid
    );
    let policy = BulkPolicy {
        uri_prefix: &prefix,
        inline_threshold: INLINE_MAX as usize,
        left_out: Some(&bulk.left_out),
    };
    let date = |tag| normalize_date(&text(obj, tag)).unwrap_or_default();
    let time = |tag| normalize_time(&text(obj, tag)).unwrap_or_default();

    let study = StudyAttrs {
        study_uid: uids.study_uid.clone(),
        patient_id: text(obj, tags::PATIENT_ID),
        issuer_of_patient_id: text(obj, tags::ISSUER_OF_PATIENT_ID),
        patient_name: text(obj, tags::PATIENT_NAME).to_uppercase(),
        patient_birth_date: date(tags::PATIENT_BIRTH_DATE),
        patient_sex: text(obj, tags::PATIENT_SEX),
        study_date: date(tags::STUDY_DATE),
        study_time: time(tags::STUDY_TIME),
        accession_number: text(obj, tags::ACCESSION_NUMBER),
        study_id: text(obj, tags::STUDY_ID),
        study_description: text(obj, tags::STUDY_DESCRIPTION),
        referring_physician_name: text(obj, tags::REFERRING_PHYSICIAN_NAME).to_uppercase(),
        attrs_json: to_json_string(&subset(obj, STUDY_TAGS), &policy, None),
    };
    let series = SeriesAttrs {
        series_uid: uids.series_uid.clone(),
        modality: text(obj, tags::MODALITY),
        series_number: integer(obj, tags::SERIES_NUMBER),
        series_description: text(obj, tags::SERIES_DESCRIPTION),
        body_part_examined: text(obj, tags::BODY_PART_EXAMINED),
        laterality: text(obj, tags::LATERALITY),
        series_date: date(tags::SERIES_DATE),
        series_time: time(tags::SERIES_TIME),
        performed_procedure_step_start_date: date(tags::PERFORMED_PROCEDURE_STEP_START_DATE),
        performed_procedure_step_start_time: time(tags::PERFORMED_PROCEDURE_STEP_START_TIME),
        attrs_json: to_json_string(&subset(obj, SERIES_TAGS), &policy, None),
    };
    let instance = InstanceAttrs {
        sop_instance_uid: uids.sop_instance_uid.clone(),
        sop_class_uid: uids.sop_class_uid.clone(),
        instance_number: integer(obj, tags::INSTANCE_NUMBER),
        rows: integer(obj, tags::ROWS),
        columns: integer(obj, tags::COLUMNS),
        bits_allocated: integer(obj, tags::BITS_ALLOCATED),
        number_of_frames: integer(obj, tags::NUMBER_OF_FRAMES),
        content_date: date(tags::CONTENT_DATE),
        content_time: time(tags::CONTENT_TIME),
        acquisition_datetime: normalize_datetime(
            &text(obj, tags::ACQUISITION_DATE_TIME),
            parse_offset(&text(obj, tags::TIMEZONE_OFFSET_FROM_UTC)),
        )
        .unwrap_or_default(),
        transfer_syntax_uid: transfer_syntax_uid.to_string(),
        storage_key: storage_key.to_string(),
        size_bytes,
        metadata_json: to_json_string(obj, &policy, pixel_data_element(layout, &geometry)),
        frame_layout: serde_json::to_string(layout).expect("layout serialises"),
        bulk_data: bulk.values_json(),
    };
    InstanceRecord {
        study,
        series,
        instance,
        audit: None,
    }
}
