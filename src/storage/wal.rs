//! Write-ahead log of the filesystem store: what makes a stored object durable with one cheap flush.
//!
//! Making a new file durable costs a file-system journal commit (inode, blocks, directory entry) on
//! top of the data write. An append to a segment file whose blocks are already allocated costs only
//! the data write: `fdatasync` of an overwrite inside the file's size has no metadata to commit. So a
//! put appends the object (key, bytes, CRC32C) to the current segment, flushes that alone, and only
//! then renames the spool file into place, unflushed. Appends run on the caller's own (blocking)
//! thread; whoever finds no flush running flushes for everything appended so far, and the others
//! wait for it (group commit), so concurrent associations do not queue for one flush each and a lone
//! association pays no thread hand-off. Deletions append a tombstone the same way before the file is
//! unlinked. A failed flush poisons the log: nothing more is acknowledged until a restart replays it.
//!
//! A full segment is retired to the checkpointer thread, which flushes the whole file system
//! (`syncfs`: every renamed file, its directories and every unlink are now durable), records the
//! segment's sequence number in `checkpoint`, and returns the segment for reuse; it also allocates
//! spare segments ahead, asked half way through each segment, so that a rotation never waits for a
//! new segment to be zero-filled. At start, records
//! of the segments after the checkpoint are replayed in order (objects rewritten from the log,
//! tombstones unlinked), so an acknowledged object survives a crash or a power loss even if its file
//! and directory entry did not. A record is valid only if its CRC and its segment sequence match,
//! which ends replay at a torn write and ignores what a reused segment held before.
//!
//! Objects larger than [`LOGGED_UP_TO`] bypass the log (`FsStore` flushes them itself): for them
//! the data write dominates and writing it twice would cost more than the commit saves.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc as std_mpsc, Arc, Condvar, Mutex};

/// Bytes copied from an object into the log per read.
const COPY_CHUNK: usize = 1 << 20;
/// Size of one segment file, allocated (zero-filled) once and reused.
const SEGMENT_SIZE: u64 = 16 << 20;
/// The largest object a record can hold (replay rejects longer ones; earlier releases logged
/// objects up to this size).
const MAX_RECORD_DATA: u64 = 8 << 20;
/// The largest object that goes through the log. Logging writes an object twice (the record now,
/// its file later); that costs less than the journal commit it saves only while the object is
/// small: at 512 KB, flushing the file itself was as fast on a quiet disk and faster on a busy one.
pub const LOGGED_UP_TO: u64 = 256 << 10;

const MAGIC: u32 = 0x4C57_4744; // "DGWL"
const HEADER_LEN: usize = 4 + 8 + 1 + 2 + 8 + 4;
const PUT: u8 = 1;
const TOMBSTONE: u8 = 2;
/// A key that may be left stored but unindexed (an object stored outside the log, a deletion, or a
/// key carried over from the previous run): no data, nothing to apply; replay reports it.
const INTENT: u8 = 3;

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

/// What a put, a deletion or an intent does once its record is durable.
enum Op<'a> {
    Put { src: &'a Path, dest: &'a Path },
    Delete { dest: &'a Path },
    Intent,
}

/// The log's shared state: the current segment and how far appends and flushes have got, counted
/// in bytes appended since start (a log sequence number).
struct State {
    current: Segment,
    appended: u64,
    flushed: u64,
    flushing: bool,
    poisoned: Option<String>,
    /// Reused for copying objects into the log (appends run under the lock).
    copy_buf: Vec<u8>,
    /// Whether the checkpointer was asked for spares during the current segment.
    spares_asked: bool,
    /// Keys logged (puts and intents) whose index commit is not known durable yet, with the
    /// sequence of the segment that holds their record; and how many each segment holds. A segment
    /// is checkpointed only once it holds none: its records are what start-up reconcile looks at.
    unsettled: std::collections::HashMap<String, u64>,
    unsettled_per_segment: std::collections::HashMap<u64, usize>,
}

