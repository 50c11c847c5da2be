//! Rendered resources (PS3.18 10.4.1.1.3) and thumbnails (10.4.1.1.4) of studies, series, instances
//! and frames, as `image/jpeg` (the default), `image/png` or `image/gif`.
//!
//! A study or series is shown by its representative instance (the middle image of its first
//! series); an instance by its first frame; `frames/{n}` by frame n. Query parameters: `window=
//! center,width[,function]` (LINEAR, LINEAR_EXACT, SIGMOID), `viewport=width,height`, `quality`
//! (1-100, JPEG), `accept` (instead of the Accept header); `annotation` and `charset` are accepted
//! and ignored (no text is burnt into images). Thumbnails take `viewport` only and are cached.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::media::parse_accept;
use super::{check_uids, WebState};
use crate::index::StoredInstance;
use crate::render::{thumbnail, Format, Function, Output, RenderError, Window};

/// JPEG quality when the request names none.
pub const DEFAULT_QUALITY: u8 = 90;

impl From<RenderError> for ApiError {
    fn from(e: RenderError) -> Self {
        match e {
            RenderError::NotAnImage | RenderError::Unsupported(_) => {
                ApiError::NotAcceptable(e.to_string())
            }
            RenderError::NoSuchFrame { .. } => ApiError::NotFound(e.to_string()),
            RenderError::Invalid(_) => ApiError::Internal(e.to_string()),
            RenderError::Storage(s) => s.into(),
        }
    }
}

/// The format a client accepts, in its order of preference: wildcards (and no Accept header) mean
/// JPEG; 406 when none of JPEG, PNG and GIF is acceptable.
pub fn negotiate(accept: Option<&str>) -> Result<Format, ApiError> {
    parse_accept(accept)
        .iter()
        .filter(|a| !a.multipart)
        .find_map(|a| match a.media_type.as_str() {
            "*/*" | "image/*" => Some(Format::Jpeg),
            other => Format::from_media_type(other),
        })
        .ok_or_else(|| {
            ApiError::NotAcceptable(
                "rendered images are available as image/jpeg, image/png and image/gif".into(),
            )
        })
}

/// The query parameters of a rendered or thumbnail request.
#[derive(Debug, Default, PartialEq)]
struct RenderQuery {
    window: Option<Window>,
    viewport: Option<(u32, u32)>,
    quality: Option<u8>,
    accept: Option<String>,
}

fn parse_query(raw: Option<&str>, thumbnail: bool) -> Result<RenderQuery, ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    let mut q = RenderQuery::default();
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "window" if !thumbnail => q.window = Some(parse_window(&value)?),
            "viewport" => {
                let parts: Vec<&str> = value.split(',').map(str::trim).collect();
                let dims = match parts[..] {
                    [w, h] => w.parse::<u32>().ok().zip(h.parse::<u32>().ok()),
                    _ => None,
                };
                match dims {
                    Some((w, h)) if w > 0 && h > 0 => q.viewport = Some((w, h)),
                    _ => {
                        return Err(bad(format!(
                            "viewport={value:?}: expected two positive integers \"width,height\" \
                             (source regions are not supported)"
                        )))
                    }
                }
            }
            "quality" if !thumbnail => match value.trim().parse::<u8>() {
                Ok(v) if (1..=100).contains(&v) => q.quality = Some(v),
                _ => return Err(bad(format!("quality={value:?}: expected 1 to 100"))),
            },
            "accept" => q.accept = Some(value.into_owned()),
            "annotation" | "charset" => {}
            other => return Err(bad(format!("unsupported query parameter {other:?}"))),
        }
    }
    Ok(q)
}

/// Parses `center,width[,function]`.
pub fn parse_window(value: &str) -> Result<Window, ApiError> {
    let parts: Vec<&str> = value.split(',').map(str::trim).collect();
    let (c, w, f) = match parts[..] {
        [c, w] => (c, w, "LINEAR"),
        [c, w, f] => (c, w, f),
        _ => ("", "", ""),
    };
    let function = Function::parse(f);
    match (c.parse::<f64>(), w.parse::<f64>(), function) {
        (Ok(c), Ok(w), Some(f)) => Window::new(c, w, f).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "window={value:?}: the width is too small for {f:?}"
            ))
        }),
        _ => Err(ApiError::BadRequest(format!(
            "window={value:?}: expected \"center,width[,LINEAR|LINEAR_EXACT|SIGMOID]\""
        ))),
    }
}

/// What a request renders.
enum Target {
    Study(String),
    Series(String, String),
    Instance(String, String, String, u32),
}

async fn resolve(state: &WebState, target: &Target) -> Result<(StoredInstance, u32), ApiError> {
    let (found, frame) = match target {
        Target::Study(study) => (state.index.representative_instance(study, None).await?, 0),
        Target::Series(study, series) => (
            state
                .index
                .representative_instance(study, Some(series))
                .await?,
            0,
        ),
        Target::Instance(study, series, instance, frame) => (
            state
                .index
                .stored_instances(study, Some(series), Some(instance))
                .await?
                .into_iter()
                .next(),
            *frame,
        ),
    };
    let inst = found.ok_or_else(|| {
        ApiError::NotFound("no such study, series or instance with images".into())
    })?;
    Ok((inst, frame))
}

