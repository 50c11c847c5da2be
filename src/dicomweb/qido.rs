//! QIDO-RS (PS3.18 10.6): search for studies, series and instances.
//!
//! Query parameters become an [`index::query::Query`]; results are read from the index (attributes
//! and the DICOM JSON stored at ingest) and streamed as a JSON array, row by row.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Map, Value};
use sqlx::Row;

use super::error::ApiError;
use super::{check_uids, WebState};
use crate::index::query::{vr_of, Arg, Level, Query};
use crate::model::json::parse_tag;

/// What the client asked to have returned besides the default attributes.
#[derive(Debug, Default)]
struct Includes {
    all: bool,
    tags: BTreeSet<Tag>,
}

/// A parsed QIDO request.
#[derive(Debug)]
struct Search {
    query: Query,
    includes: Includes,
    warnings: Vec<String>,
}

fn parse_search(level: Level, raw: Option<&str>) -> Result<Search, ApiError> {
    let mut search = Search {
        query: Query::new(level),
        includes: Includes::default(),
        warnings: Vec::new(),
    };
    let mut unsupported = Vec::new();
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "limit" => {
                search.query.limit = Some(value.parse().map_err(|_| {
                    ApiError::BadRequest(format!(
                        "limit must be a non-negative integer, not {value:?}"
                    ))
                })?)
            }
            "offset" => {
                search.query.offset = value.parse().map_err(|_| {
                    ApiError::BadRequest(format!(
                        "offset must be a non-negative integer, not {value:?}"
                    ))
                })?
            }
            "fuzzymatching" => match value.as_ref() {
                "true" => search.warnings.push(
                    "299 dicom-gateway \"fuzzymatching is not supported: exact matching was used\""
                        .into(),
                ),
                "false" => {}
                _ => {
                    return Err(ApiError::BadRequest(
                        "fuzzymatching must be true or false".into(),
                    ))
                }
            },
            "includefield" => {
                for field in value.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                    if field == "all" {
                        search.includes.all = true;
                    } else {
                        let tag = parse_tag(field).ok_or_else(|| {
                            ApiError::BadRequest(format!(
                                "unknown attribute {field:?} in includefield"
                            ))
                        })?;
                        search.includes.tags.insert(tag);
                    }
                }
            }
            name => {
                if let Some((sequence, item)) = name.split_once('.') {
                    // Sequence matching (e.g. 00081032.00080100=X), one level deep.
                    let tags = parse_tag(sequence).zip(parse_tag(item));
                    let matched = tags.is_some_and(|(sequence, item)| {
                        search.query.add_sequence_match(sequence, &[(item, &value)])
                    });
                    if !matched {
                        unsupported.push(name.to_string());
                    }
                    continue;
                }
                let tag = parse_tag(name).ok_or_else(|| {
                    ApiError::BadRequest(format!("unknown query parameter {name:?}"))
                })?;
                let matched = search
                    .query
                    .add_match(tag, &value)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                if !matched {
                    unsupported.push(name.to_string());
                }
                // Matching keys are returned with the results.
                search.includes.tags.insert(tag);
            }
        }
    }
    if !unsupported.is_empty() {
        search.warnings.push(format!(
            "299 dicom-gateway \"The following attributes are not supported for matching: {}\"",
            unsupported.join(", ")
        ));
    }
    Ok(search)
}

pub async fn studies(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    run(state, &headers, Level::Study, None, None, raw.as_deref()).await
}

pub async fn series(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    run(state, &headers, Level::Series, None, None, raw.as_deref()).await
}

pub async fn instances(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    run(state, &headers, Level::Instance, None, None, raw.as_deref()).await
}

pub async fn study_series(
    State(state): State<Arc<WebState>>,
    Path(study): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    run(
        state,
        &headers,
        Level::Series,
        Some(study),
        None,
        raw.as_deref(),
    )
    .await
}

pub async fn study_instances(
    State(state): State<Arc<WebState>>,
    Path(study): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    run(
        state,
        &headers,
        Level::Instance,
        Some(study),
        None,
        raw.as_deref(),
    )
    .await
}

