//! Streamed re-encoding of a native Part-10 object (Implicit VR Little Endian, Explicit VR Little
//! or Big Endian, Deflated Explicit VR Little Endian) into Explicit VR Little Endian, as WADO-RS
//! sends it by default: element by element as the object is read, values copied through in pieces
//! (byte-swapped from big endian by the size of their words), so memory stays bounded whatever
//! the object's size.
//!
//! Implicit VR elements get the dictionary's VR (UN for tags it does not know, whose bytes are then
//! Implicit VR Little Endian as PS3.5 6.2.2 wants them; LO for private creators); a value too long
//! for its VR's 16-bit length field goes out as UN. Sequences and items are written with undefined
//! lengths, so no length has to be known before its content is, and group length elements of the
//! data set (retired, and wrong once lengths change) are left out.

use std::io::{self, Read};

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;
use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::dicom::header::{
    decode_header, nested_encoding, short_length_vr, Enc, Header, ITEM, ITEM_DELIMITER,
    SEQUENCE_DELIMITER, UNDEFINED,
};
use crate::dicom::MAX_DEPTH;

use super::transcode::EXPLICIT_VR_LE;

/// Output is handed over in pieces of about this size.
const PIECE: usize = 256 * 1024;

/// Re-encodes the Part-10 object read from `input`, handing the output to `emit` piece by piece.
pub fn to_explicit_le_streamed<'a>(
    input: impl Read + 'a,
    emit: &mut dyn FnMut(Vec<u8>) -> io::Result<()>,
) -> io::Result<()> {
    let mut input = Input::new(Box::new(input));
    let mut out = Output {
        buf: Vec::with_capacity(PIECE + 64 * 1024),
        emit,
    };
    let preamble = input.read_vec(132)?;
    if &preamble[128..] != b"DICM" {
        return Err(invalid("not a DICOM Part-10 file: missing DICM prefix"));
    }
    out.put(&preamble);
    let ts_uid = copy_meta(&mut input, &mut out)?;
    let ts = TransferSyntaxRegistry
        .get(&ts_uid)
        .ok_or_else(|| invalid("unknown transfer syntax"))?;
    if ts.is_encapsulated_pixel_data() {
        return Err(invalid("encapsulated pixel data cannot be re-encoded"));
    }
    let enc = Enc::of(ts).ok_or_else(|| invalid("transfer syntax without a decoder"))?;
    let mut walk = Walk {
        bits_allocated: 0,
        big: enc.big,
    };
    if matches!(ts.codec(), Codec::Dataset(_)) {
        // Deflated: the data set is one raw deflate stream, inflated as it is read.
        let rest = input.into_rest();
        let mut inflated = Input::new(Box::new(flate2::read::DeflateDecoder::new(rest)));
        walk.dataset(&mut inflated, &mut out, enc, None, 0)?;
    } else {
        walk.dataset(&mut input, &mut out, enc, None, 0)?;
    }
    out.flush()
}

