//! Ingest: the one path by which objects enter the gateway (C-STORE and STOW-RS). It is the
//! pipeline only; the bytes are read by [`crate::dicom`].
//!
//! 1. [`spool`]: the object is written to a spool file (Part-10) as it arrives, never held whole in memory.
//! 2. `parse`: the object is walked, its header (everything before Pixel Data) parsed, UIDs
//!    validated, the frame layout located and the index record built ([`extract`], [`bulk`] for the
//!    values left on disk). A large object's header is read from its first bytes while the rest
//!    arrives (`early`, [`Ingestor::read_header_early`]); its layout, checked against the whole
//!    object, once all of it is there.
//! 3. The object is put into storage (durable) and its record committed to the index, by one
//!    straight path per storage kind: a small object with its insert gated on its flush, a larger
//!    one stored then indexed, or (a remote store) uploaded then indexed; only then is success
//!    returned.
//!
//! Deletion ([`delete`]) goes through here too: rows first, then objects.
//!
//! Architecture invariant: only this module writes objects to storage and rows to the index.

pub mod bulk;
mod delete;
mod early;
pub mod extract;
mod parse;
pub mod spool;
mod thumbnail;

use std::path::PathBuf;
use std::sync::Arc;

use crate::audit::{Action, AuditEvent, Origin, Outcome as AuditOutcome};
use crate::config::DuplicatePolicy;
use crate::index::{Index, InsertOutcome, WriteError};
use crate::storage::{instance_key, ObjectStore, PutPath, StorageError};
pub use early::EarlyHeader;
use early::ReadEarly;
pub use extract::ObjectUids;
use parse::{complete, parse, Parsed};

pub use delete::Removal;
pub use spool::{SpoolFiles, SpoolWriter, Spooled};

