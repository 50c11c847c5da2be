//! DICOM -> FHIR R4: the one mapping of a study to ImagingStudy (and of its patient to Patient, of the
//! DICOMweb root to Endpoint), used both to answer `/fhir` and to push to an EHR.
//!
//! Follows the FHIR R4 ImagingStudy page and the DICOM PS3.16 / IHE mapping; the table is in
//! docs/conformance.md. Input is what the index keeps ([`StudyDoc`]: columns and DICOM JSON), never
//! the stored objects.

use serde_json::{json, Map, Value};

use crate::config::FhirConfig;
use crate::index::fhir::{PatientDoc, StudyDoc};

pub const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
pub const SNOMED: &str = "http://snomed.info/sct";
const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
const CONNECTION_TYPE: &str = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type";
const PAYLOAD_TYPE: &str = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type";
/// The id of the shared Endpoint resource for the DICOMweb root.
pub const DICOMWEB_ENDPOINT_ID: &str = "dicomweb";

/// How an ImagingStudy names its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    /// Served: `Endpoint/dicomweb` of this server (and the study's IID launch link contained).
    Referenced,
    /// Pushed: both contained, since the EHR holds no Endpoint of ours.
    Contained,
}

/// What the mapping needs besides the study.
pub struct Context<'a> {
    pub config: &'a FhirConfig,
    /// Absolute DICOMweb root, e.g. `http://host:8080/dicomweb`.
    pub dicomweb_root: &'a str,
    /// Absolute root of the gateway's HTTP server (for the IID link), e.g. `http://host:8080`.
    pub http_root: &'a str,
    pub endpoints: Endpoints,
}

// -- DICOM JSON access -----------------------------------------------------------------------------

fn element<'a>(attrs: &'a Value, tag: &str) -> Option<&'a Value> {
    attrs.get(tag)?.get("Value")?.as_array()?.first()
}

/// The first value of an attribute as text (numbers too), trimmed; None when absent or empty.
fn text(attrs: &Value, tag: &str) -> Option<String> {
    let s = match element(attrs, tag)? {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        Value::Object(pn) => pn.get("Alphabetic")?.as_str()?.trim().to_string(),
        _ => return None,
    };
    (!s.is_empty()).then_some(s)
}

