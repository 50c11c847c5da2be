//! Which attributes belong to the patient/study and series levels of the information model
//! (PS3.4 C.6.2.1 and the QIDO-RS result attributes of PS3.18 Table 6.7.1-2). Ingest copies these
//! into the study and series rows so QIDO answers come from the index alone.

use dicom_core::Tag;
use dicom_dictionary_std::tags;

/// Patient and study level attributes kept with the study.
pub const STUDY_TAGS: &[Tag] = &[
    tags::SPECIFIC_CHARACTER_SET,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::ACCESSION_NUMBER,
    tags::ISSUER_OF_ACCESSION_NUMBER_SEQUENCE,
    tags::INSTITUTION_NAME,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::TIMEZONE_OFFSET_FROM_UTC,
    tags::STUDY_DESCRIPTION,
    tags::PROCEDURE_CODE_SEQUENCE,
    tags::PHYSICIANS_OF_RECORD,
    tags::NAME_OF_PHYSICIANS_READING_STUDY,
    tags::ADMITTING_DIAGNOSES_DESCRIPTION,
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::ISSUER_OF_PATIENT_ID,
    tags::TYPE_OF_PATIENT_ID,
    tags::ISSUER_OF_PATIENT_ID_QUALIFIERS_SEQUENCE,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_BIRTH_TIME,
    tags::PATIENT_SEX,
    tags::OTHER_PATIENT_I_DS_SEQUENCE,
    tags::OTHER_PATIENT_NAMES,
    tags::PATIENT_AGE,
    tags::PATIENT_SIZE,
    tags::PATIENT_WEIGHT,
    tags::OCCUPATION,
    tags::ADDITIONAL_PATIENT_HISTORY,
    tags::PATIENT_COMMENTS,
    tags::STUDY_INSTANCE_UID,
    tags::STUDY_ID,
];

/// The patient level of the Patient Root model (PS3.4 C.6.1.1.2): the patient attributes of
/// [`STUDY_TAGS`], which is where they are kept.
pub const PATIENT_TAGS: &[Tag] = &[
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::ISSUER_OF_PATIENT_ID,
    tags::TYPE_OF_PATIENT_ID,
    tags::ISSUER_OF_PATIENT_ID_QUALIFIERS_SEQUENCE,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_BIRTH_TIME,
    tags::PATIENT_SEX,
    tags::OTHER_PATIENT_I_DS_SEQUENCE,
    tags::OTHER_PATIENT_NAMES,
    tags::PATIENT_COMMENTS,
];

/// Series level attributes kept with the series.
pub const SERIES_TAGS: &[Tag] = &[
    tags::SPECIFIC_CHARACTER_SET,
    tags::SERIES_DATE,
    tags::SERIES_TIME,
    tags::MODALITY,
    tags::SERIES_DESCRIPTION,
    tags::PERFORMING_PHYSICIAN_NAME,
    tags::OPERATORS_NAME,
    tags::MANUFACTURER,
    tags::MANUFACTURER_MODEL_NAME,
    tags::STATION_NAME,
    tags::BODY_PART_EXAMINED,
    tags::PROTOCOL_NAME,
    tags::LATERALITY,
    tags::SERIES_INSTANCE_UID,
    tags::SERIES_NUMBER,
    tags::PERFORMED_PROCEDURE_STEP_START_DATE,
    tags::PERFORMED_PROCEDURE_STEP_START_TIME,
    tags::REQUEST_ATTRIBUTES_SEQUENCE,
];
