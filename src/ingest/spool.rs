//! Spool files: an incoming object is written to disk as it arrives (PDV by PDV, or part by part),
//! so memory does not grow with object size. A spool file is deleted when dropped unless it was
//! moved into storage.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dicom_object::FileMetaTable;
use tempfile::TempPath;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::storage::{ObjectStore, StorageError};

pub struct SpoolWriter {
    /// Written at explicit offsets, so a buffer's write needs no exclusive hold on it.
    file: Arc<std::fs::File>,
    /// The blocking write of the previous full buffer: it runs while the next one fills (the
    /// network receive is not held up by the disk).
    writing: Option<JoinHandle<std::io::Result<()>>>,
    buf: Vec<u8>,
    path: TempPath,
    size: u64,
    write_back_early: bool,
    /// Whether the first full buffer is kept for [`SpoolWriter::take_prefix`].
    keep_prefix: bool,
    prefix: Option<Arc<Vec<u8>>>,
    /// The full buffers handed to the disk, while they add up to at most [`KEEP`] bytes.
    kept: Option<Vec<Arc<Vec<u8>>>>,
}

/// Bytes buffered before they are written: a small object is written once, with its last bytes, by
/// ingest's parse task ([`Spooled::write_tail`]).
pub const BUFFER: usize = 256 * 1024;

/// An object of up to this size stays in memory until ingest has parsed it: it is parsed while its
/// last buffers are still being written, and never read back from the file.
const KEEP: usize = 4 * BUFFER;

/// A complete spool file, except maybe its last bytes and the write of its last full buffer (not
/// yet durable: the store makes it so).
pub struct Spooled {
    path: TempPath,
    size: u64,
    file: Arc<std::fs::File>,
    /// The write of the last full buffer, if it may still run.
    writing: Option<JoinHandle<std::io::Result<()>>>,
    tail: Vec<u8>,
    tail_written: bool,
    /// All the bytes before `tail`, when they were kept (see [`KEEP`]).
    kept: Option<Vec<Arc<Vec<u8>>>>,
}

/// Spool files created ahead of need. Creating a file is a file-system journal operation that
/// takes 0.1-0.5 ms when the disk is busy with other objects' flushes; taken from here, it is off
/// every C-STORE's critical path. A background task keeps a few ready.
pub struct SpoolFiles {
    dir: PathBuf,
    ready: Mutex<Vec<(std::fs::File, TempPath)>>,
    wanted: Notify,
    /// Whether an object larger than [`BUFFER`] is flushed from its spool file by the store (see
    /// [`SpoolWriter::write`]).
    write_back_early: bool,
}

/// Spool files kept ready.
const READY: usize = 8;

impl SpoolFiles {
    /// Starts the refill task (needs a tokio runtime; it lives as long as the runtime, like the
    /// ingest path it serves). Files left ready at exit are removed by `clear_stale` at the next start.
    /// `write_back_early`: the store flushes objects larger than [`BUFFER`] from the spool file itself.
    pub fn new(dir: &Path, write_back_early: bool) -> std::io::Result<Arc<SpoolFiles>> {
        std::fs::create_dir_all(dir)?;
        let files = Arc::new(SpoolFiles {
            dir: dir.to_path_buf(),
            ready: Mutex::new(Vec::with_capacity(READY)),
            wanted: Notify::new(),
            write_back_early,
        });
        let pool = files.clone();
        tokio::spawn(async move {
            loop {
                let filler = pool.clone();
                let _ = tokio::task::spawn_blocking(move || filler.fill()).await;
                pool.wanted.notified().await;
            }
        });
        Ok(files)
    }

    fn create(dir: &Path) -> std::io::Result<(std::fs::File, TempPath)> {
        tempfile::Builder::new()
            .prefix("in-")
            .suffix(".part")
            .tempfile_in(dir)
            .map(|f| f.into_parts())
    }

