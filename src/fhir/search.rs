//! FHIR search parameters -> an index filter. The parameter tables here are what the
//! CapabilityStatement declares, so the two cannot drift apart.

use dicom_dictionary_std::tags;

use super::mapping::{issuers_of_system, parse_patient_resource_id, DCM};
use super::outcome::FhirError;
use crate::config::FhirConfig;
use crate::index::audit::Filter as AuditFilter;
use crate::index::fhir::{Sort, StudyFilter};
use crate::index::query::is_valid_uid;

/// A search parameter as the CapabilityStatement declares it.
pub struct Param {
    pub name: &'static str,
    /// FHIR search parameter type.
    pub kind: &'static str,
    /// Canonical definition (the R4 base definition).
    pub definition: &'static str,
    pub doc: &'static str,
}

pub const IMAGING_STUDY_PARAMS: &[Param] = &[
    Param {
        name: "identifier",
        kind: "token",
        definition: "http://hl7.org/fhir/SearchParameter/clinical-identifier",
        doc: "urn:dicom:uid|urn:oid:<StudyInstanceUID>, or an accession number as [system]|value",
    },
    Param {
        name: "patient",
        kind: "reference",
        definition: "http://hl7.org/fhir/SearchParameter/clinical-patient",
        doc: "Patient/<id> of this server; patient:identifier=system|value (also patient.identifier)",
    },
    Param {
        name: "subject",
        kind: "reference",
        definition: "http://hl7.org/fhir/SearchParameter/ImagingStudy-subject",
        doc: "as patient; subject:identifier=system|value",
    },
    Param {
        name: "started",
        kind: "date",
        definition: "http://hl7.org/fhir/SearchParameter/ImagingStudy-started",
        doc: "Study Date and Time; prefixes eq, lt, le, gt, ge; partial dates; times in the study's local time",
    },
    Param {
        name: "modality",
        kind: "token",
        definition: "http://hl7.org/fhir/SearchParameter/ImagingStudy-modality",
        doc: "a modality of any series, code or http://dicom.nema.org/resources/ontology/DCM|code",
    },
    Param {
        name: "status",
        kind: "token",
        definition: "http://hl7.org/fhir/SearchParameter/ImagingStudy-status",
        doc: "available (deleted studies are not found)",
    },
    Param {
        name: "series",
        kind: "token",
        definition: "http://hl7.org/fhir/SearchParameter/ImagingStudy-series",
        doc: "a Series Instance UID of the study",
    },
    Param {
        name: "endpoint",
        kind: "reference",
        definition: "http://hl7.org/fhir/SearchParameter/ImagingStudy-endpoint",
        doc: "Endpoint/dicomweb",
    },
    Param {
        name: "_id",
        kind: "token",
        definition: "http://hl7.org/fhir/SearchParameter/Resource-id",
        doc: "the resource id (the Study Instance UID)",
    },
    Param {
        name: "_lastUpdated",
        kind: "date",
        definition: "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
        doc: "when an instance of the study was last stored or deleted; prefixes eq, lt, le, gt, ge",
    },
];

pub const PATIENT_PARAMS: &[Param] = &[
    Param {
        name: "identifier",
        kind: "token",
        definition: "http://hl7.org/fhir/SearchParameter/Patient-identifier",
        doc: "system|value of the Patient ID (system from the Issuer of Patient ID)",
    },
    Param {
        name: "_id",
        kind: "token",
        definition: "http://hl7.org/fhir/SearchParameter/Resource-id",
        doc: "the resource id",
    },
];

pub const INCLUDES: &[&str] = &["ImagingStudy:endpoint", "ImagingStudy:subject"];
pub const SORTS: &[&str] = &["started", "-started", "_lastUpdated", "-_lastUpdated"];

/// A parsed search.
#[derive(Debug, Default)]
pub struct Search {
    pub filter: StudyFilter,
    /// Patient search: Patient ID and issuers (None: any issuer).
    pub patient: Option<(Option<String>, Option<Vec<String>>)>,
    pub count: u64,
    pub offset: u64,
    pub summary_count: bool,
    pub elements: Option<Vec<String>>,
    pub include_endpoint: bool,
    pub include_subject: bool,
    /// The parameters applied, in order, for the Bundle's links.
    pub applied: Vec<(String, String)>,
}

