//! The matching engine: attribute matching rules of PS3.4 C.2.2.2 (used by QIDO-RS, PS3.18 8.3.4)
//! turned into SQL over the index.
//!
//! A query is built from (tag, value) pairs by [`Query::add_match`]; the rules (single value, wildcard,
//! UID list, range, universal) depend only on the attribute's VR, so QIDO-RS and C-FIND share them.
//!
//! Architecture invariant: this module knows nothing of HTTP or DIMSE; it maps tags and values to SQL.

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;

use super::temporal::{date_matcher, datetime_matcher, parse_offset, time_matcher};

/// The level a query returns entities of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Study,
    Series,
    Instance,
}

impl Level {
    /// The tables a query at this level reads, joined under the aliases the columns use (`st`,
    /// `se`, `i`): the one definition QIDO-RS and C-FIND share.
    pub fn from_sql(self) -> &'static str {
        match self {
            Level::Study => "FROM studies st",
            Level::Series => "FROM series se JOIN studies st ON st.study_pk = se.study_pk",
            Level::Instance => {
                "FROM instances i JOIN series se ON se.series_pk = i.series_pk
                 JOIN studies st ON st.study_pk = i.study_pk"
            }
        }
    }
}

/// How a matchable attribute is stored and compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    /// Person name: case-insensitive, matched against each component group.
    PersonName,
    Uid,
    Date,
    Time,
    /// DT: compared in UTC when an offset is known (`temporal`).
    DateTime,
    Integer,
    /// ModalitiesInStudy: matches when any series of the study matches.
    ModalitiesInStudy,
}

/// A matchable attribute: its tag, the level it lives at, the SQL column, and its matching kind.
#[derive(Debug)]
pub struct Column {
    pub tag: Tag,
    pub level: Level,
    sql: &'static str,
    kind: Kind,
}

macro_rules! col {
    ($tag:expr, $level:ident, $sql:literal, $kind:ident) => {
        Column {
            tag: $tag,
            level: Level::$level,
            sql: $sql,
            kind: Kind::$kind,
        }
    };
}

/// Every attribute the index can match on.
pub static COLUMNS: &[Column] = &[
    col!(tags::STUDY_INSTANCE_UID, Study, "st.study_uid", Uid),
    col!(tags::PATIENT_ID, Study, "st.patient_id", Text),
    col!(
        tags::ISSUER_OF_PATIENT_ID,
        Study,
        "st.issuer_of_patient_id",
        Text
    ),
    col!(tags::PATIENT_NAME, Study, "st.patient_name", PersonName),
    col!(
        tags::PATIENT_BIRTH_DATE,
        Study,
        "st.patient_birth_date",
        Date
    ),
    col!(tags::PATIENT_SEX, Study, "st.patient_sex", Text),
    col!(tags::STUDY_DATE, Study, "st.study_date", Date),
    col!(tags::STUDY_TIME, Study, "st.study_time", Time),
    col!(tags::ACCESSION_NUMBER, Study, "st.accession_number", Text),
    col!(tags::STUDY_ID, Study, "st.study_id", Text),
    col!(tags::STUDY_DESCRIPTION, Study, "st.study_description", Text),
    col!(
        tags::REFERRING_PHYSICIAN_NAME,
        Study,
        "st.referring_physician_name",
        PersonName
    ),
    col!(
        tags::MODALITIES_IN_STUDY,
        Study,
        "st.study_pk",
        ModalitiesInStudy
    ),
    col!(tags::SERIES_INSTANCE_UID, Series, "se.series_uid", Uid),
    col!(tags::MODALITY, Series, "se.modality", Text),
    col!(tags::SERIES_NUMBER, Series, "se.series_number", Integer),
    col!(
        tags::SERIES_DESCRIPTION,
        Series,
        "se.series_description",
        Text
    ),
    col!(
        tags::BODY_PART_EXAMINED,
        Series,
        "se.body_part_examined",
        Text
    ),
    col!(tags::LATERALITY, Series, "se.laterality", Text),
    col!(tags::SERIES_DATE, Series, "se.series_date", Date),
    col!(tags::SERIES_TIME, Series, "se.series_time", Time),
    col!(
        tags::PERFORMED_PROCEDURE_STEP_START_DATE,
        Series,
        "se.performed_procedure_step_start_date",
        Date
    ),
    col!(
        tags::PERFORMED_PROCEDURE_STEP_START_TIME,
        Series,
        "se.performed_procedure_step_start_time",
        Time
    ),
    col!(tags::SOP_INSTANCE_UID, Instance, "i.sop_instance_uid", Uid),
    col!(tags::SOP_CLASS_UID, Instance, "i.sop_class_uid", Uid),
    col!(
        tags::INSTANCE_NUMBER,
        Instance,
        "i.instance_number",
        Integer
    ),
    col!(tags::ROWS, Instance, "i.rows", Integer),
    col!(tags::COLUMNS, Instance, "i.columns", Integer),
    col!(tags::BITS_ALLOCATED, Instance, "i.bits_allocated", Integer),
    col!(
        tags::NUMBER_OF_FRAMES,
        Instance,
        "i.number_of_frames",
        Integer
    ),
    col!(tags::CONTENT_DATE, Instance, "i.content_date", Date),
    col!(tags::CONTENT_TIME, Instance, "i.content_time", Time),
    col!(
        tags::ACQUISITION_DATE_TIME,
        Instance,
        "i.acquisition_datetime",
        DateTime
    ),
];

