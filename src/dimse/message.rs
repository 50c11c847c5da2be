//! DIMSE messages over an established association, for the services that send more than one
//! response or run sub-operations (C-FIND, C-MOVE, C-GET): sending a command with its data set
//! (streamed in PDVs no larger than the peer accepts), and reassembling the commands that arrive
//! while such an operation runs (C-CANCEL, C-STORE-RSP of a sub-operation).

use std::time::Duration;

use bytes::Bytes;
use dicom_ul::association::{Association, AsyncAssociation};
use dicom_ul::pdu::PDataValueType;
use dicom_ul::Pdu;
use futures::TryStreamExt;
use tokio::net::TcpStream;

use super::command::{Command, MAX_COMMAND_LENGTH};
use crate::storage::ByteStream;

/// Why an association ended abnormally; the acceptor answers with A-ABORT.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{0}")]
    Violation(String),
    #[error("no complete PDU from the peer within the read timeout")]
    Timeout,
    #[error("message not received in full within the message timeout")]
    MessageTimeout,
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("network error: {0}")]
    Network(String),
    #[error("association aborted by the peer")]
    Aborted,
}

/// Data PDV payload when the peer sets no limit (max PDU length 0).
const UNLIMITED_PDV: usize = 1 << 20;

/// The largest PDV payload the peer of `assoc` accepts.
pub fn pdv_limit<A: Association>(assoc: &A) -> usize {
    match assoc.peer_max_pdu_length() as usize {
        0 => UNLIMITED_PDV,
        // A P-DATA PDU carrying one PDV: 4 bytes PDV length, 1 context ID, 1 header.
        n => n.saturating_sub(6).max(2) & !1,
    }
}

/// Sends a command set, then its data set (if any: an identifier, small), fragmented to the peer's
/// PDU size, in one write within `write_timeout`.
pub async fn send<A>(
    assoc: &mut A,
    pc: u8,
    command: &[u8],
    data: Option<&[u8]>,
    write_timeout: Duration,
) -> Result<(), ProtocolError>
where
    A: AsyncAssociation<TcpStream> + Send,
{
    let payload = command.len() + data.map_or(0, <[u8]>::len);
    let mut out = PDataEncoder::new(pc, pdv_limit(assoc), payload);
    out.command(command);
    if let Some(data) = data {
        out.data(data);
        out.end_data();
    }
    write(assoc, &out.batch, write_timeout).await
}

/// Sends a command set, then a data set read from `stream` chunk by chunk (only one write's worth
/// of encoded PDUs is held at a time). The stream's first `skip` bytes are left out (the Part-10
/// header of a stored object). A storage read error ends the association: the peer already has
/// part of the data set.
pub async fn send_streamed<A>(
    assoc: &mut A,
    pc: u8,
    command: &[u8],
    mut stream: ByteStream,
    mut skip: usize,
    write_timeout: Duration,
) -> Result<(), ProtocolError>
where
    A: AsyncAssociation<TcpStream> + Send,
{
    let limit = pdv_limit(assoc);
    let mut out = PDataEncoder::new(pc, limit, BATCH + limit);
    out.command(command);
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(|e| ProtocolError::Violation(format!("storage read failed: {e}")))?
    {
        let mut chunk: Bytes = chunk;
        if skip > 0 {
            let n = skip.min(chunk.len());
            skip -= n;
            chunk = chunk.slice(n..);
        }
        out.data(&chunk);
        write_closed(assoc, &mut out, write_timeout).await?;
    }
    out.end_data();
    write(assoc, &out.batch, write_timeout).await
}

/// A data set encoded ahead of time as the P-DATA-TF PDUs that carry it (for [`send_encoded`]).
pub fn encode_data(pc: u8, limit: usize, data: &[u8]) -> Vec<u8> {
    let mut out = PDataEncoder::new(pc, limit, data.len());
    out.data(data);
    out.end_data();
    out.batch
}

/// Sends a command set, then a data set already encoded by [`encode_data`] for the same context.
pub async fn send_encoded<A>(
    assoc: &mut A,
    pc: u8,
    command: &[u8],
    encoded_data: &[u8],
    write_timeout: Duration,
) -> Result<(), ProtocolError>
where
    A: AsyncAssociation<TcpStream> + Send,
{
    send(assoc, pc, command, None, write_timeout).await?;
    write(assoc, encoded_data, write_timeout).await
}

