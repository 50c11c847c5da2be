//! What an object's header says about how to display one of its frames: the pixel description
//! (PS3.3 C.7.6.3), the Modality LUT (rescale or LUT sequence), the VOI windows and VOI LUT, and the
//! palette of a PALETTE COLOR image. For enhanced multi-frame objects, the Pixel Value
//! Transformation and Frame VOI LUT functional groups of the frame (per-frame, else shared) take
//! the place of the top-level attributes.

use dicom_core::{PrimitiveValue, Tag};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::lut::{Lut, LutData, Palette};
use super::window::{Function, Window};
use super::RenderError;

/// The display-relevant attributes of one frame.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub rows: u32,
    pub columns: u32,
    pub samples_per_pixel: u16,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub high_bit: u16,
    pub signed: bool,
    pub photometric: String,
    /// Planar Configuration: 1 = colour planes one after the other.
    pub planar: bool,
    pub modality: Modality,
    /// The windows the object suggests, the first being the default.
    pub windows: Vec<Window>,
    pub voi_lut: Option<Lut>,
    pub palette: Option<Palette>,
}

/// The Modality LUT: a linear rescale, or a table.
#[derive(Debug, Clone)]
pub enum Modality {
    Rescale { slope: f64, intercept: f64 },
    Table(Lut),
}

impl Modality {
    pub fn apply(&self, stored: i32) -> f64 {
        match self {
            Modality::Rescale { slope, intercept } => f64::from(stored) * slope + intercept,
            Modality::Table(lut) => f64::from(lut.lookup(stored)),
        }
    }
}

impl ImageInfo {
    /// Reads the attributes of frame `frame` (0-based).
    pub fn from_object(obj: &InMemDicomObject, frame: u32) -> Result<ImageInfo, RenderError> {
        let int = |tag: Tag, name: &str| -> Result<u32, RenderError> {
            obj.get(tag)
                .and_then(|e| e.to_int::<u32>().ok())
                .ok_or_else(|| RenderError::Invalid(format!("{name} is missing or invalid")))
        };
        let rows = int(tags::ROWS, "Rows")?;
        let columns = int(tags::COLUMNS, "Columns")?;
        let samples_per_pixel = int(tags::SAMPLES_PER_PIXEL, "Samples per Pixel")? as u16;
        let bits_allocated = int(tags::BITS_ALLOCATED, "Bits Allocated")? as u16;
        let bits_stored = obj
            .get(tags::BITS_STORED)
            .and_then(|e| e.to_int::<u16>().ok())
            .unwrap_or(bits_allocated);
        let high_bit = obj
            .get(tags::HIGH_BIT)
            .and_then(|e| e.to_int::<u16>().ok())
            .unwrap_or(bits_stored.saturating_sub(1));
        if rows == 0 || columns == 0 {
            return Err(RenderError::Invalid(
                "the image has no rows or columns".into(),
            ));
        }
        if !matches!(bits_allocated, 8 | 16 | 32)
            || bits_stored == 0
            || bits_stored > bits_allocated
            || high_bit >= bits_allocated
            || high_bit + 1 < bits_stored
        {
            return Err(RenderError::Unsupported(format!(
                "pixels of {bits_stored} bits stored in {bits_allocated} allocated (high bit {high_bit})"
            )));
        }
        if !matches!(samples_per_pixel, 1 | 3) {
            return Err(RenderError::Unsupported(format!(
                "{samples_per_pixel} samples per pixel"
            )));
        }
        let signed = obj
            .get(tags::PIXEL_REPRESENTATION)
            .and_then(|e| e.to_int::<u16>().ok())
            == Some(1);
        let photometric = text(obj, tags::PHOTOMETRIC_INTERPRETATION)
            .unwrap_or_else(|| {
                if samples_per_pixel == 3 {
                    "RGB"
                } else {
                    "MONOCHROME2"
                }
                .to_string()
            })
            .to_ascii_uppercase();
        let planar = obj
            .get(tags::PLANAR_CONFIGURATION)
            .and_then(|e| e.to_int::<u16>().ok())
            == Some(1);

        // Enhanced objects: the frame's functional groups, else the shared ones, else top level.
        let transformation =
            functional_group(obj, frame, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE);
        let voi_group = functional_group(obj, frame, tags::FRAME_VOILUT_SEQUENCE);
        let modality = modality(transformation.unwrap_or(obj))?;
        let voi_source = voi_group.unwrap_or(obj);
        let windows = windows(voi_source);
        let voi_lut = match first_item(voi_source, tags::VOILUT_SEQUENCE) {
            Some(item) => Some(lut_in(item, tags::LUT_DESCRIPTOR, tags::LUT_DATA)?),
            None => None,
        };
        let palette = if photometric == "PALETTE COLOR" {
            Some(Palette {
                red: lut_in(
                    obj,
                    tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                    tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                )?,
                green: lut_in(
                    obj,
                    tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                    tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                )?,
                blue: lut_in(
                    obj,
                    tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                    tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                )?,
            })
        } else {
            None
        };
        Ok(ImageInfo {
            rows,
            columns,
            samples_per_pixel,
            bits_allocated,
            bits_stored,
            high_bit,
            signed,
            photometric,
            planar,
            modality,
            windows,
            voi_lut,
            palette,
        })
    }