/// Whether `tag` is matched as a list of UIDs (PS3.4 C.2.2.2.2), so that repeated query keys add
/// to the list.
pub fn is_uid_key(tag: Tag) -> bool {
    column_for(tag).is_some_and(|c| matches!(c.kind, Kind::Uid))
}

pub fn column_for(tag: Tag) -> Option<&'static Column> {
    COLUMNS.iter().find(|c| c.tag == tag)
}

/// One matching rule of PS3.4 C.2.2.2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// Exact match of one value.
    Single(String),
    /// `*` and `?` wildcards.
    Wildcard(String),
    /// Any of several UIDs (or values).
    List(Vec<String>),
    /// Inclusive range with open ends; values already normalised for comparison.
    Range(Option<String>, Option<String>),
}

#[derive(Debug, Clone)]
struct Filter {
    column: &'static Column,
    matcher: Matcher,
    /// The value as given, kept for DT keys: a Timezone Offset From UTC that arrives later renormalises
    /// them.
    value: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MatchError {
    #[error("invalid value {value:?} for {tag}: {reason}")]
    InvalidValue {
        tag: Tag,
        value: String,
        reason: &'static str,
    },
}

/// A query against the index: level, scope from the resource path, matching filters, paging.
#[derive(Debug, Clone)]
pub struct Query {
    pub level: Level,
    filters: Vec<Filter>,
    /// Timezone Offset From UTC of the query, in minutes: applies to DT values without an offset.
    timezone_offset: Option<i32>,
    /// Sequence matching (PS3.4 C.2.2.2.6): matched against the items kept in the stored JSON.
    sequences: Vec<SequenceFilter>,
    pub limit: Option<u64>,
    pub offset: u64,
    /// The studies the caller may see (`security::policy`): `None` all of them.
    within: Option<Vec<StudyFilter>>,
}

/// Studies whose `attribute` (a study-level attribute, as kept in the study's DICOM JSON) has one of
/// `values`: how the security policy's study scope enters the SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyFilter {
    pub attribute: Tag,
    pub values: Vec<String>,
}

/// `(f1 OR f2 ...)` over the studies alias `st`; no filter at all matches no study.
pub fn within_sql(filters: &[StudyFilter], args: &mut Vec<Arg>) -> String {
    let alternatives: Vec<String> = filters
        .iter()
        .filter(|f| !f.values.is_empty())
        .map(|f| {
            let path = format!(
                "$.\"{:04X}{:04X}\".Value[0]",
                f.attribute.group(),
                f.attribute.element()
            );
            args.push(Arg::Text(path));
            args.extend(f.values.iter().cloned().map(Arg::Text));
            let placeholders = vec!["?"; f.values.len()].join(", ");
            format!("COALESCE(json_extract(st.attrs_json, ?), '') IN ({placeholders})")
        })
        .collect();
    if alternatives.is_empty() {
        "0".into()
    } else {
        format!("({})", alternatives.join(" OR "))
    }
}

/// An item key of a sequence match: the JSON path of its first value and its matcher.
#[derive(Debug, Clone)]
struct ItemFilter {
    path: String,
    person_name: bool,
    matcher: Matcher,
}

/// Matches when one item of the sequence, in the JSON column of its level, matches every item key.
#[derive(Debug, Clone)]
struct SequenceFilter {
    json_sql: &'static str,
    sequence: Tag,
    items: Vec<ItemFilter>,
}

/// A bound SQL argument.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Text(String),
    Int(i64),
}

