//! The index's single writer. SQLite allows one writer at a time, and each durable commit costs a
//! disk flush; so one task owns the write connection and commits whatever requests are waiting in one
//! transaction (group commit), each request in its own savepoint so one bad record fails alone.
//! Requests are inserts (ingest) and deletions (DICOMweb DELETE, through ingest).

use sqlx::{Connection, Row, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::record::InstanceRecord;
use super::INSTANCES_IN_SCOPE;

/// Requests committed together at most; bounds the latency of the first one.
const MAX_BATCH: usize = 128;

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
    Database(#[from] sqlx::Error),
    #[error("series {series_uid} already belongs to another study")]
    SeriesInOtherStudy { series_uid: String },
    #[error("index writer stopped")]
    Stopped,
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
    Delete(Scope),
}

enum Done {
    Inserted(InsertOutcome),
    /// The storage keys of the instances whose rows were deleted.
    Deleted(Vec<String>),
}

/// One request waiting for the writer.
struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Done, WriteError>>,
}

/// A request applied inside the open transaction, its answer held until the commit.
struct Applied {
    reply: oneshot::Sender<Result<Done, WriteError>>,
    result: Result<Done, WriteError>,
}

#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Request>,
}

impl WriterHandle {
    pub fn spawn(pool: SqlitePool) -> WriterHandle {
        let (tx, rx) = mpsc::channel(1024);
        // The writer runs on its own thread and runtime: it is the index's one serial writer anyway,
        // and this keeps its futures free of the `Send` bound that sqlx's borrowed executors trip
        // over in rustc's higher-ranked lifetime checks.
        std::thread::Builder::new()
            .name("index-writer".into())
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("index writer runtime")
                    .block_on(run(pool, rx))
            })
            .expect("spawn index writer thread");
        WriterHandle { tx }
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
            Done::Deleted(_) => unreachable!("an insert answered as a deletion"),
        }
    }

    /// Deletes the rows of the instances in `scope` (and their series and study once empty);
    /// returns their storage keys.
    pub async fn delete(&self, scope: Scope) -> Result<Vec<String>, WriteError> {
        match self.send(Op::Delete(scope)).await? {
            Done::Deleted(keys) => Ok(keys),
            Done::Inserted(_) => unreachable!("a deletion answered as an insert"),
        }
    }

    async fn send(&self, op: Op) -> Result<Done, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { op, reply })
            .await
            .map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }
}

async fn run(pool: SqlitePool, mut rx: mpsc::Receiver<Request>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let requests = std::mem::take(&mut batch);
        match commit_batch(&pool, requests).await {
            Ok(applied) => {
                for a in applied {
                    let _ = a.reply.send(a.result);
                }
            }
            Err((applied, e)) => {
                tracing::error!(error = %e, "index commit failed");
                for a in applied {
                    let err = sqlx::Error::Protocol(format!("commit failed: {e}"));
                    let _ = a.reply.send(Err(WriteError::Database(err)));
                }
            }
        }
    }
}

