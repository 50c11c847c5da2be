//! Search results per level, from the index rows: the one result layer QIDO-RS and C-FIND share.
//!
//! [`select_sql`] reads, for a [`Query`], the rows of its level (patients are studies grouped by
//! patient); [`Match::from_row`] turns one row into what a result can answer: the attributes the index
//! computes (counts, ModalitiesInStudy, InstanceAvailability, the instance attributes kept in columns)
//! and the attributes stored at ingest, most specific level first. Every value is a DICOM JSON element
//! built by `model::json`. QIDO-RS picks the default attributes of its level ([`default_tags`]) plus
//! the requested ones; C-FIND the keys of the identifier.

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use serde_json::{Map, Value};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::query::{Arg, Query};
use crate::model::json;

/// What a search returns entities of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultLevel {
    /// C-FIND's PATIENT level (Patient Root): one result per patient, from their studies.
    Patient,
    Study,
    Series,
    Instance,
}

/// The SQL selecting the matches of `query` at `level`, in a stable order (insertion), without
/// paging. `instance_json`: the instance's stored JSON is read too (only needed for attributes that
/// are not in columns).
pub fn select_sql(level: ResultLevel, query: &Query, instance_json: bool) -> (String, Vec<Arg>) {
    let (where_sql, args) = query.where_sql();
    let from = query.level.from_sql();
    let sql = match level {
        // The attributes of each patient's latest study (the bare column comes from the MAX row in
        // SQLite), and counts over all their studies.
        ResultLevel::Patient => format!(
            "SELECT st.study_uid, st.attrs_json, MAX(st.study_pk), COUNT(*), SUM(st.num_series),
                    SUM(st.num_instances)
             {from} {where_sql} GROUP BY st.patient_id, st.issuer_of_patient_id"
        ),
        ResultLevel::Study => format!(
            "SELECT st.study_uid, st.attrs_json, st.modalities, st.num_series, st.num_instances
             {from} {where_sql} ORDER BY st.study_pk"
        ),
        ResultLevel::Series => format!(
            "SELECT st.study_uid, st.attrs_json, se.series_uid, se.attrs_json, se.num_instances
             {from} {where_sql} ORDER BY se.series_pk"
        ),
        ResultLevel::Instance => format!(
            "SELECT st.study_uid, st.attrs_json, se.series_uid, se.attrs_json,
                    i.sop_instance_uid, i.sop_class_uid, i.instance_number, i.rows, i.columns,
                    i.bits_allocated, i.number_of_frames, {}
             {from} {where_sql} ORDER BY i.instance_pk",
            if instance_json {
                "i.metadata_json"
            } else {
                "NULL"
            }
        ),
    };
    (sql, args)
}

/// Instance attributes answered from columns, without the instance's stored JSON.
const INSTANCE_COLUMN_TAGS: &[Tag] = &[
    tags::SOP_CLASS_UID,
    tags::SOP_INSTANCE_UID,
    tags::INSTANCE_NUMBER,
    tags::ROWS,
    tags::COLUMNS,
    tags::BITS_ALLOCATED,
    tags::NUMBER_OF_FRAMES,
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
];

/// Whether an instance-level result needs the instance's stored JSON to answer `tag`.
pub fn needs_instance_json(tag: Tag) -> bool {
    !(INSTANCE_COLUMN_TAGS.contains(&tag)
        || crate::model::levels::STUDY_TAGS.contains(&tag)
        || crate::model::levels::SERIES_TAGS.contains(&tag))
}

/// Study attributes every QIDO-RS study result carries (PS3.18 Table 10.6.3-3), without the
/// computed ones.
const STUDY_RESULT_TAGS: &[Tag] = &[
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::ACCESSION_NUMBER,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::STUDY_INSTANCE_UID,
    tags::STUDY_ID,
];

/// Series attributes of a series result (PS3.18 Table 10.6.3-4).
const SERIES_RESULT_TAGS: &[Tag] = &[
    tags::MODALITY,
    tags::SERIES_DESCRIPTION,
    tags::SERIES_INSTANCE_UID,
    tags::SERIES_NUMBER,
    tags::PERFORMED_PROCEDURE_STEP_START_DATE,
    tags::PERFORMED_PROCEDURE_STEP_START_TIME,
];

/// Instance attributes of an instance result (PS3.18 Table 10.6.3-5).
const INSTANCE_RESULT_TAGS: &[Tag] = &[
    tags::SOP_CLASS_UID,
    tags::SOP_INSTANCE_UID,
    tags::INSTANCE_AVAILABILITY,
    tags::INSTANCE_NUMBER,
    tags::ROWS,
    tags::COLUMNS,
    tags::BITS_ALLOCATED,
    tags::NUMBER_OF_FRAMES,
];

/// The attributes a QIDO-RS result of `level` carries without being asked (PS3.18 10.6.3.3): a
/// series result also its study's, an instance result also its study's and series'.
pub fn default_tags(level: ResultLevel) -> Vec<Tag> {
    let computed_study = [
        tags::MODALITIES_IN_STUDY,
        tags::NUMBER_OF_STUDY_RELATED_SERIES,
        tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
    ];
    match level {
        ResultLevel::Patient => crate::model::levels::PATIENT_TAGS.to_vec(),
        ResultLevel::Study => [STUDY_RESULT_TAGS, &computed_study].concat(),
        ResultLevel::Series => [
            STUDY_RESULT_TAGS,
            SERIES_RESULT_TAGS,
            &[tags::NUMBER_OF_SERIES_RELATED_INSTANCES],
        ]
        .concat(),
        ResultLevel::Instance => {
            [STUDY_RESULT_TAGS, SERIES_RESULT_TAGS, INSTANCE_RESULT_TAGS].concat()
        }
    }
}

