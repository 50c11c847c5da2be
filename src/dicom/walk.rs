//! The walk over an encoded data set: element headers read one after the other, values skipped by
//! offset (never loaded), sequences and items of defined or undefined length at any depth (up to
//! [`super::MAX_DEPTH`]), an undefined-length UN walked as Implicit VR Little Endian (PS3.5 6.2.2). The
//! top-level walk stops at the pixel data, whose layout [`super::frames`] reads, then walks the
//! elements after it to the end, so that an object cut anywhere is recognised as truncated.
//!
//! Malformed input is reported as `Err` (`InvalidData` / `UnexpectedEof`), never a panic.

use std::io::{self, Read, Seek};

use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::frames::{
    codestream_kind, pixel_data_layout, Extent, ImageGeometry, Layout, PixelDataElement,
    PixelDataScan, PixelKind,
};
use super::header::{
    nested_encoding, read_header, Enc, ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER, UNDEFINED,
};
use super::source::Cursor;
use super::validate::{check_depth, eof, invalid, refuse_un_items};

pub(crate) const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);
pub(crate) const FLOAT_PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0008);
pub(crate) const DOUBLE_PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0009);
const EXTENDED_OFFSET_TABLE: (u16, u16) = (0x7FE0, 0x0001);
const EXTENDED_OFFSET_TABLE_LENGTHS: (u16, u16) = (0x7FE0, 0x0002);

/// The top-level walk of the data set at `dataset_start` (see [`super::frames::scan_pixel_data`]);
/// `before_parse` for the walk that clears an object for dicom-rs.
pub(crate) fn scan<R: Read + Seek>(
    reader: &mut R,
    dataset_start: u64,
    ts_uid: &str,
    geometry: &ImageGeometry,
    before_parse: bool,
) -> io::Result<PixelDataScan> {
    let unavailable = PixelDataScan {
        metadata_end: None,
        pixel_data: None,
        layout: Layout::Unavailable,
    };
    let Some(ts) = TransferSyntaxRegistry.get(ts_uid) else {
        return Ok(unavailable);
    };
    if matches!(ts.codec(), Codec::Dataset(_)) {
        // the whole dataset goes through a codec (deflate): no stable offsets
        return Ok(unavailable);
    }
    let Some(enc) = Enc::of(ts) else {
        return Ok(unavailable);
    };
    let kind = if ts.is_encapsulated_pixel_data() {
        PixelKind::Encapsulated(codestream_kind(ts.uid()))
    } else {
        PixelKind::Native
    };

    let mut cur = Cursor::new(reader)?;
    cur.before_parse = before_parse;
    if dataset_start > cur.file_len {
        return Err(eof("dataset start is past the end of the file"));
    }
    cur.seek_to(dataset_start);
    walk(&mut cur, enc, kind, geometry)
}

/// Walks the top-level elements from the cursor's position to the pixel data, then the pixel data
/// and the elements after it to the end.
pub(crate) fn walk<R: Read + Seek>(
    cur: &mut Cursor<'_, R>,
    enc: Enc,
    kind: PixelKind,
    geometry: &ImageGeometry,
) -> io::Result<PixelDataScan> {
    let frames = geometry.number_of_frames.max(1);
    let mut eot: Option<Vec<u64>> = None;
    let mut eot_lengths: Option<Vec<u64>> = None;

    loop {
        if cur.remaining() == 0 {
            return Ok(PixelDataScan {
                metadata_end: Some(cur.pos),
                pixel_data: None,
                layout: Layout::NoPixelData,
            });
        }
        let header_offset = cur.pos;
        let h = read_header(cur, enc)?;
        if h.tag.0 == 0xFFFE {
            return Err(invalid("item or delimiter at the top level of the dataset"));
        }
        if matches!(h.tag, PIXEL_DATA | FLOAT_PIXEL_DATA | DOUBLE_PIXEL_DATA) {
            let (layout, end) = pixel_data_layout(
                cur,
                &h,
                enc,
                kind,
                geometry,
                frames,
                eot.as_deref().zip(eot_lengths.as_deref()),
            )?;
            cur.seek_to(end);
            check_trailing_elements(cur, enc)?;
            return Ok(PixelDataScan {
                metadata_end: Some(header_offset),
                pixel_data: Some(PixelDataElement {
                    tag: h.tag,
                    element: Extent {
                        offset: header_offset,
                        length: end - header_offset,
                    },
                }),
                layout,
            });
        }
        if h.len == UNDEFINED {
            skip_undefined(cur, enc, h.vr, 1)?;
            continue;
        }
        let table_len = u64::from(frames) * 8;
        if (h.tag == EXTENDED_OFFSET_TABLE || h.tag == EXTENDED_OFFSET_TABLE_LENGTHS)
            && u64::from(h.len) == table_len
        {
            // one 64-bit entry per frame; allocate only once the file is known to hold them
            cur.check_available(table_len)?;
            let mut table = Vec::with_capacity(frames as usize);
            for _ in 0..frames {
                let b: [u8; 8] = cur.read_array()?;
                table.push(if enc.big {
                    u64::from_be_bytes(b)
                } else {
                    u64::from_le_bytes(b)
                });
            }
            if h.tag == EXTENDED_OFFSET_TABLE {
                eot = Some(table);
            } else {
                eot_lengths = Some(table);
            }
            continue;
        }
        cur.skip(u64::from(h.len))?;
    }
}