/// What the sender said the object is (from the C-STORE command, or a STOW-RS part's file meta
/// information), checked against the dataset.
#[derive(Debug, Clone)]
pub struct Expected {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// The study the object must belong to (STOW-RS to `/studies/{study}`).
    pub study_instance_uid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    /// Same SOP Instance UID already stored; the first copy was kept.
    DuplicateKept,
    /// Same SOP Instance UID already stored; it was replaced by this copy.
    Replaced,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The bytes are not a readable DICOM object (truncated, malformed).
    #[error("cannot parse object: {0}")]
    Unparseable(String),
    /// The object is readable but its identifying attributes are missing, malformed or disagree
    /// with the command that carried it.
    #[error("{0}")]
    Invalid(String),
    #[error("storage failed: {0}")]
    Storage(#[from] StorageError),
    #[error("index failed: {0}")]
    Index(#[from] WriteError),
}

pub struct Ingestor {
    store: Arc<dyn ObjectStore>,
    index: Index,
    on_duplicate: DuplicatePolicy,
    spool: Arc<SpoolFiles>,
}

/// Objects up to this size have their index insert gated ([`Index::insert_gated_blocking`]): its
/// statements run while the object is made durable, and the writer's batch waits for that. A
/// larger object is made durable first and indexed after, so that its flush (seconds for a
/// multi-GB object) never holds up the commits of other associations' C-STOREs.
const GATED_UP_TO: u64 = 1 << 20;

/// Where ingest's blocking task left an object.
enum Step {
    /// Already indexed, and the policy keeps the first copy.
    Duplicate(ObjectUids),
    /// Durable in storage under `key`, and the outcome of its (gated) insert.
    Indexed {
        key: String,
        outcome: Result<InsertOutcome, WriteError>,
        settle: Settle,
        uids: ObjectUids,
    },
    /// Parsed; to be put into storage, then indexed.
    ToStore(Box<Parsed>),
}

impl Ingestor {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        index: Index,
        on_duplicate: DuplicatePolicy,
        spool_dir: PathBuf,
    ) -> std::io::Result<Ingestor> {
        let write_back_early =
            store.put_path(spool::BUFFER as u64 + 1) == PutPath::BlockingAfterWriteBack;
        Ok(Ingestor {
            store,
            index,
            on_duplicate,
            spool: SpoolFiles::new(&spool_dir, write_back_early)?,
        })
    }

    /// Where incoming objects are spooled.
    pub fn spool(&self) -> &SpoolFiles {
        &self.spool
    }

    /// Parses, stores and indexes a spooled object; success means durable and indexed.
    /// On any failure nothing is left behind: the spool file is removed with `spooled`.
    /// `early`: its header, read while it arrived, if that was started. `by`: who sent it; the
    /// store's audit event commits with its index row (a refusal's or a kept duplicate's is
    /// recorded after).
    pub async fn ingest(
        &self,
        spooled: Spooled,
        expected: Option<&Expected>,
        early: Option<EarlyHeader>,
        by: &Origin,
    ) -> Result<Outcome, IngestError> {
        (self.ingest_identified(spooled, expected, early, by).await).map(|(outcome, _)| outcome)
    }

    /// [`Ingestor::ingest`], also returning the object's UIDs (for STOW-RS's RetrieveURLs).
    pub async fn ingest_identified(
        &self,
        spooled: Spooled,
        expected: Option<&Expected>,
        early: Option<EarlyHeader>,
        by: &Origin,
    ) -> Result<(Outcome, ObjectUids), IngestError> {
        let result = self.store_and_index(spooled, expected, early, by).await;
        let unrecorded = match &result {
            Ok((Outcome::DuplicateKept, uids)) => {
                let mut event = AuditEvent::new(Action::Store, by.clone(), AuditOutcome::Success)
                    .study(&uids.study_uid)
                    .described("duplicate: the stored copy was kept")
                    .instances(1);
                event.sop_class_uid = uids.sop_class_uid.clone();
                event.instances = vec![uids.sop_instance_uid.clone()];
                Some(event)
            }
            Ok(_) => None, // recorded with the insert
            Err(e) => {
                let outcome = match e {
                    IngestError::Unparseable(_) | IngestError::Invalid(_) => {
                        AuditOutcome::MinorFailure
                    }
                    IngestError::Storage(_) | IngestError::Index(_) => AuditOutcome::SeriousFailure,
                };
                let mut event = AuditEvent::new(Action::Store, by.clone(), outcome)
                    .described(e.to_string())
                    .instances(1);
                if let Some(exp) = expected {
                    event.study_uid = exp.study_instance_uid.clone().unwrap_or_default();
                    event.sop_class_uid = exp.sop_class_uid.clone();
                    event.instances = vec![exp.sop_instance_uid.clone()];
                }
                Some(event)
            }
        };
        if let Some(event) = unrecorded {
            crate::audit::record(&self.index, event);
        }
        result
    }

    async fn store_and_index(
        &self,
        spooled: Spooled,
        expected: Option<&Expected>,
        early: Option<EarlyHeader>,
        by: &Origin,
    ) -> Result<(Outcome, ObjectUids), IngestError> {
        let early = match early {
            Some(EarlyHeader(task)) => task.await.ok().flatten(),
            None => None,
        };
        let size = spooled.size();
        let key_suffix = match &early {
            Some(early) => early.key_suffix.clone(),
            None => unique_suffix(),
        };
        let put_path = self.store.put_path(size);
        let replace = self.on_duplicate == DuplicatePolicy::Replace;
        let (store, index, expected) = (self.store.clone(), self.index.clone(), expected.cloned());
        let by = by.clone();
        // One blocking task: the spool file's last bytes are written, the object parsed and checked
        // ([`prepare`]), then stored by the path of its storage kind. Each hand-off between threads
        // costs a wake-up on the critical path of a C-STORE.
        let job = tokio::task::spawn_blocking(move || {
            let mut spooled = spooled;
            let step = (|| -> Result<Step, IngestError> {
                let write_back = put_path == PutPath::BlockingAfterWriteBack;
                let checks = Checks {
                    index: &index,
                    expected: expected.as_ref(),
                    keep_first: !replace,
                    write_back,
                };
                let mut parsed = match prepare(&mut spooled, size, early, &key_suffix, checks)? {
                    Prepared::Duplicate(uids) => return Ok(Step::Duplicate(uids)),
                    Prepared::New(parsed) => parsed,
                };
                parsed.record.audit = Some(by);
                let blocking = Blocking {
                    store: &store,
                    index: &index,
                    replace,
                    write_back,
                };
                match put_path {
                    PutPath::Async => {
                        spooled.finish_writes().map_err(spool_error)?;
                        Ok(Step::ToStore(parsed))
                    }
                    _ if size > GATED_UP_TO => blocking.store_then_index(&mut spooled, *parsed),
                    _ => blocking.store_gated(&mut spooled, *parsed),
                }
            })();
            (spooled, step)
        });
        let (spooled, step) = job.await.expect("parse task panicked");
        // A refused object's or a resent duplicate's spool file is removed (dropped) before the answer.
        let (key, outcome, _settle, uids) = match step? {
            Step::Duplicate(uids) => return Ok((Outcome::DuplicateKept, uids)),
            Step::Indexed {
                key,
                outcome,
                settle,
                uids,
            } => {
                spooled.mark_stored();
                (key, outcome, settle, uids)
            }
            Step::ToStore(parsed) => {
                let key = parsed.record.instance.storage_key.clone();
                let settle = Settle::new(&self.store, &key);
                spooled.store_into(self.store.as_ref(), &key).await?;
                let uids = parsed.uids.clone();
                let outcome = self.index.insert(parsed.record, replace).await;
                (key, outcome, settle, uids)
            }
        };
        match outcome {
            Ok(InsertOutcome::Inserted) => Ok((Outcome::Stored, uids)),
            Ok(InsertOutcome::Duplicate) => {
                self.delete_quietly(&key).await;
                Ok((Outcome::DuplicateKept, uids))
            }
            Ok(InsertOutcome::Replaced { old_key }) => {
                self.delete_quietly(&old_key).await;
                Ok((Outcome::Replaced, uids))
            }
            Err(e) => {
                self.delete_quietly(&key).await;
                Err(e.into())
            }
        }
    }

    /// Indexes an object already in storage under `key` (recovery after a crash between storing
    /// and indexing, or rebuilding the index). A copy whose UID is indexed elsewhere is deleted.
    pub async fn index_stored_object(&self, key: &str) -> Result<Outcome, IngestError> {
        use futures::TryStreamExt;
        let io = |source| StorageError::Io {
            key: key.to_string(),
            source,
        };
        let mut spool = SpoolWriter::create_raw(&self.spool).await.map_err(io)?;
        let (_, mut stream) = self.store.get(key).await?;
        while let Some(chunk) = stream.try_next().await.map_err(io)? {
            spool.write(&chunk).await.map_err(io)?;
        }
        let mut spooled = spool.finish();
        let owned_key = key.to_string();
        let parsed = tokio::task::spawn_blocking(move || {
            spooled.write_tail().map_err(spool_error)?;
            let size = spooled.size();
            let mut reader = spooled.reader().map_err(spool_error)?;
            parse(&mut reader, size, |_| owned_key)
        })
        .await
        .expect("parse task panicked")?;
        match self.index.insert(parsed.record, false).await? {
            InsertOutcome::Duplicate => {
                self.delete_quietly(key).await;
                Ok(Outcome::DuplicateKept)
            }
            _ => Ok(Outcome::Stored),
        }
    }

    /// The storage's record of keys that may be left unindexed (see [`ObjectStore::settle`]).
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    async fn delete_quietly(&self, key: &str) {
        if let Err(e) = self.store.delete(key).await {
            tracing::warn!(key, error = %e, "could not delete superseded object");
        }
    }
}

/// What [`prepare`] checks a parsed object against.
struct Checks<'a> {
    index: &'a Index,
    expected: Option<&'a Expected>,
    /// The policy keeps the first copy: a UID already indexed is a duplicate.
    keep_first: bool,
    /// The store flushes the spool file in place: its write-back is started before the parse.
    write_back: bool,
}