impl State {
    fn settle(&mut self, key: &str) -> bool {
        let Some(seq) = self.unsettled.remove(key) else {
            return false;
        };
        if let Some(n) = self.unsettled_per_segment.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                self.unsettled_per_segment.remove(&seq);
            }
        }
        true
    }
}

/// Makes the index's commits so far durable; run before a checkpoint drops the records of objects
/// whose (unflushed) index commit has returned.
pub type IndexSync = Box<dyn Fn() -> io::Result<()> + Send + Sync>;

struct Log {
    /// Holds the log's exclusive lock (`flock`) for as long as the log is open.
    _lock: File,
    dir: PathBuf,
    root: PathBuf,
    state: Mutex<State>,
    flush_done: Condvar,
    free: Arc<Mutex<Vec<(File, PathBuf)>>>,
    checkpointer: Mutex<std_mpsc::Sender<Job>>,
    /// Signalled when a key is settled (the checkpointer waits for a segment's keys).
    settled: Condvar,
    index_sync: Mutex<Option<IndexSync>>,
    /// Keys the previous run left unsettled, for start-up reconcile (taken once).
    carried_over: Mutex<Option<Vec<String>>>,
}

#[derive(Clone)]
pub struct Wal {
    log: Arc<Log>,
}

impl Wal {
    /// Opens the log in `dir` for the store rooted at `root`: replays what the last run left
    /// unchecked (blocking; before anything else reads the store) and starts the checkpointer.
    pub fn open(dir: &Path, root: &Path) -> io::Result<Wal> {
        create_dirs_durably(dir)?;
        let lock = lock(dir)?;
        let checkpointed = read_checkpoint(dir)?;
        let (segments, last_seq, unsettled) = replay(dir, root, checkpointed)?;
        let free = Arc::new(Mutex::new(segments));
        let mut first = take_segment(dir, &free, last_seq + 1)?;
        // The keys the last run left unsettled are logged again as intents in the new segment
        // before the old ones are checkpointed: if this run dies before reconcile indexed them,
        // the next start still finds them.
        let mut carried = std::collections::HashMap::new();
        if !unsettled.is_empty() {
            for key in &unsettled {
                let mut record = Record::of(key, &Op::Intent)?;
                if first.offset + record.len() > SEGMENT_SIZE {
                    return Err(io::Error::other(
                        "too many unsettled keys to carry over in one log segment",
                    ));
                }
                append(&mut first, &mut record, &mut Vec::new())?;
                carried.insert(key.clone(), first.seq);
            }
            first.file.sync_data()?;
        }
        if last_seq > checkpointed {
            syncfs(root)?;
            write_checkpoint(dir, last_seq)?;
        }
        // Spares are allocated before the first put: a new store would otherwise zero-fill them
        // during its first ingest, and that 32 MB write and flush held up the flushes of the
        // C-STOREs running meanwhile (10-20 ms each on a loop-mounted file system).
        while free.lock().expect("free segments lock").len() < SPARE_SEGMENTS {
            let spare = create_segment(dir)?;
            free.lock().expect("free segments lock").push(spare);
        }
        let (jobs_tx, jobs_rx) = std_mpsc::channel::<Job>();
        let mut unsettled_per_segment = std::collections::HashMap::new();
        if !carried.is_empty() {
            unsettled_per_segment.insert(first.seq, carried.len());
        }
        let offset = first.offset;
        let state = State {
            current: first,
            appended: offset,
            flushed: offset,
            flushing: false,
            poisoned: None,
            copy_buf: Vec::new(),
            spares_asked: false,
            unsettled: carried,
            unsettled_per_segment,
        };
        let log = Arc::new(Log {
            _lock: lock,
            dir: dir.to_path_buf(),
            root: root.to_path_buf(),
            state: Mutex::new(state),
            flush_done: Condvar::new(),
            free,
            checkpointer: Mutex::new(jobs_tx),
            settled: Condvar::new(),
            index_sync: Mutex::new(None),
            carried_over: Mutex::new(Some(unsettled)),
        });
        {
            let (dir, root, log) = (dir.to_path_buf(), root.to_path_buf(), Arc::downgrade(&log));
            std::thread::Builder::new()
                .name("wal-checkpoint".into())
                .spawn(move || checkpointer(&dir, &root, &log, jobs_rx))?;
        }
        Ok(Wal { log })
    }

