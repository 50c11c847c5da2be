//! The metadata index: patient/study/series/instance attributes for matching, the DICOM JSON returned
//! to clients, and where each object (and each frame inside it) is stored.
//!
//! - [`writer`]: the single writer task; batches concurrent inserts into one transaction (group commit).
//! - [`query`]: the matching engine shared by QIDO-RS (and C-FIND): query model -> SQL.
//! - [`results`]: the result layer they share: each level's rows and the attributes they answer.
//! - [`record`]: what ingest hands to the index for one instance.
//! - [`temporal`]: DA, TM and DT values normalised for storage and range matching.
//!
//! Architecture invariant: a row is inserted only for an object that is already durable in storage,
//! and rows are deleted before their objects, so the index never points at a missing object.

mod backfill;
pub mod fhir;
pub mod outbox;
pub mod query;
pub mod record;
pub mod results;
pub mod temporal;
mod writer;

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

pub use record::InstanceRecord;
pub use writer::{Gate, InsertOutcome, PendingInsert, Scope, WriteError};

/// Where an instance lives and how to cut frames out of it.
#[derive(Debug, Clone)]
pub struct StoredInstance {
    pub study_uid: String,
    pub series_uid: String,
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub transfer_syntax_uid: String,
    pub storage_key: String,
    pub size_bytes: u64,
    pub frame_layout: String,
    pub bits_allocated: Option<i64>,
}

/// The instances of a study (?1), optionally narrowed to a series (?2) and an instance (?3), in
/// retrieve order: the one definition of "what a WADO-RS resource covers".
pub const INSTANCES_IN_SCOPE: &str = "FROM instances i
     JOIN series se ON se.series_pk = i.series_pk
     JOIN studies st ON st.study_pk = i.study_pk
     WHERE st.study_uid = ?1
       AND (?2 IS NULL OR se.series_uid = ?2)
       AND (?3 IS NULL OR i.sop_instance_uid = ?3)
     ORDER BY se.series_number, se.series_pk, i.instance_number, i.instance_pk";

/// Binds a query's arguments, as the matching engine produced them, in order.
pub fn bind_args<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    args: &'q [query::Arg],
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    for a in args {
        q = match a {
            query::Arg::Text(s) => q.bind(s.as_str()),
            query::Arg::Int(i) => q.bind(*i),
        };
    }
    q
}

#[derive(Clone)]
pub struct Index {
    read: SqlitePool,
    writer: writer::WriterHandle,
    path: std::sync::Arc<std::path::PathBuf>,
}

thread_local! {
    /// A read-only connection per blocking thread, for lookups made from blocking code.
    static BLOCKING_READER: std::cell::RefCell<Option<(std::path::PathBuf, rusqlite::Connection)>> =
        const { std::cell::RefCell::new(None) };
}

