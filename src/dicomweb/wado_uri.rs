//! WADO-URI (PS3.18 9, the URI service): `GET /wado?requestType=WADO&studyUID=..&seriesUID=..&
//! objectUID=..`, mounted at the server root.
//!
//! `contentType` (a list, first supported wins): `application/dicom` (in the `transferSyntax` asked
//! for, through the transcoder, 406 for what it cannot produce; by default Explicit VR Little Endian,
//! see [`default_syntax`]), `image/jpeg` (the default for an object with pixel data; objects without are
//! sent as `application/dicom`), `image/png`, `image/gif`. Image parameters: `frameNumber`,
//! `windowCenter` + `windowWidth`, `rows` / `columns` (the image is fitted into them, keeping the
//! aspect ratio), `region` (`x1,y1,x2,y2` as fractions of the image), `imageQuality`. `anonymize=yes`
//! and presentation states are refused with 400.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::media::EXPLICIT_VR_LE;
use super::rendered::{image_response, DEFAULT_QUALITY};
use super::WebState;
use crate::index::StoredInstance;
use crate::render::{source, Format, Function, Output, Window};

/// The representation a WADO-URI request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    Dicom,
    Image(Format),
}

/// A parsed WADO-URI request.
#[derive(Debug, Default, PartialEq)]
struct Request {
    study: String,
    series: String,
    object: String,
    /// The acceptable representations in the client's order; empty = the default.
    content: Vec<Content>,
    transfer_syntax: Option<String>,
    frame: Option<u32>,
    window: Option<Window>,
    rows: Option<u32>,
    columns: Option<u32>,
    region: Option<[f64; 4]>,
    quality: Option<u8>,
}

fn parse(raw: Option<&str>) -> Result<Request, ApiError> {
    let bad = |m: String| Err(ApiError::BadRequest(m));
    let mut r = Request::default();
    let mut request_type = None;
    let (mut center, mut width) = (None, None);
    let mut image_params = Vec::new();
    let positive = |k: &str, v: &str| -> Result<u32, ApiError> {
        match v.trim().parse::<u32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(ApiError::BadRequest(format!(
                "{k}={v:?}: expected a positive integer"
            ))),
        }
    };
    let number = |k: &str, v: &str| -> Result<f64, ApiError> {
        v.trim()
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| ApiError::BadRequest(format!("{k}={v:?}: expected a number")))
    };
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let (k, v) = (key.as_ref(), value.as_ref());
        match k {
            "requestType" => request_type = Some(v.to_string()),
            "studyUID" => r.study = v.to_string(),
            "seriesUID" => r.series = v.to_string(),
            "objectUID" => r.object = v.to_string(),
            "contentType" => {
                let known: Vec<Content> = v
                    .split(',')
                    .filter_map(|t| {
                        let t = t
                            .split(';')
                            .next()
                            .unwrap_or("")
                            .trim()
                            .to_ascii_lowercase();
                        match t.as_str() {
                            "application/dicom" => Some(Content::Dicom),
                            "image/*" | "*/*" => Some(Content::Image(Format::Jpeg)),
                            other => Format::from_media_type(other).map(Content::Image),
                        }
                    })
                    .collect();
                if known.is_empty() {
                    return Err(ApiError::NotAcceptable(format!(
                        "contentType={v:?}: available are application/dicom, image/jpeg, \
                         image/png and image/gif"
                    )));
                }
                r.content = known;
            }
            "transferSyntax" => r.transfer_syntax = Some(v.trim().to_string()),
            "anonymize" => {
                return bad("anonymize is not supported: objects are only served as stored".into())
            }
            "presentationUID" | "presentationSeriesUID" => {
                return bad(format!("{k}: presentation states are not supported"))
            }
            "frameNumber" => r.frame = Some(positive(k, v)?),
            "rows" => r.rows = Some(positive(k, v)?),
            "columns" => r.columns = Some(positive(k, v)?),
            "windowCenter" => center = Some(number(k, v)?),
            "windowWidth" => width = Some(number(k, v)?),
            "imageQuality" => match v.trim().parse::<u8>() {
                Ok(q) if (1..=100).contains(&q) => r.quality = Some(q),
                _ => return bad(format!("imageQuality={v:?}: expected 1 to 100")),
            },
            "region" => r.region = Some(parse_region(v)?),
            // Accepted, without effect: text is never burnt into images.
            "charset" | "annotation" => {}
            _ => {}
        }
        if matches!(
            k,
            "frameNumber"
                | "rows"
                | "columns"
                | "windowCenter"
                | "windowWidth"
                | "imageQuality"
                | "region"
        ) {
            image_params.push(k.to_string());
        }
    }
    if request_type.as_deref() != Some("WADO") {
        return bad("requestType=WADO is required".into());
    }
    for (name, uid) in [
        ("studyUID", &r.study),
        ("seriesUID", &r.series),
        ("objectUID", &r.object),
    ] {
        if !crate::index::query::is_valid_uid(uid) {
            return bad(format!("{name}={uid:?} is missing or not a valid UID"));
        }
    }
    r.window = match (center, width) {
        (Some(c), Some(w)) => Some(
            Window::new(c, w, Function::Linear)
                .ok_or_else(|| ApiError::BadRequest(format!("windowWidth={w} is below 1")))?,
        ),
        (None, None) => None,
        _ => return bad("windowCenter and windowWidth go together".into()),
    };
    if r.content.first() == Some(&Content::Dicom) && !image_params.is_empty() {
        return bad(format!(
            "{} only apply to images, not to contentType=application/dicom",
            image_params.join(", ")
        ));
    }
    if r.transfer_syntax.is_some() && !r.content.contains(&Content::Dicom) {
        return bad("transferSyntax only applies to contentType=application/dicom".into());
    }
    Ok(r)
}

