//! The display pipeline of PS3.3 C.11 for one decoded frame, to 8 bits per sample: stored values
//! through the Modality LUT (rescale or table), then the VOI (the requested window, else the
//! object's first window, else its VOI LUT, else the frame's full range), MONOCHROME1 inverted;
//! colour frames converted to RGB (YBR_FULL, PALETTE COLOR through its palette).

use super::attributes::ImageInfo;
use super::color::ybr_full_to_rgb;
use super::decode::Frame;
use super::window::{Function, Window};
use super::RenderError;

/// An 8-bit image: one sample per pixel (grey) or three (RGB).
pub struct Rendered {
    pub width: u32,
    pub height: u32,
    pub rgb: bool,
    pub data: Vec<u8>,
}

/// Larger stored ranges than this are mapped pixel by pixel instead of through a table.
const MAX_TABLE: i64 = 1 << 20;

pub fn render(frame: Frame, window: Option<Window>) -> Result<Rendered, RenderError> {
    let Frame { info, samples } = frame;
    let (width, height) = (info.columns, info.rows);
    let data = if info.is_monochrome() {
        grey(&info, &samples, window)
    } else if let Some(palette) = &info.palette {
        samples.iter().flat_map(|&s| palette.rgb(s)).collect()
    } else {
        colour(&info, &samples)?
    };
    Ok(Rendered {
        width,
        height,
        rgb: !info.is_monochrome(),
        data,
    })
}

/// The VOI step for a modality value, to 0..=255.
enum Voi<'a> {
    Window(Window),
    Table(&'a super::lut::Lut),
}

fn grey(info: &ImageInfo, samples: &[i32], requested: Option<Window>) -> Vec<u8> {
    let (min, max) = samples
        .iter()
        .fold((i32::MAX, i32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if samples.is_empty() {
        return Vec::new();
    }
    let voi = match (requested, info.windows.first(), &info.voi_lut) {
        (Some(w), _, _) => Voi::Window(w),
        (None, Some(w), _) => Voi::Window(*w),
        (None, None, Some(lut)) => Voi::Table(lut),
        (None, None, None) => {
            // The frame's own range of modality values, mapped linearly onto the output.
            let (a, b) = (info.modality.apply(min), info.modality.apply(max));
            let (lo, hi) = (a.min(b), a.max(b));
            let (lo, hi) = match &info.modality {
                // A table need not be monotonic: its range over the stored values present.
                super::attributes::Modality::Table(_) => (min..=max)
                    .map(|v| info.modality.apply(v))
                    .fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v))),
                _ => (lo, hi),
            };
            let width = (hi - lo).max(1.0);
            Voi::Window(Window {
                center: lo + width / 2.0,
                width,
                function: Function::LinearExact,
            })
        }
    };
    let invert = info.photometric == "MONOCHROME1";
    let map = |stored: i32| -> u8 {
        let m = info.modality.apply(stored);
        let y = match &voi {
            Voi::Window(w) => w.apply(m, 0.0, 255.0),
            Voi::Table(lut) => f64::from(lut.lookup(m.round() as i32)) / lut.max_output() * 255.0,
        };
        let y = y.round().clamp(0.0, 255.0) as u8;
        if invert {
            255 - y
        } else {
            y
        }
    };
    let span = i64::from(max) - i64::from(min) + 1;
    if span <= MAX_TABLE && span < samples.len() as i64 * 4 {
        let table: Vec<u8> = (min..=max).map(map).collect();
        samples.iter().map(|&s| table[(s - min) as usize]).collect()
    } else {
        samples.iter().map(|&s| map(s)).collect()
    }
}