fn items<'a>(attrs: &'a Value, tag: &str) -> impl Iterator<Item = &'a Value> {
    attrs
        .get(tag)
        .and_then(|e| e.get("Value"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// A DICOM person name (`Family^Given^Middle^Prefix^Suffix`) as it is read out.
fn person_display(pn: &str) -> String {
    let parts: Vec<&str> = pn.split('=').next().unwrap_or("").split('^').collect();
    let at = |i: usize| parts.get(i).map_or("", |s| s.trim());
    [at(3), at(1), at(2), at(0), at(4)]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A DICOM person name as a FHIR HumanName.
fn human_name(pn: &str) -> Value {
    let parts: Vec<&str> = pn.split('=').next().unwrap_or("").split('^').collect();
    let at = |i: usize| parts.get(i).map_or("", |s| s.trim());
    let mut name = Map::new();
    let text = person_display(pn);
    if !text.is_empty() {
        name.insert("text".into(), json!(text));
    }
    if !at(0).is_empty() {
        name.insert("family".into(), json!(at(0)));
    }
    let given: Vec<&str> = [at(1), at(2)]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if !given.is_empty() {
        name.insert("given".into(), json!(given));
    }
    if !at(3).is_empty() {
        name.insert("prefix".into(), json!([at(3)]));
    }
    if !at(4).is_empty() {
        name.insert("suffix".into(), json!([at(4)]));
    }
    Value::Object(name)
}

// -- dates -----------------------------------------------------------------------------------------

/// DA `YYYYMMDD` as FHIR `YYYY-MM-DD`.
fn fhir_date(da: &str) -> Option<String> {
    let d = da.trim();
    (d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("{}-{}-{}", &d[..4], &d[4..6], &d[6..]))
}

/// `+HHMM` / `-HHMM` as minutes east of UTC.
fn offset_minutes(tz: &str) -> Option<i32> {
    let tz = tz.trim();
    let sign = match tz.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits = &tz[1..];
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let h: i32 = digits[..2].parse().ok()?;
    let m: i32 = digits[2..].parse().ok()?;
    Some(sign * (h * 60 + m))
}

/// DA + TM (+ the object's Timezone Offset From UTC) as a FHIR dateTime. FHIR requires an offset
/// with a time: without one in the object, the gateway's local offset on that date is used.
pub fn fhir_datetime(da: &str, tm: Option<&str>, tz: Option<&str>) -> Option<String> {
    let date = fhir_date(da)?;
    let Some(tm) = tm.map(str::trim).filter(|t| !t.is_empty()) else {
        return Some(date);
    };
    let (hms, frac) = tm.split_once('.').unwrap_or((tm, ""));
    let hms = hms.replace(':', "");
    if !hms.bytes().all(|b| b.is_ascii_digit()) || hms.len() < 2 || hms.len() % 2 == 1 {
        return Some(date);
    }
    let field = |i: usize| hms.get(i..i + 2).unwrap_or("00");
    let (h, m, s) = (field(0), field(2), field(4));
    if h > "23" || m > "59" || s > "60" {
        return Some(date);
    }
    let frac: String = frac.chars().take_while(char::is_ascii_digit).collect();
    let seconds = if frac.is_empty() {
        s.to_string()
    } else {
        format!("{s}.{frac}")
    };
    let offset = match tz.and_then(offset_minutes) {
        Some(o) => o,
        None => {
            use chrono::{Local, NaiveDate, TimeZone};
            let d = NaiveDate::parse_from_str(&date, "%Y-%m-%d").ok()?;
            let naive = d.and_hms_opt(h.parse().ok()?, m.parse().ok()?, 0)?;
            match Local.from_local_datetime(&naive).earliest() {
                Some(dt) => dt.offset().local_minus_utc() / 60,
                None => 0,
            }
        }
    };
    let sign = if offset < 0 { '-' } else { '+' };
    let o = offset.abs();
    Some(format!(
        "{date}T{h}:{m}:{seconds}{sign}{:02}:{:02}",
        o / 60,
        o % 60
    ))
}

/// Milliseconds since the epoch as a FHIR instant.
pub fn instant(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

// -- codes -----------------------------------------------------------------------------------------

/// The FHIR system of a DICOM Coding Scheme Designator (PS3.16 8.2, FHIR terminology).
pub fn coding_system(designator: &str) -> Option<&'static str> {
    Some(match designator.trim() {
        "SCT" | "SRT" | "SNM3" => SNOMED,
        "LN" => "http://loinc.org",
        "RADLEX" | "RDLX" => "http://www.radlex.org",
        "DCM" => DCM,
        "UCUM" => "http://unitsofmeasure.org",
        "I10" | "ICD10" => "http://hl7.org/fhir/sid/icd-10",
        _ => return None,
    })
}

/// A DICOM code sequence item as a FHIR Coding.
fn coding_of_item(item: &Value) -> Option<Value> {
    let code = text(item, "00080100")
        .or_else(|| text(item, "00080119"))
        .or_else(|| text(item, "00080120"))?;
    let mut c = Map::new();
    if let Some(system) = text(item, "00080102").and_then(|d| coding_system(&d)) {
        c.insert("system".into(), json!(system));
    }
    c.insert("code".into(), json!(code));
    if let Some(meaning) = text(item, "00080104") {
        c.insert("display".into(), json!(meaning));
    }
    Some(Value::Object(c))
}

/// Body Part Examined -> SNOMED CT (PS3.16 Annex L, CID 4031), for the common values.
fn body_part(value: &str) -> Option<(&'static str, &'static str)> {
    Some(match value.trim().to_ascii_uppercase().as_str() {
        "ABDOMEN" => ("113345001", "Abdomen"),
        "ABDOMENPELVIS" => ("416949008", "Abdomen and Pelvis"),
        "ANKLE" => ("70258002", "Ankle joint"),
        "BLADDER" => ("89837001", "Urinary bladder"),
        "BRAIN" => ("12738006", "Brain"),
        "BREAST" => ("76752008", "Breast"),
        "CHEST" => ("51185008", "Thorax"),
        "CHESTABDOMEN" => ("416550000", "Chest and Abdomen"),
        "CLAVICLE" => ("51299004", "Clavicle"),
        "COLON" => ("71854001", "Colon"),
        "CSPINE" => ("122494005", "Cervical spine"),
        "ELBOW" => ("16953009", "Elbow joint"),
        "EXTREMITY" => ("66019005", "Extremity"),
        "EYE" => ("81745001", "Eye"),
        "FEMUR" => ("71341001", "Femur"),
        "FOOT" => ("56459004", "Foot"),
        "HAND" => ("85562004", "Hand"),
        "HEAD" => ("69536005", "Head"),
        "HEADNECK" => ("774007", "Head and Neck"),
        "HEART" => ("80891009", "Heart"),
        "HIP" => ("24136001", "Hip joint"),
        "HUMERUS" => ("85050009", "Humerus"),
        "JAW" => ("661005", "Jaw region"),
        "KIDNEY" => ("64033007", "Kidney"),
        "KNEE" => ("72696002", "Knee"),
        "LIVER" => ("10200004", "Liver"),
        "LSPINE" => ("122496007", "Lumbar spine"),
        "NECK" => ("45048000", "Neck"),
        "PANCREAS" => ("15776009", "Pancreas"),
        "PELVIS" => ("12921003", "Pelvis"),
        "PROSTATE" => ("41216001", "Prostate"),
        "SHOULDER" => ("16982005", "Shoulder"),
        "SKULL" => ("89546000", "Skull"),
        "SPINE" => ("421060004", "Spine"),
        "SPLEEN" => ("78961009", "Spleen"),
        "SSPINE" => ("54735007", "Sacrum"),
        "THYROID" => ("69748006", "Thyroid"),
        "TMJ" => ("53620006", "Temporomandibular joint"),
        "TSPINE" => ("122495006", "Thoracic spine"),
        "WHOLEBODY" => ("38266002", "Entire body"),
        "WRIST" => ("74670003", "Wrist joint"),
        _ => return None,
    })
}

fn body_site(value: &str) -> Value {
    match body_part(value) {
        Some((code, display)) => json!({"system": SNOMED, "code": code, "display": display}),
        None => json!({ "display": value.trim() }),
    }
}

fn laterality(value: &str) -> Option<Value> {
    let (code, display) = match value.trim() {
        "L" => ("7771000", "Left"),
        "R" => ("24028007", "Right"),
        "B" => ("51440002", "Right and left"),
        _ => return None,
    };
    Some(json!({"system": SNOMED, "code": code, "display": display}))
}

// -- identifiers and references ----------------------------------------------------------------------

/// The identifier system of a Patient ID issued by `issuer`.
pub fn patient_system<'a>(config: &'a FhirConfig, issuer: &str) -> &'a str {
    config
        .issuer_systems
        .get(issuer.trim())
        .map_or(config.patient_id_system.as_str(), String::as_str)
}

/// The Issuers of Patient ID a system stands for: the issuers mapped to it, and for the default
/// system also the ones without a mapping (None: any).
pub fn issuers_of_system(config: &FhirConfig, system: &str) -> Option<Vec<String>> {
    let mapped: Vec<String> = config
        .issuer_systems
        .iter()
        .filter(|(_, s)| s.as_str() == system)
        .map(|(i, _)| i.clone())
        .collect();
    if system == config.patient_id_system {
        None
    } else {
        Some(mapped)
    }
}

/// (a) A logical reference to the patient by identifier.
pub fn subject_by_identifier(config: &FhirConfig, patient_id: &str, issuer: &str) -> Value {
    json!({
        "type": "Patient",
        "identifier": {"system": patient_system(config, issuer), "value": patient_id}
    })
}

/// The Patient resource id of (Patient ID, Issuer): readable and reversible (`[A-Za-z0-9.-]`, `-`
/// escapes other bytes as `-XX`, `.` separates the issuer), or `h-` and a hash past 64 characters.
pub fn patient_resource_id(patient_id: &str, issuer: &str) -> String {
    fn escape(s: &str, out: &mut String) {
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() {
                out.push(b as char);
            } else {
                out.push_str(&format!("-{b:02X}"));
            }
        }
    }
    let mut id = String::new();
    escape(patient_id, &mut id);
    if !issuer.is_empty() {
        id.push('.');
        escape(issuer, &mut id);
    }
    if id.len() <= 64 && !id.is_empty() {
        return id;
    }
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("{patient_id}\u{0}{issuer}").as_bytes(),
    );
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("h-{}", &hex[..62])
}

