//! The walker's tests: frame layouts of real samples compared with what dicom-rs reads, synthetic
//! objects for each layout rule, and hostile input (truncations, lying lengths, deep nesting).

use std::io::{self, Read, Seek, SeekFrom};

use super::frames::*;
use super::header::{short_length_vr, ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER, UNDEFINED};
use super::walk::{FLOAT_PIXEL_DATA, PIXEL_DATA};
use super::*;
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::{open_file, DefaultDicomObject, InMemDicomObject};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use std::io::Cursor as IoCursor;
use std::path::PathBuf;

const EXTENDED_OFFSET_TABLE: (u16, u16) = (0x7FE0, 0x0001);
const EXTENDED_OFFSET_TABLE_LENGTHS: (u16, u16) = (0x7FE0, 0x0002);
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";
const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
const RLE: &str = "1.2.840.10008.1.2.5";

fn sample(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/pydicom")
        .join(name);
    assert!(path.exists(), "missing test sample {}", path.display());
    path
}

/// `ImageGeometry::from_object`, or a lenient reading for objects it rejects: missing
/// attributes as 0 (a geometry that matches nothing), unreadable Number of Frames as 1.
fn geometry_of(obj: &InMemDicomObject) -> ImageGeometry {
    if let Some(g) = ImageGeometry::from_object(obj) {
        return g;
    }
    let u16_of = |tag, default: u16| {
        obj.element_opt(tag)
            .unwrap()
            .and_then(|e| e.to_int::<u16>().ok())
            .unwrap_or(default)
    };
    ImageGeometry {
        rows: u16_of(tags::ROWS, 0),
        columns: u16_of(tags::COLUMNS, 0),
        samples_per_pixel: u16_of(tags::SAMPLES_PER_PIXEL, 1),
        bits_allocated: u16_of(tags::BITS_ALLOCATED, 0),
        number_of_frames: 1,
    }
}

#[test]
fn geometry_from_object() {
    let obj = open_file(sample("rtdose.dcm")).unwrap();
    let g = ImageGeometry::from_object(&obj).unwrap();
    assert_eq!(
        (
            g.rows,
            g.columns,
            g.samples_per_pixel,
            g.bits_allocated,
            g.number_of_frames
        ),
        (10, 10, 1, 32, 15)
    );
    let obj = open_file(sample("CT_small.dcm")).unwrap();
    assert_eq!(
        ImageGeometry::from_object(&obj).unwrap().number_of_frames,
        1
    );
    // Number of Frames "1A"
    let obj = open_file(sample("badVR.dcm")).unwrap();
    assert_eq!(ImageGeometry::from_object(&obj), None);
    // no image attributes
    let obj = open_file(sample("rtplan.dcm")).unwrap();
    assert_eq!(ImageGeometry::from_object(&obj), None);
}

fn cut(bytes: &[u8], e: &Extent) -> Vec<u8> {
    bytes[e.offset as usize..e.end() as usize].to_vec()
}

struct Checked {
    name: String,
    scan: PixelDataScan,
    geometry: ImageGeometry,
}

/// Locate frames in a sample file and compare every frame with what dicom-object reads.
fn check_sample(name: &str) -> Checked {
    let path = sample(name);
    let obj: DefaultDicomObject = open_file(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let mut file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());

    let (start, ts) = read_meta_extent(&mut file).unwrap();
    assert_eq!(
        ts,
        obj.meta().transfer_syntax().trim_end_matches(['\0', ' '])
    );
    // the dataset read from `start` on is the whole dataset
    let ts_entry = TransferSyntaxRegistry.get(&ts).unwrap();
    let whole = InMemDicomObject::read_dataset_with_ts(&bytes[start as usize..], ts_entry).unwrap();
    assert_eq!(
        whole.iter().count(),
        obj.iter().count(),
        "{name}: dataset start"
    );

    let geometry = geometry_of(&obj);
    let scan = scan_pixel_data(&mut file, start, &ts, &geometry).unwrap();
    assert_eq!(
        locate_frames(&mut file, start, &ts, &geometry).unwrap(),
        scan.layout
    );

    let pixel_tag = [
        tags::PIXEL_DATA,
        tags::FLOAT_PIXEL_DATA,
        tags::DOUBLE_FLOAT_PIXEL_DATA,
    ]
    .into_iter()
    .find(|t| obj.element_opt(*t).unwrap().is_some());
    match &scan.layout {
        Layout::NoPixelData => {
            assert!(pixel_tag.is_none());
            assert!(scan.pixel_data.is_none());
        }
        Layout::Native {
            value,
            frame_length,
            frames,
        } => {
            let element = obj.element(pixel_tag.unwrap()).unwrap();
            let pd = scan.pixel_data.unwrap();
            assert_eq!(pd.element.end(), value.end());
            assert_eq!(*frames, geometry.number_of_frames.max(1));
            let mut ours = cut(&bytes, value);
            if ts == EXPLICIT_BE && element.vr() == dicom_core::VR::OW {
                // dicom-object decodes OW into native 16-bit words
                for pair in ours.chunks_exact_mut(2) {
                    pair.swap(0, 1);
                }
            }
            let expected = element.to_bytes().unwrap();
            assert_eq!(ours.len(), expected.len());
            assert!(ours == expected.as_ref(), "{name}: pixel data differs");
            for i in 0..*frames as u64 {
                let a = (i * frame_length) as usize;
                let b = ((i + 1) * frame_length) as usize;
                // frame i of the (for OW big endian: word-swapped) value
                assert!(ours[a..b] == expected[a..b], "{name}: frame {i}");
            }
        }
        Layout::Encapsulated { frames } => {
            let element = obj.element(tags::PIXEL_DATA).unwrap();
            let fragments = element.fragments().expect("encapsulated in dicom-object");
            let ours: Vec<Vec<u8>> = frames.iter().flatten().map(|e| cut(&bytes, e)).collect();
            assert_eq!(ours.len(), fragments.len(), "{name}: fragment count");
            for (i, (a, b)) in ours.iter().zip(fragments).enumerate() {
                assert!(a == b, "{name}: fragment {i} differs");
            }
            assert!(frames.iter().all(|f| !f.is_empty()));
            // frames agree with a Basic Offset Table, when there is one
            let bot = element.offset_table().unwrap_or(&[]);
            if !bot.is_empty() {
                let mut acc = 0u64;
                let mut starts = Vec::new();
                for frame in frames {
                    starts.push(acc);
                    acc += frame.iter().map(|e| 8 + e.length).sum::<u64>();
                }
                let bot: Vec<u64> = bot.iter().map(|&o| u64::from(o)).collect();
                assert_eq!(starts, bot, "{name}: basic offset table");
            }
            let pd = scan.pixel_data.unwrap();
            assert_eq!(pd.tag, PIXEL_DATA);
            // the element ends with the 8-byte sequence delimitation item
            assert_eq!(
                pd.element.end(),
                frames.last().unwrap().last().unwrap().end() + 8
            );
        }
        Layout::Unavailable => {}
    }
    if let Some(pd) = scan.pixel_data {
        assert_eq!(scan.metadata_end, Some(pd.element.offset));
        // the bytes before the pixel data element form a dataset with everything else
        let head = &bytes[start as usize..pd.element.offset as usize];
        let meta_only = InMemDicomObject::read_dataset_with_ts(head, ts_entry).unwrap();
        let expected = obj
            .iter()
            .filter(|e| e.header().tag < dicom_core::Tag(0x7FE0, 0x0008))
            .count();
        assert_eq!(
            meta_only.iter().count(),
            expected,
            "{name}: metadata elements"
        );
    }
    Checked {
        name: name.to_string(),
        scan,
        geometry,
    }
}

