//! What C-MOVE and C-GET share (PS3.4 C.4.2, C.4.3): which instances an identifier names, the
//! C-STORE sub-operation (one stored instance streamed from storage into PDVs, never the whole
//! study in memory), sub-operation counting, and the pending / final responses.
//!
//! An instance goes out in its stored transfer syntax when the receiver accepted that; otherwise a
//! native object is re-encoded into Explicit or Implicit VR Little Endian (one instance in memory),
//! and a compressed one the receiver cannot take counts as a failed sub-operation.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_ul::association::AsyncAssociation;
use futures::{StreamExt, TryStreamExt};
use sqlx::Row;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::command::{elem, field, CommandBuilder, DATA_SET_PRESENT};
use super::message::{self, Inbox, ProtocolError};
use super::qr::{self, status, Failure, Model, QrLevel, Request};
use super::{dataset, Context};
use crate::dicom::read_meta_extent;
use crate::index::query::{Level, Query};
use crate::security::policy::Scope;
use crate::storage::{read_all, ObjectStore};
use crate::transcode::{self, EXPLICIT_VR_LE, IMPLICIT_VR_LE};

/// The file meta group of a stored object is looked for in this many leading bytes at most.
const META_READ: usize = 16 * 1024;

/// Reads the leading bytes of a stored object's stream until its file meta group can be measured,
/// and returns the stream (those bytes put back in front) with the offset of the data set: one
/// storage read per sub-operation, not a ranged read of the header and then the object.
async fn split_file_meta(
    mut stream: crate::storage::ByteStream,
) -> Result<(crate::storage::ByteStream, usize), SubOpError> {
    let failed = |e: &dyn std::fmt::Display| SubOpError::Failed(e.to_string());
    let mut head = Vec::with_capacity(META_READ);
    while head.len() < META_READ {
        match stream.try_next().await.map_err(|e| failed(&e))? {
            Some(chunk) => head.extend_from_slice(&chunk),
            None => break,
        }
    }
    let dataset_start = dataset_start(&head)?;
    let head = futures::stream::once(async move { Ok(bytes::Bytes::from(head)) });
    Ok((Box::pin(head.chain(stream)), dataset_start))
}

/// Where the data set starts in a whole stored object.
fn dataset_start(object: &[u8]) -> Result<usize, SubOpError> {
    read_meta_extent(&mut Cursor::new(object))
        .map(|(start, _)| start as usize)
        .map_err(|e| SubOpError::Failed(e.to_string()))
}

/// An instance to send, as the index knows it.
#[derive(Debug, Clone)]
pub struct Instance {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub storage_key: String,
    pub size_bytes: u64,
    /// The frame layout ingest recorded (JSON), for decompressing.
    pub frame_layout: String,
}

/// The instances an identifier names: every key goes through the matching engine, and the unique
/// key of the level must have a value (a retrieve never means "everything").
pub async fn matching_instances(
    ctx: &Context,
    model: Model,
    identifier: &InMemDicomObject,
    scope: &Scope,
) -> Result<Vec<Instance>, Failure> {
    let level = QrLevel::of(model, identifier)?;
    let unique = match level {
        QrLevel::Patient => tags::PATIENT_ID,
        QrLevel::Study => tags::STUDY_INSTANCE_UID,
        QrLevel::Series => tags::SERIES_INSTANCE_UID,
        QrLevel::Image => tags::SOP_INSTANCE_UID,
    };
    let has_unique = identifier
        .get(unique)
        .and_then(|e| e.to_str().ok())
        .is_some_and(|v| !v.trim_end_matches(['\0', ' ']).is_empty());
    if !has_unique {
        return Err(Failure::new(
            status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            format!(
                "the unique key {unique} of the {} level has no value",
                level.as_str()
            ),
        ));
    }
    let mut query = Query::new(level.engine_level());
    qr::add_keys(&mut query, identifier, |_| true)?;
    // Instances of studies outside the caller's scope match nothing.
    if let Scope::Studies(filters) = scope {
        query.within(filters);
    }
    let (where_sql, args) = query.where_sql();
    let sql = format!(
        "SELECT i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax_uid, i.storage_key,
                i.size_bytes, i.frame_layout
         {} {where_sql}
         ORDER BY se.series_number, se.series_pk, i.instance_number, i.instance_pk",
        Level::Instance.from_sql()
    );
    let rows: Result<Vec<Instance>, sqlx::Error> =
        crate::index::bind_args(sqlx::query(&sql), &args)
            .fetch(ctx.index.read_pool())
            .map_ok(|r| Instance {
                sop_class_uid: r.get(0),
                sop_instance_uid: r.get(1),
                transfer_syntax_uid: r.get(2),
                storage_key: r.get(3),
                size_bytes: r.get::<i64, _>(4) as u64,
                frame_layout: r.get(5),
            })
            .try_collect()
            .await;
    rows.map_err(|e| {
        tracing::error!(error = %e, "index read failed");
        Failure::new(status::OUT_OF_RESOURCES, "index read failed")
    })
}

