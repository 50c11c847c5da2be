#![no_main]
//! See `dicom_gateway::fuzzing::deflated_dataset`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dicom_gateway::fuzzing::deflated_dataset(data));
