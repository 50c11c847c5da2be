//! Whole instances: a stored Part-10 object re-encoded into another transfer syntax, the data set's
//! attributes updated to match, and the result handed out piece by piece (the header, then one
//! frame at a time), so that only the stored object and one decoded frame are in memory.

use std::io::Cursor;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::frame::{self, PixelHeader};
use super::{syntax, TranscodeError, IMPLICIT_VR_LE};
use crate::dicom::{locate_frames, read_meta_extent, Layout};
use crate::model::transcode as native;

/// What is produced: a Part-10 file (WADO-RS, WADO-URI) or a bare data set (C-STORE sub-operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Part10,
    Dataset,
}

/// Re-encodes `object` (a stored Part-10 object whose frames are where `layout` says) in transfer
/// syntax `target`, handing the output to `sink` in pieces; `sink` returns false when the receiver
/// is gone, which stops the work.
pub fn transcode(
    object: &[u8],
    layout: &Layout,
    target: &str,
    form: Form,
    sink: &mut dyn FnMut(Vec<u8>) -> bool,
) -> Result<(), TranscodeError> {
    let (dataset_start, stored) = read_meta_extent(&mut Cursor::new(object))
        .map_err(|e| TranscodeError::Failed(format!("unreadable stored object: {e}")))?;
    let gone = || TranscodeError::Failed("receiver gone".into());
    syntax::check(&stored, target)?;
    if stored == target {
        let piece = match form {
            Form::Part10 => object.to_vec(),
            Form::Dataset => object[dataset_start as usize..].to_vec(),
        };
        return if sink(piece) { Ok(()) } else { Err(gone()) };
    }
    let io = |e: std::io::Error| TranscodeError::Failed(e.to_string());
    if syntax::is_native(&stored) && syntax::is_native(target) {
        let out = match form {
            Form::Part10 => native::to_part10(object, target).map_err(io)?,
            Form::Dataset => native::to_dataset(object, target).map_err(io)?,
        };
        return if sink(out) { Ok(()) } else { Err(gone()) };
    }

    // Frames are cut out of a little endian copy with a layout: the stored object itself when its
    // layout was recorded, else (deflated, big endian) a re-encoded copy.
    let converted;
    let (object, object_ts, layout) = match layout {
        Layout::Native { .. } if stored != syntax::EXPLICIT_VR_BE => {
            (object, stored.as_str(), layout.clone())
        }
        Layout::Encapsulated { .. } => (object, stored.as_str(), layout.clone()),
        Layout::NoPixelData => {
            return Err(TranscodeError::Refused(
                "the instance has no pixel data to transcode".into(),
            ))
        }
        _ if syntax::is_native(&stored) => {
            converted = native::to_explicit_le(object).map_err(io)?;
            let layout = native_layout(&converted).map_err(io)?;
            (&converted[..], super::EXPLICIT_VR_LE, layout)
        }
        _ => {
            return Err(TranscodeError::Refused(
                "the fragments of this instance cannot be assigned to frames".into(),
            ))
        }
    };

    let mut header = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .read_until(tags::PIXEL_DATA)
        .from_reader(object)
        .map_err(|e| TranscodeError::Failed(format!("unreadable stored object: {e}")))?;
    let pixels = PixelHeader::from_dataset(&header)?;
    if syntax::is_lossless_only(target) && syntax::was_lossy(&stored, &header) {
        return Err(TranscodeError::Refused(format!(
            "the instance was lossy compressed; it cannot be sent in the lossless {target}"
        )));
    }
    // Native colour frames stored plane by plane stay so; decoded ones are colour by pixel.
    let planar = syntax::is_native(&stored)
        && header
            .get(tags::PLANAR_CONFIGURATION)
            .and_then(|e| e.to_int::<u16>().ok())
            == Some(1);
    let decoded_pixels = update_attributes(&mut header, &stored, target, &pixels);

    let ts = TransferSyntaxRegistry
        .get(target)
        .ok_or_else(|| TranscodeError::Refused(format!("unknown transfer syntax {target}")))?;
    let mut head = Vec::with_capacity(dataset_start as usize + 16 * 1024);
    match form {
        Form::Part10 => header.write_all(&mut head),
        Form::Dataset => header.write_dataset_with_ts(&mut head, ts),
    }
    .map_err(|e| TranscodeError::Failed(format!("cannot write the data set: {e}")))?;

    let frame_count = match &layout {
        Layout::Native { frames, .. } => *frames as usize,
        Layout::Encapsulated { frames } => frames.len(),
        _ => 0,
    };
    let frame_bytes = |index: usize| -> Vec<&[u8]> {
        match &layout {
            Layout::Native {
                value,
                frame_length,
                ..
            } => {
                let start = (value.offset + index as u64 * frame_length) as usize;
                vec![&object[start..start + *frame_length as usize]]
            }
            Layout::Encapsulated { frames } => frames[index]
                .iter()
                .map(|e| &object[e.offset as usize..e.end() as usize])
                .collect(),
            _ => Vec::new(),
        }
    };
    let native_frame = |index: usize| -> Result<Vec<u8>, TranscodeError> {
        let parts = frame_bytes(index);
        if syntax::is_native(&stored) {
            Ok(parts.concat())
        } else {
            frame::decode(&stored, &pixels, &parts)
        }
    };

    let encapsulated = !syntax::is_native(target);
    // One frame as output: native samples, or an item holding the encoded frame (PS3.5 A.4).
    let output = |index: usize| -> Result<Vec<u8>, TranscodeError> {
        let native = native_frame(index)?;
        if !encapsulated {
            return Ok(native);
        }
        let encoded = frame::encode(target, &decoded_pixels, &native, planar)?;
        let padded = encoded.len() + (encoded.len() & 1);
        let length = u32::try_from(padded)
            .map_err(|_| TranscodeError::Failed("encoded frame over 4 GB".into()))?;
        let mut item = Vec::with_capacity(padded + 8);
        item.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        item.extend_from_slice(&length.to_le_bytes());
        item.extend_from_slice(&encoded);
        item.resize(padded + 8, 0);
        Ok(item)
    };
    // The first frame is made before anything is handed out, so that a frame the codecs cannot
    // handle is a refusal, not a truncated answer (a later frame can still fail mid-stream).
    let mut first = match frame_count {
        0 => None,
        _ => Some(output(0)?),
    };

    if encapsulated {
        // An empty Basic Offset Table: each frame is one fragment.
        head.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        head.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]);
    } else {
        let total = pixels.frame_length() as u64 * frame_count as u64;
        let length = u32::try_from(total + (total & 1)).map_err(|_| {
            TranscodeError::Refused("the decompressed pixel data would exceed 4 GB".into())
        })?;
        head.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00]);
        if target != IMPLICIT_VR_LE {
            head.extend_from_slice(if pixels.bits_allocated > 8 {
                b"OW"
            } else {
                b"OB"
            });
            head.extend_from_slice(&[0, 0]);
        }
        head.extend_from_slice(&length.to_le_bytes());
    }
    if !sink(head) {
        return Err(gone());
    }
    let mut odd = false;
    for index in 0..frame_count {
        let piece = match first.take() {
            Some(piece) => piece,
            None => output(index)?,
        };
        odd ^= piece.len() & 1 == 1;
        if !sink(piece) {
            return Err(gone());
        }
    }
    let mut tail = match (encapsulated, odd) {
        (true, _) => vec![0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0],
        // Native pixel data of odd length gets one padding byte (PS3.5 7.1).
        (false, true) => vec![0],
        (false, false) => Vec::new(),
    };
    // Elements after Pixel Data (Data Set Trailing Padding, signatures) are carried over.
    if let Some(after) = trailing_elements(object, &layout) {
        let source = TransferSyntaxRegistry.get(object_ts).ok_or_else(|| {
            TranscodeError::Failed(format!("unknown transfer syntax {object_ts}"))
        })?;
        let elements = InMemDicomObject::read_dataset_with_ts(after, source)
            .map_err(|e| TranscodeError::Failed(format!("unreadable trailing elements: {e}")))?;
        elements
            .write_dataset_with_ts(&mut tail, ts)
            .map_err(|e| TranscodeError::Failed(format!("cannot write trailing elements: {e}")))?;
    }
    if !tail.is_empty() && !sink(tail) {
        return Err(gone());
    }
    Ok(())
}