    /// Sets how the index's commits are made durable before a checkpoint (see [`IndexSync`]).
    pub fn set_index_sync(&self, sync: IndexSync) {
        *self.log.index_sync.lock().expect("index sync lock") = Some(sync);
    }

    /// Logs that the objects under `keys` may be left stored but unindexed, and returns once that
    /// is durable (one flush for all); each key stays unsettled (reconciled after a crash) until
    /// [`Wal::settle`].
    pub fn intend_blocking(&self, keys: &[&str]) -> io::Result<()> {
        let mut st = self.log.lock();
        for key in keys {
            let mut record = Record::of(key, &Op::Intent)?;
            st = self.log.append_locked(st, key, &mut record, true)?;
        }
        let mine = st.appended;
        self.log.wait_flushed(st, mine)
    }

    /// The index commit for `key` is durable or failed (nothing of it is left): its record no
    /// longer holds up a checkpoint.
    pub fn settle(&self, key: &str) {
        if self.log.lock().settle(key) {
            self.log.settled.notify_all();
        }
    }

    /// Clean shutdown: if every key is settled, checkpoints everything logged (index and file system
    /// flushed first), so that the next start has nothing to replay or reconcile; the log then
    /// refuses further work. Returns whether it did (blocking).
    pub fn close(&self) -> io::Result<bool> {
        let mut st = self.log.lock();
        if !st.unsettled.is_empty() || st.poisoned.is_some() {
            return Ok(false);
        }
        st.poisoned = Some("the store is closed".into());
        if let Some(sync) = &*self.log.index_sync.lock().expect("index sync lock") {
            sync()?;
        }
        syncfs(&self.log.root)?;
        write_checkpoint(&self.log.dir, st.current.seq)?;
        Ok(true)
    }

    /// The keys the previous run left unsettled (once; None afterwards).
    pub fn take_carried_over(&self) -> Option<Vec<String>> {
        self.log
            .carried_over
            .lock()
            .expect("carried over lock")
            .take()
    }

    /// Logs the content of `src` under `key`, then renames `src` to `dest` (blocking).
    pub fn put_blocking(&self, key: &str, src: &Path, dest: &Path) -> io::Result<()> {
        self.log.commit(key, Op::Put { src, dest })
    }

    /// Fails once a flush failed (the store is then not ready: nothing more can be acknowledged).
    pub fn check(&self) -> io::Result<()> {
        match &self.log.lock().poisoned {
            Some(why) => Err(io::Error::other(format!(
                "write-ahead log flush failed: {why}"
            ))),
            None => Ok(()),
        }
    }

    /// Logs a tombstone for `key`, then unlinks `dest`.
    pub async fn delete(&self, key: &str, dest: &Path) -> io::Result<()> {
        let (wal, key, dest) = (self.clone(), key.to_string(), dest.to_path_buf());
        tokio::task::spawn_blocking(move || wal.log.commit(&key, Op::Delete { dest: &dest }))
            .await
            .expect("write-ahead log task panicked")
    }
}