/// What [`prepare`] found.
enum Prepared {
    /// Already indexed, and the policy keeps the first copy.
    Duplicate(ObjectUids),
    New(Box<Parsed>),
}

/// The part every storage kind shares (blocking): the spool file's last bytes written, the object
/// parsed (its header read early if that was started; an object kept in memory is parsed from its
/// buffers while its last full buffer is still being written), checked against what its sender
/// said, and its SOP Instance UID looked up when the policy keeps the first copy.
fn prepare(
    spooled: &mut Spooled,
    size: u64,
    early: Option<ReadEarly>,
    key_suffix: &str,
    checks: Checks<'_>,
) -> Result<Prepared, IngestError> {
    spooled.write_tail().map_err(spool_error)?;
    if checks.write_back {
        spooled.start_write_back().map_err(spool_error)?;
    }
    let key_for = |uids: &ObjectUids| {
        instance_key(
            &uids.study_uid,
            &uids.series_uid,
            &uids.sop_instance_uid,
            key_suffix,
        )
    };
    let mut reader = spooled.reader().map_err(spool_error)?;
    let (parsed, indexed) = match early {
        Some(ReadEarly {
            header,
            indexed,
            forecast,
            ..
        }) => (
            complete(header, &mut reader, size, key_for, forecast)?,
            indexed,
        ),
        None => (parse(&mut reader, size, key_for)?, None),
    };
    drop(reader);
    if let Some(exp) = checks.expected {
        check_expected(&parsed.uids, exp)?;
    }
    let indexed = match indexed {
        Some(indexed) => indexed,
        None if checks.keep_first => checks
            .index
            .instance_exists_blocking(&parsed.uids.sop_instance_uid)
            .map_err(|e| IngestError::Index(e.into()))?,
        None => false,
    };
    Ok(match indexed {
        true => Prepared::Duplicate(parsed.uids),
        false => Prepared::New(Box::new(parsed)),
    })
}