fn native_frames(c: &Checked) -> u32 {
    match c.scan.layout {
        Layout::Native { frames, .. } => frames,
        ref other => panic!("{}: expected native layout, got {other:?}", c.name),
    }
}

fn encapsulated_frames(c: &Checked) -> &[Vec<Extent>] {
    match &c.scan.layout {
        Layout::Encapsulated { frames } => frames,
        other => panic!("{}: expected encapsulated layout, got {other:?}", c.name),
    }
}

#[test]
fn native_single_frame_samples() {
    for name in [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_padded.dcm",
        "ExplVR_BigEnd.dcm",
        "examples_rgb_color.dcm",
        "examples_palette.dcm",
        "examples_overlay.dcm",
        "liver_1frame.dcm",
        "liver_expb_1frame.dcm",
        "rtdose_1frame.dcm",
        "rtdose_expb_1frame.dcm",
        "SC_rgb_small_odd.dcm",
        "SC_rgb_small_odd_big_endian.dcm",
        "SC_ybr_full_422_uncompressed.dcm",
        "SC_rgb_jpeg_dcmd.dcm",
        "badVR.dcm",
    ] {
        let c = check_sample(name);
        assert_eq!(native_frames(&c), 1, "{name}");
    }
}

/// Implicit VR, nested private sequences of undefined length before a 2-byte pixel data
/// element, and no image attributes.
#[test]
fn nested_private_sequences() {
    let c = check_sample("nested_priv_SQ.dcm");
    assert_eq!(c.scan.layout, Layout::Unavailable);
    let path = sample("nested_priv_SQ.dcm");
    let mut file = std::fs::File::open(&path).unwrap();
    let (start, ts) = read_meta_extent(&mut file).unwrap();
    let g = ImageGeometry {
        rows: 1,
        columns: 1,
        samples_per_pixel: 1,
        bits_allocated: 16,
        number_of_frames: 1,
    };
    let Layout::Native { value, .. } = locate_frames(&mut file, start, &ts, &g).unwrap() else {
        panic!("expected native layout")
    };
    let bytes = std::fs::read(&path).unwrap();
    let obj = open_file(&path).unwrap();
    let expected = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
    assert_eq!(cut(&bytes, &value), expected.as_ref());
}

#[test]
fn native_multi_frame_samples() {
    for name in ["rtdose.dcm", "rtdose_expb.dcm"] {
        let c = check_sample(name);
        assert!(native_frames(&c) > 1, "{name}");
        assert_eq!(native_frames(&c), c.geometry.number_of_frames);
    }
}

#[test]
fn encapsulated_samples() {
    for name in [
        "JPEG2000.dcm",
        "JPEG2000-embedded-sequence-delimiter.dcm",
        "MR_small_jp2klossless.dcm",
        "JPEG-lossy.dcm",
        "JPGExtended.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEGLSNearLossless_08.dcm",
        "SC_rgb_rle.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_jpeg_gdcm.dcm",
        "SC_rgb_jpeg_app14_dcmd.dcm",
        "SC_rgb_jpeg_lossy_gdcm.dcm",
        "SC_rgb_small_odd_jpeg.dcm",
        "SC_rgb_dcmtk_+eb+cr.dcm",
        "SC_rgb_dcmtk_+eb+cy+n1.dcm",
        "SC_jpeg_no_color_transform.dcm",
        "rtdose_rle_1frame.dcm",
        "JPEGLSNearLossless_16.dcm",
        "SC_rgb_gdcm_KY.dcm",
        "SC_rgb_jls_lossy_line.dcm",
        "GDCMJ2K_TextGBR.dcm",
        "J2K_pixelrep_mismatch.dcm",
        "693_J2KI.dcm",
        "examples_jpeg2k.dcm",
    ] {
        let c = check_sample(name);
        assert_eq!(encapsulated_frames(&c).len(), 1, "{name}");
    }
}

#[test]
fn encapsulated_multi_frame_samples() {
    for name in [
        "SC_rgb_rle_2frame.dcm",
        "SC_rgb_rle_16bit_2frame.dcm",
        "SC_rgb_rle_32bit_2frame.dcm",
        "rtdose_rle.dcm",
        "examples_ybr_color.dcm",
    ] {
        let c = check_sample(name);
        let frames = encapsulated_frames(&c);
        assert!(frames.len() > 1, "{name}");
        assert_eq!(frames.len() as u32, c.geometry.number_of_frames, "{name}");
    }
}

#[test]
fn no_pixel_data_samples() {
    for name in [
        "rtplan.dcm",
        "test-SR.dcm",
        "reportsi.dcm",
        "reportsi_with_empty_number_tags.dcm",
        "waveform_ecg.dcm",
        "priv_SQ.dcm",
        "empty_charset_LEI.dcm",
    ] {
        let c = check_sample(name);
        assert_eq!(c.scan.layout, Layout::NoPixelData, "{name}");
    }
}

#[test]
fn deflated_is_unavailable() {
    let path = sample("image_dfl.dcm");
    let mut file = std::fs::File::open(&path).unwrap();
    let (start, ts) = read_meta_extent(&mut file).unwrap();
    assert_eq!(ts, "1.2.840.10008.1.2.1.99");
    let obj = open_file(&path).unwrap();
    assert_eq!(
        start,
        132 + 12 + u64::from(obj.meta().information_group_length)
    );
    let g = geometry_of(&obj);
    assert_eq!(
        locate_frames(&mut file, start, &ts, &g).unwrap(),
        Layout::Unavailable
    );
}

#[test]
fn meta_without_group_length() {
    // meta group lacking (0002,0000) (dicom-object refuses this file), implicit VR dataset
    let path = sample("no_meta_group_length.dcm");
    let bytes = std::fs::read(&path).unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let (start, ts) = read_meta_extent(&mut file).unwrap();
    assert_eq!(ts, "1.2.840.10008.1.2");
    assert_eq!(start, 338);
    // the dataset starts with (0008,0008) and parses on its own
    assert_eq!(
        &bytes[start as usize..start as usize + 4],
        &[0x08, 0x00, 0x08, 0x00]
    );
    let ts_entry = TransferSyntaxRegistry.get(&ts).unwrap();
    let obj = InMemDicomObject::read_dataset_with_ts(&bytes[start as usize..], ts_entry).unwrap();
    assert!(obj.element(tags::IMAGE_TYPE).is_ok());
    let scan = scan_pixel_data(&mut file, start, &ts, &GEOMETRY_3).unwrap();
    assert_eq!(scan.layout, Layout::NoPixelData);
    assert_eq!(scan.metadata_end, Some(bytes.len() as u64));
}