/// The top-level pixel data element's header, read from the first bytes of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelDataStart {
    /// Where the element (its header) starts.
    pub offset: u64,
    /// Where its value lies, when its length is defined (native pixel data).
    pub value: Option<Extent>,
}

/// Where the top-level pixel data element starts in `reader`, the first bytes of an object whose
/// rest is still arriving: `Some` only once every element before it, and its own header, lie
/// within those bytes with consistent lengths. `None` when they end first, hold no pixel data, or
/// cannot be walked (deflated or unknown transfer syntax, malformed elements, or what
/// [`super::check_before_parse`] refuses: the parse of the whole object reports those).
pub fn pixel_data_start<R: Read + Seek>(
    reader: &mut R,
    dataset_start: u64,
    ts_uid: &str,
) -> Option<PixelDataStart> {
    let ts = TransferSyntaxRegistry.get(ts_uid)?;
    if matches!(ts.codec(), Codec::Dataset(_)) {
        return None;
    }
    let enc = Enc::of(ts)?;
    let mut cur = Cursor::new(reader).ok()?;
    cur.before_parse = true;
    if dataset_start > cur.file_len {
        return None;
    }
    cur.seek_to(dataset_start);
    while cur.remaining() > 0 {
        let header_offset = cur.pos;
        let h = read_header(&mut cur, enc).ok()?;
        if h.tag.0 == 0xFFFE {
            return None;
        }
        if matches!(h.tag, PIXEL_DATA | FLOAT_PIXEL_DATA | DOUBLE_PIXEL_DATA) {
            return Some(PixelDataStart {
                offset: header_offset,
                value: (h.len != UNDEFINED).then(|| Extent {
                    offset: cur.pos,
                    length: u64::from(h.len),
                }),
            });
        }
        if h.len == UNDEFINED {
            skip_undefined(&mut cur, enc, h.vr, 1).ok()?;
        } else {
            cur.skip(u64::from(h.len)).ok()?;
        }
    }
    None
}

/// Walks the top-level elements after the pixel data (e.g. Data Set Trailing Padding) to the end of
/// the file, so that an object cut anywhere after its pixel data is still recognised as truncated.
fn check_trailing_elements<R: Read + Seek>(cur: &mut Cursor<'_, R>, enc: Enc) -> io::Result<()> {
    while cur.remaining() > 0 {
        let h = read_header(cur, enc)?;
        if h.tag.0 == 0xFFFE {
            return Err(invalid("item or delimiter at the top level of the dataset"));
        }
        if h.len == UNDEFINED {
            skip_undefined(cur, enc, h.vr, 1)?;
        } else {
            cur.skip(u64::from(h.len))?;
        }
    }
    Ok(())
}

/// Skips the value of an undefined-length element: a sequence, or a UN holding one (PS3.5 6.2.2,
/// CP-246: its items in Implicit VR Little Endian), which a walk that clears an object for dicom-rs
/// (`before_parse`) refuses when it holds items (see [`refuse_un_items`]).
pub(crate) fn skip_undefined<R: Read + Seek>(
    cur: &mut Cursor<'_, R>,
    enc: Enc,
    vr: Option<[u8; 2]>,
    depth: u32,
) -> io::Result<()> {
    let nested = nested_encoding(enc, vr);
    if cur.before_parse && vr == Some(*b"UN") {
        return refuse_un_items(cur, nested);
    }
    skip_items(cur, nested, depth)
}

/// Skip the items of an undefined-length value up to and including its sequence delimiter.
/// Works for sequences as well as fragment sequences (items of defined length are skipped
/// without looking inside).
pub(crate) fn skip_items<R: Read + Seek>(
    cur: &mut Cursor<'_, R>,
    enc: Enc,
    depth: u32,
) -> io::Result<()> {
    check_depth(depth)?;
    loop {
        let h = read_header(cur, enc)?;
        match h.tag {
            SEQUENCE_DELIMITER => return Ok(()),
            ITEM if h.len == UNDEFINED => skip_item_dataset(cur, enc, depth + 1)?,
            ITEM => cur.skip(u64::from(h.len))?,
            _ => return Err(invalid("expected an item or sequence delimiter")),
        }
    }
}

/// Skip the dataset of an undefined-length item up to and including its item delimiter.
fn skip_item_dataset<R: Read + Seek>(
    cur: &mut Cursor<'_, R>,
    enc: Enc,
    depth: u32,
) -> io::Result<()> {
    check_depth(depth)?;
    loop {
        let h = read_header(cur, enc)?;
        if h.tag == ITEM_DELIMITER {
            return Ok(());
        }
        if h.tag.0 == 0xFFFE {
            return Err(invalid("unexpected delimiter inside an item"));
        }
        if h.len == UNDEFINED {
            skip_undefined(cur, enc, h.vr, depth + 1)?;
        } else {
            cur.skip(u64::from(h.len))?;
        }
    }
}