/// (Patient ID, Issuer) of a readable Patient resource id; None for hashed or malformed ids.
pub fn parse_patient_resource_id(id: &str) -> Option<(String, String)> {
    if id.starts_with("h-") {
        return None;
    }
    fn unescape(s: &str) -> Option<String> {
        let mut out = Vec::new();
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'-' {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else if b[i].is_ascii_alphanumeric() {
                out.push(b[i]);
                i += 1;
            } else {
                return None;
            }
        }
        String::from_utf8(out).ok()
    }
    let (pid, issuer) = id.split_once('.').unwrap_or((id, ""));
    Some((unescape(pid)?, unescape(issuer)?))
}

/// The accession number's identifier (type ACSN, system from its issuer when known).
fn accession_identifier(config: &FhirConfig, accession: &str, attrs: &Value) -> Value {
    let mut id = Map::new();
    id.insert(
        "type".into(),
        json!({"coding": [{"system": V2_0203, "code": "ACSN"}]}),
    );
    if let Some(system) = accession_system(config, attrs) {
        id.insert("system".into(), json!(system));
    }
    id.insert("value".into(), json!(accession));
    Value::Object(id)
}

/// The system of the accession number, from the Issuer of Accession Number Sequence.
pub fn accession_system(config: &FhirConfig, attrs: &Value) -> Option<String> {
    let issuer = items(attrs, "00080051").next()?;
    if let Some(system) = text(issuer, "00400031").and_then(|l| config.accession_systems.get(&l)) {
        return Some(system.clone());
    }
    let universal = text(issuer, "00400032")?;
    match text(issuer, "00400033").as_deref() {
        Some("ISO") => Some(format!("urn:oid:{universal}")),
        Some("URI") | Some("URL") => Some(universal),
        Some("UUID") => Some(format!("urn:uuid:{}", universal.to_ascii_lowercase())),
        _ => None,
    }
}