/// UN_sequence.dcm: an undefined-length UN whose content is Implicit VR Little Endian with
/// nested undefined-length sequences, in an explicit VR file (PS3.5 6.2.2). dicom-object
/// 0.10 reads UN content with the file's own encoding and fails on this file, so the check
/// is done by appending encapsulated pixel data after it.
#[test]
fn un_sequence_with_implicit_content() {
    let path = sample("UN_sequence.dcm");
    let mut bytes = std::fs::read(&path).unwrap();
    let (start, ts) = read_meta_extent(&mut IoCursor::new(&bytes)).unwrap();
    assert_eq!(ts, "1.2.840.10008.1.2.4.70");
    let one = ImageGeometry {
        number_of_frames: 1,
        ..GEOMETRY_3
    };
    let scan = scan_pixel_data(&mut IoCursor::new(&bytes), start, &ts, &one).unwrap();
    assert_eq!(scan.layout, Layout::NoPixelData);
    assert_eq!(scan.metadata_end, Some(bytes.len() as u64));

    let header_offset = bytes.len() as u64;
    undefined_header(&mut bytes, PIXEL_DATA, b"OB");
    raw_header(&mut bytes, ITEM, 0);
    raw_header(&mut bytes, ITEM, 6);
    let value = Extent {
        offset: bytes.len() as u64,
        length: 6,
    };
    bytes.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xD9, 0, 0]);
    raw_header(&mut bytes, SEQUENCE_DELIMITER, 0);
    let scan = scan_pixel_data(&mut IoCursor::new(&bytes), start, &ts, &one).unwrap();
    assert_eq!(scan.metadata_end, Some(header_offset));
    assert_eq!(
        scan.layout,
        Layout::Encapsulated {
            frames: vec![vec![value]]
        }
    );
    assert_eq!(scan.pixel_data.unwrap().element.end(), bytes.len() as u64);
}

#[test]
fn non_conformant_encoding_is_error() {
    // declares JPEG Baseline (explicit VR) but the dataset is implicit VR
    let path = sample("SC_rgb_jpeg.dcm");
    let mut file = std::fs::File::open(&path).unwrap();
    let (start, ts) = read_meta_extent(&mut file).unwrap();
    assert_eq!(ts, JPEG_BASELINE);
    assert!(locate_frames(&mut file, start, &ts, &GEOMETRY_3).is_err());
}

#[test]
fn bad_meta_is_error() {
    for name in ["no_meta.dcm", "meta_missing_tsyntax.dcm"] {
        let mut file = std::fs::File::open(sample(name)).unwrap();
        assert!(read_meta_extent(&mut file).is_err(), "{name}");
    }
    assert!(read_meta_extent(&mut IoCursor::new(vec![0u8; 10])).is_err());
    assert!(read_meta_extent(&mut IoCursor::new(vec![0xFFu8; 4000])).is_err());
    let mut only_prefix = vec![0u8; 128];
    only_prefix.extend_from_slice(b"DICM");
    assert!(read_meta_extent(&mut IoCursor::new(only_prefix)).is_err());
}

#[test]
fn truncated_samples_are_errors() {
    for name in ["MR_truncated.dcm", "rtplan_truncated.dcm"] {
        let path = sample(name);
        let mut file = std::fs::File::open(&path).unwrap();
        let (start, ts) = read_meta_extent(&mut file).unwrap();
        let g = ImageGeometry {
            rows: 64,
            columns: 64,
            samples_per_pixel: 1,
            bits_allocated: 16,
            number_of_frames: 1,
        };
        let r = locate_frames(&mut file, start, &ts, &g);
        assert!(r.is_err(), "{name}: {r:?}");
    }
}

/// Every prefix of a real file: an error or, when cut exactly between two top-level
/// elements before the pixel data, NoPixelData. Never a panic, never frames.
#[test]
fn every_truncation_of_samples() {
    for name in [
        "MR_small_RLE.dcm",
        "nested_priv_SQ.dcm",
        "MR_small_bigendian.dcm",
        "SC_rgb_rle_2frame.dcm",
        "JPEG2000.dcm",
    ] {
        let path = sample(name);
        let bytes = std::fs::read(&path).unwrap();
        let (start, ts) = read_meta_extent(&mut IoCursor::new(&bytes)).unwrap();
        let g = geometry_of(&open_file(&path).unwrap());
        let full = locate_frames(&mut IoCursor::new(&bytes), start, &ts, &g).unwrap();
        let pixel_end = scan_pixel_data(&mut IoCursor::new(&bytes), start, &ts, &g)
            .unwrap()
            .pixel_data
            .map(|p| p.element.end());
        for len in start as usize..bytes.len() {
            let r = locate_frames(&mut IoCursor::new(&bytes[..len]), start, &ts, &g);
            match (r, pixel_end) {
                (Err(_), _) | (Ok(Layout::NoPixelData), _) => {}
                (Ok(l), Some(end)) if len as u64 >= end => assert_eq!(l, full),
                (Ok(l), _) => panic!("{name} cut at {len}: {l:?}"),
            }
        }
    }
}

// ---- synthetic datasets -----------------------------------------------------------------