pub async fn series_instances(
    State(state): State<Arc<WebState>>,
    Path((study, series)): Path<(String, String)>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    run(
        state,
        &headers,
        Level::Instance,
        Some(study),
        Some(series),
        raw.as_deref(),
    )
    .await
}

async fn run(
    state: Arc<WebState>,
    headers: &HeaderMap,
    level: Level,
    study: Option<String>,
    series: Option<String>,
    raw: Option<&str>,
) -> Result<Response, ApiError> {
    let mut search = parse_search(level, raw)?;
    if let Some(study) = &study {
        check_uids(&[study])?;
        search
            .query
            .add_match(tags::STUDY_INSTANCE_UID, study)
            .map_err(bad)?;
    }
    if let Some(series) = &series {
        check_uids(&[series])?;
        search
            .query
            .add_match(tags::SERIES_INSTANCE_UID, series)
            .map_err(bad)?;
    }
    let base = state.base_url(headers);
    let sql = select_sql(&search);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<String, sqlx::Error>>(64);
    let pool = state.index.read_pool().clone();
    let (sql_text, args) = sql;
    let builder = ResultBuilder {
        level,
        base,
        includes: search.includes,
    };
    tokio::spawn(async move {
        let q = crate::index::bind_args(sqlx::query(&sql_text), &args);
        let mut rows = q.fetch(&pool);
        loop {
            let item = match rows.try_next().await {
                Ok(Some(row)) => Ok(builder.build(&row)),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });

    // Wait for the first row: no match is 204, and errors before any output are still a 500.
    let first = match rx.recv().await {
        None => {
            let mut resp = StatusCode::NO_CONTENT.into_response();
            add_warnings(&mut resp, &search.warnings);
            return Ok(resp);
        }
        Some(Err(e)) => return Err(e.into()),
        Some(Ok(first)) => first,
    };
    let head =
        futures::stream::once(
            async move { Ok::<_, std::io::Error>(Bytes::from(format!("[{first}"))) },
        );
    let rest = futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(|item| match item {
        Ok(obj) => Ok(Bytes::from(format!(",{obj}"))),
        Err(e) => Err(std::io::Error::other(e)),
    });
    let tail = futures::stream::once(async { Ok(Bytes::from_static(b"]")) });
    let body = Body::from_stream(head.chain(rest).chain(tail));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/dicom+json"),
    );
    add_warnings(&mut resp, &search.warnings);
    Ok(resp)
}

fn bad(e: crate::index::query::MatchError) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

fn add_warnings(resp: &mut Response, warnings: &[String]) {
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(w) {
            resp.headers_mut().append("warning", v);
        }
    }
}

fn select_sql(search: &Search) -> (String, Vec<Arg>) {
    let (where_sql, mut args) = search.query.where_sql();
    let level = search.query.level;
    let from = level.from_sql();
    let needs_instance_json =
        search.includes.all || search.includes.tags.iter().any(|t| !is_instance_column(*t));
    let sql = match level {
        Level::Study => format!(
            "SELECT st.study_uid, st.attrs_json, st.modalities, st.num_series, st.num_instances
             {from} {where_sql} ORDER BY st.study_pk"
        ),
        Level::Series => format!(
            "SELECT st.study_uid, st.attrs_json, se.series_uid, se.attrs_json, se.num_instances
             {from} {where_sql} ORDER BY se.series_pk"
        ),
        Level::Instance => format!(
            "SELECT st.study_uid, st.attrs_json, se.series_uid, se.attrs_json,
                    i.sop_instance_uid, i.sop_class_uid, i.instance_number, i.rows, i.columns,
                    i.bits_allocated, i.number_of_frames, {}
             {from} {where_sql} ORDER BY i.instance_pk",
            if needs_instance_json {
                "i.metadata_json"
            } else {
                "NULL"
            }
        ),
    };
    let limit = search.query.limit.map(|l| l as i64).unwrap_or(-1);
    args.push(Arg::Int(limit));
    args.push(Arg::Int(search.query.offset as i64));
    (format!("{sql} LIMIT ? OFFSET ?"), args)
}

/// Instance attributes answered from columns without reading the instance's JSON.
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

