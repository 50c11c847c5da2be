//! Deflated data sets (Deflated Explicit VR Little Endian, PS3.5 A.5): the data set after the file
//! meta group is one raw deflate stream (RFC 1951, no zlib header).
//!
//! Before dicom-rs parses such an object its inflated data set is walked like any other (see
//! `validate::check_before_parse`); this module measures the stream and presents it to that walk as a
//! forward-only reader. Deflate inflates up to ~1000 times, so a few megabytes could otherwise make
//! the gateway inflate, and dicom-rs hold, gigabytes: the inflated size is capped relative to the
//! deflated one.

use std::io::{self, BufReader, Read, Seek, SeekFrom, Take};

use flate2::bufread::DeflateDecoder;
use flate2::{Decompress, FlushDecompress, Status};

/// A deflated data set may inflate to at most `MAX_RATIO` times its deflated size, or
/// `MIN_ALLOWANCE` bytes when that is more. Legitimate data sets (structured reports, documents,
/// images) inflate a few times; a stream of zeros inflates ~1000 times.
const MAX_RATIO: u64 = 32;
const MIN_ALLOWANCE: u64 = 256 << 20;

/// The elements dicom-rs loads into memory (everything before the pixel data) may inflate to at most
/// `MAX_HEADER_RATIO` times the deflated size, or `MIN_HEADER_ALLOWANCE` bytes: about what an
/// object that is not deflated would have to send to make it hold as much.
const MAX_HEADER_RATIO: u64 = 4;
const MIN_HEADER_ALLOWANCE: u64 = 64 << 20;

/// Checks that the data set starting at `dataset_start` is one complete deflate stream that
/// inflates within the cap, and returns its inflated length. A stream cut short would otherwise
/// parse as a shorter, valid-looking data set. Inflates into a small buffer, keeping nothing.
pub fn inflated_length<R: Read + Seek>(reader: &mut R, dataset_start: u64) -> io::Result<u64> {
    let deflated = reader.seek(SeekFrom::End(0))?.saturating_sub(dataset_start);
    let cap = MIN_ALLOWANCE.max(deflated.saturating_mul(MAX_RATIO));
    reader.seek(SeekFrom::Start(dataset_start))?;
    let mut inflater = Decompress::new(false);
    let mut input = vec![0u8; 64 * 1024];
    let mut output = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut input)?;
        let mut chunk = &input[..n];
        loop {
            let (in_before, out_before) = (inflater.total_in(), inflater.total_out());
            let status = inflater
                .decompress(chunk, &mut output, FlushDecompress::None)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if inflater.total_out() > cap {
                return Err(too_large(
                    "deflated data set inflates to more than 32 times its size (and 256 MiB)",
                ));
            }
            if status == Status::StreamEnd {
                return Ok(inflater.total_out());
            }
            let consumed = (inflater.total_in() - in_before) as usize;
            let produced = (inflater.total_out() - out_before) as usize;
            chunk = &chunk[consumed..];
            // Needs more input unless the output buffer filled up (more output may be pending).
            if (chunk.is_empty() && produced < output.len()) || (consumed == 0 && produced == 0) {
                break;
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "deflated data set ends before its deflate stream does",
            ));
        }
    }
}

/// Refuses a deflated data set whose elements before the pixel data (`header_len` inflated bytes,
/// all of them when it has none) would make dicom-rs hold far more than the object's size.
pub fn check_header_length(deflated: u64, header_len: u64) -> io::Result<()> {
    if header_len > MIN_HEADER_ALLOWANCE.max(deflated.saturating_mul(MAX_HEADER_RATIO)) {
        return Err(too_large(
            "the elements before the pixel data of a deflated data set inflate to more than 4 times its size (and 64 MiB)",
        ));
    }
    Ok(())
}

fn too_large(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The inflated data set as a reader that can only seek forward (by inflating and discarding):
/// enough for the element walk, which never goes back.
pub struct Inflated<'r, R> {
    decoder: DeflateDecoder<BufReader<Take<&'r mut R>>>,
    pos: u64,
}

impl<'r, R: Read + Seek> Inflated<'r, R> {
    pub fn new(reader: &'r mut R, dataset_start: u64) -> io::Result<Self> {
        let end = reader.seek(SeekFrom::End(0))?;
        reader.seek(SeekFrom::Start(dataset_start))?;
        let deflated = reader.take(end.saturating_sub(dataset_start));
        Ok(Inflated {
            decoder: DeflateDecoder::new(BufReader::with_capacity(64 * 1024, deflated)),
            pos: 0,
        })
    }
}

impl<R: Read> Read for Inflated<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.decoder.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read> Seek for Inflated<'_, R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(_) => None,
        };
        match target {
            Some(p) if p >= self.pos => {
                let ahead = p - self.pos;
                io::copy(&mut self.by_ref().take(ahead), &mut io::sink())?;
                if self.pos < p {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "deflated data set ends early",
                    ));
                }
                Ok(self.pos)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "an inflated data set is read forward only",
            )),
        }
    }
}
