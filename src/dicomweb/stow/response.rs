//! The Store Instances Response (PS3.18 10.5.3): which parts were stored, which refused and why,
//! as a DICOM JSON data set built through [`crate::model::json`].

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Length, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::model::json::{to_json, BulkPolicy};

/// Failure reasons (PS3.18 Table 10.5.3-2, codes of PS3.4 B.2.3 / PS3.7 C).
pub mod reason {
    /// Refused: out of resources (larger than the limit, or storage failed).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: data set does not match SOP class (UIDs missing, malformed, or not those of the
    /// file meta information or of the study the request names).
    pub const DATA_SET_DOES_NOT_MATCH: u16 = 0xA900;
    /// Error: cannot understand (not a readable DICOM Part-10 object).
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Referenced SOP Class not supported (not a Storage SOP class).
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Warning: coercion of data elements. Used for a resent instance whose first copy was kept:
    /// what its RetrieveURL returns is that copy, not the one just sent.
    pub const COERCED: u16 = 0xB000;
}

/// One part's result, in the order the parts arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartResult {
    Stored {
        sop_class_uid: String,
        sop_instance_uid: String,
        study_uid: String,
        series_uid: String,
        warning: Option<u16>,
    },
    Failed {
        /// As far as they are known (empty for a part that is not readable).
        sop_class_uid: String,
        sop_instance_uid: String,
        reason: u16,
        comment: String,
    },
}

impl PartResult {
    pub fn is_stored(&self) -> bool {
        matches!(self, PartResult::Stored { .. })
    }
}

fn text(tag: dicom_core::Tag, vr: VR, value: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

fn code(tag: dicom_core::Tag, value: u16) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::US, PrimitiveValue::from(value))
}

fn sequence(tag: dicom_core::Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::new(items, Length::UNDEFINED))
}

/// The response data set as DICOM JSON. `base`: the DICOMweb root URL; `study`: the study the
/// request named, if any.
pub fn build(
    results: &[PartResult],
    base: &str,
    study: Option<&str>,
) -> serde_json::Map<String, serde_json::Value> {
    let (mut referenced, mut failed) = (Vec::new(), Vec::new());
    for result in results {
        let mut item = InMemDicomObject::new_empty();
        match result {
            PartResult::Stored {
                sop_class_uid,
                sop_instance_uid,
                study_uid,
                series_uid,
                warning,
            } => {
                item.put(text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, sop_class_uid));
                item.put(text(
                    tags::REFERENCED_SOP_INSTANCE_UID,
                    VR::UI,
                    sop_instance_uid,
                ));
                let url = format!(
                    "{base}/studies/{study_uid}/series/{series_uid}/instances/{sop_instance_uid}"
                );
                item.put(text(tags::RETRIEVE_URL, VR::UR, &url));
                if let Some(warning) = warning {
                    item.put(code(tags::WARNING_REASON, *warning));
                }
                referenced.push(item);
            }
            PartResult::Failed {
                sop_class_uid,
                sop_instance_uid,
                reason,
                ..
            } => {
                item.put(text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, sop_class_uid));
                item.put(text(
                    tags::REFERENCED_SOP_INSTANCE_UID,
                    VR::UI,
                    sop_instance_uid,
                ));
                item.put(code(tags::FAILURE_REASON, *reason));
                failed.push(item);
            }
        }
    }
    let mut obj = InMemDicomObject::new_empty();
    // The study's RetrieveURL when every stored instance belongs to one study.
    let mut studies = results.iter().filter_map(|r| match r {
        PartResult::Stored { study_uid, .. } => Some(study_uid.as_str()),
        PartResult::Failed { .. } => None,
    });
    let first = studies.next();
    let one_study = match first {
        Some(first) if studies.all(|s| s == first) => Some(first),
        _ => None,
    };
    if let Some(study) = one_study.or(study) {
        obj.put(text(
            tags::RETRIEVE_URL,
            VR::UR,
            &format!("{base}/studies/{study}"),
        ));
    }
    if !failed.is_empty() {
        obj.put(sequence(tags::FAILED_SOP_SEQUENCE, failed));
    }
    if !referenced.is_empty() {
        obj.put(sequence(tags::REFERENCED_SOP_SEQUENCE, referenced));
    }
    let policy = BulkPolicy {
        uri_prefix: "",
        inline_threshold: usize::MAX,
        left_out: None,
    };
    to_json(&obj, &policy, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stored_and_failed_parts_are_listed_with_urls_and_reasons() {
        let results = [
            PartResult::Stored {
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop_instance_uid: "1.2.3.1".into(),
                study_uid: "1.2.3".into(),
                series_uid: "1.2.3.0".into(),
                warning: Some(reason::COERCED),
            },
            PartResult::Failed {
                sop_class_uid: String::new(),
                sop_instance_uid: String::new(),
                reason: reason::CANNOT_UNDERSTAND,
                comment: "not DICOM".into(),
            },
        ];
        let json = serde_json::Value::Object(build(&results, "http://h/dicomweb", None));
        assert_eq!(
            json,
            json!({
                "00081190": {"vr": "UR", "Value": ["http://h/dicomweb/studies/1.2.3"]},
                "00081198": {"vr": "SQ", "Value": [{
                    "00081150": {"vr": "UI"},
                    "00081155": {"vr": "UI"},
                    "00081197": {"vr": "US", "Value": [0xC000]},
                }]},
                "00081199": {"vr": "SQ", "Value": [{
                    "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                    "00081155": {"vr": "UI", "Value": ["1.2.3.1"]},
                    "00081190": {"vr": "UR", "Value": [
                        "http://h/dicomweb/studies/1.2.3/series/1.2.3.0/instances/1.2.3.1"
                    ]},
                    "00081196": {"vr": "US", "Value": [0xB000]},
                }]},
            })
        );
    }

    #[test]
    fn no_study_url_when_instances_span_studies() {
        let stored = |study: &str| PartResult::Stored {
            sop_class_uid: "1.2".into(),
            sop_instance_uid: format!("{study}.9"),
            study_uid: study.into(),
            series_uid: "1.1".into(),
            warning: None,
        };
        let json = build(&[stored("1.5"), stored("1.6")], "b", None);
        assert!(!json.contains_key("00081190"));
        let json = build(&[stored("1.5"), stored("1.5")], "b", None);
        assert!(json.contains_key("00081190"));
    }
}
