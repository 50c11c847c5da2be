//! C-STORE SCP (PS3.4 B.2): the data set is spooled as it arrives, then handed to ingest; the
//! response status says whether it is durable and indexed.

use dicom_core::dictionary::UidDictionary;
use dicom_dictionary_std::StandardSopClassDictionary;
use dicom_object::meta::FileMetaTableBuilder;

use super::command::{elem, field, Command, CommandBuilder, NO_DATA_SET};
use super::Context;
use crate::ingest::{EarlyHeader, Expected, IngestError, Outcome, SpoolWriter};
use crate::security::policy::Scope;
use crate::security::{Action, Identity};

/// C-STORE status codes (PS3.4 B.2.3, PS3.7 C).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Refused: Not Authorized (PS3.7 C.5.x, PS3.4 B.2.3).
    pub const NOT_AUTHORIZED: u16 = 0x0124;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    pub const DATA_SET_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

/// A Storage SOP class of the standard, by its dictionary keyword.
pub fn is_standard_storage_class(uid: &str) -> bool {
    StandardSopClassDictionary.by_uid(uid).is_some_and(|e| {
        e.alias.contains("Storage")
            && !e.alias.starts_with("StorageCommitment")
            && e.alias != "MediaStorageDirectoryStorage"
    })
}

/// The status and optional error comment of a C-STORE response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub comment: Option<String>,
}

impl Reply {
    fn failure(status: u16, comment: impl Into<String>) -> Reply {
        Reply {
            status,
            comment: Some(comment.into()),
        }
    }
}

/// A C-STORE whose data set is being received.
pub struct PendingStore {
    message_id: u16,
    expected: Expected,
    spool: Option<SpoolWriter>,
    /// The header being read while the rest of a large data set arrives.
    early: Option<EarlyHeader>,
    /// Set when the data set is being discarded; the reply is known already.
    early_reply: Option<Reply>,
}

impl PendingStore {
    /// Starts a C-STORE for a command received on a context with `transfer_syntax`.
    pub async fn begin(
        ctx: &Context,
        cmd: &Command,
        context_abstract_syntax: &str,
        transfer_syntax: &str,
        calling_ae: &str,
        peer: std::net::IpAddr,
    ) -> PendingStore {
        let message_id = cmd.message_id().unwrap_or(0);
        let sop_class = cmd.string(elem::AFFECTED_SOP_CLASS_UID).unwrap_or_default();
        let sop_instance = cmd
            .string(elem::AFFECTED_SOP_INSTANCE_UID)
            .unwrap_or_default();
        let expected = Expected {
            sop_class_uid: sop_class.clone(),
            sop_instance_uid: sop_instance.clone(),
            study_instance_uid: None,
        };
        let mut pending = PendingStore {
            message_id,
            expected,
            spool: None,
            early: None,
            early_reply: None,
        };
        let supported = is_standard_storage_class(&sop_class)
            || (ctx.config.accept_private_sop_classes
                && crate::index::query::is_valid_uid(&sop_class)
                && sop_class == context_abstract_syntax);
        if !supported {
            pending.early_reply = Some(Reply::failure(
                status::SOP_CLASS_NOT_SUPPORTED,
                format!("SOP class {sop_class} is not a supported Storage SOP class"),
            ));
            return pending;
        }
        if sop_class != context_abstract_syntax {
            pending.early_reply = Some(Reply::failure(
                status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                "Affected SOP Class UID differs from the presentation context",
            ));
            return pending;
        }
        if !crate::index::query::is_valid_uid(&sop_instance) {
            pending.early_reply = Some(Reply::failure(
                status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                "Affected SOP Instance UID is missing or invalid",
            ));
            return pending;
        }
        // A store scoped to some studies would need the object's attributes before it is kept: not
        // supported yet, so only an unscoped store right stores.
        let identity = Identity::dimse_peer(calling_ae, peer, None);
        if ctx.policy.scope(&identity, Action::Store) != Scope::All {
            tracing::warn!(target: "audit", calling_ae, %peer, "C-STORE refused by the policy");
            pending.early_reply = Some(Reply::failure(
                status::NOT_AUTHORIZED,
                "not authorized to store",
            ));
            return pending;
        }
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(sop_class)
            .media_storage_sop_instance_uid(sop_instance)
            .transfer_syntax(transfer_syntax)
            .source_application_entity_title(calling_ae.trim())
            .implementation_class_uid(crate::IMPLEMENTATION_CLASS_UID)
            .implementation_version_name(crate::IMPLEMENTATION_VERSION_NAME)
            .build();
        let spool = match meta {
            Ok(meta) => SpoolWriter::create_part10(ctx.ingestor.spool(), &meta).await,
            Err(e) => Err(std::io::Error::other(e)),
        };
        match spool {
            Ok(spool) => pending.spool = Some(spool),
            Err(e) => {
                tracing::error!(error = %e, "cannot create spool file");
                pending.early_reply = Some(Reply::failure(
                    status::OUT_OF_RESOURCES,
                    "cannot spool the object",
                ));
            }
        }
        pending
    }