fn colour(info: &ImageInfo, samples: &[i32]) -> Result<Vec<u8>, RenderError> {
    // Samples of more than 8 bits keep their top 8.
    let shift = info.bits_stored.saturating_sub(8);
    let to8 = |v: i32| -> u8 { (v.max(0) >> shift).min(255) as u8 };
    match info.photometric.as_str() {
        "RGB" => Ok(samples.iter().map(|&v| to8(v)).collect()),
        "YBR_FULL" => Ok(samples
            .chunks_exact(3)
            .flat_map(|p| {
                ybr_full_to_rgb(
                    f64::from(to8(p[0])),
                    f64::from(to8(p[1])),
                    f64::from(to8(p[2])),
                )
            })
            .collect()),
        other => Err(RenderError::Unsupported(format!(
            "photometric interpretation {other} in a native frame"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::attributes::Modality;
    use crate::render::lut::{Lut, LutData};

    fn ct(samples: Vec<i32>, photometric: &str) -> Frame {
        Frame {
            info: ImageInfo {
                rows: 1,
                columns: samples.len() as u32,
                samples_per_pixel: 1,
                bits_allocated: 16,
                bits_stored: 12,
                high_bit: 11,
                signed: true,
                photometric: photometric.into(),
                planar: false,
                modality: Modality::Rescale {
                    slope: 2.0,
                    intercept: -1024.0,
                },
                windows: vec![Window::new(40.0, 400.0, Function::Linear).unwrap()],
                voi_lut: None,
                palette: None,
            },
            samples,
        }
    }

    #[test]
    fn rescale_then_the_object_window() {
        // Stored 532 -> 2*532 - 1024 = 40 HU -> ((40 - 39.5)/399 + 0.5) * 255 = 127.8 -> 128.
        // Stored 0 -> -1024 HU -> 0; stored 2000 -> 2976 HU -> 255; stored 512 -> 0 HU ->
        // ((0 - 39.5)/399 + 0.5)*255 = 102.26 -> 102.
        let r = render(ct(vec![532, 0, 2000, 512], "MONOCHROME2"), None).unwrap();
        assert_eq!(r.data, vec![128, 0, 255, 102]);
        assert!(!r.rgb);
    }

    #[test]
    fn monochrome1_is_inverted_and_a_requested_window_wins() {
        let r = render(ct(vec![532, 0], "MONOCHROME1"), None).unwrap();
        assert_eq!(r.data, vec![127, 255]);
        // LINEAR_EXACT c=0 w=100: -1024 HU -> 0; 40 HU -> ((40/100)+0.5)*255 = 229.5 -> 230.
        let w = Window::new(0.0, 100.0, Function::LinearExact);
        let r = render(ct(vec![532, 0], "MONOCHROME2"), w).unwrap();
        assert_eq!(r.data, vec![230, 0]);
    }

    #[test]
    fn without_a_window_the_frame_range_is_used() {
        let mut f = ct(vec![512, 532, 612], "MONOCHROME2");
        f.info.windows.clear();
        // HU 0, 40, 200: LINEAR_EXACT over [0, 200]: 0, 0.2*255 = 51, 255.
        assert_eq!(render(f, None).unwrap().data, vec![0, 51, 255]);
    }

    #[test]
    fn a_voi_lut_maps_modality_values() {
        let mut f = ct(vec![512, 513, 600], "MONOCHROME2");
        f.info.windows.clear();
        // HU 0, 2, 176; the table starts at HU 0 with 4 entries of 10 bits.
        f.info.voi_lut = Some(Lut::new([4, 0, 10], LutData::Words(&[0, 100, 511, 1023])).unwrap());
        // 511/1023*255 = 127.38 -> 127.
        assert_eq!(render(f, None).unwrap().data, vec![0, 127, 255]);
    }

    #[test]
    fn colour_samples_are_scaled_and_converted() {
        let mut f = ct(vec![4095, 0, 2048, 81, 90, 240], "RGB");
        f.info.samples_per_pixel = 3;
        f.info.columns = 2;
        let r = render(f, None).unwrap();
        assert!(r.rgb);
        assert_eq!(r.data, vec![255, 0, 128, 5, 5, 15]);
        let mut f = ct(vec![81, 90, 240], "YBR_FULL");
        f.info.samples_per_pixel = 3;
        f.info.columns = 1;
        f.info.bits_stored = 8;
        assert_eq!(render(f, None).unwrap().data, vec![238, 14, 14]);
    }
}
