//! Bulk data at ingest: large element values stay on disk, whatever their place in the object.
//!
//! dicom-rs parses every element before the pixel data into memory (all of them when there is no
//! pixel data). A private OB of hundreds of megabytes before the pixel data, a large Encapsulated
//! Document or a waveform would be held whole. So before dicom-rs parses the header, [`plan`] walks
//! the element headers (into sequence items at any depth) and picks the values to leave out; dicom-rs
//! then parses a [`View`] of the object in which each of those values is empty (its length field
//! rewritten to 0, the lengths of the sequences and items of defined length that hold it reduced to
//! match, its bytes skipped). The index keeps where every value served as a BulkDataURI lies in the
//! stored object ([`BulkValue`]), so WADO-RS serves it with a ranged read, never the whole object.
//!
//! Which values: every binary value (OB OD OF OL OV OW UN) above [`INLINE_MAX`] bytes is recorded
//! (the DICOM JSON gives it a BulkDataURI); a value of a VR that PS3.18 F.2.7 allows as bulk data
//! above [`LARGE`] bytes is also left out of the parse. What stays in memory is budgeted: past
//! [`HELD_BUDGET`] bytes every bulk-capable value above [`INLINE_MAX`] is left out, and an object
//! whose remaining attributes still take more than [`HELD_MAX`] (huge values of VRs that cannot
//! be bulk data, or hundreds of thousands of elements) is refused.
//!
//! Deflated data sets are not planned: their offsets are not those of the stored bytes, and the
//! inflate checks (`crate::dicom::deflate`) already bound what dicom-rs holds for them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Seek, SeekFrom};

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;
use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::dicom::header::{
    nested_encoding, read_header, short_length_vr, Enc, Header, ITEM, ITEM_DELIMITER,
    SEQUENCE_DELIMITER, UNDEFINED,
};
use crate::dicom::source::Cursor;
use crate::dicom::validate::invalid;
use crate::dicom::walk::skip_items;
use crate::dicom::MAX_DEPTH;

/// Binary values up to this many bytes are returned inline (InlineBinary), larger ones as a
/// BulkDataURI.
pub const INLINE_MAX: u64 = 1024;

/// Values of a bulk-capable VR above this many bytes are left out of the parse.
pub const LARGE: u64 = 64 << 10;

/// Once the values held in memory reach this many bytes, every bulk-capable value above
/// [`INLINE_MAX`] is left out.
pub const HELD_BUDGET: u64 = 16 << 20;

/// An object whose attributes outside bulk data would still take more than this is refused.
pub const HELD_MAX: u64 = 32 << 20;

/// What an element costs in memory besides its value (dicom-rs's element, its JSON), and what a
/// recorded bulk value costs (its path and extent, in the plan and in the index row).
const ELEMENT_COST: u64 = 64;
const RECORD_COST: u64 = 128;

/// Where a value served as a BulkDataURI lies in the stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BulkValue {
    pub offset: u64,
    pub length: u64,
    /// Size of the words to byte-swap into little endian (big endian objects), 0 for none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub swap: u8,
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// The result of [`plan`].
#[derive(Debug, Default)]
pub struct BulkPlan {
    /// Every recorded value by its bulk path (`TTTTTTTT`, `SSSSSSSS/item/TTTTTTTT`, ...).
    pub values: BTreeMap<String, BulkValue>,
    /// The paths of the values left out of the parse (a subset of `values`' keys).
    pub left_out: BTreeSet<String>,
    /// How the view differs from the stored object, by stored offset.
    edits: Vec<Edit>,
}

#[derive(Debug, Clone, Copy)]
enum Edit {
    /// A length field (`width` bytes) rewritten.
    Length { at: u64, width: u8, bytes: [u8; 4] },
    /// A value skipped.
    Skip { at: u64, length: u64 },
}

impl Edit {
    fn at(&self) -> u64 {
        match *self {
            Edit::Length { at, .. } | Edit::Skip { at, .. } => at,
        }
    }
}

impl BulkPlan {
    /// Whether dicom-rs can parse the object as stored.
    pub fn leaves_out_nothing(&self) -> bool {
        self.edits.is_empty()
    }

    /// The recorded values as the index keeps them (a JSON object, path -> extent).
    pub fn values_json(&self) -> String {
        serde_json::to_string(&self.values).expect("bulk values serialise")
    }