/// Explicit VR little endian element.
fn el(out: &mut Vec<u8>, tag: (u16, u16), vr: &[u8; 2], value: &[u8]) {
    out.extend_from_slice(&tag.0.to_le_bytes());
    out.extend_from_slice(&tag.1.to_le_bytes());
    out.extend_from_slice(vr);
    if short_length_vr(*vr) {
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(value);
}

/// Header without VR (items, delimiters, implicit VR elements), little endian.
fn raw_header(out: &mut Vec<u8>, tag: (u16, u16), len: u32) {
    out.extend_from_slice(&tag.0.to_le_bytes());
    out.extend_from_slice(&tag.1.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
}

fn undefined_header(out: &mut Vec<u8>, tag: (u16, u16), vr: &[u8; 2]) {
    out.extend_from_slice(&tag.0.to_le_bytes());
    out.extend_from_slice(&tag.1.to_le_bytes());
    out.extend_from_slice(vr);
    out.extend_from_slice(&[0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
}

/// Metadata with sequences of undefined length, a defined-length sequence, a nested
/// undefined-length UN (implicit VR inside) and a bogus delimiter pattern inside a value.
fn tricky_metadata(out: &mut Vec<u8>, with_un: bool) {
    el(out, (0x0008, 0x0016), b"UI", b"1.2.840.10008.5.1.4.1.1.7\0");
    el(out, (0x0008, 0x0060), b"CS", b"OT");
    // (0008,1140) SQ undefined length, one undefined-length item containing a nested
    // undefined-length sequence with a defined-length item
    undefined_header(out, (0x0008, 0x1140), b"SQ");
    raw_header(out, ITEM, UNDEFINED);
    el(out, (0x0008, 0x1150), b"UI", b"1.2.3.4\0");
    undefined_header(out, (0x0008, 0x1155), b"SQ"); // wrong VR for the tag, fine for us
    let mut inner = Vec::new();
    el(&mut inner, (0x0008, 0x0100), b"SH", b"T-1234");
    // value bytes that look like a sequence delimiter
    el(
        &mut inner,
        (0x0008, 0x0104),
        b"LO",
        &[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0],
    );
    raw_header(out, ITEM, inner.len() as u32);
    out.extend_from_slice(&inner);
    raw_header(out, SEQUENCE_DELIMITER, 0);
    raw_header(out, ITEM_DELIMITER, 0);
    raw_header(out, SEQUENCE_DELIMITER, 0);
    // private UN of undefined length, content in implicit VR LE
    el(out, (0x0009, 0x0010), b"LO", b"ACME 1.0");
    if !with_un {
        el(out, (0x0009, 0x1001), b"LO", b"none");
    }
    if with_un {
        undefined_header(out, (0x0009, 0x1001), b"UN");
        raw_header(out, ITEM, UNDEFINED);
        raw_header(out, (0x0009, 0x1002), 4);
        out.extend_from_slice(b"abcd");
        raw_header(out, (0x0009, 0x1003), UNDEFINED); // implicit VR sequence
        raw_header(out, ITEM, UNDEFINED);
        raw_header(out, (0x0009, 0x1004), 2);
        out.extend_from_slice(b"xy");
        raw_header(out, ITEM_DELIMITER, 0);
        raw_header(out, SEQUENCE_DELIMITER, 0);
        raw_header(out, ITEM_DELIMITER, 0);
        raw_header(out, SEQUENCE_DELIMITER, 0);
    }
    el(out, (0x0028, 0x0002), b"US", &1u16.to_le_bytes());
    el(out, (0x0028, 0x0008), b"IS", b"3 ");
    el(out, (0x0028, 0x0010), b"US", &4u16.to_le_bytes());
    el(out, (0x0028, 0x0011), b"US", &4u16.to_le_bytes());
    el(out, (0x0028, 0x0100), b"US", &8u16.to_le_bytes());
}

const GEOMETRY_3: ImageGeometry = ImageGeometry {
    rows: 4,
    columns: 4,
    samples_per_pixel: 1,
    bits_allocated: 8,
    number_of_frames: 3,
};

/// Fragment contents for 3 frames of 2 fragments each; the first fragment of each frame
/// starts like a JPEG codestream.
fn fragment_payloads() -> Vec<Vec<u8>> {
    (0..6u8)
        .map(|i| {
            let mut v = if i % 2 == 0 {
                vec![0xFF, 0xD8, 0xFF, 0xE0]
            } else {
                vec![0x12, 0x34]
            };
            v.extend(std::iter::repeat_n(i, 10 + 2 * i as usize));
            v
        })
        .collect()
}

/// Build an encapsulated dataset; returns the bytes and the expected frames.
fn encapsulated_dataset(with_bot: bool, eot: bool) -> (Vec<u8>, Vec<Vec<Extent>>) {
    encapsulated_dataset_with(with_bot, eot, true)
}

fn encapsulated_dataset_with(
    with_bot: bool,
    eot: bool,
    with_un: bool,
) -> (Vec<u8>, Vec<Vec<Extent>>) {
    let payloads = fragment_payloads();
    let mut out = Vec::new();
    tricky_metadata(&mut out, with_un);
    // fragment item offsets relative to the first fragment item
    let mut rel = Vec::new();
    let mut acc = 0u64;
    for p in &payloads {
        rel.push(acc);
        acc += 8 + p.len() as u64;
    }
    let frame_offsets: Vec<u64> = vec![rel[0], rel[2], rel[4]];
    if eot {
        let o: Vec<u8> = frame_offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        el(&mut out, EXTENDED_OFFSET_TABLE, b"OV", &o);
        let lens: Vec<u8> = (0..3)
            .flat_map(|k| {
                ((payloads[2 * k].len() + payloads[2 * k + 1].len()) as u64).to_le_bytes()
            })
            .collect();
        el(&mut out, EXTENDED_OFFSET_TABLE_LENGTHS, b"OV", &lens);
    }
    undefined_header(&mut out, PIXEL_DATA, b"OB");
    if with_bot {
        raw_header(&mut out, ITEM, 12);
        for o in &frame_offsets {
            out.extend_from_slice(&(*o as u32).to_le_bytes());
        }
    } else {
        raw_header(&mut out, ITEM, 0);
    }
    let mut extents = Vec::new();
    for p in &payloads {
        raw_header(&mut out, ITEM, p.len() as u32);
        extents.push(Extent {
            offset: out.len() as u64,
            length: p.len() as u64,
        });
        out.extend_from_slice(p);
    }
    raw_header(&mut out, SEQUENCE_DELIMITER, 0);
    let frames = extents.chunks(2).map(|c| c.to_vec()).collect();
    (out, frames)
}

fn layout_of(bytes: &[u8], ts: &str, g: &ImageGeometry) -> io::Result<Layout> {
    locate_frames(&mut IoCursor::new(bytes), 0, ts, g)
}

#[test]
fn synthetic_bot_three_frames_two_fragments_each() {
    // sanity: dicom-object reads the synthetic dataset (minus the implicit VR UN content,
    // which it does not support) the same way
    let (plain, plain_expected) = encapsulated_dataset_with(true, false, false);
    let obj = InMemDicomObject::read_dataset_with_ts(
        &plain[..],
        TransferSyntaxRegistry.get(RLE).unwrap(),
    )
    .unwrap();
    let fragments = obj
        .element(tags::PIXEL_DATA)
        .unwrap()
        .fragments()
        .unwrap()
        .to_vec();
    assert_eq!(fragments, fragment_payloads());
    assert_eq!(
        obj.element(tags::PIXEL_DATA)
            .unwrap()
            .offset_table()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        layout_of(&plain, RLE, &GEOMETRY_3).unwrap(),
        Layout::Encapsulated {
            frames: plain_expected
        }
    );

    let (bytes, expected) = encapsulated_dataset(true, false);

    // RLE: no marker splitting, so the BOT is what groups the fragments
    let layout = layout_of(&bytes, RLE, &GEOMETRY_3).unwrap();
    assert_eq!(
        layout,
        Layout::Encapsulated {
            frames: expected.clone()
        }
    );
    for (k, frame) in expected.iter().enumerate() {
        for (j, e) in frame.iter().enumerate() {
            assert_eq!(cut(&bytes, e), fragment_payloads()[2 * k + j]);
        }
    }
    let scan = scan_pixel_data(&mut IoCursor::new(&bytes), 0, RLE, &GEOMETRY_3).unwrap();
    let pd = scan.pixel_data.unwrap();
    assert_eq!(pd.element.end(), bytes.len() as u64);
    assert_eq!(scan.metadata_end, Some(pd.element.offset));
    assert_eq!(
        &bytes[pd.element.offset as usize..][..4],
        &[0xE0, 0x7F, 0x10, 0x00]
    );
}

#[test]
fn synthetic_extended_offset_table() {
    let (bytes, expected) = encapsulated_dataset(false, true);
    let layout = layout_of(&bytes, RLE, &GEOMETRY_3).unwrap();
    assert_eq!(layout, Layout::Encapsulated { frames: expected });
}

#[test]
fn synthetic_markers_and_fallbacks() {
    let (bytes, expected) = encapsulated_dataset(false, false);
    // JPEG: frames start at SOI
    assert_eq!(
        layout_of(&bytes, JPEG_BASELINE, &GEOMETRY_3).unwrap(),
        Layout::Encapsulated {
            frames: expected.clone()
        }
    );
    // RLE: 6 fragments, 3 frames, nothing to group them by
    assert_eq!(
        layout_of(&bytes, RLE, &GEOMETRY_3).unwrap(),
        Layout::Unavailable
    );
    // one frame: everything
    let one = ImageGeometry {
        number_of_frames: 1,
        ..GEOMETRY_3
    };
    let all: Vec<Extent> = expected.iter().flatten().copied().collect();
    assert_eq!(
        layout_of(&bytes, RLE, &one).unwrap(),
        Layout::Encapsulated {
            frames: vec![all.clone()]
        }
    );
    // six frames: one fragment each
    let six = ImageGeometry {
        number_of_frames: 6,
        ..GEOMETRY_3
    };
    let each: Vec<Vec<Extent>> = all.iter().map(|e| vec![*e]).collect();
    assert_eq!(
        layout_of(&bytes, RLE, &six).unwrap(),
        Layout::Encapsulated { frames: each }
    );
    // video: a single stream whatever the number of frames
    assert_eq!(
        layout_of(&bytes, "1.2.840.10008.1.2.4.102", &GEOMETRY_3).unwrap(),
        Layout::Encapsulated { frames: vec![all] }
    );
    // JPEG with a frame count the markers do not support
    let two = ImageGeometry {
        number_of_frames: 2,
        ..GEOMETRY_3
    };
    assert_eq!(
        layout_of(&bytes, JPEG_BASELINE, &two).unwrap(),
        Layout::Unavailable
    );
    // encapsulated pixel data under a native transfer syntax
    assert_eq!(
        layout_of(&bytes, EXPLICIT_LE, &GEOMETRY_3).unwrap(),
        Layout::Unavailable
    );
    // unknown transfer syntax
    assert_eq!(
        layout_of(&bytes, "1.2.3.4.5", &GEOMETRY_3).unwrap(),
        Layout::Unavailable
    );
}

#[test]
fn synthetic_inconsistent_bot_falls_back() {
    let (mut bytes, expected) = encapsulated_dataset(true, false);
    // corrupt the second BOT entry so it points into the middle of a fragment
    let scan = scan_pixel_data(&mut IoCursor::new(&bytes), 0, RLE, &GEOMETRY_3).unwrap();
    let bot_entry = scan.pixel_data.unwrap().element.offset as usize + 12 + 8 + 4;
    bytes[bot_entry] += 2;
    assert_eq!(
        layout_of(&bytes, RLE, &GEOMETRY_3).unwrap(),
        Layout::Unavailable
    );
    assert_eq!(
        layout_of(&bytes, JPEG_BASELINE, &GEOMETRY_3).unwrap(),
        Layout::Encapsulated { frames: expected }
    );
}

#[test]
fn synthetic_native_rules() {
    let mut out = Vec::new();
    tricky_metadata(&mut out, true);
    let pixels: Vec<u8> = (0..49u8).collect(); // 3 frames of 16 bytes + 1 pad byte
    el(&mut out, PIXEL_DATA, b"OB", &pixels);
    let header = out.len() as u64 - 49 - 12;
    let value = Extent {
        offset: header + 12,
        length: 49,
    };
    assert_eq!(
        layout_of(&out, EXPLICIT_LE, &GEOMETRY_3).unwrap(),
        Layout::Native {
            value,
            frame_length: 16,
            frames: 3
        }
    );
    // does not fit
    let four = ImageGeometry {
        number_of_frames: 4,
        ..GEOMETRY_3
    };
    assert_eq!(
        layout_of(&out, EXPLICIT_LE, &four).unwrap(),
        Layout::Unavailable
    );
    // native-looking pixel data under an encapsulated syntax
    assert_eq!(
        layout_of(&out, RLE, &GEOMETRY_3).unwrap(),
        Layout::Unavailable
    );
    // 1-bit: 3x3 pixels = 9 bits per frame
    let bits = ImageGeometry {
        rows: 3,
        columns: 3,
        samples_per_pixel: 1,
        bits_allocated: 1,
        number_of_frames: 1,
    };
    assert_eq!(
        layout_of(&out, EXPLICIT_LE, &bits).unwrap(),
        Layout::Native {
            value,
            frame_length: 2,
            frames: 1
        }
    );
    let bits3 = ImageGeometry {
        number_of_frames: 3,
        ..bits
    };
    assert_eq!(
        layout_of(&out, EXPLICIT_LE, &bits3).unwrap(),
        Layout::Unavailable
    );
    // 1-bit: 4x4 pixels = 2 bytes per frame, byte aligned
    let bits16 = ImageGeometry {
        rows: 4,
        columns: 4,
        samples_per_pixel: 1,
        bits_allocated: 1,
        number_of_frames: 3,
    };
    assert_eq!(
        layout_of(&out, EXPLICIT_LE, &bits16).unwrap(),
        Layout::Native {
            value,
            frame_length: 2,
            frames: 3
        }
    );
    // degenerate geometry
    let zero = ImageGeometry {
        rows: 0,
        ..GEOMETRY_3
    };
    assert_eq!(
        layout_of(&out, EXPLICIT_LE, &zero).unwrap(),
        Layout::Unavailable
    );
    let huge = ImageGeometry {
        rows: u16::MAX,
        columns: u16::MAX,
        samples_per_pixel: u16::MAX,
        bits_allocated: u16::MAX,
        number_of_frames: u32::MAX,
    };
    assert_eq!(
        layout_of(&out, EXPLICIT_LE, &huge).unwrap(),
        Layout::Unavailable
    );
    // number_of_frames 0 counts as 1
    let none = ImageGeometry {
        number_of_frames: 0,
        ..GEOMETRY_3
    };
    assert_eq!(
        layout_of(&out, EXPLICIT_LE, &none).unwrap(),
        Layout::Native {
            value,
            frame_length: 16,
            frames: 1
        }
    );
    // float pixel data is found too
    let mut f = Vec::new();
    el(&mut f, (0x0028, 0x0010), b"US", &1u16.to_le_bytes());
    el(&mut f, FLOAT_PIXEL_DATA, b"OF", &[0u8; 16]);
    let g = ImageGeometry {
        rows: 2,
        columns: 2,
        samples_per_pixel: 1,
        bits_allocated: 32,
        number_of_frames: 1,
    };
    let scan = scan_pixel_data(&mut IoCursor::new(&f), 0, EXPLICIT_LE, &g).unwrap();
    assert_eq!(scan.pixel_data.unwrap().tag, FLOAT_PIXEL_DATA);
    assert_eq!(
        scan.layout,
        Layout::Native {
            value: Extent {
                offset: 10 + 12,
                length: 16
            },
            frame_length: 16,
            frames: 1
        }
    );
}

#[test]
fn synthetic_big_endian_with_sequences() {
    let be_el = |out: &mut Vec<u8>, tag: (u16, u16), vr: &[u8; 2], value: &[u8]| {
        out.extend_from_slice(&tag.0.to_be_bytes());
        out.extend_from_slice(&tag.1.to_be_bytes());
        out.extend_from_slice(vr);
        if short_length_vr(*vr) {
            out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        } else {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        }
        out.extend_from_slice(value);
    };
    let be_raw = |out: &mut Vec<u8>, tag: (u16, u16), len: u32| {
        out.extend_from_slice(&tag.0.to_be_bytes());
        out.extend_from_slice(&tag.1.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    };
    let mut out = Vec::new();
    be_el(&mut out, (0x0008, 0x0060), b"CS", b"MR");
    // undefined-length sequence, items in big endian
    out.extend_from_slice(&[
        0x00, 0x08, 0x11, 0x40, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
    ]);
    be_raw(&mut out, ITEM, UNDEFINED);
    be_el(&mut out, (0x0008, 0x1150), b"UI", b"1.2\0");
    be_raw(&mut out, ITEM_DELIMITER, 0);
    be_raw(&mut out, SEQUENCE_DELIMITER, 0);
    // undefined-length UN: implicit VR little endian inside
    out.extend_from_slice(&[
        0x00, 0x09, 0x10, 0x01, b'U', b'N', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
    ]);
    raw_header(&mut out, ITEM, UNDEFINED);
    raw_header(&mut out, (0x0009, 0x1002), 2);
    out.extend_from_slice(b"ok");
    raw_header(&mut out, ITEM_DELIMITER, 0);
    raw_header(&mut out, SEQUENCE_DELIMITER, 0);
    let start = out.len() as u64;
    be_el(&mut out, PIXEL_DATA, b"OW", &[1, 2, 3, 4, 5, 6, 7, 8]);
    let g = ImageGeometry {
        rows: 2,
        columns: 2,
        samples_per_pixel: 1,
        bits_allocated: 16,
        number_of_frames: 1,
    };
    let scan = scan_pixel_data(&mut IoCursor::new(&out), 0, EXPLICIT_BE, &g).unwrap();
    assert_eq!(scan.metadata_end, Some(start));
    assert_eq!(
        scan.layout,
        Layout::Native {
            value: Extent {
                offset: start + 12,
                length: 8
            },
            frame_length: 8,
            frames: 1
        }
    );
}

#[test]
fn synthetic_every_truncation() {
    for (bot, eot) in [(true, false), (false, true), (false, false)] {
        let (bytes, _) = encapsulated_dataset(bot, eot);
        let full = layout_of(&bytes, JPEG_BASELINE, &GEOMETRY_3).unwrap();
        assert!(matches!(full, Layout::Encapsulated { .. }));
        for len in 0..bytes.len() {
            match layout_of(&bytes[..len], JPEG_BASELINE, &GEOMETRY_3) {
                Err(_) | Ok(Layout::NoPixelData) => {}
                Ok(other) => panic!("cut at {len}: {other:?}"),
            }
        }
    }
}

#[test]
fn hostile_input() {
    let g = GEOMETRY_3;
    // value length past the end of the file
    let mut out = Vec::new();
    el(&mut out, (0x0008, 0x0060), b"CS", b"OT");
    out.extend_from_slice(&[
        0x09, 0x00, 0x01, 0x10, b'O', b'B', 0, 0, 0xF0, 0xFF, 0xFF, 0xFF,
    ]);
    out.extend_from_slice(&[0; 64]);
    let e = layout_of(&out, EXPLICIT_LE, &g).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);

    // deep nesting of undefined-length sequences
    let mut deep = Vec::new();
    for _ in 0..200 {
        undefined_header(&mut deep, (0x0008, 0x1140), b"SQ");
        raw_header(&mut deep, ITEM, UNDEFINED);
    }
    let e = layout_of(&deep, EXPLICIT_LE, &g).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    // same in implicit VR
    let mut deep = Vec::new();
    for _ in 0..200 {
        raw_header(&mut deep, (0x0008, 0x1140), UNDEFINED);
        raw_header(&mut deep, ITEM, UNDEFINED);
    }
    assert!(layout_of(&deep, "1.2.840.10008.1.2", &g).is_err());

    // fragment item of undefined length; items outside sequences; odd pixel lengths
    let mut bad = Vec::new();
    undefined_header(&mut bad, PIXEL_DATA, b"OB");
    raw_header(&mut bad, ITEM, 0);
    raw_header(&mut bad, ITEM, UNDEFINED);
    bad.extend_from_slice(&[0; 32]);
    assert!(layout_of(&bad, JPEG_BASELINE, &g).is_err());
    let mut bad = Vec::new();
    raw_header(&mut bad, ITEM, 4);
    bad.extend_from_slice(&[0; 4]);
    assert!(layout_of(&bad, EXPLICIT_LE, &g).is_err());
    // BOT longer than the file
    let mut bad = Vec::new();
    undefined_header(&mut bad, PIXEL_DATA, b"OB");
    raw_header(&mut bad, ITEM, 12);
    bad.extend_from_slice(&[0; 4]);
    assert!(layout_of(&bad, JPEG_BASELINE, &g).is_err());
    // dataset start past the end
    assert!(locate_frames(&mut IoCursor::new(&bad), 1000, JPEG_BASELINE, &g).is_err());

    // garbage
    assert!(layout_of(&[0xFF; 1000], EXPLICIT_LE, &g).is_err());
    assert!(layout_of(&[0x00; 7], EXPLICIT_LE, &g).is_err());
    assert_eq!(
        layout_of(&[], EXPLICIT_LE, &g).unwrap(),
        Layout::NoPixelData
    );

    // pseudo-random input under every kind of syntax: must not panic
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..3000 {
        let len = (next() % 400) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // sprinkle structural bytes to get deeper than the first header
        for i in (0..len).step_by(8) {
            match next() % 6 {
                0 => data[i..(i + 4).min(len)]
                    .copy_from_slice(&[0xFE, 0xFF, 0x00, 0xE0][..(len - i).min(4)]),
                1 if i + 12 <= len => data[i..i + 12].copy_from_slice(&[
                    0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
                ]),
                2 if i + 6 <= len => data[i + 4..i + 6].copy_from_slice(b"SQ"),
                _ => {}
            }
        }
        for ts in [
            EXPLICIT_LE,
            EXPLICIT_BE,
            "1.2.840.10008.1.2",
            JPEG_BASELINE,
            RLE,
            "1.2.840.10008.1.2.4.90",
        ] {
            let _ = layout_of(&data, ts, &g);
        }
        let mut file = vec![0u8; 128];
        file.extend_from_slice(b"DICM");
        if round % 2 == 0 {
            file.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I']);
        }
        file.extend_from_slice(&data);
        let _ = read_meta_extent(&mut IoCursor::new(&file));
    }
}

/// A reader that returns at most 3 bytes per call and counts seeks.
struct Trickle<'a> {
    inner: IoCursor<&'a [u8]>,
    seeks: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(3);
        self.inner.read(&mut buf[..n])
    }
}

impl Seek for Trickle<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.seeks += 1;
        self.inner.seek(pos)
    }
}

