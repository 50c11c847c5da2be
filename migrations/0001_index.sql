-- The metadata index: one row per study, series and instance.
-- Matching columns hold values normalised for matching (PN upper-cased, dates YYYYMMDD, times HHMMSS.ffffff);
-- *_json columns hold the DICOM JSON returned to clients, so answering never touches object storage.

CREATE TABLE studies (
    study_pk               INTEGER PRIMARY KEY,
    study_uid              TEXT NOT NULL UNIQUE,
    patient_id             TEXT NOT NULL DEFAULT '',
    issuer_of_patient_id   TEXT NOT NULL DEFAULT '',
    patient_name           TEXT NOT NULL DEFAULT '',
    patient_birth_date     TEXT NOT NULL DEFAULT '',
    patient_sex            TEXT NOT NULL DEFAULT '',
    study_date             TEXT NOT NULL DEFAULT '',
    study_time             TEXT NOT NULL DEFAULT '',
    accession_number       TEXT NOT NULL DEFAULT '',
    study_id               TEXT NOT NULL DEFAULT '',
    study_description      TEXT NOT NULL DEFAULT '',
    referring_physician_name TEXT NOT NULL DEFAULT '',
    modalities             TEXT NOT NULL DEFAULT '',
    num_series             INTEGER NOT NULL DEFAULT 0,
    num_instances          INTEGER NOT NULL DEFAULT 0,
    attrs_json             TEXT NOT NULL
);
CREATE INDEX studies_patient_id ON studies(patient_id);
CREATE INDEX studies_patient_name ON studies(patient_name);
CREATE INDEX studies_study_date ON studies(study_date);
CREATE INDEX studies_accession ON studies(accession_number);

CREATE TABLE series (
    series_pk              INTEGER PRIMARY KEY,
    series_uid             TEXT NOT NULL UNIQUE,
    study_pk               INTEGER NOT NULL REFERENCES studies(study_pk),
    modality               TEXT NOT NULL DEFAULT '',
    series_number          INTEGER,
    series_description     TEXT NOT NULL DEFAULT '',
    body_part_examined     TEXT NOT NULL DEFAULT '',
    laterality             TEXT NOT NULL DEFAULT '',
    series_date            TEXT NOT NULL DEFAULT '',
    series_time            TEXT NOT NULL DEFAULT '',
    performed_procedure_step_start_date TEXT NOT NULL DEFAULT '',
    performed_procedure_step_start_time TEXT NOT NULL DEFAULT '',
    num_instances          INTEGER NOT NULL DEFAULT 0,
    attrs_json             TEXT NOT NULL
);
CREATE INDEX series_study ON series(study_pk);
CREATE INDEX series_modality ON series(modality);

CREATE TABLE instances (
    instance_pk            INTEGER PRIMARY KEY,
    sop_instance_uid       TEXT NOT NULL UNIQUE,
    series_pk              INTEGER NOT NULL REFERENCES series(series_pk),
    study_pk               INTEGER NOT NULL REFERENCES studies(study_pk),
    sop_class_uid          TEXT NOT NULL,
    instance_number        INTEGER,
    rows                   INTEGER,
    columns                INTEGER,
    bits_allocated         INTEGER,
    number_of_frames       INTEGER,
    content_date           TEXT NOT NULL DEFAULT '',
    content_time           TEXT NOT NULL DEFAULT '',
    transfer_syntax_uid    TEXT NOT NULL,
    storage_key            TEXT NOT NULL,
    size_bytes             INTEGER NOT NULL,
    -- Full DICOM JSON of the instance without bulk data; BulkDataURIs start with the {{BASE}} placeholder.
    metadata_json          TEXT NOT NULL,
    -- Where each frame lives in the stored object (serialised ingest::layout::Layout).
    frame_layout           TEXT NOT NULL,
    stored_at              TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
);
CREATE INDEX instances_series ON instances(series_pk, instance_number);
CREATE INDEX instances_study ON instances(study_pk);
CREATE INDEX instances_sop_class ON instances(sop_class_uid);
