//! Write-ahead log of the filesystem store: what makes a stored object durable with one cheap flush.
//!
//! Making a new file durable costs a file-system journal commit (inode, blocks, directory entry) on
//! top of the data write. An append to a segment file whose blocks are already allocated costs only
//! the data write: `fdatasync` of an overwrite inside the file's size has no metadata to commit. So a
//! put appends the object (key, bytes, CRC32C) to the current segment, flushes that alone, and only
//! then renames the spool file into place, unflushed. Whatever is waiting when a flush starts shares
//! it (group commit), so concurrent associations do not queue for one flush each. Deletions append a
//! tombstone the same way before the file is unlinked.
//!
//! A full segment is retired to the checkpointer thread, which flushes the whole file system
//! (`syncfs`: every renamed file, its directories and every unlink are now durable), records the
//! segment's sequence number in `checkpoint`, and returns the segment for reuse. At start, records
//! of the segments after the checkpoint are replayed in order (objects rewritten from the log,
//! tombstones unlinked), so an acknowledged object survives a crash or a power loss even if its file
//! and directory entry did not. A record is valid only if its CRC and its segment sequence match,
//! which ends replay at a torn write and ignores what a reused segment held before.
//!
//! Objects larger than [`MAX_RECORD_DATA`] bypass the log (`FsStore` flushes them itself): for them
//! the data write dominates and writing it twice would cost more than the commit saves.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

/// Size of one segment file, allocated (zero-filled) once and reused.
const SEGMENT_SIZE: u64 = 16 << 20;
/// The largest object that goes through the log.
pub const MAX_RECORD_DATA: u64 = 8 << 20;
/// Requests sharing one flush at most.
const MAX_BATCH: usize = 64;

const MAGIC: u32 = 0x4C57_4744; // "DGWL"
const HEADER_LEN: usize = 4 + 8 + 1 + 2 + 8 + 4;
const PUT: u8 = 1;
const TOMBSTONE: u8 = 2;

/// One record's header: magic, segment sequence, kind, key length, data length, CRC32C of the
/// header fields before it plus key and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    seq: u64,
    kind: u8,
    key_len: u16,
    data_len: u64,
    crc: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12] = self.kind;
        b[13..15].copy_from_slice(&self.key_len.to_le_bytes());
        b[15..23].copy_from_slice(&self.data_len.to_le_bytes());
        b[23..27].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Option<Header> {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) != MAGIC {
            return None;
        }
        Some(Header {
            seq: u64_at(4),
            kind: b[12],
            key_len: u16::from_le_bytes([b[13], b[14]]),
            data_len: u64_at(15),
            crc: u32::from_le_bytes(b[23..27].try_into().expect("4 bytes")),
        })
    }

    fn len(&self) -> u64 {
        HEADER_LEN as u64 + self.key_len as u64 + self.data_len
    }
}

fn digest(seq: u64, kind: u8, key: &[u8], data_len: u64) -> crc_fast::Digest {
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    d.update(&seq.to_le_bytes());
    d.update(&[kind]);
    d.update(&(key.len() as u16).to_le_bytes());
    d.update(&data_len.to_le_bytes());
    d.update(key);
    d
}

struct Segment {
    file: File,
    path: PathBuf,
    seq: u64,
    offset: u64,
}

/// What a put or a deletion does once its record is durable.
enum Op {
    Put { src: PathBuf, dest: PathBuf },
    Delete { dest: PathBuf },
}

struct Request {
    key: String,
    op: Op,
    reply: oneshot::Sender<io::Result<()>>,
}

#[derive(Clone)]
pub struct Wal {
    tx: mpsc::Sender<Request>,
}