/// Copies the file meta group with the transfer syntax replaced (and its group length
/// recomputed); returns the stored transfer syntax UID.
fn copy_meta(input: &mut Input<'_>, out: &mut Output) -> io::Result<String> {
    let mut elements = Vec::new();
    let mut ts_uid = None;
    while input.peek(2)?.is_some_and(|b| b == [0x02, 0x00]) {
        let head = input.read_vec(6)?;
        let vr = [head[4], head[5]];
        let len = if short_length_vr(vr) {
            u32::from(u16::from_le_bytes(input.read_array()?))
        } else {
            let b: [u8; 6] = input.read_array()?;
            u32::from_le_bytes([b[2], b[3], b[4], b[5]])
        };
        if len == UNDEFINED || len > 1 << 20 {
            return Err(invalid("malformed file meta group"));
        }
        let value = input.read_vec(len as usize)?;
        let element = u16::from_le_bytes([head[2], head[3]]);
        match element {
            0x0000 => {}
            0x0010 => {
                let uid = String::from_utf8_lossy(&value);
                ts_uid = Some(uid.trim_end_matches(['\0', ' ']).to_string());
                let mut new = EXPLICIT_VR_LE.as_bytes().to_vec();
                new.push(0);
                elements.push((element, vr, new));
            }
            _ => elements.push((element, vr, value)),
        }
    }
    let encoded: Vec<Vec<u8>> = elements
        .into_iter()
        .map(|(element, vr, value)| {
            let mut e = Vec::with_capacity(12 + value.len());
            e.extend_from_slice(&[0x02, 0x00]);
            e.extend_from_slice(&element.to_le_bytes());
            e.extend_from_slice(&vr);
            if short_length_vr(vr) {
                e.extend_from_slice(&(value.len() as u16).to_le_bytes());
            } else {
                e.extend_from_slice(&[0, 0]);
                e.extend_from_slice(&(value.len() as u32).to_le_bytes());
            }
            e.extend_from_slice(&value);
            e
        })
        .collect();
    let group_len: usize = encoded.iter().map(Vec::len).sum();
    out.put(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
    out.put(&(group_len as u32).to_le_bytes());
    for e in encoded {
        out.put(&e);
    }
    ts_uid.ok_or_else(|| invalid("file meta group has no transfer syntax UID"))
}

struct Walk {
    /// Bits Allocated of the top level, which sets the word size of big endian OW pixel data.
    bits_allocated: u16,
    big: bool,
}

impl Walk {
    /// A data set: the top level (to the end), an item of defined length (to `end`) or of
    /// undefined length (to its delimiter, which is written).
    fn dataset(
        &mut self,
        input: &mut Input<'_>,
        out: &mut Output,
        enc: Enc,
        end: Option<u64>,
        depth: u32,
    ) -> io::Result<()> {
        loop {
            match end {
                Some(end) if input.pos >= end => return Ok(()),
                None if depth == 0 && input.peek(1)?.is_none() => return Ok(()),
                _ => {}
            }
            let h = read_header(input, enc)?;
            if h.tag == ITEM_DELIMITER && depth > 0 && end.is_none() {
                out.item_header(ITEM_DELIMITER, 0);
                return Ok(());
            }
            if h.tag.0 == 0xFFFE {
                return Err(invalid("unexpected item or delimiter in a data set"));
            }
            let tag = Tag(h.tag.0, h.tag.1);
            let vr = vr_of(&h, tag);
            if h.len == UNDEFINED {
                if vr == VR::SQ || (!enc.explicit && !matches!(vr, VR::OB | VR::OW)) {
                    out.header(tag, VR::SQ, UNDEFINED);
                    self.items(input, out, nested_encoding(enc, h.vr), None, depth + 1)?;
                    out.item_header(SEQUENCE_DELIMITER, 0);
                } else {
                    // UN holding Implicit VR LE items, or fragments: copied as they are.
                    out.header(tag, vr, UNDEFINED);
                    copy_undefined(input, out, nested_encoding(enc, h.vr), depth + 1)?;
                }
                continue;
            }
            let len = u64::from(h.len);
            if vr == VR::SQ {
                out.header(tag, VR::SQ, UNDEFINED);
                self.items(input, out, enc, Some(input.pos + len), depth + 1)?;
                out.item_header(SEQUENCE_DELIMITER, 0);
                continue;
            }
            if tag.element() == 0x0000 {
                input.skip(len)?;
                continue;
            }
            let vr = if short_length_vr(vr_bytes(vr)) && h.len > 0xFFFF {
                VR::UN
            } else {
                vr
            };
            let swap = if !self.big {
                0
            } else if depth == 0 && tag == Tag(0x7FE0, 0x0010) && vr == VR::OW {
                (self.bits_allocated / 8).max(2) as usize
            } else {
                word_size(vr)
            };
            out.header(tag, vr, h.len);
            if depth == 0 && tag == Tag(0x0028, 0x0100) && len == 2 {
                let b: [u8; 2] = input.read_array()?;
                self.bits_allocated = enc.u16(b);
                out.put(&self.bits_allocated.to_le_bytes());
                continue;
            }
            out.copy(input, len, swap)?;
        }
    }

    /// The items of a sequence, of defined length (to `end`) or not (to its delimiter).
    fn items(
        &mut self,
        input: &mut Input<'_>,
        out: &mut Output,
        enc: Enc,
        end: Option<u64>,
        depth: u32,
    ) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(invalid("sequences nested too deeply"));
        }
        loop {
            if let Some(end) = end {
                if input.pos >= end {
                    return Ok(());
                }
            }
            let h = read_header(input, enc)?;
            match h.tag {
                SEQUENCE_DELIMITER if end.is_none() => return Ok(()),
                ITEM => {
                    out.item_header(ITEM, UNDEFINED);
                    if h.len == UNDEFINED {
                        self.dataset(input, out, enc, None, depth)?;
                    } else {
                        let end = input.pos + u64::from(h.len);
                        self.dataset(input, out, enc, Some(end), depth)?;
                        out.item_header(ITEM_DELIMITER, 0);
                    }
                }
                _ => return Err(invalid("expected an item or sequence delimiter")),
            }
        }
    }
}