/// Encoded P-DATA PDUs are written in batches of about this size: one write per batch instead of
/// one per PDV (receivers often take PDUs of 16 KB).
const BATCH: usize = 256 * 1024;

/// P-DATA-TF PDUs of one PDV each (PS3.8 9.3.5), encoded straight into a write batch: the data
/// is copied once, from the storage chunk into the batch. A full data PDU stays open until more
/// data arrives, since only then is it known not to be the last one.
struct PDataEncoder {
    batch: Vec<u8>,
    pc: u8,
    limit: usize,
    /// Where the open data PDU starts in `batch`.
    open: Option<usize>,
}

/// PDU type, reserved byte, PDU length; PDV length, context ID, message control header.
const PDATA_HEADER: usize = 12;

impl PDataEncoder {
    /// An encoder whose batch has room for `payload` bytes with their PDU headers.
    fn new(pc: u8, limit: usize, payload: usize) -> PDataEncoder {
        PDataEncoder {
            batch: Vec::with_capacity(payload + (payload / limit.max(1) + 2) * PDATA_HEADER),
            pc,
            limit,
            open: None,
        }
    }

    fn command(&mut self, command: &[u8]) {
        let parts = command.len().div_ceil(self.limit).max(1);
        for (i, part) in command.chunks(self.limit).enumerate() {
            let start = self.begin();
            self.batch.extend_from_slice(part);
            self.close(start, 0x01 | if i + 1 == parts { 0x02 } else { 0 });
        }
    }

    fn data(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let start = match self.open {
                Some(start) if self.batch.len() - start - PDATA_HEADER == self.limit => {
                    self.close(start, 0x00);
                    self.begin()
                }
                Some(start) => start,
                None => self.begin(),
            };
            self.open = Some(start);
            let room = self.limit - (self.batch.len() - start - PDATA_HEADER);
            let n = room.min(bytes.len());
            self.batch.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
    }

    /// How many leading bytes of the batch are complete PDUs, ready to be written.
    fn closed_len(&self) -> usize {
        self.open.unwrap_or(self.batch.len())
    }

    /// Drops the first `n` bytes of the batch (written); the open PDU moves to the front.
    fn consume(&mut self, n: usize) {
        self.batch.drain(..n);
        self.open = self.open.map(|start| start - n);
    }

    /// Marks the open data PDU as the last one (an empty one if there was no data).
    fn end_data(&mut self) {
        let start = self.open.take().unwrap_or_else(|| self.begin());
        self.close(start, 0x02);
    }

    fn begin(&mut self) -> usize {
        let start = self.batch.len();
        self.batch.extend_from_slice(&[0; PDATA_HEADER]);
        start
    }

    fn close(&mut self, start: usize, control: u8) {
        let pdv_length = (self.batch.len() - start - PDATA_HEADER + 2) as u32;
        let header = &mut self.batch[start..start + PDATA_HEADER];
        header[0] = 0x04;
        header[2..6].copy_from_slice(&(pdv_length + 4).to_be_bytes());
        header[6..10].copy_from_slice(&pdv_length.to_be_bytes());
        header[10] = self.pc;
        header[11] = control;
    }
}

/// Writes the complete PDUs of the batch once they fill a batch.
async fn write_closed<A>(
    assoc: &mut A,
    out: &mut PDataEncoder,
    write_timeout: Duration,
) -> Result<(), ProtocolError>
where
    A: AsyncAssociation<TcpStream> + Send,
{
    let n = out.closed_len();
    if n >= BATCH {
        write(assoc, &out.batch[..n], write_timeout).await?;
        out.consume(n);
    }
    Ok(())
}

/// Writes encoded PDUs straight to the association's socket (at a PDU boundary, as dicom-ul
/// allows), within the write timeout.
async fn write<A>(assoc: &mut A, bytes: &[u8], write_timeout: Duration) -> Result<(), ProtocolError>
where
    A: AsyncAssociation<TcpStream> + Send,
{
    use tokio::io::AsyncWriteExt;
    let socket = AsyncAssociation::inner_stream(assoc);
    match tokio::time::timeout(write_timeout, socket.write_all(bytes)).await {
        Err(_) => Err(ProtocolError::Network("write timed out".into())),
        Ok(Err(e)) => Err(ProtocolError::Network(e.to_string())),
        Ok(Ok(())) => Ok(()),
    }
}