/// The bytes after the Pixel Data element, if any: after the native value, or after the item that
/// closes the fragments.
fn trailing_elements<'a>(object: &'a [u8], layout: &Layout) -> Option<&'a [u8]> {
    let end = match layout {
        Layout::Native { value, .. } => value.end() as usize,
        Layout::Encapsulated { frames } => {
            let mut pos = frames.last()?.last()?.end() as usize;
            // Items (fragments after the last frame's, if any) up to the Sequence Delimitation Item.
            loop {
                let head = object.get(pos..pos + 8)?;
                let length = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
                match head[..4] {
                    [0xFE, 0xFF, 0xDD, 0xE0] => break pos + 8,
                    [0xFE, 0xFF, 0x00, 0xE0] => pos += 8 + length,
                    _ => return None,
                }
            }
        }
        Layout::NoPixelData | Layout::Unavailable => return None,
    };
    object.get(end..).filter(|rest| !rest.is_empty())
}

/// The frame layout of a native Explicit VR Little Endian Part-10 object.
fn native_layout(object: &[u8]) -> std::io::Result<Layout> {
    let mut cursor = Cursor::new(object);
    let (start, ts) = read_meta_extent(&mut cursor)?;
    let header = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .read_until(tags::PIXEL_DATA)
        .from_reader(object)
        .map_err(std::io::Error::other)?;
    let geometry = crate::ingest::extract::geometry(&header);
    locate_frames(&mut cursor, start, &ts, &geometry)
}