impl Log {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("write-ahead log lock")
    }

    /// Appends the record, waits until a flush covers it (running that flush when none is), then
    /// applies the operation.
    fn commit(&self, key: &str, op: Op<'_>) -> io::Result<()> {
        self.log_durably(key, &op)?;
        let applied = apply(&op);
        if let (Err(e), Op::Put { dest, .. }) = (&applied, &op) {
            // The record is durable, so replay would put the object back although this put
            // fails: log a tombstone after it (or poison the log if even that fails), so that a
            // failed put leaves nothing.
            tracing::error!(key, error = %e, "storing a logged object failed");
            let undo = Op::Delete { dest };
            match self.log_durably(key, &undo) {
                Ok(()) => {
                    let _ = apply(&undo);
                }
                Err(e2) => self.lock().poisoned = Some(format!("cannot undo a failed put: {e2}")),
            }
        }
        applied
    }

    /// Appends the record of `op` and waits until it is durable.
    fn log_durably(&self, key: &str, op: &Op<'_>) -> io::Result<()> {
        let mut record = Record::of(key, op)?;
        let unsettled = !matches!(op, Op::Delete { .. });
        let st = self.append_locked(self.lock(), key, &mut record, unsettled)?;
        let mine = st.appended;
        self.wait_flushed(st, mine)
    }

    /// Appends a record (rotating first if it does not fit), and marks its key unsettled.
    fn append_locked<'g>(
        &'g self,
        mut st: std::sync::MutexGuard<'g, State>,
        key: &str,
        record: &mut Record<'_>,
        unsettled: bool,
    ) -> io::Result<std::sync::MutexGuard<'g, State>> {
        if let Some(why) = &st.poisoned {
            return Err(io::Error::other(format!("write-ahead log unusable: {why}")));
        }
        let len = record.len();
        if st.current.offset + len > SEGMENT_SIZE {
            self.rotate(&mut st)?;
        }
        let State {
            current, copy_buf, ..
        } = &mut *st;
        append(current, record, copy_buf)?;
        st.appended += len;
        if unsettled {
            // A key already unsettled stays counted in its older segment, which is checkpointed
            // first anyway.
            let seq = st.current.seq;
            if let std::collections::hash_map::Entry::Vacant(v) =
                st.unsettled.entry(key.to_string())
            {
                v.insert(seq);
                *st.unsettled_per_segment.entry(seq).or_default() += 1;
            }
        }
        // Half way through a segment, make sure spares are ready for the rotation ahead.
        if st.current.offset > SEGMENT_SIZE / 2 && !st.spares_asked {
            st.spares_asked = true;
            self.tell_checkpointer(Job::Spares);
        }
        Ok(st)
    }

    /// Waits until a flush covers everything appended up to `mine`, running that flush when none
    /// is (group commit).
    fn wait_flushed<'g>(
        &'g self,
        mut st: std::sync::MutexGuard<'g, State>,
        mine: u64,
    ) -> io::Result<()> {
        while st.flushed < mine {
            if let Some(why) = &st.poisoned {
                return Err(io::Error::other(format!(
                    "write-ahead log flush failed: {why}"
                )));
            }
            if st.flushing {
                st = self.flush_done.wait(st).expect("write-ahead log lock");
                continue;
            }
            st.flushing = true;
            let target = st.appended;
            let file = st.current.file.try_clone();
            drop(st);
            let flushed = file.and_then(|f| f.sync_data());
            st = self.lock();
            st.flushing = false;
            match flushed {
                Ok(()) => st.flushed = st.flushed.max(target),
                Err(e) => {
                    tracing::error!(error = %e, "write-ahead log flush failed");
                    st.poisoned = Some(e.to_string());
                }
            }
            self.flush_done.notify_all();
        }
        Ok(())
    }

    fn tell_checkpointer(&self, job: Job) {
        let _ = self
            .checkpointer
            .lock()
            .expect("checkpointer lock")
            .send(job);
    }

    /// Retires the full current segment (flushed first: its records may not be yet) to the
    /// checkpointer and starts the next one.
    fn rotate(&self, st: &mut State) -> io::Result<()> {
        // A failed flush poisons the log as in `commit`: records before it may be lost, and
        // nothing appended after them may be acknowledged.
        if let Err(e) = st.current.file.sync_data() {
            tracing::error!(error = %e, "write-ahead log flush failed");
            st.poisoned = Some(e.to_string());
            return Err(e);
        }
        st.flushed = st.appended;
        let next = take_segment(&self.dir, &self.free, st.current.seq + 1)?;
        let full = std::mem::replace(&mut st.current, next);
        st.spares_asked = false;
        self.tell_checkpointer(Job::Retire(full));
        Ok(())
    }
}

