//! The index's single writer. SQLite allows one writer at a time, and each durable commit costs a
//! disk flush; so one thread owns the write connection and commits whatever requests are waiting in
//! one transaction (group commit), each request in its own savepoint so one bad record fails alone.
//! Requests are inserts (ingest), deletions (DICOMweb DELETE, through ingest), the FHIR push's
//! bookkeeping and audit events; an insert or deletion made for a caller records its audit event in
//! its own savepoint, so the event commits with the change.
//!
//! An insert may come with a gate ([`WriterHandle::insert_gated_blocking`]): its statements run at
//! once, while ingest is still making the object durable, and the transaction commits only once the
//! gate opens (the object is durable). A gate dropped unopened (storage failed) rolls the batch back,
//! and the other requests are applied again without that one. So the index work of a C-STORE overlaps
//! its storage flush, and no row is ever committed for an object that is not durable.
//!
//! The writer uses rusqlite on its own thread rather than sqlx: sqlx runs every SQLite statement on
//! a worker thread behind a channel, so an insert (begin, lookup, three upserts, commit) cost about
//! a dozen thread wake-ups, a quarter of a small object's C-STORE latency. Here an insert costs one
//! hand-off to this thread and one back. Reads stay on sqlx's pool.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::audit;
use super::outbox::{self, Claimed, OutboxOp};
use super::record::InstanceRecord;
use super::INSTANCES_IN_SCOPE;
use crate::audit::{AuditEvent, Origin};

/// Requests committed together at most; bounds the latency of the first one.
const MAX_BATCH: usize = 128;
/// How often committed pages are moved from the WAL into the database file, by a thread of its own.
/// Each checkpoint ends with a flush of the database file, which holds up the object flushes that
/// C-STOREs wait for at that moment (~5 ms on a loop-mounted file system): every 100 ms, that cost
/// ~7 % of single-association ingest and quadrupled its p99 latency. The WAL grows by about a
/// second of commits in between (tens of MB at full ingest speed), which readers do not notice.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(1000);
/// WAL pages after which a commit checkpoints by itself (SQLite's automatic checkpoint), only if the
/// checkpoint thread fell behind; SQLite's default is 1,000. An insert writes ~13 pages to the WAL,
/// so single-association ingest at ~1,100 MR/s fills ~14,000 pages between two checkpoints: this
/// must be several times that (256 MB of WAL), or the writer's commits checkpoint again themselves.
const AUTOCHECKPOINT_BACKSTOP: u32 = 65_536;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted,
    /// The SOP Instance UID was already indexed and the policy keeps the first copy.
    Duplicate,
    /// The SOP Instance UID was indexed under `old_key`; the row now points at the new object.
    Replaced {
        old_key: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("index database error: {0}")]
    Database(String),
    #[error("series {series_uid} already belongs to another study")]
    SeriesInOtherStudy { series_uid: String },
    #[error("index writer stopped")]
    Stopped,
    /// The gate of a gated insert was dropped: its object was not stored, so nothing was committed.
    #[error("insert abandoned: the object was not stored")]
    Abandoned,
}

impl From<rusqlite::Error> for WriteError {
    fn from(e: rusqlite::Error) -> Self {
        WriteError::Database(e.to_string())
    }
}

impl From<sqlx::Error> for WriteError {
    fn from(e: sqlx::Error) -> Self {
        WriteError::Database(e.to_string())
    }
}

/// The instances a deletion covers: a study, one of its series, or one instance.
#[derive(Debug, Clone)]
pub struct Scope {
    pub study_uid: String,
    pub series_uid: Option<String>,
    pub sop_instance_uid: Option<String>,
}