impl Query {
    pub fn new(level: Level) -> Query {
        Query {
            level,
            filters: Vec::new(),
            timezone_offset: None,
            sequences: Vec::new(),
            limit: None,
            offset: 0,
            within: None,
        }
    }

    /// Restricts the query to the studies matching one of `filters` (the caller's scope; none: no
    /// study), in the SQL, so that results, counts and pages see only those.
    pub fn within(&mut self, filters: &[StudyFilter]) {
        self.within = Some(filters.to_vec());
    }

    /// Adds a matching key. Returns Ok(false) when the attribute cannot be matched on at this level
    /// (the caller reports it as unsupported); an empty value is universal matching and adds nothing.
    ///
    /// Timezone Offset From UTC (0008,0201) is not matched: it says in which zone the DT values
    /// without an offset of their own are given, whichever order the keys arrive in.
    pub fn add_match(&mut self, tag: Tag, value: &str) -> Result<bool, MatchError> {
        if tag == tags::TIMEZONE_OFFSET_FROM_UTC {
            return self.set_timezone_offset(value).map(|()| true);
        }
        let Some(column) = column_for(tag) else {
            return Ok(false);
        };
        if column.level > self.level {
            return Ok(false);
        }
        let value = value.trim_end_matches(['\0', ' ']);
        if value.is_empty() || value == "*" {
            return Ok(true);
        }
        let invalid = |reason| MatchError::InvalidValue {
            tag,
            value: value.to_string(),
            reason,
        };
        let matcher = match column.kind {
            Kind::Uid => {
                let uids: Vec<String> = value
                    .split([',', '\\'])
                    .map(|u| u.trim().to_string())
                    .filter(|u| !u.is_empty())
                    .collect();
                if uids.iter().any(|u| !is_valid_uid(u)) {
                    return Err(invalid("not a UID list"));
                }
                Matcher::List(uids)
            }
            Kind::Date => date_matcher(value).ok_or_else(|| invalid("not a date or date range"))?,
            Kind::Time => time_matcher(value).ok_or_else(|| invalid("not a time or time range"))?,
            Kind::DateTime => datetime_matcher(value, self.timezone_offset)
                .ok_or_else(|| invalid("not a date-time or date-time range"))?,
            Kind::Integer => {
                let n: i64 = value
                    .trim()
                    .parse()
                    .map_err(|_| invalid("not an integer"))?;
                Matcher::Single(n.to_string())
            }
            Kind::Text | Kind::ModalitiesInStudy => text_matcher(value, false),
            Kind::PersonName => text_matcher(value, true),
        };
        self.filters.push(Filter {
            column,
            matcher,
            value: value.to_string(),
        });
        Ok(true)
    }

    fn set_timezone_offset(&mut self, value: &str) -> Result<(), MatchError> {
        let value = value.trim_end_matches(['\0', ' ']);
        if value.is_empty() {
            return Ok(());
        }
        let offset = parse_offset(value).ok_or_else(|| MatchError::InvalidValue {
            tag: tags::TIMEZONE_OFFSET_FROM_UTC,
            value: value.to_string(),
            reason: "not a UTC offset (+HHMM or -HHMM)",
        })?;
        self.timezone_offset = Some(offset);
        for f in &mut self.filters {
            if f.column.kind == Kind::DateTime {
                f.matcher = datetime_matcher(&f.value, Some(offset)).expect("validated when added");
            }
        }
        Ok(())
    }

    /// Adds a sequence matching key: one item's (tag, value) pairs, all of which must match the same
    /// item of the stored sequence (single value, wildcard or list; PN case-insensitive on its
    /// alphabetic group). Sequences are matched in the stored JSON of the level that keeps them: study
    /// and series attributes (`model::levels`), any sequence of the instance at instance level.
    /// False when the sequence is not kept at or above the query level.
    pub fn add_sequence_match(&mut self, sequence: Tag, item: &[(Tag, &str)]) -> bool {
        use crate::model::levels::{SERIES_TAGS, STUDY_TAGS};
        let json_sql = if STUDY_TAGS.contains(&sequence) {
            "st.attrs_json"
        } else if SERIES_TAGS.contains(&sequence) && self.level >= Level::Series {
            "se.attrs_json"
        } else if self.level == Level::Instance {
            "i.metadata_json"
        } else {
            return false;
        };
        let mut items = Vec::new();
        for (tag, value) in item {
            let value = value.trim_end_matches(['\0', ' ']);
            if value.is_empty() || value == "*" {
                continue;
            }
            let person_name = vr_of(*tag) == VR::PN;
            let suffix = if person_name { ".Alphabetic" } else { "" };
            items.push(ItemFilter {
                path: format!(
                    "$.\"{:04X}{:04X}\".Value[0]{suffix}",
                    tag.group(),
                    tag.element()
                ),
                person_name,
                matcher: text_matcher(value, person_name),
            });
        }
        if !items.is_empty() {
            self.sequences.push(SequenceFilter {
                json_sql,
                sequence,
                items,
            });
        }
        true
    }