#[test]
fn short_reads_give_same_results() {
    for name in [
        "examples_ybr_color.dcm",
        "nested_priv_SQ.dcm",
        "rtdose.dcm",
        "MR_small_bigendian.dcm",
        "UN_sequence.dcm",
        "examples_jpeg2k.dcm",
    ] {
        let bytes = std::fs::read(sample(name)).unwrap();
        let (start, ts) = read_meta_extent(&mut IoCursor::new(&bytes)).unwrap();
        // UN_sequence.dcm is not readable by dicom-object; its geometry is irrelevant
        let g = if name == "UN_sequence.dcm" {
            GEOMETRY_3
        } else {
            geometry_of(&open_file(sample(name)).unwrap())
        };
        let plain = scan_pixel_data(&mut IoCursor::new(&bytes), start, &ts, &g).unwrap();
        let mut trickle = Trickle {
            inner: IoCursor::new(&bytes),
            seeks: 0,
        };
        assert_eq!(read_meta_extent(&mut trickle).unwrap(), (start, ts.clone()));
        let slow = scan_pixel_data(&mut trickle, start, &ts, &g).unwrap();
        assert_eq!(plain, slow, "{name}");
        assert!(trickle.seeks < 200, "{name}: {} seeks", trickle.seeks);
    }
}

