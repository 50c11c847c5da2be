#![no_main]
//! See `dicom_gateway::fuzzing::pdu_reader`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dicom_gateway::fuzzing::pdu_reader(data));
