//! The FHIR study state and push outbox (`fhir_study_state`): each study's version, bumped by the
//! index writer in the same transaction as the change that caused it, and the push bookkeeping.
//!
//! - [`touch_inserted`] / [`touch_deleted`]: called by the writer inside the transaction of an insert
//!   or a deletion. Several changes to one study before it is pushed leave one pending row: the push
//!   sends the study as it is then, so the latest state wins.
//! - [`OutboxOp`]: claim, complete, retry, park; applied by the writer thread too (one writer for the
//!   whole database; a second write connection could make the writer's transactions fail with
//!   SQLITE_BUSY_SNAPSHOT). A claim is a lease: gateways sharing the database never push a study twice
//!   at once, and a lease left by a crashed gateway expires.
//! - [`status`]: outbox length, oldest pending age, parked studies (read side).

use rusqlite::{params, Connection};
use sqlx::Row;

use super::record::InstanceRecord;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A new version of the study of an instance just inserted (or replaced).
pub(super) fn touch_inserted(conn: &Connection, r: &InstanceRecord) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO fhir_study_state (study_uid, changed_at, patient_id, issuer_of_patient_id,
             accession_number)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(study_uid) DO UPDATE SET version = version + 1, changed_at = excluded.changed_at,
             deleted = 0, patient_id = excluded.patient_id,
             issuer_of_patient_id = excluded.issuer_of_patient_id,
             accession_number = excluded.accession_number, attempts = 0, next_attempt_at = 0",
    )?
    .execute(params![
        r.study.study_uid,
        now_ms(),
        r.study.patient_id,
        r.study.issuer_of_patient_id,
        r.study.accession_number,
    ])?;
    Ok(())
}

/// A new version of a study some of whose instances were just deleted (all of them: `deleted`).
pub(super) fn touch_deleted(conn: &Connection, study_uid: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO fhir_study_state (study_uid, changed_at) VALUES (?1, ?2)
         ON CONFLICT(study_uid) DO UPDATE SET version = version + 1, changed_at = excluded.changed_at,
             attempts = 0, next_attempt_at = 0",
    )?
    .execute(params![study_uid, now_ms()])?;
    conn.prepare_cached(
        "UPDATE fhir_study_state
         SET deleted = NOT EXISTS (SELECT 1 FROM studies WHERE study_uid = ?1)
         WHERE study_uid = ?1",
    )?
    .execute([study_uid])?;
    Ok(())
}

/// A study claimed for pushing.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub study_uid: String,
    pub version: i64,
    pub deleted: bool,
    pub patient_id: String,
    pub issuer_of_patient_id: String,
    pub accession_number: String,
    pub attempts: i64,
}

/// Push bookkeeping, applied by the index writer.
#[derive(Debug, Clone)]
pub enum OutboxOp {
    /// Lease up to `limit` pending studies unchanged since `stable_before` (ms) and due, for
    /// `lease_ms`, to `owner`.
    Claim {
        owner: String,
        limit: i64,
        stable_before: i64,
        lease_ms: i64,
    },
    /// `version` was pushed: pending again only if the study changed meanwhile.
    Complete {
        owner: String,
        study_uid: String,
        version: i64,
    },
    /// The push failed transiently: try again at `next_attempt_at`.
    Retry {
        owner: String,
        study_uid: String,
        next_attempt_at: i64,
        error: String,
    },
    /// The server refused `version` for good: not retried until the study changes again.
    Park {
        owner: String,
        study_uid: String,
        version: i64,
        error: String,
    },
}

/// Applies one outbox operation (on the writer's connection, inside its transaction); a claim
/// returns the claimed studies.
pub(super) fn apply(conn: &Connection, op: &OutboxOp) -> rusqlite::Result<Vec<Claimed>> {
    let now = now_ms();
    match op {
        OutboxOp::Claim {
            owner,
            limit,
            stable_before,
            lease_ms,
        } => {
            let mut stmt = conn.prepare_cached(
                "UPDATE fhir_study_state SET lease_owner = ?1, lease_until = ?2
                 WHERE study_uid IN (
                     SELECT study_uid FROM fhir_study_state
                     WHERE version > pushed_version AND version > parked_version
                       AND changed_at <= ?3 AND next_attempt_at <= ?4 AND lease_until < ?4
                     ORDER BY changed_at LIMIT ?5)
                 RETURNING study_uid, version, deleted, patient_id, issuer_of_patient_id,
                     accession_number, attempts",
            )?;
            let rows = stmt.query_map(
                params![owner, now + lease_ms, stable_before, now, limit],
                |row| {
                    Ok(Claimed {
                        study_uid: row.get(0)?,
                        version: row.get(1)?,
                        deleted: row.get::<_, i64>(2)? != 0,
                        patient_id: row.get(3)?,
                        issuer_of_patient_id: row.get(4)?,
                        accession_number: row.get(5)?,
                        attempts: row.get(6)?,
                    })
                },
            )?;
            rows.collect()
        }
        OutboxOp::Complete {
            owner,
            study_uid,
            version,
        } => {
            conn.prepare_cached(
                "UPDATE fhir_study_state SET pushed_version = MAX(pushed_version, ?3),
                     pushed_at = ?4, attempts = 0, next_attempt_at = 0, lease_owner = NULL,
                     lease_until = 0, last_error = NULL
                 WHERE study_uid = ?1 AND lease_owner = ?2",
            )?
            .execute(params![study_uid, owner, version, now])?;
            Ok(Vec::new())
        }
        OutboxOp::Retry {
            owner,
            study_uid,
            next_attempt_at,
            error,
        } => {
            conn.prepare_cached(
                "UPDATE fhir_study_state SET attempts = attempts + 1, next_attempt_at = ?3,
                     last_error = ?4, lease_owner = NULL, lease_until = 0
                 WHERE study_uid = ?1 AND lease_owner = ?2",
            )?
            .execute(params![study_uid, owner, next_attempt_at, error])?;
            Ok(Vec::new())
        }
        OutboxOp::Park {
            owner,
            study_uid,
            version,
            error,
        } => {
            conn.prepare_cached(
                "UPDATE fhir_study_state SET parked_version = ?3, last_error = ?4,
                     attempts = attempts + 1, lease_owner = NULL, lease_until = 0
                 WHERE study_uid = ?1 AND lease_owner = ?2",
            )?
            .execute(params![study_uid, owner, version, error])?;
            Ok(Vec::new())
        }
    }
}