#[test]
fn reader_position_does_not_matter() {
    let path = sample("SC_rgb_rle_2frame.dcm");
    let mut file = std::fs::File::open(&path).unwrap();
    let (start, ts) = read_meta_extent(&mut file).unwrap();
    let g = geometry_of(&open_file(&path).unwrap());
    let a = locate_frames(&mut file, start, &ts, &g).unwrap();
    file.seek(SeekFrom::Start(37)).unwrap();
    let b = locate_frames(&mut file, start, &ts, &g).unwrap();
    assert_eq!(a, b);
    // serde round trip
    let json = serde_json::to_string(&a).unwrap();
    assert_eq!(serde_json::from_str::<Layout>(&json).unwrap(), a);
}

#[test]
fn pixel_data_start_needs_the_whole_header_in_the_prefix() {
    for name in [
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "SC_rgb_rle_2frame.dcm",
    ] {
        let bytes = std::fs::read(sample(name)).unwrap();
        let (start, ts) = read_meta_extent(&mut IoCursor::new(&bytes)).unwrap();
        let g = geometry_of(&open_file(sample(name)).unwrap());
        let scan = scan_pixel_data(&mut IoCursor::new(&bytes), start, &ts, &g).unwrap();
        let pixel = scan.pixel_data.unwrap().element.offset;
        let at = |n: usize| {
            pixel_data_start(&mut IoCursor::new(&bytes[..n]), start, &ts).map(|p| p.offset)
        };
        assert_eq!(at(bytes.len()), Some(pixel), "{name}");
        // Its header (at least 8 bytes) must be there; anything short of it is not enough.
        assert_eq!(at(pixel as usize + 12), Some(pixel), "{name}");
        assert_eq!(at(pixel as usize + 4), None, "{name}");
        assert_eq!(at(pixel as usize - 1), None, "{name}");
    }
    // No pixel data at all, and a deflated data set: nothing to announce early.
    let bytes = std::fs::read(sample("rtplan.dcm")).unwrap();
    let (start, ts) = read_meta_extent(&mut IoCursor::new(&bytes)).unwrap();
    assert_eq!(
        pixel_data_start(&mut IoCursor::new(&bytes), start, &ts),
        None
    );
    assert_eq!(
        pixel_data_start(&mut IoCursor::new(&bytes), start, "1.2.840.10008.1.2.1.99"),
        None
    );
}