enum Op {
    Insert {
        record: Box<InstanceRecord>,
        replace: bool,
    },
    Delete {
        scope: Scope,
        /// Who asked: the deletion's audit event is recorded with it.
        by: Option<Origin>,
    },
    /// An audit event on its own (reads, queries, refusals, start and stop).
    Audit(Box<AuditEvent>),
    /// FHIR push bookkeeping (`outbox`).
    Outbox(OutboxOp),
    /// A rendered thumbnail, kept while its instance row still holds `storage_key`.
    CacheThumbnail {
        sop_instance_uid: String,
        storage_key: String,
        variant: String,
        image: Vec<u8>,
    },
}

enum Done {
    Inserted(InsertOutcome),
    /// The storage keys of the instances whose rows were deleted.
    Deleted(Vec<String>),
    Outbox(Vec<Claimed>),
    Cached,
    Audited,
}

type Reply = oneshot::Sender<Result<Done, WriteError>>;

/// One request waiting for the writer.
struct Request {
    op: Op,
    reply: Reply,
    /// Opened (a unit sent) when the request may commit; None once open or for an ungated request.
    gate: Option<oneshot::Receiver<()>>,
}

/// Opens the gate of a gated insert: its object is durable, the insert may commit. Dropping it
/// unopened abandons the insert.
pub struct Gate(oneshot::Sender<()>);

impl Gate {
    pub fn open(self) {
        let _ = self.0.send(());
    }
}

/// The outcome of a gated insert, known once it committed (or failed).
pub struct PendingInsert(oneshot::Receiver<Result<Done, WriteError>>);

impl PendingInsert {
    /// Waits for the commit (blocking: ingest's blocking task, once it opened the gate; waking the
    /// async side once, with the outcome, instead of twice).
    pub fn wait_blocking(self) -> Result<InsertOutcome, WriteError> {
        match self.0.blocking_recv().map_err(|_| WriteError::Stopped)?? {
            Done::Inserted(outcome) => Ok(outcome),
            _ => unreachable!("an insert answered as something else"),
        }
    }
}

#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Request>,
}

/// Opens the write connection with the settings the index relies on (the schema and WAL mode are
/// already in place: sqlx's migrations ran first).
fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // NORMAL: a commit survives a process crash at once, and a power loss only once the WAL file is
    // flushed: at once for a batch that deletes or replaces (`sync_wal`, before the old objects are
    // unlinked), otherwise before the storage forgets the keys whose rows it holds (the storage's
    // checkpoint calls `sync_wal`); until then a row a power loss dropped is indexed again by
    // start-up reconcile from the storage's unsettled keys.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
    )?;
    conn.pragma_update(None, "wal_autocheckpoint", AUTOCHECKPOINT_BACKSTOP)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// Makes every commit so far durable: a flush of the SQLite WAL file, which is what a commit under
/// `synchronous = FULL` would have flushed. Committed frames are already written to it (with
/// NORMAL only the flush is skipped), so a flush through another descriptor covers them.
pub fn sync_wal(db: &Path) -> std::io::Result<()> {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    match std::fs::File::open(&wal) {
        Ok(f) => f.sync_data(),
        // No WAL file: nothing committed since the last checkpoint truncated it away.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The checkpoint thread: every [`CHECKPOINT_EVERY`], a PASSIVE checkpoint (it waits for neither
/// readers nor the writer) on its own connection, until the writer stops. With SQLite's automatic
/// checkpoint, one commit in a few dozen copied ~4 MB into the database file and flushed it, on
/// the writer's thread, while C-STOREs waited for that commit.
fn checkpoints(conn: &Connection, writer_stopped: &std::sync::mpsc::Receiver<()>) {
    use std::sync::mpsc::RecvTimeoutError;
    while let Err(RecvTimeoutError::Timeout) = writer_stopped.recv_timeout(CHECKPOINT_EVERY) {
        let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            row.get::<_, i64>(0)
        });
        if let Err(e) = done {
            tracing::warn!(error = %e, "index checkpoint failed");
        }
    }
}