// -- resources -------------------------------------------------------------------------------------

/// The Endpoint of the gateway's DICOMweb root (WADO-RS).
pub fn dicomweb_endpoint(id: &str, dicomweb_root: &str) -> Value {
    json!({
        "resourceType": "Endpoint",
        "id": id,
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPE, "code": "dicom-wado-rs", "display": "DICOM WADO-RS"},
        "name": "dicom-gateway DICOMweb (WADO-RS, QIDO-RS)",
        "payloadType": [{"text": "DICOM", "coding": [{"system": PAYLOAD_TYPE, "code": "any", "display": "Any"}]}],
        "payloadMimeType": ["application/dicom"],
        "address": dicomweb_root,
    })
}

/// The IHE Invoke Image Display link of one study, as an Endpoint (connection type `ihe-iid`).
pub fn iid_endpoint(id: &str, http_root: &str, study_uid: &str) -> Value {
    json!({
        "resourceType": "Endpoint",
        "id": id,
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPE, "code": "ihe-iid", "display": "IHE IID"},
        "name": "View this study (IHE Invoke Image Display)",
        "payloadType": [{"coding": [{"system": PAYLOAD_TYPE, "code": "none", "display": "None"}]}],
        "payloadMimeType": ["text/html"],
        "address": format!("{http_root}/IHEInvokeImageDisplay?requestType=STUDY&studyUID={study_uid}"),
    })
}

fn meta(version: i64, changed_at: i64) -> Value {
    json!({"versionId": version.to_string(), "lastUpdated": instant(changed_at)})
}