#[test]
fn a_un_of_undefined_length_with_items_is_refused_before_parsing() {
    // (4453,100C) UN of undefined length holding Implicit VR items (CP-246).
    let bytes = std::fs::read(sample("UN_sequence.dcm")).unwrap();
    let (start, ts) = read_meta_extent(&mut IoCursor::new(&bytes)).unwrap();
    let err = check_before_parse(&mut IoCursor::new(&bytes), start, &ts).unwrap_err();
    assert!(err.to_string().contains("CP-246"), "{err}");
    assert_eq!(
        pixel_data_start(&mut IoCursor::new(&bytes), start, &ts),
        None
    );
    // Locating frames (of stored objects) still follows CP-246.
    let g = ImageGeometry {
        rows: 0,
        columns: 0,
        samples_per_pixel: 1,
        bits_allocated: 0,
        number_of_frames: 1,
    };
    assert!(scan_pixel_data(&mut IoCursor::new(&bytes), start, &ts, &g).is_ok());
    // An empty one (only its sequence delimiter), then a Patient Name: walked to the end.
    let mut data = vec![
        0x09, 0x00, 0x10, 0x10, b'U', b'N', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
    ];
    data.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    data.extend_from_slice(&[0x10, 0x00, 0x10, 0x00, b'P', b'N', 4, 0]);
    data.extend_from_slice(b"AB^C");
    check_before_parse(&mut IoCursor::new(&data), 0, EXPLICIT_LE).unwrap();
}

#[test]
fn a_deflated_data_set_is_walked_inflated_before_parsing() {
    use std::io::Write;
    const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
    let deflate = |data: &[u8]| {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), Default::default());
        z.write_all(data).unwrap();
        z.finish().unwrap()
    };
    let check = |stream: &[u8]| check_before_parse(&mut IoCursor::new(stream), 0, DEFLATED);

    // The sample passes; cut short anywhere in its deflate stream it is refused.
    let bytes = std::fs::read(sample("image_dfl.dcm")).unwrap();
    let (start, ts) = read_meta_extent(&mut IoCursor::new(&bytes)).unwrap();
    assert_eq!(ts, DEFLATED);
    check_before_parse(&mut IoCursor::new(&bytes), start, &ts).unwrap();
    let cut = &bytes[..bytes.len() - 100];
    assert!(check_before_parse(&mut IoCursor::new(cut), start, &ts).is_err());

    // A UN of undefined length holding items is refused, as when not deflated.
    let un = std::fs::read(sample("UN_sequence.dcm")).unwrap();
    let (un_start, _) = read_meta_extent(&mut IoCursor::new(&un)).unwrap();
    let err = check(&deflate(&un[un_start as usize..])).unwrap_err();
    assert!(err.to_string().contains("CP-246"), "{err}");

    // A length past the end of the inflated data set is refused.
    let mut name = vec![0x10, 0x00, 0x10, 0x00, b'P', b'N', 100, 0];
    name.extend_from_slice(b"AB^C");
    let err = check(&deflate(&name)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    name[6] = 4;
    check(&deflate(&name)).unwrap();

    // 65 MiB of zeros before the pixel data deflate to ~65 KB: dicom-rs would hold them all.
    let mut bomb = vec![0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0];
    let zeros = 65u32 << 20;
    bomb.extend_from_slice(&zeros.to_le_bytes());
    bomb.resize(bomb.len() + zeros as usize, 0);
    bomb.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 2, 0, 0, 0, 0, 0]);
    let z = deflate(&bomb);
    assert!(z.len() < 1 << 20);
    let err = check(&z).unwrap_err();
    assert!(err.to_string().contains("inflate"), "{err}");
    // The same zeros as pixel data are not held by the header parse: accepted.
    let mut image = vec![0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0];
    image.extend_from_slice(&zeros.to_le_bytes());
    image.resize(image.len() + zeros as usize, 0);
    check(&deflate(&image)).unwrap();
}