impl WriterHandle {
    /// Opens the database file at `path` and starts the writer thread.
    pub fn spawn(path: &Path) -> rusqlite::Result<WriterHandle> {
        let mut conn = open(path)?;
        let checkpoint_conn = open(path)?;
        let db = path.to_path_buf();
        // The database's and its WAL file's directory entries, durable before the first commit
        // (`sync_wal` flushes the WAL file only).
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
                tracing::warn!(error = %e, "cannot flush the index's directory");
            }
        }
        let (tx, rx) = mpsc::channel(1024);
        let (writer_alive, writer_stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("index-writer".into())
            .spawn(move || {
                run(&mut conn, &db, rx);
                drop(writer_alive);
            })
            .expect("spawn index writer thread");
        std::thread::Builder::new()
            .name("index-checkpoint".into())
            .spawn(move || checkpoints(&checkpoint_conn, &writer_stopped))
            .expect("spawn index checkpoint thread");
        Ok(WriterHandle { tx })
    }

    pub async fn insert(
        &self,
        record: InstanceRecord,
        replace: bool,
    ) -> Result<InsertOutcome, WriteError> {
        let op = Op::Insert {
            record: Box::new(record),
            replace,
        };
        match self.send(op).await? {
            Done::Inserted(outcome) => Ok(outcome),
            _ => unreachable!("an insert answered as something else"),
        }
    }

    /// Deletes the rows of the instances in `scope` (and their series and study once empty);
    /// returns their storage keys.
    pub async fn delete(
        &self,
        scope: Scope,
        by: Option<Origin>,
    ) -> Result<Vec<String>, WriteError> {
        match self.send(Op::Delete { scope, by }).await? {
            Done::Deleted(keys) => Ok(keys),
            _ => unreachable!("a deletion answered as something else"),
        }
    }

    /// Records an audit event.
    pub async fn audit(&self, event: AuditEvent) -> Result<(), WriteError> {
        self.send(Op::Audit(Box::new(event))).await.map(|_| ())
    }

    /// Applies a FHIR push bookkeeping operation; a claim returns the studies claimed.
    pub async fn outbox(&self, op: OutboxOp) -> Result<Vec<Claimed>, WriteError> {
        match self.send(Op::Outbox(op)).await? {
            Done::Outbox(claimed) => Ok(claimed),
            _ => unreachable!("an outbox operation answered as something else"),
        }
    }

    /// Caches a thumbnail of the stored copy `storage_key` of an instance (ignored if one is
    /// cached already, or if the instance no longer has that copy).
    pub async fn cache_thumbnail(
        &self,
        sop_instance_uid: &str,
        storage_key: &str,
        variant: &str,
        image: Vec<u8>,
    ) -> Result<(), WriteError> {
        let op = Op::CacheThumbnail {
            sop_instance_uid: sop_instance_uid.to_string(),
            storage_key: storage_key.to_string(),
            variant: variant.to_string(),
            image,
        };
        self.send(op).await.map(|_| ())
    }

    /// Queues an insert that commits only once the returned gate is opened (blocking: called from
    /// ingest's blocking task, which then stores the object and opens the gate).
    pub fn insert_gated_blocking(
        &self,
        record: InstanceRecord,
        replace: bool,
    ) -> Result<(Gate, PendingInsert), WriteError> {
        let (reply, rx) = oneshot::channel();
        let (open, gate) = oneshot::channel();
        let op = Op::Insert {
            record: Box::new(record),
            replace,
        };
        self.tx
            .blocking_send(Request {
                op,
                reply,
                gate: Some(gate),
            })
            .map_err(|_| WriteError::Stopped)?;
        Ok((Gate(open), PendingInsert(rx)))
    }

    async fn send(&self, op: Op) -> Result<Done, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request {
                op,
                reply,
                gate: None,
            })
            .await
            .map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }
}

