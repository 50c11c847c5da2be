//! The early-header forecast: while a large object still arrives, its header is read from its
//! first bytes (when they hold all of it), its SOP Instance UID looked up, and, with native pixel
//! data, its index record built for the frame layout the header announces. [`super::Ingestor::ingest`]
//! then only checks the forecast against the walk of the whole object after the last byte.

use std::sync::Arc;

use super::extract::{build_record, geometry};
use super::parse::{decode_header, read_meta, Header};
use super::{unique_suffix, Ingestor};
use crate::config::DuplicatePolicy;
use crate::dicom::{self, Layout};
use crate::storage::instance_key;

/// The header of an object being received, read from its first bytes ([`Ingestor::read_header_early`]).
pub struct EarlyHeader(pub(super) tokio::task::JoinHandle<Option<ReadEarly>>);

pub(super) struct ReadEarly {
    pub(super) header: Header,
    /// Whether its SOP Instance UID was indexed already (looked up when the first copy is kept).
    pub(super) indexed: Option<bool>,
    /// The suffix of its storage key, chosen early for the forecast record.
    pub(super) key_suffix: String,
    pub(super) forecast: Option<Forecast>,
}

/// The index record of an object with native pixel data, built from its header while the pixel data
/// arrives, for the frame layout the header announces. Used if the walk of the whole object finds
/// that layout (the record depends on nothing else but the object's size).
pub(super) struct Forecast {
    pub(super) layout: Layout,
    pub(super) record: crate::index::InstanceRecord,
}

impl Ingestor {
    /// Starts reading the header of an object from its first bytes while the rest still arrives
    /// (blocking task), and looks up its SOP Instance UID when the policy keeps the first copy:
    /// work that [`Ingestor::ingest`] then no longer does after the last byte.
    pub fn read_header_early(&self, prefix: Arc<Vec<u8>>) -> EarlyHeader {
        let (index, keep_first) = (
            self.index.clone(),
            self.on_duplicate == DuplicatePolicy::KeepFirst,
        );
        EarlyHeader(tokio::task::spawn_blocking(move || {
            let (header, pixel_data) = header_from_prefix(&prefix)?;
            let key_suffix = unique_suffix();
            let forecast = forecast(&header, pixel_data, &key_suffix);
            let indexed = keep_first
                .then(|| index.instance_exists_blocking(&header.uids.sop_instance_uid))
                .transpose()
                .ok()?;
            Some(ReadEarly {
                header,
                indexed,
                key_suffix,
                forecast,
            })
        }))
    }
}

/// Reads the header from the first bytes of an object still arriving, when they hold all of it
/// (up to the pixel data element's header, every length checked against those bytes). `None` when
/// they do not, or when anything is wrong: the parse of the whole object then decides.
/// Also returns the pixel data element's header.
pub(super) fn header_from_prefix(prefix: &[u8]) -> Option<(Header, dicom::PixelDataStart)> {
    let mut reader = std::io::Cursor::new(prefix);
    let (dataset_start, ts_uid) = read_meta(&mut reader).ok()?;
    let pixel_data = dicom::pixel_data_start(&mut reader, dataset_start, &ts_uid)?;
    let header = decode_header(&mut reader, dataset_start, ts_uid).ok()?;
    Some((header, pixel_data))
}

/// The record of an object with native pixel data, for the layout its header announces (see
/// [`Forecast`]).
pub(super) fn forecast(
    header: &Header,
    pixel_data: dicom::PixelDataStart,
    key_suffix: &str,
) -> Option<Forecast> {
    let layout =
        dicom::native_layout_forecast(&header.ts_uid, pixel_data.value?, &geometry(&header.obj))?;
    let uids = &header.uids;
    let key = instance_key(
        &uids.study_uid,
        &uids.series_uid,
        &uids.sop_instance_uid,
        key_suffix,
    );
    let record = build_record(
        &header.obj,
        uids,
        &layout,
        &header.ts_uid,
        &key,
        0,
        &header.bulk,
    );
    Some(Forecast { layout, record })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::extract::ObjectUids;
    use crate::ingest::parse::{complete, parse};
    use crate::ingest::spool;

    /// Reading the header early from the first bytes, then completing the parse over the whole
    /// object, gives the record (or the refusal) that parsing the whole object at once gives.
    #[test]
    fn early_header_parse_agrees_with_the_whole_object_parse() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        let (mut early_reads, mut forecasts) = (0, 0);
        for dir in ["pydicom", "pydicom-charsets", "derived"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_none_or(|e| e != "dcm") {
                    continue;
                }
                let bytes = std::fs::read(&path).unwrap();
                let size = bytes.len() as u64;
                let key = |u: &ObjectUids| {
                    instance_key(&u.study_uid, &u.series_uid, &u.sop_instance_uid, "key")
                };
                let whole = parse(&mut std::io::Cursor::new(&bytes), size, key);
                for n in [spool::BUFFER, 2048] {
                    let prefix = &bytes[..n.min(bytes.len())];
                    let Some((header, pixel_data)) = header_from_prefix(prefix) else {
                        continue;
                    };
                    early_reads += 1;
                    let forecast = forecast(&header, pixel_data, "key");
                    forecasts += usize::from(forecast.is_some());
                    let key = |u: &ObjectUids| {
                        instance_key(&u.study_uid, &u.series_uid, &u.sop_instance_uid, "key")
                    };
                    let early = complete(
                        header,
                        &mut std::io::Cursor::new(&bytes),
                        size,
                        key,
                        forecast,
                    );
                    let name = path.display();
                    match (&whole, &early) {
                        (Ok(a), Ok(b)) => {
                            assert_eq!(
                                format!("{:?}", a.record),
                                format!("{:?}", b.record),
                                "{name}"
                            )
                        }
                        (Err(_), Err(_)) => {}
                        _ => panic!(
                            "{name}: whole {:?} vs early {:?}",
                            whole.is_ok(),
                            early.is_ok()
                        ),
                    }
                }
            }
        }
        assert!(early_reads > 40, "only {early_reads} headers read early");
        assert!(forecasts > 20, "only {forecasts} records forecast");
    }

    /// A forecast record is used only for the layout the walk of the whole object finds.
    #[test]
    fn a_forecast_for_another_layout_is_not_used() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/pydicom/CT_small.dcm");
        let bytes = std::fs::read(path).unwrap();
        let size = bytes.len() as u64;
        let (header, pixel_data) = header_from_prefix(&bytes[..8192]).unwrap();
        let mut fc = forecast(&header, pixel_data, "key").unwrap();
        assert!(matches!(fc.layout, Layout::Native { frames: 1, .. }));
        let key =
            |u: &ObjectUids| instance_key(&u.study_uid, &u.series_uid, &u.sop_instance_uid, "key");
        let used = |header, forecast| {
            let parsed = complete(
                header,
                &mut std::io::Cursor::new(&bytes),
                size,
                key,
                Some(forecast),
            )
            .unwrap();
            assert_eq!(parsed.record.instance.size_bytes, size);
            parsed.record.instance.metadata_json
        };
        fc.record.instance.metadata_json = "forecast".into();
        assert_eq!(used(header, fc), "forecast");

        let (header, pixel_data) = header_from_prefix(&bytes[..8192]).unwrap();
        let mut fc = forecast(&header, pixel_data, "key").unwrap();
        fc.record.instance.metadata_json = "forecast".into();
        fc.layout = Layout::Unavailable;
        assert!(used(header, fc).starts_with('{'));
    }
}
