//! Columns added by a migration to an index that already held rows are filled from the DICOM JSON
//! each row keeps, normalised as ingest does, so upgrading never needs a reindex from storage.

use sqlx::SqlitePool;

use super::temporal::{normalize_datetime, parse_offset};

/// Rows updated per transaction: keeps memory and the writer's lock time bounded on a large index.
const BATCH: i64 = 5_000;

/// Runs the backfills the migrations asked for (rows of the `backfill` table).
pub async fn run(pool: &SqlitePool) -> sqlx::Result<()> {
    let pending: Vec<String> = sqlx::query_scalar("SELECT what FROM backfill")
        .fetch_all(pool)
        .await?;
    for what in pending {
        match what.as_str() {
            "acquisition_datetime" => acquisition_datetime(pool).await?,
            other => tracing::warn!(column = other, "unknown backfill left in place"),
        }
    }
    Ok(())
}

async fn acquisition_datetime(pool: &SqlitePool) -> sqlx::Result<()> {
    let mut after = 0i64;
    let mut filled = 0u64;
    loop {
        let mut tx = pool.begin().await?;
        let rows: Vec<(i64, String, Option<String>)> = sqlx::query_as(
            r#"SELECT instance_pk, json_extract(metadata_json, '$."0008002A".Value[0]'),
                      json_extract(metadata_json, '$."00080201".Value[0]')
               FROM instances
               WHERE instance_pk > ? AND json_extract(metadata_json, '$."0008002A".Value[0]') IS NOT NULL
               ORDER BY instance_pk LIMIT ?"#,
        )
        .bind(after)
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let Some(&(last, ..)) = rows.last() else {
            sqlx::query("DELETE FROM backfill WHERE what = 'acquisition_datetime'")
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            break;
        };
        for (pk, value, offset) in &rows {
            let offset = offset.as_deref().and_then(parse_offset);
            let normalized = normalize_datetime(value, offset).unwrap_or_default();
            sqlx::query("UPDATE instances SET acquisition_datetime = ? WHERE instance_pk = ?")
                .bind(normalized)
                .bind(pk)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        filled += rows.len() as u64;
        after = last;
    }
    if filled > 0 {
        tracing::info!(
            instances = filled,
            "AcquisitionDateTime filled in from the stored JSON"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rows_indexed_before_the_column_get_it_from_their_json() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("index.db").display());
        drop(super::super::Index::open(&url, 1).await.unwrap());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let rows = [
            (
                1,
                r#"{"0008002A":{"vr":"DT","Value":["20200115003000+0100"]}}"#,
            ),
            (
                2,
                r#"{"0008002A":{"vr":"DT","Value":["20200115101500"]},"00080201":{"vr":"SH","Value":["-0200"]}}"#,
            ),
            (3, r#"{"00080020":{"vr":"DA","Value":["20200115"]}}"#),
        ];
        sqlx::raw_sql(
            "INSERT INTO studies (study_pk, study_uid, attrs_json) VALUES (1, '1.2', '{}');
             INSERT INTO series (series_pk, series_uid, study_pk, attrs_json) VALUES (1, '1.2.3', 1, '{}');
             INSERT INTO backfill (what) VALUES ('acquisition_datetime');",
        )
        .execute(&pool)
        .await
        .unwrap();
        for (pk, json) in rows {
            sqlx::query(
                "INSERT INTO instances (instance_pk, sop_instance_uid, series_pk, study_pk,
                    sop_class_uid, transfer_syntax_uid, storage_key, size_bytes, metadata_json,
                    frame_layout) VALUES (?, ?, 1, 1, '1.2', '1.2', 'k', 0, ?, '{}')",
            )
            .bind(pk)
            .bind(format!("1.2.3.{pk}"))
            .bind(json)
            .execute(&pool)
            .await
            .unwrap();
        }
        run(&pool).await.unwrap();
        let filled: Vec<String> =
            sqlx::query_scalar("SELECT acquisition_datetime FROM instances ORDER BY instance_pk")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(
            filled,
            ["20200114233000.000000", "20200115121500.000000", ""]
        );
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM backfill")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(left, 0);
    }
}