/// A parked study, as the status report lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Parked {
    pub study_uid: String,
    pub version: i64,
    pub error: String,
}

/// The outbox as an operator sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// Studies waiting to be pushed (parked ones excluded).
    pub pending: i64,
    /// Age of the oldest pending change, in seconds.
    pub oldest_pending_age_secs: f64,
    /// Pending studies whose last attempt failed (retrying with backoff).
    pub retrying: i64,
    pub parked: i64,
    /// The most recently parked studies (at most 20).
    pub parked_studies: Vec<Parked>,
}

pub async fn status(pool: &sqlx::SqlitePool) -> sqlx::Result<Status> {
    let row = sqlx::query(
        "SELECT COUNT(*), MIN(changed_at), COALESCE(SUM(attempts > 0), 0) FROM fhir_study_state
         WHERE version > pushed_version AND version > parked_version",
    )
    .fetch_one(pool)
    .await?;
    let pending: i64 = row.get(0);
    let oldest: Option<i64> = row.get(1);
    let retrying: i64 = row.get(2);
    let parked_rows = sqlx::query(
        "SELECT study_uid, parked_version, COALESCE(last_error, '') FROM fhir_study_state
         WHERE parked_version > 0 AND parked_version >= version
         ORDER BY changed_at DESC",
    )
    .fetch_all(pool)
    .await?;
    Ok(Status {
        pending,
        oldest_pending_age_secs: oldest.map_or(0.0, |t| (now_ms() - t).max(0) as f64 / 1000.0),
        retrying,
        parked: parked_rows.len() as i64,
        parked_studies: parked_rows
            .iter()
            .take(20)
            .map(|r| Parked {
                study_uid: r.get(0),
                version: r.get(1),
                error: r.get(2),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::record::{InstanceAttrs, SeriesAttrs, StudyAttrs};
    use super::super::{Index, Scope};
    use super::*;

    fn record(study: &str, sop: &str) -> InstanceRecord {
        InstanceRecord {
            study: StudyAttrs {
                study_uid: study.into(),
                patient_id: "P1".into(),
                attrs_json: "{}".into(),
                ..Default::default()
            },
            series: SeriesAttrs {
                series_uid: format!("{study}.1"),
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

    fn claim(owner: &str) -> OutboxOp {
        OutboxOp::Claim {
            owner: owner.into(),
            limit: 10,
            stable_before: now_ms() + 1,
            lease_ms: 60_000,
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_claimed_study_is_not_claimed_again_until_done_and_changes_make_it_pending() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("index.db").display());
        let index = Index::open(&url, 2).await.unwrap();
        index.insert(record("1.2", "1.2.1.1"), false).await.unwrap();
        index.insert(record("1.2", "1.2.1.2"), false).await.unwrap();

        // Two changes, one pending study at its latest version; one gateway claims it, the other
        // (sharing the database) gets nothing while the lease runs.
        let a = index.outbox(claim("gateway-a")).await.unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].study_uid.as_str(), a[0].version), ("1.2", 2));
        assert!(index.outbox(claim("gateway-b")).await.unwrap().is_empty());
        // Only the owner records the outcome.
        let complete = |owner: &str| OutboxOp::Complete {
            owner: owner.into(),
            study_uid: "1.2".into(),
            version: 2,
        };
        index.outbox(complete("gateway-b")).await.unwrap();
        assert_eq!(status(index.read_pool()).await.unwrap().pending, 1);
        index.outbox(complete("gateway-a")).await.unwrap();
        assert_eq!(status(index.read_pool()).await.unwrap().pending, 0);
        assert!(index.outbox(claim("gateway-b")).await.unwrap().is_empty());

        // A deletion is a change too, and says the study is gone.
        let scope = Scope {
            study_uid: "1.2".into(),
            series_uid: None,
            sop_instance_uid: None,
        };
        index.delete(scope, None).await.unwrap();
        let c = index.outbox(claim("gateway-b")).await.unwrap();
        assert_eq!(c.len(), 1);
        assert!(c[0].deleted && c[0].version == 3 && c[0].patient_id == "P1");

        // Parked: not claimed again until the study changes.
        index
            .outbox(OutboxOp::Park {
                owner: "gateway-b".into(),
                study_uid: "1.2".into(),
                version: 3,
                error: "400".into(),
            })
            .await
            .unwrap();
        let s = status(index.read_pool()).await.unwrap();
        assert_eq!((s.pending, s.parked), (0, 1));
        index.insert(record("1.2", "1.2.1.3"), false).await.unwrap();
        let c = index.outbox(claim("gateway-a")).await.unwrap();
        assert!(!c[0].deleted && c[0].version == 4);

        // Not yet stable: not claimed.
        index.insert(record("1.3", "1.3.1.1"), false).await.unwrap();
        let unstable = OutboxOp::Claim {
            owner: "gateway-b".into(),
            limit: 10,
            stable_before: now_ms() - 60_000,
            lease_ms: 60_000,
        };
        assert!(index.outbox(unstable).await.unwrap().is_empty());
    }
}
