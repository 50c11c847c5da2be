//! Byte-level DICOM reading: the one walker over encoded objects, which every other module uses
//! (ingest's layout, validation and bulk-data plan, `model`'s charset re-decoding and Explicit VR
//! LE re-encoding, `render` / `transcode` / `dicomweb` / `dimse` reading stored objects).
//!
//! - [`meta`]: the Part-10 preamble and file meta group (where the data set starts, its syntax);
//! - [`header`]: element header decoding, the encodings, item and delimiter tags;
//! - [`source`]: the buffered cursor every walk reads through, lengths checked against the size;
//! - [`walk`]: the walk over a data set (sequences, items, undefined lengths) to the pixel data;
//! - [`frames`]: the pixel data element and each frame's byte ranges ([`Layout`]);
//! - [`deflate`]: deflated data sets measured and inflated forward for the walk;
//! - [`validate`]: the hardening (declared lengths, nesting depth, the UN-with-items refusal) and
//!   [`check_before_parse`], the walk that clears an object for dicom-rs.
//!
//! [`walk_part10`] and [`walk_deflated`] are the entry points for fuzzing: any byte slice in,
//! `Ok` or `Err` out, no panic, memory bounded by the input's size.

pub mod deflate;
pub mod frames;
pub mod header;
pub mod meta;
pub mod source;
pub mod validate;
pub mod walk;

#[cfg(test)]
mod tests;

use std::io::{self, Cursor};

pub use frames::{
    locate_frames, native_layout_forecast, scan_pixel_data, Extent, ImageGeometry, Layout,
    PixelDataElement, PixelDataScan,
};
pub use meta::read_meta_extent;
pub use validate::{check_before_parse, MAX_DEPTH};
pub use walk::{pixel_data_start, PixelDataStart};

/// Deflated Explicit VR Little Endian (PS3.5 A.5).
const DEFLATED_EXPLICIT_LE: &str = "1.2.840.10008.1.2.1.99";

/// What [`walk_part10`] found in an object that walked cleanly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walked {
    /// Where the data set starts (after the file meta group).
    pub dataset_start: u64,
    /// The data set's transfer syntax UID.
    pub transfer_syntax: String,
    /// The top-level walk to and past the pixel data (a single-frame 1x1 geometry: only what the
    /// bytes say is checked), or `None` for a deflated data set (its offsets are not the object's).
    pub scan: Option<PixelDataScan>,
}

/// Walks `bytes` as a Part-10 object, as ingest does before dicom-rs parses it: the meta group,
/// the data set (inflated when deflated) with every length checked, then the pixel data's layout.
pub fn walk_part10(bytes: &[u8]) -> io::Result<Walked> {
    let (dataset_start, transfer_syntax) = read_meta_extent(&mut Cursor::new(bytes))?;
    check_before_parse(&mut Cursor::new(bytes), dataset_start, &transfer_syntax)?;
    // the early-header walk sees prefixes of objects: its answer only has to be an answer
    let _ = pixel_data_start(&mut Cursor::new(bytes), dataset_start, &transfer_syntax);
    let one = ImageGeometry {
        rows: 1,
        columns: 1,
        samples_per_pixel: 1,
        bits_allocated: 8,
        number_of_frames: 1,
    };
    let scan = scan_pixel_data(
        &mut Cursor::new(bytes),
        dataset_start,
        &transfer_syntax,
        &one,
    )?;
    Ok(Walked {
        dataset_start,
        transfer_syntax,
        scan: scan.metadata_end.is_some().then_some(scan),
    })
}

/// Walks `bytes` as a deflated Explicit VR Little Endian data set (one raw deflate stream, no meta
/// group), as [`check_before_parse`] does for a deflated object.
pub fn walk_deflated(bytes: &[u8]) -> io::Result<()> {
    check_before_parse(&mut Cursor::new(bytes), 0, DEFLATED_EXPLICIT_LE)
}
