//! Frame layout: where the pixel data element and each frame's bytes lie in a stored Part-10 object,
//! so that WADO-RS frames (and ranged GETs against object storage) are cut out without parsing the
//! object again. Found by the walk (`walk`), which reads element headers only.
//!
//! Supported encodings: Explicit VR Little Endian, Implicit VR Little Endian, Explicit VR Big
//! Endian (ranges are reported as stored, no byte swapping), and every transfer syntax whose
//! registry entry has encapsulated pixel data. Deflated transfer syntaxes (any syntax whose registry
//! entry applies a codec to the whole dataset) yield [`Layout::Unavailable`].

use std::io::{self, Read, Seek};

use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::header::{read_header, Enc, Header, ITEM, SEQUENCE_DELIMITER, UNDEFINED};
use super::source::Cursor;
use super::validate::{invalid, MAX_FRAGMENTS};
use super::walk::{scan, skip_undefined, PIXEL_DATA};

/// A byte range inside the stored file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    /// The offset one past the last byte of the range.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Layout {
    /// No pixel data element at top level.
    NoPixelData,
    /// Native pixel data: frame i (0-based) is `value.offset + i*frame_length .. + frame_length`.
    Native {
        value: Extent,
        frame_length: u64,
        frames: u32,
    },
    /// Encapsulated: for each frame, the fragments (item values, without item headers) that make
    /// it, in order.
    ///
    /// For the video transfer syntaxes (MPEG-2, MPEG-4 AVC/H.264, HEVC/H.265, including the
    /// fragmentable variants) the frames of the video are not separately addressable: `frames`
    /// then holds a single entry, the list of all fragments that make up the whole stream,
    /// whatever the Number of Frames says.
    Encapsulated { frames: Vec<Vec<Extent>> },
    /// Cannot be addressed by offsets (deflated dataset, or fragments that cannot be assigned to
    /// frames).
    Unavailable,
}

/// Image attributes needed to cut native pixel data into frames and to know how many frames to
/// expect in encapsulated pixel data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageGeometry {
    pub rows: u16,
    pub columns: u16,
    pub samples_per_pixel: u16,
    pub bits_allocated: u16,
    /// Number of Frames (0028,0008); 1 when absent. A value of 0 is treated as 1.
    pub number_of_frames: u32,
}

impl ImageGeometry {
    /// Take the geometry from a dataset's Rows, Columns, Samples per Pixel (default 1), Bits
    /// Allocated and Number of Frames (default 1). `None` when Rows, Columns or Bits Allocated
    /// is missing, or a present value cannot be read as a number.
    pub fn from_object<D>(obj: &dicom_object::InMemDicomObject<D>) -> Option<ImageGeometry>
    where
        D: dicom_core::DataDictionary + Clone,
    {
        use dicom_dictionary_std::tags;
        // Some(None) when absent, None when present but unreadable
        let u16_of = |tag| match obj.get(tag) {
            Some(e) => e.to_int::<u16>().ok().map(Some),
            None => Some(None),
        };
        let frames = match obj.get(tags::NUMBER_OF_FRAMES) {
            Some(e) => e.to_int::<u32>().ok()?,
            None => 1,
        };
        Some(ImageGeometry {
            rows: u16_of(tags::ROWS)??,
            columns: u16_of(tags::COLUMNS)??,
            samples_per_pixel: u16_of(tags::SAMPLES_PER_PIXEL)?.unwrap_or(1),
            bits_allocated: u16_of(tags::BITS_ALLOCATED)??,
            number_of_frames: frames,
        })
    }
}

/// Location of the top-level pixel data element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PixelDataElement {
    /// `(group, element)` of the element found: (7FE0,0010), (7FE0,0008) or (7FE0,0009).
    pub tag: (u16, u16),
    /// The whole element, from the first byte of its header to the end of its value. For
    /// encapsulated pixel data this includes every item and the sequence delimitation item.
    /// `element.offset` is where the part of the dataset preceding the pixel data ends.
    pub element: Extent,
}

/// Result of [`scan_pixel_data`]: the frame layout plus where the pixel data element itself is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PixelDataScan {
    /// File offset where the dataset preceding the pixel data ends: the first byte of the pixel
    /// data element header, or the end of the walked dataset (end of file) when there is no
    /// top-level pixel data. `None` when the dataset could not be walked (deflated or unknown
    /// transfer syntax).
    pub metadata_end: Option<u64>,
    /// The top-level pixel data element, if one was found.
    pub pixel_data: Option<PixelDataElement>,
    /// How the frames are laid out.
    pub layout: Layout,
}

