//! S3 backend: one object per key in a bucket of any S3-compatible server (AWS S3, MinIO, Ceph,
//! Garage...), through `aws-sdk-s3`.
//!
//! - Writes stream from the spooled file: one PUT below `multipart_threshold`, else a multipart upload
//!   whose parts are read from the file at their offsets and sent `part_concurrency` at a time. Every
//!   request carries the CRC32C of its body in a header (`x-amz-checksum-crc32c`), which the server
//!   verifies before it answers. We compute it (one read of the spooled file, from the page cache) rather
//!   than let the SDK send it as a signed aws-chunked trailer: S3-compatible servers differ in how they
//!   check those trailers' signatures (Garage 2.5 refuses the SDK's), while a plain header is universal.
//!   The payload itself is not signed (as over TLS with AWS; the checksum covers integrity). An object is
//!   durable once PutObject or CompleteMultipartUpload has answered 200; the spool file is deleted then.
//! - Reads stream the response body (never a whole object in memory); `get_range` is one ranged GET,
//!   which is what makes a single frame of a large multi-frame object cheap.
//! - Transient errors (throttling, 5xx, timeouts, refused connections) are retried by the SDK with
//!   exponential backoff, `max_attempts` in all; each attempt is bounded by `attempt_timeout_secs`.

use std::path::{Component, Path};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream as S3Body, Length};
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio_util::io::ReaderStream;

use super::{ByteStream, KeyStream, ObjectStore, StorageError};
use crate::config::S3Config;

pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or ending with `/`.
    prefix: String,
    multipart_threshold: u64,
    part_size: u64,
    part_concurrency: usize,
    /// A local log of the keys being stored or deleted whose index commit is not known durable yet
    /// (intent records only, see `wal.rs`): what start-up reconcile looks at, instead of listing
    /// the bucket. None: reconcile lists the bucket.
    intents: Option<super::wal::Wal>,
}

impl S3Store {
    /// Keeps the log of keys being stored in the local directory `dir` (replayed now, blocking).
    pub fn with_intent_log(mut self, dir: &Path) -> std::io::Result<S3Store> {
        self.intents = Some(super::wal::Wal::open(dir, dir)?);
        Ok(self)
    }

    /// Builds the client; makes no request, so the gateway starts (and reports itself not ready)
    /// while the server is unreachable.
    pub async fn connect(cfg: &S3Config) -> S3Store {
        let retry = aws_config::retry::RetryConfig::standard()
            .with_max_attempts(cfg.max_attempts)
            .with_initial_backoff(Duration::from_millis(200))
            .with_max_backoff(Duration::from_secs(5));
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(cfg.connect_timeout_secs))
            .operation_attempt_timeout(Duration::from_secs(cfg.attempt_timeout_secs))
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(cfg.region.clone()))
            .retry_config(retry)
            .timeout_config(timeouts);
        if !cfg.endpoint.is_empty() {
            loader = loader.endpoint_url(&cfg.endpoint);
        }
        if !cfg.access_key_id.is_empty() {
            loader = loader.credentials_provider(Credentials::new(
                &cfg.access_key_id,
                &cfg.secret_access_key,
                None,
                None,
                "dicom-gateway config",
            ));
        }
        let shared = loader.load().await;
        let s3 = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(cfg.force_path_style)
            // Our own CRC32C header instead (see the module doc).
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            // The SDK can check only whole-object checksums, and warns on every read of a multipart
            // object; integrity on the way in is what the upload checksums guarantee.
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        let prefix = match cfg.prefix.trim_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        S3Store {
            client: Client::from_conf(s3),
            bucket: cfg.bucket.clone(),
            prefix,
            multipart_threshold: cfg.multipart_threshold,
            part_size: cfg.part_size,
            part_concurrency: cfg.part_concurrency,
            intents: None,
        }
    }

    /// The bucket key of an object key; the same shape rules as the filesystem backend, so a key
    /// means the same object on both.
    fn s3_key(&self, key: &str) -> Result<String, StorageError> {
        let safe = !key.is_empty()
            && Path::new(key)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !safe {
            return Err(StorageError::InvalidKey(key.to_string()));
        }
        Ok(format!("{}{key}", self.prefix))
    }

    async fn put_multipart(
        &self,
        key: &str,
        s3_key: &str,
        src: &Path,
        size: u64,
    ) -> Result<(), StorageError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(s3_key)
            .content_type("application/dicom")
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .send()
            .await
            .map_err(|e| sdk_error(key, e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| other(key, "CreateMultipartUpload returned no upload id"))?
            .to_string();
        let parts = self.upload_parts(key, s3_key, &upload_id, src, size).await;
        let completed = match parts {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(s3_key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| sdk_error(key, e)),
            Err(e) => Err(e),
        };
        if completed.is_err() {
            // Parts already uploaded would otherwise be kept (and billed) by the server.
            if let Err(e) = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(s3_key)
                .upload_id(&upload_id)
                .send()
                .await
            {
                tracing::warn!(key, error = %DisplayErrorContext(&e), "could not abort multipart upload");
            }
        }
        completed
    }

    /// Uploads the parts, at most `part_concurrency` at once, each read from the file at its offset.
    async fn upload_parts(
        &self,
        key: &str,
        s3_key: &str,
        upload_id: &str,
        src: &Path,
        size: u64,
    ) -> Result<Vec<CompletedPart>, StorageError> {
        let count = size.div_ceil(self.part_size);
        let mut parts: Vec<CompletedPart> = futures::stream::iter(0..count)
            .map(|i| async move {
                let offset = i * self.part_size;
                let length = self.part_size.min(size - offset);
                let crc = crc32c(key, src, offset, length).await?;
                let body = S3Body::read_from()
                    .path(src)
                    .offset(offset)
                    .length(Length::Exact(length))
                    .build()
                    .await
                    .map_err(|e| other(key, &e.to_string()))?;
                let part_number = i as i32 + 1;
                let out = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(s3_key)
                    .upload_id(upload_id)
                    .part_number(part_number)
                    .content_length(length as i64)
                    .checksum_crc32_c(&crc)
                    .body(body)
                    .customize()
                    .disable_payload_signing()
                    .send()
                    .await
                    .map_err(|e| sdk_error(key, e))?;
                Ok::<_, StorageError>(
                    CompletedPart::builder()
                        .part_number(part_number)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .checksum_crc32_c(crc)
                        .build(),
                )
            })
            .buffer_unordered(self.part_concurrency)
            .try_collect()
            .await?;
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }
}