/// Copies the items of an undefined-length value (in Implicit VR LE, or fragments) as they are, up
/// to and including its sequence delimiter.
fn copy_undefined(input: &mut Input<'_>, out: &mut Output, enc: Enc, depth: u32) -> io::Result<()> {
    if enc.big {
        return Err(invalid("undefined-length value in a big endian data set"));
    }
    // undefined-length sequences and items open, this value's included
    let mut open = 1;
    loop {
        let h = read_header(input, enc)?;
        if enc.explicit && h.tag.0 != 0xFFFE {
            return Err(invalid("an element among fragments"));
        }
        out.item_header(h.tag, h.len);
        match h.tag {
            SEQUENCE_DELIMITER | ITEM_DELIMITER => {
                open -= 1;
                if open == 0 {
                    return Ok(());
                }
            }
            _ if h.len == UNDEFINED => {
                open += 1;
                if depth + open > MAX_DEPTH * 2 {
                    return Err(invalid("sequences nested too deeply"));
                }
            }
            _ => out.copy(input, u64::from(h.len), 0)?,
        }
    }
}

fn read_header(input: &mut Input<'_>, enc: Enc) -> io::Result<Header> {
    let (mut header, long) = decode_header(enc, input.read_array()?);
    if long {
        header.len = enc.u32(input.read_array()?);
    }
    Ok(header)
}

/// The element's VR: explicit, else the dictionary's (LO for private creators, UN when unknown).
fn vr_of(h: &Header, tag: Tag) -> VR {
    if let Some(raw) = h.vr {
        return VR::from_binary(raw).unwrap_or(VR::UN);
    }
    if tag.group() % 2 == 1 && (0x0010..=0x00FF).contains(&tag.element()) {
        return VR::LO;
    }
    StandardDataDictionary
        .by_tag(tag)
        .map(|entry| entry.vr().relaxed())
        .unwrap_or(VR::UN)
}

fn vr_bytes(vr: VR) -> [u8; 2] {
    let s = vr.to_string().as_bytes();
    [s[0], s[1]]
}

/// The size of the words of a VR's values, which a big endian object stores byte-swapped.
fn word_size(vr: VR) -> usize {
    match vr {
        VR::OW | VR::US | VR::SS | VR::AT => 2,
        VR::OL | VR::OF | VR::UL | VR::SL | VR::FL => 4,
        VR::OD | VR::OV | VR::FD | VR::SV | VR::UV => 8,
        _ => 0,
    }
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The input, read forward through a buffer that allows a short look ahead.
struct Input<'a> {
    inner: Box<dyn Read + 'a>,
    buf: Vec<u8>,
    start: usize,
    /// Offset of the next byte in the data set or file being read.
    pos: u64,
}

impl<'a> Input<'a> {
    fn new(inner: Box<dyn Read + 'a>) -> Input<'a> {
        Input {
            inner,
            buf: Vec::with_capacity(PIECE),
            start: 0,
            pos: 0,
        }
    }

    /// The next `n` bytes without consuming them; `None` at the end of the input (and an error
    /// when it ends within them).
    fn peek(&mut self, n: usize) -> io::Result<Option<&[u8]>> {
        while self.buf.len() - self.start < n {
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let have = self.buf.len();
            self.buf.resize(have.max(PIECE).max(n), 0);
            let got = loop {
                match self.inner.read(&mut self.buf[have..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            let got = got.inspect_err(|_| self.buf.truncate(have))?;
            self.buf.truncate(have + got);
            if got == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "object ends within an element",
                    ))
                };
            }
        }
        Ok(Some(&self.buf[self.start..self.start + n]))
    }

    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.peek(n)?.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "object ends within an element",
            ));
        }
        let at = self.start;
        self.start += n;
        self.pos += n as u64;
        Ok(&self.buf[at..at + n])
    }

    fn read_array<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn read_vec(&mut self, n: usize) -> io::Result<Vec<u8>> {
        Ok(self.take(n)?.to_vec())
    }

    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            let step = n.min(PIECE as u64) as usize;
            self.take(step)?;
            n -= step as u64;
        }
        Ok(())
    }

    /// What is left: the buffered bytes, then the rest of the input (positions start again at 0).
    fn into_rest(self) -> impl Read + 'a {
        io::Cursor::new(self.buf[self.start..].to_vec()).chain(self.inner)
    }
}