// ---- the entry points for fuzzing ---------------------------------------------------------

/// A Part-10 object around `dataset` in Explicit VR Little Endian.
fn part10(dataset: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    el(&mut out, (0x0002, 0x0010), b"UI", b"1.2.840.10008.1.2.1\0");
    out.extend_from_slice(dataset);
    out
}

/// A small deterministic generator (xorshift), so that a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn walk_part10_reads_the_samples_and_refuses_what_is_not_dicom() {
    let walked = walk_part10(&std::fs::read(sample("CT_small.dcm")).unwrap()).unwrap();
    assert_eq!(walked.transfer_syntax, EXPLICIT_LE);
    let scan = walked.scan.unwrap();
    assert_eq!(scan.pixel_data.unwrap().tag, PIXEL_DATA);
    let walked = walk_part10(&std::fs::read(sample("image_dfl.dcm")).unwrap()).unwrap();
    assert_eq!(
        walked.scan, None,
        "a deflated data set has no stored offsets"
    );
    for bytes in [&b""[..], &[0u8; 131][..], &[0xFFu8; 4000][..]] {
        assert!(walk_part10(bytes).is_err());
    }
    // every sample answers, whatever it holds
    for entry in std::fs::read_dir(sample("CT_small.dcm").parent().unwrap()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "dcm") {
            let _ = walk_part10(&std::fs::read(&path).unwrap());
        }
    }
}

#[test]
fn every_truncation_answers_and_a_cut_in_the_pixel_data_is_an_error() {
    for name in ["CT_small.dcm", "SC_rgb_rle_2frame.dcm", "image_dfl.dcm"] {
        let bytes = std::fs::read(sample(name)).unwrap();
        let whole = walk_part10(&bytes).unwrap();
        let pixels = whole
            .scan
            .and_then(|s| s.pixel_data)
            .map(|p| p.element.offset as usize);
        for len in (0..bytes.len()).step_by(7) {
            let cut = walk_part10(&bytes[..len]);
            if pixels.is_some_and(|at| len > at) {
                assert!(cut.is_err(), "{name} cut at {len}");
            }
        }
    }
}

#[test]
fn lying_lengths_are_refused_before_anything_is_allocated() {
    // each of these claims about 4 GB in an object of a few dozen bytes
    let mut value = Vec::new();
    value.extend_from_slice(&[0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0]);
    value.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let mut item = Vec::new();
    el(&mut item, (0x0008, 0x0060), b"CS", b"OT");
    item.extend_from_slice(&[0x08, 0x00, 0x40, 0x11, b'S', b'Q', 0, 0]);
    item.extend_from_slice(&UNDEFINED.to_le_bytes());
    raw_header(&mut item, ITEM, 0xFFFF_FFF0);
    let mut table = Vec::new();
    table.extend_from_slice(&[0xE0, 0x7F, 0x01, 0x00, b'O', b'V', 0, 0]);
    table.extend_from_slice(&0xFFFF_FFF8u32.to_le_bytes());
    let mut offsets = Vec::new();
    undefined_header(&mut offsets, PIXEL_DATA, b"OB");
    raw_header(&mut offsets, ITEM, 0xFFFF_FFF0);
    for dataset in [value, item, table, offsets] {
        let err = walk_part10(&part10(&dataset)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }
    // a meta group element longer than the object
    let mut meta = vec![0u8; 128];
    meta.extend_from_slice(b"DICM");
    meta.extend_from_slice(&[0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0]);
    meta.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    assert!(walk_part10(&meta).is_err());
}

#[test]
fn nesting_deeper_than_the_limit_is_refused() {
    let nested = |depth: usize| {
        let mut out = Vec::new();
        for _ in 0..depth {
            undefined_header(&mut out, (0x0008, 0x1140), b"SQ");
            raw_header(&mut out, ITEM, UNDEFINED);
        }
        for _ in 0..depth {
            raw_header(&mut out, ITEM_DELIMITER, 0);
            raw_header(&mut out, SEQUENCE_DELIMITER, 0);
        }
        part10(&out)
    };
    walk_part10(&nested(MAX_DEPTH as usize / 2)).unwrap();
    let err = walk_part10(&nested(MAX_DEPTH as usize + 1)).unwrap_err();
    assert!(err.to_string().contains("nested too deeply"), "{err}");
    // ten thousand levels: refused at the limit, the stack never grows past it
    assert!(walk_part10(&nested(10_000)).is_err());
}

#[test]
fn mutated_objects_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for name in [
        "CT_small.dcm",
        "SC_rgb_rle_2frame.dcm",
        "JPEG2000.dcm",
        "nested_priv_SQ.dcm",
        "UN_sequence.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",
    ] {
        let original = std::fs::read(sample(name)).unwrap();
        for _ in 0..300 {
            let mut bytes = original.clone();
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(bytes.len());
                bytes[at] = match rng.below(4) {
                    0 => 0xFF,
                    1 => 0x00,
                    _ => rng.next() as u8,
                };
            }
            if rng.below(4) == 0 {
                bytes.truncate(rng.below(bytes.len()));
            }
            let _ = walk_part10(&bytes);
        }
    }
}

#[test]
fn walk_deflated_answers_for_any_stream() {
    use std::io::Write;
    let deflate = |data: &[u8]| {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), Default::default());
        z.write_all(data).unwrap();
        z.finish().unwrap()
    };
    let mut dataset = Vec::new();
    el(&mut dataset, (0x0008, 0x0060), b"CS", b"OT");
    let stream = deflate(&dataset);
    walk_deflated(&stream).unwrap();
    assert!(walk_deflated(&stream[..stream.len() - 1]).is_err());
    assert!(walk_deflated(b"not a deflate stream").is_err());
    let mut rng = Rng(7);
    for _ in 0..2000 {
        let mut bytes = stream.clone();
        let at = rng.below(bytes.len());
        bytes[at] ^= 1 << rng.below(8);
        let _ = walk_deflated(&bytes);
    }
}