    /// The object as dicom-rs is to parse it: `reader` with the left-out values empty.
    pub fn view<'r, R: Read + Seek>(&self, reader: &'r mut R) -> io::Result<View<'r, R>> {
        let file_len = reader.seek(SeekFrom::End(0))?;
        let mut edits = self.edits.clone();
        edits.sort_by_key(Edit::at);
        let (mut segments, mut src, mut at) = (Vec::new(), 0u64, 0u64);
        let copy = |segments: &mut Vec<Segment>, from: u64, to: u64, at: &mut u64| {
            if to > from {
                segments.push(Segment {
                    at: *at,
                    len: to - from,
                    source: Source::Stored(from),
                });
                *at += to - from;
            }
        };
        for edit in edits {
            copy(&mut segments, src, edit.at(), &mut at);
            match edit {
                Edit::Length {
                    at: field,
                    width,
                    bytes,
                } => {
                    segments.push(Segment {
                        at,
                        len: u64::from(width),
                        source: Source::Bytes(bytes),
                    });
                    at += u64::from(width);
                    src = field + u64::from(width);
                }
                Edit::Skip { at: value, length } => src = value + length,
            }
        }
        copy(&mut segments, src, file_len, &mut at);
        Ok(View {
            inner: reader,
            segments,
            len: at,
            pos: 0,
            inner_pos: None,
        })
    }
}

/// Walks the data set of the object in `reader` (everything dicom-rs parses: the top level up to
/// the pixel data, and every sequence item) and plans what to leave out. Its lengths were checked
/// against the object's size already (`crate::dicom::check_before_parse`, or the early header's walk).
pub fn plan<R: Read + Seek>(
    reader: &mut R,
    dataset_start: u64,
    ts_uid: &str,
) -> io::Result<BulkPlan> {
    let Some(ts) = TransferSyntaxRegistry.get(ts_uid) else {
        return Ok(BulkPlan::default());
    };
    if matches!(ts.codec(), Codec::Dataset(_)) {
        return Ok(BulkPlan::default());
    }
    let Some(enc) = Enc::of(ts) else {
        return Ok(BulkPlan::default());
    };
    let mut cur = Cursor::new(reader)?;
    cur.seek_to(dataset_start);
    let mut planner = Planner {
        big_endian: enc.big,
        path: Vec::new(),
        open: Vec::new(),
        held: 0,
        plan: BulkPlan::default(),
    };
    planner.dataset(&mut cur, enc, None, 0)?;
    Ok(planner.plan)
}

/// A sequence or item of defined length being walked, whose length shrinks by what is left out
/// inside it.
struct Open {
    /// Where its 32-bit length field is, and its value.
    field: u64,
    len: u32,
    removed: u64,
}

struct Planner {
    big_endian: bool,
    /// (sequence tag, item index) from the top level down to the current data set.
    path: Vec<(Tag, usize)>,
    open: Vec<Open>,
    /// What the values and elements held in memory cost so far.
    held: u64,
    plan: BulkPlan,
}

impl Planner {
    /// The elements of a data set: the top level (`depth` 0: up to the pixel data or the end), an
    /// item of defined length (up to `end`) or of undefined length (up to its delimiter).
    fn dataset<R: Read + Seek>(
        &mut self,
        cur: &mut Cursor<'_, R>,
        enc: Enc,
        end: Option<u64>,
        depth: u32,
    ) -> io::Result<()> {
        loop {
            match end {
                Some(end) if cur.pos >= end => return self.ends_at(cur, end),
                None if depth == 0 && cur.remaining() == 0 => return Ok(()),
                _ => {}
            }
            let h = read_header(cur, enc)?;
            if depth > 0 && end.is_none() && h.tag == ITEM_DELIMITER {
                return Ok(());
            }
            if h.tag.0 == 0xFFFE {
                return Err(invalid("unexpected item or delimiter in a data set"));
            }
            // dicom-rs reads the top level up to (not including) the pixel data.
            if depth == 0 && h.tag >= (0x7FE0, 0x0010) {
                return Ok(());
            }
            let tag = Tag(h.tag.0, h.tag.1);
            let vr = vr_of(&h, tag);
            self.held += ELEMENT_COST;
            if h.len == UNDEFINED {
                let nested = nested_encoding(enc, h.vr);
                if matches!(vr, VR::OB | VR::OW) {
                    // encapsulated fragments (e.g. an icon's compressed pixel data)
                    skip_items(cur, nested, depth + 1)?;
                } else {
                    self.items(cur, nested, tag, None, depth + 1)?;
                }
            } else if vr == VR::SQ {
                let end = cur.pos + u64::from(h.len);
                self.open.push(Open {
                    field: cur.pos - 4,
                    len: h.len,
                    removed: 0,
                });
                self.items(cur, enc, tag, Some(end), depth + 1)?;
                self.close();
            } else {
                self.value(cur, enc, &h, tag, vr)?;
            }
            if self.held > HELD_MAX {
                return Err(invalid(
                    "the attributes outside bulk data take more than 32 MiB of memory",
                ));
            }
        }
    }