/// Takes whatever requests are waiting (at least one, at most `MAX_BATCH`) and commits them
/// together, until every handle is dropped.
fn run(conn: &mut Connection, db: &Path, mut rx: mpsc::Receiver<Request>) {
    while let Some(first) = rx.blocking_recv() {
        let mut requests = vec![first];
        while requests.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => requests.push(r),
                Err(_) => break,
            }
        }
        let mut answers = commit_batch(conn, requests);
        // A deletion or a replacement is acknowledged, and its old objects unlinked, only once
        // its commit is durable: a lost commit would bring back rows whose objects are gone.
        let durable_needed = answers.iter().any(|(_, r)| match r {
            Ok(Done::Deleted(keys)) => !keys.is_empty(),
            Ok(Done::Inserted(InsertOutcome::Replaced { .. })) => true,
            _ => false,
        });
        if durable_needed {
            if let Err(e) = sync_wal(db) {
                // Committed but maybe not durable: no old object may go. A deletion fails (its
                // objects stay, their keys unsettled until reconcile); a replacement keeps the old
                // copy (reconcile drops it once the new row is known durable).
                tracing::error!(error = %e, "index commit flush failed");
                for (_, result) in answers.iter_mut() {
                    match result {
                        Ok(Done::Deleted(_)) => {
                            *result = Err(WriteError::Database(format!("commit not flushed: {e}")))
                        }
                        Ok(Done::Inserted(outcome @ InsertOutcome::Replaced { .. })) => {
                            *outcome = InsertOutcome::Inserted
                        }
                        _ => {}
                    }
                }
            }
        }
        for (reply, result) in answers {
            let _ = reply.send(result);
        }
    }
}

fn apply(conn: &Connection, op: &Op) -> Result<Done, WriteError> {
    match op {
        Op::Insert { record, replace } => insert(conn, record, *replace).map(Done::Inserted),
        Op::Delete { scope, by } => delete(conn, scope, by.as_ref()).map(Done::Deleted),
        Op::Audit(event) => {
            audit::record(conn, event)?;
            Ok(Done::Audited)
        }
        Op::Outbox(op) => Ok(Done::Outbox(outbox::apply(conn, op)?)),
        Op::CacheThumbnail {
            sop_instance_uid,
            storage_key,
            variant,
            image,
        } => {
            conn.prepare_cached(
                "INSERT OR IGNORE INTO thumbnails (storage_key, variant, image)
                 SELECT ?1, ?2, ?3 WHERE EXISTS
                    (SELECT 1 FROM instances WHERE sop_instance_uid = ?4 AND storage_key = ?1)",
            )?
            .execute(params![storage_key, variant, image, sop_instance_uid])?;
            Ok(Done::Cached)
        }
    }
}

/// How one attempt at committing a batch ended.
enum Attempt {
    /// Committed (or, for a lone request that failed, rolled back): one result per request.
    Done(Vec<Result<Done, WriteError>>),
    /// Rolled back because these requests' gates closed.
    GatesClosed(Vec<usize>),
    /// A transaction-level error: every request fails.
    Failed(rusqlite::Error),
}

/// Commits the requests in one transaction and returns each one's answer. Requests whose gate
/// closed are answered `Abandoned`, and the batch is applied again without them.
fn commit_batch(
    conn: &mut Connection,
    mut requests: Vec<Request>,
) -> Vec<(Reply, Result<Done, WriteError>)> {
    let mut answers = Vec::with_capacity(requests.len());
    loop {
        match attempt(conn, &mut requests) {
            Attempt::Done(results) => {
                answers.extend(requests.into_iter().map(|r| r.reply).zip(results));
                return answers;
            }
            Attempt::Failed(e) => {
                tracing::error!(error = %e, "index commit failed");
                answers.extend(requests.into_iter().map(|r| {
                    (
                        r.reply,
                        Err(WriteError::Database(format!("commit failed: {e}"))),
                    )
                }));
                return answers;
            }
            Attempt::GatesClosed(closed) => {
                for i in closed.into_iter().rev() {
                    answers.push((requests.remove(i).reply, Err(WriteError::Abandoned)));
                }
                if requests.is_empty() {
                    return answers;
                }
            }
        }
    }
}