/// An accepted presentation context of the association sub-operations go over.
#[derive(Debug, Clone)]
pub struct OutContext {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

/// How one instance goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding<'a> {
    AsStored(u8),
    Reencoded(u8, &'a str),
}

fn choose<'a>(contexts: &'a [OutContext], inst: &Instance) -> Option<Encoding<'a>> {
    let for_class = || {
        contexts
            .iter()
            .filter(|c| c.abstract_syntax == inst.sop_class_uid)
    };
    if let Some(c) = for_class().find(|c| c.transfer_syntax == inst.transfer_syntax_uid) {
        return Some(Encoding::AsStored(c.id));
    }
    // Else re-encoded (decompressed if need be) into a native syntax the receiver accepted.
    if !crate::transcode::can_decode(&inst.transfer_syntax_uid) {
        return None;
    }
    [EXPLICIT_VR_LE, IMPLICIT_VR_LE].iter().find_map(|ts| {
        for_class()
            .find(|c| c.transfer_syntax == *ts)
            .map(|c| Encoding::Reencoded(c.id, c.transfer_syntax.as_str()))
    })
}

/// The presentation contexts to propose for sending `instances`: one per distinct SOP class and
/// stored transfer syntax, plus one per SOP class of objects the transcoder can decode offering
/// Explicit and Implicit VR Little Endian for re-encoding; at most 128 (odd IDs 1-255).
pub fn proposed_contexts(instances: &[Instance]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for inst in instances {
        let stored = (
            inst.sop_class_uid.clone(),
            vec![inst.transfer_syntax_uid.clone()],
        );
        if !out.contains(&stored) {
            out.push(stored);
        }
        if crate::transcode::can_decode(&inst.transfer_syntax_uid) {
            let fallback = (
                inst.sop_class_uid.clone(),
                vec![EXPLICIT_VR_LE.to_string(), IMPLICIT_VR_LE.to_string()],
            );
            if !out.contains(&fallback) {
                out.push(fallback);
            }
        }
    }
    out.truncate(128);
    out
}

/// Sub-operation counts (PS3.7 C.4.2.1.6 and following).
#[derive(Debug, Default)]
pub struct Progress {
    pub remaining: usize,
    pub completed: usize,
    pub failed: usize,
    pub warning: usize,
    pub failed_uids: Vec<String>,
    pub cancelled: bool,
    last_pending: Option<std::time::Instant>,
}

fn count(n: usize) -> u16 {
    n.min(u16::MAX as usize) as u16
}

impl Progress {
    pub fn new(total: usize) -> Progress {
        Progress {
            remaining: total,
            ..Progress::default()
        }
    }