/// One matching row: the UIDs that name it, and every attribute it can answer.
pub struct Match {
    pub study_uid: String,
    pub series_uid: Option<String>,
    pub sop_instance_uid: Option<String>,
    /// Attributes the index computes or keeps in columns (DICOM JSON elements), looked at first.
    computed: Vec<(Tag, Value)>,
    /// Stored attributes, most specific level first.
    layers: Vec<Map<String, Value>>,
}

fn parse_object(text: Option<&str>) -> Map<String, Value> {
    text.and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default()
}

impl Match {
    /// Reads a row of [`select_sql`] for the same level. `bulk_base`: what the `{{BASE}}`
    /// placeholder of the instance's stored BulkDataURIs becomes (None: left as it is, for C-FIND,
    /// which returns no bulk data).
    pub fn from_row(level: ResultLevel, row: &SqliteRow, bulk_base: Option<&str>) -> Match {
        let study_uid: String = row.get(0);
        let study_json = parse_object(row.get(1));
        let int = |i: usize| row.get::<Option<i64>, _>(i);
        let count = |tag: Tag, i: usize| (tag, json::number_element(VR::IS, int(i)));
        let mut m = Match {
            study_uid,
            series_uid: None,
            sop_instance_uid: None,
            computed: Vec::new(),
            layers: Vec::with_capacity(3),
        };
        match level {
            ResultLevel::Patient => {
                m.computed = vec![
                    count(tags::NUMBER_OF_PATIENT_RELATED_STUDIES, 3),
                    count(tags::NUMBER_OF_PATIENT_RELATED_SERIES, 4),
                    count(tags::NUMBER_OF_PATIENT_RELATED_INSTANCES, 5),
                ];
                m.layers.push(study_json);
            }
            ResultLevel::Study => {
                let modalities: String = row.get(2);
                let modalities: Vec<&str> =
                    modalities.split('\\').filter(|m| !m.is_empty()).collect();
                m.computed = vec![
                    (
                        tags::MODALITIES_IN_STUDY,
                        json::text_element(VR::CS, &modalities),
                    ),
                    count(tags::NUMBER_OF_STUDY_RELATED_SERIES, 3),
                    count(tags::NUMBER_OF_STUDY_RELATED_INSTANCES, 4),
                ];
                m.layers.push(study_json);
            }
            ResultLevel::Series => {
                m.series_uid = Some(row.get(2));
                m.computed = vec![count(tags::NUMBER_OF_SERIES_RELATED_INSTANCES, 4)];
                m.layers.push(parse_object(row.get(3)));
                m.layers.push(study_json);
            }
            ResultLevel::Instance => {
                let series_uid: String = row.get(2);
                let sop: String = row.get(4);
                let sop_class: String = row.get(5);
                m.computed = vec![
                    (
                        tags::STUDY_INSTANCE_UID,
                        json::text_element(VR::UI, &[&m.study_uid]),
                    ),
                    (
                        tags::SERIES_INSTANCE_UID,
                        json::text_element(VR::UI, &[&series_uid]),
                    ),
                    (tags::SOP_INSTANCE_UID, json::text_element(VR::UI, &[&sop])),
                    (
                        tags::SOP_CLASS_UID,
                        json::text_element(VR::UI, &[&sop_class]),
                    ),
                    (tags::INSTANCE_NUMBER, json::number_element(VR::IS, int(6))),
                    (tags::ROWS, json::number_element(VR::US, int(7))),
                    (tags::COLUMNS, json::number_element(VR::US, int(8))),
                    (tags::BITS_ALLOCATED, json::number_element(VR::US, int(9))),
                    (
                        tags::NUMBER_OF_FRAMES,
                        json::number_element(VR::IS, int(10)),
                    ),
                ];
                if let Some(text) = row.get::<Option<&str>, _>(11) {
                    m.layers.push(match bulk_base {
                        Some(base) => parse_object(Some(
                            &text.replace(crate::ingest::extract::BASE_PLACEHOLDER, base),
                        )),
                        None => parse_object(Some(text)),
                    });
                }
                m.layers.push(parse_object(row.get(3)));
                m.layers.push(study_json);
                m.series_uid = Some(series_uid);
                m.sop_instance_uid = Some(sop);
            }
        }
        m.computed.push((
            tags::INSTANCE_AVAILABILITY,
            json::text_element(VR::CS, &["ONLINE"]),
        ));
        m
    }

    /// The element answering `tag`, if the row has it.
    pub fn get(&self, tag: Tag) -> Option<&Value> {
        if let Some((_, v)) = self.computed.iter().find(|(t, _)| *t == tag) {
            return Some(v);
        }
        let key = json::tag_key(tag);
        self.layers.iter().find_map(|l| l.get(&key))
    }

    /// Every stored attribute of the row's own level (for QIDO-RS `includefield=all`).
    pub fn own_level(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.layers.first().into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_of_lower_levels_carry_the_levels_above() {
        let series = default_tags(ResultLevel::Series);
        assert!(series.contains(&tags::PATIENT_ID) && series.contains(&tags::MODALITY));
        let instance = default_tags(ResultLevel::Instance);
        for tag in [tags::STUDY_DATE, tags::SERIES_NUMBER, tags::SOP_CLASS_UID] {
            assert!(instance.contains(&tag));
        }
        assert!(!instance.contains(&tags::NUMBER_OF_STUDY_RELATED_SERIES));
    }

    #[test]
    fn only_attributes_outside_the_columns_need_the_instance_json() {
        assert!(!needs_instance_json(tags::ROWS));
        assert!(!needs_instance_json(tags::PATIENT_NAME));
        assert!(needs_instance_json(tags::IMAGE_TYPE));
    }
}