/// Takes the log's exclusive lock: two processes appending to (or replaying) one log would corrupt it,
/// e.g. `dicom-gateway reindex` run against the storage of a gateway that is serving.
fn lock(dir: &Path) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    // SAFETY: plain syscall on a descriptor owned by `file`.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.kind() == io::ErrorKind::WouldBlock {
            io::Error::other(format!(
                "{} is locked: another dicom-gateway process uses this storage",
                dir.display()
            ))
        } else {
            e
        });
    }
    Ok(file)
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

/// Creates `dir` and any missing parent, flushing the parent of each one created: a new log
/// directory whose entry a power loss dropped would take every record in it along.
fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dirs_durably(parent)?;
    }
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    File::open(parent.unwrap_or(Path::new(".")))?.sync_all()
}

/// The valid record at `offset` of a segment whose sequence is `seq` (any sequence when None),
/// with its key and data.
fn read_record(file: &File, offset: u64, seq: Option<u64>) -> Option<(Header, String, Vec<u8>)> {
    let mut raw = [0u8; HEADER_LEN];
    file.read_exact_at(&mut raw, offset).ok()?;
    let h = Header::decode(&raw)?;
    if seq.is_some_and(|s| s != h.seq)
        || !matches!(h.kind, PUT | TOMBSTONE | INTENT)
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
/// segments (free for reuse once the caller has synced and checkpointed), the highest sequence, and
/// the keys of the puts and intents replayed that no later tombstone removed: what may be stored
/// without its index row.
#[allow(clippy::type_complexity)]
fn replay(
    dir: &Path,
    root: &Path,
    checkpointed: u64,
) -> io::Result<(Vec<(File, PathBuf)>, u64, Vec<String>)> {
    let mut segments = Vec::new();
    for path in segment_paths(dir)? {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let seq = read_record(&file, 0, None).map(|(h, _, _)| h.seq);
        segments.push((seq, file, path));
    }
    segments.sort_by_key(|(seq, _, _)| *seq);
    let mut last = checkpointed;
    let mut unsettled: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
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
            match h.kind {
                PUT => rewrite(&dest, &data)?,
                TOMBSTONE => match std::fs::remove_file(&dest) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                },
                _ => {}
            }
            if h.kind == TOMBSTONE {
                seen.remove(&key);
            } else if seen.insert(key.clone()) {
                unsettled.push(key);
            }
            offset += h.len();
            applied += 1;
        }
        tracing::info!(segment = seq, records = applied, "write-ahead log replayed");
    }
    let mut kept = std::collections::HashSet::new();
    unsettled.retain(|k| seen.contains(k) && kept.insert(k.clone()));
    Ok((
        segments.into_iter().map(|(_, f, p)| (f, p)).collect(),
        last,
        unsettled,
    ))
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

/// A record about to be appended: its key, and the object file it copies (puts only).
struct Record<'a> {
    kind: u8,
    key: &'a [u8],
    src: Option<File>,
    data_len: u64,
}

impl<'a> Record<'a> {
    /// Opens the object a put logs (once: its length decides the segment, its bytes are copied).
    fn of(key: &'a str, op: &Op<'_>) -> io::Result<Record<'a>> {
        let (kind, src) = match op {
            Op::Put { src, .. } => (PUT, Some(File::open(src)?)),
            Op::Delete { .. } => (TOMBSTONE, None),
            Op::Intent => (INTENT, None),
        };
        let data_len = match &src {
            Some(f) => f.metadata()?.len(),
            None => 0,
        };
        if data_len > LOGGED_UP_TO || key.len() > u16::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "record too large for the write-ahead log",
            ));
        }
        Ok(Record {
            kind,
            key: key.as_bytes(),
            src,
            data_len,
        })
    }

    fn len(&self) -> u64 {
        HEADER_LEN as u64 + self.key.len() as u64 + self.data_len
    }
}

