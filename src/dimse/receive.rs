//! Reading PDUs off an association's socket. A P-DATA-TF PDU, nearly all the bytes an association
//! carries, is cut out of the read buffer and split into its PDVs without copying (dicom-ul's reader
//! copies each PDU twice: the PDU, then every PDV's data); other PDUs are parsed by dicom-ul. Both
//! readers share the association's read buffer, so they can take turns.
//!
//! After every read the socket's delayed ACK is switched off again (`TCP_QUICKACK`, Linux), so that
//! what was read is acknowledged at once. A requestor that leaves Nagle's algorithm on (DCMTK
//! without `TCP_NODELAY=1` in its environment, pynetdicom) writes a C-STORE's command PDU and then
//! holds its small data PDU back until the command is acknowledged; with the kernel's delayed ACK
//! (40 ms, since we have nothing to answer yet) every small C-STORE would wait that long. Linux
//! clears the flag by itself (it goes back to delayed ACKs once the connection looks interactive,
//! i.e. after our responses), hence once per read, not once per connection.

use std::io::Cursor;

use bytes::{Buf, Bytes, BytesMut};
use dicom_ul::association::AsyncAssociation;
use dicom_ul::Pdu;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::message::ProtocolError;

/// One presentation data value, its data a slice of the PDU that carried it.
#[derive(Debug)]
pub struct Pdv {
    pub pc: u8,
    pub is_command: bool,
    pub is_last: bool,
    pub data: Bytes,
}

#[derive(Debug)]
pub enum Incoming {
    PData(Vec<Pdv>),
    Other(Pdu),
}

const P_DATA_TF: u8 = 0x04;
const PDU_HEADER: usize = 6;
/// Read at least this much at a time while a PDU's length is not yet known.
const MIN_READ: usize = 64 * 1024;

/// Reads the next PDU. `max_pdu_length` is the length we announced: a longer PDU is a violation.
/// Cancel-safe: bytes read stay in the association's buffer.
pub async fn receive<A>(assoc: &mut A, max_pdu_length: u32) -> Result<Incoming, ProtocolError>
where
    A: AsyncAssociation<TcpStream>,
{
    let (socket, buf) = assoc.get_mut();
    loop {
        if let Some(incoming) = parse(buf, max_pdu_length)? {
            return Ok(incoming);
        }
        let want = match pdu_length(buf) {
            Some(len) => (PDU_HEADER + len).saturating_sub(buf.len()),
            None => MIN_READ,
        };
        buf.reserve(want.max(MIN_READ));
        let n = socket
            .read_buf(buf)
            .await
            .map_err(|e| ProtocolError::Network(e.to_string()))?;
        if n == 0 {
            return Err(ProtocolError::Network(
                "connection closed by the peer".into(),
            ));
        }
        quick_ack(socket);
    }
}

/// Acknowledges what has been received now rather than after the delayed-ACK timeout, and keeps
/// doing so for the next segments (until the kernel's heuristics turn delayed ACKs back on).
#[cfg(target_os = "linux")]
pub fn quick_ack(socket: &TcpStream) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and a c_int option value of the size passed.
    // A failure (not a TCP socket any more) is harmless: only latency is at stake.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
pub fn quick_ack(_socket: &TcpStream) {}

fn pdu_length(buf: &BytesMut) -> Option<usize> {
    let len = buf.get(2..PDU_HEADER)?;
    Some(u32::from_be_bytes(len.try_into().expect("four bytes")) as usize)
}

