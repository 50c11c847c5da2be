//! What the transcoder can read and write, per transfer syntax, and which syntaxes lose
//! information.

use dicom_core::value::Value;
use dicom_dictionary_std::tags;
use dicom_encoding::{Codec, TransferSyntaxIndex};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::{TranscodeError, EXPLICIT_VR_LE, IMPLICIT_VR_LE, JPEG_LS_LOSSLESS};

pub const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
pub const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";

/// Native (uncompressed) encodings.
pub fn is_native(ts: &str) -> bool {
    matches!(
        ts,
        EXPLICIT_VR_LE | IMPLICIT_VR_LE | EXPLICIT_VR_BE | DEFLATED_EXPLICIT_VR_LE
    )
}

/// The syntaxes the transcoder writes: the native ones, and the lossless compressed ones a codec
/// is built in for (JPEG-LS lossless through CharLS; dicom-rs 0.10 has no JPEG 2000, HTJ2K or RLE
/// encoder).
pub fn can_encode(ts: &str) -> bool {
    matches!(ts, EXPLICIT_VR_LE | IMPLICIT_VR_LE | JPEG_LS_LOSSLESS)
}

/// Compressed syntaxes that only ever hold lossless data.
pub fn is_lossless_only(ts: &str) -> bool {
    ts == JPEG_LS_LOSSLESS
}

/// Syntaxes whose data is always lossy (JPEG baseline and extended, JPEG-LS near-lossless).
pub fn is_lossy(ts: &str) -> bool {
    matches!(
        ts,
        "1.2.840.10008.1.2.4.50" | "1.2.840.10008.1.2.4.51" | "1.2.840.10008.1.2.4.81"
    )
}

/// Syntaxes that may hold lossy or lossless data (JPEG 2000, JPEG 2000 Part 2, HTJ2K): only the
/// Lossy Image Compression attribute tells.
fn may_be_lossy(ts: &str) -> bool {
    matches!(
        ts,
        "1.2.840.10008.1.2.4.91" | "1.2.840.10008.1.2.4.93" | "1.2.840.10008.1.2.4.203"
    )
}

/// Was the image lossy compressed, now or before it was stored? Lossy Image Compression "01", or a
/// syntax that is lossy (or may be, without the attribute saying "00").
pub fn was_lossy(ts: &str, header: &InMemDicomObject) -> bool {
    let flag = header
        .get(tags::LOSSY_IMAGE_COMPRESSION)
        .and_then(|e| match e.value() {
            Value::Primitive(_) => e.to_str().ok(),
            _ => None,
        })
        .map(|v| v.trim_end_matches(['\0', ' ']).to_string());
    match flag.as_deref() {
        Some("01") => true,
        Some("00") => is_lossy(ts),
        _ => is_lossy(ts) || may_be_lossy(ts),
    }
}

/// Can the pixel data of `ts` be decoded?
pub fn can_decode(ts: &str) -> bool {
    is_native(ts)
        || TransferSyntaxRegistry
            .get(ts)
            .is_some_and(|s| matches!(s.codec(), Codec::EncapsulatedPixelData(Some(_), _)))
}

/// The JPEG and JPEG 2000 decoders undo the colour transform, so their colour output is RGB; the
/// others hand out the samples as coded.
pub fn decoder_outputs_rgb(ts: &str) -> bool {
    ts.starts_with("1.2.840.10008.1.2.4.5")
        || ts == "1.2.840.10008.1.2.4.70"
        || ts.starts_with("1.2.840.10008.1.2.4.9")
        || ts.starts_with("1.2.840.10008.1.2.4.20")
}

/// Checks, from the transfer syntaxes alone, that an object stored in `stored` can be sent in
/// `target`. (The Lossy Image Compression attribute is checked again once the object is read.)
pub fn check(stored: &str, target: &str) -> Result<(), TranscodeError> {
    if stored == target {
        return Ok(());
    }
    if !can_encode(target) {
        return Err(TranscodeError::Refused(format!(
            "the gateway cannot encode {}",
            describe(target)
        )));
    }
    if !can_decode(stored) {
        return Err(TranscodeError::Refused(format!(
            "the gateway cannot decode the stored {}",
            describe(stored)
        )));
    }
    if is_lossless_only(target) && (is_lossy(stored) || may_be_lossy(stored)) {
        return Err(TranscodeError::Refused(format!(
            "the instance is stored in the lossy {}; a lossless {} cannot be made from it",
            describe(stored),
            describe(target)
        )));
    }
    Ok(())
}

fn describe(ts: &str) -> String {
    match TransferSyntaxRegistry.get(ts) {
        Some(s) => format!("{} ({ts})", s.name()),
        None => format!("transfer syntax {ts}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
    const J2K_LOSSLESS: &str = "1.2.840.10008.1.2.4.90";
    const J2K: &str = "1.2.840.10008.1.2.4.91";
    const RLE: &str = "1.2.840.10008.1.2.5";

    #[test]
    fn every_decodable_syntax_decompresses() {
        for ts in [
            JPEG_BASELINE,
            "1.2.840.10008.1.2.4.51",
            "1.2.840.10008.1.2.4.57",
            "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.81",
            J2K_LOSSLESS,
            J2K,
            "1.2.840.10008.1.2.4.201",
            "1.2.840.10008.1.2.4.203",
            RLE,
            DEFLATED_EXPLICIT_VR_LE,
        ] {
            assert!(check(ts, EXPLICIT_VR_LE).is_ok(), "{ts}");
        }
        // Video cannot be cut into images.
        assert!(check("1.2.840.10008.1.2.4.100", EXPLICIT_VR_LE).is_err());
    }

    #[test]
    fn lossless_output_only_from_lossless_input() {
        assert!(check(J2K_LOSSLESS, JPEG_LS_LOSSLESS).is_ok());
        assert!(check(RLE, JPEG_LS_LOSSLESS).is_ok());
        assert!(check(EXPLICIT_VR_LE, JPEG_LS_LOSSLESS).is_ok());
        assert!(check(JPEG_BASELINE, JPEG_LS_LOSSLESS).is_err());
        assert!(check(J2K, JPEG_LS_LOSSLESS).is_err());
        // No JPEG 2000 encoder.
        assert!(check(EXPLICIT_VR_LE, J2K_LOSSLESS).is_err());
    }
}