/// Applies the requests, each in its own savepoint so that a failed one is undone alone, waits for
/// their gates, and commits.
fn attempt(conn: &mut Connection, requests: &mut [Request]) -> Attempt {
    let tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => return Attempt::Failed(e),
    };
    // A lone request needs no savepoint: its failure rolls back the whole (one-request) batch.
    let savepoints = requests.len() > 1;
    let mut results = Vec::with_capacity(requests.len());
    for r in requests.iter() {
        if savepoints {
            if let Err(e) = tx.execute_batch("SAVEPOINT op") {
                return Attempt::Failed(e);
            }
        }
        let result = apply(&tx, &r.op);
        let ok = result.is_ok();
        results.push(result);
        if !savepoints {
            if !ok {
                return Attempt::Done(results); // dropping `tx` rolls back
            }
            continue;
        }
        let end = if ok {
            "RELEASE op"
        } else {
            "ROLLBACK TO op; RELEASE op"
        };
        if let Err(e) = tx.execute_batch(end) {
            return Attempt::Failed(e);
        }
    }
    let closed: Vec<usize> = requests
        .iter_mut()
        .enumerate()
        .filter_map(|(i, r)| r.gate.take()?.blocking_recv().is_err().then_some(i))
        .collect();
    if !closed.is_empty() {
        return Attempt::GatesClosed(closed); // dropping `tx` rolls back
    }
    match tx.commit() {
        Ok(()) => Attempt::Done(results),
        Err(e) => Attempt::Failed(e),
    }
}

fn insert(
    conn: &Connection,
    r: &InstanceRecord,
    replace: bool,
) -> Result<InsertOutcome, WriteError> {
    let existing: Option<String> = conn
        .prepare_cached("SELECT storage_key FROM instances WHERE sop_instance_uid = ?")?
        .query_row([&r.instance.sop_instance_uid], |row| row.get(0))
        .optional()?;
    let outcome = match existing {
        Some(_) if !replace => return Ok(InsertOutcome::Duplicate),
        Some(old_key) => {
            remove(conn, &r.instance.sop_instance_uid)?;
            InsertOutcome::Replaced { old_key }
        }
        None => InsertOutcome::Inserted,
    };

    let s = &r.study;
    let study_pk: i64 = conn
        .prepare_cached(
            "INSERT INTO studies (study_uid, patient_id, issuer_of_patient_id, patient_name,
                patient_birth_date, patient_sex, study_date, study_time, accession_number, study_id,
                study_description, referring_physician_name, attrs_json, num_instances)
             VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,1)
             ON CONFLICT(study_uid) DO UPDATE SET num_instances = num_instances + 1
             RETURNING study_pk",
        )?
        .query_row(
            params![
                s.study_uid,
                s.patient_id,
                s.issuer_of_patient_id,
                s.patient_name,
                s.patient_birth_date,
                s.patient_sex,
                s.study_date,
                s.study_time,
                s.accession_number,
                s.study_id,
                s.study_description,
                s.referring_physician_name,
                s.attrs_json,
            ],
            |row| row.get(0),
        )?;

    let se = &r.series;
    let (series_pk, owner, series_instances): (i64, i64, i64) = conn
        .prepare_cached(
            "INSERT INTO series (series_uid, study_pk, modality, series_number, series_description,
                body_part_examined, laterality, series_date, series_time,
                performed_procedure_step_start_date, performed_procedure_step_start_time,
                attrs_json, num_instances)
             VALUES (?,?,?,?,?,?,?,?,?,?,?,?,1)
             ON CONFLICT(series_uid) DO UPDATE SET num_instances = num_instances + 1
             RETURNING series_pk, study_pk, num_instances",
        )?
        .query_row(
            params![
                se.series_uid,
                study_pk,
                se.modality,
                se.series_number,
                se.series_description,
                se.body_part_examined,
                se.laterality,
                se.series_date,
                se.series_time,
                se.performed_procedure_step_start_date,
                se.performed_procedure_step_start_time,
                se.attrs_json,
            ],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )?;
    if owner != study_pk {
        return Err(WriteError::SeriesInOtherStudy {
            series_uid: se.series_uid.clone(),
        });
    }

    let i = &r.instance;
    conn.prepare_cached(
        "INSERT INTO instances (sop_instance_uid, series_pk, study_pk, sop_class_uid,
            instance_number, rows, columns, bits_allocated, number_of_frames, content_date,
            content_time, acquisition_datetime, transfer_syntax_uid, storage_key, size_bytes,
            metadata_json, frame_layout, bulk_data)
         VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
    )?
    .execute(params![
        i.sop_instance_uid,
        series_pk,
        study_pk,
        i.sop_class_uid,
        i.instance_number,
        i.rows,
        i.columns,
        i.bits_allocated,
        i.number_of_frames,
        i.content_date,
        i.content_time,
        i.acquisition_datetime,
        i.transfer_syntax_uid,
        i.storage_key,
        i.size_bytes as i64,
        i.metadata_json,
        i.frame_layout,
        i.bulk_data,
    ])?;

    // The instance counts were incremented by the upserts above; a new series also changes the
    // study's series count and modalities. (A failed request's savepoint undoes all of it.)
    if series_instances == 1 {
        refresh_study_counts(conn, study_pk)?;
    }
    outbox::touch_inserted(conn, r)?;
    if let Some(origin) = &r.audit {
        audit::record_store(conn, r, origin)?;
    }
    Ok(outcome)
}