/// Sets the attributes that describe the pixel data to what the output holds (PS3.5 8.2, PS3.3
/// C.7.6.3) and returns the pixel attributes of the decoded frames. The SOP Instance UID stays: the
/// pixel values are not changed by this transcoding (PS3.4 and PS3.5 Annex A), and a lossy source
/// keeps saying that it was lossy compressed.
fn update_attributes(
    header: &mut DefaultDicomObject,
    stored: &str,
    target: &str,
    pixels: &PixelHeader,
) -> PixelHeader {
    let mut decoded = pixels.clone();
    if !syntax::is_native(stored) {
        if pixels.samples_per_pixel > 1 {
            // The decoders hand out colour-by-pixel samples, and the JPEG and JPEG 2000 decoders
            // also undo the colour transform (YBR_FULL_422, YBR_ICT, YBR_RCT -> RGB).
            if syntax::decoder_outputs_rgb(stored) {
                decoded.photometric_interpretation = "RGB".into();
            }
            header.put(DataElement::new(
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                PrimitiveValue::from(decoded.photometric_interpretation.as_str()),
            ));
            header.put(DataElement::new(
                tags::PLANAR_CONFIGURATION,
                VR::US,
                PrimitiveValue::from(0u16),
            ));
        }
        if syntax::is_lossy(stored) && header.get(tags::LOSSY_IMAGE_COMPRESSION).is_none() {
            header.put(DataElement::new(
                tags::LOSSY_IMAGE_COMPRESSION,
                VR::CS,
                PrimitiveValue::from("01"),
            ));
        }
    } else if pixels.samples_per_pixel > 1 && !syntax::is_native(target) {
        // JPEG-LS says how its components are ordered itself; the attribute is then 0 (PS3.5 8.2.3).
        header.put(DataElement::new(
            tags::PLANAR_CONFIGURATION,
            VR::US,
            PrimitiveValue::from(0u16),
        ));
    }
    // Only meaningful for the encapsulated form the object was stored in.
    header.remove_element(tags::ENCAPSULATED_PIXEL_DATA_VALUE_TOTAL_LENGTH);
    header.remove_element(tags::EXTENDED_OFFSET_TABLE);
    header.remove_element(tags::EXTENDED_OFFSET_TABLE_LENGTHS);
    header.update_meta(|meta| meta.transfer_syntax = target.to_string());
    decoded
}
