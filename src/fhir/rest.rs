//! The `/fhir` handlers: read and search of ImagingStudy, Patient and Endpoint, and the
//! CapabilityStatement. JSON only (406 otherwise); errors are OperationOutcomes.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::{json, Map, Value};

use super::mapping::{self, Context, Endpoints, DICOMWEB_ENDPOINT_ID};
use super::outcome::FhirError;
use super::search::{self, Search};
use super::{capability, FhirState, CONTENT_TYPE};
use crate::config::SubjectMode;
use crate::index::fhir as store;
use crate::index::query::is_valid_uid;
use crate::security::policy::Scope;

const JSON_TYPES: &[&str] = &[
    "application/fhir+json",
    "application/json",
    "application/json+fhir",
    "application/*",
    "*/*",
];

/// 406 unless the client accepts JSON: `_format` first, then the Accept header.
fn check_format(headers: &HeaderMap, raw: Option<&str>) -> Result<(), FhirError> {
    let format = form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "_format")
        .map(|(_, v)| v.into_owned());
    if let Some(f) = format {
        let f = f
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        return if f == "json" || JSON_TYPES[..3].contains(&f.as_str()) {
            Ok(())
        } else {
            Err(FhirError::NotAcceptable(format!(
                "_format={f} is not supported: this server answers JSON only"
            )))
        };
    }
    let Some(accept) = headers.get("accept").and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let acceptable = accept.split(',').any(|range| {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let refused = parts.any(|p| p.trim().replace(' ', "") == "q=0");
        !refused && (media.is_empty() || JSON_TYPES.contains(&media.as_str()))
    });
    if acceptable {
        Ok(())
    } else {
        Err(FhirError::NotAcceptable(format!(
            "Accept: {accept} is not supported: this server answers application/fhir+json"
        )))
    }
}

/// `Prefer: handling=strict` (lenient is the default).
fn strict(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .any(|p| p.trim().replace(' ', "") == "handling=strict")
}

fn respond(value: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", CONTENT_TYPE)],
        value.to_string(),
    )
        .into_response()
}

fn context<'a>(state: &'a FhirState, dicomweb: &'a str, http: &'a str) -> Context<'a> {
    Context {
        config: &state.config,
        dicomweb_root: dicomweb,
        http_root: http,
        endpoints: Endpoints::Referenced,
    }
}

/// Keeps the elements asked for (and the mandatory ones), marking the resource SUBSETTED.
fn subset(resource: Value, elements: &Option<Vec<String>>) -> Value {
    let Some(elements) = elements else {
        return resource;
    };
    let Value::Object(all) = resource else {
        return resource;
    };
    let keep = |k: &str| {
        matches!(k, "resourceType" | "id" | "meta" | "status" | "subject")
            || elements.iter().any(|e| e == k)
    };
    let mut out: Map<String, Value> = all.into_iter().filter(|(k, _)| keep(k)).collect();
    // Contained resources go only with what references them.
    if !elements.iter().any(|e| e == "endpoint") {
        out.remove("contained");
    }
    let meta = out.entry("meta").or_insert_with(|| json!({}));
    meta["tag"] = json!([{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "code": "SUBSETTED",
        "display": "Resource content has been reduced"
    }]);
    Value::Object(out)
}

async fn imaging_study(state: &FhirState, doc: &store::StudyDoc, ctx: &Context<'_>) -> Value {
    let subject = state
        .subjects
        .subject(&doc.patient_id, &doc.issuer_of_patient_id, None, false)
        .await;
    mapping::imaging_study(doc, subject, ctx)
}

