//! A ZIP archive written as a stream (PKWARE APPNOTE 6.3): entries stored uncompressed, each followed
//! by a data descriptor carrying its CRC-32, ZIP64 records where sizes or offsets pass 4 GiB.
//!
//! Every entry's size is known before the archive starts (the index keeps each object's size), and
//! stored entries are not compressed, so the whole layout, and the archive's length, is fixed up front;
//! only the CRC-32 of each entry is learnt while its bytes stream past. The caller sends
//! [`Archive::local_header`], the entry's bytes, [`Archive::data_descriptor`] for each entry in turn,
//! then [`Archive::central_directory`]. DICOM objects gain little from deflate (pixel data is most of
//! them, often already compressed), and stored entries keep the download at disk speed.

use std::time::{SystemTime, UNIX_EPOCH};

const LOCAL_HEADER: u32 = 0x0403_4b50;
const DATA_DESCRIPTOR: u32 = 0x0807_4b50;
const CENTRAL_HEADER: u32 = 0x0201_4b50;
const ZIP64_END: u32 = 0x0606_4b50;
const ZIP64_LOCATOR: u32 = 0x0706_4b50;
const END: u32 = 0x0605_4b50;
/// Bit 3: sizes and CRC follow the data; bit 11: names are UTF-8.
const FLAGS: u16 = 0x0008 | 0x0800;
const VERSION_ZIP64: u16 = 45;
const VERSION_PLAIN: u16 = 20;
const MAX32: u64 = 0xFFFF_FFFF;

/// One file of the archive: its name inside it and its exact size.
pub struct Entry {
    pub name: String,
    pub size: u64,
}

struct Planned {
    name: String,
    size: u64,
    /// Where its local header starts.
    offset: u64,
    /// Its size does not fit 32 bits: ZIP64 extra field in the local header, 64-bit descriptor.
    large: bool,
}

pub struct Archive {
    entries: Vec<Planned>,
    central_offset: u64,
    central_len: u64,
    time: u16,
    date: u16,
}

