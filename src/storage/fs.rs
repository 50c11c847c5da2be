//! Filesystem backend: one file per object under a root directory.
//!
//! Durability: objects up to [`wal::LOGGED_UP_TO`] are made durable by the write-ahead log
//! (`<root>/.wal`, see [`super::wal`]): one append and one data flush, shared by whatever else is
//! being stored at the same moment, then an unflushed rename into place. Larger objects are renamed
//! into place and flushed themselves (data and directory); ingest has already written their data back
//! (started as the spool file filled, waited for while it parsed: `Spooled::write_back`), so that
//! flush only commits the journal; before the rename, an intent record for its key is logged and
//! flushed. Every logged key (put or intent) stays unsettled until ingest says its index commit is
//! durable or failed ([`ObjectStore::settle`]); a log segment is checkpointed only once all its keys
//! are settled, so after a crash the keys logged since the last checkpoint are all that start-up
//! reconcile must look at ([`ObjectStore::unsettled`]): whatever an interrupted run stored without
//! indexing is among them.

use std::io::SeekFrom;
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::wal::{self, Wal};
use super::{ByteStream, KeyStream, ObjectStore, PutPath, StorageError};

/// Objects up to this size are read whole by `get` (bounded memory per request); larger ones stream.
const WHOLE_READ: u64 = 2 << 20;

pub struct FsStore {
    root: PathBuf,
    wal: Wal,
}

/// The path of `key` under `root`; a key is relative and cannot climb out of the root.
pub(super) fn key_path(root: &Path, key: &str) -> Result<PathBuf, StorageError> {
    let rel = Path::new(key);
    let safe = !key.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !safe {
        return Err(StorageError::InvalidKey(key.to_string()));
    }
    Ok(root.join(rel))
}

impl FsStore {
    /// Opens (creating) the store at `root`, replaying its write-ahead log first (blocking).
    pub fn open(root: &Path) -> std::io::Result<FsStore> {
        if !root.is_dir() {
            let parent = root.parent().filter(|p| !p.as_os_str().is_empty());
            std::fs::create_dir_all(root)?;
            sync_dir(parent.unwrap_or(Path::new(".")))?;
        }
        let root = root.canonicalize()?;
        let wal = Wal::open(&root.join(".wal"), &root)?;
        Ok(FsStore { root, wal })
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StorageError> {
        key_path(&self.root, key)
    }
}

/// Stores `src` under `key` durably (blocking): through the write-ahead log up to
/// [`wal::LOGGED_UP_TO`]; a larger object is renamed into place, then its data and directory are
/// flushed (ingest has written its data back already, so the flush commits the journal).
fn store_blocking(root: &Path, wal: &Wal, key: &str, src: &Path) -> Result<(), StorageError> {
    let dest = key_path(root, key)?;
    store_at(root, wal, key, src, &dest).map_err(|e| StorageError::io(key, e))
}

fn store_at(root: &Path, wal: &Wal, key: &str, src: &Path, dest: &Path) -> std::io::Result<()> {
    if std::fs::metadata(src)?.len() <= wal::LOGGED_UP_TO {
        return wal.put_blocking(key, src, dest);
    }
    // Logged before the object can appear under its key: if the index commit is then lost, replay
    // points reconcile at the key.
    wal.intend_blocking(&[key])?;
    create_parents_durably(root, dest)?;
    move_file(src, dest)?;
    std::fs::File::open(dest)?.sync_data()?;
    sync_dir(dest.parent().expect("object path has a parent"))
}

/// Renames `src` to `dest`, or copies it when the spool is on another file system.
pub(super) fn move_file(src: &Path, dest: &Path) -> std::io::Result<()> {
    match std::fs::rename(src, dest) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let tmp = dest.with_extension("partial");
            std::fs::copy(src, &tmp)?;
            std::fs::rename(&tmp, dest)?;
            std::fs::remove_file(src)
        }
        other => other,
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates the missing directories above `path` and fsyncs the parents of those it created.
fn create_parents_durably(root: &Path, path: &Path) -> std::io::Result<()> {
    let parent = path.parent().expect("object path has a parent");
    if parent.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut dir = parent;
    while !dir.is_dir() && dir != root {
        missing.push(dir.to_path_buf());
        dir = dir.parent().expect("inside root");
    }
    std::fs::create_dir_all(parent)?;
    for created in missing.iter().rev() {
        sync_dir(created.parent().expect("inside root"))?;
    }
    Ok(())
}

#[async_trait]
impl ObjectStore for FsStore {
    async fn put_file(&self, key: &str, src: &Path) -> Result<(), StorageError> {
        let (root, wal) = (self.root.clone(), self.wal.clone());
        let (key, src) = (key.to_string(), src.to_path_buf());
        tokio::task::spawn_blocking(move || store_blocking(&root, &wal, &key, &src))
            .await
            .expect("blocking storage task panicked")
    }

    fn put_path(&self, size: u64) -> PutPath {
        if size <= wal::LOGGED_UP_TO {
            PutPath::Blocking
        } else {
            PutPath::BlockingAfterWriteBack
        }
    }

    fn put_file_blocking(&self, key: &str, src: &Path) -> Result<(), StorageError> {
        store_blocking(&self.root, &self.wal, key, src)
    }

