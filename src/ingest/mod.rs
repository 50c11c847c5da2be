//! Ingest: the one path by which objects enter the gateway (C-STORE and STOW-RS).
//!
//! 1. [`spool`]: the object is written to a spool file (Part-10) as it arrives, never held whole in memory.
//! 2. [`extract`]: the header (everything before Pixel Data) is parsed, UIDs validated, the frame
//!    layout computed ([`layout`]) and the index record built. A large object's header is read from
//!    its first bytes while the rest arrives ([`Ingestor::read_header_early`]); its layout, checked
//!    against the whole object, once all of it is there.
//! 3. The object is put into storage (durable), then the record is committed to the index, and only
//!    then is success returned.
//!
//! Deletion ([`delete`]) goes through here too: rows first, then objects.
//!
//! Architecture invariant: only this module writes objects to storage and rows to the index.

pub mod bulk;
mod delete;
pub mod encoded;
pub mod extract;
mod inflate;
pub mod layout;
pub mod spool;
mod thumbnail;

use std::io::{Read, Seek};
use std::path::PathBuf;
use std::sync::Arc;

use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{InMemDicomObject, OpenFileOptions};

use crate::config::DuplicatePolicy;
use crate::index::{Index, InsertOutcome, WriteError};
use crate::storage::{instance_key, ObjectStore, PutPath, StorageError};
pub use extract::ObjectUids;
use extract::{build_record, geometry, object_uids};
use layout::{locate_frames, read_meta_extent, Layout};

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

/// The header of an object being received, read from its first bytes ([`Ingestor::read_header_early`]).
pub struct EarlyHeader(tokio::task::JoinHandle<Option<ReadEarly>>);

struct ReadEarly {
    header: Header,
    /// Whether its SOP Instance UID was indexed already (looked up when the first copy is kept).
    indexed: Option<bool>,
    /// The suffix of its storage key, chosen early for the forecast record.
    key_suffix: String,
    forecast: Option<Forecast>,
}

/// The index record of an object with native pixel data, built from its header while the pixel data
/// arrives, for the frame layout the header announces. Used if the walk of the whole object finds
/// that layout (the record depends on nothing else but the object's size).
struct Forecast {
    layout: Layout,
    record: crate::index::InstanceRecord,
}

/// The result of parsing a spooled object, before anything is stored.
struct Parsed {
    uids: ObjectUids,
    record: crate::index::InstanceRecord,
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

    /// Starts reading the header of an object from its first bytes while the rest still arrives
    /// (blocking task), and looks up its SOP Instance UID when the policy keeps the first copy:
    /// work that [`Ingestor::ingest`] then no longer does after the last byte.
    pub fn read_header_early(&self, prefix: Arc<Vec<u8>>) -> EarlyHeader {
        let (index, keep_first) = (
            self.index.clone(),
            self.on_duplicate == DuplicatePolicy::KeepFirst,
        );
        EarlyHeader(tokio::task::spawn_blocking(move || {
            let (header, pixel_data) = header_from_prefix(&prefix)?;
            let key_suffix = unique_suffix();
            let forecast = forecast(&header, pixel_data, &key_suffix);
            let indexed = keep_first
                .then(|| index.instance_exists_blocking(&header.uids.sop_instance_uid))
                .transpose()
                .ok()?;
            Some(ReadEarly {
                header,
                indexed,
                key_suffix,
                forecast,
            })
        }))
    }

    /// Parses, stores and indexes a spooled object; success means durable and indexed.
    /// On any failure nothing is left behind: the spool file is removed with `spooled`.
    /// `early`: its header, read while it arrived, if that was started.
    pub async fn ingest(
        &self,
        spooled: Spooled,
        expected: Option<&Expected>,
        early: Option<EarlyHeader>,
    ) -> Result<Outcome, IngestError> {
        (self.ingest_identified(spooled, expected, early).await).map(|(outcome, _)| outcome)
    }