    fn fill(&self) {
        while self.ready.lock().expect("spool pool lock").len() < READY {
            match Self::create(&self.dir) {
                Ok(f) => self.ready.lock().expect("spool pool lock").push(f),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create spool files ahead");
                    return;
                }
            }
        }
    }

    /// A ready spool file, or a new one when none is left.
    async fn take(&self) -> std::io::Result<(std::fs::File, TempPath)> {
        let (ready, left) = {
            let mut ready = self.ready.lock().expect("spool pool lock");
            (ready.pop(), ready.len())
        };
        // Refilled in batches: one wake-up of the refill task per few objects, not per object.
        if left <= READY / 2 {
            self.wanted.notify_one();
        }
        match ready {
            Some(f) => Ok(f),
            None => {
                let dir = self.dir.clone();
                tokio::task::spawn_blocking(move || Self::create(&dir))
                    .await
                    .expect("spool creation task panicked")
            }
        }
    }
}

impl SpoolWriter {
    /// An empty spool file, for a stream that is already Part-10 and already stored (reconcile,
    /// reindex): it is only parsed, so its data is never written back early.
    pub async fn create_raw(files: &SpoolFiles) -> std::io::Result<SpoolWriter> {
        SpoolWriter::create(files, false, false).await
    }

    /// An empty spool file for an object that arrives whole as Part-10 (a STOW-RS part): written
    /// like a C-STORE's data set, its first [`BUFFER`] bytes offered by [`SpoolWriter::take_prefix`].
    pub async fn create_received(files: &SpoolFiles) -> std::io::Result<SpoolWriter> {
        SpoolWriter::create(files, files.write_back_early, true).await
    }

    async fn create(
        files: &SpoolFiles,
        write_back_early: bool,
        keep_prefix: bool,
    ) -> std::io::Result<SpoolWriter> {
        let (file, path) = files.take().await?;
        Ok(SpoolWriter {
            file: Arc::new(file),
            writing: None,
            buf: Vec::with_capacity(BUFFER),
            path,
            size: 0,
            write_back_early,
            keep_prefix,
            prefix: None,
            kept: Some(Vec::new()),
        })
    }

    /// A spool file starting with the Part-10 preamble and `meta`, ready for the data set bytes. Its
    /// first [`BUFFER`] bytes are offered by [`SpoolWriter::take_prefix`] once more follow.
    pub async fn create_part10(
        files: &SpoolFiles,
        meta: &FileMetaTable,
    ) -> std::io::Result<SpoolWriter> {
        let mut header = Vec::with_capacity(512);
        header.extend_from_slice(&[0u8; 128]);
        header.extend_from_slice(b"DICM");
        meta.write(&mut header)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut writer = SpoolWriter::create(files, files.write_back_early, true).await?;
        writer.write(&header).await?;
        Ok(writer)
    }

    /// Appends bytes. A full buffer is written by a blocking task while the next one fills; when
    /// the store flushes such an object from this file, the written part's writeback to disk is
    /// started too, so that the disk write overlaps the network receive instead of following it.
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        // Hand the buffer over before it would have to grow (a reallocation copies it).
        if !self.buf.is_empty() && self.buf.len() + bytes.len() > BUFFER {
            // One write in flight at a time: memory stays bounded however fast bytes arrive.
            self.reclaim().await?;
            let offset = self.size - self.buf.len() as u64;
            let buf = Arc::new(std::mem::replace(&mut self.buf, Vec::with_capacity(BUFFER)));
            if offset == 0 && self.keep_prefix {
                self.prefix = Some(buf.clone());
            }
            if self.size > KEEP as u64 {
                self.kept = None;
            }
            if let Some(kept) = &mut self.kept {
                kept.push(buf.clone());
            }
            let (file, write_back) = (self.file.clone(), self.write_back_early);
            self.writing = Some(tokio::task::spawn_blocking(move || {
                file.write_all_at(&buf, offset)?;
                if write_back {
                    sync_file_range(&file, libc::SYNC_FILE_RANGE_WRITE)?;
                }
                Ok(())
            }));
        }
        self.buf.extend_from_slice(bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Waits for the write in progress (if any); its error, if it failed.
    async fn reclaim(&mut self) -> std::io::Result<()> {
        match self.writing.take() {
            Some(writing) => writing.await.expect("spool write task panicked"),
            None => Ok(()),
        }
    }

    /// The object's first [`BUFFER`] bytes (once), as soon as it is known to be larger: its header
    /// can be read while the rest arrives.
    pub fn take_prefix(&mut self) -> Option<Arc<Vec<u8>>> {
        self.prefix.take()
    }

    /// Bytes written so far (preamble and meta included).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The spool file with its unwritten last bytes (see [`Spooled::write_tail`]); the write of its
    /// last full buffer may still run (see [`Spooled::finish_writes`]).
    pub fn finish(self) -> Spooled {
        Spooled {
            path: self.path,
            size: self.size,
            file: self.file,
            writing: self.writing,
            tail: self.buf,
            tail_written: false,
            kept: self.kept,
        }
    }
}

impl Spooled {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Writes the bytes still buffered (blocking); needed before the file is stored. They stay in
    /// memory for [`Spooled::reader`].
    pub fn write_tail(&mut self) -> std::io::Result<()> {
        if !self.tail_written {
            let offset = self.size - self.tail.len() as u64;
            self.file.write_all_at(&self.tail, offset)?;
            self.tail_written = true;
        }
        Ok(())
    }

