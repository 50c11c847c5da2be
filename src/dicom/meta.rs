//! The Part-10 preamble and file meta group (PS3.10 7.1): where the data set starts and its
//! transfer syntax. The group is always Explicit VR Little Endian.

use std::io::{self, Read, Seek};

use super::header::{short_length_vr, UNDEFINED};
use super::source::Cursor;
use super::validate::invalid;

/// Read the Part-10 preamble + file meta group of a stored file and return (dataset_start
/// offset, transfer syntax UID).
///
/// The reader is rewound to the start of the file. The meta group is always Explicit VR Little
/// Endian; its elements are walked one by one, so a missing or wrong (0002,0000) group length is
/// tolerated (when present and consistent with the walk, it marks the end of the group, which
/// matters for deflated datasets whose first bytes are arbitrary). The returned UID has trailing
/// padding (NUL / space) removed.
pub fn read_meta_extent<R: Read + Seek>(reader: &mut R) -> io::Result<(u64, String)> {
    let mut cur = Cursor::new(reader)?;
    cur.seek_to(0);
    let preamble: [u8; 132] = cur.read_array()?;
    if &preamble[128..132] != b"DICM" {
        return Err(invalid("not a DICOM Part-10 file: missing DICM prefix"));
    }

    let mut group_end: Option<u64> = None;
    let mut ts: Option<String> = None;
    loop {
        if group_end == Some(cur.pos) || cur.remaining() == 0 {
            break;
        }
        let start = cur.pos;
        let head: [u8; 4] = cur.read_array()?;
        let group = u16::from_le_bytes([head[0], head[1]]);
        let element = u16::from_le_bytes([head[2], head[3]]);
        if group != 0x0002 {
            cur.seek_to(start);
            break;
        }
        let vr: [u8; 2] = cur.read_array()?;
        if !(vr[0].is_ascii_uppercase() && vr[1].is_ascii_uppercase()) {
            return Err(invalid("file meta group element without explicit VR"));
        }
        let len = if short_length_vr(vr) {
            u32::from(u16::from_le_bytes(cur.read_array()?))
        } else {
            let b: [u8; 6] = cur.read_array()?;
            u32::from_le_bytes([b[2], b[3], b[4], b[5]])
        };
        if len == UNDEFINED {
            return Err(invalid("undefined length in file meta group"));
        }
        match element {
            0x0000 if len == 4 => {
                let gl = u32::from_le_bytes(cur.read_array()?);
                group_end = cur.pos.checked_add(u64::from(gl));
            }
            0x0010 => {
                if len > 256 {
                    return Err(invalid("transfer syntax UID too long"));
                }
                let mut buf = [0u8; 256];
                let value = &mut buf[..len as usize];
                cur.read_into(value)?;
                let uid = std::str::from_utf8(value)
                    .map_err(|_| invalid("transfer syntax UID is not ASCII"))?
                    .trim_end_matches(['\0', ' '])
                    .trim_start();
                ts = Some(uid.to_owned());
            }
            _ => cur.skip(u64::from(len))?,
        }
    }
    match ts {
        Some(ts) if !ts.is_empty() => Ok((cur.pos, ts)),
        _ => Err(invalid("file meta group has no transfer syntax UID")),
    }
}