/// `reader` is positioned anywhere; `dataset_start` is the file offset where the main dataset
/// (after the file meta group) begins; `ts_uid` the dataset's transfer syntax UID. Finds the
/// top-level pixel data element (7FE0,0010) (also Float Pixel Data 7FE0,0008 and Double
/// 7FE0,0009) and returns its layout.
///
/// Rules:
/// - native: `frame_length = ceil(rows*columns*samples*bits_allocated / 8)`; with more than one
///   frame the frame size in bits must be a multiple of 8 (else `Unavailable`, e.g. 1-bit data
///   whose frames do not start on byte boundaries); `frames*frame_length` must not exceed the
///   value length (any excess, typically one pad byte, is tolerated) else `Unavailable`.
/// - encapsulated: frames are formed from the fragments, in this order of preference: a
///   non-empty and consistent Basic Offset Table; a consistent Extended Offset Table
///   (7FE0,0001/0002) seen earlier at top level; one fragment per frame when the counts match;
///   all fragments when there is a single frame; for JPEG, JPEG-LS, JPEG 2000 and HTJ2K a new
///   frame at each fragment starting with a codestream start marker; else `Unavailable`. Video
///   syntaxes: see [`Layout::Encapsulated`].
/// - unknown transfer syntax, deflated dataset, or a pixel data encoding that contradicts the
///   transfer syntax: `Unavailable`.
///
/// Errors (`InvalidData` / `UnexpectedEof`) are returned for truncated or malformed datasets.
pub fn locate_frames<R: Read + Seek>(
    reader: &mut R,
    dataset_start: u64,
    ts_uid: &str,
    geometry: &ImageGeometry,
) -> io::Result<Layout> {
    scan_pixel_data(reader, dataset_start, ts_uid, geometry).map(|scan| scan.layout)
}

/// Like [`locate_frames`], and also reports where the pixel data element is (and so where the
/// dataset preceding it ends).
pub fn scan_pixel_data<R: Read + Seek>(
    reader: &mut R,
    dataset_start: u64,
    ts_uid: &str,
    geometry: &ImageGeometry,
) -> io::Result<PixelDataScan> {
    scan(reader, dataset_start, ts_uid, geometry, false)
}

/// The layout [`locate_frames`] will find for native pixel data whose value lies at `value` (from
/// [`super::pixel_data_start`]), before the value itself has arrived: the frames follow from its declared
/// length and the geometry. `None` for a syntax with encapsulated pixel data. Only a forecast: the
/// walk of the whole object decides.
pub fn native_layout_forecast(
    ts_uid: &str,
    value: Extent,
    geometry: &ImageGeometry,
) -> Option<Layout> {
    let ts = TransferSyntaxRegistry.get(ts_uid)?;
    if ts.is_encapsulated_pixel_data() || matches!(ts.codec(), Codec::Dataset(_)) {
        return None;
    }
    Some(native_layout(
        value,
        geometry,
        geometry.number_of_frames.max(1),
    ))
}

// ---------------------------------------------------------------------------------------------
// pixel data

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codestream {
    /// JPEG and JPEG-LS: a frame starts with SOI (FFD8) followed by another marker.
    Jpeg,
    /// JPEG 2000 / HTJ2K: a frame starts with SOC + SIZ (FF4F FF51), or a JP2 signature box.
    J2k,
    /// Video: the fragments form one stream.
    Video,
    /// Anything else: no marker-based splitting.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PixelKind {
    Native,
    Encapsulated(Codestream),
}

pub(crate) fn codestream_kind(uid: &str) -> Codestream {
    let Some(rest) = uid.strip_prefix("1.2.840.10008.1.2.4.") else {
        return Codestream::Other;
    };
    // fragmentable video variants end in ".1"
    let base = rest.split('.').next().unwrap_or("");
    match base.parse::<u32>() {
        // JPEG baseline/extended/lossless (incl. retired processes) and JPEG-LS
        Ok(50..=66) | Ok(70) | Ok(80) | Ok(81) => Codestream::Jpeg,
        Ok(90..=93) | Ok(201..=203) => Codestream::J2k,
        Ok(100..=108) => Codestream::Video,
        _ => Codestream::Other,
    }
}