fn invalid(name: &str, value: &str, why: &str) -> FhirError {
    FhirError::Invalid(format!("invalid {name}={value:?}: {why}"))
}

/// Splits a token into (system, code): `system|code`, `|code` (no system) or `code` (any system).
fn token(value: &str) -> (Option<&str>, &str) {
    match value.split_once('|') {
        Some((system, code)) => (Some(system), code),
        None => (None, value),
    }
}

fn set_text_match(
    filter: &mut StudyFilter,
    tag: dicom_core::Tag,
    values: &[String],
) -> Result<(), FhirError> {
    // The matching engine treats `*`, `?` as wildcards and `\` as a list: FHIR token values are
    // exact, so such values match nothing.
    if values
        .iter()
        .any(|v| v.contains(['*', '?', '\\']) || v.is_empty())
    {
        filter.none = true;
        return Ok(());
    }
    filter
        .query
        .add_match(tag, &values.join("\\"))
        .map_err(|e| FhirError::Invalid(e.to_string()))?;
    Ok(())
}

/// The (patient id, issuers) of a `system|value` patient identifier.
fn patient_identifier(config: &FhirConfig, value: &str) -> (Option<String>, Option<Vec<String>>) {
    let (system, id) = token(value);
    let issuers = match system {
        None => None,
        Some("") => Some(vec![String::new()]),
        Some(s) => issuers_of_system(config, s),
    };
    (Some(id.to_string()), issuers)
}

fn apply_patient(
    filter: &mut StudyFilter,
    (id, issuers): (Option<String>, Option<Vec<String>>),
) -> Result<(), FhirError> {
    if let Some(id) = id {
        set_text_match(filter, tags::PATIENT_ID, &[id])?;
    }
    match issuers {
        None => {}
        Some(list) if list.is_empty() => filter.none = true,
        Some(list) => filter.patient_issuers = Some(list),
    }
    Ok(())
}

/// A `Patient/{id}` reference (relative, absolute or a bare id) as (patient id, issuer).
fn patient_reference(value: &str) -> Option<(String, String)> {
    let id = value.rsplit_once("Patient/").map_or(value, |(_, id)| id);
    let id = id.split('/').next().unwrap_or(id);
    parse_patient_resource_id(id)
}

/// A FHIR date/dateTime search value without its prefix: the Study Date + Time key prefix it names
/// (`YYYY[MM[DD[hh[mm[ss]]]]]`).
fn date_key(value: &str) -> Option<String> {
    let (date, time) = value.split_once('T').unwrap_or((value, ""));
    let parts: Vec<&str> = date.split('-').collect();
    let ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let mut key = String::new();
    match parts.as_slice() {
        [y] if ok(y, 4) => key.push_str(y),
        [y, m] if ok(y, 4) && ok(m, 2) => key.push_str(&format!("{y}{m}")),
        [y, m, d] if ok(y, 4) && ok(m, 2) && ok(d, 2) => key.push_str(&format!("{y}{m}{d}")),
        _ => return None,
    }
    if !time.is_empty() {
        if key.len() != 8 {
            return None;
        }
        // The time without its zone: Study Time is local to the study.
        let t = time
            .split(['Z', '+', '-'])
            .next()
            .unwrap_or("")
            .split('.')
            .next()
            .unwrap_or("");
        let fields: Vec<&str> = t.split(':').collect();
        if fields.is_empty() || fields.len() > 3 || !fields.iter().all(|f| ok(f, 2)) {
            return None;
        }
        key.push_str(&fields.concat());
    }
    Some(key)
}

/// Splits a date parameter's prefix.
fn prefixed(value: &str) -> (&str, &str) {
    for p in ["eq", "ne", "lt", "le", "gt", "ge", "sa", "eb", "ap"] {
        if let Some(rest) = value.strip_prefix(p) {
            return (p, rest);
        }
    }
    ("eq", value)
}

fn started(filter: &mut StudyFilter, value: &str) -> Result<(), FhirError> {
    let (prefix, date) = prefixed(value);
    let key = date_key(date).ok_or_else(|| {
        invalid(
            "started",
            value,
            "not a date (YYYY, YYYY-MM, YYYY-MM-DD[Thh:mm[:ss]])",
        )
    })?;
    let end = format!("{key}~");
    match prefix {
        "eq" => {
            filter.started.push((">=", key));
            filter.started.push(("<=", end));
        }
        "lt" => filter.started.push(("<", key)),
        "le" => filter.started.push(("<=", end)),
        "gt" => filter.started.push((">", end)),
        "ge" => filter.started.push((">=", key)),
        other => {
            return Err(invalid(
                "started",
                value,
                &format!("prefix {other} is not supported"),
            ))
        }
    }
    Ok(())
}

