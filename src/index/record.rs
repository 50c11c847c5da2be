//! What ingest hands to the index for one instance: matching values already normalised, and the
//! DICOM JSON fragments returned by QIDO-RS and WADO-RS metadata.

#[derive(Debug, Clone, Default)]
pub struct StudyAttrs {
    pub study_uid: String,
    pub patient_id: String,
    pub issuer_of_patient_id: String,
    /// Upper-cased for case-insensitive PN matching.
    pub patient_name: String,
    pub patient_birth_date: String,
    pub patient_sex: String,
    pub study_date: String,
    pub study_time: String,
    pub accession_number: String,
    pub study_id: String,
    pub study_description: String,
    pub referring_physician_name: String,
    /// Patient and study level attributes as a DICOM JSON object.
    pub attrs_json: String,
}

#[derive(Debug, Clone, Default)]
pub struct SeriesAttrs {
    pub series_uid: String,
    pub modality: String,
    pub series_number: Option<i64>,
    pub series_description: String,
    pub body_part_examined: String,
    pub laterality: String,
    pub series_date: String,
    pub series_time: String,
    pub performed_procedure_step_start_date: String,
    pub performed_procedure_step_start_time: String,
    /// Series level attributes as a DICOM JSON object.
    pub attrs_json: String,
}

#[derive(Debug, Clone, Default)]
pub struct InstanceAttrs {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub instance_number: Option<i64>,
    pub rows: Option<i64>,
    pub columns: Option<i64>,
    pub bits_allocated: Option<i64>,
    pub number_of_frames: Option<i64>,
    pub content_date: String,
    pub content_time: String,
    pub acquisition_datetime: String,
    pub transfer_syntax_uid: String,
    pub storage_key: String,
    pub size_bytes: u64,
    /// The whole instance as DICOM JSON, bulk data as `{{BASE}}`-prefixed BulkDataURIs.
    pub metadata_json: String,
    /// Serialised `dicom::Layout`.
    pub frame_layout: String,
    /// Where the values served as BulkDataURIs (other than pixel data) lie in the stored object:
    /// a JSON object, bulk path -> `ingest::bulk::BulkValue`.
    pub bulk_data: String,
}

#[derive(Debug, Clone, Default)]
pub struct InstanceRecord {
    pub study: StudyAttrs,
    pub series: SeriesAttrs,
    pub instance: InstanceAttrs,
    /// Who stored it (C-STORE, STOW-RS): its audit event commits with the insert. None for the
    /// gateway's own indexing (reconcile, reindex).
    pub audit: Option<crate::audit::Origin>,
}