    /// Waits for the write of the last full buffer (blocking); needed before the file is stored.
    pub fn finish_writes(&mut self) -> std::io::Result<()> {
        match self.writing.take() {
            Some(writing) => {
                futures::executor::block_on(writing).expect("spool write task panicked")
            }
            None => Ok(()),
        }
    }

    /// A reader of the whole object (Part-10): its bytes in memory when they were kept (an object
    /// of up to [`KEEP`] bytes, parsed without reading it back or waiting for its writes), else the
    /// file (after [`Spooled::write_tail`]; the writes are waited for).
    pub fn reader(&mut self) -> std::io::Result<SpoolReader<'_>> {
        let kept_len = |kept: &Vec<Arc<Vec<u8>>>| kept.iter().map(|b| b.len() as u64).sum::<u64>();
        let in_memory =
            (self.kept.as_ref()).is_some_and(|k| kept_len(k) + self.tail.len() as u64 == self.size);
        if !in_memory {
            self.finish_writes()?;
            let file = std::fs::File::open(&self.path)?;
            return Ok(SpoolReader::File(std::io::BufReader::new(file)));
        }
        let parts = (self.kept.iter().flatten())
            .map(|b| b.as_slice())
            .chain([self.tail.as_slice()])
            .collect();
        Ok(SpoolReader::Memory(Pieces::new(parts)))
    }

    /// Writes the file's data to the disk without flushing the disk's cache or committing the
    /// file system's journal (blocking; ingest runs it while it parses the header). The filesystem
    /// store's flush after its rename then only has to commit the journal: one disk flush per object
    /// instead of two (data, then the rename). Only a speed-up: durability is the store's job.
    pub fn write_back(&mut self) -> std::io::Result<()> {
        self.finish_writes()?;
        sync_file_range(
            &self.file,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    }

    /// Starts [`Spooled::write_back`] without waiting for it (blocking only while the disk's queue
    /// is full), so that the parse overlaps the disk write.
    pub fn start_write_back(&self) -> std::io::Result<()> {
        sync_file_range(&self.file, libc::SYNC_FILE_RANGE_WRITE)
    }

    /// Moves the file into storage under `key`, durably; on failure the spool file is removed.
    /// Its writes must be finished ([`Spooled::finish_writes`]).
    pub async fn store_into(self, store: &dyn ObjectStore, key: &str) -> Result<(), StorageError> {
        store.put_file(key, &self.path).await?;
        self.mark_stored();
        Ok(())
    }

    /// The file now belongs to storage (it was moved there): forget it instead of deleting it on drop.
    pub fn mark_stored(self) {
        let _ = self.path.keep();
    }
}

/// See [`Spooled::reader`].
pub enum SpoolReader<'a> {
    Memory(Pieces<'a>),
    File(std::io::BufReader<std::fs::File>),
}

/// The object's bytes in memory, in the buffers they arrived in: read as one.
pub struct Pieces<'a> {
    parts: Vec<&'a [u8]>,
    len: u64,
    pos: u64,
}