/// The [start, end) of an instant or partial date, in ms since the epoch (UTC unless it names a zone).
fn instant_range(value: &str) -> Option<(i64, i64)> {
    use chrono::{DateTime, Months, NaiveDate, NaiveDateTime, TimeDelta};
    let (date, time) = value.split_once('T').unwrap_or((value, ""));
    let parts: Vec<&str> = date.split('-').collect();
    let num = |s: &str, n: usize| -> Option<u32> {
        (s.len() == n && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
    };
    if !time.is_empty() {
        let with_zone = if time.ends_with('Z') || time.contains(['+', '-']) {
            value.to_string()
        } else {
            format!("{value}Z")
        };
        let full = if time.split(['Z', '+', '-']).next()?.len() == 5 {
            // hh:mm: seconds are implied.
            let (t, zone) = with_zone.split_at(date.len() + 6);
            format!("{t}:00{zone}")
        } else {
            with_zone
        };
        let start = DateTime::parse_from_rfc3339(&full).ok()?;
        let precision = if time.contains('.') { 1 } else { 1000 };
        let ms = start.timestamp_millis();
        return Some((ms, ms + precision));
    }
    let (start, end): (NaiveDateTime, NaiveDateTime) = match parts.as_slice() {
        [y] => {
            let s = NaiveDate::from_ymd_opt(num(y, 4)? as i32, 1, 1)?.and_hms_opt(0, 0, 0)?;
            (s, s.checked_add_months(Months::new(12))?)
        }
        [y, m] => {
            let s =
                NaiveDate::from_ymd_opt(num(y, 4)? as i32, num(m, 2)?, 1)?.and_hms_opt(0, 0, 0)?;
            (s, s.checked_add_months(Months::new(1))?)
        }
        [y, m, d] => {
            let s = NaiveDate::from_ymd_opt(num(y, 4)? as i32, num(m, 2)?, num(d, 2)?)?
                .and_hms_opt(0, 0, 0)?;
            (s, s + TimeDelta::days(1))
        }
        _ => return None,
    };
    Some((
        start.and_utc().timestamp_millis(),
        end.and_utc().timestamp_millis(),
    ))
}

fn last_updated(filter: &mut StudyFilter, value: &str) -> Result<(), FhirError> {
    let (prefix, date) = prefixed(value);
    let (start, end) = instant_range(date)
        .ok_or_else(|| invalid("_lastUpdated", value, "not a date or instant"))?;
    match prefix {
        "eq" => {
            filter.last_updated.push((">=", start));
            filter.last_updated.push(("<", end));
        }
        "lt" => filter.last_updated.push(("<", start)),
        "le" => filter.last_updated.push(("<", end)),
        "gt" => filter.last_updated.push((">=", end)),
        "ge" => filter.last_updated.push((">=", start)),
        other => {
            return Err(invalid(
                "_lastUpdated",
                value,
                &format!("prefix {other} is not supported"),
            ))
        }
    }
    Ok(())
}

/// Result parameters shared by every search; false when `name` is not one.
fn result_param(
    search: &mut Search,
    config: &FhirConfig,
    name: &str,
    value: &str,
    strict: bool,
) -> Result<bool, FhirError> {
    match name {
        "_count" => {
            let n: u64 = value
                .parse()
                .map_err(|_| invalid(name, value, "not a non-negative integer"))?;
            search.count = n.min(config.max_count);
        }
        "_offset" => {
            search.offset = value
                .parse()
                .map_err(|_| invalid(name, value, "not a non-negative integer"))?
        }
        "_summary" => match value {
            "count" => search.summary_count = true,
            "false" => {}
            _ if strict => return Err(invalid(name, value, "only count and false are supported")),
            _ => return Ok(true),
        },
        "_elements" => {
            search.elements = Some(
                value
                    .split(',')
                    .map(|e| e.trim().to_string())
                    .filter(|e| !e.is_empty())
                    .collect(),
            )
        }
        "_format" | "_pretty" => return Ok(true),
        _ => return Ok(false),
    }
    search.applied.push((name.to_string(), value.to_string()));
    Ok(true)
}

fn unknown(name: &str, strict: bool) -> Result<(), FhirError> {
    if strict {
        Err(FhirError::Invalid(format!(
            "unknown or unsupported search parameter {name:?} (Prefer: handling=strict)"
        )))
    } else {
        Ok(())
    }
}

/// Parses an ImagingStudy search.
pub fn imaging_study(
    raw: Option<&str>,
    config: &FhirConfig,
    strict: bool,
) -> Result<Search, FhirError> {
    let mut s = Search {
        count: config.default_count,
        ..Default::default()
    };
    for (name, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let (name, value) = (name.as_ref(), value.as_ref());
        if result_param(&mut s, config, name, value, strict)? {
            continue;
        }
        let values: Vec<&str> = value.split(',').map(str::trim).collect();
        let f = &mut s.filter;
        match name {
            "identifier" => {
                let mut uids = Vec::new();
                let mut accessions = Vec::new();
                for v in &values {
                    match token(v) {
                        (Some("urn:dicom:uid"), code) | (None, code)
                            if code.starts_with("urn:oid:") =>
                        {
                            uids.push(code["urn:oid:".len()..].to_string())
                        }
                        (Some("urn:dicom:uid"), _) => f.none = true,
                        (system, code) => accessions.push((system, code.to_string())),
                    }
                }
                if !uids.is_empty() && !accessions.is_empty() {
                    return Err(invalid(
                        name,
                        value,
                        "mixes Study Instance UIDs and accession numbers",
                    ));
                }
                if !uids.is_empty() {
                    if uids.iter().any(|u| !is_valid_uid(u)) {
                        f.none = true;
                    } else {
                        set_text_match(f, tags::STUDY_INSTANCE_UID, &uids)?;
                    }
                }
                if !accessions.is_empty() {
                    let codes: Vec<String> = accessions.iter().map(|(_, c)| c.clone()).collect();
                    set_text_match(f, tags::ACCESSION_NUMBER, &codes)?;
                    accession_issuer(f, config, &accessions);
                }
            }
            "patient" | "subject" => {
                let mut ids = Vec::new();
                for v in &values {
                    match patient_reference(v) {
                        Some(p) => ids.push(p),
                        None => f.none = true,
                    }
                }
                match ids.as_slice() {
                    [] => {}
                    [(pid, issuer)] => {
                        apply_patient(f, (Some(pid.clone()), Some(vec![issuer.clone()])))?
                    }
                    _ => {
                        return Err(invalid(name, value, "one patient reference at a time"));
                    }
                }
            }
            "patient:identifier" | "subject:identifier" | "patient.identifier"
            | "subject.identifier" => {
                if values.len() != 1 {
                    return Err(invalid(name, value, "one identifier at a time"));
                }
                apply_patient(f, patient_identifier(config, values[0]))?;
            }
            "started" => started(f, value)?,
            "_lastUpdated" => last_updated(f, value)?,
            "modality" => {
                let mut codes = Vec::new();
                for v in &values {
                    match token(v) {
                        (Some(system), code) if system == DCM || system.is_empty() => {
                            codes.push(code.to_string())
                        }
                        (Some(_), _) => {}
                        (None, code) => codes.push(code.to_string()),
                    }
                }
                if codes.is_empty() {
                    f.none = true;
                } else {
                    set_text_match(f, tags::MODALITIES_IN_STUDY, &codes)?;
                }
            }
            "status" => {
                if !values.iter().any(|v| token(v).1 == "available") {
                    f.none = true;
                }
            }
            "series" => {
                let uids: Vec<String> = values.iter().map(|v| token(v).1.to_string()).collect();
                if uids.iter().any(|u| !is_valid_uid(u)) {
                    f.none = true;
                } else {
                    f.series_uids.push(uids);
                }
            }
            "endpoint" => {
                let ours = values.iter().any(|v| {
                    v.rsplit_once("Endpoint/").map_or(*v, |(_, id)| id)
                        == super::mapping::DICOMWEB_ENDPOINT_ID
                });
                if !ours {
                    f.none = true;
                }
            }
            "_id" => {
                if values.iter().any(|u| !is_valid_uid(u)) {
                    f.none = true;
                } else {
                    let uids: Vec<String> = values.iter().map(|v| v.to_string()).collect();
                    set_text_match(f, tags::STUDY_INSTANCE_UID, &uids)?;
                }
            }
            "_sort" => {
                f.sort = match value {
                    "started" => Sort::Started,
                    "-started" => Sort::StartedDesc,
                    "_lastUpdated" => Sort::LastUpdated,
                    "-_lastUpdated" => Sort::LastUpdatedDesc,
                    _ => {
                        return Err(invalid(
                            name,
                            value,
                            "sort by started, -started, _lastUpdated or -_lastUpdated",
                        ))
                    }
                }
            }
            "_include" => match value {
                "ImagingStudy:endpoint" => s.include_endpoint = true,
                "ImagingStudy:subject" | "ImagingStudy:patient" => s.include_subject = true,
                _ => {
                    unknown(&format!("_include={value}"), strict)?;
                    continue;
                }
            },
            _ => {
                unknown(name, strict)?;
                continue;
            }
        }
        s.applied.push((name.to_string(), value.to_string()));
    }
    Ok(s)
}

/// An accession number's system narrows it to an issuer: a configured system, or `urn:oid:` of the
/// issuer's Universal Entity ID (matched in the Issuer of Accession Number Sequence).
fn accession_issuer(
    filter: &mut StudyFilter,
    config: &FhirConfig,
    accessions: &[(Option<&str>, String)],
) {
    let systems: Vec<&str> = accessions
        .iter()
        .filter_map(|(s, _)| *s)
        .filter(|s| !s.is_empty())
        .collect();
    let Some(system) = systems.first() else {
        return;
    };
    if let Some((local, _)) = config
        .accession_systems
        .iter()
        .find(|(_, s)| s.as_str() == *system)
    {
        filter.query.add_sequence_match(
            tags::ISSUER_OF_ACCESSION_NUMBER_SEQUENCE,
            &[(tags::LOCAL_NAMESPACE_ENTITY_ID, local.as_str())],
        );
    } else if let Some(oid) = system.strip_prefix("urn:oid:") {
        filter.query.add_sequence_match(
            tags::ISSUER_OF_ACCESSION_NUMBER_SEQUENCE,
            &[(tags::UNIVERSAL_ENTITY_ID, oid)],
        );
    } else if *system != "http://terminology.hl7.org/CodeSystem/v2-0203" {
        filter.none = true;
    }
}

/// Parses a Patient search.
pub fn patient(raw: Option<&str>, config: &FhirConfig, strict: bool) -> Result<Search, FhirError> {
    let mut s = Search {
        count: config.default_count,
        ..Default::default()
    };
    for (name, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let (name, value) = (name.as_ref(), value.as_ref());
        if result_param(&mut s, config, name, value, strict)? {
            continue;
        }
        match name {
            "identifier" => s.patient = Some(patient_identifier(config, value)),
            "_id" => match parse_patient_resource_id(value) {
                Some((pid, issuer)) => s.patient = Some((Some(pid), Some(vec![issuer]))),
                None => s.filter.none = true,
            },
            _ => {
                unknown(name, strict)?;
                continue;
            }
        }
        s.applied.push((name.to_string(), value.to_string()));
    }
    Ok(s)
}

pub const AUDIT_EVENT_PARAMS: &[Param] = &[
    Param {
        name: "date",
        kind: "date",
        definition: "http://hl7.org/fhir/SearchParameter/AuditEvent-date",
        doc: "when recorded; prefixes eq (default), ge, gt, le, lt; a date without a zone is UTC",
    },
    Param {
        name: "patient",
        kind: "reference",
        definition: "http://hl7.org/fhir/SearchParameter/AuditEvent-patient",
        doc: "Patient/{id} (the id this server gives the patient) or a Patient ID",
    },
    Param {
        name: "entity",
        kind: "reference",
        definition: "http://hl7.org/fhir/SearchParameter/AuditEvent-entity",
        doc: "ImagingStudy/{Study Instance UID}, or the UID",
    },
    Param {
        name: "agent",
        kind: "reference",
        definition: "http://hl7.org/fhir/SearchParameter/AuditEvent-agent",
        doc: "the caller: user, API key name, calling AE title or network address",
    },
];

/// Parses an AuditEvent search: the paging parameters in `Search`, the rest in the filter.
pub fn audit_event(
    raw: Option<&str>,
    config: &FhirConfig,
    strict: bool,
) -> Result<(Search, AuditFilter), FhirError> {
    let mut s = Search {
        count: config.default_count,
        ..Default::default()
    };
    let mut f = AuditFilter::default();
    for (name, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let (name, value) = (name.as_ref(), value.as_ref());
        if result_param(&mut s, config, name, value, strict)? {
            continue;
        }
        match name {
            "date" => {
                let (prefix, date) = match value.get(..2) {
                    Some(p @ ("eq" | "ge" | "gt" | "le" | "lt")) => (p, &value[2..]),
                    _ => ("eq", value),
                };
                let (start, end) = instant_range(date)
                    .ok_or_else(|| invalid(name, value, "not a FHIR date or dateTime"))?;
                let (from, until) = match prefix {
                    "ge" => (Some(start), None),
                    "gt" => (Some(end), None),
                    "le" => (None, Some(end)),
                    "lt" => (None, Some(start)),
                    _ => (Some(start), Some(end)),
                };
                f.from_ms = f.from_ms.max(from);
                f.until_ms = match (f.until_ms, until) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            "patient" => {
                let id = value.strip_prefix("Patient/").unwrap_or(value);
                match parse_patient_resource_id(id) {
                    Some((pid, issuer)) => {
                        f.patient_id = Some(pid);
                        f.issuer_of_patient_id = Some(issuer);
                    }
                    None => f.patient_id = Some(id.to_string()),
                }
            }
            "entity" => {
                let uid = value.strip_prefix("ImagingStudy/").unwrap_or(value);
                f.study_uid = Some(uid.strip_prefix("urn:oid:").unwrap_or(uid).to_string());
            }
            "agent" => f.agent = Some(value.to_string()),
            _ => {
                unknown(name, strict)?;
                continue;
            }
        }
        s.applied.push((name.to_string(), value.to_string()));
    }
    Ok((s, f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_event_dates_cover_their_precision_and_prefixes_narrow() {
        let day = instant_range("2026-12-08").unwrap();
        let config = FhirConfig::default();
        let (_, f) = audit_event(
            Some("date=ge2026-12-08&date=lt2026-12-08T01:00:00Z&entity=ImagingStudy/1.2"),
            &config,
            true,
        )
        .unwrap();
        assert_eq!(f.from_ms, Some(day.0));
        assert_eq!(f.until_ms, Some(day.0 + 3_600_000));
        assert_eq!(f.study_uid.as_deref(), Some("1.2"));
        assert!(audit_event(Some("date=ne2026"), &config, true).is_err());
    }

    #[test]
    fn date_keys_follow_the_precision_given() {
        assert_eq!(date_key("2020").unwrap(), "2020");
        assert_eq!(date_key("2020-03-04").unwrap(), "20200304");
        assert_eq!(date_key("2020-03-04T10:30").unwrap(), "202003041030");
        assert_eq!(
            date_key("2020-03-04T10:30:05+01:00").unwrap(),
            "20200304103005"
        );
        assert!(date_key("2020-3").is_none());
        assert!(date_key("yesterday").is_none());
    }

    #[test]
    fn instants_cover_their_precision() {
        let (a, b) = instant_range("2024-01-01").unwrap();
        assert_eq!(b - a, 86_400_000);
        let (a, b) = instant_range("2024").unwrap();
        assert_eq!(b - a, 366 * 86_400_000);
        let (a, b) = instant_range("2024-01-01T00:00:00Z").unwrap();
        assert_eq!((a, b - a), (1_704_067_200_000, 1000));
        assert!(instant_range("2024-01-01T10:00+01:00").is_some());
        assert!(instant_range("soon").is_none());
    }

    #[test]
    fn strict_handling_refuses_unknown_parameters() {
        let config = FhirConfig::default();
        assert!(imaging_study(Some("foo=1"), &config, false).is_ok());
        assert!(imaging_study(Some("foo=1"), &config, true).is_err());
        assert!(imaging_study(Some("started=gx2020"), &config, false).is_err());
        assert!(imaging_study(Some("_count=x"), &config, false).is_err());
    }
}
