//! Element headers: how the elements of a data set are encoded ([`Enc`]), the decoding of an element
//! (or item / delimiter) header, and the item and delimiter tags. Every walk over encoded bytes
//! (the frame layout, validation, bulk data, charset re-decoding, the Explicit VR LE re-encoding)
//! decodes headers here.

use dicom_encoding::decode::DecodeFrom;
use dicom_encoding::transfer_syntax::{Endianness, TransferSyntax};
use std::io::{self, Read, Seek};

use super::source::Cursor;

pub(crate) const UNDEFINED: u32 = 0xFFFF_FFFF;
pub(crate) const ITEM: (u16, u16) = (0xFFFE, 0xE000);
pub(crate) const ITEM_DELIMITER: (u16, u16) = (0xFFFE, 0xE00D);
pub(crate) const SEQUENCE_DELIMITER: (u16, u16) = (0xFFFE, 0xE0DD);

/// How the elements of a data set are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Enc {
    pub(crate) explicit: bool,
    pub(crate) big: bool,
}

pub(crate) const IMPLICIT_LE: Enc = Enc {
    explicit: false,
    big: false,
};

impl Enc {
    /// The encoding of a transfer syntax's data set; `None` when the registry has no decoder for
    /// it (see [`is_explicit_vr`]).
    pub(crate) fn of(ts: &TransferSyntax) -> Option<Enc> {
        Some(Enc {
            explicit: is_explicit_vr(ts)?,
            big: ts.endianness() == Endianness::Big,
        })
    }

    pub(crate) fn u16(self, b: [u8; 2]) -> u16 {
        if self.big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    pub(crate) fn u32(self, b: [u8; 4]) -> u32 {
        if self.big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }
}

/// Whether the transfer syntax uses explicit VR. The registry entry does not expose this
/// directly, so a short (UI, 16-bit length) element header is decoded with the transfer
/// syntax's own decoder: an explicit VR decoder reads length 2, an implicit one does not.
/// `None` when the registry has no decoder for the syntax (e.g. implicit VR big endian).
pub(crate) fn is_explicit_vr(ts: &TransferSyntax) -> Option<bool> {
    let probe: [u8; 8] = match ts.endianness() {
        Endianness::Little => [0x08, 0x00, 0x16, 0x00, b'U', b'I', 0x02, 0x00],
        Endianness::Big => [0x00, 0x08, 0x00, 0x16, b'U', b'I', 0x00, 0x02],
    };
    let decoder = ts.decoder_for::<&[u8]>()?;
    let (header, _) = decoder.decode_header(&mut &probe[..]).ok()?;
    Some(header.len.0 == 2)
}

/// An element (or item/delimiter) header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub(crate) tag: (u16, u16),
    /// Explicit VR, if the encoding has one and the element is not an item/delimiter.
    pub(crate) vr: Option<[u8; 2]>,
    pub(crate) len: u32,
}

/// Decodes the first 8 bytes of an element header. When the second value is `true` the VR has
/// 2 reserved bytes and a 32-bit length: `len` is not set yet and the length is the next 4
/// bytes (decode them with [`Enc::u32`]).
pub(crate) fn decode_header(enc: Enc, b: [u8; 8]) -> (Header, bool) {
    let tag = (enc.u16([b[0], b[1]]), enc.u16([b[2], b[3]]));
    if tag.0 == 0xFFFE || !enc.explicit {
        let len = enc.u32([b[4], b[5], b[6], b[7]]);
        return (Header { tag, vr: None, len }, false);
    }
    let vr = [b[4], b[5]];
    if short_length_vr(vr) {
        let len = u32::from(enc.u16([b[6], b[7]]));
        (
            Header {
                tag,
                vr: Some(vr),
                len,
            },
            false,
        )
    } else {
        (
            Header {
                tag,
                vr: Some(vr),
                len: 0,
            },
            true,
        )
    }
}

/// VRs whose explicit-VR length field is 16 bits (PS3.5 7.1.2); every other VR, including
/// unknown ones, has 2 reserved bytes and a 32-bit length.
pub(crate) fn short_length_vr(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"AE"
            | b"AS"
            | b"AT"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"FL"
            | b"FD"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"PN"
            | b"SH"
            | b"SL"
            | b"SS"
            | b"ST"
            | b"TM"
            | b"UI"
            | b"UL"
            | b"US"
    )
}

/// Encoding of the items of an undefined-length element: UN is Implicit VR Little Endian
/// (PS3.5 6.2.2), everything else keeps the current encoding.
pub(crate) fn nested_encoding(enc: Enc, vr: Option<[u8; 2]>) -> Enc {
    if vr == Some(*b"UN") {
        IMPLICIT_LE
    } else {
        enc
    }
}

/// Reads the element (or item / delimiter) header at the cursor.
pub(crate) fn read_header<R: Read + Seek>(cur: &mut Cursor<'_, R>, enc: Enc) -> io::Result<Header> {
    let (mut header, long_length) = decode_header(enc, cur.read_array()?);
    if long_length {
        header.len = enc.u32(cur.read_array()?);
    }
    Ok(header)
}