/// `x1,y1,x2,y2`, fractions of the image with x1 < x2 and y1 < y2.
fn parse_region(v: &str) -> Result<[f64; 4], ApiError> {
    let values: Vec<f64> = v
        .split(',')
        .filter_map(|x| x.trim().parse::<f64>().ok())
        .collect();
    match values[..] {
        [x1, y1, x2, y2]
            if [x1, y1, x2, y2].iter().all(|x| (0.0..=1.0).contains(x)) && x1 < x2 && y1 < y2 =>
        {
            Ok([x1, y1, x2, y2])
        }
        _ => Err(ApiError::BadRequest(format!(
            "region={v:?}: expected x1,y1,x2,y2 between 0 and 1 with x1 < x2 and y1 < y2"
        ))),
    }
}

pub async fn wado(
    State(state): State<Arc<WebState>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let request = parse(raw.as_deref())?;
    let inst = state
        .index
        .stored_instances(&request.study, Some(&request.series), Some(&request.object))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::NotFound("no such object".into()))?;
    let has_pixels = source::layout_of(&inst)
        .map(|l| source::frame_count(&l) != Some(0))
        .unwrap_or(false);
    let content = match request.content.first() {
        Some(c) => *c,
        None if has_pixels => Content::Image(Format::Jpeg),
        None => Content::Dicom,
    };
    match content {
        Content::Dicom => dicom(&state, &inst, request.transfer_syntax.as_deref()).await,
        Content::Image(format) => {
            if !has_pixels {
                return Err(ApiError::NotAcceptable(
                    "the object has no pixel data: request contentType=application/dicom".into(),
                ));
            }
            let output = Output {
                format,
                quality: request.quality.unwrap_or(DEFAULT_QUALITY),
                viewport: (request.columns, request.rows),
                region: request.region,
            };
            let frame = request.frame.unwrap_or(1) - 1;
            let image = state
                .renderer
                .render(state.store.as_ref(), &inst, frame, request.window, output)
                .await?;
            Ok(image_response(format, image))
        }
    }
}