    /// The items of a sequence, of defined length (up to `end`) or not (up to its delimiter).
    fn items<R: Read + Seek>(
        &mut self,
        cur: &mut Cursor<'_, R>,
        enc: Enc,
        sequence: Tag,
        end: Option<u64>,
        depth: u32,
    ) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(invalid("sequences nested too deeply"));
        }
        let mut index = 0;
        loop {
            if let Some(end) = end {
                if cur.pos >= end {
                    return self.ends_at(cur, end);
                }
            }
            let h = read_header(cur, enc)?;
            match h.tag {
                SEQUENCE_DELIMITER if end.is_none() => return Ok(()),
                ITEM => {
                    self.path.push((sequence, index));
                    if h.len == UNDEFINED {
                        self.dataset(cur, enc, None, depth)?;
                    } else {
                        let end = cur.pos + u64::from(h.len);
                        self.open.push(Open {
                            field: cur.pos - 4,
                            len: h.len,
                            removed: 0,
                        });
                        self.dataset(cur, enc, Some(end), depth)?;
                        self.close();
                    }
                    self.path.pop();
                    index += 1;
                }
                _ => return Err(invalid("expected an item or sequence delimiter")),
            }
        }
    }

    fn ends_at<R: Read + Seek>(&self, cur: &Cursor<'_, R>, end: u64) -> io::Result<()> {
        if cur.pos == end {
            Ok(())
        } else {
            Err(invalid(
                "an element runs past the end of its sequence or item",
            ))
        }
    }

    /// Closes the innermost sequence or item of defined length: its length is rewritten when
    /// something inside it was left out.
    fn close(&mut self) {
        let open = self.open.pop().expect("an open sequence or item");
        if open.removed > 0 {
            // the removed values lie inside it: no underflow
            let len = open.len - open.removed as u32;
            self.plan.edits.push(Edit::Length {
                at: open.field,
                width: 4,
                bytes: self.length_bytes(len),
            });
        }
    }

    fn length_bytes(&self, len: u32) -> [u8; 4] {
        if self.big_endian {
            len.to_be_bytes()
        } else {
            len.to_le_bytes()
        }
    }

    /// A primitive value of defined length: recorded, left out, or held.
    fn value<R: Read + Seek>(
        &mut self,
        cur: &mut Cursor<'_, R>,
        enc: Enc,
        h: &Header,
        tag: Tag,
        vr: VR,
    ) -> io::Result<()> {
        let (offset, length) = (cur.pos, u64::from(h.len));
        cur.skip(length)?;
        let large = if self.held > HELD_BUDGET {
            INLINE_MAX
        } else {
            LARGE
        };
        let leave_out = bulk_capable(vr) && length > large;
        let binary = matches!(
            vr,
            VR::OB | VR::OD | VR::OF | VR::OL | VR::OV | VR::OW | VR::UN
        );
        if !(leave_out || binary && length > INLINE_MAX) {
            self.held += length;
            return Ok(());
        }
        let path = self.path_of(tag);
        self.held += RECORD_COST + path.len() as u64;
        let swap = if self.big_endian { word_size(vr) } else { 0 };
        self.plan.values.insert(
            path.clone(),
            BulkValue {
                offset,
                length,
                swap,
            },
        );
        if !leave_out {
            self.held += length;
            return Ok(());
        }
        self.plan.left_out.insert(path);
        // An explicit VR with a 16-bit length field (e.g. DS) once the budget is spent.
        let width: u8 = match h.vr {
            Some(raw) if enc.explicit && short_length_vr(raw) => 2,
            _ => 4,
        };
        let mut bytes = [0u8; 4];
        if width == 4 {
            bytes = self.length_bytes(0);
        }
        self.plan.edits.push(Edit::Length {
            at: offset - u64::from(width),
            width,
            bytes,
        });
        self.plan.edits.push(Edit::Skip { at: offset, length });
        for open in &mut self.open {
            open.removed += length;
        }
        Ok(())
    }

    fn path_of(&self, tag: Tag) -> String {
        let mut path = String::with_capacity(9 * (self.path.len() * 2 + 1));
        for (sequence, index) in &self.path {
            path.push_str(&format!("{:04X}{:04X}/{index}/", sequence.0, sequence.1));
        }
        path.push_str(&format!("{:04X}{:04X}", tag.0, tag.1));
        path
    }
}