/// The paths of a store that works from blocking code (the filesystem): the object is stored by the
/// ingest's blocking task itself (its data written back first when the store flushes the file in
/// place).
struct Blocking<'a> {
    store: &'a Arc<dyn ObjectStore>,
    index: &'a Index,
    replace: bool,
    write_back: bool,
}

impl Blocking<'_> {
    /// Settles the keys this store logs, however it ends (see [`Settle`]). With `replace`, the
    /// copy this one may replace is logged before the index can forget it: if the process dies
    /// after the commit but before the old copy is deleted, reconcile finds it and drops it.
    fn settle(&self, parsed: &Parsed) -> Result<Settle, IngestError> {
        let mut settle = Settle::new(self.store, &parsed.record.instance.storage_key);
        if self.replace {
            let old = self
                .index
                .storage_key_blocking(&parsed.uids.sop_instance_uid)
                .map_err(|e| IngestError::Index(e.into()))?;
            if let Some(old) = old {
                self.store.intend_blocking(&[&old])?;
                settle.keys.push(old);
            }
        }
        Ok(settle)
    }

    /// Writes the spool file's last bytes and puts it into storage under `key`, durable.
    fn put(&self, spooled: &mut Spooled, key: &str) -> Result<(), IngestError> {
        spooled.finish_writes().map_err(spool_error)?;
        if self.write_back {
            spooled.write_back().map_err(spool_error)?;
        }
        self.store.put_file_blocking(key, spooled.path())?;
        Ok(())
    }

    /// A small object: the insert's statements run while the object is made durable, and commit
    /// once it is; its gate is dropped unopened if storing fails, and then nothing is committed.
    fn store_gated(&self, spooled: &mut Spooled, parsed: Parsed) -> Result<Step, IngestError> {
        let settle = self.settle(&parsed)?;
        let (key, uids) = (parsed.record.instance.storage_key.clone(), parsed.uids);
        let (gate, pending) = self
            .index
            .insert_gated_blocking(parsed.record, self.replace)?;
        self.put(spooled, &key)?;
        gate.open();
        let outcome = pending.wait_blocking();
        Ok(Step::Indexed {
            key,
            outcome,
            settle,
            uids,
        })
    }

    /// A larger object: made durable first and indexed after, so that its flush never holds up
    /// the commits of other C-STOREs (see [`GATED_UP_TO`]).
    fn store_then_index(&self, spooled: &mut Spooled, parsed: Parsed) -> Result<Step, IngestError> {
        let settle = self.settle(&parsed)?;
        let (key, uids) = (parsed.record.instance.storage_key.clone(), parsed.uids);
        self.put(spooled, &key)?;
        // Stored: from here a failure must reach the caller, which deletes the object.
        let outcome = self
            .index
            .insert_gated_blocking(parsed.record, self.replace)
            .and_then(|(gate, pending)| {
                gate.open();
                pending.wait_blocking()
            });
        Ok(Step::Indexed {
            key,
            outcome,
            settle,
            uids,
        })
    }
}