pub async fn read_study(
    State(state): State<Arc<FhirState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, FhirError> {
    check_format(&headers, raw.as_deref())?;
    let search = search::imaging_study(raw.as_deref(), &state.config, false)?;
    if !is_valid_uid(&id) {
        return Err(FhirError::NotFound(format!("no ImagingStudy {id}")));
    }
    let pool = state.web.index.read_pool();
    let Some(doc) = store::study(pool, &id).await? else {
        if let Some((version, _)) = store::deleted_study(pool, &id).await? {
            return Err(FhirError::Gone(format!(
                "ImagingStudy {id} was deleted (version {version})"
            )));
        }
        return Err(FhirError::NotFound(format!("no ImagingStudy {id}")));
    };
    let (dicomweb, http) = (state.dicomweb_root(&headers), state.http_root(&headers));
    let ctx = context(&state, &dicomweb, &http);
    let study = imaging_study(&state, &doc, &ctx).await;
    let mut response = respond(subset(study, &search.elements));
    if let Ok(etag) = format!("W/\"{}\"", doc.version).parse() {
        response.headers_mut().insert("etag", etag);
    }
    Ok(response)
}

/// The Bundle's links: self, first, previous and next, carrying the parameters applied.
fn links(base: &str, search: &Search, total: i64) -> Vec<Value> {
    let url = |offset: u64| {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &search.applied {
            if k != "_count" && k != "_offset" {
                q.append_pair(k, v);
            }
        }
        q.append_pair("_count", &search.count.to_string());
        q.append_pair("_offset", &offset.to_string());
        format!("{base}?{}", q.finish())
    };
    let mut links = vec![
        json!({"relation": "self", "url": url(search.offset)}),
        json!({"relation": "first", "url": url(0)}),
    ];
    if search.offset > 0 && search.count > 0 {
        links.push(
            json!({"relation": "previous", "url": url(search.offset.saturating_sub(search.count))}),
        );
    }
    if search.count > 0 && search.offset + search.count < total.max(0) as u64 {
        links.push(json!({"relation": "next", "url": url(search.offset + search.count)}));
    }
    links
}

fn bundle(total: i64, links: Vec<Value>, entries: Vec<Value>) -> Value {
    let mut b = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
    });
    if !entries.is_empty() {
        b["entry"] = Value::Array(entries);
    }
    b
}

fn entry(full_url: String, resource: Value, mode: &str) -> Value {
    json!({"fullUrl": full_url, "resource": resource, "search": {"mode": mode}})
}