    /// `WHERE ...` (or nothing when every key is universal) and its arguments.
    pub fn where_sql(&self) -> (String, Vec<Arg>) {
        let (conditions, args) = self.where_clause();
        if conditions.is_empty() {
            (String::new(), args)
        } else {
            (format!("WHERE {conditions}"), args)
        }
    }

    /// The WHERE clause (joined with AND, or empty) and its arguments.
    pub fn where_clause(&self) -> (String, Vec<Arg>) {
        let mut sql = Vec::new();
        let mut args = Vec::new();
        for f in &self.filters {
            sql.push(filter_sql(f, &mut args));
        }
        for f in &self.sequences {
            sql.push(sequence_sql(f, &mut args));
        }
        if let Some(filters) = &self.within {
            sql.push(within_sql(filters, &mut args));
        }
        (sql.join(" AND "), args)
    }
}

fn text_matcher(value: &str, person_name: bool) -> Matcher {
    let value = if person_name {
        value.to_uppercase()
    } else {
        value.to_string()
    };
    if value.contains(['*', '?']) {
        Matcher::Wildcard(value)
    } else if !person_name && value.contains('\\') {
        Matcher::List(value.split('\\').map(str::to_string).collect())
    } else {
        Matcher::Single(value)
    }
}

fn filter_sql(f: &Filter, args: &mut Vec<Arg>) -> String {
    let col = f.column.sql;
    match (f.column.kind, &f.matcher) {
        (Kind::ModalitiesInStudy, m) => {
            let inner = matcher_sql("x.modality", m, args);
            format!("EXISTS (SELECT 1 FROM series x WHERE x.study_pk = {col} AND {inner})")
        }
        (Kind::PersonName, Matcher::Single(v) | Matcher::Wildcard(v)) if !v.contains('=') => {
            // Match the value against every component group (alphabetic, ideographic, phonetic).
            let p = like_pattern(v);
            let alternatives = [
                p.clone(),
                format!("{p}=%"),
                format!("%={p}"),
                format!("%={p}=%"),
            ];
            let parts: Vec<String> = alternatives
                .into_iter()
                .map(|a| {
                    args.push(Arg::Text(a));
                    format!("{col} LIKE ? ESCAPE '\\'")
                })
                .collect();
            format!("({})", parts.join(" OR "))
        }
        (Kind::Integer, Matcher::Single(v)) => {
            args.push(Arg::Int(v.parse().expect("validated integer")));
            format!("{col} = ?")
        }
        (_, m) => matcher_sql(col, m, args),
    }
}

fn sequence_sql(f: &SequenceFilter, args: &mut Vec<Arg>) -> String {
    let conditions: Vec<String> = f
        .items
        .iter()
        .map(|item| {
            // The path is built from a tag, never from input: safe to inline.
            let value = format!("json_extract(it.value, '{}')", item.path);
            let value = if item.person_name {
                format!("upper({value})")
            } else {
                value
            };
            matcher_sql(&value, &item.matcher, args)
        })
        .collect();
    format!(
        "EXISTS (SELECT 1 FROM json_each({}, '$.\"{:04X}{:04X}\".Value') AS it WHERE {})",
        f.json_sql,
        f.sequence.group(),
        f.sequence.element(),
        conditions.join(" AND ")
    )
}

fn matcher_sql(col: &str, m: &Matcher, args: &mut Vec<Arg>) -> String {
    match m {
        Matcher::Single(v) => {
            args.push(Arg::Text(v.clone()));
            format!("{col} = ?")
        }
        Matcher::Wildcard(v) => {
            args.push(Arg::Text(like_pattern(v)));
            format!("{col} LIKE ? ESCAPE '\\'")
        }
        Matcher::List(values) => {
            let marks = vec!["?"; values.len()].join(",");
            args.extend(values.iter().cloned().map(Arg::Text));
            format!("{col} IN ({marks})")
        }
        Matcher::Range(lo, hi) => {
            let mut parts = vec![format!("{col} != ''")];
            if let Some(lo) = lo {
                args.push(Arg::Text(lo.clone()));
                parts.push(format!("{col} >= ?"));
            }
            if let Some(hi) = hi {
                args.push(Arg::Text(hi.clone()));
                parts.push(format!("{col} <= ?"));
            }
            format!("({})", parts.join(" AND "))
        }
    }
}