/// A study as an ImagingStudy, with `subject` already resolved (patient linking).
pub fn imaging_study(doc: &StudyDoc, subject: Value, ctx: &Context) -> Value {
    let attrs: Value = serde_json::from_str(&doc.attrs_json).unwrap_or(Value::Null);
    let series: Vec<Value> = serde_json::from_str(&doc.series_json).unwrap_or_default();
    let config = ctx.config;

    let mut identifiers = vec![json!({
        "use": "official",
        "system": "urn:dicom:uid",
        "value": format!("urn:oid:{}", doc.study_uid),
    })];
    let accession = text(&attrs, "00080050");
    if let Some(acc) = &accession {
        identifiers.push(accession_identifier(config, acc, &attrs));
    }
    if let Some(study_id) = text(&attrs, "00200010") {
        identifiers
            .push(json!({"use": "secondary", "type": {"text": "Study ID"}, "value": study_id}));
    }

    let mut study = Map::new();
    study.insert("resourceType".into(), json!("ImagingStudy"));
    study.insert("id".into(), json!(doc.study_uid));
    study.insert("meta".into(), meta(doc.version, doc.changed_at));
    let (contained, endpoint_refs) = endpoints(doc, ctx);
    if !contained.is_empty() {
        study.insert("contained".into(), Value::Array(contained));
    }
    study.insert("identifier".into(), Value::Array(identifiers));
    study.insert("status".into(), json!("available"));

    let mut modalities: Vec<String> = series
        .iter()
        .filter_map(|s| s["modality"].as_str())
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect();
    modalities.sort();
    modalities.dedup();
    if !modalities.is_empty() {
        let codings: Vec<Value> = modalities
            .iter()
            .map(|m| json!({"system": DCM, "code": m}))
            .collect();
        study.insert("modality".into(), Value::Array(codings));
    }
    study.insert("subject".into(), subject);
    let tz = text(&attrs, "00080201");
    if let Some(started) = text(&attrs, "00080020")
        .and_then(|d| fhir_datetime(&d, text(&attrs, "00080030").as_deref(), tz.as_deref()))
    {
        study.insert("started".into(), json!(started));
    }
    if let Some(acc) = &accession {
        study.insert(
            "basedOn".into(),
            json!([{"type": "ServiceRequest", "identifier": accession_identifier(config, acc, &attrs)}]),
        );
    }
    if let Some(referrer) = text(&attrs, "00080090")
        .map(|pn| person_display(&pn))
        .filter(|d| !d.is_empty())
    {
        study.insert("referrer".into(), json!({ "display": referrer }));
    }
    study.insert("endpoint".into(), Value::Array(endpoint_refs));
    study.insert("numberOfSeries".into(), json!(doc.num_series));
    study.insert("numberOfInstances".into(), json!(doc.num_instances));
    let procedures: Vec<Value> = items(&attrs, "00081032")
        .filter_map(coding_of_item)
        .collect();
    if !procedures.is_empty() {
        study.insert("procedureCode".into(), reasons_or_codes(procedures));
    }
    // Reason for the Requested Procedure, coded: in the Request Attributes Sequence of a series.
    let reasons: Vec<Value> = series
        .iter()
        .flat_map(|s| items(&s["attrs"], "00400275"))
        .flat_map(|request| items(request, "0040100A"))
        .filter_map(coding_of_item)
        .collect();
    if !reasons.is_empty() {
        let mut unique = reasons;
        unique.dedup();
        study.insert("reasonCode".into(), reasons_or_codes(unique));
    }
    if let Some(description) = text(&attrs, "00081030") {
        study.insert("description".into(), json!(description));
    }
    let series: Vec<Value> = series.iter().map(|s| series_of(s, tz.as_deref())).collect();
    if !series.is_empty() {
        study.insert("series".into(), Value::Array(series));
    }
    Value::Object(study)
}