/// What `application/dicom` without `transferSyntax` is sent in (PS3.18 9.4.2.4): Explicit VR Little
/// Endian, the default of DICOMweb (Implicit VR and big endian are never used, 8.7.3), except pixel data
/// the gateway holds only lossy compressed, or cannot decode, which is sent as stored (8.7.3's exception).
fn default_syntax(stored: &str) -> Option<&'static str> {
    let decompress = crate::transcode::check(stored, EXPLICIT_VR_LE).is_ok();
    (stored != EXPLICIT_VR_LE && decompress && !crate::transcode::is_lossy(stored))
        .then_some(EXPLICIT_VR_LE)
}

async fn dicom(
    state: &WebState,
    inst: &StoredInstance,
    transfer_syntax: Option<&str>,
) -> Result<Response, ApiError> {
    let stored = inst.transfer_syntax_uid.as_str();
    match transfer_syntax.or_else(|| default_syntax(stored)) {
        None => {}
        Some(ts) if ts == stored => {}
        // Anything else through the transcoder (decompression of any stored syntax, lossless
        // encodings it has a codec for; 406 for what it cannot produce).
        Some(ts) => {
            let converted = crate::transcode::instance(state.store.as_ref(), inst, ts).await?;
            return Ok(([("content-type", "application/dicom")], converted).into_response());
        }
    }
    let (size, stream) = state.store.get(&inst.storage_key).await?;
    Ok((
        [
            ("content-type", "application/dicom".to_string()),
            ("content-length", size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "requestType=WADO&studyUID=1.2&seriesUID=1.2.3&objectUID=1.2.3.4";

    fn parse_with(extra: &str) -> Result<Request, ApiError> {
        parse(Some(&format!("{BASE}{extra}")))
    }

    #[test]
    fn a_minimal_request_parses() {
        let r = parse_with("").unwrap();
        assert_eq!(r.object, "1.2.3.4");
        assert!(r.content.is_empty());
        let r = parse_with(
            "&contentType=image/png&frameNumber=2&windowCenter=40&windowWidth=400&rows=64\
             &region=0,0.5,0.5,1&imageQuality=80",
        )
        .unwrap();
        assert_eq!(r.content, vec![Content::Image(Format::Png)]);
        assert_eq!(r.frame, Some(2));
        assert_eq!(r.window, Window::new(40.0, 400.0, Function::Linear));
        assert_eq!((r.rows, r.columns), (Some(64), None));
        assert_eq!(r.region, Some([0.0, 0.5, 0.5, 1.0]));
        assert_eq!(r.quality, Some(80));
        let r = parse_with(
            "&contentType=image/jp2,application/dicom&transferSyntax=1.2.840.10008.1.2.1",
        )
        .unwrap();
        assert_eq!(r.content, vec![Content::Dicom]);
    }

    #[test]
    fn bad_requests_are_400_and_unknown_types_406() {
        for bad in [
            "requestType=WADO&studyUID=1.2&seriesUID=1.2.3",
            "requestType=WADX&studyUID=1.2&seriesUID=1.2.3&objectUID=1.2.3.4",
            "requestType=WADO&studyUID=x&seriesUID=1.2.3&objectUID=1.2.3.4",
        ] {
            assert!(
                matches!(parse(Some(bad)), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
        for extra in [
            "&anonymize=yes",
            "&windowCenter=40",
            "&windowWidth=0&windowCenter=1",
            "&frameNumber=0",
            "&rows=-1",
            "&region=0.5,0,0.2,1",
            "&imageQuality=0",
            "&contentType=application/dicom&rows=10",
            "&transferSyntax=1.2.840.10008.1.2.1",
            "&presentationUID=1.2",
        ] {
            assert!(
                matches!(parse_with(extra), Err(ApiError::BadRequest(_))),
                "{extra}"
            );
        }
        assert!(matches!(
            parse_with("&contentType=image/jp2"),
            Err(ApiError::NotAcceptable(_))
        ));
    }
}