/// The VR dicom-rs gives an element: explicit in the data set, else from the dictionary (UN for
/// tags it does not know).
fn vr_of(h: &Header, tag: Tag) -> VR {
    match h.vr {
        Some(raw) => VR::from_binary(raw).unwrap_or(VR::UN),
        None => StandardDataDictionary
            .by_tag(tag)
            .map(|entry| entry.vr().relaxed())
            .unwrap_or(VR::UN),
    }
}

/// VRs that PS3.18 F.2.7 allows to be sent as bulk data.
fn bulk_capable(vr: VR) -> bool {
    matches!(
        vr,
        VR::DS
            | VR::FL
            | VR::FD
            | VR::IS
            | VR::LT
            | VR::OB
            | VR::OD
            | VR::OF
            | VR::OL
            | VR::OV
            | VR::OW
            | VR::SL
            | VR::SS
            | VR::ST
            | VR::SV
            | VR::UC
            | VR::UL
            | VR::UN
            | VR::UR
            | VR::US
            | VR::UT
            | VR::UV
    )
}

/// The size of the words of a VR's values, which a big endian object stores byte-swapped.
fn word_size(vr: VR) -> u8 {
    match vr {
        VR::OW | VR::US | VR::SS => 2,
        VR::OL | VR::OF | VR::UL | VR::SL | VR::FL => 4,
        VR::OD | VR::OV | VR::FD | VR::SV | VR::UV => 8,
        _ => 0,
    }
}

/// Puts the words of a big endian value into little endian order, in place (`data` starts on a
/// word boundary; a trailing partial word is left as it is).
pub fn swap_words(data: &mut [u8], swap: u8) {
    if swap > 1 {
        for word in data.chunks_exact_mut(usize::from(swap)) {
            word.reverse();
        }
    }
}

/// One piece of the view: a run of the stored object, or rewritten bytes.
#[derive(Debug)]
struct Segment {
    /// Offset in the view.
    at: u64,
    len: u64,
    source: Source,
}

#[derive(Debug)]
enum Source {
    /// From this offset of the stored object.
    Stored(u64),
    Bytes([u8; 4]),
}

/// The stored object with the left-out values empty (see [`BulkPlan::view`]), read and sought like
/// a file.
pub struct View<'r, R> {
    inner: &'r mut R,
    segments: Vec<Segment>,
    len: u64,
    pos: u64,
    /// Where `inner` is, when known (it is sought only after a skipped value).
    inner_pos: Option<u64>,
}