/// Each coding as its own CodeableConcept.
fn reasons_or_codes(codings: Vec<Value>) -> Value {
    Value::Array(
        codings
            .into_iter()
            .map(|c| {
                let text = c.get("display").cloned();
                let mut cc = json!({"coding": [c]});
                if let Some(t) = text {
                    cc["text"] = t;
                }
                cc
            })
            .collect(),
    )
}

fn endpoints(doc: &StudyDoc, ctx: &Context) -> (Vec<Value>, Vec<Value>) {
    let iid = iid_endpoint("iid", ctx.http_root, &doc.study_uid);
    match ctx.endpoints {
        Endpoints::Referenced => (
            vec![iid],
            vec![
                json!({"reference": format!("Endpoint/{DICOMWEB_ENDPOINT_ID}"), "type": "Endpoint"}),
                json!({"reference": "#iid", "type": "Endpoint"}),
            ],
        ),
        Endpoints::Contained => (
            vec![dicomweb_endpoint("dicomweb", ctx.dicomweb_root), iid],
            vec![
                json!({"reference": "#dicomweb", "type": "Endpoint"}),
                json!({"reference": "#iid", "type": "Endpoint"}),
            ],
        ),
    }
}

fn series_of(s: &Value, study_tz: Option<&str>) -> Value {
    let attrs = &s["attrs"];
    let mut out = Map::new();
    out.insert("uid".into(), s["uid"].clone());
    if let Some(n) = s["number"].as_i64().filter(|n| *n >= 0) {
        out.insert("number".into(), json!(n));
    }
    let modality = s["modality"]
        .as_str()
        .filter(|m| !m.is_empty())
        .unwrap_or("OT");
    out.insert("modality".into(), json!({"system": DCM, "code": modality}));
    if let Some(d) = s["description"].as_str().filter(|d| !d.trim().is_empty()) {
        out.insert("description".into(), json!(d.trim()));
    }
    out.insert("numberOfInstances".into(), s["count"].clone());
    if let Some(part) = s["bodyPart"].as_str().filter(|p| !p.trim().is_empty()) {
        out.insert("bodySite".into(), body_site(part));
    }
    if let Some(lat) = s["laterality"].as_str().and_then(laterality) {
        out.insert("laterality".into(), lat);
    }
    let date = text(attrs, "00080021");
    let time = text(attrs, "00080031");
    if let Some(started) = date.and_then(|d| fhir_datetime(&d, time.as_deref(), study_tz)) {
        out.insert("started".into(), json!(started));
    }
    let performers: Vec<Value> = attrs
        .get("00081050")
        .and_then(|e| e.get("Value"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|pn| pn.get("Alphabetic")?.as_str())
        .map(person_display)
        .filter(|d| !d.is_empty())
        .map(|d| json!({"actor": {"display": d}}))
        .collect();
    if !performers.is_empty() {
        out.insert("performer".into(), Value::Array(performers));
    }
    let instances: Vec<Value> = s["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            let mut inst = Map::new();
            inst.insert("uid".into(), i[0].clone());
            let class = i[1].as_str().unwrap_or("");
            inst.insert(
                "sopClass".into(),
                json!({"system": "urn:ietf:rfc:3986", "code": format!("urn:oid:{class}")}),
            );
            if let Some(n) = i[2].as_i64().filter(|n| *n >= 0) {
                inst.insert("number".into(), json!(n));
            }
            if let Some(name) = sop_class_name(class) {
                inst.insert("title".into(), json!(name));
            }
            Value::Object(inst)
        })
        .collect();
    if !instances.is_empty() {
        out.insert("instance".into(), Value::Array(instances));
    }
    Value::Object(out)
}

/// The SOP class's name from the standard dictionary, used as the instance's title.
fn sop_class_name(uid: &str) -> Option<&'static str> {
    use dicom_core::dictionary::UidDictionary;
    dicom_dictionary_std::StandardSopClassDictionary
        .by_uid(uid)
        .map(|e| e.name)
}