/// Applies the requests in one transaction. On a transaction-level error, every request's reply
/// is returned with the error so that all of them are answered as failed.
async fn commit_batch(
    pool: &SqlitePool,
    requests: Vec<Request>,
) -> Result<Vec<Applied>, (Vec<Applied>, sqlx::Error)> {
    let unapplied = |requests: Vec<Request>| -> Vec<Applied> {
        requests
            .into_iter()
            .map(|r| Applied {
                reply: r.reply,
                result: Err(WriteError::Stopped),
            })
            .collect()
    };
    let mut conn = match pool.acquire().await {
        Ok(c) => c,
        Err(e) => return Err((unapplied(requests), e)),
    };
    let mut tx = match conn.begin().await {
        Ok(tx) => tx,
        Err(e) => return Err((unapplied(requests), e)),
    };
    // A lone request needs no savepoint: its failure rolls back the whole (one-request) batch.
    let savepoints = requests.len() > 1;
    let mut applied = Vec::with_capacity(requests.len());
    let mut pending = requests.into_iter();
    while let Some(r) = pending.next() {
        if savepoints {
            if let Err(e) = sqlx::query("SAVEPOINT op").execute(&mut *tx).await {
                let mut rest = unapplied(std::iter::once(r).chain(pending).collect());
                applied.append(&mut rest);
                return Err((applied, e));
            }
        }
        let result = match &r.op {
            Op::Insert { record, replace } => {
                insert(&mut tx, record, *replace).await.map(Done::Inserted)
            }
            Op::Delete(scope) => delete(&mut tx, scope).await.map(Done::Deleted),
        };
        let ok = result.is_ok();
        applied.push(Applied {
            reply: r.reply,
            result,
        });
        if !savepoints {
            if !ok {
                let _ = tx.rollback().await;
                return Ok(applied);
            }
            continue;
        }
        // A failed request is undone alone; the others in the batch still commit.
        let end = if ok {
            "RELEASE op"
        } else {
            "ROLLBACK TO op; RELEASE op"
        };
        if let Err(e) = sqlx::raw_sql(end).execute(&mut *tx).await {
            let mut rest = unapplied(pending.collect());
            applied.append(&mut rest);
            return Err((applied, e));
        }
    }
    match tx.commit().await {
        Ok(()) => Ok(applied),
        Err(e) => Err((applied, e)),
    }
}

async fn insert(
    conn: &mut SqliteConnection,
    r: &InstanceRecord,
    replace: bool,
) -> Result<InsertOutcome, WriteError> {
    let existing: Option<String> =
        sqlx::query_scalar("SELECT storage_key FROM instances WHERE sop_instance_uid = ?")
            .bind(&r.instance.sop_instance_uid)
            .fetch_optional(&mut *conn)
            .await?;
    let outcome = match existing {
        Some(_) if !replace => return Ok(InsertOutcome::Duplicate),
        Some(old_key) => {
            remove(conn, &r.instance.sop_instance_uid).await?;
            InsertOutcome::Replaced { old_key }
        }
        None => InsertOutcome::Inserted,
    };

    let s = &r.study;
    let study_pk: i64 = sqlx::query(
        "INSERT INTO studies (study_uid, patient_id, issuer_of_patient_id, patient_name,
            patient_birth_date, patient_sex, study_date, study_time, accession_number, study_id,
            study_description, referring_physician_name, attrs_json, num_instances)
         VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,1)
         ON CONFLICT(study_uid) DO UPDATE SET num_instances = num_instances + 1
         RETURNING study_pk",
    )
    .bind(&s.study_uid)
    .bind(&s.patient_id)
    .bind(&s.issuer_of_patient_id)
    .bind(&s.patient_name)
    .bind(&s.patient_birth_date)
    .bind(&s.patient_sex)
    .bind(&s.study_date)
    .bind(&s.study_time)
    .bind(&s.accession_number)
    .bind(&s.study_id)
    .bind(&s.study_description)
    .bind(&s.referring_physician_name)
    .bind(&s.attrs_json)
    .fetch_one(&mut *conn)
    .await?
    .get(0);

    let se = &r.series;
    let row = sqlx::query(
        "INSERT INTO series (series_uid, study_pk, modality, series_number, series_description,
            body_part_examined, laterality, series_date, series_time,
            performed_procedure_step_start_date, performed_procedure_step_start_time, attrs_json,
            num_instances)
         VALUES (?,?,?,?,?,?,?,?,?,?,?,?,1)
         ON CONFLICT(series_uid) DO UPDATE SET num_instances = num_instances + 1
         RETURNING series_pk, study_pk, num_instances",
    )
    .bind(&se.series_uid)
    .bind(study_pk)
    .bind(&se.modality)
    .bind(se.series_number)
    .bind(&se.series_description)
    .bind(&se.body_part_examined)
    .bind(&se.laterality)
    .bind(&se.series_date)
    .bind(&se.series_time)
    .bind(&se.performed_procedure_step_start_date)
    .bind(&se.performed_procedure_step_start_time)
    .bind(&se.attrs_json)
    .fetch_one(&mut *conn)
    .await?;
    let (series_pk, owner, series_instances): (i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2));
    if owner != study_pk {
        return Err(WriteError::SeriesInOtherStudy {
            series_uid: se.series_uid.clone(),
        });
    }

    let i = &r.instance;
    sqlx::query(
        "INSERT INTO instances (sop_instance_uid, series_pk, study_pk, sop_class_uid, instance_number,
            rows, columns, bits_allocated, number_of_frames, content_date, content_time,
            transfer_syntax_uid, storage_key, size_bytes, metadata_json, frame_layout)
         VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
    )
    .bind(&i.sop_instance_uid)
    .bind(series_pk)
    .bind(study_pk)
    .bind(&i.sop_class_uid)
    .bind(i.instance_number)
    .bind(i.rows)
    .bind(i.columns)
    .bind(i.bits_allocated)
    .bind(i.number_of_frames)
    .bind(&i.content_date)
    .bind(&i.content_time)
    .bind(&i.transfer_syntax_uid)
    .bind(&i.storage_key)
    .bind(i.size_bytes as i64)
    .bind(&i.metadata_json)
    .bind(&i.frame_layout)
    .execute(&mut *conn)
    .await?;

    // The instance counts were incremented by the upserts above; a new series also changes the
    // study's series count and modalities. (A failed request's savepoint undoes all of it.)
    if series_instances == 1 {
        refresh_study_counts(conn, study_pk).await?;
    }
    Ok(outcome)
}

