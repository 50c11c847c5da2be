//! Thumbnails rendered on a read are cached in the index through ingest, the one writer of the
//! index (see `render::thumbnail` for why the cache needs no claim between gateways).

use super::Ingestor;
use crate::index::WriteError;

impl Ingestor {
    /// Caches a thumbnail of instance `sop_instance_uid`'s stored copy `storage_key`; ignored if
    /// the instance has another copy by then (replaced or deleted meanwhile).
    pub async fn cache_thumbnail(
        &self,
        sop_instance_uid: &str,
        storage_key: &str,
        variant: &str,
        image: &[u8],
    ) -> Result<(), WriteError> {
        self.index
            .cache_thumbnail(sop_instance_uid, storage_key, variant, image.to_vec())
            .await
    }
}
