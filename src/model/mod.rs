//! The DICOM data model as clients see it: the JSON encoding ([`json`]) and which attributes belong
//! to which level of the information model ([`levels`]), and re-encoding between native transfer
//! syntaxes ([`transcode`]).

pub mod charset;
pub mod explicit_le;
pub mod json;
pub mod levels;
pub mod transcode;
