//! Hardening: what the walks refuse, so that no input makes the gateway (or dicom-rs after it)
//! panic, read past the object, or allocate for a length the object only claims.
//!
//! - Declared lengths: every value, item and table is checked against the bytes that are really
//!   there before it is skipped or read (`Cursor::check_available`), and a table is allocated only
//!   once the object is known to hold it.
//! - Nesting: sequences and items deeper than [`MAX_DEPTH`] are refused, so recursion is bounded.
//! - The UN-with-items refusal ([`refuse_un_items`]) before dicom-rs parses an object.
//! - Deflated data sets are walked inflated, with the inflate caps of `deflate`.
//!
//! [`check_before_parse`] runs all of it over a whole object before dicom-rs parses its header.

use std::io::{self, Read, Seek, SeekFrom};

use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::deflate;
use super::frames::{ImageGeometry, PixelKind};
use super::header::{read_header, Enc, SEQUENCE_DELIMITER};
use super::source::Cursor;
use super::walk::{scan, walk};

/// Maximum nesting depth of sequences/items accepted before the input is rejected.
pub const MAX_DEPTH: u32 = 64;

/// Maximum number of fragments recorded for encapsulated pixel data; beyond that the layout is
/// reported as unavailable (keeps memory bounded on hostile input).
pub(crate) const MAX_FRAGMENTS: usize = 1 << 22;

/// Refuses a nesting deeper than [`MAX_DEPTH`].
pub(crate) fn check_depth(depth: u32) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(invalid("sequences nested too deeply"));
    }
    Ok(())
}

/// Called at the value of a UN element of undefined length (PS3.5 6.2.2, CP-246: its items in
/// Implicit VR Little Endian) in a walk that clears an object for dicom-rs. dicom-rs 0.10 reads
/// such a UN's items in the data set's own explicit encoding, taking item bytes for a VR and a
/// length: a 674-byte object made it allocate 3.7 GB. So one that holds items is refused; an empty
/// one (just its delimiter) both read alike.
pub(crate) fn refuse_un_items<R: Read + Seek>(
    cur: &mut Cursor<'_, R>,
    nested: Enc,
) -> io::Result<()> {
    match read_header(cur, nested)?.tag {
        SEQUENCE_DELIMITER => Ok(()),
        _ => Err(invalid(
            "UN element of undefined length holding items (CP-246) is not supported",
        )),
    }
}

/// Walks a whole object before dicom-rs parses its header: every declared length is checked against
/// the object's size (so the parser never allocates for a length the object only claims), and what
/// dicom-rs would misread is refused (see [`refuse_un_items`]).
///
/// A deflated data set is inflated (twice, keeping nothing: once to measure it, once to walk it) and
/// refused when it inflates far beyond its size (see `deflate`).
pub fn check_before_parse<R: Read + Seek>(
    reader: &mut R,
    dataset_start: u64,
    ts_uid: &str,
) -> io::Result<()> {
    let any = ImageGeometry {
        rows: 0,
        columns: 0,
        samples_per_pixel: 1,
        bits_allocated: 0,
        number_of_frames: 1,
    };
    let ts = TransferSyntaxRegistry.get(ts_uid);
    if !ts.is_some_and(|ts| matches!(ts.codec(), Codec::Dataset(_))) {
        return scan(reader, dataset_start, ts_uid, &any, true).map(|_| ());
    }
    let Some(enc) = ts.and_then(Enc::of) else {
        return Ok(());
    };
    let deflated = reader.seek(SeekFrom::End(0))?.saturating_sub(dataset_start);
    let len = deflate::inflated_length(reader, dataset_start)?;
    let mut stream = deflate::Inflated::new(reader, dataset_start)?;
    let mut cur = Cursor::over_stream(&mut stream, len);
    cur.before_parse = true;
    let scan = walk(&mut cur, enc, PixelKind::Native, &any)?;
    deflate::check_header_length(deflated, scan.metadata_end.unwrap_or(len))
}

pub(crate) fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

pub(crate) fn eof(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, msg)
}
