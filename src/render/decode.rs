//! Turns one fetched frame into sample values: the header parsed, an encapsulated frame decoded by
//! dicom-pixeldata's codecs (JPEG, JPEG-LS, JPEG 2000, HTJ2K) from an object holding just that
//! frame (RLE by [`crate::transcode::rle`], at any depth), native samples unpacked, masked to Bits Stored and
//! sign-extended.

use dicom_core::value::PixelFragmentSequence;
use dicom_core::{DataElement, DicomValue, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;

use super::attributes::{ImageInfo, Modality};
use super::color;
use super::source::{FetchedFrame, FrameBytes};
use super::RenderError;
use crate::transcode::rle;

const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";
const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";

/// The samples of one frame, ready for the display pipeline.
pub struct Frame {
    pub info: ImageInfo,
    /// One value per sample, pixel-interleaved (`R G B R G B ...` for colour, whatever the stored
    /// planar configuration; YBR_FULL_422 expanded to one `Y Cb Cr` triple per pixel).
    pub samples: Vec<i32>,
}

pub fn decode(fetched: FetchedFrame) -> Result<Frame, RenderError> {
    let whole = matches!(fetched.frame, FrameBytes::InObject);
    let mut options = OpenFileOptions::new().read_preamble(ReadPreamble::Always);
    if !whole {
        options = options.read_until(tags::PIXEL_DATA);
    }
    let mut obj = options
        .from_reader(&fetched.header[..])
        .map_err(|e| RenderError::Invalid(format!("cannot parse the object's header: {e}")))?;
    let mut info = ImageInfo::from_object(&obj, fetched.index)?;
    if info.bits_stored == 32 && !info.signed {
        // Samples are i32: unsigned 32-bit ones lose their lowest bit (a high bit of 31 with 31
        // bits stored), which the rescale makes up for. Invisible at 8 bits per pixel.
        info.bits_stored = 31;
        if let Modality::Rescale { slope, .. } = &mut info.modality {
            *slope *= 2.0;
        }
    }
    match fetched.frame {
        FrameBytes::Native(bytes) => native(info, &bytes),
        FrameBytes::InObject => {
            // A deflated or big endian data set parsed whole: its native pixel data as the parser
            // decoded it (16-bit words in the machine's, i.e. little endian, order).
            let value = obj
                .get(tags::PIXEL_DATA)
                .ok_or(RenderError::NotAnImage)?
                .value();
            let bytes = match value {
                // Big endian OW read as 16-bit words: a 32-bit sample's two words come out
                // high word first; put them in little-endian order.
                DicomValue::Primitive(PrimitiveValue::U16(words)) if info.bits_allocated == 32 => {
                    std::borrow::Cow::Owned(
                        words
                            .chunks_exact(2)
                            .flat_map(|w| {
                                let (hi, lo) = if fetched.transfer_syntax == EXPLICIT_VR_BE {
                                    (w[0], w[1])
                                } else {
                                    (w[1], w[0])
                                };
                                ((u32::from(hi) << 16) | u32::from(lo)).to_le_bytes()
                            })
                            .collect(),
                    )
                }
                DicomValue::Primitive(p) => p.to_bytes(),
                _ => {
                    return Err(RenderError::Unsupported(
                        "encapsulated pixel data in a deflated data set".into(),
                    ))
                }
            };
            let frame_len = native_frame_length(&info);
            let start = fetched.index as usize * frame_len;
            let frame = bytes
                .get(start..start + frame_len)
                .ok_or(RenderError::NoSuchFrame {
                    frame: fetched.index + 1,
                    count: (bytes.len() / frame_len.max(1)) as u32,
                })?;
            native(info, frame)
        }
        FrameBytes::Encapsulated(bitstream) if fetched.transfer_syntax == RLE_LOSSLESS => {
            let pixels = info.rows as usize * info.columns as usize;
            let bytes = usize::from(info.bits_allocated / 8);
            let decoded = rle::decode(
                &bitstream,
                pixels,
                usize::from(info.samples_per_pixel),
                bytes,
            )
            .map_err(|e| RenderError::Invalid(e.to_string()))?;
            // RLE keeps the photometric interpretation; the samples come out pixel-interleaved.
            info.planar = false;
            native(info, &decoded)
        }
        FrameBytes::Encapsulated(bitstream) => {
            // An object holding only this frame, so the codec reads nothing else.
            obj.put(DataElement::new(
                tags::PIXEL_DATA,
                VR::OB,
                PixelFragmentSequence::new_fragments(vec![bitstream.to_vec()]),
            ));
            obj.put(DataElement::new(
                tags::NUMBER_OF_FRAMES,
                VR::IS,
                PrimitiveValue::from("1"),
            ));
            let decoded = decode_encapsulated(&obj)?;
            // The codecs deliver interleaved samples, colour converted to RGB.
            info.planar = false;
            if info.samples_per_pixel == 3 {
                info.photometric = "RGB".into();
            }
            if decoded.len()
                < info.rows as usize
                    * info.columns as usize
                    * usize::from(info.samples_per_pixel)
                    * usize::from(info.bits_allocated / 8)
            {
                return Err(RenderError::Invalid(
                    "the decoded frame is shorter than its size".into(),
                ));
            }
            let samples = unpack(&info, &decoded);
            Ok(Frame { info, samples })
        }
    }
}

fn decode_encapsulated(obj: &DefaultDicomObject) -> Result<Vec<u8>, RenderError> {
    let ts = obj.meta().transfer_syntax().to_string();
    // Objects were validated at ingest, so a codec failing here is taken as something the codec
    // cannot do (e.g. 12-bit lossy JPEG in jpeg-decoder), not as a broken object: the client is
    // told the image cannot be produced, with the codec's reason.
    let decoded = obj.decode_pixel_data_frame(0).map_err(|e| {
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            reason = format!("{reason}: {s}");
            source = s.source();
        }
        RenderError::Unsupported(format!("cannot decode the frame ({ts}): {reason}"))
    })?;
    Ok(decoded.into_data())
}