pub async fn search_studies(
    State(state): State<Arc<FhirState>>,
    Extension(scope): Extension<Scope>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, FhirError> {
    check_format(&headers, raw.as_deref())?;
    let mut search = search::imaging_study(raw.as_deref(), &state.config, strict(&headers))?;
    // Only the studies the caller may search, in the SQL (the total and the pages too).
    if let Scope::Studies(filters) = &scope {
        search.filter.query.within(filters);
    }
    let pool = state.web.index.read_pool();
    let base = state.fhir_base(&headers);
    let self_url = format!("{base}/ImagingStudy");
    let total = store::count_studies(pool, &search.filter).await?;
    if search.summary_count {
        return Ok(respond(bundle(
            total,
            links(&self_url, &search, total),
            Vec::new(),
        )));
    }
    let docs = if search.count == 0 {
        Vec::new()
    } else {
        store::search_studies(pool, &search.filter, search.count, search.offset).await?
    };
    let (dicomweb, http) = (state.dicomweb_root(&headers), state.http_root(&headers));
    let ctx = context(&state, &dicomweb, &http);
    let mut entries = Vec::with_capacity(docs.len());
    let mut patients = BTreeSet::new();
    for doc in &docs {
        let study = imaging_study(&state, doc, &ctx).await;
        entries.push(entry(
            format!("{base}/ImagingStudy/{}", doc.study_uid),
            subset(study, &search.elements),
            "match",
        ));
        if !doc.patient_id.is_empty() {
            patients.insert((doc.patient_id.clone(), doc.issuer_of_patient_id.clone()));
        }
    }
    if search.include_endpoint && !docs.is_empty() {
        entries.push(entry(
            format!("{base}/Endpoint/{DICOMWEB_ENDPOINT_ID}"),
            mapping::dicomweb_endpoint(DICOMWEB_ENDPOINT_ID, &dicomweb),
            "include",
        ));
    }
    // Only a literal reference to this server's Patient can be included.
    if search.include_subject && state.config.subject == SubjectMode::Local {
        for (pid, issuer) in &patients {
            for p in store::patients(pool, Some(pid), Some(issuer), 1).await? {
                let resource = mapping::patient(&state.config, &p);
                let id = resource["id"].as_str().unwrap_or_default().to_string();
                entries.push(entry(format!("{base}/Patient/{id}"), resource, "include"));
            }
        }
    }
    Ok(respond(bundle(
        total,
        links(&self_url, &search, total),
        entries,
    )))
}

pub async fn read_patient(
    State(state): State<Arc<FhirState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, FhirError> {
    check_format(&headers, raw.as_deref())?;
    let Some((pid, issuer)) = mapping::parse_patient_resource_id(&id) else {
        return Err(FhirError::NotFound(format!("no Patient {id}")));
    };
    let found = store::patients(state.web.index.read_pool(), Some(&pid), Some(&issuer), 1).await?;
    match found.first() {
        Some(p) => Ok(respond(mapping::patient(&state.config, p))),
        None => Err(FhirError::NotFound(format!("no Patient {id}"))),
    }
}

pub async fn search_patients(
    State(state): State<Arc<FhirState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, FhirError> {
    check_format(&headers, raw.as_deref())?;
    let search = search::patient(raw.as_deref(), &state.config, strict(&headers))?;
    let base = state.fhir_base(&headers);
    let mut patients = Vec::new();
    if !search.filter.none {
        let (pid, issuers) = search.patient.clone().unwrap_or((None, None));
        // Patients are few per identifier: narrowed by issuer here, counted in full.
        let limit = (search.offset + search.count.max(1)) as i64 * 4 + 100;
        for p in store::patients(state.web.index.read_pool(), pid.as_deref(), None, limit).await? {
            if issuers
                .as_ref()
                .is_none_or(|list| list.contains(&p.issuer_of_patient_id))
            {
                patients.push(p);
            }
        }
    }
    let total = patients.len() as i64;
    let self_url = format!("{base}/Patient");
    if search.summary_count {
        return Ok(respond(bundle(
            total,
            links(&self_url, &search, total),
            Vec::new(),
        )));
    }
    let entries = patients
        .iter()
        .skip(search.offset as usize)
        .take(search.count as usize)
        .map(|p| {
            let resource = mapping::patient(&state.config, p);
            let id = resource["id"].as_str().unwrap_or_default().to_string();
            entry(
                format!("{base}/Patient/{id}"),
                subset(resource, &search.elements),
                "match",
            )
        })
        .collect();
    Ok(respond(bundle(
        total,
        links(&self_url, &search, total),
        entries,
    )))
}

pub async fn read_endpoint(
    State(state): State<Arc<FhirState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, FhirError> {
    check_format(&headers, raw.as_deref())?;
    if id != DICOMWEB_ENDPOINT_ID {
        return Err(FhirError::NotFound(format!("no Endpoint {id}")));
    }
    Ok(respond(mapping::dicomweb_endpoint(
        DICOMWEB_ENDPOINT_ID,
        &state.dicomweb_root(&headers),
    )))
}

pub async fn search_endpoints(
    State(state): State<Arc<FhirState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, FhirError> {
    check_format(&headers, raw.as_deref())?;
    let base = state.fhir_base(&headers);
    let endpoint = mapping::dicomweb_endpoint(DICOMWEB_ENDPOINT_ID, &state.dicomweb_root(&headers));
    Ok(respond(json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 1,
        "link": [{"relation": "self", "url": format!("{base}/Endpoint")}],
        "entry": [entry(format!("{base}/Endpoint/{DICOMWEB_ENDPOINT_ID}"), endpoint, "match")],
    })))
}

pub async fn metadata(
    State(state): State<Arc<FhirState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, FhirError> {
    check_format(&headers, raw.as_deref())?;
    Ok(respond(capability::statement(&state.fhir_base(&headers))))
}

pub async fn unknown(uri: axum::http::Uri) -> FhirError {
    FhirError::NotFound(format!(
        "{} is not a resource or interaction this server supports (see /fhir/metadata)",
        uri.path()
    ))
}
