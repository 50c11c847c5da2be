-- Numbered after its issue (19) so that it cannot collide with the migrations other work adds meanwhile
-- (sqlx applies each migration not yet applied, in version order; gaps are allowed).
-- FHIR: one row per study the gateway holds or held. It versions each study for FHIR (meta.versionId,
-- meta.lastUpdated, _lastUpdated, 410 Gone once deleted) and is the push outbox: the index writer bumps
-- `version` in the same transaction as the index change, and a study is pending while version > pushed_version
-- (and > parked_version). Push workers claim pending rows with a lease, so gateways sharing this database never
-- push the same study at once.
CREATE TABLE fhir_study_state (
    study_uid              TEXT PRIMARY KEY,
    version                INTEGER NOT NULL DEFAULT 1,
    -- Milliseconds since the Unix epoch of the last change (instance stored or deleted).
    changed_at             INTEGER NOT NULL,
    -- The study's rows are gone (every instance deleted).
    deleted                INTEGER NOT NULL DEFAULT 0,
    -- Kept from the last insert, so a deleted study's push still names its patient and accession.
    patient_id             TEXT NOT NULL DEFAULT '',
    issuer_of_patient_id   TEXT NOT NULL DEFAULT '',
    accession_number       TEXT NOT NULL DEFAULT '',
    -- Push bookkeeping.
    pushed_version         INTEGER NOT NULL DEFAULT 0,
    pushed_at              INTEGER,
    parked_version         INTEGER NOT NULL DEFAULT 0,
    attempts               INTEGER NOT NULL DEFAULT 0,
    next_attempt_at        INTEGER NOT NULL DEFAULT 0,
    lease_owner            TEXT,
    lease_until            INTEGER NOT NULL DEFAULT 0,
    last_error             TEXT
);
CREATE INDEX fhir_study_state_pending ON fhir_study_state(changed_at)
    WHERE version > pushed_version AND version > parked_version;
CREATE INDEX fhir_study_state_changed ON fhir_study_state(changed_at);

-- Studies indexed before this migration: version 1, pending (a push configured later sends them).
INSERT INTO fhir_study_state (study_uid, changed_at, patient_id, issuer_of_patient_id, accession_number)
SELECT study_uid, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), patient_id,
       issuer_of_patient_id, accession_number
FROM studies;