/// The bytes of one native frame (YBR_FULL_422: two samples per pixel).
fn native_frame_length(info: &ImageInfo) -> usize {
    let pixels = info.rows as usize * info.columns as usize;
    let bytes = usize::from(info.bits_allocated / 8);
    if info.photometric == "YBR_FULL_422" {
        info.rows as usize * (info.columns as usize).div_ceil(2) * 4 * bytes
    } else {
        pixels * usize::from(info.samples_per_pixel) * bytes
    }
}

fn native(info: ImageInfo, bytes: &[u8]) -> Result<Frame, RenderError> {
    if bytes.len() < native_frame_length(&info) {
        return Err(RenderError::Invalid(
            "the frame is shorter than its size".into(),
        ));
    }
    let mut info = info;
    let mut samples = unpack(&info, &bytes[..native_frame_length(&info)]);
    if info.photometric == "YBR_FULL_422" {
        samples = color::expand_422(&samples, info.rows as usize, info.columns as usize)
            .ok_or_else(|| RenderError::Invalid("short YBR_FULL_422 frame".into()))?;
        info.photometric = "YBR_FULL".into();
    } else if info.samples_per_pixel == 3 && info.planar {
        samples = color::interleave(&samples, 3);
        info.planar = false;
    }
    Ok(Frame { info, samples })
}

/// Reads every sample of `bytes` (little endian), keeps the Bits Stored bits ending at High Bit,
/// and sign-extends them for signed pixels.
pub fn unpack(info: &ImageInfo, bytes: &[u8]) -> Vec<i32> {
    let shift = u32::from(info.high_bit + 1 - info.bits_stored);
    let bits = u32::from(info.bits_stored);
    let mask: u64 = (1u64 << bits) - 1;
    let fix = |raw: u64| -> i32 {
        let v = (raw >> shift) & mask;
        if info.signed && (v >> (bits - 1)) & 1 == 1 {
            (v as i64 - (1i64 << bits)) as i32
        } else {
            v as i64 as i32
        }
    };
    match info.bits_allocated {
        8 => bytes.iter().map(|&b| fix(u64::from(b))).collect(),
        16 => bytes
            .chunks_exact(2)
            .map(|c| fix(u64::from(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| fix(u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(bits_allocated: u16, bits_stored: u16, high_bit: u16, signed: bool) -> ImageInfo {
        ImageInfo {
            rows: 1,
            columns: 2,
            samples_per_pixel: 1,
            bits_allocated,
            bits_stored,
            high_bit,
            signed,
            photometric: "MONOCHROME2".into(),
            planar: false,
            modality: Modality::Rescale {
                slope: 1.0,
                intercept: 0.0,
            },
            windows: vec![],
            voi_lut: None,
            palette: None,
        }
    }

    #[test]
    fn samples_are_masked_and_sign_extended() {
        // 12 bits stored in 16, signed: 0x0FFF is -1, 0x0800 is -2048; bits above 12 are ignored.
        let v = unpack(&info(16, 12, 11, true), &[0xFF, 0xFF, 0x00, 0x08]);
        assert_eq!(v, vec![-1, -2048]);
        // Unsigned, same bytes: 4095 and 2048.
        let v = unpack(&info(16, 12, 11, false), &[0xFF, 0xFF, 0x00, 0x08]);
        assert_eq!(v, vec![4095, 2048]);
        // 16 bits signed.
        let v = unpack(&info(16, 16, 15, true), &[0xFE, 0xFF, 0x10, 0x00]);
        assert_eq!(v, vec![-2, 16]);
        // 8-bit signed, and a high bit that is not bits stored - 1.
        assert_eq!(unpack(&info(8, 8, 7, true), &[0x80, 0x7F]), vec![-128, 127]);
        assert_eq!(
            unpack(&info(16, 8, 11, false), &[0x30, 0x0A, 0, 0]),
            vec![0xA3, 0]
        );
        // Unsigned 32 bits, narrowed to the top 31.
        let v = unpack(
            &info(32, 31, 31, false),
            &[0xFF, 0xFF, 0xFF, 0xFF, 2, 0, 0, 0],
        );
        assert_eq!(v, vec![i32::MAX, 1]);
    }
}
