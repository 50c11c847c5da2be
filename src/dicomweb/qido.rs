//! QIDO-RS (PS3.18 10.6): search for studies, series and instances.
//!
//! Query parameters become an [`index::query::Query`]; results are read from the index (attributes
//! and the DICOM JSON stored at ingest) and streamed as a JSON array, row by row.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use futures::{StreamExt, TryStreamExt};
use serde_json::{Map, Value};
use sqlx::Row;

use super::error::ApiError;
use super::media::{media_matches, parse_accept};
use super::{check_uids, WebState};
use crate::index::query::{is_uid_key, vr_of, Arg, Level, Query};
use crate::index::results::{self, Match, ResultLevel};
use crate::model::json::{self, parse_tag};
use crate::security::policy::Scope;

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
    // A UID key repeated (`StudyInstanceUID=a&StudyInstanceUID=b`) is one list of UIDs (PS3.18
    // 8.3.4.1), matched once all its values are known.
    let mut uid_lists: BTreeMap<Tag, Vec<String>> = BTreeMap::new();
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
                if is_uid_key(tag) {
                    uid_lists.entry(tag).or_default().push(value.into_owned());
                    continue;
                }
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
    for (tag, values) in uid_lists {
        let matched = search
            .query
            .add_match(tag, &values.join("\\"))
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if !matched {
            unsupported.push(json::tag_key(tag));
        }
        search.includes.tags.insert(tag);
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
    Extension(scope): Extension<Scope>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    run(
        state,
        &scope,
        &headers,
        Level::Study,
        None,
        None,
        raw.as_deref(),
    )
    .await
}

pub async fn series(
    State(state): State<Arc<WebState>>,
    Extension(scope): Extension<Scope>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    run(
        state,
        &scope,
        &headers,
        Level::Series,
        None,
        None,
        raw.as_deref(),
    )
    .await
}

pub async fn instances(
    State(state): State<Arc<WebState>>,
    Extension(scope): Extension<Scope>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    run(
        state,
        &scope,
        &headers,
        Level::Instance,
        None,
        None,
        raw.as_deref(),
    )
    .await
}

