//! Identifiers (the small data sets of C-FIND / C-MOVE / C-GET) to and from the transfer syntax of
//! their presentation context.

use dicom_core::value::Value;
use dicom_core::VR;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// Largest identifier accepted; real ones are a few hundred bytes.
pub const MAX_IDENTIFIER_LENGTH: usize = 1 << 20;

/// Decodes an identifier, once the walk that clears objects for dicom-rs accepted it (lengths within
/// the identifier; no UN of undefined length holding items, which dicom-rs misreads into allocations
/// of gigabytes).
pub fn decode(bytes: &[u8], ts_uid: &str) -> Result<InMemDicomObject, String> {
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| format!("unknown transfer syntax {ts_uid}"))?;
    crate::dicom::check_before_parse(&mut std::io::Cursor::new(bytes), 0, ts_uid)
        .map_err(|e| e.to_string())?;
    InMemDicomObject::read_dataset_with_ts(bytes, ts).map_err(|e| e.to_string())
}

pub fn encode(obj: &InMemDicomObject, ts_uid: &str) -> Result<Vec<u8>, String> {
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| format!("unknown transfer syntax {ts_uid}"))?;
    let mut out = Vec::with_capacity(512);
    obj.write_dataset_with_ts(&mut out, ts)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Whether any text value (at any depth) needs more than ASCII, i.e. a Specific Character Set.
pub fn has_non_ascii_text(obj: &InMemDicomObject) -> bool {
    obj.iter().any(|e| match e.value() {
        Value::Sequence(seq) => seq.items().iter().any(has_non_ascii_text),
        // The VRs whose repertoire a Specific Character Set extends.
        Value::Primitive(p)
            if matches!(
                e.vr(),
                VR::LO | VR::LT | VR::PN | VR::SH | VR::ST | VR::UC | VR::UT
            ) =>
        {
            !p.to_str().is_ascii()
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::header::HasLength;
    use dicom_core::{DataElement, PrimitiveValue};
    use dicom_dictionary_std::tags;

    #[test]
    fn an_identifier_dicom_rs_would_misread_is_refused_before_decoding() {
        // (4453,100C) UN of undefined length holding Implicit VR items (CP-246), as in the test
        // sample, where it starts right after the meta group: dicom-rs alone allocated 3.7 GB for it.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/pydicom/UN_sequence.dcm"
        );
        let identifier = &std::fs::read(path).unwrap()[0x166..];
        let err = decode(identifier, "1.2.840.10008.1.2.1").unwrap_err();
        assert!(err.contains("CP-246"), "{err}");
        // A length beyond the identifier's end is refused too.
        let err = decode(
            &[0x10, 0, 0x10, 0, b'P', b'N', 0x40, 0],
            "1.2.840.10008.1.2.1",
        );
        assert!(err.is_err());
    }

    #[test]
    fn identifiers_round_trip_in_each_native_transfer_syntax() {
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
            DataElement::new(tags::PATIENT_NAME, VR::PN, "DOE^J*"),
            DataElement::new(tags::STUDY_INSTANCE_UID, VR::UI, PrimitiveValue::Empty),
        ]);
        for ts in [
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2.2",
        ] {
            let bytes = encode(&obj, ts).unwrap();
            let back = decode(&bytes, ts).unwrap();
            assert_eq!(
                back.element(tags::PATIENT_NAME).unwrap().to_str().unwrap(),
                "DOE^J*"
            );
            assert!(back.element(tags::STUDY_INSTANCE_UID).unwrap().is_empty());
        }
    }
}