    /// Appends a data set fragment (or discards it once the outcome is known).
    pub async fn write(&mut self, ctx: &Context, data: &[u8]) {
        let Some(spool) = self.spool.as_mut() else {
            return;
        };
        if spool.size() + data.len() as u64 > ctx.config.max_object_size {
            self.spool = None; // dropping removes the spool file
            self.early_reply = Some(Reply::failure(
                status::OUT_OF_RESOURCES,
                format!(
                    "object larger than the {} byte limit",
                    ctx.config.max_object_size
                ),
            ));
            return;
        }
        if let Err(e) = spool.write(data).await {
            tracing::error!(error = %e, "spool write failed");
            self.spool = None;
            self.early_reply = Some(Reply::failure(
                status::OUT_OF_RESOURCES,
                "cannot spool the object",
            ));
            return;
        }
        if let Some(prefix) = spool.take_prefix() {
            self.early = Some(ctx.ingestor.read_header_early(prefix));
        }
    }

    /// The whole data set has arrived: store and index it, and build the response command set.
    pub async fn finish(self, ctx: &Context, calling_ae: &str) -> Vec<u8> {
        let reply = match (self.early_reply, self.spool) {
            (Some(reply), _) => reply,
            (None, Some(spool)) => ingest(ctx, spool, &self.expected, self.early).await,
            (None, None) => unreachable!("a pending store has a spool or a reply"),
        };
        if reply.status == status::SUCCESS {
            tracing::info!(
                target: "audit",
                calling_ae,
                sop_class_uid = %self.expected.sop_class_uid,
                sop_instance_uid = %self.expected.sop_instance_uid,
                "C-STORE stored"
            );
        } else {
            tracing::warn!(
                sop_instance_uid = %self.expected.sop_instance_uid,
                calling_ae,
                status = format!("{:04X}", reply.status),
                comment = reply.comment.as_deref().unwrap_or(""),
                "C-STORE failed"
            );
        }
        response(
            self.message_id,
            &self.expected.sop_class_uid,
            &self.expected.sop_instance_uid,
            &reply,
        )
    }
}

async fn ingest(
    ctx: &Context,
    spool: SpoolWriter,
    expected: &Expected,
    early: Option<EarlyHeader>,
) -> Reply {
    let spooled = spool.finish();
    match ctx.ingestor.ingest(spooled, Some(expected), early).await {
        Ok(Outcome::Stored | Outcome::DuplicateKept | Outcome::Replaced) => Reply {
            status: status::SUCCESS,
            comment: None,
        },
        Err(IngestError::Unparseable(m)) => Reply::failure(status::CANNOT_UNDERSTAND, m),
        Err(IngestError::Invalid(m)) => {
            Reply::failure(status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS, m)
        }
        Err(e @ (IngestError::Storage(_) | IngestError::Index(_))) => {
            tracing::error!(error = %e, "object not stored");
            Reply::failure(status::OUT_OF_RESOURCES, e.to_string())
        }
    }
}

pub fn response(message_id: u16, sop_class: &str, sop_instance: &str, reply: &Reply) -> Vec<u8> {
    let mut b = CommandBuilder::new()
        .uid(elem::AFFECTED_SOP_CLASS_UID, sop_class)
        .u16(elem::COMMAND_FIELD, field::C_STORE_RSP)
        .u16(elem::MESSAGE_ID_BEING_RESPONDED_TO, message_id)
        .u16(elem::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
        .u16(elem::STATUS, reply.status)
        .uid(elem::AFFECTED_SOP_INSTANCE_UID, sop_instance);
    if let Some(comment) = &reply.comment {
        b = b.text(elem::ERROR_COMMENT, comment);
    }
    b.encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_classes_come_from_the_dictionary() {
        assert!(is_standard_storage_class("1.2.840.10008.5.1.4.1.1.2")); // CT
        assert!(is_standard_storage_class("1.2.840.10008.5.1.4.1.1.1.1")); // DX for presentation
        assert!(is_standard_storage_class("1.2.840.10008.5.1.4.1.1.88.11")); // Basic Text SR
        assert!(!is_standard_storage_class("1.2.840.10008.1.20.1")); // storage commitment
        assert!(!is_standard_storage_class("1.2.840.10008.1.3.10")); // DICOMDIR
        assert!(!is_standard_storage_class("1.2.840.10008.1.1")); // verification
        assert!(!is_standard_storage_class("1.2.3.4"));
    }
}