impl Archive {
    /// Lays out `entries` (dated `modified`).
    pub fn plan(entries: Vec<Entry>, modified: SystemTime) -> Archive {
        let mut offset = 0u64;
        let entries: Vec<Planned> = entries
            .into_iter()
            .map(|e| {
                let large = e.size >= MAX32;
                let planned = Planned {
                    offset,
                    large,
                    size: e.size,
                    name: e.name,
                };
                offset += local_header_len(&planned) + planned.size + descriptor_len(&planned);
                planned
            })
            .collect();
        let central_len = entries.iter().map(central_header_len).sum();
        let (time, date) = dos_time(modified);
        Archive {
            entries,
            central_offset: offset,
            central_len,
            time,
            date,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The archive's length in bytes.
    pub fn total_len(&self) -> u64 {
        self.central_offset + self.central_len + self.end_len()
    }

    pub fn size(&self, index: usize) -> u64 {
        self.entries[index].size
    }

    pub fn local_header(&self, index: usize) -> Vec<u8> {
        let e = &self.entries[index];
        let mut b = Vec::with_capacity(local_header_len(e) as usize);
        put32(&mut b, LOCAL_HEADER);
        put16(
            &mut b,
            if e.large {
                VERSION_ZIP64
            } else {
                VERSION_PLAIN
            },
        );
        put16(&mut b, FLAGS);
        put16(&mut b, 0); // stored
        put16(&mut b, self.time);
        put16(&mut b, self.date);
        put32(&mut b, 0); // CRC-32, sizes: in the data descriptor
        let size_field = if e.large { MAX32 as u32 } else { 0 };
        put32(&mut b, size_field);
        put32(&mut b, size_field);
        put16(&mut b, e.name.len() as u16);
        put16(&mut b, if e.large { 20 } else { 0 });
        b.extend_from_slice(e.name.as_bytes());
        if e.large {
            // ZIP64 extended information: sizes zero here, in the descriptor (APPNOTE 4.3.9.2).
            put16(&mut b, 0x0001);
            put16(&mut b, 16);
            put64(&mut b, 0);
            put64(&mut b, 0);
        }
        b
    }

    pub fn data_descriptor(&self, index: usize, crc: u32) -> Vec<u8> {
        let e = &self.entries[index];
        let mut b = Vec::with_capacity(descriptor_len(e) as usize);
        put32(&mut b, DATA_DESCRIPTOR);
        put32(&mut b, crc);
        if e.large {
            put64(&mut b, e.size);
            put64(&mut b, e.size);
        } else {
            put32(&mut b, e.size as u32);
            put32(&mut b, e.size as u32);
        }
        b
    }

    /// The central directory and end records, once every entry has been sent (`crcs` in entry order).
    pub fn central_directory(&self, crcs: &[u32]) -> Vec<u8> {
        assert_eq!(crcs.len(), self.entries.len());
        let mut b = Vec::with_capacity((self.central_len + self.end_len()) as usize);
        for (e, crc) in self.entries.iter().zip(crcs) {
            let extra = zip64_extra(e);
            put32(&mut b, CENTRAL_HEADER);
            put16(&mut b, (3 << 8) | VERSION_ZIP64); // made by: Unix
            put16(
                &mut b,
                if extra.is_empty() {
                    VERSION_PLAIN
                } else {
                    VERSION_ZIP64
                },
            );
            put16(&mut b, FLAGS);
            put16(&mut b, 0);
            put16(&mut b, self.time);
            put16(&mut b, self.date);
            put32(&mut b, *crc);
            put32(&mut b, e.size.min(MAX32) as u32);
            put32(&mut b, e.size.min(MAX32) as u32);
            put16(&mut b, e.name.len() as u16);
            put16(&mut b, extra.len() as u16);
            put16(&mut b, 0); // comment
            put16(&mut b, 0); // disk
            put16(&mut b, 0); // internal attributes
            put32(&mut b, 0o100644 << 16); // external: a regular file, rw-r--r--
            put32(&mut b, e.offset.min(MAX32) as u32);
            b.extend_from_slice(e.name.as_bytes());
            b.extend_from_slice(&extra);
        }
        let count = self.entries.len() as u64;
        if self.needs_zip64_end() {
            let zip64_end_offset = self.central_offset + self.central_len;
            put32(&mut b, ZIP64_END);
            put64(&mut b, 44); // size of the rest of this record
            put16(&mut b, (3 << 8) | VERSION_ZIP64);
            put16(&mut b, VERSION_ZIP64);
            put32(&mut b, 0);
            put32(&mut b, 0);
            put64(&mut b, count);
            put64(&mut b, count);
            put64(&mut b, self.central_len);
            put64(&mut b, self.central_offset);
            put32(&mut b, ZIP64_LOCATOR);
            put32(&mut b, 0);
            put64(&mut b, zip64_end_offset);
            put32(&mut b, 1);
        }
        put32(&mut b, END);
        put16(&mut b, 0);
        put16(&mut b, 0);
        put16(&mut b, count.min(0xFFFF) as u16);
        put16(&mut b, count.min(0xFFFF) as u16);
        put32(&mut b, self.central_len.min(MAX32) as u32);
        put32(&mut b, self.central_offset.min(MAX32) as u32);
        put16(&mut b, 0);
        b
    }

    fn needs_zip64_end(&self) -> bool {
        self.entries.len() >= 0xFFFF || self.central_offset >= MAX32 || self.central_len >= MAX32
    }

    fn end_len(&self) -> u64 {
        22 + if self.needs_zip64_end() { 56 + 20 } else { 0 }
    }
}

fn local_header_len(e: &Planned) -> u64 {
    30 + e.name.len() as u64 + if e.large { 20 } else { 0 }
}

fn descriptor_len(e: &Planned) -> u64 {
    if e.large {
        24
    } else {
        16
    }
}

/// The central directory's ZIP64 extra field: the 64-bit values whose 32-bit fields overflowed, in
/// the order APPNOTE 4.5.3 gives (sizes, then offset).
fn zip64_extra(e: &Planned) -> Vec<u8> {
    let mut values = Vec::new();
    if e.size >= MAX32 {
        values.extend([e.size, e.size]);
    }
    if e.offset >= MAX32 {
        values.push(e.offset);
    }
    if values.is_empty() {
        return Vec::new();
    }
    let mut b = Vec::with_capacity(4 + 8 * values.len());
    put16(&mut b, 0x0001);
    put16(&mut b, 8 * values.len() as u16);
    for v in values {
        put64(&mut b, v);
    }
    b
}

fn central_header_len(e: &Planned) -> u64 {
    46 + e.name.len() as u64 + zip64_extra(e).len() as u64
}

/// MS-DOS time and date fields (UTC; two-second resolution, years 1980-2107).
fn dos_time(t: SystemTime) -> (u16, u16) {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    if year < 1980 {
        return (0, (1 << 5) | 1);
    }
    let year = year.min(2107);
    let s = secs % 86_400;
    let time = ((s / 3600) << 11) | (((s % 3600) / 60) << 5) | ((s % 60) / 2);
    let date = (((year - 1980) as u64) << 9) | ((month as u64) << 5) | day as u64;
    (time as u16, date as u16)
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift the epoch to 0000-03-01, so that leap days fall at the end of each 400-year era's years.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn put16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn build(files: &[(&str, &[u8])]) -> Vec<u8> {
        let archive = Archive::plan(
            files
                .iter()
                .map(|(name, data)| Entry {
                    name: name.to_string(),
                    size: data.len() as u64,
                })
                .collect(),
            UNIX_EPOCH + Duration::from_secs(1_765_000_000),
        );
        let mut out = Vec::new();
        let mut crcs = Vec::new();
        for (i, (_, data)) in files.iter().enumerate() {
            out.extend(archive.local_header(i));
            out.extend_from_slice(data);
            let crc = crc32(data);
            crcs.push(crc);
            out.extend(archive.data_descriptor(i, crc));
        }
        out.extend(archive.central_directory(&crcs));
        assert_eq!(out.len() as u64, archive.total_len());
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32IsoHdlc, data) as u32
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn the_planned_length_is_the_written_length_and_the_end_record_finds_the_directory() {
        let zip = build(&[
            ("a/1.dcm", b"hello"),
            ("a/2.dcm", b""),
            ("b/3.dcm", &[7; 1000]),
        ]);
        let end = zip.len() - 22;
        assert_eq!(u32_at(&zip, end), END);
        assert_eq!(u16_at(&zip, end + 10), 3);
        let central_len = u32_at(&zip, end + 12) as usize;
        let central_offset = u32_at(&zip, end + 16) as usize;
        assert_eq!(central_offset + central_len, end);
        // Each central header points at its local header, with the CRC the data has.
        let mut at = central_offset;
        for (name, data) in [
            ("a/1.dcm", &b"hello"[..]),
            ("a/2.dcm", b""),
            ("b/3.dcm", &[7; 1000]),
        ] {
            assert_eq!(u32_at(&zip, at), CENTRAL_HEADER);
            assert_eq!(u32_at(&zip, at + 16), crc32(data));
            assert_eq!(u32_at(&zip, at + 24) as usize, data.len());
            let name_len = u16_at(&zip, at + 28) as usize;
            assert_eq!(&zip[at + 46..at + 46 + name_len], name.as_bytes());
            let local = u32_at(&zip, at + 42) as usize;
            assert_eq!(u32_at(&zip, local), LOCAL_HEADER);
            assert_eq!(&zip[local + 30..local + 30 + name_len], name.as_bytes());
            at += 46 + name_len;
        }
    }

    #[test]
    fn entries_and_offsets_past_4_gib_get_zip64_records() {
        let archive = Archive::plan(
            vec![
                Entry {
                    name: "big.dcm".into(),
                    size: 5 << 30,
                },
                Entry {
                    name: "after.dcm".into(),
                    size: 10,
                },
            ],
            UNIX_EPOCH,
        );
        assert_eq!(archive.local_header(0).len(), 30 + 7 + 20);
        assert_eq!(archive.data_descriptor(0, 1).len(), 24);
        // The second entry is small but lies past 4 GiB: 32-bit descriptor, 64-bit offset in the directory.
        assert_eq!(archive.data_descriptor(1, 1).len(), 16);
        let directory = archive.central_directory(&[1, 2]);
        let end = directory.len() - 22;
        assert_eq!(u32_at(&directory, end), END);
        assert_eq!(u32_at(&directory, end + 16), MAX32 as u32);
        assert_eq!(u32_at(&directory, end - 20), ZIP64_LOCATOR);
        assert_eq!(u32_at(&directory, end - 20 - 56), ZIP64_END);
        assert_eq!(
            archive.total_len(),
            (30 + 7 + 20) + (5 << 30) + 24 + (30 + 9) + 10 + 16 + directory.len() as u64
        );
    }

    #[test]
    fn dos_dates_follow_the_calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        // 2025-12-06 05:46:40 UTC
        let (time, date) = dos_time(UNIX_EPOCH + Duration::from_secs(1_765_000_000));
        assert_eq!(date, ((2025 - 1980) << 9) | (12 << 5) | 6);
        assert_eq!(time, (5 << 11) | (46 << 5) | 20);
    }
}