/// Reassembles command sets from P-DATA PDUs received while an operation runs.
#[derive(Default)]
pub struct Inbox {
    pc: u8,
    buf: Vec<u8>,
}

impl Inbox {
    /// Takes one received PDU; returns the commands it completes (presentation context, command).
    /// Data sets, release requests and other PDUs are not expected in the middle of an operation.
    pub fn feed(&mut self, pdu: Pdu) -> Result<Vec<(u8, Command)>, ProtocolError> {
        let pdvs = match pdu {
            Pdu::PData { data } => data,
            Pdu::AbortRQ { .. } => return Err(ProtocolError::Aborted),
            other => {
                return Err(ProtocolError::Violation(format!(
                    "unexpected {} during an operation",
                    other.short_description()
                )))
            }
        };
        let mut out = Vec::new();
        for pdv in pdvs {
            if pdv.value_type != PDataValueType::Command {
                return Err(ProtocolError::Violation(
                    "data set fragment during an operation".into(),
                ));
            }
            if !self.buf.is_empty() && self.pc != pdv.presentation_context_id {
                return Err(ProtocolError::Violation(
                    "command fragments on different presentation contexts".into(),
                ));
            }
            self.pc = pdv.presentation_context_id;
            if self.buf.len() + pdv.data.len() > MAX_COMMAND_LENGTH {
                return Err(ProtocolError::Violation("command set too long".into()));
            }
            self.buf.extend_from_slice(&pdv.data);
            if pdv.is_last {
                let cmd = Command::decode(&std::mem::take(&mut self.buf))
                    .map_err(|e| ProtocolError::Violation(e.to_string()))?;
                out.push((self.pc, cmd));
            }
        }
        Ok(out)
    }
}

/// Receives one PDU, failing on the read timeout.
pub async fn receive<A>(assoc: &mut A, timeout: Duration) -> Result<Pdu, ProtocolError>
where
    A: AsyncAssociation<TcpStream> + Send,
{
    match tokio::time::timeout(timeout, AsyncAssociation::receive(assoc)).await {
        Err(_) => Err(ProtocolError::Timeout),
        Ok(Err(e)) => Err(ProtocolError::Network(e.to_string())),
        Ok(Ok(pdu)) => Ok(pdu),
    }
}

/// A PDU the peer has already sent, without waiting. Reception is cancel-safe in dicom-ul (bytes
/// read go to the association's buffer), so polling once and dropping the future loses nothing.
pub async fn poll_receive<A>(assoc: &mut A) -> Result<Option<Pdu>, ProtocolError>
where
    A: AsyncAssociation<TcpStream> + Send,
{
    use futures::FutureExt;
    match AsyncAssociation::receive(assoc).now_or_never() {
        None => Ok(None),
        Some(Ok(pdu)) => Ok(Some(pdu)),
        Some(Err(e)) => Err(ProtocolError::Network(e.to_string())),
    }
}

/// Whether the peer has sent a C-CANCEL for `message_id` (without waiting for one). Any other
/// command is a protocol error while an operation runs (one operation at a time is negotiated).
pub async fn cancel_requested<A>(
    assoc: &mut A,
    inbox: &mut Inbox,
    message_id: u16,
) -> Result<bool, ProtocolError>
where
    A: AsyncAssociation<TcpStream> + Send,
{
    let mut cancelled = false;
    while let Some(pdu) = poll_receive(assoc).await? {
        for (_, cmd) in inbox.feed(pdu)? {
            cancelled |= is_cancel_of(&cmd, message_id)?;
        }
    }
    Ok(cancelled)
}

