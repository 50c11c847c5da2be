-- The audit trail (issue 20): one row per audited event. Stores and deletions insert theirs in the same
-- transaction as the index change (the index writer), so an acknowledged store or delete always has its
-- event; reads and queries insert theirs right after the answer is produced. Shaped for several gateways
-- sharing one database: `source` says which gateway recorded the event, and delivery to a syslog
-- collector is claimed with a lease through this table, never from a node-local queue.
CREATE TABLE audit_events (
    event_id              INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Milliseconds since the Unix epoch.
    recorded_at           INTEGER NOT NULL,
    -- store, query, retrieve, delete, export, login-failure, policy-denial, application-start,
    -- application-stop (`audit::Action`).
    action                TEXT NOT NULL,
    -- 0 success, 4 minor failure, 8 serious failure, 12 major failure (PS3.15 A.5.1 EventOutcomeIndicator).
    outcome               INTEGER NOT NULL,
    outcome_desc          TEXT NOT NULL DEFAULT '',
    -- DIMSE, DICOMweb, WADO-URI, FHIR, HTTP, application.
    protocol              TEXT NOT NULL,
    -- Who: how they authenticated (`security::Credential`), user / key / AE title, address, AE title,
    -- certificate subject.
    credential            TEXT NOT NULL,
    subject               TEXT NOT NULL DEFAULT '',
    address               TEXT NOT NULL DEFAULT '',
    ae_title              TEXT NOT NULL DEFAULT '',
    certificate           TEXT NOT NULL DEFAULT '',
    -- What: the study, its patient (taken from the index when the event names only the study), the
    -- SOP class and instances concerned (a JSON array of SOP Instance UIDs), the query as asked.
    study_uid             TEXT NOT NULL DEFAULT '',
    patient_id            TEXT NOT NULL DEFAULT '',
    issuer_of_patient_id  TEXT NOT NULL DEFAULT '',
    sop_class_uid         TEXT NOT NULL DEFAULT '',
    instances             TEXT NOT NULL DEFAULT '[]',
    instance_count        INTEGER NOT NULL DEFAULT 0,
    query                 TEXT NOT NULL DEFAULT '',
    -- The gateway that recorded it (Audit Source ID).
    source                TEXT NOT NULL DEFAULT '',
    -- Delivery to the syslog collector: sent once `syslog_sent_at` is set; claimed with a lease.
    syslog_sent_at        INTEGER,
    syslog_lease_owner    TEXT,
    syslog_lease_until    INTEGER NOT NULL DEFAULT 0,
    syslog_attempts       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX audit_events_recorded ON audit_events(recorded_at);
CREATE INDEX audit_events_patient ON audit_events(patient_id);
CREATE INDEX audit_events_study ON audit_events(study_uid);
CREATE INDEX audit_events_syslog_pending ON audit_events(event_id) WHERE syslog_sent_at IS NULL;