/// Handle the top-level pixel data element whose header `h` was just read. Returns the layout
/// and the file offset one past the end of the element.
pub(crate) fn pixel_data_layout<R: Read + Seek>(
    cur: &mut Cursor<'_, R>,
    h: &Header,
    enc: Enc,
    kind: PixelKind,
    geometry: &ImageGeometry,
    frames: u32,
    eot: Option<(&[u64], &[u64])>,
) -> io::Result<(Layout, u64)> {
    let value_offset = cur.pos;
    if h.len != UNDEFINED {
        let length = u64::from(h.len);
        cur.check_available(length)?;
        let end = value_offset + length;
        let encapsulated_ts = matches!(kind, PixelKind::Encapsulated(_));
        if h.tag == PIXEL_DATA && encapsulated_ts {
            // encapsulated syntax but native-looking pixel data: inconsistent object
            return Ok((Layout::Unavailable, end));
        }
        let value = Extent {
            offset: value_offset,
            length,
        };
        return Ok((native_layout(value, geometry, frames), end));
    }

    // undefined length: a sequence of fragments
    let codestream = match kind {
        PixelKind::Encapsulated(c) if !enc.big && enc.explicit => c,
        _ => {
            // not valid for this transfer syntax; find the end of the element and give up
            skip_undefined(cur, enc, h.vr, 1)?;
            return Ok((Layout::Unavailable, cur.pos));
        }
    };

    // Basic Offset Table: the first item
    let bot_header = read_header(cur, enc)?;
    if bot_header.tag == SEQUENCE_DELIMITER {
        return Ok((Layout::Unavailable, cur.pos));
    }
    if bot_header.tag != ITEM || bot_header.len == UNDEFINED {
        return Err(invalid(
            "encapsulated pixel data without a valid first item",
        ));
    }
    let bot_len = u64::from(bot_header.len);
    cur.check_available(bot_len)?;
    let mut bot: Vec<u32> = Vec::new();
    if bot_len == u64::from(frames) * 4 {
        bot.reserve_exact(frames as usize);
        for _ in 0..frames {
            bot.push(u32::from_le_bytes(cur.read_array()?));
        }
    } else {
        // empty, or not one entry per frame: ignored
        cur.skip(bot_len)?;
    }

    // fragments
    let first_item = cur.pos;
    let mut fragments: Vec<Fragment> = Vec::new();
    let mut too_many = false;
    loop {
        let item_offset = cur.pos;
        let ih = read_header(cur, enc)?;
        match ih.tag {
            SEQUENCE_DELIMITER => break,
            ITEM if ih.len != UNDEFINED => {
                let length = u64::from(ih.len);
                cur.check_available(length)?;
                if fragments.len() < MAX_FRAGMENTS {
                    fragments.push(Fragment {
                        item_offset: item_offset - first_item,
                        value: Extent {
                            offset: cur.pos,
                            length,
                        },
                    });
                } else {
                    too_many = true;
                }
                cur.skip(length)?;
            }
            _ => return Err(invalid("unexpected element in encapsulated pixel data")),
        }
    }
    let end = cur.pos;
    if too_many || fragments.is_empty() {
        return Ok((Layout::Unavailable, end));
    }

    if codestream == Codestream::Video {
        let stream = fragments.iter().map(|f| f.value).collect();
        return Ok((
            Layout::Encapsulated {
                frames: vec![stream],
            },
            end,
        ));
    }

    let frames_usize = frames as usize;
    let mut starts: Option<Vec<usize>> = None;
    if !bot.is_empty() {
        starts = starts_from_offsets(&fragments, bot.iter().map(|&o| u64::from(o)), None);
    }
    if starts.is_none() {
        if let Some((offsets, lengths)) = eot {
            starts = starts_from_offsets(&fragments, offsets.iter().copied(), Some(lengths));
        }
    }
    if starts.is_none() && fragments.len() == frames_usize {
        starts = Some((0..frames_usize).collect());
    }
    if starts.is_none() && frames == 1 {
        starts = Some(vec![0]);
    }
    if starts.is_none() && matches!(codestream, Codestream::Jpeg | Codestream::J2k) {
        starts = starts_from_markers(cur, &fragments, codestream, frames_usize)?;
    }
    let Some(starts) = starts else {
        return Ok((Layout::Unavailable, end));
    };

    let mut out = Vec::with_capacity(starts.len());
    for (k, &s) in starts.iter().enumerate() {
        let e = starts.get(k + 1).copied().unwrap_or(fragments.len());
        out.push(fragments[s..e].iter().map(|f| f.value).collect());
    }
    Ok((Layout::Encapsulated { frames: out }, end))
}