pub async fn study_series(
    State(state): State<Arc<WebState>>,
    Path(study): Path<String>,
    Extension(scope): Extension<Scope>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    run(
        state,
        &scope,
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
    Extension(scope): Extension<Scope>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    run(
        state,
        &scope,
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
    Extension(scope): Extension<Scope>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    run(
        state,
        &scope,
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
    scope: &Scope,
    headers: &HeaderMap,
    level: Level,
    study: Option<String>,
    series: Option<String>,
    raw: Option<&str>,
) -> Result<Response, ApiError> {
    check_accept(headers)?;
    let mut search = parse_search(level, raw)?;
    // Only the studies the caller may search, in the SQL (so counts and pages see only those).
    if let Scope::Studies(filters) = scope {
        search.query.within(filters);
    }
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
    // The page: what the client asked for, at most the configured maximum; without `limit`, the
    // default page. When the server's limit cut the results, a Warning says how many remain.
    let asked = search.query.limit;
    let page = asked.map_or(state.qido_default_limit, |n| n.min(state.qido_max_limit));
    search.query.limit = Some(page);
    if asked.is_none_or(|n| n > page) {
        let remaining = remaining_after_page(&state, &search).await?;
        if remaining > 0 {
            let next = search.query.offset + page;
            search.warnings.push(format!(
                "299 dicom-gateway \"There are {remaining} additional results that can be requested (offset={next})\""
            ));
        }
    }
    let base = state.base_url(headers);
    let sql = select_sql(&search);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<String, sqlx::Error>>(64);
    let pool = state.index.read_pool().clone();
    let (sql_text, args) = sql;
    let builder = ResultBuilder::new(level, base, search.includes);
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

/// QIDO-RS answers DICOM JSON only (PS3.18 10.6.2): an Accept that admits neither it nor
/// `application/json` gets 406.
/// A query string through the parser and the matching engine, for the fuzz targets.
#[cfg(fuzzing)]
pub fn sql_for_fuzzing(level: Level, query: &str) {
    if let Ok(search) = parse_search(level, Some(query)) {
        let _ = select_sql(&search);
    }
}

fn check_accept(headers: &HeaderMap) -> Result<(), ApiError> {
    let header = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let header = (!header.trim().is_empty()).then_some(header.as_str());
    let acceptable = parse_accept(header).iter().any(|a| {
        !a.multipart
            && (media_matches(&a.media_type, "application/dicom+json")
                || media_matches(&a.media_type, "application/json"))
    });
    if acceptable {
        Ok(())
    } else {
        Err(ApiError::NotAcceptable(
            "search results are available as application/dicom+json only".into(),
        ))
    }
}

/// How many matches lie beyond the page the query asks for.
async fn remaining_after_page(state: &WebState, search: &Search) -> Result<u64, ApiError> {
    let (where_sql, mut args) = search.query.where_sql();
    let from = search.query.level.from_sql();
    let skip = search.query.offset + search.query.limit.unwrap_or(0);
    args.push(Arg::Int(i64::try_from(skip).unwrap_or(i64::MAX)));
    let sql = format!("SELECT COUNT(*) FROM (SELECT 1 {from} {where_sql} LIMIT -1 OFFSET ?)");
    let q = crate::index::bind_args(sqlx::query(&sql), &args);
    let row = q.fetch_one(state.index.read_pool()).await?;
    Ok(row.get::<i64, _>(0).max(0) as u64)
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
    let instance_json = search.includes.all
        || search
            .includes
            .tags
            .iter()
            .any(|t| results::needs_instance_json(*t));
    let (sql, mut args) = results::select_sql(
        result_level(search.query.level),
        &search.query,
        instance_json,
    );
    let limit = search.query.limit.map(|l| l as i64).unwrap_or(-1);
    args.push(Arg::Int(limit));
    args.push(Arg::Int(search.query.offset as i64));
    (format!("{sql} LIMIT ? OFFSET ?"), args)
}

fn result_level(level: Level) -> ResultLevel {
    match level {
        Level::Study => ResultLevel::Study,
        Level::Series => ResultLevel::Series,
        Level::Instance => ResultLevel::Instance,
    }
}

/// Turns the index's matches into QIDO-RS results: the level's default attributes, the requested
/// ones, and the RetrieveURL.
struct ResultBuilder {
    level: ResultLevel,
    base: String,
    includes: Includes,
    defaults: Vec<Tag>,
}

impl ResultBuilder {
    fn new(level: Level, base: String, includes: Includes) -> ResultBuilder {
        let level = result_level(level);
        ResultBuilder {
            level,
            base,
            includes,
            defaults: results::default_tags(level),
        }
    }

    fn build(&self, row: &sqlx::sqlite::SqliteRow) -> String {
        let found = Match::from_row(self.level, row, Some(&self.base));
        let mut out = Map::new();
        for tag in self.defaults.iter().chain(&self.includes.tags) {
            let element = found
                .get(*tag)
                .cloned()
                .unwrap_or_else(|| json::empty_element(vr_of(*tag)));
            out.insert(json::tag_key(*tag), element);
        }
        let mut url = format!("{}/studies/{}", self.base, found.study_uid);
        for (segment, uid) in [
            ("series", &found.series_uid),
            ("instances", &found.sop_instance_uid),
        ] {
            if let Some(uid) = uid {
                url = format!("{url}/{segment}/{uid}");
            }
        }
        out.insert(
            json::tag_key(tags::RETRIEVE_URL),
            json::text_element(VR::UR, &[&url]),
        );
        if self.includes.all {
            for (k, v) in found.own_level() {
                out.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        // serde_json's Map is ordered by key (BTreeMap), which is tag order for 8-hex keys.
        Value::Object(out).to_string()
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
    fn a_repeated_uid_key_is_a_list_of_uids() {
        let s = parse_search(
            Level::Study,
            Some("StudyInstanceUID=1.2.3&StudyInstanceUID=1.2.4,1.2.5&PatientID=X"),
        )
        .unwrap();
        let (sql, args) = s.query.where_clause();
        assert!(sql.contains("st.study_uid IN (?,?,?)"), "{sql}");
        assert!(args.contains(&Arg::Text("1.2.4".into())));
        assert!(s.includes.tags.contains(&tags::STUDY_INSTANCE_UID));
    }

    #[test]
    fn accept_must_admit_dicom_json() {
        let with = |accept: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(a) = accept {
                h.insert("accept", HeaderValue::from_str(a).unwrap());
            }
            check_accept(&h).is_ok()
        };
        assert!(with(None));
        assert!(with(Some("application/dicom+json")));
        assert!(with(Some("application/json, text/plain;q=0.5")));
        assert!(with(Some("*/*")));
        assert!(with(Some("application/*")));
        assert!(!with(Some("image/xyz")));
        assert!(!with(Some(
            "multipart/related; type=\"application/dicom+xml\""
        )));
        assert!(!with(Some("application/dicom+json;q=0")));
    }

    #[test]
    fn percent_encoded_values_are_decoded() {
        let s = parse_search(Level::Study, Some("PatientName=Doe%5EJohn")).unwrap();
        let (_, args) = s.query.where_clause();
        assert_eq!(args[0], Arg::Text("DOE^JOHN".into()));
    }
}