fn is_instance_column(tag: Tag) -> bool {
    INSTANCE_COLUMN_TAGS.contains(&tag)
        || crate::model::levels::STUDY_TAGS.contains(&tag)
        || crate::model::levels::SERIES_TAGS.contains(&tag)
}

/// Study attributes every study result carries (PS3.18 Table 10.6.3-3).
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

const SERIES_RESULT_TAGS: &[Tag] = &[
    tags::MODALITY,
    tags::SERIES_DESCRIPTION,
    tags::SERIES_INSTANCE_UID,
    tags::SERIES_NUMBER,
    tags::PERFORMED_PROCEDURE_STEP_START_DATE,
    tags::PERFORMED_PROCEDURE_STEP_START_TIME,
];

struct ResultBuilder {
    level: Level,
    base: String,
    includes: Includes,
}

fn key(tag: Tag) -> String {
    format!("{:04X}{:04X}", tag.group(), tag.element())
}

fn parse_object(text: &str) -> Map<String, Value> {
    serde_json::from_str(text).unwrap_or_default()
}

impl ResultBuilder {
    fn build(&self, row: &sqlx::sqlite::SqliteRow) -> String {
        let mut out = Map::new();
        let study_uid: String = row.get(0);
        let study_json = parse_object(row.get::<&str, _>(1));
        // Layers of stored attributes, most specific first, for includefield lookups.
        let mut layers: Vec<Map<String, Value>> = Vec::with_capacity(3);
        match self.level {
            Level::Study => {
                self.copy(&mut out, &study_json, STUDY_RESULT_TAGS);
                let modalities: String = row.get(2);
                let values: Vec<Value> = modalities
                    .split('\\')
                    .filter(|m| !m.is_empty())
                    .map(|m| json!(m))
                    .collect();
                out.insert(key(tags::MODALITIES_IN_STUDY), element("CS", values));
                out.insert(
                    key(tags::NUMBER_OF_STUDY_RELATED_SERIES),
                    element("IS", vec![json!(row.get::<i64, _>(3))]),
                );
                out.insert(
                    key(tags::NUMBER_OF_STUDY_RELATED_INSTANCES),
                    element("IS", vec![json!(row.get::<i64, _>(4))]),
                );
                out.insert(
                    key(tags::RETRIEVE_URL),
                    element(
                        "UR",
                        vec![json!(format!("{}/studies/{study_uid}", self.base))],
                    ),
                );
                layers.push(study_json);
            }
            Level::Series => {
                let series_uid: String = row.get(2);
                let series_json = parse_object(row.get::<&str, _>(3));
                self.copy(&mut out, &series_json, SERIES_RESULT_TAGS);
                out.insert(
                    key(tags::STUDY_INSTANCE_UID),
                    element("UI", vec![json!(study_uid)]),
                );
                out.insert(
                    key(tags::NUMBER_OF_SERIES_RELATED_INSTANCES),
                    element("IS", vec![json!(row.get::<i64, _>(4))]),
                );
                out.insert(
                    key(tags::RETRIEVE_URL),
                    element(
                        "UR",
                        vec![json!(format!(
                            "{}/studies/{study_uid}/series/{series_uid}",
                            self.base
                        ))],
                    ),
                );
                layers.push(series_json);
                layers.push(study_json);
            }
            Level::Instance => {
                let series_uid: String = row.get(2);
                let series_json = parse_object(row.get::<&str, _>(3));
                let sop: String = row.get(4);
                out.insert(
                    key(tags::STUDY_INSTANCE_UID),
                    element("UI", vec![json!(study_uid)]),
                );
                out.insert(
                    key(tags::SERIES_INSTANCE_UID),
                    element("UI", vec![json!(series_uid)]),
                );
                out.insert(key(tags::SOP_INSTANCE_UID), element("UI", vec![json!(sop)]));
                out.insert(
                    key(tags::SOP_CLASS_UID),
                    element("UI", vec![json!(row.get::<String, _>(5))]),
                );
                let numbers = [
                    (tags::INSTANCE_NUMBER, "IS", 6),
                    (tags::ROWS, "US", 7),
                    (tags::COLUMNS, "US", 8),
                    (tags::BITS_ALLOCATED, "US", 9),
                    (tags::NUMBER_OF_FRAMES, "IS", 10),
                ];
                for (tag, vr, idx) in numbers {
                    let v: Option<i64> = row.get(idx);
                    out.insert(
                        key(tag),
                        element(vr, v.map(|v| json!(v)).into_iter().collect()),
                    );
                }
                out.insert(
                    key(tags::INSTANCE_AVAILABILITY),
                    element("CS", vec![json!("ONLINE")]),
                );
                out.insert(
                    key(tags::RETRIEVE_URL),
                    element(
                        "UR",
                        vec![json!(format!(
                            "{}/studies/{study_uid}/series/{series_uid}/instances/{sop}",
                            self.base
                        ))],
                    ),
                );
                if let Some(text) = row.get::<Option<&str>, _>(11) {
                    layers.push(parse_object(
                        &text.replace(crate::ingest::extract::BASE_PLACEHOLDER, &self.base),
                    ));
                }
                layers.push(series_json);
                layers.push(study_json);
            }
        }
        if self.includes.all {
            if let Some(own) = layers.first() {
                for (k, v) in own {
                    out.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
        for tag in &self.includes.tags {
            let k = key(*tag);
            if out.contains_key(&k) {
                continue;
            }
            let found = layers.iter().find_map(|l| l.get(&k)).cloned();
            out.insert(
                k,
                found.unwrap_or_else(|| json!({ "vr": vr_of(*tag).to_string() })),
            );
        }
        // serde_json's Map is ordered by key (BTreeMap), which is tag order for 8-hex keys.
        Value::Object(out).to_string()
    }

    /// Copies `wanted` attributes from a stored level, as empty elements when absent.
    fn copy(&self, out: &mut Map<String, Value>, from: &Map<String, Value>, wanted: &[Tag]) {
        for tag in wanted {
            let k = key(*tag);
            let v = from
                .get(&k)
                .cloned()
                .unwrap_or_else(|| json!({ "vr": vr_of(*tag).to_string() }));
            out.insert(k, v);
        }
    }
}

fn element(vr: &str, values: Vec<Value>) -> Value {
    if values.is_empty() {
        json!({ "vr": vr })
    } else {
        json!({ "vr": vr, "Value": values })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includefield_accepts_lists_repeats_keywords_and_all() {
        let s = parse_search(
            Level::Study,
            Some("includefield=00081030,PatientAge&includefield=all&limit=5&offset=2"),
        )
        .unwrap();
        assert!(s.includes.all);
        assert!(s.includes.tags.contains(&tags::STUDY_DESCRIPTION));
        assert!(s.includes.tags.contains(&tags::PATIENT_AGE));
        assert_eq!(s.query.limit, Some(5));
        assert_eq!(s.query.offset, 2);
    }

    #[test]
    fn malformed_queries_are_rejected() {
        for q in [
            "limit=-1",
            "offset=x",
            "StudyDate=notadate",
            "NoSuchKeyword=1",
            "includefield=Bogus",
            "fuzzymatching=maybe",
            "StudyInstanceUID=1.2.abc",
        ] {
            assert!(
                matches!(
                    parse_search(Level::Study, Some(q)),
                    Err(ApiError::BadRequest(_))
                ),
                "{q}"
            );
        }
    }

    #[test]
    fn unsupported_matching_and_fuzzy_matching_are_reported_in_warnings() {
        let s = parse_search(
            Level::Study,
            Some("fuzzymatching=true&PatientAge=030Y&00081110.00081150.00081155=1.2"),
        )
        .unwrap();
        assert_eq!(s.warnings.len(), 2);
        assert!(s.warnings[0].contains("fuzzymatching"));
        assert!(s.warnings[1].contains("PatientAge"));
        // The unmatched key is still returned.
        assert!(s.includes.tags.contains(&tags::PATIENT_AGE));
    }

    #[test]
    fn percent_encoded_values_are_decoded() {
        let s = parse_search(Level::Study, Some("PatientName=Doe%5EJohn")).unwrap();
        let (_, args) = s.query.where_clause();
        assert_eq!(args[0], Arg::Text("DOE^JOHN".into()));
    }
}