/// The CRC32C of `length` bytes of `path` at `offset`, base64 of its big-endian bytes (the S3 header form).
async fn crc32c(key: &str, path: &Path, offset: u64, length: u64) -> Result<String, StorageError> {
    use base64::Engine as _;
    use std::io::{Read, Seek, SeekFrom};
    let path = path.to_path_buf();
    let crc = tokio::task::spawn_blocking(move || -> std::io::Result<u32> {
        let mut file = std::fs::File::open(&path)?;
        file.seek(SeekFrom::Start(offset))?;
        let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = length;
        while left > 0 {
            let n = file.read(&mut buf[..left.min(1 << 20) as usize])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            digest.update(&buf[..n]);
            left -= n as u64;
        }
        Ok(digest.finalize() as u32)
    })
    .await
    .expect("checksum task panicked")
    .map_err(|e| StorageError::io(key, e))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes()))
}

fn other(key: &str, message: &str) -> StorageError {
    StorageError::Io {
        key: key.to_string(),
        source: std::io::Error::other(message.to_string()),
    }
}

/// 404 (or NoSuchKey) means not found; anything else is a storage failure, described with the
/// server's error code and message.
fn sdk_error<E>(key: &str, e: SdkError<E, HttpResponse>) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let code_not_found = matches!(&e, SdkError::ServiceError(s)
        if matches!(s.err().code(), Some("NoSuchKey" | "NotFound")));
    let status_not_found = e.raw_response().is_some_and(|r| r.status().as_u16() == 404);
    if code_not_found || status_not_found {
        return StorageError::NotFound(key.to_string());
    }
    other(key, &describe(&e))
}