    /// Records a sub-operation's C-STORE status.
    pub fn record(&mut self, inst: &Instance, store_status: Option<u16>) {
        self.remaining = self.remaining.saturating_sub(1);
        match store_status {
            Some(0x0000) => self.completed += 1,
            Some(s) if s == 0x0001 || (0xB000..=0xBFFF).contains(&s) => self.warning += 1,
            _ => {
                self.failed += 1;
                self.failed_uids.push(inst.sop_instance_uid.clone());
            }
        }
    }

    /// Whether a pending response is due after a sub-operation: some remain, and at least
    /// `interval` has passed since the last pending response (or none was sent yet).
    pub fn pending_due(&mut self, interval: Duration) -> bool {
        let now = std::time::Instant::now();
        let due = self.remaining > 0
            && !self.cancelled
            && self
                .last_pending
                .is_none_or(|last| now.duration_since(last) >= interval);
        if due {
            self.last_pending = Some(now);
        }
        due
    }

    /// Counts every instance not yet sent as failed (the receiving association is gone).
    pub fn fail_rest(&mut self, rest: &[Instance]) {
        for inst in rest {
            self.record(inst, None);
        }
    }

    /// The final status: success, cancel, none delivered (A702), or some failed (B000).
    pub fn final_status(&self) -> u16 {
        if self.cancelled {
            status::CANCEL
        } else if self.failed == 0 && self.warning == 0 {
            status::SUCCESS
        } else if self.completed == 0 && self.warning == 0 {
            status::UNABLE_TO_PERFORM_SUB_OPERATIONS
        } else {
            status::SUB_OPERATIONS_WITH_FAILURES
        }
    }

    fn with_counts(&self, b: CommandBuilder, remaining: bool) -> CommandBuilder {
        let b = if remaining {
            b.u16(
                elem::NUMBER_OF_REMAINING_SUB_OPERATIONS,
                count(self.remaining),
            )
        } else {
            b
        };
        b.u16(
            elem::NUMBER_OF_COMPLETED_SUB_OPERATIONS,
            count(self.completed),
        )
        .u16(elem::NUMBER_OF_FAILED_SUB_OPERATIONS, count(self.failed))
        .u16(elem::NUMBER_OF_WARNING_SUB_OPERATIONS, count(self.warning))
    }

    pub async fn send_pending<A>(
        &self,
        assoc: &mut A,
        req: &Request,
        rsp_field: u16,
    ) -> Result<(), ProtocolError>
    where
        A: AsyncAssociation<TcpStream> + Send,
    {
        let b = qr::response(req, rsp_field, status::PENDING, false);
        let command = self.with_counts(b, true).encode();
        message::send(assoc, req.pc, &command, None, req.write_timeout).await
    }

    /// The final response; its identifier lists the failed SOP instances when there are any.
    pub async fn send_final<A>(
        &self,
        assoc: &mut A,
        req: &Request,
        rsp_field: u16,
        comment: Option<&str>,
    ) -> Result<(), ProtocolError>
    where
        A: AsyncAssociation<TcpStream> + Send,
    {
        let final_status = self.final_status();
        let data = if self.failed_uids.is_empty() {
            None
        } else {
            let identifier = InMemDicomObject::from_element_iter([DataElement::new(
                tags::FAILED_SOP_INSTANCE_UID_LIST,
                VR::UI,
                PrimitiveValue::Strs(self.failed_uids.iter().cloned().collect()),
            )]);
            dataset::encode(&identifier, &req.transfer_syntax).ok()
        };
        let mut b = qr::response(req, rsp_field, final_status, data.is_some());
        b = self.with_counts(b, final_status == status::CANCEL);
        if let Some(c) = comment {
            b = b.text(elem::ERROR_COMMENT, c);
        }
        message::send(
            assoc,
            req.pc,
            &b.encode(),
            data.as_deref(),
            req.write_timeout,
        )
        .await
    }
}