fn delete(
    conn: &Connection,
    scope: &Scope,
    by: Option<&Origin>,
) -> Result<Vec<String>, WriteError> {
    let uids: Vec<String> = conn
        .prepare_cached(&format!("SELECT i.sop_instance_uid {INSTANCES_IN_SCOPE}"))?
        .query_map(
            params![scope.study_uid, scope.series_uid, scope.sop_instance_uid],
            |row| row.get(0),
        )?
        .collect::<rusqlite::Result<_>>()?;
    if let Some(origin) = by.filter(|_| !uids.is_empty()) {
        audit::record_delete(conn, scope, &uids, origin)?;
    }
    let mut keys = Vec::with_capacity(uids.len());
    for uid in uids {
        keys.extend(remove(conn, &uid)?);
    }
    if !keys.is_empty() {
        outbox::touch_deleted(conn, &scope.study_uid)?;
    }
    Ok(keys)
}

/// Deletes an instance row, and its series and study once empty; returns the object's storage key.
fn remove(conn: &Connection, sop_instance_uid: &str) -> Result<Option<String>, WriteError> {
    let Some((key, series_pk, study_pk)) = conn
        .prepare_cached(
            "DELETE FROM instances WHERE sop_instance_uid = ?
             RETURNING storage_key, series_pk, study_pk",
        )?
        .query_row([sop_instance_uid], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })
        .optional()?
    else {
        return Ok(None);
    };
    conn.prepare_cached("UPDATE series SET num_instances = num_instances - 1 WHERE series_pk = ?")?
        .execute([series_pk])?;
    conn.prepare_cached("DELETE FROM series WHERE series_pk = ? AND num_instances <= 0")?
        .execute([series_pk])?;
    refresh_study_counts(conn, study_pk)?;
    conn.prepare_cached("DELETE FROM studies WHERE study_pk = ? AND num_instances <= 0")?
        .execute([study_pk])?;
    Ok(Some(key))
}