/// The output, handed over in pieces.
struct Output<'e> {
    buf: Vec<u8>,
    emit: &'e mut dyn FnMut(Vec<u8>) -> io::Result<()>,
}

impl Output<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn header(&mut self, tag: Tag, vr: VR, len: u32) {
        self.put(&tag.group().to_le_bytes());
        self.put(&tag.element().to_le_bytes());
        let vr = vr_bytes(vr);
        self.put(&vr);
        if short_length_vr(vr) {
            self.put(&(len as u16).to_le_bytes());
        } else {
            self.put(&[0, 0]);
            self.put(&len.to_le_bytes());
        }
    }

    fn item_header(&mut self, tag: (u16, u16), len: u32) {
        self.put(&tag.0.to_le_bytes());
        self.put(&tag.1.to_le_bytes());
        self.put(&len.to_le_bytes());
    }

    /// Copies `len` bytes of a value, byte-swapping words of `swap` bytes.
    fn copy(&mut self, input: &mut Input<'_>, mut len: u64, swap: usize) -> io::Result<()> {
        // whole words per step, so no word is split between two steps
        let step_max = PIECE / 8 * 8;
        while len > 0 {
            let step = len.min(step_max as u64) as usize;
            let bytes = input.take(step)?;
            let at = self.buf.len();
            self.buf.extend_from_slice(bytes);
            if swap > 1 {
                for word in self.buf[at..].chunks_exact_mut(swap) {
                    word.reverse();
                }
            }
            len -= step as u64;
            if self.buf.len() >= PIECE {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE + 64 * 1024));
        (self.emit)(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::header::Header;

    /// Every native sample re-encodes, streamed, to the data set dicom-rs's whole-object
    /// re-encoding gives.
    #[test]
    fn streamed_reencoding_agrees_with_dicom_rs() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        let mut checked = 0;
        for dir in ["pydicom", "pydicom-charsets", "derived"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_none_or(|e| e != "dcm") {
                    continue;
                }
                let bytes = std::fs::read(&path).unwrap();
                let native = crate::dicom::read_meta_extent(&mut std::io::Cursor::new(&bytes))
                    .ok()
                    .and_then(|(_, ts)| TransferSyntaxRegistry.get(&ts))
                    .is_some_and(|ts| !ts.is_encapsulated_pixel_data());
                let Ok(expected) = super::super::transcode::to_explicit_le(&bytes) else {
                    continue;
                };
                if !native {
                    continue;
                }
                let mut streamed = Vec::new();
                let result = to_explicit_le_streamed(&bytes[..], &mut |piece| {
                    streamed.extend_from_slice(&piece);
                    Ok(())
                });
                let name = path.display();
                result.unwrap_or_else(|e| panic!("{name}: {e}"));
                let read = |b: &[u8]| {
                    dicom_object::OpenFileOptions::new()
                        .read_preamble(dicom_object::file::ReadPreamble::Always)
                        .from_reader(b)
                        .unwrap_or_else(|e| panic!("{name}: {e}"))
                };
                let (a, b) = (read(&expected), read(&streamed));
                assert_eq!(
                    b.meta().transfer_syntax().trim_end_matches('\0'),
                    EXPLICIT_VR_LE
                );
                for element in a.iter() {
                    let tag = element.tag();
                    if tag.element() == 0 {
                        continue;
                    }
                    let other = b
                        .get(tag)
                        .unwrap_or_else(|| panic!("{name}: {tag} missing"));
                    if let (Ok(x), Ok(y)) = (element.to_bytes(), other.to_bytes()) {
                        assert_eq!(x, y, "{name}: {tag}");
                    }
                }
                checked += 1;
            }
        }
        assert!(checked > 30, "only {checked} samples re-encoded");
    }
}