    async fn get(&self, key: &str) -> Result<(u64, ByteStream), StorageError> {
        let path = self.path_of(key)?;
        // Open, measure and, for an object up to WHOLE_READ, read it: one blocking task instead of
        // one per step (each a thread hand-off; C-MOVE and C-GET send objects one after another).
        let opened = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let mut file = std::fs::File::open(&path)?;
            let size = file.metadata()?.len();
            if size > WHOLE_READ {
                return Ok((size, Err(file)));
            }
            let mut bytes = Vec::with_capacity(size as usize);
            std::io::Read::read_to_end(&mut file, &mut bytes)?;
            Ok((bytes.len() as u64, Ok(Bytes::from(bytes))))
        })
        .await
        .expect("blocking storage task panicked")
        .map_err(|e| StorageError::io(key, e))?;
        let stream: ByteStream = match opened.1 {
            Ok(bytes) => Box::pin(futures::stream::once(async move { Ok(bytes) })),
            Err(file) => Box::pin(ReaderStream::with_capacity(
                tokio::fs::File::from_std(file),
                256 * 1024,
            )),
        };
        Ok((opened.0, stream))
    }

    async fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Bytes, StorageError> {
        let path = self.path_of(key)?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| StorageError::io(key, e))?;
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(|e| StorageError::io(key, e))?;
        let mut buf = vec![0u8; length as usize];
        file.read_exact(&mut buf)
            .await
            .map_err(|e| StorageError::io(key, e))?;
        Ok(Bytes::from(buf))
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path_of(key)?;
        self.wal
            .delete(key, &path)
            .await
            .map_err(|e| StorageError::io(key, e))
    }

    fn intend_blocking(&self, keys: &[&str]) -> Result<(), StorageError> {
        self.wal
            .intend_blocking(keys)
            .map_err(|e| StorageError::io(keys.first().copied().unwrap_or(".wal"), e))
    }

    fn settle(&self, key: &str) {
        self.wal.settle(key);
    }

    fn unsettled(&self) -> Option<Vec<String>> {
        Some(self.wal.take_carried_over().unwrap_or_default())
    }

    fn set_index_sync(&self, sync: wal::IndexSync) {
        self.wal.set_index_sync(sync);
    }

    fn close(&self) -> Result<(), StorageError> {
        self.wal
            .close()
            .map(|_| ())
            .map_err(|e| StorageError::io(".wal", e))
    }

    async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        let path = self.path_of(key)?;
        tokio::fs::try_exists(&path)
            .await
            .map_err(|e| StorageError::io(key, e))
    }

    fn list(&self) -> KeyStream {
        let root = self.root.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::task::spawn_blocking(move || {
            let mut stack = vec![root.clone()];
            while let Some(dir) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(entries) => entries,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(StorageError::io(&dir.to_string_lossy(), e)));
                        continue;
                    }
                };
                for entry in entries.flatten() {
                    let path = entry.path();
                    if entry.file_name().to_string_lossy().starts_with('.') {
                        continue; // the write-ahead log, the health probe
                    }
                    if path.is_dir() {
                        stack.push(path);
                    } else if path.extension().is_some_and(|e| e == "dcm") {
                        let key = path
                            .strip_prefix(&root)
                            .expect("under root")
                            .to_string_lossy()
                            .into_owned();
                        if tx.blocking_send(Ok(key)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        tokio_stream_from(rx)
    }

    async fn health(&self) -> Result<(), StorageError> {
        self.wal.check().map_err(|e| StorageError::io(".wal", e))?;
        let probe = self.root.join(".health");
        tokio::fs::write(&probe, b"ok")
            .await
            .map_err(|e| StorageError::io(".health", e))?;
        tokio::fs::read(&probe)
            .await
            .map_err(|e| StorageError::io(".health", e))?;
        Ok(())
    }
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<String, StorageError>>,
) -> KeyStream {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    #[tokio::test(flavor = "multi_thread")]
    async fn put_get_range_list_delete_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(&dir.path().join("objects")).unwrap();
        let src = dir.path().join("spooled");
        std::fs::write(&src, b"0123456789").unwrap();
        store.put_file("1.2/3.4/5.6.dcm", &src).await.unwrap();
        assert!(!src.exists(), "spool file is consumed");
        assert!(store.exists("1.2/3.4/5.6.dcm").await.unwrap());
        let (size, stream) = store.get("1.2/3.4/5.6.dcm").await.unwrap();
        let body: Vec<Bytes> = stream.try_collect().await.unwrap();
        assert_eq!(size, 10);
        assert_eq!(body.concat(), b"0123456789");
        let range = store.get_range("1.2/3.4/5.6.dcm", 3, 4).await.unwrap();
        assert_eq!(&range[..], b"3456");
        let keys: Vec<String> = store.list().try_collect().await.unwrap();
        assert_eq!(keys, vec!["1.2/3.4/5.6.dcm".to_string()]);
        store.delete("1.2/3.4/5.6.dcm").await.unwrap();
        assert!(!store.exists("1.2/3.4/5.6.dcm").await.unwrap());
        assert!(matches!(
            store.get("1.2/3.4/5.6.dcm").await,
            Err(StorageError::NotFound(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn keys_cannot_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        for key in ["../x.dcm", "/etc/passwd", "", "a/../../b"] {
            assert!(matches!(
                store.exists(key).await,
                Err(StorageError::InvalidKey(_))
            ));
        }
    }
}
