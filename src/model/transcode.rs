//! Re-encoding of native objects (pixel data not encapsulated) into another native transfer syntax:
//! Explicit VR Little Endian for WADO-RS, and whatever native syntax a C-MOVE / C-GET destination
//! accepted. One instance at a time is held in memory (the documented exception to streaming).

use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";

/// Reads a native Part-10 object, with big endian pixel data already put in little endian order.
fn read_native(part10: &[u8]) -> std::io::Result<DefaultDicomObject> {
    let mut obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(part10)
        .map_err(std::io::Error::other)?;
    if obj.meta().transfer_syntax().trim_end_matches('\0') == EXPLICIT_VR_BE {
        fix_wide_big_endian_pixels(&mut obj);
    }
    Ok(obj)
}

/// Re-encodes a native Part-10 object as a Part-10 object in Explicit VR Little Endian.
pub fn to_explicit_le(part10: &[u8]) -> std::io::Result<Vec<u8>> {
    to_part10(part10, EXPLICIT_VR_LE)
}

/// Re-encodes a native Part-10 object as a Part-10 object in the little endian transfer syntax
/// `ts_uid`.
pub fn to_part10(part10: &[u8], ts_uid: &str) -> std::io::Result<Vec<u8>> {
    let mut obj = read_native(part10)?;
    obj.update_meta(|meta| meta.transfer_syntax = ts_uid.to_string());
    let mut out = Vec::with_capacity(part10.len() + 64);
    obj.write_all(&mut out).map_err(std::io::Error::other)?;
    Ok(out)
}

/// Re-encodes a native Part-10 object as a bare data set (no file meta) in the little endian
/// transfer syntax `ts_uid`, as a C-STORE sub-operation sends it.
pub fn to_dataset(part10: &[u8], ts_uid: &str) -> std::io::Result<Vec<u8>> {
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| std::io::Error::other(format!("unknown transfer syntax {ts_uid}")))?;
    let obj = read_native(part10)?;
    let mut out = Vec::with_capacity(part10.len());
    obj.write_dataset_with_ts(&mut out, ts)
        .map_err(std::io::Error::other)?;
    Ok(out)
}

/// Big endian OW pixel data is read as 16-bit words, which is right for up to 16 bits allocated; for
/// 32 and 64 bits each sample's words must also be put in little endian order.
fn fix_wide_big_endian_pixels(obj: &mut dicom_object::DefaultDicomObject) {
    use dicom_core::value::{PrimitiveValue, C};
    use dicom_core::DataElement;
    use dicom_dictionary_std::tags;
    let bits = obj
        .get(tags::BITS_ALLOCATED)
        .and_then(|e| e.to_int::<u16>().ok())
        .unwrap_or(0);
    if bits != 32 && bits != 64 {
        return;
    }
    let Some(pixels) = obj.get(tags::PIXEL_DATA) else {
        return;
    };
    let vr = pixels.vr();
    let Ok(bytes) = pixels.to_bytes() else {
        return;
    };
    let sample = usize::from(bits / 8);
    let mut fixed = Vec::with_capacity(bytes.len());
    for chunk in bytes.chunks(sample) {
        if chunk.len() == sample {
            for word in chunk.chunks_exact(2).rev() {
                fixed.extend_from_slice(word);
            }
        } else {
            fixed.extend_from_slice(chunk);
        }
    }
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        vr,
        PrimitiveValue::U8(C::from_vec(fixed)),
    ));
}
