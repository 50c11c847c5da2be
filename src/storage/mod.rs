//! Object storage: where the stored DICOM objects live, byte for byte as received.
//!
//! The [`ObjectStore`] trait is shaped for both a local directory and S3-compatible object storage:
//! objects are put from a spooled local file (streamed, never loaded whole), read back as byte streams or
//! byte ranges (frames), deleted, and listed (to rebuild or reconcile the index).
//!
//! Backends: [`FsStore`] (a local directory) and [`S3Store`] (an S3-compatible bucket), chosen by
//! `[storage] backend` in [`open`].
//!
//! Architecture invariant: `put_file` returns only once the object is durable; nothing else in the
//! gateway decides durability.

mod fs;
mod s3;
mod wal;

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context as _;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

pub use fs::FsStore;
pub use s3::S3Store;
pub use wal::IndexSync;

/// Opens the configured backend. Makes no request to a remote store: a store that is down makes the
/// gateway not ready (`/readyz`), not fail to start.
pub async fn open(config: &crate::config::StorageConfig) -> anyhow::Result<Arc<dyn ObjectStore>> {
    let store: Arc<dyn ObjectStore> = match config.backend.as_str() {
        "s3" => {
            // `path` holds no objects with this backend, only the log of keys being stored.
            let intents = config.path.join(".intents");
            Arc::new(
                S3Store::connect(&config.s3)
                    .await
                    .with_intent_log(&intents)
                    .with_context(|| format!("opening {}", intents.display()))?,
            )
        }
        _ => Arc::new(
            FsStore::open(&config.path)
                .with_context(|| format!("opening storage at {}", config.path.display()))?,
        ),
    };
    Ok(store)
}

pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;
pub type KeyStream = Pin<Box<dyn Stream<Item = Result<String, StorageError>> + Send>>;

/// How ingest hands a spooled object to a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutPath {
    /// `put_file_blocking`, from the blocking task that parsed the object (the filesystem's
    /// write-ahead log): no thread hand-off, and the index insert runs while the object is stored.
    Blocking,
    /// The same, after ingest wrote the spool file's data back to disk (`Spooled::write_back`,
    /// started as the file filled): the store moves the file into place and flushes it itself, so
    /// its flush only commits the journal.
    BlockingAfterWriteBack,
    /// `put_file` (a remote store).
    Async,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {0} not found")]
    NotFound(String),
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    #[error("storage I/O error on {key}: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    fn io(key: &str, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            StorageError::NotFound(key.to_string())
        } else {
            StorageError::Io {
                key: key.to_string(),
                source,
            }
        }
    }
}

#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Stores the content of the local file `src` under `key`, replacing any object there, and
    /// returns once it is durable. `src` is consumed (moved or deleted).
    async fn put_file(&self, key: &str, src: &Path) -> Result<(), StorageError>;
    /// How ingest should hand this store a spooled object of `size` bytes.
    fn put_path(&self, _size: u64) -> PutPath {
        PutPath::Async
    }
    /// Stores like `put_file`, from blocking code; only for objects `put_path` does not say `Async`.
    fn put_file_blocking(&self, key: &str, _src: &Path) -> Result<(), StorageError> {
        Err(StorageError::io(
            key,
            std::io::Error::other("this store cannot store from blocking code"),
        ))
    }
    /// Streams the whole object.
    async fn get(&self, key: &str) -> Result<(u64, ByteStream), StorageError>;
    /// Reads `length` bytes at `offset`.
    async fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Bytes, StorageError>;
    async fn delete(&self, key: &str) -> Result<(), StorageError>;
    /// Records durably that the objects under `keys` may be left without an index row (before the
    /// index commit of a deletion or a replacement), until [`ObjectStore::settle`]. Puts record
    /// their own key themselves.
    fn intend_blocking(&self, _keys: &[&str]) -> Result<(), StorageError> {
        Ok(())
    }
    /// The index commit for a key put (or intended) is durable, or failed and its object is gone:
    /// the key no longer needs start-up reconcile. Must follow every put and intent.
    fn settle(&self, _key: &str) {}
    /// The keys an earlier run may have left stored without an index row (taken once, at start);
    /// None: the store keeps no such record, and reconcile must list everything.
    fn unsettled(&self) -> Option<Vec<String>> {
        None
    }
    /// How the store makes the index's commits durable before it forgets its unsettled keys.
    fn set_index_sync(&self, _sync: IndexSync) {}
    /// Clean shutdown (blocking, once no more work comes): forgets the unsettled keys if all are
    /// settled, so that the next start has nothing to reconcile.
    fn close(&self) -> Result<(), StorageError> {
        Ok(())
    }
    async fn exists(&self, key: &str) -> Result<bool, StorageError>;
    /// Lists every stored key.
    fn list(&self) -> KeyStream;
    /// Checks that the store can be written and read.
    async fn health(&self) -> Result<(), StorageError>;
}

/// The key of one stored copy of an instance: `<study>/<series>/<instance>.<copy>.dcm`. The UIDs
/// must already be validated (digits and dots only), which keeps keys inside the storage root; `copy`
/// makes each stored copy's key unique, so replacing an instance never overwrites the copy the index
/// still points at.
pub fn instance_key(
    study_uid: &str,
    series_uid: &str,
    sop_instance_uid: &str,
    copy: &str,
) -> String {
    format!("{study_uid}/{series_uid}/{sop_instance_uid}.{copy}.dcm")
}

/// The SOP Instance UID in a key made by [`instance_key`]; None for a key of another shape.
pub fn sop_instance_uid_of_key(key: &str) -> Option<&str> {
    let file = key.rsplit('/').next()?.strip_suffix(".dcm")?;
    Some(file.rsplit_once('.')?.0)
}

/// Reads a whole object into memory; only for single instances that must be re-encoded.
pub async fn read_all(store: &dyn ObjectStore, key: &str) -> Result<Vec<u8>, StorageError> {
    use futures::TryStreamExt;
    let (size, mut stream) = store.get(key).await?;
    let mut buf = Vec::with_capacity(size as usize);
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(|e| StorageError::io(key, e))?
    {
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_its_instance() {
        let key = instance_key("1.2", "1.2.3", "1.2.3.4", "0a1b2c");
        assert_eq!(key, "1.2/1.2.3/1.2.3.4.0a1b2c.dcm");
        assert_eq!(sop_instance_uid_of_key(&key), Some("1.2.3.4"));
        assert_eq!(sop_instance_uid_of_key("1.2/x.txt"), None);
    }
}