/// The PDU at the start of `buf` once it is complete, removed from `buf`.
pub(crate) fn parse(
    buf: &mut BytesMut,
    max_pdu_length: u32,
) -> Result<Option<Incoming>, ProtocolError> {
    let Some(len) = pdu_length(buf) else {
        return Ok(None);
    };
    if buf[0] != P_DATA_TF {
        let mut cursor = Cursor::new(&buf[..]);
        return match dicom_ul::pdu::read_pdu(&mut cursor, max_pdu_length, true) {
            Ok(Some(pdu)) => {
                let used = cursor.position() as usize;
                buf.advance(used);
                Ok(Some(Incoming::Other(pdu)))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(ProtocolError::Violation(e.to_string())),
        };
    }
    if len > max_pdu_length as usize {
        return Err(ProtocolError::Violation(format!(
            "P-DATA-TF PDU of {len} bytes, longer than the {max_pdu_length} announced"
        )));
    }
    if buf.len() < PDU_HEADER + len {
        return Ok(None);
    }
    let mut pdu = buf.split_to(PDU_HEADER + len).freeze();
    pdu.advance(PDU_HEADER);
    split_pdvs(pdu).map(|pdvs| Some(Incoming::PData(pdvs)))
}

/// PS3.8 9.3.5: items of 4-byte length, presentation context ID, message control header, data.
fn split_pdvs(mut body: Bytes) -> Result<Vec<Pdv>, ProtocolError> {
    let mut pdvs = Vec::with_capacity(1);
    while !body.is_empty() {
        let item_len = body
            .get(..4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("four bytes")) as usize)
            .filter(|&n| n >= 2 && n <= body.len() - 4)
            .ok_or_else(|| ProtocolError::Violation("malformed PDV item".into()))?;
        let (pc, control) = (body[4], body[5]);
        let data = body.slice(6..4 + item_len);
        body.advance(4 + item_len);
        pdvs.push(Pdv {
            pc,
            is_command: control & 0x01 != 0,
            is_last: control & 0x02 != 0,
            data,
        });
    }
    if pdvs.is_empty() {
        return Err(ProtocolError::Violation(
            "P-DATA-TF PDU without a PDV".into(),
        ));
    }
    Ok(pdvs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::{PDataValue, PDataValueType};

    fn encoded(pdu: &Pdu) -> Vec<u8> {
        let mut out = Vec::new();
        dicom_ul::pdu::write_pdu(&mut out, pdu).unwrap();
        out
    }

    fn pdv(pc: u8, value_type: PDataValueType, is_last: bool, data: &[u8]) -> PDataValue {
        PDataValue {
            presentation_context_id: pc,
            value_type,
            is_last,
            data: data.to_vec(),
        }
    }

    #[test]
    fn pdata_is_split_into_pdvs_as_dicom_ul_encodes_them() {
        let pdu = Pdu::PData {
            data: vec![
                pdv(1, PDataValueType::Command, true, b"cmd!"),
                pdv(3, PDataValueType::Data, false, b"data"),
                pdv(3, PDataValueType::Data, true, b""),
            ],
        };
        let bytes = encoded(&pdu);
        // Byte by byte: nothing until the PDU is complete, then exactly it, the rest left.
        let mut buf = BytesMut::new();
        for &b in &bytes[..bytes.len() - 1] {
            buf.extend_from_slice(&[b]);
            assert!(parse(&mut buf, 4096).unwrap().is_none());
        }
        buf.extend_from_slice(&bytes[bytes.len() - 1..]);
        buf.extend_from_slice(&encoded(&Pdu::ReleaseRQ));
        let Some(Incoming::PData(pdvs)) = parse(&mut buf, 4096).unwrap() else {
            panic!("no P-DATA");
        };
        let got: Vec<_> = pdvs
            .iter()
            .map(|p| (p.pc, p.is_command, p.is_last, &p.data[..]))
            .collect();
        assert_eq!(
            got,
            [
                (1, true, true, &b"cmd!"[..]),
                (3, false, false, b"data"),
                (3, false, true, b"")
            ]
        );
        assert!(matches!(
            parse(&mut buf, 4096).unwrap(),
            Some(Incoming::Other(Pdu::ReleaseRQ))
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_and_malformed_pdata_are_violations() {
        let big = encoded(&Pdu::PData {
            data: vec![pdv(1, PDataValueType::Data, true, &[0; 5000])],
        });
        assert!(parse(&mut BytesMut::from(&big[..]), 4096).is_err());
        // An item whose length runs past the PDU, and one too short for its header.
        for item_len in [100u32, 1] {
            let mut bad = vec![P_DATA_TF, 0, 0, 0, 0, 8];
            bad.extend_from_slice(&item_len.to_be_bytes());
            bad.extend_from_slice(&[1, 3, 0, 0]);
            assert!(parse(&mut BytesMut::from(&bad[..]), 4096).is_err());
        }
        let empty = [P_DATA_TF, 0, 0, 0, 0, 0];
        assert!(parse(&mut BytesMut::from(&empty[..]), 4096).is_err());
    }
}