impl Wal {
    /// Opens the log in `dir` for the store rooted at `root`: replays what the last run left
    /// unchecked (blocking; before anything else reads the store) and starts the log threads.
    pub fn open(dir: &Path, root: &Path) -> io::Result<Wal> {
        std::fs::create_dir_all(dir)?;
        let checkpointed = read_checkpoint(dir)?;
        let (segments, last_seq) = replay(dir, root, checkpointed)?;
        if last_seq > checkpointed {
            syncfs(root)?;
            write_checkpoint(dir, last_seq)?;
        }
        let free = Arc::new(Mutex::new(segments));
        let first = take_segment(dir, &free, last_seq + 1)?;
        let (retire_tx, retire_rx) = std_mpsc::channel::<Segment>();
        {
            let (dir, root, free) = (dir.to_path_buf(), root.to_path_buf(), free.clone());
            std::thread::Builder::new()
                .name("wal-checkpoint".into())
                .spawn(move || checkpointer(&dir, &root, &free, retire_rx))?;
        }
        let (tx, rx) = mpsc::channel(1024);
        let dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer(&dir, first, &free, rx, retire_tx))?;
        Ok(Wal { tx })
    }

    /// Logs the content of `src` under `key`, then renames `src` to `dest`.
    pub async fn put(&self, key: &str, src: &Path, dest: &Path) -> io::Result<()> {
        let op = Op::Put {
            src: src.to_path_buf(),
            dest: dest.to_path_buf(),
        };
        self.send(key, op).await
    }

    /// Logs a tombstone for `key`, then unlinks `dest`.
    pub async fn delete(&self, key: &str, dest: &Path) -> io::Result<()> {
        let op = Op::Delete {
            dest: dest.to_path_buf(),
        };
        self.send(key, op).await
    }

    async fn send(&self, key: &str, op: Op) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        let stopped = || io::Error::other("write-ahead log stopped");
        self.tx
            .send(Request {
                key: key.to_string(),
                op,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

fn segment_paths(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("seg-") && !name.ends_with(".new") {
            paths.push(path);
        }
    }
    Ok(paths)
}

/// A new segment file, zero-filled so that its blocks are allocated and written (an overwrite of
/// unwritten extents would need a metadata commit again), made durable under its final name.
fn create_segment(dir: &Path) -> io::Result<(File, PathBuf)> {
    let name = format!("seg-{:016x}", rand_id());
    let tmp = dir.join(format!("{name}.new"));
    let path = dir.join(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let zeros = vec![0u8; 1 << 20];
    for i in 0..SEGMENT_SIZE / zeros.len() as u64 {
        file.write_all_at(&zeros, i * zeros.len() as u64)?;
    }
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    Ok((file, path))
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// A free segment (or a new one) as the current segment with sequence `seq`.
fn take_segment(dir: &Path, free: &Mutex<Vec<(File, PathBuf)>>, seq: u64) -> io::Result<Segment> {
    let reused = free.lock().expect("free segments lock").pop();
    let (file, path) = match reused {
        Some(s) => s,
        None => create_segment(dir)?,
    };
    Ok(Segment {
        file,
        path,
        seq,
        offset: 0,
    })
}

fn read_checkpoint(dir: &Path) -> io::Result<u64> {
    match std::fs::read_to_string(dir.join("checkpoint")) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("checkpoint: {e}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

fn write_checkpoint(dir: &Path, seq: u64) -> io::Result<()> {
    let tmp = dir.join("checkpoint.new");
    let file = File::create(&tmp)?;
    file.write_all_at(seq.to_string().as_bytes(), 0)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join("checkpoint"))?;
    File::open(dir)?.sync_all()
}

fn syncfs(root: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = File::open(root)?;
    // SAFETY: plain syscall on a descriptor owned by `dir` for the duration of the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The valid record at `offset` of a segment whose sequence is `seq` (any sequence when None),
/// with its key and data.
fn read_record(file: &File, offset: u64, seq: Option<u64>) -> Option<(Header, String, Vec<u8>)> {
    let mut raw = [0u8; HEADER_LEN];
    file.read_exact_at(&mut raw, offset).ok()?;
    let h = Header::decode(&raw)?;
    if seq.is_some_and(|s| s != h.seq)
        || !matches!(h.kind, PUT | TOMBSTONE)
        || offset + h.len() > SEGMENT_SIZE
        || h.data_len > MAX_RECORD_DATA
    {
        return None;
    }
    let mut key = vec![0u8; h.key_len as usize];
    file.read_exact_at(&mut key, offset + HEADER_LEN as u64)
        .ok()?;
    let mut data = vec![0u8; h.data_len as usize];
    file.read_exact_at(&mut data, offset + HEADER_LEN as u64 + h.key_len as u64)
        .ok()?;
    let mut d = digest(h.seq, h.kind, &key, h.data_len);
    d.update(&data);
    if d.finalize() as u32 != h.crc {
        return None;
    }
    Some((h, String::from_utf8(key).ok()?, data))
}

/// Applies the records of every segment after `checkpointed`, in sequence order. Returns all
/// segments (free for reuse once the caller has synced and checkpointed) and the highest sequence.
fn replay(dir: &Path, root: &Path, checkpointed: u64) -> io::Result<(Vec<(File, PathBuf)>, u64)> {
    let mut segments = Vec::new();
    for path in segment_paths(dir)? {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let seq = read_record(&file, 0, None).map(|(h, _, _)| h.seq);
        segments.push((seq, file, path));
    }
    segments.sort_by_key(|(seq, _, _)| *seq);
    let mut last = checkpointed;
    for (seq, file, _) in &segments {
        let Some(seq) = *seq else { continue };
        last = last.max(seq);
        if seq <= checkpointed {
            continue;
        }
        let mut offset = 0;
        let mut applied = 0usize;
        while let Some((h, key, data)) = read_record(file, offset, Some(seq)) {
            let dest = super::fs::key_path(root, &key)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if h.kind == PUT {
                rewrite(&dest, &data)?;
            } else {
                match std::fs::remove_file(&dest) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            offset += h.len();
            applied += 1;
        }
        tracing::info!(segment = seq, records = applied, "write-ahead log replayed");
    }
    Ok((segments.into_iter().map(|(_, f, p)| (f, p)).collect(), last))
}

/// Writes `data` to `dest` from the log (replay): a fresh file renamed over whatever is there.
fn rewrite(dest: &Path, data: &[u8]) -> io::Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = dest.with_extension("replay");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, dest)
}

/// Appends one record for `r` at the current segment's offset; the offset moves on only once the
/// whole record is written.
fn append(seg: &mut Segment, r: &Request) -> io::Result<()> {
    let key = r.key.as_bytes();
    let (kind, mut src) = match &r.op {
        Op::Put { src, .. } => (PUT, Some(File::open(src)?)),
        Op::Delete { .. } => (TOMBSTONE, None),
    };
    let data_len = match &src {
        Some(f) => f.metadata()?.len(),
        None => 0,
    };
    let mut d = digest(seg.seq, kind, key, data_len);
    let start = seg.offset;
    let mut at = start + HEADER_LEN as u64;
    seg.file.write_all_at(key, at)?;
    at += key.len() as u64;
    if let Some(f) = src.as_mut() {
        let mut buf = vec![0u8; (data_len as usize).clamp(1, 1 << 20)];
        let mut left = data_len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = f.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            d.update(&buf[..n]);
            seg.file.write_all_at(&buf[..n], at)?;
            at += n as u64;
            left -= n as u64;
        }
    }
    let header = Header {
        seq: seg.seq,
        kind,
        key_len: key.len() as u16,
        data_len,
        crc: d.finalize() as u32,
    };
    seg.file.write_all_at(&header.encode(), start)?;
    seg.offset = at;
    Ok(())
}

fn record_len(r: &Request) -> io::Result<u64> {
    let data_len = match &r.op {
        Op::Put { src, .. } => std::fs::metadata(src)?.len(),
        Op::Delete { .. } => 0,
    };
    if data_len > MAX_RECORD_DATA || r.key.len() > u16::MAX as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "record too large for the write-ahead log",
        ));
    }
    Ok(HEADER_LEN as u64 + r.key.len() as u64 + data_len)
}