/// Settles the keys a C-STORE logged in storage ([`ObjectStore::settle`]) when dropped: once the
/// ingest has ended, the object is indexed (the commit durable or flushed before the storage's
/// next checkpoint), or it failed and the object was deleted; either way start-up reconcile no
/// longer needs to look at it.
struct Settle {
    store: Arc<dyn ObjectStore>,
    keys: Vec<String>,
}

impl Settle {
    fn new(store: &Arc<dyn ObjectStore>, key: &str) -> Settle {
        Settle {
            store: store.clone(),
            keys: vec![key.to_string()],
        }
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        for key in &self.keys {
            self.store.settle(key);
        }
    }
}

fn check_expected(uids: &ObjectUids, exp: &Expected) -> Result<(), IngestError> {
    if uids.sop_instance_uid != exp.sop_instance_uid.trim_end_matches(['\0', ' ']) {
        return Err(IngestError::Invalid(format!(
            "SOP Instance UID in the data set ({}) differs from the command's Affected SOP Instance UID ({})",
            uids.sop_instance_uid, exp.sop_instance_uid
        )));
    }
    if uids.sop_class_uid != exp.sop_class_uid.trim_end_matches(['\0', ' ']) {
        return Err(IngestError::Invalid(format!(
            "SOP Class UID in the data set ({}) differs from the command's Affected SOP Class UID ({})",
            uids.sop_class_uid, exp.sop_class_uid
        )));
    }
    if let Some(study) = &exp.study_instance_uid {
        if &uids.study_uid != study {
            return Err(IngestError::Invalid(format!(
                "Study Instance UID in the data set ({}) differs from the study of the request ({study})",
                uids.study_uid
            )));
        }
    }
    Ok(())
}

/// A spool file that could not be written or read.
/// Everything ingest's parse and the early header read do with an object's bytes, for the fuzz
/// targets.
#[cfg(fuzzing)]
pub fn parse_for_fuzzing(object: &[u8]) {
    let _ = early::header_from_prefix(object);
    let _ = parse(
        &mut std::io::Cursor::new(object),
        object.len() as u64,
        |_| String::new(),
    );
}

fn spool_error(source: std::io::Error) -> IngestError {
    IngestError::Storage(StorageError::Io {
        key: "spool".into(),
        source,
    })
}

/// A short random suffix making every stored copy's key unique, so a replacement never overwrites
/// the copy the index still points at.
fn unique_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}
