//! The index reads behind the FHIR interface: a page of studies with their series and instances in
//! one SQL query (SQLite builds the series and instance lists as JSON arrays), the total of a search,
//! the state of a deleted study, and the patients known from DICOM.
//!
//! Filters come from the matching engine ([`Query`] at study level: UIDs, patient, accession,
//! modalities, dates) plus the conditions FHIR adds ([`StudyFilter`]). No storage read.

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqlitePool};

use super::query::{Arg, Level, Query};

/// One study as the FHIR mapping needs it.
#[derive(Debug, Clone)]
pub struct StudyDoc {
    pub study_uid: String,
    pub patient_id: String,
    pub issuer_of_patient_id: String,
    pub num_series: i64,
    pub num_instances: i64,
    /// Patient and study attributes as DICOM JSON.
    pub attrs_json: String,
    pub version: i64,
    /// Milliseconds since the Unix epoch of the last change.
    pub changed_at: i64,
    /// `[{"uid", "number", "modality", "description", "bodyPart", "laterality", "date", "time",
    /// "count", "attrs": {DICOM JSON}, "instances": [[uid, sopClass, number], ...]}, ...]` in series
    /// then instance order.
    pub series_json: String,
}

/// The order of a search's results (always ending on the study key, so pages are stable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sort {
    /// Oldest first by Study Date and Time.
    Started,
    /// Newest first by Study Date and Time.
    StartedDesc,
    /// Least recently changed first.
    LastUpdated,
    LastUpdatedDesc,
    /// Insertion order.
    #[default]
    None,
}

/// A study search: the matching engine's filters and the conditions FHIR adds.
#[derive(Debug, Clone)]
pub struct StudyFilter {
    pub query: Query,
    /// Issuer of Patient ID is one of these (`""`: none given).
    pub patient_issuers: Option<Vec<String>>,
    /// Studies holding any of these series.
    pub series_uids: Vec<Vec<String>>,
    /// Study Date + Time (`YYYYMMDDHHMMSS...` prefixes) bounds: (op, value) with op one of `<`,
    /// `<=`, `>`, `>=`.
    pub started: Vec<(&'static str, String)>,
    /// Last change bounds in ms: (op, value).
    pub last_updated: Vec<(&'static str, i64)>,
    /// Matches nothing (e.g. a status other than `available`).
    pub none: bool,
    pub sort: Sort,
}

impl Default for StudyFilter {
    fn default() -> Self {
        StudyFilter {
            query: Query::new(Level::Study),
            patient_issuers: None,
            series_uids: Vec::new(),
            started: Vec::new(),
            last_updated: Vec::new(),
            none: false,
            sort: Sort::None,
        }
    }
}

const STUDY_COLUMNS: &str = "st.study_uid, st.patient_id, st.issuer_of_patient_id, st.num_series,
    st.num_instances, st.attrs_json, COALESCE(fs.version, 1), COALESCE(fs.changed_at, 0),
    (SELECT json_group_array(json_object('uid', se.series_uid, 'number', se.series_number,
        'modality', se.modality, 'description', se.series_description,
        'bodyPart', se.body_part_examined, 'laterality', se.laterality, 'date', se.series_date,
        'time', se.series_time, 'count', se.num_instances, 'attrs', json(se.attrs_json),
        'instances', (SELECT json_group_array(json_array(i.sop_instance_uid, i.sop_class_uid,
                          i.instance_number))
                      FROM (SELECT sop_instance_uid, sop_class_uid, instance_number FROM instances
                            WHERE series_pk = se.series_pk
                            ORDER BY instance_number, instance_pk) i)))
     FROM (SELECT * FROM series WHERE study_pk = st.study_pk
           ORDER BY series_number, series_pk) se)";

const FROM: &str = "FROM studies st LEFT JOIN fhir_study_state fs ON fs.study_uid = st.study_uid";

fn doc(r: &SqliteRow) -> StudyDoc {
    StudyDoc {
        study_uid: r.get(0),
        patient_id: r.get(1),
        issuer_of_patient_id: r.get(2),
        num_series: r.get(3),
        num_instances: r.get(4),
        attrs_json: r.get(5),
        version: r.get(6),
        changed_at: r.get(7),
        series_json: r.get::<Option<String>, _>(8).unwrap_or_else(|| "[]".into()),
    }
}

impl StudyFilter {
    fn where_sql(&self) -> (String, Vec<Arg>) {
        let (engine, mut args) = self.query.where_clause();
        let mut conditions = Vec::new();
        if !engine.is_empty() {
            conditions.push(engine);
        }
        if self.none {
            conditions.push("0".into());
        }
        if let Some(issuers) = &self.patient_issuers {
            let marks = vec!["?"; issuers.len()].join(",");
            conditions.push(format!("st.issuer_of_patient_id IN ({marks})"));
            args.extend(issuers.iter().cloned().map(Arg::Text));
        }
        for uids in &self.series_uids {
            let marks = vec!["?"; uids.len()].join(",");
            conditions.push(format!(
                "EXISTS (SELECT 1 FROM series x WHERE x.study_pk = st.study_pk
                 AND x.series_uid IN ({marks}))"
            ));
            args.extend(uids.iter().cloned().map(Arg::Text));
        }
        if !self.started.is_empty() {
            conditions.push("st.study_date != ''".into());
        }
        for (op, value) in &self.started {
            conditions.push(format!("(st.study_date || st.study_time) {op} ?"));
            args.push(Arg::Text(value.clone()));
        }
        for (op, value) in &self.last_updated {
            conditions.push(format!("COALESCE(fs.changed_at, 0) {op} ?"));
            args.push(Arg::Int(*value));
        }
        let sql = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        (sql, args)
    }

    fn order_sql(&self) -> &'static str {
        match self.sort {
            Sort::Started => "ORDER BY st.study_date, st.study_time, st.study_pk",
            Sort::StartedDesc => {
                "ORDER BY st.study_date DESC, st.study_time DESC, st.study_pk DESC"
            }
            Sort::LastUpdated => "ORDER BY COALESCE(fs.changed_at, 0), st.study_pk",
            Sort::LastUpdatedDesc => "ORDER BY COALESCE(fs.changed_at, 0) DESC, st.study_pk DESC",
            Sort::None => "ORDER BY st.study_pk",
        }
    }
}