/// What a request does once its record is durable.
fn apply(op: &Op) -> io::Result<()> {
    match op {
        Op::Put { src, dest } => {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(src, dest)
        }
        Op::Delete { dest } => match std::fs::remove_file(dest) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// The log's writer thread: appends each batch of waiting requests, flushes once, applies them, and
/// answers. Full segments go to the checkpointer after their batch is applied.
fn writer(
    dir: &Path,
    mut current: Segment,
    free: &Mutex<Vec<(File, PathBuf)>>,
    mut rx: mpsc::Receiver<Request>,
    retire: std_mpsc::Sender<Segment>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut retired: Vec<Segment> = Vec::new();
        let mut written: Vec<io::Result<()>> = Vec::with_capacity(batch.len());
        for r in &batch {
            let result = record_len(r).and_then(|len| {
                if current.offset + len > SEGMENT_SIZE {
                    let next = take_segment(dir, free, current.seq + 1)?;
                    retired.push(std::mem::replace(&mut current, next));
                }
                append(&mut current, r)
            });
            written.push(result);
        }
        let flushed = retired
            .iter()
            .chain(std::iter::once(&current))
            .try_for_each(|s| s.file.sync_data());
        for (r, result) in batch.into_iter().zip(written) {
            let result = match (&flushed, result) {
                (Err(e), _) => Err(io::Error::new(e.kind(), format!("log flush: {e}"))),
                (Ok(()), Ok(())) => apply(&r.op),
                (Ok(()), Err(e)) => Err(e),
            };
            let _ = r.reply.send(result);
        }
        for s in retired {
            let _ = retire.send(s);
        }
    }
}

/// The checkpointer thread: makes everything a retired segment's records did durable, records it,
/// and returns the segment for reuse; keeps one spare segment allocated ahead.
fn checkpointer(
    dir: &Path,
    root: &Path,
    free: &Mutex<Vec<(File, PathBuf)>>,
    retired: std_mpsc::Receiver<Segment>,
) {
    while let Ok(seg) = retired.recv() {
        let done = syncfs(root).and_then(|()| write_checkpoint(dir, seg.seq));
        match done {
            Ok(()) => free
                .lock()
                .expect("free segments lock")
                .push((seg.file, seg.path)),
            // The segment stays out of use: its records are replayed at the next start.
            Err(e) => {
                tracing::error!(error = %e, segment = seg.seq, "write-ahead log checkpoint failed")
            }
        }
        if free.lock().expect("free segments lock").is_empty() {
            match create_segment(dir) {
                Ok(s) => free.lock().expect("free segments lock").push(s),
                Err(e) => tracing::error!(error = %e, "cannot allocate a write-ahead log segment"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: &str, op: Op) -> (Request, oneshot::Receiver<io::Result<()>>) {
        let (reply, rx) = oneshot::channel();
        let key = key.to_string();
        (Request { key, op, reply }, rx)
    }

    #[test]
    fn header_round_trips_and_rejects_other_bytes() {
        let h = Header {
            seq: 7,
            kind: PUT,
            key_len: 12,
            data_len: 1234,
            crc: 0xDEAD_BEEF,
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
        assert_eq!(Header::decode(&[0u8; HEADER_LEN]), None);
    }

    #[test]
    fn replay_restores_logged_objects_and_stops_at_a_torn_record() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, root) = (tmp.path().join("wal"), tmp.path().join("objects"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        let free = Mutex::new(Vec::new());
        let mut seg = take_segment(&dir, &free, 1).unwrap();
        let spool = tmp.path().join("spool");
        let mut offsets = Vec::new();
        for (key, body) in [("a/b/1.dcm", &b"first"[..]), ("a/b/2.dcm", b"second")] {
            std::fs::write(&spool, body).unwrap();
            let dest = root.join(key);
            let (r, _) = req(
                key,
                Op::Put {
                    src: spool.clone(),
                    dest,
                },
            );
            append(&mut seg, &r).unwrap();
            offsets.push(seg.offset);
        }
        let (r, _) = req(
            "a/b/1.dcm",
            Op::Delete {
                dest: root.join("a/b/1.dcm"),
            },
        );
        append(&mut seg, &r).unwrap();
        // A torn third put: its header never made it to disk.
        std::fs::write(&spool, b"third").unwrap();
        let (r, _) = req(
            "a/b/3.dcm",
            Op::Put {
                src: spool.clone(),
                dest: root.join("a/b/3.dcm"),
            },
        );
        append(&mut seg, &r).unwrap();
        seg.file
            .write_all_at(&[0u8; HEADER_LEN], seg.offset - HEADER_LEN as u64 - 9 - 5)
            .unwrap();
        seg.file.sync_all().unwrap();

        // Nothing was renamed into place (a crash right after the log flush): replay restores 2.
        let (segments, last) = replay(&dir, &root, 0).unwrap();
        assert_eq!((segments.len(), last), (1, 1));
        assert!(
            !root.join("a/b/1.dcm").exists(),
            "tombstone applied after the put"
        );
        assert_eq!(std::fs::read(root.join("a/b/2.dcm")).unwrap(), b"second");
        assert!(!root.join("a/b/3.dcm").exists(), "torn record ignored");

        // Once checkpointed, the segment is not replayed again, and a reuse with a new sequence
        // ignores the old records behind the new ones.
        std::fs::remove_file(root.join("a/b/2.dcm")).unwrap();
        replay(&dir, &root, 1).unwrap();
        assert!(!root.join("a/b/2.dcm").exists());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn put_is_readable_at_once_and_survives_a_lost_rename() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, root) = (tmp.path().join("wal"), tmp.path().join("objects"));
        std::fs::create_dir_all(&root).unwrap();
        let wal = Wal::open(&dir, &root).unwrap();
        let src = tmp.path().join("spool");
        std::fs::write(&src, b"payload").unwrap();
        let dest = root.join("1/2/3.dcm");
        wal.put("1/2/3.dcm", &src, &dest).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"payload");
        assert!(!src.exists());
        // Simulate a crash that lost the unflushed rename: the next open restores the object.
        std::fs::remove_file(&dest).unwrap();
        drop(wal);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let _again = Wal::open(&dir, &root).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"payload");
    }
}