/// Appends a record at the current segment's offset; the offset moves on only once the whole record
/// is written.
fn append(seg: &mut Segment, r: &mut Record<'_>, buf: &mut Vec<u8>) -> io::Result<()> {
    let (kind, key, data_len) = (r.kind, r.key, r.data_len);
    let mut d = digest(seg.seq, kind, key, data_len);
    let start = seg.offset;
    let mut at = start + HEADER_LEN as u64;
    seg.file.write_all_at(key, at)?;
    at += key.len() as u64;
    if let Some(f) = r.src.as_mut() {
        if buf.len() < COPY_CHUNK {
            buf.resize(COPY_CHUNK, 0);
        }
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

/// What a request does once its record is durable.
fn apply(op: &Op<'_>) -> io::Result<()> {
    match op {
        Op::Put { src, dest } => {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            super::fs::move_file(src, dest)
        }
        Op::Delete { dest } => match std::fs::remove_file(dest) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Op::Intent => Ok(()),
    }
}

/// What the checkpointer thread is asked to do.
enum Job {
    /// Make a full segment's records durable everywhere, then free it.
    Retire(Segment),
    /// Allocate spare segments if fewer than [`SPARE_SEGMENTS`] are free.
    Spares,
}

/// Free segments kept allocated ahead (asked for half way through a segment), so that a rotation
/// (under the log lock, on some C-STORE's critical path) finds one ready instead of zero-filling
/// 16 MB and flushing it.
const SPARE_SEGMENTS: usize = 2;

/// The checkpointer thread: makes everything a retired segment's records did durable, records it,
/// and returns the segment for reuse; allocates spare segments when asked.
///
/// Segments are checkpointed strictly in order: one whose checkpoint could not be written stays at
/// the head of the backlog (retried with the next job), since a later checkpoint would record a
/// higher sequence and replay would skip the failed one's records. Before a checkpoint, every key
/// its segment logged must be settled (indexed, or failed) and the index's commits made durable:
/// otherwise a power loss could drop an index row whose object no replay would then point
/// reconcile at. A failed flush (of the file system or the index) poisons the log: what it should
/// have made durable may be lost, and a retried flush can report success without it.
fn checkpointer(
    dir: &Path,
    root: &Path,
    log: &std::sync::Weak<Log>,
    jobs: std_mpsc::Receiver<Job>,
) {
    let mut backlog: std::collections::VecDeque<Segment> = std::collections::VecDeque::new();
    let mut broken = false;
    while let Ok(job) = jobs.recv() {
        let Some(log) = log.upgrade() else { return };
        match job {
            Job::Retire(seg) => backlog.push_back(seg),
            Job::Spares => {
                let free_count = || log.free.lock().expect("free segments lock").len();
                while free_count() < SPARE_SEGMENTS {
                    match create_segment(dir) {
                        Ok(s) => log.free.lock().expect("free segments lock").push(s),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot allocate a write-ahead log segment");
                            break;
                        }
                    }
                }
            }
        }
        while !broken {
            let Some(seg) = backlog.front() else { break };
            let mut st = log.lock();
            while st.unsettled_per_segment.contains_key(&seg.seq) {
                if Arc::strong_count(&log) == 1 {
                    return; // the store was closed: the next open replays the segment
                }
                let timeout = std::time::Duration::from_secs(1);
                st = log
                    .settled
                    .wait_timeout(st, timeout)
                    .expect("write-ahead log lock")
                    .0;
            }
            drop(st);
            let index_sync = match &*log.index_sync.lock().expect("index sync lock") {
                Some(sync) => sync(),
                None => Ok(()),
            };
            if let Err(e) = index_sync.and_then(|()| syncfs(root)) {
                tracing::error!(error = %e, segment = seg.seq, "write-ahead log checkpoint flush failed");
                log.lock().poisoned = Some(format!("checkpoint flush failed: {e}"));
                broken = true;
                break;
            }
            if let Err(e) = write_checkpoint(dir, seg.seq) {
                tracing::error!(error = %e, segment = seg.seq, "write-ahead log checkpoint not written; retried later");
                break;
            }
            let seg = backlog.pop_front().expect("head of the backlog");
            log.free
                .lock()
                .expect("free segments lock")
                .push((seg.file, seg.path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for (key, body) in [("a/b/1.dcm", &b"first"[..]), ("a/b/2.dcm", b"second")] {
            std::fs::write(&spool, body).unwrap();
            let dest = root.join(key);
            let put = Op::Put {
                src: &spool,
                dest: &dest,
            };
            append(
                &mut seg,
                &mut Record::of(key, &put).unwrap(),
                &mut Vec::new(),
            )
            .unwrap();
        }
        let dest = root.join("a/b/1.dcm");
        let tombstone = Op::Delete { dest: &dest };
        append(
            &mut seg,
            &mut Record::of("a/b/1.dcm", &tombstone).unwrap(),
            &mut Vec::new(),
        )
        .unwrap();
        // A torn third put: its header never made it to disk.
        std::fs::write(&spool, b"third").unwrap();
        let dest = root.join("a/b/3.dcm");
        let put = Op::Put {
            src: &spool,
            dest: &dest,
        };
        append(
            &mut seg,
            &mut Record::of("a/b/3.dcm", &put).unwrap(),
            &mut Vec::new(),
        )
        .unwrap();
        seg.file
            .write_all_at(&[0u8; HEADER_LEN], seg.offset - HEADER_LEN as u64 - 9 - 5)
            .unwrap();
        seg.file.sync_all().unwrap();

        // Nothing was renamed into place (a crash right after the log flush): replay restores 2.
        let (segments, last, unsettled) = replay(&dir, &root, 0).unwrap();
        assert_eq!((segments.len(), last), (1, 1));
        assert_eq!(unsettled, ["a/b/2.dcm"], "the put no tombstone followed");
        assert!(
            !root.join("a/b/1.dcm").exists(),
            "tombstone applied after the put"
        );
        assert_eq!(std::fs::read(root.join("a/b/2.dcm")).unwrap(), b"second");
        assert!(!root.join("a/b/3.dcm").exists(), "torn record ignored");

        // Once checkpointed, the segment is not replayed again.
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
        let second = Wal::open(&dir, &root)
            .err()
            .expect("the log is locked while open");
        assert!(second.to_string().contains("another dicom-gateway process"));
        let src = tmp.path().join("spool");
        std::fs::write(&src, b"payload").unwrap();
        let dest = root.join("1/2/3.dcm");
        wal.put_blocking("1/2/3.dcm", &src, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"payload");
        assert!(!src.exists());
        // Simulate a crash that lost the unflushed rename: the next open restores the object.
        std::fs::remove_file(&dest).unwrap();
        drop(wal);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let _again = Wal::open(&dir, &root).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"payload");
    }

    #[test]
    fn logged_keys_are_reconciled_until_a_clean_close() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, root) = (tmp.path().join("wal"), tmp.path().join("objects"));
        std::fs::create_dir_all(&root).unwrap();
        let put = |wal: &Wal, key: &str| {
            let src = tmp.path().join("spool");
            std::fs::write(&src, key).unwrap();
            wal.put_blocking(key, &src, &root.join(key)).unwrap();
        };
        let wal = Wal::open(&dir, &root).unwrap();
        assert_eq!(wal.take_carried_over(), Some(vec![]));
        put(&wal, "a/1.dcm");
        wal.intend_blocking(&["a/2.dcm", "a/3.dcm"]).unwrap();
        put(&wal, "a/4.dcm");
        let gone = root.join("a/3.dcm");
        wal.log
            .commit("a/3.dcm", Op::Delete { dest: &gone })
            .unwrap();
        wal.settle("a/4.dcm");
        assert!(!wal.close().unwrap(), "keys unsettled: no clean close");
        drop(wal);
        std::thread::sleep(std::time::Duration::from_millis(50));

        // A crash: every key logged since the checkpoint, deleted ones aside, is reconciled.
        let wal = Wal::open(&dir, &root).unwrap();
        let want = ["a/1.dcm", "a/2.dcm", "a/4.dcm"].map(String::from).to_vec();
        assert_eq!(wal.take_carried_over(), Some(want.clone()));
        drop(wal);
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Not settled by that run either (it died): carried over again.
        let wal = Wal::open(&dir, &root).unwrap();
        assert_eq!(wal.take_carried_over(), Some(want.clone()));
        for key in &want {
            wal.settle(key);
        }
        assert!(wal.close().unwrap());
        let refused = wal.intend_blocking(&["a/5.dcm"]);
        assert!(refused.is_err(), "a closed log takes no more work");
        drop(wal);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let wal = Wal::open(&dir, &root).unwrap();
        assert_eq!(
            wal.take_carried_over(),
            Some(vec![]),
            "clean close: nothing to do"
        );
        assert_eq!(std::fs::read(root.join("a/1.dcm")).unwrap(), b"a/1.dcm");
    }

    #[test]
    fn a_put_whose_rename_fails_is_not_replayed() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, root) = (tmp.path().join("wal"), tmp.path().join("objects"));
        std::fs::create_dir_all(&root).unwrap();
        let wal = Wal::open(&dir, &root).unwrap();
        // The destination's parent is a file: the rename after the log flush fails.
        std::fs::write(root.join("x"), b"in the way").unwrap();
        let src = tmp.path().join("spool");
        std::fs::write(&src, b"payload").unwrap();
        let failed = wal.put_blocking("x/1.dcm", &src, &root.join("x/1.dcm"));
        assert!(failed.is_err());
        wal.settle("x/1.dcm");
        wal.check()
            .expect("a failed rename does not poison the log");
        drop(wal);
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::fs::remove_file(root.join("x")).unwrap();
        let wal = Wal::open(&dir, &root).unwrap();
        assert!(
            !root.join("x/1.dcm").exists(),
            "replay brought a failed put back"
        );
        assert_eq!(wal.take_carried_over(), Some(vec![]));
    }

    #[test]
    fn concurrent_puts_share_flushes_and_cross_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, root) = (tmp.path().join("wal"), tmp.path().join("objects"));
        std::fs::create_dir_all(&root).unwrap();
        let wal = Wal::open(&dir, &root).unwrap();
        // 4 threads x 40 objects of 256 KB: 40 MB, more than two segments.
        let body = |t: usize, i: usize| vec![(t * 40 + i) as u8; 256 * 1024];
        std::thread::scope(|scope| {
            for t in 0..4 {
                let (wal, tmp, root) = (wal.clone(), tmp.path(), root.as_path());
                scope.spawn(move || {
                    for i in 0..40 {
                        let src = tmp.join(format!("spool-{t}-{i}"));
                        std::fs::write(&src, body(t, i)).unwrap();
                        let key = format!("{t}/{i}.dcm");
                        wal.put_blocking(&key, &src, &root.join(&key)).unwrap();
                        wal.settle(&key);
                    }
                });
            }
        });
        for t in 0..4 {
            for i in 0..40 {
                let path = root.join(format!("{t}/{i}.dcm"));
                assert_eq!(std::fs::read(&path).unwrap(), body(t, i), "{t}/{i}");
            }
        }
        let seq = wal.log.lock().current.seq;
        assert!(seq >= 3, "40 MB in 16 MB segments: now at segment {seq}");
        // The newest record is in the current segment, which no checkpoint covers yet: replay
        // restores it after a crash that lost its rename.
        let src = tmp.path().join("spool-last");
        std::fs::write(&src, b"last").unwrap();
        let dest = root.join("last.dcm");
        wal.put_blocking("last.dcm", &src, &dest).unwrap();
        drop(wal);
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::fs::remove_file(&dest).unwrap();
        replay(&dir, &root, read_checkpoint(&dir).unwrap()).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"last");
    }
}
