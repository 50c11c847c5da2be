//! The rendered frame as a JPEG, PNG or GIF: an optional region cut out (WADO-URI `region`), scaled
//! to fit a viewport keeping the aspect ratio, then encoded with the `image` crate (grey GIFs with
//! an exact 256-grey palette through the `gif` crate, instead of a quantised colour one).

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageEncoder, RgbImage};

use super::pipeline::Rendered;
use super::RenderError;

/// The largest width or height a rendered image is scaled to.
pub const MAX_SIDE: u32 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Jpeg,
    Png,
    Gif,
}

impl Format {
    pub fn media_type(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Png => "image/png",
            Format::Gif => "image/gif",
        }
    }

    pub fn from_media_type(media_type: &str) -> Option<Format> {
        match media_type.trim().to_ascii_lowercase().as_str() {
            "image/jpeg" => Some(Format::Jpeg),
            "image/png" => Some(Format::Png),
            "image/gif" => Some(Format::Gif),
            _ => None,
        }
    }
}

/// How the rendered frame is shaped and encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub format: Format,
    /// JPEG quality, 1 to 100.
    pub quality: u8,
    /// The box the image is scaled to fit (either side may be free).
    pub viewport: (Option<u32>, Option<u32>),
    /// The part of the image kept, as fractions of its width and height: left, top, right, bottom.
    pub region: Option<[f64; 4]>,
}

/// The size that fits `(width, height)` into the viewport keeping the aspect ratio.
pub fn fit(width: u32, height: u32, viewport: (Option<u32>, Option<u32>)) -> (u32, u32) {
    let (w, h) = (f64::from(width), f64::from(height));
    let scale = match viewport {
        (None, None) => 1.0,
        (Some(vw), None) => f64::from(vw) / w,
        (None, Some(vh)) => f64::from(vh) / h,
        (Some(vw), Some(vh)) => (f64::from(vw) / w).min(f64::from(vh) / h),
    };
    let scale = scale.min(f64::from(MAX_SIDE) / w.max(h));
    let side = |v: f64| ((v * scale).round() as u32).max(1);
    (side(w), side(h))
}

pub fn encode(rendered: Rendered, output: &Output) -> Result<Vec<u8>, RenderError> {
    let bad = || RenderError::Invalid("rendered buffer of the wrong size".into());
    let mut image = if rendered.rgb {
        DynamicImage::ImageRgb8(
            RgbImage::from_raw(rendered.width, rendered.height, rendered.data).ok_or_else(bad)?,
        )
    } else {
        DynamicImage::ImageLuma8(
            GrayImage::from_raw(rendered.width, rendered.height, rendered.data).ok_or_else(bad)?,
        )
    };
    if let Some([x1, y1, x2, y2]) = output.region {
        let (w, h) = (f64::from(image.width()), f64::from(image.height()));
        let x = (x1 * w).floor() as u32;
        let y = (y1 * h).floor() as u32;
        let cw = (((x2 - x1) * w).round() as u32).max(1);
        let ch = (((y2 - y1) * h).round() as u32).max(1);
        image = image.crop_imm(x, y, cw, ch);
    }
    let (w, h) = fit(image.width(), image.height(), output.viewport);
    if (w, h) != (image.width(), image.height()) {
        // Triangle (bilinear) is several times faster than Lanczos and the difference does not
        // show at viewer and thumbnail sizes; it averages when shrinking, so no aliasing.
        image = image.resize_exact(w, h, FilterType::Triangle);
    }
    let mut out = Vec::new();
    let failed = |e: image::ImageError| RenderError::Invalid(format!("encoding failed: {e}"));
    match output.format {
        Format::Jpeg => JpegEncoder::new_with_quality(&mut out, output.quality.clamp(1, 100))
            .write_image(image.as_bytes(), w, h, image.color().into())
            .map_err(failed)?,
        Format::Png => PngEncoder::new(&mut out)
            .write_image(image.as_bytes(), w, h, image.color().into())
            .map_err(failed)?,
        Format::Gif => gif(&image, &mut out)?,
    }
    Ok(out)
}

fn gif(image: &DynamicImage, out: &mut Vec<u8>) -> Result<(), RenderError> {
    let failed = |e: String| RenderError::Invalid(format!("GIF encoding failed: {e}"));
    let (w, h) = (image.width(), image.height());
    if w > u32::from(u16::MAX) || h > u32::from(u16::MAX) {
        return Err(RenderError::Invalid("image too large for GIF".into()));
    }
    let frame = match image {
        DynamicImage::ImageLuma8(grey) => {
            let palette: Vec<u8> = (0..=255u8).flat_map(|v| [v, v, v]).collect();
            let mut frame =
                gif::Frame::from_indexed_pixels(w as u16, h as u16, grey.as_raw().clone(), None);
            frame.palette = Some(palette);
            frame
        }
        other => {
            let rgb = other.to_rgb8();
            gif::Frame::from_rgb_speed(w as u16, h as u16, rgb.as_raw(), 10)
        }
    };
    let mut encoder =
        gif::Encoder::new(out, w as u16, h as u16, &[]).map_err(|e| failed(e.to_string()))?;
    encoder
        .write_frame(&frame)
        .map_err(|e| failed(e.to_string()))?;
    // Writes the trailer (dropping the encoder would too, but swallow its error).
    encoder.into_inner().map_err(|e| failed(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewports_keep_the_aspect_ratio() {
        assert_eq!(fit(512, 256, (Some(128), Some(128))), (128, 64));
        assert_eq!(fit(512, 256, (None, Some(128))), (256, 128));
        assert_eq!(fit(512, 256, (Some(1024), None)), (1024, 512));
        assert_eq!(fit(512, 256, (None, None)), (512, 256));
        assert_eq!(fit(100, 10, (Some(5), Some(5))), (5, 1));
        assert_eq!(fit(64, 64, (Some(100_000), None)), (MAX_SIDE, MAX_SIDE));
    }

    #[test]
    fn grey_images_round_trip_through_png_and_gif() {
        let data: Vec<u8> = (0..=255).collect();
        for format in [Format::Png, Format::Gif] {
            let out = encode(
                Rendered {
                    width: 16,
                    height: 16,
                    rgb: false,
                    data: data.clone(),
                },
                &Output {
                    format,
                    quality: 90,
                    viewport: (None, None),
                    region: None,
                },
            )
            .unwrap();
            let back = image::load_from_memory(&out).unwrap().to_luma8();
            assert_eq!(back.as_raw(), &data, "{format:?}");
        }
    }

    #[test]
    fn regions_are_cut_before_scaling() {
        let data: Vec<u8> = (0..16).map(|i| if i % 4 < 2 { 0 } else { 255 }).collect();
        let out = encode(
            Rendered {
                width: 4,
                height: 4,
                rgb: false,
                data,
            },
            &Output {
                format: Format::Png,
                quality: 90,
                viewport: (None, None),
                region: Some([0.5, 0.0, 1.0, 0.5]),
            },
        )
        .unwrap();
        let back = image::load_from_memory(&out).unwrap().to_luma8();
        assert_eq!((back.width(), back.height()), (2, 2));
        assert!(back.as_raw().iter().all(|&v| v == 255));
    }
}
