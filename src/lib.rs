//! dicom-gateway: a DICOM imaging gateway.
//!
//! The code follows the data:
//!
//! - [`dimse`]: DIMSE in: associations, C-ECHO, C-STORE;
//! - [`dicom`]: byte-level DICOM reading: the one walker over encoded objects (meta group, element
//!   headers, data set walk, frame layout, deflate, validation);
//! - [`ingest`]: the single path objects take into the gateway (spool, parse, store, index);
//! - [`storage`]: where objects live (a local directory or an S3-compatible bucket);
//! - [`index`]: the metadata index (SQLite) and the matching engine;
//! - [`model`]: the DICOM JSON model and information model levels;
//! - [`dicomweb`]: QIDO-RS and WADO-RS out;
//! - [`fhir`]: FHIR R4 ImagingStudy served from the index and pushed to an EHR;
//! - [`viewer`]: what a browser opens: the study browser at `/`, study downloads, OHIF at `/viewer/`;
//! - [`stored_frame`]: one frame of a stored instance (header + the frame's bytes) read by range,
//!   what [`render`] and [`transcode`] decode;
//! - [`render`]: frames decoded and rendered as JPEG / PNG / GIF (rendered, thumbnails, WADO-URI);
//! - [`transcode`]: decompressing and re-encoding pixel data on retrieve (WADO-RS, C-MOVE / C-GET);
//! - [`app`]: wiring, start-up recovery, shutdown; [`http_server`]: the HTTP server and its limits;
//!   [`config`]: configuration;
//! - [`security`]: who is calling ([`security::Identity`]) and what they may do;
//! - [`tls`]: the certificate for DICOM TLS, HTTPS and TLS move destinations (reloaded live);
//!   [`exposure`]: secure by default (who can reach the listeners);
//! - [`audit`]: the audit trail (events in the index, FHIR AuditEvent);
//! - [`reindex`]: rebuilding the index from storage (`dicom-gateway reindex`).

pub mod app;
pub mod audit;
pub mod config;
pub mod dicom;
pub mod dicomweb;
pub mod dimse;
pub mod exposure;
pub mod fhir;
#[cfg(fuzzing)]
pub mod fuzzing;
pub mod http_server;
pub mod index;
pub mod ingest;
pub mod model;
pub mod reindex;
pub mod render;
pub mod security;
pub mod storage;
pub mod stored_frame;
pub mod tls;
pub mod transcode;
pub mod viewer;

/// Implementation Class UID written in the file meta of objects we receive (a 2.25 UUID-derived UID).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.171905823945102811361523185366407315847";
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("DICOMGW_", env!("CARGO_PKG_VERSION"));
