//! One frame as the codecs of dicom-transfer-syntax-registry see it: the image attributes they need
//! and the frame's bytes (its fragments when encapsulated), without the rest of the object. Decoding
//! and encoding go through the registry's adapters one frame at a time, so a multi-frame object is
//! never decoded whole.

use std::borrow::Cow;

use dicom_core::value::C;
use dicom_dictionary_std::tags;
use dicom_encoding::adapters::{EncodeOptions, PixelDataObject, RawPixelData};
use dicom_encoding::{Codec, TransferSyntaxIndex};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::TranscodeError;

const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

/// The image pixel attributes a codec reads (PS3.3 C.7.6.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PixelHeader {
    pub rows: u16,
    pub columns: u16,
    pub samples_per_pixel: u16,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub photometric_interpretation: String,
    pub frames: u32,
}

impl PixelHeader {
    /// Reads the attributes from a data set (the object's header, pixel data not needed).
    pub fn from_dataset(obj: &InMemDicomObject) -> Result<PixelHeader, TranscodeError> {
        let int = |tag, name: &str| -> Result<u16, TranscodeError> {
            obj.get(tag)
                .and_then(|e| e.to_int::<u16>().ok())
                .ok_or_else(|| TranscodeError::Failed(format!("{name} missing or invalid")))
        };
        let bits_allocated = int(tags::BITS_ALLOCATED, "Bits Allocated")?;
        let frames = obj
            .get(tags::NUMBER_OF_FRAMES)
            .and_then(|e| e.to_int::<i64>().ok())
            .map_or(1, |n| n.clamp(1, u32::MAX as i64) as u32);
        Ok(PixelHeader {
            rows: int(tags::ROWS, "Rows")?,
            columns: int(tags::COLUMNS, "Columns")?,
            samples_per_pixel: int(tags::SAMPLES_PER_PIXEL, "Samples per Pixel")?,
            bits_allocated,
            bits_stored: int(tags::BITS_STORED, "Bits Stored").unwrap_or(bits_allocated),
            photometric_interpretation: obj
                .get(tags::PHOTOMETRIC_INTERPRETATION)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
                .unwrap_or_default(),
            frames,
        })
    }

    /// The size of one native frame, in bytes.
    pub fn frame_length(&self) -> usize {
        usize::from(self.rows)
            * usize::from(self.columns)
            * usize::from(self.samples_per_pixel)
            * usize::from(self.bits_allocated).div_ceil(8)
    }
}

/// One frame, encapsulated (its fragments, in order) or native (one slice).
struct OneFrame<'a> {
    ts: &'a str,
    header: &'a PixelHeader,
    fragments: &'a [&'a [u8]],
    encapsulated: bool,
}

impl PixelDataObject for OneFrame<'_> {
    fn transfer_syntax_uid(&self) -> &str {
        self.ts
    }
    fn rows(&self) -> Option<u16> {
        Some(self.header.rows)
    }
    fn cols(&self) -> Option<u16> {
        Some(self.header.columns)
    }
    fn samples_per_pixel(&self) -> Option<u16> {
        Some(self.header.samples_per_pixel)
    }
    fn bits_allocated(&self) -> Option<u16> {
        Some(self.header.bits_allocated)
    }
    fn bits_stored(&self) -> Option<u16> {
        Some(self.header.bits_stored)
    }
    fn photometric_interpretation(&self) -> Option<&str> {
        Some(&self.header.photometric_interpretation)
    }
    fn number_of_frames(&self) -> Option<u32> {
        Some(1)
    }
    fn number_of_fragments(&self) -> Option<u32> {
        self.encapsulated.then_some(self.fragments.len() as u32)
    }
    fn fragment(&self, fragment: usize) -> Option<Cow<'_, [u8]>> {
        self.fragments.get(fragment).map(|f| Cow::Borrowed(*f))
    }
    fn offset_table(&self) -> Option<Cow<'_, [u32]>> {
        None
    }
    fn raw_pixel_data(&self) -> Option<RawPixelData> {
        Some(RawPixelData {
            fragments: self.fragments.iter().map(|f| f.to_vec()).collect::<C<_>>(),
            offset_table: C::new(),
        })
    }
    fn frame_pixel_data(&self, frame: u32) -> Option<Cow<'_, [u8]>> {
        match (frame, self.fragments) {
            (0, [single]) => Some(Cow::Borrowed(*single)),
            (0, several) => Some(Cow::Owned(several.concat())),
            _ => None,
        }
    }
}

/// Decodes one encapsulated frame of transfer syntax `ts` into native little endian samples
/// (colour interleaved, sample by sample).
pub fn decode(
    ts: &str,
    header: &PixelHeader,
    fragments: &[&[u8]],
) -> Result<Vec<u8>, TranscodeError> {
    if ts == RLE_LOSSLESS {
        let pixels = usize::from(header.rows) * usize::from(header.columns);
        let sample_bytes = usize::from(header.bits_allocated).div_ceil(8);
        let samples = usize::from(header.samples_per_pixel);
        return super::rle::decode(&fragments.concat(), pixels, samples, sample_bytes)
            .map_err(|e| TranscodeError::Failed(e.to_string()));
    }
    if !matches!(header.bits_allocated, 8 | 16) {
        return Err(TranscodeError::Refused(format!(
            "the decoders take 8 or 16 bits allocated, not {}",
            header.bits_allocated
        )));
    }
    let syntax = TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| TranscodeError::Refused(format!("unknown transfer syntax {ts}")))?;
    let Codec::EncapsulatedPixelData(Some(decoder), _) = syntax.codec() else {
        return Err(TranscodeError::Refused(format!(
            "no decoder for {} ({ts})",
            syntax.name()
        )));
    };
    let hinted = rgb_jpeg_hint(ts, header, fragments);
    let hinted_parts;
    let fragments = match &hinted {
        Some(stream) => {
            hinted_parts = [&stream[..]];
            &hinted_parts[..]
        }
        None => fragments,
    };
    let frame = OneFrame {
        ts,
        header,
        fragments,
        encapsulated: true,
    };
    let mut out = Vec::with_capacity(header.frame_length());
    decoder
        .decode_frame(&frame, 0, &mut out)
        .map_err(|e| TranscodeError::Refused(format!("cannot decode {}: {e}", syntax.name())))?;
    if out.len() != header.frame_length() {
        return Err(TranscodeError::Failed(format!(
            "{} frame decoded to {} bytes, {} expected from its attributes",
            syntax.name(),
            out.len(),
            header.frame_length()
        )));
    }
    Ok(out)
}