/// A final response without sub-operations (refusals).
pub async fn send_refusal<A>(
    assoc: &mut A,
    req: &Request,
    rsp_field: u16,
    failure: &Failure,
) -> Result<(), ProtocolError>
where
    A: AsyncAssociation<TcpStream> + Send,
{
    tracing::warn!(calling_ae = %req.calling_ae, status = format!("{:04X}", failure.status), comment = %failure.comment, "retrieve refused");
    let b = qr::response(req, rsp_field, failure.status, false)
        .text(elem::ERROR_COMMENT, &failure.comment);
    message::send(assoc, req.pc, &b.encode(), None, req.write_timeout).await
}

/// Why a sub-operation did not deliver its instance.
pub enum SubOpError {
    /// This instance failed; the association can go on.
    Failed(String),
    /// The association carrying sub-operations is unusable.
    Protocol(ProtocolError),
}

/// A C-MOVE originator to name in sub-operations.
pub struct Originator<'a> {
    pub ae_title: &'a str,
    pub message_id: u16,
}

/// One instance read from storage and ready to go out on a presentation context.
pub struct Prepared {
    pc: u8,
    body: Body,
}

enum Body {
    /// The stored object from its data set on (the file meta group is skipped).
    AsStored {
        stream: crate::storage::ByteStream,
        dataset_start: usize,
    },
    /// The data set already encoded as P-DATA PDUs (the copy into PDUs is made while the previous
    /// instance's response is awaited, not after it): a small stored object, or a native object
    /// re-encoded in the context's transfer syntax (one instance in memory).
    Encoded(Vec<u8>),
}

/// Objects up to this size are read whole and encoded ahead (the filesystem store reads them
/// whole anyway); larger ones are streamed.
const ENCODE_AHEAD_MAX: u64 = 2 << 20;

/// Reads an instance from storage for sending: as stored if the receiver accepted its transfer
/// syntax, else re-encoded (native only).
async fn prepare(
    store: Arc<dyn ObjectStore>,
    contexts: Arc<[OutContext]>,
    pdv_limit: usize,
    inst: Instance,
) -> Result<Prepared, SubOpError> {
    let Some(encoding) = choose(&contexts, &inst) else {
        return Err(SubOpError::Failed(format!(
            "no accepted presentation context for {} in {}",
            inst.sop_class_uid, inst.transfer_syntax_uid
        )));
    };
    let storage = |e: crate::storage::StorageError| SubOpError::Failed(e.to_string());
    match encoding {
        Encoding::AsStored(pc) if inst.size_bytes <= ENCODE_AHEAD_MAX => {
            let bytes = read_all(store.as_ref(), &inst.storage_key)
                .await
                .map_err(storage)?;
            let data = bytes
                .get(dataset_start(&bytes)?..)
                .ok_or_else(|| SubOpError::Failed("stored object shorter than its meta".into()))?;
            Ok(Prepared {
                pc,
                body: Body::Encoded(message::encode_data(pc, pdv_limit, data)),
            })
        }
        Encoding::AsStored(pc) => {
            let (_, stream) = store.get(&inst.storage_key).await.map_err(storage)?;
            let (stream, dataset_start) = split_file_meta(stream).await?;
            Ok(Prepared {
                pc,
                body: Body::AsStored {
                    stream,
                    dataset_start,
                },
            })
        }
        Encoding::Reencoded(pc, ts) => {
            let bytes = read_all(store.as_ref(), &inst.storage_key)
                .await
                .map_err(storage)?;
            let data = transcode::dataset(bytes, &inst.frame_layout, ts)
                .await
                .map_err(|e| SubOpError::Failed(e.to_string()))?;
            Ok(Prepared {
                pc,
                body: Body::Encoded(message::encode_data(pc, pdv_limit, &data)),
            })
        }
    }
}

/// Reads the next instance from storage while the current one is on the wire and its C-STORE
/// response is awaited, so that a sub-operation does not wait for storage as well. One instance
/// ahead at most: with the store's whole reads of small objects, two instances in memory.
pub struct ReadAhead<'a> {
    store: Arc<dyn ObjectStore>,
    contexts: Arc<[OutContext]>,
    pdv_limit: usize,
    /// The instances not yet handed out, in order.
    rest: std::slice::Iter<'a, Instance>,
    next: Option<JoinHandle<Result<Prepared, SubOpError>>>,
}