async fn serve(
    state: Arc<WebState>,
    target: Target,
    headers: HeaderMap,
    raw_query: Option<String>,
    is_thumbnail: bool,
) -> Result<Response, ApiError> {
    let query = parse_query(raw_query.as_deref(), is_thumbnail)?;
    let accept = query
        .accept
        .as_deref()
        .or_else(|| headers.get("accept").and_then(|h| h.to_str().ok()));
    let format = negotiate(accept)?;
    let (inst, frame) = resolve(&state, &target).await?;
    let renderer = &state.renderer;
    let image = if is_thumbnail {
        let size = renderer.thumbnail_size;
        let (w, h) = query.viewport.unwrap_or((size, size));
        let output = Output {
            format,
            quality: DEFAULT_QUALITY,
            viewport: (Some(w), Some(h)),
            region: None,
        };
        thumbnail::thumbnail(
            renderer,
            &state.index,
            &state.ingestor,
            state.store.as_ref(),
            &inst,
            frame,
            output,
        )
        .await?
    } else {
        let output = Output {
            format,
            quality: query.quality.unwrap_or(DEFAULT_QUALITY),
            viewport: query
                .viewport
                .map_or((None, None), |(w, h)| (Some(w), Some(h))),
            region: None,
        };
        renderer
            .render(state.store.as_ref(), &inst, frame, query.window, output)
            .await?
    };
    Ok(image_response(format, image))
}

pub fn image_response(format: Format, image: Vec<u8>) -> Response {
    ([("content-type", format.media_type())], image).into_response()
}

/// A frame list of exactly one frame (1-based): rendered frames are single images.
fn single_frame(list: &str) -> Result<u32, ApiError> {
    let frames: Vec<&str> = list.split(',').map(str::trim).collect();
    match frames[..] {
        [one] => match one.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(n - 1),
            _ => Err(ApiError::BadRequest(format!(
                "invalid frame number {one:?} (frames are numbered from 1)"
            ))),
        },
        _ => Err(ApiError::NotAcceptable(
            "several frames would need a multi-frame media type; request one frame at a time"
                .into(),
        )),
    }
}

macro_rules! handlers {
    ($study:ident, $series:ident, $instance:ident, $frames:ident, $thumb:expr) => {
        pub async fn $study(
            State(state): State<Arc<WebState>>,
            Path(study): Path<String>,
            RawQuery(q): RawQuery,
            headers: HeaderMap,
        ) -> Result<Response, ApiError> {
            check_uids(&[&study])?;
            serve(state, Target::Study(study), headers, q, $thumb).await
        }

        pub async fn $series(
            State(state): State<Arc<WebState>>,
            Path((study, series)): Path<(String, String)>,
            RawQuery(q): RawQuery,
            headers: HeaderMap,
        ) -> Result<Response, ApiError> {
            check_uids(&[&study, &series])?;
            serve(state, Target::Series(study, series), headers, q, $thumb).await
        }

        pub async fn $instance(
            State(state): State<Arc<WebState>>,
            Path((study, series, instance)): Path<(String, String, String)>,
            RawQuery(q): RawQuery,
            headers: HeaderMap,
        ) -> Result<Response, ApiError> {
            check_uids(&[&study, &series, &instance])?;
            let target = Target::Instance(study, series, instance, 0);
            serve(state, target, headers, q, $thumb).await
        }

        pub async fn $frames(
            State(state): State<Arc<WebState>>,
            Path((study, series, instance, list)): Path<(String, String, String, String)>,
            RawQuery(q): RawQuery,
            headers: HeaderMap,
        ) -> Result<Response, ApiError> {
            check_uids(&[&study, &series, &instance])?;
            let frame = single_frame(&list)?;
            let target = Target::Instance(study, series, instance, frame);
            serve(state, target, headers, q, $thumb).await
        }
    };
}

handlers!(study, series, instance, frames, false);
handlers!(
    study_thumbnail,
    series_thumbnail,
    instance_thumbnail,
    frames_thumbnail,
    true
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation_prefers_the_clients_order() {
        assert_eq!(negotiate(None).unwrap(), Format::Jpeg);
        assert_eq!(negotiate(Some("image/*")).unwrap(), Format::Jpeg);
        assert_eq!(negotiate(Some("image/png")).unwrap(), Format::Png);
        assert_eq!(
            negotiate(Some("image/jp2, image/gif;q=0.5, image/png;q=0.4")).unwrap(),
            Format::Gif
        );
        assert!(matches!(
            negotiate(Some("image/jp2")),
            Err(ApiError::NotAcceptable(_))
        ));
        assert!(negotiate(Some("application/dicom")).is_err());
    }

    #[test]
    fn query_parameters_are_checked() {
        let q = parse_query(
            Some("window=40,400,sigmoid&viewport=256,128&quality=75"),
            false,
        )
        .unwrap();
        assert_eq!(q.window, Window::new(40.0, 400.0, Function::Sigmoid));
        assert_eq!(q.viewport, Some((256, 128)));
        assert_eq!(q.quality, Some(75));
        let q = parse_query(Some("window=-600%2C1500"), false).unwrap();
        assert_eq!(q.window, Window::new(-600.0, 1500.0, Function::Linear));
        for bad in [
            "window=40",
            "window=40,0",
            "window=40,400,cubic",
            "viewport=0,10",
            "viewport=10,10,0,0,5,5",
            "quality=0",
            "quality=101",
            "frobnicate=1",
        ] {
            assert!(parse_query(Some(bad), false).is_err(), "{bad}");
        }
        // Thumbnails take no window or quality.
        assert!(parse_query(Some("window=40,400"), true).is_err());
        assert!(parse_query(Some("annotation=patient"), false).is_ok());
    }

    #[test]
    fn rendered_frames_are_one_at_a_time() {
        assert_eq!(single_frame("3").unwrap(), 2);
        assert!(matches!(single_frame("0"), Err(ApiError::BadRequest(_))));
        assert!(matches!(
            single_frame("1,2"),
            Err(ApiError::NotAcceptable(_))
        ));
    }
}