/// DICOM wildcards to a LIKE pattern: `*` -> `%`, `?` -> `_`, LIKE's own specials escaped.
fn like_pattern(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 4);
    for c in v.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.split('.').all(|part| {
            !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_digit())
                && (part == "0" || !part.starts_with('0'))
        })
}

/// The VR a matching key is typed with, for callers that must echo it back.
pub fn vr_of(tag: Tag) -> VR {
    dicom_dictionary_std::StandardDataDictionary
        .by_tag(tag)
        .and_then(|e| e.vr.exact())
        .unwrap_or(VR::UN)
}

use dicom_core::dictionary::DataDictionary;

#[cfg(test)]
mod tests {
    use super::*;

    fn q(level: Level, pairs: &[(Tag, &str)]) -> (String, Vec<Arg>) {
        let mut q = Query::new(level);
        for (t, v) in pairs {
            assert!(q.add_match(*t, v).unwrap());
        }
        q.where_clause()
    }

    #[test]
    fn empty_value_and_lone_star_are_universal() {
        assert_eq!(q(Level::Study, &[(tags::PATIENT_ID, "")]).0, "");
        assert_eq!(q(Level::Study, &[(tags::PATIENT_ID, "*")]).0, "");
    }

    #[test]
    fn single_value_is_exact_and_case_sensitive_for_text() {
        let (sql, args) = q(Level::Study, &[(tags::PATIENT_ID, "ab12")]);
        assert_eq!(sql, "st.patient_id = ?");
        assert_eq!(args, vec![Arg::Text("ab12".into())]);
    }

    #[test]
    fn wildcards_become_escaped_like_patterns() {
        let (sql, args) = q(Level::Study, &[(tags::ACCESSION_NUMBER, "A_1%*?")]);
        assert_eq!(sql, "st.accession_number LIKE ? ESCAPE '\\'");
        assert_eq!(args, vec![Arg::Text("A\\_1\\%%_".into())]);
    }

    #[test]
    fn person_names_match_case_insensitively_in_any_group() {
        let (sql, args) = q(Level::Study, &[(tags::PATIENT_NAME, "doe^j*")]);
        assert!(sql.starts_with("(st.patient_name LIKE ?"));
        assert_eq!(args.len(), 4);
        assert_eq!(args[0], Arg::Text("DOE^J%".into()));
        assert_eq!(args[3], Arg::Text("%=DOE^J%=%".into()));
    }

    #[test]
    fn uid_lists_accept_comma_and_backslash() {
        let (sql, args) = q(Level::Study, &[(tags::STUDY_INSTANCE_UID, "1.2,1.3\\1.4")]);
        assert_eq!(sql, "st.study_uid IN (?,?,?)");
        assert_eq!(args.len(), 3);
        let mut query = Query::new(Level::Study);
        assert!(query.add_match(tags::STUDY_INSTANCE_UID, "1.2.x").is_err());
    }