    pub fn is_monochrome(&self) -> bool {
        self.samples_per_pixel == 1 && self.photometric != "PALETTE COLOR"
    }
}

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let s = obj.get(tag)?.to_str().ok()?;
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    (!s.is_empty()).then(|| s.to_string())
}

fn first_item(obj: &InMemDicomObject, tag: Tag) -> Option<&InMemDicomObject> {
    obj.get(tag)?.items()?.first()
}

/// The item of functional group `group` for `frame`: per-frame first, then shared.
fn functional_group(obj: &InMemDicomObject, frame: u32, group: Tag) -> Option<&InMemDicomObject> {
    let per_frame = obj
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .and_then(|items| items.get(frame as usize))
        .and_then(|item| first_item(item, group));
    per_frame.or_else(|| {
        first_item(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE)
            .and_then(|shared| first_item(shared, group))
    })
}

fn modality(obj: &InMemDicomObject) -> Result<Modality, RenderError> {
    if let Some(item) = first_item(obj, tags::MODALITY_LUT_SEQUENCE) {
        return Ok(Modality::Table(lut_in(
            item,
            tags::LUT_DESCRIPTOR,
            tags::LUT_DATA,
        )?));
    }
    let float = |tag| {
        obj.get(tag)
            .and_then(|e| e.to_multi_float64().ok())
            .and_then(|v| v.first().copied())
            .filter(|v| v.is_finite())
    };
    Ok(Modality::Rescale {
        slope: float(tags::RESCALE_SLOPE)
            .filter(|s| *s != 0.0)
            .unwrap_or(1.0),
        intercept: float(tags::RESCALE_INTERCEPT).unwrap_or(0.0),
    })
}

/// The object's windows, paired up (centers and widths may each hold several values) with the
/// VOI LUT Function (LINEAR when absent). Invalid pairs are skipped.
fn windows(obj: &InMemDicomObject) -> Vec<Window> {
    let values = |tag| {
        obj.get(tag)
            .and_then(|e| e.to_multi_float64().ok())
            .unwrap_or_default()
    };
    let function = text(obj, tags::VOILUT_FUNCTION)
        .and_then(|f| Function::parse(&f))
        .unwrap_or(Function::Linear);
    values(tags::WINDOW_CENTER)
        .into_iter()
        .zip(values(tags::WINDOW_WIDTH))
        .filter_map(|(c, w)| Window::new(c, w, function))
        .collect()
}

/// Reads a LUT from its descriptor and data elements in `obj`.
fn lut_in(obj: &InMemDicomObject, descriptor: Tag, data: Tag) -> Result<Lut, RenderError> {
    let bad = |what: &str| RenderError::Invalid(format!("{what} of a lookup table"));
    let desc = obj
        .get(descriptor)
        .ok_or_else(|| bad("missing descriptor"))?;
    // The second value is US or SS: read all three as the raw 16-bit words they are, and sign
    // the first mapped value only when the VR says SS.
    let words: Vec<i32> = match desc.value().primitive() {
        Some(PrimitiveValue::U16(v)) => v.iter().map(|&x| i32::from(x)).collect(),
        Some(PrimitiveValue::I16(v)) => v
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if i == 1 {
                    i32::from(x)
                } else {
                    i32::from(x as u16)
                }
            })
            .collect(),
        _ => desc
            .to_multi_int::<i32>()
            .map_err(|_| bad("unreadable descriptor"))?,
    };
    let [n, first, bits] = words[..] else {
        return Err(bad("a descriptor without three values"));
    };
    let value = obj
        .get(data)
        .ok_or_else(|| bad("missing data"))?
        .value()
        .primitive()
        .ok_or_else(|| bad("unreadable data"))?;
    let lut = match value {
        PrimitiveValue::U16(w) => Lut::new([n, first, bits], LutData::Words(&w[..])),
        PrimitiveValue::I16(w) => {
            let words: Vec<u16> = w.iter().map(|&x| x as u16).collect();
            Lut::new([n, first, bits], LutData::Words(&words))
        }
        PrimitiveValue::U8(b) => Lut::new([n, first, bits], LutData::Bytes(&b[..])),
        _ => return Err(bad("data of an unexpected type")),
    };
    lut.map_err(RenderError::Invalid)
}