impl<'a> ReadAhead<'a> {
    /// `pdv_limit`: the receiver's, for the instances encoded ahead.
    pub fn new(
        ctx: &Context,
        contexts: &[OutContext],
        pdv_limit: usize,
        instances: &'a [Instance],
    ) -> Self {
        let mut ahead = ReadAhead {
            store: ctx.store.clone(),
            contexts: contexts.into(),
            pdv_limit,
            rest: instances.iter(),
            next: None,
        };
        ahead.next = ahead.spawn_next();
        ahead
    }

    /// The next instance in order, read (or being read) ahead; starts reading the one after it.
    /// Call it once per instance.
    pub async fn take(&mut self) -> Result<Prepared, SubOpError> {
        let current = self.next.take().expect("an instance is left to take");
        self.next = self.spawn_next();
        current
            .await
            .map_err(|e| SubOpError::Failed(format!("storage read task: {e}")))?
    }

    fn spawn_next(&mut self) -> Option<JoinHandle<Result<Prepared, SubOpError>>> {
        let inst = self.rest.next()?.clone();
        let (store, contexts) = (self.store.clone(), self.contexts.clone());
        Some(tokio::spawn(prepare(store, contexts, self.pdv_limit, inst)))
    }
}

impl Drop for ReadAhead<'_> {
    fn drop(&mut self) {
        if let Some(handle) = self.next.take() {
            handle.abort();
        }
    }
}

/// Sends one prepared instance as a C-STORE sub-operation and waits for its response. While
/// waiting, a C-CANCEL for `cancel_of` (C-GET: same association) sets `progress.cancelled`.
#[allow(clippy::too_many_arguments)]
pub async fn store<A>(
    assoc: &mut A,
    inbox: &mut Inbox,
    ctx: &Context,
    inst: &Instance,
    prepared: Prepared,
    message_id: u16,
    originator: Option<&Originator<'_>>,
    progress: &mut Progress,
    cancel_of: Option<u16>,
) -> Result<u16, SubOpError>
where
    A: AsyncAssociation<TcpStream> + Send,
{
    let mut b = CommandBuilder::new()
        .uid(elem::AFFECTED_SOP_CLASS_UID, &inst.sop_class_uid)
        .u16(elem::COMMAND_FIELD, field::C_STORE_RQ)
        .u16(elem::MESSAGE_ID, message_id)
        .u16(elem::PRIORITY, 0)
        .u16(elem::COMMAND_DATA_SET_TYPE, DATA_SET_PRESENT)
        .uid(elem::AFFECTED_SOP_INSTANCE_UID, &inst.sop_instance_uid);
    if let Some(o) = originator {
        b = b
            .text(elem::MOVE_ORIGINATOR_APPLICATION_ENTITY_TITLE, o.ae_title)
            .u16(elem::MOVE_ORIGINATOR_MESSAGE_ID, o.message_id);
    }
    let command = b.encode();
    let (pc, write_timeout) = (prepared.pc, ctx.config.write_timeout());
    let sent = match prepared.body {
        Body::AsStored {
            stream,
            dataset_start,
        } => {
            message::send_streamed(assoc, pc, &command, stream, dataset_start, write_timeout).await
        }
        Body::Encoded(pdus) => {
            message::send_encoded(assoc, pc, &command, &pdus, write_timeout).await
        }
    };
    sent.map_err(SubOpError::Protocol)?;
    let timeout = Duration::from_secs(ctx.config.read_timeout_secs);
    loop {
        let pdu = message::receive(assoc, timeout)
            .await
            .map_err(SubOpError::Protocol)?;
        for (_, cmd) in inbox.feed(pdu).map_err(SubOpError::Protocol)? {
            match cmd.command_field() {
                Ok(field::C_STORE_RSP)
                    if cmd.u16(elem::MESSAGE_ID_BEING_RESPONDED_TO).ok() == Some(message_id) =>
                {
                    return Ok(cmd.u16(elem::STATUS).unwrap_or(0xC000));
                }
                _ => match cancel_of {
                    Some(id) => {
                        progress.cancelled |=
                            message::is_cancel_of(&cmd, id).map_err(SubOpError::Protocol)?
                    }
                    None => {
                        return Err(SubOpError::Protocol(ProtocolError::Violation(
                            "unexpected command instead of a C-STORE response".into(),
                        )))
                    }
                },
            }
        }
    }
}