    #[test]
    fn date_ranges_are_inclusive_with_open_ends() {
        let (sql, args) = q(Level::Study, &[(tags::STUDY_DATE, "20200101-20201231")]);
        assert_eq!(
            sql,
            "(st.study_date != '' AND st.study_date >= ? AND st.study_date <= ?)"
        );
        assert_eq!(
            args,
            vec![Arg::Text("20200101".into()), Arg::Text("20201231".into())]
        );
        let (_, args) = q(Level::Study, &[(tags::STUDY_DATE, "-2020.12.31")]);
        assert_eq!(args, vec![Arg::Text("20201231".into())]);
        let mut query = Query::new(Level::Study);
        for bad in ["2020", "20201301", "a-b", "-"] {
            assert!(query.add_match(tags::STUDY_DATE, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn datetime_keys_take_the_query_timezone_whichever_order_they_come_in() {
        let dt = (tags::ACQUISITION_DATE_TIME, "20200115120000-20200115130000");
        let tz = (tags::TIMEZONE_OFFSET_FROM_UTC, "+0200");
        let expected = vec![
            Arg::Text("20200115100000.000000".into()),
            Arg::Text("20200115110000.999999".into()),
        ];
        let (sql, args) = q(Level::Instance, &[dt, tz]);
        assert_eq!(
            sql,
            "(i.acquisition_datetime != '' AND i.acquisition_datetime >= ? \
             AND i.acquisition_datetime <= ?)"
        );
        assert_eq!(args, expected);
        assert_eq!(q(Level::Instance, &[tz, dt]).1, expected);
        let mut query = Query::new(Level::Series);
        assert!(!query.add_match(dt.0, dt.1).unwrap());
        assert!(query
            .add_match(tags::TIMEZONE_OFFSET_FROM_UTC, "0200")
            .is_err());
    }

    #[test]
    fn modalities_in_study_matches_any_series() {
        let (sql, args) = q(Level::Study, &[(tags::MODALITIES_IN_STUDY, "CT\\MR")]);
        assert_eq!(
            sql,
            "EXISTS (SELECT 1 FROM series x WHERE x.study_pk = st.study_pk AND x.modality IN (?,?))"
        );
        assert_eq!(args.len(), 2);
    }

    #[test]
    fn lower_level_attributes_are_not_matchable_at_higher_levels() {
        let mut query = Query::new(Level::Study);
        assert!(!query.add_match(tags::SOP_CLASS_UID, "1.2").unwrap());
        assert!(!query.add_match(tags::PATIENT_AGE, "030Y").unwrap());
        let mut query = Query::new(Level::Instance);
        assert!(query.add_match(tags::PATIENT_ID, "x").unwrap());
    }

    #[test]
    fn sequence_items_match_in_the_stored_json_of_their_level() {
        let mut query = Query::new(Level::Study);
        let item = [
            (tags::CODE_VALUE, "X1*"),
            (tags::CODING_SCHEME_DESIGNATOR, ""),
        ];
        assert!(query.add_sequence_match(tags::PROCEDURE_CODE_SEQUENCE, &item));
        let (sql, args) = query.where_clause();
        assert_eq!(
            sql,
            "EXISTS (SELECT 1 FROM json_each(st.attrs_json, '$.\"00081032\".Value') AS it \
             WHERE json_extract(it.value, '$.\"00080100\".Value[0]') LIKE ? ESCAPE '\\')"
        );
        assert_eq!(args, vec![Arg::Text("X1%".into())]);
        // Series sequences are not visible from the study level; any instance sequence is.
        assert!(!query.add_sequence_match(tags::REQUEST_ATTRIBUTES_SEQUENCE, &item));
        let mut query = Query::new(Level::Instance);
        assert!(query.add_sequence_match(tags::REFERENCED_IMAGE_SEQUENCE, &item));
    }

    #[test]
    fn integers_are_validated() {
        let (sql, args) = q(Level::Series, &[(tags::SERIES_NUMBER, "007")]);
        assert_eq!(sql, "se.series_number = ?");
        assert_eq!(args, vec![Arg::Int(7)]);
        let mut query = Query::new(Level::Series);
        assert!(query.add_match(tags::SERIES_NUMBER, "x").is_err());
    }

    #[test]
    fn study_scope_becomes_an_or_of_attribute_lists_and_nothing_matches_none() {
        let mut q = Query::new(Level::Series);
        q.add_match(tags::MODALITY, "CT").unwrap();
        q.within(&[
            StudyFilter {
                attribute: tags::INSTITUTION_NAME,
                values: vec!["A".into(), "B".into()],
            },
            StudyFilter {
                attribute: tags::ISSUER_OF_PATIENT_ID,
                values: vec!["HOSP".into()],
            },
        ]);
        let (sql, args) = q.where_clause();
        assert!(
            sql.ends_with(
                " AND (COALESCE(json_extract(st.attrs_json, ?), '') IN (?, ?) \
             OR COALESCE(json_extract(st.attrs_json, ?), '') IN (?))"
            ),
            "{sql}"
        );
        assert_eq!(args[1], Arg::Text("$.\"00080080\".Value[0]".into()));
        assert_eq!(args[4], Arg::Text("$.\"00100021\".Value[0]".into()));
        let mut nothing = Query::new(Level::Study);
        nothing.within(&[]);
        assert_eq!(nothing.where_clause().0, "0");
    }

    #[test]
    fn uid_validation() {
        assert!(is_valid_uid("1.2.840.10008.1.2"));
        assert!(is_valid_uid("2.25.0"));
        assert!(!is_valid_uid("1.02"));
        assert!(!is_valid_uid("1..2"));
        assert!(!is_valid_uid(&"1".repeat(65)));
        assert!(!is_valid_uid("../etc"));
    }
}
