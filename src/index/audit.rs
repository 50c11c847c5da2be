//! The audit trail's table (`audit_events`): written by the index writer (stores and deletions in
//! the transaction of the change they record: [`record_store`], [`record_delete`]; other events
//! on their own: [`record`]), read by the FHIR AuditEvent search ([`search`], [`count`], [`get`]).

use rusqlite::{params, Connection};
use sqlx::Row;

use super::outbox::now_ms;
use super::record::InstanceRecord;
use super::writer::Scope;
use crate::audit::{self, credential_name, Action, AuditEvent, Origin, Outcome};

/// Inserts an event. An empty patient is taken from the study's row (which a deletion still has:
/// it is recorded before the rows go).
pub(super) fn record(conn: &Connection, e: &AuditEvent) -> rusqlite::Result<()> {
    let who = &e.origin.who;
    let instances = serde_json::to_string(&e.instances).unwrap_or_else(|_| "[]".into());
    conn.prepare_cached(
        "INSERT INTO audit_events (recorded_at, action, outcome, outcome_desc, protocol, credential,
             subject, address, ae_title, certificate, study_uid, patient_id, issuer_of_patient_id,
             sop_class_uid, instances, instance_count, query, source)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11,
             COALESCE(NULLIF(?12, ''), (SELECT patient_id FROM studies WHERE study_uid = ?11), ''),
             CASE WHEN ?12 != '' THEN '' ELSE COALESCE(
                 (SELECT issuer_of_patient_id FROM studies WHERE study_uid = ?11), '') END,
             ?13, ?14, ?15, ?16, ?17)",
    )?
    .execute(params![
        now_ms(),
        e.action.as_str(),
        e.outcome.code(),
        e.outcome_description,
        e.origin.protocol.as_str(),
        credential_name(&who.credential),
        who.subject,
        who.address.map(|a| a.to_string()).unwrap_or_default(),
        who.ae_title.clone().unwrap_or_default(),
        who.certificate.clone().unwrap_or_default(),
        e.study_uid,
        e.patient_id,
        e.sop_class_uid,
        instances,
        e.instance_count,
        e.query,
        audit::source_id(),
    ])?;
    Ok(())
}

/// The store of one instance, inside the insert's transaction.
pub(super) fn record_store(
    conn: &Connection,
    r: &InstanceRecord,
    origin: &Origin,
) -> rusqlite::Result<()> {
    let mut e = AuditEvent::new(Action::Store, origin.clone(), Outcome::Success);
    e.study_uid = r.study.study_uid.clone();
    e.patient_id = r.study.patient_id.clone();
    e.sop_class_uid = r.instance.sop_class_uid.clone();
    e.instances = vec![r.instance.sop_instance_uid.clone()];
    e.instance_count = 1;
    record(conn, &e)
}

/// A deletion of `instances` (SOP Instance UIDs), inside its transaction, before the rows go.
pub(super) fn record_delete(
    conn: &Connection,
    scope: &Scope,
    instances: &[String],
    origin: &Origin,
) -> rusqlite::Result<()> {
    let mut e = AuditEvent::new(Action::Delete, origin.clone(), Outcome::Success);
    e.study_uid = scope.study_uid.clone();
    e.instances = instances.to_vec();
    e.instance_count = instances.len() as i64;
    record(conn, &e)
}

/// An event as stored.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: i64,
    pub recorded_at: i64,
    pub action: Action,
    pub outcome: Outcome,
    pub outcome_description: String,
    pub protocol: String,
    pub credential: String,
    pub subject: String,
    pub address: String,
    pub ae_title: String,
    pub certificate: String,
    pub study_uid: String,
    pub patient_id: String,
    pub issuer_of_patient_id: String,
    pub sop_class_uid: String,
    pub instances: Vec<String>,
    pub instance_count: i64,
    pub query: String,
    pub source: String,
}

/// What an AuditEvent search narrows to (every field that is set must match).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Recorded at or after (ms since the epoch).
    pub from_ms: Option<i64>,
    /// Recorded before (ms since the epoch).
    pub until_ms: Option<i64>,
    pub patient_id: Option<String>,
    pub issuer_of_patient_id: Option<String>,
    pub study_uid: Option<String>,
    /// A user, key or AE title, or an address.
    pub agent: Option<String>,
}

const COLUMNS: &str = "event_id, recorded_at, action, outcome, outcome_desc, protocol, credential,
    subject, address, ae_title, certificate, study_uid, patient_id, issuer_of_patient_id,
    sop_class_uid, instances, instance_count, query, source";

const MATCHING: &str = "(?1 IS NULL OR recorded_at >= ?1) AND (?2 IS NULL OR recorded_at < ?2)
    AND (?3 IS NULL OR patient_id = ?3) AND (?4 IS NULL OR issuer_of_patient_id = ?4)
    AND (?5 IS NULL OR study_uid = ?5)
    AND (?6 IS NULL OR subject = ?6 OR ae_title = ?6 OR address = ?6)";

fn bind<'q>(
    query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    f: &'q Filter,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    query
        .bind(f.from_ms)
        .bind(f.until_ms)
        .bind(f.patient_id.as_deref())
        .bind(f.issuer_of_patient_id.as_deref())
        .bind(f.study_uid.as_deref())
        .bind(f.agent.as_deref())
}

fn stored(row: &sqlx::sqlite::SqliteRow) -> StoredEvent {
    let action: String = row.get(2);
    let instances: String = row.get(15);
    StoredEvent {
        id: row.get(0),
        recorded_at: row.get(1),
        action: Action::parse(&action).unwrap_or(Action::Query),
        outcome: Outcome::from_code(row.get(3)),
        outcome_description: row.get(4),
        protocol: row.get(5),
        credential: row.get(6),
        subject: row.get(7),
        address: row.get(8),
        ae_title: row.get(9),
        certificate: row.get(10),
        study_uid: row.get(11),
        patient_id: row.get(12),
        issuer_of_patient_id: row.get(13),
        sop_class_uid: row.get(14),
        instances: serde_json::from_str(&instances).unwrap_or_default(),
        instance_count: row.get(16),
        query: row.get(17),
        source: row.get(18),
    }
}

/// A page of the events matching `filter`, newest first.
pub async fn search(
    pool: &sqlx::SqlitePool,
    filter: &Filter,
    count: u64,
    offset: u64,
) -> sqlx::Result<Vec<StoredEvent>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM audit_events WHERE {MATCHING}
         ORDER BY event_id DESC LIMIT ?7 OFFSET ?8"
    );
    let rows = bind(sqlx::query(&sql), filter)
        .bind(count as i64)
        .bind(offset as i64)
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(stored).collect())
}

pub async fn count(pool: &sqlx::SqlitePool, filter: &Filter) -> sqlx::Result<i64> {
    let sql = format!("SELECT COUNT(*) FROM audit_events WHERE {MATCHING}");
    bind(sqlx::query(&sql), filter)
        .fetch_one(pool)
        .await
        .map(|row| row.get(0))
}

pub async fn get(pool: &sqlx::SqlitePool, id: i64) -> sqlx::Result<Option<StoredEvent>> {
    let sql = format!("SELECT {COLUMNS} FROM audit_events WHERE event_id = ?");
    let row = sqlx::query(&sql).bind(id).fetch_optional(pool).await?;
    Ok(row.as_ref().map(stored))
}