/// Decodes the identifier and finds its instances, or says why not.
pub async fn resolve(ctx: &Context, req: &Request, model: Model) -> Result<Vec<Instance>, Failure> {
    let identifier = dataset::decode(&req.identifier, &req.transfer_syntax)
        .map_err(|e| Failure::new(status::UNABLE_TO_PROCESS, format!("identifier: {e}")))?;
    let scope = req.scope(&ctx.policy, crate::security::Action::Read)?;
    matching_instances(ctx, model, &identifier, &scope).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(class: &str, ts: &str) -> Instance {
        Instance {
            sop_class_uid: class.into(),
            sop_instance_uid: "1.2.3".into(),
            transfer_syntax_uid: ts.into(),
            storage_key: "k".into(),
            size_bytes: 0,
            frame_layout: String::new(),
        }
    }

    fn ctx(id: u8, class: &str, ts: &str) -> OutContext {
        OutContext {
            id,
            abstract_syntax: class.into(),
            transfer_syntax: ts.into(),
        }
    }

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const JPEG: &str = "1.2.840.10008.1.2.4.50";
    const BE: &str = "1.2.840.10008.1.2.2";

    #[test]
    fn stored_syntax_first_then_uncompressed_fallback() {
        let contexts = [ctx(1, CT, JPEG), ctx(3, CT, IMPLICIT_VR_LE)];
        assert_eq!(
            choose(&contexts, &inst(CT, JPEG)),
            Some(Encoding::AsStored(1))
        );
        assert_eq!(
            choose(&contexts, &inst(CT, BE)),
            Some(Encoding::Reencoded(3, IMPLICIT_VR_LE))
        );
        assert_eq!(choose(&contexts[..1], &inst(CT, BE)), None);
        assert_eq!(
            choose(&contexts[1..], &inst(CT, JPEG)),
            Some(Encoding::Reencoded(3, IMPLICIT_VR_LE))
        );
        // Video is not decoded.
        assert_eq!(
            choose(&contexts[1..], &inst(CT, "1.2.840.10008.1.2.4.102")),
            None
        );
    }

    #[test]
    fn proposed_contexts_are_distinct_pairs_with_one_fallback_per_class() {
        let list = [
            inst(CT, JPEG),
            inst(CT, JPEG),
            inst(CT, BE),
            inst(CT, EXPLICIT_VR_LE),
        ];
        let pcs = proposed_contexts(&list);
        assert_eq!(pcs.len(), 4); // JPEG, BE, fallback, Explicit LE
        assert!(pcs.iter().all(|(c, _)| c == CT));
    }

    #[test]
    fn final_status_follows_the_counts() {
        let i = inst(CT, JPEG);
        let mut p = Progress::new(2);
        assert_eq!(p.final_status(), status::SUCCESS);
        p.record(&i, None);
        assert_eq!(p.final_status(), status::UNABLE_TO_PERFORM_SUB_OPERATIONS);
        p.record(&i, Some(0));
        assert_eq!(p.final_status(), status::SUB_OPERATIONS_WITH_FAILURES);
        assert_eq!((p.remaining, p.completed, p.failed), (0, 1, 1));
        assert_eq!(p.failed_uids, vec!["1.2.3".to_string()]);
        p.cancelled = true;
        assert_eq!(p.final_status(), status::CANCEL);
    }
}