/// The server's status, code and message for a service error; the cause chain for the others
/// (connection refused, timeout...).
fn describe<E>(e: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match e {
        SdkError::ServiceError(s) => format!(
            "S3 answered {}: {} {}",
            s.raw().status().as_u16(),
            s.err().code().unwrap_or("error"),
            s.err().message().unwrap_or("")
        ),
        other => DisplayErrorContext(other).to_string(),
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put_file(&self, key: &str, src: &Path) -> Result<(), StorageError> {
        let s3_key = self.s3_key(key)?;
        if let Some(intents) = self.intents.clone() {
            // Logged before the object can exist: if the index commit is then lost, the next start
            // reconciles this key.
            let owned = key.to_string();
            tokio::task::spawn_blocking(move || intents.intend_blocking(&[&owned]))
                .await
                .expect("intent task panicked")
                .map_err(|e| StorageError::io(key, e))?;
        }
        let size = tokio::fs::metadata(src)
            .await
            .map_err(|e| StorageError::io(key, e))?
            .len();
        if size >= self.multipart_threshold {
            self.put_multipart(key, &s3_key, src, size).await?;
        } else {
            let crc = crc32c(key, src, 0, size).await?;
            let body = S3Body::from_path(src)
                .await
                .map_err(|e| other(key, &e.to_string()))?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&s3_key)
                .content_type("application/dicom")
                .content_length(size as i64)
                .checksum_crc32_c(crc)
                .body(body)
                .customize()
                .disable_payload_signing()
                .send()
                .await
                .map_err(|e| sdk_error(key, e))?;
        }
        // Durable in the bucket: the spool copy is no longer needed.
        tokio::fs::remove_file(src)
            .await
            .map_err(|e| StorageError::io(key, e))
    }

    async fn get(&self, key: &str) -> Result<(u64, ByteStream), StorageError> {
        let s3_key = self.s3_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&s3_key)
            .send()
            .await
            .map_err(|e| sdk_error(key, e))?;
        let size = out.content_length().unwrap_or(0).max(0) as u64;
        let reader = out.body.into_async_read();
        Ok((
            size,
            Box::pin(ReaderStream::with_capacity(reader, 256 * 1024)),
        ))
    }

    async fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Bytes, StorageError> {
        if length == 0 {
            return Ok(Bytes::new());
        }
        let s3_key = self.s3_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&s3_key)
            .range(format!("bytes={}-{}", offset, offset + length - 1))
            .send()
            .await
            .map_err(|e| sdk_error(key, e))?;
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| other(key, &e.to_string()))?
            .into_bytes();
        if body.len() as u64 != length {
            return Err(other(
                key,
                &format!(
                    "range of {length} bytes at {offset} returned {} bytes",
                    body.len()
                ),
            ));
        }
        Ok(body)
    }

    fn intend_blocking(&self, keys: &[&str]) -> Result<(), StorageError> {
        match &self.intents {
            Some(intents) => intents
                .intend_blocking(keys)
                .map_err(|e| StorageError::io(".intents", e)),
            None => Ok(()),
        }
    }

    fn settle(&self, key: &str) {
        if let Some(intents) = &self.intents {
            intents.settle(key);
        }
    }

    fn unsettled(&self) -> Option<Vec<String>> {
        Some(
            self.intents
                .as_ref()?
                .take_carried_over()
                .unwrap_or_default(),
        )
    }

    fn set_index_sync(&self, sync: super::IndexSync) {
        if let Some(intents) = &self.intents {
            intents.set_index_sync(sync);
        }
    }

    fn close(&self) -> Result<(), StorageError> {
        match &self.intents {
            Some(intents) => intents
                .close()
                .map(|_| ())
                .map_err(|e| StorageError::io(".intents", e)),
            None => Ok(()),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let s3_key = self.s3_key(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&s3_key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match sdk_error(key, e) {
                StorageError::NotFound(_) => Ok(()),
                e => Err(e),
            },
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        let s3_key = self.s3_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&s3_key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => match sdk_error(key, e) {
                StorageError::NotFound(_) => Ok(false),
                e => Err(e),
            },
        }
    }

    fn list(&self) -> KeyStream {
        // Pages of up to 1,000 keys are fetched only as the consumer takes keys.
        let pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .into_paginator()
            .send();
        let prefix = self.prefix.clone();
        let bucket = self.bucket.clone();
        // After an error the listing ends (with that error) rather than asking again.
        futures::stream::unfold(Some(pages), |pages| async move {
            let mut pages = pages?;
            let page = pages.next().await?;
            let next = page.is_ok().then_some(pages);
            Some((page, next))
        })
        .map(move |page| match page {
            Ok(page) => {
                let keys: Vec<Result<String, StorageError>> = page
                    .contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .filter_map(|k| k.strip_prefix(prefix.as_str()))
                    .filter(|k| k.ends_with(".dcm"))
                    .map(|k| Ok(k.to_string()))
                    .collect();
                futures::stream::iter(keys)
            }
            Err(e) => futures::stream::iter(vec![Err(sdk_error(&bucket, e))]),
        })
        .flatten()
        .boxed()
    }

    async fn health(&self) -> Result<(), StorageError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(|_| ())
            // Not `sdk_error`: a missing bucket is a broken store, not a missing object.
            .map_err(|e| other(&self.bucket, &describe(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store(prefix: &str) -> S3Store {
        S3Store::connect(&S3Config {
            endpoint: "http://127.0.0.1:1".into(),
            bucket: "b".into(),
            prefix: prefix.into(),
            access_key_id: "id".into(),
            secret_access_key: "secret".into(),
            ..S3Config::default()
        })
        .await
    }

    #[tokio::test]
    async fn keys_go_under_the_prefix_and_cannot_escape_it() {
        for prefix in ["dicom", "dicom/", "/dicom/"] {
            assert_eq!(
                store(prefix).await.s3_key("1.2/3.4/5.6.x.dcm").unwrap(),
                "dicom/1.2/3.4/5.6.x.dcm"
            );
        }
        let bare = store("").await;
        assert_eq!(bare.s3_key("1.2/3.dcm").unwrap(), "1.2/3.dcm");
        for key in ["../x.dcm", "/etc/passwd", "", "a/../../b"] {
            assert!(matches!(bare.s3_key(key), Err(StorageError::InvalidKey(_))));
        }
    }

    #[tokio::test]
    async fn unreachable_server_is_a_storage_error_not_a_hang() {
        let s = store("p").await;
        let started = std::time::Instant::now();
        assert!(s.health().await.is_err());
        assert!(matches!(
            s.exists("1/2/3.x.dcm").await,
            Err(StorageError::Io { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(60));
    }
}