/// A study whose every instance was deleted, as it is pushed when `on_delete` is
/// `entered-in-error`: its identifiers and subject, status `entered-in-error`.
pub fn deleted_imaging_study(
    config: &FhirConfig,
    study_uid: &str,
    accession: &str,
    subject: Value,
    version: i64,
    changed_at: i64,
) -> Value {
    let mut identifiers = vec![json!({
        "use": "official",
        "system": "urn:dicom:uid",
        "value": format!("urn:oid:{study_uid}"),
    })];
    if !accession.is_empty() {
        identifiers.push(accession_identifier(config, accession, &Value::Null));
    }
    json!({
        "resourceType": "ImagingStudy",
        "id": study_uid,
        "meta": meta(version, changed_at),
        "identifier": identifiers,
        "status": "entered-in-error",
        "subject": subject,
    })
}

/// A patient known from DICOM as a Patient resource.
pub fn patient(config: &FhirConfig, doc: &PatientDoc) -> Value {
    let attrs: Value = serde_json::from_str(&doc.attrs_json).unwrap_or(Value::Null);
    let mut p = Map::new();
    p.insert("resourceType".into(), json!("Patient"));
    p.insert(
        "id".into(),
        json!(patient_resource_id(
            &doc.patient_id,
            &doc.issuer_of_patient_id
        )),
    );
    p.insert(
        "identifier".into(),
        json!([{
            "use": "usual",
            "system": patient_system(config, &doc.issuer_of_patient_id),
            "value": doc.patient_id,
        }]),
    );
    if let Some(name) = text(&attrs, "00100010")
        .map(|pn| human_name(&pn))
        .filter(|n| n.get("text").is_some())
    {
        p.insert("name".into(), json!([name]));
    }
    let gender = match text(&attrs, "00100040").as_deref() {
        Some("M") => "male",
        Some("F") => "female",
        Some("O") => "other",
        _ => "unknown",
    };
    p.insert("gender".into(), json!(gender));
    if let Some(birth) = text(&attrs, "00100030").and_then(|d| fhir_date(&d)) {
        p.insert("birthDate".into(), json!(birth));
    }
    Value::Object(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times_become_fhir_date_times() {
        assert_eq!(
            fhir_datetime("20240131", Some("093005.25"), Some("+0100")).unwrap(),
            "2024-01-31T09:30:05.25+01:00"
        );
        assert_eq!(
            fhir_datetime("20240131", Some("0930"), Some("-0530")).unwrap(),
            "2024-01-31T09:30:00-05:30"
        );
        assert_eq!(fhir_datetime("20240131", None, None).unwrap(), "2024-01-31");
        assert!(fhir_datetime("2024", None, None).is_none());
        // Without an offset in the object, the gateway's own offset; still a valid FHIR dateTime.
        let local = fhir_datetime("20240131", Some("10"), None).unwrap();
        assert!(local.starts_with("2024-01-31T10:00:00"), "{local}");
        assert!(local.len() == 25, "{local}");
    }

    #[test]
    fn patient_ids_are_valid_fhir_ids_and_reversible() {
        for (pid, issuer) in [("12345", ""), ("AB-12.x", "HOSP A"), ("Ünïcode^", "x")] {
            let id = patient_resource_id(pid, issuer);
            assert!(id.len() <= 64);
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
            assert_eq!(
                parse_patient_resource_id(&id),
                Some((pid.to_string(), issuer.to_string()))
            );
        }
        let long = "9".repeat(64);
        let id = patient_resource_id(&long, "ISSUER");
        assert!(id.starts_with("h-") && id.len() == 64);
    }

    #[test]
    fn person_names_read_given_name_first() {
        assert_eq!(person_display("Doe^John^Q^Dr^Jr"), "Dr John Q Doe Jr");
        assert_eq!(person_display("Doe^John"), "John Doe");
        assert_eq!(human_name("Doe^John")["family"], "Doe");
    }

    #[test]
    fn body_parts_and_laterality_are_snomed_codes() {
        assert_eq!(body_site("CHEST")["code"], "51185008");
        assert_eq!(body_site("Toe area")["display"], "Toe area");
        assert!(body_site("Toe area").get("system").is_none());
        assert_eq!(laterality("L").unwrap()["code"], "7771000");
        assert!(laterality("").is_none());
    }
}