    /// [`Ingestor::ingest`], also returning the object's UIDs (for STOW-RS's RetrieveURLs).
    pub async fn ingest_identified(
        &self,
        spooled: Spooled,
        expected: Option<&Expected>,
        early: Option<EarlyHeader>,
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
        let keep_first = !replace;
        let (store, index, expected) = (self.store.clone(), self.index.clone(), expected.cloned());
        // One blocking task: the spool file's last bytes are written, the header parsed (unless
        // read early; an object kept in memory is parsed while its last full buffer is still being
        // written, and that write is waited for before the object is stored) and checked, the SOP
        // Instance UID looked up (keep_first), and, for a store that works from blocking code (the
        // filesystem), the insert queued to the index writer and the object stored (its data
        // written back first when the store flushes the file itself); the insert commits once the
        // object is durable. A remote store's put follows on the async side. Each hand-off between
        // threads costs a wake-up on the critical path of a C-STORE.
        let job = tokio::task::spawn_blocking(move || {
            let mut spooled = spooled;
            let step = || -> Result<Step, IngestError> {
                spooled.write_tail().map_err(spool_error)?;
                let write_back = put_path == PutPath::BlockingAfterWriteBack;
                if write_back {
                    spooled.start_write_back().map_err(spool_error)?;
                }
                let key_for = |uids: &ObjectUids| {
                    instance_key(
                        &uids.study_uid,
                        &uids.series_uid,
                        &uids.sop_instance_uid,
                        &key_suffix,
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
                if let Some(exp) = &expected {
                    check_expected(&parsed.uids, exp)?;
                }
                let indexed = match indexed {
                    Some(indexed) => indexed,
                    None if keep_first => index
                        .instance_exists_blocking(&parsed.uids.sop_instance_uid)
                        .map_err(|e| IngestError::Index(e.into()))?,
                    None => false,
                };
                if indexed {
                    return Ok(Step::Duplicate(parsed.uids));
                }
                if put_path == PutPath::Async {
                    spooled.finish_writes().map_err(spool_error)?;
                    return Ok(Step::ToStore(Box::new(parsed)));
                }
                let key = parsed.record.instance.storage_key.clone();
                let uids = parsed.uids.clone();
                // Settles the keys this store logged, however it ends (see `Settle`).
                let mut settle = Settle::new(&store, &key);
                if replace {
                    // The copy this one may replace is logged before the index can forget it:
                    // if the process dies after the commit but before the old copy is
                    // deleted, reconcile finds it and drops it.
                    let old = index
                        .storage_key_blocking(&parsed.uids.sop_instance_uid)
                        .map_err(|e| IngestError::Index(e.into()))?;
                    if let Some(old) = old {
                        store.intend_blocking(&[&old])?;
                        settle.keys.push(old);
                    }
                }
                if size > GATED_UP_TO {
                    spooled.finish_writes().map_err(spool_error)?;
                    if write_back {
                        spooled.write_back().map_err(spool_error)?;
                    }
                    store.put_file_blocking(&key, spooled.path())?;
                    // Stored: from here a failure must reach the caller, which deletes the object.
                    let outcome = index
                        .insert_gated_blocking(parsed.record, replace)
                        .and_then(|(gate, pending)| {
                            gate.open();
                            pending.wait_blocking()
                        });
                    return Ok(Step::Indexed {
                        key,
                        outcome,
                        settle,
                        uids,
                    });
                }
                // The insert's statements run while the object is made durable; its gate is
                // dropped unopened if storing fails, and then nothing is committed.
                let (gate, pending) = index.insert_gated_blocking(parsed.record, replace)?;
                spooled.finish_writes().map_err(spool_error)?;
                if write_back {
                    spooled.write_back().map_err(spool_error)?;
                }
                store.put_file_blocking(&key, spooled.path())?;
                gate.open();
                let outcome = pending.wait_blocking();
                Ok(Step::Indexed {
                    key,
                    outcome,
                    settle,
                    uids,
                })
            };
            let step = step();
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

/// Reads the header of a spooled Part-10 file and builds its index record (blocking).
fn spool_error(source: std::io::Error) -> IngestError {
    IngestError::Storage(StorageError::Io {
        key: "spool".into(),
        source,
    })
}

/// An object's header: every element before its pixel data, parsed, with its UIDs validated.
struct Header {
    dataset_start: u64,
    ts_uid: String,
    obj: InMemDicomObject,
    uids: ObjectUids,
    /// The values served as bulk data, and those left out of `obj`.
    bulk: bulk::BulkPlan,
}

/// Parses a whole object (blocking): its header, then its pixel data's layout.
fn parse<R: Read + Seek>(
    reader: &mut R,
    size: u64,
    key_for: impl FnOnce(&ObjectUids) -> String,
) -> Result<Parsed, IngestError> {
    let header = read_header(reader)?;
    complete(header, reader, size, key_for, None)
}

/// Everything [`parse`] and the early header read do with an object's bytes, for the fuzz targets.
#[cfg(fuzzing)]
pub fn parse_for_fuzzing(object: &[u8]) {
    let _ = header_from_prefix(object);
    let _ = parse(
        &mut std::io::Cursor::new(object),
        object.len() as u64,
        |_| String::new(),
    );
}

fn unparseable(e: &dyn std::fmt::Display) -> IngestError {
    IngestError::Unparseable(e.to_string())
}

/// The transfer syntax named by the file meta group, and where the data set starts.
fn read_meta<R: Read + Seek>(reader: &mut R) -> Result<(u64, String), IngestError> {
    let (dataset_start, ts_uid) = read_meta_extent(reader).map_err(|e| unparseable(&e))?;
    let ts_uid = ts_uid.trim_end_matches(['\0', ' ']).to_string();
    if dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(&ts_uid)
        .is_none()
    {
        return Err(IngestError::Invalid(format!(
            "unknown transfer syntax {ts_uid}"
        )));
    }
    Ok((dataset_start, ts_uid))
}

/// Reads and checks the header of a whole object.
fn read_header<R: Read + Seek>(reader: &mut R) -> Result<Header, IngestError> {
    let (dataset_start, ts_uid) = read_meta(reader)?;
    // Walk the encoded elements first (a deflated data set inflated): it checks every declared
    // length against the object's size, so the parser below never allocates for lengths a hostile
    // or truncated object only claims.
    layout::check_before_parse(reader, dataset_start, &ts_uid)
        .map_err(|e| IngestError::Unparseable(e.to_string()))?;
    decode_header(reader, dataset_start, ts_uid)
}

/// Reads the header from the first bytes of an object still arriving, when they hold all of it
/// (up to the pixel data element's header, every length checked against those bytes). `None` when
/// they do not, or when anything is wrong: the parse of the whole object then decides.
/// Also returns the pixel data element's header.
fn header_from_prefix(prefix: &[u8]) -> Option<(Header, layout::PixelDataStart)> {
    let mut reader = std::io::Cursor::new(prefix);
    let (dataset_start, ts_uid) = read_meta(&mut reader).ok()?;
    let pixel_data = layout::pixel_data_start(&mut reader, dataset_start, &ts_uid)?;
    let header = decode_header(&mut reader, dataset_start, ts_uid).ok()?;
    Some((header, pixel_data))
}

/// The record of an object with native pixel data, for the layout its header announces (see
/// [`Forecast`]).
fn forecast(
    header: &Header,
    pixel_data: layout::PixelDataStart,
    key_suffix: &str,
) -> Option<Forecast> {
    let layout =
        layout::native_layout_forecast(&header.ts_uid, pixel_data.value?, &geometry(&header.obj))?;
    let uids = &header.uids;
    let key = instance_key(
        &uids.study_uid,
        &uids.series_uid,
        &uids.sop_instance_uid,
        key_suffix,
    );
    let record = build_record(
        &header.obj,
        uids,
        &layout,
        &header.ts_uid,
        &key,
        0,
        &header.bulk,
    );
    Some(Forecast { layout, record })
}

/// Decodes the elements before the pixel data (their lengths already checked) and the UIDs.
fn decode_header<R: Read + Seek>(
    reader: &mut R,
    dataset_start: u64,
    ts_uid: String,
) -> Result<Header, IngestError> {
    // Large values are left out of what dicom-rs parses (see `bulk`).
    let bulk = bulk::plan(reader, dataset_start, &ts_uid).map_err(|e| unparseable(&e))?;
    let obj = if bulk.leaves_out_nothing() {
        parse_elements(reader, dataset_start, &ts_uid)?
    } else {
        let mut view = bulk.view(reader).map_err(|e| unparseable(&e))?;
        parse_elements(&mut view, dataset_start, &ts_uid)?
    };
    let uids = object_uids(&obj).map_err(IngestError::Invalid)?;
    Ok(Header {
        dataset_start,
        ts_uid,
        obj,
        uids,
        bulk,
    })
}

/// Parses the elements before the pixel data with dicom-rs, their text decoded.
fn parse_elements<R: Read + Seek>(
    reader: &mut R,
    dataset_start: u64,
    ts_uid: &str,
) -> Result<InMemDicomObject, IngestError> {
    reader.rewind().map_err(|e| unparseable(&e))?;
    let mut obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .read_preamble(ReadPreamble::Always)
        .from_reader(&mut *reader)
        .map_err(|e| unparseable(&e))?
        .into_inner();
    extract::resolve_unknown_vrs(&mut obj);
    crate::model::charset::fix_text_encoding(&mut obj, reader, dataset_start, ts_uid)
        .map_err(|e| unparseable(&e))?;
    Ok(obj)
}

/// Completes the parse of a whole object whose header is read: locates its frames (checking every
/// length against its size again, those of the elements after the pixel data included) and builds
/// its index record.
fn complete<R: Read + Seek>(
    header: Header,
    reader: &mut R,
    size: u64,
    key_for: impl FnOnce(&ObjectUids) -> String,
    forecast: Option<Forecast>,
) -> Result<Parsed, IngestError> {
    let Header {
        dataset_start,
        ts_uid,
        obj,
        uids,
        bulk,
    } = header;
    let layout = locate_frames(reader, dataset_start, &ts_uid, &geometry(&obj))
        .map_err(|e| IngestError::Unparseable(format!("pixel data: {e}")))?;
    check_extents(&layout, size)?;
    let key = key_for(&uids);
    // The forecast used this header and key suffix: only the layout can differ.
    let record = match forecast {
        Some(Forecast {
            layout: l,
            mut record,
        }) if l == layout => {
            record.instance.size_bytes = size;
            record
        }
        _ => build_record(&obj, &uids, &layout, &ts_uid, &key, size, &bulk),
    };
    Ok(Parsed { uids, record })
}

/// Pixel data that would run past the end of the object means the object was truncated.
fn check_extents(layout: &Layout, size: u64) -> Result<(), IngestError> {
    let end = match layout {
        Layout::Native { value, .. } => value.offset + value.length,
        Layout::Encapsulated { frames } => frames
            .iter()
            .flatten()
            .map(|e| e.offset + e.length)
            .max()
            .unwrap_or(0),
        Layout::NoPixelData | Layout::Unavailable => 0,
    };
    if end > size {
        return Err(IngestError::Unparseable(format!(
            "object truncated: pixel data ends at byte {end} of {size}"
        )));
    }
    Ok(())
}

/// A short random suffix making every stored copy's key unique, so a replacement never overwrites
/// the copy the index still points at.
fn unique_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

use dicom_encoding::transfer_syntax::TransferSyntaxIndex;

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading the header early from the first bytes, then completing the parse over the whole
    /// object, gives the record (or the refusal) that parsing the whole object at once gives.
    #[test]
    fn early_header_parse_agrees_with_the_whole_object_parse() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        let (mut early_reads, mut forecasts) = (0, 0);
        for dir in ["pydicom", "pydicom-charsets", "derived"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_none_or(|e| e != "dcm") {
                    continue;
                }
                let bytes = std::fs::read(&path).unwrap();
                let size = bytes.len() as u64;
                let key = |u: &ObjectUids| {
                    instance_key(&u.study_uid, &u.series_uid, &u.sop_instance_uid, "key")
                };
                let whole = parse(&mut std::io::Cursor::new(&bytes), size, key);
                for n in [spool::BUFFER, 2048] {
                    let prefix = &bytes[..n.min(bytes.len())];
                    let Some((header, pixel_data)) = header_from_prefix(prefix) else {
                        continue;
                    };
                    early_reads += 1;
                    let forecast = forecast(&header, pixel_data, "key");
                    forecasts += usize::from(forecast.is_some());
                    let key = |u: &ObjectUids| {
                        instance_key(&u.study_uid, &u.series_uid, &u.sop_instance_uid, "key")
                    };
                    let early = complete(
                        header,
                        &mut std::io::Cursor::new(&bytes),
                        size,
                        key,
                        forecast,
                    );
                    let name = path.display();
                    match (&whole, &early) {
                        (Ok(a), Ok(b)) => {
                            assert_eq!(
                                format!("{:?}", a.record),
                                format!("{:?}", b.record),
                                "{name}"
                            )
                        }
                        (Err(_), Err(_)) => {}
                        _ => panic!(
                            "{name}: whole {:?} vs early {:?}",
                            whole.is_ok(),
                            early.is_ok()
                        ),
                    }
                }
            }
        }
        assert!(early_reads > 40, "only {early_reads} headers read early");
        assert!(forecasts > 20, "only {forecasts} records forecast");
    }

    /// A forecast record is used only for the layout the walk of the whole object finds.
    #[test]
    fn a_forecast_for_another_layout_is_not_used() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/pydicom/CT_small.dcm");
        let bytes = std::fs::read(path).unwrap();
        let size = bytes.len() as u64;
        let (header, pixel_data) = header_from_prefix(&bytes[..8192]).unwrap();
        let mut fc = forecast(&header, pixel_data, "key").unwrap();
        assert!(matches!(fc.layout, Layout::Native { frames: 1, .. }));
        let key =
            |u: &ObjectUids| instance_key(&u.study_uid, &u.series_uid, &u.sop_instance_uid, "key");
        let used = |header, forecast| {
            let parsed = complete(
                header,
                &mut std::io::Cursor::new(&bytes),
                size,
                key,
                Some(forecast),
            )
            .unwrap();
            assert_eq!(parsed.record.instance.size_bytes, size);
            parsed.record.instance.metadata_json
        };
        fc.record.instance.metadata_json = "forecast".into();
        assert_eq!(used(header, fc), "forecast");

        let (header, pixel_data) = header_from_prefix(&bytes[..8192]).unwrap();
        let mut fc = forecast(&header, pixel_data, "key").unwrap();
        fc.record.instance.metadata_json = "forecast".into();
        fc.layout = Layout::Unavailable;
        assert!(used(header, fc).starts_with('{'));
    }
}