async fn delete(conn: &mut SqliteConnection, scope: &Scope) -> Result<Vec<String>, WriteError> {
    let uids: Vec<String> =
        sqlx::query_scalar(&format!("SELECT i.sop_instance_uid {INSTANCES_IN_SCOPE}"))
            .bind(&scope.study_uid)
            .bind(&scope.series_uid)
            .bind(&scope.sop_instance_uid)
            .fetch_all(&mut *conn)
            .await?;
    let mut keys = Vec::with_capacity(uids.len());
    for uid in uids {
        keys.extend(remove(conn, &uid).await?);
    }
    Ok(keys)
}

/// Deletes an instance row, and its series and study once empty; returns the object's storage key.
async fn remove(
    conn: &mut SqliteConnection,
    sop_instance_uid: &str,
) -> Result<Option<String>, WriteError> {
    let Some(row) = sqlx::query(
        "DELETE FROM instances WHERE sop_instance_uid = ? RETURNING storage_key, series_pk, study_pk",
    )
    .bind(sop_instance_uid)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let (key, series_pk, study_pk): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
    sqlx::query("UPDATE series SET num_instances = num_instances - 1 WHERE series_pk = ?")
        .bind(series_pk)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM series WHERE series_pk = ? AND num_instances <= 0")
        .bind(series_pk)
        .execute(&mut *conn)
        .await?;
    refresh_study_counts(conn, study_pk).await?;
    sqlx::query("DELETE FROM studies WHERE study_pk = ? AND num_instances <= 0")
        .bind(study_pk)
        .execute(&mut *conn)
        .await?;
    Ok(Some(key))
}

async fn refresh_study_counts(conn: &mut SqliteConnection, study_pk: i64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE studies SET
            num_instances = (SELECT COALESCE(SUM(num_instances), 0) FROM series WHERE study_pk = ?1),
            num_series = (SELECT COUNT(*) FROM series WHERE study_pk = ?1),
            modalities = COALESCE((SELECT group_concat(modality, '\\') FROM
                (SELECT DISTINCT modality FROM series WHERE study_pk = ?1 AND modality != ''
                 ORDER BY modality)), '')
         WHERE study_pk = ?1",
    )
    .bind(study_pk)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