fn refresh_study_counts(conn: &Connection, study_pk: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE studies SET
            num_instances = (SELECT COALESCE(SUM(num_instances), 0) FROM series WHERE study_pk = ?1),
            num_series = (SELECT COUNT(*) FROM series WHERE study_pk = ?1),
            modalities = COALESCE((SELECT group_concat(modality, '\\') FROM
                (SELECT DISTINCT modality FROM series WHERE study_pk = ?1 AND modality != ''
                 ORDER BY modality)), '')
         WHERE study_pk = ?1",
    )?
    .execute([study_pk])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::record::{InstanceAttrs, SeriesAttrs, StudyAttrs};
    use super::*;

    fn record(sop: &str) -> InstanceRecord {
        InstanceRecord {
            study: StudyAttrs {
                study_uid: "1.2".into(),
                attrs_json: "{}".into(),
                ..Default::default()
            },
            series: SeriesAttrs {
                series_uid: "1.2.3".into(),
                attrs_json: "{}".into(),
                ..Default::default()
            },
            instance: InstanceAttrs {
                sop_instance_uid: sop.into(),
                storage_key: format!("{sop}.dcm"),
                metadata_json: "{}".into(),
                frame_layout: "{}".into(),
                ..Default::default()
            },
            audit: None,
        }
    }

    fn indexed(path: &Path) -> Vec<String> {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare("SELECT sop_instance_uid FROM instances ORDER BY sop_instance_uid")
            .unwrap();
        let rows = stmt.query_map([], |row| row.get(0)).unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_gated_insert_commits_only_once_its_gate_opens() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("index.db").display());
        let index = super::super::Index::open(&url, 1).await.unwrap();
        let path = dir.path().join("index.db");

        // Two gated inserts (one batch or two): one gate opens, the other is dropped (storage failed).
        let (kept, dropped) = {
            let index = index.clone();
            tokio::task::spawn_blocking(move || {
                let a = index
                    .insert_gated_blocking(record("1.2.3.1"), false)
                    .unwrap();
                let b = index
                    .insert_gated_blocking(record("1.2.3.2"), false)
                    .unwrap();
                (a, b)
            })
            .await
            .unwrap()
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            indexed(&path).is_empty(),
            "nothing commits before the gates"
        );
        let ((gate_a, pending_a), (gate_b, pending_b)) = (kept, dropped);
        gate_a.open();
        drop(gate_b);
        let (a, b) = tokio::task::spawn_blocking(move || {
            (pending_a.wait_blocking(), pending_b.wait_blocking())
        })
        .await
        .unwrap();
        assert_eq!(a.unwrap(), InsertOutcome::Inserted);
        assert!(matches!(b, Err(WriteError::Abandoned)));
        assert_eq!(indexed(&path), vec!["1.2.3.1".to_string()]);

        // The study's counts are those of the committed insert only.
        let conn = Connection::open(&path).unwrap();
        let count: i64 = conn
            .query_row("SELECT num_instances FROM studies", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_batch_with_a_closed_gate_commits_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("index.db").display());
        drop(super::super::Index::open(&url, 1).await.unwrap());
        let path = dir.path().join("index.db");
        let mut conn = open(&path).unwrap();
        let mut replies = Vec::new();
        let mut requests = Vec::new();
        for (sop, opens) in [("1.2.3.1", true), ("1.2.3.2", false), ("1.2.3.3", true)] {
            let (reply, rx) = oneshot::channel();
            let (open_gate, gate) = oneshot::channel();
            if opens {
                open_gate.send(()).unwrap();
            }
            replies.push(rx);
            requests.push(Request {
                op: Op::Insert {
                    record: Box::new(record(sop)),
                    replace: false,
                },
                reply,
                gate: Some(gate),
            });
        }
        tokio::task::spawn_blocking(move || {
            for (reply, result) in commit_batch(&mut conn, requests) {
                let _ = reply.send(result);
            }
        })
        .await
        .unwrap();
        let outcomes: Vec<bool> = tokio::task::spawn_blocking(move || {
            replies
                .into_iter()
                .map(|rx| PendingInsert(rx).wait_blocking().is_ok())
                .collect()
        })
        .await
        .unwrap();
        assert_eq!(outcomes, [true, false, true]);
        assert_eq!(
            indexed(&path),
            vec!["1.2.3.1".to_string(), "1.2.3.3".to_string()]
        );
    }
}
