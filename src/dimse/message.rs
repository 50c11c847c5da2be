//! DIMSE messages over an established association, for the services that send more than one
//! response or run sub-operations (C-FIND, C-MOVE, C-GET): sending a command with its data set
//! (streamed in PDVs no larger than the peer accepts), and reassembling the commands that arrive
//! while such an operation runs (C-CANCEL, C-STORE-RSP of a sub-operation).

use std::time::Duration;

use bytes::Bytes;
use dicom_ul::association::{Association, AsyncAssociation};
use dicom_ul::pdu::{PDataValue, PDataValueType};
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
    #[error("peer idle for longer than the read timeout")]
    Timeout,
    #[error("network error: {0}")]
    Network(String),
    #[error("association aborted by the peer")]
    Aborted,
}

/// Data PDV payload when the peer sets no limit (max PDU length 0).
const UNLIMITED_PDV: usize = 1 << 20;

fn pdv_limit<A: Association>(assoc: &A) -> usize {
    match assoc.peer_max_pdu_length() as usize {
        0 => UNLIMITED_PDV,
        // A P-DATA PDU carrying one PDV: 4 bytes PDV length, 1 context ID, 1 header.
        n => n.saturating_sub(6).max(2) & !1,
    }
}

async fn send_pdv<A>(
    assoc: &mut A,
    pc: u8,
    value_type: PDataValueType,
    data: Vec<u8>,
    is_last: bool,
) -> Result<(), ProtocolError>
where
    A: AsyncAssociation<TcpStream> + Send,
{
    let pdu = Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type,
            is_last,
            data,
        }],
    };
    AsyncAssociation::send(assoc, &pdu)
        .await
        .map_err(|e| ProtocolError::Network(e.to_string()))
}

/// Sends a command set, then its data set (if any), fragmented to the peer's PDU size.
pub async fn send<A>(
    assoc: &mut A,
    pc: u8,
    command: Vec<u8>,
    data: Option<&[u8]>,
) -> Result<(), ProtocolError>
where
    A: AsyncAssociation<TcpStream> + Send,
{
    let limit = pdv_limit(assoc);
    for (i, part) in command.chunks(limit).enumerate() {
        let last = (i + 1) * limit >= command.len();
        send_pdv(assoc, pc, PDataValueType::Command, part.to_vec(), last).await?;
    }
    if let Some(data) = data {
        if data.is_empty() {
            return send_pdv(assoc, pc, PDataValueType::Data, Vec::new(), true).await;
        }
        for (i, part) in data.chunks(limit).enumerate() {
            let last = (i + 1) * limit >= data.len();
            send_pdv(assoc, pc, PDataValueType::Data, part.to_vec(), last).await?;
        }
    }
    Ok(())
}

/// Sends a command set, then a data set read from `stream` chunk by chunk (only one PDV's worth is
/// held at a time, plus the encoded PDUs of one write). The stream's first `skip` bytes are left out
/// (the Part-10 header of a stored object). A storage read error ends the association: the peer
/// already has part of the data set.
pub async fn send_streamed<A>(
    assoc: &mut A,
    pc: u8,
    command: Vec<u8>,
    mut stream: ByteStream,
    mut skip: usize,
    write_timeout: Duration,
) -> Result<(), ProtocolError>
where
    A: AsyncAssociation<TcpStream> + Send,
{
    send(assoc, pc, command, None).await?;
    let limit = pdv_limit(assoc);
    let mut pending: Vec<u8> = Vec::with_capacity(limit);
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH + limit + 12);
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
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            if pending.len() == limit {
                let full = std::mem::replace(&mut pending, Vec::with_capacity(limit));
                encode_data_pdu(&mut batch, pc, full, false)?;
                if batch.len() >= BATCH {
                    flush(assoc, &mut batch, write_timeout).await?;
                }
            }
            let n = (limit - pending.len()).min(rest.len());
            pending.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }
    encode_data_pdu(&mut batch, pc, pending, true)?;
    flush(assoc, &mut batch, write_timeout).await
}

/// Encoded P-DATA PDUs are written in batches of about this size: one write per batch instead of
/// one per PDV (receivers often take PDUs of 16 KB).
const BATCH: usize = 256 * 1024;

fn encode_data_pdu(
    batch: &mut Vec<u8>,
    pc: u8,
    data: Vec<u8>,
    is_last: bool,
) -> Result<(), ProtocolError> {
    let pdu = Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type: PDataValueType::Data,
            is_last,
            data,
        }],
    };
    dicom_ul::write_pdu(batch, &pdu).map_err(|e| ProtocolError::Violation(e.to_string()))
}

/// Writes the batched PDUs straight to the association's socket (at a PDU boundary, as dicom-ul
/// allows), within the write timeout.
async fn flush<A>(
    assoc: &mut A,
    batch: &mut Vec<u8>,
    write_timeout: Duration,
) -> Result<(), ProtocolError>
where
    A: AsyncAssociation<TcpStream> + Send,
{
    use tokio::io::AsyncWriteExt;
    let socket = AsyncAssociation::inner_stream(assoc);
    match tokio::time::timeout(write_timeout, socket.write_all(batch)).await {
        Err(_) => Err(ProtocolError::Network("write timed out".into())),
        Ok(Err(e)) => Err(ProtocolError::Network(e.to_string())),
        Ok(Ok(())) => {
            batch.clear();
            Ok(())
        }
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