#[derive(Debug, Clone, Copy)]
struct Fragment {
    /// Offset of the item header relative to the first fragment item header.
    item_offset: u64,
    value: Extent,
}

/// Map per-frame offsets (relative to the first fragment item header) to fragment indices.
/// Requires the first offset to be 0, offsets strictly increasing and each one to be the start of
/// a fragment item. With `lengths` (Extended Offset Table Lengths), each frame's fragments must
/// hold at least that many bytes.
fn starts_from_offsets(
    fragments: &[Fragment],
    offsets: impl Iterator<Item = u64>,
    lengths: Option<&[u64]>,
) -> Option<Vec<usize>> {
    let mut starts: Vec<usize> = Vec::new();
    let mut prev: Option<u64> = None;
    for off in offsets {
        match prev {
            None if off != 0 => return None,
            Some(p) if off <= p => return None,
            _ => {}
        }
        prev = Some(off);
        let idx = fragments
            .binary_search_by_key(&off, |f| f.item_offset)
            .ok()?;
        starts.push(idx);
    }
    if starts.is_empty() {
        return None;
    }
    if let Some(lengths) = lengths {
        if lengths.len() != starts.len() {
            return None;
        }
        for (k, &s) in starts.iter().enumerate() {
            let e = starts.get(k + 1).copied().unwrap_or(fragments.len());
            let total: u64 = fragments[s..e].iter().map(|f| f.value.length).sum();
            if total < lengths[k] {
                return None;
            }
        }
    }
    Some(starts)
}

/// Split fragments into frames at each fragment starting with a codestream start marker.
fn starts_from_markers<R: Read + Seek>(
    cur: &mut Cursor<'_, R>,
    fragments: &[Fragment],
    codestream: Codestream,
    frames: usize,
) -> io::Result<Option<Vec<usize>>> {
    let mut starts = Vec::new();
    for (i, f) in fragments.iter().enumerate() {
        let n = f.value.length.min(12) as usize;
        let mut head = [0u8; 12];
        cur.seek_to(f.value.offset);
        cur.read_into(&mut head[..n])?;
        let head = &head[..n];
        let is_start = match codestream {
            Codestream::Jpeg => head.len() >= 3 && head[..3] == [0xFF, 0xD8, 0xFF],
            Codestream::J2k => {
                head.starts_with(&[0xFF, 0x4F, 0xFF, 0x51])
                    || head.starts_with(&[
                        0, 0, 0, 0x0C, b'j', b'P', b' ', b' ', 0x0D, 0x0A, 0x87, 0x0A,
                    ])
            }
            _ => false,
        };
        if is_start {
            if starts.len() == frames {
                return Ok(None);
            }
            starts.push(i);
        }
    }
    if starts.len() == frames && starts.first() == Some(&0) {
        Ok(Some(starts))
    } else {
        Ok(None)
    }
}

fn native_layout(value: Extent, g: &ImageGeometry, frames: u32) -> Layout {
    let bits = u64::from(g.rows)
        .checked_mul(u64::from(g.columns))
        .and_then(|v| v.checked_mul(u64::from(g.samples_per_pixel)))
        .and_then(|v| v.checked_mul(u64::from(g.bits_allocated)));
    let Some(bits) = bits else {
        return Layout::Unavailable;
    };
    if bits == 0 || (frames > 1 && bits % 8 != 0) {
        return Layout::Unavailable;
    }
    let frame_length = bits.div_ceil(8);
    let frames64 = u64::from(frames);
    match frame_length.checked_mul(frames64) {
        Some(total) if total <= value.length => {
            return Layout::Native {
                value,
                frame_length,
                frames,
            }
        }
        None => return Layout::Unavailable,
        Some(_) => {}
    }
    // Uncompressed YBR_FULL_422 (PS3.3 C.7.6.3.1.2): 3 samples, chroma halved horizontally, so a
    // frame is 2/3 of the nominal size. The geometry does not carry the photometric
    // interpretation, so this is accepted only when the value has exactly that size (plus at
    // most one pad byte).
    if g.samples_per_pixel == 3
        && g.bits_allocated.is_multiple_of(8)
        && frame_length.is_multiple_of(3)
    {
        let subsampled = frame_length / 3 * 2;
        let total = subsampled * frames64;
        if value.length == total || value.length == total + 1 {
            return Layout::Native {
                value,
                frame_length: subsampled,
                frames,
            };
        }
    }
    Layout::Unavailable
}