impl<R: Read + Seek> Read for View<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let i = self.segments.partition_point(|s| s.at + s.len <= self.pos);
        let segment = &self.segments[i];
        let within = self.pos - segment.at;
        let n = (segment.len - within).min(buf.len() as u64) as usize;
        let n = match segment.source {
            Source::Bytes(bytes) => {
                buf[..n].copy_from_slice(&bytes[within as usize..within as usize + n]);
                n
            }
            Source::Stored(from) => {
                let at = from + within;
                if self.inner_pos != Some(at) {
                    self.inner_pos = None;
                    self.inner.seek(SeekFrom::Start(at))?;
                }
                let n = self.inner.read(&mut buf[..n])?;
                self.inner_pos = Some(at + n as u64);
                n
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> Seek for View<'_, R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        };
        self.pos = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before start"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::header::HasLength;
    use dicom_core::Length;

    /// Explicit VR LE data set bytes of one element with a 32-bit length.
    fn long(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
        out
    }

    fn short(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        out.extend_from_slice(value);
        out
    }

    fn item(body: &[u8]) -> Vec<u8> {
        let mut out = vec![0xFE, 0xFF, 0x00, 0xE0];
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    fn part10(dataset: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        let group = [
            long((0x0002, 0x0001), b"OB", &[0, 1]),
            short((0x0002, 0x0002), b"UI", b"1.2\0"),
            short((0x0002, 0x0003), b"UI", b"1.3\0"),
            short((0x0002, 0x0010), b"UI", b"1.2.840.10008.1.2.1\0"),
        ]
        .concat();
        let length = (group.len() as u32).to_le_bytes();
        out.extend_from_slice(&short((0x0002, 0x0000), b"UL", &length));
        out.extend_from_slice(&group);
        out.extend_from_slice(dataset);
        out
    }

    /// A large OB inside a defined-length item of a defined-length sequence, and one at the top
    /// level: both are left out, the lengths around them shrink, and dicom-rs parses the view into
    /// the same elements with those two empty.
    #[test]
    fn large_values_are_left_out_of_the_parse() {
        let big = vec![7u8; (LARGE + 1) as usize];
        let small = vec![1u8; 2000];
        let nested = [
            short((0x0008, 0x0100), b"SH", b"CODE"),
            long((0x0009, 0x1002), b"OB", &big),
        ]
        .concat();
        let sequence = item(&nested);
        let dataset = [
            short((0x0008, 0x0016), b"UI", b"1.2\0"),
            long((0x0008, 0x1115), b"SQ", &sequence),
            long((0x0009, 0x1001), b"OB", &big),
            long((0x0009, 0x1003), b"OB", &small),
            short((0x0010, 0x0010), b"PN", b"Doe^J "),
        ]
        .concat();
        let bytes = part10(&dataset);
        let mut reader = io::Cursor::new(&bytes);
        let start = bytes.len() as u64 - dataset.len() as u64;
        let plan = plan(&mut reader, start, "1.2.840.10008.1.2.1").unwrap();
        let paths: Vec<&str> = plan.values.keys().map(String::as_str).collect();
        assert_eq!(paths, ["00081115/0/00091002", "00091001", "00091003"]);
        assert_eq!(
            plan.left_out.iter().collect::<Vec<_>>(),
            ["00081115/0/00091002", "00091001"]
        );
        let top = plan.values["00091001"];
        assert_eq!(
            &bytes[top.offset as usize..][..top.length as usize],
            &big[..]
        );

        let mut view_bytes = Vec::new();
        plan.view(&mut reader)
            .unwrap()
            .read_to_end(&mut view_bytes)
            .unwrap();
        assert_eq!(view_bytes.len(), bytes.len() - 2 * big.len());
        let obj = dicom_object::OpenFileOptions::new()
            .read_preamble(dicom_object::file::ReadPreamble::Always)
            .from_reader(&view_bytes[..])
            .unwrap();
        assert_eq!(obj.get(Tag(0x0009, 0x1001)).unwrap().length(), Length(0));
        assert_eq!(
            obj.get(Tag(0x0009, 0x1003))
                .unwrap()
                .to_bytes()
                .unwrap()
                .len(),
            2000
        );
        let items = obj.get(Tag(0x0008, 0x1115)).unwrap().items().unwrap();
        assert_eq!(
            items[0].get(Tag(0x0009, 0x1002)).unwrap().length(),
            Length(0)
        );
        assert_eq!(
            items[0].get(Tag(0x0008, 0x0100)).unwrap().to_str().unwrap(),
            "CODE"
        );
        assert_eq!(
            obj.get(Tag(0x0010, 0x0010)).unwrap().to_str().unwrap(),
            "Doe^J"
        );
    }

    #[test]
    fn big_endian_words_are_swapped() {
        let mut data = [1, 2, 3, 4, 5];
        swap_words(&mut data, 2);
        assert_eq!(data, [2, 1, 4, 3, 5]);
        swap_words(&mut data, 0);
        assert_eq!(data, [2, 1, 4, 3, 5]);
    }
}