/// Whether a command received during an operation is its C-CANCEL; other requests are refused.
pub fn is_cancel_of(cmd: &Command, message_id: u16) -> Result<bool, ProtocolError> {
    let field = cmd
        .command_field()
        .map_err(|e| ProtocolError::Violation(e.to_string()))?;
    if field != super::command::field::C_CANCEL_RQ {
        return Err(ProtocolError::Violation(
            "a new request arrived while an operation was running".into(),
        ));
    }
    Ok(cmd
        .u16(super::command::elem::MESSAGE_ID_BEING_RESPONDED_TO)
        .ok()
        == Some(message_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PDVs of `batch` as (context, is command, is last, data), read back by dicom-ul.
    fn pdvs(batch: &[u8]) -> Vec<(u8, bool, bool, Vec<u8>)> {
        let mut buf = batch;
        let mut out = Vec::new();
        while !buf.is_empty() {
            let Some(Pdu::PData { data }) = dicom_ul::read_pdu(&mut buf, 1 << 20, true).unwrap()
            else {
                panic!("not a P-DATA PDU");
            };
            assert_eq!(data.len(), 1, "one PDV per PDU");
            let pdv = &data[0];
            let is_command = pdv.value_type == PDataValueType::Command;
            out.push((
                pdv.presentation_context_id,
                is_command,
                pdv.is_last,
                pdv.data.clone(),
            ));
        }
        out
    }

    #[test]
    fn command_and_data_are_fragmented_to_the_limit_with_last_flags() {
        let mut enc = PDataEncoder::new(3, 8, 0);
        enc.command(&[1; 10]);
        enc.data(&[7; 5]);
        enc.data(&[8; 6]);
        enc.end_data();
        let got = pdvs(&enc.batch);
        assert_eq!(
            got,
            vec![
                (3, true, false, vec![1; 8]),
                (3, true, true, vec![1; 2]),
                (3, false, false, [vec![7; 5], vec![8; 3]].concat()),
                (3, false, true, vec![8; 3]),
            ]
        );
    }

    #[test]
    fn data_encoded_ahead_is_what_the_streamed_path_sends() {
        let data: Vec<u8> = (0..=255).cycle().take(1000).collect();
        let ahead = encode_data(5, 64, &data);
        let mut enc = PDataEncoder::new(5, 64, 0);
        enc.command(&[1, 2]);
        let command_len = enc.batch.len();
        for chunk in data.chunks(100) {
            enc.data(chunk);
        }
        enc.end_data();
        assert_eq!(ahead, enc.batch[command_len..]);
        let got = pdvs(&ahead);
        assert_eq!(got.len(), 16);
        assert!(got.iter().all(|(pc, cmd, _, _)| *pc == 5 && !cmd));
        let last: Vec<bool> = got.iter().map(|p| p.2).collect();
        assert_eq!(last, [[false; 15].as_slice(), &[true]].concat());
        let sent: Vec<u8> = got.into_iter().flat_map(|p| p.3).collect();
        assert_eq!(sent, data);
    }

    #[test]
    fn data_ending_on_a_pdu_boundary_marks_that_pdu_last() {
        let mut enc = PDataEncoder::new(1, 4, 0);
        enc.command(&[1, 2]);
        enc.data(&[9; 8]);
        enc.end_data();
        let got = pdvs(&enc.batch);
        assert_eq!(got.len(), 3);
        assert_eq!(got[1], (1, false, false, vec![9; 4]));
        assert_eq!(got[2], (1, false, true, vec![9; 4]));
    }

    #[test]
    fn no_data_gives_one_empty_last_data_pdv() {
        let mut enc = PDataEncoder::new(1, 4, 0);
        enc.command(&[1, 2]);
        enc.end_data();
        assert_eq!(pdvs(&enc.batch)[1], (1, false, true, vec![]));
    }

    #[test]
    fn only_closed_pdus_are_handed_out_and_the_open_one_survives() {
        let mut enc = PDataEncoder::new(1, 4, 0);
        enc.command(&[1, 2]);
        enc.data(&[5; 6]);
        let n = enc.closed_len();
        let written = enc.batch[..n].to_vec();
        enc.consume(n);
        enc.data(&[6; 1]);
        enc.end_data();
        let all = [written, enc.batch.clone()].concat();
        let got = pdvs(&all);
        assert_eq!(got[1], (1, false, false, vec![5; 4]));
        assert_eq!(got[2], (1, false, true, vec![5, 5, 6]));
    }
}