impl Index {
    pub async fn open(url: &str, max_connections: u32) -> anyhow::Result<Index> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL: a commit survives a process crash at once, and a power loss after the next
            // sync of the filesystem (each object store syncs it). The index is derived from storage:
            // an object whose row a power loss dropped is indexed again by the start-up reconcile.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30))
            .pragma("case_sensitive_like", "ON");
        if let Some(dir) = url
            .strip_prefix("sqlite://")
            .map(std::path::Path::new)
            .and_then(|p| p.parent())
        {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)?;
            }
        }
        // The schema is created and migrated through sqlx; the writer then has the file to itself.
        let migrator = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations").run(&migrator).await?;
        backfill::run(&migrator).await?;
        migrator.close().await;
        let path = std::sync::Arc::new(options.get_filename().to_path_buf());
        let writer = writer::WriterHandle::spawn(&path)?;
        let read = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options.read_only(true))
            .await?;
        Ok(Index { read, writer, path })
    }

    pub fn read_pool(&self) -> &SqlitePool {
        &self.read
    }

    /// Commits one instance (creating its study and series as needed). The commit survives a crash
    /// of the process at once, a power loss once flushed: at once when it replaced an instance,
    /// otherwise by [`Index::sync_blocking`] (the storage calls it before it forgets the key).
    pub async fn insert(
        &self,
        record: InstanceRecord,
        replace: bool,
    ) -> Result<InsertOutcome, WriteError> {
        self.writer.insert(record, replace).await
    }

    /// Queues an insert that commits once the returned gate is opened (blocking code only): ingest
    /// opens it when the object is durable, and the insert's statements run meanwhile.
    pub fn insert_gated_blocking(
        &self,
        record: InstanceRecord,
        replace: bool,
    ) -> Result<(Gate, PendingInsert), WriteError> {
        self.writer.insert_gated_blocking(record, replace)
    }

    /// Makes every commit so far durable (blocking).
    pub fn sync_blocking(&self) -> std::io::Result<()> {
        writer::sync_wal(&self.path)
    }

    /// The storage key the index holds for an instance, from blocking code (as
    /// [`Index::instance_exists_blocking`]).
    pub fn storage_key_blocking(&self, sop_instance_uid: &str) -> rusqlite::Result<Option<String>> {
        use rusqlite::OptionalExtension;
        self.with_blocking_reader(|conn| {
            conn.prepare_cached("SELECT storage_key FROM instances WHERE sop_instance_uid = ?")?
                .query_row([sop_instance_uid], |row| row.get(0))
                .optional()
        })
    }

    /// Deletes the rows of the instances in `scope` in one transaction (flushed); returns their
    /// storage keys.
    pub async fn delete(&self, scope: Scope) -> Result<Vec<String>, WriteError> {
        self.writer.delete(scope).await
    }

    /// FHIR push bookkeeping through the index writer (claims, completions, retries, parking).
    pub async fn outbox(&self, op: outbox::OutboxOp) -> Result<Vec<outbox::Claimed>, WriteError> {
        self.writer.outbox(op).await
    }

    /// Whether study `study_uid` is indexed and within `filters` (a caller's study scope).
    pub async fn study_within(
        &self,
        study_uid: &str,
        filters: &[query::StudyFilter],
    ) -> sqlx::Result<bool> {
        let mut args = vec![query::Arg::Text(study_uid.to_string())];
        let within = query::within_sql(filters, &mut args);
        let sql = format!("SELECT 1 FROM studies st WHERE st.study_uid = ? AND {within}");
        let row = bind_args(sqlx::query(&sql), &args)
            .fetch_optional(&self.read)
            .await?;
        Ok(row.is_some())
    }

    /// The storage key the index holds for an instance.
    pub async fn storage_key_of(&self, sop_instance_uid: &str) -> sqlx::Result<Option<String>> {
        sqlx::query_scalar("SELECT storage_key FROM instances WHERE sop_instance_uid = ?")
            .bind(sop_instance_uid)
            .fetch_optional(&self.read)
            .await
    }

    /// Whether an instance is indexed, from blocking code (ingest's parse task): a query on this
    /// thread's own read-only connection instead of two hand-offs to sqlx's worker thread.
    pub fn instance_exists_blocking(&self, sop_instance_uid: &str) -> rusqlite::Result<bool> {
        Ok(self.storage_key_blocking(sop_instance_uid)?.is_some())
    }

    /// Runs `f` on this thread's read-only connection (opened on first use).
    fn with_blocking_reader<T>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        BLOCKING_READER.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(p, _)| p != self.path.as_path()) {
                let conn = rusqlite::Connection::open_with_flags(
                    self.path.as_path(),
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                conn.busy_timeout(Duration::from_secs(30))?;
                *slot = Some((self.path.as_ref().clone(), conn));
            }
            let (_, conn) = slot.as_ref().expect("connection just opened");
            f(conn)
        })
    }

    pub async fn health(&self) -> sqlx::Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.read)
            .await
            .map(|_| ())
    }

    /// Instances under a study / series / single instance, in series then instance order.
    pub async fn stored_instances(
        &self,
        study_uid: &str,
        series_uid: Option<&str>,
        sop_instance_uid: Option<&str>,
    ) -> sqlx::Result<Vec<StoredInstance>> {
        let rows = sqlx::query(&format!(
            "SELECT st.study_uid, se.series_uid, i.sop_instance_uid, i.sop_class_uid,
                    i.transfer_syntax_uid, i.storage_key, i.size_bytes, i.frame_layout,
                    i.bits_allocated
             {INSTANCES_IN_SCOPE}"
        ))
        .bind(study_uid)
        .bind(series_uid)
        .bind(sop_instance_uid)
        .fetch_all(&self.read)
        .await?;
        Ok(rows.iter().map(stored_instance).collect())
    }

    /// Where the value at a bulk path (`00420011`, `00081115/0/00091001`) lies in an instance's
    /// stored object, as recorded at ingest: `None` when the instance is not indexed,
    /// `Some(None)` when nothing is recorded at that path.
    pub async fn bulk_value(
        &self,
        study_uid: &str,
        series_uid: &str,
        sop_instance_uid: &str,
        path: &str,
    ) -> sqlx::Result<Option<Option<crate::ingest::bulk::BulkValue>>> {
        // The path is hex digits, item numbers and slashes (checked by the caller): safe to quote.
        let json_path = format!("$.\"{path}\"");
        let row: Option<(Option<String>,)> = sqlx::query_as(&format!(
            "SELECT CASE WHEN json_valid(i.bulk_data) THEN json_extract(i.bulk_data, ?4) END
             {INSTANCES_IN_SCOPE}"
        ))
        .bind(study_uid)
        .bind(series_uid)
        .bind(sop_instance_uid)
        .bind(json_path)
        .fetch_optional(&self.read)
        .await?;
        Ok(row.map(|(value,)| value.and_then(|v| serde_json::from_str(&v).ok())))
    }

    /// The instance that stands for a study or series in rendered images and thumbnails: the middle
    /// instance (by Instance Number) of the first series (in retrieve order) that has images.
    pub async fn representative_instance(
        &self,
        study_uid: &str,
        series_uid: Option<&str>,
    ) -> sqlx::Result<Option<StoredInstance>> {
        let row = sqlx::query(
            "WITH chosen AS (
                 SELECT se.series_pk FROM series se JOIN studies st ON st.study_pk = se.study_pk
                 WHERE st.study_uid = ?1 AND (?2 IS NULL OR se.series_uid = ?2)
                   AND EXISTS (SELECT 1 FROM instances i
                               WHERE i.series_pk = se.series_pk AND i.rows IS NOT NULL)
                 ORDER BY se.series_number, se.series_pk LIMIT 1)
             SELECT st.study_uid, se.series_uid, i.sop_instance_uid, i.sop_class_uid,
                    i.transfer_syntax_uid, i.storage_key, i.size_bytes, i.frame_layout,
                    i.bits_allocated
             FROM instances i
             JOIN series se ON se.series_pk = i.series_pk
             JOIN studies st ON st.study_pk = i.study_pk
             WHERE i.series_pk = (SELECT series_pk FROM chosen) AND i.rows IS NOT NULL
             ORDER BY i.instance_number, i.instance_pk
             LIMIT 1 OFFSET (SELECT COUNT(*) / 2 FROM instances
                             WHERE series_pk = (SELECT series_pk FROM chosen) AND rows IS NOT NULL)",
        )
        .bind(study_uid)
        .bind(series_uid)
        .fetch_optional(&self.read)
        .await?;
        Ok(row.as_ref().map(stored_instance))
    }

    /// A cached thumbnail of the stored copy `storage_key` (see `render::thumbnail`).
    pub async fn thumbnail(
        &self,
        storage_key: &str,
        variant: &str,
    ) -> sqlx::Result<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT image FROM thumbnails WHERE storage_key = ? AND variant = ?")
            .bind(storage_key)
            .bind(variant)
            .fetch_optional(&self.read)
            .await
    }

    /// Caches a thumbnail; only ingest calls this (`Ingestor::cache_thumbnail`).
    pub async fn cache_thumbnail(
        &self,
        sop_instance_uid: &str,
        storage_key: &str,
        variant: &str,
        image: Vec<u8>,
    ) -> Result<(), WriteError> {
        self.writer
            .cache_thumbnail(sop_instance_uid, storage_key, variant, image)
            .await
    }

    /// Every storage key the index refers to (for reconciliation with storage).
    pub async fn all_storage_keys(&self) -> sqlx::Result<Vec<String>> {
        sqlx::query_scalar("SELECT storage_key FROM instances")
            .fetch_all(&self.read)
            .await
    }
}

/// A `StoredInstance` from a row of the columns both instance reads select, in their order.
fn stored_instance(r: &sqlx::sqlite::SqliteRow) -> StoredInstance {
    StoredInstance {
        study_uid: r.get(0),
        series_uid: r.get(1),
        sop_instance_uid: r.get(2),
        sop_class_uid: r.get(3),
        transfer_syntax_uid: r.get(4),
        storage_key: r.get(5),
        size_bytes: r.get::<i64, _>(6) as u64,
        frame_layout: r.get(7),
        bits_allocated: r.get(8),
    }
}