/// How many studies match.
pub async fn count_studies(pool: &SqlitePool, filter: &StudyFilter) -> sqlx::Result<i64> {
    let (where_sql, args) = filter.where_sql();
    let sql = format!("SELECT COUNT(*) {FROM} {where_sql}");
    super::bind_args(sqlx::query(&sql), &args)
        .fetch_one(pool)
        .await
        .map(|r| r.get(0))
}

/// One page of matching studies, each with its series and instances: one query.
pub async fn search_studies(
    pool: &SqlitePool,
    filter: &StudyFilter,
    count: u64,
    offset: u64,
) -> sqlx::Result<Vec<StudyDoc>> {
    let (where_sql, mut args) = filter.where_sql();
    let sql = format!(
        "SELECT {STUDY_COLUMNS} {FROM} {where_sql} {} LIMIT ? OFFSET ?",
        filter.order_sql()
    );
    args.push(Arg::Int(count.min(i64::MAX as u64) as i64));
    args.push(Arg::Int(offset.min(i64::MAX as u64) as i64));
    let rows = super::bind_args(sqlx::query(&sql), &args)
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(doc).collect())
}

/// One study by UID.
pub async fn study(pool: &SqlitePool, study_uid: &str) -> sqlx::Result<Option<StudyDoc>> {
    let sql = format!("SELECT {STUDY_COLUMNS} {FROM} WHERE st.study_uid = ?");
    let row = sqlx::query(&sql)
        .bind(study_uid)
        .fetch_optional(pool)
        .await?;
    Ok(row.as_ref().map(doc))
}

/// Whether a study the index no longer holds was held and deleted (FHIR 410 Gone), with its last
/// version and change time.
pub async fn deleted_study(pool: &SqlitePool, study_uid: &str) -> sqlx::Result<Option<(i64, i64)>> {
    let row = sqlx::query(
        "SELECT version, changed_at FROM fhir_study_state WHERE study_uid = ? AND deleted = 1",
    )
    .bind(study_uid)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// A patient as DICOM knows it: identity, and the patient attributes of its latest study.
#[derive(Debug, Clone)]
pub struct PatientDoc {
    pub patient_id: String,
    pub issuer_of_patient_id: String,
    /// Patient and study attributes of the patient's most recently indexed study, as DICOM JSON.
    pub attrs_json: String,
}

/// Patients by Patient ID, narrowed to one issuer when given (`Some("")`: no issuer), at most
/// `limit` of them.
pub async fn patients(
    pool: &SqlitePool,
    patient_id: Option<&str>,
    issuer: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<PatientDoc>> {
    let rows = sqlx::query(
        "SELECT st.patient_id, st.issuer_of_patient_id, st.attrs_json FROM studies st
         WHERE st.study_pk IN (
             SELECT MAX(study_pk) FROM studies
             WHERE (?1 IS NULL OR patient_id = ?1) AND (?2 IS NULL OR issuer_of_patient_id = ?2)
               AND patient_id != ''
             GROUP BY patient_id, issuer_of_patient_id)
         ORDER BY st.patient_id, st.issuer_of_patient_id LIMIT ?3",
    )
    .bind(patient_id)
    .bind(issuer)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| PatientDoc {
            patient_id: r.get(0),
            issuer_of_patient_id: r.get(1),
            attrs_json: r.get(2),
        })
        .collect())
}