impl<'a> Pieces<'a> {
    fn new(parts: Vec<&'a [u8]>) -> Self {
        let len = parts.iter().map(|p| p.len() as u64).sum();
        Pieces { parts, len, pos: 0 }
    }
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut start = 0u64;
        for part in &self.parts {
            let end = start + part.len() as u64;
            if self.pos < end {
                let from = &part[(self.pos - start) as usize..];
                let n = from.len().min(buf.len());
                buf[..n].copy_from_slice(&from[..n]);
                self.pos += n as u64;
                return Ok(n);
            }
            start = end;
        }
        Ok(0)
    }
}

impl Seek for Pieces<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
        })?;
        Ok(self.pos)
    }
}

impl Read for SpoolReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            SpoolReader::Memory(r) => r.read(buf),
            SpoolReader::File(r) => r.read(buf),
        }
    }
}

impl Seek for SpoolReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match self {
            SpoolReader::Memory(r) => r.seek(pos),
            SpoolReader::File(r) => r.seek(pos),
        }
    }
}

/// `sync_file_range` over the whole file (a no-op where the call does not exist).
fn sync_file_range(file: &std::fs::File, flags: libc::c_uint) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on a file descriptor the caller owns; a length of 0 means "to the
        // end of the file".
        if unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, flags) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, flags);
    Ok(())
}

/// Removes spool files left by a previous run (objects that were never acknowledged); run it before
/// the [`SpoolFiles`] of this run are created.
pub fn clear_stale(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "part") {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn read_all(mut r: impl Read + Seek) -> Vec<u8> {
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn pieces_read_and_seek_as_one() {
        let bytes = data(1000);
        let parts = vec![
            &bytes[..300],
            &bytes[300..300],
            &bytes[300..999],
            &bytes[999..],
        ];
        let mut p = Pieces::new(parts);
        assert_eq!(p.seek(SeekFrom::End(0)).unwrap(), 1000);
        p.seek(SeekFrom::Start(250)).unwrap();
        let mut across = [0u8; 100];
        p.read_exact(&mut across).unwrap();
        assert_eq!(&across[..], &bytes[250..350]);
        assert_eq!(p.seek(SeekFrom::Current(-350)).unwrap(), 0);
        assert_eq!(read_all(&mut p), bytes);
        assert!(p.seek(SeekFrom::Current(-1001)).is_err());
    }

    /// Objects are written whole to the file however they arrive; one of up to `KEEP` bytes is read
    /// from memory, a larger one from the file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn objects_are_spooled_whole_and_read_back_from_memory_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = SpoolFiles::new(dir.path(), true).unwrap();
        for len in [
            10,
            BUFFER,
            BUFFER + 1,
            3 * BUFFER + 999,
            KEEP + BUFFER / 2,
            6 * BUFFER + 5,
        ] {
            let bytes = data(len);
            let mut w = SpoolWriter::create_raw(&files).await.unwrap();
            for chunk in bytes.chunks(16_000 + len % 977) {
                w.write(chunk).await.unwrap();
            }
            let mut spooled = w.finish();
            let (bytes, spooled) = tokio::task::spawn_blocking(move || {
                spooled.write_tail().unwrap();
                let reader = spooled.reader().unwrap();
                let from_memory = matches!(reader, SpoolReader::Memory(_));
                assert_eq!(from_memory, len <= KEEP + BUFFER, "object of {len} bytes");
                assert_eq!(read_all(reader), bytes, "object of {len} bytes");
                spooled.finish_writes().unwrap();
                (bytes, spooled)
            })
            .await
            .unwrap();
            assert_eq!(std::fs::read(spooled.path()).unwrap(), bytes, "{len} bytes");
        }
    }
}