/// A lossy JPEG frame whose data set says its three components are RGB but whose stream has no
/// APP14 (Adobe) or APP0 (JFIF) marker saying so: the decoder would take them for YCbCr and convert
/// them. The data set is right (PS3.5 8.2.1), so the stream gets an Adobe marker with colour
/// transform 0 ("none") after its SOI.
fn rgb_jpeg_hint(ts: &str, header: &PixelHeader, fragments: &[&[u8]]) -> Option<Vec<u8>> {
    let lossy_jpeg = matches!(ts, "1.2.840.10008.1.2.4.50" | "1.2.840.10008.1.2.4.51");
    if !lossy_jpeg || header.samples_per_pixel != 3 || header.photometric_interpretation != "RGB" {
        return None;
    }
    let stream = fragments.concat();
    if !stream.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    // Walk the marker segments up to the first frame or scan header.
    let mut pos = 2;
    while let [0xFF, marker, hi, lo, ..] = stream.get(pos..)? {
        match marker {
            0xE0 | 0xEE => return None,
            0xC0..=0xCF | 0xDA => break,
            _ => pos += 2 + usize::from(u16::from_be_bytes([*hi, *lo])),
        }
    }
    let adobe: [u8; 16] = [
        0xFF, 0xEE, 0x00, 0x0E, b'A', b'd', b'o', b'b', b'e', 0x00, 0x64, 0x00, 0x00, 0x00, 0x00,
        0x00,
    ];
    let mut out = Vec::with_capacity(stream.len() + adobe.len());
    out.extend_from_slice(&stream[..2]);
    out.extend_from_slice(&adobe);
    out.extend_from_slice(&stream[2..]);
    Some(out)
}

/// Encodes one native little endian frame (colour by pixel, or by plane when `planar`) into
/// transfer syntax `ts`, losslessly.
pub fn encode(
    ts: &str,
    header: &PixelHeader,
    native: &[u8],
    planar: bool,
) -> Result<Vec<u8>, TranscodeError> {
    let syntax = TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| TranscodeError::Refused(format!("unknown transfer syntax {ts}")))?;
    if !matches!(header.bits_allocated, 8 | 16) {
        return Err(TranscodeError::Refused(format!(
            "{} takes 8 or 16 bits allocated, not {}",
            syntax.name(),
            header.bits_allocated
        )));
    }
    if header.photometric_interpretation == "YBR_FULL_422" {
        // Native 4:2:2 samples are subsampled; the encoders expect one sample per pixel.
        return Err(TranscodeError::Refused(
            "native YBR_FULL_422 pixel data cannot be re-encoded".into(),
        ));
    }
    let Codec::EncapsulatedPixelData(_, Some(encoder)) = syntax.codec() else {
        return Err(TranscodeError::Refused(format!(
            "no encoder for {} ({ts})",
            syntax.name()
        )));
    };
    // The codec codes Bits Stored bits only; signed samples are sign-extended above them (and
    // the bits above are not part of the value anyway, PS3.5 8.1.1), so they are cleared first.
    let masked;
    let native = if header.bits_allocated == 16 && header.bits_stored < 16 {
        let mask = (1u16 << header.bits_stored) - 1;
        masked = native
            .chunks_exact(2)
            .flat_map(|s| (u16::from_le_bytes([s[0], s[1]]) & mask).to_le_bytes())
            .collect::<Vec<u8>>();
        &masked[..]
    } else {
        native
    };
    // The registry's JPEG-LS writer hands the frame to CharLS in its default interleave mode
    // (none), in which CharLS reads colour one plane after the other.
    let by_plane;
    let native = if header.samples_per_pixel > 1 && !planar {
        by_plane = to_planes(native, header);
        &by_plane[..]
    } else {
        native
    };
    let fragments = [native];
    let frame = OneFrame {
        ts: super::EXPLICIT_VR_LE,
        header,
        fragments: &fragments,
        encapsulated: false,
    };
    let mut options = EncodeOptions::new();
    options.quality = Some(100);
    let mut out = Vec::new();
    encoder
        .encode_frame(&frame, 0, options, &mut out)
        .map_err(|e| TranscodeError::Failed(format!("cannot encode {}: {e}", syntax.name())))?;
    Ok(out)
}

/// Reorders colour-by-pixel samples into one plane per colour component.
fn to_planes(native: &[u8], header: &PixelHeader) -> Vec<u8> {
    let sample = usize::from(header.bits_allocated).div_ceil(8);
    let components = usize::from(header.samples_per_pixel);
    let pixel = sample * components;
    let mut out = Vec::with_capacity(native.len());
    for c in 0..components {
        for px in native.chunks_exact(pixel) {
            out.extend_from_slice(&px[c * sample..(c + 1) * sample]);
        }
    }
    out
}
